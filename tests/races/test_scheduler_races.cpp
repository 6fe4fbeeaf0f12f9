// Races forced deterministically: linked to tgi_gtc_scheduling_hooks, the
// library compiled with TGI_GTC_TEST_HOOKS, so a test can stall a thread at a
// chosen point (between a producer's ring ticket and its publish, say), which
// random stress hits only by luck.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#include <time.h>
#endif

#include <tgi_gtc/scheduling.hpp>

#include "races/stall.hpp"

namespace tgi_gtc::scheduling::detail {
extern void (*g_before_ticket_hook)(std::uint64_t unused);
extern void (*g_after_ticket_hook)(std::uint64_t ticket);
extern void (*g_take_pass_hook)(std::uint64_t head);
extern void (*g_lapped_cell_hook)(std::uint64_t ticket);
extern void (*g_published_hook)(std::uint64_t ticket);
extern void (*g_taken_hook)(std::uint64_t ticket);
extern void (*g_cancelled_hook)(std::uint64_t id);
extern std::atomic<bool> g_hide_ticket_note;
}

using namespace tgi_gtc::scheduling;
using tgi_test::finish_or_exit;
using tgi_test::StallAt;

namespace {

// Stalls the first producer that takes a ticket after construction (or, with
// `before`, that is about to take one); tickets counts the tickets taken (or
// about to be).
struct Stall : StallAt<0> {
  explicit Stall(bool before = false)
      : StallAt<0>(before ? detail::g_before_ticket_hook : detail::g_after_ticket_hook) {}
};

// Stalls the first producer whose cell holds an earlier lap's task that head
// has not passed, just before it reads that task's state; held_at is its
// ticket.
struct LappedStall : StallAt<1> {
  LappedStall() : StallAt<1>(detail::g_lapped_cell_hook) {}
};

// Stalls the first consumer (next() or clear()) that claims a task, before it
// moves head and frees the task's bucket and capacity; held_at is its ticket.
struct TakenStall : StallAt<2> {
  TakenStall() : StallAt<2>(detail::g_taken_hook) {}
};

// Stalls the first cancel() that claims a task, before it clears the task's
// cell and frees its capacity; held_at is the task's id.
struct CancelledStall : StallAt<3> {
  CancelledStall() : StallAt<3>(detail::g_cancelled_hook) {}
};

// schedule(task) on a thread of its own; returned() says whether it has.
struct AsyncSchedule {
  std::atomic<bool> done{false};
  std::error_code result;
  std::thread thread;
  AsyncSchedule(Scheduler& s, ScheduledTask task) : thread([this, &s, task] {
    result = s.schedule(task);
    done = true;
  }) {}
  bool returned() const { return done.load(); }
  std::error_code join() {
    thread.join();
    return result;
  }
};

// The id of the task next() returns; fails the test, rather than crash, when
// next() returns nothing.
TaskId next_task(Scheduler& s) {
  const auto t = s.next();
  REQUIRE(t);
  return t->id;
}

}  // namespace

TEST_CASE("a producer stalled before publishing blocks no consumer and hides no later task") {
  Scheduler s;
  Stall stall;
  std::thread a([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10))); });
  stall.wait_held();
  REQUIRE_FALSE(s.schedule(ScheduledTask(2, 10)));  // a later ticket, published
  const auto got = s.next();                         // must neither wait nor report empty
  REQUIRE(got);
  CHECK(got->id == 2);
  CHECK_FALSE(s.peek());  // task 1 is not published yet
  stall.release();
  a.join();
  const auto late = s.next();  // published with a new ticket after its first was invalidated
  REQUIRE(late);
  CHECK(late->id == 1);
  CHECK(s.is_empty());
}

TEST_CASE("a stalled higher-priority producer does not hide a published lower-priority task") {
  Scheduler s;
  Stall stall;
  std::thread a([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10).with_priority(Priority::Critical))); });
  stall.wait_held();
  REQUIRE_FALSE(s.schedule(ScheduledTask(2, 10).with_priority(Priority::Low)));
  CHECK(next_task(s) == 2);
  stall.release();
  a.join();
  CHECK(next_task(s) == 1);
}

TEST_CASE("cancel claims a task whose producer has not published it yet") {
  Scheduler s(SchedulerConfig::with_max_queue(1));
  Stall stall;
  std::thread a([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(7, 10))); });
  stall.wait_held();
  const auto c = s.cancel(7);
  REQUIRE(c);
  CHECK(c->id == 7);
  CHECK(s.len() == 0);
  stall.release();
  a.join();
  CHECK_FALSE(s.next());                      // the producer saw the cancel and did not publish
  CHECK_FALSE(s.schedule(ScheduledTask(7, 10)));  // id and capacity are free again
  CHECK(next_task(s) == 7);
}

