// Forward mode (JVP) in one fused pass: out, lse and their tangents from q, k, v and the
// tangents dq, dk, dv (dbias, dalibi), with no primal lse beforehand (docs/derivatives.md).
//
// The forward's online softmax (forward.h) carries three more accumulators per row, rescaled
// with O whenever the row maximum moves. Per tile, with S the scores and p = exp(S - m):
//
//     dS = scale (dQ K^T + Q dK^T) * (1 - tanh^2) + dbias - dalibi |i' - j|
//     O = sum p v,   T = sum p (dv + dS v),   c = sum p dS,   l = sum p
//     out = O / l,   d lse = c / l,   d out = T / l - out * d lse
//
// The query rows are kept d-major per panel as [q^T; dq^T] and each key tile is packed as one
// panel [dK^T; K^T]. With 32 vector registers (MR = 12) S and dS come from one register tile
// per half panel over that panel, O and T from one pass over the rows of V and dV
// (jvp_tiles.h); with AVX2's 16, dS is one micro-kernel product of width 2D and T two P V-shaped
// products (X = p * dS against V, p against dV), each on its own, a column slice of V at a time
// over chunks of 128 keys and groups of four panels. Work items, tiles, chunks and groups of
// panels (chunk_groups: each K tile and V block read from L1 by all of a group's panels; with
// 32 registers the forward's 256 keys and two panels), the softmax update (softmax_panel) and
// waves are the forward's; K and dK are packed per (batch, kv head) unit, V and dV too unless
// they are read in place (same dtype as the compute, unit inner stride, Dv a multiple of W:
// then only the last, partial tile of keys is copied, zero-padded), which keeps the pass's
// memory beyond its results to the K panels (docs/derivatives.md, Measured).
// A non-finite row of k, v, dk or dv declines the call (the caller then takes the torch-op
// tangent pass, whose semantics for such rows are the forward's): the pass returns false.
#pragma once
#include <cmath>

#include "forward.h"
#include "jvp_tiles.h"

namespace selfattn {
namespace SA_NS {

template <class V>
struct Jvp {
  using T = typename V::T;
  static constexpr int W = V::W, MR = V::MR, PW = 2 * W, NP = 8, BM = NP * MR;
  // rows of the fused tiles (score_pair, value_pair): their 4 vectors a row make the 2 MR
  // accumulators of the scores' MR x 2 tile, plus 4 vectors of K and dK (V and dV) and 2
  // broadcasts: 30 registers with MR = 12 (AVX-512, NEON: 32). AVX2's 16 (MR = 6) would spill,
  // so there (and in the generic build) the products run one at a time on the micro-kernel.
  static constexpr int FR = MR / 2;
  static constexpr bool fused = MR >= 12;
  // Keys per chunk and panels per group (chunk_groups: each K tile and each slice of V and dV
  // is read from L1 by all of the group's panels). Fused: the forward's (256 keys, 2 panels).
  // Unfused (MR = 6): 128 keys and 4 panels, so a group still has 24 rows for each K tile and
  // V slice from L2, while a column slice of V and dV (2 vectors x 128 keys, 16 KiB) and the
  // group's P and X (24 KiB) stay in L1 across the three value products (group_chunk):
  // AVX2 JVP 6-9% faster than 256 keys x 2 panels (docs/derivatives.md, Measured).
  static constexpr int CT = (fused ? 256 : 128) / PW, KC = CT * PW, LDS = KC + W;
  static constexpr int NG = fused ? Forward<V>::NG : 4;
  // keys per block of the value tiles: a block's rows of V and dV (a pair of column vectors
  // each) and the group's P and X stay in L1 while every half panel reads them (128: 5% slower)
  static constexpr int VKB = 64;
  static_assert(MR % 2 == 0, "the fused tiles take a panel's rows in two halves");

