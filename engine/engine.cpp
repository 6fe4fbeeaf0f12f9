// Engine: the serving-loop engine (see include/tgi_gtc/scheduling/engine.hpp
// for the contract and docs/engine.md for the walk-through of step()).
//
// ===========================================================================
// Layout
// ===========================================================================
//
//   shared with producers (lock-free, engine_index.hpp)
//     waiting_        Scheduler: the waiting tasks (the user-visible queue)
//     live_           Scheduler used as a set of ids: every waiting, running
//                     or paused id (the DuplicateId authority, see below)
//     index_          ActiveIndex: id -> slot, running and paused tasks
//     slots_[S]       TaskSlot: occupant id + stamp, posted cancel stamp
//     cancel_bell_    [own line] "some slot has a cancel posted"
//     device_, host_  BlockPool (free_blocks() read by stats())
//
//   serving loop only
//     recs_[S]        TaskRec: the task, its tokens, device and host blocks,
//                     list links; S = levels x max_running + kSpareSlots
//     victims_[L]     running preemptible tasks of level L, oldest admission
//                     first (intrusive list) + their device block total
//     paused_[L]      paused tasks of level L by arrival stamp (intrusive)
//     deficit_        running tasks short of blocks (append_tokens failed)
//     plan_ + spare vectors recycled from the previous plan
//
//   A level is the priority with priority scheduling on, else 0 for all.
//
// ===========================================================================
// Task states (the stamp is taken when step() takes the task from waiting_;
// stamps are unique and increase in arrival order within a level)
// ===========================================================================
//
//   from      to         by                               thread
//   -         waiting    submit: live_ then waiting_      any
//   waiting   cancelled  cancel: waiting_ then live_      any
//   waiting   running    step(): slot + index_, then waiting_.cancel(id)
//                        (the take), blocks               loop
//   running   paused     step(): preemption               loop
//   paused    running    step(): resumption               loop
//   running   finished   finish(): blocks, slot, index_, then live_
//   running / cancelled  cancel() on the loop, or a posted cancel found by
//   paused               the next step(): same order as finish   loop
//
// ===========================================================================
// Invariants
// ===========================================================================
//   E1 An id is in live_ from the start of a successful submit until its task
//      has left waiting_, recs_ and index_. submit claims the id in live_
//      first, so two tasks with one id never coexist (no double admission).
//   E2 A task moving from waiting to running is in index_ (and its slot
//      occupied) before it leaves waiting_. A producer's cancel tries
//      waiting_ first and index_ second: if it missed the task in waiting_
//      because the loop had taken it, the Scheduler's seq_cst removal it
//      observed is ordered after the index insert, so index_ has it. (The
//      loop takes a peeked task by id with Scheduler::cancel, not next(), so
//      the task taken is the task registered.)
//   E3 Blocks: every device block is free or in exactly one running task's
//      table; every host block is free, in exactly one paused task's swap
//      set, or (during a step) waiting in deferred_host_.
//   E4 Per level L: running(L) + paused(L) <= max_running. A waiting task of
//      level L is admitted only when no paused task of level L is left (they
//      come first and the first misfit stops the step), and a resumption or
//      preemption moves a task between the two sets. Hence at most
//      levels x max_running tasks hold a slot (+ kSpareSlots, for the tasks
//      admit_waiting parks).
//   E5 victim_blocks_[L] == sum of device blocks over victims_[L].
//   E6 A task appears at most once in a plan: a task paused by this step is
//      not resumed by it, and a task admitted or resumed by it is not paused
//      by it (entered_step; fresh_blocks_/fresh_count_ keep the victim sums
//      O(levels) without them).
//   E7 At most one cancel() returns true for a task. From waiting_, the
//      Scheduler's cancel decides; once it is running or paused (or parked),
//      the CAS in TaskSlot::post_cancel does, loop-thread cancels included
//      (they post too, then carry the cancel out at once).
//
// ===========================================================================
// Decisions the contract leaves open (docs/engine.md, "Semantics")
// ===========================================================================
//   - A paused task is a candidate in its place; one paused in this step
//     cannot run this step, so reaching it ends admission for the step.
//   - A task whose prefill cost exceeds max_step_tokens is admitted only as
//     the first task served by the step (admission or resumption), and ends
//     admission for the step.
//   - Swap-in resumptions cost no prefill tokens.
//   - With enable_preemption off nothing is ever paused: a task that cannot
//     grow stalls until blocks are freed.
//   - For growth, victims ordered before the task itself are preempted only
//     if together they make room; otherwise the task itself is paused (when
//     preemptible), else it stalls. A task grown by a step is no victim of a
//     later growth in that step (as vLLM's scheduler takes victims only among
//     the sequences it has not served yet): a non-preemptible task may pause
//     older ones of its level, and would otherwise undo the growth, served
//     first, of one of them, and the pauses made for it.
//
// ===========================================================================
// Running out of memory (std::bad_alloc)
// ===========================================================================
//   Every decision of a step (preempt, resume, admit) and every growth first
//   obtains all the memory it needs (block lists, copy lists, plan entries,
//   the deficit list: reserve() or a recycled vector), then changes state
//   with no allocation left to fail. So a throw leaves no half-made decision.
//   step() catches std::bad_alloc: with nothing decided yet it rethrows
//   (cancels drained and growth served so far need no plan entry); after a
//   decision it returns the plan made so far, every entry complete, and
//   counts the step in cut_short_, because a preemption's swap-out must
//   reach the caller. append_tokens restores the task's token count and
//   rethrows: nothing changed.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cassert>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>

