// The scheduler peers, each behind one adapter concept so that the same
// workload drives all of them. bench/README.md says why each is built as it is.
//
// Every adapter:
//   explicit Adapter(std::size_t capacity)      most tasks queued at once
//   bool schedule(const ScheduledTask&)         false: full (nothing changed)
//   std::optional<ScheduledTask> next()         highest priority first, FIFO within
//   static kName, kPriorityOrder, kFifo, kProgress
// and optionally cancel(TaskId) and peek(), detected with `requires`.
#pragma once

#include <malloc.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <atomic_queue/atomic_queue.h>
#include <boost/lockfree/queue.hpp>
#include <concurrentqueue/concurrentqueue.h>
#include <oneapi/tbb/cache_aligned_allocator.h>
#include <oneapi/tbb/concurrent_priority_queue.h>

#include <tgi_gtc/scheduling/scheduler.hpp>

#include "alloc_counter.hpp"
#include "harness.hpp"

namespace tgi_bench {

using sched::Priority;
using sched::ScheduledTask;
using sched::TaskId;

// ---------------------------------------------------------------------------
// The adapter concept and the optional capabilities.

template <class Q>
concept SchedulerAdapter = std::constructible_from<Q, std::size_t> && requires(Q q, const ScheduledTask& t) {
  { Q::kName } -> std::convertible_to<std::string_view>;
  { Q::kPriorityOrder } -> std::convertible_to<bool>;
  { Q::kFifo } -> std::convertible_to<std::string_view>;
  { Q::kProgress } -> std::convertible_to<std::string_view>;
  { q.schedule(t) } -> std::same_as<bool>;
  { q.next() } -> std::same_as<std::optional<ScheduledTask>>;
};

template <class Q>
concept CancelCapable = SchedulerAdapter<Q> && requires(Q q, TaskId id) {
  { q.cancel(id) } -> std::same_as<std::optional<ScheduledTask>>;
};

template <class Q>
concept PeekCapable = SchedulerAdapter<Q> && requires(Q q) {
  { q.peek() } -> std::same_as<std::optional<ScheduledTask>>;
};

template <SchedulerAdapter Q>
inline constexpr bool supports_cancel = CancelCapable<Q>;
template <SchedulerAdapter Q>
inline constexpr bool supports_peek = PeekCapable<Q>;

/// ScheduledTask with a default constructor, for containers that need one
/// (atomic_queue, boost.lockfree, moodycamel). Same 32 bytes, trivially copyable.
struct TaskBox {
  ScheduledTask task{0, 0};
};
static_assert(sizeof(TaskBox) == sizeof(ScheduledTask));
static_assert(std::is_trivially_copyable_v<TaskBox> && std::is_trivially_destructible_v<TaskBox>);

inline std::size_t level(Priority p) { return static_cast<std::size_t>(sched::value(p)); }

/// A capacity limit for peers that have none of their own: reserve a unit
/// before inserting, give it back after a removal. It only bounds a count;
/// the task itself is published by the underlying queue.
class CapacityCounter {
 public:
  explicit CapacityCounter(std::size_t capacity) : capacity_(static_cast<std::int64_t>(capacity)) {}

  bool try_reserve() noexcept {
    // relaxed: a pure count, nothing is published through it (see above).
    if (size_.fetch_add(1, std::memory_order::relaxed) >= capacity_) {
      // relaxed: undoes the reservation above.
      size_.fetch_sub(1, std::memory_order::relaxed);
      return false;
    }
    return true;
  }
  void release() noexcept {
    // relaxed: a pure count, nothing is published through it.
    size_.fetch_sub(1, std::memory_order::relaxed);
  }

 private:
  alignas(64) std::atomic<std::int64_t> size_{0};
  alignas(64) std::int64_t capacity_;
};
static_assert(alignof(CapacityCounter) == 64);

// ---------------------------------------------------------------------------
// seed_mutex: the original design ported as it was. One mutex around one
// deque; schedule inserts before the first task of lower priority (a linear
// scan on every insert), cancel scans for the id. No duplicate-id check: the
// original had none.

class SeedMutex {
 public:
  static constexpr std::string_view kName = "seed_mutex";
  static constexpr bool kPriorityOrder = true;
  static constexpr std::string_view kFifo = "global";
  static constexpr std::string_view kProgress = "blocking (one mutex)";

