// The simulated server: what the GPU costs per step (CostModel), how the Engine
// is sized (ServerConfig), and the four policies the simulator compares.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include <tgi_gtc/scheduling/engine.hpp>

namespace tgi_gtc::sim {

struct Request;

/// Simulated time, in nanoseconds: integer so that a run is exact and
/// identical on every compiler.
using Nanos = std::int64_t;

inline constexpr Nanos kNanosPerMs = 1'000'000;

/// The simulated clock's range, about 31 years: every arrival, cost term and
/// instant of a run must lie in [0, kMaxTimeMs] ms. Nine times it still fits a
/// Nanos, so sums of two in-range times cannot overflow.
inline constexpr double kMaxTimeMs = 1e12;
inline constexpr Nanos kMaxNanos = static_cast<Nanos>(kMaxTimeMs) * kNanosPerMs;

/// Milliseconds (as given on the command line) to simulated nanoseconds,
/// rounded; std::invalid_argument outside [0, kMaxTimeMs].
Nanos ms_to_nanos(double ms);
inline double nanos_to_ms(Nanos ns) { return static_cast<double>(ns) / kNanosPerMs; }

/// Cost of one engine step on the simulated GPU:
///   base + prefill_per_token x prefill tokens + decode_per_seq x decoding
///        + swap_per_block x blocks copied (either direction).
/// Defaults: a 7B model with full multi-head attention (Llama-2-7B shape,
/// fp16) on one H100 80GB; docs/simulator.md gives the derivation. They are
/// assumptions, not measurements.
struct CostModel {
  double base_ms = 7.0;
  double prefill_ms_per_token = 0.03;
  double decode_ms_per_seq = 0.2;
  double swap_ms_per_block = 0.3;

  /// Duration of a step that prefills `prefill_tokens`, decodes `decoding`
  /// sequences and copies `blocks_copied` KV blocks; the largest Nanos when it
  /// would not fit one.
  [[nodiscard]] Nanos step(std::uint64_t prefill_tokens, std::uint64_t decoding,
                           std::uint64_t blocks_copied) const;
};

/// Engine sizing shared by every policy; only host_blocks differs (used by the
/// swap policy alone). Defaults: the same device as CostModel (48 GiB of KV at
/// 512 KiB per token is 6144 blocks of 16 tokens; 16 GiB of pinned host memory
/// is 2048 blocks).
struct ServerConfig {
  std::uint32_t device_blocks = 6144;
  std::uint32_t host_blocks = 2048;
  std::uint32_t block_size = 16;
  std::uint32_t max_running = 256;
  std::size_t max_step_tokens = 8192;
  std::size_t max_queue = 1024;

  [[nodiscard]] std::uint64_t device_tokens() const {
    return std::uint64_t{device_blocks} * block_size;
  }
};

enum class Policy : std::uint8_t {
  Fifo,       ///< priority scheduling off, no preemption
  Priority,   ///< priority order, no preemption
  Swap,       ///< priority order, preemption by swapping KV to host memory
  Recompute,  ///< priority order, preemption by releasing KV and recomputing it
};

inline constexpr std::array<Policy, 4> kAllPolicies{Policy::Fifo, Policy::Priority, Policy::Swap,
                                                    Policy::Recompute};

/// "fifo", "priority", "swap", "recompute": the names used on the command line and in JSON.
std::string_view to_string(Policy p);
/// A one-line description for tables ("priority + preemption (swap)").
std::string_view describe(Policy p);
std::optional<Policy> parse_policy(std::string_view name);

/// The Engine configuration that realizes `policy` on `server`.
scheduling::EngineConfig engine_config(Policy policy, const ServerConfig& server);

/// Requests per second the server sustains with this trace's length mix, from
/// a steady-state model: with N sequences resident (N limited by max_running
/// and by the KV pool, each request holding on average prompt + output/2
/// tokens weighted by how long it stays), serving one request costs
/// output x (base/N + decode_per_seq) + prompt x prefill_per_token.
/// An estimate for sizing loads, not a simulation result. 0 for no requests.
[[nodiscard]] double estimate_capacity_rps(const CostModel& cost, const ServerConfig& server,
                                           std::span<const Request> requests);

}  // namespace tgi_gtc::sim
