// The parts every target's run shares: the violation collector, the progress
// line, and the driver that runs worker threads in epochs separated by pauses
// (all workers stopped) where the main thread checks what they did.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "stress.hpp"
#include "support/history.hpp"

// The Engine target is built once the library has an Engine (CMake defines
// TGI_STRESS_HAS_ENGINE=1 when engine.hpp and engine/engine.cpp exist).
#ifndef TGI_STRESS_HAS_ENGINE
#define TGI_STRESS_HAS_ENGINE 0
#endif

namespace tgi_gtc::stress::detail {

using tgi_test::LogicalClock;

/// Keeps the earliest `max_per_kind` violations of each kind and counts all.
/// Thread-safe; workers call it only when they found something, so the lock
/// never sits on the path of a clean run.
class Collector {
 public:
  explicit Collector(std::size_t max_per_kind) : max_per_kind_(max_per_kind) {}

  /// Counts `v` (unless `counted` is false: its count came through add_count) and keeps it if early enough.
  void add(Violation v, bool counted = true);
  void add_count(const std::string& kind, std::uint64_t n);
  /// Whether anything was found; workers poll it to stop early.
  bool any() const noexcept { return total_.load(std::memory_order::relaxed) != 0; }  // relaxed: a hint to stop; the barrier publishes the rest
  std::uint64_t total() const noexcept { return total_.load(std::memory_order::relaxed); }  // relaxed: for the progress line only
  /// Fills violations (earliest first) and violation_counts.
  void finish(Report& r) const;

 private:
  std::size_t max_per_kind_;
  mutable std::mutex mutex_;
  std::map<std::string, std::vector<Violation>> kept_;
  std::map<std::string, std::uint64_t> counts_;
  std::atomic<std::uint64_t> total_{0};
};

/// A violation about one call stamped [start, end].
Violation make_violation(std::string kind, std::string detail, std::vector<std::uint64_t> ids, std::vector<CallRef> calls);

/// "\r[  1.5s]  2.31 Mops/s ..." on a terminal, at most twice a second.
class Progress {
 public:
  explicit Progress(const Config& c) : out_(c.progress ? c.progress_stream : nullptr) {}
  void update(double seconds, std::uint64_t ops, std::size_t epoch, std::uint64_t violations);
  void finish();

 private:
  std::ostream* out_;
  double last_t_ = 0;  // the first line comes after half a second
  std::uint64_t last_ops_ = 0;
  bool printed_ = false;
};

/// What a worker is doing, for the stall report: an index into the mix (the
/// operation it began last), or one of these.
inline constexpr std::uint32_t kOpIdle = 0xFFFF'FFFF;      ///< has not begun an operation this epoch
inline constexpr std::uint32_t kOpFinished = 0xFFFF'FFFE;  ///< returned from its epoch's work
inline constexpr std::uint32_t kOpDraining = 0xFFFF'FFFD;  ///< past its operations, waiting or draining (engine loop)
inline constexpr std::uint32_t kOpServing = 0xFFFF'FFFC;   ///< past its quota, serving while others work (engine loop): not progress

/// Per-thread count of operations done, read by the progress line and the
/// watchdog, and the operation under way, read by the watchdog.
struct alignas(64) LiveCount {
  std::atomic<std::uint64_t> ops{0};
  std::atomic<std::uint32_t> op{kOpIdle};
  /// Called by the worker before each operation (index into the mix).
  void begin(std::size_t op_index) noexcept {
    op.store(static_cast<std::uint32_t>(op_index), std::memory_order::relaxed);  // relaxed: read only by the stall report
  }
};
static_assert(sizeof(LiveCount) == 64 && alignof(LiveCount) == 64);

/// Counts of calls and successes per op kind, kept by one thread.
struct OpCounts {
  std::vector<std::uint64_t> calls, ok;
  explicit OpCounts(std::size_t kinds = 0) : calls(kinds, 0), ok(kinds, 0) {}
  void add(std::size_t op, bool success) {
    ++calls[op];
    ok[op] += success;
  }
};

/// Fills r.ops from the per-thread counts.
void sum_ops(Report& r, const Mix& mix, const std::vector<OpCounts>& counts);

/// Picks an op index by weight.
class OpPicker {
 public:
  explicit OpPicker(const Mix& mix) {
    for (const auto& [name, w] : mix) {
      total_ += w;
      cumulative_.push_back(total_);
    }
  }
  std::size_t pick(std::mt19937_64& rng) const {
    const std::uint64_t x = rng() % total_;
    std::size_t i = 0;
    while (x >= cumulative_[i]) ++i;
    return i;
  }