  explicit SeedMutex(std::size_t capacity) : capacity_(capacity) {}

  bool schedule(const ScheduledTask& t) {
    std::lock_guard lock(mutex_);
    if (queue_.size() >= capacity_) return false;
    const auto pos = std::find_if(queue_.begin(), queue_.end(),
                                  [&](const ScheduledTask& q) { return q.priority < t.priority; });
    // Rust's VecDeque::insert(len, t) is a push_back; libstdc++'s deque::insert
    // at end() of an empty deque takes the push_front path and allocates a
    // chunk every time, a cost the original never paid.
    if (pos == queue_.end())
      queue_.push_back(t);
    else
      queue_.insert(pos, t);
    return true;
  }

  std::optional<ScheduledTask> next() {
    std::lock_guard lock(mutex_);
    if (queue_.empty()) return std::nullopt;
    ScheduledTask t = queue_.front();
    queue_.pop_front();
    return t;
  }

  std::optional<ScheduledTask> peek() {
    std::lock_guard lock(mutex_);
    if (queue_.empty()) return std::nullopt;
    return queue_.front();
  }

  std::optional<ScheduledTask> cancel(TaskId id) {
    std::lock_guard lock(mutex_);
    const auto it = std::find_if(queue_.begin(), queue_.end(), [&](const ScheduledTask& q) { return q.id == id; });
    if (it == queue_.end()) return std::nullopt;
    ScheduledTask t = *it;
    queue_.erase(it);
    return t;
  }

 private:
  std::mutex mutex_;
  std::deque<ScheduledTask> queue_;
  std::size_t capacity_;
};

// ---------------------------------------------------------------------------
// mutex_deques: the obvious fix. One mutex, one deque per priority: O(1)
// schedule and next; cancel still scans.

class MutexDeques {
 public:
  static constexpr std::string_view kName = "mutex_deques";
  static constexpr bool kPriorityOrder = true;
  static constexpr std::string_view kFifo = "global";
  static constexpr std::string_view kProgress = "blocking (one mutex)";

  explicit MutexDeques(std::size_t capacity) : capacity_(capacity) {}

  bool schedule(const ScheduledTask& t) {
    std::lock_guard lock(mutex_);
    if (size_ >= capacity_) return false;
    queues_[level(t.priority)].push_back(t);
    ++size_;
    return true;
  }

  std::optional<ScheduledTask> next() {
    std::lock_guard lock(mutex_);
    for (std::size_t p = sched::kPriorityCount; p-- > 0;) {
      auto& q = queues_[p];
      if (q.empty()) continue;
      ScheduledTask t = q.front();
      q.pop_front();
      --size_;
      return t;
    }
    return std::nullopt;
  }

  std::optional<ScheduledTask> peek() {
    std::lock_guard lock(mutex_);
    for (std::size_t p = sched::kPriorityCount; p-- > 0;)
      if (!queues_[p].empty()) return queues_[p].front();
    return std::nullopt;
  }

  std::optional<ScheduledTask> cancel(TaskId id) {
    std::lock_guard lock(mutex_);
    // Highest priority first, as next() serves them: those deques stay short
    // while the backlog gathers in the lower ones.
    for (std::size_t p = sched::kPriorityCount; p-- > 0;) {
      auto& q = queues_[p];
      const auto it = std::find_if(q.begin(), q.end(), [&](const ScheduledTask& x) { return x.id == id; });
      if (it == q.end()) continue;
      ScheduledTask t = *it;
      q.erase(it);
      --size_;
      return t;
    }
    return std::nullopt;
  }

 private:
  std::mutex mutex_;
  std::array<std::deque<ScheduledTask>, sched::kPriorityCount> queues_;
  std::size_t size_ = 0;
  std::size_t capacity_;
};

// ---------------------------------------------------------------------------
// tbb_cpq: oneTBB's concurrent_priority_queue (a heap behind an aggregator:
// one thread applies the batched operations of the others) keyed by
// (priority, arrival stamp). The stamp makes it FIFO within a priority.

/// Counts through the bench hooks, allocates with TBB's own default.
template <class T>
struct CountingTbbAllocator {
  using value_type = T;
  CountingTbbAllocator() noexcept = default;
  template <class U>
  CountingTbbAllocator(const CountingTbbAllocator<U>&) noexcept {}  // NOLINT: allocator rebind

