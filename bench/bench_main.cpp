// Entry point: reads the suite's own flags, calibrates the clock, registers
// every benchmark for the configured thread counts, then hands over to Google
// Benchmark (all --benchmark_* flags work as usual).
//
//   --threads=1,2,4,8     thread counts (env TGI_BENCH_THREADS); default: powers
//                         of two from 1 to max(2 x hardware threads, 8), plus
//                         the hardware thread count and twice it
//   --duration_ms=100     length of one fixed-duration run (env TGI_BENCH_DURATION_MS)
//   --no_latency          skip the timed (".lat") flavour
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "harness.hpp"

namespace tgi_bench {

Config& config() noexcept {
  static Config c;
  return c;
}

namespace {

std::vector<int> parse_threads(std::string_view s) {
  std::vector<int> out;
  std::string item;
  std::stringstream in{std::string(s)};
  while (std::getline(in, item, ',')) {
    const int n = std::atoi(item.c_str());
    if (n <= 0) {
      std::fprintf(stderr, "bad thread count '%s'\n", item.c_str());
      std::exit(2);
    }
    out.push_back(n);
  }
  return out;
}

std::vector<int> default_threads() {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::set<int> s;
  for (int n = 1; n <= std::max(2 * hw, 8); n *= 2) s.insert(n);
  s.insert(hw);
  s.insert(2 * hw);
  return {s.begin(), s.end()};
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  }
  return "unknown";
}

void calibrate(Config& cfg) {
#ifdef TGI_BENCH_HAVE_TSC
  const auto c0 = std::chrono::steady_clock::now();
  const std::uint64_t t0 = latency_stamp();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const auto c1 = std::chrono::steady_clock::now();
  const std::uint64_t t1 = latency_stamp();
  cfg.ns_per_tick = static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(c1 - c0).count()) /
                    static_cast<double>(t1 - t0);
#else
  cfg.ns_per_tick = 1.0;
#endif
  // What an empty timed section reads: included in every latency figure.
  Histogram h;
  for (int i = 0; i < 200000; ++i) {
    const std::uint64_t a = latency_stamp();
    h.record(latency_stamp() - a);
  }
  cfg.timer_overhead_ns = static_cast<double>(h.quantile(0.5)) * cfg.ns_per_tick;
}

}  // namespace
}  // namespace tgi_bench

int main(int argc, char** argv) {
  using namespace tgi_bench;
  Config& cfg = config();
  std::vector<char*> rest{argv[0]};
  bool threads_given = false, duration_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a.rfind("--threads=", 0) == 0) {
      cfg.threads = parse_threads(a.substr(10));
      threads_given = true;
    } else if (a.rfind("--duration_ms=", 0) == 0) {
      cfg.duration_ms = std::atof(std::string(a.substr(14)).c_str());
      duration_given = true;
    } else if (a == "--no_latency") {
      cfg.latency = false;
    } else {
      rest.push_back(argv[i]);
    }
  }
  if (!threads_given) {
    if (const char* e = std::getenv("TGI_BENCH_THREADS"); e != nullptr && *e != '\0')
      cfg.threads = parse_threads(e);
    else
      cfg.threads = default_threads();
  }
  if (!duration_given) {
    if (const char* e = std::getenv("TGI_BENCH_DURATION_MS"); e != nullptr && *e != '\0')
      cfg.duration_ms = std::atof(e);
  }
  if (cfg.duration_ms <= 0) cfg.duration_ms = 100;
  for (const int n : cfg.threads) cfg.max_threads = std::max(cfg.max_threads, n);
  calibrate(cfg);

  std::string list;
  for (const int n : cfg.threads) {
    if (!list.empty()) list += ',';
    list += std::to_string(n);
  }
  benchmark::AddCustomContext("tgi_cpu_model", cpu_model());
  benchmark::AddCustomContext("tgi_hardware_threads", std::to_string(std::thread::hardware_concurrency()));
  benchmark::AddCustomContext("tgi_thread_counts", list);
  benchmark::AddCustomContext("tgi_duration_ms", std::to_string(cfg.duration_ms));
  benchmark::AddCustomContext("tgi_ns_per_tick", std::to_string(cfg.ns_per_tick));
  benchmark::AddCustomContext("tgi_timer_overhead_ns", std::to_string(cfg.timer_overhead_ns));

  register_queue_benchmarks();
  register_queue_mixed_benchmarks();
  register_pool_benchmarks();
#ifdef TGI_BENCH_HAVE_ENGINE
  register_engine_benchmarks();
#endif

  int rest_argc = static_cast<int>(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
