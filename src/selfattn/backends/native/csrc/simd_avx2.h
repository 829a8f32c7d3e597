// AVX2 + FMA float vector (8 lanes). Included only by kernels_avx2.cpp (-mavx2 -mfma -mf16c).
#pragma once
#include <immintrin.h>

#include "common.h"

namespace selfattn {
namespace SA_NS {

struct V {
  using T = float;
  static constexpr int W = 8;
  static constexpr int MR = 6;  // rows of the QK^T register tile (6 x 16 = 12 accumulators)
  static constexpr int NB = 2;  // vectors per column block of gemm: 6 x 2 tiles fit 16 registers
  static constexpr const char* name = "avx2";
  __m256 v;

  static __m256i lanes() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static V load(const float* p) { return {_mm256_loadu_ps(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  static V load_bf16(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  static V load_f16(const uint16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  // W int8 codes as floats (quant.h)
  static V load_i8(const int8_t* p) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))};
  }
  // W 4-bit codes from W / 2 bytes (code + 8, the even channel in the low nibble) as floats:
  // each byte widened to 16 bits, its high nibble moved to the high byte, then bytes to lanes
  static V load_u4(const uint8_t* p) {
    int32_t four;
    __builtin_memcpy(&four, p, 4);
    __m128i w = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(four));
    w = _mm_or_si128(_mm_and_si128(w, _mm_set1_epi16(0x0F)),
                     _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0xF0)), 4));
    __m256i c = _mm256_sub_epi32(_mm256_cvtepu8_epi32(w), _mm256_set1_epi32(8));
    return {_mm256_cvtepi32_ps(c)};
  }
  // 2W 4-bit codes from W bytes times s: even channels (low nibbles) in `even`, odd in `odd`
  static void u4_pair(const uint8_t* p, float s, V& even, V& odd) {
    const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i eight = _mm256_set1_epi32(8);
    const __m256i lo = _mm256_sub_epi32(_mm256_and_si256(x, _mm256_set1_epi32(15)), eight);
    const __m256i hi = _mm256_sub_epi32(_mm256_srli_epi32(x, 4), eight);
    even.v = _mm256_mul_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(s));
    odd.v = _mm256_mul_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(s));
  }
  static V set1(float x) { return {_mm256_set1_ps(x)}; }
  static V zero() { return {_mm256_setzero_ps()}; }
  friend V fmadd(V a, V b, V c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend V operator+(V a, V b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend V operator-(V a, V b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend V operator*(V a, V b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend V operator/(V a, V b) { return {_mm256_div_ps(a.v, b.v)}; }
  friend V max_nan_b(V a, V b) { return {_mm256_max_ps(a.v, b.v)}; }
  float hmax() const {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  float hsum() const {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  V abs() const { return {_mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)))}; }

  // r[0:8] rows -> columns, in place
  static void transpose(V* r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i].v, r[2 * i + 1].v);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i].v, r[2 * i + 1].v);
    }
    for (int g = 0; g < 2; g++) {
      u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
      u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
      u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
      u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int m = 0; m < 4; m++) {
      r[m].v = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
      r[4 + m].v = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
    }
  }
  static uint32_t nonfinite(V x) {
    __m256i e = _mm256_and_si256(_mm256_castps_si256(x.v), _mm256_set1_epi32(0x7F800000));
    __m256i m = _mm256_cmpeq_epi32(e, _mm256_set1_epi32(0x7F800000));
    return uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(m)));
  }

  // lane i of the result = sum of the lanes of p[i], i < 8
  static V reduce_lanes(const V* p) {
    __m256 t[4], u[2];
    for (int i = 0; i < 4; i++)
      t[i] = _mm256_add_ps(_mm256_unpacklo_ps(p[2 * i].v, p[2 * i + 1].v),
                           _mm256_unpackhi_ps(p[2 * i].v, p[2 * i + 1].v));
    for (int i = 0; i < 2; i++) {
      __m256d a = _mm256_castps_pd(t[2 * i]), b = _mm256_castps_pd(t[2 * i + 1]);
      u[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                           _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    return {_mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20),
                          _mm256_permute2f128_ps(u[0], u[1], 0x31))};
  }

  void store_lo(float* p) const { _mm_storeu_ps(p, _mm256_castps256_ps128(v)); }
  void store_hi(float* p) const { _mm_storeu_ps(p, _mm256_extractf128_ps(v, 1)); }

  // 2^x for x <= 0 (and NaN): -inf -> 0, x < -126 -> 0, NaN -> NaN. 2^n is built in the
  // exponent field, so x is clamped to [-126, 127] and results below 2^-126 are flushed to 0.
  static V exp2(V x) {
    __m256 xc = _mm256_max_ps(_mm256_set1_ps(-126.0f), x.v);  // NaN stays NaN (2nd operand)
    xc = _mm256_min_ps(_mm256_set1_ps(127.0f), xc);
    __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(xc, n);
    __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    e = _mm256_slli_epi32(e, 23);
    __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    __m256 tiny = _mm256_cmp_ps(x.v, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);  // false for NaN
    return {_mm256_andnot_ps(tiny, r)};
  }
  static V tanh(V x) {
    __m256 ax = V{x.v}.abs().v;
    __m256 z = _mm256_mul_ps(x.v, x.v);
    __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
    __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x.v, x.v);
    __m256 a = _mm256_min_ps(_mm256_set1_ps(9.0f), ax);
    __m256 e = exp2(V{_mm256_mul_ps(a, _mm256_set1_ps(2.8853900817779268f))}).v;
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
    __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(int(0x80000000u)));
    big = _mm256_or_ps(big, _mm256_and_ps(x.v, sign));
    __m256 is_small = _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ);
    return {_mm256_blendv_ps(big, small, is_small)};
  }
  static V keep_range(V s, int c0, int a, int b) {
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(c0), lanes());
    __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(a), idx),
                                     _mm256_cmpgt_epi32(_mm256_set1_epi32(b), idx));
    return {_mm256_blendv_ps(_mm256_set1_ps(-__builtin_inff()), s.v, _mm256_castsi256_ps(in))};
  }
  static V keep_bytes(V s, const uint8_t* m) {
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(m));
    __m256i w = _mm256_cvtepu8_epi32(bytes);
    __m256i zero = _mm256_cmpeq_epi32(w, _mm256_setzero_si256());
    return {_mm256_blendv_ps(s.v, _mm256_set1_ps(-__builtin_inff()), _mm256_castsi256_ps(zero))};
  }
  static V distance(int64_t pos, int64_t j0) {
    __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    return V{_mm256_sub_ps(_mm256_set1_ps(float(pos - j0)), lane)}.abs();
  }
  static V dropout(V p, uint32_t hr, int64_t j0, uint32_t seed1, uint32_t thr, float inv) {
    __m256i j = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(j0))), lanes());
    __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(j, _mm256_set1_epi32(int(0x85EBCA6Bu))),
                                 _mm256_set1_epi32(int(seed1)));
    x = _mm256_xor_si256(x, _mm256_set1_epi32(int(hr)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(0x7FEB352Du)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(0x846CA68Bu)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    // unsigned x >= thr  <=>  max_epu32(x, thr) == x
    __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(x, _mm256_set1_epi32(int(thr))), x);
    return {_mm256_and_ps(_mm256_mul_ps(p.v, _mm256_set1_ps(inv)), _mm256_castsi256_ps(keep))};
  }
};

}  // namespace SA_NS
}  // namespace selfattn
