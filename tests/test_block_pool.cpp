// BlockPool, BlockAllocator and BlockAllocation: unit cases, a seeded model
// check over 100,000 random operations, and the "stress" suite.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include <tgi_gtc/scheduling.hpp>

#include "support/options.hpp"

using namespace tgi_gtc::scheduling;

#if defined(__SANITIZE_THREAD__)
#define TGI_TEST_UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TGI_TEST_UNDER_TSAN 1
#endif
#endif

namespace {

#ifdef TGI_TEST_UNDER_TSAN
constexpr bool kUnderThreadSanitizer = true;
#else
constexpr bool kUnderThreadSanitizer = false;
#endif

constexpr BlockId kSentinel = std::numeric_limits<BlockId>::max();

// Sizes that exercise sbitmap-style narrow words (< 256 blocks), a partial last
// word and several full 64-bit words.
constexpr std::array<std::uint32_t, 14> kPoolSizes{1, 2, 3, 4, 5, 7, 63, 64, 65, 100, 255, 256, 257, 1000};

std::vector<BlockId> take(BlockPool& pool, std::size_t k) {
  std::vector<BlockId> out(k, kSentinel);
  REQUIRE(pool.try_allocate(out));
  return out;
}

bool distinct_and_in_range(std::span<const BlockId> ids, std::uint32_t total) {
  std::set<BlockId> seen;
  for (const BlockId id : ids) {
    if (id >= total || !seen.insert(id).second) return false;
  }
  return true;
}

std::vector<std::uint32_t> all_counts(const BlockPool& pool) {
  std::vector<std::uint32_t> c(pool.total_blocks());
  for (BlockId b = 0; b < pool.total_blocks(); ++b) c[b] = pool.ref_count(b);
  return c;
}

// Two threads meet at each arrive() and leave it within a few cache-line
// transfers of each other (std::barrier may sleep in the kernel and wake them
// microseconds apart). Yields while it waits, so that it also ends on one core.
class SpinBarrier {
 public:
  void arrive() {
    // Seq_cst: a test helper; the count of arrivals is all it needs.
    const std::uint64_t target = (arrived_.fetch_add(1) / 2 + 1) * 2;
    for (unsigned spins = 0; arrived_.load() < target; ++spins) {
      if (spins % 64 == 63) std::this_thread::yield();
    }
  }

 private:
  std::atomic<std::uint64_t> arrived_{0};
};

BlockAllocatorConfig small_config(std::uint32_t blocks, std::uint32_t block_size) {
  BlockAllocatorConfig c = BlockAllocatorConfig::with_blocks(blocks);
  c.block_size = block_size;
  return c;
}

}  // namespace

static_assert(kMaxBlocks >= 16'777'216 && kMaxBlocks < std::numeric_limits<std::uint32_t>::max());
static_assert(!std::is_copy_constructible_v<BlockPool> && !std::is_move_constructible_v<BlockPool>);
static_assert(!std::is_copy_constructible_v<BlockAllocation> && std::is_nothrow_move_constructible_v<BlockAllocation>);
static_assert(std::is_nothrow_move_assignable_v<BlockAllocation>);

// ------------------------------------------------------------- BlockPool

TEST_CASE("a new pool has every block free with count zero") {
  for (const std::uint32_t n : kPoolSizes) {
    CAPTURE(n);
    BlockPool pool(n);
    CHECK(pool.total_blocks() == n);
    CHECK(pool.free_blocks() == n);
    CHECK(pool.invalid_releases() == 0);
    const auto counts = all_counts(pool);
    CHECK(std::all_of(counts.begin(), counts.end(), [](std::uint32_t c) { return c == 0; }));
  }
}

TEST_CASE("allocating one block at a time yields every block once, then the pool is exhausted") {
  for (const std::uint32_t n : kPoolSizes) {
    CAPTURE(n);
    BlockPool pool(n);
    std::vector<BlockId> got;
    for (std::uint32_t i = 0; i < n; ++i) {
      BlockId id = kSentinel;
      REQUIRE(pool.try_allocate(std::span<BlockId>(&id, 1)));
      got.push_back(id);
    }
    CHECK(distinct_and_in_range(got, n));
    CHECK(pool.free_blocks() == 0);
    BlockId extra = kSentinel;
    CHECK_FALSE(pool.try_allocate(std::span<BlockId>(&extra, 1)));
    CHECK(extra == kSentinel);
  }
}

TEST_CASE("one batch can take the whole pool across several words") {
  for (const std::uint32_t n : kPoolSizes) {
    CAPTURE(n);
    BlockPool pool(n);
    const auto got = take(pool, n);
    CHECK(distinct_and_in_range(got, n));
    CHECK(pool.free_blocks() == 0);
    for (const BlockId id : got) CHECK(pool.ref_count(id) == 1);
  }
}

TEST_CASE("released blocks can be allocated again after exhaustion") {
  BlockPool pool(100);
  auto first = take(pool, 100);
  BlockId id = kSentinel;
  CHECK_FALSE(pool.try_allocate(std::span<BlockId>(&id, 1)));
  const std::vector<BlockId> back(first.begin(), first.begin() + 30);
  CHECK(pool.release(back) == 30);
  CHECK(pool.free_blocks() == 30);
  const auto again = take(pool, 30);
  CHECK(std::set<BlockId>(again.begin(), again.end()) == std::set<BlockId>(back.begin(), back.end()));
  CHECK(pool.free_blocks() == 0);
  CHECK(pool.release(again) == 30);
  CHECK(pool.release(std::span<const BlockId>(first).subspan(30)) == 70);
  CHECK(pool.free_blocks() == 100);
}

TEST_CASE("a released single block is parked: the same thread's next one-block allocation gets it back") {
  BlockPool pool(256);
  const auto held = take(pool, 256);
  for (const BlockId id : {BlockId{5}, BlockId{200}, BlockId{77}}) {
    CAPTURE(id);
    CHECK(pool.release(std::span<const BlockId>(&id, 1)) == 1);
    CHECK(pool.free_blocks() == 1);
    CHECK(pool.ref_count(id) == 0);
    BlockId again = kSentinel;
    REQUIRE(pool.try_allocate(std::span<BlockId>(&again, 1)));
    CHECK(again == id);
    CHECK(pool.ref_count(id) == 1);
    CHECK(pool.free_blocks() == 0);
  }
  // With clear bits beside it, the one-block allocation still prefers the
  // block this thread parked (a bitmap scan would find block 0 first).
  const BlockId low[] = {0, 1};
  CHECK(pool.release(low) == 2);  // two blocks: through the bitmap
  const BlockId id = 100;
  CHECK(pool.release(std::span<const BlockId>(&id, 1)) == 1);
  CHECK(pool.free_blocks() == 3);
  BlockId again = kSentinel;
  REQUIRE(pool.try_allocate(std::span<BlockId>(&again, 1)));
  CHECK(again == id);
  CHECK(pool.free_blocks() == 2);
  CHECK(pool.release(held) == 254);  // 0 and 1 are free already: two rejected
  CHECK(pool.invalid_releases() == 2);
  CHECK(pool.free_blocks() == 256);
}

