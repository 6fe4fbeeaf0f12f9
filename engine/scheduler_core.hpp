// Private: the lock-free core behind tgi_gtc::scheduling::Scheduler.
//
// ===========================================================================
// Layout
// ===========================================================================
//
//   count_  [64 B line]   tasks accepted and not yet removed (capacity gate)
//   ids_    [64 B line]   next_id() counter
//   free_   [64 B line]   Treiber stack of free slots, tagged head
//   bump_   [64 B line]   slots never used yet (handed out before the stack)
//
//   slots_[0 .. N+kSlack)      one Slot (48 B) per task in flight:
//        state  = gen:62 | st:2     st: FREE, FILLING, QUEUED, REMOVED
//        id, tokens, meta           the task, written while FILLING
//        ticket                     ring position of the current publish try
//        bucket                     index bucket holding this slot's entry
//
//   rings_[P]   (P = 4 with priority scheduling, 1 without), each:
//        head [64 B line]  tail [64 B line]  cells[C], C = 2^k > N + kSlack
//        cell  = round:38 | occ:1 | slot:25
//              EMPTY(r) = r << 26          OCC(r, s) = r << 26 | 1 << 25 | s
//        ticket t lives in cells[t % C] during round r = t / C.
//
//   index_: open addressing over M = 2^j >= 2 (N + kSlack) buckets
//        bucket = valid:1 | gen:31 | fingerprint:7 | slot:25   (0 = free)
//        reach[h] = how far (in buckets) entries whose home is h may sit.
//
// ===========================================================================
// The ring (after Vyukov's bounded MPMC queue, with the invalidation of
// unpublished cells from Nikolaev's SCQ, "A Scalable, Portable, and
// Memory-Efficient Lock-Free FIFO Queue", DISC 2019)
// ===========================================================================
//
// Producers take a ticket with fetch_add on tail and publish their slot with
// one CAS on the cell. Consumers never wait for a producer: a cell whose
// ticket was taken (ticket < tail) but not yet published is invalidated
// (EMPTY(r) -> EMPTY(r+1)) and its producer retries with a new ticket. That
// keeps next() lock-free and makes "empty" exact: head >= tail.
//
//   cell transition               by        when
//   EMPTY(r)   -> OCC(r, s)       producer  ticket t, round r: publish
//   EMPTY(r')  -> OCC(r, s)       producer  r' older: ticket t - C was never
//                                           published; take the cell over
//   EMPTY(r)   -> EMPTY(r+1)      consumer  ticket taken, not published: skip
//   OCC(r, s)  -> EMPTY(r+1)      whoever   s is REMOVED (taken or cancelled):
//                                           clear; the clearer frees s
//   OCC(r', s) (r' older)         producer  the cell still holds an earlier
//                                           lap's task: abandon this ticket
//
// A consumer at head h (round r) reads cells[h % C]:
//   OCC(r, s), s QUEUED   -> claim s (CAS QUEUED -> REMOVED), clear, head+1
//   OCC(r, s), s REMOVED  -> a cancelled task's tombstone: clear, head+1
//   EMPTY(r), h < tail    -> unpublished ticket: invalidate, head+1
//   round > r             -> the ticket was resolved already: head+1
//
// Invariants
//   R1. head <= tail; every ticket below head is resolved (its cell moved to
//       a later round), so "head >= tail" means the ring holds no task.
//   R2. A cell's round never decreases, so a (round, slot) pair is never
//       seen twice in one cell: a CAS expecting OCC(r, s) cannot succeed on a
//       later incarnation of slot s (no ABA), and a consumer that re-reads
//       OCC(r, s) after reading the slot knows the slot was not reused.
//   R3. Tasks in a ring come out in ticket order, and a producer publishes
//       only at a ticket taken after its previous tries failed, so a task
//       whose schedule() returned precedes every task scheduled later.
//   R4. A slot is in at most one cell, and is freed exactly once: by whoever
//       clears its cell, or by its producer if it was cancelled before any
//       publish succeeded.
//
// ===========================================================================
// Slot states
// ===========================================================================
//
//   FREE(g)    -> FILLING(g)   schedule(): popped from the free list
//   FILLING(g) -> QUEUED(g)    schedule(): fields written, id is unique
//   FILLING(g) -> FREE(g+1)    schedule(): duplicate id, undo
//   QUEUED(g)  -> REMOVED(g)   next()/cancel()/clear(): the claim; exactly
//                              one caller wins it (a CAS)
//   REMOVED(g) -> FREE(g+1)    whoever clears its cell (R4)
//
// A slot's fields are read before the claim CAS and are valid exactly when
// that CAS succeeds from the same (gen, QUEUED) word: fields are written only
// in FILLING, which needs a new generation.
//
// ===========================================================================
// Linearization points
// ===========================================================================
//   schedule   the publish CAS; or, if a cancel() claims the task before it
//              is published, just before that claim.
//   next/peek  the last read of the higher-priority rings' tails, which must
//              equal the tails read when each was seen empty (so none gained
//              a task since), while the candidate was still QUEUED (the claim
//              CAS, or peek's re-read, proves it).
//   cancel     the claim CAS (found), or the last probe (not found).
//   QueueFull  the count read; count_ includes schedules in flight.
// All ring, cell, state and index operations are seq_cst so that these
// points fall in one total order; the few weaker ones are commented.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <system_error>
#include <vector>

