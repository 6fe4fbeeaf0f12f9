// The pool run: threads allocate batches of blocks, share (retain) what they
// hold, hand shares to other threads through mailboxes, and release them.
//
// Owner tags. The harness keeps its own word per block:
//   tag[b] = group << 24 | references held by the harness
// where a group is one try_allocate() and every share made from it. The tag
// moves 0 -> (g,1) right after try_allocate returned b, +1 right after a
// retain, -1 (to 0 on the last) right before a release. So tag <= the pool's
// count at every moment, and tag == count when no call is in flight. Checks:
//   while running  try_allocate hands out only blocks whose tag is 0 (else two
//                  unsharing owners hold it); retain and release touch only
//                  blocks whose tag names the caller's group; a failed
//                  try_allocate leaves its output untouched; every block id is
//                  in range; ref_count() is at least what the caller holds;
//   at each pause  from the epoch's logs (x86 only, see check_failures()):
//                  a try_allocate(k) failed only if fewer than k blocks can
//                  have been free at some moment of the call;
//   at each pause  ref_count(b) == tag count for every block; free_blocks() ==
//                  total - blocks held; blocks freed by release() == last
//                  references dropped; invalid_releases() == 0;
//   at the end     after every holder released: all counts 0, all blocks free.
//
// Memory order. Each block also has a plain (non-atomic) payload, its "KV
// data": the owner that takes it from try_allocate writes it, and every holder
// reads it when it has retained a share and before it releases (and checks
// it: *payload*). The pool must order a block's last holders' reads before its
// next owner's write (its release of the last reference, the bit clear, the
// next claim), and apart from the mailbox handoffs nothing else in the run
// does. (A handoff orders a little more than its two threads: every write to
// a slot is a read-modify-write, so a taker's acquire synchronizes with every
// earlier poster to that slot, through the release sequence, not only with
// the one whose handle it takes.) The harness's own
// atomics (owner tags, stamps) are relaxed, because a seq_cst clock or tag
// around every call would order each call before every later one and hide a
// pool that orders nothing. The checks above need only each tag's own
// modification order. Under ThreadSanitizer a missing order is reported as a
// data race on the payload (the broken-pool-order target shows it); in the
// other builds on x86-64 the hardware keeps the accesses in order, and only the
// counts and the contents are checked. The over-releasing pool keeps no
// payload: once it has dropped a holder's reference, that holder's read is
// unordered in fact, and its fault is to be reported as a count, not as a race.
#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <iterator>
#include <limits>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <tgi_gtc/scheduling/block_pool.hpp>

#include "driver.hpp"

// check_failures() needs every atomic read-modify-write to be a full fence.
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
#define TGI_STRESS_JUDGES_FAILED_ALLOCATIONS 1
#else
#define TGI_STRESS_JUDGES_FAILED_ALLOCATIONS 0
#endif

namespace tgi_gtc::stress::detail {
namespace {

using scheduling::BlockId;
using scheduling::BlockPool;

enum PoolOp : std::size_t { kAllocate, kShare, kRelease };

constexpr std::size_t kMaxBatch = 8;
constexpr std::size_t kHandlesPerThread = 64;
constexpr BlockId kPoison = std::numeric_limits<BlockId>::max();
constexpr unsigned kCountBits = 24;
constexpr std::uint64_t kCountMask = (std::uint64_t{1} << kCountBits) - 1;

std::uint64_t group_of(std::uint64_t tag) { return tag >> kCountBits; }
std::uint64_t count_of(std::uint64_t tag) { return tag & kCountMask; }

std::string at(std::uint64_t start, std::uint64_t end) {
  return " [" + std::to_string(start) + "," + std::to_string(end) + "]";
}

/// What the owner of `group` writes into block b's payload.
std::uint64_t content(std::uint64_t group, BlockId b) { return group * 0x9E3779B97F4A7C15ULL + b; }

/// The stamps of the pool run: tickets that name calls in reports. Unlike the
/// scheduler runs' seq_cst clock they order no memory (see the top).
class StampClock {
 public:
  // relaxed: a ticket only; pairs with nothing, so that only the pool orders blocks
  std::uint64_t tick() noexcept { return now_.fetch_add(1, std::memory_order::relaxed) + 1; }
  // relaxed: as tick()
  std::uint64_t now() const noexcept { return now_.load(std::memory_order::relaxed); }

