// The scheduler run: threads call schedule/next/peek/cancel/clear at random;
// every call is stamped with the shared logical clock (support/history.hpp)
// into the calling thread's preallocated log. While running, each returned
// task's payload is checked against its id, len() against the capacity, and
// cancel's result against the id asked for; every --len-every-th operation is
// followed by a stamped len() or is_empty(). When a log fills (or the run
// ends), every thread stops at a barrier, the main thread drains the queue
// with clear() (len() must equal what it returns) and checks the whole epoch's
// history, and every QueueFull answer and stamped len() against the calls
// around it, then the logs are emptied and the next epoch starts on the empty
// queue.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "driver.hpp"
#include "queues.hpp"

namespace tgi_gtc::stress::detail {
namespace {

using tgi_test::Event;
using tgi_test::HistoryChecker;
using tgi_test::Op;
using tgi_test::ThreadLog;

enum SchedOp : std::size_t { kSchedule, kNext, kPeek, kCancel, kClear };

std::string at(std::uint64_t start, std::uint64_t end) {
  return " [" + std::to_string(start) + "," + std::to_string(end) + "]";
}

// "1 task", "2 tasks".
std::string count(std::int64_t n, const std::string& noun) { return std::to_string(n) + " " + noun + (n == 1 ? "" : "s"); }

CallRef ref(const Event& e) { return {HistoryChecker::name(e.op), e.id, e.start, e.end}; }

template <class Q>
class SchedulerRun {
 public:
  SchedulerRun(const Config& cfg, Q& q, Report& r)
      : cfg_(cfg), q_(q), r_(r), found_(cfg.max_findings), picker_(cfg.mix), recent_(kRecent), workers_(cfg.threads) {
    // Room for a full log plus one clear() of a full queue: nothing is
    // allocated while recording.
    for (unsigned w = 0; w < cfg.threads; ++w) {
      workers_[w].log.reserve(cfg.max_events + cfg.capacity + 1);
      if (reuse()) workers_[w].duplicates.reserve(cfg.max_events);
      workers_[w].refusals.reserve(cfg.max_events);
      // An epoch's operations: at most max_events (each logs an event).
      if (cfg.len_every != 0) workers_[w].lens.reserve(cfg.max_events / cfg.len_every + 1);
      workers_[w].rng = thread_rng(cfg.seed, w);
      workers_[w].counts = OpCounts(cfg.mix.size());
    }
    drain_log_.reserve(cfg.capacity + 1);
  }

  void run() {
    Progress progress(cfg_);
    Watchdog watchdog(cfg_);
    std::atomic<bool>& stop = stop_;
    drive(
        cfg_, r_, progress, found_, stop, watchdog, [this](unsigned w, std::uint64_t quota, LiveCount& live) { return work(w, quota, live); },
        [this] { return pause(); });
    std::vector<OpCounts> counts;
    std::uint64_t full = 0;
    std::size_t max_len = 0;
    for (const auto& w : workers_) {
      counts.push_back(w.counts);
      max_len = std::max(max_len, w.max_len);
      full += w.full;
    }
    sum_ops(r_, cfg_.mix, counts);
    const std::uint64_t accepted = r_.ops[kSchedule].ok;
    r_.events_checked = events_checked_;
    r_.stats = {{"tasks_accepted", accepted},
                {"queue_full", full},
                {"max_len", max_len},
                {"capacity", cfg_.capacity},
                {"drained_at_pauses", drained_},
                {"len_calls_checked", len_calls_checked_}};
    if (q_.dropped()) r_.stats.emplace_back("dropped_by_target", q_.dropped());
    if (reuse()) r_.stats.emplace_back("duplicate_id_answers_checked", duplicate_answers_);
    if (reuse()) r_.stats.emplace_back("empty_answers_checked", empty_answers_);
    if (reuse()) {
      r_.notes.push_back("ids 1.." + std::to_string(cfg_.reuse_ids) +
                         " reused: each epoch checks per id that accepted schedules equal removals and that DuplicateId came exactly while a copy was queued, "
                         "and by counts that no next, peek or clear found nothing while some task was surely queued (ordering needs unique ids)");
    }
    if (r_.epochs > 1) {
      r_.notes.push_back(std::string(reuse() ? "ids counted" : "history checked") + " in " + std::to_string(r_.epochs) +
                         " epochs of at most " + std::to_string(cfg_.max_events) +
                         " events per thread; the queue is drained with clear() at each pause, so every epoch's history is complete");
    }
    found_.finish(r_);
  }

