// sched-stress's checks, run against targets broken on purpose (a check that
// cannot fail is a defect), against the real targets (which must pass the
// same runs), and the history checker's structured findings on hand-made
// histories. Links the harness library (tools/stress).
#include <doctest/doctest.h>

#include <algorithm>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

#include "stress.hpp"
#include "support/history.hpp"
#include "support/options.hpp"

namespace st = tgi_gtc::stress;
using namespace tgi_test;

namespace {

st::Config config(st::Target t, unsigned threads, std::uint64_t ops, std::uint64_t seed) {
  st::Config c;
  c.target = t;
  c.threads = threads;
  c.ops = ops;
  c.seed = seed;
  return c;
}

std::uint64_t count_of(const st::Report& r, std::string_view kind) {
  for (const auto& [k, n] : r.violation_counts) {
    if (k == kind) return n;
  }
  return 0;
}

const st::Violation* first_of(const st::Report& r, std::string_view kind) {
  for (const auto& v : r.violations) {
    if (v.kind == kind) return &v;
  }
  return nullptr;
}

std::string describe(const st::Report& r) {
  std::ostringstream s;
  st::print_summary(s, r);
  return s.str();
}

// A target that refuses every task whose id is a multiple of 50 with
// QueueFull: the refusal is the only violation, naming the call (`op`).
void check_spurious_refusals(st::Target target, std::uint64_t ops, const char* op) {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  auto c = config(target, 4, ops, seed);
  c.drop_every = 50;
  const auto r = st::run(c);
  INFO(describe(r));
  REQUIRE(count_of(r, "queue_full") > 0);
  CHECK(r.violation_counts.size() == 1);  // nothing else is wrong
  const st::Violation& v = *first_of(r, "queue_full");
  REQUIRE(v.ids.size() == 1);
  CHECK(v.ids[0] % 50 == 0);
  REQUIRE(v.calls.size() == 1);
  CHECK(v.calls[0].op == op);
  CHECK(v.calls[0].id == v.ids[0]);
}

// A len() that is exact with no call in flight but leaves the bounds that the
// calls around it set: the pause's check passes it, the stamped calls do not,
// both len() (`says`) and is_empty() (the mutex queues derive it from their
// len(); `empty_says`).
void check_len_in_flight(st::Target target, const char* says, const char* empty_says) {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  auto c = config(target, 4, 20000, seed);
  c.len_every = 0;
  const auto unstamped = st::run(c);
  INFO(describe(unstamped));
  CHECK(unstamped.ok());
  c.len_every = 4;
  c.max_findings = 1'000'000;  // keep them all: both calls must be caught
  const auto r = st::run(c);
  REQUIRE(count_of(r, "len") > 0);
  CHECK(r.violation_counts.size() == 1);  // nothing else is wrong
  CHECK(r.stat("len_calls_checked") > 0);
  std::size_t lens = 0, empties = 0;
  for (const st::Violation& v : r.violations) {
    REQUIRE(v.calls.size() == 1);
    CHECK(v.calls[0].start < v.calls[0].end);
    if (v.calls[0].op == "len") {
      lens += v.detail.find(says) != std::string::npos;
    } else {
      CHECK(v.calls[0].op == "is_empty");
      empties += v.detail.find(empty_says) != std::string::npos;
    }
  }
  MESSAGE(lens << " len() and " << empties << " is_empty() findings of " << r.violations.size());
  CHECK(lens > 0);
  CHECK(empties > 0);
}

}  // namespace

TEST_CASE("broken-dropping: every lost task is reported by id, the first with the call that accepted it") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  auto c = config(st::Target::BrokenDropping, 4, 4000, seed);
  c.drop_every = 100;
  const auto r = st::run(c);
  INFO(describe(r));
  REQUIRE_FALSE(r.ok());
  REQUIRE(r.stat("dropped_by_target") > 0);
  CHECK(count_of(r, "conservation") == r.stat("dropped_by_target"));
  const st::Violation& v = r.violations.front();
  CHECK(v.kind == "conservation");
  REQUIRE(v.ids.size() == 1);
  CHECK(v.ids[0] % 100 == 0);
  REQUIRE(v.calls.size() == 1);
  CHECK(v.calls[0].op == "schedule");
  CHECK(v.calls[0].id == v.ids[0]);
  CHECK(v.calls[0].start < v.calls[0].end);
  CHECK(v.at == v.calls[0].end);
  CHECK(v.detail.find("task " + std::to_string(v.ids[0]) + " accepted") != std::string::npos);
}

