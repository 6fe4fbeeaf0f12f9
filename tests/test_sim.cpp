// Tests of the serving simulator's library (tools/sim): trace parsing, the
// generator, the cost model, and whole simulated runs through the Engine.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <streambuf>
#include <string>
#include <vector>

#include "generator.hpp"
#include "model.hpp"
#include "report.hpp"
#include "simulation.hpp"
#include "trace.hpp"

using namespace tgi_gtc::sim;
using tgi_gtc::scheduling::value;

namespace {

Trace parse(const std::string& text, TraceFormat format = TraceFormat::Auto, const MixOptions& mix = {}) {
  std::istringstream in(text);
  return parse_trace(in, "test.csv", format, mix);
}

// The issues parse() reports, or none if it succeeds.
std::vector<TraceIssue> issues_of(const std::string& text, TraceFormat format = TraceFormat::Auto) {
  try {
    parse(text, format);
  } catch (const TraceError& e) {
    return e.issues();
  }
  return {};
}

const ClassStats& of(const PolicyResult& r, Priority p) { return r.by_priority[value(p)]; }

std::string json_of(const PolicyResult& r, std::span<const Request> requests) {
  RunInfo info;
  info.requests = requests.size();
  std::ostringstream out;
  write_json(out, info, std::span(&r, 1));
  return out.str();
}

// A small device: 64 blocks of 16 tokens, unit step cost 10 ms.
ServerConfig small_server() {
  ServerConfig s;
  s.device_blocks = 64;
  s.host_blocks = 64;
  s.block_size = 16;
  s.max_running = 16;
  s.max_step_tokens = 4096;
  s.max_queue = 64;
  return s;
}

CostModel flat_cost() {
  CostModel c;
  c.base_ms = 10;
  c.prefill_ms_per_token = 0;
  c.decode_ms_per_seq = 0;
  c.swap_ms_per_block = 0;
  return c;
}

// Three long Low tasks take 57 of the 64 blocks (growing to 60); a Critical
// that needs 10 blocks arrives just after them.
std::vector<Request> critical_behind_low() {
  std::vector<Request> r;
  for (int i = 0; i < 3; ++i) r.push_back({0.0, Priority::Low, 300, 20, true});
  r.push_back({1.0, Priority::Critical, 150, 5, false});
  return r;
}

}  // namespace

