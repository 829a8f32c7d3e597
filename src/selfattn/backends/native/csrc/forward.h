// The fused forward pass (FlashAttention-2 online softmax) for prefill-sized problems.
//
// Work item: one block of BM = NP * MR query rows of one query head. K and V of its (batch, kv
// head) are packed once (pack.h) and shared by every block and every head of the GQA group. The
// item walks the visible keys in chunks of KC = CT * PW; for each panel of MR rows it computes
// the MR x KC score panel into a buffer that stays in L1 (QK^T micro-kernel, epilogue, row max,
// exp2, row sum, all on that buffer), then O += P V with O's rescaling folded into the PV
// micro-kernel's load of O. Tiles the rules leave empty are never touched.
//
// Quantized K or V (a QuantizedKV) are never packed whole: each item dequantizes the chunk of
// CT tiles it is about to read into the same packed layouts, in its own scratch (pack_chunk), so
// no dequantized copy of the cache exists at any time (the dequantizing is O(keys * D) against
// the chunk's O(BM * keys * D) products).
#pragma once
#include <cmath>

#include "microkernel.h"
#include "pack.h"
#include "plan.h"

namespace selfattn {
namespace SA_NS {

template <class T>
static inline void store_out(void* out, DT dt, int64_t off, const T* src, int64_t n, T scale) {
  switch (dt) {
    case DT::F32: {
      float* o = static_cast<float*>(out) + off;
      for (int64_t c = 0; c < n; c++) o[c] = float(src[c] * scale);
      break;
    }
    case DT::F64: {
      double* o = static_cast<double*>(out) + off;
      for (int64_t c = 0; c < n; c++) o[c] = double(src[c] * scale);
      break;
    }
    case DT::BF16: {
      uint16_t* o = static_cast<uint16_t*>(out) + off;
      for (int64_t c = 0; c < n; c++) o[c] = float_to_bf16(float(src[c] * scale));
      break;
    }
    case DT::F16: {
      uint16_t* o = static_cast<uint16_t*>(out) + off;
      for (int64_t c = 0; c < n; c++) o[c] = float_to_f16(float(src[c] * scale));
      break;
    }
    default:
      break;
  }
}

// Online-softmax state update of one row of a score panel: natural-log scores s[0:n] (n a
// multiple of W) become probabilities exp(s - m_new) = exp2((s - m_new) * log2 e); returns
// alpha = exp(m_old - m_new) for rescaling. NaN scores are skipped by the maximum and reach l
// and O through exp2.
template <class V>
static inline typename V::T softmax_row(typename V::T* s, int64_t n, typename V::T& m,
                                        typename V::T& l) {
  using T = typename V::T;
  constexpr int W = V::W;
  // four running maxima: one chain would wait on max's latency at every vector (a third of
  // this function's time at KC = 256); NaN never enters them, so the order cannot matter
  V mx = V::set1(T(-INFINITY)), mx1 = mx, mx2 = mx, mx3 = mx;
  int64_t c4 = 0;
  for (; c4 + 4 * W <= n; c4 += 4 * W) {
    mx = max_nan_b(V::load(s + c4), mx);
    mx1 = max_nan_b(V::load(s + c4 + W), mx1);
    mx2 = max_nan_b(V::load(s + c4 + 2 * W), mx2);
    mx3 = max_nan_b(V::load(s + c4 + 3 * W), mx3);
  }
  for (; c4 < n; c4 += W) mx = max_nan_b(V::load(s + c4), mx);
  mx = max_nan_b(max_nan_b(mx, mx1), max_nan_b(mx2, mx3));
  T cm = mx.hmax();
  T mo = m, mn = cm > mo ? cm : mo;
  T base = mn == T(-INFINITY) ? T(0) : mn;
  T alpha = mo == T(-INFINITY) ? T(0) : T(std::exp2((mo - base) * T(LOG2E)));
  const V l2e = V::set1(T(LOG2E));
  const T shift = base * T(LOG2E);
  V sum = V::zero();
  if (std::isfinite(shift)) {  // one FMA: s * log2 e - m * log2 e, rounded once
    const V ns = V::set1(-shift);
    for (int64_t c = 0; c < n; c += W) {
      V p = V::exp2(fmadd(V::load(s + c), l2e, ns));
      p.store(s + c);
      sum = sum + p;
    }
  } else {  // |m| near FLT_MAX: subtract before scaling, so nothing overflows
    const V vb = V::set1(base);
    for (int64_t c = 0; c < n; c += W) {
      V p = V::exp2((V::load(s + c) - vb) * l2e);
      p.store(s + c);
      sum = sum + p;
    }
  }
  l = l * alpha + sum.hsum();
  m = mn;
  return alpha;
}

// Keys whose value row alone is not finite (pack flag 2) are zeroed in the packed V, so that
// padding garbage never reaches a row that cannot see it (0 * NaN). For the rows that do see
// such a key, find_bad_values records them before the softmax (bit r of seen[x]: row r's score
// of key keys[x] is not -inf) and add_bad_values adds the whole p * v[j, :] back after
// O += P V: NaN in v[j, c] poisons column c of those rows only (docs/api.md).
template <class T>
static inline int find_bad_values(const uint8_t* bad, int64_t j0, int64_t j1, const T* S,
                                  int64_t lds, int rows, int64_t* keys, uint32_t* seen) {
  int n = 0;
  for (int64_t j = j0; j < j1; j++) {
    if (bad[j] != 2) continue;  // a bad key row (flag 1) already made the scores NaN
    uint32_t mask = 0;
    for (int r = 0; r < rows; r++) mask |= uint32_t(S[r * lds + (j - j0)] != T(-INFINITY)) << r;
    keys[n] = j;
    seen[n++] = mask;
  }
  return n;
}
template <class V>
static inline void add_bad_values(const Params& P, int64_t b, int64_t kvh, const int64_t* keys,
                                  const uint32_t* seen, int n, const typename V::T* S,
                                  int64_t lds, int64_t j0, int rows, typename V::T* O,
                                  int64_t ldo, typename V::T* vrow, int64_t Dvp) {
  using T = typename V::T;
  for (int x = 0; x < n; x++) {
    if (!seen[x]) continue;
    load_row<V>(P.v, b, kvh, keys[x], P.Dv, Dvp, vrow);
    for (int r = 0; r < rows; r++) {
      if (!((seen[x] >> r) & 1u)) continue;
      const T p = S[r * lds + (keys[x] - j0)];
      for (int64_t c = 0; c < P.Dv; c++) O[r * ldo + c] += p * vrow[c];
    }
  }
}

// The attention sink of a row (docs/api.md step 6): one more logit with no value joins the row's
// running maximum m and sum l (l = sum of exp(s - m), natural log units). Returns the factor
// exp(m_old - m_new) by which the row's unnormalised output must be scaled. A sink of -inf
// changes nothing; one far above the scores leaves l = 1 and the factor 0 (no overflow).
template <class T>
static inline T add_sink(T sink, T& m, T& l) {
  if (sink == T(-INFINITY)) return T(1);
  if (sink > m) {  // a row that saw no key too (m = -inf)
    const T a = m == T(-INFINITY) ? T(0) : T(std::exp2((m - sink) * T(LOG2E)));
    l = l * a + T(1);
    m = sink;
    return a;
  }
  l += T(std::exp2((sink - m) * T(LOG2E)));
  return T(1);
}

template <class V>
struct Forward {
  using T = typename V::T;
  static constexpr int W = V::W, MR = V::MR, PW = 2 * W, NP = 8, BM = NP * MR;
  static constexpr int CT = 256 / PW, KC = CT * PW, LDS = KC + W;

