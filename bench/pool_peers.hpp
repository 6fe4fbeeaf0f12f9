// The KV-block allocator peers, behind one adapter concept.
//
// Every adapter:
//   explicit Adapter(std::uint32_t blocks)       ids 0 .. blocks-1, all free
//   bool try_allocate(std::span<Id> out)         all of `out` or nothing
//   void release(std::span<const Id> blocks)
//   std::size_t free_count()                     exact when quiescent
//   static kName, kProgress
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <oneapi/tbb/concurrent_queue.h>

#ifdef TGI_BENCH_HAVE_BLOCK_POOL
#include <tgi_gtc/scheduling/block_pool.hpp>
#endif

#include "harness.hpp"
#include "queue_peers.hpp"  // CountingTbbAllocator

namespace tgi_bench {

using BlockIndex = std::uint32_t;

template <class P>
concept PoolAdapter = std::constructible_from<P, std::uint32_t> &&
                      requires(P p, std::span<BlockIndex> out, std::span<const BlockIndex> in) {
                        { P::kName } -> std::convertible_to<std::string_view>;
                        { P::kProgress } -> std::convertible_to<std::string_view>;
                        { p.try_allocate(out) } -> std::same_as<bool>;
                        p.release(in);
                        { p.free_count() } -> std::convertible_to<std::size_t>;
                      };

// mutex_vector: TGI's SimpleAllocator shape, a mutex around a vector of free
// ids; allocate takes the last k (TGI's split_off), release appends. Copies
// into the caller's span instead of returning a new vector, so no allocation.
class MutexVectorPool {
 public:
  static constexpr std::string_view kName = "mutex_vector";
  static constexpr std::string_view kProgress = "blocking (one mutex)";

  explicit MutexVectorPool(std::uint32_t blocks) {
    free_.reserve(blocks);
    for (std::uint32_t b = blocks; b-- > 0;) free_.push_back(b);
  }
  bool try_allocate(std::span<BlockIndex> out) {
    std::lock_guard lock(mutex_);
    if (free_.size() < out.size()) return false;
    const auto first = free_.end() - static_cast<std::ptrdiff_t>(out.size());
    std::copy(first, free_.end(), out.begin());
    free_.erase(first, free_.end());
    return true;
  }
  void release(std::span<const BlockIndex> blocks) {
    std::lock_guard lock(mutex_);
    free_.insert(free_.end(), blocks.begin(), blocks.end());
  }
  std::size_t free_count() {
    std::lock_guard lock(mutex_);
    return free_.size();
  }

 private:
  std::mutex mutex_;
  std::vector<BlockIndex> free_;
};

// mutex_deque: the original corpus's shape, a mutex around a deque of free
// ids; allocate pops from the front, release pushes at the back.
class MutexDequePool {
 public:
  static constexpr std::string_view kName = "mutex_deque";
  static constexpr std::string_view kProgress = "blocking (one mutex)";

  explicit MutexDequePool(std::uint32_t blocks) {
    for (std::uint32_t b = 0; b < blocks; ++b) free_.push_back(b);
  }
  bool try_allocate(std::span<BlockIndex> out) {
    std::lock_guard lock(mutex_);
    if (free_.size() < out.size()) return false;
    for (auto& id : out) {
      id = free_.front();
      free_.pop_front();
    }
    return true;
  }
  void release(std::span<const BlockIndex> blocks) {
    std::lock_guard lock(mutex_);
    free_.insert(free_.end(), blocks.begin(), blocks.end());
  }
  std::size_t free_count() {
    std::lock_guard lock(mutex_);
    return free_.size();
  }

 private:
  std::mutex mutex_;
  std::deque<BlockIndex> free_;
};

// tbb_queue: tbb::concurrent_queue of free ids; k pops, and on a shortfall the
// ids already taken go back (so "all or nothing" holds for the caller).
class TbbQueuePool {
 public:
  static constexpr std::string_view kName = "tbb_queue";
  static constexpr std::string_view kProgress = "blocking (per-slot spin on a stalled peer)";

  explicit TbbQueuePool(std::uint32_t blocks) {
    for (std::uint32_t b = 0; b < blocks; ++b) free_.push(b);
  }
  bool try_allocate(std::span<BlockIndex> out) {
    for (std::size_t i = 0; i < out.size(); ++i) {
      if (!free_.try_pop(out[i])) {
        for (std::size_t k = 0; k < i; ++k) free_.push(out[k]);
        return false;
      }
    }
    return true;
  }
  void release(std::span<const BlockIndex> blocks) {
    for (const BlockIndex b : blocks) free_.push(b);
  }
  std::size_t free_count() { return free_.unsafe_size(); }

 private:
  tbb::concurrent_queue<BlockIndex, CountingTbbAllocator<BlockIndex>> free_;
};

// atomic_bitmap: the naive lock-free pool. One bit per block (1 = free); each
// block is found by scanning from word 0 and claimed with a CAS; a shortfall
// gives back what was taken. No counter, no hint: every allocation contends
// on the first words.
class AtomicBitmapPool {
 public:
  static constexpr std::string_view kName = "atomic_bitmap";
  static constexpr std::string_view kProgress = "lock-free";