 private:
  alignas(64) std::atomic<std::uint64_t> now_{0};
};

/// Blocks held by one owner: an allocation or a share of one.
struct Handle {
  std::array<BlockId, kMaxBatch> blocks{};
  std::uint32_t n = 0;
  std::uint64_t group = 0;
  std::uint64_t start = 0, end = 0;  // the call that made it
  std::span<const BlockId> span() const { return {blocks.data(), n}; }
};

/// Forwards every call to a real BlockPool; the broken pools below replace
/// the calls they break.
class PoolWrapper {
 public:
  explicit PoolWrapper(std::uint32_t blocks) : pool_(blocks) {}
  [[nodiscard]] bool try_allocate(std::span<BlockId> out) noexcept { return pool_.try_allocate(out); }
  void retain(std::span<const BlockId> blocks) noexcept { pool_.retain(blocks); }
  [[nodiscard]] bool try_retain(std::span<const BlockId> blocks) noexcept { return pool_.try_retain(blocks); }
  [[nodiscard]] std::size_t release(std::span<const BlockId> blocks) noexcept { return pool_.release(blocks); }
  std::size_t invalid_releases() const noexcept { return pool_.invalid_releases(); }
  std::uint32_t total_blocks() const noexcept { return pool_.total_blocks(); }
  std::uint32_t free_blocks() const noexcept { return pool_.free_blocks(); }
  std::uint32_t ref_count(BlockId b) const noexcept { return pool_.ref_count(b); }

 protected:
  BlockPool pool_;
};

/// A BlockPool that drops one reference too many: every `every`-th release()
/// whose first block is shared releases that block twice, taking a reference
/// its other owner still counts on. The checks must catch it.
class OverReleasingPool : public PoolWrapper {
 public:
  OverReleasingPool(std::uint32_t blocks, std::uint64_t every) : PoolWrapper(blocks), every_(every) {}
  [[nodiscard]] std::size_t release(std::span<const BlockId> blocks) noexcept {
    std::size_t n = 0;
    // relaxed: a count; it must not order releases (see the top)
    if (!blocks.empty() && pool_.ref_count(blocks[0]) >= 2 && calls_.fetch_add(1, std::memory_order::relaxed) % every_ == every_ - 1) {
      n += pool_.release(blocks.first(1));
    }
    return n + pool_.release(blocks);
  }

 private:
  std::uint64_t every_;
  std::atomic<std::uint64_t> calls_{0};
};

/// A BlockPool that loses blocks the way a bit left set would: every
/// `every`-th release that would free a block keeps it out of the pool, yet
/// reports it freed and counts it in free_blocks() (its count reads 0). As in a
/// BlockPool whose release forgot to clear the bit, a try_allocate the counter
/// grants then waits for blocks that never come. The count checks pass it; the
/// drain at each pause (every block counted free, taken in one call) hangs on
/// it, and the watchdog must report the stall.
class LeakyPool : public PoolWrapper {
 public:
  LeakyPool(std::uint32_t blocks, std::uint64_t every) : PoolWrapper(blocks), every_(every), leaked_(blocks) {}
  [[nodiscard]] bool try_allocate(std::span<BlockId> out) noexcept {
    if (out.size() > free_blocks()) return false;
    // Granted by the counter: wait for the blocks, as a scan for set bits would.
    while (!pool_.try_allocate(out)) std::this_thread::yield();
    return true;
  }
  [[nodiscard]] std::size_t release(std::span<const BlockId> blocks) noexcept {
    std::size_t n = 0;
    for (const BlockId id : blocks) {
      // A count of 1 is the caller's reference alone: no one else may change it.
      // relaxed: a count of frees; the fault is in the blocks, not in the orders
      if (id < leaked_.size() && pool_.ref_count(id) == 1 && frees_.fetch_add(1, std::memory_order::relaxed) % every_ == every_ - 1) {
        leaked_[id].store(true, std::memory_order::relaxed);     // relaxed: read by ref_count() snapshots only
        leaked_count_.fetch_add(1, std::memory_order::relaxed);  // relaxed: read by free_blocks() snapshots only
        ++n;
        continue;
      }
      n += pool_.release(std::span<const BlockId>(&id, 1));
    }
    return n;
  }
  std::uint32_t free_blocks() const noexcept {
    return pool_.free_blocks() + leaked_count_.load(std::memory_order::relaxed);  // relaxed: a snapshot
  }
  std::uint32_t ref_count(BlockId b) const noexcept {
    return b < leaked_.size() && leaked_[b].load(std::memory_order::relaxed) ? 0 : pool_.ref_count(b);  // relaxed: a snapshot
  }

 private:
  std::uint64_t every_;
  std::atomic<std::uint64_t> frees_{0};
  std::atomic<std::uint32_t> leaked_count_{0};
  std::vector<std::atomic<bool>> leaked_;
};

/// A BlockPool whose every `every`-th try_allocate fails without looking,
/// however many blocks are free (as a reserve that gives up on contention
/// would). Every count stays right; check_failures() must catch it.
class RefusingPool : public PoolWrapper {
 public:
  RefusingPool(std::uint32_t blocks, std::uint64_t every) : PoolWrapper(blocks), every_(every) {}
  [[nodiscard]] bool try_allocate(std::span<BlockId> out) noexcept {
    // relaxed: a count of calls; it must not order anything (see the top)
    if (calls_.fetch_add(1, std::memory_order::relaxed) % every_ == every_ - 1) return false;
    return pool_.try_allocate(out);
  }