  const Plan<V>& pl;
  const Params& P;
  bool tq, tk, tv, tbias, talibi;
  bool ds_any;  // some tangent reaches the scores (else dS = 0: c = 0 and T = sum p dv)
  int64_t Dq2;   // row stride of the query rows: q at [0, D), dq at [D, 2D)
  int64_t kpt;   // elements of one tile's panel: [dK^T (D rows, with tk); K^T (D rows)] x PW
  int64_t koff;  // where K^T starts within it
  T dmul;        // d score / d (scaled q.k) beyond 1 - tanh^2: the softcap unless divided

  // per unit slot of the current wave: K panels; V / dV rows (all tiles, or with vdirect the
  // last partial tile alone, the others read from the tensors in place)
  Buf<T> kp_buf, vr_buf, dvr_buf;
  int64_t kp_n = 0, vr_n = 0;
  bool vdirect;
  int64_t tf;  // tiles of PW whole keys: [0, tf) read in place under vdirect

  Jvp(const Plan<V>& plan, const Params& p) : pl(plan), P(p) {
    tq = P.tq.p != nullptr;
    tk = P.tk.p != nullptr;
    tv = P.tv.p != nullptr;
    tbias = P.tbias.p != nullptr;
    talibi = P.talibi.p != nullptr;
    ds_any = tq || tk || tbias || talibi;
    Dq2 = cdiv(P.D + pl.Dp, W) * W;
    kpt = (tk ? 2 : 1) * P.D * PW;
    koff = tk ? P.D * PW : 0;
    dmul = pl.softcap && !pl.cap_div ? pl.cap : T(1);
    const DT same = sizeof(T) == 4 ? DT::F32 : DT::F64;
    auto inplace = [&](const View& x) {
      return x.dt == same && x.s[3] == 1 && P.Dv % W == 0 && P.Dv > 0;
    };
    vdirect = inplace(P.v) && (!tv || inplace(P.tv));
    tf = vdirect ? P.Nk / PW : 0;
  }

  // rows of V (or dV) of unit (b, kvh) in place, row stride ld
  const T* rows_of(const View& x, int64_t b, int64_t kvh) const {
    return static_cast<const T*>(x.p) + b * x.s[0] + kvh * x.s[1];
  }

  // q: the block's rows [q | dq] (row stride Dq2); qt: each panel's d-major, [q^T; dq^T]
  // (2 D x MR), which the score tiles read
  struct Scratch {
    Buf<T> q, qt, o, t, m, l, c, al, s, ds, th;
    Buf<uint8_t> cls;
    explicit Scratch(const Jvp& j)
        : q(BM * j.Dq2), qt(BM * 2 * j.P.D), o(BM * j.pl.Dvp), t(BM * j.pl.Dvp), m(BM), l(BM),
          c(BM), al(NG * MR), s(NG * MR * LDS), ds(NG * MR * LDS),
          th(j.pl.softcap ? NG * MR * LDS : 0), cls(NG * CT) {}
  };

  int64_t unit_elems() const {
    return pl.ntiles * kpt + (pl.ntiles - tf) * PW * pl.Dvp * (tv ? 2 : 1);
  }

  void alloc(int64_t units) {
    kp_n = pl.ntiles * kpt;
    vr_n = (pl.ntiles - tf) * PW * pl.Dvp;
    kp_buf.alloc(units * kp_n);
    vr_buf.alloc(units * vr_n);
    dvr_buf.alloc(tv ? units * vr_n : 0);
  }

