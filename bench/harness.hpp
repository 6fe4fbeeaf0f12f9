// The measuring harness shared by every benchmark: clock, latency histogram,
// per-thread results, the fixed-duration stop rule, task generation and the
// counters each run reports. Methodology: bench/README.md.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <time.h>

#include <benchmark/benchmark.h>

#include <tgi_gtc/scheduling/task.hpp>

#include "alloc_counter.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#define TGI_BENCH_HAVE_TSC 1
#endif

namespace tgi_bench {

namespace sched = tgi_gtc::scheduling;

// ---------------------------------------------------------------------------
// Clock. The time-stamp counter where there is one (constant and invariant on
// every x86-64 server of the last decade; calibrated against steady_clock at
// start-up), steady_clock nanoseconds elsewhere.

/// A cheap timestamp for deadlines: not ordered against surrounding code.
inline std::uint64_t ticks() noexcept {
#ifdef TGI_BENCH_HAVE_TSC
  return __rdtsc();
#else
  return static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
#endif
}

/// A timestamp for latency. Unfenced: on the machines measured an lfence pair
/// triples the cost of a reading (~30 ns instead of ~10 ns on a virtualised
/// EPYC), and the few nanoseconds of overlap it would remove do not move tails.
/// The compiler barriers keep the operation between the two readings.
inline std::uint64_t latency_stamp() noexcept {
  std::atomic_signal_fence(std::memory_order::seq_cst);
  const std::uint64_t t = ticks();
  std::atomic_signal_fence(std::memory_order::seq_cst);
  return t;
}

/// CPU time consumed by the calling thread (a system call: read once before
/// and once after a loop). On a shared machine it tells the cost of a call
/// apart from the time the thread spent waiting for a CPU.
inline std::uint64_t thread_cpu_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000u + static_cast<std::uint64_t>(ts.tv_nsec);
}

/// Involuntary context switches of the calling thread so far (a system call:
/// read once before and once after a loop). Each one stopped the thread where
/// it stood, usually inside a call, for at least a time slice of another
/// thread: at oversubscription, their number per call bounds how many calls
/// carry that wait in their latency.
inline std::uint64_t thread_preemptions() noexcept {
  rusage ru{};
  getrusage(RUSAGE_THREAD, &ru);
  return static_cast<std::uint64_t>(ru.ru_nivcsw);
}

// ---------------------------------------------------------------------------
// Run-wide settings (set once by main before any benchmark runs).

struct Config {
  std::vector<int> threads;      ///< thread counts for the multi-thread runs
  double duration_ms = 100.0;    ///< length of one fixed-duration run
  bool latency = true;           ///< also register the timed (".lat") flavour
  int max_threads = 1;           ///< max of `threads`
  double ns_per_tick = 1.0;      ///< calibrated
  double timer_overhead_ns = 0;  ///< median of an empty timed section
};

Config& config() noexcept;

inline std::uint64_t ms_to_ticks(double ms) { return static_cast<std::uint64_t>(ms * 1e6 / config().ns_per_tick); }
inline double ticks_to_ns(double t) { return t * config().ns_per_tick; }

// ---------------------------------------------------------------------------
// Latency histogram: log-linear buckets over ticks (HdrHistogram's layout with
// 4 sub-bucket bits): values below 16 exact, above that 16 linear buckets per
// power of two, so a bucket is at most 1/16 (6.25 %) wide. Fixed size, no
// allocation while recording; one per thread, merged after the run.

class Histogram {
 public:
  static constexpr int kSubBits = 4;
  static constexpr int kSub = 1 << kSubBits;
  static constexpr int kBuckets = kSub + (64 - kSubBits) * kSub;

  void record(std::uint64_t v) noexcept {
    ++buckets_[index(v)];
    ++count_;
    max_ = std::max(max_, v);
  }

  void merge(const Histogram& o) noexcept {
    for (int i = 0; i < kBuckets; ++i) buckets_[i] += o.buckets_[i];
    count_ += o.count_;
    max_ = std::max(max_, o.max_);
  }

  std::uint64_t count() const noexcept { return count_; }
  std::uint64_t max() const noexcept { return max_; }