  T* allocate(std::size_t n) {
    note_alloc(n * sizeof(T));
    return tbb::cache_aligned_allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    note_free(n * sizeof(T));
    tbb::cache_aligned_allocator<T>().deallocate(p, n);
  }
  template <class U>
  bool operator==(const CountingTbbAllocator<U>&) const noexcept {
    return true;
  }
};

class TbbCpq {
 public:
  static constexpr std::string_view kName = "tbb_cpq";
  static constexpr bool kPriorityOrder = true;
  static constexpr std::string_view kFifo = "global (arrival stamp)";
  static constexpr std::string_view kProgress = "blocking (aggregator: waiters spin on a combiner)";

  explicit TbbCpq(std::size_t capacity) : queue_(capacity), size_(capacity) {}

  bool schedule(const ScheduledTask& t) {
    if (!size_.try_reserve()) return false;
    // relaxed: the stamp only orders tasks of equal priority; the task is
    // published by the queue's own synchronisation.
    queue_.push(Stamped{t, stamp_.fetch_add(1, std::memory_order::relaxed)});
    return true;
  }

  std::optional<ScheduledTask> next() {
    Stamped s;
    if (!queue_.try_pop(s)) return std::nullopt;
    size_.release();
    return s.task;
  }

 private:
  struct Stamped {
    ScheduledTask task{0, 0};
    std::uint64_t stamp = 0;
  };
  struct Before {  // "a < b": b is served first
    bool operator()(const Stamped& a, const Stamped& b) const noexcept {
      if (a.task.priority != b.task.priority) return a.task.priority < b.task.priority;
      return a.stamp > b.stamp;
    }
  };
  tbb::concurrent_priority_queue<Stamped, Before, CountingTbbAllocator<Stamped>> queue_;
  alignas(64) std::atomic<std::uint64_t> stamp_{0};
  CapacityCounter size_;
};

// ---------------------------------------------------------------------------
// boost_lockfree4: four boost::lockfree::queue (Michael-Scott with a
// preallocated free list; bounded_push never allocates), scanned from Critical.

class BoostLockfree4 {
 public:
  static constexpr std::string_view kName = "boost_lockfree4";
  static constexpr bool kPriorityOrder = true;
  static constexpr std::string_view kFifo = "global per priority";
  static constexpr std::string_view kProgress = "lock-free";

  explicit BoostLockfree4(std::size_t capacity) : size_(capacity) {
    for (auto& q : queues_) q = std::make_unique<Queue>(capacity);
  }

  bool schedule(const ScheduledTask& t) {
    if (!size_.try_reserve()) return false;
    if (queues_[level(t.priority)]->bounded_push(TaskBox{t})) return true;
    size_.release();
    return false;
  }

  std::optional<ScheduledTask> next() {
    TaskBox b;
    for (std::size_t p = sched::kPriorityCount; p-- > 0;) {
      if (queues_[p]->pop(b)) {
        size_.release();
        return b.task;
      }
    }
    return std::nullopt;
  }

 private:
  using Queue = boost::lockfree::queue<TaskBox>;
  std::array<std::unique_ptr<Queue>, sched::kPriorityCount> queues_;
  CapacityCounter size_;
};

// ---------------------------------------------------------------------------
// moodycamel4: four moodycamel::ConcurrentQueue, pre-sized for the capacity
// and the run's thread count, used without tokens (the project's API has no
// per-thread handle either). FIFO only per producer: two tasks of one
// priority from different threads may come out in either order.

struct CountingMoodycamelTraits : moodycamel::ConcurrentQueueDefaultTraits {
  static void* malloc(std::size_t n) {
    void* p = std::malloc(n);
    if (p != nullptr) note_alloc(malloc_usable_size(p));
    return p;
  }
  static void free(void* p) {
    if (p != nullptr) note_free(malloc_usable_size(p));
    std::free(p);
  }
};

class Moodycamel4 {
 public:
  static constexpr std::string_view kName = "moodycamel4";
  static constexpr bool kPriorityOrder = true;
  static constexpr std::string_view kFifo = "per producer only";
  static constexpr std::string_view kProgress = "lock-free (allocates when its blocks run out)";