  // Tiles [t0, t1) of unit u into slot `slot`; false if a row of k, v, dk or dv is not finite.
  bool pack(int64_t u, int64_t slot, int64_t t0, int64_t t1, T* krow) {
    const int64_t b = u / P.Hkv, h = u % P.Hkv, D = P.D, Dp = pl.Dp, Dvp = pl.Dvp;
    // k and dk of the compute dtype, unit inner stride, whole vectors: the tile's panels by the
    // forward's register transposes (pack.h)
    const bool fast = Packed<V>::fast_view(P.k, D) && (!tk || Packed<V>::fast_view(P.tk, D));
    bool ok = true;
    for (int64_t t = t0; t < t1; t++) {
      T* panel = kp_buf.p + slot * kp_n + t * kpt;
      if (fast) {
        uint32_t bad = Packed<V>::panel_tile(rows_of(P.k, b, h), P.k.s[2], t * PW, P.Nk, D,
                                             panel + koff);
        if (tk)
          bad |= Packed<V>::panel_tile(rows_of(P.tk, b, h), P.tk.s[2], t * PW, P.Nk, D, panel);
        ok &= bad == 0;
      }
      for (int c = 0; c < PW; c++) {
        const int64_t j = t * PW + c;
        const int64_t jr = j - tf * PW;  // row in the packed V / dV (tiles from tf on)
        T* vrow = t >= tf ? vr_buf.p + slot * vr_n + jr * Dvp : nullptr;
        T* dvrow = tv && t >= tf ? dvr_buf.p + slot * vr_n + jr * Dvp : nullptr;
        if (j >= P.Nk) {
          if (!fast) {
            for (int64_t d = 0; d < D; d++) panel[koff + d * PW + c] = T(0);
            if (tk)
              for (int64_t d = 0; d < D; d++) panel[d * PW + c] = T(0);
          }
          if (vrow) zero_bytes(vrow, sizeof(T) * Dvp);
          if (dvrow) zero_bytes(dvrow, sizeof(T) * Dvp);
          continue;
        }
        if (!fast) {
          ok &= load_row<V>(P.k, b, h, j, D, Dp, krow);
          for (int64_t d = 0; d < D; d++) panel[koff + d * PW + c] = krow[d];
          if (tk) {
            ok &= load_row<V>(P.tk, b, h, j, D, Dp, krow);
            for (int64_t d = 0; d < D; d++) panel[d * PW + c] = krow[d];
          }
        }
        if (vrow) {
          ok &= load_row<V>(P.v, b, h, j, P.Dv, Dvp, vrow);
          if (dvrow) ok &= load_row<V>(P.tv, b, h, j, P.Dv, Dvp, dvrow);
        } else {  // read in place: only checked
          ok &= all_finite(rows_of(P.v, b, h) + j * P.v.s[2], P.Dv);
          if (tv) ok &= all_finite(rows_of(P.tv, b, h) + j * P.tv.s[2], P.Dv);
        }
      }
    }
    return ok;
  }

  int64_t blocks() const { return cdiv(P.Nq, BM); }

  double cost(int64_t qb) const { return block_cost(P, qb, BM, MR); }

  void item(int64_t slot, int64_t u, int64_t g, int64_t qb, Scratch& sc) const {
    const int64_t b = u / P.Hkv, kvh = u % P.Hkv, h = kvh * P.G + g;
    const int64_t i0 = qb * BM, i1 = imin(P.Nq, i0 + BM), rows = i1 - i0;
    const int64_t npan = cdiv(rows, MR), D = P.D, Dp = pl.Dp;
    for (int64_t r = 0; r < npan * MR; r++) {
      T* dst = sc.q.p + r * Dq2;
      for (int64_t d = 0; d < Dq2; d++) dst[d] = T(0);
      if (i0 + r < P.Nq) {
        // q, then dq over q's zero padding [D, Dp): both scaled as the forward scales q
        load_q_row<V>(P.q, b, h, i0 + r, D, Dp, pl.qscale, dst);
        if (tq) load_q_row<V>(P.tq, b, h, i0 + r, D, Dp, pl.qscale, dst + D);
      }
      sc.m[r] = T(-INFINITY);
      sc.l[r] = T(0);
      sc.c[r] = T(0);
    }
    for (int64_t p = 0; p < npan; p++)
      d_major<T, MR>(sc.q.p + p * MR * Dq2, Dq2, 2 * D, sc.qt.p + p * 2 * D * MR);
    sc.o.zero(npan * MR * pl.Dvp);
    sc.t.zero(npan * MR * pl.Dvp);
    Bounds bb = key_bounds(P.start + i0, P.start + i1 - 1, P.Nk, P.causal, P.left, P.right);
    if (bb.hi > bb.lo) {
      typename Plan<V>::Panel pans[NP];
      for (int64_t p = 0; p < npan; p++) pans[p] = pl.panel(b, h, i0 + p * MR);
      const int64_t tb0 = bb.lo / PW, tb1 = cdiv(bb.hi, PW);
      for (int64_t c0 = tb0; c0 < tb1; c0 += CT) {
        const int64_t c1 = imin(c0 + CT, tb1);
        chunk_groups<V, NG, CT>(pl, pans, npan, c0, c1, sc.cls.p,
                                [&](int64_t p0, int ng, int64_t lo, int64_t hi) {
                                  group_chunk(slot, pans, p0, ng, lo, hi, c0, sc);
                                });
      }
    }
    finish(b, h, i0, rows, sc);
  }