TEST_SUITE("sim trace") {
  TEST_CASE("a well-formed CSV trace parses every row") {
    const Trace t = parse(
        "# a comment\n"
        "arrival_ms,priority,prompt_tokens,output_tokens,preemptible\n"
        "0,Critical,100,10,false\n"
        "\n"
        "12.5, high , 7, 3, 1\r\n"
        "12.5,LOW,1,1,0\n");
    REQUIRE(t.requests.size() == 3);
    CHECK(t.format == TraceFormat::Csv);
    CHECK(t.requests[0] == Request{0.0, Priority::Critical, 100, 10, false});
    CHECK(t.requests[1] == Request{12.5, Priority::High, 7, 3, true});
    CHECK(t.requests[2] == Request{12.5, Priority::Low, 1, 1, false});
  }

  TEST_CASE("bad CSV rows are all reported with their line numbers") {
    const auto issues = issues_of(
        "arrival_ms,priority,prompt_tokens,output_tokens,preemptible\n"
        "0,Normal,10,10,true\n"
        "# comment lines still count\n"
        "5,Urgent,10,10,true\n"
        "6,Normal,ten,10,true\n"
        "7,Normal,10,0,true\n"
        "8,Normal,10,10,maybe\n"
        "9,Normal,10,10\n"
        "-1,Normal,10,10,true\n"
        "x,Normal,10,10,true\n"
        "10,Normal,10.5,10,true\n");
    REQUIRE(issues.size() == 8);
    const std::vector<std::size_t> lines{4, 5, 6, 7, 8, 9, 10, 11};
    for (std::size_t i = 0; i < lines.size(); ++i) CHECK(issues[i].line == lines[i]);
    CHECK(issues[0].message.find("Urgent") != std::string::npos);
    CHECK(issues[1].message.find("prompt_tokens") != std::string::npos);
    CHECK(issues[2].message.find("output_tokens") != std::string::npos);
    CHECK(issues[3].message.find("maybe") != std::string::npos);
    CHECK(issues[4].message.find("fields") != std::string::npos);
    CHECK(issues[5].message.find("negative") != std::string::npos);
  }

  TEST_CASE("a row arriving before the previous one is an error, not reordered") {
    const auto issues = issues_of(
        "arrival_ms,priority,prompt_tokens,output_tokens,preemptible\n"
        "10,Normal,10,10,true\n"
        "5,Normal,10,10,true\n");
    REQUIRE(issues.size() == 1);
    CHECK(issues[0].line == 3);
    CHECK(issues[0].message.find("sorted") != std::string::npos);
  }

  TEST_CASE("a wrong header is reported on its line and stops parsing") {
    const auto issues = issues_of("\n# note\narrival,priority\n0,Normal,1,1,true\n");
    REQUIRE(issues.size() == 1);
    CHECK(issues[0].line == 3);
    CHECK(issues[0].message.find("header") != std::string::npos);
  }

  TEST_CASE("an empty trace or a header alone is an error") {
    CHECK(issues_of("").size() == 1);
    CHECK(issues_of("# only a comment\n").size() == 1);
    const auto header_only = issues_of("arrival_ms,priority,prompt_tokens,output_tokens,preemptible\n");
    REQUIRE(header_only.size() == 1);
    CHECK(header_only[0].line == 1);
  }

  TEST_CASE("the TraceError message names the source, the count and the first line") {
    try {
      parse("arrival_ms,priority,prompt_tokens,output_tokens,preemptible\n0,Normal,0,1,true\n");
      FAIL("parse should have thrown");
    } catch (const TraceError& e) {
      const std::string what = e.what();
      CHECK(what.find("test.csv") != std::string::npos);
      CHECK(what.find("1 bad line") != std::string::npos);
      CHECK(what.find("line 2") != std::string::npos);
    }
  }

  TEST_CASE("an Azure trace gives arrivals relative to its first row, across midnight") {
    const Trace t = parse(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 23:59:59.5000000,374,44\n"
        "2023-11-17 00:00:00.2500000,396,109\n"
        "2023-11-17 00:00:01,5,1\n");
    REQUIRE(t.requests.size() == 3);
    CHECK(t.format == TraceFormat::Azure);
    CHECK(t.requests[0].arrival_ms == 0.0);
    CHECK(t.requests[1].arrival_ms == doctest::Approx(750.0));
    CHECK(t.requests[2].arrival_ms == doctest::Approx(1500.0));
    CHECK(t.requests[1].prompt_tokens == 396);
    CHECK(t.requests[1].output_tokens == 109);
    CHECK(t.priority_note.find("Critical=5") != std::string::npos);
    CHECK(t.priority_note.find("seed 1") != std::string::npos);
  }

  TEST_CASE("an Azure date that does not exist is a bad line") {
    const std::string head = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-02-28 00:00:00,10,10\n";
    CHECK(issues_of(head + "2023-02-29 00:00:00,10,10\n").size() == 1);  // not a leap year
    CHECK(issues_of(head + "2023-04-31 00:00:00,10,10\n").size() == 1);
    CHECK(issues_of("TIMESTAMP,ContextTokens,GeneratedTokens\n2024-02-29 00:00:00,10,10\n").empty());
    CHECK(issues_of("TIMESTAMP,ContextTokens,GeneratedTokens\n2000-02-29 00:00:00,10,10\n").empty());
    CHECK(issues_of("TIMESTAMP,ContextTokens,GeneratedTokens\n1900-02-29 00:00:00,10,10\n").size() == 1);
  }

  TEST_CASE("an Azure row beyond the clock's range, or beyond 64-bit nanoseconds, is a bad line") {
    const std::string head = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
    const auto late = issues_of(head + "2000-01-01 00:00:00,10,10\n2040-01-01 00:00:00,10,10\n");
    REQUIRE(late.size() == 1);
    CHECK(late[0].line == 3);
    CHECK(late[0].message.find("1e12") != std::string::npos);
    // Past 2262 nanoseconds since 1970 overflow 64 bits: refused, not wrapped.
    const auto wrapped = issues_of(head + "1970-01-01 00:00:00,10,10\n2554-07-22 00:00:00,10,10\n");
    REQUIRE(wrapped.size() == 1);
    CHECK(wrapped[0].line == 3);
    CHECK(issues_of(head + "1678-01-01 00:00:00,10,10\n2261-12-31 00:00:00,10,10\n").size() == 1);
    CHECK(issues_of(head + "2261-12-31 00:00:00,10,10\n1678-01-01 00:00:00,10,10\n").size() == 1);
  }

  TEST_CASE("bad Azure rows are reported with their line numbers") {
    const auto issues = issues_of(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.68,374,44\n"
        "2023-11-16 18:15:4x,374,44\n"
        "2023-11-16 18:15:47,0,44\n"
        "2023-11-16 18:15:46,3,4\n");
    REQUIRE(issues.size() == 3);
    CHECK(issues[0].line == 3);
    CHECK(issues[1].line == 4);
    CHECK(issues[2].line == 5);
    CHECK(issues[2].message.find("sorted") != std::string::npos);
  }

  TEST_CASE("a header of the other format is rejected when the format is forced") {
    const auto issues = issues_of("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,1\n", TraceFormat::Csv);
    REQUIRE(issues.size() == 1);
    CHECK(issues[0].line == 1);
  }

  TEST_CASE("Azure priorities follow the seeded mix and depend only on the seed") {
    std::string text = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
    for (int i = 0; i < 4000; ++i) text += "2023-11-16 18:15:46." + std::to_string(1000 + i) + ",10,10\n";
    MixOptions mix;
    mix.mix = PriorityMix::parse("Critical=10,Low=90");
    mix.seed = 7;
    const Trace a = parse(text, TraceFormat::Azure, mix);
    const Trace b = parse(text, TraceFormat::Azure, mix);
    CHECK(a.requests == b.requests);
    const auto critical = std::count_if(a.requests.begin(), a.requests.end(),
                                        [](const Request& r) { return r.priority == Priority::Critical; });
    const auto low = std::count_if(a.requests.begin(), a.requests.end(),
                                   [](const Request& r) { return r.priority == Priority::Low; });
    CHECK(critical + low == 4000);
    CHECK(critical == doctest::Approx(400).epsilon(0.2));
    mix.seed = 8;
    CHECK(parse(text, TraceFormat::Azure, mix).requests != a.requests);
  }

  TEST_CASE("a priority mix parses names in any case and rejects nonsense") {
    const PriorityMix m = PriorityMix::parse("low=10, Critical=5 ,HIGH=25,Normal=60");
    CHECK(m.weight[value(Priority::Low)] == 10);
    CHECK(m.weight[value(Priority::Critical)] == 5);
    CHECK(m.to_string() == "Critical=5,High=25,Normal=60,Low=10");
    CHECK_THROWS_AS(PriorityMix::parse("Urgent=5"), std::invalid_argument);
    CHECK_THROWS_AS(PriorityMix::parse("Low=-1"), std::invalid_argument);
    CHECK_THROWS_AS(PriorityMix::parse("Low=0"), std::invalid_argument);
    CHECK_THROWS_AS(PriorityMix::parse("Low=1,Low=2"), std::invalid_argument);
    CHECK_THROWS_AS(PriorityMix::parse("Low"), std::invalid_argument);
  }

  TEST_CASE("write_csv output parses back to the same requests") {
    GeneratorConfig g;
    g.count = 500;
    g.rate_rps = 20;
    const auto requests = generate(g, CostModel{}, ServerConfig{}).requests;
    std::ostringstream out;
    const std::vector<std::string> comment{"made by a test"};
    write_csv(out, requests, comment);
    CHECK(out.str().rfind("# made by a test\n", 0) == 0);
    CHECK(parse(out.str()).requests == requests);
  }

  TEST_CASE("scale_rate divides arrival times") {
    std::vector<Request> r{{0, Priority::Low, 1, 1, true}, {100, Priority::Low, 1, 1, true}};
    scale_rate(r, 4);
    CHECK(r[1].arrival_ms == 25.0);
    CHECK_THROWS_AS(scale_rate(r, 0), std::invalid_argument);
    // Past the simulated clock's range: refused, and nothing is changed.
    CHECK_THROWS_AS(scale_rate(r, 1e-12), std::invalid_argument);
    CHECK(r[1].arrival_ms == 25.0);
  }

  TEST_CASE("an arrival beyond the simulated clock's range is a bad line, with its number") {
    const auto issues = issues_of(
        "arrival_ms,priority,prompt_tokens,output_tokens,preemptible\n0,High,10,10,true\n1e13,High,10,10,true\n");
    REQUIRE(issues.size() == 1);
    CHECK(issues[0].line == 3);
    CHECK(issues[0].message.find("1e12") != std::string::npos);
    CHECK(issues_of("arrival_ms,priority,prompt_tokens,output_tokens,preemptible\n1e12,High,10,10,true\n").empty());
  }

  TEST_CASE("a UTF-8 byte-order mark before the header is skipped") {
    const Trace t = parse("\xEF\xBB\xBF" "arrival_ms,priority,prompt_tokens,output_tokens,preemptible\n0,High,10,10,true\n");
    REQUIRE(t.requests.size() == 1);
    CHECK(t.format == TraceFormat::Csv);
  }

  TEST_CASE("a read error is an error, not the end of the trace") {
    // Serves the header and one row, then fails as a disk read would (EIO).
    struct FailingBuf : std::streambuf {
      std::string text = "arrival_ms,priority,prompt_tokens,output_tokens,preemptible\n0,High,10,10,true\n";
      bool served = false;
      int_type underflow() override {
        if (served) throw std::ios_base::failure("EIO");
        served = true;
        setg(text.data(), text.data(), text.data() + text.size());
        return traits_type::to_int_type(text[0]);
      }
    } buf;
    std::istream in(&buf);
    try {
      parse_trace(in, "disk.csv");
      FAIL("parse_trace should have thrown");
    } catch (const TraceError&) {
      FAIL("a read error is not a bad line");
    } catch (const std::runtime_error& e) {
      CHECK(std::string(e.what()).find("read error") != std::string::npos);
    }
  }

  TEST_CASE("several problems on one line are counted as problems, not lines") {
    try {
      parse("arrival_ms,priority,prompt_tokens,output_tokens,preemptible\n\"0\",\"High\",\"10\",\"10\",\"true\"\n");
      FAIL("parse should have thrown");
    } catch (const TraceError& e) {
      CHECK(e.issues().size() == 5);
      CHECK(std::string(e.what()).find("5 problems on 1 line") != std::string::npos);
    }
  }

  TEST_CASE("reading a directory as a trace says so") {
    CHECK_THROWS_WITH_AS(load_trace("."), doctest::Contains("directory"), std::runtime_error);
  }
}