 private:
  static constexpr std::size_t kRecent = 256;
  static constexpr bool kHasIsEmpty = requires(const Q& q) { q.is_empty(); };

  // A len() (value: what it returned) or is_empty() (value: 0 for true, 1
  // for false) call between two ticks of the clock.
  struct LenCall {
    std::uint64_t start, end;
    std::size_t value;
    bool is_empty;
  };

  struct alignas(64) Worker {
    ThreadLog log;
    std::mt19937_64 rng;
    OpCounts counts;
    std::size_t max_len = 0;
    std::uint64_t full = 0;
    ThreadLog duplicates;  // --reuse-ids: the schedule calls that returned DuplicateId
    ThreadLog refusals;    // the schedule calls that returned QueueFull
    std::vector<LenCall> lens;  // the stamped len() and is_empty() calls
    std::size_t since_len = 0;  // operations since the last stamped one
  };

  // The epoch's calls that change len(), as sorted clock stamps (the epoch
  // starts on an empty queue). len() counts a task from the start of its
  // schedule (to the end, if that fails) until its removal returns (README,
  // Guarantees).
  struct Stamps {
    std::vector<std::uint64_t> accepted_start, accepted_end, failed_start, failed_end, removed_start, removed_end;
    bool balanced() const { return accepted_start.size() == removed_start.size(); }
    // What len() can have been at any instant of [start, end]. At least: the
    // schedules accepted before it began, less the removals (one per task
    // returned by next, cancel or clear) that began before it ended (they may
    // have taken tasks scheduled later; subtracting them anyway only lowers
    // the bound). At most: the accepted schedules begun before it ended, plus
    // the failed ones in flight during it, less the removals that ended
    // before it began. `in_flight_self`: the interval is itself a failed
    // schedule, not to be counted.
    std::int64_t least(std::uint64_t start, std::uint64_t end) const { return below(accepted_end, start) - below(removed_start, end); }
    std::int64_t most(std::uint64_t start, std::uint64_t end, bool in_flight_self = false) const {
      const std::int64_t failed_in_flight = below(failed_start, end) - below(failed_end, start) - (in_flight_self ? 1 : 0);
      return below(accepted_start, end) + failed_in_flight - below(removed_end, start);
    }
  };

  bool reuse() const { return cfg_.reuse_ids != 0; }
  TaskId reused_id(Worker& me) const { return 1 + me.rng() % cfg_.reuse_ids; }

  // --reuse-ids: with every worker parked and the queue drained, each id must
  // have left exactly as often as it was accepted in this epoch.
  void check_per_id(const Stamps& s) {
    std::vector<std::uint64_t> accepted(cfg_.reuse_ids + 1, 0), removed(cfg_.reuse_ids + 1, 0);
    std::vector<const Event*> last(cfg_.reuse_ids + 1, nullptr);
    auto count = [&](const ThreadLog& log) {
      for (const Event& e : log) {
        ++events_checked_;
        if (!e.ok || e.op == Op::Peek) continue;
        if (e.id == 0 || e.id > cfg_.reuse_ids) {
          found_.add(make_violation("conservation", HistoryChecker::name(e.op) + at(e.start, e.end) + " returned task " +
                                                        std::to_string(e.id) + ", an id never scheduled",
                                    {e.id}, {ref(e)}));
          continue;
        }
        (e.op == Op::Schedule ? accepted : removed)[e.id] += 1;
        if (!last[e.id] || e.start > last[e.id]->start) last[e.id] = &e;
      }
    };
    for (const auto& w : workers_) count(w.log);
    count(drain_log_);
    bool balanced = true;
    for (TaskId id = 1; id <= cfg_.reuse_ids; ++id) {
      if (accepted[id] == removed[id]) continue;
      balanced = false;
      std::vector<CallRef> calls;
      if (last[id]) calls.push_back(ref(*last[id]));
      found_.add(make_violation("conservation", "id " + std::to_string(id) + " was accepted " + std::to_string(accepted[id]) +
                                                    " times and left " + std::to_string(removed[id]) + " times in this epoch",
                                {id}, std::move(calls)));
    }
    check_duplicates(accepted, removed);
    // A lost task would count as queued for the rest of the epoch and make
    // every later empty answer look wrong: an epoch that does not balance is
    // reported as conservation only.
    if (balanced) check_empty_by_count(s);
  }