  // S = q K^T of tile t for the panel's MR rows into st and, with a tangent that reaches the
  // scores, the product part of dS (dq K^T + q dK^T, or 0 without tq and tk) into dt; qt: the
  // panel's [q^T; dq^T] (2 D x MR).
  void scores(const T* qt, const T* panel, T* st, T* dt) const {
    const int64_t D = P.D;
    const T* K = panel + koff;
    if (fused && tq && tk)
      score_halves<true, true>(qt, K, panel, st, dt);
    else if (fused && tq)
      score_halves<true, false>(qt, K, panel, st, dt);
    else if (fused && tk)
      score_halves<false, true>(qt, K, panel, st, dt);
    else
      mk<V, MR, 2, STORE>(D, qt, 1, MR, K, PW, st, LDS, nullptr);
    if (fused || !(tq || tk)) {
      if (ds_any && !tq && !tk)
        for (int r = 0; r < MR; r++)
          for (int c = 0; c < PW; c++) dt[r * LDS + c] = T(0);
    } else if (tq && tk) {  // [q | dq] . [dk; k] = q.dk + dq.k, one product of width 2D
      mk<V, MR, 2, STORE>(2 * D, qt, 1, MR, panel, PW, dt, LDS, nullptr);
    } else if (tq) {
      mk<V, MR, 2, STORE>(D, qt + D * MR, 1, MR, K, PW, dt, LDS, nullptr);
    } else {
      mk<V, MR, 2, STORE>(D, qt, 1, MR, panel, PW, dt, LDS, nullptr);
    }
  }
  template <bool DQ, bool DK>
  void score_halves(const T* qt, const T* K, const T* dK, T* st, T* dt) const {
    for (int h = 0; h < 2; h++)
      score_pair<V, FR, DQ, DK>(P.D, qt + h * FR, 1, MR, P.D * MR, K, dK, st + h * FR * LDS,
                                dt + h * FR * LDS, LDS);
  }

  // The rule terms of the scores' tangent of tile t (real rows): through the softcap, the
  // bias's and the slopes' tangents.
  void score_tangent(const typename Plan<V>::Panel& pn, int64_t t, const T* th, T* dt) const {
    const int nreal = int(pn.nreal);
    if (th && (tq || tk)) {  // through the softcap: d (cap tanh x) = cap (1 - tanh^2) dx
      const V one = V::set1(T(1)), mul = V::set1(dmul);
      for (int r = 0; r < nreal; r++)
        for (int v = 0; v < 2; v++) {
          V x = V::load(th + r * LDS + v * W);
          T* d = dt + r * LDS + v * W;
          (V::load(d) * ((one - x * x) * mul)).store(d);
        }
    }
    const int64_t j0 = t * PW;
    if (tbias) {
      const View& bv = P.tbias;
      const int64_t jn = imin(PW, P.Nk - j0);
      for (int r = 0; r < nreal; r++) {
        const int64_t off = pn.b * bv.s[0] + pn.h * bv.s[1] + (pn.row0 + r) * bv.s[2] + j0 * bv.s[3];
        T* d = dt + r * LDS;
        for (int64_t c = 0; c < jn; c++) d[c] += T(load_scalar(bv.p, bv.dt, off + c * bv.s[3]));
      }
    }
    if (talibi) {
      const View& a = P.talibi;
      const V ns = V::set1(-T(load_scalar(a.p, a.dt, pn.b * a.s[0] + pn.h * a.s[1])));
      for (int r = 0; r < nreal; r++) {
        const int64_t pos = P.start + pn.row0 + r;
        for (int v = 0; v < 2; v++) {
          T* d = dt + r * LDS + v * W;
          fmadd(V::distance(pos, j0 + v * W), ns, V::load(d)).store(d);
        }
      }
    }
  }