TEST_CASE("a consumer that finds only unpublished tickets reports empty and leaves the producer its ticket") {
  Scheduler s;
  Stall stall;
  std::thread a([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10).with_priority(Priority::High))); });
  stall.wait_held();
  CHECK_FALSE(s.next());  // task 1 is not scheduled yet: empty, without waiting
  CHECK_FALSE(s.peek());
  stall.release();
  a.join();
  CHECK(Stall::tickets.load() == 1);  // published at its first ticket: nobody invalidated it
  CHECK(next_task(s) == 1);
}

TEST_CASE("a duplicate schedule() waits for the unpublished original instead of reporting it") {
  // The original holds a ticket but is not published, so next() passes it by.
  // Reporting DuplicateId now would say it is queued while a next() that
  // starts afterwards returns a lower-priority task instead.
  Scheduler s;
  Stall stall;
  std::thread a([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(5, 10).with_priority(Priority::Critical))); });
  stall.wait_held();
  AsyncSchedule dup(s, ScheduledTask(5, 10).with_priority(Priority::Critical));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK_FALSE(dup.returned());  // still waiting for the original's publish
  REQUIRE_FALSE(s.schedule(ScheduledTask(6, 10).with_priority(Priority::Low)));
  CHECK(next_task(s) == 6);  // allowed: no call has yet reported task 5 queued
  stall.release();
  a.join();
  CHECK(dup.join() == ScheduleError::DuplicateId);
  CHECK(next_task(s) == 5);
  CHECK_FALSE(s.next());
}

#ifdef __linux__
namespace {
// CPU time the thread has run, in seconds; NaN if it cannot be read.
double cpu_seconds(pthread_t thread) {
  clockid_t clock{};
  timespec ts{};
  if (pthread_getcpuclockid(thread, &clock) != 0 || clock_gettime(clock, &ts) != 0) return std::nan("");
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// Pins the calling thread, and the threads it starts from now on, to the
// first CPU it may run on; restores its CPU set when destroyed.
class PinToOneCpu {
 public:
  PinToOneCpu() {
    if (sched_getaffinity(0, sizeof saved_, &saved_) != 0) return;
    int cpu = 0;
    while (cpu < CPU_SETSIZE && !CPU_ISSET(cpu, &saved_)) ++cpu;
    if (cpu == CPU_SETSIZE) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pinned_ = sched_setaffinity(0, sizeof one, &one) == 0;
  }
  ~PinToOneCpu() {
    if (pinned_) sched_setaffinity(0, sizeof saved_, &saved_);
  }
  PinToOneCpu(const PinToOneCpu&) = delete;
  PinToOneCpu& operator=(const PinToOneCpu&) = delete;
  bool pinned() const { return pinned_; }

 private:
  cpu_set_t saved_{};
  bool pinned_ = false;
};

struct CpuShare {
  double other, self;  // seconds of CPU over the window
};

// Spins this thread for `ms` of wall time and returns the CPU time that it
// and `other` got meanwhile.
CpuShare spin_beside(pthread_t other, int ms) {
  const double other0 = cpu_seconds(other), self0 = cpu_seconds(pthread_self());
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (std::chrono::steady_clock::now() < end) {
  }
  return {cpu_seconds(other) - other0, cpu_seconds(pthread_self()) - self0};
}
}  // namespace

TEST_CASE("a duplicate schedule() waiting for a stalled original leaves its core to other threads") {
  // On one CPU, with the original stalled before its publish as a preempted
  // thread would be, the duplicate waits for it beside a thread that spins.
  // A waiter that kept spinning would take about half of that CPU; one that
  // yields the core each round past its first microseconds takes a few
  // hundredths of what the spinning thread gets. (A CPU share, not a speed:
  // it holds however loaded or slow the machine, sanitizers included.)
  PinToOneCpu pin;
  if (!pin.pinned()) {
    MESSAGE("skipped: cannot pin this thread to one CPU");
    return;
  }
  {
    // Calibration: the share of a thread that spins 20 us, then yields, in a
    // loop. Where the platform does not hand the core over on a yield (or
    // does not enforce the pinning), the check below cannot be made.
    std::atomic<bool> stop{false};
    std::thread yielder([&] {
      while (!stop.load()) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
        while (std::chrono::steady_clock::now() < until) {
        }
        std::this_thread::yield();
      }
    });
    const CpuShare cal = spin_beside(yielder.native_handle(), 100);
    stop = true;
    yielder.join();
    MESSAGE("calibration: a yielding thread got ", cal.other * 1e3, " ms of CPU against the spinning thread's ",
            cal.self * 1e3, " ms");
    if (!(cal.other < 0.1 * cal.self)) {
      MESSAGE("skipped: on this platform a thread that yields keeps its share of a pinned CPU");
      return;
    }
  }
  Scheduler s;
  Stall stall;
  std::thread a([&] { CHECK_FALSE(s.schedule(ScheduledTask(5, 10))); });
  stall.wait_held();
  AsyncSchedule dup(s, ScheduledTask(5, 10));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // well past the spinning rounds
  const CpuShare got = spin_beside(dup.thread.native_handle(), 300);
  CHECK_FALSE(dup.returned());
  stall.release();
  a.join();
  CHECK(dup.join() == ScheduleError::DuplicateId);
  MESSAGE("waiter ", got.other * 1e3, " ms of CPU against the spinning thread's ", got.self * 1e3, " ms");
  CHECK(got.self > 0.01);  // the window ran (false for NaN too)
  CHECK(got.other < 0.25 * got.self);
}
#endif

