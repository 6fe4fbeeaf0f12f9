// BlockPool: a lock-free pool of reference-counted blocks.
//
// Design. An atomic bitmap as in Linux's lib/sbitmap.c (the blk-mq tag
// allocator): one bit a block, words spread one per cache line, a per-thread
// start hint so threads claim from different words, several bits of one word
// claimed with one CAS (sbitmap's __sbitmap_queue_get_batch). Unlike sbitmap,
// a free-block counter sits in front of the bitmap: try_allocate reserves k
// blocks from it first (CAS loop, never below zero) and only then claims bits.
// Reference counts live beside the bitmap, one atomic per block. The RAII shape
// of BlockAllocation follows TGI's backends/v3/src/block_allocator.rs.
//
// Layout (N blocks, b = 2^shift_ blocks a word, W = ceil(N / b) words):
//
//   words_   one 64-bit word per 64-byte line (false sharing only between
//            threads claiming in the same word):
//     line 0    [ word 0   | 56 bytes padding ]   bit i  <-> block i
//     line 1    [ word 1   | padding ]            bit i  <-> block b + i
//     ...
//     line W-1  [ word W-1 | padding ]            bits past block N-1: pad
//
//     one word, b = 64:  bit 63 ......................... bit 1  bit 0
//                        block 64w+63                block 64w+1  block 64w
//     one word, b = 8:   bits 63..8 pad (always 1) | bits 7..0 = blocks 8w+7..8w
//     1 = claimed (held, or inside an in-flight call), 0 = free.
//     b = 64 once N >= 256; smaller pools use fewer bits a word so that they
//     still spread over at least 4 lines (sbitmap_calculate_shift), except
//     N < 4: one word, N bits of it used.
//
//   counts_  std::atomic<uint32_t>[N], packed: references to each block.
//   free_    own line: blocks that a try_allocate may still reserve.
//   invalid_ own line: rejected ids (statistic).
//
// State machine of one block (bit, count):
//
//   from             to               operation                        thread
//   (0, 0) free      (1, 0) claiming  claim CAS on the word (3)        try_allocate, after reserving (1)
//   (1, 0) claiming  (1, 1) held      count.store(1) (4)               the same try_allocate
//   (1, c>0)         (1, c+1)         count CAS c -> c+1 (R)           retain, by a holder
//   (1, c>1)         (1, c-1)         count CAS c -> c-1 (D)           release, by a holder
//   (1, 1)           (1, 0) freeing   count load 1 (D0), store 0 (D')  release, by the last holder
//   (1, 0) freeing   (0, 0) free      word.fetch_and (5), then         the same release
//                                     free_.fetch_add (6)
//   count == 0       unchanged        retain / release of it rejected, any thread
//                                     counted in invalid_
//
// Invariants (numbered where the code keeps them):
//   I1  A count goes 0 -> 1 only by the store (4) of the thread whose CAS (3)
//       set the block's bit; every other change is a CAS from a nonzero value
//       (R, D) or the last holder's store of 0 (D'). So retain/release can
//       never resurrect a free block, and, while callers keep the contract
//       (only a holder retains or releases), count > 0 implies the bit is set:
//       the bit is set before the count becomes 1 and cleared only after it
//       became 0. (A misuse can break this one: see I5.)
//   I2  Pad bits are set at construction and never cleared (release clears
//       only bits of in-range ids whose count it took to 0).
//   I3  free_ never goes below zero (the reserve CAS (1) checks) and each unit
//       of it stands for a clear bit: a release clears its bits (5) before it
//       adds them (6), and adds only the bits its fetch_and found set (I5), so
//       one unit for each set -> clear change of a bit; an allocation
//       subtracts k (1) before it claims k bits (clear -> set). This holds
//       whatever the callers do, misuse included.
//       Hence free_ + (reserved, not yet claimed) <= clear bits at every step:
//       a reservation of k is always backed by k clear bits, so the claim loop
//       terminates with exactly k and never rolls back. This is what makes
//       all-or-nothing exact under concurrency: there is no partial grab to
//       undo, so no other caller can ever see capacity transiently missing.
//       (Without the counter, a batch that found k-1 bits would have to give
//       them back, and a concurrent caller could fail for want of them.)
//   I4  Quiescent (no call in flight): free_blocks() == number of clear
//       non-pad bits (by I3, whatever the callers did), and, while callers keep
//       the contract, == number of blocks with count 0 == N - blocks held.
//   I5  A bit is counted free (in release()'s result and in free_ (6)) only
//       by the release whose fetch_and (5) found it set, once: between two
//       flushes of a word, a release puts each of its bits in the pending mask
//       at most once (a repeat of an id still pending is rejected before the
//       count is read). The last holder takes the count from 1 to 0 with a
//       plain store (D'), not a CAS: only a holder may retain, so when the
//       count reads 1 nobody else can change it. Two releases of that one reference (a double release, a misuse)
//       racing on two threads may then both store 0; the word picks one, and
//       the other counts the id in invalid_releases(), as a CAS 1 -> 0 that
//       failed would. That holds while no try_allocate takes the block
//       between the two; if one does, the late release clears the new
//       owner's bit (and its count, if its store comes after the new
//       owner's): the block is free while its owner holds it (count 1 with
//       the bit clear, or count 0), as the CAS's ABA did before (a late CAS
//       1 -> 0 dropped the new owner's reference). free_ stays exact (I3),
//       so try_allocate never waits for bits that do not exist. A retain by
//       a thread holding no reference, also a misuse, may be overwritten by
//       (D'): the block is freed under it, and that thread's later release
//       is one of a free block, or drops a new owner's reference.
//
// What an observer sees while calls are in flight: a block being allocated is
// already out of free_blocks() (reserved) but may still show ref_count 0
// (claimed, count not yet stored); a block being released shows ref_count 0
// before free_blocks() counts it again. By I1 and I3, free_blocks() never
// exceeds the blocks with count 0 (under the contract; I5 for misuses); it may
// lag them by the blocks inside in-flight calls, and equals them when none is
// (I4).
//
// Memory orderings (numbers as in the code):
//   (1) reserve CAS on free_, acquire: pairs with the release fetch_add (6):
//       the bit clears (5) that the reserved units stand for happen-before the
//       scan, so the scan's loads see those bits clear.
//   (2) scan load of a word, relaxed: only picks candidates; (3) re-reads.
//   (3) claim CAS on a word, acquire on success: pairs with the release
//       fetch_and (5) of the block's previous free (through the word's release
//       sequence): every access of the previous holders happens-before the new
//       owner's.
//   (4) count store 1, relaxed: the block is private to this thread until the
//       caller hands its id to others through its own synchronization.
//   (R) retain CAS, relaxed: the retainer already holds a reference; adding
//       one publishes nothing (std::shared_ptr's increment).
//   (D) release CAS, acq_rel: release publishes this holder's accesses to the
//       block; acquire, for the holder that reaches 0, collects every other
//       holder's (std::shared_ptr's decrement). (5) then passes them on.
//   (D0) count load, acquire: pairs with the release half of every other
//       holder's (D); a 1 read means they all dropped theirs, and their
//       accesses happen-before this holder's store (D') and (5).
//   (D') count store 0, relaxed: (5), a release after it in this thread,
//       orders it before the next owner's store (4), which follows (3).
//   (5) bit clear fetch_and, release: pairs with (3).
//   (6) free_ fetch_add, release: pairs with (1).
//
// Progress: (1) retries only when another call changed free_; (3) only when
// another call changed the word (both also on a spurious failure of
// compare_exchange_weak, which LL/SC targets allow); the scan keeps going
// round until it has its k bits, which I3 guarantees exist and which only
// reserved callers (a bounded number) can take, so a pass fails only because
// another call claimed bits.
// Lock-free. A thread preempted after (1) holds its reservation, as if it held
// the blocks; one preempted between (D) or (D') and (6) delays only the
// visibility of its freed blocks in free_.
#include <tgi_gtc/scheduling/block_pool.hpp>