namespace {
// moodycamel reorders across producers once sub-queues build up; a backlog
// (more schedules than nexts) makes that near certain. Retry a few seeds.
st::Report moodycamel_until_fifo(bool fifo, std::uint64_t seed) {
  st::Report r;
  for (int attempt = 0; attempt < 8; ++attempt) {
    auto c = config(st::Target::BrokenMoodycamel, 8, 20000, seed + attempt);
    c.fifo = fifo;
    c.mix = st::parse_mix(c.target, "schedule=55,next=45");
    r = st::run(c);
    if (count_of(r, "fifo") > 0) break;
  }
  return r;
}

void check_fifo_evidence(const st::Violation& v) {
  // a was scheduled before b began, and b was taken before a's removal began:
  // [schedule a, schedule b, next a, next b] when next took a too, else
  // [schedule a, schedule b, next b, cancel or clear of a] (a drained at a
  // pause leaves by clear).
  REQUIRE(v.ids.size() == 2);
  CHECK(v.ids[0] != v.ids[1]);
  REQUIRE(v.calls.size() == 4);
  CHECK(v.calls[0].op == "schedule");
  CHECK(v.calls[1].op == "schedule");
  CHECK(v.calls[0].id == v.ids[0]);
  CHECK(v.calls[1].id == v.ids[1]);
  CHECK(v.calls[0].end < v.calls[1].start);
  const bool a_taken = v.calls[3].id == v.ids[1];
  const st::CallRef& take_a = a_taken ? v.calls[2] : v.calls[3];
  const st::CallRef& take_b = a_taken ? v.calls[3] : v.calls[2];
  CHECK(take_b.op == "next");
  CHECK(take_b.id == v.ids[1]);
  CHECK(take_a.id == v.ids[0]);
  CHECK((a_taken ? take_a.op == "next" : (take_a.op == "cancel" || take_a.op == "clear")));
  CHECK(take_b.end < take_a.start);
}
}  // namespace

TEST_CASE("broken-moodycamel: reordering across producers is reported as a fifo violation with its evidence") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  const auto r = moodycamel_until_fifo(true, seed);
  INFO(describe(r));
  REQUIRE(count_of(r, "fifo") > 0);
  // Nothing is lost or passed over: only the order is wrong, of next() (fifo)
  // and of the clear() that drains the queue at the end of an epoch (clear).
  for (const auto& counted : r.violation_counts) {
    const std::string kind = counted.first;  // a copy: Clang 14 cannot capture a structured binding
    CHECK_MESSAGE((kind == "fifo" || kind == "clear"), kind);
  }
  CHECK(r.violations.front().kind == "fifo");
  check_fifo_evidence(r.violations.front());
}

TEST_CASE("broken-moodycamel: with priorities, reordering within a priority is reported") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  const auto r = moodycamel_until_fifo(false, seed);
  INFO(describe(r));
  REQUIRE(count_of(r, "fifo") > 0);
  check_fifo_evidence(*first_of(r, "fifo"));
}

TEST_CASE("broken-pool: a reference dropped too many is reported with the block it hit") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  auto c = config(st::Target::BrokenPool, 4, 20000, seed);
  c.drop_every = 50;
  const auto r = st::run(c);
  INFO(describe(r));
  REQUIRE_FALSE(r.ok());
  const auto& v = r.violations.front();
  CHECK((v.kind == "owner" || v.kind == "refcount" || v.kind == "pool"));
  if (v.kind != "pool") CHECK(v.ids.size() == 1);  // the block
}

#if defined(__x86_64__) || defined(__i386__)  // as TGI_STRESS_JUDGES_FAILED_ALLOCATIONS (run_pool.cpp)
TEST_CASE("broken-pool-refusing: an allocation failed with blocks to spare is reported, naming the call") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  auto c = config(st::Target::BrokenPoolRefusing, 4, 20000, seed);
  c.drop_every = 50;
  const auto r = st::run(c);
  INFO(describe(r));
  REQUIRE(count_of(r, "pool") > 0);
  CHECK(r.violation_counts.size() == 1);  // nothing else is wrong
  const st::Violation& v = *first_of(r, "pool");
  CHECK(v.detail.find("blocks were free throughout it") != std::string::npos);
  REQUIRE(v.calls.size() == 1);
  CHECK(v.calls[0].op == "try_allocate");
}
#endif

