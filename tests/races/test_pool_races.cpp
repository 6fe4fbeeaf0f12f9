// BlockPool races forced deterministically (see test_scheduler_races.cpp): a
// release() is stalled where it has read a block's last reference (a count of
// 1) and not yet stored 0, where a block it took to 0 waits for its bit
// clear, where it has cleared its bits and not yet counted them, or where it
// has parked its block and not yet checked the bit, while the test releases
// or allocates the same block. These are the double releases of invariant
// I5 in engine/block_pool.cpp: misuses, which the pool must still account
// for (free_blocks() never counts a block that no try_allocate can take, or
// try_allocate waits for blocks that do not exist), and of which exactly one
// release frees the block unless a try_allocate comes between them: whether
// the word decides, or the slot, or one side sees the other's bit clear or
// parked block (P'). The unforced test in test_block_pool.cpp needs two cores
// to meet them.
//
// The last three tests check the memory orderings that pass a block from
// its holders to its next owner: the release (D0) or (D) that takes its count
// to 0, the park (P) that the next owner's reservation (1) reads, and the bit
// clear (5) that the next owner's claim (3) reads. The
// next owner writes the block's data, which a holder wrote before its release.
// Outside the pool, nothing orders the holder's write before the next
// owner's: the threads wait for each other through relaxed loads, which order
// nothing, and the one flag that synchronizes (the second test's) orders the
// last holder before the holder that writes, the other way. So the data race
// is reported by the ThreadSanitizer build (CI runs it) exactly when an
// ordering of the chain is weaker than the design comment's; the other builds
// check only the counts.
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
extern void (*g_release_shared_hook)(std::uint64_t id);
extern void (*g_release_flushed_hook)(std::uint64_t word);
extern void (*g_release_parked_hook)(std::uint64_t id);
extern void (*g_release_counted_hook)(std::uint64_t word);
extern void (*g_release_unpark_hook)(std::uint64_t id);
}  // namespace tgi_gtc::scheduling::detail

