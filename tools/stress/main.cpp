// sched-stress: runs the Scheduler, the BlockPool or the Engine under many
// threads, checks every guarantee it can observe, and names the first
// violation. Exit status: 0 no violation, 1 a violation (a stall included:
// see --stall-seconds), 2 bad arguments, 3 an error (e.g. the JSON file could
// not be written). See docs/stress.md.
//
// Compiled a second time as sched-stress-chaos (TGI_STRESS_CHAOS defined),
// linked to a copy of the library with the Scheduler's test hooks, which it
// uses to stall threads at random inside the Scheduler (chaos.hpp).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <stdexcept>
#include <string>

#include <CLI/CLI.hpp>

#include "stress.hpp"

#ifdef TGI_STRESS_CHAOS
#include "chaos.hpp"
constexpr const char* kProgram = "sched-stress-chaos";
#else
constexpr const char* kProgram = "sched-stress";
#endif

namespace st = tgi_gtc::stress;

int main(int argc, char** argv) {
  CLI::App app{std::string(kProgram) + ": stress and linearizability harness for tgi_gtc::scheduling"};
  std::string target_name = "scheduler";
  std::string mix_text;
  std::string json_path;
  std::uint64_t seed = 0;
  bool progress = isatty(STDERR_FILENO) == 1;
  st::Config cfg;

  std::vector<std::string> targets;
  for (auto t : st::available_targets()) targets.emplace_back(st::to_string(t));
  app.add_option("--target", target_name, "what to stress")->check(CLI::IsMember(targets))->capture_default_str();
  app.add_option("-t,--threads", cfg.threads, "worker threads")->check(CLI::Range(1u, 1024u))->capture_default_str();
  auto* seconds = app.add_option("-s,--seconds", cfg.seconds, "run this long (measured time, checking pauses excluded)")->check(CLI::PositiveNumber);
  auto* ops = app.add_option("-n,--ops", cfg.ops, "operations in all, split among the threads (default 400000)")->check(CLI::PositiveNumber);
  seconds->excludes(ops);
  app.add_option("--mix", mix_text,
                 "op weights, e.g. schedule=40,next=30,peek=10,cancel=15,clear=1 (pool: allocate,share,release; engine: "
                 "submit,cancel,step,append,finish); ops not named get 0");
  app.add_option("-c,--capacity", cfg.capacity, "queue size (scheduler targets), blocks (pool), device blocks (engine); 0: default")
      ->capture_default_str();
  app.add_flag("--fifo", cfg.fifo, "priority scheduling off: one FIFO over all tasks");
  app.add_option("--reuse-ids", cfg.reuse_ids,
                 "scheduler targets: schedule and cancel only the ids 1..N, reused at once by every thread (cancels meet "
                 "schedules of their id in flight); checks per-id conservation instead of ordering; 0: off")
      ->capture_default_str();
  app.add_option("--len-every", cfg.len_every,
                 "scheduler targets: after every N-th operation of a thread, call len() (or is_empty() every other time, where "
                 "the target has it) between two clock ticks and judge it against the calls in flight around it; 0: never")
      ->capture_default_str();
  auto* seed_opt = app.add_option("--seed", seed, "random seed (default: a fresh one, printed)");
  app.add_option("--json", json_path, "also write the summary as JSON to this file");
  app.add_option("--max-events", cfg.max_events, "events (ops) per thread between checking pauses; bounds memory (~100 B/event/thread)")
      ->check(CLI::Range(std::size_t{64}, std::size_t{1} << 32))
      ->capture_default_str();
  app.add_option("--max-findings", cfg.max_findings, "violations kept and printed per kind")->capture_default_str();
  app.add_option("--drop-every", cfg.drop_every, "broken-dropping: lose tasks whose id is a multiple of this; broken-full: refuse them; broken-empty: answer every this-th next() or peek() with nothing; broken-pool: over-release every this-th shared release; broken-pool-bits: keep every this-th freed block; broken-pool-refusing: fail every this-th try_allocate; broken-engine: hide every this-th preemption; broken-engine-full: refuse ids that are multiples of this")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--stall-seconds", cfg.stall_seconds,
                 "end the run as a failure (exit 1) when no operation finishes, or a guarded check does not return, for this long; "
                 "0: never")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag("--progress,!--no-progress", progress, "progress line on stderr (default: when stderr is a terminal)");
