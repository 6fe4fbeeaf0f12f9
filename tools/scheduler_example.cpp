// The C++ counterpart of the original design's `cargo run --example scheduler`:
// configuration, priority order, cancellation, the queue limit, and a short
// single-thread profile of schedule, next and the two together.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>

#include <tgi_gtc/scheduling.hpp>

using namespace tgi_gtc::scheduling;

namespace {

double ns_per_op(std::chrono::steady_clock::duration d, std::size_t ops) {
  return std::chrono::duration<double, std::nano>(d).count() / static_cast<double>(ops);
}

void profile() {
  constexpr std::size_t kOps = 1'000'000;
  constexpr std::size_t kBatch = 1'000;
  Scheduler s(SchedulerConfig::with_max_queue(kBatch));
  TaskId id = 1;
  std::chrono::steady_clock::duration in{}, out{}, pair{};
  for (std::size_t done = 0; done < kOps; done += kBatch) {
    auto t0 = std::chrono::steady_clock::now();
    for (std::size_t i = 0; i < kBatch; ++i) {
      (void)s.schedule(ScheduledTask(id++, 128).with_priority(static_cast<Priority>(i % 4)));
    }
    auto t1 = std::chrono::steady_clock::now();
    for (std::size_t i = 0; i < kBatch; ++i) (void)s.next();
    auto t2 = std::chrono::steady_clock::now();
    in += t1 - t0;
    out += t2 - t1;
  }
  auto t0 = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < kOps; ++i) {
    (void)s.schedule(ScheduledTask(id++, 128).with_priority(static_cast<Priority>(i % 4)));
    (void)s.next();
  }
  pair = std::chrono::steady_clock::now() - t0;
  std::printf("  schedule        %7.1f ns  (original design's target: < 500 ns)\n", ns_per_op(in, kOps));
  std::printf("  next            %7.1f ns  (original design's target: < 200 ns)\n", ns_per_op(out, kOps));
  std::printf("  schedule + next %7.1f ns\n", ns_per_op(pair, kOps));
  std::printf("  (one thread, %zu operations each, batches of %zu; wall clock, so indicative only:\n"
              "   the benchmark suite in bench/ is the measurement)\n",
              kOps, kBatch);
}

}  // namespace

int main() {
  std::cout << "=== tgi_gtc::scheduling: scheduler example ===\n\n";

  const SchedulerConfig config{.max_queue_size = 100, .priority_scheduling = true, .enable_preemption = true};
  Scheduler scheduler(config);
  std::cout << "Configuration: max_queue_size=" << scheduler.config().max_queue_size
            << " priority_scheduling=" << std::boolalpha << scheduler.config().priority_scheduling
            << " enable_preemption=" << scheduler.config().enable_preemption << "\n\n";

  std::cout << "1. Six tasks of mixed priority, scheduled in this order:\n";
  const struct {
    Priority priority;
    std::size_t tokens;
    bool preemptible;
  } tasks[] = {{Priority::Low, 100, true},     {Priority::Normal, 250, true}, {Priority::Critical, 50, false},
               {Priority::High, 500, true},    {Priority::Normal, 120, true}, {Priority::High, 80, true}};
  for (const auto& t : tasks) {
    const ScheduledTask task =
        ScheduledTask(scheduler.next_id(), t.tokens).with_priority(t.priority).preemptible(t.preemptible);
    if (auto ec = scheduler.schedule(task)) {
      std::cout << "   rejected: " << ec.message() << "\n";
      return 1;
    }
    std::cout << "   task " << task.id << "  " << task.priority << " (" << task.estimated_tokens << " tokens"
              << (task.is_preemptible ? "" : ", not preemptible") << ")\n";
  }
  if (auto head = scheduler.peek()) std::cout << "   peek: task " << head->id << " (" << head->priority << ") is next\n";
  std::cout << "   processed in priority order, FIFO within a priority:\n";
  while (auto task = scheduler.next()) {
    std::cout << "   -> task " << task->id << "  " << task->priority << "\n";
  }

  std::cout << "\n2. Cancellation:\n";
  const TaskId keep = scheduler.next_id(), drop = scheduler.next_id();
  (void)scheduler.schedule(ScheduledTask(keep, 64));
  (void)scheduler.schedule(ScheduledTask(drop, 64).with_priority(Priority::High));
  if (auto c = scheduler.cancel(drop)) std::cout << "   cancelled task " << c->id << " (" << c->priority << ")\n";
  std::cout << "   cancel(" << drop << ") again: " << (scheduler.cancel(drop) ? "found" : "not queued") << "\n";
  std::cout << "   queue length now " << scheduler.len() << "; clear() returned " << scheduler.clear().size()
            << " task(s)\n";

  std::cout << "\n3. Queue limit (max_queue_size = 3):\n";
  Scheduler small(SchedulerConfig::with_max_queue(3));
  for (TaskId id = 1; id <= 4; ++id) {
    const std::error_code ec = small.schedule(ScheduledTask(id, 10));
    std::cout << "   schedule task " << id << ": " << (ec ? "rejected: " + ec.message() : std::string("ok")) << "\n";
  }
  (void)small.next();
  std::cout << "   after one next(), task 2 again: " << small.schedule(ScheduledTask(2, 10)).message() << "\n";

  std::cout << "\n4. Profile:\n";
  profile();
  return 0;
}
