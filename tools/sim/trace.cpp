#include "trace.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <istream>
#include <limits>
#include <numbers>
#include <ostream>
#include <set>

#include "model.hpp"

namespace tgi_gtc::sim {

namespace {

constexpr std::string_view kCsvHeader = "arrival_ms,priority,prompt_tokens,output_tokens,preemptible";
constexpr std::string_view kAzureHeader = "TIMESTAMP,ContextTokens,GeneratedTokens";

char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return lower(x) == lower(y);
         });
}

std::string_view trim(std::string_view s) {
  const auto space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> split(std::string_view line) {
  std::vector<std::string_view> fields;
  for (;;) {
    const auto comma = line.find(',');
    fields.push_back(trim(line.substr(0, comma)));
    if (comma == std::string_view::npos) return fields;
    line.remove_prefix(comma + 1);
  }
}

std::string quoted(std::string_view s) {
  std::string out = "'";
  out.append(s.substr(0, 60));
  if (s.size() > 60) out += "...";
  out += '\'';
  return out;
}

// Headers compare field by field, ignoring case and spaces around commas.
bool header_is(const std::vector<std::string_view>& fields, std::string_view header) {
  const auto want = split(header);
  if (fields.size() != want.size()) return false;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (!iequals(fields[i], want[i])) return false;
  }
  return true;
}

// A whole number in [min, max], or an explanation.
std::optional<std::uint64_t> parse_count(std::string_view field, std::string_view name, std::uint64_t min,
                                         std::uint64_t max, std::string& why) {
  std::uint64_t v = 0;
  const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), v);
  if (field.empty() || ec != std::errc{} || end != field.data() + field.size()) {
    why = std::string(name) + " " + quoted(field) + " is not a whole number";
    return std::nullopt;
  }
  if (v < min || v > max) {
    why = std::string(name) + " " + std::to_string(v) + " is outside [" + std::to_string(min) + ", " +
          std::to_string(max) + "]";
    return std::nullopt;
  }
  return v;
}

std::optional<double> parse_ms(std::string_view field, std::string& why) {
  double v = 0;
  const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), v);
  if (field.empty() || ec != std::errc{} || end != field.data() + field.size() || !std::isfinite(v)) {
    why = "arrival_ms " + quoted(field) + " is not a number";
    return std::nullopt;
  }
  if (v < 0) {
    why = "arrival_ms " + quoted(field) + " is negative";
    return std::nullopt;
  }
  if (v > kMaxTimeMs) {
    why = "arrival_ms " + quoted(field) + " is beyond the simulator's limit of 1e12 ms";
    return std::nullopt;
  }
  return v;
}

std::optional<bool> parse_flag(std::string_view field) {
  if (iequals(field, "true") || field == "1") return true;
  if (iequals(field, "false") || field == "0") return false;
  return std::nullopt;
}

// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant, "chrono-
// compatible low-level date algorithms", days_from_civil).
std::int64_t days_from_civil(std::int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const std::int64_t era = (y >= 0 ? y : y - 399) / 400;
  const auto yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<std::int64_t>(doe) - 719468;
}

