// Packing K and V once per (batch, kv head) into the layouts the micro-kernels stream:
//   panels  [tile][d][PW]   K^T for S = Q K^T (and V^T for backward's dP = dO V^T)
//   rows    [key][Xp]       V for O += P V (and K for backward's dQ += dS K), X padded to W
// converted to the accumulation type, zero-padded past Nk. Keys whose k or v row holds NaN/inf
// are zeroed and flagged: the epilogue turns their visible scores into NaN, so padding garbage
// never reaches a row that cannot see it (0 * NaN would), while rows that see it get NaN.
#pragma once
#include <cmath>
#include <cstring>

#include "plan.h"

namespace selfattn {
namespace SA_NS {

// Whether x[0:n] holds no NaN/inf: an integer test of the exponent bits, which (unlike a float
// sum) the compiler may vectorise.
static inline bool all_finite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; i++) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    bad |= uint32_t((u & 0x7F800000u) == 0x7F800000u);
  }
  return bad == 0;
}
static inline bool all_finite(const double* x, int64_t n) {
  uint64_t bad = 0;
  for (int64_t i = 0; i < n; i++) {
    uint64_t u;
    std::memcpy(&u, x + i, 8);
    bad |= uint64_t((u & 0x7FF0000000000000ull) == 0x7FF0000000000000ull);
  }
  return bad == 0;
}

// Row `j` of a (B, H, N, X) view at (b, h) as T[0:X], zero-padded to Xp; false if not finite.
template <class T>
static inline bool load_row(const View& t, int64_t b, int64_t h, int64_t j, int64_t X, int64_t Xp,
                            T* dst) {
  const int64_t off = b * t.s[0] + h * t.s[1] + j * t.s[2], st = t.s[3];
  if (t.dt == DT::F32 && st == 1) {
    const float* src = static_cast<const float*>(t.p) + off;
    for (int64_t d = 0; d < X; d++) dst[d] = T(src[d]);
  } else if (t.dt == DT::F64 && st == 1) {
    const double* src = static_cast<const double*>(t.p) + off;
    for (int64_t d = 0; d < X; d++) dst[d] = T(src[d]);
  } else if (t.dt == DT::BF16) {
    const uint16_t* src = static_cast<const uint16_t*>(t.p) + off;
    for (int64_t d = 0; d < X; d++) dst[d] = T(bf16_to_float(src[d * st]));
  } else if (t.dt == DT::F16) {
    const uint16_t* src = static_cast<const uint16_t*>(t.p) + off;
    for (int64_t d = 0; d < X; d++) dst[d] = T(f16_to_float(src[d * st]));
  } else {
    for (int64_t d = 0; d < X; d++) dst[d] = T(load_scalar(t.p, t.dt, off + d * st));
  }
  for (int64_t d = X; d < Xp; d++) dst[d] = T(0);
  return all_finite(dst, X);
}

template <class V>
struct Packed {
  using T = typename V::T;
  static constexpr int PW = 2 * V::W;
  // per unit (b * Hkv + kvh) strides; null members are not packed
  T* kt = nullptr;        // K panels, ntiles * D * PW
  T* kr = nullptr;        // K rows, ntiles * PW * Dp
  T* vt = nullptr;        // V panels, ntiles * Dv * PW
  T* vr = nullptr;        // V rows, ntiles * PW * Dvp
  uint8_t* bad = nullptr; // ntiles * PW
  uint8_t* any_bad = nullptr;  // per unit
  int64_t kt_n = 0, kr_n = 0, vt_n = 0, vr_n = 0, bad_n = 0;
  int64_t ntp = 0;  // tiles packed per unit (>= ntiles: whole key blocks, zero keys past Nk)
  Buf<T> kt_buf, kr_buf, vt_buf, vr_buf;
  Buf<uint8_t> bad_buf, any_buf;