  /// Upper bound of the bucket holding quantile q (0 < q <= 1), in ticks;
  /// never above the exact maximum.
  std::uint64_t quantile(double q) const noexcept {
    if (count_ == 0) return 0;
    const auto rank = static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(count_)));
    std::uint64_t seen = 0;
    for (int i = 0; i < kBuckets; ++i) {
      seen += buckets_[i];
      if (seen >= std::max<std::uint64_t>(rank, 1)) return std::min(upper(i), max_);
    }
    return max_;
  }

  static int index(std::uint64_t v) noexcept {
    if (v < kSub) return static_cast<int>(v);
    const int e = std::bit_width(v) - 1;  // >= kSubBits
    const auto sub = static_cast<int>((v >> (e - kSubBits)) & (kSub - 1));
    return kSub + (e - kSubBits) * kSub + sub;
  }
  static std::uint64_t upper(int i) noexcept {
    if (i < kSub) return static_cast<std::uint64_t>(i);
    const int e = (i - kSub) / kSub + kSubBits;
    const auto sub = static_cast<std::uint64_t>((i - kSub) % kSub);
    const std::uint64_t lo = (kSub + sub) << (e - kSubBits);
    const std::uint64_t width = std::uint64_t{1} << (e - kSubBits);
    return lo + (width - 1);
  }

 private:
  std::array<std::uint64_t, kBuckets> buckets_{};
  std::uint64_t count_ = 0;
  std::uint64_t max_ = 0;
};

// ---------------------------------------------------------------------------
// Per-thread results, written by their thread once at the end of its loop and
// read by thread 0 after Google Benchmark's end-of-run barrier.

struct alignas(64) ThreadStats {
  std::uint64_t ops = 0;        ///< successful operations: the fairness measure
  std::uint64_t items = 0;      ///< work units counted in throughput
  std::uint64_t scheduled = 0;  ///< tasks accepted (queue conservation check)
  std::uint64_t taken = 0;      ///< tasks returned by next()
  std::uint64_t cancelled = 0;  ///< tasks returned by cancel()
  std::uint64_t aux0 = 0;       ///< workload-specific (see each loop)
  std::uint64_t aux1 = 0;
  std::uint64_t start = 0;        ///< ticks at loop entry
  std::uint64_t end = 0;          ///< ticks at loop exit
  std::uint64_t allocs = 0;       ///< heap allocations made inside the loop
  std::uint64_t cpu_ns = 0;       ///< CPU time the thread used inside the loop
  std::uint64_t preemptions = 0;  ///< involuntary context switches inside the loop
  std::uint64_t sum_in = 0;       ///< sum of fingerprint() of the tasks accepted
  std::uint64_t sum_out = 0;      ///< sum of fingerprint() of the tasks returned (next or cancel)
  std::uint64_t wrong = 0;        ///< calls that returned another task than the one asked for (cancel by id)
  int role = 0;                   ///< fairness is computed within a role
};

/// State shared by the threads of one run: results, histograms, stop flag.
struct RunBase {
  explicit RunBase(int threads)
      : stats(static_cast<std::size_t>(threads)),
        hist(static_cast<std::size_t>(threads)),
        duration_ticks(ms_to_ticks(config().duration_ms)) {}

  alignas(64) std::atomic<bool> stop{false};
  alignas(64) std::vector<ThreadStats> stats;
  std::vector<Histogram> hist;
  std::uint64_t duration_ticks;
  std::string error;  ///< non-empty: no numbers are reported
};

/// The fixed-duration rule: every thread runs until the shared flag is set,
/// and the first thread to see the deadline pass sets it. The clock is read
/// once every 64 iterations; the flag on every one (a read-only shared line
/// until the single store, so it costs an L1 hit).
class Deadline {
 public:
  Deadline(std::atomic<bool>& stop, std::uint64_t duration_ticks) noexcept
      : stop_(stop), end_(ticks() + duration_ticks) {}

  bool expired(std::uint64_t iteration) noexcept {
    // relaxed: the flag only ends loops; results are published by the
    // benchmark library's end-of-run barrier, not by this flag.
    if (stop_.load(std::memory_order::relaxed)) return true;
    if ((iteration & 63) == 0 && ticks() >= end_) {
      // relaxed: as the load above.
      stop_.store(true, std::memory_order::relaxed);
      return true;
    }
    return false;
  }

 private:
  std::atomic<bool>& stop_;
  std::uint64_t end_;
};