TEST_CASE("a duplicate schedule() is not fooled by the stale cell of the bucket's previous occupant") {
  // Task 5 is taken; its cell stays as it was (head has passed it). Task 5
  // again reuses the same bucket, whose ticket still names that old cell, and
  // stalls before taking a new ticket. Only head being past the old ticket
  // tells the duplicate check that the cell is not this occupant's publish.
  Scheduler s;
  REQUIRE_FALSE(s.schedule(ScheduledTask(5, 10)));
  REQUIRE(next_task(s) == 5);
  Stall stall(/*before=*/true);
  std::thread a([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(5, 10))); });
  stall.wait_held();
  AsyncSchedule dup(s, ScheduledTask(5, 10));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK_FALSE(dup.returned());  // waiting for the re-scheduled task's publish
  stall.release();
  a.join();
  CHECK(dup.join() == ScheduleError::DuplicateId);
  CHECK(next_task(s) == 5);
  CHECK_FALSE(s.next());
}

TEST_CASE("a cancel before the first ticket of a task in a reused bucket does not clear the previous occupant's cell") {
  // Task 1 is taken; its cell stays as it was (head has passed it). Task 1
  // again reuses the same bucket and stalls before taking a ticket, and
  // cancel(1) claims it there. The bucket's ticket field must not still name
  // the old cell: a cancel that cleared that stale cell would free the bucket
  // while its producer goes on to publish it.
  Scheduler s(SchedulerConfig{.max_queue_size = 8, .priority_scheduling = false});
  REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10)));
  REQUIRE(next_task(s) == 1);
  {
    Stall stall(/*before=*/true);
    std::thread a([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10))); });
    stall.wait_held();
    const auto c = s.cancel(1);
    REQUIRE(c);
    CHECK(c->id == 1);
    stall.release();
    a.join();
  }
  CHECK(s.len() == 0);
  // No next() or peek() here: either would pass over a bogus cell. The bug
  // shows when the bucket is queued again behind it: task 1 would come out
  // first, from the cell its cancelled predecessor published.
  REQUIRE_FALSE(s.schedule(ScheduledTask(5, 10)));
  REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10)));  // the same bucket once more
  CHECK(next_task(s) == 5);                       // FIFO: 5 was scheduled first
  CHECK(next_task(s) == 1);
  CHECK_FALSE(s.next());
  CHECK(s.len() == 0);
}

TEST_CASE("a ticket given up by a stalled producer is skipped on every later lap") {
  // A queue of two: its ring is small (128 cells), so laps come quickly.
  Scheduler s(SchedulerConfig::with_max_queue(2));
  for (int round = 0; round < 300; ++round) {
    const auto id = static_cast<TaskId>(1000 + 2 * round);
    Stall stall;
    std::thread a([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(id, 10))); });
    stall.wait_held();
    REQUIRE_FALSE(s.schedule(ScheduledTask(id + 1, 10)));  // published behind the stalled ticket
    REQUIRE(next_task(s) == id + 1);  // invalidates the stalled ticket
    stall.release();
    a.join();
    REQUIRE(Stall::tickets.load() == 3);  // ours, the second task's, and our retry
    REQUIRE(next_task(s) == id);
    REQUIRE_FALSE(s.next());
  }
}

TEST_CASE("a cancel that misses the cell of a task published late leaves no tombstone behind") {
  // The producer is stalled after taking its ticket; cancel claims the task and
  // finds no cell yet; the producer then publishes it and must clear it itself.
  // With a peeked, never-taken head holding every ring still, a tombstone left
  // behind would keep its bucket forever: 600 of them fill the table of a queue
  // of two (134 buckets), and schedule() would spin. A watchdog turns that hang
  // into a failure.
  Scheduler s(SchedulerConfig::with_max_queue(2));
  REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10).with_priority(Priority::Critical)));
  std::atomic<bool> done{false};
  std::thread work([&] {
    for (int round = 0; round < 600; ++round) {
      const TaskId id = 100 + static_cast<TaskId>(round);
      const auto p = static_cast<Priority>(round % 3);  // Low, Normal, High: three rings
      Stall stall;
      std::thread a([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(id, 10).with_priority(p))); });
      stall.wait_held();
      REQUIRE(s.cancel(id));
      stall.release();
      a.join();
      const auto first = s.peek();
      REQUIRE(first);
      REQUIRE(first->id == 1);
      REQUIRE(s.len() == 1);
    }
    done = true;
  });
  finish_or_exit(done, "schedule() hung: cancelled tasks' tombstones filled the table");
  work.join();
}

