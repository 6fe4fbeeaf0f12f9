// Scheduler under concurrency: producers, consumers, cancellers, peekers and
// clearers at once, checked against a shared logical clock (support/history.hpp).
// Suite "stress": runs under ThreadSanitizer in CI. --iters=N scales it,
// --seed=S replays it.
#include <doctest/doctest.h>

#include <atomic>
#include <barrier>
#include <random>
#include <thread>
#include <vector>

#include <tgi_gtc/scheduling.hpp>

#include "support/history.hpp"
#include "support/options.hpp"

using namespace tgi_gtc::scheduling;
using namespace tgi_test;

namespace {

struct Mix {
  int schedule, next, peek, cancel, clear;  // weights
};

struct RunResult {
  std::vector<Violation> violations;
  std::size_t events = 0;
  std::size_t max_len_seen = 0;
  std::size_t accepted = 0;
};

// cancel(id), stamped with the shared clock.
void record_cancel(Scheduler& s, LogicalClock& clock, ThreadLog& log, TaskId id) {
  record(clock, log, Op::Cancel, [&](Event& e) {
    e.id = id;
    if (auto t = s.cancel(id)) {
      e.ok = true;
      e.priority = t->priority;
      if (t->id != id) e.id = 0;  // reported as never accepted
    }
  });
}

// clear(), logged as a marker for the call (the checker judges what it left)
// and each task it returns as one removal within the call.
void record_clear(Scheduler& s, LogicalClock& clock, ThreadLog& log) {
  const std::uint64_t t0 = clock.tick();
  auto all = s.clear();
  const std::uint64_t t1 = clock.tick();
  log.push_back({Op::Clear, false, Priority::Normal, 0, t0, t1});
  for (const auto& t : all) log.push_back({Op::Clear, true, t.priority, t.id, t0, t1});
}

// The history checker's verdict on every log (with the peek and payload
// checks), and the accepted schedules.
RunResult check_logs(const std::vector<ThreadLog>& logs, bool priority_mode) {
  RunResult r;
  HistoryChecker checker(priority_mode);
  for (const auto& l : logs) {
    checker.add(l);
    for (const auto& e : l) r.accepted += e.op == Op::Schedule && e.ok;
  }
  r.events = checker.size();
  FindingOptions opt;
  opt.extended = true;
  for (Finding& f : checker.findings(opt).items) r.violations.push_back({std::move(f.kind), std::move(f.detail)});
  return r;
}

// Runs `threads` workers for `ops` calls each against one scheduler; every
// call is stamped with the shared clock. Leftover tasks are drained by clear().
RunResult run_mixed(const SchedulerConfig& config, unsigned threads, std::uint64_t ops, Mix mix, std::uint64_t seed) {
  Scheduler s(config);
  LogicalClock clock;
  std::vector<ThreadLog> logs(threads + 1);
  for (auto& l : logs) l.reserve(ops + 16);
  // Recently scheduled ids, for cancellers to aim at (a ring; races are fine).
  constexpr std::size_t kRecent = 256;
  std::vector<std::atomic<TaskId>> recent(kRecent);
  std::atomic<std::size_t> max_len{0};
  std::atomic<std::size_t> len_violations{0};
  std::barrier start(static_cast<std::ptrdiff_t>(threads));
  const int total = mix.schedule + mix.next + mix.peek + mix.cancel + mix.clear;

  auto worker = [&](unsigned w) {
    std::mt19937_64 rng(seed * 1000003 + w);
    ThreadLog& log = logs[w];
    start.arrive_and_wait();
    for (std::uint64_t i = 0; i < ops; ++i) {
      int pick = static_cast<int>(rng() % static_cast<std::uint64_t>(total));
      if ((pick -= mix.schedule) < 0) {
        const TaskId id = s.next_id();
        const auto p = static_cast<Priority>(rng() % 4);
        record(clock, log, Op::Schedule, [&](Event& e) {
          e.id = id;
          e.priority = p;
          e.ok = !s.schedule(ScheduledTask(id, 1).with_priority(p));
        });
        recent[id % kRecent].store(id, std::memory_order::relaxed);  // relaxed: a hint only
      } else if ((pick -= mix.next) < 0) {
        record(clock, log, Op::Next, [&](Event& e) {
          if (auto t = s.next()) {
            e.ok = true;
            e.id = t->id;
            e.priority = t->priority;
          }
        });
      } else if ((pick -= mix.peek) < 0) {
        record(clock, log, Op::Peek, [&](Event& e) {
          if (auto t = s.peek()) {
            e.ok = true;
            e.id = t->id;
            e.priority = t->priority;
          }
        });
      } else if ((pick -= mix.cancel) < 0) {
        const TaskId id = recent[rng() % kRecent].load(std::memory_order::relaxed);  // relaxed: a hint only
        if (id == 0) continue;
        record_cancel(s, clock, log, id);
      } else {
        record_clear(s, clock, log);
      }
      const std::size_t n = s.len();
      if (n > config.max_queue_size) len_violations.fetch_add(1);
      std::size_t m = max_len.load(std::memory_order::relaxed);  // relaxed: a statistic
      while (n > m && !max_len.compare_exchange_weak(m, n, std::memory_order::relaxed)) {
      }
    }
  };
  std::vector<std::thread> pool;
  for (unsigned w = 0; w < threads; ++w) pool.emplace_back(worker, w);
  for (auto& t : pool) t.join();

  record_clear(s, clock, logs[threads]);
  RunResult r = check_logs(logs, config.priority_scheduling);
  if (len_violations.load()) r.violations.push_back({"len", "len() exceeded max_queue_size"});
  r.max_len_seen = max_len.load();
  CHECK(s.is_empty());
  return r;
}

void expect_clean(const RunResult& r) {
  for (const auto& v : r.violations) FAIL_CHECK(v.kind << ": " << v.detail);
  CHECK(r.violations.empty());
  CHECK(r.accepted > 0);
}

}  // namespace