TEST_CASE("broken-duplicates: a second copy of a queued id is reported as duplicate, naming the schedule") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  auto c = config(st::Target::BrokenDuplicates, 4, 20000, seed);
  c.reuse_ids = 12;
  c.capacity = 8;
  const auto r = st::run(c);
  INFO(describe(r));
  REQUIRE_FALSE(r.ok());
  CHECK(count_of(r, "conservation") == 0);  // every copy leaves: only the duplicate check can see it
  REQUIRE(count_of(r, "duplicate") > 0);
  const auto* v = first_of(r, "duplicate");
  REQUIRE(v != nullptr);
  REQUIRE(v->ids.size() == 1);
  CHECK(v->ids[0] >= 1);
  CHECK(v->ids[0] <= 12);
  REQUIRE(v->calls.size() == 1);
  CHECK(v->calls[0].op == "schedule");
}

TEST_CASE("broken-full: QueueFull from a queue far from full is reported, naming the schedule") {
  check_spurious_refusals(st::Target::BrokenFull, 4000, "schedule");
}

TEST_CASE("broken-clear: a clear out of next()'s order is reported") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  const auto r = st::run(config(st::Target::BrokenClear, 4, 4000, seed));
  INFO(describe(r));
  REQUIRE(count_of(r, "clear") > 0);
  CHECK(r.violation_counts.size() == 1);
  const st::Violation& v = *first_of(r, "clear");
  REQUIRE(v.calls.size() == 3);
  CHECK(v.calls[2].op == "clear");
}

TEST_CASE("broken-len: a len() that disagrees with the tasks queued is reported at the pause") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  auto c = config(st::Target::BrokenLen, 4, 20000, seed);
  c.mix = st::parse_mix(c.target, "schedule=50,next=30,peek=10,cancel=10");  // a backlog at the end
  c.len_every = 0;  // no stamped len(): the pause's exact check alone must see it
  const auto r = st::run(c);
  INFO(describe(r));
  REQUIRE(count_of(r, "len") > 0);
  CHECK(r.violation_counts.size() == 1);
  CHECK(r.stat("len_calls_checked") == 0);
  CHECK(first_of(r, "len")->detail.find("with no call in flight") != std::string::npos);
}

TEST_CASE("broken-len-dip: a len() below the tasks queued throughout it, or is_empty() true then, is reported, naming the call") {
  check_len_in_flight(st::Target::BrokenLenDip, "queued throughout it", "returned true, but");
}

TEST_CASE("broken-len-early: a len() above what the calls begun can have counted, or is_empty() false when none can, is reported, naming the call") {
  check_len_in_flight(st::Target::BrokenLenEarly, "can have been counted during it", "returned false, but");
}

TEST_CASE("broken-empty: next() or peek() answering nothing while tasks are queued is reported, with reused ids too") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  auto c = config(st::Target::BrokenEmpty, 4, 4000, seed);
  c.drop_every = 20;
  const auto unique = st::run(c);
  INFO(describe(unique));
  REQUIRE(count_of(unique, "empty") > 0);
  CHECK(unique.violation_counts.size() == 1);  // nothing else is wrong
  const st::Violation& v = *first_of(unique, "empty");
  REQUIRE_FALSE(v.calls.empty());
  CHECK((v.calls[0].op == "next" || v.calls[0].op == "peek"));
  // With reused ids the history has no identities to order; the count rule
  // still sees a blind answer while the queue holds more than the calls in
  // flight can have removed.
  c.reuse_ids = 200;
  c.ops = 20000;
  const auto reused = st::run(c);
  INFO(describe(reused));
  REQUIRE(count_of(reused, "empty") > 0);
  CHECK(reused.violation_counts.size() == 1);
  const st::Violation& w = *first_of(reused, "empty");
  REQUIRE(w.calls.size() == 1);
  CHECK((w.calls[0].op == "next" || w.calls[0].op == "peek"));
}

#if TGI_STRESS_HAS_ENGINE
TEST_CASE("broken-engine: a preemption left out of the plan is reported") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  auto c = config(st::Target::BrokenEngine, 4, 20000, seed);
  c.capacity = 32;  // tight: preemptions are frequent
  c.drop_every = 10;
  const auto r = st::run(c);
  INFO(describe(r));
  REQUIRE_FALSE(r.ok());
  CHECK(count_of(r, "lifecycle") + count_of(r, "engine") + count_of(r, "blocks") > 0);
}

