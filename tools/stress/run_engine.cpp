// The engine run: worker 0 is the serving loop (step, append_tokens, finish);
// the other workers are producers (submit, cancel). With one thread, it does
// both. Every call is stamped with the shared logical clock.
//
// The loop keeps a model of every task of the epoch, built only from what the
// engine told it (plans, block tables, its own finish calls) and from what
// producers published (submit and cancel results, with their stamps):
//
//   per id (epoch-local, index id - base)
//     shared   submit state and stamps; the earliest cancel that returned
//              true (start, end); cancels begun (set before the call)
//     loop     None -> Running (admitted) <-> Paused -> Finished / Cancelled
//
// Checks, on the loop thread after every loop call (exact there: only the loop
// moves device blocks and the running set):
//   blocks     device_free + sum of running block tables == device blocks;
//              no device block in two running tables (owner tags, rebuilt
//              after each step); a host block holds at most one paused task's
//              copy, and one freed by a resumption is not reused in its step;
//              admitted/resumed/appended tables have ceil(tokens/block_size)
//              blocks; stats().stalled == running tasks short of blocks;
//              swap_out copies the table the task had, swap_in restores the
//              host blocks it was given, in order;
//   lifecycle  admitted only once and only a task whose submit was called and
//              not refused, never one whose cancel returned before the step;
//              resumed only when paused; preempted only when running,
//              preemptible and not served by the same step; a task
//              cancelled before a step is gone after it; a task that loses
//              its blocks was cancelled;
//              stats() running/paused agree with the model; at most
//              max_running run; recompute only when the host pool lacked room;
//   payload    every task in a plan is the one submitted under its id;
//   order      admissions and resumptions follow priority, then paused before
//              waiting, then arrival, within the prefill budget (a task served
//              alone may exceed it); every preemption has a cause, and
//              victims go lowest priority first, then most recently run
//              (check_order, as far as the stamps make a violation certain);
//              a step's last victim was needed (step()); growth is served
//              highest priority first, then earliest run, and a growing task
//              that pauses itself paused nobody for itself (check_self_pause,
//              check_growth_order).
// At the end of each epoch the loop (after the producers stopped) cancels
// every id of the epoch and checks the answer against the model: every
// accepted task is in exactly one of finished, cancelled or still there;
// then the engine must be empty with every block free, and at most one
// cancel of each task, the producers' and the drain's own, returned true.
// Then, offline, every producer cancel is checked against the task's
// lifetime: true only while the task existed, false only when it was surely
// gone or not yet accepted; and every QueueFull against how many tasks the
// waiting queue can have held during the submit (check_refusals).
#include <algorithm>
#include <limits>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "driver.hpp"

#if TGI_STRESS_HAS_ENGINE
#include <tgi_gtc/scheduling/engine.hpp>
#endif

namespace tgi_gtc::stress::detail {

#if !TGI_STRESS_HAS_ENGINE

void run_engine_target(const Config&, Report&) {
  throw std::invalid_argument("the engine target is not built (the library has no Engine yet)");
}

#else

namespace {

using scheduling::BlockId;
using scheduling::Engine;
using scheduling::EngineConfig;
using scheduling::Priority;
using scheduling::ScheduledTask;
using scheduling::ScheduleError;
using scheduling::StepPlan;
using scheduling::TaskId;

enum EngineOp : std::size_t { kSubmit, kCancel, kStep, kAppend, kFinish };

constexpr std::uint32_t kBlockSize = 16;
constexpr std::size_t kMaxTaskBlocks = 12;  // appends stop at this many blocks' worth of tokens
constexpr std::size_t kMaxIdsPerEpoch = std::size_t{1} << 18;

std::string at(std::uint64_t start, std::uint64_t end) {
  return " [" + std::to_string(start) + "," + std::to_string(end) + "]";
}

std::size_t blocks_for(std::size_t tokens) { return std::max<std::size_t>(1, (tokens + kBlockSize - 1) / kBlockSize); }

enum class State : std::uint8_t { kNone, kRunning, kPaused, kFinished, kCancelled };

const char* name(State s) {
  switch (s) {
    case State::kNone: return "never admitted";
    case State::kRunning: return "running";
    case State::kPaused: return "paused";
    case State::kFinished: return "finished";
    case State::kCancelled: return "cancelled";
  }
  return "?";
}

/// What producers publish about one id.
struct SharedRec {
  std::atomic<std::uint8_t> submit{0};  // kNotSubmitted .. kRefused
  std::atomic<std::uint32_t> cancels_begun{0};
  std::atomic<std::uint32_t> cancels_true{0};  // producer cancels that returned true: at most one
  std::atomic<std::uint64_t> submit_start{0}, submit_end{0};
  std::atomic<std::uint64_t> cancel_start{0}, cancel_end{0};  // the earliest cancel that returned true
  std::atomic<bool> queue_full{false};  // refused with QueueFull (submit is then kRefused)
};
constexpr std::uint8_t kNotSubmitted = 0, kSubmitting = 1, kAccepted = 2, kRefused = 3;

/// The loop's model of one id.
struct LoopRec {
  State state = State::kNone;
  bool recompute = false;
  bool changed = false;  // in this step's plan
  std::uint32_t pos = 0;  // index in running_ids_ / paused_ids_
  std::uint32_t tokens = 0;
  std::uint32_t host_n = 0;
  std::uint64_t admit_start = 0, admit_end = 0;  // the step that admitted it
  std::uint64_t end_start = 0, end_end = 0;      // the call that finished or cancelled it
  std::uint64_t arrival = 0;  // rank of its admission among all admissions (the engine's arrival order)
  std::uint64_t run_seq = 0;  // rank of its last admission or resumption (the victims' "most recent")
  bool stalled = false;       // running and short of blocks (within the pool) when the step began
};

struct Owner {
  TaskId id = 0;
  std::uint32_t pos = 0;
  std::uint64_t stamp = 0;  // step number of the last rebuild (device), or of the freeing step (host, id 0)
};

struct CancelEvent {
  TaskId id;
  bool ok;
  std::uint64_t start, end;
};

void min_store(std::atomic<std::uint64_t>& a, std::uint64_t v) {
  std::uint64_t cur = a.load();
  while ((cur == 0 || v < cur) && !a.compare_exchange_weak(cur, v)) {
  }
}

/// Forwards every call to a real Engine; the broken engines below replace
/// the calls they break.
class EngineWrapper {
 public:
  explicit EngineWrapper(EngineConfig config) : engine_(config) {}
  const EngineConfig& config() const noexcept { return engine_.config(); }
  [[nodiscard]] std::error_code submit(const ScheduledTask& t) noexcept { return engine_.submit(t); }
  bool cancel(TaskId id) noexcept { return engine_.cancel(id); }
  const StepPlan& step() { return engine_.step(); }
  [[nodiscard]] bool append_tokens(TaskId id, std::size_t n) { return engine_.append_tokens(id, n); }
  void finish(TaskId id) { engine_.finish(id); }
  std::span<const BlockId> block_table(TaskId id) const { return engine_.block_table(id); }
  const scheduling::Scheduler& scheduler() const noexcept { return engine_.scheduler(); }
  scheduling::EngineStats stats() const { return engine_.stats(); }

 protected:
  Engine engine_;
};

/// An Engine whose plans lose every `every`-th preemption: the task is paused
/// (its blocks freed) but the serving loop is not told. The checks must catch it.
class PlanDroppingEngine : public EngineWrapper {
 public:
  PlanDroppingEngine(EngineConfig config, std::uint64_t every) : EngineWrapper(config), every_(every) {}
  const StepPlan& step() {
    plan_ = engine_.step();
    std::erase_if(plan_.preempted, [&](const scheduling::Preemption&) { return ++preemptions_ % every_ == 0; });
    return plan_;
  }

 private:
  std::uint64_t every_;
  std::uint64_t preemptions_ = 0;
  StepPlan plan_;
};

/// An Engine that ignores priorities: it queues and preempts every task as
/// Normal, and its plans report the priorities the tasks were submitted with.
/// The order checks must catch it.
class PriorityBlindEngine : public EngineWrapper {
 public:
  explicit PriorityBlindEngine(EngineConfig config) : EngineWrapper(config), priority_(kSlots) {}
  [[nodiscard]] std::error_code submit(const ScheduledTask& t) noexcept {
    // Live ids of an epoch span fewer than kSlots consecutive values.
    priority_[t.id % kSlots].store(t.priority);
    return engine_.submit(t.with_priority(Priority::Normal));
  }
  const StepPlan& step() {
    plan_ = engine_.step();
    for (auto& x : plan_.admitted) restore(x.task);
    for (auto& x : plan_.resumed) restore(x.task);
    for (auto& x : plan_.preempted) restore(x.task);
    return plan_;
  }

