// Attention statistics (selfattn.attention_stats) from a given lse, without the probabilities:
// column sums and maxima over rows, row entropies, each row's top-k keys.
//
// Work item: one query head of one batch row and one part of its keys (a run of tiles). The
// item walks every panel of MR rows over its part's tiles, computing each tile's scores as
// probs.h does (packed K, the QK micro-kernel, the plan's epilogue), then log p = s - lse and
// p = exp(log p), the tile's column sums over the panel's rows kept in registers. The columns of its part belong to the item alone (accumulated in scratch and
// written once: no two threads touch one column), while a row's entropy and top-k are partial
// per part, kept per (part, row) and combined in part order afterwards, so the result does not
// depend on which thread ran what. The top-k keeps keys by log p (a visible key whose p
// underflows still ranks above the hidden ones) and breaks ties by the lower index: inside a
// part keys arrive in index order and only a strictly larger one moves ahead, and parts merge
// in index order with the earlier part first on ties.
//
// The decode pass (decode.h) feeds the same row function from the scores it kept while it
// computed the output, normalised by the final lse (or by a given one: engine.h's stats entry
// runs a decode-sized call through it without values).
#pragma once
#include <cmath>
#include <cstring>
#include <limits>

#include "microkernel.h"
#include "pack.h"
#include "plan.h"

