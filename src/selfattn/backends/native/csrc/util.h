// Per-ISA engine utilities: aligned buffers, the parallel-for adapter, cost-balanced splits.
// Deliberately free of std:: containers and algorithms, whose out-of-line instantiations would
// be compiled with this TU's ISA flags (see common.h).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "common.h"

namespace selfattn {
namespace SA_NS {

// memset(p, 0, bytes) that is defined for an empty range too (p may then be null: Dv == 0).
static inline void zero_bytes(void* p, size_t bytes) {
  if (bytes > 0) std::memset(p, 0, bytes);
}

// A 64-byte aligned, uninitialised buffer owned by one call (or one task of a call).
template <class T>
struct Buf {
  T* p = nullptr;
  Buf() = default;
  explicit Buf(int64_t n) { alloc(n); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  void alloc(int64_t n) {
    std::free(p);
    p = nullptr;
    if (n > 0) {
      // Out of memory (or a size past the address space) throws std::bad_alloc, which the
      // bindings' pybind11 layer turns into a Python MemoryError. Buffers are allocated in the
      // calling thread or inside a task of torch's pool, which catches a task's exception and
      // rethrows it after the join; every Buf frees itself on the way out.
      if (uint64_t(n) > (SIZE_MAX - 63) / sizeof(T)) throw std::bad_alloc();
      size_t bytes = (size_t(n) * sizeof(T) + 63) / 64 * 64;
      p = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (p == nullptr) throw std::bad_alloc();
#ifdef SELFATTN_POISON  // debug builds: scratch starts as NaN, so reading it unwritten shows
      std::memset(static_cast<void*>(p), 0xFF, bytes);
#endif
    }
  }
  void zero(int64_t n) { zero_bytes(p, size_t(n > 0 ? n : 0) * sizeof(T)); }
  T& operator[](int64_t i) { return p[i]; }
  const T& operator[](int64_t i) const { return p[i]; }
};

// Run f(begin, end) over [0, n) on torch's intra-op pool (in this thread when `serial`).
template <class F>
static inline void parallel(const Pool& pool, int64_t n, F& f, bool serial = false) {
  if (n <= 0) return;
  if (n == 1 || serial || pool.run == nullptr) {
    f(int64_t(0), n);
    return;
  }
  pool.run(n, &f, [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); });
}

// Cut items [0, n) (in order) into `parts` contiguous ranges of about equal cost: bounds[p] ..
// bounds[p + 1]. Which thread runs which item never changes a result (every item is computed
// the same way wherever it runs), so this only balances time.
static inline void split_by_cost(const double* cost, int64_t n, int64_t parts, int64_t* bounds) {
  double total = 0;
  for (int64_t i = 0; i < n; i++) total += cost[i];
  bounds[0] = 0;
  int64_t p = 1;
  double acc = 0;
  for (int64_t i = 0; i < n && p < parts; i++) {
    acc += cost[i];
    while (p < parts && acc >= total * double(p) / double(parts)) bounds[p++] = i + 1;
  }
  while (p <= parts) bounds[p++] = n;
}

// Run items [0, n) with the given costs over the pool: fn(first, last) per part. Calls whose
// total cost is below `serial_below` run in the calling thread: a fork/join costs microseconds
// on a quiet machine and a scheduler tick when another process holds a core.
template <class F>
static inline void run_balanced(const Pool& pool, const double* cost, int64_t n, F& fn,
                                double serial_below = 0) {
  if (n <= 0) return;
  if (serial_below > 0) {
    double total = 0;
    for (int64_t i = 0; i < n; i++) total += cost[i];
    if (total < serial_below) {
      fn(int64_t(0), n);
      return;
    }
  }
  int64_t parts = pool.threads ? pool.threads() : 1;
  if (parts > n) parts = n;
  if (parts < 1) parts = 1;
  Buf<int64_t> bounds(parts + 1);
  split_by_cost(cost, n, parts, bounds.p);
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; p++)
      if (bounds[p] < bounds[p + 1]) fn(bounds[p], bounds[p + 1]);
  };
  parallel(pool, parts, body);
}

}  // namespace SA_NS
}  // namespace selfattn
