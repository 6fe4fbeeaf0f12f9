// The queue workloads and the driver that runs one (peer, workload, flavour)
// on Google Benchmark's threads. Methodology: bench/README.md.
//
// A run: thread 0 builds the queue, checks the peer (self_check) and prefills
// it; the library's start barrier releases every thread into its loop; each
// loop runs until the shared stop flag (Deadline); each thread writes its
// ThreadStats; after the library's end barrier thread 0 drains the queue,
// checks conservation (every accepted task came out exactly once, by next or
// cancel: the count, and the sum of the tasks' fingerprints) and reports. The
// ".lat" flavour times every call; the plain one times none.
#pragma once

#include <barrier>
#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "harness.hpp"
#include "queue_peers.hpp"

namespace tgi_bench {

using QueuePeers = std::tuple<SeedMutex, MutexDeques, TbbCpq, BoostLockfree4, Moodycamel4, AtomicQueue4, AtomicQueue1,
                              ProjectScheduler>;

template <SchedulerAdapter Q>
struct QueueRun : RunBase {
  QueueRun(int threads, std::size_t capacity) : RunBase(threads), queue(capacity), barrier(threads) {}
  Q queue;
  std::barrier<> barrier;  ///< burst rounds only
  std::uint64_t prefilled = 0;
  std::uint64_t prefill_sum = 0;  ///< sum of fingerprint() over the prefill
};

/// The queue at `depth` before timing: the timed tasks' ids and tokens, all
/// Low (see below and bench/README.md).
template <SchedulerAdapter Q>
void prefill(QueueRun<Q>& run, std::size_t depth) {
  TaskGen gen(0);
  for (std::size_t i = 0; i < depth; ++i) {
    ScheduledTask t = gen.next();
    // The stationary state of a queue under schedule-one/take-the-highest:
    // every higher-priority task is taken before a Low one, so the backlog is
    // Low. Starting there measures every peer in the same state, whatever
    // its speed and the run's length.
    t.priority = sched::Priority::Low;
    run.prefill_sum += fingerprint(t);
    if (!run.queue.schedule(t)) {
      run.error = "prefill refused a task below capacity";
      return;
    }
  }
  run.prefilled = depth;
}

template <SchedulerAdapter Q, class W, bool kTimed>
void queue_benchmark(benchmark::State& state, std::size_t depth, std::size_t capacity) {
  static QueueRun<Q>* run = nullptr;  // one benchmark runs at a time
  static std::string error;           // outlives the run for the library's report
  const int tid = state.thread_index();
  const int n = state.threads();
  if (tid == 0) {
    run = new QueueRun<Q>(n, capacity);
    if (const std::string& err = checked<Q>(); !err.empty())
      run->error = "self-check failed: " + err;
    else
      prefill(*run, depth);
    if (!run->error.empty()) {
      error = run->error;
      state.SkipWithError(error.c_str());
    }
  }
  for (auto _ : state) {
    QueueRun<Q>& r = *run;
    if (!r.error.empty()) continue;
    ThreadStats& st = r.stats[static_cast<std::size_t>(tid)];
    measure_thread(st, [&] { W::template loop<kTimed>(r, st, r.hist[static_cast<std::size_t>(tid)], tid, n); });
  }
  if (tid == 0) {
    if (run->error.empty()) {
      const RunTotals t = totals(run->stats);
      std::uint64_t left = 0, left_sum = 0;
      while (const auto x = run->queue.next()) {
        ++left;
        left_sum += fingerprint(*x);
      }
      const std::uint64_t expected = run->prefilled + t.scheduled - t.taken - t.cancelled;
      if (t.wrong != 0) {
        error = std::to_string(t.wrong) + " cancels returned another task than the one asked for";
        state.SkipWithError(error.c_str());
      } else if (left != expected) {
        error = "conservation violated: " + std::to_string(left) + " tasks left, expected " + std::to_string(expected);
        state.SkipWithError(error.c_str());
      } else if (run->prefill_sum + t.sum_in != t.sum_out + left_sum) {
        error = "exactly-once violated: the tasks that came out are not the tasks that went in";
        state.SkipWithError(error.c_str());
      } else {
        report_common(state, *run, kTimed);
        W::report(state, t);
      }
    }
    delete run;
    run = nullptr;
  }
}

/// Registers W for every peer in QueuePeers that satisfies `wanted`, for every
/// configured thread count (from min_threads), both flavours.
/// Wanted::kAccepts<Q> selects the peers (a capability the workload needs).
template <class W, class Wanted>
void register_queue_workload(const std::string& workload, std::size_t depth, std::size_t capacity, int min_threads,
                             Wanted) {
  const Config& cfg = config();
  for (const int n : cfg.threads) {
    if (n < min_threads) continue;
    for (const bool timed_flavour : {false, true}) {
      if (timed_flavour && !cfg.latency) continue;
      [&]<class... Qs>(std::type_identity<std::tuple<Qs...>>) {
        (
            [&] {
              if constexpr (Wanted::template kAccepts<Qs>) {
                const std::string name = workload + "/" + std::string(Qs::kName) + (timed_flavour ? "/lat" : "/tput");
                auto fn = timed_flavour ? &queue_benchmark<Qs, W, true> : &queue_benchmark<Qs, W, false>;
                benchmark::RegisterBenchmark(name.c_str(),
                                             [fn, depth, capacity](benchmark::State& s) { fn(s, depth, capacity); })
                    ->Threads(n)
                    ->UseRealTime()
                    ->Iterations(1);
              }
            }(),
            ...);
      }(std::type_identity<QueuePeers>{});
    }
  }
}

/// Peer filters for register_queue_workload.
struct AllPeers {
  template <class Q>
  static constexpr bool kAccepts = true;
};
struct PeekPeers {
  template <class Q>
  static constexpr bool kAccepts = PeekCapable<Q>;
};
struct CancelPeers {
  template <class Q>
  static constexpr bool kAccepts = CancelCapable<Q>;
};

}  // namespace tgi_bench