namespace selfattn {
namespace SA_NS {

static inline bool wants_stats(const Params& P) {
  return P.col_sum || P.col_max || P.entropy || P.topk > 0;
}

// Insert key j with log-probability x into a top-k list (highest first) when it beats the last.
template <class T>
static inline void topk_insert(T* lp, int64_t* ix, int64_t k, T x, int64_t j) {
  if (!(x > lp[k - 1])) return;
  int64_t pos = k - 1;
  while (pos > 0 && lp[pos - 1] < x) {  // equal ones stay ahead: they have lower indices
    lp[pos] = lp[pos - 1];
    ix[pos] = ix[pos - 1];
    pos--;
  }
  lp[pos] = x;
  ix[pos] = j;
}

// One row's statistics over n keys (n a multiple of W) starting at key j0: s holds the natural-
// log scores (-inf where hidden), lse the row's lse (finite). p = exp(s - lse) is added into
// cs[0:n] and maxed into cm[0:n] (either may be null); the row's -sum p log p over these keys is
// returned; keys enter the top-k list lp / ix (k entries; k == 0: none).
template <class V>
static inline typename V::T stats_row(const typename V::T* s, int64_t n, typename V::T lse,
                                      typename V::T* cs, typename V::T* cm, bool entropy,
                                      typename V::T* lp, int64_t* ix, int64_t k, int64_t j0) {
  using T = typename V::T;
  constexpr int W = V::W;
  const V l2e = V::set1(T(LOG2E)), vl = V::set1(lse);
  const V lowest = V::set1(std::numeric_limits<T>::lowest());
  V ent = V::zero();
  alignas(64) T tmp[W];
  for (int64_t c = 0; c < n; c += W) {
    const V x = V::load(s + c) - vl;  // log p, -inf where hidden
    const V p = V::exp2(x * l2e);
    if (cs) (V::load(cs + c) + p).store(cs + c);
    if (cm) max_nan_b(p, V::load(cm + c)).store(cm + c);
    if (entropy) ent = fmadd(p, max_nan_b(x, lowest), ent);  // hidden: 0 * lowest = 0
    if (k > 0 && max_nan_b(x, lowest).hmax() > lp[k - 1]) {
      x.store(tmp);
      for (int w = 0; w < W; w++) topk_insert(lp, ix, k, tmp[w], j0 + c + w);
    }
  }
  return entropy ? -ent.hsum() : T(0);
}

// One score tile of a panel: rows r < nreal (row stride 2W), keys j0 .. j0 + 2W - 1, s natural-
// log scores (-inf where hidden), lse per row (-inf: the row sees nothing and is skipped). The
// columns' sums and maxima over the rows are accumulated in registers and added into cs / cm
// once (either may be null); ent[r] accumulates row r's sum of p log p as a vector; keys enter
// row r's top-k list lp / ix + r * k in index order.
template <class V>
static inline void stats_tile(const typename V::T* st, int nreal, const typename V::T* lse,
                              typename V::T* cs, typename V::T* cm, V* ent, bool entropy,
                              typename V::T* lp, int64_t* ix, int64_t k, int64_t j0) {
  using T = typename V::T;
  constexpr int W = V::W;
  const V l2e = V::set1(T(LOG2E)), lowest = V::set1(std::numeric_limits<T>::lowest());
  alignas(64) T tmp[W];
  for (int v = 0; v < 2; v++) {
    V acc = V::zero(), mx = V::zero();
    for (int r = 0; r < nreal; r++) {
      if (lse[r] == T(-INFINITY)) continue;
      const V x = V::load(st + r * 2 * W + v * W) - V::set1(lse[r]);  // log p
      const V p = V::exp2(x * l2e);
      acc = acc + p;
      mx = max_nan_b(p, mx);
      if (entropy) ent[r] = fmadd(p, max_nan_b(x, lowest), ent[r]);  // hidden: 0 * lowest
      if (k > 0 && max_nan_b(x, lowest).hmax() > lp[r * k + k - 1]) {
        x.store(tmp);
        for (int w = 0; w < W; w++) topk_insert(lp + r * k, ix + r * k, k, tmp[w], j0 + v * W + w);
      }
    }
    if (cs) (V::load(cs + v * W) + acc).store(cs + v * W);
    if (cm) max_nan_b(mx, V::load(cm + v * W)).store(cm + v * W);
  }
}

// Merge top-k list b into a (both highest first, every key of a below every key of b): a keeps
// its entries on ties, so ties still go to the lower index.
template <class T>
static inline void topk_merge(T* alp, int64_t* aix, const T* blp, const int64_t* bix, int64_t k,
                              T* tlp, int64_t* tix) {
  int64_t x = 0, y = 0;
  for (int64_t o = 0; o < k; o++) {
    if (blp[y] > alp[x]) {
      tlp[o] = blp[y];
      tix[o] = bix[y++];
    } else {
      tlp[o] = alp[x];
      tix[o] = aix[x++];
    }
  }
  for (int64_t o = 0; o < k; o++) {
    alp[o] = tlp[o];
    aix[o] = tix[o];
  }
}

// dst[0:n] = src[0:n] as float32 (a copy when T is float).
template <class T>
static inline void store_floats(float* dst, const T* src, int64_t n) {
  if (sizeof(T) == sizeof(float)) {
    std::memcpy(dst, src, sizeof(float) * size_t(n));
  } else {
    for (int64_t c = 0; c < n; c++) dst[c] = float(src[c]);
  }
}

// Write a finished top-k list: p = exp(log p), index -1 and p 0 where fewer keys were visible.
template <class T>
static inline void topk_store(const T* lp, const int64_t* ix, int64_t k, float* p_out,
                              int64_t* ix_out) {
  for (int64_t o = 0; o < k; o++) {
    const bool none = lp[o] == T(-INFINITY);
    p_out[o] = none ? 0.0f : float(std::exp2(lp[o] * T(LOG2E)));
    ix_out[o] = none ? -1 : ix[o];
  }
}

template <class V>
struct Stats {
  using T = typename V::T;
  static constexpr int W = V::W, MR = V::MR, PW = 2 * W;

  const Plan<V>& pl;
  const Params& P;
  const Packed<V>& pk;
  int64_t nparts, part_tiles, K;
  T* ent_part;       // (nparts, B * Hq * Nq)
  T* top_lp;         // (nparts, B * Hq * Nq, K)
  int64_t* top_ix;   // likewise

