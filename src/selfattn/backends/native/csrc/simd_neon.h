// AArch64 NEON (Advanced SIMD) float vector (4 lanes). Included only by kernels_neon.cpp, which
// is compiled for aarch64 only (NEON is part of the base ISA there: no -m flag, no CPU check).
//
// Register blocking. AArch64 has 32 128-bit vector registers, and the cores people run PyTorch on
// (Neoverse V1/V2, Apple M-series) issue four 128-bit FMAs per cycle. The QK^T tile is MR = 12
// rows x 2 vectors (8 keys): 24 accumulators, 2 registers of B per k step and the rest for A,
// the shape of BLIS's ARMv8-A sgemm micro-kernel (`bli_sgemm_armv8a_asm_8x12`, flame/blis
// kernels/armv8a/3/bli_gemm_armv8a_asm_d6x8.c: 8 x 12 floats in v8-v31, 24 accumulators), here
// transposed (12 broadcast rows x 8 vector columns). As there, the broadcast operand is taken
// by lane (FMLA by element, `kloop` below) from a vector load of 4 (or 2) values, so a k step
// costs 2 loads of B and 3 (or 6) loads of A per 24 FMAs instead of 12 broadcasts. The
// PV / backward products (4-vector column blocks) use 6 x 4 = 24 accumulators (microkernel.h).
// The object is compiled with -fno-schedule-insns (build.py): GCC's scheduling before register
// allocation hoists the loads of A and B far enough to spill accumulators in these loops (seen in
// GCC 12's aarch64 output); without it the 12 x 8 and 6 x 4 loops keep all 24 in registers.
// Speed on ARM has not been measured (no ARM machine here); correctness is checked under
// qemu-aarch64 by `make check-arm`.
#pragma once
#include <arm_neon.h>

#include <cstring>

#include "common.h"

namespace selfattn {
namespace SA_NS {

struct V {
  using T = float;
  static constexpr int W = 4;
  static constexpr int MR = 12;  // rows of the QK^T register tile (12 x 8 = 24 accumulators)
  static constexpr const char* name = "neon";
  static constexpr bool lane_fma = true;  // microkernel.h runs kloop below
  float32x4_t v;

