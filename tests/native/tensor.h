// A small strided 4-D array for the torch-free driver: storage in one of the engine's dtypes,
// a logical shape (size-1 dims broadcast), an optional storage order (a permutation, for
// non-contiguous views) and the engine's View of it. Values are read back in double by a decoder
// written here, independent of the engine's conversions.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace drv {

using selfattn::DT;

inline int64_t dt_size(DT dt) {
  switch (dt) {
    case DT::F64:
    case DT::I64: return 8;
    case DT::F32: return 4;
    case DT::F16:
    case DT::BF16: return 2;
    case DT::U8: return 1;
    case DT::Q8:
    case DT::Q4: break;  // codes live in a Quantized (reference.h), never in a Tensor
  }
  return 0;
}

// 16-bit decoders (IEEE binary16 and bfloat16), by ldexp: no bit tricks shared with the engine
inline double decode_f16(uint16_t h) {
  const int sign = h >> 15, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  double v;
  if (e == 0x1F) v = m ? NAN : INFINITY;
  else if (e == 0) v = std::ldexp(double(m), -24);
  else v = std::ldexp(double(m + 1024), e - 25);
  return sign ? -v : v;
}
inline double decode_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Tensor {
  DT dt = DT::F32;
  int64_t shape[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};  // element strides of the storage (all dims)
  std::vector<unsigned char> data;

  Tensor() = default;
  // order: storage order of the dims, outermost first ({0,1,2,3} = contiguous;
  // {0,2,1,3} = (B, N, H, D) storage of a (B, H, N, D) tensor)
  Tensor(DT t, int64_t a, int64_t b, int64_t c, int64_t d, const int* order = nullptr) {
    static const int plain[4] = {0, 1, 2, 3};
    dt = t;
    shape[0] = a;
    shape[1] = b;
    shape[2] = c;
    shape[3] = d;
    const int* o = order ? order : plain;
    int64_t s = 1;
    for (int x = 3; x >= 0; x--) {
      stride[o[x]] = s;
      s *= shape[o[x]];
    }
    data.assign(size_t(s * dt_size(dt)) + 1, 0);  // +1: never a null pointer, even when empty
  }
  bool empty() const { return shape[0] == 0 && data.empty(); }
  int64_t numel() const { return shape[0] * shape[1] * shape[2] * shape[3]; }
  int64_t offset(int64_t a, int64_t b, int64_t c, int64_t d) const {
    const int64_t ix[4] = {a, b, c, d};
    int64_t off = 0;
    for (int x = 0; x < 4; x++) off += (shape[x] == 1 ? 0 : ix[x]) * stride[x];
    return off;
  }
  // offset in a contiguous array of this tensor's shape (broadcast dims folded), for gradients
  int64_t dense_offset(int64_t a, int64_t b, int64_t c, int64_t d) const {
    const int64_t ix[4] = {a, b, c, d};
    int64_t off = 0;
    for (int x = 0; x < 4; x++) off = off * shape[x] + (shape[x] == 1 ? 0 : ix[x]);
    return off;
  }
  double get(int64_t off) const {
    const unsigned char* p = data.data() + off * dt_size(dt);
    switch (dt) {
      case DT::F32: { float f; std::memcpy(&f, p, 4); return f; }
      case DT::F64: { double f; std::memcpy(&f, p, 8); return f; }
      case DT::F16: { uint16_t h; std::memcpy(&h, p, 2); return decode_f16(h); }
      case DT::BF16: { uint16_t h; std::memcpy(&h, p, 2); return decode_bf16(h); }
      case DT::U8: return p[0];
      case DT::I64: { int64_t i; std::memcpy(&i, p, 8); return double(i); }
      case DT::Q8:
      case DT::Q4: break;
    }
    return 0;
  }
  double at(int64_t a, int64_t b, int64_t c, int64_t d) const { return get(offset(a, b, c, d)); }
  // stores x rounded to the dtype (16-bit: the engine's encoders; any rounding will do, the
  // reference reads back what is stored)
  void set(int64_t a, int64_t b, int64_t c, int64_t d, double x) {
    unsigned char* p = data.data() + offset(a, b, c, d) * dt_size(dt);
    switch (dt) {
      case DT::F32: { float f = float(x); std::memcpy(p, &f, 4); break; }
      case DT::F64: std::memcpy(p, &x, 8); break;
      case DT::F16: { uint16_t h = selfattn::float_to_f16(float(x)); std::memcpy(p, &h, 2); break; }
      case DT::BF16: {
        uint16_t h = selfattn::float_to_bf16(float(x));
        std::memcpy(p, &h, 2);
        break;
      }
      case DT::U8: p[0] = x != 0; break;
      case DT::I64: { int64_t i = int64_t(x); std::memcpy(p, &i, 8); break; }
      case DT::Q8:
      case DT::Q4: break;
    }
  }
  // the engine's view: strides of the storage, 0 along size-1 (broadcast) dims
  selfattn::View view() const {
    selfattn::View v;
    v.p = numel() > 0 ? data.data() : nullptr;  // as torch: an empty tensor has no storage
    v.dt = dt;
    for (int x = 0; x < 4; x++) v.s[x] = shape[x] == 1 ? 0 : stride[x];
    return v;
  }
};

// Deterministic random numbers (splitmix64)
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }
  double normal() {  // Box-Muller
    const double u1 = uniform() + 1e-300, u2 = uniform();
    return std::sqrt(-2 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  int64_t below(int64_t n) { return int64_t(next() % uint64_t(n)); }
};

inline void fill_normal(Tensor& t, Rng& rng, double amp) {
  for (int64_t a = 0; a < t.shape[0]; a++)
    for (int64_t b = 0; b < t.shape[1]; b++)
      for (int64_t c = 0; c < t.shape[2]; c++)
        for (int64_t d = 0; d < t.shape[3]; d++) t.set(a, b, c, d, amp * rng.normal());
}

}  // namespace drv
