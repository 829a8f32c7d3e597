// Portable "vector" of W lanes of T (float or double): plain loops the compiler may vectorise
// for the baseline ISA. Used for float64 (with the C library's exp2 / tanh, so float64 results
// keep float64 accuracy) and for float32 on CPUs without AVX2.
#pragma once
#include <cmath>

#include "common.h"

namespace selfattn {
namespace SA_NS {

template <class TT, int WW, int MRR>
struct GV {
  using T = TT;
  static constexpr int W = WW;
  static constexpr int MR = MRR;
  static constexpr const char* name = "generic";
  T v[W];

  static GV load(const T* p) {
    GV r;
    for (int i = 0; i < W; i++) r.v[i] = p[i];
    return r;
  }
  static GV load_bf16(const uint16_t* p) {
    GV r;
    for (int i = 0; i < W; i++) r.v[i] = T(bf16_to_float(p[i]));
    return r;
  }
  static GV load_f16(const uint16_t* p) {
    GV r;
    for (int i = 0; i < W; i++) r.v[i] = T(f16_to_float(p[i]));
    return r;
  }
  // W int8 codes; W 4-bit codes from W / 2 bytes (code + 8, even channel low) (quant.h)
  static GV load_i8(const int8_t* p) {
    GV r;
    for (int i = 0; i < W; i++) r.v[i] = T(p[i]);
    return r;
  }
  static GV load_u4(const uint8_t* p) {
    GV r;
    for (int i = 0; i < W; i++) r.v[i] = T(int(i % 2 ? p[i / 2] >> 4 : p[i / 2] & 15) - 8);
    return r;
  }
  // 2W 4-bit codes from W bytes times s: even channels (low nibbles) in `even`, odd in `odd`
  static void u4_pair(const uint8_t* p, T s, GV& even, GV& odd) {
    for (int i = 0; i < W; i++) {
      even.v[i] = T(int(p[i] & 15) - 8) * s;
      odd.v[i] = T(int(p[i] >> 4) - 8) * s;
    }
  }
  void store(T* p) const {
    for (int i = 0; i < W; i++) p[i] = v[i];
  }
  static GV set1(T x) {
    GV r;
    for (int i = 0; i < W; i++) r.v[i] = x;
    return r;
  }
  static GV zero() { return set1(T(0)); }
  friend GV fmadd(GV a, GV b, GV c) {
    for (int i = 0; i < W; i++) c.v[i] = a.v[i] * b.v[i] + c.v[i];
    return c;
  }
#define SA_GV_OP(op)                                          \
  friend GV operator op(GV a, GV b) {                         \
    for (int i = 0; i < W; i++) a.v[i] = a.v[i] op b.v[i];    \
    return a;                                                 \
  }
  SA_GV_OP(+)
  SA_GV_OP(-)
  SA_GV_OP(*)
  SA_GV_OP(/)
#undef SA_GV_OP
  friend GV max_nan_b(GV a, GV b) {
    for (int i = 0; i < W; i++) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  T hmax() const {
    T m = v[0];
    for (int i = 1; i < W; i++) m = v[i] > m ? v[i] : m;
    return m;
  }
  T hsum() const {
    T s = v[0];
    for (int i = 1; i < W; i++) s += v[i];
    return s;
  }
  GV abs() const {
    GV r;
    for (int i = 0; i < W; i++) r.v[i] = std::fabs(v[i]);
    return r;
  }
  static void transpose(GV* r) {
    for (int i = 0; i < W; i++)
      for (int j = i + 1; j < W; j++) {
        T x = r[i].v[j];
        r[i].v[j] = r[j].v[i];
        r[j].v[i] = x;
      }
  }
  static uint32_t nonfinite(GV x) {
    uint32_t m = 0;
    for (int i = 0; i < W; i++) m |= uint32_t(!std::isfinite(x.v[i])) << i;
    return m;
  }
  static GV reduce_lanes(const GV* p) {
    GV r;
    for (int i = 0; i < W; i++) r.v[i] = p[i].hsum();
    return r;
  }
  void store_lo(T* p) const {
    for (int i = 0; i < W / 2; i++) p[i] = v[i];
  }
  void store_hi(T* p) const {
    for (int i = 0; i < W / 2; i++) p[i] = v[W / 2 + i];
  }
  static GV exp2(GV x) {
    for (int i = 0; i < W; i++) x.v[i] = std::exp2(x.v[i]);
    return x;
  }
  static GV tanh(GV x) {
    for (int i = 0; i < W; i++) x.v[i] = std::tanh(x.v[i]);
    return x;
  }
  static GV keep_range(GV s, int c0, int a, int b) {
    for (int i = 0; i < W; i++)
      if (c0 + i < a || c0 + i >= b) s.v[i] = -INFINITY;
    return s;
  }
  static GV keep_bytes(GV s, const uint8_t* m) {
    for (int i = 0; i < W; i++)
      if (!m[i]) s.v[i] = -INFINITY;
    return s;
  }
  static GV distance(int64_t pos, int64_t j0) {
    GV r;
    for (int i = 0; i < W; i++) {
      int64_t d = pos - (j0 + i);
      r.v[i] = T(d < 0 ? -d : d);
    }
    return r;
  }
  static GV dropout(GV p, uint32_t hr, int64_t j0, uint32_t seed1, uint32_t thr, T inv) {
    for (int i = 0; i < W; i++) {
      uint32_t h = mix32(hr ^ drop_col_word(uint64_t(j0 + i), seed1));
      p.v[i] = h >= thr ? p.v[i] * inv : T(0);
    }
    return p;
  }
};

}  // namespace SA_NS
}  // namespace selfattn
