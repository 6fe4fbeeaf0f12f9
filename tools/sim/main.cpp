// sched-sim: replays an LLM serving workload through the scheduling Engine on
// a virtual clock and compares scheduling policies; `sched-sim generate`
// writes synthetic traces. See docs/simulator.md.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <tgi_gtc/scheduling/engine.hpp>

#include "generator.hpp"
#include "model.hpp"
#include "progress.hpp"
#include "report.hpp"
#include "simulation.hpp"
#include "trace.hpp"

#ifndef TGI_SIM_DEFAULT_TRACE
#define TGI_SIM_DEFAULT_TRACE "tools/sim/traces/default.csv"
#endif

namespace {

using namespace tgi_gtc::sim;

constexpr std::size_t kMaxIssuesShown = 50;

// A whole-number option: digits only, at least `min`, within its type. (CLI11
// alone would take "-5" for an unsigned option and wrap it, and saturate a
// number past the type's range.) A transform, not a check: it passes on the
// number it read, so that CLI11 does not read a leading zero as octal.
template <class T>
CLI::Validator whole(T min) {
  const std::string range = "[" + std::to_string(min) + ", " + std::to_string(std::numeric_limits<T>::max()) + "]";
  return CLI::Validator(
      [min, range](std::string& text) -> std::string {
        T v{};
        const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
        if (ec != std::errc{} || end != text.data() + text.size() || v < min) {
          return "must be a whole number in " + range;
        }
        text = std::to_string(v);  // CLI11 converts this: "010" would be 8 to it
        return {};
      },
      "INT in " + range);
}

// Writes to stdout failed (a full disk, a closed pipe): an error, not a
// truncated result reported as success.
void check_stdout() {
  std::cout.flush();
  if (!std::cout) throw std::runtime_error("error writing to stdout");
}

void add_model_options(CLI::App& app, ServerConfig& s, CostModel& c) {
  // A time in ms the simulated clock can hold (NaN fails the comparison too).
  const CLI::Validator cost_ms(
      [](std::string& text) -> std::string {
        double v = 0;
        const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
        if (ec != std::errc{} || end != text.data() + text.size() || !(v >= 0 && v <= kMaxTimeMs)) {
          return "must be a number of ms in [0, 1e12]";
        }
        return {};
      },
      "MS in [0, 1e12]");
  app.add_option("--device-blocks", s.device_blocks, "KV blocks on the GPU")->capture_default_str()->transform(whole<std::uint32_t>(1))->group("Server");
  app.add_option("--host-blocks", s.host_blocks, "KV blocks in host memory (swap policy only)")->capture_default_str()->transform(whole<std::uint32_t>(0))->group("Server");
  app.add_option("--block-size", s.block_size, "tokens per KV block")->capture_default_str()->transform(whole<std::uint32_t>(1))->group("Server");
  app.add_option("--max-running", s.max_running, "most sequences in a batch")->capture_default_str()->transform(whole<std::uint32_t>(1))->group("Server");
  app.add_option("--max-step-tokens", s.max_step_tokens, "prefill token budget per step")->capture_default_str()->transform(whole<std::size_t>(1))->group("Server");
  app.add_option("--max-queue", s.max_queue, "waiting queue size; later arrivals are rejected")->capture_default_str()->transform(whole<std::size_t>(1))->group("Server");
  app.add_option("--base-ms", c.base_ms, "step cost: fixed part")->capture_default_str()->check(cost_ms)->group("Cost model");
  app.add_option("--prefill-ms-per-token", c.prefill_ms_per_token, "step cost per prefilled token")->capture_default_str()->check(cost_ms)->group("Cost model");
  app.add_option("--decode-ms-per-seq", c.decode_ms_per_seq, "step cost per decoding sequence")->capture_default_str()->check(cost_ms)->group("Cost model");
  app.add_option("--swap-ms-per-block", c.swap_ms_per_block, "step cost per KV block copied to or from the host")->capture_default_str()->check(cost_ms)->group("Cost model");
}

// The full generate command for a config, written into the trace it produced.
std::string describe_generation(const GeneratorConfig& g, const ServerConfig& s, const CostModel& c) {
  std::string cmd = "sched-sim generate --seed " + std::to_string(g.seed) + " --count " + std::to_string(g.count) +
                    " --arrivals " + std::string(to_string(g.arrivals));
  cmd += g.rate_rps > 0 ? " --rate " + shortest(g.rate_rps) : " --load " + shortest(g.load);
  cmd += " --mix " + g.mix.to_string() + " --preemptible-fraction " + shortest(g.preemptible_fraction) +
         " --prompt-median " + shortest(g.prompt.median) + " --prompt-sigma " + shortest(g.prompt.sigma) +
         " --prompt-max " + std::to_string(g.prompt.max) + " --output-median " + shortest(g.output.median) +
         " --output-sigma " + shortest(g.output.sigma) + " --output-max " + std::to_string(g.output.max);
  if (g.arrivals == ArrivalProcess::Bursty) {
    cmd += " --burst-factor " + shortest(g.burst_factor) + " --burst-fraction " + shortest(g.burst_fraction) +
           " --burst-period-s " + shortest(g.burst_period_s);
  }
  if (g.rate_rps <= 0) {
    cmd += " --device-blocks " + std::to_string(s.device_blocks) + " --block-size " + std::to_string(s.block_size) +
           " --max-running " + std::to_string(s.max_running) + " --base-ms " + shortest(c.base_ms) +
           " --prefill-ms-per-token " + shortest(c.prefill_ms_per_token) + " --decode-ms-per-seq " +
           shortest(c.decode_ms_per_seq);
  }
  return cmd;
}

int print_trace_error(const TraceError& e) {
  std::cerr << "sched-sim: " << e.source() << ": " << count_issues(e.issues()) << "; nothing was simulated\n";
  std::size_t shown = 0;
  for (const TraceIssue& i : e.issues()) {
    if (shown++ == kMaxIssuesShown) {
      std::cerr << "  ... and " << e.issues().size() - kMaxIssuesShown << " more problems\n";
      break;
    }
    std::cerr << e.source() << ':' << i.line << ": " << i.message << '\n';
  }
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"sched-sim: replays an LLM serving trace through the tgi_gtc scheduling Engine on a virtual clock\n"
               "and compares FIFO, priority, and priority with preemption by swap or by recompute."};
  app.require_subcommand(0, 1);
  app.footer("Exit status: 0 when every policy finished; 3 when a policy did not finish (its '!' line says why);\n"
             "another non-zero status on bad input or options (nothing is simulated).");

