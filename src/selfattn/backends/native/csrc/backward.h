// The backward pass (FlashAttention-2, Algorithm 2), recomputing P = exp2(S - lse) from the lse.
//
// Work item: a run of key blocks (KB keys) of one (batch, kv head): it owns dK and dV of those
// keys for every head of the GQA group, so they are written once, never shared. dQ gets a
// contribution from every key block; each item adds its share into a private partial per
// segment of keys, and the partials are summed in segment order at the end, so no two threads
// write the same memory and the sums never depend on the schedule. Per (key block, head,
// q block of BMb rows):
//     S = Qs K^T (+ epilogue),  P = exp2((S - lse) * log2 e),  dP = dO V^T,
//     dS = P * (dP * keep - D),  dV += (P * keep)^T dO,  dK += dS^T Qs,  dQ += dS K
// (keep = dropout mask / (1 - p); softcap: dS *= 1 - tanh^2 before dK and dQ).
// A learnable bias with broadcast dims gathers dS from several heads or batch elements into one
// entry: items then span every unit (or key segment) that writes the same entries, in order.
#pragma once
#include <cmath>

#include "microkernel.h"
#include "pack.h"
#include "plan.h"

namespace selfattn {
namespace SA_NS {

// Rows whose positions may see a key of [j0, j1) under causal / window (index rules only): the
// inverse of key_bounds, used to visit only the q blocks a key block can reach.
static inline void rows_seeing(const Params& P, int64_t j0, int64_t j1, int64_t& i0, int64_t& i1) {
  int64_t pmin = INT64_MIN / 4, pmax = INT64_MAX / 4;
  if (P.causal) pmin = imax(pmin, j0);
  if (P.right >= 0) pmin = imax(pmin, sat_sub(j0, P.right));
  if (P.left >= 0) pmax = imin(pmax, sat_add(j1 - 1, P.left));
  i0 = imax(0, pmin - P.start);
  i1 = imin(P.Nq, pmax - P.start + 1);
  if (i1 < i0) i1 = i0;
}

template <class V>
struct Backward {
  using T = typename V::T;
  static constexpr int W = V::W, MR = V::MR, PW = 2 * W, KT = 4, KB = KT * PW;
  static constexpr int NPB = 8, BMB = NPB * MR, LDB = KB + W;

  const Plan<V>& pl;
  const Params& P;
  Packed<V>& pk;
  // per unit slot: scaled q rows, dO rows, the natural-log lse (+inf: row sees nothing; named
  // lse2 from when scores were base 2), D = dO.O - dlse
  T *qs, *dos, *lse2, *dd;
  int64_t nq_pad;  // rows per head, padded to BMB
  // dQ partials: [segment][slot][g][row][Dp]
  T* dqp;
  int64_t nseg;
  const int64_t* seg_bounds;  // key blocks [seg_bounds[s], seg_bounds[s + 1])
  T dk_scale;

  int64_t key_blocks() const { return pk.ntp / KT; }

  void rows_for_keys(int64_t j0, int64_t j1, int64_t& i0, int64_t& i1) const {
    rows_seeing(P, j0, j1, i0, i1);
  }

  struct Scratch {
    Buf<T> s, dp, th, dk, dv;
    Buf<uint8_t> cls;
    explicit Scratch(const Plan<V>& pl)
        : s(BMB * LDB), dp(BMB * LDB), th(pl.softcap ? BMB * LDB : 0), dk(KB * pl.Dp),
          dv(KB * pl.Dvp), cls(NPB * KT) {}
  };