 private:
  std::uint64_t every_;
  std::atomic<std::uint64_t> calls_{0};
};

/// A pool right in every count and wrong in every order: BlockPool's scheme
/// (reserve from a free counter, claim bits by CAS, count references), but with
/// every atomic relaxed, so nothing orders a block's last holders' accesses
/// before its next owner's. The count checks pass it; under ThreadSanitizer
/// the payload accesses race (x86-64 keeps them in order anyway, so only
/// ThreadSanitizer can see the fault).
class UnorderedPool {
 public:
  explicit UnorderedPool(std::uint32_t blocks) : blocks_(blocks), words_((blocks + 63) / 64), counts_(blocks), free_(blocks) {
    // Bits past the last block are set for good. Construction: published by the thread start.
    if (blocks % 64 != 0) words_.back().store(~std::uint64_t{0} << (blocks % 64), std::memory_order::relaxed);
  }
  [[nodiscard]] bool try_allocate(std::span<BlockId> out) noexcept {
    const auto want = static_cast<std::uint32_t>(out.size());
    // relaxed, on purpose, as every order of this pool: pairs with nothing (the fault)
    std::uint32_t avail = free_.load(std::memory_order::relaxed);
    do {
      if (avail < want) return false;
    } while (!free_.compare_exchange_weak(avail, avail - want, std::memory_order::relaxed));  // relaxed: the fault
    std::size_t filled = 0;
    for (std::size_t w = 0; filled < want; w = w + 1 == words_.size() ? 0 : w + 1) {
      std::uint64_t cur = words_[w].load(std::memory_order::relaxed);  // relaxed: the fault
      while (cur != ~std::uint64_t{0} && filled < want) {
        const std::uint64_t bit = ~cur & (cur + 1);  // the lowest clear bit
        if (words_[w].compare_exchange_weak(cur, cur | bit, std::memory_order::relaxed)) {  // relaxed: the fault
          const auto id = static_cast<BlockId>(w * 64 + static_cast<std::size_t>(std::countr_zero(bit)));
          counts_[id].store(1, std::memory_order::relaxed);  // relaxed: the fault
          out[filled++] = id;
          cur |= bit;
        }
      }
    }
    return true;
  }
  void retain(std::span<const BlockId> blocks) noexcept {
    for (const BlockId id : blocks) {
      std::uint32_t c = counts_[id].load(std::memory_order::relaxed);  // relaxed: the fault
      while (c != 0 && !counts_[id].compare_exchange_weak(c, c + 1, std::memory_order::relaxed)) {  // relaxed: the fault
      }
    }
  }
  [[nodiscard]] bool try_retain(std::span<const BlockId> blocks) noexcept {
    retain(blocks);  // the harness retains only blocks it holds: never refused
    return true;
  }
  [[nodiscard]] std::size_t release(std::span<const BlockId> blocks) noexcept {
    std::size_t freed = 0;
    for (const BlockId id : blocks) {
      std::uint32_t c = counts_[id].load(std::memory_order::relaxed);  // relaxed: the fault
      while (c != 0 && !counts_[id].compare_exchange_weak(c, c - 1, std::memory_order::relaxed)) {  // relaxed: the fault
      }
      if (c != 1) continue;
      words_[id / 64].fetch_and(~(std::uint64_t{1} << (id % 64)), std::memory_order::relaxed);  // relaxed: the fault
      free_.fetch_add(1, std::memory_order::relaxed);                                             // relaxed: the fault
      ++freed;
    }
    return freed;
  }
  std::size_t invalid_releases() const noexcept { return 0; }
  std::uint32_t total_blocks() const noexcept { return blocks_; }
  std::uint32_t free_blocks() const noexcept { return free_.load(std::memory_order::relaxed); }  // relaxed: a snapshot
  std::uint32_t ref_count(BlockId b) const noexcept { return counts_[b].load(std::memory_order::relaxed); }  // relaxed: a snapshot

 private:
  std::uint32_t blocks_;
  std::vector<std::atomic<std::uint64_t>> words_;
  std::vector<std::atomic<std::uint32_t>> counts_;
  std::atomic<std::uint32_t> free_;
};

template <class Pool>
class PoolRun {
  static constexpr bool kPayload = !std::is_same_v<Pool, OverReleasingPool>;  // see the top

 public:
  template <class... PoolArgs>
  PoolRun(const Config& cfg, Report& r, PoolArgs... pool_args)
      : cfg_(cfg),
        r_(r),
        found_(cfg.max_findings),
        picker_(cfg.mix),
        pool_(static_cast<std::uint32_t>(cfg.capacity), pool_args...),
        tags_(cfg.capacity),
        payload_(cfg.capacity, 0),
        taken_at_(cfg.capacity),
        handles_(std::size_t{cfg.threads} * kHandlesPerThread),
        mailbox_(std::max<std::size_t>(4, 2 * std::size_t{cfg.threads})),
        workers_(cfg.threads),
        drain_(cfg.capacity),
        drained_(cfg.capacity),
        watchdog_(cfg) {
    for (unsigned w = 0; w < cfg.threads; ++w) {
      Worker& me = workers_[w];
      me.rng = thread_rng(cfg.seed, w);
      me.counts = OpCounts(cfg.mix.size());
      // Handles migrate between threads through the mailboxes: any thread may end up with all of them.
      me.held.reserve(handles_.size());
      me.spare.reserve(handles_.size());
      for (std::size_t h = 0; h < kHandlesPerThread; ++h) me.spare.push_back(static_cast<std::uint32_t>(w * kHandlesPerThread + h));
      me.next_group = w + 1;
      // At most max_events operations a thread and epoch (work() pauses then).
      me.allocs.reserve(cfg.max_events);
      me.releases.reserve(cfg.max_events);
    }
  }