 private:
  static constexpr std::size_t kSlots = std::size_t{1} << 20;
  static_assert(kSlots > kMaxIdsPerEpoch);
  void restore(ScheduledTask& t) const { t.priority = priority_[t.id % kSlots].load(); }
  std::vector<std::atomic<Priority>> priority_;
  StepPlan plan_;
};

/// An Engine that reports QueueFull for every task whose id is a multiple of
/// `every`, however short its waiting queue. The refusal check must catch it.
class RefusingEngine : public EngineWrapper {
 public:
  RefusingEngine(EngineConfig config, std::uint64_t every) : EngineWrapper(config), every_(every) {}
  [[nodiscard]] std::error_code submit(const ScheduledTask& t) noexcept {
    if (t.id % every_ == 0) return ScheduleError::QueueFull;
    return engine_.submit(t);
  }

 private:
  std::uint64_t every_;
};

template <class E>
class EngineRun {
 public:
  template <class... EngineArgs>
  EngineRun(const Config& cfg, Report& r, EngineArgs... engine_args)
      : cfg_(cfg),
        r_(r),
        found_(cfg.max_findings),
        engine_(engine_config(cfg), engine_args...),
        device_total_(static_cast<std::uint32_t>(cfg.capacity)),
        host_total_(engine_.config().host_blocks),
        ids_per_epoch_(std::min<std::size_t>(kMaxIdsPerEpoch, cfg.max_events * cfg.threads)),
        shared_(ids_per_epoch_),
        loop_(ids_per_epoch_),
        device_owner_(device_total_),
        host_owner_(std::max<std::uint32_t>(host_total_, 1)),
        recent_(kRecent),
        workers_(cfg.threads) {
    const Mix& m = cfg.mix;
    loop_picker_ = std::make_unique<OpPicker>(cfg.threads == 1 ? m : Mix{{"submit", 0}, {"cancel", 0}, m[kStep], m[kAppend], m[kFinish]});
    producer_picker_ = std::make_unique<OpPicker>(Mix{m[kSubmit], m[kCancel], {"step", 0}, {"append", 0}, {"finish", 0}});
    loop_has_ops_ = m[kStep].second + m[kAppend].second + m[kFinish].second + (cfg.threads == 1 ? m[kSubmit].second + m[kCancel].second : 0) > 0;
    producers_have_ops_ = m[kSubmit].second + m[kCancel].second > 0;
    for (unsigned w = 0; w < cfg.threads; ++w) {
      workers_[w].rng = thread_rng(cfg.seed, w);
      workers_[w].counts = OpCounts(cfg.mix.size());
      workers_[w].cancels.reserve(cancel_cap_ + 1);
    }
    running_ids_.reserve(ids_per_epoch_);
    paused_ids_.reserve(ids_per_epoch_);
    changed_.reserve(ids_per_epoch_);
    short_before_.reserve(ids_per_epoch_);
    producers_active_.store(cfg.threads - 1);
    if (cfg.threads > 1 && !producers_have_ops_) r.notes.push_back("the mix gives submit and cancel weight 0: the producers idle");
    if (cfg.threads > 1 && !loop_has_ops_) r.notes.push_back("the mix gives step, append and finish weight 0: the loop only drains");
  }

  static EngineConfig engine_config(const Config& cfg) {
    if (cfg.capacity > scheduling::kMaxBlocks) throw std::invalid_argument("capacity above kMaxBlocks");
    EngineConfig e;
    e.scheduler.max_queue_size = 256;
    e.scheduler.priority_scheduling = !cfg.fifo;
    e.scheduler.enable_preemption = true;
    e.device_blocks = static_cast<std::uint32_t>(cfg.capacity);
    e.host_blocks = static_cast<std::uint32_t>(cfg.capacity / 4);  // small: both swap and recompute happen
    e.block_size = kBlockSize;
    e.max_running = 32;
    e.max_step_tokens = 16 * kBlockSize;
    return e;
  }

  void run() {
    Progress progress(cfg_);
    Watchdog watchdog(cfg_);
    drive(
        cfg_, r_, progress, found_, stop_, watchdog, [this](unsigned w, std::uint64_t quota, LiveCount& live) { return work(w, quota, live); },
        [this] { return pause(); });
    std::vector<OpCounts> counts;
    for (const auto& w : workers_) counts.push_back(w.counts);
    sum_ops(r_, cfg_.mix, counts);
    const auto st = engine_.stats();
    r_.stats = {{"device_blocks", device_total_},
                {"host_blocks", host_total_},
                {"tasks_accepted", accepted_},
                {"queue_full", queue_full_.load()},
                {"queue_full_checked", refusals_judged_},
                {"max_running", max_running_},
                {"finished", finished_},
                {"cancelled", cancelled_},
                {"still_there_at_pauses", drained_},
                {"steps", steps_},
                {"admissions", admissions_},
                {"preemptions", st.preemptions},
                {"resumptions", st.resumptions},
                {"recomputes", st.recomputes},
                {"append_refused", append_refused_},
                {"victims_cause_checked", victims_judged_},
                {"victims_cause_unjudged", victims_unjudged_}};
    if (r_.epochs > 1) {
      r_.notes.push_back("checked in " + std::to_string(r_.epochs) + " epochs of at most " + std::to_string(ids_per_epoch_) +
                         " task ids; the loop cancels every task at each pause, so no task lives across epochs");
    }
    found_.finish(r_);
  }

 private:
  static constexpr std::size_t kRecent = 256;

  struct alignas(64) Worker {
    std::mt19937_64 rng;
    OpCounts counts;
    std::vector<CancelEvent> cancels;  // this thread's cancel calls, checked at the pause
  };

  ScheduledTask make_task(TaskId id) const {
    const std::uint64_t h = mix64(id ^ cfg_.seed);
    const std::size_t tokens = 1 + static_cast<std::size_t>(h % (3 * kBlockSize));
    return ScheduledTask(id, tokens).with_priority(static_cast<Priority>((h >> 16) % 4)).preemptible((h >> 24) % 4 != 0);
  }

  bool in_epoch(TaskId id) const { return id >= base_ && id - base_ < ids_per_epoch_; }
  std::size_t idx(TaskId id) const { return static_cast<std::size_t>(id - base_); }

  void fail(std::string kind, std::string detail, std::vector<std::uint64_t> ids, std::vector<CallRef> calls) {
    found_.add(make_violation(std::move(kind), std::move(detail), std::move(ids), std::move(calls)));
    stop_.store(true);
  }

  // ---- producers ----------------------------------------------------------

  bool submit(Worker& me) {
    const std::uint64_t n = next_.fetch_add(1);
    if (n >= ids_per_epoch_) {  // the epoch's id space is used up: time to pause
      stop_.store(true);
      return false;
    }
    const TaskId id = base_ + n;
    SharedRec& sh = shared_[n];
    sh.submit.store(kSubmitting);  // before the call: the loop may admit it before we return
    const ScheduledTask t = make_task(id);
    const std::uint64_t t0 = clock_.tick();
    const std::error_code ec = engine_.submit(t);
    const std::uint64_t t1 = clock_.tick();
    sh.submit_start.store(t0);
    sh.submit_end.store(t1);
    sh.queue_full.store(ec == ScheduleError::QueueFull);
    sh.submit.store(ec ? kRefused : kAccepted);
    if (ec == ScheduleError::QueueFull) queue_full_.fetch_add(1, std::memory_order::relaxed);  // relaxed: a statistic read after the run
    const bool too_big = blocks_for(t.estimated_tokens) > device_total_;
    if (ec == ScheduleError::ExceedsCapacity ? !too_big : (ec && ec != ScheduleError::QueueFull) || (!ec && too_big)) {
      fail("lifecycle",
           "submit(" + std::to_string(id) + ")" + at(t0, t1) + (ec ? " failed with '" + ec.message() + "'" : std::string(" succeeded")) + " for a fresh id of " +
               std::to_string(t.estimated_tokens) + " tokens (" + std::to_string(blocks_for(t.estimated_tokens)) + " blocks, the pool has " +
               std::to_string(device_total_) + ")",
           {id}, {{"submit", id, t0, t1}});
    }
    recent_[id % kRecent].store(id, std::memory_order::relaxed);  // relaxed: a hint for cancel, any value will do
    (void)me;
    return !ec;
  }

  bool cancel(Worker& me) {
    TaskId id = recent_[me.rng() % kRecent].load(std::memory_order::relaxed);  // relaxed: a hint only
    if (id == 0) id = base_ == 0 ? 1 : base_;
    const bool mine = in_epoch(id);
    if (mine) shared_[idx(id)].cancels_begun.fetch_add(1);  // before the call: see after_step()
    cancels_started_.fetch_add(1);                             // before the call: see step()
    const std::uint64_t t0 = clock_.tick();
    const bool ok = engine_.cancel(id);
    const std::uint64_t t1 = clock_.tick();
    cancels_done_.fetch_add(1);  // after the call: see step()
    if (ok && mine) {
      shared_[idx(id)].cancels_true.fetch_add(1);
      min_store(shared_[idx(id)].cancel_start, t0);
      min_store(shared_[idx(id)].cancel_end, t1);
    }
    if (ok && !mine) {
      fail("lifecycle", "cancel(" + std::to_string(id) + ")" + at(t0, t1) + " returned true for a task of an earlier epoch, all of which were drained",
           {id}, {{"cancel", id, t0, t1}});
    }
    if (mine) me.cancels.push_back({id, ok, t0, t1});
    if (me.cancels.size() >= cancel_cap_) stop_.store(true);
    return ok;
  }

