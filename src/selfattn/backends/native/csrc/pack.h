// Packing K and V once per (batch, kv head) into the layouts the micro-kernels stream:
//   panels  [tile][d][PW]   K^T for S = Q K^T (and V^T for backward's dP = dO V^T)
//   rows    [key][Xp]       V for O += P V (and K for backward's dQ += dS K), X padded to W
// converted to the accumulation type, zero-padded past Nk. A k or v row that holds NaN/inf is
// zeroed and flagged (1: the key row, 2: the value row), so padding garbage never reaches a row
// that cannot see it (0 * NaN would): the epilogue turns the visible scores of flagged keys
// into NaN (Plan::nan_keys), and the forward adds a bad value row's non-finite entries back to
// the rows that see it (forward.h, add_bad_values).
#pragma once
#include <cmath>
#include <cstring>

#include "plan.h"
#include "quant.h"

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
// 16-bit rows with unit stride convert a vector at a time (F16C / shifts).
template <class V>
static inline bool load_row(const View& t, int64_t b, int64_t h, int64_t j, int64_t X, int64_t Xp,
                            typename V::T* dst) {
  using T = typename V::T;
  constexpr int W = V::W;
  const int64_t off = b * t.s[0] + h * t.s[1] + j * t.s[2], st = t.s[3];
  if (quantized(t.dt)) {
    dequant_row<T>(t, b, h, j, X, dst);
  } else if (t.dt == DT::F32 && st == 1) {
    const float* src = static_cast<const float*>(t.p) + off;
    for (int64_t d = 0; d < X; d++) dst[d] = T(src[d]);
  } else if (t.dt == DT::F64 && st == 1) {
    const double* src = static_cast<const double*>(t.p) + off;
    for (int64_t d = 0; d < X; d++) dst[d] = T(src[d]);
  } else if (t.dt == DT::BF16 || t.dt == DT::F16) {
    const uint16_t* src = static_cast<const uint16_t*>(t.p) + off;
    const bool bf = t.dt == DT::BF16;
    int64_t d = 0;
    if (st == 1)
      for (; d + W <= X; d += W) (bf ? V::load_bf16(src + d) : V::load_f16(src + d)).store(dst + d);
    for (; d < X; d++) dst[d] = T(bf ? bf16_to_float(src[d * st]) : f16_to_float(src[d * st]));
  } else {
    for (int64_t d = 0; d < X; d++) dst[d] = T(load_scalar(t.p, t.dt, off + d * st));
  }
  for (int64_t d = X; d < Xp; d++) dst[d] = T(0);
  return all_finite(dst, X);
}