  void run() {
    Progress progress(cfg_);
    drive(
        cfg_, r_, progress, found_, stop_, watchdog_, [this](unsigned w, std::uint64_t quota, LiveCount& live) { return work(w, quota, live); },
        [this] { return pause(); });
    std::vector<OpCounts> counts;
    std::uint64_t handoffs = 0, held_at_end = 0;
    for (const auto& w : workers_) {
      counts.push_back(w.counts);
      handoffs += w.handoffs;
    }
    for (std::size_t b = 0; b < tags_.size(); ++b) held_at_end += count_of(tags_[b].load(std::memory_order::relaxed)) > 0;  // relaxed: after the join
    sum_ops(r_, cfg_.mix, counts);
    release_everything();
    check_quiescent("at the end, after every holder released");
    if (!found_.any()) check_drain("at the end");
    std::uint64_t payload_checks = main_payload_checks_;
    for (const auto& w : workers_) payload_checks += w.payload_checks;
    r_.stats = {{"blocks", cfg_.capacity},
                {"blocks_held_before_cleanup", held_at_end},
                {"handoffs", handoffs},
                {"blocks_freed", freed_total()},
                {"payload_checks", payload_checks},
                {"invalid_releases", pool_.invalid_releases()},
                {"failed_allocations_checked", failures_judged_},
                {"drains", drains_},
                {"blocks_drained", blocks_drained_}};
    if (r_.epochs > 1) {
      r_.notes.push_back("quiescent checks at " + std::to_string(r_.epochs) + " pauses, one every " + std::to_string(cfg_.max_events) +
                         " operations per thread");
    }
    found_.finish(r_);
  }

 private:
  // One try_allocate or release of an epoch, for check_failures().
  struct AllocEvent {
    std::uint64_t start, end;
    std::uint32_t k;
    bool ok;
  };
  struct ReleaseEvent {
    std::uint64_t end;
    std::uint64_t freed;  // what release() returned
  };

  struct alignas(64) Worker {
    std::vector<std::uint32_t> held, spare;  // handle indices
    std::vector<AllocEvent> allocs;          // this epoch's, reserved up front
    std::vector<ReleaseEvent> releases;
    std::mt19937_64 rng;
    OpCounts counts;
    std::uint64_t next_group = 0;
    std::uint64_t last_refs = 0;  // last references this thread dropped (tag reached 0)
    std::uint64_t freed = 0;      // blocks release() reported free
    std::uint64_t handoffs = 0;
    std::uint64_t payload_checks = 0;  // payload reads checked
  };

  std::uint64_t freed_total() const {
    std::uint64_t n = main_freed_;
    for (const auto& w : workers_) n += w.freed;
    return n;
  }

  void fail(Violation v) {
    found_.add(std::move(v));
    stop_.store(true);
  }

