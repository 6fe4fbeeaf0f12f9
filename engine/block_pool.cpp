// BlockPool: a lock-free pool of reference-counted blocks.
//
// Design. An atomic bitmap as in Linux's lib/sbitmap.c (the blk-mq tag
// allocator): one bit a block, words spread one per cache line, a per-thread
// start hint so threads claim from different words, several bits of one word
// claimed with one CAS (sbitmap's __sbitmap_queue_get_batch). Unlike sbitmap,
// a free-block counter sits in front of the bitmap: try_allocate reserves k
// blocks from it first (CAS loop, never below zero) and only then claims bits.
// The counter's word also has room for one parked block: a release of one
// block that frees it puts it there, bit still set, with the one CAS that
// counts it free, and a one-block try_allocate of the same thread takes it
// back with the one CAS that reserves it: two atomic read-modify-writes an
// allocate+release instead of four (a magazine of one in front of the
// bitmap, after Bonwick and Adams, "Magazines and Vmem", USENIX 2001; the
// thread tag keeps threads from passing one block to and fro). Reference
// counts live beside the bitmap, one atomic per block. The RAII shape of
// BlockAllocation follows TGI's backends/v3/src/block_allocator.rs.
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
//     1 = claimed (held, parked, or inside an in-flight call), 0 = free.
//     b = 64 once N >= 256; smaller pools use fewer bits a word so that they
//     still spread over at least 4 lines (sbitmap_calculate_shift), except
//     N < 4: one word, N bits of it used.
//
//   counts_  std::atomic<uint32_t>[N], packed: references to each block.
//   free_    own line, one 64-bit word:
//              bits 63..58  tag     the parking thread's tag (1-63, my_tag())
//              bits 57..29  parked  id + 1 of the parked block; 0: none
//              bits 28..0   count   blocks a try_allocate may still reserve,
//                                   the parked one included
//   invalid_ own line: rejected ids (statistic).
//
// State machine of one block (bit, count; P: in the slot):
//
//   from             to               operation                        thread
//   (0, 0) free      (1, 0) claiming  claim CAS on the word (3)        try_allocate, after reserving (1)
//   (1, 0) P         (1, 0) claiming  reserve CAS (1) takes the slot   try_allocate
//   (1, 0) claiming  (1, 1) held      count.store(1) (4)               the same try_allocate
//   (1, c>0)         (1, c+1)         count CAS c -> c+1 (R)           retain, by a holder
//   (1, c>1)         (1, c-1)         count CAS c -> c-1 (D)           release, by a holder
//   (1, 1)           (1, 0) freeing   count load 1 (D0), store 0 (D')  release, by the last holder
//   (1, 0) freeing   (1, 0) P         park CAS on free_ (P), the slot  the same release, of this one
//                                     empty; then the bit load (P')    block alone
//   (1, 0) freeing   (0, 0) free      word.fetch_and (5), then         the same release, otherwise
//                                     free_.fetch_add (6)
//   count == 0       unchanged        retain / release of it rejected, any thread
//                                     counted in invalid_
//
// A try_allocate takes the parked block when it wants one block and the tag
// is its thread's, or when the clear bits alone cannot back its reservation
// (count - 1 < k); then it takes it with the reservation, in the same CAS.
//
// Invariants (numbered where the code keeps them):
//   I1  A count goes 0 -> 1 only by the store (4) of the thread whose CAS (3)
//       set the block's bit or whose CAS (1) took it off the slot; every other
//       change is a CAS from a nonzero value (R, D) or the last holder's store
//       of 0 (D'). So retain/release can never resurrect a free block, and,
//       while callers keep the contract (only a holder retains or releases),
//       count > 0 implies the bit is set: the bit is set before the count
//       becomes 1 (and stays set while the block is parked), and is cleared
//       only after it became 0. (A misuse can break this one: see I5.)
//   I2  Pad bits are set at construction and never cleared (release clears
//       only bits of in-range ids whose count it took to 0).
//   I3  count never goes below zero (the reserve CAS (1) checks), and
//       count - [a block parked] + (reserved, not yet claimed) <= clear bits
//       at every step, whatever the callers do, misuse included: a release
//       clears its bits (5) before it adds them (6), and adds only the bits
//       its fetch_and found set (I5), so one unit for each set -> clear
//       change of a bit; a park (P) adds a unit with the slot's block, and a
//       reservation (1) that takes the slot takes that unit with it; an
//       un-park (U) moves a unit off the slot only onto a bit that its
//       caller cleared (5) and has not counted, or takes one unit back when
//       that bit is counted already; if its block turns out to be set (a
//       legitimate park, see I5), unpark() clears the bit (5) and adds the
//       unit back (6), if it took one; an allocation subtracts k (1) before it claims its
//       bits (clear -> set), k - 1 of them when it took the slot.
//       So a reservation is always backed by the parked block it took and by
//       clear bits: the claim loop terminates with exactly k and never rolls
//       back. This is what makes all-or-nothing exact under concurrency:
//       there is no partial grab to undo, so no other caller can ever see
//       capacity transiently missing. (Without the counter, a batch that
//       found k-1 bits would have to give them back, and a concurrent caller
//       could fail for want of them.) Under misuse a parked block's bit may
//       be clear too (I5): then count exceeds the claimable blocks by none,
//       but one block is claimable twice; count <= N + 1 (29 bits hold it).
//   I4  Quiescent (no call in flight): free_blocks() == number of clear
//       non-pad bits + [a block parked] (by I3, at most that whatever the
//       callers did), and, while callers keep the contract, == number of
//       blocks with count 0 == N - blocks held.
//   I5  A block taken to 0 is counted free once: by the release whose
//       fetch_and (5) found its bit set, or by the release that parked it
//       (P). Between two flushes of a word, a release puts each of its bits
//       in the pending mask at most once (a repeat of an id still pending is
//       rejected before the count is read). The last holder takes the count
//       from 1 to 0 with a plain store (D'), not a CAS: only a holder may
//       retain, so when the count reads 1 nobody else can change it. Two
//       releases of that one reference (a double release, a misuse) racing
//       on two threads may then both store 0; exactly one of them counts the
//       block free, the other counts the id in invalid_releases(), as a CAS
//       1 -> 0 that failed would:
//       - both through the bitmap: the word picks one (5);
//       - one finds the block parked already: it rejects it at once;
//       - one parks the block, the other clears its bit: the park and the
//         fetch_and, each followed by a seq_cst read of the other's word
//         (P' reads the bit; the other reads free_, in (6) or after its
//         flush), form the store-buffering pattern, so at least one of the
//         two sees the other; whoever sees it moves the block's unit off
//         the slot (U) if the slot still holds it and counts the id as
//         rejected; if both see it, only one CAS (U) finds the block there.
//         Before each CAS (U) it loads the bit again: under the contract a
//         parked block's bit is set, so a set bit means the block was
//         claimed and parked again by a legitimate owner since (a release
//         that is no misuse can meet that too: its bit clear (5), then a
//         claim (3) and a park of the block before its read of free_), and
//         that park stays. The CAS compares values only, so the block may be
//         taken, freed, claimed and parked again between that load and the
//         CAS, with free_ back at the value the CAS expects; so after a
//         successful CAS (U) it loads the bit once more, and if it is set,
//         gives the block back through the bitmap (off the slot and with its
//         bit set, nobody else can reach it) and its own release stands.
//       That holds while no try_allocate takes the block between the two; if
//       one does, the late release clears the new owner's bit (and its count,
//       if its store comes after the new owner's), or parks the block while
//       its owner holds it: the block is free while its owner holds it (count
//       1 with the bit clear, or count 0), as the CAS's ABA did before (a late
//       CAS 1 -> 0 dropped the new owner's reference). I3 holds still, so
//       try_allocate never waits for bits that do not exist. A retain by a
//       thread holding no reference, also a misuse, may be overwritten by
//       (D'): the block is freed under it, and that thread's later release is
//       one of a free block, or drops a new owner's reference.
//
// What an observer sees while calls are in flight: a block being allocated is
// already out of free_blocks() (reserved) but may still show ref_count 0
// (claimed, count not yet stored); a block being released shows ref_count 0
// before free_blocks() counts it again. By I1 and I3, free_blocks() never
// exceeds the blocks with count 0 (under the contract; I5 for misuses); it may
// lag them by the blocks inside in-flight calls, and equals them when none is
// (I4). It reports at most N (the count can reach N + 1 under misuse, I3).
//
// Memory orderings (numbers as in the code):
//   (1) reserve CAS on free_, acquire: pairs with (6) and (P): the bit
//       clears (5) that the reserved units stand for happen-before the scan,
//       so the scan's loads see those bits clear; the parked block's previous
//       holders' accesses happen-before the new owner's.
//   (2) scan load of a word, relaxed: only picks candidates; (3) re-reads.
//   (3) claim CAS on a word, acquire on success: pairs with the release half
//       of the fetch_and (5) of the block's previous free (through the word's
//       release sequence): every access of the previous holders happens-before
//       the new owner's.
//   (4) count store 1, relaxed: the block is private to this thread until the
//       caller hands its id to others through its own synchronization.
//   (R) retain CAS, relaxed: the retainer already holds a reference; adding
//       one publishes nothing (std::shared_ptr's increment).
//   (D) release CAS, acq_rel: release publishes this holder's accesses to the
//       block; acquire, for the holder that reaches 0, collects every other
//       holder's (std::shared_ptr's decrement). (P) or (5) then passes them on.
//   (D0) count load, acquire: pairs with the release half of every other
//       holder's (D); a 1 read means they all dropped theirs, and their
//       accesses happen-before this holder's store (D') and (P) or (5).
//   (D') count store 0, relaxed: (P), (5) or (D''), a release after it in
//       this thread, orders it before the next owner's store (4), which
//       follows (1) or (3).
//   (D'') fetch_or(0) on free_, release, in a release of one block whose load
//       found the slot holding it: it decides (if the slot still holds the
//       block, the release is rejected) and pairs with the next owner's (1),
//       which reads free_ after it (its release sequence), so the store (D')
//       happens-before that owner's (4).
//   (P) park CAS on free_, seq_cst: its release half pairs with (1). seq_cst
//       for the store-buffering pattern of I5, with (P'), (5), (6) and the
//       read of free_ after a flush, all seq_cst.
//   (P') load of the parked block's word, seq_cst: see (P).
//   (5) bit clear fetch_and, seq_cst: its release half pairs with (3); see (P).
//   (6) free_ fetch_add, seq_cst: its release half pairs with (1); see (P).
//   (U) un-park CAS on free_, seq_cst: the bit clear (5) whose unit it moves
//       happens-before it (the caller did it, or (P') read it), and so before
//       the reservation (1) that reads the unit. The load of the bit before
//       it: seq_cst, as (P').
//   On x86-64 the seq_cst read-modify-writes are the same locked instructions
//   as the release ones, and the seq_cst loads plain loads.
//
// Progress: (1) retries only when another call changed free_; (3) only when
// another call changed the word (both also on a spurious failure of
// compare_exchange_weak, which LL/SC targets allow); the scan keeps going
// round until it has its k bits, which I3 guarantees exist and which only
// reserved callers (a bounded number) can take, so a pass fails only because
// another call claimed bits. (P) is tried once: a release that loses it goes
// to the bitmap. (U) retries only while the slot still holds its block and
// another call changed free_.
// Lock-free. A thread preempted after (1) holds its reservation, as if it held
// the blocks; one preempted between (D) or (D') and (P) or (6) delays only the
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
// scheduler.cpp), called by release(): (a) with the block id, when it read a
// count of 1, before it stores 0 (D'); (b) with the block id, when a block it
// took to 0 waits for its bit clear (5): in the pending mask, or, in a release
// of one block that found the slot full or lost the park CAS, just before it;
// (c) with the block id, when it read a count above 1, before its CAS (D); (d)
// with the word it cleared last, after its last bit clear (5), before it adds
// the freed blocks to free_ (6); (e) with the block id, when a release of one
// block has parked it (P), before it checks its bit (P'); (f) with the word,
// after (6), before it checks the slot; (g) with the block id, in unpark(),
// between its load of the bit and its CAS (U). A test stalls a release at
// (a), (b), (d), (e), (f) and (g) to force the double-release races of I5
// and the legitimate re-parks that unpark() must leave alone.
// Two ordering tests stall one at (c), to make another holder's release land
// between the load (D0) and the CAS (D), so that (D) takes the count to 0; and
// at (d), so that the next owner claims the block before free_ counts it,
// synchronizing with its releaser through (5) and (3) alone.
void (*g_release_last_ref_hook)(std::uint64_t id) = nullptr;
void (*g_release_pending_hook)(std::uint64_t id) = nullptr;
void (*g_release_shared_hook)(std::uint64_t id) = nullptr;
void (*g_release_flushed_hook)(std::uint64_t word) = nullptr;
void (*g_release_parked_hook)(std::uint64_t id) = nullptr;
void (*g_release_counted_hook)(std::uint64_t word) = nullptr;
void (*g_release_unpark_hook)(std::uint64_t id) = nullptr;
// Each reads its pointer once: a test may clear it while another thread passes it.
#define TGI_GTC_RELEASE_HOOK(name, arg) \
  if (auto* hook_ = detail::g_release_##name##_hook) hook_(arg)
#else
#define TGI_GTC_RELEASE_HOOK(name, arg)
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

// The free_ word: count:29 | parked:29 | tag:6, from the low bits up.
constexpr unsigned kParkedShift = 29;
constexpr unsigned kTagShift = 58;
constexpr std::uint64_t kCountMask = (std::uint64_t{1} << kParkedShift) - 1;
constexpr std::uint64_t kParkedMask = (std::uint64_t{1} << (kTagShift - kParkedShift)) - 1;
static_assert(std::uint64_t{kMaxBlocks} + 1 <= kCountMask, "the count (at most N + 1, I3) fits below the parked id");
static_assert(std::uint64_t{kMaxBlocks} <= kParkedMask, "a parked id + 1 fits");
constexpr std::uint64_t count_of(std::uint64_t f) { return f & kCountMask; }
constexpr std::uint64_t parked_of(std::uint64_t f) { return (f >> kParkedShift) & kParkedMask; }  // id + 1; 0: none
constexpr std::uint64_t tag_of(std::uint64_t f) { return f >> kTagShift; }

// The calling thread's tag (1-63) for the block it parks: a serial taken at
// its first use, so the first 63 threads that park or take a block have
// distinct tags (two that share one only take each other's parked blocks).
// Constant-initialized, initial-exec TLS, as t_hint.
std::atomic<std::uint32_t> g_next_tag{0};
[[gnu::tls_model("initial-exec")]] thread_local std::uint32_t t_tag = 0;
std::uint64_t my_tag() noexcept {
  if (t_tag == 0) [[unlikely]] {
    // relaxed: distinct values come from the RMW's atomicity; nothing is published.
    t_tag = g_next_tag.fetch_add(1, std::memory_order::relaxed) % 63 + 1;
  }
  return t_tag;
}

// Drops one reference to block `id` (in range; `count` is its count) and
// returns the count it read: 0 (rejected, nothing changed), 1 (it was the
// last: now 0) or more. This shape (one return, after both branches) keeps
// release()'s loop as fast as it was with this code written inside it: with
// an early return for the last reference, the loop took 1.3x the time for a
// batch of 64 blocks on the development box.
[[gnu::always_inline]] inline std::uint32_t drop_ref(std::atomic<std::uint32_t>& count,
                                                     [[maybe_unused]] BlockId id) noexcept {
  // (D0) acquire pairs with the release half of the other holders' (D): a 1
  // read here comes after every other reference was dropped, and their
  // accesses to the block happen-before ours (then (P) or (5) passes them on).
  std::uint32_t c = count.load(std::memory_order::acquire);
  if (c == 1) {
    TGI_GTC_RELEASE_HOOK(last_ref, id);
    // The last reference, and it is ours: no one else may retain (only a
    // holder may), so no read-modify-write is needed (libstdc++'s
    // shared_ptr release fast path, GCC 12). (D') relaxed: a release
    // read-modify-write that follows in this thread on every path, (P), (5)
    // or the one before an early reject, orders it before the next owner's
    // store (4).
    count.store(0, std::memory_order::relaxed);
  } else {
    if (c != 0) {
      TGI_GTC_RELEASE_HOOK(shared, id);
    }
    do {
      if (c == 0) break;  // I1: a free or in-flight block is not ours to release
      // (D) acq_rel: publish our accesses; the last holder acquires everyone's.
    } while (!count.compare_exchange_weak(c, c - 1, std::memory_order::acq_rel, std::memory_order::relaxed));
  }
  return c;
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

  // Reserve first (I3): after this the claim loop cannot fail. The parked
  // block goes with its unit when this thread parked it and wants one block
  // (P), or when the clear bits alone cannot back the reservation (I3).
  const std::uint64_t tag = want == 1 ? my_tag() : 0;  // 0: no thread's tag
  // Relaxed: a first guess for the CAS, which re-reads.
  std::uint64_t cur = free_.value.load(std::memory_order::relaxed);
  std::uint64_t parked = 0;
  std::uint64_t next = 0;
  do {
    const std::uint64_t avail = count_of(cur);
    if (avail < want) return false;  // fail fast, no scan
    parked = parked_of(cur);
    if (parked != 0 && (tag_of(cur) == tag || avail - 1 < want)) {
      next = avail - want;  // the slot and its tag cleared
    } else {
      parked = 0;
      next = cur - want;  // avail - want >= 1 when a block stays parked
    }
    // (1) acquire pairs with (6) and (P): the bit clears that the reserved
    // units stand for happen-before the scan, so its loads see those bits
    // clear; the parked block's previous holders' accesses happen-before ours.
  } while (!free_.value.compare_exchange_weak(cur, next, std::memory_order::acquire, std::memory_order::relaxed));
  std::size_t filled = 0;
  if (parked != 0) {
    const auto id = static_cast<BlockId>(parked - 1);
    // (4) relaxed: the block is ours alone until the caller publishes its id (I1).
    counts_[id].store(1, std::memory_order::relaxed);
    out[filled++] = id;
    if (filled == out.size()) return true;
  }

  std::uint32_t w = t_hint;
  if (w >= num_words_) w = seed_hint(num_words_);
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

bool BlockPool::unpark(std::uint64_t cur, BlockId id, bool take_unit) noexcept {
  const std::uint64_t parked = std::uint64_t{id} + 1;
  std::atomic<std::uint64_t>& word = words_[id >> shift_].bits;
  const std::uint64_t bit = bit_of(id);
  while (parked_of(cur) == parked) {
    // seq_cst (as (P')): under the contract a parked block's bit is set. Set
    // now, the block was claimed and parked again since the bit was seen
    // clear (by a legitimate owner): that park stays.
    if ((word.load() & bit) != 0) return false;
    TGI_GTC_RELEASE_HOOK(unpark, id);
    // (U) seq_cst: see the design comment.
    if (free_.value.compare_exchange_weak(cur, take_unit ? count_of(cur) - 1 : count_of(cur))) {
      // seq_cst, as above. The CAS compares values only: between the load
      // and the CAS, the block may have been taken, freed through the
      // bitmap, claimed and parked again (a legitimate owner's park), with
      // free_ back at `cur`. Then its bit is set now, and, off the slot,
      // nobody can reach the block: give it back through the bitmap (5),
      // with a unit for it if the CAS took one (6); this call's release
      // stands (false). (If a release cleared the bit meanwhile, a misuse,
      // that release counts it: without a unit from the CAS, this call's
      // own clear must not be counted as well (true).)
      if ((word.load() & bit) == 0) return true;
      if ((word.fetch_and(~bit) & bit) == 0) return !take_unit;  // (5) seq_cst
      if (take_unit) free_.value.fetch_add(1);                    // (6) seq_cst
      return false;
    }
  }
  return false;  // a try_allocate took it meanwhile: freed under its new owner (I5)
}

bool BlockPool::unpark_cleared(std::uint64_t seen, std::uint32_t word, std::uint64_t cleared, bool counted) noexcept {
  const std::uint64_t parked = parked_of(seen);
  if (parked == 0) return false;
  const auto id = static_cast<BlockId>(parked - 1);
  if ((id >> shift_) != word || (cleared & bit_of(id)) == 0) return false;
  // I5: a racing double release parked the block whose bit this call
  // cleared (unless the bit is set again: see unpark()). (U) moves its unit
  // off the slot: the clear bit stands for it, once (this call's unit,
  // already added when `counted`, goes).
  return unpark(seen, id, counted);
}

std::size_t BlockPool::reject(std::size_t n) noexcept {
  // Relaxed: a statistic, orders nothing.
  if (n != 0) invalid_.value.fetch_add(n, std::memory_order::relaxed);
  return 0;
}

std::size_t BlockPool::release_one(BlockId id) noexcept {
  if (id >= num_blocks_) return reject(1);
  const std::uint32_t c = drop_ref(counts_[id], id);
  if (c == 0) return reject(1);
  if (c != 1) return 0;  // others still hold it
  const std::uint64_t mine = std::uint64_t{id} + 1;
  const std::uint32_t w = id >> shift_;
  // Relaxed: a first guess for the CAS (P), which re-reads; a parked `id`
  // means a racing double release parked it already (I5).
  std::uint64_t cur = free_.value.load(std::memory_order::relaxed);
  if (parked_of(cur) == mine) {
    // (D'') release: it decides, as the load does not. If the block is still
    // parked, this release is rejected, and the next owner's (1), which
    // reads free_ after this read-modify-write (its release sequence), sees
    // this thread's store 0 (D') happen before its own store (4). If a
    // try_allocate took it since the load, go on as if it had not been
    // parked (I5: freed under its new owner).
    cur = free_.value.fetch_or(0, std::memory_order::release);
    if (parked_of(cur) == mine) return reject(1);
  }
  const std::uint64_t parked = (count_of(cur) + 1) | mine << kParkedShift | my_tag() << kTagShift;
  // (P) seq_cst: its release half pairs with the next owner's (1); and with
  // (P') against (5) and the free_ read after it (I5).
  if (parked_of(cur) == 0 && free_.value.compare_exchange_strong(cur, parked)) {
    TGI_GTC_RELEASE_HOOK(parked, id);
    // (P') seq_cst: a racing double release that cleared the bit (5) before
    // this load is seen here; one that clears it later sees the parked block
    // in its read of free_ after (5). (The store-buffering pattern: at least
    // one of the two sees the other.)
    if ((words_[w].bits.load() & bit_of(id)) != 0) return 1;
    // The bit is clear: take the park's unit back off the slot (U), unless
    // a try_allocate took the block, or the other release moved it, first.
    return unpark(parked, id, true) ? reject(1) : 1;
  }
  // A block is parked already (or the CAS (P) lost): the bitmap, as
  // release() does.
  TGI_GTC_RELEASE_HOOK(pending, id);
  // (5) seq_cst: its release half pairs with (3); and see (P').
  const std::uint64_t old = words_[w].bits.fetch_and(~bit_of(id));
  if ((old & bit_of(id)) == 0) return reject(1);  // I5: a racing double release cleared it
  TGI_GTC_RELEASE_HOOK(flushed, w);
  // (6) seq_cst: its release half pairs with (1); it reads the slot (P').
  const std::uint64_t seen = free_.value.fetch_add(1);
  TGI_GTC_RELEASE_HOOK(counted, w);
  t_hint = w;  // reuse what we just freed: warm in this core's cache
  if (unpark_cleared(seen + 1, w, bit_of(id), true)) return reject(1);
  return 1;
}

std::size_t BlockPool::release(std::span<const BlockId> blocks) noexcept {
  if (blocks.size() == 1) return release_one(blocks[0]);
  std::uint32_t freed = 0;
  std::size_t invalid = 0;
  // Bits to clear, batched per word while consecutive ids share one
  // (sbitmap_queue_clear_batch). Until flushed they stay set, so nobody can
  // claim those blocks yet; I3 holds because free_ is raised only after.
  std::uint32_t pending_word = kNoWord;
  std::uint64_t pending_mask = 0;
  std::uint64_t cleared = 0;  // the bits of pending_word the last flush cleared
  const auto flush = [&]() noexcept {
    if (pending_mask == 0) return;
    // (5) seq_cst: its release half pairs with (3): passes every holder's
    // accesses to the next owner; and see (P').
    const std::uint64_t old = words_[pending_word].bits.fetch_and(~pending_mask);
    cleared = old & pending_mask;
    if (cleared != pending_mask) [[unlikely]] {
      // I5: a bit already clear was freed by a racing double release (both
      // took the count to 0, at least one through the plain store (D')): the
      // word decides, and this call's share is a rejected id, not a free.
      // A rare path: popcount's cost (a library call without -mpopcnt) is moot.
      const auto lost = static_cast<std::uint32_t>(std::popcount(pending_mask & ~old));
      freed -= lost;
      invalid += lost;
    }
    pending_mask = 0;
  };
  // After a flush that is not the last: whether a racing double release
  // parked one of the blocks it cleared (P'). The last flush reads free_
  // through (6) instead.
  const auto check_parked = [&]() noexcept {
    if (cleared == 0) return;
    // seq_cst: the read after (5) of the store-buffering pattern (P').
    if (unpark_cleared(free_.value.load(), pending_word, cleared, false)) {
      --freed;
      ++invalid;
    }
    cleared = 0;
  };
  for (const BlockId id : blocks) {
    if (id >= num_blocks_) {
      ++invalid;
      continue;
    }
    const std::uint32_t w = id >> shift_;
    const std::uint64_t bit = bit_of(id);
    if (w == pending_word && (pending_mask & bit) != 0) [[unlikely]] {
      // This call took the block to 0 already and has not cleared its bit: a
      // repeat beyond the references held. Rejected before the count is read,
      // so that it neither stores over a new owner's count nor counts one
      // bit clear twice (I5).
      ++invalid;
      continue;
    }
    const std::uint32_t c = drop_ref(counts_[id], id);
    if (c == 0) {
      ++invalid;
      continue;
    }
    if (c != 1) continue;  // others still hold it
    if (w != pending_word) {
      flush();
      check_parked();
      pending_word = w;
    }
    pending_mask |= bit;
    ++freed;
    TGI_GTC_RELEASE_HOOK(pending, id);
  }
  flush();
  if (freed != 0) {
    TGI_GTC_RELEASE_HOOK(flushed, pending_word);
    // (6) seq_cst: its release half pairs with (1): the cleared bits (5) are
    // visible to whoever reserves them (I3); it reads the slot (P').
    const std::uint64_t seen = free_.value.fetch_add(freed);
    TGI_GTC_RELEASE_HOOK(counted, pending_word);
    if (unpark_cleared(seen + freed, pending_word, cleared, true)) {
      --freed;
      ++invalid;
    }
    t_hint = pending_word;  // reuse what we just freed: warm in this core's cache
  }
  reject(invalid);
  return freed;
}

std::size_t BlockPool::invalid_releases() const noexcept {
  return invalid_.value.load(std::memory_order::relaxed);  // a statistic
}

std::uint32_t BlockPool::total_blocks() const noexcept { return num_blocks_; }

std::uint32_t BlockPool::free_blocks() const noexcept {
  // Relaxed: a snapshot; try_allocate decides with its own CAS (1).
  // At most N: under a misuse that I5 cannot see, the count may reach N + 1 (I3).
  return static_cast<std::uint32_t>(std::min<std::uint64_t>(count_of(free_.value.load(std::memory_order::relaxed)), num_blocks_));
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
