// Engine races forced deterministically (see test_scheduler_races.cpp): the
// serving loop is stalled inside step(), after it peeked a waiting task and
// before it takes it out of the waiting queue, while the test cancels and
// re-submits that id. Producers reuse ids in no stress run (each id is
// submitted once), so this is the only test of the park in admit_waiting.
#include <doctest/doctest.h>

#include <atomic>
#include <thread>

#include <tgi_gtc/scheduling.hpp>

#include "races/stall.hpp"

namespace tgi_gtc::scheduling::detail {
extern void (*g_admit_peeked_hook)(std::uint64_t id);
}

using namespace tgi_gtc::scheduling;
using tgi_test::finish_or_exit;
using tgi_test::StallAt;

namespace {

// Stalls the first step() that is about to take a waiting task it peeked;
// held_at is that task's id.
struct AdmitStall : StallAt<2> {
  AdmitStall() : StallAt<2>(detail::g_admit_peeked_hook) {}
};

ScheduledTask task(TaskId id, std::size_t tokens, Priority p = Priority::Normal, bool preemptible = true) {
  return ScheduledTask(id, tokens).with_priority(p).preemptible(preemptible);
}

// An engine with 4 device blocks of 16 tokens, 3 of them held by task 100
// (not preemptible, so that nothing makes room by pausing it), and task 1 (one
// block) waiting.
struct OneBlockLeft {
  Engine e{[] {
    EngineConfig c;
    c.device_blocks = 4;
    c.block_size = 16;
    return c;
  }()};
  OneBlockLeft() {
    REQUIRE_FALSE(e.submit(task(100, 48, Priority::Normal, false)));
    REQUIRE(e.step().admitted.size() == 1);
    REQUIRE_FALSE(e.submit(task(1, 16)));
  }
};

// Runs one step() on a thread of its own, stalls it where it is about to take
// task 1, runs `meanwhile` there, then lets the step finish. Returns the
// step's plan (the loop thread is joined: the plan is ours until the next step).
template <class F>
const StepPlan& step_with(Engine& e, F&& meanwhile) {
  AdmitStall stall;
  std::atomic<bool> done{false};
  const StepPlan* plan = nullptr;
  std::thread loop([&] {
    plan = &e.step();
    done = true;
  });
  stall.wait_held();
  CHECK(stall.held_at == 1);
  meanwhile();
  stall.release();
  finish_or_exit(done, "step() did not return after the stall was released");
  loop.join();
  return *plan;
}

}  // namespace

TEST_CASE("a task cancelled and re-submitted with other fields while step() takes it is parked, counted as waiting, and later admitted as submitted") {
  OneBlockLeft f;
  // The new task needs 2 blocks: it no longer fits beside task 100.
  const ScheduledTask again = task(1, 32, Priority::High);
  const StepPlan& p = step_with(f.e, [&] {
    CHECK(f.e.cancel(1));  // still in the waiting queue: removed at once
    CHECK_FALSE(f.e.submit(again));
  });
  CHECK(p.admitted.empty());
  CHECK(p.resumed.empty());
  CHECK(p.preempted.empty());
  EngineStats st = f.e.stats();
  CHECK(f.e.scheduler().len() == 0);  // the loop holds it now
  CHECK(st.waiting == 1);             // ... but it never ran: waiting, not paused
  CHECK(st.paused == 0);
  CHECK(st.running == 1);
  CHECK(st.preemptions == 0);
  CHECK(st.device_free_blocks == 1);
  CHECK(f.e.submit(task(1, 16)) == ScheduleError::DuplicateId);  // still live
  CHECK(f.e.block_table(1).empty());

  // A later Normal task fits, but the parked High task comes first and does
  // not fit: admission stops there (no skipping ahead).
  REQUIRE_FALSE(f.e.submit(task(2, 16)));
  const StepPlan& blocked = f.e.step();
  CHECK(blocked.admitted.empty());
  CHECK(blocked.resumed.empty());
  CHECK(f.e.stats().waiting == 2);

  f.e.finish(100);
  const StepPlan& q = f.e.step();
  REQUIRE(q.admitted.size() == 2);
  CHECK(q.admitted[0].task == again);  // an admission with its new fields, not a resumption
  CHECK(q.admitted[0].blocks.size() == 2);
  CHECK(q.admitted[1].task.id == 2);
  CHECK(q.resumed.empty());
  st = f.e.stats();
  CHECK(st.waiting == 0);
  CHECK(st.paused == 0);
  CHECK(st.running == 2);
  CHECK(st.resumptions == 0);
  CHECK(f.e.block_table(1).size() == 2);
}

TEST_CASE("a parked task can be cancelled: it leaves every count and frees its id") {
  OneBlockLeft f;
  step_with(f.e, [&] {
    CHECK(f.e.cancel(1));
    CHECK_FALSE(f.e.submit(task(1, 64)));
  });
  REQUIRE(f.e.stats().waiting == 1);
  CHECK(f.e.cancel(1));  // off the loop thread: carried out by the next step
  const StepPlan& p = f.e.step();
  CHECK(p.admitted.empty());
  const EngineStats st = f.e.stats();
  CHECK(st.waiting == 0);
  CHECK(st.paused == 0);
  CHECK(st.running == 1);
  CHECK(st.device_free_blocks == 1);
  CHECK_FALSE(f.e.cancel(1));
  CHECK_FALSE(f.e.submit(task(1, 16)));  // the id is free again
  const StepPlan& q = f.e.step();
  REQUIRE(q.admitted.size() == 1);
  CHECK(q.admitted[0].task == task(1, 16));
}

TEST_CASE("a task cancelled and re-submitted unchanged while step() takes it is admitted by that step") {
  OneBlockLeft f;
  const StepPlan& p = step_with(f.e, [&] {
    CHECK(f.e.cancel(1));
    CHECK_FALSE(f.e.submit(task(1, 16)));
  });
  REQUIRE(p.admitted.size() == 1);
  CHECK(p.admitted[0].task == task(1, 16));
  const EngineStats st = f.e.stats();
  CHECK(st.waiting == 0);
  CHECK(st.paused == 0);
  CHECK(st.running == 2);
  CHECK(st.device_free_blocks == 0);
}

TEST_CASE("a task cancelled while step() is about to take it is not admitted, and the step goes on to the next") {
  OneBlockLeft f;
  REQUIRE_FALSE(f.e.submit(task(2, 16)));
  const StepPlan& p = step_with(f.e, [&] { CHECK(f.e.cancel(1)); });
  REQUIRE(p.admitted.size() == 1);
  CHECK(p.admitted[0].task.id == 2);
  CHECK_FALSE(f.e.cancel(1));
  const EngineStats st = f.e.stats();
  CHECK(st.waiting == 0);
  CHECK(st.running == 2);
}
