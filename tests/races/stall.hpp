// Stalling a thread at a test hook of tgi_gtc_scheduling_hooks, shared by
// the forced-race tests (test_scheduler_races.cpp, test_engine_races.cpp,
// test_pool_races.cpp).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace tgi_test {

// Yields until `ready()` holds; past 30 s, reports `what` and leaves at once
// (a thread the test waits for is stuck, or never got where it should). Reads
// only what `ready` reads: with relaxed loads inside, waiting orders nothing.
template <class Ready>
void spin_until(Ready ready, const char* what) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!ready()) {
    if (std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "FAILED: %s\n", what);
      std::_Exit(1);
    }
    std::this_thread::yield();
  }
}

// Stalls the first thread that calls the hook `where` after construction,
// until release(). `Slot` keeps the state of stalls at different hooks apart,
// so that two can hold a thread each at once.
template <int Slot>
struct StallAt {
  // 0 off, 1 armed, 4 claimed (held_at being written), 2 holding, 3 released
  static inline std::atomic<int> state{0};
  static inline std::atomic<int> tickets{0};  // hook calls since construction
  static inline std::atomic<std::uint64_t> held_at{0};  // the argument of the stalled call
  static void hook(std::uint64_t arg) {
    tickets.fetch_add(1);
    int armed = 1;
    if (state.compare_exchange_strong(armed, 4)) {
      held_at = arg;  // before wait_held() can return
      state = 2;
      while (state.load() != 3) std::this_thread::yield();
    }
  }
  explicit StallAt(void (*&where)(std::uint64_t)) : where_(where) {
    tickets = 0;
    held_at = 0;
    state = 1;
    where_ = &hook;
  }
  StallAt(const StallAt&) = delete;
  StallAt& operator=(const StallAt&) = delete;
  // A thread that never reaches the hook (the state the test built does not
  // lead there) fails the run in 30 s, with the reason, instead of hanging it.
  void wait_held() const {
    spin_until([] { return state.load() == 2; }, "no thread reached the hook this test stalls at within 30 s");
  }
  void release() { state = 3; }
  ~StallAt() {
    release();
    where_ = nullptr;
    state = 0;
  }

 private:
  void (*&where_)(std::uint64_t);
};

// Waits up to 30 s for `done`; past that, a call the test started is stuck:
// reports `what` and leaves at once (the stuck thread cannot be joined).
inline void finish_or_exit(const std::atomic<bool>& done, const char* what) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!done && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (!done) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    std::_Exit(1);
  }
}

}  // namespace tgi_test
