// AVX-512 float vector (16 lanes). Included only by kernels_avx512.cpp (compiled with -mavx512f
// -mavx512bw -mavx512dq -mavx512vl -mfma), inside that TU's namespace.
#pragma once
#include <immintrin.h>

#include "common.h"

namespace selfattn {
namespace SA_NS {

struct V {
  using T = float;
  static constexpr int W = 16;
  static constexpr int MR = 12;  // rows of the QK^T register tile (12 x 32 = 24 accumulators)
  static constexpr const char* name = "avx512";
  __m512 v;

  static V load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  static V load_bf16(const uint16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  static V load_f16(const uint16_t* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  // W int8 codes as floats (quant.h)
  static V load_i8(const int8_t* p) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))};
  }
  // W 4-bit codes from W / 2 bytes (code + 8, the even channel in the low nibble) as floats:
  // each byte widened to 16 bits, its high nibble moved to the high byte, then bytes to lanes
  static V load_u4(const uint8_t* p) {
    __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    w = _mm_or_si128(_mm_and_si128(w, _mm_set1_epi16(0x0F)),
                     _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0xF0)), 4));
    __m512i c = _mm512_sub_epi32(_mm512_cvtepu8_epi32(w), _mm512_set1_epi32(8));
    return {_mm512_cvtepi32_ps(c)};
  }
  // 2W 4-bit codes from W bytes times s: the even channels (low nibbles) in `even`, the odd in
  // `odd`. Each nibble indexes a 16-entry table of s * (code - 8) with vpermps (which reads only
  // an index's low 4 bits): one widening, one shift and two permutes per 32 codes, and the
  // products are the ones dequantizing computes (code * scale, one rounding).
  static void u4_pair(const uint8_t* p, float s, V& even, V& odd) {
    const __m512 tbl = _mm512_mul_ps(
        _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_ps(s));
    const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    even.v = _mm512_permutexvar_ps(x, tbl);
    odd.v = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), tbl);
  }
  // 64 int8 codes from one 64-byte load as floats: x[k] lane i is byte k of dword i (channel
  // 4i + k), sign-extended by two shifts (one for k = 3), all on port 0, where widening loads
  // (load_i8) take port 5 with the score reductions, and one load per cache line.
  static void i8_quads(const int8_t* p, V* x) {
    const __m512i w = _mm512_loadu_si512(p);
    x[0].v = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 24), 24));
    x[1].v = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 16), 24));
    x[2].v = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 8), 24));
    x[3].v = _mm512_cvtepi32_ps(_mm512_srai_epi32(w, 24));
  }
  // 128 4-bit codes (code + 8) from two rows of 32 bytes, a (lanes 0-7) and b (lanes 8-15), as
  // floats: x[k] lane i is nibble k of the row's dword i % 8, i.e. channel 8 (i % 8) + k. One
  // shift and one vpermps (which reads only an index's low 4 bits) per 16 codes, half on each
  // vector port (u4_pair's widening and two permutes per 32 codes load port 5 alone).
  static void u4_octets(const uint8_t* a, const uint8_t* b, V* x) {
    const __m512 tbl = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i w =
        b == a + 32
            ? _mm512_loadu_si512(a)
            : _mm512_inserti64x4(
                  _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
    x[0].v = _mm512_permutexvar_ps(w, tbl);
    for (int k = 1; k < 8; k++) x[k].v = _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4 * k), tbl);
  }
  // n <= W scales from p (the rest 0) sent to lanes: lane i gets scale idx[i]
  static V scales_to_lanes(const float* p, int n, const int32_t* idx) {
    const __m512 v = _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p);
    return {_mm512_permutexvar_ps(_mm512_load_si512(idx), v)};
  }
  // The W sums of 8 vectors of u4_octets partial sums, t[j] holding keys 2j (lanes 0-7) and
  // 2j + 1 (lanes 8-15): three levels of transpose-and-add, then one permute to key order.
  static V reduce_octets(const V* t) {
    __m512 u[4], w[2];
    for (int i = 0; i < 4; i++)
      u[i] = _mm512_add_ps(_mm512_unpacklo_ps(t[2 * i].v, t[2 * i + 1].v),
                           _mm512_unpackhi_ps(t[2 * i].v, t[2 * i + 1].v));
    for (int i = 0; i < 2; i++) {
      __m512d a = _mm512_castps_pd(u[2 * i]), b = _mm512_castps_pd(u[2 * i + 1]);
      w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // lanes now hold keys 0 2 4 6 | 1 3 5 7 | 8 10 12 14 | 9 11 13 15
    const __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return {_mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15), r)};
  }
  static V set1(float x) { return {_mm512_set1_ps(x)}; }
  static V zero() { return {_mm512_setzero_ps()}; }
  friend V fmadd(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend V operator+(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend V operator-(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend V operator*(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend V operator/(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }
  // max that ignores a NaN in `a` (returns b there): the running row maximum skips NaN scores,
  // which reach the output through exp2 instead.
  friend V max_nan_b(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
  float hmax() const { return _mm512_reduce_max_ps(v); }
  float hsum() const { return _mm512_reduce_add_ps(v); }
  V abs() const { return {_mm512_abs_ps(v)}; }

  // r[0:16] rows -> columns, in place
  static void transpose(V* r) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i].v, r[2 * i + 1].v);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i].v, r[2 * i + 1].v);
    }
    for (int g = 0; g < 4; g++) {  // rows 4g..4g+3: u[4g + m] holds lane-local column m
      u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
      u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
      u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
      u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int m = 0; m < 4; m++) {  // gather 128-bit lane k of the four row groups
      __m512 x01 = _mm512_shuffle_f32x4(u[m], u[4 + m], _MM_SHUFFLE(1, 0, 1, 0));
      __m512 x23 = _mm512_shuffle_f32x4(u[m], u[4 + m], _MM_SHUFFLE(3, 2, 3, 2));
      __m512 y01 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], _MM_SHUFFLE(1, 0, 1, 0));
      __m512 y23 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], _MM_SHUFFLE(3, 2, 3, 2));
      r[m].v = _mm512_shuffle_f32x4(x01, y01, _MM_SHUFFLE(2, 0, 2, 0));
      r[4 + m].v = _mm512_shuffle_f32x4(x01, y01, _MM_SHUFFLE(3, 1, 3, 1));
      r[8 + m].v = _mm512_shuffle_f32x4(x23, y23, _MM_SHUFFLE(2, 0, 2, 0));
      r[12 + m].v = _mm512_shuffle_f32x4(x23, y23, _MM_SHUFFLE(3, 1, 3, 1));
    }
  }
  // bit i set: lane i is NaN or +-inf
  static uint32_t nonfinite(V x) {
    __m512i e = _mm512_and_si512(_mm512_castps_si512(x.v), _mm512_set1_epi32(0x7F800000));
    return _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(0x7F800000));
  }

  // lane i of the result = sum of the lanes of p[i], i < 16 (a transpose and add tree)
  static V reduce16(const V* p) {
    V t[8];
    for (int i = 0; i < 8; i++) t[i] = reduce_pair(p[2 * i], p[2 * i + 1]);
    return reduce_pairs(t);
  }
  // the tree's first level, for callers that reduce vectors as they come: pairs of p[2i],
  // p[2i + 1] (reduce_pair), then reduce_pairs of the 8 gives reduce16(p)
  static V reduce_pair(V a, V b) {
    return {_mm512_add_ps(_mm512_unpacklo_ps(a.v, b.v), _mm512_unpackhi_ps(a.v, b.v))};
  }
  static V reduce_pairs(const V* tv) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++) t[i] = tv[i].v;
    for (int i = 0; i < 4; i++) {
      __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
      u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)
      w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return {_mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)))};
  }
  static V reduce_lanes(const V* p) { return reduce16(p); }
  // store the lower / upper W/2 lanes
  void store_lo(float* p) const { _mm256_storeu_ps(p, _mm512_castps512_ps256(v)); }
  void store_hi(float* p) const { _mm256_storeu_ps(p, _mm512_extractf32x8_ps(v, 1)); }

  // 2^x for x <= 0 (and NaN): -inf -> 0, x < -200 -> 0, NaN -> NaN. Range reduction to
  // f in [-0.5, 0.5] and Cephes' degree-6 polynomial (rel. error ~2e-7); vscalefps applies 2^n
  // and flushes tiny results to 0 without integer tricks.
  static V exp2(V x) {
    __m512 xc = _mm512_max_ps(_mm512_set1_ps(-200.0f), x.v);  // NaN stays NaN (2nd operand)
    __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(xc, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    // p < 2, so n <= -151 gives exactly +0: those lanes (masked keys' -inf) are zeroed by the
    // mask instead, since a scalef that underflows takes a microcode assist (~100 cycles) on
    // Intel cores; NaN compares unordered and stays in the mask
    const __mmask16 live = _mm512_cmp_ps_mask(n, _mm512_set1_ps(-151.0f), _CMP_NLE_UQ);
    return {_mm512_maskz_scalef_ps(live, p, n)};
  }
  // tanh: odd polynomial near 0 (Cephes), 1 - 2 / (e^{2|x|} + 1) elsewhere; NaN -> NaN.
  static V tanh(V x) {
    __m512 ax = _mm512_abs_ps(x.v);
    __m512 z = _mm512_mul_ps(x.v, x.v);
    __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
    __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x.v, x.v);
    __m512 a = _mm512_min_ps(_mm512_set1_ps(9.0f), ax);  // NaN stays NaN
    __m512 e = exp2(V{_mm512_mul_ps(a, _mm512_set1_ps(2.8853900817779268f))}).v;  // e^{2a}
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 big = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
    // copy the sign of x onto big
    big = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(big),
        _mm512_and_si512(_mm512_castps_si512(x.v), _mm512_set1_epi32(int(0x80000000u)))));
    __mmask16 is_small = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ);
    return {_mm512_mask_mov_ps(big, is_small, small)};
  }

  static __m512i lanes() {
    return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  // lanes c0 + lane (tile-local key index) outside [a, b) become -inf
  static V keep_range(V s, int c0, int a, int b) {
    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(c0), lanes());
    __mmask16 in = _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(a)) &
                   _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(b));
    return {_mm512_mask_mov_ps(_mm512_set1_ps(-__builtin_inff()), in, s.v)};
  }
  // lanes whose byte is 0 become -inf (16 contiguous bytes)
  static V keep_bytes(V s, const uint8_t* m) {
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m));
    __mmask16 in = _mm_test_epi8_mask(bytes, bytes);
    return {_mm512_mask_mov_ps(_mm512_set1_ps(-__builtin_inff()), in, s.v)};
  }
  // |pos - (j0 + lane)| as float (alibi distance)
  static V distance(int64_t pos, int64_t j0) {
    __m512 lane = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return {_mm512_abs_ps(_mm512_sub_ps(_mm512_set1_ps(float(pos - j0)), lane))};
  }
  // dropout: keep lane j0 + lane when mix32(hr ^ (j * C + seed1)) >= thr; kept lanes scaled
  static V dropout(V p, uint32_t hr, int64_t j0, uint32_t seed1, uint32_t thr, float inv) {
    __m512i j = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(j0))), lanes());
    __m512i x = _mm512_add_epi32(_mm512_mullo_epi32(j, _mm512_set1_epi32(int(0x85EBCA6Bu))),
                                 _mm512_set1_epi32(int(seed1)));
    x = _mm512_xor_si512(x, _mm512_set1_epi32(int(hr)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x7FEB352Du)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x846CA68Bu)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    __mmask16 keep = _mm512_cmpge_epu32_mask(x, _mm512_set1_epi32(int(thr)));
    return {_mm512_maskz_mul_ps(keep, p.v, _mm512_set1_ps(inv))};
  }
};

}  // namespace SA_NS
}  // namespace selfattn