TEST_CASE("a batch takes the parked block only when the clear bits alone cannot back it") {
  BlockPool pool(4);
  CHECK(take(pool, 4).size() == 4);
  const BlockId parked = 3;
  CHECK(pool.release(std::span<const BlockId>(&parked, 1)) == 1);
  const BlockId low[] = {0, 1};
  CHECK(pool.release(low) == 2);
  CHECK(pool.free_blocks() == 3);
  // Two blocks: the two clear bits back them; the parked block stays.
  std::vector<BlockId> two(2, kSentinel);
  REQUIRE(pool.try_allocate(two));
  CHECK(std::set<BlockId>(two.begin(), two.end()) == std::set<BlockId>{0, 1});
  CHECK(pool.free_blocks() == 1);
  CHECK(pool.ref_count(parked) == 0);
  CHECK(pool.release(two) == 2);
  // Three blocks: two clear bits cannot back them, so the parked block goes too.
  std::vector<BlockId> three(3, kSentinel);
  REQUIRE(pool.try_allocate(three));
  CHECK(std::set<BlockId>(three.begin(), three.end()) == std::set<BlockId>{0, 1, 3});
  CHECK(pool.free_blocks() == 0);
  for (const BlockId id : three) CHECK(pool.ref_count(id) == 1);
  CHECK(pool.release(three) == 3);
  const BlockId last = 2;  // the one block held throughout
  CHECK(pool.release(std::span<const BlockId>(&last, 1)) == 1);
  CHECK(pool.free_blocks() == 4);
  CHECK(pool.invalid_releases() == 0);
}

TEST_CASE("a batch larger than the free count takes nothing and leaves out untouched") {
  BlockPool pool(10);
  const auto held = take(pool, 7);
  const auto counts_before = all_counts(pool);
  std::vector<BlockId> out(4, kSentinel);
  CHECK_FALSE(pool.try_allocate(out));
  CHECK(std::all_of(out.begin(), out.end(), [](BlockId b) { return b == kSentinel; }));
  CHECK(pool.free_blocks() == 3);
  CHECK(all_counts(pool) == counts_before);
  std::vector<BlockId> three(3, kSentinel);
  CHECK(pool.try_allocate(three));
  CHECK(pool.free_blocks() == 0);
}

TEST_CASE("a batch larger than the pool fails") {
  BlockPool pool(8);
  std::vector<BlockId> out(9, kSentinel);
  CHECK_FALSE(pool.try_allocate(out));
  CHECK(pool.free_blocks() == 8);
}

TEST_CASE("an empty batch succeeds and takes nothing") {
  BlockPool pool(4);
  CHECK(pool.try_allocate(std::span<BlockId>{}));
  CHECK(pool.free_blocks() == 4);
  CHECK(pool.release(std::span<const BlockId>{}) == 0);
  pool.retain(std::span<const BlockId>{});
  CHECK(pool.invalid_releases() == 0);
}

TEST_CASE("block 0 is an ordinary block") {
  BlockPool pool(1);
  const auto got = take(pool, 1);
  CHECK(got[0] == 0);
}

TEST_CASE("a retained block stays held until every reference is released") {
  BlockPool pool(4);
  const auto b = take(pool, 1);
  pool.retain(b);
  pool.retain(b);
  CHECK(pool.ref_count(b[0]) == 3);
  CHECK(pool.free_blocks() == 3);
  CHECK(pool.release(b) == 0);
  CHECK(pool.release(b) == 0);
  CHECK(pool.ref_count(b[0]) == 1);
  CHECK(pool.free_blocks() == 3);
  CHECK(pool.release(b) == 1);
  CHECK(pool.ref_count(b[0]) == 0);
  CHECK(pool.free_blocks() == 4);
  CHECK(pool.invalid_releases() == 0);
}

TEST_CASE("release returns how many blocks became free") {
  BlockPool pool(16);
  const auto held = take(pool, 6);
  pool.retain(std::span<const BlockId>(held).first(2));  // two blocks shared
  CHECK(pool.release(held) == 4);
  CHECK(pool.free_blocks() == 14);
  CHECK(pool.release(std::span<const BlockId>(held).first(2)) == 2);
  CHECK(pool.free_blocks() == 16);
}

TEST_CASE("a repeated id in one release drops one reference per occurrence") {
  BlockPool pool(8);
  const auto b = take(pool, 1);
  pool.retain(b);  // count 2
  const std::array<BlockId, 3> thrice{b[0], b[0], b[0]};
  CHECK(pool.release(thrice) == 1);  // 2 -> 1 -> 0, third is invalid
  CHECK(pool.ref_count(b[0]) == 0);
  CHECK(pool.free_blocks() == 8);
  CHECK(pool.invalid_releases() == 1);
}

TEST_CASE("releasing a free block is counted and changes nothing else") {
  BlockPool pool(10);
  const auto held = take(pool, 4);
  BlockId free_id = 0;
  while (std::find(held.begin(), held.end(), free_id) != held.end()) ++free_id;
  const auto counts_before = all_counts(pool);
  CHECK(pool.release(std::span<const BlockId>(&free_id, 1)) == 0);
  CHECK(pool.invalid_releases() == 1);
  CHECK(pool.free_blocks() == 6);
  CHECK(all_counts(pool) == counts_before);
  // The pool still hands out exactly the 6 free blocks.
  const auto rest = take(pool, 6);
  std::vector<BlockId> all(held);
  all.insert(all.end(), rest.begin(), rest.end());
  CHECK(distinct_and_in_range(all, 10));
}

TEST_CASE("releasing an out-of-range block is counted and changes nothing else") {
  BlockPool pool(10);
  const auto held = take(pool, 3);
  const auto counts_before = all_counts(pool);
  const std::array<BlockId, 3> bad{10, 11, std::numeric_limits<BlockId>::max()};
  CHECK(pool.release(bad) == 0);
  CHECK(pool.invalid_releases() == 3);
  CHECK(pool.free_blocks() == 7);
  CHECK(all_counts(pool) == counts_before);
}

TEST_CASE("a double release is counted once and frees the block once") {
  BlockPool pool(4);
  const auto b = take(pool, 1);
  CHECK(pool.release(b) == 1);
  CHECK(pool.release(b) == 0);
  CHECK(pool.invalid_releases() == 1);
  CHECK(pool.free_blocks() == 4);
  CHECK(pool.ref_count(b[0]) == 0);
}

TEST_CASE("retaining a free or out-of-range block is counted in invalid_releases and changes nothing else") {
  BlockPool pool(10);
  const auto held = take(pool, 2);
  BlockId free_id = 0;
  while (std::find(held.begin(), held.end(), free_id) != held.end()) ++free_id;
  const auto counts_before = all_counts(pool);
  const std::array<BlockId, 3> bad{free_id, 10, std::numeric_limits<BlockId>::max()};
  pool.retain(bad);
  CHECK(pool.invalid_releases() == 3);
  CHECK(pool.free_blocks() == 8);
  CHECK(all_counts(pool) == counts_before);
  // The free block was not resurrected: it is still allocatable.
  const auto rest = take(pool, 8);
  CHECK(std::find(rest.begin(), rest.end(), free_id) != rest.end());
}

TEST_CASE("a mixed span applies its valid ids and counts its invalid ones") {
  BlockPool pool(10);
  const auto held = take(pool, 2);
  const std::array<BlockId, 4> mixed{held[0], 99, held[1], held[1]};
  CHECK(pool.release(mixed) == 2);
  CHECK(pool.invalid_releases() == 2);
  CHECK(pool.free_blocks() == 10);
}