  // --reuse-ids: the empty rule without task identities (the epoch starts on
  // an empty queue). A next(), peek() or clear() that found nothing is wrong
  // if some task was queued at every instant of it: more schedules were
  // accepted before it began than tasks were removed (by next, cancel and
  // clear, one per task returned) by calls that began before it ended. Those
  // removals may have taken tasks scheduled later; subtracting them anyway
  // only makes the count smaller, so a positive count is a certain finding.
  void check_empty_by_count(const Stamps& s) {
    std::vector<const Event*> empties;
    const auto gather = [&](const ThreadLog& log) {
      for (std::size_t i = 0; i < log.size(); ++i) {
        const Event& e = log[i];
        if (e.ok) continue;
        if (e.op == Op::Next || e.op == Op::Peek) {
          empties.push_back(&e);
        } else if (e.op == Op::Clear) {
          // A clear's marker; the tasks it returned follow it in the log.
          const bool returned = i + 1 < log.size() && log[i + 1].op == Op::Clear && log[i + 1].ok && log[i + 1].start == e.start;
          if (!returned) empties.push_back(&e);
        }
      }
    };
    for (const auto& w : workers_) gather(w.log);
    gather(drain_log_);
    empty_answers_ += empties.size();
    for (const Event* e : empties) {
      if (s.least(e->start, e->end) <= 0) continue;
      found_.add(make_violation("empty",
                                HistoryChecker::name(e->op) + at(e->start, e->end) + " found nothing, but a task was queued throughout: " +
                                    count(below(s.accepted_end, e->start), "schedule") +
                                    " accepted before it began, and calls that began before it ended removed only " +
                                    count(below(s.removed_start, e->end), "task"),
                                {}, {ref(*e)}));
    }
  }

  // --reuse-ids: DuplicateId exactly when a copy of the id is queued, judged
  // from the calls' intervals alone (the epoch starts on an empty queue):
  //   - a schedule accepted while a copy was surely queued throughout it: more
  //     schedules of the id were accepted before it began than removals of the
  //     id began before it ended;
  //   - DuplicateId while no copy can have been queued at any instant of it:
  //     no more schedules of the id accepted began before it ended than
  //     removals of the id ended before it began.
  // An id whose counts do not balance was reported above; its intervals say
  // nothing more (a lost copy would make every later schedule look like a
  // duplicate), so it is skipped here.
  void check_duplicates(const std::vector<std::uint64_t>& accepted, const std::vector<std::uint64_t>& removed) {
    struct Spans {
      std::vector<std::uint64_t> acc_start, acc_end, rem_start, rem_end;
      std::vector<const Event*> accepted, refused;
    };
    std::vector<Spans> per(cfg_.reuse_ids + 1);
    const auto gather = [&](const ThreadLog& log) {
      for (const Event& e : log) {
        if (!e.ok || e.op == Op::Peek || e.id == 0 || e.id > cfg_.reuse_ids) continue;  // conservation reports stray ids
        Spans& s = per[e.id];
        if (e.op == Op::Schedule) {
          s.acc_start.push_back(e.start);
          s.acc_end.push_back(e.end);
          s.accepted.push_back(&e);
        } else {
          s.rem_start.push_back(e.start);
          s.rem_end.push_back(e.end);
        }
      }
    };
    for (const auto& w : workers_) {
      gather(w.log);
      for (const Event& e : w.duplicates) {
        if (e.id != 0 && e.id <= cfg_.reuse_ids) per[e.id].refused.push_back(&e);
      }
    }
    gather(drain_log_);
    for (TaskId id = 1; id <= cfg_.reuse_ids; ++id) {
      if (accepted[id] != removed[id]) continue;
      Spans& s = per[id];
      for (auto* v : {&s.acc_start, &s.acc_end, &s.rem_start, &s.rem_end}) std::sort(v->begin(), v->end());
      for (const Event* a : s.accepted) {
        const std::int64_t before = below(s.acc_end, a->start), removing = below(s.rem_start, a->end);
        if (before <= removing) continue;
        found_.add(make_violation("duplicate",
                                  "schedule(" + std::to_string(id) + ")" + at(a->start, a->end) + " was accepted while a copy of the id was queued throughout: " +
                                      std::to_string(before) + " schedules of it were accepted before it began, and only " + std::to_string(removing) +
                                      " removals of it began before it ended",
                                  {id}, {ref(*a)}));
      }
      duplicate_answers_ += s.refused.size();
      for (const Event* d : s.refused) {
        const std::int64_t begun = below(s.acc_start, d->end), ended = below(s.rem_end, d->start);
        if (begun > ended) continue;
        found_.add(make_violation("duplicate",
                                  "schedule(" + std::to_string(id) + ")" + at(d->start, d->end) + " reported DuplicateId, but no copy of the id can have been queued then: " +
                                      std::to_string(begun) + " accepted schedules of it had begun before it ended, and " + std::to_string(ended) +
                                      " removals of it had ended before it began",
                                  {id}, {{"schedule", id, d->start, d->end}}));
      }
    }
  }

