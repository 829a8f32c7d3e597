// The double backward (a gradient penalty's second pass) in one fused pass: the VJP of the
// first-order backward with the forward's own backward of the out and lse gradients folded in
// (engine/hessian.py with fold; docs/derivatives.md, Double backward). Inputs: q, k, v, out,
// lse, dO, dlse and the cotangents Qc, Kc, Vc of dq, dk, dv (Params tq, tk, tv); outputs the
// gradients of q, k, v (Params dq, dk, dv), of dO (tout, when asked) and of dlse (tlse, when
// dlse is given). Per (row, key), q and Qc scaled, P = exp(S - lse), D = dO.O - dlse:
//
//     dP = dO V^T,  dS = P (dP - D),  R = Qc K^T + Q Kc^T,  W = dO Vc^T
//     PX = P ((dP - D) R + W),  PR = P R,  r = rowsum(PR),  a = -r,  c = -rowsum(PX) + r dlse
//     U = PX + a dS + c P,  PR' = PR + a P
//     q-bar = scale (U K + dS Kc),  k-bar = U^T Q + dS^T Qc,  v-bar = PR'^T dO
//     dO-bar = PR V + P Vc - r O,  dlse-bar = r
//
// r and c are row sums over every key, so a block of rows keeps its tiles (P, dS, PX, PR: a
// band of BR rows x the block's keys) until its sums are known: the first sweep computes S, dP,
// R and W tile by tile (four micro-kernel products, R one of width 2D against a [K^T; Kc^T]
// panel, the rows' operands packed k-major as the forward packs q), then the element-wise terms
// and the row sums of each chunk of 256 keys while it is in cache; the second, again a chunk of
// 256 keys at a time, makes U and PR' in place and runs the chunk's share of every product (its
// K, Kc rows and k-bar, v-bar rows stay in cache across the band's row tiles). Work item: a
// segment of row blocks of one (batch, kv head) for every head of its GQA group; it owns its
// rows' q-bar / dO-bar and adds its k-bar / v-bar into a private partial per segment, summed in
// segment order at the end (no two threads write the same memory; segments are cut from the
// shape alone, so results never depend on the thread count). Rules: the index rules, masks,
// segment ids and a constant bias / slopes / sinks (their gradients and the softcap are the
// torch-op pass's, declined by the caller); a non-finite row of k, v, Kc or Vc declines the
// call (returns false).
#pragma once
#include <cmath>

#include "microkernel.h"
#include "pack.h"
#include "plan.h"

namespace selfattn {
namespace SA_NS {

template <class V>
struct Hessian {
  using T = typename V::T;
  static constexpr int W = V::W, MR = V::MR, PW = 2 * W;
  static constexpr int CT = PW >= 256 ? 1 : 256 / PW;  // tiles of a chunk of sweep 1: 256 keys

  const Plan<V>& pl;
  const Params& P;
  int64_t NP, BR;  // panels per row block, rows per block (NP * MR)
  int64_t LD;      // row stride of the band's tiles
  int64_t Nkp;     // keys padded to whole tiles
  bool need_dout;
  // per unit slot of a wave: [K^T; Kc^T] panels (2D x PW a tile), K and Kc rows, V and Vc
  // panels, V and Vc rows (dO-bar only)
  Buf<T> kp, kr, kcr, vt, vct, vr, vcr;
  int64_t kp_n = 0, kr_n = 0, vt_n = 0, vr_n = 0;
  // k-bar / v-bar partials: [segment][slot][key][Dp or Dvp]
  Buf<T> kpart, vpart;
  int64_t nseg = 1, units_in_wave = 0;

  Hessian(const Plan<V>& plan, const Params& p) : pl(plan), P(p) {
    Nkp = pl.ntiles * PW;
    LD = Nkp + W;
    need_dout = P.tout != nullptr;
    // a block's four band tiles within about 2 MB (a core's share of cache), 1 to 8 panels
    const int64_t per_panel = 4 * MR * LD * int64_t(sizeof(T));
    NP = imax(1, imin(8, (int64_t(2) << 20) / per_panel));
    BR = NP * MR;
  }

  int64_t row_blocks() const { return cdiv(P.Nq, BR); }

  // (row, key) pairs the index rules let block rb's rows visit, plus a share per row
  double block_cost_of(int64_t rb) const { return block_cost(P, rb, BR, MR); }

  int64_t unit_elems() const {
    return Nkp * (2 * P.D + 2 * pl.Dp + 2 * P.Dv + (need_dout ? 2 * pl.Dvp : 0)) +
           nseg * Nkp * (pl.Dp + pl.Dvp);
  }

