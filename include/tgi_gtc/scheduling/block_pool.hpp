// BlockPool: a lock-free pool of reference-counted KV-cache blocks, and
// BlockAllocator / BlockAllocation: token-sized RAII allocations over it.
//
// Thread safety: every BlockPool member function may be called from any
// number of threads at once, with any other member function, except
// construction and destruction. A BlockAllocator is as safe as its pool
// (allocate() and memory_stats() may run concurrently with anything). One
// BlockAllocation object is a value (like std::vector): one thread at a time;
// distinct BlockAllocation objects, even ones sharing blocks, may be used and
// destroyed on different threads at once.
//
// Progress: try_allocate, retain, try_retain and release are lock-free (no call waits for
// another to finish; a retry means another call changed the same word, or a
// compare_exchange_weak failed spuriously, which LL/SC targets allow);
// total_blocks, free_blocks, ref_count, invalid_releases and memory_bytes are
// wait-free.
// None of them takes a lock, makes a system call or allocates memory.
//
// The design (an atomic bitmap after Linux's lib/sbitmap.c, a free-block
// counter for exact all-or-nothing batches with room for one parked block,
// per-block reference counts) is documented in engine/block_pool.cpp and the
// README section "KV-cache block pool".
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

namespace tgi_gtc::scheduling {

/// Index of a block: 0 .. total_blocks() - 1. Block 0 is an ordinary block
/// (TGI reserves it for health checks; a caller that wants a padding block
/// allocates one up front).
using BlockId = std::uint32_t;

/// Largest accepted block count (2^28). Metadata costs about 5 bytes a block
/// (4-byte reference count + 1 bit in a 64-byte line per 64 blocks), so the
/// largest pool reserves about 1.25 GiB of host memory.
inline constexpr std::uint32_t kMaxBlocks = std::uint32_t{1} << 28;

namespace detail {
struct BitmapWord;
}

class BlockPool {
 public:
  /// All blocks start free. Throws std::invalid_argument when num_blocks is 0
  /// or above kMaxBlocks. Allocates every byte the pool will ever use.
  explicit BlockPool(std::uint32_t num_blocks);
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;
  BlockPool(BlockPool&&) = delete;
  BlockPool& operator=(BlockPool&&) = delete;

  /// Fills all of `out` with distinct free blocks, each with reference count
  /// 1, and returns true; or takes none, leaves `out` untouched and returns
  /// false (fewer than out.size() blocks free at the moment of the call).
  /// All-or-nothing also under concurrency: capacity is reserved before any
  /// block is claimed, so no partial grab ever exists. An empty span: true.
  /// A one-block request gets the block that this thread's last one-block
  /// release() parked, if it is still parked (two atomic read-modify-writes
  /// for the pair, instead of four); a parked block of another thread only
  /// when no other block is free, or when the two threads share a tag (63
  /// tags, given out in turn to the threads of the process). A larger
  /// request takes the parked block when the other free blocks are too few.
  /// Concurrent with anything.
  [[nodiscard]] bool try_allocate(std::span<BlockId> out) noexcept;

  /// Adds one reference to each block (a shared prefix, a fork). The caller
  /// must hold a reference to each (the last holder's release drops a count
  /// of 1 with a plain store, so a retain by a non-holder racing it may be
  /// lost). An id that is free, out of range, or whose count is already
  /// UINT32_MAX is skipped and counted in invalid_releases().
  /// Concurrent with anything.
  void retain(std::span<const BlockId> blocks) noexcept;

  /// retain(), all or nothing: adds one reference to each block and returns
  /// true, or, when any id would be rejected by retain(), adds none (the
  /// references it took are dropped again), counts that id in
  /// invalid_releases() and returns false. Concurrent with anything.
  [[nodiscard]] bool try_retain(std::span<const BlockId> blocks) noexcept;

  /// Drops one reference from each block; a block whose count reaches zero is
  /// free again (the one block of a one-id call is parked, when no block is,
  /// for this thread's next one-block try_allocate; any caller may take it).
  /// Returns how many became free. An id that is free (count 0)
  /// or out of range is skipped and counted in invalid_releases(); a repeated
  /// id drops one reference per occurrence (a repeat beyond the references
  /// held is a double release, counted in invalid_releases(); but bits are
  /// cleared as the call goes, so a concurrent try_allocate may take the
  /// block between two occurrences, and the later one then frees it under
  /// its new owner, counted as a free). Two threads releasing the same last
  /// reference at once: one frees the block, the other's id is counted in
  /// invalid_releases() (unless a try_allocate takes the block between the
  /// two: then the late one frees it under its new owner, as any double
  /// release after a re-allocation). Whatever the misuse, free_blocks()
  /// counts only blocks whose bits are clear and the parked one, so
  /// try_allocate never waits for blocks that do not exist. Concurrent with
  /// anything.
  [[nodiscard]] std::size_t release(std::span<const BlockId> blocks) noexcept;