/// Brackets one thread's loop: start/end ticks, CPU time, heap allocations.
template <class F>
inline void measure_thread(ThreadStats& st, F&& loop) {
  const AllocStats before = thread_alloc_stats();
  const std::uint64_t cpu0 = thread_cpu_ns();
  const std::uint64_t preempted0 = thread_preemptions();
  st.start = ticks();
  loop();
  st.end = ticks();
  st.preemptions = thread_preemptions() - preempted0;
  st.cpu_ns = thread_cpu_ns() - cpu0;
  st.allocs = thread_alloc_stats().allocs - before.allocs;
}

/// Runs f, recording its latency in h when kTimed.
template <bool kTimed, class F>
inline auto timed(Histogram& h, F&& f) {
  if constexpr (kTimed) {
    const std::uint64_t t0 = latency_stamp();
    auto r = f();
    h.record(latency_stamp() - t0);
    return r;
  } else {
    (void)h;
    return f();
  }
}

// ---------------------------------------------------------------------------
// Task generation: ids unique per stream (stream << 40 | sequence; stream 0 is
// the prefill, thread t uses t + 1), priorities drawn from a fixed shuffled
// table with the serving mix 5 % Critical, 25 % High, 60 % Normal, 10 % Low.

inline const std::array<sched::Priority, 1024>& priority_mix() {
  static const std::array<sched::Priority, 1024> table = [] {
    std::array<sched::Priority, 1024> t{};
    std::size_t i = 0;
    auto fill = [&](sched::Priority p, std::size_t n) {
      for (std::size_t k = 0; k < n; ++k) t[i++] = p;
    };
    fill(sched::Priority::Critical, 51);      // 4.98 %
    fill(sched::Priority::High, 256);         // 25.0 %
    fill(sched::Priority::Normal, 614);       // 59.96 %
    fill(sched::Priority::Low, 103);          // 10.06 %
    std::uint64_t s = 0x9E3779B97F4A7C15ull;  // fixed seed: every run draws the same sequence
    for (std::size_t k = t.size() - 1; k > 0; --k) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(t[k], t[(s >> 33) % (k + 1)]);
    }
    return t;
  }();
  return table;
}

class TaskGen {
 public:
  explicit TaskGen(std::uint64_t stream) noexcept
      : base_(stream << 40), offset_(static_cast<std::uint32_t>(stream * 389)), mix_(priority_mix().data()) {}

  sched::ScheduledTask next() noexcept {
    ++seq_;
    sched::ScheduledTask t(base_ | seq_, 64 + (seq_ & 255));
    t.priority = mix_[(seq_ + offset_) & 1023];
    return t;
  }

 private:
  std::uint64_t base_;
  std::uint32_t offset_;
  const sched::Priority* mix_;
  std::uint64_t seq_ = 0;
};

/// xorshift64*: cheap per-thread randomness for the random-size workloads.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) noexcept : s_(seed * 0x9E3779B97F4A7C15ull + 1) {}
  std::uint64_t next() noexcept {
    s_ ^= s_ >> 12;
    s_ ^= s_ << 25;
    s_ ^= s_ >> 27;
    return s_ * 0x2545F4914F6CDD1Dull;
  }

 private:
  std::uint64_t s_;
};