#include <algorithm>
#include <bit>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace tgi_gtc::scheduling {

namespace detail {
struct alignas(64) BitmapWord {
  std::atomic<std::uint64_t> bits{0};
};
static_assert(sizeof(BitmapWord) == 64 && alignof(BitmapWord) == 64, "one word a cache line");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);

#ifdef TGI_GTC_TEST_HOOKS
// Test builds only (tgi_gtc_scheduling_hooks, as the Scheduler's hooks in
// scheduler.cpp), called by release(): with the block id, when it read a
// count of 1, before it stores 0 (D'); when a block it took to 0 waits in the
// pending mask for its bit clear (5); when it read a count above 1, before
// its CAS (D); and, with the word it cleared last, after its last bit clear
// (5), before it adds the freed blocks to free_ (6). A test stalls a release at
// the first two to force the double-release races of I5; at the third, to
// make another holder's release land between the load (D0) and the CAS (D),
// so that (D) takes the count to 0; at the fourth, so that the next owner
// claims the block before free_ counts it, synchronizing with its releaser
// through (5) and (3) alone. The last two are ordering tests.
void (*g_release_last_ref_hook)(std::uint64_t id) = nullptr;
void (*g_release_pending_hook)(std::uint64_t id) = nullptr;
void (*g_release_shared_hook)(std::uint64_t id) = nullptr;
void (*g_release_flushed_hook)(std::uint64_t word) = nullptr;
// Each reads its pointer once: a test may clear it while another thread passes it.
#define TGI_GTC_RELEASE_LAST_REF(id) \
  if (auto* hook_ = detail::g_release_last_ref_hook) hook_(id)