  // QueueFull is judged unless so many calls can be in flight that the task
  // table, not the count, may be what is full (README, Guarantees: capacity
  // + 131 stalled calls).
  bool refusals_checked() const { return cfg_.threads < cfg_.capacity + 131; }

  Stamps stamps() const {
    Stamps s;
    const auto gather = [&](const ThreadLog& log) {
      for (const Event& e : log) {
        if (e.op == Op::Schedule) {
          if (e.ok) {
            s.accepted_start.push_back(e.start);
            s.accepted_end.push_back(e.end);
          } else {
            s.failed_start.push_back(e.start);
            s.failed_end.push_back(e.end);
          }
        } else if (e.ok && e.op != Op::Peek) {
          s.removed_start.push_back(e.start);
          s.removed_end.push_back(e.end);
        }
      }
    };
    for (const auto& w : workers_) gather(w.log);
    gather(drain_log_);
    for (auto* v : {&s.accepted_start, &s.accepted_end, &s.failed_start, &s.failed_end, &s.removed_start, &s.removed_end}) {
      std::sort(v->begin(), v->end());
    }
    return s;
  }

  // QueueFull only when len() can have reached the capacity during the call.
  void check_refusals(const Stamps& s) {
    for (const auto& w : workers_) {
      for (const Event& r : w.refusals) {
        const std::int64_t most = s.most(r.start, r.end, true);
        if (most >= static_cast<std::int64_t>(cfg_.capacity)) continue;
        found_.add(make_violation("queue_full", "schedule(" + std::to_string(r.id) + ")" + at(r.start, r.end) +
                                                    " reported QueueFull, but len() was at most " + std::to_string(most) +
                                                    " < capacity " + std::to_string(cfg_.capacity) + " during it",
                                  {r.id}, {ref(r)}));
      }
    }
  }

  // Each stamped len() within what it can have been during the call, and each
  // is_empty() true only if no task was surely queued throughout it, false
  // only if some task can have been counted. An epoch in which the accepted
  // schedules and the removals do not balance is left to the conservation
  // check: a lost task would raise every later lower bound.
  void check_lens(const Stamps& s) {
    if (!s.balanced()) return;
    for (const auto& w : workers_) {
      len_calls_checked_ += w.lens.size();
      for (const LenCall& c : w.lens) {
        const std::int64_t least = s.least(c.start, c.end), most = s.most(c.start, c.end);
        const auto value = static_cast<std::int64_t>(c.value);
        const std::string call = (c.is_empty ? "is_empty()" : "len()") + at(c.start, c.end);
        std::string detail;
        if (c.is_empty ? c.value == 0 && least > 0 : value < least) {
          detail = call + " returned " + (c.is_empty ? std::string("true") : std::to_string(c.value)) + ", but " + count(least, "task") +
                   (least == 1 ? " was" : " were") + " queued throughout it: " + count(below(s.accepted_end, c.start), "schedule") +
                   " accepted before it began, and calls that began before it ended removed " + count(below(s.removed_start, c.end), "task");
        } else if (c.is_empty ? c.value != 0 && most <= 0 : value > most) {
          detail = call + " returned " + (c.is_empty ? std::string("false") : std::to_string(c.value)) + ", but at most " +
                   count(most, "task") + " can have been counted during it: " + count(below(s.accepted_start, c.end), "accepted schedule") +
                   " began before it ended, " + count(below(s.failed_start, c.end) - below(s.failed_end, c.start), "failed one") +
                   " overlapped it, and calls that ended before it began removed " + count(below(s.removed_end, c.start), "task");
        } else {
          continue;
        }
        found_.add(make_violation("len", std::move(detail), {}, {{c.is_empty ? "is_empty" : "len", 0, c.start, c.end}}));
      }
    }
  }