/// A task's fingerprint (id, tokens, priority). The sum over the tasks put in
/// must equal the sum over the tasks that came out (by next, cancel or the
/// drain): a peer that delivers one task twice and loses another, or tears a
/// task, fails it where a count would not.
inline std::uint64_t fingerprint(const sched::ScheduledTask& t) noexcept {
  std::uint64_t z = (t.id * 0x9E3779B97F4A7C15ull) ^ (static_cast<std::uint64_t>(t.estimated_tokens) << 8) ^
                    static_cast<std::uint64_t>(sched::value(t.priority));
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ---------------------------------------------------------------------------
// Reporting (thread 0, after the run).

/// Skips a one-thread benchmark whose peer failed its self-check (`err` not
/// empty), so that it reports the error and no figures.
inline void skip_unchecked(benchmark::State& state, const std::string& err) {
  if (err.empty()) return;
  static std::string error;  // outlives the run for the library's report
  error = "self-check failed: " + err;
  state.SkipWithError(error.c_str());
}

/// min/max of ops within each role, the smallest over the roles that have two
/// threads or more; nullopt when none has (one thread is always "fair", and
/// the report shows "-" rather than a perfect score that measured nothing).
inline std::optional<double> fairness(const std::vector<ThreadStats>& stats) {
  std::optional<double> f;
  for (int role = 0; role < 4; ++role) {
    std::uint64_t lo = std::numeric_limits<std::uint64_t>::max(), hi = 0;
    int threads = 0;
    for (const auto& s : stats) {
      if (s.role != role) continue;
      ++threads;
      lo = std::min(lo, s.ops);
      hi = std::max(hi, s.ops);
    }
    if (threads < 2) continue;
    const double r = hi == 0 ? 0.0 : static_cast<double>(lo) / static_cast<double>(hi);
    f = f ? std::min(*f, r) : r;
  }
  return f;
}

struct RunTotals {
  std::uint64_t items = 0, ops = 0, scheduled = 0, taken = 0, cancelled = 0, aux0 = 0, aux1 = 0, allocs = 0, cpu_ns = 0,
                preemptions = 0, sum_in = 0, sum_out = 0, wrong = 0;
  double elapsed_s = 0;
};

inline RunTotals totals(const std::vector<ThreadStats>& stats) {
  RunTotals t;
  std::uint64_t first = std::numeric_limits<std::uint64_t>::max(), last = 0;
  for (const auto& s : stats) {
    t.items += s.items;
    t.ops += s.ops;
    t.scheduled += s.scheduled;
    t.taken += s.taken;
    t.cancelled += s.cancelled;
    t.aux0 += s.aux0;
    t.aux1 += s.aux1;
    t.allocs += s.allocs;
    t.cpu_ns += s.cpu_ns;
    t.preemptions += s.preemptions;
    t.sum_in += s.sum_in;
    t.sum_out += s.sum_out;
    t.wrong += s.wrong;
    first = std::min(first, s.start);
    last = std::max(last, s.end);
  }
  t.elapsed_s = last > first ? ticks_to_ns(static_cast<double>(last - first)) * 1e-9 : 0.0;
  return t;
}

/// The counters every run reports. Set on thread 0 only: the library sums
/// counters over threads, so the others leave theirs unset.
inline void report_common(benchmark::State& state, const RunBase& run, bool timed) {
  const RunTotals t = totals(run.stats);
  const double items = static_cast<double>(t.items);
  state.counters["items_per_s"] = t.elapsed_s > 0 ? items / t.elapsed_s : 0.0;
  state.counters["ns_per_item"] = items > 0 ? t.elapsed_s * 1e9 / items : 0.0;
  state.counters["items"] = items;
  // CPU time of all threads per item: for one thread, the cost of an item
  // without the time the thread waited for a CPU; with spinning peers it
  // also counts the spinning.
  state.counters["cpu_ns_per_item"] = items > 0 ? static_cast<double>(t.cpu_ns) / items : 0.0;
  if (const std::optional<double> f = fairness(run.stats)) state.counters["fairness"] = *f;
  state.counters["allocs_per_item"] = items > 0 ? static_cast<double>(t.allocs) / items : 0.0;
  state.counters["elapsed_ms"] = t.elapsed_s * 1e3;
  if (timed) {
    Histogram all;
    for (const auto& h : run.hist) all.merge(h);
    state.counters["p50_ns"] = ticks_to_ns(static_cast<double>(all.quantile(0.50)));
    state.counters["p99_ns"] = ticks_to_ns(static_cast<double>(all.quantile(0.99)));
    state.counters["p999_ns"] = ticks_to_ns(static_cast<double>(all.quantile(0.999)));
    state.counters["max_ns"] = ticks_to_ns(static_cast<double>(all.max()));
    state.counters["lat_samples"] = static_cast<double>(all.count());
    // Involuntary context switches per 1,000 timed calls: an upper bound on
    // the share of calls that a preemption cut (one may also fall between two
    // calls). Above 1, with loops that spend nearly all their time inside calls,
    // the p99.9 is likely the latency of a preempted call.
    state.counters["preempted_per_kcall"] =
        all.count() > 0 ? 1000.0 * static_cast<double>(t.preemptions) / static_cast<double>(all.count()) : 0.0;
  }
}

/// Registration entry points (one per translation unit).
void register_queue_benchmarks();
void register_queue_mixed_benchmarks();
void register_pool_benchmarks();
void register_engine_benchmarks();

}  // namespace tgi_bench
