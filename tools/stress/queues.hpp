// The queues the scheduler run drives, behind one shape:
//   next_id, schedule, next, peek, cancel, clear, len
// with the calling worker's index passed in (moodycamel needs a producer token
// per thread). RealScheduler is the project's Scheduler; the broken ones
// exist so that the checks are seen to fail (a check that cannot fail is a
// defect): MoodycamelQueue is fast but not FIFO across producers, DroppingQueue
// is a correct mutex queue that silently loses some tasks, or (as
// broken-duplicates) one that never reports DuplicateId.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
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

/// A correct priority queue under one mutex, except that schedule() reports
/// success for every task whose id is a multiple of `drop_every` (0: none)
/// and then forgets it; and, without `check_duplicates`, accepts a task whose
/// id is queued already (a second copy, which leaves like any other).
class DroppingQueue {
 public:
  static constexpr bool kHasPeek = true;
  static constexpr bool kHasCancel = true;

  DroppingQueue(std::size_t capacity, bool priority_mode, std::uint64_t drop_every, bool check_duplicates)
      : capacity_(capacity),
        classes_(priority_mode ? scheduling::kPriorityCount : 1),
        drop_every_(drop_every),
        check_duplicates_(check_duplicates) {}

  TaskId next_id() noexcept { return ids_.fetch_add(1) + 1; }

  std::error_code schedule(unsigned, const ScheduledTask& t) {
    std::lock_guard lock(mutex_);
    if (size_ >= capacity_) return ScheduleError::QueueFull;
    if (check_duplicates_) {
      for (const auto& q : queues_) {
        for (const auto& queued : q) {
          if (queued.id == t.id) return ScheduleError::DuplicateId;
        }
      }
    }
    if (drop_every_ != 0 && t.id % drop_every_ == 0) {
      ++dropped_;
      return {};
    }
    queues_[cls(t.priority)].push_back(t);
    ++size_;
    return {};
  }
  std::optional<ScheduledTask> next(unsigned) {
    std::lock_guard lock(mutex_);
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
    for (std::size_t c = classes_; c-- > 0;) {
      if (!queues_[c].empty()) return queues_[c].front();
    }
    return std::nullopt;
  }
  std::optional<ScheduledTask> cancel(unsigned, TaskId id) {
    std::lock_guard lock(mutex_);
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
    while (auto t = next(0)) out.push_back(*t);
    return out;
  }
  std::size_t len() const {
    std::lock_guard lock(mutex_);
    return size_;
  }
  std::uint64_t dropped() const {
    std::lock_guard lock(mutex_);
    return dropped_;
  }

 private:
  std::size_t cls(Priority p) const { return classes_ == 1 ? 0 : scheduling::value(p); }

  std::size_t capacity_;
  std::size_t classes_;
  std::uint64_t drop_every_;
  bool check_duplicates_;
  mutable std::mutex mutex_;
  std::deque<ScheduledTask> queues_[scheduling::kPriorityCount];
  std::size_t size_ = 0;
  std::uint64_t dropped_ = 0;
  std::atomic<TaskId> ids_{0};
};

}  // namespace tgi_gtc::stress::detail