  explicit Moodycamel4(std::size_t capacity) : size_(capacity) {
    const auto producers = static_cast<std::size_t>(std::max(config().max_threads, 1)) + 1;
    for (auto& q : queues_) q = std::make_unique<Queue>(capacity, 0, producers);
  }

  bool schedule(const ScheduledTask& t) {
    if (!size_.try_reserve()) return false;
    if (queues_[level(t.priority)]->enqueue(TaskBox{t})) return true;
    size_.release();
    return false;
  }

  std::optional<ScheduledTask> next() {
    TaskBox b;
    for (std::size_t p = sched::kPriorityCount; p-- > 0;) {
      if (queues_[p]->try_dequeue(b)) {
        size_.release();
        return b.task;
      }
    }
    return std::nullopt;
  }

 private:
  using Queue = moodycamel::ConcurrentQueue<TaskBox, CountingMoodycamelTraits>;
  std::array<std::unique_ptr<Queue>, sched::kPriorityCount> queues_;
  CapacityCounter size_;
};

// ---------------------------------------------------------------------------
// atomic_queue4 / atomic_queue1: AtomicQueueB2 rings holding the 32-byte task
// by value (a 64-bit handle would need a concurrent slab free list beside the
// ring, i.e. a second queue per operation). atomic_queue1 has no priorities
// at all: the speed-of-light bound for a bounded MPMC queue.

using AtomicRing = atomic_queue::AtomicQueueB2<TaskBox>;

class AtomicQueue4 {
 public:
  static constexpr std::string_view kName = "atomic_queue4";
  static constexpr bool kPriorityOrder = true;
  static constexpr std::string_view kFifo = "global per priority";
  static constexpr std::string_view kProgress = "blocking if a thread stalls mid-operation (slot spin)";

  explicit AtomicQueue4(std::size_t capacity) : size_(capacity) {
    for (auto& q : queues_) q = std::make_unique<AtomicRing>(static_cast<unsigned>(capacity));
  }

  bool schedule(const ScheduledTask& t) {
    if (!size_.try_reserve()) return false;
    if (queues_[level(t.priority)]->try_push(TaskBox{t})) return true;
    size_.release();
    return false;
  }

  std::optional<ScheduledTask> next() {
    TaskBox b;
    for (std::size_t p = sched::kPriorityCount; p-- > 0;) {
      if (queues_[p]->try_pop(b)) {
        size_.release();
        return b.task;
      }
    }
    return std::nullopt;
  }

 private:
  std::array<std::unique_ptr<AtomicRing>, sched::kPriorityCount> queues_;
  CapacityCounter size_;
};

class AtomicQueue1 {
 public:
  static constexpr std::string_view kName = "atomic_queue1";
  static constexpr bool kPriorityOrder = false;
  static constexpr std::string_view kFifo = "global, no priorities";
  static constexpr std::string_view kProgress = "blocking if a thread stalls mid-operation (slot spin)";

  /// The ring's own bound is the capacity when the requested one is a power
  /// of two of at least 4096 (the ring's minimum); otherwise a counter adds it.
  explicit AtomicQueue1(std::size_t capacity)
      : ring_(static_cast<unsigned>(capacity)), counted_(ring_.capacity() != capacity), size_(capacity) {}

  bool schedule(const ScheduledTask& t) {
    if (counted_ && !size_.try_reserve()) return false;
    if (ring_.try_push(TaskBox{t})) return true;
    if (counted_) size_.release();
    return false;
  }

  std::optional<ScheduledTask> next() {
    TaskBox b;
    if (!ring_.try_pop(b)) return std::nullopt;
    if (counted_) size_.release();
    return b.task;
  }

 private:
  AtomicRing ring_;
  bool counted_;
  CapacityCounter size_;
};

// ---------------------------------------------------------------------------
// tgi_gtc: this project's Scheduler.

class ProjectScheduler {
 public:
  static constexpr std::string_view kName = "tgi_gtc";
  static constexpr bool kPriorityOrder = true;
  static constexpr std::string_view kFifo = "global (linearizable)";
  static constexpr std::string_view kProgress = "lock-free";

