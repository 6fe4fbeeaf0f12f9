// The parts every target's run shares: the violation collector, the progress
// line, and the driver that runs worker threads in epochs separated by pauses
// (all workers stopped) where the main thread checks what they did.
#pragma once

#include <atomic>
#include <barrier>
#include <chrono>
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

/// Per-thread count of operations done, read by the progress line.
struct alignas(64) LiveCount {
  std::atomic<std::uint64_t> ops{0};
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

/// splitmix64: derives task payloads from ids so that any corruption shows.
constexpr std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// Runs cfg.threads workers in epochs. Each epoch starts every worker at a
/// barrier; `work(w, quota, live, stop)` runs thread w's operations until it
/// has done `quota`, or `stop` is set (by the time limit, by a worker whose log
/// is full, or on a violation), and returns how many it did. Between epochs,
/// with every worker stopped, `pause()` runs on the calling thread (checks,
/// drains) and returns false to end the run. Fills seconds, check_seconds,
/// total_ops and epochs of `r`.
void drive(const Config& cfg, Report& r, Progress& progress, const Collector& found, std::atomic<bool>& stop,
           const std::function<std::uint64_t(unsigned, std::uint64_t, LiveCount&)>& work, const std::function<bool()>& pause);

// The runs, one per target family.
void run_scheduler_target(const Config& cfg, Report& r);
void run_pool_target(const Config& cfg, Report& r);
void run_engine_target(const Config& cfg, Report& r);

}  // namespace tgi_gtc::stress::detail
