// Queue workloads, part 1: schedule/next pairs at three depths, the same with
// a peek, and the memory each peer reserves per slot.
#include <memory>

#include "queue_workloads.hpp"

namespace tgi_bench {
namespace {

constexpr std::size_t kPairCapacity = 16384;

/// pair: each thread loops schedule(t) then next(); the queue stays at its
/// prefilled depth (give or take one task per thread). items = pairs.
struct PairW {
  template <bool kT, class Q>
  static void loop(QueueRun<Q>& r, ThreadStats& st, Histogram& h, int tid, int) {
    Q& q = r.queue;
    TaskGen gen(static_cast<std::uint64_t>(tid) + 1);
    Deadline deadline(r.stop, r.duration_ticks);
    std::uint64_t i = 0, scheduled = 0, taken = 0;
    std::uint64_t sum_in = 0, sum_out = 0;  // fingerprints of the tasks in and out
    for (; !deadline.expired(i); ++i) {
      const ScheduledTask t = gen.next();
      if (timed<kT>(h, [&] { return q.schedule(t); })) {
        ++scheduled;
        sum_in += fingerprint(t);
      }
      const auto got = timed<kT>(h, [&] { return q.next(); });
      if (got) {
        ++taken;
        sum_out += fingerprint(*got);
      }
      benchmark::DoNotOptimize(got);
    }
    st.ops = st.items = i;
    st.scheduled = scheduled;
    st.taken = taken;
    st.sum_in = sum_in;
    st.sum_out = sum_out;
    st.aux0 = i - scheduled;  // refused: 0 unless the capacity is wrong
  }
  static void report(benchmark::State& state, const RunTotals& t) {
    state.counters["refused"] = static_cast<double>(t.aux0);
  }
};

/// peek: schedule(t), peek(), next() at depth 1,000 (peers with peek only).
/// items = loops.
struct PeekW {
  template <bool kT, class Q>
  static void loop(QueueRun<Q>& r, ThreadStats& st, Histogram& h, int tid, int) {
    if constexpr (PeekCapable<Q>) {
      Q& q = r.queue;
      TaskGen gen(static_cast<std::uint64_t>(tid) + 1);
      Deadline deadline(r.stop, r.duration_ticks);
      std::uint64_t i = 0, scheduled = 0, taken = 0;
      std::uint64_t sum_in = 0, sum_out = 0;  // fingerprints of the tasks in and out
      for (; !deadline.expired(i); ++i) {
        const ScheduledTask t = gen.next();
        if (timed<kT>(h, [&] { return q.schedule(t); })) {
          ++scheduled;
          sum_in += fingerprint(t);
        }
        const auto seen = timed<kT>(h, [&] { return q.peek(); });
        benchmark::DoNotOptimize(seen);
        const auto got = timed<kT>(h, [&] { return q.next(); });
        if (got) {
          ++taken;
          sum_out += fingerprint(*got);
        }
        benchmark::DoNotOptimize(got);
      }
      st.ops = st.items = i;
      st.scheduled = scheduled;
      st.taken = taken;
      st.sum_in = sum_in;
      st.sum_out = sum_out;
    }
  }
  static void report(benchmark::State&, const RunTotals&) {}
};

/// Bytes obtained from the heap per slot: right after construction, with the
/// queue full, and after draining it. Allocations per task while filling.
template <SchedulerAdapter Q>
void queue_memory(benchmark::State& state) {
  constexpr std::size_t kCap = kPairCapacity;
  const double cap = static_cast<double>(kCap);
  skip_unchecked(state, checked<Q>());
  for (auto _ : state) {
    const AllocStats a0 = thread_alloc_stats();
    auto q = std::make_unique<Q>(kCap);
    const AllocStats a1 = thread_alloc_stats();
    TaskGen gen(0);
    bool ok = true;
    for (std::size_t i = 0; i < kCap; ++i) ok = q->schedule(gen.next()) && ok;
    const AllocStats a2 = thread_alloc_stats();
    std::size_t drained = 0;
    while (q->next()) ++drained;
    const AllocStats a3 = thread_alloc_stats();
    if (!ok || drained != kCap) {
      state.SkipWithError("the queue did not hold its capacity");
      break;
    }
    state.counters["bytes_per_slot_empty"] = static_cast<double>(a1.live_bytes() - a0.live_bytes()) / cap;
    state.counters["bytes_per_slot_full"] = static_cast<double>(a2.live_bytes() - a0.live_bytes()) / cap;
    state.counters["bytes_per_slot_drained"] = static_cast<double>(a3.live_bytes() - a0.live_bytes()) / cap;
    state.counters["fill_allocs_per_task"] = static_cast<double>(a2.allocs - a1.allocs) / cap;
    if constexpr (requires { q->reported_memory_bytes(); })
      state.counters["reported_bytes_per_slot"] = static_cast<double>(q->reported_memory_bytes()) / cap;
  }
}

/// The floor under every latency figure: the same timed loop around an empty
/// section, same threads, same duration. What it shows at the tail (timer
/// cost, interrupts, the OS taking the CPU away from a thread) is no queue's
/// doing.
void latency_floor(benchmark::State& state) {
  static RunBase* run = nullptr;
  const int tid = state.thread_index();
  if (tid == 0) run = new RunBase(state.threads());
  for (auto _ : state) {
    RunBase& r = *run;
    ThreadStats& st = r.stats[static_cast<std::size_t>(tid)];
    Histogram& h = r.hist[static_cast<std::size_t>(tid)];
    measure_thread(st, [&] {
      Deadline deadline(r.stop, r.duration_ticks);
      std::uint64_t i = 0;
      for (; !deadline.expired(i); ++i) {
        timed<true>(h, [&] {
          benchmark::DoNotOptimize(i);
          return 0;
        });
      }
      st.ops = st.items = i;
    });
  }
  if (tid == 0) {
    report_common(state, *run, true);
    delete run;
    run = nullptr;
  }
}

}  // namespace

void register_queue_benchmarks() {
  if (config().latency) {
    for (const int n : config().threads)
      benchmark::RegisterBenchmark("floor/none/lat", &latency_floor)->Threads(n)->UseRealTime()->Iterations(1);
  }
  register_queue_workload<PairW>("pair.d0", 0, kPairCapacity, 1, AllPeers{});
  // The same at the default-sized queue (SchedulerConfig's 1,000, rounded to a
  // power of two): shows how much of a pair's cost is the structure's footprint.
  register_queue_workload<PairW>("pair.d0.c1024", 0, 1024, 1, AllPeers{});
  register_queue_workload<PairW>("pair.d1000", 1000, kPairCapacity, 1, AllPeers{});
  register_queue_workload<PairW>("pair.d10000", 10000, kPairCapacity, 1, AllPeers{});
  register_queue_workload<PeekW>("peek.d1000", 1000, kPairCapacity, 1, PeekPeers{});
  // What the report says about each peer (the binary is the one source).
  [&]<class... Qs>(std::type_identity<std::tuple<Qs...>>) {
    (benchmark::AddCustomContext("tgi_peer." + std::string(Qs::kName),
                                 std::string("priority=") + (Qs::kPriorityOrder ? "yes" : "no") +
                                     "|fifo=" + std::string(Qs::kFifo) + "|progress=" + std::string(Qs::kProgress) +
                                     "|cancel=" + (supports_cancel<Qs> ? "yes" : "no") +
                                     "|peek=" + (supports_peek<Qs> ? "yes" : "no")),
     ...);
  }(std::type_identity<QueuePeers>{});
  [&]<class... Qs>(std::type_identity<std::tuple<Qs...>>) {
    (benchmark::RegisterBenchmark((std::string("memory/") + std::string(Qs::kName)).c_str(), &queue_memory<Qs>)
         ->Iterations(1)
         ->Repetitions(1),
     ...);
  }(std::type_identity<QueuePeers>{});
}

}  // namespace tgi_bench
