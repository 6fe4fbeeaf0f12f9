#include "report.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <ostream>
#include <vector>

namespace tgi_gtc::sim {

namespace {

// Fixed-point text, identical on every platform; "null" for NaN (JSON).
std::string fixed(double v, int decimals) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed, decimals);
  return std::string(buf, r.ptr);
}

// A latency for the table: "850ms", "4.21s", "312s"; "-" when there is none.
std::string latency(double ms) {
  if (!std::isfinite(ms)) return "-";
  if (ms < 1000) return fixed(ms, 0) + "ms";
  if (ms < 100'000) return fixed(ms / 1000, 2) + "s";
  return fixed(ms / 1000, 0) + "s";
}

std::vector<double> merged(const std::array<ClassStats, 4>& by_priority, std::vector<double> ClassStats::*field) {
  std::vector<double> all;
  for (const ClassStats& c : by_priority) {
    const auto& v = c.*field;
    const auto mid = all.insert(all.end(), v.begin(), v.end());
    std::inplace_merge(all.begin(), mid, all.end());
  }
  return all;
}

ClassStats totals(const PolicyResult& r) {
  ClassStats t;
  for (const ClassStats& c : r.by_priority) {
    t.requests += c.requests;
    t.completed += c.completed;
    t.rejected_queue_full += c.rejected_queue_full;
    t.rejected_too_large += c.rejected_too_large;
    t.preemptions += c.preemptions;
    t.swapped_blocks += c.swapped_blocks;
    t.recomputed_tokens += c.recomputed_tokens;
    t.evictions += c.evictions;
    t.output_tokens += c.output_tokens;
  }
  t.ttft_ms = merged(r.by_priority, &ClassStats::ttft_ms);
  t.e2e_ms = merged(r.by_priority, &ClassStats::e2e_ms);
  return t;
}

double per_second(std::uint64_t n, Nanos span) {
  return span > 0 ? static_cast<double>(n) / (nanos_to_ms(span) / 1000.0) : 0.0;
}

std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + '"';
}

void json_cdf(std::ostream& out, const std::vector<double>& sorted) {
  out << '[';
  for (std::size_t k = 0; k < kCdfPoints; ++k) {
    if (k) out << ',';
    out << fixed(percentile(sorted, static_cast<double>(k)), 3);
  }
  out << ']';
}

void json_class(std::ostream& out, std::string_view name, const ClassStats& c, Nanos makespan, const char* indent) {
  out << indent << "{\"priority\": " << json_string(name) << ", \"requests\": " << c.requests
      << ", \"completed\": " << c.completed << ", \"rejected_queue_full\": " << c.rejected_queue_full
      << ", \"rejected_exceeds_capacity\": " << c.rejected_too_large << ",\n"
      << indent << " \"ttft_ms\": {\"p50\": " << fixed(percentile(c.ttft_ms, 50), 3)
      << ", \"p99\": " << fixed(percentile(c.ttft_ms, 99), 3) << "}, \"e2e_ms\": {\"p50\": "
      << fixed(percentile(c.e2e_ms, 50), 3) << ", \"p99\": " << fixed(percentile(c.e2e_ms, 99), 3) << "},\n"
      << indent << " \"preemptions\": " << c.preemptions << ", \"swapped_blocks\": " << c.swapped_blocks
      << ", \"recomputed_tokens\": " << c.recomputed_tokens << ", \"evictions\": " << c.evictions
      << ", \"output_tokens\": " << c.output_tokens
      << ", \"output_tokens_per_s\": " << fixed(per_second(c.output_tokens, makespan), 1) << ",\n"
      << indent << " \"ttft_cdf_ms\": ";
  json_cdf(out, c.ttft_ms);
  out << ",\n" << indent << " \"e2e_cdf_ms\": ";
  json_cdf(out, c.e2e_ms);
  out << '}';
}

}  // namespace

double offered_rps(std::span<const Request> requests) {
  if (requests.size() < 2) return 0;
  const double span_ms = requests.back().arrival_ms - requests.front().arrival_ms;
  return span_ms > 0 ? static_cast<double>(requests.size() - 1) / (span_ms / 1000.0) : 0.0;
}

void print_header(std::ostream& out, const RunInfo& info) {
  out << "trace: " << info.trace_path << " (" << to_string(info.format) << ", " << info.requests << " requests";
  if (info.rate_scale != 1.0) out << ", arrival rate x" << shortest(info.rate_scale);
  out << ")\n";
  if (!info.priority_note.empty()) out << "priorities: " << info.priority_note << '\n';
  out << "offered " << fixed(info.offered_rps, 2) << " req/s; estimated capacity " << fixed(info.capacity_rps, 2)
      << " req/s (load " << fixed(info.capacity_rps > 0 ? info.offered_rps / info.capacity_rps : 0.0, 2) << "x)\n";
  const ServerConfig& s = info.server;
  const CostModel& c = info.cost;
  out << "server: " << s.device_blocks << " device blocks x " << s.block_size << " tokens, " << s.host_blocks
      << " host blocks (swap policy), max " << s.max_running << " running, " << s.max_step_tokens
      << " prefill tokens/step, queue " << s.max_queue << '\n'
      << "step cost: " << fixed(c.base_ms, 3) << " ms + " << fixed(c.prefill_ms_per_token, 4)
      << " ms/prefill token + " << fixed(c.decode_ms_per_seq, 4) << " ms/decoding sequence + "
      << fixed(c.swap_ms_per_block, 4) << " ms/block copied\n\n";
}