  ScheduledTask make_task(TaskId id) const {
    const std::uint64_t h = mix64(id ^ cfg_.seed);
    return ScheduledTask(id, tokens_of(id)).with_priority(static_cast<Priority>(h % 4)).preemptible((h >> 8) & 1);
  }
  static std::size_t tokens_of(TaskId id) { return static_cast<std::size_t>(mix64(id) % 8192) + 1; }

  // A returned task must be the one scheduled under its id, bit for bit.
  void check_payload(const ScheduledTask& t, const Event& e) {
    const ScheduledTask want = make_task(t.id);
    if (t == want) return;
    found_.add(make_violation("payload",
                              HistoryChecker::name(e.op) + at(e.start, e.end) + " returned task " + std::to_string(t.id) +
                                  " with tokens " + std::to_string(t.estimated_tokens) + ", priority " +
                                  std::string(scheduling::to_string(t.priority)) + ", preemptible " +
                                  std::to_string(t.is_preemptible) + "; scheduled with " + std::to_string(want.estimated_tokens) +
                                  ", " + std::string(scheduling::to_string(want.priority)) + ", " + std::to_string(want.is_preemptible),
                              {t.id}, {ref(e)}));
    stop_.store(true);
  }

  static void returned(const std::optional<ScheduledTask>& t, Event& e) {
    if (!t) return;
    e.ok = true;
    e.id = t->id;
    e.priority = t->priority;
  }

  std::uint64_t work(unsigned w, std::uint64_t quota, LiveCount& live) {
    Worker& me = workers_[w];
    std::uint64_t done = 0;
    // relaxed: a request to stop soon; the barrier after this epoch publishes everything else
    while (done < quota && !stop_.load(std::memory_order::relaxed)) {
      const std::size_t op = picker_.pick(me.rng);
      live.begin(op);
      bool ok = false;
      switch (op) {
        case kSchedule: {
          const TaskId id = reuse() ? reused_id(me) : q_.next_id();
          const ScheduledTask t = make_task(id);
          std::error_code ec;
          tgi_test::record(clock_, me.log, Op::Schedule, [&](Event& e) {
            e.id = id;
            e.priority = t.priority;
            ec = q_.schedule(w, t);
            e.ok = !ec;
          });
          ok = !ec;
          if (ec == ScheduleError::QueueFull) {
            ++me.full;
            me.refusals.push_back(me.log.back());
          }
          if (reuse() && ec == ScheduleError::DuplicateId) me.duplicates.push_back(me.log.back());
          if (ec && ec != ScheduleError::QueueFull && !(reuse() && ec == ScheduleError::DuplicateId)) {
            found_.add(make_violation("duplicate", "schedule(" + std::to_string(id) + ")" + at(me.log.back().start, me.log.back().end) +
                                                        " failed with '" + ec.message() + "' for an id never scheduled before",
                                      {id}, {ref(me.log.back())}));
            stop_.store(true);
          }
          if (!reuse()) recent_[id % kRecent].store(id, std::memory_order::relaxed);  // relaxed: a hint for cancel, any value will do
          break;
        }
        case kNext:
        case kPeek: {
          std::optional<ScheduledTask> t;
          tgi_test::record(clock_, me.log, op == kNext ? Op::Next : Op::Peek, [&](Event& e) {
            t = op == kNext ? q_.next(w) : q_.peek(w);
            returned(t, e);
          });
          ok = t.has_value();
          if (t) check_payload(*t, me.log.back());
          break;
        }
        case kCancel: {
          TaskId id = reuse() ? reused_id(me) : recent_[me.rng() % kRecent].load(std::memory_order::relaxed);  // relaxed: a hint only
          if (id == 0) id = 1;
          std::optional<ScheduledTask> t;
          tgi_test::record(clock_, me.log, Op::Cancel, [&](Event& e) {
            e.id = id;
            t = q_.cancel(w, id);
            returned(t, e);  // logs the id returned: conservation accounts for it
          });
          ok = t.has_value();
          if (t) check_payload(*t, me.log.back());
          if (t && t->id != id) {
            const Event& e = me.log.back();
            found_.add(make_violation("cancel", "cancel(" + std::to_string(id) + ")" + at(e.start, e.end) + " returned task " + std::to_string(t->id),
                                      {id, t->id}, {ref(e)}));
            stop_.store(true);
          }
          break;
        }
        default: {
          const std::uint64_t t0 = clock_.tick();
          const auto all = q_.clear();
          const std::uint64_t t1 = clock_.tick();
          // The call itself, returning something or not: the clear check
          // judges what it left (support/history.hpp).
          me.log.push_back({Op::Clear, false, Priority::Normal, 0, t0, t1});
          for (const auto& t : all) {
            me.log.push_back({Op::Clear, true, t.priority, t.id, t0, t1});
            check_payload(t, me.log.back());
          }
          ok = !all.empty();
          break;
        }
      }
      me.counts.add(op, ok);
      if (cfg_.len_every != 0 && ++me.since_len == cfg_.len_every) {
        me.since_len = 0;
        stamped_len(me);
      }
      const std::size_t n = q_.len();
      if (n > cfg_.capacity) {
        const std::uint64_t now = clock_.now();
        found_.add(make_violation("len", "len() returned " + std::to_string(n) + " > capacity " + std::to_string(cfg_.capacity) + " at" + at(now, now),
                                  {}, {{"len", 0, now, now}}));
        stop_.store(true);
      }
      me.max_len = std::max(me.max_len, n);
      live.ops.store(++done, std::memory_order::relaxed);  // relaxed: a statistic for the progress line
      if (me.log.size() >= cfg_.max_events) stop_.store(true);
    }
    return done;
  }