#include <tgi_gtc/scheduling/engine.hpp>

#include "engine_index.hpp"

namespace tgi_gtc::scheduling {
namespace detail {

#ifdef TGI_GTC_TEST_HOOKS
// Test builds only (tgi_gtc_scheduling_hooks, as the Scheduler's hooks in
// scheduler.cpp): called by step() with the id of the waiting task it peeked,
// before it registers the task and takes it out of the waiting queue, so a
// test can cancel and re-submit that id there (the park in admit_waiting).
void (*g_admit_peeked_hook)(std::uint64_t id) = nullptr;
// Reads its pointer once: a test may clear it while the loop passes the hook.
#define TGI_GTC_ADMIT_PEEKED(id) \
  if (auto* hook_ = g_admit_peeked_hook) hook_(id)
#else
#define TGI_GTC_ADMIT_PEEKED(id)
#endif

namespace {

// Thread serials tell the serving loop from producers (on_loop_thread()). Not
// std::thread::id: glibc gives a new thread the id of one that exited, so a
// producer started after the loop thread's exit could pass for the loop and
// run loop-only code beside the new loop thread. A serial is never reused
// (2^64 threads). 0: no thread. Constant-initialized, initial-exec TLS, as
// t_hint in block_pool.cpp: no guard, no __tls_get_addr.
std::atomic<std::uint64_t> g_thread_serials{0};
[[gnu::tls_model("initial-exec")]] thread_local std::uint64_t t_thread_serial = 0;

std::uint64_t this_thread_serial() noexcept {
  if (t_thread_serial == 0) {
    // relaxed: only uniqueness matters (the counter's modification order);
    // it publishes nothing and pairs with no other operation.
    t_thread_serial = g_thread_serials.fetch_add(1, std::memory_order::relaxed) + 1;
  }
  return t_thread_serial;
}

constexpr std::uint32_t kNil = ~std::uint32_t{0};
constexpr std::uint32_t kMaxRunning = std::uint32_t{1} << 20;
// Slots beyond the E4 bound, for tasks parked by the re-submission race in
// admit_waiting() (each needs a cancel and a same-id submit inside one take).
constexpr std::uint32_t kSpareSlots = 64;
// live_ entries beyond waiting + slots: submits and cancels in flight hold one
// each for a moment (submit between its two schedules, cancel between its two
// removals).
constexpr std::size_t kLiveSlack = 1024;
// Up-front capacity of per-step vectors; larger plans grow them once.
constexpr std::size_t kReserveCap = 4096;

enum class State : std::uint8_t { kFree, kRunning, kPaused };

struct TaskRec {
  ScheduledTask task{0, 0};
  std::size_t tokens = 0;        // tokens so far (estimate + appended)
  std::vector<BlockId> device;   // block table, token order (running)
  std::vector<BlockId> host;     // swapped-out copy (paused, !recompute)
  std::uint64_t stamp = 0;       // arrival order, unique
  std::uint64_t admitted = 0;    // admission order (resumptions count)
  std::uint64_t paused_step = 0; // step that paused it
  std::uint64_t entered_step = 0;// step that admitted or resumed it
  std::uint64_t grown_step = 0;  // step whose growth served it
  std::uint32_t prev = kNil;     // links in victims_[level] or paused_[level]
  std::uint32_t next = kNil;
  std::uint32_t deficit_pos = kNil;
  std::uint8_t level = 0;
  State state = State::kFree;
  bool in_victims = false;
  bool recompute = false;   // paused with its KV released
  bool never_ran = false;   // parked before its first admission
  bool over_pool = false;   // needs more blocks than the device pool has
};

struct List {
  std::uint32_t head = kNil;
  std::uint32_t tail = kNil;
  std::uint32_t size = 0;
};

// Capacity for `extra` more elements, growing geometrically. May throw
// std::bad_alloc; afterwards that many push_backs allocate nothing.
template <class T>
void room_for(std::vector<T>& v, std::size_t extra) {
  if (v.capacity() - v.size() >= extra) return;
  v.reserve(std::max(v.size() + extra, 2 * v.capacity()));
}

// Keeps `v`'s buffer for a later plan. If the spare list cannot grow, the
// buffer is simply freed (push_back leaves `v` untouched when it throws).
template <class T>
void keep_spare(std::vector<std::vector<T>>& spares, std::vector<T>&& v) noexcept {
  if (v.capacity() == 0) return;
  try {
    spares.push_back(std::move(v));
  } catch (const std::bad_alloc&) {
  }
}

std::string field_error(const char* field, const char* what) {
  return std::string("EngineConfig::") + field + " " + what;
}

std::uint32_t level_count(const EngineConfig& c) {
  return c.scheduler.priority_scheduling ? static_cast<std::uint32_t>(kPriorityCount) : 1;
}

// The largest waiting queue: live_ (a Scheduler, at most kMaxQueueSize) holds
// every waiting id plus the running and paused ones (slots) plus kLiveSlack.
std::size_t max_waiting(const EngineConfig& c) {
  const std::size_t slots = std::size_t{level_count(c)} * c.max_running + kSpareSlots;
  return kMaxQueueSize - slots - kLiveSlack;
}

const EngineConfig& checked(const EngineConfig& c) {
  if (c.device_blocks == 0 || c.device_blocks > kMaxBlocks) {
    throw std::invalid_argument(field_error("device_blocks", "must be in 1 .. kMaxBlocks"));
  }
  if (c.host_blocks > kMaxBlocks) {
    throw std::invalid_argument(field_error("host_blocks", "must not exceed kMaxBlocks"));
  }
  if (c.block_size == 0) throw std::invalid_argument(field_error("block_size", "must be at least 1"));
  if (c.max_running == 0 || c.max_running > kMaxRunning) {
    throw std::invalid_argument(field_error("max_running", "must be in 1 .. 2^20"));
  }
  if (c.max_step_tokens == 0) throw std::invalid_argument(field_error("max_step_tokens", "must be at least 1"));
  if (c.scheduler.max_queue_size == 0 || c.scheduler.max_queue_size > max_waiting(c)) {
    throw std::invalid_argument(field_error(
        "scheduler.max_queue_size",
        ("must be in 1 .. " + std::to_string(max_waiting(c)) +
         " (kMaxQueueSize less levels x max_running and 1,088: the engine's set of live ids, a Scheduler, "
         "also holds running, paused and in-flight ones)")
            .c_str()));
  }
  return c;
}

SchedulerConfig live_config(const EngineConfig& c, std::uint32_t slots) {
  SchedulerConfig s;
  s.max_queue_size = std::min(kMaxQueueSize, c.scheduler.max_queue_size + slots + kLiveSlack);
  s.priority_scheduling = false;
  s.enable_preemption = false;
  return s;
}

}  // namespace

class EngineCore {
 public:
  explicit EngineCore(const EngineConfig& config)
      : config_(checked(config)),
        levels_(level_count(config_)),
        slot_count_(levels_ * config_.max_running + kSpareSlots),
        waiting_(config_.scheduler),
        live_(live_config(config_, slot_count_)),
        device_(config_.device_blocks),
        host_(config_.host_blocks ? std::make_unique<BlockPool>(config_.host_blocks) : nullptr),
        index_(slot_count_),
        slots_(std::make_unique<TaskSlot[]>(slot_count_)),
        recs_(slot_count_) {
    free_slots_.reserve(slot_count_);
    for (std::uint32_t s = slot_count_; s-- > 0;) free_slots_.push_back(s);
    const std::size_t per_step = std::min<std::size_t>(config_.max_running, kReserveCap);
    deficit_.reserve(per_step);
    scratch_.reserve(per_step);
    plan_.preempted.reserve(per_step);
    plan_.resumed.reserve(per_step);
    plan_.admitted.reserve(per_step);
    spare_ids_.reserve(2 * per_step);
    spare_copies_.reserve(2 * per_step);
    deferred_host_.reserve(std::min<std::size_t>(config_.host_blocks, 16 * kReserveCap));
  }

