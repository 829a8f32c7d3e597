// The fused forward pass (FlashAttention-2 online softmax) for prefill-sized problems.
//
// Work item: one block of BM = NP * MR query rows of one query head. K and V of its (batch, kv
// head) are packed once (pack.h) and shared by every block and every head of the GQA group. The
// item walks the visible keys in chunks of KC = CT * PW; for each group of NG = 2 panels of MR
// rows it computes the panels' MR x KC score panels into buffers that stay in L1 (QK^T
// micro-kernel against q stored d-major, each K tile read by both panels while in L1; then the
// epilogue), the online-softmax update of all their rows (softmax_panel: row maxima, exp2, row
// sums, the rows' horizontal reductions done together), then O += P V for both panels as one
// product with O's rescaling folded into the PV micro-kernel's load of O. The micro-kernels
// prefetch the K panel / V rows a few rows ahead. Tiles the rules leave empty are never touched.
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

// lane-wise maxima of a row's n scores (n a multiple of W): four running maxima, as one chain
// would wait on max's latency at every vector (a third of softmax_row's time at KC = 256); NaN
// never enters them, so the order cannot matter
template <class V>
static inline V lane_max(const typename V::T* s, int64_t n) {
  using T = typename V::T;
  constexpr int W = V::W;
  V mx = V::set1(T(-INFINITY)), mx1 = mx, mx2 = mx, mx3 = mx;
  int64_t c4 = 0;
  for (; c4 + 4 * W <= n; c4 += 4 * W) {
    mx = max_nan_b(V::load(s + c4), mx);
    mx1 = max_nan_b(V::load(s + c4 + W), mx1);
    mx2 = max_nan_b(V::load(s + c4 + 2 * W), mx2);
    mx3 = max_nan_b(V::load(s + c4 + 3 * W), mx3);
  }
  for (; c4 < n; c4 += W) mx = max_nan_b(V::load(s + c4), mx);
  return max_nan_b(max_nan_b(mx, mx1), max_nan_b(mx2, mx3));
}

// s[0:n] (n a multiple of W) become exp(s - base) = exp2((s - base) * log2 e) in place; returns
// their lane-wise sums
template <class V>
static inline V exp_row(typename V::T* s, int64_t n, typename V::T base) {
  using T = typename V::T;
  constexpr int W = V::W;
  const V l2e = V::set1(T(LOG2E));
  const T shift = base * T(LOG2E);
  V sum = V::zero();
  // The one-FMA form puts the rounding of m * log2 e (half an ulp of shift) into every
  // exponent: harmless below 2^12 (<= 2^-12), but scores near 1e11 made it thousands, exp2 of
  // the row maximum overflowed and the row came out NaN. Larger rows subtract first.
  if (std::fabs(shift) < T(4096)) {  // one FMA: s * log2 e - m * log2 e, rounded once
    const V ns = V::set1(-shift);
    for (int64_t c = 0; c < n; c += W) {
      V p = V::exp2(fmadd(V::load(s + c), l2e, ns));
      p.store(s + c);
      sum = sum + p;
    }
  } else {  // large or non-finite m: subtract before scaling (exact for the scores near m)
    const V vb = V::set1(base);
    for (int64_t c = 0; c < n; c += W) {
      V p = V::exp2((V::load(s + c) - vb) * l2e);
      p.store(s + c);
      sum = sum + p;
    }
  }
  return sum;
}

// Online-softmax state update of one row of a score panel: natural-log scores s[0:n] (n a
// multiple of W) become probabilities exp(s - m_new) (exp_row); returns
// alpha = exp(m_old - m_new) for rescaling. NaN scores are skipped by the maximum and reach l
// and O through exp2.
template <class V>
static inline typename V::T softmax_row(typename V::T* s, int64_t n, typename V::T& m,
                                        typename V::T& l) {
  using T = typename V::T;
  T cm = lane_max<V>(s, n).hmax();
  T mo = m, mn = cm > mo ? cm : mo;
  T base = mn == T(-INFINITY) ? T(0) : mn;
  T alpha = mo == T(-INFINITY) ? T(0) : T(std::exp2((mo - base) * T(LOG2E)));
  l = l * alpha + exp_row<V>(s, n, base).hsum();
  m = mn;
  return alpha;
}