  const Plan<V>& pl;
  const Params& P;
  const Packed<V>& pk;
  bool chunked = false;  // quantized K or V: packed a chunk at a time by each item (pack_chunk)

  struct Scratch {
    Buf<T> q, o, m, l, al, s, vrow, ktc, vrc, rowk;
    Buf<uint8_t> cls, badc;
    Buf<int64_t> vkeys;
    Buf<uint32_t> vseen;
    explicit Scratch(const Plan<V>& pl, bool chunked = false)
        : q(BM * pl.Dp), o(BM * pl.Dvp), m(BM), l(BM), al(MR), s(MR * LDS), vrow(pl.Dvp),
          ktc(chunked ? CT * pl.P.D * PW : 0), vrc(chunked ? CT * PW * pl.Dvp : 0),
          rowk(chunked ? PW * pl.Dp : 0), cls(CT), badc(chunked ? CT * PW : 0), vkeys(KC),
          vseen(KC) {}
  };

  // Tiles [c0, c1) of unit (b, kvh) into the item's scratch, in the layouts of Packed: K as
  // [tile][d][PW] panels (sc.ktc), V as rows of Dvp (sc.vrc), quantized rows dequantized from
  // their codes, others converted; a non-finite row zeroed and flagged as Packed does (sc.badc,
  // key c0 * PW first). Returns whether any row was flagged.
  bool pack_chunk(int64_t b, int64_t kvh, int64_t c0, int64_t c1, Scratch& sc) const {
    const int64_t D = P.D, Dv = P.Dv, Dp = pl.Dp, Dvp = pl.Dvp;
    bool any = false;
    for (int64_t t = c0; t < c1; t++) {
      const int64_t j0 = t * PW, n = imin(PW, P.Nk - j0);
      uint8_t* flag = sc.badc.p + (t - c0) * PW;
      T* rows = sc.rowk.p;  // the tile's key rows, then transposed into its panel
      if (quantized(P.k.dt)) dequant_tile<V>(P.k, b, kvh, j0, n, D, Dp, rows);
      for (int64_t c = 0; c < PW; c++) {
        flag[c] = 0;
        T* row = rows + c * Dp;
        if (c < n && !quantized(P.k.dt)) load_row<V>(P.k, b, kvh, j0 + c, D, Dp, row);
        if (c >= n) {
          zero_bytes(row, sizeof(T) * Dp);
        } else if (!all_finite(row, D)) {
          zero_bytes(row, sizeof(T) * Dp);
          flag[c] = 1;
        }
      }
      T* kp = sc.ktc.p + (t - c0) * D * PW;
      if (D % W == 0) {
        Packed<V>::panel_tile(rows, Dp, 0, PW, D, kp);
      } else {
        for (int64_t c = 0; c < PW; c++)
          for (int64_t d = 0; d < D; d++) kp[d * PW + c] = rows[c * Dp + d];
      }
      if (P.need_out) {
        T* vp = sc.vrc.p + (t - c0) * PW * Dvp;
        if (quantized(P.v.dt)) dequant_tile<V>(P.v, b, kvh, j0, n, Dv, Dvp, vp);
        for (int64_t c = 0; c < PW; c++) {
          T* row = vp + c * Dvp;
          if (c < n && !quantized(P.v.dt)) load_row<V>(P.v, b, kvh, j0 + c, Dv, Dvp, row);
          if (c >= n) {
            zero_bytes(row, sizeof(T) * Dvp);
          } else if (!all_finite(row, Dv)) {
            zero_bytes(row, sizeof(T) * Dvp);
            flag[c] |= 2;
          }
        }
      }
      for (int64_t c = 0; c < PW; c++) any |= flag[c] != 0;
    }
    return any;
  }