  // ---- the serving loop -----------------------------------------------------

  std::uint64_t device_sum() const {
    std::uint64_t sum = 0;
    for (const TaskId id : running_ids_) sum += engine_.block_table(id).size();
    return sum;
  }

  // After every loop call: device blocks add up, the stalled count matches.
  void check_accounts(const char* after, std::uint64_t t0, std::uint64_t t1) {
    const auto st = engine_.stats();
    const std::uint64_t held = device_sum();
    if (st.device_free_blocks + held != device_total_) {
      fail("blocks",
           std::string("after ") + after + at(t0, t1) + ": device_free " + std::to_string(st.device_free_blocks) + " + blocks in running tables " +
               std::to_string(held) + " != " + std::to_string(device_total_),
           {}, {{after, 0, t0, t1}});
    }
    std::size_t short_of_blocks = 0;
    for (const TaskId id : running_ids_) {
      const std::size_t n = engine_.block_table(id).size();
      short_of_blocks += n != 0 && n < blocks_for(loop_[idx(id)].tokens);
    }
    if (st.stalled != short_of_blocks) {
      fail("engine",
           std::string("after ") + after + at(t0, t1) + ": stats().stalled is " + std::to_string(st.stalled) + " but " +
               std::to_string(short_of_blocks) + " running tasks are short of blocks",
           {}, {{after, 0, t0, t1}});
    }
  }

  void set_state(TaskId id, State to) {
    LoopRec& rec = loop_[idx(id)];
    auto drop = [&](std::vector<TaskId>& list) {
      const TaskId last = list.back();
      list[rec.pos] = last;
      loop_[idx(last)].pos = rec.pos;
      list.pop_back();
    };
    if (rec.state == State::kRunning) drop(running_ids_);
    if (rec.state == State::kPaused) drop(paused_ids_);
    rec.state = to;
    if (to == State::kRunning) {
      rec.pos = static_cast<std::uint32_t>(running_ids_.size());
      running_ids_.push_back(id);
    } else if (to == State::kPaused) {
      rec.pos = static_cast<std::uint32_t>(paused_ids_.size());
      paused_ids_.push_back(id);
    }
  }

  // Some cancel of this id returned true, or is in flight.
  bool cancel_seen(TaskId id) const { return shared_[idx(id)].cancel_end.load() != 0 || shared_[idx(id)].cancels_begun.load() != 0; }

  bool plan_task_ok(const ScheduledTask& t, const char* list, std::uint64_t t0, std::uint64_t t1) {
    if (!in_epoch(t.id)) {
      fail("lifecycle", std::string("step") + at(t0, t1) + " " + list + " task " + std::to_string(t.id) + ", not submitted in this epoch", {t.id},
           {{"step", t.id, t0, t1}});
      return false;
    }
    if (!(t == make_task(t.id))) {
      fail("payload", std::string("step") + at(t0, t1) + " " + list + " task " + std::to_string(t.id) + " with other fields than it was submitted with",
           {t.id}, {{"step", t.id, t0, t1}});
    }
    return true;
  }

  // A task whose cancel returned before this step began may not be served by it.
  void check_not_cancelled(TaskId id, const char* list, std::uint64_t t0, std::uint64_t t1) {
    const SharedRec& sh = shared_[idx(id)];
    const std::uint64_t ce = sh.cancel_end.load();
    if (ce != 0 && ce < t0) {
      fail("lifecycle",
           std::string("step") + at(t0, t1) + " " + list + " task " + std::to_string(id) + ", whose cancel returned true" +
               at(sh.cancel_start.load(), ce) + " before the step began",
           {id}, {{"cancel", id, sh.cancel_start.load(), ce}, {"step", id, t0, t1}});
    }
  }

  void take_host(TaskId id, std::uint32_t pos, BlockId hb, std::uint64_t t0, std::uint64_t t1) {
    if (hb >= host_total_) {
      fail("blocks", "step" + at(t0, t1) + " swaps task " + std::to_string(id) + " out to host block " + std::to_string(hb) + ", out of range", {id, hb},
           {{"step", id, t0, t1}});
      return;
    }
    Owner& o = host_owner_[hb];
    if (o.id == 0 && o.stamp == steps_) {
      fail("blocks",
           "step" + at(t0, t1) + " swaps task " + std::to_string(id) + " out to host block " + std::to_string(hb) +
               ", freed by a resumption of the same step (its swap-in has not read it yet)",
           {id, hb}, {{"step", id, t0, t1}});
    } else if (o.id != 0) {
      const LoopRec& other = loop_[idx(o.id)];
      if (other.state == State::kPaused && !other.recompute && !cancel_seen(o.id)) {
        fail("blocks",
             "step" + at(t0, t1) + " swaps task " + std::to_string(id) + " out to host block " + std::to_string(hb) + ", which holds paused task " +
                 std::to_string(o.id) + "'s copy",
             {id, o.id, hb}, {{"step", id, t0, t1}});
      } else if (other.state == State::kPaused) {
        set_state(o.id, State::kCancelled);  // a posted cancel was carried out: its copy is gone
        loop_[idx(o.id)].end_start = t0;
        loop_[idx(o.id)].end_end = t1;
      }
    }
    o = {id, pos, 0};
  }

  unsigned level_of(TaskId id) const { return cfg_.fifo ? 0 : scheduling::value(make_task(id).priority); }

  // Adds the ids whose submit returned true since the last call to
  // waiting_model_ (ids whose submit is still in flight are looked at again).
  void refresh_waiting() {
    const std::uint64_t used = std::min<std::uint64_t>(next_.load(), ids_per_epoch_);
    // True once the submit returned (an accepted id joins the model).
    const auto settled = [&](std::uint64_t n) {
      const std::uint8_t sub = shared_[n].submit.load();
      if (sub == kAccepted) waiting_model_.push_back(base_ + n);
      return sub == kAccepted || sub == kRefused;
    };
    std::erase_if(pending_, settled);
    for (; scanned_ < used; ++scanned_) {
      if (!settled(scanned_)) pending_.push_back(scanned_);
    }
  }