  struct Scratch {
    Buf<T> q, s, cs, cm, lp;
    Buf<int64_t> ix;
    Scratch(const Stats& st)
        : q(MR * st.pl.Dp), s(MR * PW), cs(st.P.col_sum ? st.part_tiles * PW : 0),
          cm(st.P.col_max ? st.part_tiles * PW : 0), lp(MR * st.K), ix(MR * st.K) {}
  };

  void item(int64_t slot, int64_t u, int64_t g, int64_t part, Scratch& sc) const {
    const int64_t b = u / P.Hkv, kvh = u % P.Hkv, h = kvh * P.G + g, bh = b * P.Hq + h;
    const int64_t Dp = pl.Dp, ta = part * part_tiles, tb = imin(pl.ntiles, ta + part_tiles);
    const int64_t nkeys = (tb - ta) * PW, rows_all = P.B * P.Hq * P.Nq;
    T* cs = P.col_sum ? sc.cs.p : nullptr;
    T* cm = P.col_max ? sc.cm.p : nullptr;
    if (cs) zero_bytes(cs, sizeof(T) * nkeys);
    if (cm) zero_bytes(cm, sizeof(T) * nkeys);
    const T* kt = pk.kt + slot * pk.kt_n;
    const uint8_t* bad = pk.bad_of(slot);
    for (int64_t panel = 0; panel * MR < P.Nq; panel++) {
      const int64_t row0 = panel * MR;
      const auto pn = pl.panel(b, h, row0);
      T lse[MR];
      V ent[MR];
      bool any = false;
      for (int r = 0; r < MR; r++) {
        T* dst = sc.q.p + r * Dp;
        ent[r] = V::zero();
        for (int64_t o = 0; o < K; o++) {
          sc.lp[r * K + o] = T(-INFINITY);
          sc.ix[r * K + o] = -1;
        }
        if (r < pn.nreal) {
          load_q_row<V>(P.q, b, h, row0 + r, P.D, Dp, pl.qscale, dst);
          if (P.k.rotate) hadamard_row(dst, P.D);  // rotated keys: q . (H k) = (H q) . k
          const View& ls = P.lse_in;
          lse[r] = T(load_scalar(ls.p, ls.dt, b * ls.s[0] + h * ls.s[1] + (row0 + r) * ls.s[2]));
          any |= lse[r] != T(-INFINITY);
        } else {
          for (int64_t d = 0; d < Dp; d++) dst[d] = T(0);
          lse[r] = T(-INFINITY);
        }
      }
      int64_t t_lo, t_hi;
      pl.tile_range(pn, t_lo, t_hi);
      t_lo = imax(t_lo, ta);
      t_hi = imin(t_hi, tb);
      for (int64_t t = t_lo; any && t < t_hi; t++) {
        const uint8_t cls = pl.tile_class(pn, t);
        if (cls == EMPTY) continue;
        T* st = sc.s.p;
        mk<V, MR, 2, STORE>(P.D, sc.q.p, Dp, 1, kt + t * P.D * PW, PW, st, PW, nullptr);
        bool bad_tile = false;
        if (bad)
          for (int c = 0; c < PW; c++) bad_tile |= bad[t * PW + c] != 0;
        if (cls == PARTIAL || pl.softcap || pl.bias || pl.alibi || bad_tile)
          pl.epilogue(st, PW, pn, t, cls, bad_tile ? bad : nullptr, nullptr);
        const int64_t off = (t - ta) * PW;
        stats_tile<V>(st, int(pn.nreal), lse, cs ? cs + off : nullptr, cm ? cm + off : nullptr,
                      ent, P.entropy != nullptr, sc.lp.p, sc.ix.p, K, t * PW);
      }
      for (int r = 0; r < int(pn.nreal); r++) {
        const int64_t row = bh * P.Nq + row0 + r;
        if (P.entropy) ent_part[part * rows_all + row] = -ent[r].hsum();
        for (int64_t o = 0; o < K; o++) {
          top_lp[(part * rows_all + row) * K + o] = sc.lp[r * K + o];
          top_ix[(part * rows_all + row) * K + o] = sc.ix[r * K + o];
        }
      }
    }
    const int64_t j0 = ta * PW, jn = imin(P.Nk, tb * PW) - j0;
    if (cs) store_floats(P.col_sum + bh * P.Nk + j0, cs, jn);
    if (cm) store_floats(P.col_max + bh * P.Nk + j0, cm, jn);
  }