  const EngineConfig& config() const noexcept { return config_; }
  const Scheduler& scheduler() const noexcept { return waiting_; }
  TaskId next_id() noexcept { return waiting_.next_id(); }

  // ---- any thread -------------------------------------------------------

  std::error_code submit(const ScheduledTask& task) noexcept {
    if (value(task.priority) >= kPriorityCount) return ScheduleError::InvalidPriority;
    if (blocks_for(task.estimated_tokens) > config_.device_blocks) return ScheduleError::ExceedsCapacity;
    // E1: claim the id first. DuplicateId here covers waiting, running and
    // paused alike, and also a task the loop is taking right now.
    if (std::error_code e = live_.schedule(ScheduledTask(task.id, 0))) return e;
    if (std::error_code e = waiting_.schedule(task)) {
      (void)live_.cancel(task.id);  // give the id back: nothing changed
      return e;
    }
    return {};
  }

  bool cancel(TaskId id) noexcept {
    if (on_loop_thread()) {
      if (const std::uint32_t s = index_.find_local(id); s != ActiveIndex::kNone) {
        // Carried out at once; reported only if no producer's cancel posted
        // it first (that one returned true): one true a task (E7).
        const bool first = slots_[s].post_cancel(recs_[s].stamp) == TaskSlot::Post::kPosted;
        terminate(s);
        publish();
        return first;
      }
      return cancel_waiting(id);
    }
    if (cancel_waiting(id)) return true;
    // E2: not waiting (any more); running, paused, or unknown.
    const std::uint32_t s = index_.find(id);
    if (s == ActiveIndex::kNone) return false;
    const std::uint64_t stamp = slots_[s].stamp_of(id);
    if (stamp == 0) return false;  // it left after the index lookup
    // S3: if the loop is taking it out of waiting_ right now, learn whether it
    // did. If the take failed (another cancel removed it first), the task
    // never ran and is gone; if it ran and left since, it is gone too.
    if (!slots_[s].ran(stamp)) return false;
    // E7: true only for the call whose post lands. Already posted: another
    // cancel marked it and returned true. Left: it finished, or a loop-thread
    // cancel ended it, after we saw it running; this cancel takes effect
    // after that (its load (C1) saw it gone), so there was no task to cancel.
    const TaskSlot::Post post = slots_[s].post_cancel(stamp);
    if (post != TaskSlot::Post::kPosted) return false;
    // (B1) release RMW: pairs with the acquire exchange (B2) in step(); an
    // RMW (not a store) so that earlier posts stay in the release sequence.
    // acq_rel, not release: LLVM before 16 rewrites a relaxed or release
    // exchange whose result is unused into a plain store (llvm-project
    // issue 60418), which would end that release sequence; Clang 14 did so
    // here. The acquire half costs nothing on x86-64 (xchg either way).
    cancel_bell_.exchange(true, std::memory_order::acq_rel);
    return true;
  }