TEST_CASE("try_retain takes every reference or none") {
  BlockPool pool(10);
  const auto held = take(pool, 3);
  BlockId free_id = 0;
  while (std::find(held.begin(), held.end(), free_id) != held.end()) ++free_id;
  const std::array<BlockId, 4> good{held[0], held[1], held[1], held[2]};
  CHECK(pool.try_retain(good));
  CHECK(pool.ref_count(held[0]) == 2);
  CHECK(pool.ref_count(held[1]) == 3);
  CHECK(pool.invalid_releases() == 0);
  const auto counts_before = all_counts(pool);
  // A rejected id last: the references taken before it are dropped again.
  const std::array<BlockId, 4> bad{held[0], held[1], held[2], free_id};
  CHECK_FALSE(pool.try_retain(bad));
  CHECK(all_counts(pool) == counts_before);
  CHECK(pool.invalid_releases() == 1);
  CHECK(pool.free_blocks() == 7);
  const std::array<BlockId, 2> out_of_range{held[2], 10};
  CHECK_FALSE(pool.try_retain(out_of_range));
  CHECK(all_counts(pool) == counts_before);
  CHECK(pool.invalid_releases() == 2);
}

TEST_CASE("ref_count of an out-of-range id is zero") {
  BlockPool pool(3);
  const auto held = take(pool, 3);
  CHECK(pool.ref_count(3) == 0);
  CHECK(pool.ref_count(std::numeric_limits<BlockId>::max()) == 0);
}

TEST_CASE("a pool of zero blocks is rejected with a message") {
  CHECK_THROWS_WITH_AS([] { BlockPool p(0); }(), doctest::Contains("num_blocks"), std::invalid_argument);
}

TEST_CASE("a pool above kMaxBlocks is rejected with a message") {
  CHECK_THROWS_WITH_AS([] { BlockPool p(kMaxBlocks + 1); }(), doctest::Contains("num_blocks"), std::invalid_argument);
  CHECK_THROWS_WITH_AS([] { BlockPool p(std::numeric_limits<std::uint32_t>::max()); }(),
                       doctest::Contains("num_blocks"), std::invalid_argument);
}

// Single-threaded and 80 MiB: nothing for ThreadSanitizer to find, but it
// would cost 400 MiB of shadow memory there, so that build skips it.
TEST_CASE("a pool of 2^24 blocks, the least maximum promised, can be built and used" *
          doctest::skip(kUnderThreadSanitizer)) {
  constexpr std::uint32_t kBig = std::uint32_t{1} << 24;
  BlockPool pool(kBig);
  CHECK(pool.free_blocks() == kBig);
  const auto got = take(pool, 1000);
  CHECK(distinct_and_in_range(got, kBig));
  CHECK(pool.free_blocks() == kBig - 1000);
  CHECK(pool.ref_count(kBig - 1) == 0);
  CHECK(pool.ref_count(kBig) == 0);
  CHECK(pool.release(got) == 1000);
  CHECK(pool.free_blocks() == kBig);
}

// ---------------------------------------------------------- configuration

TEST_CASE("the default config holds 2 MiB per block") {
  constexpr BlockAllocatorConfig c{};
  static_assert(c.bytes_per_block() == 2ULL * 32 * 8 * 128 * 16 * 2);
  CHECK(c.bytes_per_block() == 2'097'152);
  CHECK(c.total_memory_bytes() == 2'097'152ULL * 1024);
}

TEST_CASE("with_blocks changes only the block count") {
  const auto c = BlockAllocatorConfig::with_blocks(77);
  CHECK(c.num_blocks == 77);
  CHECK(c.block_size == 16);
  CHECK(c.num_layers == 32);
  CHECK(c.num_kv_heads == 8);
  CHECK(c.head_dim == 128);
  CHECK(c.dtype_bytes == 2);
  CHECK(c.total_memory_bytes() == 77ULL * 2'097'152);
}

TEST_CASE("an allocator with block_size 0 is rejected with a message") {
  CHECK_THROWS_WITH_AS(BlockAllocator(small_config(16, 0)), doctest::Contains("block_size"), std::invalid_argument);
}

