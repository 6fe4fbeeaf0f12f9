// Races forced deterministically: the library is compiled here with
// TGI_GTC_TEST_HOOKS, so a test can stall a producer between taking its ring
// ticket and publishing its task, which random stress hits only by luck.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include <tgi_gtc/scheduling.hpp>

namespace tgi_gtc::scheduling::detail {
extern void (*g_after_ticket_hook)(std::uint64_t ticket);
}

using namespace tgi_gtc::scheduling;

namespace {

// Stalls the first producer that takes a ticket after arm(), until release().
struct Stall {
  static inline std::atomic<int> state{0};  // 0 off, 1 armed, 2 holding, 3 released
  static void hook(std::uint64_t) {
    int armed = 1;
    if (state.compare_exchange_strong(armed, 2)) {
      while (state.load() != 3) std::this_thread::yield();
    }
  }
  Stall() {
    state = 1;
    detail::g_after_ticket_hook = &hook;
  }
  void wait_held() const {
    while (state.load() != 2) std::this_thread::yield();
  }
  void release() { state = 3; }
  ~Stall() {
    release();
    detail::g_after_ticket_hook = nullptr;
    state = 0;
  }
};

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
  CHECK(s.next()->id == 2);
  stall.release();
  a.join();
  CHECK(s.next()->id == 1);
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
  CHECK(s.next()->id == 7);
}

TEST_CASE("a ticket given up by a stalled producer is skipped on every later lap") {
  // A queue of one: its ring is small, so laps come quickly.
  Scheduler s(SchedulerConfig::with_max_queue(1));
  for (int round = 0; round < 300; ++round) {
    Stall stall;
    std::thread a([&] { REQUIRE_FALSE(s.schedule(ScheduledTask(1000 + round, 10))); });
    stall.wait_held();
    CHECK_FALSE(s.next());  // invalidates the stalled ticket
    stall.release();
    a.join();
    REQUIRE(s.next()->id == static_cast<TaskId>(1000 + round));
  }
}

TEST_CASE("a cancel that misses the cell of a task published late leaves no tombstone behind") {
  // The producer is stalled after taking its ticket; cancel claims the task and
  // finds no cell yet; the producer then publishes it and must clear it itself.
  // With a peeked, never-taken head holding every ring still, a tombstone left
  // behind would keep its bucket forever: 600 of them fill the table of a queue
  // of one (512 buckets), and schedule() would spin. A watchdog turns that hang
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
      REQUIRE(s.peek()->id == 1);
      REQUIRE(s.len() == 1);
    }
    done = true;
  });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!done && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (!done) {
    // The worker is stuck inside schedule(): report and leave without joining it.
    std::fputs("FAILED: schedule() hung: cancelled tasks' tombstones filled the table\n", stderr);
    std::_Exit(1);
  }
  work.join();
}
