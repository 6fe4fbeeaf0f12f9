// Private: the two structures the Engine shares between its serving loop and
// producer threads. Everything else in the engine belongs to the loop alone.
//
//   TaskSlot[]    one per running or paused task: who occupies it, and a
//                 cancel request a producer may post to it.
//   ActiveIndex   TaskId -> slot for the running and paused tasks.
//
// Both have one writer (the serving loop) and any number of readers, and
// readers never wait for the writer, but for one window: a cancel of the very
// task the loop is taking out of the waiting queue waits for that take's
// outcome (S3). A producer's cancel(id) reads the index
// to find the slot, checks the slot still holds `id` (which also yields the
// occupant's stamp), and posts the stamp to the slot; step() acts on posted
// stamps that match the slot's occupant. Stamps are unique for the engine's
// lifetime (a 64-bit counter), so a stale post never hits a later occupant.
#pragma once

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <thread>

#include <tgi_gtc/scheduling/task.hpp>

#include "cpu_relax.hpp"

namespace tgi_gtc::scheduling::detail {

// ---------------------------------------------------------------------------
// TaskSlot: the shared part of one running/paused task record.
//
//   { id: u64 | stamp: u64 | cancel: u64 | taking: u64 }   32 bytes
//
//   transition                       thread     how
//   vacant(stamp 0) -> occupied(s)   loop       id.store, taking = s, then stamp.store(s)  (release)
//   taking s        -> 0             loop       its take out of waiting_ succeeded (release)
//   taking s        -> s | failed    loop       the take failed, before stamp.store(0) (release)
//   occupied(s)     -> vacant        loop       stamp.store(0) (release)
//   cancel c        -> s             producer   CAS, only while stamp == s (checked just before)
//
// Invariants
//   S1 A stamp value is written to a slot at most once (stamps are unique), so
//      reading the same nonzero stamp before and after reading `id` proves the
//      id belongs to that occupant: a new occupant would have stored 0 and a
//      new stamp in between, and a reader that saw its id (release/acquire)
//      would also see the 0 or the new stamp.
//   S2 `cancel` holds the stamp of the last occupant some producer asked to
//      cancel (or 0); the loop compares it with the occupant's stamp, so stale
//      posts are inert and need no clearing.
//   S3 `taking` == s while the loop has registered occupant s but not yet
//      learned whether its take out of waiting_ succeeded. A producer's cancel
//      waits that out and posts only to an occupant that ran (ran()): if
//      another cancel removed the task from waiting_ first, the take fails,
//      and a post would report as live a task that was already cancelled.
struct TaskSlot {
  std::atomic<std::uint64_t> id{0};
  std::atomic<std::uint64_t> stamp{0};
  std::atomic<std::uint64_t> cancel{0};
  std::atomic<std::uint64_t> taking{0};

  /// `taking` of an occupant whose take out of waiting_ failed.
  static constexpr std::uint64_t kTakeFailed = std::uint64_t{1} << 63;