  void alloc(int64_t units) {
    kp_n = Nkp * 2 * P.D;
    kr_n = Nkp * pl.Dp;
    vt_n = Nkp * P.Dv;
    vr_n = need_dout ? Nkp * pl.Dvp : 0;
    kp.alloc(units * kp_n);
    kr.alloc(units * kr_n);
    kcr.alloc(units * kr_n);
    vt.alloc(units * vt_n);
    vct.alloc(units * vt_n);
    vr.alloc(units * vr_n);
    vcr.alloc(units * vr_n);
    kpart.alloc(nseg * units * Nkp * pl.Dp);
    vpart.alloc(nseg * units * Nkp * pl.Dvp);
  }

  T* kbar_part(int64_t seg, int64_t slot) const {
    return kpart.p + (seg * units_in_wave + slot) * Nkp * pl.Dp;
  }
  T* vbar_part(int64_t seg, int64_t slot) const {
    return vpart.p + (seg * units_in_wave + slot) * Nkp * pl.Dvp;
  }

  // Tiles [t0, t1) of unit u into slot `slot`; false if a row of k, v, Kc or Vc is not finite.
  bool pack(int64_t u, int64_t slot, int64_t t0, int64_t t1, T* row) const {
    const int64_t b = u / P.Hkv, h = u % P.Hkv, D = P.D, Dv = P.Dv, Dp = pl.Dp, Dvp = pl.Dvp;
    bool ok = true;
    T* kpu = kp.p + slot * kp_n;
    for (int64_t t = t0; t < t1; t++) {
      T* panel = kpu + t * 2 * D * PW;
      T* vpan = vt.p + slot * vt_n + t * Dv * PW;
      T* vcpan = vct.p + slot * vt_n + t * Dv * PW;
      for (int c = 0; c < PW; c++) {
        const int64_t j = t * PW + c;
        T* krow = kr.p + slot * kr_n + j * Dp;
        T* kcrow = kcr.p + slot * kr_n + j * Dp;
        T* vrow = need_dout ? vr.p + slot * vr_n + j * Dvp : nullptr;
        T* vcrow = need_dout ? vcr.p + slot * vr_n + j * Dvp : nullptr;
        if (j >= P.Nk) {
          for (int64_t d = 0; d < 2 * D; d++) panel[d * PW + c] = T(0);
          for (int64_t d = 0; d < Dv; d++) vpan[d * PW + c] = vcpan[d * PW + c] = T(0);
          zero_bytes(krow, sizeof(T) * Dp);
          zero_bytes(kcrow, sizeof(T) * Dp);
          if (vrow) zero_bytes(vrow, sizeof(T) * Dvp);
          if (vcrow) zero_bytes(vcrow, sizeof(T) * Dvp);
          continue;
        }
        ok &= load_row<V>(P.k, b, h, j, D, Dp, krow);
        ok &= load_row<V>(P.tk, b, h, j, D, Dp, kcrow);
        for (int64_t d = 0; d < D; d++) {
          panel[d * PW + c] = krow[d];
          panel[(D + d) * PW + c] = kcrow[d];
        }
        ok &= load_row<V>(P.v, b, h, j, Dv, Dvp, row);
        for (int64_t d = 0; d < Dv; d++) vpan[d * PW + c] = row[d];
        if (vrow) std::memcpy(vrow, row, sizeof(T) * Dvp);
        ok &= load_row<V>(P.tv, b, h, j, Dv, Dvp, row);
        for (int64_t d = 0; d < Dv; d++) vcpan[d * PW + c] = row[d];
        if (vcrow) std::memcpy(vcrow, row, sizeof(T) * Dvp);
      }
    }
    return ok;
  }

  struct Scratch {
    // band: U (W, then PX, then U) | dS (dP, then dS) | P (S, then P) | PR (R, then PR), each
    // BR x LD; U and dS adjacent so that k-bar's two products are one of depth 2 BR
    // qk, dk: each register panel's [Qc | Q] and dO rows packed k-major ([2D][MR], [Dv][MR]),
    // so that sweep 1's micro-kernels broadcast from one pointer at constant offsets (as the
    // forward's packed q)
    Buf<T> band, qs, qk, dk, dos, os, lse, dd, dl, r, c, qacc, doacc;
    explicit Scratch(const Hessian& hs)
        : band(4 * hs.BR * hs.LD), qs(2 * hs.BR * hs.pl.Dp),
          qk(hs.NP * 2 * hs.P.D * V::MR), dk(hs.NP * hs.P.Dv * V::MR),
          dos(hs.BR * hs.pl.Dvp), os(hs.BR * hs.pl.Dvp), lse(hs.BR),
          dd(hs.BR), dl(hs.BR), r(hs.BR), c(hs.BR), qacc(hs.BR * hs.pl.Dp),
          doacc(hs.need_dout ? hs.BR * hs.pl.Dvp : 0) {}
  };