  // Order (after the plan is applied to the model, before the changed flags
  // are cleared): what a step serves, and whom it preempts, follows the
  // engine's rules, as far as the producers' stamps make them certain.
  //   admission  a task admitted from the queue while a task of a higher
  //              priority, or an older one of its own (submit returned before
  //              its submit began), had been waiting since before the step
  //              and still waits; or while a task of its priority or higher,
  //              paused by an earlier step, stays paused (paused go first);
  //   resumption likewise against waiting tasks of a higher priority and
  //              paused tasks of a higher priority or an earlier arrival;
  //   victims    a preemption without a cause (a task of a higher priority
  //              admitted or resumed by the step, or a running task of the
  //              victim's priority or higher short of blocks when it began;
  //              not judged when a cancel overlapped the step, since the task
  //              a preemption made room for may have been cancelled before it
  //              was taken); and, unless the victim was itself short of blocks
  //              (it may have paused itself), a preemptible task that ran
  //              before the step, of a lower priority, or of the victim's
  //              priority and run more recently, left running.
  // A task with a cancel in flight or done is never a witness.
  void check_order(const StepPlan& plan, std::uint64_t t0, std::uint64_t t1, bool cancel_overlapped) {
    constexpr std::uint64_t kNever = std::numeric_limits<std::uint64_t>::max();
    const unsigned levels = cfg_.fifo ? 1 : 4;
    refresh_waiting();
    // Per level: the waiting task whose submit returned first, if that was before the step.
    struct Witness {
      TaskId id = 0;
      std::uint64_t key = kNever;
    };
    Witness waiting[4], paused[4];
    for (const TaskId id : waiting_model_) {
      if (loop_[idx(id)].state != State::kNone || cancel_seen(id)) continue;
      const std::uint64_t end = shared_[idx(id)].submit_end.load();
      Witness& w = waiting[level_of(id)];
      if (end < t0 && end < w.key) w = {id, end};
    }
    // Per level: the paused task (paused before this step) that arrived first.
    for (const TaskId id : paused_ids_) {
      const LoopRec& rec = loop_[idx(id)];
      if (rec.changed || cancel_seen(id)) continue;
      Witness& w = paused[level_of(id)];
      if (rec.arrival < w.key) w = {id, rec.arrival};
    }
    const auto prio = [&](TaskId id) {
      return "task " + std::to_string(id) + " (" + std::string(scheduling::to_string(make_task(id).priority)) + (cfg_.fifo ? ", FIFO mode)" : ")");
    };
    const auto waited = [&](TaskId id) -> CallRef {
      const SharedRec& sh = shared_[idx(id)];
      return {"submit", id, sh.submit_start.load(), sh.submit_end.load()};
    };
    for (const auto& ad : plan.admitted) {
      const TaskId b = ad.task.id;
      if (!in_epoch(b)) continue;
      const unsigned lb = level_of(b);
      const std::uint64_t b_start = shared_[idx(b)].submit_start.load();  // 0 while its submit is in flight
      // Queued when b was taken: still waiting, or admitted after b by this
      // step (its queue wait and b's overlap either way).
      for (const TaskId c : waiting_model_) {
        const LoopRec& rc = loop_[idx(c)];
        const bool later = rc.state == State::kNone || (rc.admit_start == t0 && rc.arrival > loop_[idx(b)].arrival);
        if (c == b || !later || cancel_seen(c)) continue;
        const std::uint64_t c_end = shared_[idx(c)].submit_end.load();
        const unsigned lc = level_of(c);
        if (c_end >= t0 || lc < lb || (lc == lb && (b_start == 0 || c_end >= b_start))) continue;
        fail("order",
             "step" + at(t0, t1) + " admitted " + prio(b) + " while " + prio(c) + ", submitted" + at(shared_[idx(c)].submit_start.load(), c_end) +
                 (lc > lb ? "" : ", before " + std::to_string(b) + "'s submit began") + ", waited since before the step and " +
                 (rc.state == State::kNone ? "still waits" : "was admitted after it"),
             {b, c}, {waited(c), waited(b), {"step", b, t0, t1}});
        break;
      }
      for (unsigned l = lb; l < levels; ++l) {
        if (paused[l].id != 0) {
          fail("order",
               "step" + at(t0, t1) + " admitted waiting " + prio(b) + " while " + prio(paused[l].id) +
                   ", paused by an earlier step, stays paused (paused tasks go before the waiting ones of their priority)",
               {b, paused[l].id}, {{"step", b, t0, t1}});
        }
      }
    }
    for (const auto& rs : plan.resumed) {
      const TaskId r = rs.task.id;
      if (!in_epoch(r)) continue;
      const unsigned lr = level_of(r);
      for (unsigned l = lr; l < levels; ++l) {
        if (l > lr && waiting[l].id != 0) {
          fail("order", "step" + at(t0, t1) + " resumed " + prio(r) + " while " + prio(waiting[l].id) + ", submitted" +
                            at(shared_[idx(waiting[l].id)].submit_start.load(), waiting[l].key) + ", waited since before the step and still waits",
               {r, waiting[l].id}, {waited(waiting[l].id), {"step", r, t0, t1}});
        }
        if (paused[l].id != 0 && (l > lr || paused[l].key < loop_[idx(r)].arrival)) {
          fail("order", "step" + at(t0, t1) + " resumed " + prio(r) + " while " + prio(paused[l].id) + (l > lr ? "" : ", which arrived earlier,") +
                            " stays paused",
               {r, paused[l].id}, {{"step", r, t0, t1}});
        }
      }
    }
    // Tasks that left the queue for good are no witnesses any more.
    std::erase_if(waiting_model_, [&](TaskId id) { return loop_[idx(id)].state != State::kNone || cancel_seen(id); });
    if (plan.preempted.empty()) return;
    int top_stalled = -1;  // the highest priority of a task short of blocks when the step began
    for (const Short& sh : short_before_) top_stalled = std::max(top_stalled, static_cast<int>(level_of(sh.id)));
    int top_served = -1;  // the highest priority admitted or resumed by the step
    for (const auto& ad : plan.admitted) top_served = std::max(top_served, static_cast<int>(level_of(ad.task.id)));
    for (const auto& rs : plan.resumed) top_served = std::max(top_served, static_cast<int>(level_of(rs.task.id)));
    if (!cancel_overlapped) check_self_pause(plan, t0, t1, top_served);
    for (const auto& pr : plan.preempted) {
      const TaskId v = pr.task.id;
      if (!in_epoch(v)) continue;
      const LoopRec& vr = loop_[idx(v)];
      const int lv = static_cast<int>(level_of(v));
      ++(cancel_overlapped ? victims_unjudged_ : victims_judged_);
      if (!cancel_overlapped && !vr.stalled && top_stalled < lv && (cfg_.fifo || top_served <= lv)) {
        fail("order",
             "step" + at(t0, t1) + " preempted " + prio(v) + " for nothing: no task of a higher priority was admitted or resumed" +
                 " and no running task of its priority or higher was short of blocks",
             {v}, {{"step", v, t0, t1}});
      }
      // Grown by this step and then paused by it (its swap-out copies more
      // blocks than it held when the step began): only an admission or
      // resumption of a higher priority may do that, never a growth.
      if (vr.stalled && !pr.recompute && pr.swap_out.size() > table_size_[idx(v)] && !cancel_overlapped && top_served <= lv) {
        fail("order",
             "step" + at(t0, t1) + " grew " + prio(v) + " and then preempted it, with nothing of a higher priority admitted or resumed" +
                 " (a task grown by a step is no victim of a later growth in it)",
             {v}, {{"step", v, t0, t1}});
      }
      if (vr.stalled) continue;  // it may have paused itself, ahead of any other victim
      for (const TaskId e : running_ids_) {
        const LoopRec& er = loop_[idx(e)];
        if (er.changed || !make_task(e).is_preemptible || blocks_for(er.tokens) > device_total_ || cancel_seen(e)) continue;
        const int le = static_cast<int>(level_of(e));
        // Grown by this step: no victim of a later growth, which serves tasks
        // of its own level or lower only after it (a grown task of a lower
        // level than a victim is always a witness).
        if (le == lv && er.stalled && engine_.block_table(e).size() >= blocks_for(er.tokens)) continue;
        if (le < lv || (le == lv && er.run_seq > vr.run_seq)) {
          fail("order",
               "step" + at(t0, t1) + " preempted " + prio(v) + " but left preemptible " + prio(e) + " running, " +
                   (le < lv ? std::string("a lower priority") : std::string("run more recently")) +
                   " (victims go lowest priority first, then most recently run)",
               {v, e}, {{"step", v, t0, t1}});
        }
      }
    }
  }

  // Growth that ends in the growing task pausing itself pauses nobody else
  // for it (victims ordered before it are paused only if together they make
  // room). Growth comes first in a step, serves the tasks short of blocks
  // when the step began (highest priority first, then earliest run), and
  // pauses only for the task it serves; admission then pauses strictly lower
  // priorities only. So a short task T preempted by a step in which no short
  // task was served before it, and nothing of a higher priority was admitted
  // or resumed, paused itself, and every victim the plan lists before it was
  // paused for it. (Not judged when a cancel overlapped the step: admission
  // may have paused T for a waiting task cancelled before it was taken.)
  void check_self_pause(const StepPlan& plan, std::uint64_t t0, std::uint64_t t1, int top_served) {
    for (std::size_t j = 1; j < plan.preempted.size(); ++j) {
      const TaskId t = plan.preempted[j].task.id;
      if (!in_epoch(t) || !loop_[idx(t)].stalled) continue;
      const unsigned lt = level_of(t);
      if (top_served > static_cast<int>(lt)) continue;  // maybe a victim of that admission
      const std::uint64_t seq = loop_[idx(t)].run_seq;
      const bool served_before = std::any_of(short_before_.begin(), short_before_.end(), [&](const Short& g) {
        const unsigned lg = level_of(g.id);
        return g.id != t && (lg > lt || (lg == lt && loop_[idx(g.id)].run_seq < seq));
      });
      if (served_before) continue;  // maybe a victim of its growth
      const TaskId v = plan.preempted[j - 1].task.id;
      if (!in_epoch(v)) continue;
      fail("order",
           "step" + at(t0, t1) + " preempted task " + std::to_string(v) + " for the growth of task " + std::to_string(t) +
               " (no task short of blocks was served before it), and then task " + std::to_string(t) +
               ": a growth pauses others for a task only if that lets it grow, and the task keeps its growth",
           {v, t}, {{"step", t, t0, t1}});
      return;
    }
  }

