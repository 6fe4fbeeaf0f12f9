// A history of scheduler calls made by many threads, stamped with a shared
// logical clock read before and after each call, and an offline checker of the
// ordering guarantees against it. Used by the stress tests and by sched-stress.
//
// A call occupies the interval [start, end] of clock values. Call A "precedes"
// call B when A.end < B.start: A returned before B began, so every
// linearizable execution orders A first. The checker reports:
//   conservation  a task accepted by schedule() leaves exactly once (next,
//                 cancel or clear), and nothing leaves that was not accepted;
//   fifo          same priority (or any priority in FIFO mode): schedule(a)
//                 precedes schedule(b) but next() returned b strictly before
//                 a's removal (by next, cancel or clear) began, or a never left;
//   priority      a next()/peek() returned b of lower priority than a, and a was
//                 queued at every instant the call could take effect: schedule(a)
//                 preceded the call or schedule(b) (which takes effect before a
//                 call that returns b), and a's removal began after the call
//                 returned (or never happened); or, as for empty below, a
//                 chain of tasks of higher priority than b covered the call in
//                 turn. A peek takes
//                 effect while b is queued, so before b's removal ended: that
//                 instant ends its interval here (and for fifo, below) when it
//                 comes before the peek's return;
//   cancel        cancel(id) found nothing although schedule(id) preceded it
//                 and id's removal began after the cancel returned;
//   empty         a next()/peek() returned nothing although some task was
//                 queued at every instant of the call: a task x1 whose
//                 schedule preceded the call, removed only after it returned,
//                 or a chain x1, x2, ... of tasks, each scheduled before the
//                 previous one's removal began, the last removed only after
//                 the call returned (until x1 leaves, x1 is queued; from then
//                 on, x2, and so on);
//   clear         for a clear() logged with a marker event (Op::Clear, ok
//                 false, id 0: sched-stress logs one for every call, so an
//                 empty clear is judged too): a task whose schedule preceded
//                 the clear was neither removed by it nor by a call that began
//                 before it returned; or among the tasks one clear returned
//                 (its Op::Clear events, ok, with the clear's stamps) that were
//                 scheduled before it began, one of higher priority came after
//                 one of lower, or one of a class came after another of that
//                 class whose schedule it preceded (clear returns tasks in
//                 next()'s order).
// Each finding names the task ids and the clock values of the calls involved.
//
// findings() returns the same findings with their parts kept apart (kind, the
// calls involved, the clock value by which the violation is certain) for tools
// that must name the first one (sched-stress), and can add checks that check()
// leaves out:
//   peek          peek() returned a task that was not queued at any moment of
//                 the call, or with another priority than it was scheduled with;
//   fifo          (for peek) peek() returned b while a task a of the same class,
//                 scheduled before b, was queued throughout the call;
//   payload       next/cancel/clear returned a task with another priority than
//                 it was scheduled with.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <tgi_gtc/scheduling/task.hpp>

namespace tgi_test {

using tgi_gtc::scheduling::Priority;
using tgi_gtc::scheduling::TaskId;

enum class Op : std::uint8_t { Schedule, Next, Peek, Cancel, Clear };

struct Event {
  Op op;
  bool ok;  // schedule accepted / next, peek, cancel returned a task
  Priority priority;
  TaskId id;  // task involved (returned, scheduled or asked for)
  std::uint64_t start, end;
};

/// The shared clock. tick() is seq_cst so that stamps follow real time.
class LogicalClock {
 public:
  std::uint64_t tick() noexcept { return now_.fetch_add(1) + 1; }
  std::uint64_t now() const noexcept { return now_.load(); }

