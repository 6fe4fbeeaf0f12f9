// Private: the lock-free core behind tgi_gtc::scheduling::Scheduler.
//
// ===========================================================================
// Layout
// ===========================================================================
//
//   count_  [own 64 B line]  tasks accepted and not yet removed (capacity gate)
//   ids_    [own 64 B line]  next_id() counter
//
//   rings_[P] (P = 4 with priority scheduling, 1 without; [0] = highest):
//        head [own line]  tail [own line]  cells[C], C = 2^j >= N + 65
//        cell  = round:37 | occ:1 | bucket:26       (N = max_queue_size)
//              EMPTY(r) = r << 27          OCC(r, b) = r << 27 | 1 << 26 | b
//        ticket t lives in cells[t mod C] during round r = t / C.
//
//   table_[M], M = 2(N + 65): the task slots and the id index in one
//   open-addressing hash table (linear probing, wrapping at M). A task lives
//   in a bucket of the probe range of its id's home bucket
//   h = hash(id) scaled to [0, M):
//        state   = gen:38 | fp:20 | preemptible:1 | priority:2 | st:3
//                  st: FREE, FILLING, QUEUED, TAKEN, CANCELLED
//                  fp: 20 more bits of the id's hash
//        id, tokens                written while FILLING
//        ticket                    the note: the ring's tail read while
//                                  FILLING, then each ticket taken, stored
//                                  before its publish try; a lower bound of
//                                  the task's tickets, above every ticket an
//                                  earlier occupant published at (I8)
//   reach_[h] = how many buckets from h an entry whose home is h may sit in.
//   It only grows (shrinking it would race with claims in flight), so a
//   schedule() or cancel() scans the widest range any id of that home ever
//   needed, and that widens slowly with churn. One thread, capacity 16,384,
//   schedule+next pairs with ids from one counter: mean reach 4.9 buckets
//   after 1 M pairs at depth 10,000, 8.9 after 16 M, 11.1 (max 28) after
//   64 M; 18.7 (max 61) after 16 M at depth 16,000; 7.2 after 3,000 rounds
//   of filling 10,000 and draining. (With runs of 8 consecutive ids on
//   consecutive buckets, as before: 31, 63 and 81 at depth 10,000, 141 at
//   depth 16,000, 50 in the rounds; a pair at depth 10,000 then cost 0.53x
//   as much with per-id homes after 30 M pairs.)
//   Buckets are 32 B and 32-byte aligned: two a line, none across two.
//
//   Prefetches (hints only; nothing depends on them): a schedule() fetches
//   the reach_ and table lines of the home of the id 8 after its own; a producer
//   whose ticket starts a line of cells fetches the next line; a consumer
//   fetches the next line of cells, and the bucket two tickets ahead. Without
//   them, a table larger than the cache costs a miss every few schedules (at
//   capacity 16,384 on the 2-core development box, one thread's p99 per call
//   went from 300-380 ns to 60-125 ns).
//
// ===========================================================================
// The ring (after Vyukov's bounded MPMC queue, with the invalidation of
// unpublished cells from Nikolaev's SCQ, "A Scalable, Portable, and
// Memory-Efficient Lock-Free FIFO Queue", DISC 2019)
// ===========================================================================
//
// Producers take a ticket with fetch_add on tail and publish their bucket with
// one CAS on the cell. Consumers never wait for a producer. A ring whose open
// tickets [head, tail) are all unpublished holds nothing yet: consumers pass
// it by (proving that with a double collect, see next/peek below) and leave
// the producers their tickets. An unpublished ticket with a published task
// behind it (or with more than kOpenWindow tickets open) is invalidated
// (EMPTY(r) -> EMPTY(r+1)) and its producer retries with a new ticket. After
// kOpenWindow such invalidations, a call checks every open ticket however
// many are open, so producers that keep retaking tickets cannot keep it from
// returning. That keeps next() lock-free and FIFO.
// A taken task's cell is not cleared: once head has passed it, the cell is
// stale, and the producer that lands on it one lap later overwrites it.
// Consumers move head. A consumer that finds the ticket at head resolved
// moves head past it and every resolved ticket after it in one CAS, having
// read one cell per ticket passed, at most one lap of cells (skip_resolved).
// Every successful cancel() does the same if the ticket at its ring's head is
// resolved, so schedule() and cancel() alone leave no backlog. A resolved
// ticket is one whose cell shows a later round: it can neither be published
// nor hold a task any more.
// Every cell transition raises the word as an unsigned integer (a higher
// round, or the occupied bit at the same round), until the 37-bit round wraps
// after 2^37 laps of that cell.
//
//   cell transition               by        when
//   EMPTY(r)   -> OCC(r, b)       producer  ticket t, round r: publish
//   EMPTY(r')  -> OCC(r, b)       producer  r' older: that lap's ticket was
//                                           never published; take the cell
//   OCC(r', x) -> OCC(r, b)       producer  r' older and its ticket below head
//                                           (stale: x was taken), or x was
//                                           CANCELLED (steal; free x)
//   EMPTY(r'), OCC(r', x)         consumer  r' <= r, x stale: ticket r taken
//              -> EMPTY(r+1+k)              but not published, and a later open
//                                           ticket is published or more than
//                                           kOpenWindow are open: invalidate, skip
//                                           (k: this cell's tickets of later
//                                           laps below tail, also unpublished;
//                                           0 unless head lags a lap behind)
//   OCC(r, x)  -> EMPTY(r+1)      canceller x CANCELLED: its canceller clears it
//                                 producer  (or its producer, if the canceller
//                                 consumer  read the cell before the publish),
//                                           or the consumer reaching it: free x
//   OCC(r', x) (r' older)         producer  x QUEUED or TAKEN and its ticket
//                                           not below head: abandon the ticket
//
// A consumer at head h (round r) reads cells[h mod C]:
//   OCC(r, b), b QUEUED     -> claim b (QUEUED -> TAKEN), head+1, free b
//   OCC(r, b), b TAKEN      -> another consumer's claim: help head+1
//   OCC(r, b), b CANCELLED  -> a tombstone: clear the cell, free b, head+1
//   EMPTY(r) or any older   -> unpublished ticket (h < tail). If none of the
//   lap's word                 open tickets [h, tail) is published (at most
//                              kOpenWindow = 8 of them, or any number after
//                              kOpenWindow invalidations by this call): the
//                              ring counts as empty, the producers keep their
//                              tickets.
//                              Otherwise (a task waits behind it, or more
//                              are open): invalidate ticket h (and the cell's
//                              later-lap tickets below tail), head+1 (their
//                              producers retry)
//   round > r               -> resolved already: head moves past it and every
//                              resolved ticket after it, in one CAS
//
// ===========================================================================
// Bucket states
// ===========================================================================
//
//   FREE(g)      -> FILLING(g)    schedule(): claimed in the id's probe range
//   FILLING(g)   -> QUEUED(g)     schedule(): fields written, id is unique
//   FILLING(g)   -> FREE(g+1)     schedule(): duplicate id or a same-id race
//   QUEUED(g)    -> TAKEN(g)      next()/clear(): the claim (a CAS)
//   QUEUED(g)    -> CANCELLED(g)  cancel(): the claim (the same word, so
//                                 exactly one of next and cancel wins)
//   TAKEN(g)     -> FREE(g+1)     its taker, once head has passed its cell
//   CANCELLED(g) -> FREE(g+1)     whoever clears or overwrites its cell (one
//                                 CAS decides), or its producer if no publish
//                                 succeeded
//
// Invariants
//   I1. head <= tail; every ticket below head is resolved (its task taken or
//       cleared, or the ticket invalidated), so head >= tail means the ring
//       holds no task, and a cell at head that still shows an earlier lap is
//       stale: that lap's ticket was resolved when head passed it.
//   I2. A cell's round never decreases, so a (round, bucket) pair appears in a
//       cell at most once (no ABA on cell CASes).
//   I3. A bucket referenced by the cell at head is not freed while head stays
//       there: TAKEN ones are freed after head moves past, CANCELLED ones only
//       by a CAS that changes the cell. So a consumer that reads the cell, then
//       the bucket, then finds head and cell unchanged, read that cell's task.
//   I4. Tasks of a ring come out in ticket order, and a producer publishes
//       only at a ticket taken after its earlier tries failed, so a task whose
//       schedule() returned precedes every task scheduled afterwards.
//   I5. Each bucket is freed exactly once per occupant (the rules above).
//   I6. At most one bucket is QUEUED, or FILLING past its check, for an id:
//       inserters claim, then rescan the whole probe range (both seq_cst: the
//       store-buffer argument), and back off on seeing another that is
//       FILLING or not yet published (DuplicateId only for a published one).
//   I7. A bucket's fields are read before the claim CAS (or peek's re-check
//       load) and are valid exactly when that CAS or load finds the same
//       state word: id and tokens are written only while FILLING, which needs
//       a new generation, and with release stores that the readers' acquire
//       loads pair with, so a reader that read a later occupant's field also
//       sees that occupant's claim in its re-check. (The ticket note is
//       written after FILLING too, by publish(); no task read uses it, and
//       its readers rely on I8.)
//   I8. A cancelled task's cell is cleared before its cancel() or its
//       schedule() returns. The producer re-reads the state after its publish
//       CAS; the canceller, after its claim CAS, reads the note (this task's
//       or a later occupant's, never a previous one's: its claim read QUEUED,
//       stored after the first note; a later occupant's shows in the state
//       re-check), the cell it names, and if that is not the task's, tail and
//       the first lap of cells [note, tail). All seq_cst: of [publish CAS;
//       state load] and [claim CAS; tail load; cell loads], one sees the
//       other (the store-buffer argument): the producer sees the claim, or
//       the canceller's tail is past the ticket and its scan reads the
//       publish (the note bounds every ticket from below). So buckets in
//       use <= queued tasks + calls in flight, and M = 2(N + 65) keeps the
//       table about half full at most, whatever the cancel pattern, unless
//       N + 131 or more calls are stalled holding buckets (a stalled
//       schedule() whose task was cancelled holds its CANCELLED bucket):
//       claim_bucket() then finds no free bucket in two whole laps and
//       schedule() reports QueueFull instead of spinning (claims and frees
//       racing the probe in a hostile order could also cause that).
//   I9. Round comparisons are modulo 2^37, so a ring's head may fall at most
//       2^36 laps behind its tail. Only a task that stays queued at head
//       while 2^36 x C later tickets of its ring are taken holds it back
//       (more than 8 x 10^12 schedules at the smallest ring; cancels move head
//       past the cancelled tickets themselves, see cancel()); beyond that a
//       consumer could misread a newer cell as an older lap.
//
// ===========================================================================
// Linearization points
// ===========================================================================
//   schedule   the publish CAS of its last ticket, moved earlier to just
//              before the first of these, if any: the publish of a task with
//              a later ticket in the same ring that is not cancelled before
//              this task's publish (tasks leave a ring in ticket order, and a
//              consumer that saw that later task published would have
//              invalidated this ticket), or a cancel() claim of the task
//              before it is published. Schedules moved to the same point are
//              ordered by ticket. A duplicate schedule() of its id waits for
//              the publish, so it never reports a task next() may not see.
//   DuplicateId  the rescan's cell read that found the other task published
//              (is_published), while it was still QUEUED.
//   next/peek  an instant inside a double collect of the higher-priority
//              rings (no published task among their open tickets at the first
//              pass; tails and those cells unchanged at the second: the cells
//              sum to the same 128-bit value, and words only grow),
//              while the candidate, read before the second pass, was still
//              QUEUED (the claim CAS after it, or peek's re-read, proves it).
//              The first pass is the scan itself when it found every ring
//              above with head equal to tail (no open ticket): the candidate
//              is read after it, and the second pass is one tail load a ring
//              (an unchanged tail means no ticket since, and head never moves
//              back, so the ring stayed empty in between, I1).
//              Otherwise both passes come after the candidate's read.
//   cancel     the claim CAS (found), or the last probe (not found).
//   QueueFull  the count read; count_ includes schedules in flight, so this
//              answer alone is not linearizable (a task counted there may not
//              be visible to next() yet, or its schedule may end in
//              DuplicateId; README "Guarantees"). (In the
//              stalled case of I8 the table, not the count, is full: a
//              documented exception, len() may be below the bound then.)
// Ring, cell and state operations are seq_cst so that these points fall in one
// total order; the weaker ones are commented where they occur. (The ticket
// note is a release store, a plain one on x86-64: before it had to be
// seq_cst, a locked instruction, and ordered before the post-publish
// re-check; the scan of cells in I8 replaced that ordering.)
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