TEST_CASE("broken-engine-order: an engine blind to priorities is reported as order, naming both tasks") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  const auto r = st::run(config(st::Target::BrokenEngineOrder, 4, 20000, seed));
  INFO(describe(r));
  REQUIRE_FALSE(r.ok());
  CHECK(count_of(r, "lifecycle") + count_of(r, "engine") + count_of(r, "blocks") + count_of(r, "payload") == 0);
  REQUIRE(count_of(r, "order") > 0);
  const auto* v = first_of(r, "order");
  REQUIRE(v != nullptr);
  CHECK(v->ids.size() == 2);
  CHECK(v->ids[0] != v->ids[1]);
}

TEST_CASE("broken-engine-full: QueueFull from an engine whose waiting queue was far from full is reported, naming the submit") {
  check_spurious_refusals(st::Target::BrokenEngineFull, 20000, "submit");
}

TEST_CASE("broken-engine-order in FIFO mode, where priorities do not count, passes") {
  auto c = config(st::Target::BrokenEngineOrder, 4, 20000, tgi_test::seed());
  c.fifo = true;
  const auto r = st::run(c);
  INFO(describe(r));
  CHECK(r.ok());
}
#endif

TEST_CASE("the real targets pass the runs that fail the broken ones" * doctest::test_suite("stress")) {
  const auto seed = tgi_test::seed();
  const std::uint64_t scale = std::max<std::uint64_t>(1, tgi_test::iterations(20000) / 20000);
  MESSAGE("seed=" << seed << " scale=" << scale);
  {
    const auto r = st::run(config(st::Target::Scheduler, 4, 4000 * scale, seed));
    INFO(describe(r));
    CHECK(r.ok());
    CHECK(r.stat("tasks_accepted") > 0);
    CHECK(r.stat("len_calls_checked") > 0);  // stamped len() and is_empty() calls, judged
  }
  {
    auto c = config(st::Target::Scheduler, 8, 20000 * scale, seed);
    c.fifo = true;
    c.mix = st::parse_mix(c.target, "schedule=55,next=45");
    const auto r = st::run(c);
    INFO(describe(r));
    CHECK(r.ok());
  }
  {
    // Near capacity, every QueueFull is judged against the calls around it.
    auto c = config(st::Target::Scheduler, 8, 20000 * scale, seed);
    c.capacity = 4;
    const auto r = st::run(c);
    INFO(describe(r));
    CHECK(r.ok());
    CHECK(r.stat("queue_full") > 0);
  }
  {
    const auto r = st::run(config(st::Target::Pool, 4, 20000 * scale, seed));
    INFO(describe(r));
    CHECK(r.ok());
    CHECK(r.stat("invalid_releases") == 0);
    // Holders read the payloads (under ThreadSanitizer, the pool's orders are checked there).
    CHECK(r.stat("payload_checks") > r.stat("handoffs"));
  }
  {
    // Scarce blocks: many allocations fail, each judged (x86-64).
    auto c = config(st::Target::Pool, 4, 20000 * scale, seed);
    c.capacity = 32;
    const auto r = st::run(c);
    INFO(describe(r));
    CHECK(r.ok());
#if defined(__x86_64__) || defined(__i386__)
    CHECK(r.stat("failed_allocations_checked") > 0);
#endif
  }
  {
    // Pauses every 256 operations a thread: each one, and the end, takes every
    // free block in one call; the last takes the whole pool.
    auto c = config(st::Target::Pool, 4, 20000 * scale, seed);
    c.max_events = 256;
    c.capacity = 512;
    const auto r = st::run(c);
    INFO(describe(r));
    CHECK(r.ok());
    CHECK(r.epochs > 4);
    CHECK(r.stat("drains") == r.epochs + 1);
    CHECK(r.stat("blocks_drained") >= 512);
  }
#if TGI_STRESS_HAS_ENGINE
  {
    auto c = config(st::Target::Engine, 4, 20000 * scale, seed);
    c.capacity = 32;
    const auto r = st::run(c);
    INFO(describe(r));
    CHECK(r.ok());
    CHECK(r.stat("preemptions") > 0);
    CHECK(r.stat("victims_cause_checked") > 0);
    CHECK(r.stat("queue_full_checked") == r.stat("queue_full"));
  }
#endif
}