  // The rows of block i0 of head h: scaled q and Qc (as [Q; Qc] rows and packed k-major as
  // [Qc | Q] per register panel), dO (rows and packed), O, lse (+inf: the row sees nothing), D
  // and dlse; rows past Nq are zero (lse +inf).
  void load_rows(int64_t b, int64_t h, int64_t i0, Scratch& sc) const {
    const int64_t D = P.D, Dp = pl.Dp, Dvp = pl.Dvp;
    for (int64_t r = 0; r < BR; r++) {
      const int64_t i = i0 + r;
      T* q = sc.qs.p + r * Dp;
      T* qc = sc.qs.p + (BR + r) * Dp;
      T* dO = sc.dos.p + r * Dvp;
      T* o = sc.os.p + r * Dvp;
      if (i >= P.Nq) {
        zero_bytes(q, sizeof(T) * Dp);
        zero_bytes(qc, sizeof(T) * Dp);
        zero_bytes(dO, sizeof(T) * Dvp);
        zero_bytes(o, sizeof(T) * Dvp);
        sc.lse[r] = T(INFINITY);
        sc.dd[r] = sc.dl[r] = T(0);
        continue;
      }
      load_q_row<V>(P.q, b, h, i, D, Dp, pl.qscale, q);
      load_q_row<V>(P.tq, b, h, i, D, Dp, pl.qscale, qc);
      load_row<V>(P.dout, b, h, i, P.Dv, Dvp, dO);
      load_row<V>(P.o, b, h, i, P.Dv, Dvp, o);
      T delta = 0;
      for (int64_t d = 0; d < P.Dv; d++) delta += dO[d] * o[d];
      const View& ls = P.lse_in;
      const T l = T(load_scalar(ls.p, ls.dt, b * ls.s[0] + h * ls.s[1] + i * ls.s[2]));
      T dlse = 0;
      const View& dv = P.dlse;
      if (dv.p) dlse = T(load_scalar(dv.p, dv.dt, b * dv.s[0] + h * dv.s[1] + i * dv.s[2]));
      sc.lse[r] = l == T(-INFINITY) ? T(INFINITY) : l;
      sc.dd[r] = delta - dlse;
      sc.dl[r] = dlse;
    }
    for (int64_t p = 0; p < NP; p++) {
      T* qk = sc.qk.p + p * 2 * D * MR;
      T* dk = sc.dk.p + p * P.Dv * MR;
      for (int i = 0; i < MR; i++) {
        const T* q = sc.qs.p + (p * MR + i) * Dp;
        const T* qc = sc.qs.p + (BR + p * MR + i) * Dp;
        const T* dO = sc.dos.p + (p * MR + i) * Dvp;
        for (int64_t d = 0; d < D; d++) {
          qk[d * MR + i] = qc[d];
          qk[(D + d) * MR + i] = q[d];
        }
        for (int64_t d = 0; d < P.Dv; d++) dk[d * MR + i] = dO[d];
      }
    }
  }