  // One key block kb of unit slot `slot` (unit u), segment `seg`; dalibi partial row `ap`.
  void key_block(int64_t slot, int64_t u, int64_t seg, int64_t kb, T* ap, Scratch& sc) const {
    const int64_t b = u / P.Hkv, kvh = u % P.Hkv, D = P.D, Dv = P.Dv, Dp = pl.Dp, Dvp = pl.Dvp;
    const int64_t j0 = kb * KB, t0 = kb * KT;
    const T* kt = pk.kt + slot * pk.kt_n;
    const T* kr = pk.kr + slot * pk.kr_n;
    const T* vt = pk.vt + slot * pk.vt_n;
    const uint8_t* bad = pk.bad_of(slot);
    sc.dk.zero(KB * Dp);
    sc.dv.zero(KB * Dvp);
    int64_t ri0, ri1;
    rows_for_keys(j0, imin(P.Nk, j0 + KB), ri0, ri1);
    for (int64_t g = 0; g < P.G; g++) {
      const int64_t h = kvh * P.G + g, hs = slot * P.G + g;
      const T* qh = qs + hs * nq_pad * Dp;
      const T* doh = dos + hs * nq_pad * Dvp;
      const T* lh = lse2 + hs * nq_pad;
      const T* dh = dd + hs * nq_pad;
      T* dqh = dq_part(seg, slot, g);
      for (int64_t qi0 = ri0 / BMB * BMB; qi0 < ri1; qi0 += BMB) {
        // classify every (panel, tile) of the block; skip it if nothing is visible
        bool any = false;
        typename Plan<V>::Panel pans[NPB];
        int npan = 0;
        for (int p = 0; p < NPB; p++) {
          int64_t r0 = qi0 + p * MR;
          if (r0 >= P.Nq) {
            for (int t = 0; t < KT; t++) sc.cls[p * KT + t] = EMPTY;
            continue;
          }
          npan = p + 1;
          pans[p] = pl.panel(b, h, r0);
          for (int t = 0; t < KT; t++) {
            uint8_t c = t0 + t < pl.ntiles ? pl.tile_class(pans[p], t0 + t) : uint8_t(EMPTY);
            sc.cls[p * KT + t] = c;
            any |= c != EMPTY;
          }
        }
        if (!any) continue;
        block(b, h, qi0, npan, pans, qh, doh, lh, dh, kt, kr, vt, bad, t0, j0, dqh, ap, sc);
      }
    }
    // write dK, dV of the block's real keys
    T* dk = static_cast<T*>(P.dk);
    T* dv = static_cast<T*>(P.dv);
    for (int64_t c = 0; c < KB && j0 + c < P.Nk; c++) {
      T* dkr = dk + ((b * P.Hkv + kvh) * P.Nk + j0 + c) * D;
      T* dvr = dv + ((b * P.Hkv + kvh) * P.Nk + j0 + c) * Dv;
      for (int64_t d = 0; d < D; d++) dkr[d] = sc.dk[c * Dp + d] * dk_scale;
      for (int64_t d = 0; d < Dv; d++) dvr[d] = sc.dv[c * Dvp + d];
    }
  }

  int64_t units_in_wave = 0;
  T* dq_part(int64_t seg, int64_t slot, int64_t g) const {
    return dqp + ((seg * units_in_wave + slot) * P.G + g) * nq_pad * pl.Dp;
  }

