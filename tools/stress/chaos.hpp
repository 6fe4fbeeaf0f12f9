// Chaos for sched-stress-chaos: stalls threads inside the Scheduler and the
// Engine, at the points where a stall matters most.
//
// sched-stress-chaos links a copy of the library compiled with
// TGI_GTC_TEST_HOOKS, whose Scheduler calls seven hooks (engine/scheduler.cpp):
// before a producer takes a ring ticket, between taking the ticket and
// publishing the task (while the ticket is open), just after the publish
// (before the producer re-reads the task's state for a cancel), when a
// producer's cell still holds an earlier lap's task that head has not passed
// (before it reads that task's state), on each pass of a consumer over a
// ring, just after it read the head, when a consumer has claimed a task
// (TAKEN) but not yet moved head or freed the bucket, and when a cancel has
// claimed one (CANCELLED) but not yet cleared its cell; its Engine calls an
// eighth (engine/engine.cpp) when step() has peeked a waiting task and is
// about to take it, the window in which a producer's cancel races the
// admission. At one hook call in `every`, drawn at random per thread,
// the calling thread yields its core (3 in 4 of those calls), spins for 1 to
// 2,048 pause instructions (about 1 in 4), or sleeps 50 to 500 us (1 in 64).
// Without it, on a machine with few cores, a thread nearly always runs those
// windows to their end; with it, the interleavings the invariants are about (a
// consumer meeting an open ticket, a cancel racing a publish, a head moved
// under a scan) become frequent. The lapped-cell hook is rarely reached at
// all: its state needs a task kept at head for a whole lap of tickets, which
// tests/races builds on purpose (docs/stress.md, Chaos).
//
// Not part of the library: the hooks exist only in test builds.
#pragma once

#include <cstdint>

namespace tgi_gtc::stress {

struct ChaosCounts {
  std::uint64_t hook_calls = 0;  ///< hook calls seen
  std::uint64_t yields = 0;
  std::uint64_t spins = 0;
  std::uint64_t sleeps = 0;
};

/// Installs the hooks: from now on one hook call in `every` (at random) is
/// perturbed; `every` == 0 installs none. Call while no other thread uses a
/// Scheduler (before the workers start).
void install_chaos(std::uint64_t seed, std::uint32_t every);

/// Removes them. Call while no other thread uses a Scheduler (after the join).
void remove_chaos();

/// Totals of the threads that have exited, plus the calling thread's.
ChaosCounts chaos_counts();

}  // namespace tgi_gtc::stress