  // Allocate for `units` units with the chosen layouts, `tiles` tiles each (default ntiles).
  void alloc(const Plan<V>& pl, int64_t units, bool k_panels, bool k_rows, bool v_panels,
             bool v_rows, int64_t tiles = 0) {
    const Params& p = pl.P;
    ntp = tiles > 0 ? tiles : pl.ntiles;
    int64_t nkp = ntp * PW;
    kt_n = k_panels ? nkp * p.D : 0;
    kr_n = k_rows ? nkp * pl.Dp : 0;
    vt_n = v_panels ? nkp * p.Dv : 0;
    vr_n = v_rows ? nkp * pl.Dvp : 0;
    bad_n = nkp;
    kt_buf.alloc(units * kt_n);
    kr_buf.alloc(units * kr_n);
    vt_buf.alloc(units * vt_n);
    vr_buf.alloc(units * vr_n);
    bad_buf.alloc(units * bad_n);
    any_buf.alloc(units);
    kt = kt_buf.p;
    kr = kr_buf.p;
    vt = vt_buf.p;
    vr = vr_buf.p;
    bad = bad_buf.p;
    any_bad = any_buf.p;
  }

  // Pack tiles [t0, t1) of unit u (slot `slot` of the buffers). Returns whether a key was bad.
  bool pack(const Plan<V>& pl, int64_t u, int64_t slot, int64_t t0, int64_t t1, T* krow,
            T* vrow) {
    const Params& p = pl.P;
    const int64_t b = u / p.Hkv, h = u % p.Hkv, D = p.D, Dv = p.Dv, Dp = pl.Dp, Dvp = pl.Dvp;
    bool any = false;
    for (int64_t t = t0; t < t1; t++) {
      for (int c = 0; c < PW; c++) {
        int64_t j = t * PW + c;
        bool ok = true;
        if (j < p.Nk) {
          ok = load_row<T>(p.k, b, h, j, D, Dp, krow);
          ok &= load_row<T>(p.v, b, h, j, Dv, Dvp, vrow);
          if (!ok) {
            std::memset(krow, 0, sizeof(T) * Dp);
            std::memset(vrow, 0, sizeof(T) * Dvp);
            any = true;
          }
        } else {
          std::memset(krow, 0, sizeof(T) * Dp);
          std::memset(vrow, 0, sizeof(T) * Dvp);
        }
        bad[slot * bad_n + j] = ok ? 0 : 1;
        if (kt) {
          T* dst = kt + slot * kt_n + t * D * PW + c;
          for (int64_t d = 0; d < D; d++) dst[d * PW] = krow[d];
        }
        if (kr) std::memcpy(kr + slot * kr_n + j * Dp, krow, sizeof(T) * Dp);
        if (vt) {
          T* dst = vt + slot * vt_n + t * Dv * PW + c;
          for (int64_t d = 0; d < Dv; d++) dst[d * PW] = vrow[d];
        }
        if (vr) std::memcpy(vr + slot * vr_n + j * Dvp, vrow, sizeof(T) * Dvp);
      }
    }
    return any;
  }

  // Pack units [u0, u1) into slots 0.. in parallel (items of 16 tiles).
  void pack_units(const Plan<V>& pl, const Pool& pool, int64_t u0, int64_t u1) {
    const int64_t TG = 16, groups = cdiv(ntp, TG), n = (u1 - u0) * groups;
    Buf<uint8_t> flags(n);
    auto body = [&](int64_t x0, int64_t x1) {
      Buf<T> krow(pl.Dp), vrow(pl.Dvp);
      for (int64_t x = x0; x < x1; x++) {
        int64_t slot = x / groups, g = x % groups;
        flags[x] = pack(pl, u0 + slot, slot, g * TG, imin(ntp, g * TG + TG), krow.p, vrow.p);
      }
    };
    parallel(pool, n, body, (u1 - u0) * ntp * PW * (pl.P.D + pl.P.Dv) < (int64_t(1) << 17));
    for (int64_t s = 0; s < u1 - u0; s++) {
      uint8_t a = 0;
      for (int64_t g = 0; g < groups; g++) a |= flags[s * groups + g];
      any_bad[s] = a;
    }
  }
  const uint8_t* bad_of(int64_t slot) const { return any_bad[slot] ? bad + slot * bad_n : nullptr; }
};

}  // namespace SA_NS
}  // namespace selfattn