  void block(int64_t b, int64_t h, int64_t qi0, int npan, const typename Plan<V>::Panel* pans,
             const T* qh, const T* doh, const T* lh, const T* dh, const T* kt, const T* kr,
             const T* vt, const uint8_t* bad, int64_t t0, int64_t j0, T* dqh, T* ap,
             Scratch& sc) const {
    const int64_t D = P.D, Dv = P.Dv, Dp = pl.Dp, Dvp = pl.Dvp;
    T* S = sc.s.p;
    T* dP = sc.dp.p;
    T* th = pl.softcap ? sc.th.p : nullptr;
    for (int p = 0; p < NPB; p++) {
      for (int t = 0; t < KT; t++) {
        uint8_t cls = sc.cls[p * KT + t];
        T* st = S + p * MR * LDB + t * PW;
        T* dpt = dP + p * MR * LDB + t * PW;
        if (cls == EMPTY) {
          for (int r = 0; r < MR; r++)
            for (int c = 0; c < PW; c++) {
              st[r * LDB + c] = T(-INFINITY);
              dpt[r * LDB + c] = T(0);
            }
          continue;
        }
        const int64_t r0 = qi0 + p * MR, tt = t0 + t;
        mk<V, MR, 2, STORE>(D, qh + r0 * Dp, Dp, 1, kt + tt * D * PW, PW, st, LDB, nullptr);
        bool tb = bad && tile_has_bad(bad, tt);
        if (cls == PARTIAL || pl.softcap || pl.bias || pl.alibi || tb)
          pl.epilogue(st, LDB, pans[p], tt, cls, tb ? bad : nullptr,
                      th ? th + p * MR * LDB + t * PW : nullptr);
        mk<V, MR, 2, STORE>(Dv, doh + r0 * Dvp, Dvp, 1, vt + tt * Dv * PW, PW, dpt, LDB, nullptr);
      }
    }
    // P, dS per row; S keeps P * keep (for dV), dP becomes dS (for dK, dQ)
    const T inv = pl.keep_scale;
    for (int r = 0; r < NPB * MR; r++) {
      const int64_t row = qi0 + r;
      T* s = S + r * LDB;
      T* dp = dP + r * LDB;
      if (r >= npan * MR || row >= P.Nq) {
        for (int c = 0; c < KB; c++) s[c] = dp[c] = T(0);
        continue;
      }
      V l2 = V::set1(lh[row]), dd_r = V::set1(dh[row]);
      uint32_t hr = pl.dropout ? pl.drop_row(b, h, row) : 0;
      for (int c = 0; c < KB; c += W) {
        V pv = V::exp2((V::load(s + c) - l2) * V::set1(T(LOG2E)));
        V dpv = V::load(dp + c);
        if (pl.dropout) {
          V keep = V::dropout(V::set1(T(1)), hr, j0 + c, P.seed1, pl.thr, inv);
          dpv = dpv * keep;
          (pv * keep).store(s + c);
        } else {
          pv.store(s + c);
        }
        (pv * (dpv - dd_r)).store(dp + c);
      }
    }
    if (pl.bias && P.dbias) accumulate_dbias(b, h, qi0, npan, j0, dP);
    if (ap) {  // dalibi[b, h] -= sum dS * |i' - j|
      T acc = 0;
      for (int r = 0; r < npan * MR && qi0 + r < P.Nq; r++) {
        V sum = V::zero();
        for (int c = 0; c < KB; c += W)
          sum = fmadd(V::load(dP + r * LDB + c), V::distance(P.start + qi0 + r, j0 + c), sum);
        acc += sum.hsum();
      }
      ap[b * P.Hq + h] -= acc;
    }
    if (th) {  // through the softcap: d tanh = 1 - tanh^2 (empty tiles hold dS = 0)
      for (int p = 0; p < npan; p++)
        for (int t = 0; t < KT; t++) {
          if (sc.cls[p * KT + t] == EMPTY) continue;
          for (int r = 0; r < int(pans[p].nreal); r++) {  // th holds real rows only
            T* ds = dP + (p * MR + r) * LDB + t * PW;
            const T* tr = th + (p * MR + r) * LDB + t * PW;
            for (int c = 0; c < PW; c += W) {
              V tv = V::load(tr + c);
              (V::load(ds + c) * (V::set1(T(1)) - tv * tv)).store(ds + c);
            }
          }
        }
    }
    const int64_t rows = NPB * MR;
    // dV += (P keep)^T dO ; dK += dS^T Qs ; dQ += dS K
    gemm<V, ADD>(KB, Dvp / W, rows, S, 1, LDB, doh + qi0 * Dvp, Dvp, sc.dv.p, Dvp, nullptr);
    gemm<V, ADD>(KB, Dp / W, rows, dP, 1, LDB, qh + qi0 * Dp, Dp, sc.dk.p, Dp, nullptr);
    gemm<V, ADD>(rows, Dp / W, KB, dP, LDB, 1, kr + j0 * Dp, Dp, dqh + qi0 * Dp, Dp, nullptr);
  }

  static bool tile_has_bad(const uint8_t* bad, int64_t t) {
    for (int c = 0; c < PW; c++)
      if (bad[t * PW + c]) return true;
    return false;
  }