 private:
  alignas(64) std::atomic<std::uint64_t> now_{0};
};

/// One thread's log; preallocate with reserve() so logging does not allocate.
using ThreadLog = std::vector<Event>;

struct Violation {
  std::string kind;
  std::string detail;
};

/// One call named by a Finding: what it did, to which task, and when.
struct Call {
  Op op;
  TaskId id;
  std::uint64_t start, end;
};

/// A Violation with its parts kept apart.
struct Finding {
  std::string kind;
  std::string detail;
  /// The calls involved, in the order the detail names them (fifo: schedule(a),
  /// schedule(b), the next() that took a, the next() that took b; when a left
  /// by cancel or clear, or never: schedule(a), schedule(b), the next() that
  /// took b, and a's removal if any; for a peek: schedule(a), schedule(b), the
  /// peek that returned b).
  std::vector<Call> calls;
  /// The tasks involved, without repeats, in the order of `calls`.
  std::vector<TaskId> ids;
  /// The largest clock value among the calls: the violation is certain by then.
  std::uint64_t at = 0;
};

struct FindingOptions {
  /// Findings kept per kind (all are counted in Findings::counts).
  std::size_t max_per_kind = 3;
  /// Keep the max_per_kind findings of each kind with the smallest `at`
  /// (sorted by it) instead of the first ones found.
  bool earliest = false;
  /// Add the peek, peek-fifo and payload checks.
  bool extended = false;
};

struct Findings {
  std::vector<Finding> items;
  /// (kind, number found), for each kind found at least once.
  std::vector<std::pair<std::string, std::size_t>> counts;
};

class HistoryChecker {
 public:
  explicit HistoryChecker(bool priority_mode) : priority_mode_(priority_mode) {}

  void add(const ThreadLog& log) { events_.insert(events_.end(), log.begin(), log.end()); }
  /// Tasks still queued at the end (drained after the run) leave by clear.
  std::size_t size() const { return events_.size(); }

  /// All findings, first of each kind; empty when the history is consistent.
  std::vector<Violation> check(std::size_t max_per_kind = 3) const {
    std::vector<Violation> out;
    FindingOptions opt;
    opt.max_per_kind = max_per_kind;
    for (Finding& f : findings(opt).items) out.push_back({std::move(f.kind), std::move(f.detail)});
    return out;
  }

