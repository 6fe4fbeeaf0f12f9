#include "simulation.hpp"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <stdexcept>

#include <tgi_gtc/scheduling/engine.hpp>

namespace tgi_gtc::sim {

namespace {

using scheduling::Engine;
using scheduling::ScheduledTask;
using scheduling::ScheduleError;
using scheduling::TaskId;

enum class State : std::uint8_t { Pending, Waiting, Running, Paused, Done, Rejected };

struct Live {
  State state = State::Pending;
  bool recompute = false;     // paused with its KV released
  bool stalled = false;       // its last token found no KV block
  std::uint32_t generated = 0;
  Nanos arrival = 0;
  Nanos first_token = -1;
};

// A guard against an engine that keeps moving tasks without running any.
constexpr std::uint64_t kMaxIdleSteps = 100'000;

// Task ids are trace positions + 1 (0 is never used by the library's Scheduler either).
TaskId task_id(std::size_t index) { return static_cast<TaskId>(index) + 1; }

class Run {
 public:
  Run(std::span<const Request> requests, Policy policy, const ServerConfig& server, const CostModel& cost,
      const ProgressFn& progress)
      : requests_(requests),
        server_(server),
        cost_(cost),
        progress_(progress),
        engine_(engine_config(policy, server)),
        live_(requests.size()) {
    result_.policy = policy;
    for (std::size_t i = 0; i < requests.size(); ++i) {
      live_[i].arrival = ms_to_nanos(requests[i].arrival_ms);
      if (i == 0) start_ = now_ = live_[i].arrival;
      if (i > 0 && live_[i].arrival < live_[i - 1].arrival) {
        throw std::invalid_argument("simulate: requests must be sorted by arrival");
      }
      ++cls(i).requests;
    }
  }

  PolicyResult run() {
    while (resolved_ < requests_.size()) {
      // An idle GPU waits for the next arrival, unless the loop holds an
      // evicted task: that one goes back at once (the queue has room now).
      if (running_.empty() && engine_idle() && evicted_.empty() && next_ < requests_.size()) {
        now_ = std::max(now_, live_[next_].arrival);
      }
      resubmit_evicted();
      submit_arrivals();
      if (resolved_ == requests_.size()) break;  // the last arrivals were all rejected

      const auto& plan = engine_.step();
      ++result_.steps;
      std::uint64_t prefill = 0, copied = 0, prefilling = 0;
      for (const auto& p : plan.preempted) {
        const std::size_t i = index(p.task.id);
        live_[i].state = State::Paused;
        live_[i].recompute = p.recompute;
        ++cls(i).preemptions;
        cls(i).swapped_blocks += p.swap_out.size();
        copied += p.swap_out.size();
      }
      if (!plan.preempted.empty()) {
        std::erase_if(running_, [&](std::size_t i) { return live_[i].state != State::Running; });
      }
      for (const auto& r : plan.resumed) {
        const std::size_t i = index(r.task.id);
        Live& l = live_[i];
        l.state = State::Running;
        l.stalled = false;  // resumed with blocks for all its tokens
        cls(i).swapped_blocks += r.swap_in.size();
        copied += r.swap_in.size();
        if (l.recompute) {
          // The released KV is rebuilt by prefilling prompt and generated tokens again.
          const std::uint64_t tokens = std::uint64_t{requests_[i].prompt_tokens} + l.generated;
          cls(i).recomputed_tokens += tokens;
          prefill += tokens;
          ++prefilling;
          l.recompute = false;
        }
        running_.push_back(i);
      }
      for (const auto& a : plan.admitted) {
        const std::size_t i = index(a.task.id);
        live_[i].state = State::Running;
        prefill += a.task.estimated_tokens;
        // An evicted task comes back with its tokens so far: all recomputed.
        if (live_[i].generated > 0) cls(i).recomputed_tokens += a.task.estimated_tokens;
        ++prefilling;
        running_.push_back(i);
      }
      const auto stats = engine_.stats();
      result_.peak_waiting = std::max(result_.peak_waiting, stats.waiting);

      if (running_.empty()) {
        // Nothing to compute: the GPU idles until the next arrival.
        if (next_ < requests_.size()) {
          now_ = std::max(now_, live_[next_].arrival);
          continue;
        }
        fail("no task can run and none will arrive: " + std::to_string(stats.waiting) + " waiting, " +
             std::to_string(stats.paused) + " paused, " + std::to_string(evicted_.size()) +
             " evicted and not yet resubmitted");
        break;
      }

      // A task whose last token found no block runs again only once step()
      // has given it one; until then it is stalled and costs nothing.
      std::uint64_t ready = 0;
      for (const std::size_t i : running_) {
        Live& l = live_[i];
        if (l.stalled && engine_.block_table(task_id(i)).size() * server_.block_size >= tokens(i)) l.stalled = false;
        ready += l.stalled ? 0 : 1;
      }
      const bool moved = !plan.preempted.empty() || !plan.resumed.empty() || !plan.admitted.empty();
      if (ready == 0 && !moved) {
        // Every running task is stalled on a full pool and step() found no
        // victim (preemption off, or only non-preemptible tasks left): no
        // block will ever be freed. The serving loop breaks the deadlock.
        evict();
        continue;
      }
      idle_steps_ = ready == 0 ? idle_steps_ + 1 : 0;
      if (idle_steps_ > kMaxIdleSteps) {
        fail("no task has produced a token for " + std::to_string(kMaxIdleSteps) + " steps");
        break;
      }

      const std::uint64_t decoding = ready - prefilling;
      const Nanos duration = cost_.step(prefill, decoding, copied);
      if (duration > kMaxNanos - now_) {
        fail("the simulated clock would pass " + std::to_string(static_cast<long long>(kMaxTimeMs)) +
             " ms: the cost model makes steps too long for the trace");
        break;
      }
      now_ += duration;
      result_.busy += duration;
      result_.prefill_time += cost_.step(prefill, 0, 0) - cost_.step(0, 0, 0);
      result_.decode_time += cost_.step(0, decoding, 0) - cost_.step(0, 0, 0);
      result_.swap_time += cost_.step(0, 0, copied) - cost_.step(0, 0, 0);
      const std::uint32_t used = server_.device_blocks - stats.device_free_blocks;
      kv_block_time_ += static_cast<long double>(used) * static_cast<long double>(duration);

      decode_all();
      if (result_.steps % 256 == 0 && progress_) progress_(resolved_, requests_.size());
    }
    finish_stats();
    if (progress_) progress_(resolved_, requests_.size());
    return std::move(result_);
  }