  // The micro-kernel's inner loop (microkernel.h: acc[i][c] += A[i sa + k sk] B[k ldb + c],
  // k = k0 .. k1 - 1 in order, one fused multiply-add each, as the generic loop). The broadcast
  // operand comes from a lane of a vector register (FMLA by element), as in BLIS's ARMv8-A
  // kernel: with sa == 1 (A^T B, backward) the R values of one k are contiguous, 4 per load;
  // with sk == 1 (A B: Q K^T, P V) each row gives 2 consecutive k per 64-bit load, when the
  // tile's B vectors for 2 k steps fit beside the accumulators (R NV + 2 NV + 1 <= 32).
  template <int R, int NV>
  static inline __attribute__((always_inline)) void kloop(V (&acc)[R][NV], int64_t k0,
                                                          int64_t k1, const float* A, int64_t sa,
                                                          int64_t sk, const float* B,
                                                          int64_t ldb) {
    float32x4_t x[R][NV];
    for (int i = 0; i < R; i++)
      for (int c = 0; c < NV; c++) x[i][c] = acc[i][c].v;
    kloop_raw<R, NV>(x, k0, k1, A, sa, sk, B, ldb);
    for (int i = 0; i < R; i++)
      for (int c = 0; c < NV; c++) acc[i][c].v = x[i][c];
  }
  // (on plain float32x4_t: GCC 12 keeps those in registers where it spills the wrapped V's)
  template <int R, int NV>
  static inline __attribute__((always_inline)) void kloop_raw(float32x4_t (&acc)[R][NV],
                                                              int64_t k0, int64_t k1,
                                                              const float* A, int64_t sa,
                                                              int64_t sk, const float* B,
                                                              int64_t ldb) {
    int64_t k = k0;
    if (sa == 1) {
      for (; k < k1; k++) {
        float32x4_t b[NV];
        for (int c = 0; c < NV; c++) b[c] = vld1q_f32(B + k * ldb + c * W);
        const float* a = A + k * sk;
        int i = 0;
        for (; i + 4 <= R; i += 4) {
          const float32x4_t av = vld1q_f32(a + i);
          for (int c = 0; c < NV; c++) {
            acc[i][c] = vfmaq_laneq_f32(acc[i][c], b[c], av, 0);
            acc[i + 1][c] = vfmaq_laneq_f32(acc[i + 1][c], b[c], av, 1);
            acc[i + 2][c] = vfmaq_laneq_f32(acc[i + 2][c], b[c], av, 2);
            acc[i + 3][c] = vfmaq_laneq_f32(acc[i + 3][c], b[c], av, 3);
          }
        }
        for (; i < R; i++)
          for (int c = 0; c < NV; c++) acc[i][c] = vfmaq_n_f32(acc[i][c], b[c], a[i]);
      }
      return;
    }
    if constexpr (R * NV + 2 * NV + 1 <= 32) {
      if (sk == 1) {
        for (; k + 2 <= k1; k += 2) {
          float32x4_t b0[NV], b1[NV];
          for (int c = 0; c < NV; c++) {
            b0[c] = vld1q_f32(B + k * ldb + c * W);
            b1[c] = vld1q_f32(B + (k + 1) * ldb + c * W);
          }
          for (int i = 0; i < R; i++) {
            const float32x2_t a2 = vld1_f32(A + i * sa + k);
            for (int c = 0; c < NV; c++) {
              acc[i][c] = vfmaq_lane_f32(acc[i][c], b0[c], a2, 0);
              acc[i][c] = vfmaq_lane_f32(acc[i][c], b1[c], a2, 1);
            }
          }
        }
      }
    }
    const float* a = A + k * sk;
    const float* bk = B + k * ldb;
    for (; k < k1; k++, a += sk, bk += ldb) {
      float32x4_t b[NV];
      for (int c = 0; c < NV; c++) b[c] = vld1q_f32(bk + c * W);
      for (int i = 0; i < R; i++)
        for (int c = 0; c < NV; c++) acc[i][c] = vfmaq_n_f32(acc[i][c], b[c], a[i * sa]);
    }
  }