#define TGI_GTC_RELEASE_PENDING(id) \
  if (auto* hook_ = detail::g_release_pending_hook) hook_(id)
#define TGI_GTC_RELEASE_SHARED(id) \
  if (auto* hook_ = detail::g_release_shared_hook) hook_(id)
#define TGI_GTC_RELEASE_FLUSHED(word) \
  if (auto* hook_ = detail::g_release_flushed_hook) hook_(word)
#else
#define TGI_GTC_RELEASE_LAST_REF(id)
#define TGI_GTC_RELEASE_PENDING(id)
#define TGI_GTC_RELEASE_SHARED(id)
#define TGI_GTC_RELEASE_FLUSHED(word)
#endif
}  // namespace detail

namespace {

constexpr std::uint64_t kFullWord = ~std::uint64_t{0};
constexpr std::uint32_t kNoWord = std::numeric_limits<std::uint32_t>::max();

// Word to start the next scan from, per thread (sbitmap keeps one per CPU).
// Shared by all pools; a pool reseeds it when it is out of its range. A
// constant initializer (no guard) and the initial-exec TLS model: no
// __tls_get_addr, which could allocate in a dlopen'ed copy of the library.
[[gnu::tls_model("initial-exec")]] thread_local std::uint32_t t_hint = kNoWord;

// A per-thread starting word: threads start spread over the words.
std::uint32_t seed_hint(std::uint32_t num_words) noexcept {
  const auto addr = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(&t_hint));
  const std::uint64_t h = (addr >> 6) * 0x9E3779B97F4A7C15ULL;
  return static_cast<std::uint32_t>((h >> 32) % num_words);
}

// sbitmap_calculate_shift: 64 bits a word, fewer for small pools so that they
// still cover at least 4 cache lines (1 to 3 blocks: one word).
std::uint32_t shift_for(std::uint32_t num_blocks) noexcept {
  std::uint32_t shift = 6;
  if (num_blocks >= 4) {
    while ((std::uint32_t{4} << shift) > num_blocks) --shift;
  }
  return shift;
}

std::uint32_t checked_blocks(std::uint32_t num_blocks, const char* who) {
  if (num_blocks == 0 || num_blocks > kMaxBlocks) {
    throw std::invalid_argument(std::string(who) + ": num_blocks must be in [1, " + std::to_string(kMaxBlocks) +
                                "], got " + std::to_string(num_blocks));
  }
  return num_blocks;
}

