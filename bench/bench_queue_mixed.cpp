// Queue workloads, part 2: producer/consumer, burst, cancel-heavy, near-full.
#include <thread>

#include "queue_workloads.hpp"

namespace tgi_bench {
namespace {

/// producer/consumer: threads [0, n/2) only schedule, the others only take.
/// A refused schedule (full) or an empty next() counts as a call, not an
/// item; after 16 failures in a row the thread yields its CPU (a serving loop
/// with nothing to do would not spin through its time slice, and without it
/// a producer and a consumer sharing one core take turns a time slice at a
/// time, which measures the OS, not the queue). items = tasks taken; ops
/// (fairness, within each role) = successful calls.
struct ProdConsW {
  static constexpr std::size_t kCapacity = 1024;
  static constexpr std::uint32_t kSpinsBeforeYield = 16;

  static void back_off(bool ok, std::uint32_t& failures) {
    if (ok) {
      failures = 0;
    } else if (++failures >= kSpinsBeforeYield) {
      failures = 0;
      std::this_thread::yield();
    }
  }

  template <bool kT, class Q>
  static void loop(QueueRun<Q>& r, ThreadStats& st, Histogram& h, int tid, int n) {
    Q& q = r.queue;
    Deadline deadline(r.stop, r.duration_ticks);
    std::uint64_t i = 0, ok = 0;
    std::uint64_t sum_in = 0, sum_out = 0;  // fingerprints of the tasks in and out
    std::uint32_t failures = 0;
    if (tid < n / 2) {
      TaskGen gen(static_cast<std::uint64_t>(tid) + 1);
      for (; !deadline.expired(i); ++i) {
        const ScheduledTask t = gen.next();
        const bool done = timed<kT>(h, [&] { return q.schedule(t); });
        ok += done ? 1 : 0;
        if (done) sum_in += fingerprint(t);
        back_off(done, failures);
      }
      st.role = 0;
      st.scheduled = ok;
      st.aux0 = i - ok;  // refused: queue full
    } else {
      for (; !deadline.expired(i); ++i) {
        const auto got = timed<kT>(h, [&] { return q.next(); });
        ok += got ? 1 : 0;
        if (got) sum_out += fingerprint(*got);
        back_off(got.has_value(), failures);
        benchmark::DoNotOptimize(got);
      }
      st.role = 1;
      st.taken = st.items = ok;
      st.aux1 = i - ok;  // found empty
    }
    st.ops = ok;
    st.sum_in = sum_in;
    st.sum_out = sum_out;
  }
  static void report(benchmark::State& state, const RunTotals& t) {
    const double items = static_cast<double>(std::max<std::uint64_t>(t.items, 1));
    state.counters["full_per_item"] = static_cast<double>(t.aux0) / items;
    state.counters["empty_per_item"] = static_cast<double>(t.aux1) / items;
  }
};

/// burst: in rounds. Thread 0 schedules 10,000 tasks while the others wait at
/// a barrier; then every thread (thread 0 included) calls next() until the
/// queue is empty; a barrier ends the round. items = tasks taken; the fill
/// is part of the elapsed time (fill_ns_per_task reports it apart).
struct BurstW {
  static constexpr std::size_t kBurst = 10000;
  static constexpr std::size_t kCapacity = 16384;

