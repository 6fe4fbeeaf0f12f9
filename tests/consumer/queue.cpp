#include <tgi_gtc/scheduling.hpp>

// A task scheduled High comes back from next() with its priority.
bool high_round_trip() {
  using namespace tgi_gtc::scheduling;
  Scheduler s(SchedulerConfig::with_max_queue(4));
  if (s.schedule(ScheduledTask(s.next_id(), 10).with_priority(Priority::High))) return false;
  auto t = s.next();
  return t && t->priority == Priority::High;
}