  bool allocate(Worker& me, unsigned w) {
    const std::uint32_t h = me.spare.back();
    Handle& hd = handles_[h];
    const std::size_t k = 1 + me.rng() % kMaxBatch;
    hd.blocks.fill(kPoison);
    const std::span<BlockId> out(hd.blocks.data(), k);
    const std::uint64_t group = me.next_group;
    const std::uint64_t t0 = clock_.tick();
    std::atomic_signal_fence(std::memory_order::seq_cst);  // see check_failures(): the compiler keeps the call between its stamps
    const bool ok = pool_.try_allocate(out);
    std::atomic_signal_fence(std::memory_order::seq_cst);  // as above
    const std::uint64_t t1 = clock_.tick();
    const CallRef call{"try_allocate", group, t0, t1};
    me.allocs.push_back({t0, t1, static_cast<std::uint32_t>(k), ok});
    if (!ok) {
      for (std::size_t i = 0; i < k; ++i) {
        if (hd.blocks[i] != kPoison) {
          fail(make_violation("pool", "try_allocate(" + std::to_string(k) + ")" + at(t0, t1) + " failed but wrote block " + std::to_string(hd.blocks[i]) + " to its output",
                              {hd.blocks[i]}, {call}));
          break;
        }
      }
      return false;
    }
    hd.n = static_cast<std::uint32_t>(k);
    hd.group = group;
    hd.start = t0;
    hd.end = t1;
    me.next_group = (me.next_group + cfg_.threads) & ((std::uint64_t{1} << (64 - kCountBits)) - 1);
    if (me.next_group == 0) me.next_group = w + 1;
    for (std::size_t i = 0; i < k; ++i) {
      const BlockId b = hd.blocks[i];
      if (b >= tags_.size()) {
        fail(make_violation("pool", "try_allocate(" + std::to_string(k) + ")" + at(t0, t1) + " returned block " + std::to_string(b) + ", out of range",
                            {b}, {call}));
        hd.n = static_cast<std::uint32_t>(i);  // keep only the valid prefix
        break;
      }
      std::uint64_t expected = 0;
      // relaxed: the tag's own modification order is the check; an acquire
      // would order the last holder's payload read before our write in place of the pool
      if (!tags_[b].compare_exchange_strong(expected, hd.group << kCountBits | 1, std::memory_order::relaxed)) {
        const std::uint64_t s = taken_at_[b].start.load(std::memory_order::relaxed);  // relaxed: reporting only
        const std::uint64_t e = taken_at_[b].end.load(std::memory_order::relaxed);    // relaxed: reporting only
        fail(make_violation("owner",
                            "block " + std::to_string(b) + " handed to owner " + std::to_string(hd.group) + " by try_allocate(" + std::to_string(k) + ")" +
                                at(t0, t1) + " while owner " + std::to_string(group_of(expected)) + " (allocated" + at(s, e) + ") holds " +
                                std::to_string(count_of(expected)) + " reference(s)",
                            {b}, {{"try_allocate", group_of(expected), s, e}, call}));
        continue;
      }
      taken_at_[b].start.store(t0, std::memory_order::relaxed);  // relaxed: reporting only
      taken_at_[b].end.store(t1, std::memory_order::relaxed);    // relaxed: reporting only
      if constexpr (kPayload) payload_[b] = content(hd.group, b);  // plain: after the last holder's reads only by the pool's orders
      if (pool_.ref_count(b) == 0) {
        fail(make_violation("refcount", "block " + std::to_string(b) + " allocated by try_allocate" + at(t0, t1) + " has reference count 0", {b}, {call}));
      }
    }
    me.spare.pop_back();
    me.held.push_back(h);
    return true;
  }

  // A holder reads block b's payload (plain, as a user reads its KV data): it
  // must be what the allocation of h's group wrote.
  void check_payload(std::uint64_t& checks, BlockId b, const Handle& h, const char* op, std::uint64_t t0, std::uint64_t t1) {
    if constexpr (!kPayload) return;
    ++checks;
    if (const std::uint64_t got = payload_[b]; got != content(h.group, b)) {
      fail(make_violation("payload",
                          "block " + std::to_string(b) + " held by owner " + std::to_string(h.group) + " (got it" + at(h.start, h.end) + ") has content " +
                              std::to_string(got) + " before its " + op + ", not what its allocation wrote",
                          {b}, {{"acquire", h.group, h.start, h.end}, {op, h.group, t0, t1}}));
    }
  }

  bool share(Worker& me) {
    const std::uint32_t src = me.held[me.rng() % me.held.size()];
    const std::uint32_t dst = me.spare.back();
    const Handle& s = handles_[src];
    // Half the shares through try_retain: it must take every reference, as
    // retain does, since the caller holds each block.
    const bool all_or_nothing = me.rng() & 1;
    const char* op = all_or_nothing ? "try_retain" : "retain";
    const std::uint64_t t0 = clock_.tick();
    bool took = true;
    if (all_or_nothing) {
      took = pool_.try_retain(s.span());
    } else {
      pool_.retain(s.span());
    }
    const std::uint64_t t1 = clock_.tick();
    const CallRef call{op, s.group, t0, t1};
    if (!took) {
      fail(make_violation("pool", "try_retain of " + std::to_string(s.n) + " blocks held by owner " + std::to_string(s.group) + at(t0, t1) + " failed",
                          {}, {{"acquire", s.group, s.start, s.end}, call}));
      return false;
    }
    for (std::size_t i = 0; i < s.n; ++i) {
      const BlockId b = s.blocks[i];
      check_payload(me.payload_checks, b, s, op, t0, t1);
      std::uint64_t cur = tags_[b].load(std::memory_order::relaxed);  // relaxed: as the CAS below
      for (;;) {
        if (group_of(cur) != s.group || count_of(cur) == 0) {
          fail(make_violation("owner",
                              "block " + std::to_string(b) + " shared by owner " + std::to_string(s.group) + " (" + op + at(t0, t1) +
                                  ") but its tag names owner " + std::to_string(group_of(cur)) + " with " + std::to_string(count_of(cur)) + " reference(s)",
                              {b}, {{"acquire", s.group, s.start, s.end}, call}));
          break;
        }
        // relaxed: as in allocate(), the tag's modification order is the check
        if (tags_[b].compare_exchange_weak(cur, cur + 1, std::memory_order::relaxed)) break;
      }
      // src and the new share are both ours until we release one of them.
      if (const auto c = pool_.ref_count(b); c < 2) {
        fail(make_violation("refcount", "block " + std::to_string(b) + " has reference count " + std::to_string(c) + " after " + op + at(t0, t1) +
                                            " while its owner holds two references",
                            {b}, {call}));
      }
    }
    Handle& d = handles_[dst];
    d = s;
    d.start = t0;
    d.end = t1;
    me.spare.pop_back();
    // Half the shares go to whichever thread finds them: releases then race
    // on the same blocks from different threads.
    if (me.rng() & 1) {
      std::uint32_t empty = 0;
      // (1) release: publishes the handle's blocks and group to the acquire in (2)
      if (mailbox_[me.rng() % mailbox_.size()].compare_exchange_strong(empty, dst + 1, std::memory_order::release, std::memory_order::relaxed)) {
        ++me.handoffs;
        return true;
      }
    }
    me.held.push_back(dst);
    return true;
  }