// The `n` lowest set bits of `bits` (all of them when it has no more). At most
// min(n, 64) steps; no popcount, which is a library call without -mpopcnt.
std::uint64_t lowest_bits(std::uint64_t bits, std::size_t n) noexcept {
  if (n >= 64) return bits;
  std::uint64_t pick = 0;
  for (; n != 0 && bits != 0; --n) {
    const std::uint64_t low = bits & (0 - bits);
    pick |= low;
    bits ^= low;
  }
  return pick;
}

std::size_t blocks_for(std::size_t tokens, std::uint32_t block_size) noexcept {
  const std::size_t n = tokens / block_size + (tokens % block_size != 0 ? 1 : 0);
  return n == 0 ? 1 : n;
}

}  // namespace

// ---------------------------------------------------------------- BlockPool

BlockPool::BlockPool(std::uint32_t num_blocks)
    : num_blocks_(checked_blocks(num_blocks, "BlockPool")),
      shift_(shift_for(num_blocks)),
      num_words_(static_cast<std::uint32_t>((std::uint64_t{num_blocks} + (std::uint64_t{1} << shift_) - 1) >> shift_)) {
  words_ = std::make_unique<detail::BitmapWord[]>(num_words_);
  counts_ = std::make_unique<std::atomic<std::uint32_t>[]>(num_blocks_);
  const std::uint32_t per_word = std::uint32_t{1} << shift_;
  for (std::uint32_t w = 0; w < num_words_; ++w) {
    const std::uint32_t used = std::min(per_word, num_blocks_ - w * per_word);
    // I2: bits past the word's blocks are pad, set for good.
    const std::uint64_t pad = used == 64 ? 0 : kFullWord << used;
    // Construction: the pool reaches other threads only through the caller's
    // synchronization, which publishes these stores.
    words_[w].bits.store(pad, std::memory_order::relaxed);
  }
  free_.value.store(num_blocks_, std::memory_order::relaxed);  // as above
}

BlockPool::~BlockPool() = default;

bool BlockPool::try_allocate(std::span<BlockId> out) noexcept {
  if (out.empty()) return true;
  if (out.size() > num_blocks_) return false;
  const auto want = static_cast<std::uint32_t>(out.size());

  // Reserve first (I3): after this the claim loop cannot fail.
  // Relaxed: a first guess for the CAS, which re-reads.
  std::uint32_t avail = free_.value.load(std::memory_order::relaxed);
  do {
    if (avail < want) return false;  // fail fast, no scan
    // (1) acquire pairs with (6): the reserved blocks' bit clears are visible.
  } while (!free_.value.compare_exchange_weak(avail, avail - want, std::memory_order::acquire,
                                              std::memory_order::relaxed));

  std::uint32_t w = t_hint;
  if (w >= num_words_) w = seed_hint(num_words_);
  std::size_t filled = 0;
  for (;;) {
    std::atomic<std::uint64_t>& word = words_[w].bits;
    // (2) relaxed: a candidate only, validated by the CAS (3).
    std::uint64_t cur = word.load(std::memory_order::relaxed);
    while (cur != kFullWord) {
      const std::uint64_t pick = lowest_bits(~cur, out.size() - filled);
      // (3) acquire pairs with (5): the previous holders' accesses happen-before ours.
      if (word.compare_exchange_weak(cur, cur | pick, std::memory_order::acquire, std::memory_order::relaxed)) {
        const BlockId base = w << shift_;
        for (std::uint64_t m = pick; m != 0; m &= m - 1) {
          const BlockId id = base + static_cast<BlockId>(std::countr_zero(m));
          // (4) relaxed: the block is ours alone until the caller publishes its id (I1).
          counts_[id].store(1, std::memory_order::relaxed);
          out[filled++] = id;
        }
        if (filled == out.size()) {
          // Stay on this word while it has free bits (locality), else move on.
          t_hint = (cur | pick) == kFullWord ? (w + 1 == num_words_ ? 0 : w + 1) : w;
          return true;
        }
        break;  // took every free bit of this word; need more
      }
    }
    w = w + 1 == num_words_ ? 0 : w + 1;
  }
}