#ifdef TGI_STRESS_CHAOS
  std::uint32_t chaos_every = 8;
  app.add_option("--chaos", chaos_every,
                 "stall the calling thread (yield, spin or sleep) at one in N of the Scheduler's test hook calls: before "
                 "and after taking a ring ticket, after publishing it, on meeting an earlier lap's task in its cell, "
                 "at each consumer pass over a ring, after a consumer's or a cancel's claim of a task (before it lets "
                 "go of it), and (engine) before step() takes a task it peeked; 0: never")
      ->capture_default_str();
#endif

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }

  cfg.target = *st::parse_target(target_name);
  if (seed_opt->count() == 0) seed = std::random_device{}() ^ (std::uint64_t{std::random_device{}()} << 32);
  cfg.seed = seed;
  if (ops->count() == 0 && seconds->count() == 0) cfg.ops = 400'000;
  if (seconds->count() > 0) cfg.ops = 0;
  cfg.progress = progress;
  cfg.progress_stream = &std::cerr;
  try {
    if (!mix_text.empty()) cfg.mix = st::parse_mix(cfg.target, mix_text);
  } catch (const std::invalid_argument& e) {
    std::cerr << kProgram << ": --mix: " << e.what() << "\n";
    return 2;
  }

#ifdef TGI_STRESS_CHAOS
  // The hooks are the Scheduler's: the Engine queues its tasks in two of them,
  // the pool and the other broken targets use none.
  if (cfg.target != st::Target::Scheduler && cfg.target != st::Target::Engine &&
      cfg.target != st::Target::BrokenEngine && cfg.target != st::Target::BrokenEngineOrder &&
      cfg.target != st::Target::BrokenEngineFull) {
    std::cerr << kProgram << ": --target " << target_name
              << ": no Scheduler inside, so no test hooks to stall at; run sched-stress for it\n";
    return 2;
  }
#endif

  // The seed first, so that a crash can be replayed.
  std::cout << kProgram << ": target " << target_name << ", seed " << seed << std::endl;
  // A stalled run writes no JSON: leave no earlier run's file to pass for this one's.
  if (!json_path.empty()) std::remove(json_path.c_str());
  st::Report report;
  try {
#ifdef TGI_STRESS_CHAOS
    st::install_chaos(seed, chaos_every);
#endif
    report = st::run(cfg);
  } catch (const std::invalid_argument& e) {
    std::cerr << kProgram << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << kProgram << ": error: " << e.what() << "\n";
    return 3;
  }
#ifdef TGI_STRESS_CHAOS
  st::remove_chaos();
  const st::ChaosCounts chaos = st::chaos_counts();
  report.stats.emplace_back("chaos_every", chaos_every);
  report.stats.emplace_back("chaos_hook_calls", chaos.hook_calls);
  report.stats.emplace_back("chaos_yields", chaos.yields);
  report.stats.emplace_back("chaos_spins", chaos.spins);
  report.stats.emplace_back("chaos_sleeps", chaos.sleeps);
  if (chaos_every != 0) {
    report.notes.push_back("chaos: " + std::to_string(chaos.yields + chaos.spins + chaos.sleeps) + " of " +
                           std::to_string(chaos.hook_calls) + " hook calls stalled (" + std::to_string(chaos.yields) +
                           " yields, " + std::to_string(chaos.spins) + " spins, " + std::to_string(chaos.sleeps) +
                           " sleeps)");
  }
#endif
  st::print_summary(std::cout, report);
#ifdef TGI_STRESS_CHAOS
  if (chaos_every != 0 && chaos.hook_calls == 0) {
    // The library this was linked to has no hooks, or the run never reached them.
    std::cerr << kProgram << ": error: no test hook was called, so nothing was stalled\n";
    return 3;
  }
#endif
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    st::write_json(out, report);
    out.close();
    if (!out) {
      std::cerr << kProgram << ": cannot write " << json_path << "\n";
      return 3;
    }
  }
  return report.ok() ? 0 : 1;
}
