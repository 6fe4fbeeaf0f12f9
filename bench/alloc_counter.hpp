// Heap accounting for the benchmark binary.
//
// alloc_counter.cpp replaces the global operator new/delete (every form) so
// that each allocation made by a thread is counted in that thread's
// AllocStats. Peers that bypass operator new get a counting hook instead:
//   oneTBB      CountingTbbAllocator (forwards to tbb::cache_aligned_allocator)
//   moodycamel  CountingMoodycamelTraits (forwards to std::malloc/std::free)
// malloc itself is not intercepted: nothing else in the peers calls it directly.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tgi_bench {

/// Counters of one thread. Bytes are malloc_usable_size() for operator new
/// (what the allocator really reserved) and the requested size for the hooks.
struct AllocStats {
  std::uint64_t allocs = 0;
  std::uint64_t frees = 0;
  std::uint64_t bytes_allocated = 0;
  std::uint64_t bytes_freed = 0;

  [[nodiscard]] std::int64_t live_bytes() const noexcept {
    return static_cast<std::int64_t>(bytes_allocated) - static_cast<std::int64_t>(bytes_freed);
  }
};

/// A copy of the calling thread's counters.
[[nodiscard]] AllocStats thread_alloc_stats() noexcept;

/// Hooks for allocators that do not go through operator new.
void note_alloc(std::size_t bytes) noexcept;
void note_free(std::size_t bytes) noexcept;

}  // namespace tgi_bench
