// Scheduler: a bounded, linearizable, lock-free priority queue of tasks with
// cancellation by id through a hash index: a probe of a short range of
// buckets, never a scan of the queue (the range widens slowly over a
// process's life; a cancel that races its task's schedule() also reads the
// ring cells of the tickets taken since that one's; see README "Design").
// (Not linearizable: a QueueFull refusal and len()/is_empty(), which count
// schedule() calls in flight, and clear(), which removes task by task; see
// README "Guarantees".)
//
// Thread safety: every member function may be called from any number of
// threads at once, with any other member function, except construction and
// destruction.
//
// Progress (see README "Guarantees" for the argument):
//   next_id, len, is_empty, config   wait-free.
//   next, peek                       lock-free: a stalled thread never blocks
//                                    them; they retry only when another call
//                                    made progress (a higher-priority schedule,
//                                    or a competing removal).
//   cancel                           lock-free.
//   schedule                         lock-free, except against another
//                                    schedule() of the *same id* running at the
//                                    same moment (or of one of the 1 in 2^20
//                                    ids that share its fingerprint and probe
//                                    range): it waits while that one is between
//                                    its claim and its publish (its duplicate
//                                    check, for a different id); two that claim
//                                    at once both back off for random delays
//                                    and retry. A stall there delays only them.
//                                    The waiter spins its first rounds, then
//                                    yields its core each round (a syscall).
//   clear                            lock-free per task; allocates its result
//                                    before it removes anything.
// Hot paths (schedule, next, peek, cancel, len, next_id) take no lock, make no
// system call and allocate no memory after construction (but for the yields
// of a schedule() that waits for another of its id or fingerprint, above).
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <system_error>
#include <vector>

#include <tgi_gtc/scheduling/task.hpp>

namespace tgi_gtc::scheduling {

namespace detail {
class SchedulerCore;
}

/// Largest accepted SchedulerConfig::max_queue_size (2^24).
inline constexpr std::size_t kMaxQueueSize = std::size_t{1} << 24;

class Scheduler {
 public:
  /// Default configuration (1000 tasks, priority scheduling on).
  Scheduler();
  /// Throws std::invalid_argument when max_queue_size is 0 or above kMaxQueueSize.
  /// Reserves all memory here (see memory_bytes()); nothing is allocated later.
  explicit Scheduler(SchedulerConfig config);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;
  Scheduler(Scheduler&&) = delete;
  Scheduler& operator=(Scheduler&&) = delete;

  const SchedulerConfig& config() const noexcept;

  /// 1, 2, 3, ...: unique across threads (wraps only after 2^64 calls).
  TaskId next_id() noexcept;

  /// Queues a copy of `task`. Empty on success; ScheduleError::InvalidPriority
  /// when task.priority is none of the four enumerators (checked first);
  /// ScheduleError::QueueFull when len() has reached max_queue_size (len()
  /// counts schedule() calls in flight, so this answer is not linearizable:
  /// README "Guarantees"), or, exceptionally, when the task table shows no
  /// free slot to its probe (max_queue_size + 131 calls stalled mid-way, or
  /// other calls' claims and frees in a hostile order: README "Progress");
  /// ScheduleError::DuplicateId when a task with the same id is queued. On
  /// failure nothing changes.
  [[nodiscard]] std::error_code schedule(const ScheduledTask& task) noexcept;

  /// Removes and returns the highest-priority task (FIFO within a priority;
  /// FIFO over all tasks when priority scheduling is off), or nullopt if none.
  std::optional<ScheduledTask> next() noexcept;

  /// What next() would return at this moment, without removing it.
  std::optional<ScheduledTask> peek() const noexcept;

  /// Removes and returns the queued task with this id, or nullopt if none is
  /// queued. When cancel and next race for the same task, exactly one gets it.
  std::optional<ScheduledTask> cancel(TaskId id) noexcept;

  /// Removes and returns every queued task, in the order next() would have
  /// returned them. Under concurrency: every task queued before clear() began
  /// and not removed by another call; tasks scheduled meanwhile may or may not
  /// be included. Not one instant: it removes the tasks one by one, so a
  /// next() racing it may take a later task of a priority whose earlier one
  /// clear() took. Allocates the returned vector before it removes any task: a
  /// std::bad_alloc leaves the queue unchanged.
  std::vector<ScheduledTask> clear();

  /// Tasks accepted and not yet removed. Exact when no call is in flight; a
  /// schedule() in flight is counted from its start and a removal until it
  /// returns. Never above max_queue_size.
  std::size_t len() const noexcept;
  bool is_empty() const noexcept;

  /// Bytes this scheduler reserved at construction.
  std::size_t memory_bytes() const noexcept;

 private:
  SchedulerConfig config_;
  std::unique_ptr<detail::SchedulerCore> core_;
};

}  // namespace tgi_gtc::scheduling
