#include <ostream>
#include <string>

#include <tgi_gtc/scheduling/task.hpp>

namespace tgi_gtc::scheduling {

std::string_view to_string(Priority p) {
  switch (p) {
    case Priority::Low: return "Low";
    case Priority::Normal: return "Normal";
    case Priority::High: return "High";
    case Priority::Critical: return "Critical";
  }
  return "Unknown";
}

std::ostream& operator<<(std::ostream& os, Priority p) { return os << to_string(p); }

namespace {
class ScheduleErrorCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "tgi_gtc::scheduling"; }
  std::string message(int ev) const override {
    switch (static_cast<ScheduleError>(ev)) {
      case ScheduleError::QueueFull: return "scheduler queue full";
      case ScheduleError::DuplicateId: return "task id already queued";
      case ScheduleError::ExceedsCapacity: return "task needs more KV blocks than the device pool holds";
      case ScheduleError::InvalidPriority: return "task priority is not Low, Normal, High or Critical";
    }
    return "unknown scheduling error";
  }
};
}  // namespace

const std::error_category& schedule_error_category() noexcept {
  static const ScheduleErrorCategory category;
  return category;
}

std::error_code make_error_code(ScheduleError e) noexcept {
  return {static_cast<int>(e), schedule_error_category()};
}

}  // namespace tgi_gtc::scheduling