// Row i of q (B, H, N, D) at (b, h), times `scale`, zero-padded to Dp (vector path for the
// common same-dtype, unit-stride case).
template <class V>
static inline void load_q_row(const View& q, int64_t b, int64_t h, int64_t i, int64_t D,
                              int64_t Dp, typename V::T scale, typename V::T* dst) {
  using T = typename V::T;
  constexpr int W = V::W;
  const DT same = sizeof(T) == 4 ? DT::F32 : DT::F64;
  if (q.dt == same && q.s[3] == 1 && D % W == 0) {
    const T* src = static_cast<const T*>(q.p) + b * q.s[0] + h * q.s[1] + i * q.s[2];
    const V s = V::set1(scale);
    for (int64_t d = 0; d < D; d += W) (V::load(src + d) * s).store(dst + d);
    for (int64_t d = D; d < Dp; d++) dst[d] = T(0);
    return;
  }
  load_row<V>(q, b, h, i, D, Dp, dst);
  for (int64_t d = 0; d < D; d++) dst[d] *= scale;
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
  uint8_t* bad = nullptr; // ntiles * PW flags: 1 = key row, 2 = value row not finite
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

  static bool fast_view(const View& t, int64_t X) {
    const DT same = sizeof(T) == 4 ? DT::F32 : DT::F64;
    return t.dt == same && t.s[3] == 1 && X % V::W == 0;
  }

  // Keys [j0, j0 + PW) of rows at `base` (row stride ld, nk valid) as X x PW panel rows at dst,
  // by W x W register transposes. Returns a bit per key whose row is not finite.
  static uint32_t panel_tile(const T* base, int64_t ld, int64_t j0, int64_t nk, int64_t X,
                             T* dst) {
    constexpr int W = V::W;
    uint32_t bad = 0;
    for (int g = 0; g < 2; g++)
      for (int64_t d0 = 0; d0 < X; d0 += W) {
        V r[W];
        for (int i = 0; i < W; i++) {
          const int64_t j = j0 + g * W + i;
          r[i] = j < nk ? V::load(base + j * ld + d0) : V::zero();
        }
        V::transpose(r);
        for (int i = 0; i < W; i++) {
          r[i].store(dst + (d0 + i) * PW + g * W);
          bad |= V::nonfinite(r[i]) << (g * W);
        }
      }
    return bad;
  }
  // The same keys as rows of Xp (zero-padded) at dst.
  static uint32_t row_tile(const T* base, int64_t ld, int64_t j0, int64_t nk, int64_t X,
                           int64_t Xp, T* dst) {
    constexpr int W = V::W;
    uint32_t bad = 0;
    for (int c = 0; c < PW; c++) {
      const int64_t j = j0 + c;
      T* o = dst + c * Xp;
      uint32_t b = 0;
      if (j < nk) {
        for (int64_t d = 0; d < X; d += W) {
          V x = V::load(base + j * ld + d);
          x.store(o + d);
          b |= V::nonfinite(x);
        }
      } else {
        for (int64_t d = 0; d < X; d += W) V::zero().store(o + d);
      }
      for (int64_t d = X; d < Xp; d += W) V::zero().store(o + d);
      bad |= uint32_t(b != 0) << c;
    }
    return bad;
  }

  // Pack tiles [t0, t1) of unit u (slot `slot` of the buffers). Returns whether a key was bad.
  bool pack(const Plan<V>& pl, int64_t u, int64_t slot, int64_t t0, int64_t t1, T* krow,
            T* vrow) {
    const Params& p = pl.P;
    if (fast_view(p.k, p.D) && fast_view(p.v, p.Dv)) return pack_fast(pl, u, slot, t0, t1);
    const int64_t b = u / p.Hkv, h = u % p.Hkv, D = p.D, Dv = p.Dv, Dp = pl.Dp, Dvp = pl.Dvp;
    bool any = false;
    for (int64_t t = t0; t < t1; t++) {
      for (int c = 0; c < PW; c++) {
        int64_t j = t * PW + c;
        uint8_t flag = 0;
        if (j < p.Nk) {
          if (!load_row<V>(p.k, b, h, j, D, Dp, krow)) {
            zero_bytes(krow, sizeof(T) * Dp);
            flag |= 1;
          }
          if ((vt || vr) && !load_row<V>(p.v, b, h, j, Dv, Dvp, vrow)) {  // lse alone: no V
            zero_bytes(vrow, sizeof(T) * Dvp);
            flag |= 2;
          }
          any |= flag != 0;
        } else {
          zero_bytes(krow, sizeof(T) * Dp);
          zero_bytes(vrow, sizeof(T) * Dvp);
        }
        bad[slot * bad_n + j] = flag;
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

  // Same-dtype inputs with unit inner stride and whole vectors: transposes and vector copies.
  bool pack_fast(const Plan<V>& pl, int64_t u, int64_t slot, int64_t t0, int64_t t1) {
    const Params& p = pl.P;
    const int64_t b = u / p.Hkv, h = u % p.Hkv, D = p.D, Dv = p.Dv, Nk = p.Nk;
    const T* kb = static_cast<const T*>(p.k.p) + b * p.k.s[0] + h * p.k.s[1];
    const T* vb = static_cast<const T*>(p.v.p) + b * p.v.s[0] + h * p.v.s[1];
    const int64_t lk = p.k.s[2], lv = p.v.s[2];
    bool any = false;
    for (int64_t t = t0; t < t1; t++) {
      const int64_t j0 = t * PW;
      // K is always packed; V only when used (the lse alone never reads it)
      uint32_t kf = 0, vf = 0;
      if (kt) kf |= panel_tile(kb, lk, j0, Nk, D, kt + slot * kt_n + t * D * PW);
      if (kr) kf |= row_tile(kb, lk, j0, Nk, D, pl.Dp, kr + slot * kr_n + j0 * pl.Dp);
      if (vt) vf |= panel_tile(vb, lv, j0, Nk, Dv, vt + slot * vt_n + t * Dv * PW);
      if (vr) vf |= row_tile(vb, lv, j0, Nk, Dv, pl.Dvp, vr + slot * vr_n + j0 * pl.Dvp);
      for (int c = 0; c < PW; c++) {
        const uint8_t flag = uint8_t(((kf >> c) & 1u) | (((vf >> c) & 1u) << 1));
        bad[slot * bad_n + j0 + c] = flag;
        if (flag) zero_key(pl, slot, t, c, flag);
      }
      any |= (kf | vf) != 0;
    }
    return any;
  }
  // Zero the packed copies of key c of tile t: its key row (flag & 1), its value row (flag & 2).
  void zero_key(const Plan<V>& pl, int64_t slot, int64_t t, int c, uint8_t flag) {
    const Params& p = pl.P;
    const int64_t j = t * PW + c;
    if (kt && (flag & 1))
      for (int64_t d = 0; d < p.D; d++) kt[slot * kt_n + t * p.D * PW + d * PW + c] = T(0);
    if (kr && (flag & 1)) zero_bytes(kr + slot * kr_n + j * pl.Dp, sizeof(T) * pl.Dp);
    if (vt && (flag & 2))
      for (int64_t d = 0; d < p.Dv; d++) vt[slot * vt_n + t * p.Dv * PW + d * PW + c] = T(0);
    if (vr && (flag & 2)) zero_bytes(vr + slot * vr_n + j * pl.Dvp, sizeof(T) * pl.Dvp);
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

  // Packing on first use, in place of pack_units: the first item of a unit to run packs it whole
  // in its own thread (ensure), right before the unit's items read it, so no barrier separates
  // packing from compute and the unit is in that core's cache when it is read. Per slot:
  // 0 = not packed, 1 = being packed, 2 = ready; another thread's item of the same unit waits
  // for the packer (one unit's packing at most). reset_lazy before each wave.
  Buf<uint32_t> state_buf;
  void reset_lazy(int64_t slots) {
    state_buf.alloc(slots);
    state_buf.zero(slots);
  }
  // After pack_units: every slot ready, ensure returns at once.
  void mark_ready(int64_t slots) {
    reset_lazy(slots);
    for (int64_t s = 0; s < slots; s++) state_buf.p[s] = 2u;
  }
  // krow / vrow: the caller's Dp / Dvp scratch rows (pack's slow path); also(): more of the
  // unit's data to prepare with it (the backward's q and dO rows), run by the packer. Neither
  // may throw (nothing allocates here): a waiter would wait for ever.
  template <class F>
  void ensure(const Plan<V>& pl, int64_t u, int64_t slot, T* krow, T* vrow, F&& also) {
    uint32_t* st = state_buf.p + slot;
    if (__atomic_load_n(st, __ATOMIC_ACQUIRE) == 2) return;
    uint32_t expect = 0;
    if (__atomic_compare_exchange_n(st, &expect, 1u, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
      any_bad[slot] = pack(pl, u, slot, 0, ntp, krow, vrow) ? 1 : 0;
      also();
      __atomic_store_n(st, 2u, __ATOMIC_RELEASE);
      return;
    }
    while (__atomic_load_n(st, __ATOMIC_ACQUIRE) != 2) spin_pause();
  }
  void ensure(const Plan<V>& pl, int64_t u, int64_t slot, T* krow, T* vrow) {
    ensure(pl, u, slot, krow, vrow, [] {});
  }
};

}  // namespace SA_NS
}  // namespace selfattn