TEST_CASE("a producer that meets an earlier lap's task in its cell reads that task's state, not a reuser's") {
  // Task 1 is queued at ticket 0 and stays at head while 127 tasks are
  // scheduled and cancelled behind it, so the next ticket, 128, lands on its
  // cell again (a queue of eight has rings of 128 cells) with head not past
  // it. The producer of task 2 stalls there, just before it reads task 1's
  // state. Meanwhile task 1 is taken, and its id scheduled again into the
  // same bucket and cancelled before its first ticket. The state the producer
  // then reads is the new task's, CANCELLED: unless it sees that head has
  // moved, it takes the cell for a tombstone of that task and frees the
  // bucket, while the new task's producer still holds it and goes on to
  // publish a task in a free bucket. The next task to claim that bucket would
  // then be taken from that cell, ahead of a task scheduled before it.
  Scheduler s(SchedulerConfig{.max_queue_size = 8, .priority_scheduling = false});
  REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10)));
  for (TaskId id = 100; id < 100 + 127; ++id) {
    REQUIRE_FALSE(s.schedule(ScheduledTask(id, 10)));
    REQUIRE(s.cancel(id));
  }
  {
    LappedStall lapped;
    std::thread p([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(2, 10))); });
    lapped.wait_held();
    CHECK(LappedStall::held_at.load() == 128);
    REQUIRE(next_task(s) == 1);
    Stall stall(/*before=*/true);
    std::thread y([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10))); });
    stall.wait_held();
    const auto c = s.cancel(1);
    REQUIRE(c);
    lapped.release();
    p.join();
    stall.release();
    y.join();
  }
  CHECK(s.len() == 1);  // task 2
  REQUIRE_FALSE(s.schedule(ScheduledTask(3, 10)));
  REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10)));  // the same bucket once more
  CHECK(next_task(s) == 2);
  CHECK(next_task(s) == 3);  // FIFO: 3 was scheduled before 1
  CHECK(next_task(s) == 1);
  CHECK_FALSE(s.next());
  CHECK(s.len() == 0);
}

// ---------------------------------------------------------------------------
// Progress under adversarial stalls, and head kept near tail by cancels
// ---------------------------------------------------------------------------

namespace {

// Every producer stalls after taking a ticket until a consumer pass has moved
// head past that ticket (it was invalidated), then retries and stalls again
// on its new ticket. Each consumer pass waits until every producer holds a
// ticket at or past the head it read, so the consumer always sees
// `kProducers` open, unpublished tickets: the schedule that keeps a consumer
// invalidating for ever if it only ever checks a bounded window.
struct Churn {
  static constexpr int kProducers = 10;  // more open tickets than kOpenWindow (8)
  static constexpr std::uint64_t kNone = ~std::uint64_t{0};
  static inline std::atomic<std::uint64_t> held[kProducers];
  static inline thread_local int self = -1;
  static inline std::atomic<std::uint64_t> head_seen{0};
  static inline std::atomic<bool> released{false};
  static inline std::atomic<long> passes{0};
  static void reset() {
    for (auto& h : held) h = kNone;
    head_seen = 0;
    released = false;
    passes = 0;
  }
  static void after_ticket(std::uint64_t ticket) {
    held[self] = ticket;
    while (!released.load() && head_seen.load() <= ticket) std::this_thread::yield();
    held[self] = kNone;
  }
  static bool all_hold_from(std::uint64_t head) {
    for (const auto& h : held) {
      const std::uint64_t t = h.load();
      if (t == kNone || t < head) return false;
    }
    return true;
  }
  static void pass(std::uint64_t head) {
    head_seen.store(head);
    // A watchdog: far more passes than the invalidations a call may make
    // before it checks every open ticket means the consumer is livelocked.
    if (passes.fetch_add(1) > 10000) released.store(true);
    while (!released.load() && !all_hold_from(head)) std::this_thread::yield();
  }
};

// Every producer stalls just before taking a ticket (its task QUEUED) until
// released; waits in the kernel, so hundreds of them cost no CPU.
struct StallAll {
  static inline std::atomic<int> held{0};
  static inline std::atomic<bool> go{false};
  static void hook(std::uint64_t) {
    held.fetch_add(1);
    held.notify_all();
    go.wait(false);
  }
};

}  // namespace

