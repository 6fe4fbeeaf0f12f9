// Engine::step() with 256 running and 10,000 waiting tasks, on one thread
// (step is the serving loop's call):
//   step_no_change  nothing can be admitted (max_running reached), nothing
//                   finishes: the cost of a step that decides nothing changes
//   step_admit32    before each timed step 32 running tasks finish and 32 new
//                   ones are submitted (untimed): the step admits exactly 32
// Every step is timed on its own; the counters are the median, p99 and max
// over the steps of one repetition. All tasks are Normal priority with
// preemption enabled, so the preemption check runs and finds no victim.
#include <algorithm>
#include <deque>
#include <string>
#include <vector>

#include <tgi_gtc/scheduling/engine.hpp>

#include "harness.hpp"

namespace tgi_bench {
namespace {

constexpr std::uint32_t kRunning = 256;
constexpr std::size_t kWaiting = 10000;
constexpr std::size_t kTokens = 128;  // 8 blocks of 16: 256 running hold 2,048 of 8,192 blocks
constexpr std::size_t kAdmit = 32;

sched::EngineConfig engine_config() {
  return sched::EngineConfig{
      .scheduler =
          sched::SchedulerConfig{.max_queue_size = 16384, .priority_scheduling = true, .enable_preemption = true},
      .device_blocks = 8192,
      .host_blocks = 2048,
      .block_size = 16,
      .max_running = kRunning,
      .max_step_tokens = 8192,
  };
}

/// 256 running (admitted by the first steps), 10,000 waiting.
/// Returns the running ids in admission order, or an error message.
std::string fill(sched::Engine& engine, sched::TaskId& next_id, std::deque<sched::TaskId>& running) {
  for (std::size_t i = 0; i < kRunning + kWaiting; ++i) {
    if (engine.submit(sched::ScheduledTask(next_id++, kTokens))) return "submit refused a task while filling";
  }
  for (int guard = 0; running.size() < kRunning && guard < 1000; ++guard) {
    const sched::StepPlan& plan = engine.step();
    if (!plan.preempted.empty() || !plan.resumed.empty()) return "unexpected preemption while filling";
    for (const auto& a : plan.admitted) running.push_back(a.task.id);
  }
  if (running.size() != kRunning) return "the engine did not reach 256 running tasks";
  if (engine.stats().waiting != kWaiting) return "waiting count is not 10,000 after filling";
  return {};
}

void report_samples(benchmark::State& state, std::vector<std::uint64_t>& samples, std::uint64_t allocs) {
  std::sort(samples.begin(), samples.end());
  const auto at = [&](double q) {
    const auto i = static_cast<std::size_t>(q * static_cast<double>(samples.size() - 1));
    return ticks_to_ns(static_cast<double>(samples[i]));
  };
  state.counters["median_ns"] = at(0.5);
  state.counters["p99_ns"] = at(0.99);
  state.counters["max_ns"] = ticks_to_ns(static_cast<double>(samples.back()));
  state.counters["samples"] = static_cast<double>(samples.size());
  state.counters["allocs_per_step"] = static_cast<double>(allocs) / static_cast<double>(samples.size());
}

void step_no_change(benchmark::State& state) {
  constexpr std::size_t kSteps = 5000;
  for (auto _ : state) {
    sched::Engine engine(engine_config());
    sched::TaskId next_id = 1;
    std::deque<sched::TaskId> running;
    static std::string error;  // outlives the run for the library's report
    if (error = fill(engine, next_id, running); !error.empty()) {
      state.SkipWithError(error.c_str());
      return;
    }
    std::vector<std::uint64_t> samples(kSteps);
    engine.step();  // warm: the plan's vectors reach their size
    const AllocStats before = thread_alloc_stats();
    bool changed = false;
    for (std::size_t i = 0; i < kSteps; ++i) {
      const std::uint64_t t0 = latency_stamp();
      const sched::StepPlan& plan = engine.step();
      samples[i] = latency_stamp() - t0;
      changed |= !plan.admitted.empty() || !plan.preempted.empty() || !plan.resumed.empty();
    }
    const std::uint64_t allocs = thread_alloc_stats().allocs - before.allocs;
    if (changed) {
      state.SkipWithError("a step with nothing to do changed the running set");
      return;
    }
    report_samples(state, samples, allocs);
  }
}

void step_admit32(benchmark::State& state) {
  constexpr std::size_t kSteps = 2000;
  for (auto _ : state) {
    sched::Engine engine(engine_config());
    sched::TaskId next_id = 1;
    std::deque<sched::TaskId> running;
    static std::string error;  // outlives the run for the library's report
    if (error = fill(engine, next_id, running); !error.empty()) {
      state.SkipWithError(error.c_str());
      return;
    }
    std::vector<std::uint64_t> samples;
    samples.reserve(kSteps);
    std::uint64_t allocs = 0;
    for (std::size_t i = 0; i < kSteps + 1; ++i) {
      for (std::size_t k = 0; k < kAdmit; ++k) {  // untimed: make room, keep 10,000 waiting
        engine.finish(running.front());
        running.pop_front();
        if (engine.submit(sched::ScheduledTask(next_id++, kTokens))) {
          state.SkipWithError("submit refused a task");
          return;
        }
      }
      const AllocStats before = thread_alloc_stats();
      const std::uint64_t t0 = latency_stamp();
      const sched::StepPlan& plan = engine.step();
      const std::uint64_t t = latency_stamp() - t0;
      if (i > 0) {  // the first step sizes the plan's vectors
        samples.push_back(t);
        allocs += thread_alloc_stats().allocs - before.allocs;
      }
      if (plan.admitted.size() != kAdmit || !plan.preempted.empty() || !plan.resumed.empty()) {
        static std::string error;  // outlives the run for the library's report
        error = "a step admitted " + std::to_string(plan.admitted.size()) + " tasks, expected 32";
        state.SkipWithError(error.c_str());
        return;
      }
      for (const auto& a : plan.admitted) running.push_back(a.task.id);
    }
    report_samples(state, samples, allocs);
  }
}

}  // namespace

void register_engine_benchmarks() {
  benchmark::RegisterBenchmark("engine/step_no_change/tput", &step_no_change)->Iterations(1);
  benchmark::RegisterBenchmark("engine/step_admit32/tput", &step_admit32)->Iterations(1);
}

}  // namespace tgi_bench