  /// The findings of check() (and, with `extended`, of the added checks), with
  /// the calls involved kept apart. Kinds come in the order conservation,
  /// fifo, priority, cancel, peek, payload, empty, clear.
  Findings findings(const FindingOptions& opt = {}) const {
    static constexpr const char* kKinds[] = {"conservation", "fifo",  "priority", "cancel",
                                             "peek",         "payload", "empty",    "clear"};
    constexpr std::size_t kKindCount = sizeof(kKinds) / sizeof(kKinds[0]);
    struct Life {
      const Event* sched = nullptr;
      const Event* removal = nullptr;
      int removals = 0;
    };
    std::unordered_map<TaskId, Life> life;
    life.reserve(events_.size());
    std::vector<Finding> kept[kKindCount];
    std::size_t counts[kKindCount] = {};
    // The text is built only for findings that are kept.
    auto report = [&](std::size_t k, const std::vector<const Event*>& involved, auto&& text) {
      ++counts[k];
      std::uint64_t last = 0;
      for (const Event* e : involved) last = std::max(last, e->end);
      std::vector<Finding>& list = kept[k];
      std::size_t slot = list.size();
      if (list.size() >= opt.max_per_kind) {
        if (!opt.earliest || opt.max_per_kind == 0) return;
        slot = 0;  // replace the latest kept one if this one is earlier
        for (std::size_t i = 1; i < list.size(); ++i) {
          if (list[i].at > list[slot].at) slot = i;
        }
        if (list[slot].at <= last) return;
      }
      Finding f{kKinds[k], text(), {}, {}, last};
      for (const Event* e : involved) {
        f.calls.push_back({e->op, e->id, e->start, e->end});
        if (std::find(f.ids.begin(), f.ids.end(), e->id) == f.ids.end()) f.ids.push_back(e->id);
      }
      if (slot == list.size()) {
        list.push_back(std::move(f));
      } else {
        list[slot] = std::move(f);
      }
    };
    for (const Event& e : events_) {
      if (e.op == Op::Schedule && e.ok) {
        Life& l = life[e.id];
        if (l.sched) {
          report(0, {l.sched, &e}, [&] { return "task " + std::to_string(e.id) + " accepted twice " + at(*l.sched) + " and " + at(e); });
        }
        l.sched = &e;
      }
    }
    for (const Event& e : events_) {
      if ((e.op == Op::Next || e.op == Op::Cancel || e.op == Op::Clear) && e.ok) {
        auto it = life.find(e.id);
        if (it == life.end() || !it->second.sched) {
          report(0, {&e}, [&] { return "task " + std::to_string(e.id) + " left by " + name(e.op) + at(e) + " but was never accepted"; });
          continue;
        }
        Life& l = it->second;
        if (++l.removals > 1) {
          report(0, {l.removal, &e}, [&] {
            return "task " + std::to_string(e.id) + " left twice: " + name(l.removal->op) + at(*l.removal) + " and " + name(e.op) + at(e);
          });
        }
        if (!l.removal || e.start < l.removal->start) l.removal = &e;
        if (e.end < l.sched->start) {
          report(0, {&e, l.sched}, [&] { return "task " + std::to_string(e.id) + " left" + at(e) + " before it was scheduled" + at(*l.sched); });
        }
      }
    }
    for (const auto& [id, l] : life) {
      if (l.sched && l.removals == 0) {
        report(0, {l.sched}, [id = id, sched = l.sched] { return "task " + std::to_string(id) + " accepted" + at(*sched) + " never left"; });
      }
    }

    // When a task's removal began; never removed: the end of time.
    auto removal_start = [](const Life* l) {
      return l->removal ? l->removal->start : std::numeric_limits<std::uint64_t>::max();
    };
    // The last instant at which a next/peek r that returned a task can take
    // effect: its end, or for a peek, the end of the task's removal if that
    // comes first (a peek sees the task queued). Never before r's start: a
    // peek of a task removed before it began is the peek check's finding.
    auto effect_end = [&](const Event& r) {
      if (r.op != Op::Peek || !r.ok) return r.end;
      const auto it = life.find(r.id);
      if (it == life.end() || !it->second.removal) return r.end;
      return std::max(r.start, std::min(r.end, it->second.removal->end));
    };
    // Tasks sorted by schedule end: how many of them were scheduled before t.
    auto scheduled_before = [](const std::vector<const Life*>& tasks, std::uint64_t t) {
      return static_cast<std::size_t>(
          std::partition_point(tasks.begin(), tasks.end(), [t](const Life* l) { return l->sched->end < t; }) - tasks.begin());
    };
    // latest[i]: among tasks[0..i] (sorted by schedule end), the one whose
    // removal began latest.
    auto latest_removals = [&](const std::vector<const Life*>& tasks) {
      std::vector<const Life*> latest(tasks.size());
      for (std::size_t i = 0; i < tasks.size(); ++i) {
        latest[i] = i == 0 || removal_start(tasks[i]) > removal_start(latest[i - 1]) ? tasks[i] : latest[i - 1];
      }
      return latest;
    };
    // A chain of queued tasks from an instant T on: x1, among the tasks
    // scheduled before T, the one whose removal began latest, queued until R1,
    // when that removal began; x2, among those scheduled before R1, the one
    // whose removal began latest, until R2; and so on while R grows. Each
    // x(i+1) was scheduled before x(i) left, so one of them was queued at
    // every instant from T to the last R. With `tasks` sorted by schedule end
    // and `latest` from latest_removals(tasks): reach[n - 1] is the last R of
    // the chain from any T before which exactly n tasks were scheduled.
    // Computed from the longest prefix down, each prefix in one step.
    auto chain_reach = [&](const std::vector<const Life*>& tasks, const std::vector<const Life*>& latest) {
      std::vector<std::uint64_t> reach(tasks.size());
      for (std::size_t n = tasks.size(); n >= 1; --n) {
        const std::uint64_t r = removal_start(latest[n - 1]);
        const std::size_t m = scheduled_before(tasks, r);
        reach[n - 1] = m > n ? reach[m - 1] : r;  // m > n: the chain goes on from the prefix of m
      }
      return reach;
    };
    // The tasks of the chain from a prefix of n, up to the first whose
    // removal began after `beyond` (for reports; reach[n - 1] > beyond).
    auto chain_from = [&](const std::vector<const Life*>& tasks, const std::vector<const Life*>& latest, std::size_t n,
                          std::uint64_t beyond) {
      std::vector<const Life*> chain;
      for (;;) {
        chain.push_back(latest[n - 1]);
        const std::uint64_t r = removal_start(latest[n - 1]);
        const std::size_t m = scheduled_before(tasks, r);
        if (r > beyond || m <= n) break;
        n = m;
      }
      return chain;
    };
    // "task a, scheduled [..], was queued until [..], then task b, scheduled
    // [..] before that, until [..], ..."; and the calls involved.
    auto chain_text = [&](const std::vector<const Life*>& chain) {
      std::string t;
      for (std::size_t i = 0; i < chain.size(); ++i) {
        const Life* x = chain[i];
        t += (i == 0 ? "task " : ", then task ") + std::to_string(x->sched->id) + " (" +
             std::string(tgi_gtc::scheduling::to_string(x->sched->priority)) + "), scheduled" + at(*x->sched) +
             (i == 0 ? ", was queued until" : " before that, until") +
             (x->removal ? at(*x->removal) : std::string(" the end"));
      }
      return t;
    };
    auto chain_calls = [](const Event& e, const std::vector<const Life*>& chain) {
      std::vector<const Event*> calls{&e};
      for (std::size_t i = 0; i < chain.size(); ++i) {
        calls.push_back(chain[i]->sched);
        if (i + 1 < chain.size()) calls.push_back(chain[i]->removal);  // began before `beyond`: it exists
      }
      return calls;
    };
    auto by_schedule_end = [](std::vector<const Life*>& tasks) {
      std::sort(tasks.begin(), tasks.end(), [](auto* x, auto* y) { return x->sched->end < y->sched->end; });
    };
    // FIFO: among tasks taken by next(), per class (priority, or all in FIFO mode).
    const std::size_t classes = priority_mode_ ? 4 : 1;
    for (std::size_t c = 0; c < classes; ++c) {
      struct Item {
        const Event* sched;
        const Event* take;
      };
      std::vector<Item> items;
      for (const auto& [id, l] : life) {
        if (!l.sched || !l.removal || l.removal->op != Op::Next) continue;
        if (priority_mode_ && static_cast<std::size_t>(l.sched->priority) != c) continue;
        items.push_back({l.sched, l.removal});
      }
      // Sweep b by schedule start; a qualifies once a.sched.end < b.sched.start.
      std::vector<const Item*> by_end, by_start;
      for (const Item& it : items) {
        by_end.push_back(&it);
        by_start.push_back(&it);
      }
      std::sort(by_end.begin(), by_end.end(), [](auto* x, auto* y) { return x->sched->end < y->sched->end; });
      std::sort(by_start.begin(), by_start.end(), [](auto* x, auto* y) { return x->sched->start < y->sched->start; });
      std::size_t k = 0;
      const Item* latest = nullptr;  // qualifying a with the latest take start
      for (const Item* b : by_start) {
        while (k < by_end.size() && by_end[k]->sched->end < b->sched->start) {
          if (!latest || by_end[k]->take->start > latest->take->start) latest = by_end[k];
          ++k;
        }
        if (latest && b->take->end < latest->take->start) {
          report(1, {latest->sched, b->sched, latest->take, b->take}, [&] {
            return "task " + std::to_string(latest->sched->id) + " scheduled" + at(*latest->sched) + " before task " +
                   std::to_string(b->sched->id) + at(*b->sched) + " (same class) but taken" + at(*latest->take) +
                   " after it was taken" + at(*b->take);
          });
        }
      }
      // The same for an a that left otherwise (cancel, clear) or never: it
      // was still queued when the next() that took b returned.
      std::vector<const Life*> others;
      for (const auto& [id, l] : life) {
        if (!l.sched || (l.removal && l.removal->op == Op::Next)) continue;
        if (priority_mode_ && static_cast<std::size_t>(l.sched->priority) != c) continue;
        others.push_back(&l);
      }
      std::sort(others.begin(), others.end(), [](auto* x, auto* y) { return x->sched->end < y->sched->end; });
      k = 0;
      const Life* queued = nullptr;  // qualifying a that left latest
      for (const Item* b : by_start) {
        while (k < others.size() && others[k]->sched->end < b->sched->start) {
          if (!queued || removal_start(others[k]) > removal_start(queued)) queued = others[k];
          ++k;
        }
        if (!queued || b->take->end >= removal_start(queued)) continue;
        const Life* a = queued;
        auto text = [&] {
          return "task " + std::to_string(a->sched->id) + " scheduled" + at(*a->sched) + " before task " +
                 std::to_string(b->sched->id) + at(*b->sched) + " (same class) and queued until" +
                 (a->removal ? at(*a->removal) + " (" + name(a->removal->op) + ")" : std::string(" the end")) +
                 ", but task " + std::to_string(b->sched->id) + " was taken" + at(*b->take);
        };
        if (a->removal) {
          report(1, {a->sched, b->sched, b->take, a->removal}, text);
        } else {
          report(1, {a->sched, b->sched, b->take}, text);
        }
      }
    }

    // Priority: for each next/peek r returning b, no higher-priority a
    // scheduled before r began, or before schedule(b) began, may remain queued
    // past r's end. (schedule(b) takes effect before r does: r returned b.)
    if (priority_mode_) {
      struct Reader {
        std::uint64_t after;  // a qualifies when a.sched.end < after
        const Event* r;
        const Event* b_sched;  // schedule(b), when it sets `after`
      };
      std::vector<Reader> readers;
      for (const Event& e : events_) {
        if ((e.op != Op::Next && e.op != Op::Peek) || !e.ok) continue;
        auto it = life.find(e.id);
        const Event* b = it == life.end() ? nullptr : it->second.sched;
        if (b && b->start > e.start) {
          readers.push_back({b->start, &e, b});
        } else {
          readers.push_back({e.start, &e, nullptr});
        }
      }
      std::sort(readers.begin(), readers.end(), [](const Reader& x, const Reader& y) { return x.after < y.after; });
      for (std::size_t q = 1; q < 4; ++q) {
        std::vector<const Life*> tasks;
        for (const auto& [id, l] : life) {
          if (l.sched && static_cast<std::size_t>(l.sched->priority) == q) tasks.push_back(&l);
        }
        std::sort(tasks.begin(), tasks.end(), [](auto* x, auto* y) { return x->sched->end < y->sched->end; });
        std::size_t k = 0;
        const Life* latest = nullptr;  // qualifying a whose removal began latest
        for (const Reader& rd : readers) {
          const Event* r = rd.r;
          while (k < tasks.size() && tasks[k]->sched->end < rd.after) {
            if (!latest || removal_start(tasks[k]) > removal_start(latest)) latest = tasks[k];
            ++k;
          }
          if (static_cast<std::size_t>(r->priority) >= q || !latest) continue;
          if (removal_start(latest) > effect_end(*r)) {
            // schedule(b) is evidence only when a's schedule did not precede r.
            const Event* b_sched = latest->sched->end < r->start ? nullptr : rd.b_sched;
            auto text = [&] {
              return name(r->op) + at(*r) + " returned task " + std::to_string(r->id) + " (" +
                     std::string(tgi_gtc::scheduling::to_string(r->priority)) + ") while task " +
                     std::to_string(latest->sched->id) + " (" +
                     std::string(tgi_gtc::scheduling::to_string(latest->sched->priority)) + "), scheduled" +
                     at(*latest->sched) +
                     (b_sched ? " before task " + std::to_string(r->id) + "'s schedule" + at(*b_sched) + " began" : "") +
                     ", was queued until" + (latest->removal ? at(*latest->removal) : std::string(" the end"));
            };
            if (b_sched) {
              report(2, {r, latest->sched, b_sched}, text);
            } else {
              report(2, {r, latest->sched}, text);
            }
          }
        }
      }
      // The same through a chain, as the empty check below: for a next/peek
      // returning priority p, tasks of higher priorities were queued in turn
      // (chain_reach) from the earliest instant the call could take effect
      // until after the latest. (A single task that covers the call is the
      // rule above's finding.)
      for (std::size_t p = 0; p + 1 < 4; ++p) {
        std::vector<const Life*> tasks;
        for (const auto& [id, l] : life) {
          if (l.sched && static_cast<std::size_t>(l.sched->priority) > p) tasks.push_back(&l);
        }
        by_schedule_end(tasks);
        const std::vector<const Life*> latest = latest_removals(tasks);
        const std::vector<std::uint64_t> reach = chain_reach(tasks, latest);
        for (const Event& e : events_) {
          if ((e.op != Op::Next && e.op != Op::Peek) || !e.ok || static_cast<std::size_t>(e.priority) != p) continue;
          std::uint64_t after = e.start;
          if (const auto it = life.find(e.id); it != life.end() && it->second.sched) after = std::max(after, it->second.sched->start);
          const std::size_t n = scheduled_before(tasks, after);
          if (n == 0) continue;
          const std::uint64_t until = effect_end(e);
          if (reach[n - 1] <= until || removal_start(latest[n - 1]) > until) continue;
          const std::vector<const Life*> chain = chain_from(tasks, latest, n, until);
          report(2, chain_calls(e, chain), [&] {
            return name(e.op) + at(e) + " returned task " + std::to_string(e.id) + " (" +
                   std::string(tgi_gtc::scheduling::to_string(e.priority)) + ") while " + chain_text(chain);
          });
        }
      }
    }

    // Cancel that found nothing although the task was surely queued.
    for (const Event& e : events_) {
      if (e.op != Op::Cancel || e.ok) continue;
      auto it = life.find(e.id);
      if (it == life.end() || !it->second.sched) continue;
      const Life& l = it->second;
      const std::uint64_t rs = l.removal ? l.removal->start : std::numeric_limits<std::uint64_t>::max();
      if (l.sched->end < e.start && rs > e.end) {
        report(3, {&e, l.sched}, [&] {
          return "cancel(" + std::to_string(e.id) + ")" + at(e) + " found nothing, but the task was scheduled" +
                 at(*l.sched) + " and left only" + (l.removal ? at(*l.removal) : std::string(" never"));
        });
      }
    }

    // Empty: a next/peek that returned nothing may not have run while a chain
    // of queued tasks (chain_reach) covered it: from its start, before which
    // the chain's first task was scheduled, until after its end.
    {
      std::vector<const Life*> tasks;
      for (const auto& [id, l] : life) {
        if (l.sched) tasks.push_back(&l);
      }
      by_schedule_end(tasks);
      const std::vector<const Life*> latest = latest_removals(tasks);
      const std::vector<std::uint64_t> reach = chain_reach(tasks, latest);
      for (const Event& e : events_) {
        if ((e.op != Op::Next && e.op != Op::Peek) || e.ok) continue;
        const std::size_t n = scheduled_before(tasks, e.start);
        if (n == 0 || reach[n - 1] <= e.end) continue;
        const std::vector<const Life*> chain = chain_from(tasks, latest, n, e.end);
        report(6, chain_calls(e, chain), [&] { return name(e.op) + at(e) + " returned nothing, but " + chain_text(chain); });
      }
    }

    // Clear: every task queued when a clear() began and not removed by a call
    // that began before it returned leaves by it (marker events: see the top).
    // Sweep: among the tasks scheduled before the clear began, the one whose
    // removal began latest.
    {
      std::vector<const Life*> tasks;
      for (const auto& [id, l] : life) {
        if (l.sched) tasks.push_back(&l);
      }
      by_schedule_end(tasks);
      const std::vector<const Life*> latest = latest_removals(tasks);
      for (const Event& e : events_) {
        if (e.op != Op::Clear || e.ok) continue;
        const std::size_t n = scheduled_before(tasks, e.start);
        if (n == 0) continue;
        const Life* x = latest[n - 1];
        if (removal_start(x) <= e.end) continue;
        auto text = [&] {
          return "clear" + at(e) + " left task " + std::to_string(x->sched->id) + ", scheduled" + at(*x->sched) +
                 " before it began, queued: it left only" +
                 (x->removal ? at(*x->removal) + " (" + name(x->removal->op) + ")" : std::string(" never"));
        };
        if (x->removal) {
          report(7, {&e, x->sched, x->removal}, text);
        } else {
          report(7, {&e, x->sched}, text);
        }
      }
    }
    // Clear's order: the tasks one clear returned (consecutive Op::Clear
    // events of one log with the same stamps) that were scheduled before it
    // began come in next()'s order: no priority above an earlier one's, and
    // within a class, none whose schedule preceded an earlier one's.
    for (std::size_t i = 0; i < events_.size();) {
      const Event& first = events_[i];
      if (first.op != Op::Clear || !first.ok) {
        ++i;
        continue;
      }
      const Event* lowest = nullptr;  // schedule of the lowest priority returned so far
      const Event* newest[4] = {};    // per class: the latest-starting schedule returned so far
      for (; i < events_.size() && events_[i].op == Op::Clear && events_[i].ok && events_[i].start == first.start &&
             events_[i].end == first.end;
           ++i) {
        const Event& e = events_[i];
        const auto it = life.find(e.id);
        if (it == life.end() || !it->second.sched || it->second.sched->end >= e.start) continue;
        const Event* s = it->second.sched;
        const std::size_t c = priority_mode_ ? static_cast<std::size_t>(s->priority) : 0;
        if (priority_mode_ && lowest && s->priority > lowest->priority) {
          report(7, {lowest, s, &e}, [&] {
            return "clear" + at(e) + " returned task " + std::to_string(s->id) + " (" +
                   std::string(tgi_gtc::scheduling::to_string(s->priority)) + ") after task " + std::to_string(lowest->id) +
                   " (" + std::string(tgi_gtc::scheduling::to_string(lowest->priority)) + "), both scheduled before it began";
          });
        }
        if (newest[c] && s->end < newest[c]->start) {
          report(7, {s, newest[c], &e}, [&] {
            return "clear" + at(e) + " returned task " + std::to_string(s->id) + ", scheduled" + at(*s) + ", after task " +
                   std::to_string(newest[c]->id) + ", scheduled" + at(*newest[c]) + " (same class)";
          });
        }
        if (!lowest || s->priority < lowest->priority) lowest = s;
        if (!newest[c] || s->start > newest[c]->start) newest[c] = s;
      }
    }

    if (opt.extended) {
      auto prio = [](Priority p) { return std::string(tgi_gtc::scheduling::to_string(p)); };
      // peek: the task returned was queued at some moment of the call.
      std::vector<std::pair<const Event*, const Life*>> peeks;  // (peek, what it returned)
      for (const Event& e : events_) {
        if (e.op != Op::Peek || !e.ok) continue;
        auto it = life.find(e.id);
        if (it == life.end() || !it->second.sched) {
          report(4, {&e}, [&] { return "peek" + at(e) + " returned task " + std::to_string(e.id) + ", never accepted"; });
          continue;
        }
        const Life& l = it->second;
        if (e.end < l.sched->start) {
          report(4, {&e, l.sched}, [&] {
            return "peek" + at(e) + " returned task " + std::to_string(e.id) + " before it was scheduled" + at(*l.sched);
          });
        } else if (l.removal && l.removal->end < e.start) {
          report(4, {&e, l.sched, l.removal}, [&] {
            return "peek" + at(e) + " returned task " + std::to_string(e.id) + " after it left by " + name(l.removal->op) +
                   at(*l.removal);
          });
        } else if (e.priority != l.sched->priority) {
          report(4, {&e, l.sched}, [&] {
            return "peek" + at(e) + " returned task " + std::to_string(e.id) + " as " + prio(e.priority) + ", scheduled" +
                   at(*l.sched) + " as " + prio(l.sched->priority);
          });
        }
        peeks.emplace_back(&e, &l);
      }
      // payload: removals return the priority the task was scheduled with.
      for (const Event& e : events_) {
        if ((e.op != Op::Next && e.op != Op::Cancel && e.op != Op::Clear) || !e.ok) continue;
        auto it = life.find(e.id);
        if (it == life.end() || !it->second.sched || it->second.sched->priority == e.priority) continue;
        const Event* s = it->second.sched;
        report(5, {&e, s}, [&] {
          return name(e.op) + at(e) + " returned task " + std::to_string(e.id) + " as " + prio(e.priority) + ", scheduled" + at(*s) +
                 " as " + prio(s->priority);
        });
      }
      // fifo for peek: peek returned b while a, same class and scheduled
      // before b, was queued throughout the call. Sort keys are kept inline
      // (a sort through two pointers is cache-bound on long histories).
      struct Task {
        std::uint64_t sched_end;
        std::size_t cls;
        const Life* life;
      };
      struct Peek {
        std::uint64_t b_start;
        std::size_t cls;
        const Event* r;
        const Life* b;
      };
      auto cls_of = [&](const Life* l) { return priority_mode_ ? static_cast<std::size_t>(l->sched->priority) : std::size_t{0}; };
      std::vector<Task> all_tasks;
      for (const auto& [id, l] : life) {
        if (l.sched) all_tasks.push_back({l.sched->end, cls_of(&l), &l});
      }
      std::vector<Peek> all_peeks;
      for (const auto& [r, b] : peeks) all_peeks.push_back({b->sched->start, cls_of(b), r, b});
      std::sort(all_tasks.begin(), all_tasks.end(), [](const Task& x, const Task& y) { return x.sched_end < y.sched_end; });
      std::sort(all_peeks.begin(), all_peeks.end(), [](const Peek& x, const Peek& y) { return x.b_start < y.b_start; });
      std::vector<std::size_t> k(classes, 0);
      std::vector<const Life*> latest(classes, nullptr);  // per class: qualifying a whose removal began latest
      std::vector<std::vector<const Task*>> by_class(classes);
      for (const Task& t : all_tasks) by_class[t.cls].push_back(&t);
      for (const Peek& p : all_peeks) {
        const auto& tasks = by_class[p.cls];
        std::size_t& i = k[p.cls];
        const Life*& a = latest[p.cls];
        while (i < tasks.size() && tasks[i]->sched_end < p.b_start) {
          if (!a || removal_start(tasks[i]->life) > removal_start(a)) a = tasks[i]->life;
          ++i;
        }
        if (a && removal_start(a) > effect_end(*p.r)) {
          report(1, {a->sched, p.b->sched, p.r}, [&] {
            return "task " + std::to_string(a->sched->id) + " scheduled" + at(*a->sched) + " before task " +
                   std::to_string(p.b->sched->id) + at(*p.b->sched) + " (same class) and queued until" +
                   (a->removal ? at(*a->removal) : std::string(" the end")) + ", but peek" + at(*p.r) +
                   " returned task " + std::to_string(p.b->sched->id);
          });
        }
      }
    }

    Findings out;
    for (std::size_t k = 0; k < kKindCount; ++k) {
      if (opt.earliest) {
        std::sort(kept[k].begin(), kept[k].end(), [](const Finding& x, const Finding& y) { return x.at < y.at; });
      }
      for (Finding& f : kept[k]) out.items.push_back(std::move(f));
      if (counts[k]) out.counts.emplace_back(kKinds[k], counts[k]);
    }
    return out;
  }

  static std::string name(Op op) {
    switch (op) {
      case Op::Schedule: return "schedule";
      case Op::Next: return "next";
      case Op::Peek: return "peek";
      case Op::Cancel: return "cancel";
      case Op::Clear: return "clear";
    }
    return "?";
  }

 private:
  static std::string at(const Event& e) {
    std::ostringstream s;
    s << " [" << e.start << "," << e.end << "]";
    return s.str();
  }

  bool priority_mode_;
  std::vector<Event> events_;
};

/// Runs `call` between two ticks of `clock` and appends the stamped event.
template <class F>
void record(LogicalClock& clock, ThreadLog& log, Op op, F&& call) {
  Event e{op, false, Priority::Normal, 0, clock.tick(), 0};
  call(e);
  e.end = clock.tick();
  log.push_back(e);
}

}  // namespace tgi_test