  /// Rejected ids so far: releases AND retains of a free or out-of-range
  /// block, retains that would overflow a count, and the losing release of
  /// two that raced on the same last reference. Such a call changes nothing
  /// else (the losing racer has stored 0 over the count, which misuses
  /// combined may make a new owner's). (A release of a block that someone
  /// else holds cannot be told from a legitimate one: it drops their
  /// reference.)
  std::size_t invalid_releases() const noexcept;

  std::uint32_t total_blocks() const noexcept;

  /// Blocks a try_allocate could take now: never more than the blocks whose
  /// bits are clear and the parked one, whatever the callers do, nor than
  /// total_blocks(). While callers keep the contract,
  /// exact when no call is in flight; it may lag the blocks whose count reads
  /// 0 by the blocks inside calls in flight (never the other way): those a
  /// release already dropped to 0, and those a try_allocate reserved before
  /// it stores their count of 1.
  std::uint32_t free_blocks() const noexcept;

  /// References to `block` now (0: free, or out of range). A snapshot.
  std::uint32_t ref_count(BlockId block) const noexcept;

  /// Bytes of host memory this pool reserved at construction for its own
  /// bookkeeping (not the KV cache its blocks index): the object (three cache
  /// lines) and its arrays (a 64-byte line per bitmap word, 4 bytes a block).
  /// Nothing is allocated later.
  std::size_t memory_bytes() const noexcept;

 private:
  /// One reference more on `id` (a CAS from a count above zero and below
  /// UINT32_MAX); false, changing nothing, when retain() would reject it.
  bool retain_one(BlockId id) noexcept;
  /// release() of one id: parks the block when the slot is empty (P).
  std::size_t release_one(BlockId id) noexcept;
  /// While free_ (read as `cur`) has `id` parked and its bit clear, tries to
  /// take it off the slot (U), with one unit when `take_unit`; true if done.
  bool unpark(std::uint64_t cur, BlockId id, bool take_unit) noexcept;
  /// If the block parked in `seen` (a value of free_) has its bit in
  /// `cleared` of `word`, unpark()s it.
  bool unpark_cleared(std::uint64_t seen, std::uint32_t word, std::uint64_t cleared, bool counted) noexcept;
  /// Counts `n` rejected ids; returns 0.
  std::size_t reject(std::size_t n) noexcept;
  /// The bit of `id` in its word.
  std::uint64_t bit_of(BlockId id) const noexcept { return std::uint64_t{1} << (id & ((std::uint32_t{1} << shift_) - 1)); }

  static constexpr std::size_t kCacheLine = 64;
  // Each counter written by the hot path gets a line of its own.
  struct alignas(kCacheLine) PaddedU64 {
    std::atomic<std::uint64_t> value{0};
  };
  struct alignas(kCacheLine) PaddedSize {
    std::atomic<std::size_t> value{0};
  };
  static_assert(sizeof(PaddedU64) == kCacheLine && alignof(PaddedU64) == kCacheLine);
  static_assert(sizeof(PaddedSize) == kCacheLine && alignof(PaddedSize) == kCacheLine);

  // Read-only after construction (shared, never written: one line).
  std::unique_ptr<detail::BitmapWord[]> words_;
  std::unique_ptr<std::atomic<std::uint32_t>[]> counts_;
  std::uint32_t num_blocks_;
  std::uint32_t shift_;  // log2(blocks per word), as sbitmap's shift
  std::uint32_t num_words_;
  PaddedU64 free_;      // free blocks, the parked block and its tag (block_pool.cpp)
  PaddedSize invalid_;  // rejected ids
};

/// Geometry of the KV cache a BlockAllocator hands out, and its byte sizes.
struct BlockAllocatorConfig {
  std::uint32_t num_blocks = 1024;
  std::uint32_t block_size = 16;  ///< tokens per block
  std::uint32_t num_layers = 32;
  std::uint32_t num_kv_heads = 8;
  std::uint32_t head_dim = 128;
  std::uint32_t dtype_bytes = 2;

