// The queues the scheduler run drives, behind one shape:
//   next_id, schedule, next, peek, cancel, clear, len
// with the calling worker's index passed in (moodycamel needs a producer token
// per thread). RealScheduler is the project's Scheduler; the broken ones
// exist so that the checks are seen to fail (a check that cannot fail is a
// defect): MoodycamelQueue is fast but not FIFO across producers, DroppingQueue
// is a correct mutex queue with one planted fault: it silently loses some
// tasks (broken-dropping), never reports DuplicateId (broken-duplicates),
// refuses some schedules of a queue far from full (broken-full), clears in the
// reverse of next()'s order (broken-clear), reports half its length
// (broken-len), lets len() dip while a cancel() waits for the lock, whether
// or not it then finds its id (broken-len-dip), counts a task from its
// next_id() on, before its schedule() begins (broken-len-early), or answers
// some next() and peek() calls with nothing while tasks are queued
// (broken-empty).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>
#include <vector>

#include <tgi_gtc/scheduling/scheduler.hpp>

namespace tgi_gtc::stress::detail {

using scheduling::Priority;
using scheduling::ScheduledTask;
using scheduling::ScheduleError;
using scheduling::TaskId;

class RealScheduler {
 public:
  static constexpr bool kHasPeek = true;
  static constexpr bool kHasCancel = true;

  RealScheduler(std::size_t capacity, bool priority_mode)
      : s_(scheduling::SchedulerConfig{.max_queue_size = capacity, .priority_scheduling = priority_mode}) {}

  TaskId next_id() noexcept { return s_.next_id(); }
  std::error_code schedule(unsigned, const ScheduledTask& t) noexcept { return s_.schedule(t); }
  std::optional<ScheduledTask> next(unsigned) noexcept { return s_.next(); }
  std::optional<ScheduledTask> peek(unsigned) noexcept { return s_.peek(); }
  std::optional<ScheduledTask> cancel(unsigned, TaskId id) noexcept { return s_.cancel(id); }
  std::vector<ScheduledTask> clear() { return s_.clear(); }
  std::size_t len() const noexcept { return s_.len(); }
  bool is_empty() const noexcept { return s_.is_empty(); }  // moodycamel has none: not checked there
  std::uint64_t dropped() const noexcept { return 0; }

 private:
  scheduling::Scheduler s_;
};

/// One moodycamel::ConcurrentQueue per priority (one in FIFO mode), each
/// thread enqueuing through its own producer token. moodycamel keeps a
/// sub-queue per producer and a consumer picks among them, so two tasks
/// scheduled one after the other by different threads can come out in the
/// other order: a FIFO violation. It has no peek or cancel.
/// (moodycamel_queue.cpp: moodycamel synchronizes with fences, which
/// ThreadSanitizer does not model, so that file is built uninstrumented.)
class MoodycamelQueue {
 public:
  static constexpr bool kHasPeek = false;
  static constexpr bool kHasCancel = false;

  MoodycamelQueue(std::size_t capacity, bool priority_mode, unsigned threads);
  ~MoodycamelQueue();

  TaskId next_id() noexcept { return ids_.fetch_add(1) + 1; }
  std::error_code schedule(unsigned w, const ScheduledTask& t);
  std::optional<ScheduledTask> next(unsigned w);
  std::optional<ScheduledTask> peek(unsigned) { return std::nullopt; }
  std::optional<ScheduledTask> cancel(unsigned, TaskId) { return std::nullopt; }
  std::vector<ScheduledTask> clear();
  std::size_t len() const noexcept;
  std::uint64_t dropped() const noexcept { return 0; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  alignas(64) std::atomic<TaskId> ids_{0};
};

/// A correct priority queue under one mutex, but for the faults asked for.
class DroppingQueue {
 public:
  static constexpr bool kHasPeek = true;
  static constexpr bool kHasCancel = true;

  struct Faults {
    /// schedule() reports success for every task whose id is a multiple of
    /// this (0: none) and then forgets it.
    std::uint64_t drop_every = 0;
    /// false: accepts a task whose id is queued already (a second copy, which
    /// leaves like any other).
    bool check_duplicates = true;
    /// schedule() reports QueueFull for every task whose id is a multiple of
    /// this (0: none), however short the queue.
    std::uint64_t refuse_every = 0;
    /// clear() returns the tasks in the reverse of next()'s order.
    bool clear_reversed = false;
    /// len() reports half the tasks queued.
    bool half_len = false;
    /// cancel() takes one off the count len() reports as it begins, yields
    /// its core (as a slow caller would) and puts the one back once it holds
    /// the lock, before it looks for the id: a decrement made before the
    /// call knows it removes anything. Exact with no call in flight.
    bool dip_in_cancel = false;
    /// next_id() adds one to the count len() reports (then yields its core),
    /// and the schedule() of that id takes it off again: a task counted from
    /// the id that names it, before its schedule() begins. Exact with no
    /// call in flight.
    bool count_from_next_id = false;
    /// next() and peek() report nothing on every this-th call (0: never),
    /// whatever is queued.
    std::uint64_t blind_every = 0;
  };