  // A len() or, every other time where the queue has it, an is_empty(),
  // stamped for check_lens.
  void stamped_len(Worker& me) {
    LenCall c{};
    c.is_empty = kHasIsEmpty && me.lens.size() % 2 == 1;
    c.start = clock_.tick();
    if constexpr (kHasIsEmpty) {
      c.value = c.is_empty ? (q_.is_empty() ? 0 : 1) : q_.len();
    } else {
      c.value = q_.len();
    }
    c.end = clock_.tick();
    me.lens.push_back(c);
  }

  // With no call in flight, is_empty() must say what len() does (`when`:
  // before or after the pause's clear()).
  void check_is_empty(bool empty, const char* when) {
    if constexpr (kHasIsEmpty) {
      if (q_.is_empty() == empty) return;
      const std::uint64_t now = clock_.tick();
      found_.add(make_violation("len", std::string("is_empty() returned ") + (empty ? "false" : "true") + " with no call in flight " + when +
                                           " the pause's clear(), when the queue held " + (empty ? "no task" : "tasks"),
                                {}, {{"is_empty", 0, now, now}}));
    }
  }

  // Every worker is parked: drain, check the epoch's history, start afresh.
  bool pause() {
    drain_log_.clear();
    const std::size_t len_before = q_.len();  // exact: no call in flight
    check_is_empty(len_before == 0, "before");
    const std::uint64_t t0 = clock_.tick();
    const auto all = q_.clear();
    const std::uint64_t t1 = clock_.tick();
    for (const auto& t : all) {
      drain_log_.push_back({Op::Clear, true, t.priority, t.id, t0, t1});
      check_payload(t, drain_log_.back());
    }
    drained_ += all.size();
    if (len_before != all.size()) {
      found_.add(make_violation("len", "len() was " + std::to_string(len_before) + " with no call in flight, but clear()" + at(t0, t1) +
                                           " then returned " + std::to_string(all.size()) + " tasks",
                                {}, {{"clear", 0, t0, t1}}));
    }
    const Stamps s = stamps();
    if (refusals_checked()) check_refusals(s);
    check_lens(s);
    if (const std::size_t left = q_.len(); left != 0) {
      found_.add(make_violation("len", "len() is " + std::to_string(left) + " after clear()" + at(t0, t1) + " emptied the queue", {},
                                {{"clear", 0, t0, t1}}));
    }
    check_is_empty(true, "after");
    if (reuse()) {
      check_per_id(s);
    } else {
      check_history();
    }
    for (auto& w : workers_) {
      w.log.clear();  // keeps the capacity
      w.duplicates.clear();
      w.refusals.clear();
      w.lens.clear();
    }
    return !found_.any();
  }

