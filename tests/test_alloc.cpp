// Hot paths allocate nothing: a counting global operator new, aligned forms
// included (and, outside sanitizer builds, malloc), watches the Scheduler's
// schedule, next, peek, cancel, len and next_id, and the BlockPool's
// try_allocate, retain, try_retain, release and snapshots, after
// construction, on one thread and on several. clear() allocates its result
// once, before it removes anything (operator new can be made to fail). And
// memory_bytes() is what the constructors ask of operator new.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <span>
#include <thread>
#include <utility>
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
std::atomic<std::size_t> g_bytes{0};  // bytes asked of operator new while counting
std::atomic<long> g_mallocs{0};
std::atomic<bool> g_counting{false};
std::atomic<bool> g_fail{false};  // operator new throws while set
}  // namespace

// The replacement pair is malloc/free by design; GCC's heuristic cannot see
// that once both are inlined into a test.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

namespace {
void count_new(std::size_t n) {
  if (g_fail.load()) throw std::bad_alloc();
  if (g_counting.load(std::memory_order::relaxed)) {
    // relaxed (both): counters read after the counting threads are joined
    g_news.fetch_add(1, std::memory_order::relaxed);
    g_bytes.fetch_add(n, std::memory_order::relaxed);
  }
}
}  // namespace

void* operator new(std::size_t n) {
  count_new(n);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
// Over-aligned types (the pool's bitmap lines, the Scheduler's buckets).
void* operator new(std::size_t n, std::align_val_t al) {
  count_new(n);
  const auto a = static_cast<std::size_t>(al);
  if (n > SIZE_MAX - a) throw std::bad_alloc();
  // aligned_alloc wants a size that is a nonzero multiple of the alignment.
  if (void* p = std::aligned_alloc(a, n == 0 ? a : (n + a - 1) / a * a)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
// The array forms too: the standard library's call the forms above, but the
// sanitizer runtimes define their own.
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new[](std::size_t n, std::align_val_t al) { return operator new(n, al); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
// And the nothrow forms, for the same reason, so that whatever this program
// allocates is counted and freed by the functions above.
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return operator new(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return operator new(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new(std::size_t n, std::align_val_t al, const std::nothrow_t&) noexcept {
  try {
    return operator new(n, al);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, std::align_val_t al, const std::nothrow_t&) noexcept {
  try {
    return operator new(n, al);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

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

namespace {
// Runs body(t) on `n` threads that start together, counting allocations from
// the start to the last join (the threads themselves are made before).
template <class Body>
void count_on_threads(int n, Body body) {
  std::vector<std::thread> threads;
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  for (int t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load()) {
      }
      body(t);
    });
  }
  while (ready.load() < n) {
  }
  g_news = 0;
  g_mallocs = 0;
  g_counting = true;
  go = true;
  for (auto& th : threads) th.join();
  g_counting = false;
}
}  // namespace

TEST_CASE("hot paths allocate nothing with several threads") {
  Scheduler s(SchedulerConfig::with_max_queue(256));
  count_on_threads(3, [&](int t) { hot_loop(s, 100'000 * static_cast<TaskId>(t + 1), 5'000); });
  CHECK(g_news.load() == 0);
  CHECK(g_mallocs.load() == 0);
}

TEST_CASE("the counter sees an allocation when there is one") {
  g_news = 0;
  g_bytes = 0;
  g_counting = true;
  int* volatile p = new int(5);  // volatile: Clang elides a new/delete pair whose pointer is unused
  g_counting = false;
  delete p;
  CHECK(g_news.load() == 1);
  CHECK(g_bytes.load() == sizeof(int));
  g_news = 0;
  g_counting = true;
  int* volatile q = new (std::nothrow) int[3];  // the nothrow array form
  g_counting = false;
  delete[] q;
  CHECK(g_news.load() == 1);
}

TEST_CASE("the counter sees an over-aligned allocation") {
  struct alignas(64) Line {
    char bytes[64];
  };
  g_news = 0;
  g_bytes = 0;
  g_counting = true;
  Line* volatile p = new Line[3];  // volatile: as above
  g_counting = false;
  CHECK(reinterpret_cast<std::uintptr_t>(p) % 64 == 0);
  delete[] p;
  CHECK(g_news.load() == 1);
  CHECK(g_bytes.load() == 3 * sizeof(Line));
}

namespace {
// Every BlockPool call a serving loop makes, `n` rounds on `pool`.
void pool_loop(BlockPool& pool, int n) {
  std::array<BlockId, 4> four{};
  std::array<BlockId, 1> one{};
  for (int i = 0; i < n; ++i) {
    const std::span<BlockId> want = i % 2 == 0 ? std::span<BlockId>(four) : std::span<BlockId>(one);
    if (!pool.try_allocate(want)) continue;
    pool.retain(want);
    if (pool.try_retain(want)) (void)pool.release(want);
    (void)pool.release(want);
    (void)pool.release(want);
    (void)pool.release(std::array<BlockId, 1>{pool.total_blocks()});  // out of range: rejected
    (void)pool.free_blocks();
    (void)pool.ref_count(want[0]);
    (void)pool.invalid_releases();
  }
}
}  // namespace

TEST_CASE("BlockPool's calls allocate nothing, on one thread and on several") {
  BlockPool pool(64);
  g_news = 0;
  g_mallocs = 0;
  g_counting = true;
  pool_loop(pool, 20'000);
  g_counting = false;
  CHECK(g_news.load() == 0);
  CHECK(g_mallocs.load() == 0);
  CHECK(pool.free_blocks() == 64);

  count_on_threads(3, [&](int) { pool_loop(pool, 5'000); });
  CHECK(g_news.load() == 0);
  CHECK(g_mallocs.load() == 0);
  CHECK(pool.free_blocks() == 64);
}

TEST_CASE("memory_bytes() is what the constructor asks of operator new") {
  // Counted around make_unique, so the object's own bytes are asked too:
  // the BlockPool counts them in memory_bytes(); the Scheduler counts its
  // core, not its handle.
  const auto asked = [](auto make) {
    g_bytes = 0;
    g_counting = true;
    auto made = make();
    g_counting = false;
    return std::pair{g_bytes.load(), std::move(made)};
  };
  for (const std::uint32_t n : {1u, 3u, 4u, 8u, 100u, 255u, 256u, 1000u, 4096u, 100'000u}) {
    CAPTURE(n);
    const auto [bytes, pool] = asked([n] { return std::make_unique<BlockPool>(n); });
    CHECK(pool->memory_bytes() == bytes);
    CHECK(pool->memory_bytes() >= std::size_t{n} * 4 + (n + 63) / 64 * 64);
  }
  for (const std::size_t cap : {std::size_t{1}, std::size_t{64}, std::size_t{1000}, std::size_t{100'000}}) {
    for (const bool prio : {true, false}) {
      CAPTURE(cap);
      CAPTURE(prio);
      SchedulerConfig c = SchedulerConfig::with_max_queue(cap);
      c.priority_scheduling = prio;
      const auto [bytes, s] = asked([c] { return std::make_unique<Scheduler>(c); });
      CHECK(s->memory_bytes() + sizeof(Scheduler) == bytes);
    }
  }
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