  int64_t blocks() const { return cdiv(P.Nq, BM); }

  double cost(int64_t qb) const { return block_cost(P, qb, BM, MR); }

  void item(int64_t slot, int64_t u, int64_t g, int64_t qb, Scratch& sc) const {
    const int64_t b = u / P.Hkv, kvh = u % P.Hkv, h = kvh * P.G + g;
    const int64_t i0 = qb * BM, i1 = imin(P.Nq, i0 + BM), rows = i1 - i0;
    const int64_t npan = cdiv(rows, MR), Dp = pl.Dp, Dvp = pl.Dvp, D = P.D;
    const bool need_out = P.need_out;
    const T* kt = chunked ? nullptr : pk.kt + slot * pk.kt_n;
    const T* vr = chunked || !pk.vr ? nullptr : pk.vr + slot * pk.vr_n;
    const uint8_t* bad = chunked ? nullptr : pk.bad_of(slot);

    for (int64_t r = 0; r < npan * MR; r++) {
      T* dst = sc.q.p + r * Dp;
      if (i0 + r < P.Nq) {
        load_q_row<V>(P.q, b, h, i0 + r, D, Dp, pl.qscale, dst);
        if (P.k.rotate) hadamard_row(dst, D);  // rotated keys: q . (H k) = (H q) . k
      } else {
        for (int64_t d = 0; d < Dp; d++) dst[d] = T(0);
      }
      sc.m[r] = T(-INFINITY);
      sc.l[r] = T(0);
    }
    if (need_out) sc.o.zero(npan * MR * Dvp);

    Bounds bb = key_bounds(P.start + i0, P.start + i1 - 1, P.Nk, P.causal, P.left, P.right);
    if (bb.hi > bb.lo) {
      typename Plan<V>::Panel pans[NP];
      for (int64_t p = 0; p < npan; p++) pans[p] = pl.panel(b, h, i0 + p * MR);
      const int64_t tb0 = bb.lo / PW, tb1 = cdiv(bb.hi, PW);
      for (int64_t c0 = tb0; c0 < tb1; c0 += CT) {
        const int64_t c1 = imin(c0 + CT, tb1);
        if (chunked) {  // this chunk's tiles, indexed as in the whole unit's packing
          const bool any = pack_chunk(b, kvh, c0, c1, sc);
          kt = sc.ktc.p - c0 * D * PW;
          vr = P.need_out ? sc.vrc.p - c0 * PW * Dvp : nullptr;
          bad = any ? sc.badc.p - c0 * PW : nullptr;
        }
        for (int64_t p = 0; p < npan; p++) {
          const auto& pn = pans[p];
          int64_t t_lo, t_hi;
          pl.tile_range(pn, t_lo, t_hi);
          t_lo = imax(t_lo, c0);
          t_hi = imin(t_hi, c1);
          for (int64_t t = t_lo; t < t_hi; t++) sc.cls[t - c0] = pl.tile_class(pn, t);
          while (t_lo < t_hi && sc.cls[t_lo - c0] == EMPTY) t_lo++;
          while (t_hi > t_lo && sc.cls[t_hi - 1 - c0] == EMPTY) t_hi--;
          if (t_lo >= t_hi) continue;
          panel_chunk(pn, p, t_lo, t_hi, c0, kt, vr, bad, sc);
        }
      }
    }
    finish(b, h, i0, rows, sc);
  }

