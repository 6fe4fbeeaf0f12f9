#include "model.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <utility>

#include "trace.hpp"

namespace tgi_gtc::sim {

Nanos ms_to_nanos(double ms) {
  if (!std::isfinite(ms) || ms < 0 || ms > kMaxTimeMs) throw std::invalid_argument("time must be in [0, 1e12] ms");
  return static_cast<Nanos>(std::llround(ms * static_cast<double>(kNanosPerMs)));
}

Nanos CostModel::step(std::uint64_t prefill_tokens, std::uint64_t decoding, std::uint64_t blocks_copied) const {
  Nanos total = ms_to_nanos(base_ms);
  const std::pair<double, std::uint64_t> terms[] = {
      {prefill_ms_per_token, prefill_tokens}, {decode_ms_per_seq, decoding}, {swap_ms_per_block, blocks_copied}};
  for (const auto& [ms, count] : terms) {
    const Nanos unit = ms_to_nanos(ms);
    if (unit == 0) continue;  // costs nothing, however many
    Nanos part = 0;
    if (count > static_cast<std::uint64_t>(kMaxNanos) || __builtin_mul_overflow(unit, static_cast<Nanos>(count), &part) ||
        __builtin_add_overflow(total, part, &total)) {
      return std::numeric_limits<Nanos>::max();
    }
  }
  return total;
}

std::string_view to_string(Policy p) {
  switch (p) {
    case Policy::Fifo: return "fifo";
    case Policy::Priority: return "priority";
    case Policy::Swap: return "swap";
    case Policy::Recompute: return "recompute";
  }
  return "unknown";
}

std::string_view describe(Policy p) {
  switch (p) {
    case Policy::Fifo: return "FIFO (priority off)";
    case Policy::Priority: return "priority, no preemption";
    case Policy::Swap: return "priority + preemption (swap)";
    case Policy::Recompute: return "priority + preemption (recompute)";
  }
  return "unknown";
}

std::optional<Policy> parse_policy(std::string_view name) {
  for (const Policy p : kAllPolicies) {
    if (name == to_string(p)) return p;
  }
  return std::nullopt;
}

scheduling::EngineConfig engine_config(Policy policy, const ServerConfig& server) {
  scheduling::EngineConfig c;
  c.scheduler.max_queue_size = server.max_queue;
  c.scheduler.priority_scheduling = policy != Policy::Fifo;
  c.scheduler.enable_preemption = policy == Policy::Swap || policy == Policy::Recompute;
  c.device_blocks = server.device_blocks;
  c.host_blocks = policy == Policy::Swap ? server.host_blocks : 0;
  c.block_size = server.block_size;
  c.max_running = server.max_running;
  c.max_step_tokens = server.max_step_tokens;
  return c;
}

double estimate_capacity_rps(const CostModel& cost, const ServerConfig& server, std::span<const Request> requests) {
  if (requests.empty()) return 0;
  double prompt = 0, output = 0, resident = 0;
  for (const Request& r : requests) {
    const double p = r.prompt_tokens, o = r.output_tokens;
    prompt += p;
    output += o;
    resident += o * (p + o / 2.0);  // tokens held, integrated over the o steps it runs
  }
  const double n = static_cast<double>(requests.size());
  prompt /= n;
  output /= n;
  // Average tokens a resident sequence holds, plus half a block lost to rounding.
  const double per_seq = resident / n / output + server.block_size / 2.0;
  const double concurrency =
      std::max(1.0, std::min<double>(server.max_running, static_cast<double>(server.device_tokens()) / per_seq));
  const double ms_per_request =
      output * (cost.base_ms / concurrency + cost.decode_ms_per_seq) + prompt * cost.prefill_ms_per_token;
  return 1000.0 / ms_per_request;
}

}  // namespace tgi_gtc::sim
