// Target selection, mixes, the violation collector, the progress line and the
// epoch driver shared by every target.
#include "driver.hpp"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <iomanip>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace tgi_gtc::stress {

namespace {
struct TargetName {
  Target target;
  std::string_view name;
};
constexpr TargetName kTargets[] = {
    {Target::Scheduler, "scheduler"},
    {Target::Pool, "pool"},
    {Target::Engine, "engine"},
    {Target::BrokenMoodycamel, "broken-moodycamel"},
    {Target::BrokenDropping, "broken-dropping"},
    {Target::BrokenDuplicates, "broken-duplicates"},
    {Target::BrokenFull, "broken-full"},
    {Target::BrokenClear, "broken-clear"},
    {Target::BrokenLen, "broken-len"},
    {Target::BrokenLenDip, "broken-len-dip"},
    {Target::BrokenLenEarly, "broken-len-early"},
    {Target::BrokenEmpty, "broken-empty"},
    {Target::BrokenPool, "broken-pool"},
    {Target::BrokenPoolOrder, "broken-pool-order"},
    {Target::BrokenPoolBits, "broken-pool-bits"},
    {Target::BrokenPoolRefusing, "broken-pool-refusing"},
    {Target::BrokenEngine, "broken-engine"},
    {Target::BrokenEngineOrder, "broken-engine-order"},
    {Target::BrokenEngineFull, "broken-engine-full"},
};
}  // namespace

bool is_scheduler_target(Target t) { return default_mix(t).front().first == "schedule"; }

std::string_view to_string(Target t) {
  for (const auto& n : kTargets) {
    if (n.target == t) return n.name;
  }
  return "unknown";
}

std::optional<Target> parse_target(std::string_view name) {
  for (const auto& n : kTargets) {
    if (n.name == name) return n.target;
  }
  return std::nullopt;
}

std::vector<Target> available_targets() {
  std::vector<Target> out{Target::Scheduler, Target::Pool};
#if TGI_STRESS_HAS_ENGINE
  out.push_back(Target::Engine);
#endif
  out.push_back(Target::BrokenMoodycamel);
  out.push_back(Target::BrokenDropping);
  out.push_back(Target::BrokenDuplicates);
  out.push_back(Target::BrokenFull);
  out.push_back(Target::BrokenClear);
  out.push_back(Target::BrokenLen);
  out.push_back(Target::BrokenLenDip);
  out.push_back(Target::BrokenLenEarly);
  out.push_back(Target::BrokenEmpty);
  out.push_back(Target::BrokenPool);
  out.push_back(Target::BrokenPoolOrder);
  out.push_back(Target::BrokenPoolBits);
  out.push_back(Target::BrokenPoolRefusing);
#if TGI_STRESS_HAS_ENGINE
  out.push_back(Target::BrokenEngine);
  out.push_back(Target::BrokenEngineOrder);
  out.push_back(Target::BrokenEngineFull);
#endif
  return out;
}

Mix default_mix(Target t) {
  switch (t) {
    case Target::Scheduler:
    case Target::BrokenMoodycamel:
    case Target::BrokenDropping:
    case Target::BrokenDuplicates:
    case Target::BrokenFull:
    case Target::BrokenClear:
    case Target::BrokenLen:
    case Target::BrokenLenDip:
    case Target::BrokenLenEarly:
    case Target::BrokenEmpty:
      return {{"schedule", 40}, {"next", 30}, {"peek", 10}, {"cancel", 15}, {"clear", 1}};
    case Target::Pool:
    case Target::BrokenPool:
    case Target::BrokenPoolOrder:
    case Target::BrokenPoolBits:
    case Target::BrokenPoolRefusing:
      return {{"allocate", 40}, {"share", 20}, {"release", 40}};
    case Target::Engine:
    case Target::BrokenEngine:
    case Target::BrokenEngineOrder:
    case Target::BrokenEngineFull:
      return {{"submit", 30}, {"cancel", 5}, {"step", 30}, {"append", 30}, {"finish", 5}};
  }
  return {};
}