  // The epoch's history (unique ids): ordering, conservation, cancels.
  void check_history() {
    HistoryChecker checker(!cfg_.fifo);
    for (const auto& w : workers_) checker.add(w.log);
    checker.add(drain_log_);
    events_checked_ += checker.size();
    tgi_test::FindingOptions opt;
    opt.max_per_kind = cfg_.max_findings;
    opt.earliest = true;
    opt.extended = true;
    auto findings = checker.findings(opt);
    for (auto& f : findings.items) {
      Violation v{std::move(f.kind), std::move(f.detail), {f.ids.begin(), f.ids.end()}, {}, f.at};
      for (const auto& c : f.calls) v.calls.push_back({HistoryChecker::name(c.op), c.id, c.start, c.end});
      found_.add(std::move(v), false);
    }
    for (const auto& [kind, n] : findings.counts) found_.add_count(kind, n);
  }

  const Config& cfg_;
  Q& q_;
  Report& r_;
  Collector found_;
  OpPicker picker_;
  tgi_test::LogicalClock clock_;
  std::atomic<bool> stop_{false};
  std::vector<std::atomic<TaskId>> recent_;  // recently scheduled ids, for cancel to aim at
  std::vector<Worker> workers_;
  ThreadLog drain_log_;
  std::uint64_t drained_ = 0;
  std::uint64_t events_checked_ = 0;
  std::uint64_t duplicate_answers_ = 0;  // --reuse-ids: DuplicateId answers judged
  std::uint64_t empty_answers_ = 0;      // --reuse-ids: next, peek and clear calls that found nothing, judged
  std::uint64_t len_calls_checked_ = 0;  // stamped len() and is_empty() calls judged (in balanced epochs)
};

}  // namespace

void run_scheduler_target(const Config& cfg_in, Report& r) {
  Config cfg = cfg_in;
  if (cfg.target == Target::BrokenMoodycamel) {
    for (auto& [name, weight] : cfg.mix) {
      if ((name == "peek" || name == "cancel") && weight > 0) {
        r.notes.push_back("broken-moodycamel has no " + name + ": its weight " + std::to_string(weight) + " is set to 0");
        weight = 0;
      }
    }
    bool any = false;
    for (const auto& m : cfg.mix) any = any || m.second > 0;
    if (!any) throw std::invalid_argument("the mix gives every op broken-moodycamel supports weight 0");
  }
  if (cfg.capacity > scheduling::kMaxQueueSize) throw std::invalid_argument("capacity above kMaxQueueSize");
  r.config = cfg;
  const bool priority_mode = !cfg.fifo;
  switch (cfg.target) {
    case Target::BrokenMoodycamel: {
      MoodycamelQueue q(cfg.capacity, priority_mode, cfg.threads);
      SchedulerRun<MoodycamelQueue>(cfg, q, r).run();
      break;
    }
    case Target::BrokenDropping:
    case Target::BrokenDuplicates:
    case Target::BrokenFull:
    case Target::BrokenClear:
    case Target::BrokenLen:
    case Target::BrokenLenDip:
    case Target::BrokenLenEarly:
    case Target::BrokenEmpty: {
      DroppingQueue::Faults faults;
      faults.drop_every = cfg.target == Target::BrokenDropping ? cfg.drop_every : 0;
      faults.check_duplicates = cfg.target != Target::BrokenDuplicates;
      faults.refuse_every = cfg.target == Target::BrokenFull ? cfg.drop_every : 0;
      faults.clear_reversed = cfg.target == Target::BrokenClear;
      faults.half_len = cfg.target == Target::BrokenLen;
      faults.dip_in_cancel = cfg.target == Target::BrokenLenDip;
      faults.count_from_next_id = cfg.target == Target::BrokenLenEarly;
      faults.blind_every = cfg.target == Target::BrokenEmpty ? cfg.drop_every : 0;
      DroppingQueue q(cfg.capacity, priority_mode, faults);
      SchedulerRun<DroppingQueue>(cfg, q, r).run();
      break;
    }
    default: {
      RealScheduler q(cfg.capacity, priority_mode);
      SchedulerRun<RealScheduler>(cfg, q, r).run();
      break;
    }
  }
  r.config.progress_stream = nullptr;
}

}  // namespace tgi_gtc::stress::detail
