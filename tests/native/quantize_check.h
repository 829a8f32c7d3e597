// csrc/quantize.h (quantize_kv for a few tokens) against a double reference: the rotation by an
// explicit orthonormal block Walsh-Hadamard matrix (Sylvester, in double), and each value's
// code * scale within half a step of the rotated value (a 4-bit element clamped to code 7
// within one step), the scale being the group's largest magnitude over 127 (8 bits) or its
// signed largest element over -8 (4 bits), up to float rounding. A row with a NaN or an
// infinity is refused (false), so that the bindings leave it to torch's rules.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "checks.h"
#include "quantize.h"
#include "tensor.h"

namespace drv {

// y (D) rotated by the orthonormal block Hadamard matrix (blocks of D's largest power-of-two
// divisor), in double, by the definition H[i][j] = (-1)^popcount(i & j) / sqrt(block).
inline std::vector<double> hadamard_rows(const std::vector<double>& y) {
  const int64_t D = int64_t(y.size()), block = D & -D;
  std::vector<double> out(y.size(), 0.0);
  for (int64_t b0 = 0; b0 < D; b0 += block)
    for (int64_t i = 0; i < block; i++) {
      double s = 0;
      for (int64_t j = 0; j < block; j++)
        s += (__builtin_popcountll(uint64_t(i & j)) % 2 ? -1.0 : 1.0) * y[b0 + j];
      out[b0 + i] = s / std::sqrt(double(block));
    }
  return out;
}

template <class W>
void check_quantize_case(Checker& ck, Rng& rng, int64_t rows, int64_t D, int bits, int64_t group,
                         bool rotate) {
  ck.begin("quantize " + std::string(sizeof(W) == 4 ? "f32" : "f64") + " D=" +
               std::to_string(D) + " bits=" + std::to_string(bits) + " group=" +
               std::to_string(group) + (rotate ? " rotated" : ""),
           "generic");
  std::vector<W> x(static_cast<size_t>(rows * D));
  for (int64_t r = 0; r < rows; r++) {
    const double amp = r == 1 ? 0.0 : std::exp(4 * rng.normal());  // row 1: all zeros
    for (int64_t d = 0; d < D; d++) x[r * D + d] = W(amp * rng.normal());
  }
  const int64_t cols = bits == 8 ? D : D / 2, groups = D / group;
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
  std::vector<float> scales(static_cast<size_t>(rows * groups));
  const bool ok = selfattn::quantize_rows<W>(x.data(), rows, D, bits, group, rotate,
                                             codes.data(), scales.data());
  const double u = sizeof(W) == 4 ? 0x1.0p-24 : 0x1.0p-53;
  Checker::Check values(ck, "code * scale within half a step of the rotated value");
  Checker::Check scale_of(ck, "the scale is the group's largest magnitude over 127 / -8");
  Checker::Check refused(ck, "finite rows quantized");
  refused.entry(0, ok ? 1 : 0, 1, 0);
  for (int64_t r = 0; r < rows && ok; r++) {
    std::vector<double> y(static_cast<size_t>(D));
    for (int64_t d = 0; d < D; d++) y[d] = double(x[r * D + d]);
    if (rotate) y = hadamard_rows(y);
    double mag = 0;
    for (double v : y) mag = std::max(mag, std::fabs(v));
    // the float rotation's rounding: log2(block) sums of up to block inputs (far below the
    // half step of a wrong code, mag / 254 or more)
    const double tol = 8 * double(D) * u * mag + 1e-37;
    for (int64_t g = 0; g < groups; g++) {
      double big = 0;
      for (int64_t d = g * group; d < (g + 1) * group; d++)
        if (std::fabs(y[d]) > std::fabs(big)) big = y[d];
      const double s = scales[r * groups + g];
      const double want = bits == 8 ? std::fabs(big) / 127 : big / -8;
      scale_of.entry(r * groups + g, s, want, tol + 1e-7 * std::fabs(want));
      for (int64_t d = g * group; d < (g + 1) * group; d++) {
        int c;
        if (bits == 8) {
          c = int(int8_t(codes[r * cols + d]));
        } else {
          const uint8_t byte = codes[r * cols + d / 2];
          c = int(d % 2 ? byte >> 4 : byte & 15) - 8;
        }
        const bool clamped = bits == 4 && c == 7 && std::fabs(y[d]) > 7.5 * std::fabs(s);
        const double step = std::fabs(s) * (clamped ? 1.0 : 0.5);
        values.entry(r * D + d, c * s, y[d], step * (1 + 1e-6) + tol);
      }
    }
  }
}

inline void check_quantize(Checker& ck) {
  Rng rng(18);
  const int64_t shapes[][2] = {{64, 64}, {64, 32}, {96, 32}, {8, 2}, {6, 3}};  // D, group
  for (const auto& sh : shapes)
    for (int bits : {8, 4})
      for (bool rotate : {false, true}) {
        const int64_t D = sh[0], group = sh[1];
        check_quantize_case<float>(ck, rng, 7, D, bits, group, rotate);
        check_quantize_case<double>(ck, rng, 5, D, bits, group, rotate);
      }
  // a non-finite value is refused (the caller then quantizes with torch's rules)
  ck.begin("quantize refuses a non-finite row", "generic");
  std::vector<float> x(16, 1.0f);
  x[9] = std::nanf("");
  std::vector<uint8_t> codes(16);
  std::vector<float> scales(2);
  Checker::Check refused(ck, "a NaN row refused");
  refused.entry(0, selfattn::quantize_rows<float>(x.data(), 2, 8, 8, 8, false, codes.data(),
                                                  scales.data()) ? 1 : 0, 0, 0);
  x[9] = INFINITY;
  refused.entry(1, selfattn::quantize_rows<float>(x.data(), 2, 8, 4, 4, true, codes.data(),
                                                  scales.data()) ? 1 : 0, 0, 0);
}

}  // namespace drv
