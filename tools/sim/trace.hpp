// Workload traces: the simulator's CSV format, the public Azure LLM inference
// trace format, and the seeded priority mix used where a trace has none.
//
// Simulator CSV (one request per row, sorted by arrival; '#' starts a comment line):
//   arrival_ms,priority,prompt_tokens,output_tokens,preemptible
//   0.000,Normal,812,164,true
// Azure (Patel et al., ISCA 2024; AzurePublicDataset):
//   TIMESTAMP,ContextTokens,GeneratedTokens
//   2023-11-16 18:15:46.6805900,374,44
// Every malformed row is reported with its line number; nothing is skipped.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <tgi_gtc/scheduling/task.hpp>

namespace tgi_gtc::sim {

using scheduling::Priority;

/// Largest prompt or output length a trace may give (2^24 tokens).
inline constexpr std::uint32_t kMaxTraceTokens = std::uint32_t{1} << 24;

struct Request {
  double arrival_ms;
  Priority priority;
  std::uint32_t prompt_tokens;
  std::uint32_t output_tokens;
  bool preemptible;

  friend bool operator==(const Request&, const Request&) = default;
};

/// Priorities in display order: Critical, High, Normal, Low.
inline constexpr std::array<Priority, 4> kPrioritiesHighFirst{Priority::Critical, Priority::High,
                                                              Priority::Normal, Priority::Low};

/// Case-insensitive "Low", "Normal", "High", "Critical".
std::optional<Priority> parse_priority(std::string_view name);

/// Shares of each priority, in percent (any non-negative weights; they need
/// not sum to 100). Indexed by scheduling::value(priority).
struct PriorityMix {
  std::array<double, 4> weight{10.0, 60.0, 25.0, 5.0};  // Low, Normal, High, Critical

  /// "Critical=5,High=25,Normal=60,Low=10" (names case-insensitive, missing
  /// ones are 0). Throws std::invalid_argument with the reason.
  static PriorityMix parse(std::string_view text);
  /// The same form, highest priority first, e.g. "Critical=5,High=25,Normal=60,Low=10".
  [[nodiscard]] std::string to_string() const;
  /// The priority at cumulative position u in [0, 1).
  [[nodiscard]] Priority pick(double u) const;
};

/// Deterministic random numbers: std::mt19937_64 (its output is fixed by the
/// standard) with distributions written out here, because the standard
/// library's distributions differ between implementations.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : engine_(seed) {}
  /// Uniform in [0, 1).
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  /// Exponential with the given mean.
  double exponential(double mean);
  /// Standard normal (Box-Muller).
  double normal();

 private:
  std::mt19937_64 engine_;
  std::optional<double> spare_;
};

enum class TraceFormat { Auto, Csv, Azure };
std::string_view to_string(TraceFormat f);

/// How priorities and the preemptible flag are drawn for a trace that carries
/// none (Azure).
struct MixOptions {
  PriorityMix mix{};
  double preemptible_fraction = 0.9;
  std::uint64_t seed = 1;
};

struct TraceIssue {
  std::size_t line;  ///< 1-based line in the file
  std::string message;
};

/// The shortest decimal text that reads back as `v`.
std::string shortest(double v);

/// "3 bad lines", or "5 problems on 1 line" when a line has several.
std::string count_issues(const std::vector<TraceIssue>& issues);

/// A trace that failed to parse: every issue found, in line order.
class TraceError : public std::runtime_error {
 public:
  TraceError(std::string source, std::vector<TraceIssue> issues);
  [[nodiscard]] const std::vector<TraceIssue>& issues() const noexcept { return issues_; }
  [[nodiscard]] const std::string& source() const noexcept { return source_; }

 private:
  std::string source_;
  std::vector<TraceIssue> issues_;
};

struct Trace {
  std::vector<Request> requests;
  TraceFormat format = TraceFormat::Csv;
  /// How priorities were assigned, for Azure traces ("" for the CSV format).
  std::string priority_note;
};

/// Parses a whole trace, detecting the format from the header when `format`
/// is Auto. Throws TraceError listing every bad line (header, field count,
/// number, priority name, flag, unsorted arrival, empty trace). `source`
/// names the input in messages.
Trace parse_trace(std::istream& in, std::string_view source, TraceFormat format = TraceFormat::Auto,
                  const MixOptions& mix = {});

/// Opens and parses `path`; throws std::runtime_error if it cannot be read.
Trace load_trace(const std::string& path, TraceFormat format = TraceFormat::Auto,
                 const MixOptions& mix = {});

/// Writes `requests` in the simulator CSV format, after `comment` lines (each
/// prefixed with "# "). Parsing the output gives back the same requests.
void write_csv(std::ostream& out, std::span<const Request> requests, std::span<const std::string> comment = {});

/// Divides every arrival time by `scale`: 2 offers the same requests twice as fast.
void scale_rate(std::span<Request> requests, double scale);

}  // namespace tgi_gtc::sim