  EngineStats stats() const {
    EngineStats st{};
    // relaxed: plain counters published by the loop (publish()'s relaxed
    // stores); no data hangs off them. A parked task (admit_waiting) never
    // ran: it counts as waiting, not paused.
    st.waiting = waiting_.len() + pub_.parked.load(std::memory_order::relaxed);
    st.running = pub_.running.load(std::memory_order::relaxed);
    st.paused = pub_.paused.load(std::memory_order::relaxed);
    st.stalled = pub_.stalled.load(std::memory_order::relaxed);
    st.preemptions = pub_.preemptions.load(std::memory_order::relaxed);
    st.resumptions = pub_.resumptions.load(std::memory_order::relaxed);
    st.recomputes = pub_.recomputes.load(std::memory_order::relaxed);
    st.cut_short = pub_.cut_short.load(std::memory_order::relaxed);
    st.device_free_blocks = device_.free_blocks();
    st.host_free_blocks = host_ ? host_->free_blocks() : 0;
    return st;
  }

  // ---- serving loop -----------------------------------------------------

  const StepPlan& step() {
    note_loop_thread();
    ++step_no_;
    recycle_plan();
    drain_cancels();
    try {
      serve_growth();
      admit();
    } catch (const std::bad_alloc&) {
      // Every decision is whole (see "Running out of memory" above).
      const bool decided = !plan_.preempted.empty() || !plan_.resumed.empty() || !plan_.admitted.empty();
      if (decided) ++cut_short_;
      end_step();
      if (!decided) throw;
      return plan_;
    }
    end_step();
    return plan_;
  }

  bool append_tokens(TaskId id, std::size_t n) {
    const std::uint32_t s = index_.find_local(id);
    if (s == ActiveIndex::kNone) return false;
    TaskRec& r = recs_[s];
    if (r.state != State::kRunning) return false;
    const std::size_t before = r.tokens;
    r.tokens = n > std::numeric_limits<std::size_t>::max() - r.tokens ? std::numeric_limits<std::size_t>::max()
                                                                        : r.tokens + n;
    if (blocks_for(r.tokens) <= r.device.size()) return true;
    bool ok;
    try {
      ok = grow(s);  // throws only before it changes anything
    } catch (const std::bad_alloc&) {
      r.tokens = before;
      throw;
    }
    publish();
    return ok;
  }

  void finish(TaskId id) {
    const std::uint32_t s = index_.find_local(id);
    if (s == ActiveIndex::kNone || recs_[s].state != State::kRunning) return;
    terminate(s);
    publish();
  }

  std::span<const BlockId> block_table(TaskId id) const {
    const std::uint32_t s = index_.find_local(id);
    if (s == ActiveIndex::kNone || recs_[s].state != State::kRunning) return {};
    return recs_[s].device;
  }

 private:
  // ---- helpers ----------------------------------------------------------

  std::size_t blocks_for(std::size_t tokens) const noexcept {
    const std::size_t bs = config_.block_size;
    return std::max<std::size_t>(1, tokens / bs + (tokens % bs != 0));
  }
  std::uint8_t level_of(const ScheduledTask& t) const noexcept {
    if (levels_ == 1) return 0;
    return static_cast<std::uint8_t>(std::min<std::size_t>(value(t.priority), kPriorityCount - 1));
  }

  bool on_loop_thread() const noexcept {
    // relaxed: a thread reads its own serial here only if it stored it
    // itself (step() on this thread; serials are never reused); a hand-over
    // of the loop to another thread must synchronize anyway (loop calls are
    // not concurrent).
    return loop_thread_.load(std::memory_order::relaxed) == this_thread_serial();
  }
  void note_loop_thread() noexcept {
    const std::uint64_t me = this_thread_serial();
    // relaxed: see on_loop_thread().
    if (loop_thread_.load(std::memory_order::relaxed) != me) loop_thread_.store(me, std::memory_order::relaxed);
  }

  // Returns the host blocks of this step's swap-ins to the pool (no swap-out
  // of the step could overwrite them any more) and publishes the counters.
  void end_step() noexcept {
    if (!deferred_host_.empty()) {
      const std::size_t n = host_->release(deferred_host_);
      assert(n == deferred_host_.size());
      (void)n;
      deferred_host_.clear();
    }
    publish();
  }

  void publish() noexcept {
    // relaxed: statistics only (see stats()).
    pub_.running.store(running_, std::memory_order::relaxed);
    pub_.paused.store(paused_count_, std::memory_order::relaxed);
    pub_.parked.store(parked_count_, std::memory_order::relaxed);
    pub_.stalled.store(deficit_.size(), std::memory_order::relaxed);
    pub_.preemptions.store(preemptions_, std::memory_order::relaxed);
    pub_.resumptions.store(resumptions_, std::memory_order::relaxed);
    pub_.recomputes.store(recomputes_, std::memory_order::relaxed);
    pub_.cut_short.store(cut_short_, std::memory_order::relaxed);
  }

  bool cancel_waiting(TaskId id) noexcept {
    if (!waiting_.cancel(id)) return false;
    (void)live_.cancel(id);  // E1: only after it left waiting_
    return true;
  }

  // Intrusive lists over recs_.
  void push_back(List& l, std::uint32_t s) noexcept {
    TaskRec& r = recs_[s];
    r.prev = l.tail;
    r.next = kNil;
    if (l.tail != kNil) {
      recs_[l.tail].next = s;
    } else {
      l.head = s;
    }
    l.tail = s;
    ++l.size;
  }
  void unlink(List& l, std::uint32_t s) noexcept {
    TaskRec& r = recs_[s];
    if (r.prev != kNil) {
      recs_[r.prev].next = r.next;
    } else {
      l.head = r.next;
    }
    if (r.next != kNil) {
      recs_[r.next].prev = r.prev;
    } else {
      l.tail = r.prev;
    }
    r.prev = r.next = kNil;
    --l.size;
  }