  // Panels p0 .. p0 + ng - 1 (consecutive) against tiles [t_lo, t_hi) of the chunk from tile
  // c0 (their classes in sc.cls, CT per panel; a tile EMPTY for one panel gives it -inf scores
  // and dS = 0). Each K tile is read from L1 by every panel of the group, then the rows'
  // softmax, X = p * dS and c, then O and T over the group's rows.
  void group_chunk(int64_t slot, const typename Plan<V>::Panel* pans, int64_t p0, int ng,
                   int64_t t_lo, int64_t t_hi, int64_t c0, Scratch& sc) const {
    const int64_t Dvp = pl.Dvp;
    const T* kp = kp_buf.p + slot * kp_n;
    for (int64_t t = t_lo; t < t_hi; t++)
      for (int g = 0; g < ng; g++) {
        const auto& pn = pans[p0 + g];
        T* st = sc.s.p + g * MR * LDS + (t - t_lo) * PW;
        T* dt = sc.ds.p + g * MR * LDS + (t - t_lo) * PW;
        const uint8_t ct = sc.cls[g * CT + t - c0];
        if (ct == EMPTY) {
          for (int r = 0; r < MR; r++)
            for (int c = 0; c < PW; c++) {
              st[r * LDS + c] = T(-INFINITY);
              dt[r * LDS + c] = T(0);
            }
          continue;
        }
        scores(sc.qt.p + (p0 + g) * 2 * P.D * MR, kp + t * kpt, st, dt);
        T* th = pl.softcap ? sc.th.p + g * MR * LDS + (t - t_lo) * PW : nullptr;
        if (ct == PARTIAL || pl.softcap || pl.bias || pl.alibi)
          pl.epilogue(st, LDS, pn, t, ct, nullptr, th);
        if (ds_any) score_tangent(pn, t, th, dt);
      }
    const int64_t n = (t_hi - t_lo) * PW;
    for (int g = 0; g < ng; g++) {
      T* S = sc.s.p + g * MR * LDS;
      T* m = sc.m.p + (p0 + g) * MR;
      T* l = sc.l.p + (p0 + g) * MR;
      T* al = sc.al.p + g * MR;
      softmax_panel<V, MR>(S, LDS, n, m, l, al);
      if (!ds_any) continue;
      // X = p * dS in place of dS; c = al c + sum X (before dropout: d lse sees every key)
      constexpr int G = (MR + W - 1) / W;
      alignas(64) T red[G * W * W], sum[G * W];
      for (int r = 0; r < MR; r++) {
        const T* s = S + r * LDS;
        T* x = sc.ds.p + (g * MR + r) * LDS;
        V acc = V::zero();
        for (int64_t k = 0; k < n; k += W) {
          V xv = V::load(s + k) * V::load(x + k);
          xv.store(x + k);
          acc = acc + xv;
        }
        acc.store(red + r * W);
      }
      row_sums<V, MR>(red, sum);
      T* c = sc.c.p + (p0 + g) * MR;
      for (int r = 0; r < MR; r++) c[r] = c[r] * al[r] + sum[r];
    }
    if (pl.dropout) {
      const T inv = pl.keep_scale;
      for (int g = 0; g < ng; g++) {
        const auto& pn = pans[p0 + g];
        for (int r = 0; r < int(pn.nreal); r++) {
          uint32_t hr = pl.drop_row(pn.b, pn.h, pn.row0 + r);
          T* s = sc.s.p + (g * MR + r) * LDS;
          T* x = sc.ds.p + (g * MR + r) * LDS;
          for (int64_t k = 0; k < n; k += W) {
            V::dropout(V::load(s + k), hr, t_lo * PW + k, P.seed1, pl.thr, inv).store(s + k);
            if (ds_any)
              V::dropout(V::load(x + k), hr, t_lo * PW + k, P.seed1, pl.thr, inv).store(x + k);
          }
        }
      }
    }
    const T* S = sc.s.p;
    const T* DS = sc.ds.p;
    const T* al = sc.al.p;
    T* o = sc.o.p + p0 * MR * Dvp;
    T* ta = sc.t.p + p0 * MR * Dvp;
    const int64_t b = pans[p0].b, kvh = pans[p0].h / P.G, M = ng * MR;
    if (fused && (ds_any || tv)) {  // O = al O + P V, T = al T + X V + P dV
      accumulate(M, S, DS, t_lo, t_hi, slot, b, kvh, o, ta, al);
      return;
    }
    // one column slice (2 vectors) of O and T at a time: the slice of V and dV is read from
    // L2 once for the three products
    const int64_t nv = Dvp / W;
    for (int64_t c = 0; c < nv; c += 2) {
      const int64_t cn = imin(2, nv - c);
      values(M, S, t_lo, t_hi, slot, b, kvh, false, o, al, c, cn);  // O = al O + P V
      if (ds_any) {
        values(M, DS, t_lo, t_hi, slot, b, kvh, false, ta, al, c, cn);  // T = al T + X V
        if (tv) values(M, S, t_lo, t_hi, slot, b, kvh, true, ta, nullptr, c, cn);  // T += P dV
      } else if (tv) {
        values(M, S, t_lo, t_hi, slot, b, kvh, true, ta, al, c, cn);  // T = al T + P dV
      }
    }
  }