TEST_CASE("next() returns while more producers than its window keep retaking invalidated tickets") {
  Scheduler s;
  Churn::reset();
  detail::g_after_ticket_hook = &Churn::after_ticket;
  std::vector<std::thread> producers;
  for (int i = 0; i < Churn::kProducers; ++i) {
    producers.emplace_back([&s, i] {
      Churn::self = i;
      REQUIRE_FALSE(s.schedule(ScheduledTask(static_cast<TaskId>(i + 1), 10)));
    });
  }
  while (!Churn::all_hold_from(0)) std::this_thread::yield();
  detail::g_take_pass_hook = &Churn::pass;
  const auto got = s.next();  // nothing is published: empty, after a bounded number of invalidations
  detail::g_take_pass_hook = nullptr;
  const long passes = Churn::passes.load();
  CHECK_FALSE(got);
  CHECK(passes < 10000);
  Churn::released = true;
  for (auto& t : producers) t.join();
  detail::g_after_ticket_hook = nullptr;
  std::set<TaskId> ids;
  while (const auto t = s.next()) ids.insert(t->id);
  CHECK(ids.size() == Churn::kProducers);
}

TEST_CASE("schedule() reports QueueFull, instead of spinning, when stalled producers hold every bucket") {
  // A queue of one has 2 x (1 + 65) = 132 buckets. Each stalled producer holds
  // one; cancelling its task hands the capacity back but not the bucket.
  Scheduler s(SchedulerConfig::with_max_queue(1));
  constexpr int kStalled = 132;
  StallAll::held = 0;
  StallAll::go = false;
  detail::g_before_ticket_hook = &StallAll::hook;
  std::vector<std::thread> producers;
  for (int i = 0; i < kStalled; ++i) {
    const auto id = static_cast<TaskId>(1000 + i);
    producers.emplace_back([&s, id] { REQUIRE_FALSE(s.schedule(ScheduledTask(id, 10))); });
    for (int held = StallAll::held.load(); held < i + 1; held = StallAll::held.load()) StallAll::held.wait(held);
    REQUIRE(s.cancel(id));
  }
  CHECK(s.len() == 0);
  detail::g_before_ticket_hook = nullptr;  // the stalled ones are past the check already
  std::atomic<bool> done{false};
  std::error_code result;
  std::thread fresh([&] {
    result = s.schedule(ScheduledTask(1, 10));
    done = true;
  });
  finish_or_exit(done, "schedule() spun on a table full of stalled producers' buckets");
  fresh.join();
  CHECK(result == ScheduleError::QueueFull);
  StallAll::go = true;
  StallAll::go.notify_all();
  for (auto& t : producers) t.join();
  CHECK(s.len() == 0);
  CHECK_FALSE(s.schedule(ScheduledTask(1, 10)));  // the buckets are free again
  CHECK(next_task(s) == 1);
}

namespace {
// Stalls, just after its publish, every producer whose thread set `marked`,
// until released; waits in the kernel, as StallAll. The destructor releases
// and joins them, and removes the hook, however the test ends.
struct StallMarked {
  static inline thread_local bool marked = false;
  static inline std::atomic<int> held{0};
  static inline std::atomic<bool> go{false};
  static void hook(std::uint64_t) {
    if (!marked) return;
    held.fetch_add(1);
    go.wait(false);
  }
  std::vector<std::thread> threads;
  StallMarked() {
    held = 0;
    go = false;
    detail::g_published_hook = &hook;
  }
  StallMarked(const StallMarked&) = delete;
  StallMarked& operator=(const StallMarked&) = delete;
  ~StallMarked() {
    detail::g_published_hook = nullptr;
    detail::g_hide_ticket_note = false;
    go = true;
    go.notify_all();
    for (auto& t : threads) t.join();
  }
  // Fails the run in 30 s, with the reason, if fewer than n ever stall.
  static void wait_held(int n) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (held.load() < n) {
      if (std::chrono::steady_clock::now() > deadline) {
        std::fprintf(stderr, "FAILED: a producer never reached the publish hook\n");
        std::_Exit(1);
      }
      std::this_thread::yield();
    }
  }
};
}  // namespace