  void insert_paused(std::uint32_t s) noexcept {
    TaskRec& r = recs_[s];
    List& l = paused_[r.level];
    // Victims are mostly recent arrivals: walk from the tail.
    std::uint32_t after = l.tail;
    while (after != kNil && recs_[after].stamp > r.stamp) after = recs_[after].prev;
    r.prev = after;
    r.next = after == kNil ? l.head : recs_[after].next;
    if (r.prev != kNil) {
      recs_[r.prev].next = s;
    } else {
      l.head = s;
    }
    if (r.next != kNil) {
      recs_[r.next].prev = s;
    } else {
      l.tail = s;
    }
    ++l.size;
    paused_mask_ |= 1u << r.level;
    ++(r.never_ran ? parked_count_ : paused_count_);
    r.state = State::kPaused;
  }
  void remove_paused(std::uint32_t s) noexcept {
    TaskRec& r = recs_[s];
    List& l = paused_[r.level];
    unlink(l, s);
    if (l.size == 0) paused_mask_ &= ~(1u << r.level);
    --(r.never_ran ? parked_count_ : paused_count_);
  }

  // Callers make room in deficit_ first (grow()); push_back comes before the
  // position is recorded all the same.
  void set_deficit(std::uint32_t s) {
    TaskRec& r = recs_[s];
    if (r.deficit_pos != kNil) return;
    deficit_.push_back(s);
    r.deficit_pos = static_cast<std::uint32_t>(deficit_.size() - 1);
  }
  void clear_deficit(std::uint32_t s) noexcept {
    TaskRec& r = recs_[s];
    if (r.deficit_pos == kNil) return;
    const std::uint32_t last = deficit_.back();
    deficit_[r.deficit_pos] = last;
    recs_[last].deficit_pos = r.deficit_pos;
    deficit_.pop_back();
    r.deficit_pos = kNil;
  }

  void add_victim(std::uint32_t s) noexcept {
    TaskRec& r = recs_[s];
    push_back(victims_[r.level], s);
    victim_blocks_[r.level] += r.device.size();
    r.in_victims = true;
  }
  void remove_victim(std::uint32_t s) noexcept {
    TaskRec& r = recs_[s];
    if (!r.in_victims) return;
    unlink(victims_[r.level], s);
    victim_blocks_[r.level] -= r.device.size();
    r.in_victims = false;
  }

  // Only step() admits and resumes, so entered_step == step_no_ marks the
  // tasks this step put in the running set: never victims of the same step.
  void enter_running(std::uint32_t s) noexcept {
    TaskRec& r = recs_[s];
    r.state = State::kRunning;
    r.admitted = ++admit_seq_;
    r.entered_step = step_no_;
    ++running_;
    if (r.task.is_preemptible && !r.over_pool) {
      add_victim(s);
      fresh_blocks_[r.level] += r.device.size();
      ++fresh_count_[r.level];
    }
  }
  void leave_running(std::uint32_t s) noexcept {
    remove_victim(s);
    clear_deficit(s);
    --running_;
  }

  void release_device(TaskRec& r) noexcept {
    if (r.device.empty()) return;
    const std::size_t n = device_.release(r.device);
    assert(n == r.device.size());
    (void)n;
    r.device.clear();
  }
  void release_host(TaskRec& r) noexcept {
    if (r.host.empty()) return;
    const std::size_t n = host_->release(r.host);
    assert(n == r.host.size());
    (void)n;
    r.host.clear();
  }

  // A running or paused task leaves for good (finish or cancel): blocks,
  // then the slot and index_, then live_ (E1: the id is reusable only once
  // nothing refers to it).
  void terminate(std::uint32_t s) noexcept {
    TaskRec& r = recs_[s];
    if (r.state == State::kRunning) {
      leave_running(s);
      release_device(r);
    } else {
      remove_paused(s);
      release_host(r);
    }
    const TaskId id = r.task.id;
    r.state = State::kFree;
    slots_[s].vacate();
    index_.erase(id);
    free_slots_.push_back(s);
    (void)live_.cancel(id);
  }

  // Takes the missing blocks for r.tokens, all or nothing. May throw
  // std::bad_alloc, only before it changes anything.
  bool grow(std::uint32_t s) {
    TaskRec& r = recs_[s];
    const std::size_t want = blocks_for(r.tokens);
    const std::size_t have = r.device.size();
    if (want <= have) {
      clear_deficit(s);
      return true;
    }
    if (r.deficit_pos == kNil) room_for(deficit_, 1);
    if (want > config_.device_blocks) {
      // Past the whole pool: never a victim, never a preemptor; stalls.
      remove_victim(s);
      r.over_pool = true;
      set_deficit(s);
      return false;
    }
    // The last allocation; nothing changed yet. Geometric: decode one block at
    // a time costs O(1) amortized, not a copy of the whole table.
    room_for(r.device, want - have);
    r.device.resize(want);
    if (!device_.try_allocate(std::span<BlockId>(r.device).subspan(have))) {
      r.device.resize(have);
      set_deficit(s);
      return false;
    }
    if (r.in_victims) victim_blocks_[r.level] += want - have;
    clear_deficit(s);
    return true;
  }

  // ---- plan vectors -----------------------------------------------------