 private:
  std::vector<std::uint64_t> cumulative_;
  std::uint64_t total_ = 0;
};

/// A per-thread random generator derived from the run's seed.
inline std::mt19937_64 thread_rng(std::uint64_t seed, unsigned w) {
  std::seed_seq s{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32), static_cast<std::uint32_t>(w)};
  return std::mt19937_64(s);
}

/// How many stamps of the sorted `v` are below `x`.
inline std::int64_t below(const std::vector<std::uint64_t>& v, std::uint64_t x) {
  return static_cast<std::int64_t>(std::lower_bound(v.begin(), v.end(), x) - v.begin());
}

/// splitmix64: derives task payloads from ids so that any corruption shows.
constexpr std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// Ends a run that stopped making progress. While armed, a thread of its own
/// reads progress() every 100 ms; if the value has not changed for
/// cfg.stall_seconds, it prints a FAIL line naming a "stall" violation with
/// describe()'s account and the seed, and ends the process with status 1
/// (std::_Exit: a thread stuck in a call can be neither stopped nor joined,
/// so no summary or JSON file is written). Of the lock-free calls under test
/// some call always finishes, so a stall is a call that never returns (a
/// livelock, a spin on a state nobody will write), or a check that never ends.
/// The limit is wall time: a process stopped (SIGSTOP, a debugger) for longer
/// is reported when it resumes; run with stall_seconds 0 to debug.
class Watchdog {
 public:
  explicit Watchdog(const Config& cfg);  // no thread when stall_seconds is 0
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;
  /// Watches from now until disarm(). Both functions are called on the
  /// watchdog's thread, concurrently with the run: they may read atomics only.
  void arm(std::function<std::uint64_t()> progress, std::function<std::string()> describe);
  void disarm();

 private:
  void watch();
  double stall_seconds_;
  std::uint64_t seed_;
  bool progress_line_;  // a progress line may be half written on stderr
  std::mutex mutex_;
  std::condition_variable wake_;
  bool quit_ = false, armed_ = false;
  std::uint64_t generation_ = 0;  // arm() calls so far
  std::function<std::uint64_t()> progress_;
  std::function<std::string()> describe_;
  std::thread thread_;
};

/// Runs cfg.threads workers in epochs. Each epoch starts every worker at a
/// barrier; `work(w, quota, live, stop)` runs thread w's operations until it
/// has done `quota`, or `stop` is set (by the time limit, by a worker whose log
/// is full, or on a violation), and returns how many it did. Between epochs,
/// with every worker stopped, `pause()` runs on the calling thread (checks,
/// drains) and returns false to end the run. Fills seconds, check_seconds,
/// total_ops and epochs of `r`. `watchdog` is armed while the workers run:
/// their operation counts are the progress (a worker calls live.begin(op)
/// before each operation and counts it in live.ops when it returns; those of
/// a worker in kOpServing are left out).
void drive(const Config& cfg, Report& r, Progress& progress, const Collector& found, std::atomic<bool>& stop, Watchdog& watchdog,
           const std::function<std::uint64_t(unsigned, std::uint64_t, LiveCount&)>& work, const std::function<bool()>& pause);

// The runs, one per target family.
void run_scheduler_target(const Config& cfg, Report& r);
void run_pool_target(const Config& cfg, Report& r);
void run_engine_target(const Config& cfg, Report& r);

}  // namespace tgi_gtc::stress::detail