TEST_SUITE("stress") {
  TEST_CASE("mixed calls are linearizable with priorities") {
    const auto seed = tgi_test::seed();
    const auto ops = tgi_test::iterations(20000);
    MESSAGE("seed=" << seed << " iters=" << ops);
    const auto r = run_mixed(SchedulerConfig::with_max_queue(64), 4, ops, {40, 30, 10, 15, 1}, seed);
    expect_clean(r);
    CHECK(r.max_len_seen <= 64);
  }

  TEST_CASE("mixed calls are linearizable in FIFO mode") {
    const auto seed = tgi_test::seed();
    const auto ops = tgi_test::iterations(20000);
    MESSAGE("seed=" << seed << " iters=" << ops);
    SchedulerConfig c{.max_queue_size = 64, .priority_scheduling = false};
    expect_clean(run_mixed(c, 4, ops, {40, 30, 10, 15, 1}, seed + 1));
  }

  TEST_CASE("a near-full queue keeps len within capacity") {
    const auto seed = tgi_test::seed();
    const auto ops = tgi_test::iterations(20000);
    MESSAGE("seed=" << seed << " iters=" << ops);
    const auto r = run_mixed(SchedulerConfig::with_max_queue(8), 4, ops, {60, 15, 5, 20, 0}, seed + 2);
    expect_clean(r);
    CHECK(r.max_len_seen == 8);  // the queue really was full at times
  }

  TEST_CASE("a deep queue with heavy cancellation conserves every task") {
    const auto seed = tgi_test::seed();
    const auto ops = tgi_test::iterations(20000);
    MESSAGE("seed=" << seed << " iters=" << ops);
    expect_clean(run_mixed(SchedulerConfig::with_max_queue(4096), 4, ops, {50, 10, 5, 35, 0}, seed + 3));
  }

  TEST_CASE("cancel racing next for the same task: exactly one gets it") {
    const auto seed = tgi_test::seed();
    const auto rounds = tgi_test::iterations(20000) / 20;
    MESSAGE("seed=" << seed << " rounds=" << rounds);
    Scheduler s(SchedulerConfig::with_max_queue(64));
    std::barrier sync(2);
    std::vector<int> got(64 * rounds + 1, 0);
    std::atomic<std::uint64_t> by_next{0}, by_cancel{0};
    std::thread taker([&] {
      for (std::uint64_t r = 0; r < rounds; ++r) {
        sync.arrive_and_wait();
        while (auto t = s.next()) {
          ++got[t->id];
          by_next.fetch_add(1, std::memory_order::relaxed);  // relaxed: read after join
        }
        sync.arrive_and_wait();
      }
    });
    std::mt19937_64 rng(seed);
    for (std::uint64_t r = 0; r < rounds; ++r) {
      for (TaskId i = 1; i <= 64; ++i) REQUIRE_FALSE(s.schedule(ScheduledTask(r * 64 + i, 1).with_priority(static_cast<Priority>(rng() % 4))));
      sync.arrive_and_wait();
      for (TaskId i = 64; i >= 1; --i) {
        if (auto t = s.cancel(r * 64 + i)) {
          ++got[t->id];
          by_cancel.fetch_add(1, std::memory_order::relaxed);  // relaxed: read after join
        }
      }
      sync.arrive_and_wait();
    }
    taker.join();
    std::size_t bad = 0;
    for (std::size_t id = 1; id < got.size(); ++id) bad += got[id] != 1;
    CHECK(bad == 0);
    CHECK(by_next.load() + by_cancel.load() == 64 * rounds);
    CHECK(s.is_empty());
  }

  TEST_CASE("a few ids reused by every call at once: each accepted schedule leaves exactly once") {
    // Every thread schedules, cancels, takes and clears the same 12 ids, so a
    // cancel often meets a schedule of its id in flight and buckets are reused
    // at once. The history checker needs unique ids; here each id's accepted
    // schedules must equal its removals, and the drained queue must be empty.
    const auto seed = tgi_test::seed();
    const auto ops = tgi_test::iterations(20000) * 10;
    MESSAGE("seed=" << seed << " iters=" << ops);
    for (const bool prio : {false, true}) {
      Scheduler s(SchedulerConfig{.max_queue_size = 8, .priority_scheduling = prio});
      constexpr std::size_t kIds = 12;
      auto id_of = [](std::size_t k) { return k < 8 ? 1000 + k : (k - 7) * 0x10000 + 1; };  // a run of 8, 4 scattered
      auto index_of = [&](TaskId id) {
        for (std::size_t k = 0; k < kIds; ++k) {
          if (id_of(k) == id) return k;
        }
        return kIds;
      };
      std::vector<std::atomic<std::uint64_t>> added(kIds + 1), removed(kIds + 1);  // [kIds]: unknown ids
      constexpr unsigned kThreads = 4;
      std::barrier start(kThreads);
      auto worker = [&](unsigned w) {
        std::mt19937_64 rng(seed * 7919 + w + (prio ? 100 : 0));
        start.arrive_and_wait();
        for (std::uint64_t i = 0; i < ops; ++i) {
          const std::size_t k = rng() % kIds;
          const auto op = rng() % 100;
          // relaxed (all counters): read after the threads are joined.
          if (op < 50) {
            if (!s.schedule(ScheduledTask(id_of(k), 1).with_priority(static_cast<Priority>(rng() % 4)))) {
              added[k].fetch_add(1, std::memory_order::relaxed);
            }
          } else if (op < 75) {
            if (auto t = s.cancel(id_of(k))) removed[t->id == id_of(k) ? k : kIds].fetch_add(1, std::memory_order::relaxed);
          } else if (op < 98) {
            if (auto t = s.next()) removed[index_of(t->id)].fetch_add(1, std::memory_order::relaxed);
          } else {
            for (const auto& t : s.clear()) removed[index_of(t.id)].fetch_add(1, std::memory_order::relaxed);
          }
        }
      };
      std::vector<std::thread> pool;
      for (unsigned w = 0; w < kThreads; ++w) pool.emplace_back(worker, w);
      for (auto& t : pool) t.join();
      // relaxed (here and below): the threads are joined.
      for (const auto& t : s.clear()) removed[index_of(t.id)].fetch_add(1, std::memory_order::relaxed);
      CHECK(s.len() == 0);
      CHECK_FALSE(s.next());
      std::size_t accepted = 0, mismatched = 0;
      for (std::size_t k = 0; k < kIds; ++k) {
        accepted += added[k].load(std::memory_order::relaxed);
        if (added[k].load(std::memory_order::relaxed) != removed[k].load(std::memory_order::relaxed)) {
          ++mismatched;
          MESSAGE("id " << id_of(k) << ": accepted " << added[k].load() << ", removed " << removed[k].load());
        }
        CHECK_FALSE(s.cancel(id_of(k)));
      }
      CHECK(removed[kIds].load() == 0);
      CHECK(mismatched == 0);
      CHECK(accepted > 0);
    }
  }

  TEST_CASE("a head held for laps of schedule+cancel churn: linearizable, nothing lost") {
    // Producers cancel almost every task they schedule, and now and then a
    // task they keep, so kept tasks sit at the heads of small rings while
    // later tickets lap them several times; a consumer waits for that, then
    // drains. next() must then pass runs of resolved tickets and invalidate
    // given-up positions of several laps at once (skip_resolved and the
    // multi-lap invalidation), racing producers, cancellers and clear().
    const auto seed = tgi_test::seed();
    const auto ops = tgi_test::iterations(20000) * 10;
    MESSAGE("seed=" << seed << " iters=" << ops);
    for (const bool prio : {false, true}) {
      const SchedulerConfig config{.max_queue_size = 4, .priority_scheduling = prio};
      Scheduler s(config);
      LogicalClock clock;
      constexpr unsigned kProducers = 3;
      std::vector<ThreadLog> logs(kProducers + 2);
      std::atomic<std::uint64_t> progress{0};  // producer calls so far
      std::atomic<unsigned> producing{kProducers};
      std::atomic<TaskId> recent[16] = {};
      auto producer = [&](unsigned w) {
        std::mt19937_64 rng(seed * 31 + w + (prio ? 7 : 0));
        ThreadLog& log = logs[w];
        for (std::uint64_t i = 0; i < ops; ++i) {
          const TaskId id = s.next_id();
          const auto p = static_cast<Priority>(rng() % 4);
          bool ok = false;
          record(clock, log, Op::Schedule, [&](Event& e) {
            e.id = id;
            e.priority = p;
            e.ok = ok = !s.schedule(ScheduledTask(id, 1).with_priority(p));
          });
          // relaxed (recent, progress): hints for the other threads only.
          if (ok) recent[rng() % 16].store(id, std::memory_order::relaxed);
          // Keep 1 task in 256; cancel the others, and now and then another
          // recent one (maybe still in flight in its producer).
          const bool keep = rng() % 256 == 0;
          const TaskId other = rng() % 8 == 0 ? recent[rng() % 16].load(std::memory_order::relaxed) : 0;
          for (const TaskId victim : {keep ? 0 : id, other}) {
            if (ok && victim != 0) record_cancel(s, clock, log, victim);
          }
          progress.fetch_add(1, std::memory_order::relaxed);
        }
        producing.fetch_sub(1);
      };
      auto consumer = [&] {
        std::mt19937_64 rng(seed * 31 + 99 + (prio ? 7 : 0));
        ThreadLog& log = logs[kProducers];
        while (producing.load() != 0) {
          // Wait out a few laps of the 128-cell rings, then drain.
          const std::uint64_t until = progress.load(std::memory_order::relaxed) + 300 + rng() % 3000;
          while (producing.load() != 0 && progress.load(std::memory_order::relaxed) < until) std::this_thread::yield();
          if (rng() % 16 == 0) {
            record_clear(s, clock, log);
            continue;
          }
          for (bool more = true; more;) {
            record(clock, log, rng() % 8 == 0 ? Op::Peek : Op::Next, [&](Event& e) {
              auto t = e.op == Op::Peek ? s.peek() : s.next();
              more = t.has_value();
              if (t) {
                e.ok = true;
                e.id = t->id;
                e.priority = t->priority;
              }
            });
          }
        }
      };
      std::vector<std::thread> pool;
      for (unsigned w = 0; w < kProducers; ++w) pool.emplace_back(producer, w);
      pool.emplace_back(consumer);
      for (auto& t : pool) t.join();
      record_clear(s, clock, logs[kProducers + 1]);
      CHECK(s.len() == 0);
      expect_clean(check_logs(logs, prio));
    }
  }

  TEST_CASE("concurrent schedules of one id: exactly one is queued") {
    const auto rounds = tgi_test::iterations(20000) / 10;
    Scheduler s(SchedulerConfig::with_max_queue(16));
    std::barrier sync(3);
    std::atomic<int> accepted{0};
    auto racer = [&] {
      for (std::uint64_t r = 0; r < rounds; ++r) {
        sync.arrive_and_wait();
        if (!s.schedule(ScheduledTask(r + 1, 1))) accepted.fetch_add(1);
        sync.arrive_and_wait();
      }
    };
    std::thread a(racer), b(racer);
    std::size_t wrong = 0;
    for (std::uint64_t r = 0; r < rounds; ++r) {
      sync.arrive_and_wait();
      sync.arrive_and_wait();
      wrong += accepted.exchange(0) != 1;
      wrong += s.len() != 1;
      wrong += !s.cancel(r + 1);
    }
    a.join();
    b.join();
    CHECK(wrong == 0);
  }
}