TEST_CASE("reused ids: a lost task is reported as its id's accepted and removed counts") {
  const auto seed = tgi_test::seed();
  MESSAGE("seed=" << seed);
  auto c = config(st::Target::BrokenDropping, 4, 20000, seed);
  c.drop_every = 100;
  c.reuse_ids = 200;  // ids 100 and 200 are dropped
  const auto r = st::run(c);
  INFO(describe(r));
  REQUIRE_FALSE(r.ok());
  REQUIRE(r.stat("dropped_by_target") > 0);
  const st::Violation* v = first_of(r, "conservation");
  REQUIRE(v != nullptr);
  REQUIRE(v->ids.size() == 1);
  CHECK((v->ids[0] == 100 || v->ids[0] == 200));
  CHECK(v->detail.find("id " + std::to_string(v->ids[0]) + " was accepted") != std::string::npos);
  CHECK(v->detail.find("left 0 times") != std::string::npos);
  REQUIRE(v->calls.size() == 1);
  CHECK(v->calls[0].id == v->ids[0]);
}

TEST_CASE("reused ids: the real scheduler conserves every id while cancels meet schedules of their id" * doctest::test_suite("stress")) {
  const auto seed = tgi_test::seed();
  const std::uint64_t scale = std::max<std::uint64_t>(1, tgi_test::iterations(20000) / 20000);
  MESSAGE("seed=" << seed << " scale=" << scale);
  for (const bool fifo : {false, true}) {
    auto c = config(st::Target::Scheduler, 4, 40000 * scale, seed);
    c.fifo = fifo;
    c.capacity = 8;
    c.reuse_ids = 12;
    c.mix = st::parse_mix(c.target, "schedule=45,next=20,peek=5,cancel=29,clear=1");
    const auto r = st::run(c);
    INFO(describe(r));
    CHECK(r.ok());
    CHECK(r.stat("tasks_accepted") > 0);
    CHECK(r.stat("empty_answers_checked") > 0);  // the count form of the empty rule judged calls
    const auto cancels = std::find_if(r.ops.begin(), r.ops.end(), [](const st::OpStats& o) { return o.name == "cancel"; });
    REQUIRE(cancels != r.ops.end());
    CHECK(cancels->ok > 0);  // cancels found tasks
  }
  {
    auto c = config(st::Target::Scheduler, 2, 4000, seed);
    c.reuse_ids = 5;
    c.capacity = 1;
    CHECK(st::run(c).ok());
  }
  auto bad = config(st::Target::Pool, 2, 100, seed);
  bad.reuse_ids = 4;
  CHECK_THROWS_AS(st::run(bad), std::invalid_argument);
}

TEST_CASE("a run longer than one log is checked in epochs, each drained and complete") {
  const auto seed = tgi_test::seed();
  auto c = config(st::Target::Scheduler, 2, 4000, seed);
  c.max_events = 256;
  const auto r = st::run(c);
  INFO(describe(r));
  CHECK(r.ok());
  CHECK(r.epochs > 4);
  CHECK(r.total_ops == 4000);
  CHECK(r.events_checked >= 4000);
}

TEST_CASE("parse_mix: named ops get their weight and the others 0; unknown ops and all-zero mixes are refused") {
  const auto m = st::parse_mix(st::Target::Scheduler, "next=3,schedule=7");
  REQUIRE(m.size() == 5);
  CHECK(m[0] == std::pair<std::string, unsigned>{"schedule", 7});
  CHECK(m[1] == std::pair<std::string, unsigned>{"next", 3});
  CHECK(m[2].second == 0);
  CHECK_THROWS_AS(st::parse_mix(st::Target::Scheduler, "allocate=1"), std::invalid_argument);
  CHECK_THROWS_AS(st::parse_mix(st::Target::Pool, "allocate=0"), std::invalid_argument);
  CHECK_THROWS_AS(st::parse_mix(st::Target::Pool, "allocate=x"), std::invalid_argument);
  CHECK(st::parse_mix(st::Target::Pool, "share=2").at(1).second == 2);
}

