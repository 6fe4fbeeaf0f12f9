// The summary printed at the end of a run, and the same as JSON.
#include <cmath>
#include <cstdio>
#include <ostream>
#include <string>

#include "stress.hpp"

namespace tgi_gtc::stress {
namespace {

std::string mix_text(const Mix& mix) {
  std::string s;
  for (const auto& [name, w] : mix) s += (s.empty() ? "" : ",") + name + "=" + std::to_string(w);
  return s;
}

std::string fmt(const char* f, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

double rate(std::uint64_t n, double seconds) { return seconds > 0 ? static_cast<double>(n) / seconds : 0.0; }

std::string call_text(const CallRef& c) {
  return c.op + "(" + std::to_string(c.id) + ") [" + std::to_string(c.start) + "," + std::to_string(c.end) + "]";
}

void json_string(std::ostream& os, const std::string& s) {
  os << '"';
  for (const char ch : s) {
    switch (ch) {
      case '"': os << "\\\""; break;
      case '\\': os << "\\\\"; break;
      case '\n': os << "\\n"; break;
      case '\t': os << "\\t"; break;
      default:
        if (static_cast<unsigned char>(ch) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(ch));
          os << buf;
        } else {
          os << ch;
        }
    }
  }
  os << '"';
}

std::string json_number(double x) { return std::isfinite(x) ? fmt("%.6g", x) : "null"; }

}  // namespace

void print_summary(std::ostream& os, const Report& r) {
  const Config& c = r.config;
  os << "sched-stress: target " << to_string(c.target) << ", " << c.threads << " threads, seed " << c.seed << "\n";
  os << "  config:  capacity " << c.capacity;
  if (c.target != Target::Pool && c.target != Target::BrokenPool && c.target != Target::BrokenPoolOrder &&
      c.target != Target::BrokenPoolBits && c.target != Target::BrokenPoolRefusing) os << ", " << (c.fifo ? "FIFO mode" : "priority mode");
  if (c.reuse_ids != 0) os << ", ids 1.." << c.reuse_ids << " reused";
  if (is_scheduler_target(c.target)) os << ", len-every " << c.len_every;
  os << ", mix " << mix_text(c.mix) << ", " << (c.seconds > 0 ? fmt("%.3g s", c.seconds) : std::to_string(c.ops) + " ops")
     << ", max-events " << c.max_events << "/thread";
  if (c.target == Target::BrokenDropping || c.target == Target::BrokenFull || c.target == Target::BrokenPool || c.target == Target::BrokenEngine ||
      c.target == Target::BrokenPoolBits || c.target == Target::BrokenPoolRefusing || c.target == Target::BrokenEngineFull) {
    os << ", drop-every " << c.drop_every;
  }
  os << "\n";
  os << "  run:     " << r.total_ops << " ops in " << fmt("%.3f", r.seconds) << " s = " << fmt("%.3f", rate(r.total_ops, r.seconds) / 1e6)
     << " Mops/s; " << r.epochs << (r.epochs == 1 ? " epoch" : " epochs") << ", checking " << fmt("%.3f", r.check_seconds) << " s";
  if (r.events_checked) os << ", " << r.events_checked << " history events checked";
  os << "\n";
  char line[128];
  std::snprintf(line, sizeof line, "  %-10s %14s %14s %10s\n", "op", "calls", "ok", "Mops/s");
  os << line;
  for (const auto& op : r.ops) {
    std::snprintf(line, sizeof line, "  %-10s %14llu %14llu %10.3f\n", op.name.c_str(), static_cast<unsigned long long>(op.calls),
                  static_cast<unsigned long long>(op.ok), rate(op.calls, r.seconds) / 1e6);
    os << line;
  }
  if (!r.stats.empty()) {
    os << "  stats:  ";
    for (const auto& [name, v] : r.stats) os << " " << name << "=" << v;
    os << "\n";
  }
  for (const auto& n : r.notes) os << "  note:    " << n << "\n";
  if (r.ok()) {
    os << "PASS: no violation\n";
    return;
  }
  std::uint64_t total = 0;
  std::string kinds;
  for (const auto& [kind, n] : r.violation_counts) {
    total += n;
    kinds += (kinds.empty() ? "" : ", ") + kind + " " + std::to_string(n);
  }
  os << "FAIL: " << total << (total == 1 ? " violation" : " violations") << " (" << kinds << ")\n";
  bool first = true;
  for (const auto& v : r.violations) {
    os << (first ? "  first violation: " : "  then:            ") << v.kind << ": " << v.detail << "\n";
    if (!v.ids.empty()) {
      os << "    ids";
      for (auto id : v.ids) os << " " << id;
      os << ";";
    } else {
      os << "   ";
    }
    os << " calls:";
    for (std::size_t i = 0; i < v.calls.size(); ++i) os << (i ? ", " : " ") << call_text(v.calls[i]);
    os << "\n";
    first = false;
  }
}

void write_json(std::ostream& os, const Report& r) {
  const Config& c = r.config;
  os << "{\n  \"target\": ";
  json_string(os, std::string(to_string(c.target)));
  os << ",\n  \"seed\": " << c.seed << ",\n  \"config\": {\"threads\": " << c.threads << ", \"seconds\": " << json_number(c.seconds)
     << ", \"ops\": " << (c.seconds > 0 ? 0 : c.ops) << ", \"capacity\": " << c.capacity << ", \"fifo\": " << (c.fifo ? "true" : "false") << ", \"reuse_ids\": " << c.reuse_ids
     << ", \"len_every\": " << c.len_every << ", \"max_events\": " << c.max_events << ", \"drop_every\": " << c.drop_every << ", \"mix\": {";
  for (std::size_t i = 0; i < c.mix.size(); ++i) {
    os << (i ? ", " : "");
    json_string(os, c.mix[i].first);
    os << ": " << c.mix[i].second;
  }
  os << "}},\n  \"seconds\": " << json_number(r.seconds) << ",\n  \"check_seconds\": " << json_number(r.check_seconds)
     << ",\n  \"total_ops\": " << r.total_ops << ",\n  \"ops_per_second\": " << json_number(rate(r.total_ops, r.seconds))
     << ",\n  \"epochs\": " << r.epochs << ",\n  \"events_checked\": " << r.events_checked << ",\n  \"ops\": [";
  for (std::size_t i = 0; i < r.ops.size(); ++i) {
    const auto& op = r.ops[i];
    os << (i ? ",\n    " : "\n    ") << "{\"name\": ";
    json_string(os, op.name);
    os << ", \"calls\": " << op.calls << ", \"ok\": " << op.ok << ", \"per_second\": " << json_number(rate(op.calls, r.seconds)) << "}";
  }
  os << "\n  ],\n  \"stats\": {";
  for (std::size_t i = 0; i < r.stats.size(); ++i) {
    os << (i ? ", " : "");
    json_string(os, r.stats[i].first);
    os << ": " << r.stats[i].second;
  }
  os << "},\n  \"notes\": [";
  for (std::size_t i = 0; i < r.notes.size(); ++i) {
    os << (i ? ", " : "");
    json_string(os, r.notes[i]);
  }
  os << "],\n  \"ok\": " << (r.ok() ? "true" : "false") << ",\n  \"violation_counts\": {";
  for (std::size_t i = 0; i < r.violation_counts.size(); ++i) {
    os << (i ? ", " : "");
    json_string(os, r.violation_counts[i].first);
    os << ": " << r.violation_counts[i].second;
  }
  os << "},\n  \"violations\": [";
  for (std::size_t i = 0; i < r.violations.size(); ++i) {
    const auto& v = r.violations[i];
    os << (i ? ",\n    " : "\n    ") << "{\"kind\": ";
    json_string(os, v.kind);
    os << ", \"detail\": ";
    json_string(os, v.detail);
    os << ", \"at\": " << v.at << ", \"ids\": [";
    for (std::size_t k = 0; k < v.ids.size(); ++k) os << (k ? ", " : "") << v.ids[k];
    os << "], \"calls\": [";
    for (std::size_t k = 0; k < v.calls.size(); ++k) {
      os << (k ? ", " : "") << "{\"op\": ";
      json_string(os, v.calls[k].op);
      os << ", \"id\": " << v.calls[k].id << ", \"start\": " << v.calls[k].start << ", \"end\": " << v.calls[k].end << "}";
    }
    os << "]}";
  }
  os << (r.violations.empty() ? "]\n}\n" : "\n  ]\n}\n");
}

}  // namespace tgi_gtc::stress
