// Scheduler: behaviour of each call, bad input, and the original design's tests.
#include <doctest/doctest.h>

#include <algorithm>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <tgi_gtc/scheduling.hpp>

using namespace tgi_gtc::scheduling;

namespace {
ScheduledTask task(TaskId id, Priority p = Priority::Normal) { return ScheduledTask(id, 100).with_priority(p); }

// The task a next(), peek() or cancel() returned; fails the test, rather than
// crash, when it returned nothing.
ScheduledTask got(const std::optional<ScheduledTask>& t) {
  REQUIRE(t);
  return *t;
}

std::vector<TaskId> drain(Scheduler& s) {
  std::vector<TaskId> out;
  while (auto t = s.next()) out.push_back(t->id);
  return out;
}
}  // namespace

TEST_CASE("priority values, names and ordering") {
  CHECK(value(Priority::Low) == 0);
  CHECK(value(Priority::Critical) == 3);
  CHECK(to_string(Priority::High) == "High");
  CHECK(to_string(Priority::Normal) == "Normal");
  CHECK(to_string(Priority::Low) == "Low");
  CHECK(to_string(Priority::Critical) == "Critical");
  std::ostringstream os;
  os << Priority::Critical;
  CHECK(os.str() == "Critical");
  CHECK(Priority::Critical > Priority::High);
  CHECK(Priority::High > Priority::Normal);
  CHECK(Priority::Normal > Priority::Low);
}

TEST_CASE("task builders return modified copies") {
  const ScheduledTask base(7, 512);
  CHECK(base.priority == Priority::Normal);
  CHECK(base.is_preemptible);
  const ScheduledTask t = base.with_priority(Priority::High).preemptible(false);
  CHECK(t.id == 7);
  CHECK(t.estimated_tokens == 512);
  CHECK(t.priority == Priority::High);
  CHECK_FALSE(t.is_preemptible);
  CHECK(base.priority == Priority::Normal);  // unchanged
  CHECK(t != base);
  CHECK(t == ScheduledTask(7, 512).with_priority(Priority::High).preemptible(false));
}

TEST_CASE("config defaults and with_max_queue") {
  const SchedulerConfig c;
  CHECK(c.max_queue_size == 1000);
  CHECK(c.priority_scheduling);
  CHECK(c.enable_preemption);
  const SchedulerConfig m = SchedulerConfig::with_max_queue(500);
  CHECK(m.max_queue_size == 500);
  CHECK(m.priority_scheduling);
  const SchedulerConfig d{.max_queue_size = 3, .priority_scheduling = false, .enable_preemption = false};
  Scheduler s(d);
  CHECK(s.config().max_queue_size == 3);
  CHECK_FALSE(s.config().priority_scheduling);
  Scheduler def;
  CHECK(def.config().max_queue_size == 1000);
}

TEST_CASE("error codes carry their own category and messages") {
  const std::error_code full = ScheduleError::QueueFull;
  CHECK(full.message() == "scheduler queue full");
  CHECK(std::error_code(ScheduleError::DuplicateId).message() == "task id already queued");
  CHECK(make_error_code(ScheduleError::ExceedsCapacity).message() ==
        "task needs more KV blocks than the device pool holds");
  CHECK(make_error_code(ScheduleError::InvalidPriority).message() ==
        "task priority is not Low, Normal, High or Critical");
  CHECK(full.category() == schedule_error_category());
  CHECK(std::string(full.category().name()) == "tgi_gtc::scheduling");
  CHECK(full != std::error_code(1, std::generic_category()));
  CHECK(full == ScheduleError::QueueFull);
}