  // Run options (the default command).
  ServerConfig server;
  CostModel cost;
  std::string trace_path = TGI_SIM_DEFAULT_TRACE;
  std::string format_name = "auto";
  std::string mix_text = PriorityMix{}.to_string();
  MixOptions mix_opts;
  double rate_scale = 1.0;
  std::size_t limit = 0;
  std::vector<std::string> policy_names;
  for (const Policy p : kAllPolicies) policy_names.emplace_back(to_string(p));
  std::string json_path;
  bool quiet = false;
  bool no_progress = false;

  app.add_option("-t,--trace", trace_path, "trace file: simulator CSV or Azure LLM inference trace")
      ->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--format", format_name, "trace format")->capture_default_str()->check(CLI::IsMember({"auto", "csv", "azure"}));
  app.add_option("--mix", mix_text, "priority mix for traces without priorities (Azure)")->capture_default_str();
  app.add_option("--preemptible-fraction", mix_opts.preemptible_fraction, "share of preemptible requests for traces without the flag")
      ->capture_default_str()->check(CLI::Range(0.0, 1.0));
  app.add_option("--seed", mix_opts.seed, "seed of the priority mix")->capture_default_str()->transform(whole<std::uint64_t>(0));
  app.add_option("--rate-scale", rate_scale, "multiply the arrival rate (2: twice as fast)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--limit", limit, "simulate only the first N requests (0: all)")->capture_default_str()->transform(whole<std::size_t>(0));
  app.add_option("--policies", policy_names, "policies to compare")->delimiter(',')->capture_default_str()
      ->check(CLI::IsMember({"fifo", "priority", "swap", "recompute"}));
  app.add_option("--json", json_path, "also write the results as JSON (input of tools/sim/plot.py)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_flag("-q,--quiet", quiet, "print only the table");
  app.add_flag("--no-progress", no_progress, "never draw the progress bar");
  add_model_options(app, server, cost);

  // generate
  CLI::App* gen = app.add_subcommand("generate", "write a synthetic trace in the simulator CSV format");
  GeneratorConfig g;
  ServerConfig gen_server;
  CostModel gen_cost;
  std::string out_path = "-";
  std::string arrivals_name = "poisson";
  std::string gen_mix = g.mix.to_string();
  gen->add_option("-o,--out", out_path, "output file ('-': stdout)")->capture_default_str();
  gen->add_option("--seed", g.seed, "random seed")->capture_default_str()->transform(whole<std::uint64_t>(0));
  gen->add_option("-n,--count", g.count, "number of requests")->capture_default_str()->transform(whole<std::size_t>(1));
  gen->add_option("--arrivals", arrivals_name, "arrival process")->capture_default_str()->check(CLI::IsMember({"poisson", "bursty"}));
  gen->add_option("--rate", g.rate_rps, "mean arrival rate in requests/s (overrides --load)")->check(CLI::NonNegativeNumber);
  gen->add_option("--load", g.load, "arrival rate as a multiple of the estimated capacity of the server below")
      ->capture_default_str()->check(CLI::PositiveNumber);
  gen->add_option("--mix", gen_mix, "priority mix in percent")->capture_default_str();
  gen->add_option("--preemptible-fraction", g.preemptible_fraction, "share of preemptible requests")
      ->capture_default_str()->check(CLI::Range(0.0, 1.0));
  gen->add_option("--prompt-median", g.prompt.median, "lognormal prompt length: median tokens")->capture_default_str();
  gen->add_option("--prompt-sigma", g.prompt.sigma, "lognormal prompt length: sigma of log")->capture_default_str();
  gen->add_option("--prompt-max", g.prompt.max, "longest prompt")->capture_default_str()->transform(whole<std::uint32_t>(1));
  gen->add_option("--output-median", g.output.median, "lognormal output length: median tokens")->capture_default_str();
  gen->add_option("--output-sigma", g.output.sigma, "lognormal output length: sigma of log")->capture_default_str();
  gen->add_option("--output-max", g.output.max, "longest output")->capture_default_str()->transform(whole<std::uint32_t>(1));
  gen->add_option("--burst-factor", g.burst_factor, "bursty: rate in a burst / mean rate")->capture_default_str();
  gen->add_option("--burst-fraction", g.burst_fraction, "bursty: share of time in bursts")->capture_default_str();
  gen->add_option("--burst-period-s", g.burst_period_s, "bursty: mean burst + lull length, seconds")->capture_default_str();
  add_model_options(*gen, gen_server, gen_cost);

  CLI11_PARSE(app, argc, argv);

  try {
    if (gen->parsed()) {
      g.arrivals = *parse_arrival_process(arrivals_name);
      g.mix = PriorityMix::parse(gen_mix);
      const GeneratedTrace t = generate(g, gen_cost, gen_server);
      const std::vector<std::string> comment{
          "generated by: " + describe_generation(g, gen_server, gen_cost),
          "mean rate " + shortest(std::round(t.rate_rps * 1000) / 1000) + " req/s; estimated capacity " +
              shortest(std::round(t.capacity_rps * 1000) / 1000) + " req/s"};
      if (out_path == "-") {
        write_csv(std::cout, t.requests, comment);
        check_stdout();
      } else {
        std::ofstream out(out_path);
        if (!out) throw std::runtime_error("cannot write " + out_path);
        write_csv(out, t.requests, comment);
        out.close();
        if (!out) throw std::runtime_error("error writing " + out_path);
      }
      std::cerr << "sched-sim: wrote " << t.requests.size() << " requests at " << shortest(std::round(t.rate_rps * 100) / 100)
                << " req/s (estimated capacity " << shortest(std::round(t.capacity_rps * 100) / 100) << " req/s) to "
                << (out_path == "-" ? "stdout" : out_path) << '\n';
      return 0;
    }

    mix_opts.mix = PriorityMix::parse(mix_text);
    const TraceFormat format = format_name == "csv"     ? TraceFormat::Csv
                               : format_name == "azure" ? TraceFormat::Azure
                                                        : TraceFormat::Auto;
    Trace trace = load_trace(trace_path, format, mix_opts);
    if (limit > 0 && trace.requests.size() > limit) trace.requests.resize(limit);
    scale_rate(trace.requests, rate_scale);

    RunInfo info;
    info.trace_path = trace_path;
    info.format = trace.format;
    info.priority_note = trace.priority_note;
    info.rate_scale = rate_scale;
    info.requests = trace.requests.size();
    info.offered_rps = offered_rps(trace.requests);
    info.capacity_rps = estimate_capacity_rps(cost, server, trace.requests);
    info.server = server;
    info.cost = cost;

    std::vector<Policy> policies;
    for (const auto& name : policy_names) {
      const Policy p = *parse_policy(name);
      if (std::find(policies.begin(), policies.end(), p) == policies.end()) policies.push_back(p);
    }
    // Bad input stops the run before anything is simulated or printed:
    // every policy's engine configuration is checked (the Engine names a bad
    // field), and the JSON file is tried, without truncating one that exists
    // (a failed or interrupted run keeps the previous results).
    for (const Policy p : policies) static_cast<void>(tgi_gtc::scheduling::Engine(engine_config(p, server)));
    if (!json_path.empty()) {
      const bool existed = std::filesystem::exists(json_path);
      if (!std::ofstream(json_path, std::ios::app)) throw std::runtime_error("cannot write " + json_path);
      if (!existed) std::filesystem::remove(json_path);
    }
    if (!quiet) print_header(std::cout, info);
    check_stdout();
    std::vector<PolicyResult> results;
    ProgressBar bar(trace.requests.size() * policies.size(), !no_progress);
    for (std::size_t k = 0; k < policies.size(); ++k) {
      const std::string label = std::string(describe(policies[k]));
      const std::size_t before = k * trace.requests.size();
      results.push_back(simulate(trace.requests, policies[k], server, cost,
                                 [&](std::size_t done, std::size_t) { bar.update(before + done, label); }));
    }
    bar.clear();
    print_table(std::cout, results);
    const bool all_finished =
        std::all_of(results.begin(), results.end(), [](const PolicyResult& r) { return r.failure.empty(); });
    if (!json_path.empty()) {
      std::ofstream json_out(json_path);
      if (!json_out) throw std::runtime_error("cannot write " + json_path);
      write_json(json_out, info, results);
      json_out.close();
      if (!json_out) throw std::runtime_error("error writing " + json_path);
      if (!quiet) std::cout << "\nwrote " << json_path << '\n';
    }
    check_stdout();
    return all_finished ? 0 : 3;  // 3: a policy did not finish (its "!" line says why)
  } catch (const TraceError& e) {
    return print_trace_error(e);
  } catch (const std::exception& e) {
    std::cerr << "sched-sim: " << e.what() << '\n';
    return 1;
  }
}