  // O = al O + P V and T = al T + X V (ds_any) + P dV (tv) for the keys of tiles [t_lo, t_hi)
  // and M rows (whole panels): P and X the rows' (M x keys) buffers; V and dV read in place up
  // to tile tf (vdirect), from their packed copies after.
  void accumulate(int64_t M, const T* S, const T* X, int64_t t_lo, int64_t t_hi, int64_t slot,
                  int64_t b, int64_t kvh, T* o, T* ta, const T* al) const {
    int64_t t0 = t_lo;
    if (vdirect && t_lo < tf) {
      const int64_t tm = imin(t_hi, tf), j0 = t_lo * PW;
      const T* dv = tv ? rows_of(P.tv, b, kvh) + j0 * P.tv.s[2] : nullptr;
      value_run(M, S, X, (tm - t_lo) * PW, rows_of(P.v, b, kvh) + j0 * P.v.s[2], P.v.s[2], dv,
                tv ? P.tv.s[2] : 0, o, ta, al);
      if (tm == t_hi) return;
      t0 = tm;
      al = nullptr;  // scaled already: the rest adds
    }
    const int64_t off = slot * vr_n + (t0 - tf) * PW * pl.Dvp, a0 = (t0 - t_lo) * PW;
    value_run(M, S + a0, X + a0, (t_hi - t0) * PW, vr_buf.p + off, pl.Dvp,
              tv ? dvr_buf.p + off : nullptr, pl.Dvp, o, ta, al);
  }
  void value_run(int64_t M, const T* S, const T* X, int64_t n, const T* Vr, int64_t ldv,
                 const T* dVr, int64_t lddv, T* o, T* ta, const T* al) const {
    if (ds_any && tv)
      value_blocks<true, true>(M, S, X, n, Vr, ldv, dVr, lddv, o, ta, al);
    else if (ds_any)
      value_blocks<true, false>(M, S, X, n, Vr, ldv, dVr, lddv, o, ta, al);
    else
      value_blocks<false, true>(M, S, X, n, Vr, ldv, dVr, lddv, o, ta, al);
  }
  // Keys in blocks of VKB, each block's rows of V and dV read by every half panel of the M rows
  // while in L1; columns two vectors at a time.
  template <bool XV, bool PDV>
  void value_blocks(int64_t M, const T* S, const T* X, int64_t n, const T* Vr, int64_t ldv,
                    const T* dVr, int64_t lddv, T* o, T* ta, const T* al) const {
    const int64_t Dvp = pl.Dvp, nv = Dvp / W;
    const int halves = int(M / FR);
    for (int64_t k0 = 0; k0 < n; k0 += VKB) {
      const int64_t kn = imin(VKB, n - k0);
      const bool scale = k0 == 0 && al;
      for (int64_t c = 0; c < nv; c += 2)
        for (int h = 0; h < halves; h++) {
          const int64_t a = h * FR * LDS + k0, r = h * FR * Dvp + c * W;
          const T* v = Vr + k0 * ldv + c * W;
          const T* dv = PDV ? dVr + k0 * lddv + c * W : nullptr;
          const T* alh = scale ? al + h * FR : nullptr;
          if (nv - c >= 2) {
            if (scale)
              value_pair<V, FR, 2, XV, PDV, SCALE>(kn, S + a, X + a, LDS, v, ldv, dv, lddv,
                                                   o + r, ta + r, Dvp, alh);
            else
              value_pair<V, FR, 2, XV, PDV, ADD>(kn, S + a, X + a, LDS, v, ldv, dv, lddv,
                                                 o + r, ta + r, Dvp, alh);
          } else if (scale) {
            value_pair<V, FR, 1, XV, PDV, SCALE>(kn, S + a, X + a, LDS, v, ldv, dv, lddv, o + r,
                                                 ta + r, Dvp, alh);
          } else {
            value_pair<V, FR, 1, XV, PDV, ADD>(kn, S + a, X + a, LDS, v, ldv, dv, lddv, o + r,
                                               ta + r, Dvp, alh);
          }
        }
    }
  }