 private:
  ClassStats& cls(std::size_t i) { return result_.by_priority[scheduling::value(requests_[i].priority)]; }

  std::size_t index(TaskId id) const {
    if (id == 0 || id > requests_.size()) throw std::logic_error("engine returned an unknown task id");
    return static_cast<std::size_t>(id - 1);
  }

  bool engine_idle() const {
    const auto s = engine_.stats();
    return s.waiting == 0 && s.paused == 0 && s.running == 0;
  }

  void submit_arrivals() {
    for (; next_ < requests_.size() && live_[next_].arrival <= now_; ++next_) {
      const Request& r = requests_[next_];
      // The Engine sizes a task by its prompt; the whole request must fit too,
      // or it would stall forever once its output outgrew the pool.
      if (std::uint64_t{r.prompt_tokens} + r.output_tokens > server_.device_tokens()) {
        reject(next_, /*queue_full=*/false);
        continue;
      }
      const auto task =
          ScheduledTask(task_id(next_), r.prompt_tokens).with_priority(r.priority).preemptible(r.preemptible);
      const std::error_code ec = engine_.submit(task);
      if (!ec) {
        live_[next_].state = State::Waiting;
      } else if (ec == ScheduleError::QueueFull) {
        reject(next_, true);
      } else if (ec == ScheduleError::ExceedsCapacity) {
        reject(next_, false);
      } else {
        throw std::logic_error("Engine::submit: " + ec.message());
      }
    }
  }

  void reject(std::size_t i, bool queue_full) {
    live_[i].state = State::Rejected;
    ++(queue_full ? cls(i).rejected_queue_full : cls(i).rejected_too_large);
    ++resolved_;
  }

  // Submits the evicted tasks that found the waiting queue full, oldest
  // eviction first, until one finds it full again. They were accepted
  // already: the serving loop keeps them, it does not reject them.
  void resubmit_evicted() {
    while (!evicted_.empty()) {
      if (!submit_evicted(evicted_.front())) return;
      evicted_.pop_front();
    }
  }

  // false: the waiting queue is full.
  bool submit_evicted(std::size_t i) {
    const Request& r = requests_[i];
    const auto task = ScheduledTask(task_id(i), tokens(i)).with_priority(r.priority).preemptible(r.preemptible);
    const std::error_code ec = engine_.submit(task);
    if (ec == ScheduleError::QueueFull) return false;
    if (ec) throw std::logic_error("Engine::submit of an evicted task: " + ec.message());
    return true;
  }