  /// Loop: publishes a new occupant, whose take out of waiting_ is pending.
  void occupy(TaskId task, std::uint64_t s) noexcept {
    id.store(task, std::memory_order::release);      // (T1) read by (T4), once (T3) read (T2)
    taking.store(s, std::memory_order::release);     // (K1) pairs with (K3): a reader of it sees the vacate before
    stamp.store(s, std::memory_order::release);      // (T2) pairs with (T3) and (C1): publishes (T1) and (K1)
  }
  /// Loop: the take out of waiting_ succeeded (it runs) or failed; on
  /// failure call this before vacate().
  void taken(std::uint64_t s, bool ok) noexcept {
    taking.store(ok ? 0 : s | kTakeFailed, std::memory_order::release);  // (K2) pairs with (K3)
  }
  /// Loop: the occupant left.
  void vacate() noexcept {
    stamp.store(0, std::memory_order::release);  // (T2') read by (T3)/(T5)/(C1)/(K4): ends the occupancy
  }
  /// Any thread: whether occupant `s` (a stamp from stamp_of) was taken out
  /// of waiting_ and is still here. Waits while the loop is taking it (S3): a
  /// few instructions of the loop, unless the loop stalls right there.
  bool ran(std::uint64_t s) const noexcept {
    std::uint64_t t = 0;
    for (unsigned spins = 0; (t = taking.load(std::memory_order::acquire)) == s; ++spins) {  // (K3) pairs with (K1)/(K2)
      if (spins < 64) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
    if (t == (s | kTakeFailed)) return false;
    // t is 0 from s's own take, or a later occupant's word; in that case its
    // occupy (K1) follows s's vacate, so (K4) sees the slot left.
    return stamp.load(std::memory_order::acquire) == s;  // (K4) ordered after (K3)
  }
  /// Any thread: the stamp of the occupant if it is `task`, else 0.
  std::uint64_t stamp_of(TaskId task) const noexcept {
    const std::uint64_t s1 = stamp.load(std::memory_order::acquire);  // (T3) pairs with (T2): id visible
    if (s1 == 0) return 0;
    const std::uint64_t who = id.load(std::memory_order::acquire);  // (T4) pairs with (T1) of a later occupant: then (T5) sees its (T2')
    const std::uint64_t s2 = stamp.load(std::memory_order::acquire);  // (T5) ordered after (T4) by its acquire
    return (s1 == s2 && who == task) ? s1 : 0;
  }
  /// What post_cancel() did.
  enum class Post { kPosted, kAlreadyPosted, kLeft };
  /// Any thread: asks the loop to cancel occupant `s`. kPosted for the one
  /// call that posts it (one CAS decides, so exactly one caller a
  /// cancellation); kAlreadyPosted if another call did; kLeft if `s` has left.
  Post post_cancel(std::uint64_t s) noexcept {
    // (C0) acquire pairs with another caller's (C2): when it reads a post for
    // a later occupant, our (C1) then sees `s`'s vacate, which happened-before
    // that caller's (C1). Without it, (C1) could still read `s` and the CAS
    // overwrite that post, which would then be lost.
    std::uint64_t cur = cancel.load(std::memory_order::acquire);
    for (;;) {
      if (cur == s) return Post::kAlreadyPosted;
      // A different value is a stale post (or a post for a later occupant, in
      // which case ours has left): replace it only while `s` still occupies.
      // (C1) pairs with (T2'), occupant left, and with (T2): a caller whose
      // (C1) read a later occupant's stamp has its vacate before its (C2).
      if (stamp.load(std::memory_order::acquire) != s) return Post::kLeft;
      // (C2) release pairs with the loop's (C3) and with (C0) (also the
      // failure load's acquire: a reload is a (C0)).
      if (cancel.compare_exchange_weak(cur, s, std::memory_order::acq_rel, std::memory_order::acquire)) {
        return Post::kPosted;
      }
    }
  }
  /// Loop: was occupant `s` asked to leave?
  bool cancel_posted(std::uint64_t s) const noexcept {
    return cancel.load(std::memory_order::acquire) == s;  // (C3) pairs with (C2)
  }
};
static_assert(sizeof(TaskSlot) == 32, "two slots per cache line");

// ---------------------------------------------------------------------------
// ActiveIndex: TaskId -> slot, one writer (the serving loop), lock-free
// readers. Linear probing with tombstones; two tables so that the writer can
// drop tombstones by rebuilding the idle table and switching to it, while
// readers retry if a switch happened during their probe (a seqlock without
// the odd "writing" state: readers never wait, the writer never blocks).
// The retry check follows Boehm, "Can Seqlocks Get Along With Programming
// Language Memory Models?" (MSPC 2012), with acquire loads on the data.
//
//   gen_ [own line]                 generation g: tables_[g & 1] is live
//   tables_[0], tables_[1]          C = 2^k entries each, C >= 2 x max_live
//     entry { key: u64 | tag: u32 }  tag 0 = empty, kTomb = erased, else slot + 1
//
//   entry transition           thread  when
//   empty -> slot(key)         loop    insert: key, then tag (release)
//   tomb  -> slot(key)         loop    insert reuses the first tombstone of its run
//   slot  -> tomb              loop    erase
//   any   -> empty / slot      loop    rebuild of the idle table, then gen_ + 1
//
// Invariants
//   A1 In the live table an entry never becomes empty and a key never moves,
//      so while a key is present every entry between its home and its own is
//      non-empty: a probe from the home reaches it before any empty entry.
//   A2 The writer changes the idle table only in a rebuild, after the
//      generation that retired it was published; a reader that sees any such
//      write (release/acquire) therefore reads a newer gen_ afterwards and
//      retries. So a probe whose generation did not change read one live
//      table through single-entry updates only, and A1 applies.
//   A3 Live entries + tombstones <= 3/4 C in the live table (the writer
//      rebuilds before an insert would exceed it), and live <= C/2: probes
//      end, and a rebuild is followed by at least C/4 inserts before the next.
class ActiveIndex {
 public:
  static constexpr std::uint32_t kNone = ~std::uint32_t{0};

