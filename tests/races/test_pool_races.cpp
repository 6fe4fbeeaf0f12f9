// BlockPool races forced deterministically (see test_scheduler_races.cpp): a
// release() is stalled where it has read a block's last reference (a count of
// 1) and not yet stored 0, or where a block it took to 0 waits for its bit
// clear, while the test releases or allocates the same block. These are the
// double releases of invariant I5 in engine/block_pool.cpp: misuses, which
// the pool must still account for (free_blocks() never counts a bit that is
// not clear, or try_allocate waits for blocks that do not exist). The
// unforced test in test_block_pool.cpp needs two cores to meet them.
#include <doctest/doctest.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include <tgi_gtc/scheduling.hpp>

#include "races/stall.hpp"

namespace tgi_gtc::scheduling::detail {
extern void (*g_release_last_ref_hook)(std::uint64_t id);
extern void (*g_release_pending_hook)(std::uint64_t id);
}  // namespace tgi_gtc::scheduling::detail

using namespace tgi_gtc::scheduling;
using tgi_test::finish_or_exit;
using tgi_test::StallAt;

namespace {

// Stalls the first release() that reads a count of 1 (held_at: the block).
struct LastRefStall : StallAt<0> {
  LastRefStall() : StallAt<0>(detail::g_release_last_ref_hook) {}
};
// Stalls the first release() that has a block at 0 waiting for its bit clear.
struct PendingStall : StallAt<1> {
  PendingStall() : StallAt<1>(detail::g_release_pending_hook) {}
};

// A release() of `ids` on a thread of its own; join() returns its result.
class ReleaseThread {
 public:
  ReleaseThread(BlockPool& pool, std::vector<BlockId> ids)
      : ids_(std::move(ids)), thread_([this, &pool] {
          result_ = pool.release(ids_);
          done_ = true;
        }) {}
  std::size_t join() {
    finish_or_exit(done_, "release() did not return after its stall was released");
    thread_.join();
    return result_;
  }
  // A test that stops early (a failed REQUIRE) still joins, or reports why not.
  ~ReleaseThread() {
    if (thread_.joinable()) join();
  }
  ReleaseThread(const ReleaseThread&) = delete;
  ReleaseThread& operator=(const ReleaseThread&) = delete;

 private:
  std::vector<BlockId> ids_;
  std::size_t result_ = 0;
  std::atomic<bool> done_{false};
  std::thread thread_;
};

// 8 blocks, two a word (sbitmap's narrow words for small pools): blocks A = 2
// and B = 3 share word 1 (not block 0: StallAt's held_at starts at 0). Every
// block is held, so an allocation can only get a block the test frees.
constexpr BlockId kA = 2;
constexpr BlockId kB = 3;
struct FullPool {
  BlockPool pool{8};
  FullPool() {
    std::array<BlockId, 8> ids{};
    REQUIRE(pool.try_allocate(ids));
    REQUIRE(pool.free_blocks() == 0);
  }
  // Takes `n` blocks on another thread, failing the run instead of hanging it
  // when free_blocks() counts bits that are not clear.
  std::vector<BlockId> take(std::size_t n) {
    std::vector<BlockId> out(n);
    std::atomic<bool> done{false};
    bool ok = false;
    std::thread t([&] {
      ok = pool.try_allocate(out);
      done = true;
    });
    finish_or_exit(done, "try_allocate did not return: free_blocks() counts blocks whose bits are not clear");
    t.join();
    REQUIRE(ok);
    return out;
  }
};

}  // namespace

TEST_CASE("a release that read the last reference of a block freed meanwhile by another release counts it as rejected") {
  FullPool f;
  LastRefStall stall;
  // Releases blocks A and B (one word): stalled after reading A's count of 1.
  ReleaseThread late(f.pool, {kA, kB});
  stall.wait_held();
  CHECK(stall.held_at == kA);
  // The same reference again, here: the count still reads 1, so this release
  // frees block A (a double release with the stalled one).
  CHECK(f.pool.release(std::vector<BlockId>{kA}) == 1);
  CHECK(f.pool.free_blocks() == 1);
  stall.release();
  // A's bit is clear already: the late release frees only B and counts A as
  // a rejected id (a partial loss inside one word's mask).
  CHECK(late.join() == 1);
  CHECK(f.pool.invalid_releases() == 1);
  CHECK(f.pool.free_blocks() == 2);
  CHECK(f.pool.ref_count(kA) == 0);
  CHECK(f.pool.ref_count(kB) == 0);
  const std::vector<BlockId> again = f.take(2);
  CHECK(((again[0] == kA && again[1] == kB) || (again[0] == kB && again[1] == kA)));
  CHECK(f.pool.free_blocks() == 0);
}

TEST_CASE("a repeated id that finds its block re-allocated while its first occurrence waits for the bit clear is rejected") {
  FullPool f;
  LastRefStall first;
  // A release of block A, stalled after reading its count of 1.
  ReleaseThread single(f.pool, {kA});
  first.wait_held();
  CHECK(first.held_at == kA);
  PendingStall second;
  // A twice in one call: the first occurrence also reads 1 (the stalled
  // release has not stored 0 yet), stores 0 and waits in the mask, stalled.
  ReleaseThread twice(f.pool, {kA, kA});
  second.wait_held();
  CHECK(second.held_at == kA);
  // The single release goes on: it clears A's bit and counts it free.
  first.release();
  CHECK(single.join() == 1);
  CHECK(f.pool.free_blocks() == 1);
  // A new owner takes A (the only clear bit).
  CHECK(f.take(1)[0] == kA);
  CHECK(f.pool.ref_count(kA) == 1);
  // The second occurrence finds A pending in its own call: rejected
  // before its count is read, so the new owner's count stays. (Counting it
  // would put two units in free_ for the one bit the call clears, and a
  // try_allocate of both would wait for good.) The call's fetch_and then
  // clears the new owner's bit: the double release's damage, counted once.
  second.release();
  CHECK(twice.join() == 1);
  CHECK(f.pool.invalid_releases() == 1);
  CHECK(f.pool.ref_count(kA) == 1);
  REQUIRE(f.pool.free_blocks() == 1);  // else the take below would wait for good
  CHECK(f.take(1)[0] == kA);
  CHECK(f.pool.free_blocks() == 0);
}
