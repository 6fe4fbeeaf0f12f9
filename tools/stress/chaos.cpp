// The chaos hooks of sched-stress-chaos (chaos.hpp).
#include "chaos.hpp"

#include <atomic>
#include <chrono>
#include <thread>

#include "cpu_relax.hpp"  // engine/: the library's spin-wait hint
#include "driver.hpp"     // mix64

namespace tgi_gtc::scheduling::detail {
// Defined by engine/scheduler.cpp and engine/engine.cpp when they are
// compiled with TGI_GTC_TEST_HOOKS (linking without them fails here, not
// silently at run time).
extern void (*g_before_ticket_hook)(std::uint64_t unused);
extern void (*g_after_ticket_hook)(std::uint64_t ticket);
extern void (*g_take_pass_hook)(std::uint64_t head);
extern void (*g_lapped_cell_hook)(std::uint64_t ticket);
extern void (*g_published_hook)(std::uint64_t ticket);
extern void (*g_taken_hook)(std::uint64_t ticket);
extern void (*g_cancelled_hook)(std::uint64_t id);
extern void (*g_admit_peeked_hook)(std::uint64_t id);
}  // namespace tgi_gtc::scheduling::detail

namespace tgi_gtc::stress {
namespace {

namespace lib = tgi_gtc::scheduling::detail;

// Written only while no worker runs (install_chaos, remove_chaos): thread
// creation and join order them with the hooks' reads.
std::uint64_t g_seed = 0;
std::uint32_t g_every = 0;

// Totals of exited threads. Relaxed everywhere: statistics, read by the main
// thread after joining the workers, and the join orders their adds first.
std::atomic<std::uint64_t> g_hook_calls{0}, g_yields{0}, g_spins{0}, g_sleeps{0};
// Relaxed: hands each thread a distinct number for its seed; orders nothing.
std::atomic<std::uint64_t> g_threads{0};

struct ThreadChaos {
  std::uint64_t state = 0;  // xorshift64 state; 0: not seeded yet
  ChaosCounts counts;

  ThreadChaos() = default;
  ThreadChaos(const ThreadChaos&) = delete;
  ThreadChaos& operator=(const ThreadChaos&) = delete;
  ~ThreadChaos() { flush(); }

  void flush() noexcept {
    // Relaxed: statistics (see g_hook_calls).
    g_hook_calls.fetch_add(counts.hook_calls, std::memory_order::relaxed);
    g_yields.fetch_add(counts.yields, std::memory_order::relaxed);
    g_spins.fetch_add(counts.spins, std::memory_order::relaxed);
    g_sleeps.fetch_add(counts.sleeps, std::memory_order::relaxed);
    counts = {};
  }

  std::uint64_t next() noexcept {
    if (state == 0) {
      // Relaxed: a distinct number is all that is needed (see g_threads).
      state = detail::mix64(g_seed ^ (g_threads.fetch_add(1, std::memory_order::relaxed) + 1)) | 1;
    }
    state ^= state >> 12;  // xorshift64* (Vigna)
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1DULL;
  }
};

thread_local ThreadChaos t_chaos;

void perturb(std::uint64_t /*ticket or head*/) noexcept {
  ThreadChaos& c = t_chaos;
  ++c.counts.hook_calls;
  const std::uint64_t r = c.next();
  if ((r >> 32) % g_every != 0) return;
  const std::uint64_t kind = r & 63;
  const std::uint64_t amount = (r >> 8) & 0xFFFFFF;
  if (kind == 0) {
    ++c.counts.sleeps;
    std::this_thread::sleep_for(std::chrono::microseconds(50 + amount % 451));
  } else if (kind < 16) {
    ++c.counts.spins;
    for (std::uint64_t n = 1 + amount % 2048; n != 0; --n) scheduling::detail::cpu_relax();
  } else {
    ++c.counts.yields;
    std::this_thread::yield();
  }
}

void set_hooks(void (*hook)(std::uint64_t)) {
  lib::g_before_ticket_hook = hook;
  lib::g_after_ticket_hook = hook;
  lib::g_take_pass_hook = hook;
  lib::g_lapped_cell_hook = hook;
  lib::g_published_hook = hook;
  lib::g_taken_hook = hook;
  lib::g_cancelled_hook = hook;
  lib::g_admit_peeked_hook = hook;
}

}  // namespace

// The settings are written while the hooks are cleared, so that no hook ever
// runs with every == 0.
void install_chaos(std::uint64_t seed, std::uint32_t every) {
  set_hooks(nullptr);
  g_seed = seed;
  g_every = every;
  if (every != 0) set_hooks(&perturb);
}

void remove_chaos() { install_chaos(0, 0); }

ChaosCounts chaos_counts() {
  t_chaos.flush();
  // Relaxed: see g_hook_calls.
  return {g_hook_calls.load(std::memory_order::relaxed), g_yields.load(std::memory_order::relaxed),
          g_spins.load(std::memory_order::relaxed), g_sleeps.load(std::memory_order::relaxed)};
}

}  // namespace tgi_gtc::stress