using namespace tgi_gtc::scheduling;
using tgi_test::finish_or_exit;
using tgi_test::spin_until;
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
// Stalls the first release() that has cleared its bits and not yet counted
// them in free_ (6) (held_at: the word).
struct FlushedStall : StallAt<2> {
  FlushedStall() : StallAt<2>(detail::g_release_flushed_hook) {}
};
// Stalls the first release() of one block that has parked it (P), before it
// checks the block's bit (P') (held_at: the block).
struct ParkedStall : StallAt<3> {
  ParkedStall() : StallAt<3>(detail::g_release_parked_hook) {}
};
// Stalls the first release() that has counted its bitmap frees (6), before
// it checks the slot (held_at: the word).
struct CountedStall : StallAt<4> {
  CountedStall() : StallAt<4>(detail::g_release_counted_hook) {}
};
// Stalls the first un-park between its load of the bit and its CAS (U)
// (held_at: the block).
struct UnparkStall : StallAt<5> {
  UnparkStall() : StallAt<5>(detail::g_release_unpark_hook) {}
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
// and B = 3 share word 1 (not block 0: StallAt's held_at starts at 0), C = 4
// is in word 2. Every block is held, so an allocation can only get a block
// the test frees; or, with `park`, every block but P = 7, which this thread
// has released: the slot holds it (P), so that a release of one block goes
// to the bitmap.
constexpr BlockId kA = 2;
constexpr BlockId kB = 3;
constexpr BlockId kC = 4;
constexpr BlockId kP = 7;
struct FullPool {
  BlockPool pool{8};
  explicit FullPool(bool park = false) {
    std::array<BlockId, 8> ids{};
    REQUIRE(pool.try_allocate(ids));
    REQUIRE(pool.free_blocks() == 0);
    if (park) {
      REQUIRE(pool.release(std::vector<BlockId>{kP}) == 1);
      REQUIRE(pool.free_blocks() == 1);
    }
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

// A release of A and `other`, stalled after reading A's count of 1, while
// this thread releases A again. `park`: the slot is full, so the single
// release clears A's bit and the word decides. Otherwise it parks A, and the
// late release, which clears A's bit, finds A in the slot when it counts its
// frees (P'): A is in the last word it flushes (with B, read through (6)) or
// in an earlier one (with C, read after that flush).
void late_release_of_a_freed_block(bool park, BlockId other) {
  const std::size_t parked = park ? 1 : 0;
  FullPool f(park);
  LastRefStall stall;
  // Releases blocks A and `other`: stalled after reading A's count of 1.
  ReleaseThread late(f.pool, {kA, other});
  stall.wait_held();
  CHECK(stall.held_at == kA);
  // The same reference again, here: the count still reads 1, so this release
  // frees block A (a double release with the stalled one).
  CHECK(f.pool.release(std::vector<BlockId>{kA}) == 1);
  CHECK(f.pool.free_blocks() == 1 + parked);
  stall.release();
  // The late release frees only `other` and counts A as a rejected id.
  CHECK(late.join() == 1);
  CHECK(f.pool.invalid_releases() == 1);
  CHECK(f.pool.free_blocks() == 2 + parked);
  CHECK(f.pool.ref_count(kA) == 0);
  CHECK(f.pool.ref_count(other) == 0);
  // Two blocks wanted: the bits decide, whoever parked (A has one unit).
  const std::vector<BlockId> again = f.take(2);
  CHECK(((again[0] == kA && again[1] == other) || (again[0] == other && again[1] == kA)));
  CHECK(f.pool.free_blocks() == parked);
}

}  // namespace

TEST_CASE("a release that read the last reference of a block freed meanwhile by another release counts it as rejected") {
  SUBCASE("the slot full, one word: the word decides") { late_release_of_a_freed_block(true, kB); }
  SUBCASE("the slot full, two words: the word decides") { late_release_of_a_freed_block(true, kC); }
  SUBCASE("A parked, in the last word flushed") { late_release_of_a_freed_block(false, kB); }
  SUBCASE("A parked, in an earlier word") { late_release_of_a_freed_block(false, kC); }
}

TEST_CASE("a release of one block that finds it parked by a racing release counts it as rejected") {
  FullPool f;
  LastRefStall stall;
  ReleaseThread late(f.pool, {kA});  // stalled after reading A's count of 1
  stall.wait_held();
  CHECK(f.pool.release(std::vector<BlockId>{kA}) == 1);  // parks A
  CHECK(f.pool.free_blocks() == 1);
  stall.release();
  CHECK(late.join() == 0);  // the slot holds A already
  CHECK(f.pool.invalid_releases() == 1);
  CHECK(f.pool.free_blocks() == 1);
  CHECK(f.take(1)[0] == kA);
  CHECK(f.pool.free_blocks() == 0);
}

TEST_CASE("a release that parks a block whose bit a racing release cleared takes it back off the slot") {
  FullPool f;
  LastRefStall stall;
  ReleaseThread single(f.pool, {kA});  // stalled after reading A's count of 1
  stall.wait_held();
  FlushedStall flushed;
  // Reads A's count of 1 too, clears the bits of A and B, and stalls before
  // it counts them (6).
  ReleaseThread both(f.pool, {kA, kB});
  flushed.wait_held();
  CHECK(flushed.held_at == 1);  // word 1
  // The single release parks A (the slot is empty), then finds A's bit clear
  // (P'): it takes its unit back off the slot and counts A as rejected.
  stall.release();
  CHECK(single.join() == 0);
  CHECK(f.pool.invalid_releases() == 1);
  CHECK(f.pool.free_blocks() == 0);
  flushed.release();
  CHECK(both.join() == 2);
  CHECK(f.pool.invalid_releases() == 1);
  CHECK(f.pool.free_blocks() == 2);
  const std::vector<BlockId> again = f.take(2);
  CHECK(((again[0] == kA && again[1] == kB) || (again[0] == kB && again[1] == kA)));
  CHECK(f.pool.free_blocks() == 0);
}

TEST_CASE("a release of one block that clears its bit after a racing release parked it takes it back off the slot") {
  FullPool f(true);  // P parked: a release of one block goes to the bitmap
  LastRefStall stall;
  ReleaseThread parker(f.pool, {kA});  // stalled after reading A's count of 1
  stall.wait_held();
  PendingStall pending;
  // Reads A's count of 1 too, finds the slot full (P) and stalls before it
  // clears A's bit.
  ReleaseThread late(f.pool, {kA});
  pending.wait_held();
  CHECK(pending.held_at == kA);
  CHECK(f.take(1)[0] == kP);  // the slot empties
  // The parker parks A; A's bit is still set, so its check (P') passes.
  stall.release();
  CHECK(parker.join() == 1);
  CHECK(f.pool.free_blocks() == 1);
  // The late release clears A's bit and finds A parked when it counts it
  // (6): it moves A's unit off the slot (U) and counts A as rejected.
  pending.release();
  CHECK(late.join() == 0);
  CHECK(f.pool.invalid_releases() == 1);
  CHECK(f.pool.free_blocks() == 1);
  CHECK(f.take(1)[0] == kA);
  CHECK(f.pool.free_blocks() == 0);
}

TEST_CASE("a release that finds its block parked by the block's next owner leaves the park alone") {
  // No misuse here. P is parked by this thread; B is freed through the
  // bitmap. A release of A clears A's bit and stalls before it counts it
  // (6); a two-block allocation takes P from the slot (one clear bit cannot
  // back two) and claims A's bit; its owner releases A, which parks it. The
  // stalled release then finds A parked, a block whose bit it cleared: but
  // the bit is set again, so the park is the new owner's, and stays.
  FullPool f(true);
  REQUIRE(f.pool.release(std::vector<BlockId>{kB}) == 1);  // the slot is full: bitmap
  REQUIRE(f.pool.free_blocks() == 2);
  FlushedStall flushed;
  ReleaseThread first(f.pool, {kA});
  flushed.wait_held();
  CHECK(flushed.held_at == 1);  // word 1
  std::array<BlockId, 2> two{};
  REQUIRE(f.pool.try_allocate(two));  // this thread's hint is word 1 (B's release)
  CHECK(two[0] == kP);
  CHECK(two[1] == kA);  // the lowest clear bit of word 1
  CHECK(f.pool.release(std::vector<BlockId>{kA}) == 1);  // parks A; its bit is set
  flushed.release();
  CHECK(first.join() == 1);
  CHECK(f.pool.invalid_releases() == 0);
  CHECK(f.pool.free_blocks() == 2);  // A (parked) and B
  CHECK(f.pool.ref_count(kA) == 0);
  const std::vector<BlockId> again = f.take(2);
  CHECK(((again[0] == kA && again[1] == kB) || (again[0] == kB && again[1] == kA)));
  CHECK(f.pool.free_blocks() == 0);
}

TEST_CASE("an un-park whose CAS meets the same value after a legitimate re-park gives the block back") {
  // No misuse. A release of A clears A's bit, finds A parked by its next
  // owner when it counts it (6), and stalls; the owner takes A and frees it
  // through the bitmap, so the release's first load finds A's bit clear and
  // it stalls again before its CAS (U); meanwhile the owner claims A and
  // parks it again, and free_ is back at the value that CAS expects. The CAS
  // succeeds; the bit, loaded again, is set: the release gives A back
  // through the bitmap and its own free stands.
  FullPool f(true);                                        // P parked by this thread
  REQUIRE(f.pool.release(std::vector<BlockId>{kB}) == 1);  // the slot is full: bitmap; hint word 1
  FlushedStall flushed;
  ReleaseThread late(f.pool, {kA});
  flushed.wait_held();  // A's bit clear, not yet counted
  std::array<BlockId, 2> two{};
  REQUIRE(f.pool.try_allocate(two));  // P from the slot, and A, the lowest clear bit of word 1
  CHECK(two[0] == kP);
  CHECK(two[1] == kA);
  REQUIRE(f.pool.release(std::vector<BlockId>{kA}) == 1);  // parks A
  CountedStall counted;
  flushed.release();
  counted.wait_held();  // its (6) read A parked
  CHECK(f.pool.free_blocks() == 2);
  BlockId a = 0;
  REQUIRE(f.pool.try_allocate(std::span<BlockId>(&a, 1)));  // this thread's parked block
  CHECK(a == kA);
  // A batch (A and an out-of-range id): A through the bitmap.
  CHECK(f.pool.release(std::vector<BlockId>{kA, 99}) == 1);
  CHECK(f.pool.invalid_releases() == 1);
  UnparkStall unpark;
  counted.release();
  unpark.wait_held();  // its first load found A's bit clear
  CHECK(unpark.held_at == kA);
  REQUIRE(f.pool.try_allocate(std::span<BlockId>(&a, 1)));  // the lowest clear bit of word 1
  CHECK(a == kA);
  CHECK(f.pool.release(std::vector<BlockId>{kA}) == 1);  // parks A: free_ as before
  unpark.release();
  CHECK(late.join() == 1);
  CHECK(f.pool.invalid_releases() == 1);
  CHECK(f.pool.free_blocks() == 2);  // A and B, both through the bitmap
  CHECK(f.pool.ref_count(kA) == 0);
  const std::vector<BlockId> again = f.take(2);
  CHECK(((again[0] == kA && again[1] == kB) || (again[0] == kB && again[1] == kA)));
  CHECK(f.pool.free_blocks() == 0);
}

TEST_CASE("when both racing releases see the conflict, one takes the parked block back and the other frees it") {
  FullPool f;
  LastRefStall stall;
  ReleaseThread both(f.pool, {kA, kB});  // stalled after reading A's count of 1
  stall.wait_held();
  ParkedStall parked;
  // Parks A and stalls before it checks A's bit.
  ReleaseThread single(f.pool, {kA});
  parked.wait_held();
  CHECK(parked.held_at == kA);
  CHECK(f.pool.free_blocks() == 1);
  // The pair clears the bits of A and B, finds A parked when it counts them
  // (6), and moves A's unit off the slot (U): A is rejected there.
  stall.release();
  CHECK(both.join() == 1);
  CHECK(f.pool.invalid_releases() == 1);
  CHECK(f.pool.free_blocks() == 2);
  // The single release finds A's bit clear (P'), but the slot no longer
  // holds A: its free stands.
  parked.release();
  CHECK(single.join() == 1);
  CHECK(f.pool.invalid_releases() == 1);
  CHECK(f.pool.free_blocks() == 2);
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
  // The single release goes on: it parks A (P) and counts it free.
  first.release();
  CHECK(single.join() == 1);
  CHECK(f.pool.free_blocks() == 1);
  // A new owner takes A (the parked block, the only free one).
  CHECK(f.take(1)[0] == kA);
  CHECK(f.pool.ref_count(kA) == 1);
  // The second occurrence finds A pending in its own call: rejected
  // before its count is read, so the new owner's count stays. (Counting it
  // would put two units in free_ for the one bit the call clears, and a
  // try_allocate of both would wait for good.) The call's fetch_and then
  // clears the new owner's bit (set since the first allocation): the double
  // release's damage, counted once.
  second.release();
  CHECK(twice.join() == 1);
  CHECK(f.pool.invalid_releases() == 1);
  CHECK(f.pool.ref_count(kA) == 1);
  REQUIRE(f.pool.free_blocks() == 1);  // else the take below would wait for good
  CHECK(f.take(1)[0] == kA);
  CHECK(f.pool.free_blocks() == 0);
}

namespace {

// A pool of one block, held twice (count 2), and its data: a plain int that
// each holder may write, so that ThreadSanitizer sees who wrote it last.
struct SharedBlock {
  BlockPool pool{1};
  int data = 0;
  SharedBlock() {
    std::array<BlockId, 1> id{};
    REQUIRE(pool.try_allocate(id));
    REQUIRE(id[0] == 0);
    pool.retain(id);
    REQUIRE(pool.ref_count(0) == 2);
  }
  // The next owner, on this thread: waits (free_blocks() is a relaxed load,
  // so the wait orders nothing) until the block is free again,
  // takes it and writes its data. Through the pool only, the write comes
  // after the first holder's: (D) or (D0), then the park (P) that the
  // reservation (1) reads (the pool's one block goes through the slot).
  void reuse() {
    spin_until([this] { return pool.free_blocks() == 1; }, "the block was not freed");
    std::array<BlockId, 1> id{};
    CHECK(pool.try_allocate(id));  // CHECK: a throw here would leave the threads joinable
    CHECK(id[0] == 0);
    data = 2;
    CHECK(pool.ref_count(0) == 1);
    CHECK(pool.invalid_releases() == 0);
  }
};

// A release() stalled by g_release_shared_hook (the first one only) until the
// block's count reads 1, with relaxed loads: it read a count of 2, and must
// take the count from 1 to 0 with its CAS (D).
std::atomic<BlockPool*> g_shared_pool{nullptr};
std::atomic<bool> g_shared_armed{false};
std::atomic<bool> g_shared_read{false};
void wait_for_other_release(std::uint64_t id) {
  // relaxed: pairs with nothing, on purpose: the other holder passes here too,
  // after its write, and must publish nothing.
  if (!g_shared_armed.exchange(false, std::memory_order::relaxed)) return;
  g_shared_read = true;  // orders this thread before the other holder: harmless
  BlockPool* pool = g_shared_pool.load();
  spin_until([&] { return pool->ref_count(static_cast<BlockId>(id)) == 1; },
                          "the other holder did not release");
}

}  // namespace

TEST_CASE("the last holder's release (load D0 reads 1) acquires the other holders' accesses") {
  SharedBlock b;
  std::size_t freed_first = 9, freed_last = 9;
  std::thread first([&] {
    b.data = 1;  // the first holder's access, then its release (D): 2 -> 1
    freed_first = b.pool.release(std::vector<BlockId>{0});
  });
  std::thread last([&] {
    spin_until([&] { return b.pool.ref_count(0) == 1; }, "the first holder did not release");
    freed_last = b.pool.release(std::vector<BlockId>{0});  // (D0) reads 1, (D') stores 0
  });
  b.reuse();  // races with `data = 1` unless (D) releases and (D0) acquires
  first.join();
  last.join();
  CHECK(freed_first == 0);
  CHECK(freed_last == 1);
}

TEST_CASE("the last holder's release (CAS D takes 1 to 0) acquires the other holders' accesses") {
  SharedBlock b;
  g_shared_pool = &b.pool;
  g_shared_read = false;
  g_shared_armed = true;
  detail::g_release_shared_hook = &wait_for_other_release;
  std::size_t freed_first = 9, freed_last = 9;
  // Reads a count of 2 (D0), stalls until the other release lands, then its
  // CAS fails on 2, re-reads 1 and takes it to 0.
  std::thread last([&] { freed_last = b.pool.release(std::vector<BlockId>{0}); });
  std::thread first([&] {
    spin_until([] { return g_shared_read.load(); }, "the last holder's release did not read 2");
    b.data = 1;  // the first holder's access, then its release (D): 2 -> 1
    freed_first = b.pool.release(std::vector<BlockId>{0});
  });
  b.reuse();  // races with `data = 1` unless (D) both releases and acquires
  first.join();
  last.join();
  detail::g_release_shared_hook = nullptr;
  CHECK(freed_first == 0);
  CHECK(freed_last == 1);
}

namespace {

// A release() stalled by g_release_flushed_hook after its bit clear (5),
// before its fetch_add on free_ (6), until block 0 is taken again. It tells
// the test where it is with a relaxed store, which orders nothing.
std::atomic<BlockPool*> g_flushed_pool{nullptr};
std::atomic<bool> g_flushed{false};
void wait_for_next_owner(std::uint64_t) {
  g_flushed.store(true, std::memory_order::relaxed);  // pairs with nothing, on purpose
  BlockPool* pool = g_flushed_pool.load();
  spin_until([&] { return pool->ref_count(0) == 1; }, "block 0 was not taken again");
}

// Three blocks in one word. Block 2 is parked and block 1 freed through the
// bitmap, both counted in free_; block 0 is released (with `ids`) on another
// thread, through the bitmap too (the slot is full), which stalls after
// clearing its bit, before it adds it to free_. The next allocation, of two
// blocks, reserves the units of blocks 1 and 2: it takes block 2 from the
// slot (the bits alone cannot back two) and claims the lowest clear bit,
// block 0's: from its releaser it learns nothing through free_ (6)/(1), only
// through the word (5)/(3).
void next_owner_claims_before_the_count(const std::vector<BlockId>& ids) {
  BlockPool pool(3);
  std::array<BlockId, 3> all{};
  REQUIRE(pool.try_allocate(all));
  REQUIRE(pool.release(std::vector<BlockId>{2}) == 1);  // parked
  REQUIRE(pool.release(std::vector<BlockId>{1}) == 1);  // bitmap
  REQUIRE(pool.free_blocks() == 2);
  int data = 0;
  g_flushed_pool = &pool;
  // relaxed: before the releaser starts; its creation orders this store first.
  g_flushed.store(false, std::memory_order::relaxed);
  detail::g_release_flushed_hook = &wait_for_next_owner;
  std::size_t freed = 9;
  std::thread releaser([&] {
    data = 1;  // the holder's access, then its release of block 0
    freed = pool.release(ids);
  });
  // relaxed: pairs with nothing, on purpose (the store in wait_for_next_owner).
  spin_until([] { return g_flushed.load(std::memory_order::relaxed); },
                          "the release of block 0 did not clear its bit");
  std::array<BlockId, 2> next{};
  CHECK(pool.try_allocate(next));  // CHECK: a throw here would leave the releaser joinable
  CHECK(next[0] == 2);
  CHECK(next[1] == 0);
  data = 2;  // races with `data = 1` unless (5) releases and (3) acquires
  releaser.join();
  detail::g_release_flushed_hook = nullptr;
  CHECK(freed == 1);
  CHECK(pool.invalid_releases() == ids.size() - 1);
  CHECK(pool.free_blocks() == 1);
  CHECK(pool.ref_count(0) == 1);
  CHECK(pool.ref_count(1) == 0);
  CHECK(pool.ref_count(2) == 1);
}

}  // namespace

TEST_CASE("the next owner's claim acquires the accesses of a releaser that has not yet counted the block free") {
  SUBCASE("a release of one block") { next_owner_claims_before_the_count({0}); }
  SUBCASE("a batch (block 0 and an out-of-range id)") { next_owner_claims_before_the_count({0, 3}); }
}