  std::vector<BlockId> take_ids() noexcept {
    if (spare_ids_.empty()) return {};
    std::vector<BlockId> v = std::move(spare_ids_.back());
    spare_ids_.pop_back();
    v.clear();
    return v;
  }
  std::vector<BlockCopy> take_copies() noexcept {
    if (spare_copies_.empty()) return {};
    std::vector<BlockCopy> v = std::move(spare_copies_.back());
    spare_copies_.pop_back();
    v.clear();
    return v;
  }
  void recycle_plan() noexcept {
    for (Preemption& p : plan_.preempted) keep_spare(spare_copies_, std::move(p.swap_out));
    for (Resumption& r : plan_.resumed) {
      keep_spare(spare_ids_, std::move(r.blocks));
      keep_spare(spare_copies_, std::move(r.swap_in));
    }
    for (Admission& a : plan_.admitted) keep_spare(spare_ids_, std::move(a.blocks));
    plan_.preempted.clear();
    plan_.resumed.clear();
    plan_.admitted.clear();
  }

  // ---- step phases ------------------------------------------------------

  // Cancels posted by other threads since the last step.
  void drain_cancels() noexcept {
    // relaxed: a cheap first look; a cancel that happened-before this step is
    // seen (coherence), a racing one rings again or is seen next step.
    if (!cancel_bell_.load(std::memory_order::relaxed)) return;
    // (B2) acquire RMW: pairs with (B1): every post rung so far is visible.
    if (!cancel_bell_.exchange(false, std::memory_order::acquire)) return;
    for (std::uint32_t s = 0; s < slot_count_; ++s) {
      if (recs_[s].state == State::kFree) continue;
      if (slots_[s].cancel_posted(recs_[s].stamp)) terminate(s);
    }
  }

  // Running tasks whose append_tokens failed get their blocks first, highest
  // level first, then earliest admitted. A task grown here is no victim of a
  // later growth of this step (grown_step). Only a non-preemptible task can
  // reach one: a preemptible task's victims at its level are newer than it,
  // so served after it, and lower levels are served after it too.
  void serve_growth() {
    if (deficit_.empty()) return;
    std::uint64_t grown_blocks[kPriorityCount] = {};  // blocks of victims grown by this step, per level
    const auto served = [&](TaskRec& r) {
      r.grown_step = step_no_;
      if (r.in_victims) grown_blocks[r.level] += r.device.size();
    };
    scratch_.assign(deficit_.begin(), deficit_.end());
    std::sort(scratch_.begin(), scratch_.end(), [this](std::uint32_t a, std::uint32_t b) {
      const TaskRec& x = recs_[a];
      const TaskRec& y = recs_[b];
      return x.level != y.level ? x.level > y.level : x.admitted < y.admitted;
    });
    for (const std::uint32_t s : scratch_) {
      TaskRec& r = recs_[s];
      if (r.state != State::kRunning || r.deficit_pos == kNil) continue;  // paused as a victim meanwhile
      if (grow(s)) {
        served(r);
        continue;
      }
      if (r.over_pool || !config_.scheduler.enable_preemption) continue;
      const std::size_t need = blocks_for(r.tokens) - r.device.size();
      // Blocks the victims ordered before r (lower levels, then r's level
      // from the newest admission down to r) could free.
      std::uint64_t avail = device_.free_blocks();
      for (std::uint32_t l = 0; l < r.level; ++l) avail += victim_blocks_[l];
      if (r.in_victims) {
        for (std::uint32_t x = victims_[r.level].tail; x != s; x = recs_[x].prev) avail += recs_[x].device.size();
      } else {
        avail += victim_blocks_[r.level] - grown_blocks[r.level];
      }
      if (avail >= need) {
        room_for(r.device, need);  // so that the grow() below cannot throw
        for (std::uint32_t l = 0; l <= r.level && device_.free_blocks() < need; ++l) {
          for (std::uint32_t x = victims_[l].tail; x != kNil && x != s && device_.free_blocks() < need;) {
            const std::uint32_t prev = recs_[x].prev;
            if (recs_[x].grown_step != step_no_) preempt(x);
            x = prev;
          }
        }
        const bool ok = grow(s);
        assert(ok);
        (void)ok;
        served(r);
      } else if (r.in_victims) {
        preempt(s);  // the task itself is the victim that makes room
      }
      // else: non-preemptible and no room: stays running, stalled.
    }
  }

  void preempt(std::uint32_t s) {
    TaskRec& r = recs_[s];
    const std::size_t n = r.device.size();
    // Memory first: a throw here changes nothing.
    std::vector<BlockCopy> copies = take_copies();
    const bool swap = host_ && n <= host_->free_blocks();
    if (swap) {
      copies.reserve(n);
      r.host.reserve(n);
    }
    room_for(plan_.preempted, 1);
    leave_running(s);
    bool recompute = true;
    if (swap) {
      r.host.resize(n);
      if (host_->try_allocate(r.host)) {
        recompute = false;
        for (std::size_t i = 0; i < n; ++i) copies.push_back(BlockCopy{r.device[i], r.host[i]});
      } else {
        r.host.clear();
      }
    }
    release_device(r);
    r.recompute = recompute;
    if (recompute) ++recomputes_;
    ++preemptions_;
    r.paused_step = step_no_;
    insert_paused(s);
    plan_.preempted.push_back(Preemption{r.task, std::move(copies), recompute});
  }

  bool fits(std::size_t need) const noexcept {
    return running_ < config_.max_running && device_.free_blocks() >= need;
  }