  // Growth is served highest priority first, then earliest run (admitted or
  // resumed). In a step without preemptions free blocks only shrink while
  // growth is served (cancels are drained before it, admission comes after),
  // so a task grown by the step needed fewer blocks than every task served
  // before it that stayed short. (After the block tables are rebuilt.)
  void check_growth_order(const StepPlan& plan, std::uint64_t t0, std::uint64_t t1) {
    if (!plan.preempted.empty() || short_before_.size() < 2) return;
    const auto grown = [&](TaskId id) { return table_size_[idx(id)] >= blocks_for(loop_[idx(id)].tokens); };
    for (const Short& a : short_before_) {
      const LoopRec& ra = loop_[idx(a.id)];
      if (ra.state != State::kRunning || !grown(a.id)) continue;
      for (const Short& b : short_before_) {
        const LoopRec& rb = loop_[idx(b.id)];
        if (b.id == a.id || rb.state != State::kRunning || cancel_seen(b.id) || grown(b.id) || b.need > a.need) continue;
        const unsigned la = level_of(a.id), lb = level_of(b.id);
        if (lb < la || (lb == la && rb.run_seq > ra.run_seq)) continue;  // served after a
        fail("order",
             "step" + at(t0, t1) + " preempted nobody and grew task " + std::to_string(a.id) + ", short of " + std::to_string(a.need) + " block(s), while task " +
                 std::to_string(b.id) + ", served first (" + (lb > la ? "a higher priority" : "run earlier") + "), stayed short of " + std::to_string(b.need) +
                 " (growth: highest priority first, then earliest run)",
             {a.id, b.id}, {{"step", a.id, t0, t1}});
        return;
      }
    }
  }

  void step(std::uint64_t& t0_out) {
    // What the victim checks need from before the step (check_order).
    for (const TaskId id : paused_ids_) loop_[idx(id)].stalled = false;
    short_before_.clear();
    for (const TaskId id : running_ids_) {
      LoopRec& rec = loop_[idx(id)];
      const std::size_t want = blocks_for(rec.tokens);
      rec.stalled = table_size_[idx(id)] < want && want <= device_total_;
      if (rec.stalled) short_before_.push_back({id, static_cast<std::uint32_t>(want - table_size_[idx(id)])});
    }
    // No cancel overlapped the step if every cancel begun by its end had
    // returned before it began (a producer counts one before and after the call).
    const std::uint64_t cancels_done_before = cancels_done_.load();
    const std::uint32_t host_free_before = engine_.stats().host_free_blocks;  // exact: only the loop moves host blocks
    const std::uint64_t t0 = clock_.tick();
    const StepPlan& plan = engine_.step();
    const std::uint64_t t1 = clock_.tick();
    const bool cancel_overlapped = cancels_started_.load() != cancels_done_before;
    t0_out = t0;
    ++steps_;
    const std::uint64_t s = steps_;
    std::size_t prefill = 0;  // the step's prefill tokens: admissions' estimates, recomputed resumptions' tokens
    // Resumptions first, then admissions: their ranks (run_seq) follow the
    // engine's order for tasks of one priority (check_order).
    for (const auto& rs : plan.resumed) {
      if (!plan_task_ok(rs.task, "resumed", t0, t1)) continue;
      const TaskId id = rs.task.id;
      LoopRec& rec = loop_[idx(id)];
      if (rec.state != State::kPaused || rec.changed) {
        fail("lifecycle", "step" + at(t0, t1) + " resumed task " + std::to_string(id) + ", which was " + name(rec.state) + (rec.changed ? " (in this step)" : ""),
             {id}, {{"step", id, t0, t1}});
        continue;
      }
      check_not_cancelled(id, "resumed", t0, t1);
      rec.changed = true;
      if (rs.blocks.size() != blocks_for(rec.tokens)) {
        fail("blocks", "step" + at(t0, t1) + " resumed task " + std::to_string(id) + " of " + std::to_string(rec.tokens) + " tokens with " +
                           std::to_string(rs.blocks.size()) + " blocks",
             {id}, {{"step", id, t0, t1}});
      }
      // A task that grew while stalled resumes with more blocks than it saved.
      bool copies_ok = rec.recompute ? rs.swap_in.empty() : rs.swap_in.size() == rec.host_n && rs.swap_in.size() <= rs.blocks.size();
      for (std::size_t i = 0; copies_ok && i < rs.swap_in.size(); ++i) {
        const auto& c = rs.swap_in[i];
        copies_ok = c.to == rs.blocks[i] && c.from < host_total_ && host_owner_[c.from].id == id && host_owner_[c.from].pos == i;
      }
      if (!copies_ok) {
        fail("blocks",
             "step" + at(t0, t1) + " resumed task " + std::to_string(id) + " with swap_in of " + std::to_string(rs.swap_in.size()) +
                 " copies that do not restore its " + (rec.recompute ? "recomputed KV (expected none)" : std::to_string(rec.host_n) + " host blocks in order"),
             {id}, {{"step", id, t0, t1}});
      }
      for (const auto& c : rs.swap_in) {
        if (c.from < host_total_ && host_owner_[c.from].id == id) host_owner_[c.from] = {0, 0, s};  // freed at the end of this step
      }
      if (rec.recompute) prefill += rec.tokens;
      rec.host_n = 0;
      rec.recompute = false;
      rec.run_seq = ++run_counter_;
      set_state(id, State::kRunning);
      changed_.push_back(id);
    }
    for (const auto& ad : plan.admitted) {
      if (!plan_task_ok(ad.task, "admitted", t0, t1)) continue;
      const TaskId id = ad.task.id;
      LoopRec& rec = loop_[idx(id)];
      const SharedRec& sh = shared_[idx(id)];
      const std::uint8_t sub = sh.submit.load();
      if (rec.state != State::kNone || sub == kNotSubmitted || sub == kRefused) {
        fail("lifecycle",
             "step" + at(t0, t1) + " admitted task " + std::to_string(id) + ", which was " +
                 (rec.state != State::kNone ? std::string(name(rec.state)) + " (admitted before at" + at(rec.admit_start, rec.admit_end) + ")"
                                            : std::string(sub == kRefused ? "refused by submit" + at(sh.submit_start.load(), sh.submit_end.load())
                                                                          : "never submitted")),
             {id}, {{"step", id, t0, t1}});
        continue;
      }
      check_not_cancelled(id, "admitted", t0, t1);
      rec.changed = true;
      rec.tokens = static_cast<std::uint32_t>(ad.task.estimated_tokens);
      rec.admit_start = t0;
      rec.admit_end = t1;
      if (ad.blocks.size() != blocks_for(rec.tokens)) {
        fail("blocks", "step" + at(t0, t1) + " admitted task " + std::to_string(id) + " of " + std::to_string(rec.tokens) + " tokens with " +
                           std::to_string(ad.blocks.size()) + " blocks",
             {id}, {{"step", id, t0, t1}});
      }
      ++admissions_;
      prefill += ad.task.estimated_tokens;
      rec.arrival = rec.run_seq = ++run_counter_;
      set_state(id, State::kRunning);
      changed_.push_back(id);
    }
    std::size_t swapped_out = 0;  // host blocks taken by this step's swap-outs so far
    TaskId last_victim = 0;        // the step's last preemption, if it held `last_held` blocks
    std::size_t last_held = 0;      // when the step began and was not short of blocks then
    for (const auto& pr : plan.preempted) {
      if (!plan_task_ok(pr.task, "preempted", t0, t1)) continue;
      const TaskId id = pr.task.id;
      LoopRec& rec = loop_[idx(id)];
      if (rec.state != State::kRunning) {
        fail("lifecycle", "step" + at(t0, t1) + " preempted task " + std::to_string(id) + ", which was " + name(rec.state), {id}, {{"step", id, t0, t1}});
        continue;
      }
      check_not_cancelled(id, "preempted", t0, t1);
      if (!pr.task.is_preemptible) {
        fail("lifecycle", "step" + at(t0, t1) + " preempted task " + std::to_string(id) + ", which is not preemptible", {id}, {{"step", id, t0, t1}});
      }
      if (rec.changed) {
        fail("lifecycle",
             "step" + at(t0, t1) + " preempted task " + std::to_string(id) + ", which it also admitted or resumed (a task is in at most one list of a plan)",
             {id}, {{"step", id, t0, t1}});
      }
      // Swapped out whenever the host pool had room for its blocks (at most
      // ceil(tokens / block_size) of them) after the earlier swap-outs of the step.
      const std::size_t host_room = host_free_before - std::min<std::size_t>(host_free_before, swapped_out);
      if (pr.recompute && blocks_for(rec.tokens) <= host_room) {
        fail("engine",
             "step" + at(t0, t1) + " released task " + std::to_string(id) + "'s KV for recompute, though the host pool had " +
                 std::to_string(host_room) + " free blocks for its " +
                 std::to_string(blocks_for(rec.tokens)) + " or fewer",
             {id}, {{"step", id, t0, t1}});
      }
      swapped_out += pr.swap_out.size();
      // What it held: the plan's blocks if it started in this step, else its table at the last rebuild.
      std::size_t held = 0;
      bool copies_ok = true;
      if (rec.changed) {
        const std::vector<BlockId>* blocks = nullptr;
        for (const auto& ad : plan.admitted) {
          if (ad.task.id == id) blocks = &ad.blocks;
        }
        for (const auto& rs : plan.resumed) {
          if (rs.task.id == id) blocks = &rs.blocks;
        }
        held = blocks ? blocks->size() : 0;
        for (std::size_t i = 0; !pr.recompute && blocks && i < pr.swap_out.size() && i < held; ++i) copies_ok = copies_ok && pr.swap_out[i].from == (*blocks)[i];
        copies_ok = pr.recompute ? pr.swap_out.empty() : pr.swap_out.size() == held;
      } else {
        // Its table as last seen; the step may have grown it (a stalled task
        // served first) before preempting it, up to its tokens' worth.
        held = table_size_[idx(id)];
        for (std::size_t i = 0; !pr.recompute && i < pr.swap_out.size() && i < held; ++i) {
          const BlockId b = pr.swap_out[i].from;
          copies_ok = copies_ok && b < device_total_ && device_owner_[b].id == id && device_owner_[b].pos == i;
        }
        copies_ok = copies_ok && (pr.recompute ? pr.swap_out.empty() : pr.swap_out.size() >= held && pr.swap_out.size() <= blocks_for(rec.tokens));
      }
      if (!copies_ok) {
        fail("blocks",
             "step" + at(t0, t1) + " preempted task " + std::to_string(id) + " with " + std::to_string(pr.swap_out.size()) + " swap_out copies (recompute " +
                 std::to_string(pr.recompute) + ") that do not save its " + std::to_string(held) + " device blocks (" + std::to_string(rec.tokens) +
                 " tokens) in order",
             {id}, {{"step", id, t0, t1}});
      }
      for (std::size_t i = 0; !pr.recompute && i < pr.swap_out.size(); ++i) take_host(id, static_cast<std::uint32_t>(i), pr.swap_out[i].to, t0, t1);
      last_victim = rec.changed || rec.stalled ? 0 : id;
      last_held = held;
      rec.recompute = pr.recompute;
      rec.host_n = pr.recompute ? 0 : static_cast<std::uint32_t>(pr.swap_out.size());
      rec.changed = true;
      set_state(id, State::kPaused);
      changed_.push_back(id);
    }
    check_order(plan, t0, t1, cancel_overlapped);
    // The prefill budget: exceeded only by a task served alone.
    const std::size_t budget = engine_.config().max_step_tokens;
    if (prefill > budget && plan.admitted.size() + plan.resumed.size() != 1) {
      fail("order",
           "step" + at(t0, t1) + " served " + std::to_string(plan.admitted.size() + plan.resumed.size()) + " tasks with " + std::to_string(prefill) +
               " prefill tokens, over the budget of " + std::to_string(budget) + " (only a task served alone may exceed it)",
           {}, {{"step", 0, t0, t1}});
    }
    for (const TaskId id : changed_) loop_[idx(id)].changed = false;
    changed_.clear();

    // Rebuild the device owner tags from the block tables.
    std::size_t running = 0;
    for (std::size_t i = 0; i < running_ids_.size();) {
      const TaskId id = running_ids_[i];
      const auto table = engine_.block_table(id);
      if (table.empty()) {
        if (!cancel_seen(id)) {
          fail("lifecycle",
               "after step" + at(t0, t1) + " running task " + std::to_string(id) + " (admitted at" + at(loop_[idx(id)].admit_start, loop_[idx(id)].admit_end) +
                   ") has no blocks, but it was neither finished nor cancelled",
               {id}, {{"step", id, t0, t1}});
        }
        loop_[idx(id)].end_start = t0;
        loop_[idx(id)].end_end = t1;
        set_state(id, State::kCancelled);  // swaps the last one into i
        continue;
      }
      ++running;
      if (const std::uint64_t ce = shared_[idx(id)].cancel_end.load(); ce != 0 && ce < t0) {
        fail("lifecycle",
             "after step" + at(t0, t1) + " task " + std::to_string(id) + " still runs, though its cancel returned true" + at(shared_[idx(id)].cancel_start.load(), ce) +
                 " before the step began",
             {id}, {{"cancel", id, shared_[idx(id)].cancel_start.load(), ce}, {"step", id, t0, t1}});
      }
      table_size_[idx(id)] = static_cast<std::uint32_t>(table.size());
      for (std::size_t k = 0; k < table.size(); ++k) {
        const BlockId b = table[k];
        if (b >= device_total_) {
          fail("blocks", "task " + std::to_string(id) + " holds device block " + std::to_string(b) + ", out of range, after step" + at(t0, t1), {id, b},
               {{"step", id, t0, t1}});
          continue;
        }
        Owner& o = device_owner_[b];
        if (o.stamp == s && o.id != id) {
          fail("blocks", "device block " + std::to_string(b) + " is in the tables of running tasks " + std::to_string(o.id) + " and " + std::to_string(id) +
                             " after step" + at(t0, t1),
               {b, o.id, id}, {{"step", id, t0, t1}});
        }
        o = {id, static_cast<std::uint32_t>(k), s};
      }
      ++i;
    }
    check_growth_order(plan, t0, t1);
    // Cancels that returned before the step began were carried out by it.
    for (std::size_t i = 0; i < paused_ids_.size();) {
      const TaskId id = paused_ids_[i];
      const std::uint64_t ce = shared_[idx(id)].cancel_end.load();
      if (ce != 0 && ce < t0) {
        loop_[idx(id)].end_start = t0;
        loop_[idx(id)].end_end = t1;
        set_state(id, State::kCancelled);
        continue;
      }
      ++i;
    }
    max_running_ = std::max<std::uint64_t>(max_running_, running);
    if (running > engine_.config().max_running) {
      fail("engine", "after step" + at(t0, t1) + " " + std::to_string(running) + " tasks run, over max_running " + std::to_string(engine_.config().max_running), {},
           {{"step", 0, t0, t1}});
    }
    // Only as many victims as needed, for the step's last preemption: it
    // freed a slot and last_held blocks, and after it the step only used
    // blocks and slots (serving tasks, growing them), so if the step ends with
    // that many blocks free and a slot free, whatever it was taken for fitted
    // without it. (Not when a cancel overlapped the step: the task it made
    // room for may have been cancelled before it was taken, and never used
    // the room. Not for a victim short of blocks: it may have paused itself.)
    if (last_victim != 0 && !cancel_overlapped && running < engine_.config().max_running) {
      const std::uint32_t free_after = engine_.stats().device_free_blocks;  // exact: only the loop moves device blocks
      if (free_after >= last_held) {
        fail("order",
             "step" + at(t0, t1) + " preempted task " + std::to_string(last_victim) + " (" + std::to_string(last_held) + " blocks) last, yet ended with " +
                 std::to_string(free_after) + " blocks and a running slot free: what it was preempted for fitted without it (victims: only as many as needed)",
             {last_victim}, {{"step", last_victim, t0, t1}});
      }
    }
    const auto st = engine_.stats();
    std::size_t maybe_gone = 0;  // paused tasks a racing cancel may have removed
    for (const TaskId id : paused_ids_) maybe_gone += cancel_seen(id);
    if (st.running != running || st.paused > paused_ids_.size() || st.paused + maybe_gone < paused_ids_.size()) {
      fail("engine",
           "after step" + at(t0, t1) + " stats() says " + std::to_string(st.running) + " running, " + std::to_string(st.paused) + " paused; the plans say " +
               std::to_string(running) + " running, " + std::to_string(paused_ids_.size()) + " paused (" + std::to_string(maybe_gone) + " of them maybe cancelled)",
           {}, {{"step", 0, t0, t1}});
    }
    check_accounts("step", t0, t1);
  }

