// Exact probabilities P = exp(s - lse) for attention_weights, tile by tile from a given lse.
//
// Work item: one panel of MR query rows of one query head. K is packed once per (batch, kv head)
// as in the forward; each visible tile's scores come from the same micro-kernel and epilogue,
// so the probabilities are those the forward normalised. Tiles the rules leave empty are never
// computed (the output is zero-filled by the caller); rows whose lse is -inf stay 0.
#pragma once
#include <cmath>

#include "microkernel.h"
#include "pack.h"
#include "plan.h"

namespace selfattn {
namespace SA_NS {

template <class V>
struct Probs {
  using T = typename V::T;
  static constexpr int W = V::W, MR = V::MR, PW = 2 * W;

  const Plan<V>& pl;
  const Params& P;
  const Packed<V>& pk;

  struct Scratch {
    Buf<T> q, s;
    explicit Scratch(const Plan<V>& pl) : q(MR * pl.Dp), s(MR * PW) {}
  };

  void item(int64_t slot, int64_t u, int64_t g, int64_t panel, Scratch& sc) const {
    const int64_t b = u / P.Hkv, kvh = u % P.Hkv, h = kvh * P.G + g, row0 = panel * MR;
    const int64_t bh = b * P.Hq + h, Dp = pl.Dp;
    const auto pn = pl.panel(b, h, row0);
    T lse2[MR];
    bool any = false;
    for (int r = 0; r < MR; r++) {
      T* dst = sc.q.p + r * Dp;
      if (r < pn.nreal) {
        load_q_row<V>(P.q, b, h, row0 + r, P.D, Dp, pl.qscale, dst);
        if (P.k.rotate) hadamard_row(dst, P.D);  // rotated keys: q . (H k) = (H q) . k
        const View& ls = P.lse_in;
        T l = T(load_scalar(ls.p, ls.dt, b * ls.s[0] + h * ls.s[1] + (row0 + r) * ls.s[2]));
        lse2[r] = l;  // natural log, as the scores
        any |= l != T(-INFINITY);
      } else {
        for (int64_t d = 0; d < Dp; d++) dst[d] = T(0);
        lse2[r] = T(-INFINITY);
      }
    }
    if (!any) return;
    const T* kt = pk.kt + slot * pk.kt_n;
    const uint8_t* bad = pk.bad_of(slot);
    float* probs = static_cast<float*>(P.probs);
    int64_t t_lo, t_hi;
    pl.tile_range(pn, t_lo, t_hi);
    for (int64_t t = t_lo; t < t_hi; t++) {
      const uint8_t cls = pl.tile_class(pn, t);
      if (cls == EMPTY) continue;
      T* st = sc.s.p;
      mk<V, MR, 2, STORE>(P.D, sc.q.p, Dp, 1, kt + t * P.D * PW, PW, st, PW, nullptr);
      bool bad_tile = false;
      if (bad)
        for (int c = 0; c < PW; c++) bad_tile |= bad[t * PW + c] != 0;
      if (cls == PARTIAL || pl.softcap || pl.bias || pl.alibi || bad_tile)
        pl.epilogue(st, PW, pn, t, cls, bad_tile ? bad : nullptr, nullptr);
      const int64_t j0 = t * PW, jn = imin(PW, P.Nk - j0);
      for (int r = 0; r < int(pn.nreal); r++) {
        if (lse2[r] == T(-INFINITY)) continue;
        float* dst = probs + (bh * P.Nq + row0 + r) * P.Nk + j0;
        const T* s = st + r * PW;
        for (int64_t c = 0; c < jn; c++) dst[c] = float(std::exp2((s[c] - lse2[r]) * T(LOG2E)));
      }
    }
  }
};

template <class V>
static void probabilities(const Params& P, const Pool& pool) {
  using T = typename V::T;
  using F = Probs<V>;
  Plan<V> pl(P, pool);
  const int64_t units = P.B * P.Hkv, panels = cdiv(P.Nq, V::MR);
  const int64_t unit_bytes = pl.ntiles * F::PW * P.D * int64_t(sizeof(T)) + 1;
  const int64_t wave = imax(1, imin(units, (int64_t(8) << 20) / unit_bytes));
  Packed<V> pk;
  pk.alloc(pl, wave, true, false, false, false);
  F pr{pl, P, pk};
  for (int64_t u0 = 0; u0 < units; u0 += wave) {
    const int64_t u1 = imin(units, u0 + wave);
    pk.pack_units(pl, pool, u0, u1);
    const int64_t n = (u1 - u0) * panels * P.G;
    Buf<double> cost(n);
    for (int64_t x = 0; x < n; x++) cost[x] = double(P.Nk);
    auto run = [&](int64_t x0, int64_t x1) {
      typename F::Scratch sc(pl);
      for (int64_t x = x0; x < x1; x++) {
        int64_t g = x % P.G, panel = (x / P.G) % panels, slot = x / (P.G * panels);
        pr.item(slot, u0 + slot, g, panel, sc);
      }
    };
    run_balanced(pool, cost.p, n, run, 1e7 / double(2 * P.D));
  }
}

}  // namespace SA_NS
}  // namespace selfattn