#include <tgi_gtc/scheduling/task.hpp>

namespace tgi_gtc::scheduling::detail {

inline constexpr std::size_t kCacheLine = 64;

struct alignas(8) Slot {
  std::atomic<std::uint64_t> state{0};
  std::atomic<std::uint64_t> id{0};
  std::atomic<std::uint64_t> tokens{0};
  std::atomic<std::uint64_t> ticket{0};
  std::atomic<std::uint32_t> bucket{0};
  std::atomic<std::uint32_t> next_free{0};
  // priority | preemptible << 8
  std::atomic<std::uint32_t> meta{0};
};

struct Ring {
  alignas(kCacheLine) std::atomic<std::uint64_t> head{0};
  alignas(kCacheLine) std::atomic<std::uint64_t> tail{0};
  alignas(kCacheLine) std::unique_ptr<std::atomic<std::uint64_t>[]> cells;
  std::uint64_t mask = 0;
  unsigned shift = 0;
};
static_assert(sizeof(Ring) % kCacheLine == 0);

class SchedulerCore {
 public:
  /// Spare slots beyond max_queue_size: a removal decrements count_ before its
  /// slot is back on the free list, so up to kSlack removals may be in flight
  /// before schedule() has to wait for one of them to finish.
  static constexpr std::size_t kSlack = 128;

  explicit SchedulerCore(const SchedulerConfig& config);

  TaskId next_id() noexcept;
  std::error_code schedule(const ScheduledTask& task) noexcept;
  std::optional<ScheduledTask> take(bool remove) noexcept;
  std::optional<ScheduledTask> cancel(TaskId id) noexcept;
  std::vector<ScheduledTask> clear();
  std::size_t len() const noexcept;
  std::size_t memory_bytes() const noexcept { return memory_bytes_; }

 private:
  enum class Take { kGot, kEmpty, kRetry };

  bool reserve() noexcept;
  void unreserve() noexcept;
  std::uint32_t alloc_slot() noexcept;
  void free_slot(std::uint32_t s, std::uint64_t gen) noexcept;

  // Index.
  bool index_insert(TaskId id, std::uint32_t s, std::uint64_t gen, std::uint32_t& bucket) noexcept;
  void index_erase(std::uint32_t bucket, std::uint64_t entry) noexcept;

  // Ring.
  std::size_t ring_of(Priority p) const noexcept;
  void publish(Ring& ring, std::uint32_t s, std::uint64_t gen) noexcept;
  /// One attempt to take (or, with remove == false, read) the first task of
  /// `ring` among tickets below `limit`. `validate` re-checks the rings above.
  /// On kEmpty, `empty_tail` is the tail at which the ring was seen empty.
  template <class Validate>
  Take take_from(Ring& ring, std::uint64_t limit, bool remove, Validate&& validate,
                 std::optional<ScheduledTask>& out, std::uint64_t& empty_tail) noexcept;
  /// After a successful claim of slot s from cell `w` of ticket `t`.
  void finish_take(Ring& ring, std::uint64_t t, std::uint64_t w, std::uint32_t s, std::uint64_t gen,
                   std::uint32_t bucket, TaskId id) noexcept;
  /// Clears a cell holding a REMOVED slot; the winner frees the slot.
  void clear_cell(std::atomic<std::uint64_t>& cell, std::uint64_t w, std::uint64_t round) noexcept;

  ScheduledTask read_task(const Slot& slot) const noexcept;

  SchedulerConfig config_;
  std::size_t capacity_;
  std::size_t slab_size_;
  std::size_t ring_count_;

  alignas(kCacheLine) std::atomic<std::uint64_t> count_{0};
  alignas(kCacheLine) std::atomic<std::uint64_t> ids_{1};
  alignas(kCacheLine) std::atomic<std::uint64_t> free_{0};
  alignas(kCacheLine) std::atomic<std::uint64_t> bump_{0};
  alignas(kCacheLine) Ring rings_[kPriorityCount];

  std::unique_ptr<Slot[]> slots_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> buckets_;
  std::unique_ptr<std::atomic<std::uint32_t>[]> reach_;
  std::uint64_t index_mask_ = 0;
  std::size_t memory_bytes_ = 0;
};

}  // namespace tgi_gtc::scheduling::detail