  // Drops one reference of each block of handle h (owned by the caller);
  // logs the call in `log` (a worker's, during an epoch).
  void release_handle(std::uint32_t h, std::uint64_t& last_refs, std::uint64_t& freed, std::uint64_t& checks,
                      std::vector<ReleaseEvent>* log = nullptr) {
    const Handle& hd = handles_[h];
    const std::uint64_t now = clock_.now();
    for (std::size_t i = 0; i < hd.n; ++i) {
      const BlockId b = hd.blocks[i];
      check_payload(checks, b, hd, "release", now, now);
      std::uint64_t cur = tags_[b].load(std::memory_order::relaxed);  // relaxed: as the CAS below
      for (;;) {
        if (group_of(cur) != hd.group || count_of(cur) == 0) {
          fail(make_violation("owner",
                              "owner " + std::to_string(hd.group) + " releasing block " + std::to_string(b) + " (got it" + at(hd.start, hd.end) +
                                  ") finds its tag naming owner " + std::to_string(group_of(cur)) + " with " + std::to_string(count_of(cur)) + " reference(s)",
                              {b}, {{"acquire", hd.group, hd.start, hd.end}, {"release", hd.group, now, now}}));
          break;
        }
        const std::uint64_t next = count_of(cur) == 1 ? 0 : cur - 1;
        // relaxed: as in allocate(); the pool's release must order our payload read
        if (tags_[b].compare_exchange_weak(cur, next, std::memory_order::relaxed)) {
          last_refs += next == 0;
          break;
        }
      }
    }
    const std::uint64_t t0 = clock_.tick();
    std::atomic_signal_fence(std::memory_order::seq_cst);  // see check_failures(): the compiler keeps the call between its stamps
    const std::size_t n = pool_.release(hd.span());
    std::atomic_signal_fence(std::memory_order::seq_cst);  // as above
    const std::uint64_t t1 = clock_.tick();
    if (log) log->push_back({t1, n});
    freed += n;
    if (n > hd.n) {
      fail(make_violation("pool", "release of " + std::to_string(hd.n) + " blocks" + at(t0, t1) + " reported " + std::to_string(n) + " freed", {},
                          {{"release", hd.group, t0, t1}}));
    }
  }

  bool release(Worker& me) {
    std::atomic<std::uint32_t>& slot = mailbox_[me.rng() % mailbox_.size()];
    // relaxed: a look only; an exchange of an empty slot would still acquire
    // the last poster's history (its release sequence) and order more than the handoff
    std::uint32_t got = slot.load(std::memory_order::relaxed);
    // (2) acquire: pairs with the release in (1), the handle's contents are visible
    if (got != 0) got = slot.exchange(0, std::memory_order::acquire);
    std::uint32_t h;
    if (got != 0) {
      h = got - 1;
    } else if (!me.held.empty()) {
      const std::size_t i = me.rng() % me.held.size();
      h = me.held[i];
      me.held[i] = me.held.back();
      me.held.pop_back();
    } else {
      return false;
    }
    release_handle(h, me.last_refs, me.freed, me.payload_checks, &me.releases);
    me.spare.push_back(h);
    return true;
  }

  std::uint64_t work(unsigned w, std::uint64_t quota, LiveCount& live) {
    Worker& me = workers_[w];
    std::uint64_t done = 0;
    // relaxed: a request to stop soon; the barrier after this epoch publishes everything else
    while (done < quota && !stop_.load(std::memory_order::relaxed)) {
      if (done >= cfg_.max_events) {  // time for a quiescent check
        stop_.store(true);
        break;
      }
      std::size_t op = picker_.pick(me.rng);
      // Fall back when the op has nothing to work on.
      if (op == kAllocate && me.spare.empty()) op = kRelease;
      if (op == kShare && (me.held.empty() || me.spare.empty())) op = me.spare.empty() ? kRelease : kAllocate;
      live.begin(op);
      bool ok = false;
      switch (op) {
        case kAllocate: ok = allocate(me, w); break;
        case kShare: ok = share(me); break;
        default: ok = release(me); break;
      }
      me.counts.add(op, ok);
      live.ops.store(++done, std::memory_order::relaxed);  // relaxed: a statistic for the progress line
    }
    return done;
  }