Mix parse_mix(Target t, std::string_view text) {
  Mix mix = default_mix(t);
  for (auto& [name, w] : mix) w = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t comma = text.find(',', pos);
    if (comma == std::string_view::npos) comma = text.size();
    const std::string_view item = text.substr(pos, comma - pos);
    pos = comma + 1;
    if (item.empty()) continue;
    const std::size_t eq = item.find('=');
    if (eq == std::string_view::npos) throw std::invalid_argument("mix item '" + std::string(item) + "' is not op=weight");
    const std::string_view op = item.substr(0, eq), num = item.substr(eq + 1);
    unsigned weight = 0;
    const auto [end, ec] = std::from_chars(num.data(), num.data() + num.size(), weight);
    if (ec != std::errc() || end != num.data() + num.size() || weight > 1'000'000) {
      throw std::invalid_argument("mix weight '" + std::string(num) + "' is not a number up to 1000000");
    }
    auto it = std::find_if(mix.begin(), mix.end(), [&](const auto& m) { return m.first == op; });
    if (it == mix.end()) {
      std::string known;
      for (const auto& m : mix) known += (known.empty() ? "" : ", ") + m.first;
      throw std::invalid_argument("target " + std::string(to_string(t)) + " has no op '" + std::string(op) + "' (ops: " + known + ")");
    }
    it->second = weight;
  }
  bool any = false;
  for (const auto& m : mix) any = any || m.second > 0;
  if (!any) throw std::invalid_argument("the mix gives every op weight 0");
  return mix;
}

std::uint64_t Report::stat(std::string_view name) const {
  for (const auto& [n, v] : stats) {
    if (n == name) return v;
  }
  return 0;
}

Report run(Config config) {
  if (config.threads == 0 || config.threads > 1024) throw std::invalid_argument("threads must be 1..1024");
  if (!(config.seconds >= 0)) throw std::invalid_argument("seconds must not be negative");
  if (!(config.stall_seconds >= 0)) throw std::invalid_argument("stall_seconds must not be negative");
  if (config.seconds == 0 && config.ops == 0) throw std::invalid_argument("give a duration or an operation count");
  if (config.max_events < 64) throw std::invalid_argument("max_events must be at least 64");
  if (config.drop_every == 0) throw std::invalid_argument("drop_every must be positive");
  if (config.reuse_ids != 0) {
    if (!is_scheduler_target(config.target)) {
      throw std::invalid_argument("reuse_ids applies to the scheduler targets only");
    }
    if (config.reuse_ids > (std::size_t{1} << 20)) throw std::invalid_argument("reuse_ids must be at most 1048576");
  }
  if (config.mix.empty()) config.mix = default_mix(config.target);
  if (config.mix.size() != default_mix(config.target).size()) throw std::invalid_argument("the mix does not match the target's ops");
  Report r;
  switch (config.target) {
    case Target::Scheduler:
    case Target::BrokenMoodycamel:
    case Target::BrokenDropping:
    case Target::BrokenDuplicates:
    case Target::BrokenFull:
    case Target::BrokenClear:
    case Target::BrokenLen:
    case Target::BrokenLenDip:
    case Target::BrokenLenEarly:
    case Target::BrokenEmpty:
      if (config.capacity == 0) config.capacity = 1024;
      r.config = config;
      detail::run_scheduler_target(config, r);
      break;
    case Target::Pool:
    case Target::BrokenPool:
    case Target::BrokenPoolOrder:
    case Target::BrokenPoolBits:
    case Target::BrokenPoolRefusing:
      if (config.capacity == 0) config.capacity = 1024;
      r.config = config;
      detail::run_pool_target(config, r);
      break;
    case Target::Engine:
    case Target::BrokenEngine:
    case Target::BrokenEngineOrder:
    case Target::BrokenEngineFull:
      if (config.capacity == 0) config.capacity = 256;
      r.config = config;
      detail::run_engine_target(config, r);
      break;
  }
  r.config.progress_stream = nullptr;
  return r;
}