  template <bool kT, class Q>
  static void loop(QueueRun<Q>& r, ThreadStats& st, Histogram& h, int tid, int) {
    Q& q = r.queue;
    TaskGen gen(static_cast<std::uint64_t>(tid) + 1);
    const std::uint64_t end = ticks() + r.duration_ticks;
    std::uint64_t scheduled = 0, taken = 0, fill_ticks = 0, rounds = 0;
    std::uint64_t sum_in = 0, sum_out = 0;  // fingerprints of the tasks in and out
    for (;;) {
      // relaxed: the barrier below publishes the flag to every thread.
      if (tid == 0 && ticks() >= end) r.stop.store(true, std::memory_order::relaxed);
      r.barrier.arrive_and_wait();
      // relaxed: ordered by the barrier above.
      if (r.stop.load(std::memory_order::relaxed)) break;
      if (tid == 0) {
        const std::uint64_t t0 = ticks();
        for (std::size_t k = 0; k < kBurst; ++k) {
          const ScheduledTask t = gen.next();
          if (timed<kT>(h, [&] { return q.schedule(t); })) {
            ++scheduled;
            sum_in += fingerprint(t);
          }
        }
        fill_ticks += ticks() - t0;
      }
      r.barrier.arrive_and_wait();
      for (;;) {
        const auto got = timed<kT>(h, [&] { return q.next(); });
        if (!got) break;
        ++taken;
        sum_out += fingerprint(*got);
      }
      ++rounds;
    }
    st.scheduled = scheduled;
    st.taken = st.items = st.ops = taken;
    st.sum_in = sum_in;
    st.sum_out = sum_out;
    st.aux0 = fill_ticks;
    st.aux1 = tid == 0 ? rounds : 0;
  }
  static void report(benchmark::State& state, const RunTotals& t) {
    state.counters["fill_ns_per_task"] =
        t.scheduled ? ticks_to_ns(static_cast<double>(t.aux0)) / static_cast<double>(t.scheduled) : 0.0;
    state.counters["rounds"] = static_cast<double>(t.aux1);
  }
};

/// cancel-heavy: at depth 1,000 each thread loops: schedule three tasks,
/// cancel the second by id, then next() until the loop has removed as many
/// tasks as it scheduled (twice, or three times when another thread took the
/// second task first: cancel_hit < 1). So the depth stays at 1,000 whatever
/// the cancels find, and about a third of the tasks are cancelled. items =
/// tasks removed (cancelled or taken); ops (fairness) = loops. A refused
/// schedule (the queue is far from its capacity) is counted and reported.
struct CancelW {
  template <bool kT, class Q>
  static void loop(QueueRun<Q>& r, ThreadStats& st, Histogram& h, int tid, int) {
    if constexpr (CancelCapable<Q>) {
      Q& q = r.queue;
      TaskGen gen(static_cast<std::uint64_t>(tid) + 1);
      Deadline deadline(r.stop, r.duration_ticks);
      std::uint64_t i = 0, scheduled = 0, taken = 0, cancelled = 0, refused = 0, wrong = 0;
      std::uint64_t sum_in = 0, sum_out = 0;  // fingerprints of the tasks in and out
      for (; !deadline.expired(i); ++i) {
        const ScheduledTask a = gen.next(), b = gen.next(), c = gen.next();
        unsigned in = 0;
        for (const ScheduledTask* x : {&a, &b, &c}) {
          if (timed<kT>(h, [&] { return q.schedule(*x); })) {
            ++in;
            sum_in += fingerprint(*x);
          }
        }
        scheduled += in;
        refused += 3 - in;
        unsigned out = 0;
        if (const auto got = timed<kT>(h, [&] { return q.cancel(b.id); })) {
          ++cancelled;
          ++out;
          sum_out += fingerprint(*got);
          // Another task would still come out once (the count and fingerprint
          // checks balance): only its id tells a cancel that hit the wrong one.
          wrong += got->id != b.id ? 1 : 0;
        }
        for (; out < in; ++out) {
          if (const auto got = timed<kT>(h, [&] { return q.next(); })) {
            ++taken;
            sum_out += fingerprint(*got);
          }
        }
      }
      st.ops = i;
      st.items = taken + cancelled;
      st.scheduled = scheduled;
      st.taken = taken;
      st.cancelled = cancelled;
      st.sum_in = sum_in;
      st.sum_out = sum_out;
      st.wrong = wrong;
      st.aux0 = i;  // cancel attempts
      st.aux1 = refused;
    }
  }
  static void report(benchmark::State& state, const RunTotals& t) {
    state.counters["cancel_hit"] = t.aux0 ? static_cast<double>(t.cancelled) / static_cast<double>(t.aux0) : 0.0;
    state.counters["refused"] = static_cast<double>(t.aux1);
  }
};

/// near-full: capacity 1,024, prefilled full. Each thread loops: schedule(t);
/// when refused (backpressure), next() instead. The queue stays at capacity.
/// items = tasks taken; ops (fairness) = successful schedules + takes.
struct NearFullW {
  static constexpr std::size_t kCapacity = 1024;

  template <bool kT, class Q>
  static void loop(QueueRun<Q>& r, ThreadStats& st, Histogram& h, int tid, int) {
    Q& q = r.queue;
    TaskGen gen(static_cast<std::uint64_t>(tid) + 1);
    Deadline deadline(r.stop, r.duration_ticks);
    std::uint64_t i = 0, scheduled = 0, taken = 0, refused = 0;
    std::uint64_t sum_in = 0, sum_out = 0;  // fingerprints of the tasks in and out
    for (; !deadline.expired(i); ++i) {
      const ScheduledTask t = gen.next();
      if (timed<kT>(h, [&] { return q.schedule(t); })) {
        ++scheduled;
        sum_in += fingerprint(t);
        continue;
      }
      ++refused;
      if (const auto got = timed<kT>(h, [&] { return q.next(); })) {
        ++taken;
        sum_out += fingerprint(*got);
      }
    }
    st.scheduled = scheduled;
    st.taken = st.items = taken;
    st.ops = scheduled + taken;
    st.sum_in = sum_in;
    st.sum_out = sum_out;
    st.aux0 = refused;
  }
  static void report(benchmark::State& state, const RunTotals& t) {
    state.counters["refused_per_item"] = t.items ? static_cast<double>(t.aux0) / static_cast<double>(t.items) : 0.0;
  }
};

}  // namespace

void register_queue_mixed_benchmarks() {
  register_queue_workload<ProdConsW>("prodcons", 0, ProdConsW::kCapacity, 2, AllPeers{});
  register_queue_workload<BurstW>("burst", 0, BurstW::kCapacity, 1, AllPeers{});
  register_queue_workload<CancelW>("cancel.d1000", 1000, 16384, 1, CancelPeers{});
  register_queue_workload<NearFullW>("nearfull", NearFullW::kCapacity, NearFullW::kCapacity, 1, AllPeers{});
}

}  // namespace tgi_bench