TEST_CASE("cancel finds a published task's cell by scanning from an older ticket note") {
  // The bucket's note of the ring ticket is a release store, so a canceller
  // may read an older value, down to the ring's tail from before the task
  // took a ticket; it must scan the cells from there. Here producer A reads
  // that tail and stalls before its ticket; B takes the next ticket and
  // publishes; A then takes the one after it without noting it
  // (g_hide_ticket_note: the older note stays), publishes, and stalls for the
  // rest of the test. Cancelling A must clear its cell, one past the note, and
  // free its bucket; B is cancelled too, so no consumer ever reaches A's cell.
  // A cancel that looked only at the noted cell would leave every A's bucket
  // held: a queue of two has 134 buckets, and three rings of 128 cells (the
  // producers rotate over Low, Normal and High), so no lapping producer
  // reclaims the tombstones before the table is full and schedule() reports
  // QueueFull.
  Scheduler s(SchedulerConfig::with_max_queue(2));
  constexpr int kRounds = 180;
  bool all_scheduled = true;
  {
    StallMarked stalled;
    for (int round = 0; round < kRounds && all_scheduled; ++round) {
      const auto p = static_cast<Priority>(round % 3);
      const auto a_id = static_cast<TaskId>(1000 + 2 * round), b_id = a_id + 1;
      {
        Stall before(/*before=*/true);
        stalled.threads.emplace_back([&s, a_id, p] {
          StallMarked::marked = true;
          REQUIRE_FALSE(s.schedule(ScheduledTask(a_id, 10).with_priority(p)));
        });
        before.wait_held();
        const std::error_code b_result = s.schedule(ScheduledTask(b_id, 10).with_priority(p));
        CHECK_FALSE(b_result);
        if (b_result) all_scheduled = false;
        detail::g_hide_ticket_note = all_scheduled;
        before.release();
        StallMarked::wait_held(round + 1);  // A passed the hook and published
        detail::g_hide_ticket_note = false;
      }
      CHECK(s.cancel(a_id));
      if (all_scheduled) CHECK(s.cancel(b_id));
      CHECK(s.len() == 0);
    }
  }  // releases and joins the stalled producers
  CHECK(all_scheduled);
  CHECK(s.len() == 0);
  REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10)));
  CHECK(next_task(s) == 1);
  CHECK_FALSE(s.next());
}

TEST_CASE("cancel does not take a previous occupant's stale cell, a lap back, for its task's") {
  // Task 1 is taken at ticket 0; its cell keeps OCC(0, b) (head passed it).
  // 127 more pairs bring the ticket to 128, the same cell a lap later. Task 1
  // again reuses bucket b and stalls after taking ticket 128 (its note), not
  // yet published; cancel(1) reads that cell, which holds bucket b at round
  // 0, not 1. Taking it for the task's would free the bucket while its
  // producer goes on to publish it; the next task to claim the bucket would
  // then come out from that cell, ahead of a task scheduled before it.
  Scheduler s(SchedulerConfig{.max_queue_size = 8, .priority_scheduling = false});
  REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10)));
  REQUIRE(next_task(s) == 1);
  for (TaskId id = 100; id < 100 + 127; ++id) {
    REQUIRE_FALSE(s.schedule(ScheduledTask(id, 10)));
    REQUIRE(next_task(s) == id);
  }
  {
    Stall stall;
    std::thread a([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10))); });
    stall.wait_held();
    CHECK(Stall::held_at.load() == 128);
    REQUIRE(s.cancel(1));
    REQUIRE_FALSE(s.schedule(ScheduledTask(5, 10)));
    REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10)));  // bucket b again, if the cancel freed it
    stall.release();
    a.join();
  }
  CHECK(next_task(s) == 5);  // FIFO: 5 was scheduled first
  CHECK(next_task(s) == 1);
  CHECK_FALSE(s.next());
  CHECK(s.len() == 0);
}

TEST_CASE("schedule and cancel without next keep head at tail, so the next next() passes over nothing") {
  Scheduler s(SchedulerConfig::with_max_queue(4));
  for (TaskId id = 1; id <= 100000; ++id) {
    REQUIRE_FALSE(s.schedule(ScheduledTask(id, 10)));
    REQUIRE(s.cancel(id));
  }
  static std::atomic<long> passes{0};
  passes = 0;
  detail::g_take_pass_hook = [](std::uint64_t) { passes.fetch_add(1); };
  CHECK_FALSE(s.next());
  detail::g_take_pass_hook = nullptr;
  // One pass per ring finds it empty; a walk over the cancelled tickets
  // would take one pass each.
  CHECK(passes.load() <= 8);
}