  // Rows [x0, x1) of B * Hq * Nq: the parts' entropies summed and top-k lists merged, in order.
  void combine(int64_t x0, int64_t x1) const {
    const int64_t rows_all = P.B * P.Hq * P.Nq;
    Buf<T> tlp(K);
    Buf<int64_t> tix(K);
    for (int64_t x = x0; x < x1; x++) {
      if (P.entropy) {
        T e = 0;
        for (int64_t part = 0; part < nparts; part++) e += ent_part[part * rows_all + x];
        P.entropy[x] = float(e);
      }
      if (K > 0) {
        T* alp = top_lp + x * K;
        int64_t* aix = top_ix + x * K;
        for (int64_t part = 1; part < nparts; part++)
          topk_merge(alp, aix, top_lp + (part * rows_all + x) * K,
                     top_ix + (part * rows_all + x) * K, K, tlp.p, tix.p);
        topk_store(alp, aix, K, P.topk_p + x * K, P.topk_index + x * K);
      }
    }
  }
};

template <class V>
static void statistics(const Params& P, const Pool& pool) {
  using T = typename V::T;
  using F = Stats<V>;
  Plan<V> pl(P, pool);
  const int64_t units = P.B * P.Hkv, heads = P.B * P.Hq, rows_all = heads * P.Nq;
  // parts of each head's keys from the shape alone (so the result is the same for any thread
  // count): about 32 items per call, at least 8 tiles per part so a part's scores still
  // amortise its row panels' loads
  const int64_t want = cdiv(32, heads);
  const int64_t nparts = imax(1, imin(want, pl.ntiles / 8));
  const int64_t part_tiles = cdiv(pl.ntiles, nparts);
  const int64_t K = P.topk;
  Buf<T> ent_part(P.entropy ? nparts * rows_all : 0), top_lp(nparts * rows_all * K);
  Buf<int64_t> top_ix(nparts * rows_all * K);
  const int64_t unit_bytes = pl.ntiles * F::PW * P.D * int64_t(sizeof(T)) + 1;
  const int64_t wave = imax(1, imin(units, (int64_t(8) << 20) / unit_bytes));
  Packed<V> pk;
  pk.alloc(pl, wave, true, false, false, false);
  F st{pl, P, pk, cdiv(pl.ntiles, part_tiles), part_tiles, K, ent_part.p, top_lp.p, top_ix.p};
  for (int64_t u0 = 0; u0 < units; u0 += wave) {
    const int64_t u1 = imin(units, u0 + wave);
    pk.pack_units(pl, pool, u0, u1);
    const int64_t n = (u1 - u0) * P.G * st.nparts;
    Buf<double> cost(n);
    for (int64_t x = 0; x < n; x++) cost[x] = double(P.Nq) * double(part_tiles * F::PW);
    auto run = [&](int64_t x0, int64_t x1) {
      typename F::Scratch sc(st);
      for (int64_t x = x0; x < x1; x++) {
        const int64_t part = x % st.nparts, g = (x / st.nparts) % P.G, slot = x / (st.nparts * P.G);
        st.item(slot, u0 + slot, g, part, sc);
      }
    };
    run_balanced(pool, cost.p, n, run, 1e7 / double(2 * P.D));
  }
  auto comb = [&](int64_t x0, int64_t x1) { st.combine(x0, x1); };
  parallel(pool, rows_all, comb, rows_all * st.nparts * (K + 1) < (int64_t(1) << 16));
}

}  // namespace SA_NS
}  // namespace selfattn
