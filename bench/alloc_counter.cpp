// Counting replacement of the global operator new/delete (see alloc_counter.hpp).
// Thread-local counters: no shared cache line is written, so counting does not
// itself add contention to the peers that allocate on their hot path.
#include "alloc_counter.hpp"

#include <malloc.h>

#include <cstdlib>
#include <new>

namespace tgi_bench {
namespace {
constinit thread_local AllocStats t_stats{};

void count_alloc(void* p) noexcept {
  t_stats.allocs += 1;
  t_stats.bytes_allocated += malloc_usable_size(p);
}
void count_free(void* p) noexcept {
  t_stats.frees += 1;
  t_stats.bytes_freed += malloc_usable_size(p);
}

void* allocate(std::size_t n) {
  void* p = std::malloc(n == 0 ? 1 : n);
  if (p == nullptr) throw std::bad_alloc();
  count_alloc(p);
  return p;
}

void* allocate_aligned(std::size_t n, std::align_val_t al) {
  const auto a = static_cast<std::size_t>(al);
  const std::size_t rounded = (n + a - 1) / a * a;  // aligned_alloc wants a multiple
  void* p = std::aligned_alloc(a, rounded == 0 ? a : rounded);
  if (p == nullptr) throw std::bad_alloc();
  count_alloc(p);
  return p;
}

void release(void* p) noexcept {
  if (p == nullptr) return;
  count_free(p);
  std::free(p);
}
}  // namespace

AllocStats thread_alloc_stats() noexcept { return t_stats; }

void note_alloc(std::size_t bytes) noexcept {
  t_stats.allocs += 1;
  t_stats.bytes_allocated += bytes;
}

void note_free(std::size_t bytes) noexcept {
  t_stats.frees += 1;
  t_stats.bytes_freed += bytes;
}

}  // namespace tgi_bench

void* operator new(std::size_t n) { return tgi_bench::allocate(n); }
void* operator new[](std::size_t n) { return tgi_bench::allocate(n); }
void* operator new(std::size_t n, std::align_val_t a) { return tgi_bench::allocate_aligned(n, a); }
void* operator new[](std::size_t n, std::align_val_t a) { return tgi_bench::allocate_aligned(n, a); }

void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return tgi_bench::allocate(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return tgi_bench::allocate(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return tgi_bench::allocate_aligned(n, a);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return tgi_bench::allocate_aligned(n, a);
  } catch (...) {
    return nullptr;
  }
}

void operator delete(void* p) noexcept { tgi_bench::release(p); }
void operator delete[](void* p) noexcept { tgi_bench::release(p); }
void operator delete(void* p, std::size_t) noexcept { tgi_bench::release(p); }
void operator delete[](void* p, std::size_t) noexcept { tgi_bench::release(p); }
void operator delete(void* p, std::align_val_t) noexcept { tgi_bench::release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { tgi_bench::release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { tgi_bench::release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { tgi_bench::release(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { tgi_bench::release(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { tgi_bench::release(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { tgi_bench::release(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { tgi_bench::release(p); }
