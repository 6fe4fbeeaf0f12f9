// Options for stress cases, parsed by the shared test main.
#pragma once

#include <cstdint>
#include <random>

namespace tgi_test {
/// --iters=N or TGI_STRESS_ITERS, else `fallback`.
std::uint64_t iterations(std::uint64_t fallback);
/// --seed=S or TGI_STRESS_SEED, else one random seed for the whole run.
/// Stress cases print it (MESSAGE) so a failure can be replayed.
std::uint64_t seed();
}  // namespace tgi_test