TEST_CASE("the JSON report carries the seed, per-op rates and each violation's ids and calls") {
  auto c = config(st::Target::BrokenDropping, 2, 2000, 42);
  const auto r = st::run(c);
  std::ostringstream s;
  st::write_json(s, r);
  const std::string j = s.str();
  CHECK(j.find("\"seed\": 42") != std::string::npos);
  CHECK(j.find("\"ok\": false") != std::string::npos);
  CHECK(j.find("\"per_second\": ") != std::string::npos);
  CHECK(j.find("{\"kind\": \"conservation\"") != std::string::npos);
  REQUIRE_FALSE(r.violations.empty());
  CHECK(j.find("\"ids\": [" + std::to_string(r.violations.front().ids.at(0)) + "]") != std::string::npos);
  CHECK(j.find("\"calls\": [{\"op\": \"schedule\"") != std::string::npos);
}

// ---- the history checker's structured findings ------------------------------

TEST_CASE("findings: a FIFO violation names both tasks and the four calls, certain at the last") {
  HistoryChecker h(true);
  h.add({{Op::Schedule, true, Priority::Normal, 1, 1, 2},
         {Op::Schedule, true, Priority::Normal, 2, 3, 4},
         {Op::Next, true, Priority::Normal, 2, 5, 6},
         {Op::Next, true, Priority::Normal, 1, 7, 8}});
  const auto f = h.findings();
  REQUIRE(f.items.size() == 1);
  const Finding& x = f.items[0];
  CHECK(x.kind == "fifo");
  CHECK(x.ids == std::vector<TaskId>{1, 2});
  REQUIRE(x.calls.size() == 4);
  CHECK(x.calls[0].op == Op::Schedule);
  CHECK(x.calls[2].op == Op::Next);
  CHECK(x.calls[2].start == 7);
  CHECK(x.at == 8);
  REQUIRE(f.counts.size() == 1);
  CHECK(f.counts[0] == std::pair<std::string, std::size_t>{"fifo", 1});
}

TEST_CASE("findings: a peek of a task that had already left is flagged (extended only)") {
  HistoryChecker h(true);
  h.add({{Op::Schedule, true, Priority::Normal, 1, 1, 2},
         {Op::Next, true, Priority::Normal, 1, 3, 4},
         {Op::Peek, true, Priority::Normal, 1, 5, 6}});
  CHECK(h.findings().items.empty());
  FindingOptions opt;
  opt.extended = true;
  const auto f = h.findings(opt);
  REQUIRE(f.items.size() == 1);
  CHECK(f.items[0].kind == "peek");
  CHECK(f.items[0].ids == std::vector<TaskId>{1});
}

TEST_CASE("findings: a peek that skips an older task of its class is a fifo violation (extended only)") {
  HistoryChecker h(true);
  h.add({{Op::Schedule, true, Priority::High, 1, 1, 2},
         {Op::Schedule, true, Priority::High, 2, 3, 4},
         {Op::Peek, true, Priority::High, 2, 5, 6},
         {Op::Next, true, Priority::High, 1, 7, 8},
         {Op::Next, true, Priority::High, 2, 9, 10}});
  CHECK(h.findings().items.empty());
  FindingOptions opt;
  opt.extended = true;
  const auto f = h.findings(opt);
  REQUIRE(f.items.size() == 1);
  CHECK(f.items[0].kind == "fifo");
  CHECK(f.items[0].ids == std::vector<TaskId>{1, 2});
  CHECK(f.items[0].at == 6);
}

TEST_CASE("findings: a removal with another priority than scheduled is a payload violation (extended only)") {
  HistoryChecker h(false);
  h.add({{Op::Schedule, true, Priority::Low, 1, 1, 2}, {Op::Cancel, true, Priority::High, 1, 3, 4}});
  CHECK(h.findings().items.empty());
  FindingOptions opt;
  opt.extended = true;
  const auto f = h.findings(opt);
  REQUIRE(f.items.size() == 1);
  CHECK(f.items[0].kind == "payload");
}

TEST_CASE("findings: earliest mode keeps the earliest findings of each kind and counts all") {
  HistoryChecker h(true);
  ThreadLog log;
  for (TaskId id = 1; id <= 10; ++id) log.push_back({Op::Schedule, true, Priority::Low, id, 100 - 2 * id, 101 - 2 * id});
  h.add(log);  // ten tasks never leave: accepted late to early
  FindingOptions opt;
  opt.max_per_kind = 2;
  opt.earliest = true;
  const auto f = h.findings(opt);
  REQUIRE(f.items.size() == 2);
  CHECK(f.items[0].ids == std::vector<TaskId>{10});
  CHECK(f.items[1].ids == std::vector<TaskId>{9});
  CHECK(f.counts.at(0) == std::pair<std::string, std::size_t>{"conservation", 10});
}