  void accumulate_dbias(int64_t b, int64_t h, int64_t qi0, int npan, int64_t j0,
                        const T* dS) const {
    const int64_t* sh = P.bias_shape;
    T* db = static_cast<T*>(P.dbias);
    const int64_t bb = sh[0] == 1 ? 0 : b, hb = sh[1] == 1 ? 0 : h;
    const int64_t jn = imin(KB, P.Nk - j0);
    for (int r = 0; r < npan * MR && qi0 + r < P.Nq; r++) {
      const int64_t ib = sh[2] == 1 ? 0 : qi0 + r;
      T* dst = db + ((bb * sh[1] + hb) * sh[2] + ib) * sh[3];
      const T* ds = dS + r * LDB;
      if (sh[3] == 1) {
        T acc = 0;
        for (int64_t c = 0; c < jn; c++) acc += ds[c];
        dst[0] += acc;
      } else {
        for (int64_t c = 0; c < jn; c++) dst[j0 + c] += ds[c];
      }
    }
  }
};

// Pack q (scaled), dO, lse and D for the G heads of unit u into slot `slot`.
template <class V>
static void pack_rows(const Plan<V>& pl, Backward<V>& bw, int64_t u, int64_t slot, int64_t g,
                      int64_t r0, int64_t r1, typename V::T* orow) {  // orow: Dvp scratch
  using T = typename V::T;
  const Params& P = pl.P;
  const int64_t b = u / P.Hkv, h = (u % P.Hkv) * P.G + g, hs = slot * P.G + g;
  const int64_t Dp = pl.Dp, Dvp = pl.Dvp;
  for (int64_t i = r0; i < r1; i++) {
    T* qd = bw.qs + (hs * bw.nq_pad + i) * Dp;
    T* dd = bw.dos + (hs * bw.nq_pad + i) * Dvp;
    if (i >= P.Nq) {
      for (int64_t d = 0; d < Dp; d++) qd[d] = T(0);
      for (int64_t d = 0; d < Dvp; d++) dd[d] = T(0);
      bw.lse2[hs * bw.nq_pad + i] = T(INFINITY);
      bw.dd[hs * bw.nq_pad + i] = T(0);
      continue;
    }
    load_q_row<V>(P.q, b, h, i, P.D, Dp, pl.qscale, qd);
    load_row<V>(P.dout, b, h, i, P.Dv, Dvp, dd);
    load_row<V>(P.o, b, h, i, P.Dv, Dvp, orow);
    T delta = 0;
    for (int64_t d = 0; d < P.Dv; d++) delta += dd[d] * orow[d];
    const View& ls = P.lse_in;
    T l = T(load_scalar(ls.p, ls.dt, b * ls.s[0] + h * ls.s[1] + i * ls.s[2]));
    const View& dl = P.dlse;
    if (dl.p) delta -= T(load_scalar(dl.p, dl.dt, b * dl.s[0] + h * dl.s[1] + i * dl.s[2]));
    bw.lse2[hs * bw.nq_pad + i] = l == T(-INFINITY) ? T(INFINITY) : l;  // natural, as S
    bw.dd[hs * bw.nq_pad + i] = delta;
  }
}

template <class V>
static void backward_all(const Params& P, const Pool& pool) {
  using T = typename V::T;
  using BW = Backward<V>;
  Plan<V> pl(P, pool);
  const int64_t units = P.B * P.Hkv;
  const int64_t ntp = cdiv(pl.ntiles, BW::KT) * BW::KT, nkb = ntp / BW::KT;
  const int64_t nq_pad = cdiv(P.Nq, BW::BMB) * BW::BMB;
  const int64_t Dp = pl.Dp, Dvp = pl.Dvp;
  // Which units and key segments an item spans (see the header): a broadcast bias dim folds.
  const bool dbias = P.dbias != nullptr;
  const bool fold_b = dbias && P.bias_shape[0] == 1 && P.B > 1;
  const bool fold_h = dbias && P.bias_shape[1] == 1 && P.Hkv > 1;
  const bool fold_k = dbias && P.bias_shape[3] == 1;
  const int64_t ib = fold_b ? 1 : P.B, ih = fold_h ? 1 : P.Hkv;
  // segments of key blocks per unit: enough items to keep threads busy, a choice made from the
  // shape alone (never from the thread count), so results are the same everywhere
  int64_t nseg = fold_k ? 1 : imin(nkb, imax(1, cdiv(16, ib * ih)));
  Buf<double> kcost(nkb);
  Buf<int64_t> seg_bounds(nseg + 1);
  // key-block costs (the index rules only: shape-determined)
  for (int64_t kb = 0; kb < nkb; kb++) {
    int64_t i0, i1;
    rows_seeing(P, kb * BW::KB, imin(P.Nk, kb * BW::KB + BW::KB), i0, i1);
    kcost[kb] = double(i1 - i0 + BW::BMB);
  }
  split_by_cost(kcost.p, nkb, nseg, seg_bounds.p);

  // waves of units bound the packed memory; folded dims need every unit in one wave
  const int64_t unit_bytes =
      int64_t(sizeof(T)) * (ntp * BW::PW * (P.D + Dp + P.Dv) +
                            P.G * nq_pad * (Dp + Dvp + 2 + nseg * Dp));
  const int64_t budget = int64_t(16) << 20;  // as in forward: packed data used while cached
  // waves of equal size (as in forward: no short last wave whose join one thread waits at)
  const int64_t nwaves = cdiv(units, imax(1, budget / imax(1, unit_bytes)));
  const int64_t wave = (fold_b || fold_h) ? units : cdiv(units, nwaves);

  const int64_t nthreads = pool.threads ? pool.threads() : 1;
  Packed<V> pk;
  pk.alloc(pl, wave, true, true, true, false, ntp);
  Buf<T> qs(wave * P.G * nq_pad * Dp), dos(wave * P.G * nq_pad * Dvp), lse2(wave * P.G * nq_pad),
      dd(wave * P.G * nq_pad), dqp(nseg * wave * P.G * nq_pad * Dp);
  T* dq = static_cast<T*>(P.dq);
  const bool dalibi = P.dalibi != nullptr;
  T* dal = static_cast<T*>(P.dalibi);
  if (dalibi)
    for (int64_t x = 0; x < P.alibi_b * P.Hq; x++) dal[x] = T(0);
  if (dbias) {
    int64_t n = P.bias_shape[0] * P.bias_shape[1] * P.bias_shape[2] * P.bias_shape[3];
    T* db = static_cast<T*>(P.dbias);
    for (int64_t x = 0; x < n; x++) db[x] = T(0);
  }

  // items still to finish per unit of a wave: the last one sums the unit's dQ partials
  Buf<uint32_t> left(wave);
  for (int64_t u0 = 0; u0 < units; u0 += wave) {
    const int64_t u1 = imin(units, u0 + wave), nu = u1 - u0;
    // Each unit is packed (K, V and its q / dO rows) by the first item that needs it, in that
    // item's thread (Packed::ensure): no join between packing and compute; a wave of fewer
    // units than threads is packed by all of them first.
    BW bw{pl, P, pk, qs.p, dos.p, lse2.p, dd.p, nq_pad, dqp.p, nseg, seg_bounds.p,
          T(P.scale / double(pl.qscale))};
    bw.units_in_wave = nu;
    if (nu < nthreads) {  // as in forward: fewer units than threads, every thread packs a share
      pk.pack_units(pl, pool, u0, u1);
      const int64_t RC = 256, chunks = cdiv(nq_pad, RC), n = nu * P.G * chunks;
      auto body = [&](int64_t x0, int64_t x1) {  // q / dO rows over (unit, head, row chunk)
        Buf<T> orow(Dvp);
        for (int64_t x = x0; x < x1; x++) {
          int64_t c = x % chunks, g = (x / chunks) % P.G, slot = x / (chunks * P.G);
          pack_rows<V>(pl, bw, u0 + slot, slot, g, c * RC, imin(nq_pad, c * RC + RC), orow.p);
        }
      };
      parallel(pool, n, body, nu * P.G * nq_pad * (P.D + P.Dv) < (int64_t(1) << 17));
      pk.mark_ready(nu);
    } else {
      pk.reset_lazy(nu);
    }
    for (int64_t s = 0; s < nu; s++) left[s] = uint32_t(nseg);  // every unit is in nseg items
    // items: (b-range, kvh-range, segment); every unit of a folded dim inside one item
    const int64_t nb_i = fold_b ? 1 : P.B, nh_i = fold_h ? 1 : P.Hkv;
    // units of this wave only (waves happen only without folding)
    const int64_t n_items = (fold_b || fold_h) ? nb_i * nh_i * nseg : nu * nseg;
    Buf<double> cost(n_items);
    Buf<T> apart(dalibi ? n_items * P.B * P.Hq : 0);
    if (dalibi) apart.zero(n_items * P.B * P.Hq);
    for (int64_t x = 0; x < n_items; x++) {
      int64_t s = x % nseg;
      double c = 0;
      for (int64_t kb = seg_bounds[s]; kb < seg_bounds[s + 1]; kb++) c += kcost[kb];
      cost[x] = c;
    }
    // dq = scale * sum over segments (in order) of a unit's partials, by whichever thread
    // finished the unit's last item: the same sums wherever it runs
    const T dq_scale = T(P.scale);
    auto reduce_unit = [&](int64_t slot) {
      const int64_t u = u0 + slot, b = u / P.Hkv;
      for (int64_t g = 0; g < P.G; g++) {
        const int64_t h = (u % P.Hkv) * P.G + g;
        for (int64_t i = 0; i < P.Nq; i++) {
          T* dst = dq + ((b * P.Hq + h) * P.Nq + i) * P.D;
          for (int64_t d = 0; d < P.D; d++) {
            T acc = 0;
            for (int64_t s = 0; s < nseg; s++)
              acc += dqp[(((s * nu + slot) * P.G + g) * nq_pad + i) * Dp + d];
            dst[d] = acc * dq_scale;
          }
        }
      }
    };
    auto run = [&](int64_t x0, int64_t x1) {
      typename BW::Scratch sc(pl);
      Buf<T> krow(Dp), vrow(Dvp), orow(Dvp);
      for (int64_t x = x0; x < x1; x++) {
        const int64_t s = x % nseg, w = x / nseg;
        T* ap = dalibi ? apart.p + x * P.B * P.Hq : nullptr;
        // the units of this item, in a fixed order
        int64_t bl0, bl1, hl0, hl1;
        if (fold_b || fold_h) {
          int64_t bi = w / nh_i, hi = w % nh_i;
          bl0 = fold_b ? 0 : bi;
          bl1 = fold_b ? P.B : bi + 1;
          hl0 = fold_h ? 0 : hi;
          hl1 = fold_h ? P.Hkv : hi + 1;
        } else {
          int64_t u = u0 + w;
          bl0 = u / P.Hkv;
          bl1 = bl0 + 1;
          hl0 = u % P.Hkv;
          hl1 = hl0 + 1;
        }
        for (int64_t bi = bl0; bi < bl1; bi++)
          for (int64_t hi = hl0; hi < hl1; hi++) {
            const int64_t u = bi * P.Hkv + hi, slot = u - u0;
            pk.ensure(pl, u, slot, krow.p, vrow.p, [&] {
              for (int64_t g = 0; g < P.G; g++)
                pack_rows<V>(pl, bw, u, slot, g, 0, nq_pad, orow.p);
            });
            // this item's own dQ partials, zeroed here: in parallel and warm in this cache
            for (int64_t g = 0; g < P.G; g++)
              zero_bytes(bw.dq_part(s, slot, g), sizeof(T) * nq_pad * Dp);
            for (int64_t kb = seg_bounds[s]; kb < seg_bounds[s + 1]; kb++)
              bw.key_block(slot, u, s, kb, ap, sc);
          }
        for (int64_t bi = bl0; bi < bl1; bi++)
          for (int64_t hi = hl0; hi < hl1; hi++) {
            const int64_t slot = bi * P.Hkv + hi - u0;
            if (__atomic_sub_fetch(&left[slot], 1u, __ATOMIC_ACQ_REL) == 0) reduce_unit(slot);
          }
      }
    };
    // cost counts q rows per key block: calls under ~1e7 flops stay in this thread
    run_balanced(pool, cost.p, n_items, run, 1e7 / double(5 * BW::KB * (P.D + P.Dv) * P.G));
    if (dalibi)
      for (int64_t x = 0; x < n_items; x++)
        for (int64_t bb = 0; bb < P.B; bb++)
          for (int64_t h = 0; h < P.Hq; h++)
            dal[(P.alibi_b == 1 ? 0 : bb) * P.Hq + h] += apart[(x * P.B + bb) * P.Hq + h];
  }
}

}  // namespace SA_NS
}  // namespace selfattn