  explicit AtomicBitmapPool(std::uint32_t blocks)
      : words_((blocks + 63) / 64), bits_(std::make_unique<Word[]>(words_)) {
    for (std::size_t w = 0; w < words_; ++w) {
      const std::uint32_t in_word = std::min<std::uint32_t>(64, blocks - static_cast<std::uint32_t>(w * 64));
      // relaxed: construction, published by the thread start that follows.
      bits_[w].v.store(in_word == 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << in_word) - 1,
                       std::memory_order::relaxed);
    }
  }
  bool try_allocate(std::span<BlockIndex> out) {
    for (std::size_t i = 0; i < out.size(); ++i) {
      if (!take_one(out[i])) {
        release(out.first(i));
        return false;
      }
    }
    return true;
  }
  void release(std::span<const BlockIndex> blocks) {
    for (const BlockIndex b : blocks)
      // release: pairs with the acquire CAS in take_one, so the next owner
      // sees everything this owner wrote to the block's data.
      bits_[b / 64].v.fetch_or(std::uint64_t{1} << (b % 64), std::memory_order::release);
  }
  std::size_t free_count() {
    std::size_t n = 0;
    for (std::size_t w = 0; w < words_; ++w)
      // relaxed: a quiescent count (read after the threads joined).
      n += static_cast<std::size_t>(std::popcount(bits_[w].v.load(std::memory_order::relaxed)));
    return n;
  }

 private:
  struct Word {
    std::atomic<std::uint64_t> v{0};
  };
  bool take_one(BlockIndex& id) {
    for (std::size_t w = 0; w < words_; ++w) {
      // relaxed: only a hint for the CAS below, which re-checks it.
      std::uint64_t v = bits_[w].v.load(std::memory_order::relaxed);
      while (v != 0) {
        const int bit = std::countr_zero(v);
        // acquire: pairs with the release fetch_or in release(); relaxed on
        // failure: v is just reloaded.
        if (bits_[w].v.compare_exchange_weak(v, v & ~(std::uint64_t{1} << bit), std::memory_order::acquire,
                                             std::memory_order::relaxed)) {
          id = static_cast<BlockIndex>(w * 64 + static_cast<std::size_t>(bit));
          return true;
        }
      }
    }
    return false;
  }
  std::size_t words_;
  std::unique_ptr<Word[]> bits_;
};

#ifdef TGI_BENCH_HAVE_BLOCK_POOL
// tgi_gtc: this project's BlockPool.
class ProjectBlockPool {
 public:
  static constexpr std::string_view kName = "tgi_gtc";
  static constexpr std::string_view kProgress = "lock-free";

  explicit ProjectBlockPool(std::uint32_t blocks) : pool_(blocks) {}
  bool try_allocate(std::span<BlockIndex> out) { return pool_.try_allocate(out); }
  void release(std::span<const BlockIndex> blocks) { (void)pool_.release(blocks); }
  std::size_t free_count() { return pool_.free_blocks(); }
  /// Releases the pool refused (a block released twice, or never handed out):
  /// the trace of a block handed to two holders, which free_count() cannot show.
  std::size_t rejected_releases() const { return pool_.invalid_releases(); }

 private:
  tgi_gtc::scheduling::BlockPool pool_;
};
using PoolPeers = std::tuple<MutexVectorPool, MutexDequePool, TbbQueuePool, AtomicBitmapPool, ProjectBlockPool>;
#else
using PoolPeers = std::tuple<MutexVectorPool, MutexDequePool, TbbQueuePool, AtomicBitmapPool>;
#endif

/// One-thread check: every block handed out once, all-or-nothing at the
/// edge, everything back after release. Empty string or what went wrong.
template <PoolAdapter P>
std::string pool_self_check() {
  constexpr std::uint32_t kBlocks = 256;
  P pool(kBlocks);
  const std::size_t initial = pool.free_count();
  if (initial != kBlocks) return "free_count() is not the block count after construction";
  std::vector<BlockIndex> held;
  std::vector<bool> seen(kBlocks, false);
  const std::size_t sizes[] = {1, 4, 16, 64, 7};
  for (std::size_t round = 0; held.size() + 1 <= kBlocks; ++round) {
    std::size_t k = sizes[round % 5];
    k = std::min(k, kBlocks - held.size());
    std::vector<BlockIndex> out(k);
    if (!pool.try_allocate(out)) return "refused a request that fits";
    for (const BlockIndex b : out) {
      if (b >= kBlocks || seen[b]) return "handed out block " + std::to_string(b) + " twice or out of range";
      seen[b] = true;
      held.push_back(b);
    }
  }
  std::vector<BlockIndex> one(1);
  if (pool.try_allocate(one)) return "allocated from an exhausted pool";
  pool.release(std::span<const BlockIndex>(held).subspan(0, 10));
  std::vector<BlockIndex> eleven(11);
  if (pool.try_allocate(eleven)) return "allocated 11 blocks with 10 free";
  if (pool.free_count() != 10) return "a refused allocation kept blocks";
  pool.release(std::span<const BlockIndex>(held).subspan(10));
  if (pool.free_count() != initial) return "blocks lost after releasing everything";
  return {};
}

/// Releases the pool refused (the trace of a block held twice); 0 for a peer
/// that does not count them.
template <PoolAdapter P>
std::size_t rejected_releases(const P& pool) {
  if constexpr (requires { pool.rejected_releases(); }) {
    return pool.rejected_releases();
  } else {
    return 0;
  }
}

template <PoolAdapter P>
const std::string& pool_checked() {
  static const std::string result = pool_self_check<P>();
  return result;
}

}  // namespace tgi_bench