TEST_CASE("a task held at head while its ring laps many times leaves next() a bounded number of passes") {
  // Task 1 stays queued at head while 100,000 later tasks are scheduled and
  // cancelled: 780 laps of a 128-cell ring. Each lap, the producer that lands
  // on task 1's cell gives its ticket up (the cell is still in use), and every
  // other cell moves on a round. Once task 1 is taken, the next next() has
  // 99,999 resolved and 780 given-up tickets before task 2's. Passed one by
  // one, with one invalidation a lap, that took 100,788 passes in one call.
  Scheduler s(SchedulerConfig{.max_queue_size = 4, .priority_scheduling = false});
  REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10)));
  for (TaskId id = 2; id <= 100001; ++id) {
    REQUIRE_FALSE(s.schedule(ScheduledTask(id, 10)));
    REQUIRE(s.cancel(id));
  }
  // Task 2 is queued in the last lap: its cell's earlier tickets are all
  // resolved, its own is not. Passing the run must stop there.
  REQUIRE_FALSE(s.schedule(ScheduledTask(2, 10)));
  static std::atomic<long> passes{0};
  passes = 0;
  detail::g_take_pass_hook = [](std::uint64_t) { passes.fetch_add(1); };
  CHECK(next_task(s) == 1);
  const long first = passes.exchange(0);
  CHECK(next_task(s) == 2);
  const long second = passes.load();
  detail::g_take_pass_hook = nullptr;
  CHECK(first <= 2);
  INFO("passes: ", first, " then ", second);
  CHECK(second <= 8);
  CHECK_FALSE(s.next());
  // FIFO is intact behind the skipped tickets.
  REQUIRE_FALSE(s.schedule(ScheduledTask(7, 10)));
  REQUIRE_FALSE(s.schedule(ScheduledTask(8, 10)));
  CHECK(next_task(s) == 7);
  CHECK(next_task(s) == 8);
  CHECK_FALSE(s.next());
  CHECK(s.len() == 0);
}

namespace {
// Runs an action on the n-th pass of a consumer over a ring (counting from
// arming), on the consumer's own thread, in the middle of its next() or peek().
// The action runs inside a noexcept call: it must CHECK, not REQUIRE (a
// failed REQUIRE throws, which would terminate instead of reporting).
struct AtPass {
  static inline int target = 0;
  static inline int passes = 0;
  static inline void (*action)() = nullptr;
  static void hook(std::uint64_t) {
    if (++passes == target && action) action();
  }
  AtPass(int n, void (*act)()) {
    target = n;
    passes = 0;
    action = act;
    detail::g_take_pass_hook = &hook;
  }
  ~AtPass() { detail::g_take_pass_hook = nullptr; }
};
Scheduler* g_sched = nullptr;
}  // namespace

TEST_CASE("a Critical task scheduled while next() or peek() scans the rings below is not passed over for a later Normal one") {
  // The consumer has found Critical empty and is on High (its second pass)
  // when task 1 (Critical) is scheduled, then task 2 (Normal). schedule(1)
  // returned before schedule(2) began, and next() returns a task only once it
  // is scheduled, so at any instant next() could take effect at, task 1 is
  // queued: returning task 2 would pass it over. The re-check of the rings
  // above must see Critical's tail move and send the scan back to the top.
  for (const bool remove : {true, false}) {
    CAPTURE(remove);
    Scheduler s;
    g_sched = &s;
    std::optional<ScheduledTask> got;
    {
      AtPass at(2, [] {
        CHECK_FALSE(g_sched->schedule(ScheduledTask(1, 10).with_priority(Priority::Critical)));
        CHECK_FALSE(g_sched->schedule(ScheduledTask(2, 10).with_priority(Priority::Normal)));
      });
      got = remove ? s.next() : s.peek();
      CHECK(AtPass::passes > 2);
    }
    REQUIRE(got);
    CHECK(got->id == 1);
    if (!remove) CHECK(next_task(s) == 1);
    CHECK(next_task(s) == 2);
    CHECK_FALSE(s.next());
  }
}

TEST_CASE("next() does not report empty when a task was queued at every instant of its scan, moved from a lower ring to a higher one") {
  // Task 1 (Low) is queued. While next() is on High, task 2 (Critical) is
  // scheduled and then task 1 cancelled: until the cancel, task 1 is queued;
  // from then on, task 2. The scan finds High, Normal and Low empty, but
  // "empty" must not be returned: the final re-check sees Critical's tail move.
  Scheduler s;
  g_sched = &s;
  REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10).with_priority(Priority::Low)));
  std::optional<ScheduledTask> got;
  {
    AtPass at(2, [] {
      CHECK_FALSE(g_sched->schedule(ScheduledTask(2, 10).with_priority(Priority::Critical)));
      CHECK(g_sched->cancel(1));
    });
    got = s.next();
  }
  REQUIRE(got);
  CHECK(got->id == 2);
  CHECK_FALSE(s.next());
  CHECK(s.len() == 0);
}

