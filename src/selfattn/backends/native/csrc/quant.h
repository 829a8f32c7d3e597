// Quantized keys and values (selfattn.QuantizedKV) read in place: rows dequantized straight from
// the code bytes into the float rows or tiles the kernels already use, and the Walsh-Hadamard
// rotation the codes may carry undone on q (keys) and on the output (values).
//
// Layout (common.h, View): Q8 rows are int8 codes, Q4 rows two codes per byte stored as
// code + 8 (the even channel in the low nibble); element d is code(d) * scale(d / group), the
// scale a float32. Dequantizing is c * s in the accumulation type, one rounding, exactly what
// QuantizedKV.dequantize computes (so an engine reading the codes and one reading the
// dequantized tensor see the same numbers).
#pragma once
#include <cmath>

#include "common.h"
#include "util.h"

namespace selfattn {
namespace SA_NS {

// Row j of a quantized (B, H, N, X) view at (b, h) as T[0:X]. The inner loops run over one
// group of contiguous codes with one scale, which the compiler turns into vector conversions
// (int8 -> int32 -> float, times the broadcast scale).
template <class T>
static inline void dequant_row(const View& t, int64_t b, int64_t h, int64_t j, int64_t X, T* dst) {
  const int64_t off = b * t.s[0] + h * t.s[1] + j * t.s[2], st = t.s[3];
  const float* sc = t.scales + b * t.ss[0] + h * t.ss[1] + j * t.ss[2];
  const int64_t g = t.group, sg = t.ss[3];
  if (t.dt == DT::Q8) {
    const int8_t* c = static_cast<const int8_t*>(t.p) + off;
    for (int64_t d0 = 0; d0 < X; d0 += g) {
      const T s = T(sc[(d0 / g) * sg]);
      const int8_t* cg = c + d0 * st;
      T* o = dst + d0;
      if (st == 1)
        for (int64_t d = 0; d < g; d++) o[d] = T(cg[d]) * s;
      else
        for (int64_t d = 0; d < g; d++) o[d] = T(cg[d * st]) * s;
    }
  } else {  // Q4: byte d / 2 holds channels d (low nibble) and d + 1 (high), each as code + 8
    const uint8_t* c = static_cast<const uint8_t*>(t.p) + off;
    for (int64_t d0 = 0; d0 < X; d0 += g) {
      const T s = T(sc[(d0 / g) * sg]);
      T* o = dst + d0;
      if (st == 1 && g % 2 == 0) {
        const uint8_t* cg = c + d0 / 2;
        for (int64_t e = 0; e < g / 2; e++) {
          o[2 * e] = T(int(cg[e] & 15) - 8) * s;
          o[2 * e + 1] = T(int(cg[e] >> 4) - 8) * s;
        }
      } else {
        for (int64_t d = d0; d < d0 + g; d++) {
          const uint8_t byte = c[(d / 2) * st];
          o[d - d0] = T(int(d % 2 ? byte >> 4 : byte & 15) - 8) * s;
        }
      }
    }
  }
}

// Rows [j0, j0 + n) of a quantized view at (b, h) as rows of Xp (zero-padded past X) at dst:
// one tile of keys or values, dequantized where the kernels read it (it stays in L1). Whole
// vectors of contiguous codes with one scale each (group a multiple of W) convert W at a time.
template <class V>
static inline void dequant_tile(const View& t, int64_t b, int64_t h, int64_t j0, int64_t n,
                                int64_t X, int64_t Xp, typename V::T* dst) {
  using T = typename V::T;
  constexpr int W = V::W;
  const int64_t g = t.group;
  if (t.s[3] != 1 || g % W != 0 || (t.dt == DT::Q4 && W % 2 != 0)) {
    for (int64_t r = 0; r < n; r++) {
      T* o = dst + r * Xp;
      dequant_row<T>(t, b, h, j0 + r, X, o);
      for (int64_t d = X; d < Xp; d++) o[d] = T(0);
    }
    return;
  }
  const int64_t ng = X / g;
  const float* sc = t.scales + b * t.ss[0] + h * t.ss[1] + j0 * t.ss[2];
  const int64_t sr = t.ss[2], sg = t.ss[3];
  if (t.dt == DT::Q8) {
    const int8_t* c = static_cast<const int8_t*>(t.p) + b * t.s[0] + h * t.s[1] + j0 * t.s[2];
    for (int64_t r = 0; r < n; r++) {
      const int8_t* cr = c + r * t.s[2];
      T* o = dst + r * Xp;
      for (int64_t k = 0; k < ng; k++) {
        const V s = V::set1(T(sc[r * sr + k * sg]));
        for (int64_t d = k * g; d < (k + 1) * g; d += W) (V::load_i8(cr + d) * s).store(o + d);
      }
      for (int64_t d = X; d < Xp; d++) o[d] = T(0);
    }
  } else {
    const uint8_t* c = static_cast<const uint8_t*>(t.p) + b * t.s[0] + h * t.s[1] + j0 * t.s[2];
    for (int64_t r = 0; r < n; r++) {
      const uint8_t* cr = c + r * t.s[2];
      T* o = dst + r * Xp;
      for (int64_t k = 0; k < ng; k++) {
        const V s = V::set1(T(sc[r * sr + k * sg]));
        for (int64_t d = k * g; d < (k + 1) * g; d += W) (V::load_u4(cr + d / 2) * s).store(o + d);
      }
      for (int64_t d = X; d < Xp; d++) o[d] = T(0);
    }
  }
}

// Whether rows of a quantized view can be read a vector of W codes at a time: unit stride, and
// every vector inside one scale group (group a multiple of W; 4-bit: whole bytes).
template <class V>
static inline bool vector_codes(const View& t, int64_t X) {
  return t.s[3] == 1 && X % V::W == 0 && t.group % V::W == 0 && (t.dt == DT::Q8 || V::W % 2 == 0);
}

// O[i][0:NB*W] (= or +=) sum_k A[i * lda + k] * value(k)[0:NB*W] for i < RB, k < n: the P V
// product of RB rows over n consecutive quantized value rows, each row's NB vectors converted
// from its codes in registers (and times its scales) once for all RB rows. `codes` points at
// the first row's first code of the block, `cs` bytes apart per row; `sc` at the scale of that
// code, `ss` apart per row, `sg` per group of `g` channels.
template <class V, int RB, int NB, bool Q4>
static inline void pv_codes_tile(const typename V::T* A, int64_t lda, int64_t n, const uint8_t* codes,
                                 int64_t cs, const float* sc, int64_t ss, int64_t sg, int64_t g,
                                 typename V::T* O, int64_t ldo, bool add) {
  using T = typename V::T;
  constexpr int W = V::W;
  V acc[RB][NB];
  for (int i = 0; i < RB; i++)
    for (int c = 0; c < NB; c++) acc[i][c] = add ? V::load(O + i * ldo + c * W) : V::zero();
  int64_t goff[NB];  // scale offset of each vector (its group)
  for (int c = 0; c < NB; c++) goff[c] = ((c * W) / g) * sg;
  for (int64_t k = 0; k < n; k++) {
    const uint8_t* cr = codes + k * cs;
    const float* sr = sc + k * ss;
    V bv[NB];
    for (int c = 0; c < NB; c++) {
      const V x = Q4 ? V::load_u4(cr + c * (W / 2))
                     : V::load_i8(reinterpret_cast<const int8_t*>(cr) + c * W);
      bv[c] = x * V::set1(T(sr[goff[c]]));
    }
    for (int i = 0; i < RB; i++) {
      const V a = V::set1(A[i * lda + k]);
      for (int c = 0; c < NB; c++) acc[i][c] = fmadd(a, bv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < RB; i++)
    for (int c = 0; c < NB; c++) acc[i][c].store(O + i * ldo + c * W);
}

// One block of rb (1..4) rows and NB vectors of pv_codes: the register tile fixed at compile time.
template <class V, int NB>
static inline void pv_codes_rows(int rb, bool q4, const typename V::T* A, int64_t lda, int64_t n,
                                 const uint8_t* codes, int64_t cs, const float* sc, int64_t ss,
                                 int64_t sg, int64_t g, typename V::T* O, int64_t ldo) {
  switch (rb * 2 + (q4 ? 1 : 0)) {
    case 2: return pv_codes_tile<V, 1, NB, false>(A, lda, n, codes, cs, sc, ss, sg, g, O, ldo, false);
    case 3: return pv_codes_tile<V, 1, NB, true>(A, lda, n, codes, cs, sc, ss, sg, g, O, ldo, false);
    case 4: return pv_codes_tile<V, 2, NB, false>(A, lda, n, codes, cs, sc, ss, sg, g, O, ldo, false);
    case 5: return pv_codes_tile<V, 2, NB, true>(A, lda, n, codes, cs, sc, ss, sg, g, O, ldo, false);
    case 6: return pv_codes_tile<V, 3, NB, false>(A, lda, n, codes, cs, sc, ss, sg, g, O, ldo, false);
    case 7: return pv_codes_tile<V, 3, NB, true>(A, lda, n, codes, cs, sc, ss, sg, g, O, ldo, false);
    case 8: return pv_codes_tile<V, 4, NB, false>(A, lda, n, codes, cs, sc, ss, sg, g, O, ldo, false);
    default: return pv_codes_tile<V, 4, NB, true>(A, lda, n, codes, cs, sc, ss, sg, g, O, ldo, false);
  }
}

// O (R x X, ldo) = A (R x n, lda) times value rows [j0, j0 + n) of the quantized view t at
// (b, h), read from their codes in registers (vector_codes(t, X) must hold): row blocks of up to
// 4, column blocks of up to NB vectors.
template <class V, int NB>
static inline void pv_codes(int64_t R, const typename V::T* A, int64_t lda, const View& t,
                            int64_t b, int64_t h, int64_t j0, int64_t n, int64_t X,
                            typename V::T* O, int64_t ldo) {
  constexpr int W = V::W;
  const bool q4 = t.dt == DT::Q4;
  const int64_t cs = t.s[2], ss = t.ss[2], sg = t.ss[3], g = t.group;
  const uint8_t* c0 = static_cast<const uint8_t*>(t.p) + b * t.s[0] + h * t.s[1] + j0 * cs;
  const float* s0 = t.scales + b * t.ss[0] + h * t.ss[1] + j0 * ss;
  for (int64_t d0 = 0; d0 < X; d0 += NB * W) {
    const int nb = int(imin(NB, (X - d0) / W));
    const uint8_t* cd = c0 + (q4 ? d0 / 2 : d0);
    const float* sd = s0 + (d0 / g) * sg;
    for (int64_t i0 = 0; i0 < R; i0 += 4) {
      const int rb = int(imin(4, R - i0));
      const typename V::T* a = A + i0 * lda;
      typename V::T* o = O + i0 * ldo + d0;
      if (nb == NB)
        pv_codes_rows<V, NB>(rb, q4, a, lda, n, cd, cs, sd, ss, sg, g, o, ldo);
      else  // the last, narrower block: one vector at a time
        for (int c = 0; c < nb; c++)
          pv_codes_rows<V, 1>(rb, q4, a, lda, n, cd + (q4 ? c * W / 2 : c * W), cs,
                              sd + ((c * W) / g) * sg, ss, sg, g, o + c * W, ldo);
    }
  }
}

// Ask for the code bytes and scales of rows [j0, j0 + 32) (those below nk) of a quantized view:
// the next tile's, while this one is computed (the hardware prefetcher restarts per chunk).
static inline void prefetch_codes(const View& t, int64_t b, int64_t h, int64_t j0, int64_t nk) {
  const int64_t j1 = j0 + 32 < nk ? j0 + 32 : nk;
  const char* c = static_cast<const char*>(t.p) + b * t.s[0] + h * t.s[1];
  const char* sc = reinterpret_cast<const char*>(t.scales + b * t.ss[0] + h * t.ss[1]);
  for (int64_t j = j0; j < j1; j++) {
    __builtin_prefetch(c + j * t.s[2], 0, 3);
    __builtin_prefetch(sc + j * t.ss[2] * 4, 0, 3);
  }
}

// The orthonormal block Walsh-Hadamard transform of x[0:n] in place (blocks of n's largest
// power-of-two divisor, as quant.rotate_heads): log2(block) stages of sums and differences of
// channels i and i + h, then the 1 / sqrt(block) normalisation. Its own inverse.
template <class T>
static inline void hadamard_row(T* x, int64_t n) {
  const int64_t blk = n & -n;
  if (blk < 2) return;
  for (int64_t h = 1; h < blk; h *= 2)
    for (int64_t b0 = 0; b0 < n; b0 += 2 * h)  // 2h divides blk: no pair crosses a block
      for (int64_t i = b0; i < b0 + h; i++) {
        const T a = x[i], c = x[i + h];
        x[i] = a + c;
        x[i + h] = a - c;
      }
  const T norm = T(1.0 / std::sqrt(double(blk)));
  for (int64_t i = 0; i < n; i++) x[i] *= norm;
}

}  // namespace SA_NS
}  // namespace selfattn