  bool append(Worker& me) {
    const TaskId id = running_ids_[me.rng() % running_ids_.size()];
    LoopRec& rec = loop_[idx(id)];
    if (rec.tokens >= kMaxTaskBlocks * kBlockSize) return false;
    const std::size_t n = 1 + me.rng() % kBlockSize;
    const std::size_t before = engine_.block_table(id).size();
    const std::uint32_t free_before = engine_.stats().device_free_blocks;
    const std::uint64_t t0 = clock_.tick();
    const bool ok = engine_.append_tokens(id, n);
    const std::uint64_t t1 = clock_.tick();
    rec.tokens += static_cast<std::uint32_t>(n);  // recorded even when refused
    const auto table = engine_.block_table(id);
    const std::size_t want = blocks_for(rec.tokens);
    if (ok && table.size() != want) {
      fail("blocks", "append_tokens(" + std::to_string(id) + ", " + std::to_string(n) + ")" + at(t0, t1) + " succeeded but the table has " +
                         std::to_string(table.size()) + " blocks for " + std::to_string(rec.tokens) + " tokens",
           {id}, {{"append_tokens", id, t0, t1}});
    }
    const std::size_t need = want > before ? want - before : 0;
    if (!ok && need <= free_before) {
      fail("engine", "append_tokens(" + std::to_string(id) + ", " + std::to_string(n) + ")" + at(t0, t1) + " failed though it needed " +
                         std::to_string(need) + " blocks and " + std::to_string(free_before) + " were free",
           {id}, {{"append_tokens", id, t0, t1}});
    }
    if (!ok) ++append_refused_;
    for (std::size_t k = before; ok && k < table.size(); ++k) {
      const BlockId b = table[k];
      if (b >= device_total_) continue;  // reported after the next step
      const Owner& o = device_owner_[b];
      if (o.id != 0 && o.id != id && in_epoch(o.id) && loop_[idx(o.id)].state == State::kRunning && o.pos < engine_.block_table(o.id).size() &&
          engine_.block_table(o.id)[o.pos] == b) {
        fail("blocks", "append_tokens(" + std::to_string(id) + ")" + at(t0, t1) + " gave it device block " + std::to_string(b) + ", held by running task " +
                           std::to_string(o.id),
             {id, o.id, b}, {{"append_tokens", id, t0, t1}});
      }
      device_owner_[b] = {id, static_cast<std::uint32_t>(k), steps_};
    }
    table_size_[idx(id)] = static_cast<std::uint32_t>(table.size());
    check_accounts("append_tokens", t0, t1);
    return ok;
  }

