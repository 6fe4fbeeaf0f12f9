// doctest main shared by every test executable, plus the options stress cases
// read: --iters=N and --seed=S after the doctest options (or the environment
// variables TGI_STRESS_ITERS and TGI_STRESS_SEED).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "support/options.hpp"

namespace tgi_test {
namespace {
std::uint64_t g_iters = 0;
std::uint64_t g_seed = 0;
bool g_seed_set = false;
}  // namespace

std::uint64_t iterations(std::uint64_t fallback) { return g_iters ? g_iters : fallback; }

std::uint64_t seed() {
  if (!g_seed_set) {
    g_seed = std::random_device{}();
    g_seed_set = true;
  }
  return g_seed;
}
}  // namespace tgi_test

int main(int argc, char** argv) {
  std::vector<char*> rest;
  auto parse = [](const char* s) { return std::strtoull(s, nullptr, 10); };
  if (const char* e = std::getenv("TGI_STRESS_ITERS"); e && *e) tgi_test::g_iters = parse(e);
  if (const char* e = std::getenv("TGI_STRESS_SEED"); e && *e) {
    tgi_test::g_seed = parse(e);
    tgi_test::g_seed_set = true;
  }
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--iters=", 8) == 0) {
      tgi_test::g_iters = parse(argv[i] + 8);
    } else if (std::strncmp(argv[i], "--seed=", 7) == 0) {
      tgi_test::g_seed = parse(argv[i] + 7);
      tgi_test::g_seed_set = true;
    } else {
      rest.push_back(argv[i]);
    }
  }
  doctest::Context ctx(static_cast<int>(rest.size()), rest.data());
  return ctx.run();
}