  // Preemption for a candidate of `level` that does not fit: victims are the
  // running preemptible tasks of lower levels, lowest level first, newest
  // admission first; only if together they make room, and only as many as
  // needed. Tasks this step admitted or resumed are not victims (a producer
  // may submit a higher-priority task while the step runs, so a later
  // candidate can outrank an earlier admission); they sit at the tails.
  bool make_room(std::uint8_t level, std::size_t need) {
    if (!config_.scheduler.enable_preemption || level == 0) return false;
    std::uint64_t blocks = device_.free_blocks();
    std::size_t count = 0;
    for (std::uint32_t l = 0; l < level; ++l) {
      blocks += victim_blocks_[l] - fresh_blocks_[l];
      count += victims_[l].size - fresh_count_[l];
    }
    if (blocks < need || running_ - count >= config_.max_running) return false;
    for (std::uint32_t l = 0; l < level; ++l) {
      for (std::uint32_t x = victims_[l].tail; x != kNil && !fits(need);) {
        const std::uint32_t prev = recs_[x].prev;
        if (recs_[x].entered_step != step_no_) preempt(x);
        x = prev;
      }
    }
    return fits(need);
  }

  void admit() {
    std::fill(std::begin(fresh_blocks_), std::end(fresh_blocks_), 0);
    std::fill(std::begin(fresh_count_), std::end(fresh_count_), 0);
    std::size_t used = 0;    // prefill tokens of this step
    std::size_t served = 0;  // admissions + resumptions of this step
    const std::size_t budget = config_.max_step_tokens;
    for (;;) {
      // The candidate: the oldest paused task of the highest paused level,
      // unless the waiting head has a higher level.
      const int lp = paused_mask_ != 0 ? std::bit_width(paused_mask_) - 1 : -1;
      std::optional<ScheduledTask> w;
      if (lp < static_cast<int>(levels_) - 1) w = waiting_.peek();
      const bool paused = lp >= 0 && (!w || lp >= level_of(*w));
      if (!paused && !w) return;
      std::uint32_t ps = kNil;
      std::size_t need;
      std::size_t cost;
      std::uint8_t level;
      if (paused) {
        ps = paused_[lp].head;
        const TaskRec& p = recs_[ps];
        if (p.paused_step == step_no_) return;  // paused by this step
        need = blocks_for(p.tokens);
        cost = p.recompute ? p.tokens : 0;
        level = p.level;
      } else {
        need = blocks_for(w->estimated_tokens);
        cost = w->estimated_tokens;
        level = level_of(*w);
      }
      const bool alone = cost > budget;
      if (alone ? served != 0 : cost > budget - used) return;
      // Unreachable by E4 alone; parked tasks (park in admit_waiting) sit
      // outside it, and if more than kSpareSlots of them hold slots,
      // admissions wait here until one frees.
      if (!paused && free_slots_.empty()) return;
      if (!fits(need) && !make_room(level, need)) return;
      if (paused) {
        resume(ps);
      } else if (!admit_waiting(*w, need)) {
        continue;  // cancelled or replaced meanwhile: choose again
      }
      ++served;
      used = alone ? budget : used + cost;
      if (alone) return;
    }
  }

  void resume(std::uint32_t s) {
    TaskRec& r = recs_[s];
    const std::size_t need = blocks_for(r.tokens);
    // Memory first: a throw here changes nothing.
    r.device.reserve(need);
    std::vector<BlockId> blocks = take_ids();
    blocks.reserve(need);
    std::vector<BlockCopy> copies;
    if (r.never_ran) {
      room_for(plan_.admitted, 1);
    } else {
      copies = take_copies();
      if (!r.recompute) {
        copies.reserve(r.host.size());
        room_for(deferred_host_, r.host.size());
      }
      room_for(plan_.resumed, 1);
    }
    remove_paused(s);
    r.device.resize(need);
    const bool ok = device_.try_allocate(r.device);  // fits() checked; only the loop allocates
    assert(ok);
    (void)ok;
    blocks.assign(r.device.begin(), r.device.end());
    if (r.never_ran) {
      r.never_ran = false;
      r.recompute = false;
      plan_.admitted.push_back(Admission{r.task, std::move(blocks)});
    } else {
      if (!r.recompute) {
        for (std::size_t i = 0; i < r.host.size(); ++i) copies.push_back(BlockCopy{r.host[i], r.device[i]});
        // Freed at the end of the step: no swap-out of this step may
        // overwrite them before the swap-in reads them.
        deferred_host_.insert(deferred_host_.end(), r.host.begin(), r.host.end());
        r.host.clear();
      }
      r.recompute = false;
      ++resumptions_;
      plan_.resumed.push_back(Resumption{r.task, std::move(blocks), std::move(copies)});
    }
    enter_running(s);
  }