  bool finish(Worker& me) {
    const TaskId id = running_ids_[me.rng() % running_ids_.size()];
    const std::uint64_t t0 = clock_.tick();
    engine_.finish(id);
    const std::uint64_t t1 = clock_.tick();
    if (!engine_.block_table(id).empty()) {
      fail("blocks", "finish(" + std::to_string(id) + ")" + at(t0, t1) + " left the task with blocks", {id}, {{"finish", id, t0, t1}});
    }
    loop_[idx(id)].end_start = t0;
    loop_[idx(id)].end_end = t1;
    set_state(id, State::kFinished);
    ++finished_;
    check_accounts("finish", t0, t1);
    return true;
  }

  // A cancel made by the loop thread itself (one thread does everything).
  bool loop_cancel(Worker& me) {
    const bool ok = cancel(me);
    // On the loop thread a running or paused task is cancelled at once.
    for (std::size_t i = 0; i < running_ids_.size();) {
      const TaskId id = running_ids_[i];
      if (engine_.block_table(id).empty() && cancel_seen(id)) {
        set_state(id, State::kCancelled);
        continue;
      }
      ++i;
    }
    return ok;
  }

  std::uint64_t loop_work(Worker& me, std::uint64_t quota, LiveCount& live) {
    std::uint64_t done = 0;
    std::uint64_t ignored = 0;
    // The loop serves past its own quota while producers still work, as a
    // serving loop would (those calls count as operations too).
    while (loop_has_ops_ && (done < quota || producers_active_.load() != 0) && !stop_.load(std::memory_order::relaxed)) {  // relaxed: a request to stop soon
      std::size_t op = loop_picker_->pick(me.rng);
      if ((op == kAppend || op == kFinish) && running_ids_.empty()) op = kStep;
      // Past its quota the loop only keeps the producers company: the watchdog
      // leaves those calls out, or a producer that never returns would go unseen.
      live.begin(done < quota ? op : kOpServing);
      bool ok = true;
      switch (op) {
        case kSubmit: ok = submit(me); break;
        case kCancel: ok = loop_cancel(me); break;
        case kStep: step(ignored); break;
        case kAppend: ok = append(me); break;
        default: ok = finish(me); break;
      }
      me.counts.add(op, ok);
      live.ops.store(++done, std::memory_order::relaxed);  // relaxed: a statistic for the progress line
    }
    // The producers stop at their quota or at `stop`; then the loop drains.
    live.begin(kOpDraining);
    while (producers_active_.load() != 0) std::this_thread::yield();
    drain();
    return loop_has_ops_ ? std::min(done, quota) : quota;
  }

  std::uint64_t producer_work(Worker& me, std::uint64_t quota, LiveCount& live) {
    std::uint64_t done = 0;
    while (producers_have_ops_ && done < quota && !stop_.load(std::memory_order::relaxed)) {  // relaxed: a request to stop soon
      const std::size_t op = producer_picker_->pick(me.rng);
      live.begin(op);
      const bool ok = op == kSubmit ? submit(me) : cancel(me);
      // A full queue: let the loop run (on few cores a spinning producer
      // would starve it), as a client would back off.
      if (op == kSubmit && !ok) std::this_thread::yield();
      me.counts.add(op, ok);
      live.ops.store(++done, std::memory_order::relaxed);  // relaxed: a statistic for the progress line
    }
    producers_active_.fetch_sub(1);
    return producers_have_ops_ ? done : quota;
  }

  std::uint64_t work(unsigned w, std::uint64_t quota, LiveCount& live) {
    return w == 0 ? loop_work(workers_[w], quota, live) : producer_work(workers_[w], quota, live);
  }

  // On the loop thread, producers stopped: every id of the epoch is in
  // exactly one of finished, cancelled or still there; cancel what is there.
  void drain() {
    const std::uint64_t used = std::min<std::uint64_t>(next_.load(), ids_per_epoch_);
    const std::uint64_t t0 = clock_.tick();
    for (std::uint64_t n = 0; n < used; ++n) {
      const TaskId id = base_ + n;
      const SharedRec& sh = shared_[n];
      const LoopRec& rec = loop_[n];
      const bool accepted = sh.submit.load() == kAccepted;
      accepted_ += accepted;
      const bool cancelled_true = sh.cancel_end.load() != 0;
      const std::uint64_t c0 = clock_.tick();
      const bool ok = engine_.cancel(id);
      const std::uint64_t c1 = clock_.tick();
      bool expect = false;
      if (accepted) {
        switch (rec.state) {
          case State::kNone: expect = !cancelled_true; break;  // still waiting, unless a cancel removed it
          case State::kRunning:
          case State::kPaused:
            // A producer's true already reported it (one true a task), whether
            // or not a step has carried that cancel out yet.
            expect = !cancelled_true;
            break;
          default: break;
        }
      }
      if (ok != expect) {
        std::string state = !accepted ? (sh.submit.load() == kRefused ? "refused by submit" + at(sh.submit_start.load(), sh.submit_end.load()) : "never submitted")
                                      : std::string(name(rec.state));
        if (accepted && cancelled_true) state += ", cancel returned true" + at(sh.cancel_start.load(), sh.cancel_end.load());
        if (rec.state == State::kFinished || rec.state == State::kCancelled) state += " at" + at(rec.end_start, rec.end_end);
        fail("lifecycle", "at the pause, cancel(" + std::to_string(id) + ")" + at(c0, c1) + " returned " + (ok ? "true" : "false") + " for a task " + state,
             {id}, {{"submit", id, sh.submit_start.load(), sh.submit_end.load()}, {"cancel", id, c0, c1}});
      }
      if (const std::uint32_t trues = sh.cancels_true.load() + (ok ? 1 : 0); trues > 1) {
        fail("cancel", std::to_string(trues) + " cancels of task " + std::to_string(id) + " returned true (the first" +
                           at(sh.cancel_start.load(), sh.cancel_end.load()) + "); at most one may",
             {id}, {{"cancel", id, sh.cancel_start.load(), sh.cancel_end.load()}, {"cancel", id, c0, c1}});
      }
      if (ok) ++drained_;
      if (accepted && !ok && (rec.state == State::kCancelled || cancelled_true) && rec.state != State::kFinished) ++cancelled_;
    }
    const StepPlan& plan = engine_.step();
    const std::uint64_t t1 = clock_.tick();
    const auto st = engine_.stats();
    if (!plan.admitted.empty() || !plan.resumed.empty() || !plan.preempted.empty() || st.waiting != 0 || st.running != 0 || st.paused != 0 ||
        st.device_free_blocks != device_total_ || st.host_free_blocks != host_total_ || engine_.scheduler().len() != 0) {
      fail("engine",
           "after every task was cancelled" + at(t0, t1) + ": plan " + std::to_string(plan.admitted.size() + plan.resumed.size() + plan.preempted.size()) +
               " entries, waiting " + std::to_string(st.waiting) + ", running " + std::to_string(st.running) + ", paused " + std::to_string(st.paused) +
               ", device free " + std::to_string(st.device_free_blocks) + "/" + std::to_string(device_total_) + ", host free " +
               std::to_string(st.host_free_blocks) + "/" + std::to_string(host_total_),
           {}, {{"drain", 0, t0, t1}});
    }
    epoch_used_ = used;
  }

