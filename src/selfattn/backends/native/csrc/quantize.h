// Quantizing keys and values on append (selfattn.quantize_kv for a few tokens at once): a cache
// that quantizes each decode step's token, or a float window's oldest tokens as they leave it,
// pays one call here instead of some twenty torch operations per tensor (fifty with rotation).
//
// Every number is the one quantize_kv computes, in the same order and the same type W (float for
// float32 inputs, double for float64), so the codes and scales are equal, not merely close:
// - rotate: the fast Walsh-Hadamard transform in blocks of the largest power of two dividing D,
//   stage h = 1, 2, 4, ... pairing channels i and i + h (a + b, a - b), then times
//   W(1 / sqrt(block)) (torch multiplies by the Python scalar cast to W);
// - 8 bits: scale = float(max|y| / W(127)) over the group; 4 bits: scale = float(m / W(-8)),
//   m the group's first element of largest magnitude (torch.argmax keeps the first);
// - code = clamp(nearbyint(y / W(s)), lo, hi) with s = 1 where the scale is 0 (round half to
//   even, torch.round's rule), -127..127 or -8..7; 4 bits stored two per byte as code + 8, the
//   even channel in the low nibble.
// No FMA can form (no product is added to anything), and no reassociation is allowed
// (-std=c++17: ISO floating point). A row with a non-finite value after rotation returns false:
// the caller quantizes in torch, whose NaN rules this file does not copy.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

namespace selfattn {

// Rows [0, rows) of contiguous x (rows, D) into codes (rows, D) int8 for bits 8 or (rows, D / 2)
// uint8 for bits 4, and scales (rows, D / group) float32. D % group == 0; D even for 4 bits or
// rotate. Returns false (outputs partly written) when a row holds a non-finite value.
template <class W>
bool quantize_rows(const W* x, int64_t rows, int64_t D, int bits, int64_t group, bool rotate,
                   void* codes, float* scales) {
  std::vector<W> y(static_cast<size_t>(D));
  const int64_t block = D & -D;
  const W unit = W(1.0 / std::sqrt(double(block)));
  const W lo = bits == 8 ? W(-127) : W(-8), hi = bits == 8 ? W(127) : W(7);
  const int64_t groups = D / group;
  int8_t* c8 = static_cast<int8_t*>(codes);
  uint8_t* c4 = static_cast<uint8_t*>(codes);
  std::vector<int8_t> row_codes(static_cast<size_t>(D));
  for (int64_t r = 0; r < rows; r++) {
    const W* xr = x + r * D;
    for (int64_t d = 0; d < D; d++) y[d] = xr[d];
    if (rotate) {
      for (int64_t b0 = 0; b0 < D; b0 += block)
        for (int64_t h = 1; h < block; h *= 2)
          for (int64_t j = b0; j < b0 + block; j += 2 * h)
            for (int64_t i = j; i < j + h; i++) {
              const W a = y[i], b = y[i + h];
              y[i] = a + b;
              y[i + h] = a - b;
            }
      for (int64_t d = 0; d < D; d++) y[d] = y[d] * unit;
    }
    for (int64_t d = 0; d < D; d++)
      if (!std::isfinite(y[d])) return false;
    float* sr = scales + r * groups;
    for (int64_t g = 0; g < groups; g++) {
      const W* yg = y.data() + g * group;
      float s;
      if (bits == 8) {
        W m = W(0);
        for (int64_t d = 0; d < group; d++) m = std::fabs(yg[d]) > m ? std::fabs(yg[d]) : m;
        s = float(m / W(127));
      } else {
        int64_t at = 0;
        W best = std::fabs(yg[0]);
        for (int64_t d = 1; d < group; d++)
          if (std::fabs(yg[d]) > best) {
            best = std::fabs(yg[d]);
            at = d;
          }
        s = float(yg[at] / W(-8));
      }
      sr[g] = s;
      const W safe = W(s != 0.0f ? s : 1.0f);
      for (int64_t d = 0; d < group; d++) {
        W q = std::nearbyint(yg[d] / safe);
        q = q < lo ? lo : (q > hi ? hi : q);
        row_codes[g * group + d] = static_cast<int8_t>(q);
      }
    }
    if (bits == 8) {
      for (int64_t d = 0; d < D; d++) c8[r * D + d] = row_codes[d];
    } else {
      for (int64_t d = 0; d < D; d += 2)
        c4[r * (D / 2) + d / 2] = static_cast<uint8_t>((row_codes[d] + 8) | ((row_codes[d + 1] + 8) << 4));
    }
  }
  return true;
}

}  // namespace selfattn
