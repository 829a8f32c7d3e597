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