  void panel_chunk(const typename Plan<V>::Panel& pn, int64_t p, int64_t t_lo, int64_t t_hi,
                   int64_t c0, const T* kt, const T* vr, const uint8_t* bad, Scratch& sc) const {
    const int64_t D = P.D, Dp = pl.Dp, Dvp = pl.Dvp;
    const T* qp = sc.q.p + p * MR * Dp;
    T* S = sc.s.p;
    for (int64_t t = t_lo; t < t_hi; t++) {
      T* st = S + (t - t_lo) * PW;
      uint8_t cls = sc.cls[t - c0];
      if (cls == EMPTY) {
        for (int r = 0; r < MR; r++)
          for (int c = 0; c < PW; c++) st[r * LDS + c] = T(-INFINITY);
        continue;
      }
      mk<V, MR, 2, STORE>(D, qp, Dp, 1, kt + t * D * PW, PW, st, LDS, nullptr);
      if (cls == PARTIAL || pl.softcap || pl.bias || pl.alibi || (bad && has_bad(bad, t)))
        pl.epilogue(st, LDS, pn, t, cls, bad && has_bad(bad, t) ? bad : nullptr, nullptr);
    }
    const int64_t n = (t_hi - t_lo) * PW;
    T* m = sc.m.p + p * MR;
    T* l = sc.l.p + p * MR;
    int nbad = 0;  // keys of this chunk whose value row alone is not finite
    if (bad && P.need_out)
      nbad = find_bad_values<T>(bad, t_lo * PW, imin(P.Nk, t_hi * PW), S, LDS, int(pn.nreal),
                                sc.vkeys.p, sc.vseen.p);
    for (int r = 0; r < MR; r++) sc.al[r] = softmax_row<V>(S + r * LDS, n, m[r], l[r]);
    if (!P.need_out) return;
    if (pl.dropout) {
      const T inv = pl.keep_scale;
      for (int r = 0; r < int(pn.nreal); r++) {
        uint32_t hr = pl.drop_row(pn.b, pn.h, pn.row0 + r);
        T* s = S + r * LDS;
        for (int64_t c = 0; c < n; c += W)
          V::dropout(V::load(s + c), hr, t_lo * PW + c, P.seed1, pl.thr, inv).store(s + c);
      }
    }
    gemm<V, SCALE>(MR, Dvp / W, n, S, LDS, 1, vr + t_lo * PW * Dvp, Dvp, sc.o.p + p * MR * Dvp,
                   Dvp, sc.al.p);
    if (nbad)
      add_bad_values<V>(P, pn.b, pn.h / P.G, sc.vkeys.p, sc.vseen.p, nbad, S, LDS, t_lo * PW,
                        int(pn.nreal), sc.o.p + p * MR * Dvp, Dvp, sc.vrow.p, Dvp);
  }

