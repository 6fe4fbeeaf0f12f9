#include "generator.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace tgi_gtc::sim {

namespace {

std::uint32_t draw_length(Rng& rng, const LengthDistribution& d) {
  const double x = std::round(d.median * std::exp(d.sigma * rng.normal()));
  return static_cast<std::uint32_t>(std::clamp(x, 1.0, static_cast<double>(d.max)));
}

void check(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace

std::string_view to_string(ArrivalProcess a) {
  switch (a) {
    case ArrivalProcess::Poisson: return "poisson";
    case ArrivalProcess::Bursty: return "bursty";
  }
  return "unknown";
}

std::optional<ArrivalProcess> parse_arrival_process(std::string_view name) {
  if (name == "poisson") return ArrivalProcess::Poisson;
  if (name == "bursty") return ArrivalProcess::Bursty;
  return std::nullopt;
}

void GeneratorConfig::validate() const {
  check(count > 0, "count must be positive");
  check(std::isfinite(rate_rps) && rate_rps >= 0, "rate must be a non-negative number");
  check(rate_rps > 0 || (std::isfinite(load) && load > 0), "load must be positive");
  check(preemptible_fraction >= 0 && preemptible_fraction <= 1, "preemptible fraction must be in [0, 1]");
  for (const auto* d : {&prompt, &output}) {
    check(std::isfinite(d->median) && d->median >= 1, "length median must be at least 1");
    check(std::isfinite(d->sigma) && d->sigma >= 0, "length sigma must be non-negative");
    check(d->max >= 1 && d->max <= kMaxTraceTokens, "length maximum must be in [1, 2^24]");
  }
  if (arrivals == ArrivalProcess::Bursty) {
    check(std::isfinite(burst_factor) && burst_factor >= 1, "burst factor must be at least 1");
    check(burst_fraction > 0 && burst_fraction < 1, "burst fraction must be in (0, 1)");
    check(burst_factor * burst_fraction <= 1, "burst factor x burst fraction must be at most 1");
    check(std::isfinite(burst_period_s) && burst_period_s > 0, "burst period must be positive");
  }
}

GeneratedTrace generate(const GeneratorConfig& config, const CostModel& cost, const ServerConfig& server) {
  config.validate();
  // Separate streams so that changing the arrival process or rate keeps the
  // same requests, only moved in time.
  Rng lengths(config.seed);
  Rng classes(config.seed ^ 0x9e3779b97f4a7c15ULL);
  Rng gaps(config.seed ^ 0xbf58476d1ce4e5b9ULL);

  GeneratedTrace out;
  out.requests.resize(config.count);
  for (Request& r : out.requests) {
    r.prompt_tokens = draw_length(lengths, config.prompt);
    r.output_tokens = draw_length(lengths, config.output);
    r.priority = config.mix.pick(classes.uniform());
    r.preemptible = classes.uniform() < config.preemptible_fraction;
  }
  out.capacity_rps = estimate_capacity_rps(cost, server, out.requests);
  out.rate_rps = config.rate_rps > 0 ? config.rate_rps : config.load * out.capacity_rps;
  if (!(out.rate_rps > 0)) throw std::invalid_argument("the arrival rate works out to zero");

  const double mean_gap_ms = 1000.0 / out.rate_rps;
  double t = 0;
  if (config.arrivals == ArrivalProcess::Poisson) {
    for (Request& r : out.requests) {
      r.arrival_ms = t;
      t += gaps.exponential(mean_gap_ms);
    }
  } else {
    // Two states with exponential holding times; within a state arrivals are
    // Poisson. Memorylessness makes "draw a gap, and if it crosses the state
    // change, restart from there at the new rate" exact.
    const double high = config.burst_factor;
    const double low = (1.0 - config.burst_fraction * high) / (1.0 - config.burst_fraction);
    const double burst_ms = config.burst_fraction * config.burst_period_s * 1000.0;
    const double lull_ms = (1.0 - config.burst_fraction) * config.burst_period_s * 1000.0;
    bool in_burst = false;
    double state_end = gaps.exponential(lull_ms);
    std::size_t i = 0;
    while (i < out.requests.size()) {
      const double rate = in_burst ? high : low;  // multiples of the mean rate
      const double next = rate > 0 ? t + gaps.exponential(mean_gap_ms / rate) : state_end;
      if (next >= state_end) {
        t = state_end;
        in_burst = !in_burst;
        state_end = t + gaps.exponential(in_burst ? burst_ms : lull_ms);
        continue;
      }
      t = next;
      out.requests[i++].arrival_ms = t;
    }
    // Start the trace at its first request.
    const double t0 = out.requests.front().arrival_ms;
    for (Request& r : out.requests) r.arrival_ms -= t0;
  }
  // Whole microseconds: the CSV then holds exactly what was simulated.
  for (Request& r : out.requests) r.arrival_ms = std::round(r.arrival_ms * 1000.0) / 1000.0;
  if (const double last = out.requests.back().arrival_ms; !(last <= kMaxTimeMs)) {
    throw std::invalid_argument("at " + shortest(out.rate_rps) + " req/s the last of " +
                                std::to_string(out.requests.size()) + " arrivals would come at " + shortest(last) +
                                " ms, beyond the simulator's limit of 1e12 ms: raise the rate");
  }
  return out;
}

}  // namespace tgi_gtc::sim