// out[r] = the sum of the W lanes of red[r * W, r * W + W) for the R rows (red holds
// ceil(R / W) * W rows, those from R on are zeroed here): W rows' vectors at a time transposed
// and added (V::reduce_lanes), instead of one horizontal reduction a row
template <class V, int R>
static inline void row_sums(typename V::T* red, typename V::T* out) {
  constexpr int W = V::W, G = (R + W - 1) / W;
  for (int r = R; r < G * W; r++) V::zero().store(red + r * W);
  for (int g = 0; g < G; g++) {
    V t[W];
    for (int i = 0; i < W; i++) t[i] = V::load(red + (g * W + i) * W);
    V::reduce_lanes(t).store(out + g * W);
  }
}

// softmax_row for the R rows of a score panel at once, with the same arithmetic row by row
// except where the lanes are combined: the rows' maxima and sums are reduced across lanes
// together (W row vectors transposed, then combined vertically) and the rescale factors
// alpha = exp(m_old - m_new) come from one vector exp2. Row by row, each row waited on two
// horizontal reductions and a scalar exp2 call (a libm call) before its next step.
template <class V, int R>
static inline void softmax_panel(typename V::T* S, int64_t lds, int64_t n, typename V::T* m,
                                 typename V::T* l, typename V::T* al) {
  using T = typename V::T;
  constexpr int W = V::W, G = (R + W - 1) / W;  // groups of W rows per transpose
  alignas(64) T red[G * W * W];                  // row r's partial vector at red + r * W
  alignas(64) T cm[G * W], arg[G * W], base[G * W], alpha[G * W];
  for (int r = 0; r < R; r++) lane_max<V>(S + r * lds, n).store(red + r * W);
  for (int r = R; r < G * W; r++) V::set1(T(-INFINITY)).store(red + r * W);
  for (int g = 0; g < G; g++) {  // lane i of cm's group g: the maximum of row g * W + i
    V t[W];
    for (int i = 0; i < W; i++) t[i] = V::load(red + (g * W + i) * W);
    V::transpose(t);
    V x = t[0];
    for (int i = 1; i < W; i++) x = max_nan_b(t[i], x);  // no NaN reaches these
    x.store(cm + g * W);
  }
  for (int r = 0; r < G * W; r++) {
    if (r >= R) {
      arg[r] = T(0);
      continue;
    }
    const T mo = m[r], mn = cm[r] > mo ? cm[r] : mo;
    base[r] = mn == T(-INFINITY) ? T(0) : mn;
    arg[r] = (mo - base[r]) * T(LOG2E);  // mo = -inf: -inf, and exp2 gives alpha = 0
    m[r] = mn;
  }
  for (int g = 0; g < G; g++) V::exp2(V::load(arg + g * W)).store(alpha + g * W);
  for (int r = 0; r < R; r++) exp_row<V>(S + r * lds, n, base[r]).store(red + r * W);
  row_sums<V, R>(red, cm);  // the rows' sums (cm is free again)
  for (int r = 0; r < R; r++) {
    l[r] = l[r] * alpha[r] + cm[r];
    al[r] = alpha[r];
  }
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

// Rows [0, R) of a row-major block (row stride lds), columns [0, D), d-major:
// dst[d * R + r] = src[r * lds + d]
template <class T, int R>
static inline void d_major(const T* src, int64_t lds, int64_t D, T* dst) {
  for (int64_t d = 0; d < D; d++)
    for (int r = 0; r < R; r++) dst[d * R + r] = src[r * lds + d];
}

// The panel groups of one chunk of tiles [c0, c1): for each run of NG consecutive panels (of
// npan), the classes of each panel's tiles (cls + g * CT, tile c0 first; EMPTY outside its
// range), then f(p0, ng, t_lo, t_hi): the NG panels together over the union of their visible
// tiles where each has one; else each panel with a visible tile alone (ng = 1) over its own,
// its classes copied to cls[0, CT) (none of a neighbour's tiles that it cannot see).
template <class V, int NG, int CT, class F>
static inline void chunk_groups(const Plan<V>& pl, const typename Plan<V>::Panel* pans,
                                int64_t npan, int64_t c0, int64_t c1, uint8_t* cls, F&& f) {
  for (int64_t p0 = 0; p0 < npan; p0 += NG) {
    int64_t lo = c1, hi = c0;
    int live[NG], nl = 0;
    for (int g = 0; g < NG && p0 + g < npan; g++) {
      const auto& pn = pans[p0 + g];
      uint8_t* cg = cls + g * CT;
      int64_t t_lo, t_hi;
      pl.tile_range(pn, t_lo, t_hi);
      t_lo = imax(t_lo, c0);
      t_hi = imin(t_hi, c1);
      for (int64_t t = c0; t < c1; t++)
        cg[t - c0] = t >= t_lo && t < t_hi ? pl.tile_class(pn, t) : uint8_t(EMPTY);
      while (t_lo < t_hi && cg[t_lo - c0] == EMPTY) t_lo++;
      while (t_hi > t_lo && cg[t_hi - 1 - c0] == EMPTY) t_hi--;
      if (t_lo >= t_hi) continue;
      live[nl++] = g;
      lo = imin(lo, t_lo);
      hi = imax(hi, t_hi);
    }
    if (nl == NG) {
      f(p0, NG, lo, hi);
      continue;
    }
    for (int x = 0; x < nl; x++) {
      const int g = live[x];
      if (g != 0)
        for (int64_t t = c0; t < c1; t++) cls[t - c0] = cls[g * CT + t - c0];
      int64_t t_lo = c0, t_hi = c1;
      while (cls[t_lo - c0] == EMPTY) t_lo++;
      while (cls[t_hi - 1 - c0] == EMPTY) t_hi--;
      f(p0 + g, 1, t_lo, t_hi);
    }
  }
}

template <class V>
struct Forward {
  using T = typename V::T;
  // 16 panels where the tile is 6 rows (AVX2): each item streams all of its unit's K and V
  // (from L3 once they outgrow L2), so 96 rows rather than 48 halve that traffic per product
  // (AVX2 N=4096: D=64 +3%, D=128 +10%, causal +5%)
  static constexpr int W = V::W, MR = V::MR, PW = 2 * W, NP = MR < 12 ? 16 : 8, BM = NP * MR;
  static constexpr int CT = 256 / PW, KC = CT * PW, LDS = KC + W;
  // panels per group (group_chunk): each K tile and each slice of V is read from L1 by both
  static constexpr int NG = 2;

  const Plan<V>& pl;
  const Params& P;
  const Packed<V>& pk;
  bool chunked = false;  // quantized K or V: packed a chunk at a time by each item (pack_chunk)

  struct Scratch {
    Buf<T> q, qt, o, m, l, al, s, vrow, ktc, vrc, rowk, kvrow;
    Buf<uint8_t> cls, badc;
    Buf<int64_t> vkeys;
    Buf<uint32_t> vseen;
    explicit Scratch(const Plan<V>& pl, bool chunked = false)
        : q(BM * pl.Dp), qt(BM * pl.Dp), o(BM * pl.Dvp), m(BM), l(BM), al(NG * MR),
          s(NG * MR * LDS), vrow(pl.Dvp),
          ktc(chunked ? CT * pl.P.D * PW : 0), vrc(chunked ? CT * PW * pl.Dvp : 0),
          rowk(chunked ? PW * pl.Dp : 0), kvrow(chunked ? 0 : pl.Dp + pl.Dvp), cls(NG * CT), badc(chunked ? CT * PW : 0),
          vkeys(NG * KC), vseen(NG * KC) {}
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
    // each panel's q also d-major ([d][MR]): the QK^T kernel then broadcasts its MR entries at
    // fixed offsets from one pointer, instead of from MR row pointers (12 of them spill GPRs)
    for (int64_t p = 0; p < npan; p++)
      d_major<T, MR>(sc.q.p + p * MR * Dp, Dp, D, sc.qt.p + p * Dp * MR);
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
        chunk_groups<V, NG, CT>(pl, pans, npan, c0, c1, sc.cls.p,
                                [&](int64_t p0, int ng, int64_t lo, int64_t hi) {
                                  group_chunk(pans, p0, ng, lo, hi, c0, kt, vr, bad, sc);
                                });
      }
    }
    finish(b, h, i0, rows, sc);
  }

  // Panels p0 .. p0 + ng - 1 (consecutive) against tiles [t_lo, t_hi) of the chunk from tile c0
  // (their classes in sc.cls, CT per panel; a tile EMPTY for one panel gives it -inf scores).
  // Each K tile is read once for the group's panels while it is in L1, and O += P V runs as one
  // product of ng * MR rows (a column slice of V stays in L1 across its row blocks).
  void group_chunk(const typename Plan<V>::Panel* pans, int64_t p0, int ng, int64_t t_lo,
                   int64_t t_hi, int64_t c0, const T* kt, const T* vr, const uint8_t* bad,
                   Scratch& sc) const {
    const int64_t D = P.D, Dp = pl.Dp, Dvp = pl.Dvp;
    for (int64_t t = t_lo; t < t_hi; t++) {
      const bool tbad = bad && has_bad(bad, t);
      for (int g = 0; g < ng; g++) {
        const auto& pn = pans[p0 + g];
        T* st = sc.s.p + g * MR * LDS + (t - t_lo) * PW;
        const uint8_t cls = sc.cls[g * CT + t - c0];
        if (cls == EMPTY) {
          for (int r = 0; r < MR; r++)
            for (int c = 0; c < PW; c++) st[r * LDS + c] = T(-INFINITY);
          continue;
        }
        const T* qp = sc.qt.p + (p0 + g) * MR * Dp;  // [d][MR]
        mk<V, MR, 2, STORE, 16>(D, qp, 1, MR, kt + t * D * PW, PW, st, LDS, nullptr);
        if (cls == PARTIAL || pl.softcap || pl.bias || pl.alibi || tbad)
          pl.epilogue(st, LDS, pn, t, cls, tbad ? bad : nullptr, nullptr);
      }
    }
    const int64_t n = (t_hi - t_lo) * PW;
    int nbad[NG] = {};  // keys of this chunk whose value row alone is not finite, per panel
    for (int g = 0; g < ng; g++) {
      const auto& pn = pans[p0 + g];
      T* S = sc.s.p + g * MR * LDS;
      if (bad && P.need_out)
        nbad[g] = find_bad_values<T>(bad, t_lo * PW, imin(P.Nk, t_hi * PW), S, LDS,
                                     int(pn.nreal), sc.vkeys.p + g * KC, sc.vseen.p + g * KC);
      softmax_panel<V, MR>(S, LDS, n, sc.m.p + (p0 + g) * MR, sc.l.p + (p0 + g) * MR,
                           sc.al.p + g * MR);
    }
    if (!P.need_out) return;
    if (pl.dropout) {
      const T inv = pl.keep_scale;
      for (int g = 0; g < ng; g++) {
        const auto& pn = pans[p0 + g];
        for (int r = 0; r < int(pn.nreal); r++) {
          uint32_t hr = pl.drop_row(pn.b, pn.h, pn.row0 + r);
          T* s = sc.s.p + (g * MR + r) * LDS;
          for (int64_t c = 0; c < n; c += W)
            V::dropout(V::load(s + c), hr, t_lo * PW + c, P.seed1, pl.thr, inv).store(s + c);
        }
      }
    }
    T* O = sc.o.p + p0 * MR * Dvp;
    gemm<V, SCALE, 8>(ng * MR, Dvp / W, n, sc.s.p, LDS, 1, vr + t_lo * PW * Dvp, Dvp, O, Dvp,
                      sc.al.p);
    for (int g = 0; g < ng; g++)
      if (nbad[g]) {
        const auto& pn = pans[p0 + g];
        add_bad_values<V>(P, pn.b, pn.h / P.G, sc.vkeys.p + g * KC, sc.vseen.p + g * KC, nbad[g],
                          sc.s.p + g * MR * LDS, LDS, t_lo * PW, int(pn.nreal),
                          O + g * MR * Dvp, Dvp, sc.vrow.p, Dvp);
      }
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

// The whole prefill forward: waves of (batch, kv head) units; each unit is packed by the first
// of its items to run (Packed::ensure), then computed.
template <class V>
static void forward_prefill(const Params& P, const Pool& pool) {
  using T = typename V::T;
  using F = Forward<V>;
  Plan<V> pl(P, pool);
  pl.nan_keys = 1;  // a bad value row poisons only its columns (add_bad_values)
  const int64_t units = P.B * P.Hkv;
  const int64_t unit_bytes =
      imax(1, pl.ntiles * F::PW * (P.D + (P.need_out ? pl.Dvp : 0)) * int64_t(sizeof(T)));
  // Waves bound the packed memory to the budget (a unit over it is a wave of its own) and are
  // of equal size: waves of 7 + 1 units (8 MiB and one byte per 8 units) cost N=2048 causal a
  // second join and a tail where one thread waits. A wave's packed K/V are read back from cache
  // (N=16384 windows: +20%), and packing on first use (no join between packing and compute)
  // leaves each unit in the cache of the core that packed it.
  const int64_t budget = int64_t(8) << 20;
  const bool chunked = quantized(P.k.dt) || quantized(P.v.dt);
  const int64_t nwaves = cdiv(units, imax(1, budget / unit_bytes));
  const int64_t wave = chunked ? units : cdiv(units, nwaves);
  const int64_t nthreads = pool.threads ? pool.threads() : 1;
  Packed<V> pk;
  if (!chunked) pk.alloc(pl, wave, true, false, false, P.need_out);
  F fw{pl, P, pk, chunked};
  const int64_t nb = fw.blocks();
  Buf<double> qcost(nb);
  for (int64_t qb = 0; qb < nb; qb++) qcost[qb] = fw.cost(qb);
  for (int64_t u0 = 0; u0 < units; u0 += wave) {
    const int64_t u1 = imin(units, u0 + wave);
    if (!chunked && u1 - u0 < nthreads) {
      // fewer units than threads (long sequences: waves of one 8 MB unit): every thread packs
      // a share first, where on first use the others would wait on one packer (N=16384
      // windows: 10% slower)
      pk.pack_units(pl, pool, u0, u1);
      pk.mark_ready(u1 - u0);
    } else if (!chunked) {
      pk.reset_lazy(u1 - u0);
    }
    // items in (unit, block, head-of-group) order: neighbours share K/V in cache
    const int64_t n = (u1 - u0) * nb * P.G;
    Buf<double> cost(n);
    for (int64_t x = 0; x < n; x++) cost[x] = qcost[(x / P.G) % nb];
    auto run = [&](int64_t x0, int64_t x1) {
      typename F::Scratch sc(pl, chunked);
      for (int64_t x = x0; x < x1; x++) {
        int64_t g = x % P.G, qb = (x / P.G) % nb, slot = x / (P.G * nb);
        if (!chunked) pk.ensure(pl, u0 + slot, slot, sc.kvrow.p, sc.kvrow.p + pl.Dp);
        fw.item(slot, u0 + slot, g, qb, sc);
      }
    };
    // cost counts (row, key) pairs; calls under ~1e7 flops (~50 us) stay in this thread
    run_balanced(pool, cost.p, n, run, 1e7 / double(2 * (P.D + P.Dv)));
  }
}

}  // namespace SA_NS
}  // namespace selfattn