bool BlockPool::retain_one(BlockId id) noexcept {
  if (id >= num_blocks_) return false;
  std::atomic<std::uint32_t>& count = counts_[id];
  // Relaxed: a first guess for the CAS, which re-reads.
  std::uint32_t c = count.load(std::memory_order::relaxed);
  do {
    // I1: never from 0 (a free or in-flight block); never overflow.
    if (c == 0 || c == std::numeric_limits<std::uint32_t>::max()) return false;
    // (R) relaxed: the caller already holds a reference; nothing to publish.
  } while (!count.compare_exchange_weak(c, c + 1, std::memory_order::relaxed, std::memory_order::relaxed));
  return true;
}

void BlockPool::retain(std::span<const BlockId> blocks) noexcept {
  std::size_t invalid = 0;
  for (const BlockId id : blocks) invalid += retain_one(id) ? 0 : 1;
  // Relaxed: a statistic, orders nothing.
  if (invalid != 0) invalid_.value.fetch_add(invalid, std::memory_order::relaxed);
}

bool BlockPool::try_retain(std::span<const BlockId> blocks) noexcept {
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    if (retain_one(blocks[i])) continue;
    // Give back the references taken so far. Through release(): if someone
    // dropped the caller's reference meanwhile (a misuse), ours may be the
    // last, and then the block must be freed, not left at count 0 and set.
    static_cast<void>(release(blocks.first(i)));
    // Relaxed: a statistic, orders nothing.
    invalid_.value.fetch_add(1, std::memory_order::relaxed);
    return false;
  }
  return true;
}

std::size_t BlockPool::release(std::span<const BlockId> blocks) noexcept {
  std::uint32_t freed = 0;
  std::size_t invalid = 0;
  // Bits to clear, batched per word while consecutive ids share one
  // (sbitmap_queue_clear_batch). Until flushed they stay set, so nobody can
  // claim those blocks yet; I3 holds because free_ is raised only after.
  std::uint32_t pending_word = kNoWord;
  std::uint64_t pending_mask = 0;
  const auto flush = [&]() noexcept {
    if (pending_mask == 0) return;
    // (5) release pairs with (3): passes every holder's accesses to the next owner.
    const std::uint64_t old = words_[pending_word].bits.fetch_and(~pending_mask, std::memory_order::release);
    if ((old & pending_mask) != pending_mask) [[unlikely]] {
      // I5: a bit already clear was freed by a racing double release (both
      // took the count to 0, at least one through the plain store (D')): the
      // word decides, and this call's share is a rejected id, not a free.
      // A rare path: popcount's cost (a library call without -mpopcnt) is moot.
      const auto lost = static_cast<std::uint32_t>(std::popcount(pending_mask & ~old));
      freed -= lost;
      invalid += lost;
    }
  };
  for (const BlockId id : blocks) {
    if (id >= num_blocks_) {
      ++invalid;
      continue;
    }
    const std::uint32_t w = id >> shift_;
    const std::uint64_t bit = std::uint64_t{1} << (id & ((std::uint32_t{1} << shift_) - 1));
    if (w == pending_word && (pending_mask & bit) != 0) [[unlikely]] {
      // This call took the block to 0 already and has not cleared its bit: a
      // repeat beyond the references held. Rejected before the count is read,
      // so that it neither stores over a new owner's count nor counts one
      // bit clear twice (I5).
      ++invalid;
      continue;
    }
    std::atomic<std::uint32_t>& count = counts_[id];
    // (D0) acquire pairs with the release half of the other holders' (D): a 1
    // read here comes after every other reference was dropped, and their
    // accesses to the block happen-before ours (then (5) passes them on).
    std::uint32_t c = count.load(std::memory_order::acquire);
    if (c == 1) {
      TGI_GTC_RELEASE_LAST_REF(id);
      // The last reference, and it is ours: no one else may retain (only a
      // holder may), so no read-modify-write is needed (libstdc++'s
      // shared_ptr release fast path, GCC 12). (D') relaxed: the release
      // fetch_and (5) below orders it before the next owner's store (4).
      count.store(0, std::memory_order::relaxed);
    } else {
      if (c != 0) {
        TGI_GTC_RELEASE_SHARED(id);
      }
      do {
        if (c == 0) break;  // I1: a free or in-flight block is not ours to release
        // (D) acq_rel: publish our accesses; the last holder acquires everyone's.
      } while (!count.compare_exchange_weak(c, c - 1, std::memory_order::acq_rel, std::memory_order::relaxed));
    }
    if (c == 0) {
      ++invalid;
      continue;
    }
    if (c != 1) continue;  // others still hold it
    if (w != pending_word) {
      flush();
      pending_word = w;
      pending_mask = 0;
    }
    pending_mask |= bit;
    ++freed;
    TGI_GTC_RELEASE_PENDING(id);
  }
  flush();
  if (freed != 0) {
    TGI_GTC_RELEASE_FLUSHED(pending_word);
    // (6) release pairs with (1): the cleared bits (5) are visible to whoever reserves them (I3).
    free_.value.fetch_add(freed, std::memory_order::release);
    t_hint = pending_word;  // reuse what we just freed: warm in this core's cache
  }
  // Relaxed: a statistic, orders nothing.
  if (invalid != 0) invalid_.value.fetch_add(invalid, std::memory_order::relaxed);
  return freed;
}