namespace detail {

void Collector::add(Violation v, bool counted) {
  std::lock_guard lock(mutex_);
  if (counted) {
    ++counts_[v.kind];
    total_.fetch_add(1, std::memory_order::relaxed);  // relaxed: read by any() as a hint; the barrier publishes the rest
  }
  auto& list = kept_[v.kind];
  if (list.size() < max_per_kind_) {
    list.push_back(std::move(v));
    return;
  }
  if (max_per_kind_ == 0) return;
  auto latest = std::max_element(list.begin(), list.end(), [](const Violation& a, const Violation& b) { return a.at < b.at; });
  if (v.at < latest->at) *latest = std::move(v);
}

void Collector::add_count(const std::string& kind, std::uint64_t n) {
  std::lock_guard lock(mutex_);
  counts_[kind] += n;
  total_.fetch_add(n, std::memory_order::relaxed);  // relaxed: as in add()
}

void Collector::finish(Report& r) const {
  std::lock_guard lock(mutex_);
  r.violations.clear();
  for (const auto& [kind, list] : kept_) r.violations.insert(r.violations.end(), list.begin(), list.end());
  // Earliest first; at the same moment, one that names ids first.
  std::stable_sort(r.violations.begin(), r.violations.end(), [](const Violation& a, const Violation& b) {
    return a.at != b.at ? a.at < b.at : !a.ids.empty() && b.ids.empty();
  });
  r.violation_counts.assign(counts_.begin(), counts_.end());
}

Violation make_violation(std::string kind, std::string detail, std::vector<std::uint64_t> ids, std::vector<CallRef> calls) {
  Violation v{std::move(kind), std::move(detail), std::move(ids), std::move(calls), 0};
  for (const auto& c : v.calls) v.at = std::max(v.at, c.end);
  return v;
}

void Progress::update(double seconds, std::uint64_t ops, std::size_t epoch, std::uint64_t violations) {
  if (!out_ || seconds - last_t_ < 0.5) return;
  const double rate = static_cast<double>(ops - last_ops_) / (seconds - last_t_);
  char line[160];
  std::snprintf(line, sizeof line, "\r[%7.1fs] %8.3f Mops/s  %12llu ops  epoch %zu  violations %llu ", seconds, rate / 1e6,
                static_cast<unsigned long long>(ops), epoch, static_cast<unsigned long long>(violations));
  *out_ << line << std::flush;
  printed_ = true;
  last_t_ = seconds;
  last_ops_ = ops;
}

void Progress::finish() {
  if (out_ && printed_) *out_ << "\r\033[K" << std::flush;  // erase the line
}

void sum_ops(Report& r, const Mix& mix, const std::vector<OpCounts>& counts) {
  r.ops.clear();
  for (std::size_t k = 0; k < mix.size(); ++k) {
    OpStats s{mix[k].first, 0, 0};
    for (const auto& c : counts) {
      s.calls += c.calls[k];
      s.ok += c.ok[k];
    }
    r.ops.push_back(s);
  }
}

Watchdog::Watchdog(const Config& cfg)
    : stall_seconds_(cfg.stall_seconds), seed_(cfg.seed), progress_line_(cfg.progress && cfg.progress_stream != nullptr) {
  if (stall_seconds_ > 0) thread_ = std::thread([this] { watch(); });
}

Watchdog::~Watchdog() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard lock(mutex_);
    quit_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void Watchdog::arm(std::function<std::uint64_t()> progress, std::function<std::string()> describe) {
  if (!thread_.joinable()) return;
  {
    std::lock_guard lock(mutex_);
    progress_ = std::move(progress);
    describe_ = std::move(describe);
    armed_ = true;
    ++generation_;
  }
  wake_.notify_all();  // restarts the watch with the new progress
}

void Watchdog::disarm() {
  if (!thread_.joinable()) return;
  std::lock_guard lock(mutex_);
  armed_ = false;
}

void Watchdog::watch() {
  using Clock = std::chrono::steady_clock;
  std::unique_lock lock(mutex_);
  std::uint64_t watching = 0;  // the arm() being watched
  std::uint64_t last = 0;
  Clock::time_point since;
  while (!quit_) {
    if (!armed_) {
      wake_.wait(lock);
      continue;
    }
    if (watching != generation_) {  // a fresh watch: from arm() on, progress must move within the limit
      watching = generation_;
      last = progress_();
      since = Clock::now();
    }
    wake_.wait_for(lock, std::chrono::milliseconds(100));
    if (quit_ || !armed_ || watching != generation_) continue;
    const std::uint64_t now_progress = progress_();
    const auto now = Clock::now();
    if (now_progress != last) {
      last = now_progress;
      since = now;
      continue;
    }
    const double stuck = std::chrono::duration<double>(now - since).count();
    if (stuck < stall_seconds_) continue;
    std::ostringstream out;
    out << "FAIL: 1 violation (stall)\n  first violation: stall: no progress for " << std::fixed << std::setprecision(1) << stuck
        << " s: " << describe_() << "\n  seed " << seed_
        << ": the stuck threads can be neither stopped nor joined, so the run ends here (exit status 1, no summary, no JSON)\n";
    if (progress_line_) std::fputs("\n", stderr);  // end the progress line
    std::fputs(out.str().c_str(), stdout);
    std::fflush(stdout);
    std::_Exit(1);
  }
}

void drive(const Config& cfg, Report& r, Progress& progress, const Collector& found, std::atomic<bool>& stop, Watchdog& watchdog,
           const std::function<std::uint64_t(unsigned, std::uint64_t, LiveCount&)>& work, const std::function<bool()>& pause) {
  using Clock = std::chrono::steady_clock;
  const unsigned n = cfg.threads;
  const bool timed = cfg.seconds > 0;
  std::vector<LiveCount> live(n);
  std::vector<std::uint64_t> remaining(n);
  for (unsigned w = 0; w < n; ++w) {
    remaining[w] = timed ? std::numeric_limits<std::uint64_t>::max() : cfg.ops / n + (w < cfg.ops % n ? 1 : 0);
  }
  std::atomic<unsigned> active{0};
  bool finished = false;  // written by this thread between barriers only
  std::barrier go(static_cast<std::ptrdiff_t>(n) + 1), done(static_cast<std::ptrdiff_t>(n) + 1);
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (unsigned w = 0; w < n; ++w) {
    threads.emplace_back([&, w] {
      for (;;) {
        go.arrive_and_wait();
        if (finished) return;
        remaining[w] -= work(w, remaining[w], live[w]);
        live[w].op.store(kOpFinished, std::memory_order::relaxed);  // relaxed: read only by the stall report
        active.fetch_sub(1);
        done.arrive_and_wait();
      }
    });
  }
  auto live_ops = [&] {
    std::uint64_t sum = 0;
    for (const auto& l : live) sum += l.ops.load(std::memory_order::relaxed);  // relaxed: a statistic for the progress line
    return sum;
  };
  // The watchdog's progress: the operations of workers not merely keeping others company.
  auto watched_ops = [&] {
    std::uint64_t sum = 0;
    for (const auto& l : live) {
      // relaxed (both): a statistic; a stall is judged over seconds
      if (l.op.load(std::memory_order::relaxed) != kOpServing) sum += l.ops.load(std::memory_order::relaxed);
    }
    return sum;
  };
  // For the watchdog: what each worker that has not finished its epoch is doing.
  auto describe = [&] {
    std::ostringstream out;
    std::size_t busy = 0;
    for (const auto& l : live) busy += l.op.load(std::memory_order::relaxed) != kOpFinished;  // relaxed: a report
    out << busy << " of " << n << " worker" << (n == 1 ? "" : "s") << " had not finished epoch " << r.epochs + 1;
    const char* sep = ": ";
    for (unsigned w = 0; w < n; ++w) {
      const std::uint32_t op = live[w].op.load(std::memory_order::relaxed);     // relaxed: a report
      const std::uint64_t done = live[w].ops.load(std::memory_order::relaxed);  // relaxed: a report
      if (op == kOpFinished) continue;
      out << sep << "thread " << w;
      sep = "; ";
      if (op == kOpIdle) {
        out << " before its first operation";
      } else if (op == kOpDraining) {
        out << " past its " << done << " operations (waiting for the others, or draining)";
      } else if (op == kOpServing) {
        out << " past its quota, serving while the others work (operation " << done + 1 << ")";
      } else {
        out << " in " << (op < cfg.mix.size() ? cfg.mix[op].first : "operation " + std::to_string(op)) << " (operation " << done + 1
            << " of its epoch)";
      }
    }
    return out.str();
  };
  double measured = 0, checking = 0;
  std::uint64_t base_ops = 0;  // ops of finished epochs
  try {
    for (;;) {
      stop.store(false);
      active.store(n);
      for (auto& l : live) l.op.store(kOpIdle, std::memory_order::relaxed);  // relaxed: workers are parked at the barrier
      const auto t0 = Clock::now();
      watchdog.arm(watched_ops, describe);
      go.arrive_and_wait();
      while (active.load() > 0) {
        const double elapsed = measured + std::chrono::duration<double>(Clock::now() - t0).count();
        if (timed && elapsed >= cfg.seconds) stop.store(true);
        progress.update(elapsed, base_ops + live_ops(), r.epochs + 1, found.total());
        const double left = timed ? cfg.seconds - elapsed : 1.0;
        std::this_thread::sleep_for(std::chrono::microseconds(left > 0.002 ? 2000 : 200));
      }
      watchdog.disarm();
      done.arrive_and_wait();
      measured += std::chrono::duration<double>(Clock::now() - t0).count();
      ++r.epochs;
      base_ops += live_ops();
      for (auto& l : live) l.ops.store(0, std::memory_order::relaxed);  // relaxed: workers are parked at the barrier
      const auto c0 = Clock::now();
      const bool go_on = pause();
      checking += std::chrono::duration<double>(Clock::now() - c0).count();
      bool more = false;
      for (auto rem : remaining) more = more || rem > 0;
      if (timed) more = measured < cfg.seconds;
      if (!go_on || !more) break;
    }
  } catch (...) {
    watchdog.disarm();
    finished = true;
    go.arrive_and_wait();
    for (auto& t : threads) t.join();
    progress.finish();
    throw;
  }
  finished = true;
  go.arrive_and_wait();
  for (auto& t : threads) t.join();
  progress.finish();
  r.seconds = measured;
  r.check_seconds = checking;
  r.total_ops = base_ops;
}

}  // namespace detail
}  // namespace tgi_gtc::stress
