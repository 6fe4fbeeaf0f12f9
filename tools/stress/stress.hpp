// sched-stress as a library: runs one target under many threads, checks it
// while running and at each pause, and reports what it measured and the
// violations it found, the earliest first. Used by the sched-stress program
// and by tests/test_stress_harness.cpp. docs/stress.md describes the checks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tgi_gtc::stress {

enum class Target {
  Scheduler,         ///< tgi_gtc::scheduling::Scheduler
  Pool,              ///< tgi_gtc::scheduling::BlockPool
  Engine,            ///< tgi_gtc::scheduling::Engine (when built)
  BrokenMoodycamel,  ///< per-priority moodycamel queues: not FIFO across producers
  BrokenDropping,    ///< a mutex queue that loses every task whose id is a multiple of drop_every
  BrokenDuplicates,  ///< a mutex queue that never reports DuplicateId (meant for --reuse-ids)
  BrokenFull,        ///< a mutex queue that reports QueueFull for every task whose id is a multiple of drop_every
  BrokenClear,       ///< a mutex queue whose clear() returns the tasks in the reverse of next()'s order
  BrokenLen,         ///< a mutex queue whose len() reports half the tasks queued
  BrokenLenDip,      ///< a mutex queue whose cancel() lowers len() while it waits for the lock, whether or not it then finds its id
  BrokenLenEarly,    ///< a mutex queue whose len() counts a task from next_id(), before its schedule() begins (no fault with --reuse-ids)
  BrokenEmpty,       ///< a mutex queue whose next() and peek() report nothing on every drop_every-th call
  BrokenPool,        ///< a BlockPool that, every drop_every-th release of a shared block, drops a reference too many
  BrokenPoolOrder,   ///< a pool right in every count but with every atomic relaxed (caught under ThreadSanitizer only)
  BrokenPoolBits,    ///< a BlockPool that keeps every drop_every-th freed block, yet counts it free (a bit left set)
  BrokenPoolRefusing,///< a BlockPool whose every drop_every-th try_allocate fails, however many blocks are free
  BrokenEngine,      ///< an Engine whose plans leave out every drop_every-th preemption (when built)
  BrokenEngineOrder, ///< an Engine that queues and preempts every task as Normal (when built)
  BrokenEngineFull,  ///< an Engine that reports QueueFull for every task whose id is a multiple of drop_every (when built)
};

std::string_view to_string(Target t);
std::optional<Target> parse_target(std::string_view name);
/// Targets compiled into this build (Engine only when its header exists).
std::vector<Target> available_targets();

/// Operation names and weights, in the target's order.
using Mix = std::vector<std::pair<std::string, unsigned>>;

/// The target's operations with their default weights.
Mix default_mix(Target t);
/// Whether the target is driven by the scheduler run (its ops are the Scheduler's).
bool is_scheduler_target(Target t);
/// Parses "schedule=40,next=30": named ops get their weight, the others 0.
/// Throws std::invalid_argument on an unknown op, a bad number or an all-zero mix.
Mix parse_mix(Target t, std::string_view text);

struct Config {
  Target target = Target::Scheduler;
  unsigned threads = 4;
  /// Measured run time; 0: run `ops` operations instead.
  double seconds = 0;
  /// Operations in all, split evenly among the threads (when seconds is 0).
  std::uint64_t ops = 400'000;
  /// Empty: default_mix(target).
  Mix mix;
  /// Scheduler targets: max_queue_size. Pool: blocks. Engine: device blocks.
  /// 0: the target's default (1024 tasks, 1024 blocks, 256 blocks).
  std::size_t capacity = 0;
  /// Scheduler and Engine: priority_scheduling off (one FIFO over all tasks).
  bool fifo = false;
  /// Scheduler targets: 0, or draw every schedule's and cancel's id from the
  /// ids 1..reuse_ids (reused at once by all threads) instead of next_id().
  /// Ordering needs unique ids, so each epoch then checks, per id, that its
  /// accepted schedules equal its removals (and len() after the drain).
  std::size_t reuse_ids = 0;
  std::uint64_t seed = 1;
  /// Events (or operations) each thread records before the run pauses to check
  /// the history and empty the logs. Bounds memory: about 100 bytes an event
  /// per thread (the log, the checker's copy and its index).
  std::size_t max_events = std::size_t{1} << 16;
  /// Scheduler targets: every this-th operation of a thread is followed by a
  /// len() call (is_empty() every other time, where the target has it)
  /// between two clock ticks, judged at the pause against the calls around
  /// it. 0: none (len() is still checked against the capacity after every
  /// operation, and exactly at each pause).
  std::size_t len_every = 4;
  /// Findings kept per kind (all are counted).
  std::size_t max_findings = 3;
  /// broken-dropping: loses tasks whose id is a multiple of this.
  /// broken-pool: over-releases on every this-th release of a shared block.
  /// broken-pool-bits: keeps every this-th block a release frees.
  /// broken-engine: leaves every this-th preemption out of the plans.
  std::uint64_t drop_every = 100;
  /// Seconds without progress (no operation finished, or one guarded check
  /// still running) after which the run is declared stalled: it prints what
  /// each thread was doing and ends the process with status 1, since a call
  /// that never returns cannot be joined. 0: never.
  double stall_seconds = 60;
  /// A progress line with live throughput on `progress_stream` (a terminal).
  bool progress = false;
  std::ostream* progress_stream = nullptr;
};

/// One call named by a violation. `start`/`end` are the shared logical clock
/// read before and after it (0 where the call was not stamped).
struct CallRef {
  std::string op;
  std::uint64_t id;
  std::uint64_t start, end;
};

struct Violation {
  /// conservation, fifo, priority, cancel, peek, payload, len, duplicate (scheduler);
  /// owner, refcount, pool, payload (pool); engine, lifecycle, blocks, order (engine).
  std::string kind;
  std::string detail;
  /// Task (or block) ids involved, in the order the detail names them.
  std::vector<std::uint64_t> ids;
  std::vector<CallRef> calls;
  /// Clock value by which the violation is certain: violations are ordered by it.
  std::uint64_t at = 0;
};

struct OpStats {
  std::string name;
  std::uint64_t calls = 0;
  std::uint64_t ok = 0;  ///< succeeded / returned something
};

struct Report {
  Config config;  ///< as run: mix, capacity and seed filled in
  double seconds = 0;  ///< measured time (pauses for checking excluded)
  double check_seconds = 0;  ///< time spent in checking pauses
  std::uint64_t total_ops = 0;
  std::vector<OpStats> ops;
  std::size_t epochs = 0;  ///< runs between pauses
  std::uint64_t events_checked = 0;  ///< history events (scheduler targets)
  /// Target-specific figures: max_len, tasks_accepted, steps, ...
  std::vector<std::pair<std::string, std::uint64_t>> stats;
  /// Remarks printed with the summary (ops left out of the mix, ...).
  std::vector<std::string> notes;
  /// Earliest first; at most max_findings per kind.
  std::vector<Violation> violations;
  /// (kind, number found) for every kind found.
  std::vector<std::pair<std::string, std::uint64_t>> violation_counts;

  bool ok() const { return violation_counts.empty(); }
  std::uint64_t stat(std::string_view name) const;
};

/// Runs the configured stress. Throws std::invalid_argument on a bad config.
Report run(Config config);

/// A human summary (several lines, ending with PASS or FAIL and the first violation).
void print_summary(std::ostream& os, const Report& r);
/// The same as one JSON object.
void write_json(std::ostream& os, const Report& r);

}  // namespace tgi_gtc::stress
