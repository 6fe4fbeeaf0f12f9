// Replays a trace through the real Engine on a virtual clock.
//
// Each iteration: submit every request whose arrival time has come, call
// Engine::step(), charge the step's cost (CostModel) to the clock, then give
// every running task one token (append_tokens(id, 1)) and finish those that
// reached their output length. Time to first token is the end of the step
// that admitted the task minus its arrival; a task recomputed after
// preemption pays its prefill again but keeps its first TTFT.
//
// A token that finds no KV block (append_tokens false) is still produced; the
// task then sits out steps until step() gives it a block (stalled). When
// every running task is stalled and step() frees nothing (preemption off, or
// only non-preemptible tasks left) no block would ever come back: the
// simulated serving loop then cancels one task (preemptible first, lowest
// priority, newest) and resubmits it with its tokens so far, to be prefilled
// again. ClassStats::evictions counts these. One that finds the waiting queue
// full is held by the loop and resubmitted before any new arrival, never
// rejected: rejected_queue_full counts arrivals only.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "model.hpp"
#include "trace.hpp"

namespace tgi_gtc::sim {

/// What happened to the requests of one priority under one policy.
struct ClassStats {
  std::size_t requests = 0;             ///< in the trace
  std::size_t completed = 0;
  std::size_t rejected_queue_full = 0;  ///< submit() of its arrival said QueueFull
  std::size_t rejected_too_large = 0;   ///< prompt + output exceed the device pool (ExceedsCapacity)
  std::vector<double> ttft_ms;          ///< completed requests, sorted ascending
  std::vector<double> e2e_ms;           ///< completed requests, sorted ascending
  std::uint64_t preemptions = 0;        ///< times a task of this priority was preempted
  std::uint64_t swapped_blocks = 0;     ///< KV blocks copied for it, out and back in
  std::uint64_t recomputed_tokens = 0;  ///< tokens prefilled again (recompute preemption or eviction)
  std::uint64_t evictions = 0;          ///< times the loop cancelled and resubmitted it to end a deadlock
  std::uint64_t output_tokens = 0;      ///< tokens generated
};

struct PolicyResult {
  Policy policy = Policy::Fifo;
  std::array<ClassStats, 4> by_priority{};  ///< indexed by scheduling::value(priority)
  std::uint64_t steps = 0;
  Nanos makespan = 0;           ///< the first arrival to the last completion (or to the end of a failed run)
  Nanos busy = 0;               ///< sum of step durations
  Nanos prefill_time = 0;       ///< parts of `busy` by cost term
  Nanos decode_time = 0;
  Nanos swap_time = 0;
  double kv_utilization = 0;    ///< mean share of device blocks in use over the makespan
  std::uint64_t stalled_appends = 0;      ///< append_tokens() calls that found no free block
  std::uint64_t stalled_task_steps = 0;   ///< steps skipped by tasks waiting for a block
  std::size_t peak_waiting = 0;
  /// Non-empty when the run could not finish (for example every running task
  /// stalled on a full KV pool with preemption off); the statistics then
  /// cover what completed until then.
  std::string failure;

  [[nodiscard]] std::uint64_t output_tokens() const;
  [[nodiscard]] double output_tokens_per_s() const;
};

/// Called now and then with (requests resolved, requests in the trace).
using ProgressFn = std::function<void(std::size_t, std::size_t)>;

/// Deterministic: no wall clock, no unordered iteration. `requests` must be
/// sorted by arrival (as parse_trace and generate return them).
PolicyResult simulate(std::span<const Request> requests, Policy policy, const ServerConfig& server,
                      const CostModel& cost, const ProgressFn& progress = {});

/// Nearest-rank percentile of ascending `sorted` (p in [0, 100]); NaN if empty.
double percentile(std::span<const double> sorted, double p);

}  // namespace tgi_gtc::sim