std::size_t BlockPool::invalid_releases() const noexcept {
  return invalid_.value.load(std::memory_order::relaxed);  // a statistic
}

std::uint32_t BlockPool::total_blocks() const noexcept { return num_blocks_; }

std::uint32_t BlockPool::free_blocks() const noexcept {
  // Relaxed: a snapshot; try_allocate decides with its own CAS (1).
  return free_.value.load(std::memory_order::relaxed);
}

std::uint32_t BlockPool::ref_count(BlockId block) const noexcept {
  if (block >= num_blocks_) return 0;
  return counts_[block].load(std::memory_order::relaxed);  // a snapshot; publishes nothing
}

std::size_t BlockPool::memory_bytes() const noexcept {
  return sizeof(*this) + std::size_t{num_words_} * sizeof(detail::BitmapWord) +
         std::size_t{num_blocks_} * sizeof(std::atomic<std::uint32_t>);
}

// ---------------------------------------------------------- BlockAllocation

BlockAllocation::BlockAllocation(BlockPool* pool, std::uint32_t block_size, std::vector<BlockId> blocks,
                                 std::size_t tokens) noexcept
    : pool_(pool), block_size_(block_size), tokens_(tokens), blocks_(std::move(blocks)) {}

BlockAllocation::BlockAllocation(BlockAllocation&& other) noexcept
    : pool_(std::exchange(other.pool_, nullptr)),
      block_size_(std::exchange(other.block_size_, 0)),
      tokens_(std::exchange(other.tokens_, 0)),
      blocks_(std::move(other.blocks_)) {
  other.blocks_.clear();
}

BlockAllocation& BlockAllocation::operator=(BlockAllocation&& other) noexcept {
  if (this != &other) {
    release_all();
    pool_ = std::exchange(other.pool_, nullptr);
    block_size_ = std::exchange(other.block_size_, 0);
    tokens_ = std::exchange(other.tokens_, 0);
    blocks_ = std::move(other.blocks_);
    other.blocks_.clear();
  }
  return *this;
}

BlockAllocation::~BlockAllocation() { release_all(); }

void BlockAllocation::release_all() noexcept {
  if (pool_ != nullptr && !blocks_.empty()) static_cast<void>(pool_->release(blocks_));
  pool_ = nullptr;
  block_size_ = 0;
  tokens_ = 0;
  blocks_.clear();
}

std::uint32_t BlockAllocation::slot(std::size_t token) const {
  if (token >= capacity()) {
    throw std::out_of_range("BlockAllocation::slot: token " + std::to_string(token) + " is past the capacity " +
                            std::to_string(capacity()));
  }
  // Fits: BlockAllocator checked num_blocks x block_size <= 2^32.
  return blocks_[token / block_size_] * block_size_ + static_cast<std::uint32_t>(token % block_size_);
}