TEST_CASE("a priority outside the four levels is refused first, and changes nothing") {
  // A Priority cast from an out-of-range integer (a request field, say) once
  // indexed past the rings (a crash) or, with one ring, spilled into the
  // slot's other state bits.
  for (const bool priorities : {true, false}) {
    CAPTURE(priorities);
    SchedulerConfig c = SchedulerConfig::with_max_queue(2);
    c.priority_scheduling = priorities;
    Scheduler s(c);
    for (const int bad : {4, 5, 8, 128, 255}) {
      CAPTURE(bad);
      const std::error_code ec = s.schedule(task(1, static_cast<Priority>(bad)));
      CHECK(ec == ScheduleError::InvalidPriority);
      CHECK(ec.message() == "task priority is not Low, Normal, High or Critical");
    }
    CHECK(s.len() == 0);
    CHECK_FALSE(s.peek());
    CHECK_FALSE(s.cancel(1));
    // The id was not taken and no capacity was used.
    REQUIRE_FALSE(s.schedule(task(1, Priority::Low)));
    REQUIRE_FALSE(s.schedule(task(2, Priority::Critical)));
    // Checked before the capacity and the id: a full queue and a queued id
    // still report the bad priority.
    CHECK(s.schedule(task(1, static_cast<Priority>(7))) == ScheduleError::InvalidPriority);
    CHECK(s.schedule(task(3, static_cast<Priority>(7))) == ScheduleError::InvalidPriority);
    CHECK(s.len() == 2);
    const std::vector<TaskId> expected = priorities ? std::vector<TaskId>{2, 1} : std::vector<TaskId>{1, 2};
    CHECK(drain(s) == expected);
  }
}