// 32-byte aligned (so new[] returns a 32-byte aligned table): two buckets a
// line, none across two.
struct alignas(32) Bucket {
  std::atomic<std::uint64_t> state{0};
  std::atomic<std::uint64_t> id{0};
  std::atomic<std::uint64_t> tokens{0};
  std::atomic<std::uint64_t> ticket{0};
};
static_assert(sizeof(Bucket) == 32, "two buckets a cache line, none across two");

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
  /// Ring cells beyond max_queue_size, for tickets of schedules in flight.
  static constexpr std::size_t kSlack = 64;
  /// Most open tickets of a ring that next() inspects to prove that none of
  /// them is published (the ring counts as empty, its producers in flight)
  /// before it invalidates the ticket at head instead; after kOpenWindow
  /// invalidations in one call it inspects them all.
  static constexpr std::uint64_t kOpenWindow = 8;
  /// claim_bucket() results other than a bucket.
  static constexpr std::uint32_t kDuplicate = UINT32_MAX;
  static constexpr std::uint32_t kTableFull = UINT32_MAX - 1;

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

  /// Claims a bucket for `task` in its id's probe range and checks the id is
  /// not queued. Returns the bucket, kDuplicate (the id is queued) or
  /// kTableFull (two whole laps of the table found no free bucket, I8).
  std::uint32_t claim_bucket(const ScheduledTask& task) noexcept;
  /// The home bucket of an id whose home hash (IdHash::home) is `hash`.
  std::uint64_t home_of(std::uint64_t hash) const noexcept;
  /// Bucket index x, for x < 2M, taken modulo M (probes wrap around the end).
  std::uint64_t wrap(std::uint64_t x) const noexcept { return x < table_size_ ? x : x - table_size_; }
  /// Prefetches the reach_ and table lines of `id`'s home.
  void prefetch_home(TaskId id) const noexcept;
  /// After taking ticket `h` of a ring whose tail was `t`: prefetches what
  /// the next takes will read.
  void prefetch_ahead(const Ring& ring, std::uint64_t h, std::uint64_t t) const noexcept;
  void free_bucket(std::uint32_t b, std::uint64_t state) noexcept;
  /// After cancel() claimed bucket `b` (now the CANCELLED `cancelled`) in
  /// `ring`: clears the task's cell if it is published (I8).
  void clear_cancelled(Ring& ring, std::uint32_t b, std::uint64_t cancelled) noexcept;

  std::size_t ring_of(Priority p) const noexcept;
  /// Whether the task in bucket `b`, whose state word is the QUEUED `state`,
  /// is published in its ring (and was still queued then).
  bool is_published(std::uint32_t b, std::uint64_t state) const noexcept;
  void publish(Ring& ring, std::uint32_t b, std::uint64_t state) noexcept;
  /// take_from() found the ring empty with open tickets (see `closed_tail`).
  static constexpr std::uint64_t kHadOpenTickets = UINT64_MAX;
  /// One attempt to take (or, with remove == false, read) the first task of
  /// `ring` among tickets below `limit`. `validate` re-checks the rings above.
  /// `invalidated` counts the tickets the calling next/peek/clear invalidated
  /// so far (see kOpenWindow). On kEmpty, `*closed_tail` (if given) is the
  /// tail it read if head, read just before, equalled it (no open ticket),
  /// else kHadOpenTickets, which no tail reaches.
  template <class Validate>
  Take take_from(Ring& ring, std::uint64_t limit, bool remove, Validate&& validate, unsigned& invalidated,
                 std::optional<ScheduledTask>& out, std::uint64_t* closed_tail = nullptr) noexcept;
  /// The double collect over rings [0, count) (see take()): false once one of
  /// them holds a published task. Kept out of line: next()'s common case
  /// needs only its tail check.
  [[gnu::noinline]] bool rings_above_empty(std::size_t count) noexcept;
  /// A 128-bit sum of cell words (two 64-bit halves), for the double collect.
  struct CellSum {
    std::uint64_t low = 0, high = 0;
    void add(std::uint64_t w) noexcept {
      low += w;
      high += low < w ? 1 : 0;
    }
    friend bool operator==(const CellSum&, const CellSum&) = default;
  };
  /// Whether tickets [from, to) are at most `window` and none of them holds a
  /// published task (a snapshot, not atomic). Reads each of their cells once
  /// (the first lap of them). With `sum`, adds the cell words read there (for
  /// a second collect).
  static bool only_unpublished(const Ring& ring, std::uint64_t from, std::uint64_t to, std::uint64_t window,
                               CellSum* sum = nullptr) noexcept;
  /// The sum of the cell words of tickets [from, to), read now (each cell
  /// once: the first lap of them).
  static CellSum sum_cells(const Ring& ring, std::uint64_t from, std::uint64_t to) noexcept;
  /// The end of the first lap of tickets from `from`, or `to` if it comes first.
  static std::uint64_t lap_end(const Ring& ring, std::uint64_t from, std::uint64_t to) noexcept {
    return to - from > ring.mask ? from + ring.mask + 1 : to;
  }
  /// Moves head from `h`, in one CAS, past every resolved ticket the cells
  /// show from there on (one scan of at most one lap of cells), no further
  /// than `t` (a tail read earlier).
  static void skip_resolved(Ring& ring, std::uint64_t h, std::uint64_t t) noexcept;
  /// skip_resolved() from the current head, if the ticket there is resolved
  /// (cancel() calls it).
  static void help_head(Ring& ring) noexcept;
  /// Replaces cell word `w`, which holds a CANCELLED bucket, by `with`; the
  /// winner of the CAS frees the bucket. Returns whether it won.
  bool reclaim_cell(std::atomic<std::uint64_t>& cell, std::uint64_t w, std::uint64_t with) noexcept;

  SchedulerConfig config_;
  std::size_t capacity_;
  std::size_t ring_count_;

  alignas(kCacheLine) std::atomic<std::uint64_t> count_{0};
  alignas(kCacheLine) std::atomic<std::uint64_t> ids_{1};
  alignas(kCacheLine) Ring rings_[kPriorityCount];

  std::unique_ptr<Bucket[]> table_;
  std::unique_ptr<std::atomic<std::uint32_t>[]> reach_;
  std::uint64_t table_size_ = 0;  // M
  std::size_t memory_bytes_ = 0;
};

}  // namespace tgi_gtc::scheduling::detail