  void check_quiescent(const std::string& when) {
    const std::uint64_t now = clock_.tick();
    std::uint64_t held = 0;
    for (std::size_t b = 0; b < tags_.size(); ++b) {
      const std::uint64_t tag = tags_[b].load(std::memory_order::relaxed);  // relaxed: threads are parked at the barrier
      held += count_of(tag) > 0;
      const std::uint32_t c = pool_.ref_count(static_cast<BlockId>(b));
      if (c != count_of(tag)) {
        found_.add(make_violation("refcount",
                                  "block " + std::to_string(b) + " has reference count " + std::to_string(c) + " " + when + ", but its owner " +
                                      std::to_string(group_of(tag)) + " holds " + std::to_string(count_of(tag)),
                                  {b}, {{"ref_count", b, now, now}}));
      }
    }
    if (pool_.free_blocks() + held != pool_.total_blocks()) {
      found_.add(make_violation("pool",
                                "free_blocks() " + std::to_string(pool_.free_blocks()) + " + held " + std::to_string(held) + " != total " +
                                    std::to_string(pool_.total_blocks()) + " " + when,
                                {}, {{"free_blocks", 0, now, now}}));
    }
    std::uint64_t last_refs = main_last_refs_;
    for (const auto& w : workers_) last_refs += w.last_refs;
    if (last_refs != freed_total()) {
      found_.add(make_violation("pool",
                                "release() reported " + std::to_string(freed_total()) + " blocks freed but owners dropped " + std::to_string(last_refs) +
                                    " last references " + when,
                                {}, {{"release", 0, now, now}}));
    }
    if (const auto bad = pool_.invalid_releases(); bad != 0) {
      found_.add(make_violation("pool", "invalid_releases() is " + std::to_string(bad) + " " + when + " though the harness made no bad call", {},
                                {{"invalid_releases", 0, now, now}}));
    }
  }

  // Every block free_blocks() counts must be one that a try_allocate can take:
  // a block counted free whose bit stayed set would make try_allocate scan
  // forever, and the count checks cannot see it. With every worker parked,
  // take all of them in one call (under the watchdog, which reports a call
  // that never returns), check that they are exactly the blocks no owner
  // holds, and release them again.
  void check_drain(const std::string& when) {
    const std::uint32_t free = pool_.free_blocks();
    const std::span<BlockId> out(drain_.data(), free);
    const std::uint64_t t0 = clock_.tick();
    watchdog_.arm([] { return std::uint64_t{0}; },
                  [free, when] {
                    return "try_allocate(" + std::to_string(free) + ") on the main thread " + when +
                           ", taking every block free_blocks() counts with every worker parked, never returned: blocks counted free that "
                           "no allocation can take";
                  });
    const bool ok = pool_.try_allocate(out);
    watchdog_.disarm();
    const std::uint64_t t1 = clock_.tick();
    const CallRef call{"try_allocate", free, t0, t1};
    if (!ok) {
      found_.add(make_violation("pool", "try_allocate(" + std::to_string(free) + ")" + at(t0, t1) + " " + when +
                                            " failed, though free_blocks() was " + std::to_string(free) + " and no other call was in flight",
                                {}, {call}));
      return;
    }
    std::fill(drained_.begin(), drained_.end(), 0);
    for (const BlockId b : out) {
      if (b >= tags_.size() || drained_[b] != 0 || count_of(tags_[b].load(std::memory_order::relaxed)) != 0) {  // relaxed: workers are parked
        const std::string why = b >= tags_.size() ? "out of range" : drained_[b] != 0 ? "twice" : "though an owner holds it";
        found_.add(make_violation("owner", "try_allocate(" + std::to_string(free) + ")" + at(t0, t1) + " " + when + " returned block " +
                                               std::to_string(b) + " " + why,
                                  {b}, {call}));
        return;  // the pool is broken: leave its blocks where they are
      }
      drained_[b] = 1;
    }
    ++drains_;
    blocks_drained_ += free;
    const std::size_t freed = pool_.release(out);
    if (freed != free || pool_.free_blocks() != free) {
      found_.add(make_violation("pool", "releasing the " + std::to_string(free) + " blocks drained " + when + " freed " + std::to_string(freed) +
                                            " and left free_blocks() at " + std::to_string(pool_.free_blocks()),
                                {}, {call}));
    }
  }