  explicit ProjectScheduler(std::size_t capacity)
      : scheduler_(sched::SchedulerConfig{.max_queue_size = capacity, .priority_scheduling = true,
                                          .enable_preemption = true}) {}

  bool schedule(const ScheduledTask& t) { return !scheduler_.schedule(t); }
  std::optional<ScheduledTask> next() { return scheduler_.next(); }
  std::optional<ScheduledTask> peek() { return scheduler_.peek(); }
  std::optional<ScheduledTask> cancel(TaskId id) { return scheduler_.cancel(id); }
  std::size_t reported_memory_bytes() const { return scheduler_.memory_bytes(); }

 private:
  sched::Scheduler scheduler_;
};

// ---------------------------------------------------------------------------
// The one-thread correctness check every peer passes before it is timed.
// Returns an empty string, or what went wrong.

template <SchedulerAdapter Q>
std::string self_check() {
  constexpr std::size_t kCap = 64;
  constexpr std::size_t kLargeCap = 16384;
  Q q(kCap);
  auto task = [](TaskId id, Priority p) {
    ScheduledTask t(id, 100 + id);
    t.priority = p;
    return t;
  };
  static constexpr std::array<Priority, 7> kPattern = {Priority::Normal, Priority::Low,  Priority::Critical,
                                                       Priority::High,   Priority::Normal, Priority::High,
                                                       Priority::Low};
  // 1. Order: priority first, FIFO within a priority (arrival order for a
  //    peer without priorities).
  std::vector<ScheduledTask> in;
  for (TaskId i = 1; i <= 48; ++i) {
    in.push_back(task(i, kPattern[i % kPattern.size()]));
    if (!q.schedule(in.back())) return "schedule refused a task below capacity";
  }
  std::vector<ScheduledTask> expected = in;
  if constexpr (Q::kPriorityOrder)
    std::stable_sort(expected.begin(), expected.end(),
                     [](const ScheduledTask& a, const ScheduledTask& b) { return a.priority > b.priority; });
  if constexpr (PeekCapable<Q>) {
    const auto p = q.peek();
    if (!p || *p != expected.front()) return "peek does not show the task next() returns";
  }
  for (const auto& e : expected) {
    const auto r = q.next();
    if (!r) return "next() ran dry early";
    if (*r != e) return "order: expected id " + std::to_string(e.id) + ", got " + std::to_string(r->id);
  }
  if (q.next()) return "a task came out twice";
  // 2. Capacity: exactly kCap accepted, and exactly kLargeCap, the pair
  //    workloads' capacity (atomic_queue1's ring enforces that one itself).
  const auto exactly = [&](Q& queue, std::size_t cap) -> std::string {
    const std::string at = " capacity " + std::to_string(cap);
    for (TaskId i = 0; i < cap; ++i)
      if (!queue.schedule(task(100 + i, Priority::Normal))) return "refused a task below" + at;
    if (queue.schedule(task(100 + cap, Priority::Critical))) return "accepted a task above" + at;
    for (std::size_t i = 0; i < cap; ++i)
      if (!queue.next()) return "lost a task at" + at;
    if (queue.next()) return "queue not empty after draining";
    return {};
  };
  if (std::string err = exactly(q, kCap); !err.empty()) return err;
  {
    auto large = std::make_unique<Q>(kLargeCap);
    if (std::string err = exactly(*large, kLargeCap); !err.empty()) return err;
  }
  // 3. Cancel by id.
  if constexpr (CancelCapable<Q>) {
    for (TaskId i = 1; i <= 8; ++i)
      if (!q.schedule(task(200 + i, kPattern[i % kPattern.size()]))) return "refused a task";
    const auto c = q.cancel(205);
    if (!c || c->id != 205) return "cancel missed a queued task";
    if (q.cancel(205)) return "cancel returned a task twice";
    for (int i = 0; i < 7; ++i) {
      const auto r = q.next();
      if (!r || r->id == 205) return "a cancelled task was served, or a task was lost";
    }
    if (q.next()) return "queue not empty after cancel and drain";
  }
  return {};
}

/// self_check<Q>() run once per peer and remembered.
template <SchedulerAdapter Q>
const std::string& checked() {
  static const std::string result = self_check<Q>();
  return result;
}

}  // namespace tgi_bench