  // Cancels one running task and submits it again with its tokens so far, as
  // a serving loop must when the engine cannot free a block: the one that
  // loses least, i.e. preemptible before not, lowest priority first (with
  // priority scheduling on), newest admission first. If the waiting queue is
  // full the loop holds the task and submits it again before any new
  // arrival (resubmit_evicted).
  void evict() {
    const bool by_priority = engine_.config().scheduler.priority_scheduling;
    const auto rank = [&](std::size_t i) {
      const Request& r = requests_[i];
      return std::pair{r.preemptible ? 0 : 1, by_priority ? scheduling::value(r.priority) : 0};
    };
    auto victim = running_.rbegin();
    for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
      if (rank(*it) < rank(*victim)) victim = it;
    }
    const std::size_t i = *victim;
    running_.erase(std::next(victim).base());
    if (!engine_.cancel(task_id(i))) throw std::logic_error("Engine::cancel refused a running task");
    Live& l = live_[i];
    l.stalled = false;
    l.state = State::Waiting;
    ++cls(i).evictions;
    if (!evicted_.empty() || !submit_evicted(i)) evicted_.push_back(i);
  }

  std::uint64_t tokens(std::size_t i) const { return std::uint64_t{requests_[i].prompt_tokens} + live_[i].generated; }

  // One token for every running task that is not stalled.
  void decode_all() {
    bool finished = false;
    for (const std::size_t i : running_) {
      Live& l = live_[i];
      if (l.stalled) {
        ++result_.stalled_task_steps;
        continue;
      }
      // Admission's prefill produced the first token: TTFT ends with this step.
      if (l.first_token < 0) l.first_token = now_;
      ++l.generated;
      ++cls(i).output_tokens;
      // A false return still records the token; the next step() looks for its block.
      if (!engine_.append_tokens(task_id(i), 1)) {
        l.stalled = true;
        ++result_.stalled_appends;
      }
      if (l.generated < requests_[i].output_tokens) continue;
      engine_.finish(task_id(i));
      l.state = State::Done;
      ClassStats& c = cls(i);
      ++c.completed;
      c.ttft_ms.push_back(nanos_to_ms(l.first_token - l.arrival));
      c.e2e_ms.push_back(nanos_to_ms(now_ - l.arrival));
      result_.makespan = std::max(result_.makespan, now_ - start_);
      ++resolved_;
      finished = true;
    }
    if (finished) std::erase_if(running_, [&](std::size_t i) { return live_[i].state == State::Done; });
  }

  void fail(std::string why) {
    result_.failure = "at t=" + std::to_string(nanos_to_ms(now_) / 1000.0) + " s: " + why;
  }

  void finish_stats() {
    // A run that failed ends where it stopped; otherwise at the last
    // completion (the clock may have moved on to arrivals that were all
    // rejected).
    if (!result_.failure.empty()) result_.makespan = std::max(result_.makespan, now_ - start_);
    for (ClassStats& c : result_.by_priority) {
      std::sort(c.ttft_ms.begin(), c.ttft_ms.end());
      std::sort(c.e2e_ms.begin(), c.e2e_ms.end());
    }
    if (result_.makespan > 0) {
      result_.kv_utilization = static_cast<double>(
          kv_block_time_ / (static_cast<long double>(server_.device_blocks) * result_.makespan));
    }
  }

  std::span<const Request> requests_;
  ServerConfig server_;
  CostModel cost_;
  const ProgressFn& progress_;
  Engine engine_;
  std::vector<Live> live_;
  std::vector<std::size_t> running_;  // admission order; deterministic
  std::size_t next_ = 0;              // first request not yet submitted
  std::size_t resolved_ = 0;          // completed or rejected
  std::uint64_t idle_steps_ = 0;      // consecutive steps in which no task decoded
  std::deque<std::size_t> evicted_;  // evicted tasks the full waiting queue refused, oldest first
  Nanos start_ = 0;                   // the first arrival
  Nanos now_ = 0;
  long double kv_block_time_ = 0;     // sum of blocks in use x step duration
  PolicyResult result_;
};

}  // namespace

std::uint64_t PolicyResult::output_tokens() const {
  std::uint64_t n = 0;
  for (const auto& c : by_priority) n += c.output_tokens;
  return n;
}

double PolicyResult::output_tokens_per_s() const {
  return makespan > 0 ? static_cast<double>(output_tokens()) / (nanos_to_ms(makespan) / 1000.0) : 0.0;
}

PolicyResult simulate(std::span<const Request> requests, Policy policy, const ServerConfig& server,
                      const CostModel& cost, const ProgressFn& progress) {
  return Run(requests, policy, server, cost, progress).run();
}

double percentile(std::span<const double> sorted, double p) {
  if (sorted.empty()) return std::numeric_limits<double>::quiet_NaN();
  // p% of n, less a rounding allowance: 7% of 100 is 7.000000000000001 in
  // binary floating point, and its ceiling would pick the 8th value.
  const double rank = std::ceil(p * static_cast<double>(sorted.size()) / 100.0 - 1e-9);
  const auto i = static_cast<std::size_t>(std::clamp(rank, 1.0, static_cast<double>(sorted.size())));
  return sorted[i - 1];
}

}  // namespace tgi_gtc::sim