  // Takes the peeked task `w` out of waiting_ and runs it. False when it was
  // cancelled meanwhile, or replaced (see park below).
  bool admit_waiting(const ScheduledTask& w, std::size_t need) {
    TGI_GTC_ADMIT_PEEKED(w.id);
    const std::uint32_t s = free_slots_.back();
    // Memory first: a throw here changes nothing (the slot's lists are empty).
    recs_[s].device.reserve(need);
    std::vector<BlockId> blocks = take_ids();
    blocks.reserve(need);
    room_for(plan_.admitted, 1);
    free_slots_.pop_back();
    const std::uint64_t stamp = ++stamp_seq_;
    // E2: registered before it leaves waiting_. A producer's cancel(w.id)
    // now either removes it from waiting_ first (then our take fails and we
    // undo), or misses it there and finds it in index_. Index first, slot
    // second: a producer's cancel waits only while the slot shows the take
    // pending (S3), so it never waits through an insert that rebuilds the
    // index (O(index size)). One that meets the slot still vacant here did
    // not find this task in waiting_: its look came before the task was
    // submitted (false is then a valid answer), or after another cancel
    // removed it (that one returned true, and our take below fails).
    index_.insert(w.id, s);
    slots_[s].occupy(w.id, stamp);
    std::optional<ScheduledTask> taken = waiting_.cancel(w.id);
    slots_[s].taken(stamp, taken.has_value());  // S3
    if (!taken) {
      index_.erase(w.id);
      slots_[s].vacate();
      free_slots_.push_back(s);
      keep_spare(spare_ids_, std::move(blocks));
      return false;
    }
    TaskRec& r = recs_[s];
    r.task = *taken;
    r.tokens = taken->estimated_tokens;
    r.stamp = stamp;
    r.level = level_of(*taken);
    r.paused_step = 0;
    r.in_victims = r.recompute = r.never_ran = r.over_pool = false;
    r.deficit_pos = kNil;
    if (!(*taken == w)) {
      // park: between our peek and our take, the task was cancelled and an
      // equal id re-submitted with other fields. It is out of waiting_ now
      // and may not fit; keep it as a paused task that never ran (resumed
      // later as an admission), after the paused tasks of its level (its
      // stamp, taken at registration, is the newest).
      r.never_ran = true;
      r.recompute = true;
      insert_paused(s);
      keep_spare(spare_ids_, std::move(blocks));
      return false;
    }
    r.device.resize(need);
    const bool ok = device_.try_allocate(r.device);  // fits() checked; only the loop allocates
    assert(ok);
    (void)ok;
    blocks.assign(r.device.begin(), r.device.end());
    plan_.admitted.push_back(Admission{r.task, std::move(blocks)});
    enter_running(s);
    return true;
  }

  // ---- state ------------------------------------------------------------

  const EngineConfig config_;
  const std::uint32_t levels_;
  const std::uint32_t slot_count_;
  Scheduler waiting_;
  Scheduler live_;
  BlockPool device_;
  std::unique_ptr<BlockPool> host_;
  ActiveIndex index_;
  std::unique_ptr<TaskSlot[]> slots_;

  // Serving loop only.
  std::vector<TaskRec> recs_;
  std::vector<std::uint32_t> free_slots_;
  List victims_[kPriorityCount];
  std::uint64_t victim_blocks_[kPriorityCount] = {};
  // Of those, the tasks this step admitted or resumed (not victims this step).
  std::uint64_t fresh_blocks_[kPriorityCount] = {};
  std::size_t fresh_count_[kPriorityCount] = {};
  List paused_[kPriorityCount];
  unsigned paused_mask_ = 0;
  std::vector<std::uint32_t> deficit_;
  std::vector<std::uint32_t> scratch_;
  std::vector<BlockId> deferred_host_;
  std::size_t running_ = 0;
  std::size_t paused_count_ = 0;  // in paused_, preempted (not parked)
  std::size_t parked_count_ = 0;  // in paused_, parked before they ever ran
  std::uint64_t stamp_seq_ = 0;
  std::uint64_t admit_seq_ = 0;
  std::uint64_t step_no_ = 0;
  std::uint64_t preemptions_ = 0;
  std::uint64_t resumptions_ = 0;
  std::uint64_t recomputes_ = 0;
  std::uint64_t cut_short_ = 0;
  StepPlan plan_;
  std::vector<std::vector<BlockId>> spare_ids_;
  std::vector<std::vector<BlockCopy>> spare_copies_;

  // Shared with producers.
  alignas(64) std::atomic<bool> cancel_bell_{false};
  alignas(64) std::atomic<std::uint64_t> loop_thread_{0};  // the serial of the last step() caller
  struct alignas(64) Published {
    std::atomic<std::size_t> running{0};
    std::atomic<std::size_t> paused{0};
    std::atomic<std::size_t> stalled{0};
    std::atomic<std::uint64_t> preemptions{0};
    std::atomic<std::uint64_t> resumptions{0};
    std::atomic<std::uint64_t> recomputes{0};
    std::atomic<std::uint64_t> cut_short{0};
    std::atomic<std::size_t> parked{0};
  } pub_;
  static_assert(alignof(Published) == 64 && sizeof(Published) == 64, "published counters: one line");
};

static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

}  // namespace detail

Engine::Engine(EngineConfig config) : core_(std::make_unique<detail::EngineCore>(config)) {}
Engine::~Engine() = default;

const EngineConfig& Engine::config() const noexcept { return core_->config(); }
TaskId Engine::next_id() noexcept { return core_->next_id(); }
std::error_code Engine::submit(const ScheduledTask& task) noexcept { return core_->submit(task); }
bool Engine::cancel(TaskId id) noexcept { return core_->cancel(id); }
const StepPlan& Engine::step() { return core_->step(); }
bool Engine::append_tokens(TaskId id, std::size_t n) { return core_->append_tokens(id, n); }
void Engine::finish(TaskId id) { core_->finish(id); }
std::span<const BlockId> Engine::block_table(TaskId id) const { return core_->block_table(id); }
const Scheduler& Engine::scheduler() const noexcept { return core_->scheduler(); }
EngineStats Engine::stats() const { return core_->stats(); }

}  // namespace tgi_gtc::scheduling
