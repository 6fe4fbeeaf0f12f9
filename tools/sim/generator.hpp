// Synthetic traces: seeded Poisson or bursty arrivals, a priority mix, and
// lognormal prompt and output lengths.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "model.hpp"
#include "trace.hpp"

namespace tgi_gtc::sim {

enum class ArrivalProcess {
  Poisson,  ///< exponential gaps at a constant rate
  Bursty,   ///< two-state Markov-modulated Poisson: bursts at burst_factor x the mean rate
};
std::string_view to_string(ArrivalProcess a);
std::optional<ArrivalProcess> parse_arrival_process(std::string_view name);

/// Lognormal length: exp(N(log median, sigma)), rounded, clamped to [1, max].
struct LengthDistribution {
  double median;
  double sigma;
  std::uint32_t max;
};

struct GeneratorConfig {
  std::uint64_t seed = 1;
  std::size_t count = 3000;
  ArrivalProcess arrivals = ArrivalProcess::Poisson;
  /// Mean arrival rate in requests per second; when 0, `load` x the capacity
  /// that estimate_capacity_rps() gives for the generated lengths.
  double rate_rps = 0;
  double load = 1.3;
  PriorityMix mix{};
  double preemptible_fraction = 0.9;
  /// Defaults: a lognormal fit of the Azure LLM inference trace 2023
  /// (conversation): context median 760 tokens, sigma 0.99; generated median
  /// 151 tokens, sigma 0.86.
  LengthDistribution prompt{760.0, 1.0, 4096};
  LengthDistribution output{150.0, 0.86, 1024};
  /// Bursty arrivals: bursts run at burst_factor x the mean rate for
  /// burst_fraction of the time; a burst and the lull after it last
  /// burst_period_s on average. burst_factor x burst_fraction must be <= 1.
  double burst_factor = 4.0;
  double burst_fraction = 0.2;
  double burst_period_s = 20.0;

  /// Throws std::invalid_argument naming the first bad field.
  void validate() const;
};

struct GeneratedTrace {
  std::vector<Request> requests;
  double rate_rps;      ///< mean arrival rate used
  double capacity_rps;  ///< estimated capacity for these lengths (see estimate_capacity_rps)
};

/// Deterministic: the same config, cost model and server give the same trace
/// on every platform. Arrival times are whole microseconds.
GeneratedTrace generate(const GeneratorConfig& config, const CostModel& cost, const ServerConfig& server);

}  // namespace tgi_gtc::sim