TEST_CASE("the history checker flags a reordering, a loss and a passed-over task") {
  // A checker that cannot fail is worthless: feed it broken histories.
  HistoryChecker fifo(true);
  fifo.add({{Op::Schedule, true, Priority::Normal, 1, 1, 2},
            {Op::Schedule, true, Priority::Normal, 2, 3, 4},
            {Op::Next, true, Priority::Normal, 2, 5, 6},
            {Op::Next, true, Priority::Normal, 1, 7, 8}});
  auto v = fifo.check();
  REQUIRE(v.size() == 1);
  CHECK(v[0].kind == "fifo");

  HistoryChecker lost(true);
  lost.add({{Op::Schedule, true, Priority::Normal, 1, 1, 2}});
  v = lost.check();
  REQUIRE(v.size() == 1);
  CHECK(v[0].kind == "conservation");

  HistoryChecker passed(true);
  passed.add({{Op::Schedule, true, Priority::Low, 1, 1, 2},
              {Op::Schedule, true, Priority::High, 2, 3, 4},
              {Op::Next, true, Priority::Low, 1, 5, 6},
              {Op::Next, true, Priority::High, 2, 7, 8}});
  v = passed.check();
  REQUIRE(v.size() == 1);
  CHECK(v[0].kind == "priority");

  HistoryChecker missed(true);
  missed.add({{Op::Schedule, true, Priority::Low, 1, 1, 2},
              {Op::Cancel, false, Priority::Low, 1, 3, 4},
              {Op::Next, true, Priority::Low, 1, 5, 6}});
  v = missed.check();
  REQUIRE(v.size() == 1);
  CHECK(v[0].kind == "cancel");

  HistoryChecker overlapping(true);  // overlapping calls may go either way
  overlapping.add({{Op::Schedule, true, Priority::Normal, 1, 1, 4},
                   {Op::Schedule, true, Priority::Normal, 2, 2, 3},
                   {Op::Next, true, Priority::Normal, 2, 5, 6},
                   {Op::Next, true, Priority::Normal, 1, 7, 8}});
  CHECK(overlapping.check().empty());
}