TEST_SUITE("sim generator") {
  TEST_CASE("the same seed gives the same trace and another seed a different one") {
    GeneratorConfig g;
    g.count = 1000;
    const auto a = generate(g, CostModel{}, ServerConfig{});
    const auto b = generate(g, CostModel{}, ServerConfig{});
    CHECK(a.requests == b.requests);
    g.seed = 2;
    CHECK(generate(g, CostModel{}, ServerConfig{}).requests != a.requests);
  }

  TEST_CASE("the generated priorities follow the mix") {
    GeneratorConfig g;
    g.count = 20000;
    g.rate_rps = 10;
    const auto t = generate(g, CostModel{}, ServerConfig{});
    std::array<double, 4> share{};
    for (const Request& r : t.requests) share[value(r.priority)] += 1.0 / static_cast<double>(g.count);
    CHECK(share[value(Priority::Critical)] == doctest::Approx(0.05).epsilon(0.15));
    CHECK(share[value(Priority::High)] == doctest::Approx(0.25).epsilon(0.05));
    CHECK(share[value(Priority::Normal)] == doctest::Approx(0.60).epsilon(0.05));
    CHECK(share[value(Priority::Low)] == doctest::Approx(0.10).epsilon(0.10));
  }

  TEST_CASE("generated lengths are lognormal around the median and clamped") {
    GeneratorConfig g;
    g.count = 20001;
    g.rate_rps = 10;
    g.prompt = {500, 1.0, 3000};
    const auto t = generate(g, CostModel{}, ServerConfig{});
    std::vector<std::uint32_t> prompts;
    for (const Request& r : t.requests) prompts.push_back(r.prompt_tokens);
    std::sort(prompts.begin(), prompts.end());
    CHECK(prompts[prompts.size() / 2] == doctest::Approx(500).epsilon(0.05));
    CHECK(prompts.front() >= 1);
    CHECK(prompts.back() == 3000);  // P(> 6x median) is 3.7%: some were clamped
  }

  TEST_CASE("Poisson arrivals come at the requested rate and in order") {
    GeneratorConfig g;
    g.count = 20001;
    g.rate_rps = 8;
    const auto t = generate(g, CostModel{}, ServerConfig{});
    CHECK(std::is_sorted(t.requests.begin(), t.requests.end(),
                         [](const Request& a, const Request& b) { return a.arrival_ms < b.arrival_ms; }));
    CHECK(t.requests.front().arrival_ms == 0.0);
    CHECK(offered_rps(t.requests) == doctest::Approx(8).epsilon(0.03));
  }

  TEST_CASE("bursty arrivals keep the mean rate but cluster") {
    // Index of dispersion of arrivals per second: about 1 for Poisson, well
    // above for a Markov-modulated process.
    const auto dispersion = [](const std::vector<Request>& r) {
      std::vector<double> counts(static_cast<std::size_t>(r.back().arrival_ms / 1000) + 1);
      for (const Request& q : r) counts[static_cast<std::size_t>(q.arrival_ms / 1000)] += 1;
      const double mean = std::accumulate(counts.begin(), counts.end(), 0.0) / static_cast<double>(counts.size());
      double var = 0;
      for (double c : counts) var += (c - mean) * (c - mean);
      return var / static_cast<double>(counts.size()) / mean;
    };
    GeneratorConfig g;
    g.count = 20000;
    g.rate_rps = 10;
    const auto poisson = generate(g, CostModel{}, ServerConfig{});
    g.arrivals = ArrivalProcess::Bursty;
    const auto bursty = generate(g, CostModel{}, ServerConfig{});
    CHECK(offered_rps(bursty.requests) == doctest::Approx(10).epsilon(0.15));
    CHECK(dispersion(poisson.requests) < 1.5);
    CHECK(dispersion(bursty.requests) > 5);
  }

  TEST_CASE("a load is turned into a rate through the capacity estimate") {
    GeneratorConfig g;
    g.count = 2000;
    g.load = 1.5;
    const auto t = generate(g, CostModel{}, ServerConfig{});
    CHECK(t.capacity_rps == doctest::Approx(estimate_capacity_rps(CostModel{}, ServerConfig{}, t.requests)));
    CHECK(t.rate_rps == doctest::Approx(1.5 * t.capacity_rps));
  }

  TEST_CASE("invalid generator settings are refused") {
    GeneratorConfig g;
    g.count = 3;
    g.rate_rps = 1e-300;  // arrivals far beyond the simulated clock's range
    CHECK_THROWS_AS(generate(g, CostModel{}, ServerConfig{}), std::invalid_argument);
    g = GeneratorConfig{};
    g.arrivals = ArrivalProcess::Bursty;
    g.burst_factor = 6;  // 6 x 0.2 > 1: the lull rate would be negative
    CHECK_THROWS_AS(generate(g, CostModel{}, ServerConfig{}), std::invalid_argument);
    g = GeneratorConfig{};
    g.preemptible_fraction = 1.5;
    CHECK_THROWS_AS(generate(g, CostModel{}, ServerConfig{}), std::invalid_argument);
  }
}