  static bool has_bad(const uint8_t* bad, int64_t t) {
    for (int c = 0; c < PW; c++)
      if (bad[t * PW + c]) return true;
    return false;
  }

  // Normalise and write out / lse for the block's rows.
  void finish(int64_t b, int64_t h, int64_t i0, int64_t rows, Scratch& sc) const {
    T* lse = static_cast<T*>(P.lse);
    for (int64_t r = 0; r < rows; r++) {
      int64_t row = i0 + r, bh = b * P.Hq + h;
      T l = sc.l[r], m = sc.m[r];
      const T keep = P.sinks ? add_sink(T(P.sinks[h]), m, l) : T(1);
      bool empty = l == T(0);
      lse[bh * P.Nq + row] = empty ? T(-INFINITY) : T(m + std::log(l));
      if (P.need_out && P.v.rotate) hadamard_row(sc.o.p + r * pl.Dvp, P.Dv);  // H (sum p v)
      if (P.need_out)
        store_out<T>(P.out, P.out_dt, (bh * P.Nq + row) * P.Dv, sc.o.p + r * pl.Dvp, P.Dv,
                     empty ? T(0) : keep / l);
    }
  }
};

// The whole prefill forward: waves of (batch, kv head) units, each packed then computed.
template <class V>
static void forward_prefill(const Params& P, const Pool& pool) {
  using T = typename V::T;
  using F = Forward<V>;
  Plan<V> pl(P, pool);
  pl.nan_keys = 1;  // a bad value row poisons only its columns (add_bad_values)
  const int64_t units = P.B * P.Hkv;
  const int64_t unit_bytes =
      pl.ntiles * F::PW * (P.D + (P.need_out ? pl.Dvp : 0)) * int64_t(sizeof(T)) + 1;
  // Each wave packs its units and computes them right away: a wave whose packed K/V fit in a
  // quarter of the L3 is read back from cache, not from memory (N=16384 windows: +20%).
  const int64_t budget = int64_t(8) << 20;
  const bool chunked = quantized(P.k.dt) || quantized(P.v.dt);
  const int64_t wave = chunked ? units : imax(1, imin(units, budget / unit_bytes));
  Packed<V> pk;
  if (!chunked) pk.alloc(pl, wave, true, false, false, P.need_out);
  F fw{pl, P, pk, chunked};
  const int64_t nb = fw.blocks();
  Buf<double> qcost(nb);
  for (int64_t qb = 0; qb < nb; qb++) qcost[qb] = fw.cost(qb);
  for (int64_t u0 = 0; u0 < units; u0 += wave) {
    const int64_t u1 = imin(units, u0 + wave);
    if (!chunked) pk.pack_units(pl, pool, u0, u1);
    // items in (unit, block, head-of-group) order: neighbours share K/V in cache
    const int64_t n = (u1 - u0) * nb * P.G;
    Buf<double> cost(n);
    for (int64_t x = 0; x < n; x++) cost[x] = qcost[(x / P.G) % nb];
    auto run = [&](int64_t x0, int64_t x1) {
      typename F::Scratch sc(pl, chunked);
      for (int64_t x = x0; x < x1; x++) {
        int64_t g = x % P.G, qb = (x / P.G) % nb, slot = x / (P.G * nb);
        fw.item(slot, u0 + slot, g, qb, sc);
      }
    };
    // cost counts (row, key) pairs; calls under ~1e7 flops (~50 us) stay in this thread
    run_balanced(pool, cost.p, n, run, 1e7 / double(2 * (P.D + P.Dv)));
  }
}

}  // namespace SA_NS
}  // namespace selfattn