TEST_CASE("the history checker flags a task passed over for one scheduled before it, an empty next() with a task queued throughout, and a FIFO skip of a task that left by cancel") {
  // next() [0,5] began before both schedules, but returned task 2, whose
  // schedule began after task 1's (Critical) returned: task 1 was queued at
  // any instant that next() could take effect.
  HistoryChecker passed(true);
  passed.add({{Op::Next, true, Priority::Normal, 2, 0, 5},
              {Op::Schedule, true, Priority::Critical, 1, 1, 2},
              {Op::Schedule, true, Priority::Normal, 2, 3, 4},
              {Op::Next, true, Priority::Critical, 1, 6, 7}});
  auto v = passed.check();
  REQUIRE(v.size() == 1);
  CHECK(v[0].kind == "priority");
  CHECK(v[0].detail.find("before task 2's schedule") != std::string::npos);

  HistoryChecker overlapping(true);  // the schedules overlap: task 2 may have come first
  overlapping.add({{Op::Next, true, Priority::Normal, 2, 0, 5},
                   {Op::Schedule, true, Priority::Critical, 1, 1, 4},
                   {Op::Schedule, true, Priority::Normal, 2, 2, 3},
                   {Op::Next, true, Priority::Critical, 1, 6, 7}});
  CHECK(overlapping.check().empty());

  HistoryChecker empty(true);  // task 1 queued throughout the empty next()
  empty.add({{Op::Schedule, true, Priority::Low, 1, 1, 2},
             {Op::Next, false, Priority::Normal, 0, 3, 4},
             {Op::Next, true, Priority::Low, 1, 5, 6}});
  v = empty.check();
  REQUIRE(v.size() == 1);
  CHECK(v[0].kind == "empty");

  // Task 1 was cancelled during the empty next(), but only after task 2 was
  // scheduled: until the cancel, task 1 is queued; from then on, task 2 is.
  HistoryChecker handover(false);
  handover.add({{Op::Schedule, true, Priority::Low, 1, 1, 2},
                {Op::Next, false, Priority::Normal, 0, 3, 10},
                {Op::Schedule, true, Priority::Critical, 2, 4, 5},
                {Op::Cancel, true, Priority::Low, 1, 6, 7},
                {Op::Next, true, Priority::Critical, 2, 11, 12}});
  v = handover.check();
  REQUIRE(v.size() == 1);
  CHECK(v[0].kind == "empty");
  CHECK(v[0].detail.find("then task 2") != std::string::npos);

  HistoryChecker gap(false);  // cancelled before task 2 was scheduled: the queue was empty in between
  gap.add({{Op::Schedule, true, Priority::Low, 1, 1, 2},
           {Op::Next, false, Priority::Normal, 0, 3, 10},
           {Op::Cancel, true, Priority::Low, 1, 4, 5},
           {Op::Schedule, true, Priority::Critical, 2, 6, 7},
           {Op::Next, true, Priority::Critical, 2, 11, 12}});
  CHECK(gap.check().empty());

  // FIFO when the task passed over leaves by cancel (or clear) after the
  // next() that skipped it, or never leaves.
  HistoryChecker skipped(true);
  skipped.add({{Op::Schedule, true, Priority::Normal, 1, 1, 2},
               {Op::Schedule, true, Priority::Normal, 2, 3, 4},
               {Op::Next, true, Priority::Normal, 2, 5, 6},
               {Op::Cancel, true, Priority::Normal, 1, 7, 8}});
  v = skipped.check();
  REQUIRE(v.size() == 1);
  CHECK(v[0].kind == "fifo");
  CHECK(v[0].detail.find("(cancel)") != std::string::npos);

  HistoryChecker cancelled_first(true);  // the cancel may take effect before the next()
  cancelled_first.add({{Op::Schedule, true, Priority::Normal, 1, 1, 2},
                       {Op::Schedule, true, Priority::Normal, 2, 3, 4},
                       {Op::Cancel, true, Priority::Normal, 1, 5, 8},
                       {Op::Next, true, Priority::Normal, 2, 6, 7}});
  CHECK(cancelled_first.check().empty());

  HistoryChecker racing(true);  // the empty next() overlaps the only schedule
  racing.add({{Op::Schedule, true, Priority::Low, 1, 2, 5},
              {Op::Peek, false, Priority::Normal, 0, 3, 4},
              {Op::Next, true, Priority::Low, 1, 6, 7}});
  CHECK(racing.check().empty());
}
