// The lock-free Scheduler. The design, state machines and invariants are in
// scheduler_core.hpp; comments here explain individual steps.
#include <bit>
#include <cassert>
#include <stdexcept>
#include <string>
#include <thread>

#include <tgi_gtc/scheduling/scheduler.hpp>

#include "cpu_relax.hpp"
#include "scheduler_core.hpp"

namespace tgi_gtc::scheduling {
namespace detail {

#ifdef TGI_GTC_TEST_HOOKS
// Test builds only (the target tgi_gtc_scheduling_hooks, linked by
// tests/races and sched-stress-chaos, never the library itself): called just
// before taking a ring ticket (the task is QUEUED) and between taking it and
// publishing, so a test can stall a producer exactly there; and on every pass
// of a consumer over a ring, with the head it read, so a test can count passes
// or order producers around them. And when a producer's cell still holds an
// earlier lap's task and head has not passed that task's ticket, with the
// producer's ticket, just before it reads the task's state: a stall there
// lets the task be taken and its bucket reused under the read. And after a
// publish, with the ticket, before the state re-check. And in the two
// windows where a removal has claimed a task but not yet let go of it: a
// consumer's next() or clear() between its TAKEN claim and moving head and
// freeing the bucket (with the ticket), and a cancel() between its CANCELLED
// claim and clearing the cell and freeing the capacity (with the id). With
// g_hide_ticket_note set, producers do not note their tickets (see
// publish()), as if cancel() read the note before those stores became
// visible: it must then find the cell by scanning.
void (*g_before_ticket_hook)(std::uint64_t unused) = nullptr;
void (*g_after_ticket_hook)(std::uint64_t ticket) = nullptr;
void (*g_take_pass_hook)(std::uint64_t head) = nullptr;
void (*g_lapped_cell_hook)(std::uint64_t ticket) = nullptr;
void (*g_published_hook)(std::uint64_t ticket) = nullptr;
void (*g_taken_hook)(std::uint64_t ticket) = nullptr;
void (*g_cancelled_hook)(std::uint64_t id) = nullptr;
std::atomic<bool> g_hide_ticket_note{false};
// Each reads its pointer once: a test may clear it while another thread
// passes the hook.
#define TGI_GTC_BEFORE_TICKET() \
  if (auto* hook_ = g_before_ticket_hook) hook_(0)
#define TGI_GTC_AFTER_TICKET(t) \
  if (auto* hook_ = g_after_ticket_hook) hook_(t)
#define TGI_GTC_TAKE_PASS(h) \
  if (auto* hook_ = g_take_pass_hook) hook_(h)
#define TGI_GTC_LAPPED_CELL(t) \
  if (auto* hook_ = g_lapped_cell_hook) hook_(t)
#define TGI_GTC_PUBLISHED(t) \
  if (auto* hook_ = g_published_hook) hook_(t)
#define TGI_GTC_TAKEN(t) \
  if (auto* hook_ = g_taken_hook) hook_(t)
#define TGI_GTC_CANCELLED(id) \
  if (auto* hook_ = g_cancelled_hook) hook_(id)
#define TGI_GTC_NOTE_HIDDEN() g_hide_ticket_note.load()
#else
#define TGI_GTC_BEFORE_TICKET()
#define TGI_GTC_AFTER_TICKET(t)
#define TGI_GTC_TAKE_PASS(h)
#define TGI_GTC_LAPPED_CELL(t)
#define TGI_GTC_PUBLISHED(t)
#define TGI_GTC_TAKEN(t)
#define TGI_GTC_CANCELLED(id)
#define TGI_GTC_NOTE_HIDDEN() false
#endif

namespace {

// Bucket state words: gen:38 | fp:20 | preemptible:1 | priority:2 | st:3.
constexpr std::uint64_t kFree = 0, kFilling = 1, kQueued = 2, kTaken = 3, kCancelled = 4;
constexpr unsigned kPrioShift = 3, kPreemptBit = 5, kFpShift = 6, kGenShift = 26;
constexpr std::uint64_t kFpMask = (std::uint64_t{1} << 20) - 1;
constexpr std::uint64_t st_of(std::uint64_t s) { return s & 7; }
constexpr std::uint64_t gen_of(std::uint64_t s) { return s >> kGenShift; }
constexpr std::uint64_t fp_of(std::uint64_t s) { return (s >> kFpShift) & kFpMask; }
constexpr std::uint64_t with_st(std::uint64_t s, std::uint64_t st) { return (s & ~std::uint64_t{7}) | st; }
constexpr std::uint64_t free_state(std::uint64_t gen) { return gen << kGenShift; }
constexpr std::uint64_t filling_state(std::uint64_t gen, std::uint64_t fp, const ScheduledTask& t) {
  return gen << kGenShift | fp << kFpShift | std::uint64_t{t.is_preemptible} << kPreemptBit |
         std::uint64_t{value(t.priority)} << kPrioShift | kFilling;
}

// Cell words: round:37 | occ:1 | bucket:26.
constexpr unsigned kSlotBits = 26;
constexpr std::uint64_t kSlotMask = (std::uint64_t{1} << kSlotBits) - 1;
constexpr std::uint64_t kOcc = std::uint64_t{1} << kSlotBits;
constexpr unsigned kRoundShift = kSlotBits + 1;
constexpr std::uint64_t kRoundMask = (std::uint64_t{1} << (64 - kRoundShift)) - 1;
constexpr std::uint64_t cell_round(std::uint64_t w) { return w >> kRoundShift; }
constexpr bool cell_occ(std::uint64_t w) { return (w & kOcc) != 0; }
constexpr std::uint32_t cell_bucket(std::uint64_t w) { return static_cast<std::uint32_t>(w & kSlotMask); }
constexpr std::uint64_t empty_cell(std::uint64_t round) { return (round & kRoundMask) << kRoundShift; }
constexpr std::uint64_t occ_cell(std::uint64_t round, std::uint32_t b) { return empty_cell(round) | kOcc | b; }
// Signed distance a - b between two rounds modulo 2^37.
constexpr std::int64_t round_diff(std::uint64_t a, std::uint64_t b) {
  return static_cast<std::int64_t>((a - b) << kRoundShift) >> kRoundShift;
}

// Whether cell word `w`, the cell of ticket `x`, holds a task published at
// x or at one of the cell's later tickets (x + C, x + 2C, ...) below `to`.
constexpr bool published_from(std::uint64_t w, std::uint64_t x, std::uint64_t to, unsigned shift) {
  if (!cell_occ(w)) return false;
  const std::int64_t laps = round_diff(cell_round(w), x >> shift);
  return laps >= 0 && x + (static_cast<std::uint64_t>(laps) << shift) < to;
}

constexpr std::uint64_t mix(std::uint64_t x) {  // splitmix64 finalizer
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
// Home bucket of an id: each id's own hash, scaled onto the table
// (home_of()). Not runs of consecutive ids on consecutive buckets (runs of 8
// were tried, for cache locality): a run that lands on a cluster pushes all
// its ids past it, and the probe range of a home (reach_, which never
// shrinks) then grew with churn to a mean of 63 buckets after 16 M pairs at
// depth 10,000 (per-id homes: 9), which every schedule() and cancel()
// rescans. Ids come mostly from next_id(), so schedule() prefetches the home
// of the id kPrefetchAhead after its own, instead.
constexpr std::uint64_t kPrefetchAhead = 8;
// claim_bucket()'s wait for a contended id: a delay of `backoff` to
// 2 x `backoff` pauses a round, `backoff` doubling from 1 up to this cap, and
// from the round it reaches the cap on, a yield of the core before it.
constexpr unsigned kBackoffCap = 256;
constexpr std::uint64_t kCellsPerLine = kCacheLine / sizeof(std::atomic<std::uint64_t>);
struct IdHash {
  std::uint64_t home;  // 32 bits: where the id's probe range starts (home_of() scales it)
  std::uint64_t fp;    // 20 other bits of the hash
};
constexpr IdHash id_hash(std::uint64_t id) {
  const std::uint64_t h = mix(id);
  return {h & 0xffff'ffffu, h >> 44};
}

ScheduledTask task_of(const Bucket& b, std::uint64_t state) noexcept {
  // acquire (both): pairs with the release stores of the fields in
  // claim_bucket(). Valid only if a later CAS or load finds the same state
  // word (I7): a load that read a later occupant's field synchronizes with
  // that occupant's claim, so the re-check (sequenced after it) sees the
  // claim and fails. Relaxed loads could be satisfied after a plain re-check
  // load on weakly ordered CPUs (the seqlock reader's problem).
  ScheduledTask t(b.id.load(std::memory_order::acquire), b.tokens.load(std::memory_order::acquire));
  t.priority = static_cast<Priority>((state >> kPrioShift) & 3);
  t.is_preemptible = ((state >> kPreemptBit) & 1) != 0;
  return t;
}

}  // namespace

SchedulerCore::SchedulerCore(const SchedulerConfig& config)
    : config_(config), capacity_(config.max_queue_size), ring_count_(config.priority_scheduling ? kPriorityCount : 1) {
  const std::size_t cells = std::bit_ceil(capacity_ + kSlack + 1);
  for (std::size_t i = 0; i < ring_count_; ++i) {
    rings_[i].cells = std::make_unique<std::atomic<std::uint64_t>[]>(cells);  // all EMPTY(0)
    rings_[i].mask = cells - 1;
    rings_[i].shift = static_cast<unsigned>(std::countr_zero(cells));
  }
  // Buckets in use <= queued tasks + calls in flight (I8): twice N + 65 keeps
  // the table about half full. Not a power of two: home_of() and wrap() need none.
  const std::size_t buckets = 2 * (capacity_ + kSlack + 1);
  static_assert(2 * (kMaxQueueSize + kSlack + 1) <= kSlotMask + 1);
  table_ = std::make_unique<Bucket[]>(buckets);
  reach_ = std::make_unique<std::atomic<std::uint32_t>[]>(buckets);
  table_size_ = buckets;
  memory_bytes_ = sizeof(*this) + ring_count_ * cells * sizeof(std::atomic<std::uint64_t>) +
                  buckets * (sizeof(Bucket) + sizeof(std::atomic<std::uint32_t>));
}

TaskId SchedulerCore::next_id() noexcept {
  // relaxed: uniqueness comes from the atomicity of the RMW; nothing is published.
  return ids_.fetch_add(1, std::memory_order::relaxed);
}

std::size_t SchedulerCore::len() const noexcept {
  // relaxed: a snapshot of a counter that publishes no task data.
  return static_cast<std::size_t>(count_.load(std::memory_order::relaxed));
}

bool SchedulerCore::reserve() noexcept {
  // relaxed: count_ gates capacity only; tasks are published through cells and
  // bucket states. Coherence still orders it after any removal that
  // happened-before this call, so capacity freed by it is seen.
  std::uint64_t c = count_.load(std::memory_order::relaxed);
  do {
    if (c >= capacity_) return false;
  } while (!count_.compare_exchange_weak(c, c + 1, std::memory_order::relaxed));
  return true;
}

void SchedulerCore::unreserve() noexcept {
  // relaxed: see reserve().
  count_.fetch_sub(1, std::memory_order::relaxed);
}

void SchedulerCore::free_bucket(std::uint32_t b, std::uint64_t state) noexcept {
  // release: pairs with the claim CAS of the next schedule() that takes this
  // bucket, so our reads of its fields happen before its writes.
  table_[b].state.store(free_state(gen_of(state) + 1), std::memory_order::release);
}

// ---------------------------------------------------------------------------
// schedule
// ---------------------------------------------------------------------------

std::uint64_t SchedulerCore::home_of(std::uint64_t hash) const noexcept {
  // Lemire's multiply-shift reduction of a 32-bit hash onto [0, M).
  return (hash * table_size_) >> 32;
}

// Both prefetch helpers are always inlined. A call to a function whose only
// effects are prefetches is dead code to a compiler that may look into it
// (the library is built without semantic interposition): GCC 12 deleted
// every call to its prefetch helper until it was inlined.
[[gnu::always_inline]] inline void SchedulerCore::prefetch_home(TaskId id) const noexcept {
  const std::uint64_t home = home_of(id_hash(id).home);
  __builtin_prefetch(&reach_[home], 0);  // mostly read
  __builtin_prefetch(&table_[home], 1);
}

[[gnu::always_inline]] inline void SchedulerCore::prefetch_ahead(const Ring& ring, std::uint64_t h,
                                                                 std::uint64_t t) const noexcept {
  // A deep queue's next tasks were scheduled long ago: their cells and
  // buckets are likely out of the cache. Fetch the next line of cells, and
  // the bucket two tasks ahead (its cell is in a line fetched earlier).
  if ((h & (kCellsPerLine - 1)) == 0) __builtin_prefetch(&ring.cells[(h + kCellsPerLine) & ring.mask], 0);
  if (h + 2 >= t) return;
  // relaxed: a prefetch hint only; the word is not used for anything else.
  const std::uint64_t w = ring.cells[(h + 2) & ring.mask].load(std::memory_order::relaxed);
  if (cell_occ(w)) __builtin_prefetch(&table_[cell_bucket(w)], 0);
}

namespace {

// Per-thread xorshift32 state for backoff jitter (Marsaglia, "Xorshift RNGs",
// 2003). A constant initializer and the initial-exec model, as the block
// pool's hint: no guard and no __tls_get_addr on the path.
[[gnu::tls_model("initial-exec")]] thread_local std::uint32_t t_jitter = 0;

// A number in [0, bound), bound >= 1, drawn per thread.
unsigned jitter(unsigned bound) noexcept {
  std::uint32_t x = t_jitter;
  // Seeded from the state's own address, every bit of it mixed (Fibonacci
  // hashing): live threads' addresses differ, so their seeds differ but for a
  // chance 32-bit collision, which would only make two back-offs alike.
  if (x == 0) {
    const auto addr = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(&t_jitter));
    x = static_cast<std::uint32_t>((addr * 0x9E3779B97F4A7C15ULL) >> 32) | 1u;
  }
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  t_jitter = x;
  return x % bound;
}

}  // namespace

std::uint32_t SchedulerCore::claim_bucket(const ScheduledTask& task) noexcept {
  // Ids mostly come in sequence (next_id(), or a caller's counter), and each
  // lands at a random place in the table, likely not in any cache when the
  // table is large: fetch the lines of the id kPrefetchAhead ahead.
  prefetch_home(task.id + kPrefetchAhead);
  const IdHash hash = id_hash(task.id);
  const std::uint64_t home = home_of(hash.home);
  const std::uint64_t fp = hash.fp;
  std::atomic<std::uint32_t>& reach = reach_[home];
  for (unsigned backoff = 1;; backoff = backoff < kBackoffCap ? backoff * 2 : backoff) {
    // Claim the first free bucket from home (the table is about half full at most, I8).
    std::uint64_t d = 0, mine = 0, state = 0;
    // A free bucket is there unless N + 131 or more other calls are stalled
    // holding buckets (I8): after two whole laps without one, give up rather
    // than spin on them. (The laps are not a snapshot: claims and frees racing
    // the probe could also exhaust them, which takes a hostile schedule.)
    for (std::uint64_t probes = 0;; d = d + 1 < table_size_ ? d + 1 : 0, ++probes) {
      if (probes == 2 * table_size_) return kTableFull;
      mine = wrap(home + d);
      std::uint64_t s = table_[mine].state.load();
      if (st_of(s) != kFree) continue;
      state = filling_state(gen_of(s), fp, task);
      if (table_[mine].state.compare_exchange_strong(s, state)) break;
    }
    Bucket& bucket = table_[mine];
    // release (both): pair with the acquire loads in task_of() and in the
    // rescan below: whoever reads these values also sees our claim above, so
    // its re-check of the previous occupant's state fails (I7). Readers of
    // our task get them through the release store of QUEUED in schedule().
    bucket.id.store(task.id, std::memory_order::release);
    bucket.tokens.store(task.estimated_tokens, std::memory_order::release);
    std::uint32_t r = reach.load();
    while (r < d + 1 && !reach.compare_exchange_weak(r, static_cast<std::uint32_t>(d + 1))) {
    }
    // Rescan every bucket an entry of this home may occupy (I6).
    bool duplicate = false, contended = false;
    const std::uint32_t range = reach.load();
    for (std::uint64_t i = 0; i < range; ++i) {
      const std::uint64_t b = wrap(home + i);
      const std::uint64_t s = table_[b].state.load();
      if (b == mine || fp_of(s) != fp) continue;
      if (st_of(s) == kFilling) {  // its id may not be written yet: assume ours
        contended = true;
        break;
      }
      if (st_of(s) != kQueued) continue;
      // acquire: the seq_cst load that saw QUEUED synchronizes with the
      // release store that published the id; acquire also pairs with the
      // release store of the id by a later occupant (see task_of), so the
      // re-check below fails if this read that occupant's id.
      const TaskId other = table_[b].id.load(std::memory_order::acquire);
      if (other == task.id && table_[b].state.load() == s) {
        // Our id is queued. It is a duplicate once published; before that its
        // schedule() has not taken effect for next() (which passes over
        // unpublished tickets), so DuplicateId now would claim a task that a
        // later next() may not see. Wait for its producer, as for FILLING.
        if (is_published(static_cast<std::uint32_t>(b), s)) {
          duplicate = true;
        } else {
          contended = true;
        }
        break;
      }
    }
    if (!duplicate && !contended) return static_cast<std::uint32_t>(mine);
    free_bucket(static_cast<std::uint32_t>(mine), state);
    if (duplicate) return kDuplicate;
    // Another schedule() whose id shares our 20-bit fingerprint is between its
    // claim and its verdict, or has our id and is not yet published (normally:
    // the same id scheduled twice at once). Two calls that claimed at the same
    // moment see each other and both back off; with equal delays they could
    // meet again round after round, so each waits a random part more (between
    // 1x and 2x its growing delay), and one of them soon claims alone.
    // Either wait lasts a few hundred instructions of the other call, unless
    // that call lost its core: once the delay reaches its cap (after about
    // 255 to 502 pauses in all, 8-16 us where a pause takes 30 ns), each
    // round first yields the core (a system call), so that on an
    // oversubscribed machine the waiter does not spin out its time slice
    // while the call it waits for cannot run (the Engine's waits do the same).
    if (backoff == kBackoffCap) std::this_thread::yield();
    for (unsigned i = 0, n = backoff + jitter(backoff); i < n; ++i) cpu_relax();
  }
}

std::size_t SchedulerCore::ring_of(Priority p) const noexcept {
  return ring_count_ == 1 ? 0 : kPriorityCount - 1 - value(p);
}

bool SchedulerCore::is_published(std::uint32_t b, std::uint64_t state) const noexcept {
  const Ring& ring = rings_[ring_of(static_cast<Priority>((state >> kPrioShift) & 3))];
  // The note is this occupant's or a later one's: the caller's load of QUEUED
  // read the store that published its first note (schedule()). If the task
  // is published, it is at the ticket noted last; an older note answers no.
  const std::uint64_t t = table_[b].ticket.load();
  // The cell holds bucket b at ticket t: an earlier occupant's publish there
  // would have been cleared before its bucket was freed (cancelled) or passed
  // by head (taken, I3), and cell words never repeat (I2): with head not past
  // t afterwards, it is the current occupant's, published while QUEUED if the
  // state is still the same word (generations never repeat). A stale note
  // answers no, which only makes the caller wait and look again.
  if (ring.cells[t & ring.mask].load() != occ_cell(t >> ring.shift, b)) return false;
  if (ring.head.load() > t) return false;
  return table_[b].state.load() == state;
}

std::error_code SchedulerCore::schedule(const ScheduledTask& task) noexcept {
  // A Priority cast from an out-of-range integer would index past rings_ and
  // spill into the state word's other fields: refuse it before anything changes.
  if (value(task.priority) >= kPriorityCount) return ScheduleError::InvalidPriority;
  if (!reserve()) return ScheduleError::QueueFull;
  const std::uint32_t b = claim_bucket(task);
  if (b == kDuplicate || b == kTableFull) {
    unreserve();
    return b == kDuplicate ? ScheduleError::DuplicateId : ScheduleError::QueueFull;
  }
  Ring& ring = rings_[ring_of(task.priority)];
  Bucket& bucket = table_[b];
  // The ticket note: a lower bound of every ticket this call may publish at,
  // and above every ticket a previous occupant of the bucket published at.
  // The ring's tail until the first ticket (a later fetch_add on tail reads
  // this value or a later one), then each ticket taken, noted before its
  // publish (publish()). A cancel() reads it and scans the cells from there
  // (I8).
  // relaxed (the tail load): by coherence alone it bounds our tickets, and it
  // is above a previous occupant's tickets: that occupant's fetch_add
  // happened before its cell was read by whoever freed the bucket, whose
  // release store of FREE our claim CAS read.
  // release (the store): pairs with the seq_cst note loads in
  // clear_cancelled() and is_published(), so that a reader of the bucket's
  // previous occupant that reads this note sees our claim in its state
  // re-check; QUEUED readers get it through the QUEUED store below.
  bucket.ticket.store(ring.tail.load(std::memory_order::relaxed), std::memory_order::release);
  // From here cancel(id) can claim the task, even before it is published.
  // (Q1) release: publishes id, tokens and the note to whoever loads QUEUED.
  const std::uint64_t queued = with_st(bucket.state.load(std::memory_order::relaxed), kQueued);  // relaxed: our own write
  bucket.state.store(queued, std::memory_order::release);
  publish(ring, b, queued);
  return {};
}

void SchedulerCore::publish(Ring& ring, std::uint32_t b, std::uint64_t queued) noexcept {
  Bucket& bucket = table_[b];
  const std::uint64_t cancelled = with_st(queued, kCancelled);
  const std::uint64_t capacity = ring.mask + 1;
  for (;;) {
    if (bucket.state.load() == cancelled) {
      // Cancelled before any publish succeeded: no cell holds it (I5).
      free_bucket(b, cancelled);
      return;
    }
    TGI_GTC_BEFORE_TICKET();
    const std::uint64_t t = ring.tail.fetch_add(1);
    // The note (see schedule()): the bucket is ours until a publish succeeds
    // (no cell holds it), so the store cannot land on a later occupant's.
    // release: as the first note's.
    if (!TGI_GTC_NOTE_HIDDEN()) bucket.ticket.store(t, std::memory_order::release);
    // One ticket in 8 fetches the cells 8 ahead, for the producers of the
    // next tickets: every line of the ring before its first use.
    if ((t & (kCellsPerLine - 1)) == 0) __builtin_prefetch(&ring.cells[(t + kCellsPerLine) & ring.mask], 1);
    TGI_GTC_AFTER_TICKET(t);
    const std::uint64_t r = t >> ring.shift;
    std::atomic<std::uint64_t>& cell = ring.cells[t & ring.mask];
    std::uint64_t w = cell.load();
    bool published = false;
    while (!published) {
      const std::int64_t age = round_diff(cell_round(w), r);
      if (age > 0) break;  // a consumer invalidated this ticket, or a later lap took the cell
      if (cell_occ(w)) {
        if (age == 0) break;  // cannot happen: tickets are unique
        // An earlier lap's task. Its ticket below head means it was taken and
        // the cell is stale; otherwise it may be a cancelled task's tombstone,
        // which we may steal; a queued (or being taken) task keeps its cell.
        const std::uint64_t old_ticket = t - static_cast<std::uint64_t>(-age) * capacity;
        if (ring.head.load() <= old_ticket) {
          TGI_GTC_LAPPED_CELL(t);
          const std::uint32_t x = cell_bucket(w);
          const std::uint64_t xs = table_[x].state.load();
          // I3: head still at or before its ticket, so xs is that task's state.
          if (ring.head.load() > old_ticket) continue;
          if (st_of(xs) != kCancelled) break;  // abandon this ticket
          published = reclaim_cell(cell, w, occ_cell(r, b));
          if (!published) w = cell.load();
          continue;
        }
      }
      published = cell.compare_exchange_weak(w, occ_cell(r, b));
    }
    if (!published) continue;  // take another ticket
    TGI_GTC_PUBLISHED(t);
    // If a cancel claimed the task meanwhile, it may have missed this cell:
    // read it before our publish. Of our cell CAS then this state load, and
    // its state CAS then cell loads, one sees the other's write (all seq_cst,
    // the store-buffer argument), so one of us clears the tombstone and it
    // never outlives the calls involved (I8).
    if (bucket.state.load() == cancelled) reclaim_cell(cell, occ_cell(r, b), empty_cell(r + 1));
    return;
  }
}

bool SchedulerCore::reclaim_cell(std::atomic<std::uint64_t>& cell, std::uint64_t w, std::uint64_t with) noexcept {
  std::uint64_t expected = w;
  if (!cell.compare_exchange_strong(expected, with)) return false;
  const std::uint32_t x = cell_bucket(w);
  free_bucket(x, table_[x].state.load());
  return true;
}

// ---------------------------------------------------------------------------
// next / peek / clear
// ---------------------------------------------------------------------------

bool SchedulerCore::only_unpublished(const Ring& ring, std::uint64_t from, std::uint64_t to, std::uint64_t window,
                                     CellSum* sum) noexcept {
  if (to - from > window) return false;
  // Tickets a lap apart share a cell, which shows one publish at most: the
  // first lap of cells covers [from, to) however far apart the two are.
  for (std::uint64_t x = from, end = lap_end(ring, from, to); x < end; ++x) {
    const std::uint64_t w = ring.cells[x & ring.mask].load();
    if (published_from(w, x, to, ring.shift)) return false;
    if (sum != nullptr) sum->add(w);
  }
  return true;
}

SchedulerCore::CellSum SchedulerCore::sum_cells(const Ring& ring, std::uint64_t from, std::uint64_t to) noexcept {
  CellSum sum;
  for (std::uint64_t x = from, end = lap_end(ring, from, to); x < end; ++x) sum.add(ring.cells[x & ring.mask].load());
  return sum;
}

void SchedulerCore::skip_resolved(Ring& ring, std::uint64_t h, std::uint64_t t) noexcept {
  // A cell showing round R resolves every ticket of that cell in an earlier
  // round: none of them can be published any more (its producer's CAS finds a
  // later round) and none holds a task (one published there was taken or
  // cleared before the cell moved on). Rounds only grow (I2), so this stays
  // true once read. For each cell from h on, the first ticket it does not
  // show resolved is a candidate; head may move to the smallest candidate,
  // and no further than t. Candidates are never below the ticket whose cell
  // gave them, so the scan stops on reaching the smallest one found: at the
  // first ticket that is not resolved, or after one lap of cells (every
  // cell read once), whichever comes first.
  const std::uint64_t lap = ring.mask + 1;
  std::uint64_t target = t;
  for (std::uint64_t x = h; x < target && x - h < lap; ++x) {
    const std::uint64_t w = ring.cells[x & ring.mask].load();
    const std::int64_t ahead = round_diff(cell_round(w), x >> ring.shift);
    const std::uint64_t first_open = ahead > 0 ? x + static_cast<std::uint64_t>(ahead) * lap : x;
    if (first_open < target) target = first_open;
  }
  if (target > h) ring.head.compare_exchange_strong(h, target);
}

void SchedulerCore::help_head(Ring& ring) noexcept {
  const std::uint64_t h = ring.head.load();
  const std::uint64_t w = ring.cells[h & ring.mask].load();
  if (round_diff(cell_round(w), h >> ring.shift) <= 0) return;  // not resolved: nothing to pass
  skip_resolved(ring, h, ring.tail.load());
}

template <class Validate>
SchedulerCore::Take SchedulerCore::take_from(Ring& ring, std::uint64_t limit, bool remove, Validate&& validate,
                                             unsigned& invalidated, std::optional<ScheduledTask>& out,
                                             std::uint64_t* closed_tail) noexcept {
  for (;;) {
    std::uint64_t h = ring.head.load();
    TGI_GTC_TAKE_PASS(h);
    const std::uint64_t t = ring.tail.load();
    // head <= tail always, so h >= t means head == tail when t was read (I1).
    if (h >= t || h >= limit) {
      if (closed_tail != nullptr) *closed_tail = h >= t ? t : kHadOpenTickets;
      return Take::kEmpty;
    }
    const std::uint64_t r = h >> ring.shift;
    std::atomic<std::uint64_t>& cell = ring.cells[h & ring.mask];
    std::uint64_t w = cell.load();
    const std::int64_t age = round_diff(cell_round(w), r);
    if (age > 0) {  // resolved already, and maybe more behind it: pass them all at once
      skip_resolved(ring, h, t);
      continue;
    }
    if (age < 0 || !cell_occ(w)) {
      // Ticket h was taken but not published: the cell still shows an earlier
      // lap (empty, or a taken task's stale entry). Its producer is in flight
      // or gave the ticket up. If no later open ticket is published either
      // (and at most kOpenWindow are open), the ring holds nothing to take
      // now: report it empty and leave the producer its ticket (the caller's
      // double collect proves the instant, see take()). Otherwise (a published
      // task waits behind this ticket, or too many are open to check), give
      // its producer a moment, then invalidate the ticket rather than wait.
      // After kOpenWindow invalidations in one call, every open ticket is
      // checked, however many: producers that keep taking new tickets while
      // the call invalidates theirs cannot keep it from returning.
      const std::uint64_t window = invalidated < kOpenWindow ? kOpenWindow : UINT64_MAX;
      if (only_unpublished(ring, h, t < limit ? t : limit, window)) {
        if (closed_tail != nullptr) *closed_tail = kHadOpenTickets;
        return Take::kEmpty;
      }
      for (int i = 0; i < 16 && cell.load() == w; ++i) cpu_relax();
      // The cell's later tickets below t (h + C, h + 2C, ...: only when head
      // lags tail by a lap or more) are not published either, or the cell
      // would show it; invalidate them with ticket h, so that a ring whose
      // head stood still for many laps costs one CAS here, not one a lap.
      const std::uint64_t later_laps = (t - 1 - h) >> ring.shift;
      if (cell.compare_exchange_strong(w, empty_cell(r + 1 + later_laps))) {
        ++invalidated;
        ring.head.compare_exchange_strong(h, h + 1);
      }
      continue;
    }
    const std::uint32_t b = cell_bucket(w);
    Bucket& bucket = table_[b];
    const std::uint64_t st = bucket.state.load();
    // I3: with head and cell unchanged, st is the state of this cell's task.
    if (ring.head.load() != h || cell.load() != w) continue;
    if (st_of(st) == kCancelled) {  // a tombstone
      reclaim_cell(cell, w, empty_cell(r + 1));
      ring.head.compare_exchange_strong(h, h + 1);
      continue;
    }
    if (st_of(st) != kQueued) {  // TAKEN: its taker has yet to move head
      ring.head.compare_exchange_strong(h, h + 1);
      continue;
    }
    const ScheduledTask task = task_of(bucket, st);
    if (!validate()) return Take::kRetry;
    if (!remove) {
      if (bucket.state.load() != st) continue;
      out = task;
      return Take::kGot;
    }
    std::uint64_t expected = st;
    if (!bucket.state.compare_exchange_strong(expected, with_st(st, kTaken))) continue;
    // The cell stays as it is: with head past it, it is stale (see publish).
    const std::uint64_t taken = h;  // a failed CAS below overwrites h
    TGI_GTC_TAKEN(taken);
    ring.head.compare_exchange_strong(h, h + 1);
    prefetch_ahead(ring, taken, t);
    free_bucket(b, st);
    unreserve();
    out = task;
    return Take::kGot;
  }
}

bool SchedulerCore::rings_above_empty(std::size_t count) noexcept {
  // First pass: none of each ring's tickets [head, tail) is published (its
  // cell still shows an earlier lap: the producer is in flight); the pass sums
  // the cell words read. Second pass: each tail unchanged, and the same cells
  // sum to the same value. A cell's word only grows (every transition raises
  // its round or sets its occupied bit, I2), and each second read comes after
  // the first, so an equal sum means every word is unchanged: no ticket was
  // published in between, and no ticket was added. Every ring held no task
  // between the two passes. A ring with a published task returns false; one
  // with only unpublished tickets does not, so producers in flight do not
  // make consumers retry.
  std::uint64_t tails[kPriorityCount], heads[kPriorityCount];
  CellSum sums[kPriorityCount];
  for (;;) {
    for (std::size_t j = 0; j < count; ++j) {
      Ring& g = rings_[j];
      heads[j] = g.head.load();
      tails[j] = g.tail.load();
      sums[j] = CellSum{};
      if (heads[j] >= tails[j]) continue;
      if (!only_unpublished(g, heads[j], tails[j], UINT64_MAX, &sums[j])) return false;
    }
    bool stable = true;
    for (std::size_t j = 0; j < count && stable; ++j) {
      Ring& g = rings_[j];
      stable = g.tail.load() == tails[j] && sum_cells(g, heads[j], tails[j]) == sums[j];
    }
    if (stable) return true;
  }
}

std::optional<ScheduledTask> SchedulerCore::take(bool remove) noexcept {
  std::optional<ScheduledTask> out;
  unsigned invalidated = 0;  // tickets this call invalidated (see take_from)
  for (;;) {
    std::size_t seen_count = 0;  // rings found empty so far, from the top
    // For each of them, the tail the scan read with head equal to it, or
    // kHadOpenTickets.
    std::uint64_t closed[kPriorityCount];
    // The rings above the one being read (found empty by the scan) must all
    // hold no published task at one instant while the candidate is still
    // queued. A double collect gives that instant.
    // Common case, one pass: the scan itself is the first collect. It read
    // each ring's head, then its tail, and found them equal: no open ticket,
    // the ring held nothing (I1: every ticket below head is resolved, and a
    // resolved ticket can no longer be published). If each tail is unchanged
    // now, no ticket was taken since (tails only grow, 64-bit: no ABA), and
    // head never moves back, so every ticket stayed below head: each ring held
    // nothing at any instant from its read in the scan until now. The
    // candidate was read after the scan passed those rings and before this
    // check, so the instant of its read serves.
    // Otherwise (a ring had open tickets, or a tail moved): the full double
    // collect, both passes after the candidate's read.
    auto validate = [&]() noexcept {
      for (std::size_t j = 0; j < seen_count; ++j) {
        if (rings_[j].tail.load() != closed[j]) return rings_above_empty(seen_count);
      }
      return true;
    };
    bool retry = false;
    for (std::size_t i = 0; i < ring_count_ && !retry; ++i) {
      switch (take_from(rings_[i], UINT64_MAX, remove, validate, invalidated, out, &closed[i])) {
        case Take::kGot: return out;
        case Take::kRetry: retry = true; break;
        case Take::kEmpty: ++seen_count; break;
      }
    }
    // Empty: all rings empty at one instant (the double collect: between the
    // scan's read of the last ring and this check on the one-pass path,
    // between the two passes of rings_above_empty() otherwise).
    // Every return names `out`, so it is built in the caller's result, not
    // copied there.
    if (!retry && validate()) return out;
  }
}

std::vector<ScheduledTask> SchedulerCore::clear() {
  // Tickets taken before clear() began cover every task queued by then.
  std::uint64_t limit[kPriorityCount];
  for (std::size_t i = 0; i < ring_count_; ++i) limit[i] = rings_[i].tail.load();
  // Room for every task it can take, allocated before it takes any, so that a
  // std::bad_alloc changes nothing and no taken task is dropped. Enough:
  // every ticket below a limit belongs to a schedule() that counted its task
  // in count_ (reserve()) before it took the ticket, and the seq_cst loads
  // above read those tickets' seq_cst fetch_adds, so this read of count_ sees
  // each such count; a task is uncounted only when it is removed, and we
  // remove ours after this read. So len() now >= the tasks we will take.
  std::vector<ScheduledTask> out;
  out.reserve(len());
  auto no_check = []() noexcept { return true; };
  for (std::size_t i = 0; i < ring_count_; ++i) {
    std::optional<ScheduledTask> got;
    unsigned invalidated = 0;
    while (take_from(rings_[i], limit[i], true, no_check, invalidated, got) == Take::kGot) {
      assert(out.size() < out.capacity());
      out.push_back(*got);  // no reallocation (above): cannot throw
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// cancel
// ---------------------------------------------------------------------------

void SchedulerCore::clear_cancelled(Ring& ring, std::uint32_t b, std::uint64_t cancelled) noexcept {
  // The note read is this task's or a later occupant's: the claim read the
  // QUEUED store that published this task's first note. A later occupant's
  // means this task's cell was cleared already (its bucket was freed);
  // re-reading the state (a seq_cst load after the note's: a release note
  // makes it see that occupant's claim) shows it, and nothing is done.
  Bucket& bucket = table_[b];
  const std::uint64_t from = bucket.ticket.load();
  if (bucket.state.load() != cancelled) return;
  // A cell that holds bucket b is this task's, unless it is a later
  // occupant's publish (the bucket freed after the state load above): that
  // publish comes after the occupant's claim, so the state, read again
  // after the cell, shows it then. A previous occupant's cells never match:
  // cleared when it was cancelled, below the note's bound when it was taken
  // (a stale cell a lap or more back shows an older round than the tickets
  // scanned, which the exact word below and published_from() reject).
  const auto clear = [&](std::atomic<std::uint64_t>& cell, std::uint64_t w) noexcept {
    if (bucket.state.load() == cancelled) reclaim_cell(cell, w, empty_cell(cell_round(w) + 1));
  };
  // Mostly the note is the ticket the task was published at: its cell first.
  std::atomic<std::uint64_t>& noted = ring.cells[from & ring.mask];
  if (const std::uint64_t w = occ_cell(from >> ring.shift, b); noted.load() == w) {
    clear(noted, w);
    return;
  }
  // Whoever clears the task's cell frees the bucket just after: if it is
  // freed, there is nothing left to do (a race with the producer's own
  // re-check, or a consumer that reached the tombstone).
  if (bucket.state.load() != cancelled) return;
  // Otherwise the task is published at a ticket in [from, tail) if at all
  // (the note bounds its tickets; the tail read after our claim is past any
  // ticket it was published at before our reads): scan those cells, the
  // first lap of them (which covers them all, as in only_unpublished). If
  // none holds it, every publish of it comes after our reads, so after our
  // claim, and its producer's state load sees the claim. Mostly the scan is
  // short: the producer is in flight, and the tickets past its own are those
  // taken since.
  const std::uint64_t to = ring.tail.load();
  for (std::uint64_t x = from, end = lap_end(ring, from, to); x < end; ++x) {
    std::atomic<std::uint64_t>& cell = ring.cells[x & ring.mask];
    const std::uint64_t w = cell.load();
    if (cell_bucket(w) != b || !published_from(w, x, to, ring.shift)) continue;
    clear(cell, w);
    return;
  }
}

std::optional<ScheduledTask> SchedulerCore::cancel(TaskId id) noexcept {
  const IdHash hash = id_hash(id);
  const std::uint64_t home = home_of(hash.home);
  const std::uint64_t fp = hash.fp;
restart:
  const std::uint32_t range = reach_[home].load();
  for (std::uint64_t i = 0; i < range; ++i) {
    const std::uint32_t b = static_cast<std::uint32_t>(wrap(home + i));
    Bucket& bucket = table_[b];
    const std::uint64_t st = bucket.state.load();
    if (st_of(st) != kQueued || fp_of(st) != fp) continue;
    const ScheduledTask task = task_of(bucket, st);
    if (task.id != id) continue;
    std::uint64_t expected = st;
    if (!bucket.state.compare_exchange_strong(expected, with_st(st, kCancelled))) goto restart;
    TGI_GTC_CANCELLED(id);
    // Clear its cell, if it is published. A tombstone left behind (its
    // producer clears it) is also cleared by the consumer that reaches it or
    // a producer lapping onto it.
    Ring& ring = rings_[ring_of(task.priority)];
    clear_cancelled(ring, b, with_st(st, kCancelled));
    // Only consumers move head otherwise: with schedule() and cancel() alone
    // it would stay put while tail grows, and the next next() would have all
    // the cancelled tickets to pass.
    help_head(ring);
    unreserve();
    return task;
  }
  return std::nullopt;
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Public wrapper
// ---------------------------------------------------------------------------

namespace {
SchedulerConfig checked(SchedulerConfig c) {
  if (c.max_queue_size == 0) throw std::invalid_argument("SchedulerConfig::max_queue_size must be at least 1");
  if (c.max_queue_size > kMaxQueueSize) {
    throw std::invalid_argument("SchedulerConfig::max_queue_size " + std::to_string(c.max_queue_size) +
                                " exceeds the maximum of " + std::to_string(kMaxQueueSize));
  }
  return c;
}
}  // namespace

Scheduler::Scheduler() : Scheduler(SchedulerConfig{}) {}
Scheduler::Scheduler(SchedulerConfig config)
    : config_(checked(config)), core_(std::make_unique<detail::SchedulerCore>(config_)) {}
Scheduler::~Scheduler() = default;

const SchedulerConfig& Scheduler::config() const noexcept { return config_; }
TaskId Scheduler::next_id() noexcept { return core_->next_id(); }
std::error_code Scheduler::schedule(const ScheduledTask& task) noexcept { return core_->schedule(task); }
std::optional<ScheduledTask> Scheduler::next() noexcept { return core_->take(true); }
std::optional<ScheduledTask> Scheduler::peek() const noexcept { return core_->take(false); }
std::optional<ScheduledTask> Scheduler::cancel(TaskId id) noexcept { return core_->cancel(id); }
std::vector<ScheduledTask> Scheduler::clear() { return core_->clear(); }
std::size_t Scheduler::len() const noexcept { return core_->len(); }
bool Scheduler::is_empty() const noexcept { return len() == 0; }
std::size_t Scheduler::memory_bytes() const noexcept { return core_->memory_bytes(); }

}  // namespace tgi_gtc::scheduling