  // C = al C + A V (al null: C += A V) for the keys of tiles [t_lo, t_hi), M rows and the nv
  // column vectors from vector cv, A the rows' (M x keys) buffer; V or (dv) dV, packed or read
  // in place (then the partial last tile from its packed copy, in a second product).
  void values(int64_t M, const T* A, int64_t t_lo, int64_t t_hi, int64_t slot, int64_t b,
              int64_t kvh, bool dv, T* C, const T* al, int64_t cv, int64_t nv) const {
    const int64_t Dvp = pl.Dvp;
    const T* packed = (dv ? dvr_buf.p : vr_buf.p) + slot * vr_n + cv * W;
    C += cv * W;
    int64_t t0 = t_lo;
    if (vdirect && t_lo < tf) {
      const View& x = dv ? P.tv : P.v;
      const int64_t tm = imin(t_hi, tf), n = (tm - t_lo) * PW;
      const T* B = rows_of(x, b, kvh) + t_lo * PW * x.s[2] + cv * W;
      if (al)
        gemm<V, SCALE>(M, nv, n, A, LDS, 1, B, x.s[2], C, Dvp, al);
      else
        gemm<V, ADD>(M, nv, n, A, LDS, 1, B, x.s[2], C, Dvp, nullptr);
      if (tm == t_hi) return;
      t0 = tm;
      al = nullptr;  // scaled already: the rest adds
    }
    const int64_t n = (t_hi - t0) * PW;
    const T* B = packed + (t0 - tf) * PW * Dvp;
    const T* A0 = A + (t0 - t_lo) * PW;
    if (al)
      gemm<V, SCALE>(M, nv, n, A0, LDS, 1, B, Dvp, C, Dvp, al);
    else
      gemm<V, ADD>(M, nv, n, A0, LDS, 1, B, Dvp, C, Dvp, nullptr);
  }