  explicit ActiveIndex(std::uint32_t max_live)
      : mask_(std::bit_ceil(std::uint64_t{max_live} * 2 + 2) - 1),
        shift_(64 - std::countr_zero(mask_ + 1)),
        limit_((mask_ + 1) / 4 * 3) {
    for (auto& t : tables_) t = std::make_unique<Entry[]>(mask_ + 1);
  }

  /// Loop: adds `key` (absent) -> slot.
  void insert(TaskId key, std::uint32_t slot) noexcept {
    if (used_ + 1 > limit_) rebuild();
    Entry* t = live();
    std::uint64_t i = home(key);
    std::uint64_t tomb = ~std::uint64_t{0};
    for (;; i = (i + 1) & mask_) {
      // relaxed: the writer reads its own writes.
      const std::uint32_t tag = t[i].tag.load(std::memory_order::relaxed);
      if (tag == kEmpty) break;
      if (tag == kTomb && tomb == ~std::uint64_t{0}) tomb = i;
    }
    if (tomb != ~std::uint64_t{0}) {
      i = tomb;
    } else {
      ++used_;
    }
    ++live_count_;
    t[i].key.store(key, std::memory_order::release);     // (I1) pairs with (R2): with (R3), a reused entry reads consistently
    t[i].tag.store(slot + 1, std::memory_order::release);  // (I2) pairs with (R1): publishes (I1)
  }

  /// Loop: removes `key` (present).
  void erase(TaskId key) noexcept {
    Entry* t = live();
    const std::uint64_t i = find_entry(t, key);
    if (i == kNotFound) return;
    t[i].tag.store(kTomb, std::memory_order::release);  // (I3) pairs with (R1)/(R3)
    --live_count_;
  }

  /// Loop: the slot of `key`, or kNone.
  std::uint32_t find_local(TaskId key) const noexcept {
    const Entry* t = live();
    const std::uint64_t i = find_entry(t, key);
    // relaxed: the writer reads its own writes.
    return i == kNotFound ? kNone : t[i].tag.load(std::memory_order::relaxed) - 1;
  }