  DroppingQueue(std::size_t capacity, bool priority_mode, const Faults& faults)
      : capacity_(capacity), classes_(priority_mode ? scheduling::kPriorityCount : 1), faults_(faults) {}

  TaskId next_id() noexcept {
    if (faults_.count_from_next_id) {
      skew_.fetch_add(1);
      std::this_thread::yield();
    }
    return ids_.fetch_add(1) + 1;
  }

  std::error_code schedule(unsigned, const ScheduledTask& t) {
    std::lock_guard lock(mutex_);
    // The early count ends here: size_ counts the task from here on if it is
    // accepted (an id next_id() did not hand out, as with --reuse-ids, was
    // never counted early).
    if (faults_.count_from_next_id && t.id <= ids_.load()) skew_.fetch_sub(1);
    if (size_ >= capacity_) return ScheduleError::QueueFull;
    if (faults_.refuse_every != 0 && t.id % faults_.refuse_every == 0) return ScheduleError::QueueFull;
    if (faults_.check_duplicates) {
      for (const auto& q : queues_) {
        for (const auto& queued : q) {
          if (queued.id == t.id) return ScheduleError::DuplicateId;
        }
      }
    }
    if (faults_.drop_every != 0 && t.id % faults_.drop_every == 0) {
      ++dropped_;
      return {};
    }
    queues_[cls(t.priority)].push_back(t);
    ++size_;
    return {};
  }
  std::optional<ScheduledTask> next(unsigned) {
    std::lock_guard lock(mutex_);
    if (blind()) return std::nullopt;
    for (std::size_t c = classes_; c-- > 0;) {
      if (!queues_[c].empty()) {
        ScheduledTask t = queues_[c].front();
        queues_[c].pop_front();
        --size_;
        return t;
      }
    }
    return std::nullopt;
  }
  std::optional<ScheduledTask> peek(unsigned) {
    std::lock_guard lock(mutex_);
    if (blind()) return std::nullopt;
    for (std::size_t c = classes_; c-- > 0;) {
      if (!queues_[c].empty()) return queues_[c].front();
    }
    return std::nullopt;
  }
  std::optional<ScheduledTask> cancel(unsigned, TaskId id) {
    if (faults_.dip_in_cancel) {
      skew_.fetch_sub(1);
      std::this_thread::yield();
    }
    std::lock_guard lock(mutex_);
    if (faults_.dip_in_cancel) skew_.fetch_add(1);  // found or not, size_ counts it from here
    for (auto& q : queues_) {
      for (auto it = q.begin(); it != q.end(); ++it) {
        if (it->id == id) {
          ScheduledTask t = *it;
          q.erase(it);
          --size_;
          return t;
        }
      }
    }
    return std::nullopt;
  }
  std::vector<ScheduledTask> clear() {
    std::vector<ScheduledTask> out;
    std::lock_guard lock(mutex_);
    for (std::size_t c = classes_; c-- > 0;) {
      out.insert(out.end(), queues_[c].begin(), queues_[c].end());
      queues_[c].clear();
    }
    size_ = 0;
    if (faults_.clear_reversed) std::reverse(out.begin(), out.end());
    return out;
  }
  bool is_empty() const { return len() == 0; }  // with len()'s faults
  std::size_t len() const {
    std::lock_guard lock(mutex_);
    const std::int64_t n = static_cast<std::int64_t>(faults_.half_len ? size_ / 2 : size_) + skew_.load();
    return n > 0 ? static_cast<std::size_t>(n) : 0;
  }
  std::uint64_t dropped() const {
    std::lock_guard lock(mutex_);
    return dropped_;
  }

 private:
  std::size_t cls(Priority p) const { return classes_ == 1 ? 0 : scheduling::value(p); }
  // Under mutex_.
  bool blind() { return faults_.blind_every != 0 && ++lookups_ % faults_.blind_every == 0; }

  std::size_t capacity_;
  std::size_t classes_;
  Faults faults_;
  mutable std::mutex mutex_;
  std::deque<ScheduledTask> queues_[scheduling::kPriorityCount];
  std::size_t size_ = 0;
  std::uint64_t dropped_ = 0;
  std::uint64_t lookups_ = 0;  // next() and peek() calls, for blind_every
  std::atomic<std::int64_t> skew_{0};  // dip_in_cancel, count_from_next_id: what len() adds to size_
  std::atomic<TaskId> ids_{0};
};

}  // namespace tgi_gtc::stress::detail