TEST_CASE("findings: a lower-priority next while two higher tasks in turn covered the call is a priority violation") {
  // x (High) is queued from 4 until its removal begins at 10; a (High),
  // scheduled by 9, from then on until 21. The next [5,20] that returned b
  // (Low) took effect while one of them was queued, whichever instant it chose.
  ThreadLog log{{Op::Schedule, true, Priority::Low, 1, 1, 2},    // b
                {Op::Schedule, true, Priority::High, 2, 3, 4},   // x
                {Op::Next, true, Priority::Low, 1, 5, 20},       // returns b
                {Op::Schedule, true, Priority::High, 3, 8, 9},   // a
                {Op::Next, true, Priority::High, 2, 10, 11},     // takes x
                {Op::Next, true, Priority::High, 3, 21, 22}};    // takes a
  {
    HistoryChecker h(true);
    h.add(log);
    const auto f = h.findings();
    REQUIRE(f.items.size() == 1);
    CHECK(f.items[0].kind == "priority");
    CHECK(f.items[0].ids == std::vector<TaskId>{1, 2, 3});
    CHECK(f.items[0].at == 20);
  }
  // a scheduled only after x's removal ended: the next may take effect in
  // between, when no High task was queued.
  log[3] = {Op::Schedule, true, Priority::High, 3, 12, 13};
  HistoryChecker h(true);
  h.add(log);
  CHECK(h.findings().items.empty());
}

TEST_CASE("findings: a chain of three tasks queued in turn across an empty next() or a lower-priority next() is reported") {
  const auto findings = [](const ThreadLog& log, bool priority_mode) {
    HistoryChecker h(priority_mode);
    h.add(log);
    return h.findings();
  };
  // 1 is queued until its removal begins at 10; 2, scheduled by 5, until 14;
  // 3, scheduled by 13, until 40: some task was queued at every instant of
  // the next [3,30] that returned nothing, though no two of them cover it.
  ThreadLog log{{Op::Schedule, true, Priority::Normal, 1, 1, 2},
                {Op::Next, false, Priority::Normal, 0, 3, 30},  // returned nothing
                {Op::Schedule, true, Priority::Normal, 2, 4, 5},
                {Op::Next, true, Priority::Normal, 1, 10, 11},
                {Op::Schedule, true, Priority::Normal, 3, 12, 13},
                {Op::Next, true, Priority::Normal, 2, 14, 15},
                {Op::Clear, true, Priority::Normal, 3, 40, 41}};
  // The same chain of High tasks across a next that returned a Low one.
  ThreadLog low = log;
  for (Event& e : low) e.priority = Priority::High;
  low[1] = {Op::Next, true, Priority::Low, 4, 3, 30};
  low.push_back({Op::Schedule, true, Priority::Low, 4, 0, 1});
  struct Case {
    ThreadLog log;
    bool priority_mode;
    const char* kind;
    std::vector<TaskId> ids;
  };
  for (Case& c : std::vector<Case>{{log, true, "empty", {0, 1, 2, 3}},
                                   {log, false, "empty", {0, 1, 2, 3}},
                                   {low, true, "priority", {4, 1, 2, 3}}}) {
    CAPTURE(c.kind);
    const auto f = findings(c.log, c.priority_mode);
    REQUIRE(f.items.size() == 1);
    CHECK(f.items[0].kind == c.kind);
    CHECK(f.items[0].ids == c.ids);
    CHECK(f.items[0].at == 30);
    // 3 scheduled only after 2's removal began: the next may come in between.
    c.log[4].start = 15;
    c.log[4].end = 16;
    CHECK(findings(c.log, c.priority_mode).items.empty());
  }
}