TEST_CASE("a Critical producer in flight when next() passed its ring, published before a Normal task is scheduled, is not passed over") {
  // Task 1 (Critical) has its ticket but is not published when next() reads
  // Critical: the ring counts as empty, its tail unchanged later. While next()
  // is on High, task 1 is published and its schedule() returns, then task 2
  // (Normal) is scheduled. Critical's tail never moves, so the re-check must
  // also see its open ticket's cell change, not the tail alone.
  Scheduler s;
  g_sched = &s;
  Stall stall;
  static AsyncSchedule* producer = nullptr;
  static Stall* held = nullptr;
  AsyncSchedule a(s, ScheduledTask(1, 10).with_priority(Priority::Critical));
  producer = &a;
  held = &stall;
  stall.wait_held();
  std::optional<ScheduledTask> got;
  {
    AtPass at(2, [] {
      held->release();
      while (!producer->returned()) std::this_thread::yield();
      CHECK_FALSE(g_sched->schedule(ScheduledTask(2, 10).with_priority(Priority::Normal)));
    });
    got = s.next();
  }
  CHECK_FALSE(a.join());
  CHECK(Stall::tickets.load() == 2);  // its own ticket, and task 2's
  REQUIRE(got);
  CHECK(got->id == 1);
  CHECK(next_task(s) == 2);
  CHECK_FALSE(s.next());
}

TEST_CASE("a task its consumer has claimed but not let go of: cancel misses it, later calls pass it, its id is free") {
  // next() takes a task with one CAS on its state (TAKEN); moving head past
  // its cell, freeing its bucket and its capacity come after. Stalled in
  // between, the task is removed for every other call, yet still counted by
  // len() (a removal counts until it returns) and its bucket is not free.
  Scheduler s(SchedulerConfig::with_max_queue(3));
  REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10)));
  REQUIRE_FALSE(s.schedule(ScheduledTask(2, 20)));
  TakenStall stall;
  std::optional<ScheduledTask> first;
  std::thread consumer([&] { first = s.next(); });
  stall.wait_held();
  CHECK(TakenStall::held_at.load() == 0);  // the first ticket of the Normal ring
  CHECK_FALSE(s.cancel(1));                // removed by the stalled next()
  CHECK(s.len() == 2);
  const auto p = s.peek();
  REQUIRE(p);
  CHECK(p->id == 2);
  CHECK_FALSE(s.schedule(ScheduledTask(1, 30)));  // id 1 is not queued any more
  CHECK(s.schedule(ScheduledTask(4, 10)) == ScheduleError::QueueFull);  // 2 queued + 1 being removed
  CHECK(next_task(s) == 2);  // passes the claimed task's cell
  const auto again = s.next();
  REQUIRE(again);
  CHECK(again->id == 1);
  CHECK(again->estimated_tokens == 30);
  CHECK_FALSE(s.next());
  CHECK(s.len() == 1);
  stall.release();
  consumer.join();
  REQUIRE(first);
  CHECK(first->id == 1);
  CHECK(first->estimated_tokens == 10);
  CHECK(s.len() == 0);
  CHECK_FALSE(s.schedule(ScheduledTask(4, 10)));  // the capacity is back
}

TEST_CASE("a cancel that has claimed its task but not cleared its cell: next passes the tombstone, the id's new task survives") {
  // cancel() claims a task with one CAS on its state (CANCELLED); clearing its
  // cell (which frees the bucket) and freeing its capacity come after.
  // Stalled in between, the cell is a tombstone that next() clears and
  // passes, and the id may be scheduled again, in a new bucket or, once the
  // tombstone is cleared, in the same one. The resumed cancel must then leave
  // the new task's cell alone.
  Scheduler s;
  REQUIRE_FALSE(s.schedule(ScheduledTask(1, 10)));
  REQUIRE_FALSE(s.schedule(ScheduledTask(2, 20)));
  CancelledStall stall;
  std::optional<ScheduledTask> cancelled;
  std::thread canceller([&] { cancelled = s.cancel(1); });
  stall.wait_held();
  CHECK(CancelledStall::held_at.load() == 1);
  CHECK_FALSE(s.cancel(1));  // claimed already
  CHECK(s.len() == 2);       // counted until the cancel returns
  SUBCASE("rescheduled while the tombstone holds the old bucket") {
    CHECK_FALSE(s.schedule(ScheduledTask(1, 30)));
    CHECK(next_task(s) == 2);  // clears the tombstone on its way
  }
  SUBCASE("rescheduled after next() cleared the tombstone and freed the bucket") {
    CHECK(next_task(s) == 2);
    CHECK_FALSE(s.schedule(ScheduledTask(1, 30)));
  }
  CHECK(s.len() == 2);  // the new task 1, and the cancel in flight
  stall.release();
  canceller.join();
  REQUIRE(cancelled);
  CHECK(cancelled->id == 1);
  CHECK(cancelled->estimated_tokens == 10);
  CHECK(s.len() == 1);
  const auto again = s.next();
  REQUIRE(again);
  CHECK(again->id == 1);
  CHECK(again->estimated_tokens == 30);
  CHECK(s.is_empty());
}