  // Every worker is parked: check each producer cancel against the task's
  // lifetime, then start a fresh epoch of ids.
  bool pause() {
    for (const auto& w : workers_) {
      for (const CancelEvent& c : w.cancels) {
        if (!in_epoch(c.id) || idx(c.id) >= epoch_used_) continue;
        const SharedRec& sh = shared_[idx(c.id)];
        const LoopRec& rec = loop_[idx(c.id)];
        const bool accepted = sh.submit.load() == kAccepted;
        const std::uint64_t ss = sh.submit_start.load(), se = sh.submit_end.load();
        // The earliest moment the task may have left: a finish or a carried-out
        // cancel, or the first cancel that returned true.
        std::uint64_t left = std::numeric_limits<std::uint64_t>::max();
        if (rec.state == State::kFinished || rec.state == State::kCancelled) left = rec.end_start;
        if (sh.cancel_start.load() != 0) left = std::min(left, sh.cancel_start.load());
        if (c.ok && (!accepted || c.end < ss)) {
          fail("cancel", "cancel(" + std::to_string(c.id) + ")" + at(c.start, c.end) + " returned true for a task " + (accepted ? "submitted only" + at(ss, se) : "never accepted"),
               {c.id}, {{"cancel", c.id, c.start, c.end}, {"submit", c.id, ss, se}});
        } else if (c.ok && rec.state == State::kFinished && c.start > rec.end_end) {
          fail("cancel", "cancel(" + std::to_string(c.id) + ")" + at(c.start, c.end) + " returned true for a task finished" + at(rec.end_start, rec.end_end),
               {c.id}, {{"finish", c.id, rec.end_start, rec.end_end}, {"cancel", c.id, c.start, c.end}});
        } else if (c.ok && rec.state == State::kNone && sh.cancel_end.load() < c.start) {
          fail("cancel", "cancel(" + std::to_string(c.id) + ")" + at(c.start, c.end) + " returned true for a waiting task already cancelled" +
                             at(sh.cancel_start.load(), sh.cancel_end.load()),
               {c.id}, {{"cancel", c.id, sh.cancel_start.load(), sh.cancel_end.load()}, {"cancel", c.id, c.start, c.end}});
        } else if (!c.ok && accepted && se < c.start && left > c.end) {
          fail("cancel", "cancel(" + std::to_string(c.id) + ")" + at(c.start, c.end) + " returned false, but the task was accepted" + at(ss, se) + " and " +
                             name(rec.state == State::kNone ? State::kNone : rec.state) + ", not gone before" +
                             (left == std::numeric_limits<std::uint64_t>::max() ? std::string(" the pause") : at(left, left)),
               {c.id}, {{"submit", c.id, ss, se}, {"cancel", c.id, c.start, c.end}});
        }
      }
    }
    for (auto& w : workers_) w.cancels.clear();
    check_refusals();
    // A fresh epoch: the engine is empty, ids continue.
    // (index 0 too: a cancel aimed at the epoch's first id may come before any submit)
    for (std::uint64_t n = 0; n < std::max<std::uint64_t>(epoch_used_, 1); ++n) {
      SharedRec& sh = shared_[n];
      sh.submit.store(kNotSubmitted);
      sh.cancels_begun.store(0);
      sh.cancels_true.store(0);
      sh.submit_start.store(0);
      sh.submit_end.store(0);
      sh.cancel_start.store(0);
      sh.cancel_end.store(0);
      sh.queue_full.store(false);
      loop_[n] = LoopRec{};
      table_size_[n] = 0;
    }
    for (auto& o : device_owner_) o = {};
    for (auto& o : host_owner_) o = {};
    running_ids_.clear();
    paused_ids_.clear();
    waiting_model_.clear();
    pending_.clear();
    scanned_ = 0;
    base_ += epoch_used_;  // ids handed out past the epoch's end were never submitted
    next_.store(0);
    producers_active_.store(cfg_.threads - 1);
    return !found_.any();
  }

  // QueueFull only when the waiting queue can have been full during the
  // submit (as the scheduler target's check): the queue's len() counts a
  // schedule from its start and a removal until it returns, so during
  // refusal R it held at most the accepted submits begun before R ended, plus
  // the other failed submits in flight during R, less the tasks that had
  // surely left it before R began: admitted by a step that ended before, or
  // removed by a cancel that returned true, for a task never admitted, and
  // ended before (the epoch starts on an empty engine). Judged unless so many
  // calls can be in flight that something else may be full (README,
  // Guarantees: max_queue_size + 131 stalled calls).
  void check_refusals() {
    const std::size_t limit = engine_.config().scheduler.max_queue_size;
    if (cfg_.threads >= limit + 131) return;
    std::vector<std::uint64_t> accepted_start, failed_start, failed_end, removed_end;
    for (std::uint64_t n = 0; n < epoch_used_; ++n) {
      const SharedRec& sh = shared_[n];
      const std::uint8_t sub = sh.submit.load();
      if (sub == kAccepted) accepted_start.push_back(sh.submit_start.load());
      if (sub == kRefused) {
        failed_start.push_back(sh.submit_start.load());
        failed_end.push_back(sh.submit_end.load());
      }
      if (loop_[n].admit_end != 0) {
        removed_end.push_back(loop_[n].admit_end);
      } else if (sh.cancel_end.load() != 0) {
        removed_end.push_back(sh.cancel_end.load());
      }
    }
    for (auto* v : {&accepted_start, &failed_start, &failed_end, &removed_end}) std::sort(v->begin(), v->end());
    for (std::uint64_t n = 0; n < epoch_used_; ++n) {
      const SharedRec& sh = shared_[n];
      if (!sh.queue_full.load()) continue;
      const std::uint64_t rs = sh.submit_start.load(), re = sh.submit_end.load();
      const std::int64_t others_in_flight = below(failed_start, re) - below(failed_end, rs) - 1;  // not R itself
      const std::int64_t most = below(accepted_start, re) + others_in_flight - below(removed_end, rs);
      ++refusals_judged_;
      if (most >= static_cast<std::int64_t>(limit)) continue;
      const TaskId id = base_ + n;
      fail("queue_full",
           "submit(" + std::to_string(id) + ")" + at(rs, re) + " reported QueueFull, but the waiting queue held at most " +
               std::to_string(most) + " < max_queue_size " + std::to_string(limit) + " tasks during it",
           {id}, {{"submit", id, rs, re}});
    }
  }

  const Config& cfg_;
  Report& r_;
  Collector found_;
  std::unique_ptr<OpPicker> loop_picker_, producer_picker_;
  bool loop_has_ops_ = false, producers_have_ops_ = false;
  E engine_;
  const std::uint32_t device_total_;
  const std::uint32_t host_total_;
  const std::size_t ids_per_epoch_;
  const std::size_t cancel_cap_ = std::min<std::size_t>(cfg_.max_events, kMaxIdsPerEpoch);  // cancels logged per thread and epoch
  tgi_test::LogicalClock clock_;
  std::atomic<bool> stop_{false};
  alignas(64) std::atomic<std::uint64_t> next_{0};  // ids handed out in this epoch
  alignas(64) std::atomic<unsigned> producers_active_{0};
  alignas(64) std::atomic<std::uint64_t> queue_full_{0};
  TaskId base_ = 1;  // the epoch's first id
  std::vector<SharedRec> shared_;
  std::vector<LoopRec> loop_;
  std::vector<std::uint32_t> table_size_ = std::vector<std::uint32_t>(ids_per_epoch_, 0);
  std::vector<Owner> device_owner_, host_owner_;
  std::vector<TaskId> running_ids_, paused_ids_, changed_;
  struct Short {
    TaskId id;
    std::uint32_t need;  // blocks missing when the step began
  };
  std::vector<Short> short_before_;  // running tasks short of blocks when the step began
  std::vector<TaskId> waiting_model_;   // accepted ids not yet seen gone (check_order prunes it)
  std::vector<std::uint64_t> pending_;  // epoch indices whose submit had not returned at the last look
  std::uint64_t scanned_ = 0;           // epoch indices looked at so far
  std::uint64_t run_counter_ = 0;       // admissions and resumptions seen, in plan order
  std::uint64_t victims_judged_ = 0, victims_unjudged_ = 0;  // preemptions whose cause was checked / not (a cancel ran)
  std::uint64_t refusals_judged_ = 0;                          // QueueFull answers checked (check_refusals)
  alignas(64) std::atomic<std::uint64_t> cancels_started_{0};  // producers' cancel calls begun
  alignas(64) std::atomic<std::uint64_t> cancels_done_{0};     // ... and returned
  std::vector<std::atomic<TaskId>> recent_;  // recently submitted ids, for cancel to aim at
  std::vector<Worker> workers_;
  std::uint64_t epoch_used_ = 0;
  // Loop-thread counters (read after the run).
  std::uint64_t steps_ = 0, max_running_ = 0, admissions_ = 0, append_refused_ = 0, finished_ = 0, cancelled_ = 0, drained_ = 0, accepted_ = 0;
};

}  // namespace

void run_engine_target(const Config& cfg, Report& r) {
  if (cfg.target == Target::BrokenEngine) {
    EngineRun<PlanDroppingEngine>(cfg, r, cfg.drop_every).run();
  } else if (cfg.target == Target::BrokenEngineFull) {
    EngineRun<RefusingEngine>(cfg, r, cfg.drop_every).run();
  } else if (cfg.target == Target::BrokenEngineOrder) {
    EngineRun<PriorityBlindEngine>(cfg, r).run();
  } else {
    EngineRun<Engine>(cfg, r).run();
  }
}

#endif

}  // namespace tgi_gtc::stress::detail
