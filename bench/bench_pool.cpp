// Allocator workloads: allocate k blocks then release them, per thread, for
// k = 1, 4, 16, 64 and k uniform in [1, 64]; and the bytes each pool reserves
// per block.
#include <array>
#include <memory>

#include "pool_peers.hpp"

namespace tgi_bench {
namespace {

constexpr std::uint32_t kPoolBlocks = 16384;  // 64 blocks x 256 threads in flight at most

template <PoolAdapter P>
struct PoolRun : RunBase {
  PoolRun(int threads, std::uint32_t blocks) : RunBase(threads), pool(blocks) {}
  P pool;
};

/// k > 0: always k blocks; k == 0: k uniform in [1, 64] per call.
/// items = allocate+release pairs (refused allocations are counted apart).
template <bool kT, class P>
void pool_loop(PoolRun<P>& r, ThreadStats& st, Histogram& h, int tid, std::size_t k) {
  P& pool = r.pool;
  std::array<BlockIndex, 64> buf{};
  Rng rng(static_cast<std::uint64_t>(tid) + 17);
  Deadline deadline(r.stop, r.duration_ticks);
  std::uint64_t i = 0, pairs = 0, refused = 0, blocks = 0;
  for (; !deadline.expired(i); ++i) {
    const std::size_t n = k != 0 ? k : 1 + static_cast<std::size_t>(rng.next() % 64);
    const std::span<BlockIndex> out(buf.data(), n);
    if (!timed<kT>(h, [&] { return pool.try_allocate(out); })) {
      ++refused;
      continue;
    }
    timed<kT>(h, [&] {
      pool.release(std::span<const BlockIndex>(out));
      return 0;
    });
    ++pairs;
    blocks += n;
  }
  st.ops = st.items = pairs;
  st.aux0 = refused;
  st.aux1 = blocks;
}

template <PoolAdapter P, bool kTimed>
void pool_benchmark(benchmark::State& state, std::size_t k) {
  static PoolRun<P>* run = nullptr;
  static std::string error;
  static std::size_t initial_free = 0;
  const int tid = state.thread_index();
  if (tid == 0) {
    run = new PoolRun<P>(state.threads(), kPoolBlocks);
    initial_free = run->pool.free_count();
    if (const std::string& err = pool_checked<P>(); !err.empty()) {
      run->error = error = "self-check failed: " + err;
      state.SkipWithError(error.c_str());
    }
  }
  for (auto _ : state) {
    PoolRun<P>& r = *run;
    if (!r.error.empty()) continue;
    ThreadStats& st = r.stats[static_cast<std::size_t>(tid)];
    measure_thread(st, [&] { pool_loop<kTimed>(r, st, r.hist[static_cast<std::size_t>(tid)], tid, k); });
  }
  if (tid == 0) {
    if (run->error.empty()) {
      if (const std::size_t now = run->pool.free_count(); now != initial_free) {
        error =
            "conservation violated: " + std::to_string(now) + " blocks free, expected " + std::to_string(initial_free);
        state.SkipWithError(error.c_str());
      } else if (const std::size_t bad = rejected_releases(run->pool); bad != 0) {
        error = "conservation violated: " + std::to_string(bad) + " releases rejected (a block held twice)";
        state.SkipWithError(error.c_str());
      } else {
        report_common(state, *run, kTimed);
        const RunTotals t = totals(run->stats);
        state.counters["refused"] = static_cast<double>(t.aux0);
        state.counters["blocks_per_s"] = t.elapsed_s > 0 ? static_cast<double>(t.aux1) / t.elapsed_s : 0.0;
      }
    }
    delete run;
    run = nullptr;
  }
}

template <PoolAdapter P>
void pool_memory(benchmark::State& state) {
  skip_unchecked(state, pool_checked<P>());
  for (auto _ : state) {
    const AllocStats a0 = thread_alloc_stats();
    auto pool = std::make_unique<P>(kPoolBlocks);
    const AllocStats a1 = thread_alloc_stats();
    std::array<BlockIndex, 64> buf{};
    std::vector<BlockIndex> held;
    held.reserve(kPoolBlocks);
    const AllocStats a2 = thread_alloc_stats();
    while (pool->try_allocate(buf)) held.insert(held.end(), buf.begin(), buf.end());
    const AllocStats a3 = thread_alloc_stats();
    pool->release(held);
    const double blocks = kPoolBlocks;
    state.counters["bytes_per_block"] = static_cast<double>(a1.live_bytes() - a0.live_bytes()) / blocks;
    state.counters["bytes_per_block_all_held"] =
        static_cast<double>(a3.live_bytes() - a2.live_bytes() + a1.live_bytes() - a0.live_bytes()) / blocks;
    state.counters["held_fraction"] = static_cast<double>(held.size()) / blocks;
  }
}

}  // namespace

void register_pool_benchmarks() {
  const Config& cfg = config();
  constexpr std::array<std::size_t, 5> kSizes = {1, 4, 16, 64, 0};
  for (const std::size_t k : kSizes) {
    const std::string workload = k == 0 ? std::string("alloc.rand") : "alloc.k" + std::to_string(k);
    for (const int n : cfg.threads) {
      for (const bool timed_flavour : {false, true}) {
        if (timed_flavour && (!cfg.latency || (k != 1 && k != 0))) continue;  // latency: k=1 and random
        [&]<class... Ps>(std::type_identity<std::tuple<Ps...>>) {
          (
              [&] {
                const std::string name = workload + "/" + std::string(Ps::kName) + (timed_flavour ? "/lat" : "/tput");
                auto fn = timed_flavour ? &pool_benchmark<Ps, true> : &pool_benchmark<Ps, false>;
                benchmark::RegisterBenchmark(name.c_str(), [fn, k](benchmark::State& s) { fn(s, k); })
                    ->Threads(n)
                    ->UseRealTime()
                    ->Iterations(1);
              }(),
              ...);
        }(std::type_identity<PoolPeers>{});
      }
    }
  }
  [&]<class... Ps>(std::type_identity<std::tuple<Ps...>>) {
    (benchmark::AddCustomContext("tgi_pool." + std::string(Ps::kName), "progress=" + std::string(Ps::kProgress)), ...);
  }(std::type_identity<PoolPeers>{});
  [&]<class... Ps>(std::type_identity<std::tuple<Ps...>>) {
    (benchmark::RegisterBenchmark((std::string("memory.pool/") + std::string(Ps::kName)).c_str(), &pool_memory<Ps>)
         ->Iterations(1)
         ->Repetitions(1),
     ...);
  }(std::type_identity<PoolPeers>{});
}

}  // namespace tgi_bench