TEST_CASE("findings: a peek takes effect before the task it returned left, so its window ends there") {
  // peek [5,20] returned b (Low), which cancel removed by 7; h (High) was
  // queued from 2 to 10: the peek took effect by 7, while h was queued.
  ThreadLog log{{Op::Schedule, true, Priority::High, 1, 1, 2},  // h
                {Op::Schedule, true, Priority::Low, 2, 3, 4},   // b
                {Op::Peek, true, Priority::Low, 2, 5, 20},
                {Op::Cancel, true, Priority::Low, 2, 6, 7},
                {Op::Next, true, Priority::High, 1, 10, 11}};
  {
    HistoryChecker h(true);
    h.add(log);
    const auto f = h.findings();
    REQUIRE(f.items.size() == 1);
    CHECK(f.items[0].kind == "priority");
    CHECK(f.items[0].ids == std::vector<TaskId>{2, 1});
  }
  log[3] = {Op::Cancel, true, Priority::Low, 2, 12, 13};  // b left after h: the peek may come at 11.5
  HistoryChecker h(true);
  h.add(log);
  CHECK(h.findings().items.empty());
}

TEST_CASE("findings: a clear that leaves a task queued before it began is a clear violation, even returning nothing") {
  ThreadLog log{{Op::Schedule, true, Priority::Low, 1, 1, 2},
                {Op::Clear, false, Priority::Normal, 0, 5, 6},  // the call: returned nothing
                {Op::Next, true, Priority::Low, 1, 7, 8}};
  {
    HistoryChecker h(true);
    h.add(log);
    const auto f = h.findings();
    REQUIRE(f.items.size() == 1);
    CHECK(f.items[0].kind == "clear");
    CHECK(f.items[0].ids == std::vector<TaskId>{0, 1});
    CHECK(f.items[0].at == 8);
  }
  log[2] = {Op::Next, true, Priority::Low, 1, 4, 7};  // another call took it while the clear ran
  HistoryChecker h(true);
  h.add(log);
  CHECK(h.findings().items.empty());
}

TEST_CASE("findings: a clear returns the tasks queued before it in next()'s order") {
  const auto run = [](ThreadLog log, bool priority_mode) {
    HistoryChecker h(priority_mode);
    h.add(log);
    return h.findings();
  };
  // High 1 and Low 2 queued before the clear [5,6], returned Low first.
  const ThreadLog low_first = {{Op::Schedule, true, Priority::High, 1, 1, 2},
                               {Op::Schedule, true, Priority::Low, 2, 3, 4},
                               {Op::Clear, false, Priority::Normal, 0, 5, 6},
                               {Op::Clear, true, Priority::Low, 2, 5, 6},
                               {Op::Clear, true, Priority::High, 1, 5, 6}};
  auto f = run(low_first, true);
  REQUIRE(f.items.size() == 1);
  CHECK(f.items[0].kind == "clear");
  CHECK(f.items[0].ids == std::vector<TaskId>{2, 1});
  // In FIFO mode the same is an order of schedules: 1 came first.
  f = run(low_first, false);
  REQUIRE(f.items.size() == 1);
  CHECK(f.items[0].kind == "clear");
  CHECK(f.items[0].ids == std::vector<TaskId>{1, 2});
  // Next()'s order, and a task scheduled while the clear ran anywhere: none.
  f = run({{Op::Schedule, true, Priority::Normal, 1, 1, 2},
           {Op::Schedule, true, Priority::Normal, 2, 3, 4},
           {Op::Schedule, true, Priority::High, 3, 4, 7},
           {Op::Clear, false, Priority::Normal, 0, 5, 8},
           {Op::Clear, true, Priority::Normal, 1, 5, 8},
           {Op::Clear, true, Priority::Normal, 2, 5, 8},
           {Op::Clear, true, Priority::High, 3, 5, 8}},
          true);
  CHECK(f.items.empty());
}

TEST_CASE("check() reports what findings() does without the extended checks") {
  HistoryChecker h(true);
  h.add({{Op::Schedule, true, Priority::Low, 1, 1, 2},
         {Op::Schedule, true, Priority::High, 2, 3, 4},
         {Op::Next, true, Priority::Low, 1, 5, 6},
         {Op::Peek, true, Priority::Low, 1, 7, 8},
         {Op::Schedule, true, Priority::Low, 3, 9, 10}});
  const auto v = h.check();
  const auto f = h.findings();
  REQUIRE(v.size() == f.items.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    CHECK(v[i].kind == f.items[i].kind);
    CHECK(v[i].detail == f.items[i].detail);
  }
  CHECK(v.size() >= 3);  // priority (next), priority (peek), conservation (task 3 and task 2 never left)
}