TEST_CASE("zero and oversized max_queue_size are rejected with a message") {
  CHECK_THROWS_WITH_AS(Scheduler(SchedulerConfig::with_max_queue(0)), doctest::Contains("at least 1"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(Scheduler(SchedulerConfig::with_max_queue(kMaxQueueSize + 1)), doctest::Contains("maximum"),
                       std::invalid_argument);
  CHECK(kMaxQueueSize >= 16'777'216u);
}

TEST_CASE("next_id counts from one") {
  Scheduler s;
  CHECK(s.next_id() == 1);
  CHECK(s.next_id() == 2);
  CHECK(s.next_id() == 3);
}

TEST_CASE("empty queue: next, peek, cancel and clear return nothing") {
  Scheduler s;
  CHECK(s.is_empty());
  CHECK(s.len() == 0);
  CHECK_FALSE(s.next());
  CHECK_FALSE(s.peek());
  CHECK_FALSE(s.cancel(1));
  CHECK(s.clear().empty());
}

TEST_CASE("priority order: highest first") {
  Scheduler s;
  REQUIRE_FALSE(s.schedule(task(1, Priority::Low)));
  REQUIRE_FALSE(s.schedule(task(2, Priority::Normal)));
  REQUIRE_FALSE(s.schedule(task(3, Priority::Critical)));
  REQUIRE_FALSE(s.schedule(task(4, Priority::High)));
  CHECK(drain(s) == std::vector<TaskId>{3, 4, 2, 1});
}

TEST_CASE("FIFO within a priority") {
  Scheduler s;
  for (TaskId id = 1; id <= 5; ++id) REQUIRE_FALSE(s.schedule(task(id, Priority::High)));
  REQUIRE_FALSE(s.schedule(task(6, Priority::Critical)));
  CHECK(drain(s) == std::vector<TaskId>{6, 1, 2, 3, 4, 5});
}

TEST_CASE("mixed priorities keep FIFO inside each level") {
  Scheduler s;
  const Priority ps[] = {Priority::Low, Priority::High, Priority::Low, Priority::Critical, Priority::High,
                         Priority::Normal, Priority::Critical, Priority::Normal};
  TaskId id = 1;
  for (Priority p : ps) REQUIRE_FALSE(s.schedule(task(id++, p)));
  CHECK(drain(s) == std::vector<TaskId>{4, 7, 2, 5, 6, 8, 1, 3});
}

TEST_CASE("FIFO mode ignores priority") {
  Scheduler s(SchedulerConfig{.max_queue_size = 10, .priority_scheduling = false});
  REQUIRE_FALSE(s.schedule(task(1, Priority::Normal)));
  REQUIRE_FALSE(s.schedule(task(2, Priority::High)));
  REQUIRE_FALSE(s.schedule(task(3, Priority::Critical)));
  REQUIRE_FALSE(s.schedule(task(4, Priority::Low)));
  CHECK(got(s.peek()).id == 1);
  CHECK(drain(s) == std::vector<TaskId>{1, 2, 3, 4});
}

TEST_CASE("next returns the task exactly as scheduled") {
  Scheduler s;
  const ScheduledTask t = ScheduledTask(42, 777).with_priority(Priority::High).preemptible(false);
  REQUIRE_FALSE(s.schedule(t));
  const auto got = s.next();
  REQUIRE(got);
  CHECK(*got == t);
}

TEST_CASE("peek returns what next would return, without removing it") {
  Scheduler s;
  REQUIRE_FALSE(s.schedule(task(1, Priority::Low)));
  REQUIRE_FALSE(s.schedule(task(2, Priority::High)));
  CHECK(got(s.peek()).id == 2);
  CHECK(got(s.peek()).id == 2);
  CHECK(s.len() == 2);
  CHECK(got(s.next()).id == 2);
  CHECK(got(s.peek()).id == 1);
  REQUIRE_FALSE(s.schedule(task(3, Priority::Critical)));
  CHECK(got(s.peek()).id == 3);
}

TEST_CASE("a full queue reports QueueFull even for a duplicate id") {
  Scheduler s(SchedulerConfig::with_max_queue(1));
  REQUIRE_FALSE(s.schedule(task(1)));
  CHECK(s.schedule(task(1)) == ScheduleError::QueueFull);
}

TEST_CASE("queue full rejects with QueueFull and changes nothing") {
  Scheduler s(SchedulerConfig::with_max_queue(3));
  for (TaskId id = 1; id <= 3; ++id) REQUIRE_FALSE(s.schedule(task(id)));
  const std::error_code ec = s.schedule(task(4, Priority::Critical));
  CHECK(ec == ScheduleError::QueueFull);
  CHECK(ec.message() == "scheduler queue full");
  CHECK(s.len() == 3);
  CHECK(drain(s) == std::vector<TaskId>{1, 2, 3});
  CHECK_FALSE(s.schedule(task(4)));
}

TEST_CASE("duplicate id is rejected while queued and accepted after it leaves") {
  Scheduler s;
  REQUIRE_FALSE(s.schedule(task(9, Priority::Low)));
  const std::error_code ec = s.schedule(task(9, Priority::Critical));
  CHECK(ec == ScheduleError::DuplicateId);
  CHECK(ec.message() == "task id already queued");
  CHECK(s.len() == 1);
  CHECK(got(s.peek()).priority == Priority::Low);
  CHECK(got(s.next()).id == 9);
  CHECK_FALSE(s.schedule(task(9)));  // taken: the id is free again
  CHECK(s.cancel(9));
  CHECK_FALSE(s.schedule(task(9)));  // cancelled: free again
  CHECK(s.clear().size() == 1);
  CHECK_FALSE(s.schedule(task(9)));  // cleared: free again
}

TEST_CASE("ids that collide in the index stay distinct") {
  // Many ids and a small index: probe chains overlap and wrap around.
  Scheduler s(SchedulerConfig::with_max_queue(65));
  for (TaskId id = 0; id < 64; ++id) REQUIRE_FALSE(s.schedule(task(id * 0x10000 + 1)));
  for (TaskId id = 0; id < 64; ++id) CHECK(s.schedule(task(id * 0x10000 + 1)) == ScheduleError::DuplicateId);
  for (TaskId id = 0; id < 64; id += 2) CHECK(s.cancel(id * 0x10000 + 1));
  for (TaskId id = 0; id < 64; ++id) CHECK(s.cancel(id * 0x10000 + 1).has_value() == (id % 2 == 1));
  CHECK(s.is_empty());
}

TEST_CASE("ids whose probe range wraps around the end of a small index are found") {
  // max_queue_size 64: 258 buckets, a quarter of them live after each fill.
  // An id whose home is among the last buckets probes, and rescans its
  // reach, across the end of the table: in an instrumented copy, 133 live
  // entries sat before their home over these rounds, and every schedule or
  // cancel of the 3 homes whose reach crosses the end scanned across it.
  Scheduler s(SchedulerConfig::with_max_queue(64));
  for (TaskId round = 0; round < 3000; ++round) {
    const TaskId first = round * 64;
    for (TaskId id = first; id < first + 64; ++id) REQUIRE_FALSE(s.schedule(task(id)));
    REQUIRE(s.schedule(task(first + 64)) == ScheduleError::QueueFull);
    for (TaskId id = first + 1; id < first + 64; id += 2) REQUIRE(got(s.cancel(id)).id == id);
    for (TaskId id = first; id < first + 64; id += 8) REQUIRE(s.schedule(task(id)) == ScheduleError::DuplicateId);
    for (TaskId id = first; id < first + 64; id += 2) REQUIRE(got(s.next()).id == id);
    REQUIRE(s.is_empty());
  }
}

TEST_CASE("extreme ids are ordinary ids") {
  Scheduler s;
  REQUIRE_FALSE(s.schedule(task(0)));
  REQUIRE_FALSE(s.schedule(task(UINT64_MAX)));
  CHECK(s.schedule(task(0)) == ScheduleError::DuplicateId);
  CHECK(got(s.cancel(UINT64_MAX)).id == UINT64_MAX);
  CHECK(got(s.next()).id == 0);
}

TEST_CASE("cancel returns the queued task and removes it") {
  Scheduler s;
  REQUIRE_FALSE(s.schedule(task(1)));
  const ScheduledTask t2 = ScheduledTask(2, 55).with_priority(Priority::Critical).preemptible(false);
  REQUIRE_FALSE(s.schedule(t2));
  REQUIRE_FALSE(s.schedule(task(3)));
  const auto c = s.cancel(2);
  REQUIRE(c);
  CHECK(*c == t2);
  CHECK(s.len() == 2);
  CHECK(drain(s) == std::vector<TaskId>{1, 3});
}

TEST_CASE("cancel of unknown, taken and already cancelled ids finds nothing") {
  Scheduler s;
  REQUIRE_FALSE(s.schedule(task(1)));
  REQUIRE_FALSE(s.schedule(task(2)));
  CHECK_FALSE(s.cancel(99));
  CHECK(got(s.next()).id == 1);
  CHECK_FALSE(s.cancel(1));
  CHECK(s.cancel(2));
  CHECK_FALSE(s.cancel(2));
  CHECK(s.is_empty());
}

TEST_CASE("cancelled tasks stop counting at once, however often repeated") {
  Scheduler s(SchedulerConfig::with_max_queue(8));
  TaskId id = 1;
  // One old task stays at the head of its ring throughout: the cancelled ones
  // behind it must not use up the ring.
  REQUIRE_FALSE(s.schedule(task(id++, Priority::Low)));
  std::vector<TaskId> live;
  for (int i = 0; i < 7; ++i) {
    REQUIRE_FALSE(s.schedule(task(id, Priority::Low)));
    live.push_back(id++);
  }
  REQUIRE(s.schedule(task(id)) == ScheduleError::QueueFull);
  for (int round = 0; round < 5000; ++round) {
    const std::size_t k = 1 + static_cast<std::size_t>(round % 7);
    for (std::size_t j = 0; j < k; ++j) {
      REQUIRE(s.cancel(live.back()));
      live.pop_back();
    }
    for (std::size_t j = 0; j < k; ++j) {
      REQUIRE_FALSE(s.schedule(task(id, Priority::Low)));
      live.push_back(id++);
    }
    REQUIRE(s.schedule(task(id)) == ScheduleError::QueueFull);
    REQUIRE(s.len() == 8);
  }
  std::vector<TaskId> expected{1};
  std::vector<TaskId> rest = live;
  expected.insert(expected.end(), rest.begin(), rest.end());
  CHECK(drain(s) == expected);
}

TEST_CASE("regression: cancelled tasks in several rings behind a peeked head never fill the table") {
  // schedule() used to spin once tombstones of cancelled tasks, left in three
  // rings whose heads never moved (the serving loop only peeks a head that
  // does not fit), took every bucket of the table.
  Scheduler s(SchedulerConfig::with_max_queue(32));
  REQUIRE_FALSE(s.schedule(task(1, Priority::Critical)));
  TaskId id = 2;
  for (int round = 0; round < 3000; ++round) {
    for (Priority p : {Priority::Low, Priority::Normal, Priority::High}) {
      REQUIRE_FALSE(s.schedule(task(id, p)));
      REQUIRE(got(s.peek()).id == 1);
      REQUIRE(s.cancel(id++));
    }
  }
  CHECK(s.len() == 1);
  CHECK(got(s.next()).id == 1);
}

TEST_CASE("taken tasks free their capacity while an old task stays queued") {
  Scheduler s(SchedulerConfig::with_max_queue(4));
  REQUIRE_FALSE(s.schedule(task(1, Priority::Low)));
  TaskId id = 2;
  for (int i = 0; i < 10000; ++i) {
    REQUIRE_FALSE(s.schedule(task(id, Priority::High)));
    REQUIRE(got(s.next()).id == id);
    ++id;
  }
  CHECK(got(s.next()).id == 1);
}

TEST_CASE("clear removes and returns every task in next() order") {
  Scheduler s;
  REQUIRE_FALSE(s.schedule(task(1, Priority::Low)));
  REQUIRE_FALSE(s.schedule(task(2, Priority::Critical)));
  REQUIRE_FALSE(s.schedule(task(3, Priority::Low)));
  REQUIRE_FALSE(s.schedule(task(4, Priority::High)));
  REQUIRE(s.cancel(3));
  const auto all = s.clear();
  std::vector<TaskId> ids;
  for (const auto& t : all) ids.push_back(t.id);
  CHECK(ids == std::vector<TaskId>{2, 4, 1});
  CHECK(s.is_empty());
  CHECK_FALSE(s.next());
  REQUIRE_FALSE(s.schedule(task(5)));
  CHECK(got(s.next()).id == 5);
}

TEST_CASE("len counts queued tasks") {
  Scheduler s;
  CHECK(s.len() == 0);
  REQUIRE_FALSE(s.schedule(task(1)));
  REQUIRE_FALSE(s.schedule(task(2)));
  CHECK(s.len() == 2);
  CHECK_FALSE(s.is_empty());
  s.next();
  CHECK(s.len() == 1);
  s.cancel(2);
  CHECK(s.len() == 0);
  CHECK(s.is_empty());
}

TEST_CASE("a queue of one wraps its ring many times") {
  Scheduler s(SchedulerConfig::with_max_queue(1));
  for (TaskId id = 1; id <= 100000; ++id) {
    REQUIRE_FALSE(s.schedule(task(id, static_cast<Priority>(id % 4))));
    REQUIRE(s.schedule(task(id + 1)) == ScheduleError::QueueFull);
    REQUIRE(got(s.next()).id == id);
  }
}

TEST_CASE("memory is reserved at construction and reported") {
  Scheduler small(SchedulerConfig::with_max_queue(10));
  Scheduler large(SchedulerConfig::with_max_queue(100000));
  CHECK(small.memory_bytes() > 0);
  CHECK(large.memory_bytes() > 100000 * 48);
  CHECK(large.memory_bytes() > small.memory_bytes());
}

TEST_CASE("a seeded random sequence matches a reference model") {
  // Model: a vector in next() order, maintained by the original design's rule
  // (insert before the first lower-priority task).
  for (bool prio : {true, false}) {
    Scheduler s(SchedulerConfig{.max_queue_size = 50, .priority_scheduling = prio});
    std::vector<ScheduledTask> model;
    std::uint64_t x = 12345;
    auto rnd = [&] {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      return x;
    };
    for (int i = 0; i < 100000; ++i) {
      const auto op = rnd() % 10;
      const TaskId id = rnd() % 80;
      if (op < 5) {
        const ScheduledTask t = ScheduledTask(id, rnd() % 1000).with_priority(static_cast<Priority>(rnd() % 4));
        const auto ec = s.schedule(t);
        const bool dup = std::any_of(model.begin(), model.end(), [&](auto& m) { return m.id == id; });
        if (model.size() >= 50) {
          REQUIRE(ec == ScheduleError::QueueFull);
        } else if (dup) {
          REQUIRE(ec == ScheduleError::DuplicateId);
        } else {
          REQUIRE_FALSE(ec);
          auto it = prio ? std::find_if(model.begin(), model.end(), [&](auto& m) { return m.priority < t.priority; })
                         : model.end();
          model.insert(it, t);
        }
      } else if (op < 7) {
        const auto got = s.next();
        if (model.empty()) {
          REQUIRE_FALSE(got);
        } else {
          REQUIRE(got == model.front());
          model.erase(model.begin());
        }
      } else if (op < 9) {
        const auto got = s.cancel(id);
        auto it = std::find_if(model.begin(), model.end(), [&](auto& m) { return m.id == id; });
        if (it == model.end()) {
          REQUIRE_FALSE(got);
        } else {
          REQUIRE(got == *it);
          model.erase(it);
        }
      } else if (rnd() % 50 == 0) {
        REQUIRE(s.clear() == model);
        model.clear();
      } else {
        const auto got = s.peek();
        REQUIRE(got.has_value() == !model.empty());
        if (got) REQUIRE(*got == model.front());
      }
      REQUIRE(s.len() == model.size());
    }
  }
}