void print_table(std::ostream& out, std::span<const PolicyResult> results) {
  char line[512];
  const char* fmt = "%-34s %-8s %5s %5s %5s %8s %8s %8s %8s %7s %8s %10s %5s %4s %5s\n";
  std::snprintf(line, sizeof line, fmt, "policy", "priority", "done", "rej.q", "rej.c", "TTFTp50", "TTFTp99",
                "E2Ep50", "E2Ep99", "preempt", "swap.blk", "recomp.tok", "evict", "KV", "tok/s");
  out << line;
  for (const PolicyResult& r : results) {
    const auto row = [&](std::string_view policy, std::string_view prio, const ClassStats& c, const std::string& kv) {
      std::snprintf(line, sizeof line, fmt, std::string(policy).c_str(), std::string(prio).c_str(),
                    std::to_string(c.completed).c_str(), std::to_string(c.rejected_queue_full).c_str(),
                    std::to_string(c.rejected_too_large).c_str(), latency(percentile(c.ttft_ms, 50)).c_str(),
                    latency(percentile(c.ttft_ms, 99)).c_str(), latency(percentile(c.e2e_ms, 50)).c_str(),
                    latency(percentile(c.e2e_ms, 99)).c_str(), std::to_string(c.preemptions).c_str(),
                    std::to_string(c.swapped_blocks).c_str(), std::to_string(c.recomputed_tokens).c_str(),
                    std::to_string(c.evictions).c_str(), kv.c_str(), fixed(per_second(c.output_tokens, r.makespan), 0).c_str());
      out << line;
    };
    bool first = true;
    for (const Priority p : kPrioritiesHighFirst) {
      row(first ? describe(r.policy) : "", scheduling::to_string(p), r.by_priority[scheduling::value(p)], "");
      first = false;
    }
    row("", "all", totals(r), fixed(r.kv_utilization * 100, 0) + "%");
    if (!r.failure.empty()) out << "  ! " << to_string(r.policy) << " did not finish " << r.failure << '\n';
  }
  out << "\nTTFT: arrival to end of the admitting step; E2E: arrival to last token; rej.q: queue full;\n"
         "rej.c: larger than the device KV pool; preempt: pauses by the engine; swap.blk: KV blocks\n"
         "copied out and back in; recomp.tok: tokens prefilled again; evict: tasks the serving loop\n"
         "cancelled and resubmitted because every running task was stalled on a full KV pool;\n"
         "KV: mean share of device blocks in use; tok/s: output tokens per simulated second.\n";
}

void write_json(std::ostream& out, const RunInfo& info, std::span<const PolicyResult> results) {
  const ServerConfig& s = info.server;
  const CostModel& c = info.cost;
  out << "{\n  \"tool\": \"sched-sim\",\n"
      << "  \"trace\": {\"path\": " << json_string(info.trace_path) << ", \"format\": "
      << json_string(to_string(info.format)) << ", \"requests\": " << info.requests
      << ", \"priority_note\": " << json_string(info.priority_note) << ", \"rate_scale\": " << shortest(info.rate_scale)
      << ", \"offered_rps\": " << fixed(info.offered_rps, 3) << ", \"capacity_rps\": " << fixed(info.capacity_rps, 3)
      << "},\n"
      << "  \"server\": {\"device_blocks\": " << s.device_blocks << ", \"host_blocks\": " << s.host_blocks
      << ", \"block_size\": " << s.block_size << ", \"max_running\": " << s.max_running
      << ", \"max_step_tokens\": " << s.max_step_tokens << ", \"max_queue\": " << s.max_queue << "},\n"
      << "  \"cost_model\": {\"base_ms\": " << fixed(c.base_ms, 6) << ", \"prefill_ms_per_token\": "
      << fixed(c.prefill_ms_per_token, 6) << ", \"decode_ms_per_seq\": " << fixed(c.decode_ms_per_seq, 6)
      << ", \"swap_ms_per_block\": " << fixed(c.swap_ms_per_block, 6) << "},\n"
      << "  \"cdf_percentiles\": \"0..100 step 1\",\n"
      << "  \"policies\": [\n";
  for (std::size_t k = 0; k < results.size(); ++k) {
    const PolicyResult& r = results[k];
    out << "    {\"name\": " << json_string(to_string(r.policy)) << ", \"label\": " << json_string(describe(r.policy))
        << ", \"steps\": " << r.steps << ", \"makespan_s\": " << fixed(nanos_to_ms(r.makespan) / 1000, 6)
        << ", \"busy_s\": " << fixed(nanos_to_ms(r.busy) / 1000, 6)
        << ", \"prefill_s\": " << fixed(nanos_to_ms(r.prefill_time) / 1000, 6)
        << ", \"decode_s\": " << fixed(nanos_to_ms(r.decode_time) / 1000, 6)
        << ", \"swap_s\": " << fixed(nanos_to_ms(r.swap_time) / 1000, 6)
        << ", \"kv_utilization\": " << fixed(r.kv_utilization, 4)
        << ", \"output_tokens_per_s\": " << fixed(r.output_tokens_per_s(), 1)
        << ", \"stalled_appends\": " << r.stalled_appends << ", \"stalled_task_steps\": " << r.stalled_task_steps
        << ", \"peak_waiting\": " << r.peak_waiting
        << ", \"failure\": " << (r.failure.empty() ? std::string("null") : json_string(r.failure)) << ",\n"
        << "     \"priorities\": [\n";
    for (const Priority p : kPrioritiesHighFirst) {
      json_class(out, scheduling::to_string(p), r.by_priority[scheduling::value(p)], r.makespan, "      ");
      out << ",\n";
    }
    json_class(out, "all", totals(r), r.makespan, "      ");
    out << "]}" << (k + 1 < results.size() ? "," : "") << '\n';
  }
  out << "  ]\n}\n";
}

}  // namespace tgi_gtc::sim
