// Per-ISA engine utilities: aligned buffers, the parallel-for adapter, cost-balanced splits.
// Deliberately free of std:: containers and algorithms, whose out-of-line instantiations would
// be compiled with this TU's ISA flags (see common.h).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "common.h"

#if defined(__SANITIZE_ADDRESS__)
#define SELFATTN_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SELFATTN_ASAN 1
#endif
#endif
#ifdef SELFATTN_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace selfattn {
namespace SA_NS {

// memset(p, 0, bytes) that is defined for an empty range too (p may then be null: Dv == 0).
static inline void zero_bytes(void* p, size_t bytes) {
  if (bytes > 0) std::memset(p, 0, bytes);
}

// Scratch memory kept per thread between calls. A decode step over a short cache is a few
// microseconds of work, and the dozen buffers it needs cost about as much again in malloc/free
// (glibc's free of a multi-KB block consolidates the heap). So a freed buffer goes back to a
// small cache of the thread that frees it, and the next call of that thread takes it back.
// Per thread (thread_local): no locks, safe with torch's pool and with several Python threads
// calling at once; the blocks are freed at thread exit. Large blocks are not kept (their malloc
// is cheap next to the work that needs them), nor more than kCacheBytes in all. Which block a
// buffer gets never changes a result: every buffer is written before it is read (debug builds
// poison it on every hand-out, and under ASan the bytes past the request stay poisoned).
struct ScratchCache {
  static constexpr int kSlots = 16;
  static constexpr size_t kMaxBlock = size_t(4) << 20, kCacheBytes = size_t(16) << 20;
  // a stack, most recently freed on top: a call frees its buffers in the reverse order of their
  // allocation (scopes), so the next call's requests mostly find their block on top
  void* p[kSlots] = {};
  size_t bytes[kSlots] = {};
  int n = 0;
  size_t total = 0;
  ScratchCache() = default;
  ScratchCache(const ScratchCache&) = delete;
  ScratchCache& operator=(const ScratchCache&) = delete;
  ~ScratchCache() {
    while (n > 0) drop(n - 1);
  }
  // Free block i and close the gap.
  void drop(int i) {
#ifdef SELFATTN_ASAN
    ASAN_UNPOISON_MEMORY_REGION(p[i], bytes[i]);
#endif
    std::free(p[i]);
    remove(i);
  }
  void remove(int i) {
    total -= bytes[i];
    for (int j = i; j + 1 < n; j++) {
      p[j] = p[j + 1];
      bytes[j] = bytes[j + 1];
    }
    n--;
  }
  // The most recently freed block of `need` bytes to about twice that (its size in *got), or
  // null: a small request does not take a block a larger one will need.
  void* take(size_t need, size_t* got) {
    for (int i = n - 1; i >= 0; i--)
      if (bytes[i] >= need && bytes[i] <= 2 * need + 4096) {
        void* r = p[i];
        *got = bytes[i];
        remove(i);
        return r;
      }
    return nullptr;
  }
  // Keep block q of `size` bytes on top (dropping the oldest blocks to make room), or free it.
  void give(void* q, size_t size) {
    if (size > kMaxBlock) return std::free(q);
    while (n > 0 && (n == kSlots || total + size > kCacheBytes)) drop(0);
    p[n] = q;
    bytes[n] = size;
    n++;
    total += size;
#ifdef SELFATTN_ASAN  // a cached block is not addressable until it is handed out again
    ASAN_POISON_MEMORY_REGION(q, size);
#endif
  }
};

// This thread's cache. The hot access is one plain pointer (constant-initialised: no guard, no
// wrapper call); the owner, with the destructor that frees the blocks at thread exit, is touched
// once per thread.
struct ScratchOwner {
  ScratchCache* c = nullptr;
  ~ScratchOwner();
};
static thread_local ScratchCache* tls_scratch = nullptr;
static inline ScratchOwner& scratch_owner() {
  static thread_local ScratchOwner owner;
  return owner;
}
inline ScratchOwner::~ScratchOwner() {
  tls_scratch = nullptr;
  delete c;
  c = nullptr;
}
static inline ScratchCache* scratch_cache() {
  ScratchCache* c = tls_scratch;
  if (c == nullptr) {
    ScratchOwner& owner = scratch_owner();
    if (owner.c == nullptr) owner.c = new ScratchCache();  // may throw std::bad_alloc
    c = tls_scratch = owner.c;
  }
  return c;
}

// Bytes of the block for a request of `bytes`: 64-byte lines up to 4 KB, then steps of 1/8 of
// the size's power of two, so that a cache growing by a few keys per step keeps reusing blocks.
static inline size_t block_bytes(size_t bytes) {
  size_t step = 64;
  while (step * 64 < bytes) step *= 2;
  return (bytes + step - 1) / step * step;
}

// A 64-byte aligned, uninitialised buffer owned by one call (or one task of a call), from this
// thread's scratch cache when it holds a block large enough.
template <class T>
struct Buf {
  T* p = nullptr;
  size_t cap = 0;  // bytes of the block
  Buf() = default;
  explicit Buf(int64_t n) { alloc(n); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { release(); }
  void release() {
    if (p == nullptr) return;
#ifdef SELFATTN_ASAN
    ASAN_UNPOISON_MEMORY_REGION(p, cap);
#endif
    scratch_cache()->give(p, cap);  // this thread's cache, whichever thread allocated it
    p = nullptr;
    cap = 0;
  }
  void alloc(int64_t n) {
    release();
    if (n > 0) {
      // Out of memory (or a size past the address space) throws std::bad_alloc, which the
      // bindings' pybind11 layer turns into a Python MemoryError. Buffers are allocated in the
      // calling thread or inside a task of torch's pool, which catches a task's exception and
      // rethrows it after the join; every Buf frees itself on the way out.
      if (uint64_t(n) > (SIZE_MAX - 4095) / 2 / sizeof(T)) throw std::bad_alloc();
      const size_t want = size_t(n) * sizeof(T), bytes = block_bytes(want);
      size_t got = 0;
      void* q = scratch_cache()->take(bytes, &got);
      if (q == nullptr) {
        q = std::aligned_alloc(64, bytes);
        if (q == nullptr) throw std::bad_alloc();
        got = bytes;
      }
      p = static_cast<T*>(q);
      cap = got;
#ifdef SELFATTN_ASAN  // only the bytes asked for are addressable
      ASAN_UNPOISON_MEMORY_REGION(p, cap);
      ASAN_POISON_MEMORY_REGION(p, cap);
      ASAN_UNPOISON_MEMORY_REGION(p, want);
#endif
#ifdef SELFATTN_POISON  // debug builds: scratch starts as NaN, so reading it unwritten shows
      std::memset(static_cast<void*>(p), 0xFF, want);
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

// One step of a short spin-wait (Packed::ensure): the CPU's pause hint where it has one.
static inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
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
  int64_t threads = pool.threads ? pool.threads() : 1;
  if (threads < 1) threads = 1;
  // More parts than threads, taken in order from a shared counter: a thread whose core is
  // shared with another process takes fewer parts instead of holding up the call. Which thread
  // runs a part never changes a result (see split_by_cost).
  int64_t parts = threads == 1 ? 1 : threads * 2;
  if (parts > n) parts = n;
  Buf<int64_t> bounds(parts + 1);
  split_by_cost(cost, n, parts, bounds.p);
  int64_t next = 0;
  auto body = [&](int64_t, int64_t) {
    for (;;) {
      const int64_t p = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
      if (p >= parts) break;
      if (bounds[p] < bounds[p + 1]) fn(bounds[p], bounds[p + 1]);
    }
  };
  parallel(pool, imin(threads, parts), body);
}

}  // namespace SA_NS
}  // namespace selfattn
