// Hot paths allocate nothing: a counting global operator new (and, outside
// sanitizer builds, malloc) watches schedule, next, peek, cancel, len and
// next_id after construction, on one thread and on several. clear() allocates
// its result once, before it removes anything (operator new can be made to
// fail).
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <thread>
#include <vector>

#include <tgi_gtc/scheduling.hpp>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define TGI_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define TGI_SANITIZED 1
#endif
#endif

namespace {
std::atomic<long> g_news{0};
std::atomic<long> g_mallocs{0};
std::atomic<bool> g_counting{false};
std::atomic<bool> g_fail{false};  // operator new throws while set
}  // namespace

// The replacement pair is malloc/free by design; GCC's heuristic cannot see
// that once both are inlined into a test.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t n) {
  if (g_fail.load()) throw std::bad_alloc();
  if (g_counting.load(std::memory_order::relaxed)) g_news.fetch_add(1, std::memory_order::relaxed);  // relaxed: counters read after join
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

#ifndef TGI_SANITIZED
extern "C" void* __libc_malloc(std::size_t);
extern "C" void* malloc(std::size_t n) {
  if (g_counting.load(std::memory_order::relaxed)) g_mallocs.fetch_add(1, std::memory_order::relaxed);  // relaxed: as above
  return __libc_malloc(n);
}
#endif

using namespace tgi_gtc::scheduling;

namespace {
void hot_loop(Scheduler& s, TaskId base, int n) {
  for (int i = 0; i < n; ++i) {
    const TaskId id = base + static_cast<TaskId>(i);
    (void)s.schedule(ScheduledTask(id, 10).with_priority(static_cast<Priority>(i % 4)));
    (void)s.schedule(ScheduledTask(id, 10));  // duplicate
    (void)s.peek();
    if (i % 3 == 0) {
      (void)s.cancel(id);
    } else {
      (void)s.next();
    }
    (void)s.cancel(id + 1'000'000'000);  // unknown
    (void)s.len();
    (void)s.next_id();
  }
}
}  // namespace

TEST_CASE("schedule, next, peek, cancel, len and next_id allocate nothing") {
  Scheduler s(SchedulerConfig::with_max_queue(64));
  for (TaskId id = 1; id <= 64; ++id) (void)s.schedule(ScheduledTask(id, 1));  // a full queue too
  g_news = 0;
  g_mallocs = 0;
  g_counting = true;
  (void)s.schedule(ScheduledTask(1000, 1));  // QueueFull path
  while (s.next()) {
  }
  hot_loop(s, 10'000, 20'000);
  g_counting = false;
  CHECK(g_news.load() == 0);
  CHECK(g_mallocs.load() == 0);
}

TEST_CASE("hot paths allocate nothing with several threads") {
  Scheduler s(SchedulerConfig::with_max_queue(256));
  std::vector<std::thread> pool;
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  for (int t = 0; t < 3; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load()) {
      }
      hot_loop(s, 100'000 * static_cast<TaskId>(t + 1), 5'000);
    });
  }
  while (ready.load() < 3) {
  }
  g_news = 0;
  g_mallocs = 0;
  g_counting = true;
  go = true;
  for (auto& th : pool) th.join();
  g_counting = false;
  CHECK(g_news.load() == 0);
  CHECK(g_mallocs.load() == 0);
}

TEST_CASE("the counter sees an allocation when there is one") {
  g_news = 0;
  g_counting = true;
  int* volatile p = new int(5);  // volatile: Clang elides a new/delete pair whose pointer is unused
  g_counting = false;
  delete p;
  CHECK(g_news.load() == 1);
}

TEST_CASE("clear() allocates its result before it removes a task: a failed allocation leaves the queue unchanged") {
  Scheduler s(SchedulerConfig::with_max_queue(128));
  for (TaskId id = 1; id <= 100; ++id) REQUIRE_FALSE(s.schedule(ScheduledTask(id, 1).with_priority(static_cast<Priority>(id % 4))));
  g_fail = true;
  bool threw = false;
  try {
    (void)s.clear();
  } catch (const std::bad_alloc&) {
    threw = true;
  }
  g_fail = false;
  CHECK(threw);
  CHECK(s.len() == 100);
  const auto all = s.clear();
  CHECK(all.size() == 100);
  CHECK(s.len() == 0);
}

TEST_CASE("clear() allocates once while other threads schedule and take") {
  Scheduler s(SchedulerConfig::with_max_queue(256));
  std::atomic<bool> stop{false};
  std::vector<std::thread> pool;
  for (int t = 0; t < 2; ++t) {
    pool.emplace_back([&, t] {
      TaskId id = 1'000'000 * static_cast<TaskId>(t + 1);
      while (!stop.load()) {
        id += 2;
        (void)s.schedule(ScheduledTask(id, 1).with_priority(static_cast<Priority>(id / 2 % 4)));
        (void)s.schedule(ScheduledTask(id + 1, 1));
        if (id % 3 == 0) (void)s.next();
      }
    });
  }
  long worst = 0;
  std::size_t taken = 0;
  for (int i = 0; i < 2000 || taken == 0; ++i) {
    while (s.len() == 0) std::this_thread::yield();  // let the producers in
    g_news = 0;
    g_counting = true;
    const auto got = s.clear();
    g_counting = false;
    worst = std::max(worst, g_news.load());
    taken += got.size();
  }
  stop = true;
  for (auto& th : pool) th.join();
  CHECK(worst <= 1);  // the one reserve(); a push_back past it would be a second
  CHECK(taken > 0);
}
