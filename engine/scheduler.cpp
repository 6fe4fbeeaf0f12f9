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

// Bucket state words: gen:39 | fp:20 | preemptible:1 | priority:2 | st:2.
constexpr std::uint64_t kFree = 0, kFilling = 1, kQueued = 2, kRemoved = 3;
constexpr unsigned kFpShift = 5, kGenShift = 25;
constexpr std::uint64_t kFpMask = (std::uint64_t{1} << 20) - 1;
constexpr std::uint64_t st_of(std::uint64_t s) { return s & 3; }
constexpr std::uint64_t gen_of(std::uint64_t s) { return s >> kGenShift; }
constexpr std::uint64_t fp_of(std::uint64_t s) { return (s >> kFpShift) & kFpMask; }
constexpr std::uint64_t with_st(std::uint64_t s, std::uint64_t st) { return (s & ~std::uint64_t{3}) | st; }
constexpr std::uint64_t free_state(std::uint64_t gen) { return gen << kGenShift; }
constexpr std::uint64_t filling_state(std::uint64_t gen, std::uint64_t fp, const ScheduledTask& t) {
  return gen << kGenShift | fp << kFpShift | (t.is_preemptible ? 16u : 0u) | std::uint64_t{value(t.priority)} << 2 |
         kFilling;
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

constexpr std::uint64_t mix(std::uint64_t x) {  // splitmix64 finalizer
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
constexpr std::uint64_t fp_of_hash(std::uint64_t h) { return h >> 44; }  // top 20 bits; home uses the low ones

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

ScheduledTask task_of(const Bucket& b, std::uint64_t state) noexcept {
  // relaxed (both): ordered after the seq_cst state load that returned
  // `state`; valid only if a later CAS or load finds the same word (I6).
  ScheduledTask t(b.id.load(std::memory_order::relaxed), b.tokens.load(std::memory_order::relaxed));
  t.priority = static_cast<Priority>((state >> 2) & 3);
  t.is_preemptible = (state & 16) != 0;
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
  const std::size_t buckets = std::bit_ceil(capacity_ + capacity_ / 2 + 64);
  static_assert(std::bit_ceil(kMaxQueueSize + kMaxQueueSize / 2 + 64) <= kSlotMask + 1);
  table_ = std::make_unique<Bucket[]>(buckets);
  reach_ = std::make_unique<std::atomic<std::uint32_t>[]>(buckets);
  table_mask_ = buckets - 1;
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

std::uint32_t SchedulerCore::claim_bucket(const ScheduledTask& task, std::uint64_t hash) noexcept {
  const std::uint64_t home = hash & table_mask_;
  const std::uint64_t fp = fp_of_hash(hash);
  for (unsigned backoff = 1;; backoff = backoff < 4096 ? backoff * 2 : backoff) {
    // Claim the first free bucket from home (the table is at most 2/3 full).
    std::uint64_t d = 0, mine = 0, state = 0;
    for (;; ++d) {
      mine = (home + d) & table_mask_;
      std::uint64_t s = table_[mine].state.load();
      if (st_of(s) != kFree) continue;
      state = filling_state(gen_of(s), fp, task);
      if (table_[mine].state.compare_exchange_strong(s, state)) break;
    }
    Bucket& bucket = table_[mine];
    // relaxed (both): published by the release store of QUEUED in schedule().
    bucket.id.store(task.id, std::memory_order::relaxed);
    bucket.tokens.store(task.estimated_tokens, std::memory_order::relaxed);
    std::uint32_t r = reach_[home].load();
    while (r < d + 1 && !reach_[home].compare_exchange_weak(r, static_cast<std::uint32_t>(d + 1))) {
    }
    // Rescan every bucket an entry of this home may occupy (I5).
    bool duplicate = false, contended = false;
    const std::uint32_t range = reach_[home].load();
    for (std::uint64_t i = 0; i < range; ++i) {
      const std::uint64_t b = (home + i) & table_mask_;
      const std::uint64_t s = table_[b].state.load();
      if (b == mine || fp_of(s) != fp) continue;
      if (st_of(s) == kFilling) {  // its id may not be written yet: assume ours
        contended = true;
        break;
      }
      if (st_of(s) != kQueued) continue;
      // relaxed: ordered after the seq_cst load that saw QUEUED, which
      // synchronizes with the release store that published the id.
      const TaskId other = table_[b].id.load(std::memory_order::relaxed);
      if (other == task.id && table_[b].state.load() == s) {
        duplicate = true;
        break;
      }
    }
    if (!duplicate && !contended) return static_cast<std::uint32_t>(mine);
    free_bucket(static_cast<std::uint32_t>(mine), state);
    if (duplicate) return UINT32_MAX;
    // Another schedule() whose id shares our 20-bit fingerprint is between its
    // claim and its verdict (normally: the same id scheduled twice at once).
    for (unsigned i = 0; i < backoff; ++i) cpu_relax();
  }
}

std::size_t SchedulerCore::ring_of(Priority p) const noexcept {
  return ring_count_ == 1 ? 0 : kPriorityCount - 1 - value(p);
}

std::error_code SchedulerCore::schedule(const ScheduledTask& task) noexcept {
  if (!reserve()) return ScheduleError::QueueFull;
  const std::uint32_t b = claim_bucket(task, mix(task.id));
  if (b == UINT32_MAX) {
    unreserve();
    return ScheduleError::DuplicateId;
  }
  // From here cancel(id) can claim the task, even before it is published.
  // (Q1) release: publishes id and tokens to whoever loads QUEUED.
  const std::uint64_t queued = with_st(table_[b].state.load(std::memory_order::relaxed), kQueued);  // relaxed: our own write
  table_[b].state.store(queued, std::memory_order::release);
  publish(rings_[ring_of(task.priority)], b, queued);
  return {};
}

void SchedulerCore::publish(Ring& ring, std::uint32_t b, std::uint64_t queued) noexcept {
  Bucket& bucket = table_[b];
  const std::uint64_t removed = with_st(queued, kRemoved);
  for (;;) {
    if (bucket.state.load() == removed) {
      // Cancelled before any publish succeeded: no cell holds it (I4).
      free_bucket(b, removed);
      return;
    }
    const std::uint64_t t = ring.tail.fetch_add(1);
    bucket.ticket.store(t);
    const std::uint64_t r = t >> ring.shift;
    std::atomic<std::uint64_t>& cell = ring.cells[t & ring.mask];
    std::uint64_t w = cell.load();
    while (!cell_occ(w) && round_diff(cell_round(w), r) <= 0) {
      if (cell.compare_exchange_weak(w, occ_cell(r, b))) {
        // Published. A cancel that claimed the task meanwhile may have read an
        // older ticket and missed this cell. Of this load and cancel's ticket
        // load after its claim, at least one sees the other's write (all
        // seq_cst), so one of us clears the tombstone.
        if (bucket.state.load() == removed) clear_cell(cell, occ_cell(r, b), r);
        return;
      }
    }
    // Lost the ticket (a consumer invalidated it or a later lap took the
    // cell), or an earlier lap's task still sits here: take another.
  }
}

void SchedulerCore::clear_cell(std::atomic<std::uint64_t>& cell, std::uint64_t w, std::uint64_t round) noexcept {
  std::uint64_t expected = w;
  if (cell.compare_exchange_strong(expected, empty_cell(round + 1))) {
    const std::uint32_t b = cell_bucket(w);
    free_bucket(b, table_[b].state.load());
  }
}

// ---------------------------------------------------------------------------
// next / peek / clear
// ---------------------------------------------------------------------------

template <class Validate>
SchedulerCore::Take SchedulerCore::take_from(Ring& ring, std::uint64_t limit, bool remove, Validate&& validate,
                                             std::optional<ScheduledTask>& out, std::uint64_t& empty_tail) noexcept {
  for (;;) {
    std::uint64_t h = ring.head.load();
    const std::uint64_t t = ring.tail.load();
    // head <= tail always, so h >= t means head == tail when t was read (I1).
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
    if (age < 0) continue;  // head moved on under us (I1); reload
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
    const std::uint32_t b = cell_bucket(w);
    Bucket& bucket = table_[b];
    const std::uint64_t st = bucket.state.load();
    if (cell.load() != w) continue;  // I2: st belongs to the task in this cell
    if (st_of(st) != kQueued) {      // a tombstone: taken or cancelled
      clear_cell(cell, w, r);
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
    if (!bucket.state.compare_exchange_strong(expected, with_st(st, kRemoved))) continue;
    std::uint64_t clear = w;
    if (cell.compare_exchange_strong(clear, empty_cell(r + 1))) free_bucket(b, st);
    ring.head.compare_exchange_strong(h, h + 1);
    unreserve();
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
  const std::uint64_t hash = mix(id);
  const std::uint64_t home = hash & table_mask_;
  const std::uint64_t fp = fp_of_hash(hash);
restart:
  const std::uint32_t range = reach_[home].load();
  for (std::uint64_t i = 0; i < range; ++i) {
    const std::uint32_t b = static_cast<std::uint32_t>((home + i) & table_mask_);
    Bucket& bucket = table_[b];
    const std::uint64_t st = bucket.state.load();
    if (st_of(st) != kQueued || fp_of(st) != fp) continue;
    const ScheduledTask task = task_of(bucket, st);
    if (task.id != id) continue;
    std::uint64_t expected = st;
    const std::uint64_t removed = with_st(st, kRemoved);
    if (!bucket.state.compare_exchange_strong(expected, removed)) goto restart;
    // Claimed. Clear the cell that holds it, if it is published: read the
    // ticket after the claim (see publish() for why one of us clears it). The
    // bucket is not freed while its cell holds it, and re-reading the state
    // after the ticket proves the ticket belongs to this task.
    Ring& ring = rings_[ring_of(task.priority)];
    for (std::uint64_t last = UINT64_MAX;;) {
      const std::uint64_t t = bucket.ticket.load();
      if (t == last || bucket.state.load() != removed) break;
      last = t;
      const std::uint64_t r = t >> ring.shift;
      std::atomic<std::uint64_t>& cell = ring.cells[t & ring.mask];
      if (cell.load() == occ_cell(r, b)) {
        clear_cell(cell, occ_cell(r, b), r);
        break;
      }
    }
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