bool BlockAllocation::extend(std::size_t new_total_tokens) {
  if (pool_ == nullptr) return false;
  const std::size_t need = blocks_for(new_total_tokens, block_size_);
  const std::size_t have = blocks_.size();
  if (need <= have) {
    tokens_ = new_total_tokens;  // never frees: a shared block must stay held
    return true;
  }
  const std::size_t missing = need - have;
  if (missing > pool_->free_blocks()) return false;  // fail before touching the list
  blocks_.reserve(need);  // may throw: nothing changed yet
  blocks_.resize(need);   // no reallocation, cannot throw
  if (!pool_->try_allocate(std::span<BlockId>(blocks_).subspan(have))) {
    blocks_.resize(have);
    return false;
  }
  tokens_ = new_total_tokens;
  return true;
}

BlockAllocation BlockAllocation::share() const {
  if (pool_ == nullptr) return {};
  std::vector<BlockId> copy(blocks_);  // may throw: before any reference is taken
  // All or nothing: a fork that owned a block without holding a reference
  // would drop someone else's when destroyed.
  if (!pool_->try_retain(copy)) {
    throw std::overflow_error("BlockAllocation::share: a block has UINT32_MAX references already (or is no "
                              "longer held by this allocation)");
  }
  return BlockAllocation(pool_, block_size_, std::move(copy), tokens_);
}

// ----------------------------------------------------------- BlockAllocator

namespace {
const BlockAllocatorConfig& checked_config(const BlockAllocatorConfig& c) {
  checked_blocks(c.num_blocks, "BlockAllocator");
  const std::pair<const char*, std::uint32_t> sizes[] = {{"block_size", c.block_size},     {"num_layers", c.num_layers},
                                                         {"num_kv_heads", c.num_kv_heads}, {"head_dim", c.head_dim},
                                                         {"dtype_bytes", c.dtype_bytes}};
  for (const auto& [name, value] : sizes) {
    if (value == 0) throw std::invalid_argument(std::string("BlockAllocator: ") + name + " must be at least 1, got 0");
  }
  if (std::uint64_t{c.num_blocks} * c.block_size > (std::uint64_t{1} << 32)) {
    throw std::invalid_argument("BlockAllocator: num_blocks x block_size must be at most 2^32 (slots are 32-bit), got " +
                                std::to_string(c.num_blocks) + " x " + std::to_string(c.block_size));
  }
  std::uint64_t bytes = 2;
  for (const std::uint32_t f : {c.num_layers, c.num_kv_heads, c.head_dim, c.block_size, c.dtype_bytes, c.num_blocks}) {
    if (__builtin_mul_overflow(bytes, std::uint64_t{f}, &bytes)) {
      throw std::invalid_argument("BlockAllocator: total_memory_bytes() overflows 64 bits");
    }
  }
  return c;
}
}  // namespace

BlockAllocator::BlockAllocator(BlockAllocatorConfig config)
    : config_(checked_config(config)), pool_(config_.num_blocks) {}

std::optional<BlockAllocation> BlockAllocator::allocate(std::size_t tokens) {
  const std::size_t n = blocks_for(tokens, config_.block_size);
  if (n > pool_.free_blocks()) return std::nullopt;  // fail before allocating the list
  std::vector<BlockId> blocks(n);
  if (!pool_.try_allocate(blocks)) return std::nullopt;
  return BlockAllocation(&pool_, config_.block_size, std::move(blocks), tokens);
}

MemoryStats BlockAllocator::memory_stats() const noexcept {
  MemoryStats s;
  s.total_blocks = pool_.total_blocks();
  s.free_blocks = pool_.free_blocks();
  s.allocated_blocks = s.total_blocks - s.free_blocks;
  const std::uint64_t per_block = config_.bytes_per_block();
  s.total_bytes = s.total_blocks * per_block;
  s.allocated_bytes = s.allocated_blocks * per_block;
  s.free_bytes = s.free_blocks * per_block;
  return s;
}

}  // namespace tgi_gtc::scheduling