TEST_CASE("an allocator whose blocks would have 0 bytes is rejected with a message") {
  const auto with = [](std::uint32_t BlockAllocatorConfig::*field) {
    BlockAllocatorConfig c = small_config(16, 4);
    c.*field = 0;
    return c;
  };
  CHECK_THROWS_WITH_AS(BlockAllocator(with(&BlockAllocatorConfig::num_layers)), doctest::Contains("num_layers"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(BlockAllocator(with(&BlockAllocatorConfig::num_kv_heads)), doctest::Contains("num_kv_heads"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(BlockAllocator(with(&BlockAllocatorConfig::head_dim)), doctest::Contains("head_dim"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(BlockAllocator(with(&BlockAllocatorConfig::dtype_bytes)), doctest::Contains("dtype_bytes"),
                       std::invalid_argument);
  CHECK(BlockAllocator(small_config(16, 4)).memory_stats().total_bytes > 0);
}

TEST_CASE("an allocator with a bad block count is rejected with a message") {
  CHECK_THROWS_WITH_AS(BlockAllocator(BlockAllocatorConfig::with_blocks(0)), doctest::Contains("num_blocks"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(BlockAllocator(BlockAllocatorConfig::with_blocks(kMaxBlocks + 1)),
                       doctest::Contains("num_blocks"), std::invalid_argument);
}

TEST_CASE("an allocator whose slots would not fit in 32 bits is rejected") {
  CHECK_THROWS_WITH_AS(BlockAllocator(small_config(1U << 20, 1U << 13)), doctest::Contains("2^32"),
                       std::invalid_argument);
}

TEST_CASE("an allocator whose byte size overflows 64 bits is rejected") {
  BlockAllocatorConfig c = small_config(4, 1);
  c.num_layers = c.num_kv_heads = c.head_dim = c.dtype_bytes = std::numeric_limits<std::uint32_t>::max();
  CHECK_THROWS_WITH_AS(BlockAllocator{c}, doctest::Contains("overflow"), std::invalid_argument);
}

// ---------------------------------------------------------- BlockAllocator

TEST_CASE("allocate takes ceil(tokens / block_size) blocks, at least one") {
  BlockAllocator alloc(small_config(64, 16));
  const std::array<std::pair<std::size_t, std::size_t>, 7> cases{
      {{0, 1}, {1, 1}, {15, 1}, {16, 1}, {17, 2}, {32, 2}, {33, 3}}};
  for (const auto& c : cases) {
    const std::size_t tokens = c.first;
    const std::size_t blocks = c.second;
    CAPTURE(tokens);
    auto a = alloc.allocate(tokens);
    REQUIRE(a.has_value());
    CHECK(a->blocks().size() == blocks);
    CHECK(a->tokens() == tokens);
    CHECK(a->capacity() == blocks * 16);
    CHECK(distinct_and_in_range(a->blocks(), 64));
  }
  CHECK(alloc.pool().free_blocks() == 64);
}

TEST_CASE("allocate fails and takes nothing when the pool is short") {
  BlockAllocator alloc(small_config(4, 16));
  auto a = alloc.allocate(40);  // 3 blocks
  REQUIRE(a.has_value());
  CHECK_FALSE(alloc.allocate(17).has_value());  // needs 2, 1 free
  CHECK(alloc.pool().free_blocks() == 1);
  CHECK_FALSE(alloc.allocate(std::numeric_limits<std::size_t>::max()).has_value());
  CHECK(alloc.pool().free_blocks() == 1);
}

TEST_CASE("an allocation returns its blocks when destroyed") {
  BlockAllocator alloc(small_config(8, 4));
  {
    auto a = alloc.allocate(20);  // 5 blocks
    REQUIRE(a.has_value());
    CHECK(alloc.pool().free_blocks() == 3);
  }
  CHECK(alloc.pool().free_blocks() == 8);
  CHECK(alloc.pool().invalid_releases() == 0);
}

TEST_CASE("a moved-from allocation owns nothing and its destructor does nothing") {
  BlockAllocator alloc(small_config(8, 4));
  auto a = alloc.allocate(8);
  REQUIRE(a.has_value());
  const std::vector<BlockId> blocks(a->blocks().begin(), a->blocks().end());
  {
    BlockAllocation moved(std::move(*a));
    CHECK(a->blocks().empty());  // NOLINT(bugprone-use-after-move): the point of the test
    CHECK(a->tokens() == 0);
    CHECK(a->capacity() == 0);
    CHECK(std::equal(moved.blocks().begin(), moved.blocks().end(), blocks.begin(), blocks.end()));
    a.reset();  // destroys the moved-from allocation: nothing returns
    CHECK(alloc.pool().free_blocks() == 6);
    CHECK(alloc.pool().invalid_releases() == 0);
  }
  CHECK(alloc.pool().free_blocks() == 8);
  CHECK(alloc.pool().invalid_releases() == 0);
}

TEST_CASE("an allocation destroyed after being moved into a container returns its blocks once") {
  BlockAllocator alloc(small_config(64, 1));
  {
    std::vector<BlockAllocation> all;
    for (int i = 0; i < 20; ++i) {  // reallocations move every element
      auto a = alloc.allocate(2);
      REQUIRE(a.has_value());
      all.push_back(std::move(*a));
    }
    CHECK(alloc.pool().free_blocks() == 24);
  }
  CHECK(alloc.pool().free_blocks() == 64);
  CHECK(alloc.pool().invalid_releases() == 0);
}

TEST_CASE("move assignment over a live allocation returns the old blocks") {
  BlockAllocator alloc(small_config(8, 4));
  auto a = alloc.allocate(4);
  auto b = alloc.allocate(8);
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  const BlockId old = a->blocks()[0];
  const std::vector<BlockId> b_blocks(b->blocks().begin(), b->blocks().end());
  *a = std::move(*b);
  CHECK(alloc.pool().ref_count(old) == 0);
  CHECK(alloc.pool().free_blocks() == 6);
  CHECK(std::equal(a->blocks().begin(), a->blocks().end(), b_blocks.begin(), b_blocks.end()));
  CHECK(a->tokens() == 8);
  CHECK(b->blocks().empty());
  a.reset();
  b.reset();
  CHECK(alloc.pool().free_blocks() == 8);
  CHECK(alloc.pool().invalid_releases() == 0);
}

TEST_CASE("self move assignment keeps the blocks") {
  BlockAllocator alloc(small_config(8, 4));
  auto a = alloc.allocate(8);
  REQUIRE(a.has_value());
  BlockAllocation& alias = *a;
  *a = std::move(alias);
  CHECK(a->blocks().size() == 2);
  CHECK(alloc.pool().free_blocks() == 6);
}

TEST_CASE("a default-constructed allocation owns nothing") {
  BlockAllocation empty;
  CHECK(empty.blocks().empty());
  CHECK(empty.tokens() == 0);
  CHECK_FALSE(empty.extend(5));
  CHECK(empty.share().blocks().empty());
}

TEST_CASE("slot maps a token to block x block_size + offset") {
  BlockAllocator alloc(small_config(32, 4));
  auto pad = alloc.allocate(12);  // makes the next blocks nonzero
  auto a = alloc.allocate(10);    // 3 blocks, capacity 12
  REQUIRE(a.has_value());
  for (std::size_t t = 0; t < a->capacity(); ++t) {
    CAPTURE(t);
    CHECK(a->slot(t) == a->blocks()[t / 4] * 4 + t % 4);
  }
  CHECK_THROWS_AS(static_cast<void>(a->slot(12)), std::out_of_range);
}

TEST_CASE("extend within the current blocks records the tokens and takes no block") {
  BlockAllocator alloc(small_config(8, 4));
  auto a = alloc.allocate(5);  // 2 blocks
  REQUIRE(a.has_value());
  CHECK(a->extend(8));
  CHECK(a->tokens() == 8);
  CHECK(a->blocks().size() == 2);
  CHECK(alloc.pool().free_blocks() == 6);
}

TEST_CASE("extend to a larger total appends the missing blocks") {
  BlockAllocator alloc(small_config(8, 4));
  auto a = alloc.allocate(5);  // 2 blocks
  REQUIRE(a.has_value());
  const std::vector<BlockId> before(a->blocks().begin(), a->blocks().end());
  CHECK(a->extend(17));  // 5 blocks
  CHECK(a->tokens() == 17);
  REQUIRE(a->blocks().size() == 5);
  CHECK(std::equal(before.begin(), before.end(), a->blocks().begin()));
  CHECK(distinct_and_in_range(a->blocks(), 8));
  for (const BlockId b : a->blocks()) CHECK(alloc.pool().ref_count(b) == 1);
  CHECK(alloc.pool().free_blocks() == 3);
}

TEST_CASE("a failed extend leaves the allocation and the pool unchanged") {
  BlockAllocator alloc(small_config(8, 4));
  auto a = alloc.allocate(8);  // 2 blocks
  auto other = alloc.allocate(16);  // 4 blocks, 2 left
  REQUIRE(a.has_value());
  REQUIRE(other.has_value());
  const std::vector<BlockId> before(a->blocks().begin(), a->blocks().end());
  const auto counts_before = all_counts(alloc.pool());
  CHECK_FALSE(a->extend(21));  // needs 6, i.e. 4 more
  CHECK(std::equal(before.begin(), before.end(), a->blocks().begin(), a->blocks().end()));
  CHECK(a->tokens() == 8);
  CHECK(alloc.pool().free_blocks() == 2);
  CHECK(all_counts(alloc.pool()) == counts_before);
  CHECK_FALSE(a->extend(std::numeric_limits<std::size_t>::max()));
  CHECK(a->blocks().size() == 2);
  CHECK(a->extend(16));  // exactly the 2 left
  CHECK(alloc.pool().free_blocks() == 0);
}

TEST_CASE("extend to a smaller total keeps every block") {
  BlockAllocator alloc(small_config(8, 4));
  auto a = alloc.allocate(12);  // 3 blocks
  REQUIRE(a.has_value());
  CHECK(a->extend(1));
  CHECK(a->tokens() == 1);
  CHECK(a->blocks().size() == 3);
  CHECK(alloc.pool().free_blocks() == 5);
}

TEST_CASE("share raises every count and each owner returns its own reference") {
  BlockAllocator alloc(small_config(8, 4));
  auto a = alloc.allocate(12);
  REQUIRE(a.has_value());
  auto s = std::make_optional(a->share());
  CHECK(s->tokens() == 12);
  CHECK(std::equal(a->blocks().begin(), a->blocks().end(), s->blocks().begin(), s->blocks().end()));
  for (const BlockId b : a->blocks()) CHECK(alloc.pool().ref_count(b) == 2);
  a.reset();
  CHECK(alloc.pool().free_blocks() == 5);
  for (const BlockId b : s->blocks()) CHECK(alloc.pool().ref_count(b) == 1);
  s.reset();
  CHECK(alloc.pool().free_blocks() == 8);
  CHECK(alloc.pool().invalid_releases() == 0);
}

TEST_CASE("share of an allocation whose block is no longer held throws and takes no reference") {
  BlockAllocator alloc(small_config(8, 4));
  auto a = alloc.allocate(12);
  REQUIRE(a.has_value());
  const std::vector<BlockId> blocks(a->blocks().begin(), a->blocks().end());
  // Misuse: someone releases the last block on the allocation's behalf. A
  // fork would own it without a reference (the same as a block already at
  // UINT32_MAX references, which a test cannot reach quickly).
  CHECK(alloc.pool().release(std::span<const BlockId>(&blocks.back(), 1)) == 1);
  CHECK_THROWS_AS(static_cast<void>(a->share()), std::overflow_error);
  CHECK(alloc.pool().ref_count(blocks[0]) == 1);
  CHECK(alloc.pool().ref_count(blocks[1]) == 1);
  CHECK(alloc.pool().free_blocks() == 6);
  CHECK(alloc.pool().invalid_releases() == 1);
}

TEST_CASE("shrinking a shared allocation never frees the shared blocks") {
  BlockAllocator alloc(small_config(8, 4));
  auto a = alloc.allocate(12);
  REQUIRE(a.has_value());
  auto s = a->share();
  CHECK(a->extend(0));
  a.reset();
  for (const BlockId b : s.blocks()) CHECK(alloc.pool().ref_count(b) == 1);
  CHECK(alloc.pool().free_blocks() == 5);
}

TEST_CASE("extend after share grows only the extending owner") {
  BlockAllocator alloc(small_config(8, 4));
  auto a = alloc.allocate(4);  // 1 block
  REQUIRE(a.has_value());
  auto s = a->share();
  CHECK(a->extend(12));  // 2 more
  CHECK(a->blocks().size() == 3);
  CHECK(s.blocks().size() == 1);
  CHECK(alloc.pool().ref_count(a->blocks()[0]) == 2);
  CHECK(alloc.pool().ref_count(a->blocks()[1]) == 1);
  CHECK(alloc.pool().ref_count(a->blocks()[2]) == 1);
  a.reset();
  CHECK(alloc.pool().free_blocks() == 7);
}

TEST_CASE("memory_stats reports blocks and bytes") {
  BlockAllocatorConfig c = small_config(10, 16);
  BlockAllocator alloc(c);
  auto a = alloc.allocate(64);  // 4 blocks
  REQUIRE(a.has_value());
  const MemoryStats s = alloc.memory_stats();
  CHECK(s.total_blocks == 10);
  CHECK(s.allocated_blocks == 4);
  CHECK(s.free_blocks == 6);
  CHECK(s.total_bytes == 10 * c.bytes_per_block());
  CHECK(s.allocated_bytes == 4 * c.bytes_per_block());
  CHECK(s.free_bytes == 6 * c.bytes_per_block());
  CHECK(s.utilization() == doctest::Approx(0.4));
  CHECK(alloc.config().num_blocks == 10);
}

TEST_CASE("utilization of an empty stats value is zero") { CHECK(MemoryStats{}.utilization() == 0.0); }

// ------------------------------------------------------------ model check

// TGI's radix.rs style: random operations against a plain model (expected
// reference counts), checking the whole pool after every operation.
TEST_CASE("100,000 random operations keep the pool equal to a reference-count model") {
  const std::uint64_t seed = tgi_test::seed();
  MESSAGE("seed = " << seed);
  constexpr std::uint32_t kBlocks = 50;  // 8-bit words, last one partial
  constexpr std::uint32_t kBlockSize = 4;
  BlockAllocator alloc(small_config(kBlocks, kBlockSize));
  BlockPool& pool = alloc.pool();
  std::mt19937_64 rng(seed);
  auto below = [&](std::size_t n) { return static_cast<std::size_t>(rng() % n); };

  std::vector<std::uint32_t> model(kBlocks, 0);
  std::size_t model_invalid = 0;
  std::vector<std::vector<BlockId>> raw;  // each entry: one reference to each listed block
  std::vector<BlockAllocation> allocs;
  auto model_free = [&] {
    return static_cast<std::size_t>(std::count(model.begin(), model.end(), std::uint32_t{0}));
  };
  // Takes fresh blocks into the model; false if one was not free or repeats.
  auto adopt = [&](std::span<const BlockId> ids) {
    for (const BlockId b : ids) {
      if (b >= kBlocks || model[b] != 0) return false;
      model[b] = 1;
    }
    return true;
  };
  auto drop_refs = [&](std::span<const BlockId> ids) {
    std::size_t freed = 0;
    for (const BlockId b : ids) freed += --model[b] == 0 ? 1 : 0;
    return freed;
  };
  auto bad_id = [&]() -> BlockId {
    std::vector<BlockId> candidates{kBlocks, kBlocks + 1, std::numeric_limits<BlockId>::max()};
    for (BlockId b = 0; b < kBlocks; ++b) {
      if (model[b] == 0) candidates.push_back(b);
    }
    return candidates[below(candidates.size())];
  };

  std::size_t ok_ops = 0;
  std::array<std::size_t, 2> allocs_by_result{};  // [failed, succeeded]
  std::array<std::size_t, 2> grows_by_result{};   // extends that needed blocks
  constexpr int kOps = 100'000;
  int op_index = 0;
  bool consistent = true;
  for (; op_index < kOps; ++op_index) {
    bool op_ok = true;
    switch (below(14)) {
      case 0: {  // raw allocate k
        std::vector<BlockId> out(1 + below(6), kSentinel);
        const bool expect = model_free() >= out.size();
        const bool got = pool.try_allocate(out);
        op_ok = got == expect;
        if (got) {
          op_ok = op_ok && adopt(out);
          raw.push_back(std::move(out));
        } else {
          op_ok = op_ok && std::all_of(out.begin(), out.end(), [](BlockId b) { return b == kSentinel; });
        }
        break;
      }
      case 1: {  // retain part of a raw entry
        if (raw.empty()) break;
        const auto& src = raw[below(raw.size())];
        std::vector<BlockId> part(src.begin(), src.begin() + static_cast<std::ptrdiff_t>(1 + below(src.size())));
        pool.retain(part);
        for (const BlockId b : part) ++model[b];
        raw.push_back(std::move(part));
        break;
      }
      case 2:
      case 11: {  // release a raw entry
        if (raw.empty()) break;
        const std::size_t j = below(raw.size());
        op_ok = pool.release(raw[j]) == drop_refs(raw[j]);
        raw[j] = std::move(raw.back());
        raw.pop_back();
        break;
      }
      case 3: {  // release of a free or out-of-range block
        const BlockId b = bad_id();
        op_ok = pool.release(std::span<const BlockId>(&b, 1)) == 0;
        ++model_invalid;
        break;
      }
      case 4: {  // retain of a free or out-of-range block
        const BlockId b = bad_id();
        pool.retain(std::span<const BlockId>(&b, 1));
        ++model_invalid;
        break;
      }
      case 5:
      case 6: {  // allocate tokens
        const std::size_t tokens = below(25);
        const std::size_t need = std::max<std::size_t>(1, (tokens + kBlockSize - 1) / kBlockSize);
        auto a = alloc.allocate(tokens);
        op_ok = a.has_value() == (model_free() >= need);
        ++allocs_by_result[a.has_value() ? 1 : 0];
        if (a) {
          op_ok = op_ok && a->blocks().size() == need && a->tokens() == tokens && adopt(a->blocks());
          allocs.push_back(std::move(*a));
        }
        break;
      }
      case 7:
      case 12: {  // extend
        if (allocs.empty()) break;
        BlockAllocation& a = allocs[below(allocs.size())];
        const std::vector<BlockId> before(a.blocks().begin(), a.blocks().end());
        const std::size_t old_tokens = a.tokens();
        const std::size_t total = below(a.capacity() + 13);
        const std::size_t need = std::max<std::size_t>(1, (total + kBlockSize - 1) / kBlockSize);
        const bool expect = need <= before.size() || model_free() >= need - before.size();
        const bool got = a.extend(total);
        if (need > before.size()) ++grows_by_result[got ? 1 : 0];
        op_ok = got == expect && std::equal(before.begin(), before.end(), a.blocks().begin());
        if (got) {
          op_ok = op_ok && a.tokens() == total && a.blocks().size() == std::max(need, before.size()) &&
                  adopt(a.blocks().subspan(before.size()));
        } else {
          op_ok = op_ok && a.tokens() == old_tokens && a.blocks().size() == before.size();
        }
        break;
      }
      case 8: {  // share
        if (allocs.empty()) break;
        BlockAllocation s = allocs[below(allocs.size())].share();
        for (const BlockId b : s.blocks()) ++model[b];
        allocs.push_back(std::move(s));
        break;
      }
      case 9:
      case 13: {  // drop
        if (allocs.empty()) break;
        const std::size_t j = below(allocs.size());
        drop_refs(allocs[j].blocks());
        allocs[j] = std::move(allocs.back());  // move assignment over a live allocation
        allocs.pop_back();
        break;
      }
      case 10: {  // move assignment of one live allocation over another
        if (allocs.size() < 2) break;
        const std::size_t j = below(allocs.size());
        const std::size_t k = below(allocs.size());
        if (j == k) break;
        drop_refs(allocs[j].blocks());
        allocs[j] = std::move(allocs[k]);
        op_ok = allocs[k].blocks().empty();
        allocs[k] = std::move(allocs.back());
        allocs.pop_back();
        break;
      }
      default:
        break;
    }
    bool counts_ok = true;
    for (BlockId b = 0; b < kBlocks; ++b) counts_ok = counts_ok && pool.ref_count(b) == model[b];
    consistent = op_ok && counts_ok && pool.free_blocks() == model_free() &&
                 pool.invalid_releases() == model_invalid;
    if (!consistent) break;  // op_index names the first operation that diverged
    ++ok_ops;
  }
  CAPTURE(op_index);
  CHECK(consistent);
  CHECK(ok_ops == kOps);
  MESSAGE("allocate failed/succeeded " << allocs_by_result[0] << "/" << allocs_by_result[1]
                                        << ", growing extend failed/succeeded " << grows_by_result[0] << "/"
                                        << grows_by_result[1]);
  // Both outcomes of both calls were exercised (the pool ran full and recovered).
  CHECK(std::all_of(allocs_by_result.begin(), allocs_by_result.end(), [](std::size_t n) { return n > 100; }));
  CHECK(std::all_of(grows_by_result.begin(), grows_by_result.end(), [](std::size_t n) { return n > 100; }));
  for (const auto& r : raw) static_cast<void>(pool.release(r));
  allocs.clear();
  CHECK(pool.free_blocks() == kBlocks);
  CHECK(all_counts(pool) == std::vector<std::uint32_t>(kBlocks, 0));
}

// ------------------------------------------------------------------ stress

TEST_SUITE("stress") {
  // Each block carries an owner tag (the lineage of allocations sharing it), a
  // test-side reference count and a plain payload. The tag is claimed with a
  // CAS from "none" when the pool hands a block out, so a block handed to two
  // unrelated owners fails the CAS. The payload is plain memory, written by the
  // owner that takes the block from the pool and cleared by the holder that
  // drops the last test-side reference. Tags and the taker's count increment
  // are relaxed, so only the pool's own orderings order the last holder's
  // accesses before the next owner's, which ThreadSanitizer checks.
  TEST_CASE("threads allocating, sharing, extending and releasing at once never give a block to two owners") {
    const std::uint64_t seed = tgi_test::seed();
    const std::uint64_t iters = tgi_test::iterations(20'000);
    MESSAGE("seed = " << seed << ", iterations per thread = " << iters);
    constexpr unsigned kThreads = 4;
    constexpr std::uint32_t kBlocks = 48;
    constexpr std::uint32_t kBlockSize = 4;
    BlockAllocator alloc(small_config(kBlocks, kBlockSize));
    BlockPool& pool = alloc.pool();

    std::vector<std::atomic<std::uint32_t>> tag(kBlocks);
    std::vector<std::atomic<std::uint32_t>> refs(kBlocks);
    std::vector<std::uint64_t> payload(kBlocks, 0);
    struct Held {
      BlockAllocation a;
      std::uint32_t group;
    };
    std::array<std::atomic<Held*>, kThreads> mailbox{};
    std::atomic<std::uint32_t> next_group{1};
    std::atomic<std::uint64_t> two_owners{0}, bad_refs{0}, bad_tags{0}, bad_pool_counts{0}, invalid_sent{0};
    std::atomic<std::uint64_t> allocated{0}, failed{0}, shared{0}, extended{0}, passed{0};
    std::barrier start(kThreads);

    // A block fresh from the pool joins `group`.
    auto adopt = [&](BlockId b, std::uint32_t group) {
      std::uint32_t none = 0;
      // Relaxed: the CAS only detects a second owner; it must not order anything.
      if (!tag[b].compare_exchange_strong(none, group, std::memory_order::relaxed)) two_owners.fetch_add(1);
      if (refs[b].fetch_add(1, std::memory_order::relaxed) != 0) two_owners.fetch_add(1);  // relaxed: as above
      payload[b] = group;  // plain write: ordered after the last owner's only by the pool
    };
    auto verify = [&](const Held& h) {
      for (const BlockId b : h.a.blocks()) {
        if (tag[b].load(std::memory_order::relaxed) != h.group || payload[b] != h.group) bad_tags.fetch_add(1);
        if (pool.ref_count(b) == 0 || refs[b].load(std::memory_order::relaxed) == 0) bad_pool_counts.fetch_add(1);
      }
    };
    auto drop = [&](Held& h) {
      verify(h);
      for (const BlockId b : h.a.blocks()) {
        // acq_rel as std::shared_ptr: every holder's payload read happens-before the last one's clear.
        const std::uint32_t prev = refs[b].fetch_sub(1, std::memory_order::acq_rel);
        if (prev == 0) bad_refs.fetch_add(1);
        if (prev == 1) {
          payload[b] = 0;
          tag[b].store(0, std::memory_order::relaxed);  // relaxed: the pool's release publishes it
        }
      }
      h.a = BlockAllocation{};  // returns the blocks to the pool
    };

    auto worker = [&](unsigned t) {
      std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ULL + t);
      auto below = [&](std::size_t n) { return static_cast<std::size_t>(rng() % n); };
      std::vector<Held> mine;
      auto drop_at = [&](std::size_t j) {
        drop(mine[j]);
        mine[j] = std::move(mine.back());
        mine.pop_back();
      };
      start.arrive_and_wait();
      for (std::uint64_t i = 0; i < iters; ++i) {
        const std::size_t op = below(100);
        if (op < 30) {
          const std::uint32_t group = next_group.fetch_add(1, std::memory_order::relaxed);  // relaxed: an id
          auto a = alloc.allocate(below(6 * kBlockSize));
          if (!a) {
            failed.fetch_add(1, std::memory_order::relaxed);  // relaxed: statistics
            continue;
          }
          allocated.fetch_add(1, std::memory_order::relaxed);
          for (const BlockId b : a->blocks()) adopt(b, group);
          mine.push_back(Held{std::move(*a), group});
        } else if (op < 45 && !mine.empty()) {
          const Held& h = mine[below(mine.size())];
          Held s{h.a.share(), h.group};
          for (const BlockId b : s.a.blocks()) {
            if (refs[b].fetch_add(1, std::memory_order::relaxed) == 0) bad_refs.fetch_add(1);  // we hold one
          }
          shared.fetch_add(1, std::memory_order::relaxed);
          if (below(2) == 0) {
            mine.push_back(std::move(s));
          } else {  // hand it to another thread; it may be picked up, or returned to us to drop
            const unsigned to = static_cast<unsigned>((t + 1 + below(kThreads - 1)) % kThreads);
            // acq_rel: publishes the share to its receiver, acquires the one we displace.
            Held* old = mailbox[to].exchange(new Held(std::move(s)), std::memory_order::acq_rel);
            if (old != nullptr) {
              drop(*old);
              delete old;
            }
          }
        } else if (op < 60 && !mine.empty()) {
          Held& h = mine[below(mine.size())];
          const std::size_t had = h.a.blocks().size();
          if (h.a.extend(h.a.tokens() + below(3 * kBlockSize))) {
            for (const BlockId b : h.a.blocks().subspan(had)) adopt(b, h.group);
            extended.fetch_add(1, std::memory_order::relaxed);
          }
        } else if (op < 85 && !mine.empty()) {
          drop_at(below(mine.size()));
        } else if (op < 90) {
          // acq_rel: acquires the sender's share (and its payload writes).
          if (Held* got = mailbox[t].exchange(nullptr, std::memory_order::acq_rel)) {
            verify(*got);
            mine.push_back(std::move(*got));
            delete got;
            passed.fetch_add(1, std::memory_order::relaxed);
          }
        } else if (op < 96 && !mine.empty()) {
          verify(mine[below(mine.size())]);
        } else {
          const BlockId bad = kBlocks + static_cast<BlockId>(below(3));
          if (pool.release(std::span<const BlockId>(&bad, 1)) != 0) bad_refs.fetch_add(1);
          pool.retain(std::span<const BlockId>(&bad, 1));
          invalid_sent.fetch_add(2, std::memory_order::relaxed);
        }
        if (mine.size() > 6) drop_at(below(mine.size()));
      }
      while (!mine.empty()) drop_at(mine.size() - 1);
    };

    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
    for (auto& th : threads) th.join();
    for (auto& box : mailbox) {
      if (Held* left = box.exchange(nullptr)) {
        drop(*left);
        delete left;
      }
    }

    MESSAGE("allocated " << allocated.load() << ", failed " << failed.load() << ", shared " << shared.load()
                         << ", extended " << extended.load() << ", passed between threads " << passed.load());
    CHECK(two_owners.load() == 0);
    CHECK(bad_refs.load() == 0);
    CHECK(bad_tags.load() == 0);
    CHECK(bad_pool_counts.load() == 0);
    CHECK(allocated.load() > 0);
    CHECK(pool.free_blocks() == kBlocks);
    CHECK(pool.invalid_releases() == invalid_sent.load());
    CHECK(all_counts(pool) == std::vector<std::uint32_t>(kBlocks, 0));
    for (BlockId b = 0; b < kBlocks; ++b) {
      CHECK(tag[b].load() == 0);
      CHECK(refs[b].load() == 0);
    }
    // Every block is allocatable again, once.
    const auto all = take(pool, kBlocks);
    CHECK(distinct_and_in_range(all, kBlocks));
  }

  // With exactly as many blocks as the threads' batches together, no batch may
  // ever fail: another caller's reservation or partial claim would show up as
  // a spurious failure here.
  TEST_CASE("with exactly enough blocks for every thread's batch, no batch ever fails") {
    const std::uint64_t iters = tgi_test::iterations(4'000);
    MESSAGE("iterations per thread = " << iters);
    struct Shape {
      std::array<std::uint32_t, 4> batch;
    };
    // 16 blocks: 4-bit words; 196 blocks: 32-bit words, batches span words.
    for (const Shape shape : {Shape{{1, 3, 5, 7}}, Shape{{1, 31, 64, 100}}}) {
      std::uint32_t total = 0;
      for (const std::uint32_t k : shape.batch) total += k;
      CAPTURE(total);
      BlockPool pool(total);
      std::vector<std::atomic<std::uint32_t>> owner(total);
      std::atomic<std::uint64_t> failures{0}, collisions{0}, wrong_freed{0};
      std::barrier start(4);
      auto worker = [&](unsigned t) {
        std::vector<BlockId> mine(shape.batch[t]);
        start.arrive_and_wait();
        for (std::uint64_t i = 0; i < iters; ++i) {
          if (!pool.try_allocate(mine)) {
            failures.fetch_add(1, std::memory_order::relaxed);  // relaxed: a statistic
            continue;
          }
          for (const BlockId b : mine) {
            std::uint32_t none = 0;
            // Relaxed: detects a second owner; orders nothing.
            if (b >= total || !owner[b].compare_exchange_strong(none, t + 1, std::memory_order::relaxed)) {
              collisions.fetch_add(1, std::memory_order::relaxed);
            }
          }
          for (const BlockId b : mine) {
            if (b < total) owner[b].store(0, std::memory_order::relaxed);  // relaxed: as above
          }
          if (pool.release(mine) != mine.size()) wrong_freed.fetch_add(1, std::memory_order::relaxed);
        }
      };
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < 4; ++t) threads.emplace_back(worker, t);
      for (auto& th : threads) th.join();
      CHECK(failures.load() == 0);
      CHECK(collisions.load() == 0);
      CHECK(wrong_freed.load() == 0);
      CHECK(pool.free_blocks() == total);
      CHECK(pool.invalid_releases() == 0);
      CHECK(all_counts(pool) == std::vector<std::uint32_t>(total, 0));
    }
  }

  // Four holders each hold a reference to every block and retain/release extra
  // ones at random, then drop their own in a random order, so the last
  // reference of a block falls to any of them. A fifth thread, the next owner,
  // takes each block as soon as it is free and writes its payload; the holders
  // read the payload (plain) while they hold the block. Each block must become
  // free exactly once, never while held, and only the pool's orderings (a
  // holder's release, the last holder's acquire, the bit handover) order the
  // holders' reads before the next owner's write, which ThreadSanitizer checks.
  TEST_CASE("concurrent retains and releases of shared blocks free each block exactly once") {
    const std::uint64_t seed = tgi_test::seed();
    const std::uint64_t iters = tgi_test::iterations(20'000);
    MESSAGE("seed = " << seed << ", iterations per thread = " << iters);
    constexpr unsigned kHolders = 4;
    constexpr std::uint32_t kBlocks = 130;
    BlockPool pool(kBlocks);
    const auto blocks = take(pool, kBlocks);
    for (unsigned t = 1; t < kHolders; ++t) pool.retain(blocks);
    std::vector<std::uint64_t> payload(kBlocks, 0);
    std::vector<BlockId> next_owner_got;
    std::atomic<std::uint64_t> freed_total{0}, early_frees{0}, read_after_free{0};
    std::atomic<unsigned> holders_done{0};
    std::barrier start(kHolders + 1);
    auto holder = [&](unsigned t) {
      std::mt19937_64 rng(seed + t);
      auto read = [&](std::span<const BlockId> part) {
        for (const BlockId b : part) {
          // relaxed: a statistic
          if (payload[b] != 0) read_after_free.fetch_add(1, std::memory_order::relaxed);
        }
      };
      start.arrive_and_wait();
      for (std::uint64_t i = 0; i < iters; ++i) {
        const std::size_t from = static_cast<std::size_t>(rng() % kBlocks);
        const std::size_t len = 1 + static_cast<std::size_t>(rng() % std::min<std::size_t>(8, kBlocks - from));
        const auto part = std::span<const BlockId>(blocks).subspan(from, len);
        read(part);
        pool.retain(part);
        // We still hold our own reference: nothing may become free.
        if (pool.release(part) != 0) early_frees.fetch_add(1, std::memory_order::relaxed);  // relaxed: statistic
      }
      std::vector<BlockId> order(blocks);
      std::shuffle(order.begin(), order.end(), rng);
      for (std::size_t from = 0; from < order.size(); from += 8) {
        const auto chunk = std::span<const BlockId>(order).subspan(from, std::min<std::size_t>(8, order.size() - from));
        read(chunk);
        freed_total.fetch_add(pool.release(chunk), std::memory_order::relaxed);  // relaxed: read after join
      }
      // relaxed: a flag only; acquire/release here would order the holders'
      // reads before the next owner's writes and hide a pool that does not.
      holders_done.fetch_add(1, std::memory_order::relaxed);
    };
    // A pool that loses a block would keep it waiting for good: once every
    // holder is done, many refusals in a row end the wait, and the count
    // checks below report the loss instead of a hang.
    auto next_owner = [&] {
      start.arrive_and_wait();
      for (unsigned refusals_after_done = 0; next_owner_got.size() < kBlocks;) {
        // relaxed: see holders_done's increment.
        const bool done = holders_done.load(std::memory_order::relaxed) == kHolders;
        BlockId b = kSentinel;
        if (pool.try_allocate(std::span<BlockId>(&b, 1))) {
          payload[b] = 1;  // plain write: after every holder's read only through the pool
          next_owner_got.push_back(b);
          refusals_after_done = 0;
        } else if (done && ++refusals_after_done == 100'000) {
          break;
        } else {
          std::this_thread::yield();
        }
      }
    };
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kHolders; ++t) threads.emplace_back(holder, t);
    threads.emplace_back(next_owner);
    for (auto& th : threads) th.join();
    CHECK(early_frees.load() == 0);
    CHECK(read_after_free.load() == 0);
    CHECK(freed_total.load() == kBlocks);
    CHECK(next_owner_got.size() == kBlocks);
    CHECK(distinct_and_in_range(next_owner_got, kBlocks));
    CHECK(pool.free_blocks() == 0);
    CHECK(pool.release(next_owner_got) == kBlocks);
    CHECK(pool.free_blocks() == kBlocks);
    CHECK(pool.invalid_releases() == 0);
    CHECK(all_counts(pool) == std::vector<std::uint32_t>(kBlocks, 0));
  }

  // A misuse the pool still accounts for: two threads release the one
  // reference of the same blocks at once. The last holder drops a count of 1
  // with a plain store, so both may take a count to 0; exactly one of them
  // must free the block (and count it in free_blocks()), the other must count
  // a rejected id. No allocation runs meanwhile (with one, a late second
  // release could drop the new owner's reference, which nothing can detect).
  TEST_CASE("two threads releasing the same last references free each block once and count the other release") {
    const std::uint64_t rounds = tgi_test::iterations(2'000);
    MESSAGE("rounds = " << rounds);
    if (std::thread::hardware_concurrency() < 2) {
      MESSAGE("one CPU: the two releases rarely meet here; test_pool_races forces each race");
    }
    // 64 blocks: 16-bit words; one release call a block, the two threads in
    // step, block by block.
    constexpr std::uint32_t kBlocks = 64;
    BlockPool pool(kBlocks);
    std::barrier sync(2);
    SpinBarrier step;
    std::vector<BlockId> held;
    std::array<std::uint64_t, 2> freed{};
    std::uint64_t expected_invalid = 0;
    auto releaser = [&](unsigned t) {
      for (std::uint64_t r = 0; r < rounds; ++r) {
        sync.arrive_and_wait();  // thread 0 (this test's thread) holds every block
        for (const BlockId b : held) {
          step.arrive();  // the two threads release each block at the same moment
          freed[t] += pool.release(std::span<const BlockId>(&b, 1));
        }
        sync.arrive_and_wait();
        if (t == 0) {
          // Between rounds, on one thread: the pool is whole again.
          const bool whole = pool.free_blocks() == kBlocks && all_counts(pool) == std::vector<std::uint32_t>(kBlocks, 0);
          expected_invalid += kBlocks;
          if (!whole || freed[0] + freed[1] != (r + 1) * kBlocks || pool.invalid_releases() != expected_invalid) {
            FAIL_CHECK("round " << r << ": freed " << freed[0] + freed[1] << " (expected " << (r + 1) * kBlocks << "), invalid "
                                << pool.invalid_releases() << " (expected " << expected_invalid << "), free "
                                << pool.free_blocks());
          }
          held.assign(kBlocks, kSentinel);
          if (!pool.try_allocate(held)) FAIL_CHECK("round " << r << ": the whole pool could not be taken again");
        }
      }
    };
    held = take(pool, kBlocks);
    std::thread other(releaser, 1u);
    releaser(0);
    other.join();
    CHECK(freed[0] + freed[1] == rounds * kBlocks);
    CHECK(pool.invalid_releases() == rounds * kBlocks);
    MESSAGE("blocks freed by thread 0: " << freed[0] << ", by thread 1: " << freed[1]);
    CHECK(pool.release(held) == kBlocks);
    CHECK(pool.free_blocks() == kBlocks);
  }
}
