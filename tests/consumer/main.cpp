#include <tgi_gtc/scheduling.hpp>

int main() {
  using namespace tgi_gtc::scheduling;
  Scheduler s(SchedulerConfig::with_max_queue(4));
  if (s.schedule(ScheduledTask(s.next_id(), 10).with_priority(Priority::High))) return 1;
  auto t = s.next();
  return t && t->priority == Priority::High ? 0 : 2;
}