TEST_SUITE("sim model") {
  TEST_CASE("a step costs base + prefill + decode + swap terms, in whole nanoseconds") {
    CostModel c;
    c.base_ms = 7;
    c.prefill_ms_per_token = 0.03;
    c.decode_ms_per_seq = 0.2;
    c.swap_ms_per_block = 0.3;
    CHECK(c.step(0, 0, 0) == 7'000'000);
    CHECK(c.step(1000, 0, 0) == 7'000'000 + 30'000'000);
    CHECK(c.step(0, 50, 0) == 7'000'000 + 10'000'000);
    CHECK(c.step(0, 0, 10) == 7'000'000 + 3'000'000);
    CHECK(c.step(1000, 50, 10) == 50'000'000);
  }

  TEST_CASE("a step too long for the clock saturates instead of overflowing") {
    CostModel c;
    c.prefill_ms_per_token = 1e9;
    CHECK(c.step(1000, 0, 0) == 1'000'000'000'000'000'000 + 7'000'000);
    CHECK(c.step(10'000, 0, 0) == std::numeric_limits<Nanos>::max());
    CHECK(c.step(0, std::numeric_limits<std::uint64_t>::max(), 0) == std::numeric_limits<Nanos>::max());
    c.decode_ms_per_seq = 0;  // a free term costs nothing, however large its count
    CHECK(c.step(0, std::numeric_limits<std::uint64_t>::max(), 0) == 7'000'000);
  }

  TEST_CASE("the capacity estimate follows its formula") {
    CostModel c;
    c.base_ms = 10;
    c.prefill_ms_per_token = 0.01;
    c.decode_ms_per_seq = 0.1;
    ServerConfig s;
    s.max_running = 4;  // the KV pool (98k tokens) is not the limit here
    const std::vector<Request> r{{0, Priority::Normal, 100, 50, true}, {0, Priority::Normal, 300, 150, true}};
    // mean prompt 200, mean output 100: 100 x (10/4 + 0.1) + 200 x 0.01 = 262 ms per request.
    CHECK(estimate_capacity_rps(c, s, r) == doctest::Approx(1000.0 / 262.0));
    s.max_running = 256;
    // A resident sequence holds (50 x 125 + 150 x 375) / 2 / 100 + 16/2 = 320.5 tokens on average.
    s.device_blocks = 25;  // 400 tokens: 1.248 sequences
    CHECK(estimate_capacity_rps(c, s, r) == doctest::Approx(1000.0 / (100 * (10 / (400 / 320.5) + 0.1) + 2)));
    s.device_blocks = 10;  // 160 tokens: fewer than one sequence still counts as one
    CHECK(estimate_capacity_rps(c, s, r) == doctest::Approx(1000.0 / (100 * (10 + 0.1) + 2)));
    CHECK(estimate_capacity_rps(c, s, {}) == 0.0);
  }

  TEST_CASE("policies map to the engine configuration they name") {
    const ServerConfig s = small_server();
    const auto fifo = engine_config(Policy::Fifo, s);
    CHECK_FALSE(fifo.scheduler.priority_scheduling);
    CHECK_FALSE(fifo.scheduler.enable_preemption);
    const auto prio = engine_config(Policy::Priority, s);
    CHECK(prio.scheduler.priority_scheduling);
    CHECK_FALSE(prio.scheduler.enable_preemption);
    const auto swap = engine_config(Policy::Swap, s);
    CHECK(swap.scheduler.enable_preemption);
    CHECK(swap.host_blocks == s.host_blocks);
    const auto recompute = engine_config(Policy::Recompute, s);
    CHECK(recompute.scheduler.enable_preemption);
    CHECK(recompute.host_blocks == 0);
    for (const Policy p : kAllPolicies) CHECK(parse_policy(to_string(p)) == p);
  }

  TEST_CASE("percentile is nearest-rank") {
    const std::vector<double> v{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    CHECK(percentile(v, 0) == 1);
    CHECK(percentile(v, 50) == 5);
    CHECK(percentile(v, 51) == 6);
    CHECK(percentile(v, 99) == 10);
    CHECK(percentile(v, 100) == 10);
    CHECK(std::isnan(percentile(std::vector<double>{}, 50)));
    // p% of n that binary floating point puts a hair above a whole rank.
    std::vector<double> hundred(100), many(3000);
    std::iota(hundred.begin(), hundred.end(), 1.0);
    std::iota(many.begin(), many.end(), 1.0);
    for (const int p : {7, 14, 28, 55, 56}) {
      CAPTURE(p);
      CHECK(percentile(hundred, p) == p);
      CHECK(percentile(many, p) == 30 * p);
    }
    CHECK(percentile(many, 99.9) == 2997);
  }
}

TEST_SUITE("sim run") {
  TEST_CASE("a lone request takes one step per output token and its TTFT is its prefill step") {
    const std::vector<Request> r{{0, Priority::Normal, 32, 5, true}};
    const auto res = simulate(r, Policy::Fifo, small_server(), flat_cost());
    REQUIRE(res.failure.empty());
    const ClassStats& c = of(res, Priority::Normal);
    REQUIRE(c.completed == 1);
    CHECK(c.ttft_ms[0] == 10.0);
    CHECK(c.e2e_ms[0] == 50.0);
    CHECK(c.output_tokens == 5);
    CHECK(res.steps == 5);
    CHECK(res.makespan == 50 * kNanosPerMs);
  }

  TEST_CASE("the clock waits for late arrivals without charging idle steps") {
    const std::vector<Request> r{{0, Priority::Normal, 32, 2, true}, {1000, Priority::Normal, 32, 2, true}};
    const auto res = simulate(r, Policy::Fifo, small_server(), flat_cost());
    const ClassStats& c = of(res, Priority::Normal);
    REQUIRE(c.completed == 2);
    CHECK(c.e2e_ms == std::vector<double>{20.0, 20.0});
    CHECK(res.steps == 4);
    CHECK(res.makespan == 1020 * kNanosPerMs);
    CHECK(res.busy == 40 * kNanosPerMs);
  }

  TEST_CASE("a whole run is deterministic and conserves tokens") {
    GeneratorConfig g;
    g.count = 400;
    g.seed = 11;
    g.prompt = {200, 0.8, 1000};
    g.output = {40, 0.8, 200};
    ServerConfig s = small_server();
    s.device_blocks = 512;
    s.host_blocks = 256;
    s.max_queue = 1024;  // room for every request: none is rejected, every token is produced
    g.load = 1.3;
    const auto trace = generate(g, CostModel{}, s).requests;
    std::uint64_t want_tokens = 0;
    for (const Request& r : trace) want_tokens += r.output_tokens;
    for (const Policy p : {Policy::Swap, Policy::Recompute}) {
      CAPTURE(to_string(p));
      const auto a = simulate(trace, p, s, CostModel{});
      const auto b = simulate(trace, p, s, CostModel{});
      REQUIRE(a.failure.empty());
      CHECK(json_of(a, trace) == json_of(b, trace));
      std::size_t done = 0, rejected = 0;
      for (const auto& c : a.by_priority) {
        done += c.completed;
        rejected += c.rejected_queue_full + c.rejected_too_large;
      }
      CHECK(rejected == 0);
      CHECK(done == trace.size());
      CHECK(a.output_tokens() == want_tokens);
      CHECK(a.kv_utilization > 0);
      CHECK(a.kv_utilization <= 1);
    }
  }

  TEST_CASE("a Critical arriving behind Low tasks that fill the pool preempts them by swapping") {
    const auto trace = critical_behind_low();
    const auto waiting = simulate(trace, Policy::Priority, small_server(), flat_cost());
    const auto swap = simulate(trace, Policy::Swap, small_server(), flat_cost());
    REQUIRE(swap.failure.empty());
    CHECK(of(waiting, Priority::Low).preemptions == 0);
    CHECK(of(swap, Priority::Low).preemptions >= 1);
    CHECK(of(swap, Priority::Low).swapped_blocks > 0);
    CHECK(of(swap, Priority::Low).recomputed_tokens == 0);
    CHECK(of(swap, Priority::Critical).preemptions == 0);
    REQUIRE(of(swap, Priority::Critical).completed == 1);
    REQUIRE(of(waiting, Priority::Critical).completed == 1);
    CHECK(of(swap, Priority::Critical).ttft_ms[0] < of(waiting, Priority::Critical).ttft_ms[0]);
    CHECK(of(swap, Priority::Low).completed == 3);
  }

  TEST_CASE("a Critical arriving behind Low tasks that fill the pool preempts them for recompute") {
    const auto trace = critical_behind_low();
    const auto waiting = simulate(trace, Policy::Priority, small_server(), flat_cost());
    const auto recompute = simulate(trace, Policy::Recompute, small_server(), flat_cost());
    REQUIRE(recompute.failure.empty());
    CHECK(of(recompute, Priority::Low).preemptions >= 1);
    CHECK(of(recompute, Priority::Low).recomputed_tokens >= 300);
    CHECK(of(recompute, Priority::Low).swapped_blocks == 0);
    REQUIRE(of(recompute, Priority::Critical).completed == 1);
    CHECK(of(recompute, Priority::Critical).ttft_ms[0] < of(waiting, Priority::Critical).ttft_ms[0]);
    CHECK(of(recompute, Priority::Low).completed == 3);
  }

  TEST_CASE("a recomputed task pays its prefill again but keeps its first TTFT") {
    CostModel c = flat_cost();
    c.prefill_ms_per_token = 0.01;
    const auto trace = critical_behind_low();
    const auto recompute = simulate(trace, Policy::Recompute, small_server(), c);
    const auto waiting = simulate(trace, Policy::Priority, small_server(), c);
    const ClassStats& low = of(recompute, Priority::Low);
    REQUIRE(low.completed == 3);
    // Prefill time covers every prompt once plus the recomputed tokens.
    const Nanos prompts = ms_to_nanos(0.01) * (3 * 300 + 150);
    CHECK(recompute.prefill_time == prompts + ms_to_nanos(0.01) * static_cast<Nanos>(low.recomputed_tokens));
    // The Lows were admitted in the first step in both runs: same TTFT.
    CHECK(low.ttft_ms == of(waiting, Priority::Low).ttft_ms);
  }

  TEST_CASE("each step-cost term is charged to the steps that incur it") {
    // A lone request under a cost model of one term, at 1 ms, and nothing else.
    const auto lone_with = [](double CostModel::*term) {
      const std::vector<Request> lone{{0, Priority::Normal, 32, 5, true}};
      CostModel c = flat_cost();
      c.base_ms = 0;
      c.*term = 1;
      const auto res = simulate(lone, Policy::Fifo, small_server(), c);
      REQUIRE(of(res, Priority::Normal).completed == 1);
      return res;
    };
    SUBCASE("prefill: the admitting step pays for the prompt, the decode steps nothing") {
      const auto res = lone_with(&CostModel::prefill_ms_per_token);
      CHECK(of(res, Priority::Normal).ttft_ms[0] == 32.0);
      CHECK(of(res, Priority::Normal).e2e_ms[0] == 32.0);
      CHECK(res.prefill_time == 32 * kNanosPerMs);
      CHECK(res.decode_time == 0);
    }
    SUBCASE("decode: a task pays for decoding only in the steps after its prefill") {
      const auto res = lone_with(&CostModel::decode_ms_per_seq);
      CHECK(of(res, Priority::Normal).ttft_ms[0] == 0.0);  // the prefill step produced token 1
      CHECK(of(res, Priority::Normal).e2e_ms[0] == 4.0);   // tokens 2-5, one decode step each
      CHECK(res.decode_time == 4 * kNanosPerMs);
    }
    SUBCASE("swap: every block copied, out and back in, is paid for") {
      CostModel c = flat_cost();  // 10 ms a step, so that the Critical arrives while the Lows run
      c.swap_ms_per_block = 1;
      const auto res = simulate(critical_behind_low(), Policy::Swap, small_server(), c);
      REQUIRE(res.failure.empty());
      std::uint64_t copied = 0;  // swap-outs and swap-ins, all classes
      for (const ClassStats& k : res.by_priority) copied += k.swapped_blocks;
      REQUIRE(copied > 0);
      CHECK(res.swap_time == static_cast<Nanos>(copied) * kNanosPerMs);
      CHECK(res.busy == static_cast<Nanos>(res.steps) * 10 * kNanosPerMs + res.swap_time);
    }
    SUBCASE("recompute: a resumed task prefills its prompt and every token it had generated") {
      // Step 1 admits the three Lows (19 blocks each, 57 of 64) and produces
      // their first tokens; the Critical, arriving at 1 ms, needs 10 blocks,
      // so step 2 pauses the newest Low, which had 1 token, and releases
      // its KV. It resumes once the Critical finishes: 300 + 1 tokens again.
      CostModel c = flat_cost();
      c.prefill_ms_per_token = 0.01;
      const auto res = simulate(critical_behind_low(), Policy::Recompute, small_server(), c);
      REQUIRE(res.failure.empty());
      const ClassStats& low = of(res, Priority::Low);
      REQUIRE(low.completed == 3);
      CHECK(low.preemptions == 1);
      CHECK(low.recomputed_tokens == 301);
      CHECK(res.prefill_time == ms_to_nanos(0.01) * (3 * 300 + 150 + 301));
    }
  }

  TEST_CASE("a deadlocked pool evicts a preemptible task before a non-preemptible one, even an older one") {
    // As below, four tasks stall the pool; only the oldest, a Normal (its
    // priority only a label here: FIFO ranks every task alike), is
    // preemptible. Newest first among equals would evict a Low.
    std::vector<Request> r{{0, Priority::Normal, 200, 400, true}};
    for (int i = 0; i < 3; ++i) r.push_back({0, Priority::Low, 200, 400, false});
    const auto res = simulate(r, Policy::Fifo, small_server(), flat_cost());
    REQUIRE(res.failure.empty());
    CHECK(of(res, Priority::Normal).evictions >= 1);
    CHECK(of(res, Priority::Normal).completed == 1);
    CHECK(of(res, Priority::Low).completed == 3);
  }

  TEST_CASE("without preemption a pool deadlock is broken by evicting and resubmitting a task") {
    // Four tasks start with 13 blocks each and would grow to 38: every one
    // stalls long before any finishes.
    const std::vector<Request> r(4, Request{0, Priority::Low, 200, 400, true});
    const auto res = simulate(r, Policy::Fifo, small_server(), flat_cost());
    REQUIRE(res.failure.empty());
    const ClassStats& low = of(res, Priority::Low);
    CHECK(low.completed == 4);
    CHECK(low.evictions >= 1);
    CHECK(low.recomputed_tokens > 200 * low.evictions);
    CHECK(low.preemptions == 0);
    CHECK(low.output_tokens == 4 * 400);
    CHECK(res.stalled_appends > 0);
    // All four were admitted by the first step; eviction keeps that TTFT.
    CHECK(low.ttft_ms == std::vector<double>(4, 10.0));
  }

  TEST_CASE("an evicted task that finds the waiting queue full is held and resubmitted, not rejected") {
    // Four Low tasks run and stall the pool; four more fill the queue of 4.
    // Every eviction then meets a full queue: the loop keeps the task, which
    // had been accepted and produced tokens, and submits it again first.
    std::vector<Request> r(4, Request{0, Priority::Low, 200, 400, true});
    for (int i = 0; i < 4; ++i) r.push_back({5, Priority::Low, 200, 400, true});
    ServerConfig s = small_server();
    s.max_running = 4;
    s.max_queue = 4;
    const auto res = simulate(r, Policy::Fifo, s, flat_cost());
    REQUIRE(res.failure.empty());
    const ClassStats& low = of(res, Priority::Low);
    CHECK(low.evictions >= 1);
    CHECK(low.rejected_queue_full == 0);
    CHECK(low.completed == 8);
    CHECK(low.output_tokens == 8 * 400);
  }

  TEST_CASE("a held evicted task goes back as soon as the queue has room, not at the next arrival") {
    // Low is evicted while High fills the queue of 1, and is held; the next
    // step admits High, Normal and High finish, the engine is idle. Low must
    // go back then, not wait for the Critical arrival 100 s later (and push
    // it out of the queue).
    const std::vector<Request> r{{0, Priority::Normal, 16, 18, true},
                                 {0.5, Priority::Low, 16, 40, true},
                                 {10, Priority::High, 16, 1, true},
                                 {100'000, Priority::Critical, 16, 1, true}};
    ServerConfig s = small_server();
    s.device_blocks = 4;
    s.max_queue = 1;
    const auto res = simulate(r, Policy::Fifo, s, CostModel{});
    REQUIRE(res.failure.empty());
    const ClassStats& low = of(res, Priority::Low);
    REQUIRE(low.completed == 1);
    CHECK(low.evictions >= 1);
    CHECK(low.e2e_ms[0] < 1000);
    CHECK(of(res, Priority::Critical).rejected_queue_full == 0);
    CHECK(of(res, Priority::Critical).completed == 1);
  }

  TEST_CASE("an arrival rejected at the end does not stretch the run") {
    ServerConfig s = small_server();
    s.device_blocks = 4;  // 64 tokens: the second request can never fit
    const std::vector<Request> one{{0, Priority::Normal, 16, 10, true}};
    std::vector<Request> two = one;
    two.push_back({100'000, Priority::Normal, 16, 100, true});
    const auto a = simulate(one, Policy::Fifo, s, flat_cost());
    const auto b = simulate(two, Policy::Fifo, s, flat_cost());
    REQUIRE(of(b, Priority::Normal).rejected_too_large == 1);
    CHECK(b.makespan == a.makespan);
    CHECK(b.kv_utilization == a.kv_utilization);
    CHECK(b.output_tokens_per_s() == a.output_tokens_per_s());
  }

  TEST_CASE("throughput and KV use are measured from the first arrival") {
    const std::vector<Request> r{{0, Priority::Normal, 32, 5, true}, {20, Priority::High, 64, 3, true}};
    std::vector<Request> late = r;
    for (Request& q : late) q.arrival_ms += 300'000;
    const auto a = simulate(r, Policy::Priority, small_server(), flat_cost());
    const auto b = simulate(late, Policy::Priority, small_server(), flat_cost());
    CHECK(a.makespan == 50 * kNanosPerMs);
    CHECK(b.makespan == a.makespan);
    CHECK(b.kv_utilization == a.kv_utilization);
    CHECK(b.output_tokens_per_s() == a.output_tokens_per_s());
  }

  TEST_CASE("a cost model that would run the clock past its range ends the run with a failure") {
    CostModel c = flat_cost();
    c.base_ms = 4e11;  // the third step would pass 1e12 ms
    const std::vector<Request> r{{0, Priority::Normal, 32, 5, true}};
    const auto res = simulate(r, Policy::Fifo, small_server(), c);
    CHECK(res.failure.find("1000000000000 ms") != std::string::npos);
    CHECK(of(res, Priority::Normal).completed == 0);
    CHECK(of(res, Priority::Normal).output_tokens == 2);
  }

  TEST_CASE("arrivals over the queue limit are rejected and counted by priority") {
    std::vector<Request> r;
    for (int i = 0; i < 2; ++i) r.push_back({0, Priority::High, 16, 2, true});
    for (int i = 0; i < 8; ++i) r.push_back({0, Priority::Low, 16, 2, true});
    ServerConfig s = small_server();
    s.max_queue = 2;
    const auto res = simulate(r, Policy::Priority, s, flat_cost());
    CHECK(of(res, Priority::High).rejected_queue_full == 0);
    CHECK(of(res, Priority::High).completed == 2);
    CHECK(of(res, Priority::Low).rejected_queue_full == 8);
    CHECK(of(res, Priority::Low).completed == 0);
  }

  TEST_CASE("requests larger than the device pool are rejected, not simulated") {
    const std::vector<Request> r{{0, Priority::Normal, 2000, 5, true},  // prompt alone exceeds 1024 tokens
                                 {0, Priority::High, 1000, 100, true},  // prompt + output exceed them
                                 {0, Priority::Low, 16, 2, true}};
    const auto res = simulate(r, Policy::Swap, small_server(), flat_cost());
    CHECK(of(res, Priority::Normal).rejected_too_large == 1);
    CHECK(of(res, Priority::High).rejected_too_large == 1);
    CHECK(of(res, Priority::Low).completed == 1);
    CHECK(res.failure.empty());
  }
}