  // try_allocate(k) may fail only when fewer than k blocks are free at the
  // moment of the call (block_pool.hpp). During failure F, at any moment,
  // at least this many were free: those free when the epoch began, less the
  // blocks of successful allocations begun before F ended, plus the blocks
  // that releases ended before F began reported freed (shares move no
  // block in or out). Sound where an atomic read-modify-write is a full fence
  // (x86): the stamps are relaxed on purpose (see the top), so elsewhere
  // nothing keeps the pool's loads between a call's two stamps in the
  // hardware. The signal fences around the calls keep them there in the
  // compiler (which may otherwise move relaxed accesses of an inlined pool
  // across the relaxed stamps); they order nothing between threads.
  void check_failures() {
#if TGI_STRESS_JUDGES_FAILED_ALLOCATIONS
    std::vector<std::pair<std::uint64_t, std::uint64_t>> taken, freed;  // (stamp, blocks): allocation starts, release ends
    for (const auto& w : workers_) {
      for (const AllocEvent& a : w.allocs) {
        if (a.ok) taken.push_back({a.start, a.k});
      }
      for (const ReleaseEvent& r : w.releases) freed.push_back({r.end, r.freed});
    }
    // Sorted by stamp, with running sums: the blocks of the events below a stamp.
    const auto prefix = [](std::vector<std::pair<std::uint64_t, std::uint64_t>>& v) {
      std::sort(v.begin(), v.end());
      for (std::size_t i = 1; i < v.size(); ++i) v[i].second += v[i - 1].second;
    };
    const auto blocks_below = [](const std::vector<std::pair<std::uint64_t, std::uint64_t>>& v, std::uint64_t x) -> std::uint64_t {
      const auto it = std::lower_bound(v.begin(), v.end(), std::pair<std::uint64_t, std::uint64_t>{x, 0});
      return it == v.begin() ? 0 : std::prev(it)->second;
    };
    prefix(taken);
    prefix(freed);
    for (const auto& w : workers_) {
      for (const AllocEvent& a : w.allocs) {
        if (a.ok) continue;
        ++failures_judged_;
        const std::uint64_t gone = blocks_below(taken, a.end), back = blocks_below(freed, a.start);
        if (gone > free_at_epoch_start_ + back || free_at_epoch_start_ + back - gone < a.k) continue;
        found_.add(make_violation("pool",
                                  "try_allocate(" + std::to_string(a.k) + ")" + at(a.start, a.end) + " failed, but at least " +
                                      std::to_string(free_at_epoch_start_ + back - gone) + " blocks were free throughout it (" +
                                      std::to_string(free_at_epoch_start_) + " free when the epoch began, " + std::to_string(back) +
                                      " freed by releases ended before it began, " + std::to_string(gone) +
                                      " taken by allocations begun before it ended)",
                                  {}, {{"try_allocate", 0, a.start, a.end}}));
      }
    }
#endif
    for (auto& w : workers_) {
      w.allocs.clear();
      w.releases.clear();
    }
  }

  bool pause() {
    check_failures();
    check_quiescent("at a pause");
    if (!found_.any()) check_drain("at a pause");
    free_at_epoch_start_ = pool_.free_blocks();  // exact: every worker is parked
    return !found_.any();
  }

  void release_everything() {
    for (auto& slot : mailbox_) {
      // (2') acquire: as (2)
      if (const std::uint32_t got = slot.exchange(0, std::memory_order::acquire); got != 0) {
        release_handle(got - 1, main_last_refs_, main_freed_, main_payload_checks_);
      }
    }
    for (auto& w : workers_) {
      for (const std::uint32_t h : w.held) release_handle(h, main_last_refs_, main_freed_, main_payload_checks_);
      w.held.clear();
    }
  }

  struct TakenAt {
    std::atomic<std::uint64_t> start{0}, end{0};
  };

  const Config& cfg_;
  Report& r_;
  Collector found_;
  OpPicker picker_;
  Pool pool_;
  StampClock clock_;
  std::atomic<bool> stop_{false};
  std::vector<std::atomic<std::uint64_t>> tags_;  // the owner tags (see the top)
  std::vector<std::uint64_t> payload_;            // plain, one word a block (see the top)
  std::vector<TakenAt> taken_at_;                 // the call that last allocated each block, for reports
  std::vector<Handle> handles_;
  std::vector<std::atomic<std::uint32_t>> mailbox_;  // handle + 1, or 0: shares on their way to another thread
  std::vector<Worker> workers_;
  std::uint64_t main_last_refs_ = 0, main_freed_ = 0, main_payload_checks_ = 0;
  std::uint64_t drains_ = 0, blocks_drained_ = 0;  // check_drain's, for the stats
  std::uint64_t failures_judged_ = 0;              // failed try_allocates check_failures() judged
  std::uint64_t free_at_epoch_start_ = cfg_.capacity;
  std::vector<BlockId> drain_;       // check_drain's output
  std::vector<std::uint8_t> drained_;  // check_drain: blocks seen
  Watchdog watchdog_;                // the epochs' and check_drain's
};

}  // namespace

void run_pool_target(const Config& cfg, Report& r) {
  if (cfg.capacity > scheduling::kMaxBlocks) throw std::invalid_argument("capacity above kMaxBlocks");
  if (cfg.target == Target::BrokenPool) {
    PoolRun<OverReleasingPool>(cfg, r, cfg.drop_every).run();
  } else if (cfg.target == Target::BrokenPoolBits) {
    PoolRun<LeakyPool>(cfg, r, cfg.drop_every).run();
  } else if (cfg.target == Target::BrokenPoolRefusing) {
    PoolRun<RefusingPool>(cfg, r, cfg.drop_every).run();
  } else if (cfg.target == Target::BrokenPoolOrder) {
    PoolRun<UnorderedPool>(cfg, r).run();
  } else {
    PoolRun<BlockPool>(cfg, r).run();
  }
}

}  // namespace tgi_gtc::stress::detail
