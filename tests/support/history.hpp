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
//                 the next() that returned a began;
//   priority      schedule(a) preceded a next()/peek() that returned b of lower
//                 priority, and a was still queued when that call returned
//                 (its removal began after it, or never happened);
//   cancel        cancel(id) found nothing although schedule(id) preceded it
//                 and id's removal began after the cancel returned.
// Each finding names the task ids and the clock values of the calls involved.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <unordered_map>
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

class HistoryChecker {
 public:
  explicit HistoryChecker(bool priority_mode) : priority_mode_(priority_mode) {}

  void add(const ThreadLog& log) { events_.insert(events_.end(), log.begin(), log.end()); }
  /// Tasks still queued at the end (drained after the run) leave by clear.
  std::size_t size() const { return events_.size(); }

  /// All findings, first of each kind; empty when the history is consistent.
  std::vector<Violation> check(std::size_t max_per_kind = 3) const {
    std::vector<Violation> out;
    struct Life {
      const Event* sched = nullptr;
      const Event* removal = nullptr;
      int removals = 0;
    };
    std::unordered_map<TaskId, Life> life;
    life.reserve(events_.size());
    std::size_t counts[5] = {};
    auto report = [&](std::size_t k, const std::string& kind, const std::string& text) {
      if (counts[k]++ < max_per_kind) out.push_back({kind, text});
    };
    for (const Event& e : events_) {
      if (e.op == Op::Schedule && e.ok) {
        Life& l = life[e.id];
        if (l.sched) report(0, "conservation", "task " + std::to_string(e.id) + " accepted twice " + at(*l.sched) + " and " + at(e));
        l.sched = &e;
      }
    }
    for (const Event& e : events_) {
      if ((e.op == Op::Next || e.op == Op::Cancel || e.op == Op::Clear) && e.ok) {
        auto it = life.find(e.id);
        if (it == life.end() || !it->second.sched) {
          report(0, "conservation", "task " + std::to_string(e.id) + " left by " + name(e.op) + at(e) + " but was never accepted");
          continue;
        }
        Life& l = it->second;
        if (++l.removals > 1) {
          report(0, "conservation", "task " + std::to_string(e.id) + " left twice: " + name(l.removal->op) + at(*l.removal) +
                                        " and " + name(e.op) + at(e));
        }
        if (!l.removal || e.start < l.removal->start) l.removal = &e;
        if (e.end < l.sched->start) {
          report(0, "conservation", "task " + std::to_string(e.id) + " left" + at(e) + " before it was scheduled" + at(*l.sched));
        }
      }
    }
    for (const auto& [id, l] : life) {
      if (l.sched && l.removals == 0) report(0, "conservation", "task " + std::to_string(id) + " accepted" + at(*l.sched) + " never left");
    }

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
          report(1, "fifo", "task " + std::to_string(latest->sched->id) + " scheduled" + at(*latest->sched) + " before task " +
                                std::to_string(b->sched->id) + at(*b->sched) + " (same class) but taken" + at(*latest->take) +
                                " after it was taken" + at(*b->take));
        }
      }
    }

    // Priority: for each next/peek returning b, no higher-priority a scheduled
    // before it began may remain queued past its end.
    if (priority_mode_) {
      std::vector<const Event*> readers;
      for (const Event& e : events_) {
        if ((e.op == Op::Next || e.op == Op::Peek) && e.ok) readers.push_back(&e);
      }
      std::sort(readers.begin(), readers.end(), [](auto* x, auto* y) { return x->start < y->start; });
      for (std::size_t q = 1; q < 4; ++q) {
        std::vector<const Life*> tasks;
        for (const auto& [id, l] : life) {
          if (l.sched && static_cast<std::size_t>(l.sched->priority) == q) tasks.push_back(&l);
        }
        std::sort(tasks.begin(), tasks.end(), [](auto* x, auto* y) { return x->sched->end < y->sched->end; });
        std::size_t k = 0;
        const Life* latest = nullptr;  // qualifying a whose removal began latest
        auto removal_start = [](const Life* l) {
          return l->removal ? l->removal->start : std::numeric_limits<std::uint64_t>::max();
        };
        for (const Event* r : readers) {
          while (k < tasks.size() && tasks[k]->sched->end < r->start) {
            if (!latest || removal_start(tasks[k]) > removal_start(latest)) latest = tasks[k];
            ++k;
          }
          if (static_cast<std::size_t>(r->priority) >= q || !latest) continue;
          if (removal_start(latest) > r->end) {
            report(2, "priority", name(r->op) + at(*r) + " returned task " + std::to_string(r->id) + " (" +
                                      std::string(tgi_gtc::scheduling::to_string(r->priority)) + ") while task " +
                                      std::to_string(latest->sched->id) + " (" +
                                      std::string(tgi_gtc::scheduling::to_string(latest->sched->priority)) + "), scheduled" +
                                      at(*latest->sched) + ", was queued until" +
                                      (latest->removal ? at(*latest->removal) : std::string(" the end")));
          }
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
        report(3, "cancel", "cancel(" + std::to_string(e.id) + ")" + at(e) + " found nothing, but the task was scheduled" +
                                at(*l.sched) + " and left only" + (l.removal ? at(*l.removal) : std::string(" never")));
      }
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