  // One block of rows [i0, i0 + BR) of head h (kv head kvh) of unit slot `slot`, segment seg.
  void block(int64_t slot, int64_t seg, int64_t b, int64_t h, int64_t i0, Scratch& sc) const {
    const int64_t D = P.D, Dv = P.Dv, Dp = pl.Dp, Dvp = pl.Dvp;
    load_rows(b, h, i0, sc);
    // the block's tiles: the union of its panels' ranges
    typename Plan<V>::Panel pans[8];
    int64_t npan = 0, t_lo = pl.ntiles, t_hi = 0;
    for (int64_t p = 0; p < NP && i0 + p * MR < P.Nq; p++) {
      pans[p] = pl.panel(b, h, i0 + p * MR);
      npan = p + 1;
      int64_t lo, hi;
      pl.tile_range(pans[p], lo, hi);
      if (lo < hi) {
        t_lo = imin(t_lo, lo);
        t_hi = imax(t_hi, hi);
      }
    }
    const int64_t nreal = imin(BR, P.Nq - i0);
    T* qbar = static_cast<T*>(P.dq);
    T* dobar = static_cast<T*>(P.tout);
    T* dlbar = static_cast<T*>(P.tlse);
    const int64_t row_at = (b * P.Hq + h) * P.Nq + i0;
    if (t_lo >= t_hi) {  // no row of the block sees a key: every gradient of its rows is 0
      zero_bytes(qbar + row_at * D, sizeof(T) * nreal * D);
      if (dobar) zero_bytes(dobar + row_at * Dv, sizeof(T) * nreal * Dv);
      if (dlbar) zero_bytes(dlbar + row_at, sizeof(T) * nreal);
      return;
    }
    const int64_t n = (t_hi - t_lo) * PW, j0 = t_lo * PW;
    T* Ub = sc.band.p;
    T* dSb = Ub + BR * LD;
    T* Pb = dSb + BR * LD;
    T* PRb = Pb + BR * LD;
    const T* kpu = kp.p + slot * kp_n;
    const T* vpu = vt.p + slot * vt_n;
    const T* vcpu = vct.p + slot * vt_n;
    // sweep 1, in chunks of CT tiles: S, dP, R, W tile by tile (every row panel of the block
    // reads a tile's panels while they are in cache), then the element-wise terms of the
    // chunk while its tiles are in cache: P, dS, PX, PR and the row sums r, sum PX
    for (int64_t r = 0; r < BR; r++) sc.r[r] = sc.c[r] = T(0);
    const V log2e = V::set1(T(LOG2E));
    for (int64_t c0 = t_lo; c0 < t_hi; c0 += CT) {
      const int64_t c1 = imin(c0 + CT, t_hi);
      for (int64_t t = c0; t < c1; t++) {
        for (int64_t p = 0; p < NP; p++) {
          const int64_t r0 = p * MR;
          const T* qk = sc.qk.p + p * 2 * D * MR;
          const T* dk = sc.dk.p + p * Dv * MR;
          const int64_t col = r0 * LD + (t - t_lo) * PW;
          T *s = Pb + col, *dp = dSb + col, *rr = PRb + col, *w = Ub + col;
          const uint8_t cls = p < npan ? pl.tile_class(pans[p], t) : uint8_t(EMPTY);
          if (cls == EMPTY) {
            for (int r = 0; r < MR; r++)
              for (int c = 0; c < PW; c++) {
                s[r * LD + c] = T(-INFINITY);
                dp[r * LD + c] = rr[r * LD + c] = w[r * LD + c] = T(0);
              }
            continue;
          }
          const T* panel = kpu + t * 2 * D * PW;
          // Q K^T, Qc K^T + Q Kc^T, dO V^T, dO Vc^T; each asks for its panel's row 16 steps
          // ahead (the next tile's panel for the first row panel to read it), as the forward
          mk<V, MR, 2, STORE, 16>(D, qk + D * MR, 1, MR, panel, PW, s, LD, nullptr);
          if (cls == PARTIAL || pl.bias || pl.alibi)
            pl.epilogue(s, LD, pans[p], t, cls, nullptr, nullptr);
          mk<V, MR, 2, STORE, 16>(2 * D, qk, 1, MR, panel, PW, rr, LD, nullptr);
          mk<V, MR, 2, STORE, 16>(Dv, dk, 1, MR, vpu + t * Dv * PW, PW, dp, LD, nullptr);
          mk<V, MR, 2, STORE, 16>(Dv, dk, 1, MR, vcpu + t * Dv * PW, PW, w, LD, nullptr);
        }
      }
      const int64_t k0 = (c0 - t_lo) * PW, k1 = (c1 - t_lo) * PW;
      for (int64_t r = 0; r < BR; r++) {
        T *s = Pb + r * LD, *dp = dSb + r * LD, *rr = PRb + r * LD, *w = Ub + r * LD;
        const V l = V::set1(sc.lse[r]), dd = V::set1(sc.dd[r]);
        V rs = V::zero(), xs = V::zero();
        for (int64_t c = k0; c < k1; c += W) {
          const V pv = V::exp2((V::load(s + c) - l) * log2e);
          const V dm = V::load(dp + c) - dd;
          const V rv = V::load(rr + c);
          const V px = pv * fmadd(dm, rv, V::load(w + c));
          const V pr = pv * rv;
          pv.store(s + c);
          (pv * dm).store(dp + c);
          px.store(w + c);
          pr.store(rr + c);
          rs = rs + pr;
          xs = xs + px;
        }
        sc.r[r] += rs.hsum();
        sc.c[r] += xs.hsum();
      }
    }
    for (int64_t r = 0; r < BR; r++) sc.c[r] = sc.r[r] * sc.dl[r] - sc.c[r];
    // sweep 2, a chunk of keys at a time (its K, Kc rows and k-bar, v-bar rows stay in cache
    // for every row tile of the band): U = PX + a dS + c P, PR' = PR + a P (a = -r), then the
    // chunk's share of every product
    const T* kru = kr.p + slot * kr_n + j0 * Dp;
    const T* kcru = kcr.p + slot * kr_n + j0 * Dp;
    const T* vru = need_dout ? vr.p + slot * vr_n + j0 * Dvp : nullptr;
    const T* vcru = need_dout ? vcr.p + slot * vr_n + j0 * Dvp : nullptr;
    T* kb = kbar_part(seg, slot) + j0 * Dp;
    T* vb = vbar_part(seg, slot) + j0 * Dvp;
    constexpr int64_t KC = CT * PW;
    for (int64_t k0 = 0; k0 < n; k0 += KC) {
      const int64_t kn = imin(KC, n - k0);
      if (need_dout) {  // dO-bar's PR V + P Vc (before PR takes the folded term)
        if (k0 == 0)
          gemm<V, STORE>(BR, Dvp / W, kn, PRb, LD, 1, vru, Dvp, sc.doacc.p, Dvp, nullptr);
        else
          gemm<V, ADD>(BR, Dvp / W, kn, PRb + k0, LD, 1, vru + k0 * Dvp, Dvp, sc.doacc.p, Dvp,
                       nullptr);
        gemm<V, ADD>(BR, Dvp / W, kn, Pb + k0, LD, 1, vcru + k0 * Dvp, Dvp, sc.doacc.p, Dvp,
                     nullptr);
      }
      for (int64_t r = 0; r < BR; r++) {
        T *u = Ub + r * LD, *ds = dSb + r * LD, *pp = Pb + r * LD, *pr = PRb + r * LD;
        const V a = V::set1(-sc.r[r]), cc = V::set1(sc.c[r]);
        for (int64_t c = k0; c < k0 + kn; c += W) {
          const V pv = V::load(pp + c);
          fmadd(a, V::load(ds + c), fmadd(cc, pv, V::load(u + c))).store(u + c);
          fmadd(a, pv, V::load(pr + c)).store(pr + c);
        }
      }
      // q-bar = scale (U K + dS Kc) of the block's rows
      if (k0 == 0)
        gemm<V, STORE>(BR, Dp / W, kn, Ub, LD, 1, kru, Dp, sc.qacc.p, Dp, nullptr);
      else
        gemm<V, ADD>(BR, Dp / W, kn, Ub + k0, LD, 1, kru + k0 * Dp, Dp, sc.qacc.p, Dp, nullptr);
      gemm<V, ADD>(BR, Dp / W, kn, dSb + k0, LD, 1, kcru + k0 * Dp, Dp, sc.qacc.p, Dp, nullptr);
      // k-bar += [U; dS]^T [Q; Qc] (one product of depth 2 BR), v-bar += PR'^T dO
      gemm<V, ADD>(kn, Dp / W, 2 * BR, Ub + k0, 1, LD, sc.qs.p, Dp, kb + k0 * Dp, Dp, nullptr);
      gemm<V, ADD>(kn, Dvp / W, BR, PRb + k0, 1, LD, sc.dos.p, Dvp, vb + k0 * Dvp, Dvp, nullptr);
    }
    const T scale = T(P.scale);
    for (int64_t r = 0; r < nreal; r++) {
      T* dst = qbar + (row_at + r) * D;
      for (int64_t d = 0; d < D; d++) dst[d] = sc.qacc[r * Dp + d] * scale;
      if (dobar) {
        T* o = dobar + (row_at + r) * Dv;
        const T rr = sc.r[r];
        for (int64_t d = 0; d < Dv; d++) o[d] = sc.doacc[r * Dvp + d] - rr * sc.os[r * Dvp + d];
      }
      if (dlbar) dlbar[row_at + r] = sc.r[r];
    }
  }
};

// The whole pass: waves of (batch, kv head) units, each packed then computed; false (nothing
// usable written) when a row of k, v, Kc or Vc is not finite.
template <class V>
static bool hessian_all(const Params& P, const Pool& pool) {
  using T = typename V::T;
  using H = Hessian<V>;
  Plan<V> pl(P, pool);
  H hs(pl, P);
  const int64_t units = P.B * P.Hkv, nrb = hs.row_blocks();
  Buf<double> bcost(nrb);
  for (int64_t rb = 0; rb < nrb; rb++) bcost[rb] = hs.block_cost_of(rb);
  // segments of row blocks per unit, from the shape alone (see the header)
  hs.nseg = imin(nrb, imax(1, cdiv(16, units)));
  Buf<int64_t> seg_bounds(hs.nseg + 1);
  split_by_cost(bcost.p, nrb, hs.nseg, seg_bounds.p);
  const int64_t unit_bytes = hs.unit_elems() * int64_t(sizeof(T)) + 1;
  const int64_t budget = int64_t(32) << 20;
  const int64_t wave = imax(1, imin(units, budget / unit_bytes));
  hs.alloc(wave);
  const int64_t Dp = pl.Dp, Dvp = pl.Dvp, D = P.D, Dv = P.Dv;
  for (int64_t u0 = 0; u0 < units; u0 += wave) {
    const int64_t u1 = imin(units, u0 + wave), nu = u1 - u0;
    hs.units_in_wave = nu;
    {  // pack the wave: items of 16 tiles
      const int64_t TG = 16, groups = cdiv(pl.ntiles, TG), n = nu * groups;
      Buf<uint8_t> ok(n);
      auto body = [&](int64_t x0, int64_t x1) {
        Buf<T> row(imax(pl.Dp, pl.Dvp));
        for (int64_t x = x0; x < x1; x++) {
          const int64_t slot = x / groups, g = x % groups;
          ok[x] = hs.pack(u0 + slot, slot, g * TG, imin(pl.ntiles, g * TG + TG), row.p);
        }
      };
      parallel(pool, n, body, nu * pl.ntiles * H::PW * (P.D + P.Dv) < (int64_t(1) << 17));
      for (int64_t x = 0; x < n; x++)
        if (!ok[x]) return false;
    }
    hs.kpart.zero(hs.nseg * nu * hs.Nkp * Dp);
    hs.vpart.zero(hs.nseg * nu * hs.Nkp * Dvp);
    const int64_t n_items = nu * hs.nseg;
    Buf<double> cost(n_items);
    for (int64_t x = 0; x < n_items; x++) {
      const int64_t s = x % hs.nseg;
      double c = 0;
      for (int64_t rb = seg_bounds[s]; rb < seg_bounds[s + 1]; rb++) c += bcost[rb];
      cost[x] = c * double(P.G);
    }
    auto run = [&](int64_t x0, int64_t x1) {
      typename H::Scratch sc(hs);
      for (int64_t x = x0; x < x1; x++) {
        const int64_t s = x % hs.nseg, slot = x / hs.nseg, u = u0 + slot;
        const int64_t b = u / P.Hkv, kvh = u % P.Hkv;
        for (int64_t g = 0; g < P.G; g++)
          for (int64_t rb = seg_bounds[s]; rb < seg_bounds[s + 1]; rb++)
            hs.block(slot, s, b, kvh * P.G + g, rb * hs.BR, sc);
      }
    };
    // cost counts (row, key) pairs: calls under ~1e7 flops stay in this thread
    run_balanced(pool, cost.p, n_items, run, 1e7 / double(2 * (7 * D + 3 * Dv)));
    // k-bar, v-bar: the segments' partials summed in order
    T* kbar = static_cast<T*>(P.dk);
    T* vbar = static_cast<T*>(P.dv);
    auto red = [&](int64_t x0, int64_t x1) {
      for (int64_t slot = x0; slot < x1; slot++) {
        const int64_t u = u0 + slot;
        for (int64_t j = 0; j < P.Nk; j++) {
          T* kd = kbar + (u * P.Nk + j) * D;
          T* vd = vbar + (u * P.Nk + j) * Dv;
          for (int64_t d = 0; d < D; d++) {
            T acc = 0;
            for (int64_t s = 0; s < hs.nseg; s++) acc += hs.kbar_part(s, slot)[j * Dp + d];
            kd[d] = acc;
          }
          for (int64_t d = 0; d < Dv; d++) {
            T acc = 0;
            for (int64_t s = 0; s < hs.nseg; s++) acc += hs.vbar_part(s, slot)[j * Dvp + d];
            vd[d] = acc;
          }
        }
      }
    };
    parallel(pool, nu, red, hs.nseg * nu * P.Nk * (D + Dv) < (int64_t(1) << 17));
  }
  return true;
}

}  // namespace SA_NS
}  // namespace selfattn
