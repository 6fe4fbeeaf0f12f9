// The lock-free Scheduler. The design, state machines and invariants are in
// scheduler_core.hpp; comments here explain individual steps.
#include <bit>
#include <stdexcept>
#include <string>

#include <tgi_gtc/scheduling/scheduler.hpp>

#include "scheduler_core.hpp"

namespace tgi_gtc::scheduling {
namespace detail {
namespace {

constexpr std::uint64_t kFree = 0, kFilling = 1, kQueued = 2, kRemoved = 3;
constexpr std::uint64_t make_state(std::uint64_t gen, std::uint64_t st) { return gen << 2 | st; }
constexpr std::uint64_t gen_of(std::uint64_t state) { return state >> 2; }
constexpr std::uint64_t st_of(std::uint64_t state) { return state & 3; }

// Cell words.
constexpr unsigned kSlotBits = 25;
constexpr std::uint64_t kSlotMask = (std::uint64_t{1} << kSlotBits) - 1;
constexpr std::uint64_t kOcc = std::uint64_t{1} << kSlotBits;
constexpr unsigned kRoundShift = kSlotBits + 1;
constexpr unsigned kRoundBits = 64 - kRoundShift;
constexpr std::uint64_t kRoundMask = (std::uint64_t{1} << kRoundBits) - 1;
static_assert(kMaxQueueSize + SchedulerCore::kSlack <= kSlotMask);

constexpr std::uint64_t cell_round(std::uint64_t w) { return w >> kRoundShift; }
constexpr bool cell_occ(std::uint64_t w) { return (w & kOcc) != 0; }
constexpr std::uint32_t cell_slot(std::uint64_t w) { return static_cast<std::uint32_t>(w & kSlotMask); }
constexpr std::uint64_t empty_cell(std::uint64_t round) { return (round & kRoundMask) << kRoundShift; }
constexpr std::uint64_t occ_cell(std::uint64_t round, std::uint32_t s) { return empty_cell(round) | kOcc | s; }
// Signed distance a - b between two rounds modulo 2^kRoundBits.
constexpr std::int64_t round_diff(std::uint64_t a, std::uint64_t b) {
  return static_cast<std::int64_t>((a - b) << kRoundShift) >> kRoundShift;
}

// Index entries.
constexpr std::uint64_t kValid = std::uint64_t{1} << 63;
constexpr unsigned kFpShift = kSlotBits;
constexpr unsigned kGenShift = kSlotBits + 7;
constexpr std::uint64_t kGenMask = (std::uint64_t{1} << 31) - 1;
constexpr std::uint64_t make_entry(std::uint32_t s, std::uint64_t gen, std::uint64_t fp) {
  return kValid | (gen & kGenMask) << kGenShift | fp << kFpShift | s;
}
constexpr std::uint32_t entry_slot(std::uint64_t e) { return static_cast<std::uint32_t>(e & kSlotMask); }
constexpr std::uint64_t entry_fp(std::uint64_t e) { return (e >> kFpShift) & 0x7f; }
constexpr std::uint64_t entry_gen(std::uint64_t e) { return (e >> kGenShift) & kGenMask; }

constexpr std::uint64_t mix(std::uint64_t x) {  // splitmix64 finalizer
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

constexpr std::uint32_t pack_meta(const ScheduledTask& t) {
  return std::uint32_t{value(t.priority)} | (t.is_preemptible ? 0x100u : 0u);
}

}  // namespace

SchedulerCore::SchedulerCore(const SchedulerConfig& config)
    : config_(config),
      capacity_(config.max_queue_size),
      slab_size_(config.max_queue_size + kSlack),
      ring_count_(config.priority_scheduling ? kPriorityCount : 1) {
  const std::size_t cells = std::bit_ceil(slab_size_ + 1);
  for (std::size_t i = 0; i < ring_count_; ++i) {
    rings_[i].cells = std::make_unique<std::atomic<std::uint64_t>[]>(cells);  // all EMPTY(0)
    rings_[i].mask = cells - 1;
    rings_[i].shift = static_cast<unsigned>(std::countr_zero(cells));
  }
  slots_ = std::make_unique<Slot[]>(slab_size_);
  const std::size_t buckets = std::bit_ceil(2 * slab_size_);
  buckets_ = std::make_unique<std::atomic<std::uint64_t>[]>(buckets);
  reach_ = std::make_unique<std::atomic<std::uint32_t>[]>(buckets);
  index_mask_ = buckets - 1;
  memory_bytes_ = sizeof(*this) + ring_count_ * cells * sizeof(std::atomic<std::uint64_t>) +
                  slab_size_ * sizeof(Slot) +
                  buckets * (sizeof(std::atomic<std::uint64_t>) + sizeof(std::atomic<std::uint32_t>));
}

TaskId SchedulerCore::next_id() noexcept {
  // relaxed: uniqueness comes from the atomicity of the RMW; nothing is published.
  return ids_.fetch_add(1, std::memory_order::relaxed);
}

std::size_t SchedulerCore::len() const noexcept {
  // relaxed: a snapshot of a counter; it publishes no task data.
  return static_cast<std::size_t>(count_.load(std::memory_order::relaxed));
}

bool SchedulerCore::reserve() noexcept {
  // relaxed: count_ gates capacity only; tasks are published through cells and
  // slot states. Coherence still orders it after any removal that
  // happened-before this call, so freed capacity is seen.
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

std::uint32_t SchedulerCore::alloc_slot() noexcept {
  for (;;) {
    // (F1) acquire pairs with the release CAS in free_slot (F2): the popped
    // slot's next_free link and its new FREE(gen) state are visible.
    std::uint64_t head = free_.load(std::memory_order::acquire);
    while ((head & 0xffffffffu) != 0) {
      const std::uint32_t s = static_cast<std::uint32_t>(head & 0xffffffffu) - 1;
      // relaxed: a stale link only makes the tagged CAS below fail.
      const std::uint64_t next = slots_[s].next_free.load(std::memory_order::relaxed);
      const std::uint64_t tag = (head >> 32) + 1;
      // acquire on success: as (F1), for the slot we now own.
      if (free_.compare_exchange_weak(head, tag << 32 | next, std::memory_order::acquire,
                                      std::memory_order::acquire)) {
        return s;
      }
    }
    // relaxed: a never-used slot carries no data to publish.
    std::uint64_t b = bump_.load(std::memory_order::relaxed);
    while (b < slab_size_) {
      if (bump_.compare_exchange_weak(b, b + 1, std::memory_order::relaxed)) return static_cast<std::uint32_t>(b);
    }
    // Every spare slot belongs to a removal that has decremented count_ and not
    // yet pushed its slot back (more than kSlack at once): wait for one.
    cpu_relax();
  }
}

void SchedulerCore::free_slot(std::uint32_t s, std::uint64_t gen) noexcept {
  Slot& slot = slots_[s];
  // relaxed: published by the release CAS (F2) below.
  slot.state.store(make_state(gen + 1, kFree), std::memory_order::relaxed);
  std::uint64_t head = free_.load(std::memory_order::relaxed);  // relaxed: only the CAS value matters
  for (;;) {
    // relaxed: published by (F2).
    slot.next_free.store(static_cast<std::uint32_t>(head & 0xffffffffu), std::memory_order::relaxed);
    const std::uint64_t tag = (head >> 32) + 1;
    // (F2) release pairs with the acquire in alloc_slot (F1).
    if (free_.compare_exchange_weak(head, tag << 32 | (s + 1), std::memory_order::release,
                                    std::memory_order::relaxed)) {
      return;
    }
  }
}

// ---------------------------------------------------------------------------
// Index: open addressing with per-home reach. Uniqueness of ids: an inserter
// first claims a free bucket, then raises its home's reach, then rescans the
// home's probe range. Both steps are seq_cst, so of two concurrent inserters
// of one id at least one sees the other (the store-buffer argument); whoever
// sees another live inserter of its id backs off and retries, and whoever sees
// a QUEUED task of its id reports DuplicateId.
// ---------------------------------------------------------------------------

bool SchedulerCore::index_insert(TaskId id, std::uint32_t s, std::uint64_t gen, std::uint32_t& bucket) noexcept {
  const std::uint64_t h = mix(id);
  const std::uint64_t home = h & index_mask_;
  const std::uint64_t entry = make_entry(s, gen, h >> 57);
  for (unsigned backoff = 1;; backoff = backoff < 1024 ? backoff * 2 : backoff) {
    // Claim the first free bucket from home.
    std::uint64_t d = 0;
    for (;; ++d) {
      std::uint64_t expected = 0;
      if (buckets_[(home + d) & index_mask_].load() == 0 &&
          buckets_[(home + d) & index_mask_].compare_exchange_strong(expected, entry)) {
        break;
      }
    }
    const std::uint64_t mine = (home + d) & index_mask_;
    std::uint32_t r = reach_[home].load();
    while (r < d + 1 && !reach_[home].compare_exchange_weak(r, static_cast<std::uint32_t>(d + 1))) {
    }
    // Rescan every bucket an entry of this home may occupy.
    bool duplicate = false, contended = false;
    const std::uint32_t range = reach_[home].load();
    for (std::uint64_t i = 0; i < range && !duplicate && !contended; ++i) {
      const std::uint64_t b = (home + i) & index_mask_;
      if (b == mine) continue;
      const std::uint64_t e = buckets_[b].load();
      if (e == 0 || entry_fp(e) != entry_fp(entry)) continue;
      Slot& other = slots_[entry_slot(e)];
      const std::uint64_t st = other.state.load();
      if ((gen_of(st) & kGenMask) != entry_gen(e)) continue;
      // relaxed: ordered after the seq_cst state load; validated by re-reading it.
      const TaskId other_id = other.id.load(std::memory_order::relaxed);
      if (other.state.load() != st || other_id != id) continue;
      if (st_of(st) == kQueued) duplicate = true;
      if (st_of(st) == kFilling) contended = true;
    }
    if (!duplicate && !contended) {
      bucket = static_cast<std::uint32_t>(mine);
      return true;
    }
    buckets_[mine].store(0);
    if (duplicate) return false;
    // Another schedule() of this id is between its claim and its verdict.
    for (unsigned i = 0; i < backoff; ++i) cpu_relax();
  }
}

void SchedulerCore::index_erase(std::uint32_t bucket, std::uint64_t entry) noexcept {
  std::uint64_t expected = entry;
  buckets_[bucket].compare_exchange_strong(expected, 0);
}

// ---------------------------------------------------------------------------
// schedule
// ---------------------------------------------------------------------------

std::size_t SchedulerCore::ring_of(Priority p) const noexcept {
  // rings_[0] holds the highest priority, so that scans run upwards in memory.
  return ring_count_ == 1 ? 0 : kPriorityCount - 1 - value(p);
}

std::error_code SchedulerCore::schedule(const ScheduledTask& task) noexcept {
  if (!reserve()) return ScheduleError::QueueFull;
  const std::uint32_t s = alloc_slot();
  Slot& slot = slots_[s];
  // relaxed: we own the slot; it is FREE(gen) until we publish it.
  const std::uint64_t gen = gen_of(slot.state.load(std::memory_order::relaxed));
  // relaxed (these five): published by the seq_cst bucket CAS in index_insert
  // and by the release store of QUEUED below.
  slot.state.store(make_state(gen, kFilling), std::memory_order::relaxed);
  slot.id.store(task.id, std::memory_order::relaxed);
  slot.tokens.store(task.estimated_tokens, std::memory_order::relaxed);
  slot.meta.store(pack_meta(task), std::memory_order::relaxed);
  std::uint32_t bucket = 0;
  if (!index_insert(task.id, s, gen, bucket)) {
    free_slot(s, gen);
    unreserve();
    return ScheduleError::DuplicateId;
  }
  slot.bucket.store(bucket, std::memory_order::relaxed);
  // From here cancel(id) can claim the task, even before it is published.
  // (Q1) release pairs with the acquire/seq_cst state loads in cancel and take.
  slot.state.store(make_state(gen, kQueued), std::memory_order::release);
  publish(rings_[ring_of(task.priority)], s, gen);
  return {};
}

void SchedulerCore::publish(Ring& ring, std::uint32_t s, std::uint64_t gen) noexcept {
  Slot& slot = slots_[s];
  for (;;) {
    if (st_of(slot.state.load()) == kRemoved) {
      // Cancelled before any publish succeeded: no cell holds it, so it is ours
      // to free (R4).
      free_slot(s, gen);
      return;
    }
    const std::uint64_t t = ring.tail.fetch_add(1);
    slot.ticket.store(t);
    const std::uint64_t r = t >> ring.shift;
    std::atomic<std::uint64_t>& cell = ring.cells[t & ring.mask];
    std::uint64_t w = cell.load();
    for (;;) {
      const std::int64_t age = round_diff(cell_round(w), r);
      if (age > 0 || (age < 0 && cell_occ(w))) break;  // lost the ticket, or an earlier lap's task sits here
      if (age == 0 && cell_occ(w)) break;              // cannot happen (tickets are unique); be safe
      if (cell.compare_exchange_weak(w, occ_cell(r, s))) {
        // Published. If a cancel claimed the task meanwhile it may have missed
        // this cell (it read an older ticket): clear it ourselves. Of this
        // load and cancel's ticket load after its claim, at least one sees the
        // other's write (both seq_cst), so the tombstone is always cleared.
        const std::uint64_t st = slot.state.load();
        if (st == make_state(gen, kRemoved)) clear_cell(cell, occ_cell(r, s), r);
        return;
      }
    }
  }
}

void SchedulerCore::clear_cell(std::atomic<std::uint64_t>& cell, std::uint64_t w, std::uint64_t round) noexcept {
  std::uint64_t expected = w;
  if (cell.compare_exchange_strong(expected, empty_cell(round + 1))) {
    const std::uint32_t s = cell_slot(w);
    free_slot(s, gen_of(slots_[s].state.load()));
  }
}

// ---------------------------------------------------------------------------
// next / peek / clear
// ---------------------------------------------------------------------------

ScheduledTask SchedulerCore::read_task(const Slot& slot) const noexcept {
  // relaxed (all three): ordered after the seq_cst state load that found the
  // slot QUEUED; valid only if a later CAS or load finds the same state word.
  ScheduledTask t(slot.id.load(std::memory_order::relaxed), slot.tokens.load(std::memory_order::relaxed));
  const std::uint32_t meta = slot.meta.load(std::memory_order::relaxed);
  t.priority = static_cast<Priority>(meta & 0xff);
  t.is_preemptible = (meta & 0x100) != 0;
  return t;
}

void SchedulerCore::finish_take(Ring& ring, std::uint64_t t, std::uint64_t w, std::uint32_t s, std::uint64_t gen,
                                std::uint32_t bucket, TaskId id) noexcept {
  clear_cell(ring.cells[t & ring.mask], w, t >> ring.shift);
  std::uint64_t expected = t;
  ring.head.compare_exchange_strong(expected, t + 1);
  index_erase(bucket, make_entry(s, gen, mix(id) >> 57));
  unreserve();
}

template <class Validate>
SchedulerCore::Take SchedulerCore::take_from(Ring& ring, std::uint64_t limit, bool remove, Validate&& validate,
                                             std::optional<ScheduledTask>& out, std::uint64_t& empty_tail) noexcept {
  for (;;) {
    std::uint64_t h = ring.head.load();
    const std::uint64_t t = ring.tail.load();
    // head <= tail always, so h >= t means head == tail when t was read (R1).
    if (h >= t || h >= limit) {
      empty_tail = t;
      return Take::kEmpty;
    }
    const std::uint64_t r = h >> ring.shift;
    std::atomic<std::uint64_t>& cell = ring.cells[h & ring.mask];
    std::uint64_t w = cell.load();
    const std::int64_t age = round_diff(cell_round(w), r);
    if (age > 0) {  // resolved already
      ring.head.compare_exchange_strong(h, h + 1);
      continue;
    }
    if (age < 0) continue;  // head moved on under us (R1); reload
    if (!cell_occ(w)) {
      // Ticket taken, not yet published. Give the producer a moment, then
      // invalidate the ticket rather than wait for it.
      for (int i = 0; i < 64 && w == empty_cell(r); ++i) {
        cpu_relax();
        w = cell.load();
      }
      if (w == empty_cell(r) && cell.compare_exchange_strong(w, empty_cell(r + 1))) {
        ring.head.compare_exchange_strong(h, h + 1);
      }
      continue;
    }
    const std::uint32_t s = cell_slot(w);
    Slot& slot = slots_[s];
    const std::uint64_t st = slot.state.load();
    if (cell.load() != w) continue;  // R2: st belongs to the task in this cell
    if (st_of(st) != kQueued) {      // a tombstone: taken or cancelled
      clear_cell(cell, w, r);
      ring.head.compare_exchange_strong(h, h + 1);
      continue;
    }
    ScheduledTask task = read_task(slot);
    // relaxed: validated by the claim below, like the fields.
    const std::uint32_t bucket = slot.bucket.load(std::memory_order::relaxed);
    if (!validate()) return Take::kRetry;
    if (!remove) {
      if (slot.state.load() != st) continue;
      out = task;
      return Take::kGot;
    }
    std::uint64_t expected = st;
    if (!slot.state.compare_exchange_strong(expected, make_state(gen_of(st), kRemoved))) continue;
    finish_take(ring, h, w, s, gen_of(st), bucket, task.id);
    out = task;
    return Take::kGot;
  }
}

std::optional<ScheduledTask> SchedulerCore::take(bool remove) noexcept {
  std::optional<ScheduledTask> out;
  for (;;) {
    std::uint64_t seen[kPriorityCount];
    std::size_t seen_count = 0;
    // The rings above the one being read must still show the tails at which
    // they were found empty: then they held no task at that moment.
    auto validate = [&]() noexcept {
      for (std::size_t j = 0; j < seen_count; ++j) {
        if (rings_[j].tail.load() != seen[j]) return false;
      }
      return true;
    };
    bool retry = false;
    for (std::size_t i = 0; i < ring_count_ && !retry; ++i) {
      switch (take_from(rings_[i], UINT64_MAX, remove, validate, out, seen[seen_count])) {
        case Take::kGot: return out;
        case Take::kRetry: retry = true; break;
        case Take::kEmpty: ++seen_count; break;
      }
    }
    // Empty: each ring was empty when its tail was read and, if the tails are
    // unchanged now, still is, so all were empty at the last ring's read.
    if (!retry && validate()) return std::nullopt;
  }
}

std::vector<ScheduledTask> SchedulerCore::clear() {
  std::vector<ScheduledTask> out;
  out.reserve(len());
  // Tickets taken before clear() began cover every task queued by then.
  std::uint64_t limit[kPriorityCount];
  for (std::size_t i = 0; i < ring_count_; ++i) limit[i] = rings_[i].tail.load();
  auto no_check = []() noexcept { return true; };
  for (std::size_t i = 0; i < ring_count_; ++i) {
    std::optional<ScheduledTask> got;
    std::uint64_t unused = 0;
    while (take_from(rings_[i], limit[i], true, no_check, got, unused) == Take::kGot) out.push_back(*got);
  }
  return out;
}

// ---------------------------------------------------------------------------
// cancel
// ---------------------------------------------------------------------------

std::optional<ScheduledTask> SchedulerCore::cancel(TaskId id) noexcept {
  const std::uint64_t h = mix(id);
  const std::uint64_t home = h & index_mask_;
  const std::uint64_t fp = h >> 57;
restart:
  const std::uint32_t range = reach_[home].load();
  for (std::uint64_t i = 0; i < range; ++i) {
    const std::uint32_t b = static_cast<std::uint32_t>((home + i) & index_mask_);
    const std::uint64_t e = buckets_[b].load();
    if (e == 0 || entry_fp(e) != fp) continue;
    const std::uint32_t s = entry_slot(e);
    Slot& slot = slots_[s];
    const std::uint64_t st = slot.state.load();
    if ((gen_of(st) & kGenMask) != entry_gen(e) || st_of(st) != kQueued) continue;
    const ScheduledTask task = read_task(slot);
    if (task.id != id) continue;
    std::uint64_t expected = st;
    if (!slot.state.compare_exchange_strong(expected, make_state(gen_of(st), kRemoved))) goto restart;
    // Claimed. Clear the cell that holds it, if it is published: read the
    // ticket after the claim (see publish() for why one of us clears it). The
    // slot is not freed while its cell holds it, and the generation check
    // proves the ticket belongs to this task.
    Ring& ring = rings_[ring_of(task.priority)];
    for (std::uint64_t last = UINT64_MAX;;) {
      const std::uint64_t t = slot.ticket.load();
      if (t == last || slot.state.load() != make_state(gen_of(st), kRemoved)) break;
      last = t;
      const std::uint64_t r = t >> ring.shift;
      std::atomic<std::uint64_t>& cell = ring.cells[t & ring.mask];
      if (cell.load() == occ_cell(r, s)) {
        clear_cell(cell, occ_cell(r, s), r);
        break;
      }
    }
    index_erase(b, e);
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