// "YYYY-MM-DD HH:MM:SS[.fraction]" to nanoseconds since the epoch (UTC, no
// leap seconds: only differences are used).
std::optional<std::int64_t> parse_timestamp(std::string_view s) {
  const auto digits = [&](std::size_t pos, std::size_t n) -> std::optional<unsigned> {
    if (pos + n > s.size()) return std::nullopt;
    unsigned v = 0;
    for (std::size_t i = pos; i < pos + n; ++i) {
      if (s[i] < '0' || s[i] > '9') return std::nullopt;
      v = v * 10 + static_cast<unsigned>(s[i] - '0');
    }
    return v;
  };
  if (s.size() < 19 || s[4] != '-' || s[7] != '-' || (s[10] != ' ' && s[10] != 'T') || s[13] != ':' ||
      s[16] != ':') {
    return std::nullopt;
  }
  const auto y = digits(0, 4), mo = digits(5, 2), d = digits(8, 2);
  const auto h = digits(11, 2), mi = digits(14, 2), sec = digits(17, 2);
  if (!y || !mo || !d || !h || !mi || !sec || *mo < 1 || *mo > 12 || *d < 1 || *h > 23 || *mi > 59 || *sec > 60) {
    return std::nullopt;
  }
  const bool leap = (*y % 4 == 0 && *y % 100 != 0) || *y % 400 == 0;
  constexpr unsigned kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  if (*d > kDays[*mo - 1] + (*mo == 2 && leap ? 1 : 0)) return std::nullopt;
  std::int64_t frac_ns = 0;
  if (s.size() > 19) {
    if (s[19] != '.' || s.size() == 20) return std::nullopt;
    std::int64_t scale = 100'000'000;
    for (std::size_t i = 20; i < s.size(); ++i) {
      if (s[i] < '0' || s[i] > '9') return std::nullopt;
      frac_ns += (s[i] - '0') * scale;  // digits past the ninth add nothing
      scale /= 10;
    }
  }
  const std::int64_t days = days_from_civil(*y, *mo, *d);
  const std::int64_t secs = days * 86400 + std::int64_t{*h} * 3600 + std::int64_t{*mi} * 60 + *sec;
  // Nanoseconds since 1970 fit 64 bits from 1677 to 2262 only.
  std::int64_t ns = 0;
  if (__builtin_mul_overflow(secs, std::int64_t{1'000'000'000}, &ns) || __builtin_add_overflow(ns, frac_ns, &ns)) {
    return std::nullopt;
  }
  return ns;
}

class Parser {
 public:
  Parser(std::string_view source, const MixOptions& mix) : source_(source), mix_(mix), rng_(mix.seed) {}

  Trace run(std::istream& in, TraceFormat format) {
    std::string text;
    std::size_t line_no = 0;
    bool have_header = false;
    std::optional<std::int64_t> first_ns;
    while (std::getline(in, text)) {
      ++line_no;
      std::string_view line = trim(text);
      // A UTF-8 byte-order mark (spreadsheets write one) is not part of the header.
      if (line_no == 1 && line.starts_with("\xEF\xBB\xBF")) line = trim(line.substr(3));
      if (line.empty() || line.front() == '#') continue;
      const auto fields = split(line);
      if (!have_header) {
        have_header = true;
        header_line_ = line_no;
        if (!detect(fields, format, line_no, line)) break;  // every row would be misread
        continue;
      }
      if (format == TraceFormat::Csv) {
        csv_row(fields, line_no);
      } else {
        azure_row(fields, line_no, first_ns);
      }
    }
    // getline stops at a read error as at the end: tell them apart, or the
    // rest of the file would be lost without a word.
    if (in.bad()) {
      throw std::runtime_error(std::string(source_) + ": read error after line " + std::to_string(line_no));
    }
    if (!have_header) issue(line_no == 0 ? 1 : line_no, "empty trace: expected the header " + quoted(kCsvHeader));
    if (have_header && issues_.empty() && trace_.requests.empty()) {
      issue(header_line_, "the trace has a header but no requests");
    }
    if (!issues_.empty()) throw TraceError(std::string(source_), std::move(issues_));
    trace_.format = format;
    if (format == TraceFormat::Azure) {
      trace_.priority_note = "drawn by seeded mix " + mix_.mix.to_string() + " (seed " +
                             std::to_string(mix_.seed) + "), " +
                             std::to_string(static_cast<int>(std::lround(mix_.preemptible_fraction * 100))) +
                             "% preemptible";
    }
    return std::move(trace_);
  }

 private:
  bool detect(const std::vector<std::string_view>& fields, TraceFormat& format, std::size_t line_no,
              std::string_view line) {
    const bool csv = header_is(fields, kCsvHeader);
    const bool azure = header_is(fields, kAzureHeader);
    if (format == TraceFormat::Auto && (csv || azure)) format = csv ? TraceFormat::Csv : TraceFormat::Azure;
    if ((format == TraceFormat::Csv && csv) || (format == TraceFormat::Azure && azure)) return true;
    std::string want = format == TraceFormat::Azure ? quoted(kAzureHeader)
                       : format == TraceFormat::Csv ? quoted(kCsvHeader)
                                                    : quoted(kCsvHeader) + " or " + quoted(kAzureHeader);
    issue(line_no, "expected the header " + want + ", got " + quoted(line));
    return false;
  }

  void issue(std::size_t line, std::string message) { issues_.push_back({line, std::move(message)}); }

  bool field_count(const std::vector<std::string_view>& fields, std::size_t want, std::size_t line_no) {
    if (fields.size() == want) return true;
    issue(line_no, "expected " + std::to_string(want) + " comma-separated fields, got " +
                       std::to_string(fields.size()));
    return false;
  }

  void check_order(double arrival_ms, std::size_t line_no) {
    if (!trace_.requests.empty() && arrival_ms < last_arrival_ms_) {
      issue(line_no, "arrival " + std::to_string(arrival_ms) + " ms is earlier than the previous row's " +
                         std::to_string(last_arrival_ms_) + " ms (rows must be sorted by arrival)");
    }
    last_arrival_ms_ = std::max(last_arrival_ms_, arrival_ms);
  }

  void csv_row(const std::vector<std::string_view>& f, std::size_t line_no) {
    if (!field_count(f, 5, line_no)) return;
    std::string why;
    const auto fail = [&] { issue(line_no, why); };
    const auto arrival = parse_ms(f[0], why);
    if (!arrival) fail();
    const auto priority = parse_priority(f[1]);
    if (!priority) issue(line_no, "priority " + quoted(f[1]) + " is not one of Low, Normal, High, Critical");
    const auto prompt = parse_count(f[2], "prompt_tokens", 1, kMaxTraceTokens, why);
    if (!prompt) fail();
    const auto output = parse_count(f[3], "output_tokens", 1, kMaxTraceTokens, why);
    if (!output) fail();
    const auto preemptible = parse_flag(f[4]);
    if (!preemptible) issue(line_no, "preemptible " + quoted(f[4]) + " is not true, false, 1 or 0");
    if (!arrival || !priority || !prompt || !output || !preemptible) return;
    check_order(*arrival, line_no);
    trace_.requests.push_back({*arrival, *priority, static_cast<std::uint32_t>(*prompt),
                               static_cast<std::uint32_t>(*output), *preemptible});
  }

  void azure_row(const std::vector<std::string_view>& f, std::size_t line_no, std::optional<std::int64_t>& first_ns) {
    if (!field_count(f, 3, line_no)) return;
    std::string why;
    const auto ts = parse_timestamp(f[0]);
    if (!ts) issue(line_no, "TIMESTAMP " + quoted(f[0]) + " is not a date 'YYYY-MM-DD HH:MM:SS[.fraction]' from 1678 to 2261");
    const auto prompt = parse_count(f[1], "ContextTokens", 1, kMaxTraceTokens, why);
    if (!prompt) issue(line_no, why);
    const auto output = parse_count(f[2], "GeneratedTokens", 1, kMaxTraceTokens, why);
    if (!output) issue(line_no, why);
    // Draw for every row, valid or not, so a row's priority depends only on its position.
    const Priority priority = mix_.mix.pick(rng_.uniform());
    const bool preemptible = rng_.uniform() < mix_.preemptible_fraction;
    if (!ts || !prompt || !output) return;
    if (!first_ns) first_ns = *ts;
    if (*ts < *first_ns) {
      issue(line_no, "TIMESTAMP " + quoted(f[0]) + " is earlier than the first row's (rows must be sorted)");
      return;
    }
    std::int64_t since_first = 0;  // overflows only far beyond the limit below
    const bool overflow = __builtin_sub_overflow(*ts, *first_ns, &since_first);
    const double arrival_ms = static_cast<double>(since_first) / 1e6;
    if (overflow || arrival_ms > kMaxTimeMs) {
      issue(line_no, "TIMESTAMP " + quoted(f[0]) + " is more than 1e12 ms (the simulator's limit) after the first row's");
      return;
    }
    check_order(arrival_ms, line_no);
    trace_.requests.push_back({arrival_ms, priority, static_cast<std::uint32_t>(*prompt),
                               static_cast<std::uint32_t>(*output), preemptible});
  }

  std::string_view source_;
  MixOptions mix_;
  Rng rng_;
  Trace trace_;
  std::vector<TraceIssue> issues_;
  std::size_t header_line_ = 0;
  double last_arrival_ms_ = 0;
};

std::string summarize(const std::string& source, const std::vector<TraceIssue>& issues) {
  std::string s = source + ": " + count_issues(issues);
  if (!issues.empty()) s += " (first: line " + std::to_string(issues.front().line) + ": " + issues.front().message + ")";
  return s;
}

}  // namespace

std::string shortest(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

std::string count_issues(const std::vector<TraceIssue>& issues) {
  std::set<std::size_t> lines;
  for (const TraceIssue& i : issues) lines.insert(i.line);
  const auto plural = [](std::size_t n, const char* one, const char* many) {
    return std::to_string(n) + (n == 1 ? one : many);
  };
  if (lines.size() == issues.size()) return plural(issues.size(), " bad line", " bad lines");
  return plural(issues.size(), " problem", " problems") + " on " + plural(lines.size(), " line", " lines");
}

std::optional<Priority> parse_priority(std::string_view name) {
  for (const Priority p : kPrioritiesHighFirst) {
    if (iequals(name, scheduling::to_string(p))) return p;
  }
  return std::nullopt;
}

PriorityMix PriorityMix::parse(std::string_view text) {
  PriorityMix mix;
  mix.weight.fill(0.0);
  std::array<bool, 4> seen{};
  for (std::string_view item : split(text)) {
    const auto eq = item.find('=');
    if (eq == std::string_view::npos) {
      throw std::invalid_argument("priority mix item " + quoted(item) + " is not Name=percent");
    }
    const auto p = parse_priority(trim(item.substr(0, eq)));
    if (!p) throw std::invalid_argument("unknown priority " + quoted(trim(item.substr(0, eq))) + " in the mix");
    const std::string_view num = trim(item.substr(eq + 1));
    double v = 0;
    const auto [end, ec] = std::from_chars(num.data(), num.data() + num.size(), v);
    if (num.empty() || ec != std::errc{} || end != num.data() + num.size() || !std::isfinite(v) || v < 0) {
      throw std::invalid_argument("mix share " + quoted(num) + " is not a non-negative number");
    }
    if (seen[scheduling::value(*p)]) throw std::invalid_argument("priority given twice in the mix");
    seen[scheduling::value(*p)] = true;
    mix.weight[scheduling::value(*p)] = v;
  }
  double total = 0;
  for (double w : mix.weight) total += w;
  if (total <= 0) throw std::invalid_argument("the priority mix has no positive share");
  return mix;
}

std::string PriorityMix::to_string() const {
  std::string s;
  for (const Priority p : kPrioritiesHighFirst) {
    if (!s.empty()) s += ',';
    char buf[32];
    const auto r = std::to_chars(buf, buf + sizeof buf, weight[scheduling::value(p)]);
    s += scheduling::to_string(p);
    s += '=';
    s.append(buf, r.ptr);
  }
  return s;
}

Priority PriorityMix::pick(double u) const {
  double total = 0;
  for (double w : weight) total += w;
  double x = u * total;
  // Highest priority first, so the cut points read like the mix string.
  for (const Priority p : kPrioritiesHighFirst) {
    const double w = weight[scheduling::value(p)];
    if (x < w) return p;
    x -= w;
  }
  for (const Priority p : kPrioritiesHighFirst) {  // rounding at u close to 1
    if (weight[scheduling::value(p)] > 0) return p;
  }
  return Priority::Normal;
}

double Rng::exponential(double mean) { return -mean * std::log1p(-uniform()); }

double Rng::normal() {
  if (spare_) {
    const double v = *spare_;
    spare_.reset();
    return v;
  }
  const double u1 = 1.0 - uniform();  // (0, 1]: log is finite
  const double u2 = uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  spare_ = r * std::sin(2.0 * std::numbers::pi * u2);
  return r * std::cos(2.0 * std::numbers::pi * u2);
}

std::string_view to_string(TraceFormat f) {
  switch (f) {
    case TraceFormat::Auto: return "auto";
    case TraceFormat::Csv: return "csv";
    case TraceFormat::Azure: return "azure";
  }
  return "unknown";
}

TraceError::TraceError(std::string source, std::vector<TraceIssue> issues)
    : std::runtime_error(summarize(source, issues)), source_(std::move(source)), issues_(std::move(issues)) {}

Trace parse_trace(std::istream& in, std::string_view source, TraceFormat format, const MixOptions& mix) {
  return Parser(source, mix).run(in, format);
}

Trace load_trace(const std::string& path, TraceFormat format, const MixOptions& mix) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw std::runtime_error("cannot read trace " + path + ": a directory");
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open trace " + path);
  return parse_trace(in, path, format, mix);
}

void write_csv(std::ostream& out, std::span<const Request> requests, std::span<const std::string> comment) {
  for (const auto& line : comment) out << "# " << line << '\n';
  out << kCsvHeader << '\n';
  char buf[64];
  for (const Request& r : requests) {
    // Shortest text that reads back as the same double.
    const auto res = std::to_chars(buf, buf + sizeof buf, r.arrival_ms);
    out.write(buf, res.ptr - buf);
    out << ',' << scheduling::to_string(r.priority) << ',' << r.prompt_tokens << ',' << r.output_tokens << ','
        << (r.preemptible ? "true" : "false") << '\n';
  }
}

void scale_rate(std::span<Request> requests, double scale) {
  if (!(scale > 0) || !std::isfinite(scale)) throw std::invalid_argument("rate scale must be a positive number");
  for (Request& r : requests) {
    const double scaled = r.arrival_ms / scale;
    if (!(scaled <= kMaxTimeMs)) {
      throw std::invalid_argument("rate scale " + shortest(scale) + " puts an arrival at " + shortest(r.arrival_ms) +
                                  " ms at " + shortest(scaled) + " ms, beyond the simulator's limit of 1e12 ms");
    }
  }
  for (Request& r : requests) r.arrival_ms /= scale;
}

}  // namespace tgi_gtc::sim
