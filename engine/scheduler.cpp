// TEMPORARY mutex placeholder so other components can build while the lock-free
// core is written; replaced before anything lands.
#include <algorithm>
#include <atomic>
#include <deque>
#include <mutex>
#include <stdexcept>

#include <tgi_gtc/scheduling/scheduler.hpp>

namespace tgi_gtc::scheduling {
namespace detail {
class SchedulerCore {
 public:
  std::mutex mu;
  std::deque<ScheduledTask> q;
  std::atomic<TaskId> ids{1};
};
}  // namespace detail

Scheduler::Scheduler() : Scheduler(SchedulerConfig{}) {}
Scheduler::Scheduler(SchedulerConfig c) : config_(c), core_(std::make_unique<detail::SchedulerCore>()) {
  if (c.max_queue_size == 0 || c.max_queue_size > kMaxQueueSize) throw std::invalid_argument("max_queue_size");
}
Scheduler::~Scheduler() = default;
const SchedulerConfig& Scheduler::config() const noexcept { return config_; }
TaskId Scheduler::next_id() noexcept { return core_->ids.fetch_add(1); }
std::error_code Scheduler::schedule(const ScheduledTask& t) noexcept {
  std::lock_guard g(core_->mu);
  auto& q = core_->q;
  if (q.size() >= config_.max_queue_size) return ScheduleError::QueueFull;
  for (auto& x : q) if (x.id == t.id) return ScheduleError::DuplicateId;
  auto it = q.end();
  if (config_.priority_scheduling)
    it = std::find_if(q.begin(), q.end(), [&](const ScheduledTask& x) { return x.priority < t.priority; });
  q.insert(it, t);
  return {};
}
std::optional<ScheduledTask> Scheduler::next() noexcept {
  std::lock_guard g(core_->mu);
  if (core_->q.empty()) return std::nullopt;
  auto t = core_->q.front();
  core_->q.pop_front();
  return t;
}
std::optional<ScheduledTask> Scheduler::peek() const noexcept {
  std::lock_guard g(core_->mu);
  if (core_->q.empty()) return std::nullopt;
  return core_->q.front();
}
std::optional<ScheduledTask> Scheduler::cancel(TaskId id) noexcept {
  std::lock_guard g(core_->mu);
  auto& q = core_->q;
  auto it = std::find_if(q.begin(), q.end(), [&](const ScheduledTask& x) { return x.id == id; });
  if (it == q.end()) return std::nullopt;
  auto t = *it;
  q.erase(it);
  return t;
}
std::vector<ScheduledTask> Scheduler::clear() {
  std::lock_guard g(core_->mu);
  std::vector<ScheduledTask> v(core_->q.begin(), core_->q.end());
  core_->q.clear();
  return v;
}
std::size_t Scheduler::len() const noexcept {
  std::lock_guard g(core_->mu);
  return core_->q.size();
}
bool Scheduler::is_empty() const noexcept { return len() == 0; }
std::size_t Scheduler::memory_bytes() const noexcept { return sizeof(*core_); }
}  // namespace tgi_gtc::scheduling