  // Normalise and write out, lse and the tangents for the block's rows.
  void finish(int64_t b, int64_t h, int64_t i0, int64_t rows, Scratch& sc) const {
    T* lse = static_cast<T*>(P.lse);
    T* tout = static_cast<T*>(P.tout);
    T* tlse = static_cast<T*>(P.tlse);
    const int64_t Dv = P.Dv, Dvp = pl.Dvp;
    for (int64_t r = 0; r < rows; r++) {
      const int64_t row = i0 + r, bh = b * P.Hq + h, at = bh * P.Nq + row;
      T l = sc.l[r], m = sc.m[r];
      // a sink rescales O, T and c alike (it has no value and no tangent here: the caller
      // adds the sink's own tangent from out and lse)
      const T keep = P.sinks ? add_sink(T(P.sinks[h]), m, l) : T(1);
      const bool empty = l == T(0);
      const T inv = empty ? T(0) : keep / l;
      lse[at] = empty ? T(-INFINITY) : T(m + std::log(l));
      const T dl = sc.c[r] * inv;
      tlse[at] = dl;
      const T* o = sc.o.p + r * Dvp;
      const T* ta = sc.t.p + r * Dvp;
      T* dst = tout + at * Dv;
      for (int64_t d = 0; d < Dv; d++) dst[d] = ta[d] * inv - o[d] * inv * dl;
      store_out<T>(P.out, P.out_dt, at * Dv, o, Dv, inv);
    }
  }
};

// The whole pass: waves of (batch, kv head) units, each packed then computed. False (nothing
// usable written) when a row of k, v, dk or dv is not finite.
template <class V>
static bool jvp_prefill(const Params& P, const Pool& pool) {
  using J = Jvp<V>;
  Plan<V> pl(P, pool);
  J jv(pl, P);
  const int64_t units = P.B * P.Hkv;
  const int64_t unit_bytes = jv.unit_elems() * int64_t(sizeof(typename V::T)) + 1;
  // the forward's wave budget: a unit's panels are about the forward's packed K and V (V and dV
  // read in place), so the pass's memory beyond its two results stays the forward's, and a
  // wave of several units gives the threads items enough to end together (one unit of N=4096
  // is 43 blocks: 4 parts of 11, 11, 11, 10 keep one thread a block longer every wave)
  const int64_t budget = int64_t(8) << 20;
  const int64_t wave = imax(1, imin(units, budget / unit_bytes));
  jv.alloc(wave);
  const int64_t nb = jv.blocks();
  Buf<double> qcost(nb);
  for (int64_t qb = 0; qb < nb; qb++) qcost[qb] = jv.cost(qb);
  for (int64_t u0 = 0; u0 < units; u0 += wave) {
    const int64_t u1 = imin(units, u0 + wave);
    {  // pack the wave: items of 16 tiles
      const int64_t TG = 16, groups = cdiv(pl.ntiles, TG), n = (u1 - u0) * groups;
      Buf<uint8_t> ok(n);
      auto body = [&](int64_t x0, int64_t x1) {
        Buf<typename V::T> krow(pl.Dp);
        for (int64_t x = x0; x < x1; x++) {
          const int64_t slot = x / groups, g = x % groups;
          ok[x] = jv.pack(u0 + slot, slot, g * TG, imin(pl.ntiles, g * TG + TG), krow.p);
        }
      };
      parallel(pool, n, body, (u1 - u0) * pl.ntiles * (2 * V::W) * (P.D + P.Dv) < (int64_t(1) << 17));
      for (int64_t x = 0; x < n; x++)
        if (!ok[x]) return false;
    }
    const int64_t n = (u1 - u0) * nb * P.G;
    Buf<double> cost(n);
    for (int64_t x = 0; x < n; x++) cost[x] = qcost[(x / P.G) % nb];
    auto run = [&](int64_t x0, int64_t x1) {
      typename J::Scratch sc(jv);
      for (int64_t x = x0; x < x1; x++) {
        int64_t g = x % P.G, qb = (x / P.G) % nb, slot = x / (P.G * nb);
        jv.item(slot, u0 + slot, g, qb, sc);
      }
    };
    run_balanced(pool, cost.p, n, run, 1e7 / double(2 * (3 * P.D + 3 * P.Dv)));
  }
  return true;
}

}  // namespace SA_NS
}  // namespace selfattn