  /// Any thread: the slot of `key`, or kNone. Lock-free: retries only when
  /// the writer switched tables during the probe.
  std::uint32_t find(TaskId key) const noexcept {
    for (;;) {
      const std::uint64_t g1 = gen_.load(std::memory_order::acquire);  // (G1) pairs with (G0): the table is built
      const Entry* t = tables_[g1 & 1].get();
      std::uint32_t found = kNone;
      std::uint64_t i = home(key);
      for (std::uint64_t n = 0; n <= mask_; ++n, i = (i + 1) & mask_) {
        const std::uint32_t tag = t[i].tag.load(std::memory_order::acquire);  // (R1) pairs with (I2)/(I3)
        if (tag == kEmpty) break;
        if (tag == kTomb) continue;
        const std::uint64_t k = t[i].key.load(std::memory_order::acquire);  // (R2) pairs with (I1)
        if (k != key) continue;
        // (R3) pairs with (I3): the key read belongs to this tag unless the
        // entry was erased (and perhaps reused) meanwhile.
        if (t[i].tag.load(std::memory_order::acquire) != tag) continue;
        found = tag - 1;
        break;
      }
      const std::uint64_t g2 = gen_.load(std::memory_order::acquire);  // (G2) after the probe (acquire loads above): A2
      if (g1 == g2) return found;
    }
  }

 private:
  struct Entry {
    std::atomic<std::uint64_t> key{0};
    std::atomic<std::uint32_t> tag{0};
  };
  static constexpr std::uint32_t kEmpty = 0;
  static constexpr std::uint32_t kTomb = ~std::uint32_t{0};
  static constexpr std::uint64_t kNotFound = ~std::uint64_t{0};

  std::uint64_t home(TaskId key) const noexcept {
    // Fibonacci hashing: sequential ids spread over the table.
    return (key * 0x9E3779B97F4A7C15ULL) >> shift_ & mask_;
  }
  Entry* live() noexcept { return tables_[gen_local_ & 1].get(); }
  const Entry* live() const noexcept { return tables_[gen_local_ & 1].get(); }

  std::uint64_t find_entry(const Entry* t, TaskId key) const noexcept {
    std::uint64_t i = home(key);
    for (std::uint64_t n = 0; n <= mask_; ++n, i = (i + 1) & mask_) {
      // relaxed: the writer reads its own writes.
      const std::uint32_t tag = t[i].tag.load(std::memory_order::relaxed);
      if (tag == kEmpty) break;
      if (tag != kTomb && t[i].key.load(std::memory_order::relaxed) == key) return i;
    }
    return kNotFound;
  }

  // Copies the live entries into the idle table, then makes it live.
  void rebuild() noexcept {
    const Entry* from = live();
    Entry* to = tables_[(gen_local_ + 1) & 1].get();
    for (std::uint64_t i = 0; i <= mask_; ++i) {
      to[i].tag.store(kEmpty, std::memory_order::release);  // (I3') pairs with (R1): a stale reader retries (A2)
    }
    for (std::uint64_t i = 0; i <= mask_; ++i) {
      // relaxed: the writer reads its own writes.
      const std::uint32_t tag = from[i].tag.load(std::memory_order::relaxed);
      if (tag == kEmpty || tag == kTomb) continue;
      const TaskId key = from[i].key.load(std::memory_order::relaxed);
      std::uint64_t j = home(key);
      while (to[j].tag.load(std::memory_order::relaxed) != kEmpty) j = (j + 1) & mask_;
      to[j].key.store(key, std::memory_order::release);  // (I1) as in insert
      to[j].tag.store(tag, std::memory_order::release);  // (I2) as in insert
    }
    ++gen_local_;
    used_ = live_count_;
    gen_.store(gen_local_, std::memory_order::release);  // (G0) pairs with (G1)/(G2): the new table is complete
  }

  std::unique_ptr<Entry[]> tables_[2];
  const std::uint64_t mask_;
  const int shift_;
  const std::uint64_t limit_;
  // Writer-only bookkeeping.
  std::uint64_t gen_local_ = 0;
  std::uint64_t used_ = 0;  // live + tombstones in the live table
  std::uint64_t live_count_ = 0;
  // Its own line: alignas starts one, and the class size rounds up to 64.
  alignas(64) std::atomic<std::uint64_t> gen_{0};
};
static_assert(alignof(ActiveIndex) == 64 && sizeof(ActiveIndex) % 64 == 0, "gen_ alone on its line");

}  // namespace tgi_gtc::scheduling::detail