  static uint32x4_t lanes() { return uint32x4_t{0, 1, 2, 3}; }
  static V load(const float* p) { return {vld1q_f32(p)}; }
  void store(float* p) const { vst1q_f32(p, v); }
  static V load_bf16(const uint16_t* p) {
    return {vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16))};
  }
  static V load_f16(const uint16_t* p) { return {vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)))}; }
  // W int8 codes as floats (quant.h)
  static V load_i8(const int8_t* p) {
    int32_t four;
    __builtin_memcpy(&four, p, 4);
    int16x8_t h = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four)));
    return {vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)))};
  }
  // W 4-bit codes from W / 2 bytes (code + 8, the even channel in the low nibble) as floats
  static V load_u4(const uint8_t* p) {
    const int32_t c[4] = {(p[0] & 15) - 8, (p[0] >> 4) - 8, (p[1] & 15) - 8, (p[1] >> 4) - 8};
    return {vcvtq_f32_s32(vld1q_s32(c))};
  }
  // 2W 4-bit codes from W bytes times s: even channels (low nibbles) in `even`, odd in `odd`
  static void u4_pair(const uint8_t* p, float s, V& even, V& odd) {
    uint32_t four;
    __builtin_memcpy(&four, p, 4);
    const uint32x4_t w = vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(four)))));
    const int32x4_t eight = vdupq_n_s32(8);
    const int32x4_t lo = vsubq_s32(vreinterpretq_s32_u32(vandq_u32(w, vdupq_n_u32(15))), eight);
    const int32x4_t hi = vsubq_s32(vreinterpretq_s32_u32(vshrq_n_u32(w, 4)), eight);
    even.v = vmulq_n_f32(vcvtq_f32_s32(lo), s);
    odd.v = vmulq_n_f32(vcvtq_f32_s32(hi), s);
  }
  static V set1(float x) { return {vdupq_n_f32(x)}; }
  static V zero() { return {vdupq_n_f32(0.0f)}; }
  friend V fmadd(V a, V b, V c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
  friend V operator+(V a, V b) { return {vaddq_f32(a.v, b.v)}; }
  friend V operator-(V a, V b) { return {vsubq_f32(a.v, b.v)}; }
  friend V operator*(V a, V b) { return {vmulq_f32(a.v, b.v)}; }
  friend V operator/(V a, V b) { return {vdivq_f32(a.v, b.v)}; }
  // a > b ? a : b, as x86's max: a NaN in `a` gives b (the running row maximum skips NaN
  // scores, which reach the output through exp2 instead). vmaxq would return the NaN.
  friend V max_nan_b(V a, V b) { return {vbslq_f32(vcgtq_f32(a.v, b.v), a.v, b.v)}; }
  float hmax() const { return vmaxvq_f32(v); }
  float hsum() const { return vaddvq_f32(v); }
  V abs() const { return {vabsq_f32(v)}; }

  // r[0:4] rows -> columns, in place
  static void transpose(V* r) {
    float32x4_t t0 = vtrn1q_f32(r[0].v, r[1].v), t1 = vtrn2q_f32(r[0].v, r[1].v);
    float32x4_t t2 = vtrn1q_f32(r[2].v, r[3].v), t3 = vtrn2q_f32(r[2].v, r[3].v);
    r[0].v = vreinterpretq_f32_f64(
        vzip1q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
    r[1].v = vreinterpretq_f32_f64(
        vzip1q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
    r[2].v = vreinterpretq_f32_f64(
        vzip2q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
    r[3].v = vreinterpretq_f32_f64(
        vzip2q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
  }
  // bit i set when lane i is NaN or +-inf
  static uint32_t nonfinite(V x) {
    const uint32x4_t e = vandq_u32(vreinterpretq_u32_f32(x.v), vdupq_n_u32(0x7F800000u));
    const uint32x4_t m = vceqq_u32(e, vdupq_n_u32(0x7F800000u));
    return vaddvq_u32(vandq_u32(m, uint32x4_t{1, 2, 4, 8}));
  }

  // lane i of the result = sum of the lanes of p[i], i < 4
  static V reduce_lanes(const V* p) {
    return {vpaddq_f32(vpaddq_f32(p[0].v, p[1].v), vpaddq_f32(p[2].v, p[3].v))};
  }

  void store_lo(float* p) const { vst1_f32(p, vget_low_f32(v)); }
  void store_hi(float* p) const { vst1_f32(p, vget_high_f32(v)); }

  // 2^x for x <= 0 (and NaN): -inf -> 0, x < -126 -> 0, NaN -> NaN; the polynomial and the
  // clamping of the AVX2 version (simd_avx2.h), so every ISA gives the same accuracy.
  static V exp2(V x) {
    float32x4_t xc = vmaxq_f32(vdupq_n_f32(-126.0f), x.v);  // NaN stays NaN
    xc = vminq_f32(vdupq_n_f32(127.0f), xc);
    const float32x4_t n = vrndnq_f32(xc);  // to nearest, ties to even
    const float32x4_t f = vsubq_f32(xc, n);
    float32x4_t p = vdupq_n_f32(1.535336188319500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.339887440266574e-3f), p, f);
    p = vfmaq_f32(vdupq_n_f32(9.618437357674640e-3f), p, f);
    p = vfmaq_f32(vdupq_n_f32(5.550332471162809e-2f), p, f);
    p = vfmaq_f32(vdupq_n_f32(2.402264791363012e-1f), p, f);
    p = vfmaq_f32(vdupq_n_f32(6.931472028550421e-1f), p, f);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, f);
    // NaN converts to 0 (2^0): p is NaN there, so the product stays NaN
    int32x4_t e = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
    e = vshlq_n_s32(e, 23);
    const float32x4_t r = vmulq_f32(p, vreinterpretq_f32_s32(e));
    const uint32x4_t tiny = vcltq_f32(x.v, vdupq_n_f32(-126.0f));  // false for NaN
    return {vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(r), tiny))};
  }
  static V tanh(V x) {
    const float32x4_t ax = vabsq_f32(x.v);
    const float32x4_t z = vmulq_f32(x.v, x.v);
    float32x4_t p = vdupq_n_f32(-5.70498872745e-3f);
    p = vfmaq_f32(vdupq_n_f32(2.06390887954e-2f), p, z);
    p = vfmaq_f32(vdupq_n_f32(-5.37397155531e-2f), p, z);
    p = vfmaq_f32(vdupq_n_f32(1.33314422036e-1f), p, z);
    p = vfmaq_f32(vdupq_n_f32(-3.33332819422e-1f), p, z);
    const float32x4_t small = vfmaq_f32(x.v, vmulq_f32(p, z), x.v);
    const float32x4_t a = vminq_f32(vdupq_n_f32(9.0f), ax);
    const float32x4_t e = exp2(V{vmulq_f32(a, vdupq_n_f32(2.8853900817779268f))}).v;
    const float32x4_t one = vdupq_n_f32(1.0f);
    float32x4_t big = vsubq_f32(one, vdivq_f32(vdupq_n_f32(2.0f), vaddq_f32(e, one)));
    const uint32x4_t sign = vdupq_n_u32(0x80000000u);
    big = vreinterpretq_f32_u32(
        vorrq_u32(vreinterpretq_u32_f32(big), vandq_u32(vreinterpretq_u32_f32(x.v), sign)));
    const uint32x4_t is_small = vcltq_f32(ax, vdupq_n_f32(0.625f));
    return {vbslq_f32(is_small, small, big)};
  }
  // lanes whose index c0 + i lies outside [a, b) become -inf
  static V keep_range(V s, int c0, int a, int b) {
    const int32x4_t idx = vaddq_s32(vdupq_n_s32(c0), vreinterpretq_s32_u32(lanes()));
    const uint32x4_t in = vandq_u32(vcgeq_s32(idx, vdupq_n_s32(a)), vcltq_s32(idx, vdupq_n_s32(b)));
    return {vbslq_f32(in, s.v, vdupq_n_f32(-__builtin_inff()))};
  }
  // lanes whose mask byte m[i] is 0 become -inf
  static V keep_bytes(V s, const uint8_t* m) {
    uint32_t word;
    std::memcpy(&word, m, 4);
    const uint8x8_t bytes = vreinterpret_u8_u32(vdup_n_u32(word));
    const uint32x4_t w = vmovl_u16(vget_low_u16(vmovl_u8(bytes)));
    return {vbslq_f32(vceqzq_u32(w), vdupq_n_f32(-__builtin_inff()), s.v)};
  }
  static V distance(int64_t pos, int64_t j0) {
    const float32x4_t lane = vcvtq_f32_u32(lanes());
    return {vabsq_f32(vsubq_f32(vdupq_n_f32(float(pos - j0)), lane))};
  }
  static V dropout(V p, uint32_t hr, int64_t j0, uint32_t seed1, uint32_t thr, float inv) {
    const uint32x4_t j = vaddq_u32(vdupq_n_u32(uint32_t(j0)), lanes());
    uint32x4_t x = vmlaq_u32(vdupq_n_u32(seed1), j, vdupq_n_u32(0x85EBCA6Bu));
    x = veorq_u32(x, vdupq_n_u32(hr));
    x = veorq_u32(x, vshrq_n_u32(x, 16));
    x = vmulq_u32(x, vdupq_n_u32(0x7FEB352Du));
    x = veorq_u32(x, vshrq_n_u32(x, 15));
    x = vmulq_u32(x, vdupq_n_u32(0x846CA68Bu));
    x = veorq_u32(x, vshrq_n_u32(x, 16));
    const uint32x4_t keep = vcgeq_u32(x, vdupq_n_u32(thr));
    const float32x4_t scaled = vmulq_f32(p.v, vdupq_n_f32(inv));
    return {vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(scaled), keep))};
  }
};

}  // namespace SA_NS
}  // namespace selfattn