  /// The defaults with `num_blocks` blocks.
  static BlockAllocatorConfig with_blocks(std::uint32_t num_blocks) {
    BlockAllocatorConfig c;
    c.num_blocks = num_blocks;
    return c;
  }
  /// 2 (K and V) x layers x kv heads x head dim x block size x dtype bytes.
  constexpr std::uint64_t bytes_per_block() const {
    return std::uint64_t{2} * num_layers * num_kv_heads * head_dim * block_size * dtype_bytes;
  }
  constexpr std::uint64_t total_memory_bytes() const { return bytes_per_block() * num_blocks; }
};

/// A snapshot of a BlockAllocator's pool, in blocks and bytes.
struct MemoryStats {
  std::uint64_t total_blocks = 0;
  std::uint64_t allocated_blocks = 0;
  std::uint64_t free_blocks = 0;
  std::uint64_t total_bytes = 0;
  std::uint64_t allocated_bytes = 0;
  std::uint64_t free_bytes = 0;
  /// allocated_blocks / total_blocks, in [0, 1] (0 for an empty pool).
  double utilization() const {
    return total_blocks == 0 ? 0.0 : static_cast<double>(allocated_blocks) / static_cast<double>(total_blocks);
  }
};

class BlockAllocator;

/// Blocks held for one sequence, returned to the pool when destroyed (TGI's
/// `Drop for BlockAllocation`). Move-only; a moved-from or default-constructed
/// allocation owns nothing and its destructor does nothing. Must not outlive
/// the BlockAllocator that made it. Not itself thread-safe (see the top).
class BlockAllocation {
 public:
  BlockAllocation() noexcept = default;
  BlockAllocation(BlockAllocation&& other) noexcept;
  /// Releases the blocks held now, then takes over `other`'s.
  BlockAllocation& operator=(BlockAllocation&& other) noexcept;
  BlockAllocation(const BlockAllocation&) = delete;
  BlockAllocation& operator=(const BlockAllocation&) = delete;
  ~BlockAllocation();

  /// The blocks, in token order: token t lives in blocks()[t / block_size].
  std::span<const BlockId> blocks() const noexcept { return blocks_; }
  /// The token count recorded by allocate() or the last successful extend().
  std::size_t tokens() const noexcept { return tokens_; }
  /// Tokens the blocks can hold: blocks().size() x block_size.
  std::size_t capacity() const noexcept { return blocks_.size() * block_size_; }

  /// TGI's slot: blocks()[token / block_size] x block_size + token % block_size.
  /// Any token below capacity() is valid (the tail of the last block is where
  /// the next tokens go); throws std::out_of_range otherwise.
  std::uint32_t slot(std::size_t token) const;

  /// Makes room for `new_total_tokens`: takes the missing blocks from the pool
  /// all-or-nothing and appends them. Never frees blocks: a total that fits in
  /// the blocks held now (smaller ones included) just records the new token
  /// count. On false (pool short of blocks, or an empty allocation) nothing
  /// changed, but for where the block list lives: a span taken from blocks()
  /// before any extend() call is invalid after it, whatever it returns (the
  /// list may have been moved to make room before the pool said no). May throw
  /// std::bad_alloc growing the block list (then nothing changed either).
  [[nodiscard]] bool extend(std::size_t new_total_tokens);

  /// A second owner of the same blocks and token count: every block gains one
  /// reference, and each owner returns its own when destroyed. Copy-on-write of
  /// a shared, partly filled last block is the caller's concern. Sharing an
  /// empty allocation gives an empty one. Throws std::overflow_error, taking no
  /// reference (invalid_releases() counts the rejected id), when a block
  /// already has UINT32_MAX references (or is no longer held: someone released
  /// it on this allocation's behalf); std::bad_alloc copying the block list.
  BlockAllocation share() const;

 private:
  friend class BlockAllocator;
  BlockAllocation(BlockPool* pool, std::uint32_t block_size, std::vector<BlockId> blocks,
                  std::size_t tokens) noexcept;
  void release_all() noexcept;

  BlockPool* pool_ = nullptr;
  std::uint32_t block_size_ = 0;
  std::size_t tokens_ = 0;
  std::vector<BlockId> blocks_;
};

/// Token-sized allocations over a BlockPool it owns (TGI's SimpleAllocator,
/// without the background task: allocate() runs on the caller's thread).
/// Not copyable or movable (allocations point at its pool).
class BlockAllocator {
 public:
  /// Throws std::invalid_argument when block_size, num_layers, num_kv_heads,
  /// head_dim or dtype_bytes is 0 (a block of 0 bytes), num_blocks is 0 or
  /// above kMaxBlocks, num_blocks x block_size exceeds 2^32 (slots are 32-bit),
  /// or total_memory_bytes() overflows 64 bits.
  explicit BlockAllocator(BlockAllocatorConfig config);
  BlockAllocator(const BlockAllocator&) = delete;
  BlockAllocator& operator=(const BlockAllocator&) = delete;
  BlockAllocator(BlockAllocator&&) = delete;
  BlockAllocator& operator=(BlockAllocator&&) = delete;

  const BlockAllocatorConfig& config() const noexcept { return config_; }
  BlockPool& pool() noexcept { return pool_; }
  const BlockPool& pool() const noexcept { return pool_; }

  /// ceil(tokens / block_size) blocks (at least one), or nullopt when the pool
  /// has fewer free. Allocates the block list (std::bad_alloc may escape).
  /// Concurrent with anything.
  std::optional<BlockAllocation> allocate(std::size_t tokens);

  /// A snapshot of the pool. Concurrent with anything.
  MemoryStats memory_stats() const noexcept;

 private:
  BlockAllocatorConfig config_;
  BlockPool pool_;
};

}  // namespace tgi_gtc::scheduling
