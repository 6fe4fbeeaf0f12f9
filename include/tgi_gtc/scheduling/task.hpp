// Value types shared by every component: priorities, tasks, configuration, errors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <string_view>
#include <system_error>

namespace tgi_gtc::scheduling {

/// Request priority. The built-in comparisons order them: Critical > High > Normal > Low.
enum class Priority : std::uint8_t { Low = 0, Normal = 1, High = 2, Critical = 3 };

/// Number of priority levels.
inline constexpr std::size_t kPriorityCount = 4;

constexpr std::uint8_t value(Priority p) { return static_cast<std::uint8_t>(p); }

/// "Low", "Normal", "High" or "Critical" ("Unknown" for a value outside the enum).
std::string_view to_string(Priority p);
std::ostream& operator<<(std::ostream& os, Priority p);

using TaskId = std::uint64_t;

/// A task waiting to be served. A plain value: copying it copies the task.
struct ScheduledTask {
  TaskId id;
  Priority priority;
  std::size_t estimated_tokens;
  bool is_preemptible;

  /// Priority Normal, preemptible.
  ScheduledTask(TaskId id_, std::size_t estimated_tokens_)
      : id(id_), priority(Priority::Normal), estimated_tokens(estimated_tokens_), is_preemptible(true) {}

  [[nodiscard]] ScheduledTask with_priority(Priority p) const {
    ScheduledTask t = *this;
    t.priority = p;
    return t;
  }
  [[nodiscard]] ScheduledTask preemptible(bool yes) const {
    ScheduledTask t = *this;
    t.is_preemptible = yes;
    return t;
  }

  friend bool operator==(const ScheduledTask&, const ScheduledTask&) = default;
};

struct SchedulerConfig {
  /// Most tasks queued at once; schedule() fails with QueueFull at this count.
  std::size_t max_queue_size = 1000;
  /// true: highest priority first, FIFO within a priority. false: FIFO over all tasks.
  bool priority_scheduling = true;
  /// Read by the Engine: may a waiting task pause a running lower-priority one.
  bool enable_preemption = true;

  static SchedulerConfig with_max_queue(std::size_t max_queue_size) {
    SchedulerConfig c;
    c.max_queue_size = max_queue_size;
    return c;
  }
};

enum class ScheduleError {
  QueueFull = 1,        ///< "scheduler queue full"
  DuplicateId = 2,      ///< "task id already queued"
  ExceedsCapacity = 3,  ///< "task needs more KV blocks than the device pool holds" (Engine::submit)
  InvalidPriority = 4,  ///< "task priority is not Low, Normal, High or Critical" (a value cast from an integer)
};

const std::error_category& schedule_error_category() noexcept;
std::error_code make_error_code(ScheduleError e) noexcept;

}  // namespace tgi_gtc::scheduling

template <>
struct std::is_error_code_enum<tgi_gtc::scheduling::ScheduleError> : std::true_type {};
