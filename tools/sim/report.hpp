// The comparison table (text) and the JSON that plot.py reads.
#pragma once

#include <cstddef>
#include <iosfwd>
#include <span>
#include <string>

#include "model.hpp"
#include "simulation.hpp"
#include "trace.hpp"

namespace tgi_gtc::sim {

/// What was simulated, for the report header and the JSON "run" object.
struct RunInfo {
  std::string trace_path;
  TraceFormat format = TraceFormat::Csv;
  std::string priority_note;  ///< how priorities were assigned ("" when the trace has them)
  double rate_scale = 1.0;
  std::size_t requests = 0;
  double offered_rps = 0;   ///< requests / trace duration
  double capacity_rps = 0;  ///< estimate_capacity_rps()
  ServerConfig server{};
  CostModel cost{};
};

/// Points of the latency distributions written to JSON: percentiles 0, 1, ..., 100.
inline constexpr std::size_t kCdfPoints = 101;

/// Mean arrival rate of a sorted trace (requests per second over its span; 0 if it has no span).
double offered_rps(std::span<const Request> requests);

void print_header(std::ostream& out, const RunInfo& info);
/// One row per priority (highest first) and an "all" row per policy.
void print_table(std::ostream& out, std::span<const PolicyResult> results);
void write_json(std::ostream& out, const RunInfo& info, std::span<const PolicyResult> results);

}  // namespace tgi_gtc::sim
