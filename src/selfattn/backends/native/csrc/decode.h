// Split-K decode: few query rows (G heads x Nq rows <= 16) over a long key/value cache.
//
// The G query heads of a kv head and their Nq rows are folded into the R = G * Nq rows of one
// tile, so each key and value row is read once per kv head. The keys are cut into fixed-size
// chunks (the size depends on the shape only) processed in parallel; each chunk leaves a partial
// (row maximum, row sum, unnormalised output) and the partials of a kv head are combined in
// chunk order. K and V are read in place when they are float32 with unit inner stride (no
// packing pass: decode is bound by memory bandwidth), else a chunk is converted into a scratch
// buffer. Scores are row-major dot products: per row, W keys' partial-sum vectors are reduced
// by one transpose-and-add tree into a vector of W scores. On AVX2 the common float case (up to
// 3 rows, keys and values read in place, no statistics or dropout) runs a chunk in blocks of 128
// keys, scores, softmax (online over the blocks) and P V each (Decode::fused), so the key and
// value rows of a block stream together instead of a chunk's keys and then its values.
//
// Non-finite keys: when every row sees every key of a chunk, NaN/inf propagate by themselves.
// A hidden one could leak (0 * inf): a chunk whose result is not finite is therefore recomputed
// with the chunk's keys copied and bad rows zeroed, exactly as the packed path does: a bad key
// row makes its visible scores NaN, a bad value row is added back to the rows that see it, in its
// non-finite columns only (forward.h, add_bad_values).
//
// Statistics in the same pass (a decode step of an eviction cache, attention_with_stats): with
// any of Params' statistics outputs set, each chunk also keeps its tile's scores per key (the
// scores are in cache then), and after the combine gives the final lse, each kv head's rows are
// reduced from them as stats.h does from a recomputed tile: p = exp(s - lse).
//
// Quantized K or V (a QuantizedKV, common.h's Q8 / Q4 views) are read in place, so a chunk
// streams only the code bytes and scales. Where quant.h's direct_codes holds (unit stride,
// groups of whole vectors; keys: R <= 4) the scores and the P V product read the codes straight
// into registers (qk_codes, pv_codes: each key's codes converted once for all R rows, a row's
// single scale applied to its scores or folded into its probabilities); otherwise each tile of
// PW keys is dequantized into an L1-resident tile (dequant_tile) before the float kernels.
#pragma once
#include <algorithm>
#include <cmath>

#include "amx.h"
#include "forward.h"
#include "microkernel.h"
#include "pack.h"
#include "plan.h"
#include "stats.h"
#ifndef SA_AHEAD
#define SA_AHEAD 2
#endif

namespace selfattn {
namespace SA_NS {

template <class V>
struct Decode {
  using T = typename V::T;
  static constexpr int W = V::W, MR = V::MR, PW = 2 * W;

  const Plan<V>& pl;
  const Params& P;
  int64_t R, CK, KS, LDD, nc;  // KS: keys a chunk may hold (CK, or Nk rounded up if fewer)
  bool direct_k, direct_v, tile_k, tile_v;  // tile_*: quantized, dequantized a tile at a time
  bool code_k, code_v;  // quantized and read from the codes in registers (quant.h), no tile
  bool pairs_k = false;  // 4-bit keys read two rows to a vector (quant.h, q4_pairs)
  bool quads_k = false;  // int8 keys read 64 codes per load (quant.h, q8_quads)
  bool amx_k = false;    // ... and scored on AMX tiles where this CPU has them (amx.h)
  int64_t ldqo = 0;      // the rows qk_codes reads (Scratch::qo) apart: Dp, or 128 (pairs_k)
  // partials per (unit, chunk): m[R], l[R], acc[R][Dvp]
  T *pm, *plsum, *pacc;
  // with statistics: every row's scores per key (units, R, LK), -inf where hidden; else null
  T* sk = nullptr;
  int64_t LK = 0;
  // a float window's decode (with_window): its chunks are combined after these
  const Decode* tail = nullptr;

  static bool applies(const Params& p) { return p.G * p.Nq <= 16 && p.Nq <= MR; }

  Decode(const Plan<V>& plan, const Params& p) : pl(plan), P(p) {
    R = p.G * p.Nq;
    const int64_t units = p.B * p.Hkv;
    // chunk size from the shape only: about 32 items per call, 256..1024 keys each
    CK = cdiv(cdiv(p.Nk * units, 32), PW) * PW;
    CK = imax(256, imin(1024, CK));
    // a short cache sizes the scratch by its keys: 64 KB buffers for 40 keys cost more in
    // malloc/free (heap consolidation) than the decode itself
    KS = imin(CK, cdiv(p.Nk, PW) * PW);
    LDD = KS + W;
    nc = cdiv(p.Nk, CK);
    direct_k = sizeof(T) == 4 && p.k.dt == DT::F32 && p.k.s[3] == 1 && p.D % W == 0;
    direct_v = sizeof(T) == 4 && p.v.dt == DT::F32 && p.v.s[3] == 1 && p.Dv % W == 0;
    tile_k = quantized(p.k.dt);
    tile_v = quantized(p.v.dt);
    code_k = tile_k && R <= 4 && direct_codes<V>(p.k, p.D);
    code_v = tile_v && direct_codes<V>(p.v, p.Dv);
    pairs_k = code_k && q4_pairs<V>(p.k, p.D);
    quads_k = code_k && q8_quads<V>(p.k, p.D);
    amx_k = quads_k && std::is_same<T, float>::value && amx_usable();
    ldqo = pairs_k ? 128 : plan.Dp;
  }

  struct Scratch {
    Buf<T> q, s, kc, vc, kp, vrow, kt, vt, qo;
    Buf<int8_t> amxb;  // amx_k: the chunk's q rows as AMX digits (amx.h), when amx_ok
    Buf<float> amxw;
    bool amx_ok = false;
    Buf<uint8_t> bad, cls;
    Buf<int64_t> vkeys;
    Buf<uint32_t> vseen;
    Scratch(const Decode& d)
        : q(d.R * d.pl.Dp), s(d.R * d.LDD), kc(d.KS * d.pl.Dp), vc(d.KS * d.pl.Dvp),
          kp(d.P.D * PW), vrow(d.pl.Dvp), kt(d.tile_k ? PW * d.pl.Dp : 0),
          vt(d.tile_v ? PW * d.pl.Dvp : 0), qo(d.code_k ? d.R * d.ldqo : 0),
          amxb(d.amx_k ? 16 * 64 : 0), amxw(d.amx_k ? 16 : 0), bad(d.KS),
          cls(d.P.G * (d.CK / PW)), vkeys(d.KS), vseen(d.KS) {}
  };

  // The rules on tile t's scores for every head of the group (st: the tile's first column of
  // S): a tile they hide becomes -inf, one they cut or shape (or with a non-finite key: bad,
  // else null) goes through the epilogue, a full plain one is left as it is.
  void tile_rules(const typename Plan<V>::Panel* pans, T* st0, int64_t t, int64_t t0,
                  const uint8_t* bad, Scratch& sc) const {
    const int64_t Nq = P.Nq;
    for (int64_t g = 0; g < P.G; g++) {
      const uint8_t cls = sc.cls[g * (CK / PW) + t - t0];
      T* st = st0 + g * Nq * LDD;
      if (cls == EMPTY) {
        for (int64_t i = 0; i < Nq; i++)
          for (int c = 0; c < PW; c++) st[i * LDD + c] = T(-INFINITY);
      } else if (cls == PARTIAL || pl.softcap || pl.bias || pl.alibi || bad) {
        pl.epilogue(st, LDD, pans[g], t, cls, bad, nullptr);
      }
    }
  }

  // Beyond a few rows the dot products would load every key row once per row: transposing the
  // tile (as packing does) and running the QK micro-kernel loads it once for all R rows.
  bool panel_scores() const { return R > 4; }

  // dot(q, k) over ND vectors (ND = 0: nd at run time) as one vector of partial sums, with two
  // accumulators so the FMA chain is half as long
  template <int ND>
  static inline V dot(const T* q, const T* k, int64_t nd) {
    const int64_t n = ND > 0 ? ND : nd;
    V a = V::load(q) * V::load(k);
    if (n == 1) return a;
    V b = V::load(q + W) * V::load(k + W);
    for (int64_t v = 2; v + 1 < n; v += 2) {
      a = fmadd(V::load(q + v * W), V::load(k + v * W), a);
      b = fmadd(V::load(q + (v + 1) * W), V::load(k + (v + 1) * W), b);
    }
    if (n % 2) a = fmadd(V::load(q + (n - 1) * W), V::load(k + (n - 1) * W), a);
    return a + b;
  }

  // dot(q, k) with q's ND vectors held in registers (qv), two accumulators
  template <int ND>
  static inline __attribute__((always_inline)) V dotq(const V* qv, const T* k) {
    V a = qv[0] * V::load(k);
    if constexpr (ND == 1) return a;
    V b = qv[1] * V::load(k + W);
    for (int v = 2; v + 1 < ND; v += 2) {
      a = fmadd(qv[v], V::load(k + v * W), a);
      b = fmadd(qv[v + 1], V::load(k + (v + 1) * W), b);
    }
    if constexpr (ND % 2 == 1) a = fmadd(qv[ND - 1], V::load(k + (ND - 1) * W), a);
    return a + b;
  }

  // S[r][0:PW] = q_r . k_j for r < nr, keys j < nvalid of the tile (0 past them). A row at a
  // time with its q vectors in registers (ND > 0: D known at compile time), so a key vector is
  // one load and one FMA; the tile (PW keys) stays in L1 for the next rows. Each W keys'
  // partial-sum vectors reduce in one transpose-and-add tree (inlined: flatten) into W scores.
  template <int ND>
  __attribute__((flatten)) static void dots_nd(const T* q, int64_t nr, int64_t ldq, int64_t nd,
                                               const T* k, int64_t ldk, int nvalid, T* S,
                                               int64_t lds) {
    if constexpr (ND > 0) {
      for (int64_t r = 0; r < nr; r++) {
        V qv[ND];
        for (int v = 0; v < ND; v++) qv[v] = V::load(q + r * ldq + v * W);
        for (int half = 0; half < PW / W; half++) {
          V p[W];
          const T* kh = k + half * W * ldk;
          if (nvalid >= (half + 1) * W) {
            for (int jj = 0; jj < W; jj++) p[jj] = dotq<ND>(qv, kh + jj * ldk);
          } else {
            for (int jj = 0; jj < W; jj++)
              p[jj] = half * W + jj < nvalid ? dotq<ND>(qv, kh + jj * ldk) : V::zero();
          }
          V::reduce_lanes(p).store(S + r * lds + half * W);
        }
      }
      return;
    }
    for (int64_t r = 0; r < nr; r++) {
      const T* qr = q + r * ldq;
      for (int half = 0; half < 2; half++) {
        V p[W];
        for (int jj = 0; jj < W; jj++) {
          const int key = half * W + jj;
          p[jj] = key < nvalid ? dot<ND>(qr, k + key * ldk, nd) : V::zero();
        }
        V::reduce_lanes(p).store(S + r * lds + half * W);
      }
    }
  }

  static void dots(const T* q, int64_t nr, int64_t ldq, int64_t nd, const T* k, int64_t ldk,
                   int nvalid, T* S, int64_t lds) {
    switch (nd) {
      case 1: return dots_nd<1>(q, nr, ldq, nd, k, ldk, nvalid, S, lds);
      case 2: return dots_nd<2>(q, nr, ldq, nd, k, ldk, nvalid, S, lds);
      case 4: return dots_nd<4>(q, nr, ldq, nd, k, ldk, nvalid, S, lds);
      case 8: return dots_nd<8>(q, nr, ldq, nd, k, ldk, nvalid, S, lds);
      default: return dots_nd<0>(q, nr, ldq, nd, k, ldk, nvalid, S, lds);
    }
  }

  void item(int64_t u, int64_t c, Scratch& sc) const {
    const int64_t b = u / P.Hkv, kvh = u % P.Hkv, Nq = P.Nq, Dp = pl.Dp, Dvp = pl.Dvp;
    const int64_t j0 = c * CK, j1 = imin(P.Nk, j0 + CK), t0 = j0 / PW, t1 = cdiv(j1, PW);
    T* m = pm + (u * nc + c) * R;
    T* l = plsum + (u * nc + c) * R;
    T* acc = pacc + (u * nc + c) * R * Dvp;
    for (int64_t g = 0; g < P.G; g++)
      for (int64_t i = 0; i < Nq; i++) {
        T* dst = sc.q.p + (g * Nq + i) * Dp;
        load_q_row<V>(P.q, b, kvh * P.G + g, i, P.D, Dp, pl.qscale, dst);
        if (P.k.rotate) hadamard_row(dst, P.D);  // rotated keys: q . (H k) = (H q) . k
        // the rows the code dot products read: Q4 codes come as even, odd channels per block
        T* qo = sc.qo.p + (g * Nq + i) * ldqo;
        if (pairs_k)
          q4_pairs_order(dst, qo);
        else if (quads_k)
          q8_quads_order(dst, qo, P.D);
        else if (code_k && P.k.dt == DT::Q4)
          q4_order<T, W>(dst, qo, P.D);
        else if (code_k)
          std::memcpy(qo, dst, sizeof(T) * Dp);
      }
    if constexpr (std::is_same<T, float>::value)
      if (amx_k) sc.amx_ok = amx_digits(sc.q.p, Dp, R, AmxRows{sc.amxb.p, sc.amxw.p});
    typename Plan<V>::Panel pans[16];
    int64_t tmin = t1, tmax = t0;
    for (int64_t g = 0; g < P.G; g++) {
      pans[g] = pl.panel(b, kvh * P.G + g, 0);
      int64_t lo, hi;
      pl.tile_range(pans[g], lo, hi);
      lo = imax(lo, t0);
      hi = imin(hi, t1);
      for (int64_t t = t0; t < t1; t++) {
        const bool in = t >= lo && t < hi;
        sc.cls[g * (CK / PW) + t - t0] = in ? pl.tile_class(pans[g], t) : uint8_t(EMPTY);
      }
      for (int64_t t = lo; t < hi; t++)
        if (sc.cls[g * (CK / PW) + t - t0] != EMPTY) {
          tmin = imin(tmin, t);
          tmax = imax(tmax, t + 1);
        }
    }
    for (int64_t r = 0; r < R; r++) {
      m[r] = T(-INFINITY);
      l[r] = T(0);
    }
    if (P.need_out) zero_bytes(acc, sizeof(T) * R * Dvp);
    if (sk) {  // keys of the chunk outside the tiles attempt() writes are hidden
      const int64_t a = tmin < tmax ? tmin * PW : t1 * PW, e = tmin < tmax ? tmax * PW : t1 * PW;
      for (int64_t r = 0; r < R; r++) {
        T* row = sk + (u * R + r) * LK;
        std::fill(row + t0 * PW, row + a, T(-INFINITY));
        std::fill(row + e, row + t1 * PW, T(-INFINITY));
      }
    }
    if (tmin >= tmax) return;
    if (!attempt(pans, b, kvh, tmin, tmax, t0, false, m, l, acc, sc))
      attempt(pans, b, kvh, tmin, tmax, t0, true, m, l, acc, sc);
  }

  // One pass over tiles [tmin, tmax); returns false if the result is not finite (retry careful).
  bool attempt(const typename Plan<V>::Panel* pans, int64_t b, int64_t kvh, int64_t tmin,
               int64_t tmax, int64_t t0, bool careful, T* m, T* l, T* acc, Scratch& sc) const {
    const int64_t Nq = P.Nq, Dp = pl.Dp, Dvp = pl.Dvp;
    const int64_t jb = tmin * PW, je = imin(P.Nk, tmax * PW), nkeys = je - jb;
    const T* kbase;
    int64_t ldk, nd;
    const uint8_t* bad = nullptr;
    bool any_bad = false;
    const bool qk = tile_k && !careful, qv = tile_v && !careful;
    if (qk) {  // each tile dequantized into sc.kt below: kbase is where its key jb would sit
      kbase = sc.kt.p;
      ldk = Dp;
      nd = Dp / W;
    } else if (direct_k && !careful) {
      kbase = static_cast<const T*>(P.k.p) + b * P.k.s[0] + kvh * P.k.s[1] + jb * P.k.s[2];
      ldk = P.k.s[2];
      nd = P.D / W;
    } else {  // convert the chunk's keys (and, careful, check them with their values)
      for (int64_t j = jb; j < je; j++) {
        const bool ok_k = load_row<V>(P.k, b, kvh, j, P.D, Dp, sc.kc.p + (j - jb) * Dp);
        if (careful) {
          const bool ok_v =
              !P.need_out || load_row<V>(P.v, b, kvh, j, P.Dv, Dvp, sc.vc.p + (j - jb) * Dvp);
          if (!ok_k) zero_bytes(sc.kc.p + (j - jb) * Dp, sizeof(T) * Dp);
          if (!ok_v) zero_bytes(sc.vc.p + (j - jb) * Dvp, sizeof(T) * Dvp);
          sc.bad[j - jb] = uint8_t((ok_k ? 0 : 1) | (ok_v ? 0 : 2));
          any_bad |= !(ok_k && ok_v);
        }
      }
      if (careful)
        for (int64_t j = je; j < tmax * PW; j++) sc.bad[j - jb] = 0;
      kbase = sc.kc.p;
      ldk = Dp;
      nd = Dp / W;
      if (careful) bad = sc.bad.p - jb;  // indexed by absolute key
    }
    const T* vbase = nullptr;
    int64_t ldv = Dvp;
    if (P.need_out) {
      if (careful) {
        vbase = sc.vc.p;
      } else if (qv) {
        vbase = nullptr;  // each tile dequantized into sc.vt after the softmax
      } else if (direct_v) {
        vbase = static_cast<const T*>(P.v.p) + b * P.v.s[0] + kvh * P.v.s[1] + jb * P.v.s[2];
        ldv = P.v.s[2];
      } else {
        for (int64_t j = jb; j < je; j++)
          load_row<V>(P.v, b, kvh, j, P.Dv, Dvp, sc.vc.p + (j - jb) * Dvp);
        vbase = sc.vc.p;
      }
    }
    if (fusable(careful)) {
      fused(pans, tmin, tmax, t0, kbase, ldk, nd, vbase, ldv, m, l, acc, sc);
      return finite(m, l, acc);
    }
    T* S = sc.s.p;
    // AMX (amx.h): the scores of the whole tiles before the loop, in one pipelined run
    const bool amx = qk && amx_k && sc.amx_ok;
    const int64_t amx_end_t = amx ? tmin + (je - jb) / PW : tmin;  // tiles before it: whole
    if constexpr (std::is_same<T, float>::value)
      if (amx && amx_end_t > tmin) {
        const View& k = P.k;
        const AmxRows rows{sc.amxb.p, sc.amxw.p};
        AmxSaved saved;
        amx_begin(rows, saved);
        qk_q8_amx(R, rows,
                  static_cast<const uint8_t*>(k.p) + b * k.s[0] + kvh * k.s[1] + jb * k.s[2],
                  k.s[2], k.scales + b * k.ss[0] + kvh * k.ss[1] + jb * k.ss[2], k.ss[2],
                  (amx_end_t - tmin) * PW, S, LDD, QK_AHEAD);
        amx_end(saved);
      }
    for (int64_t t = tmin; t < tmax; t++) {
      const int nvalid = int(imin(PW, P.Nk - t * PW));
      const int64_t col = (t - tmin) * PW;
      const bool tb = any_bad && tile_bad(bad, t);
      const bool panels = panel_scores() && P.D % W == 0;
      // the tile's keys: key j at kt + (j - jb) * ldk (a quantized tile: dequantized here)
      const T* kt = kbase;
      if (qk) {
        // codes stream from memory: ask for the keys two tiles ahead and this tile's values
        // (read after the chunk's softmax, from cache by then)
        // (read from the codes in registers, qk_codes / pv_codes ask for their rows themselves)
        constexpr int AHEAD = SA_AHEAD;
        if (!code_k && t + AHEAD < tmax) prefetch_codes(P.k, b, kvh, (t + AHEAD) * PW, P.Nk);
        if (!code_k && t == tmin)
          for (int a = 1; a < AHEAD && t + a < tmax; a++) prefetch_codes(P.k, b, kvh, (t + a) * PW, P.Nk);
        if (qv && !code_v && P.need_out) prefetch_codes(P.v, b, kvh, t * PW, P.Nk);
        if (!code_k) {
          dequant_tile<V>(P.k, b, kvh, t * PW, nvalid, P.D, Dp, sc.kt.p);
          kt = sc.kt.p - (t * PW - jb) * ldk;
        }
      }
      if (panels) {  // every row at once; rows of heads that see nothing are overwritten below
        if (!qk) prefetch_tile(t, tmax, jb, kbase, ldk, P.D, vbase, ldv, P.Dv);
        Packed<V>::panel_tile(kt - jb * ldk, ldk, t * PW, P.Nk, P.D, sc.kp.p);
        gemm<V, STORE>(R, 2, P.D, sc.q.p, Dp, 1, sc.kp.p, PW, S + col, LDD, nullptr);
      } else if (t < amx_end_t) {  // scored above
      } else if (qk && code_k) {  // every row at once, each key's codes converted once
        qk_codes<V>(R, sc.qo.p, ldqo, P.k, b, kvh, t * PW, nvalid, P.D, S + col, LDD);
      } else {  // float or a dequantized tile: every row at once, the tile in L1 after the first
        if (!qk) prefetch_tile(t, tmax, jb, kbase, ldk, P.D, vbase, ldv, P.Dv);
        dots(sc.q.p, R, Dp, nd, kt + (t * PW - jb) * ldk, ldk, nvalid, S + col, LDD);
      }
      tile_rules(pans, S + col, t, t0, tb ? bad : nullptr, sc);
    }
    const int64_t n = (tmax - tmin) * PW;
    if (sk)  // keep the scores before softmax_row turns them into exp(s - m)
      for (int64_t r = 0; r < R; r++)
        std::memcpy(sk + ((b * P.Hkv + kvh) * R + r) * LK + jb, S + r * LDD, sizeof(T) * n);
    const int nbad = any_bad && P.need_out
                         ? find_bad_values<T>(bad, jb, je, S, LDD, int(R), sc.vkeys.p, sc.vseen.p)
                         : 0;
    for (int64_t r = 0; r < R; r++) softmax_row<V>(S + r * LDD, n, m[r], l[r]);
    if (P.need_out) {
      if (pl.dropout)
        for (int64_t g = 0; g < P.G; g++)
          for (int64_t i = 0; i < Nq; i++) {
            uint32_t hr = pl.drop_row(b, kvh * P.G + g, i);
            T* s = S + (g * Nq + i) * LDD;
            for (int64_t c = 0; c < n; c += W)
              V::dropout(V::load(s + c), hr, jb + c, P.seed1, pl.thr, pl.keep_scale).store(s + c);
          }
      if (qv && code_v) {  // P V with the values converted in registers
        pv_codes<V>(R, S, LDD, P.v, b, kvh, jb, nkeys, P.Dv, acc, Dvp);
        if (P.v.dt == DT::Q4)
          for (int64_t r = 0; r < R; r++) q4_unorder<T, W>(acc + r * Dvp, P.Dv);
      } else if (qv) {  // P V a tile at a time, each tile of values dequantized from its codes
        for (int64_t t = tmin; t < tmax; t++) {
          const int64_t kk = imin(PW, je - t * PW);
          if (!qk && t + 1 < tmax) prefetch_codes(P.v, b, kvh, (t + 1) * PW, P.Nk);
          dequant_tile<V>(P.v, b, kvh, t * PW, kk, P.Dv, Dvp, sc.vt.p);
          const T* st = S + (t - tmin) * PW;
          if (t == tmin)
            gemm<V, STORE>(R, Dvp / W, kk, st, LDD, 1, sc.vt.p, Dvp, acc, Dvp, nullptr);
          else
            gemm<V, ADD>(R, Dvp / W, kk, st, LDD, 1, sc.vt.p, Dvp, acc, Dvp, nullptr);
        }
      } else {
        pv_float(S, nkeys, vbase, ldv, acc);
      }
      if (nbad)
        add_bad_values<V>(P, b, kvh, sc.vkeys.p, sc.vseen.p, nbad, S, LDD, jb, int(R), acc, Dvp,
                          sc.vrow.p, Dvp);
    }
    return careful || finite(m, l, acc);
  }

  // Whether a chunk's partial (m, l, acc) is finite; if not, m and l are reset for the careful
  // retry. x * 0 is 0 for finite x and NaN otherwise, so the sum is 0 exactly when all are finite
  // (in any order): vectors, since a scalar chain of R * Dvp dependent adds took about a third of
  // a short decode call (acc has R * Dvp elements, Dvp a multiple of W)
  bool finite(T* m, T* l, const T* acc) const {
    const int64_t Dvp = pl.Dvp;
    T chk = 0;
    for (int64_t r = 0; r < R; r++) chk += l[r] * T(0);
    if (P.need_out) {
      const V zero = V::zero();
      V c0 = zero, c1 = zero;
      int64_t x = 0;
      for (; x + 2 * W <= R * Dvp; x += 2 * W) {
        c0 = fmadd(V::load(acc + x), zero, c0);
        c1 = fmadd(V::load(acc + x + W), zero, c1);
      }
      for (; x < R * Dvp; x += W) c0 = fmadd(V::load(acc + x), zero, c0);
      chk += (c0 + c1).hsum();
    }
    if (chk == T(0)) return true;
    for (int64_t r = 0; r < R; r++) {
      m[r] = T(-INFINITY);
      l[r] = T(0);
    }
    return false;
  }

  // The float decode's common case on AVX2 (up to 3 rows, float keys and values read in place,
  // no statistics, dropout or retry): scores, softmax and P V a block of BT tiles at a time
  // instead of a whole chunk per phase, so a block's key rows and value rows are read close
  // together: a chunk's phases each streamed one tensor from memory (its keys, then its values)
  // and left the memory idle between them. The softmax runs online over the blocks (the chunk's
  // running m and l; acc rescaled by alpha when a block raises the maximum).
  bool fusable(bool careful) const {
    return W == 8 && R <= 3 && !careful && direct_k && direct_v && !tile_k && !tile_v &&
           P.need_out && !sk && !pl.dropout && pl.Dvp % (4 * W) == 0 && !panel_scores();
  }

  void fused(const typename Plan<V>::Panel* pans, int64_t tmin, int64_t tmax, int64_t t0,
             const T* kbase, int64_t ldk, int64_t nd, const T* vbase, int64_t ldv, T* m, T* l,
             T* acc, Scratch& sc) const {
    const int64_t Nq = P.Nq, jb = tmin * PW, je = imin(P.Nk, tmax * PW), nv = pl.Dvp / W;
    constexpr int64_t BT = 8;  // tiles per block: 128 keys, 32 KB of keys and of values at D 64
    T* S = sc.s.p;
    T alpha[3] = {1, 1, 1};
    for (int64_t tb = tmin; tb < tmax; tb += BT) {
      const int64_t te = imin(tmax, tb + BT), col0 = (tb - tmin) * PW;
      for (int64_t t = tb; t < te; t++) {
        const int nvalid = int(imin(PW, P.Nk - t * PW));
        const int64_t col = (t - tmin) * PW;
        prefetch_tile(t, tmax, jb, kbase, ldk, P.D, vbase, ldv, P.Dv);
        dots(sc.q.p, R, pl.Dp, nd, kbase + (t * PW - jb) * ldk, ldk, nvalid, S + col, LDD);
        tile_rules(pans, S + col, t, t0, nullptr, sc);
      }
      for (int64_t r = 0; r < R; r++)
        alpha[r] = softmax_row<V>(S + r * LDD + col0, (te - tb) * PW, m[r], l[r]);
      const int64_t k0 = tb * PW, kn = imin(je, te * PW) - k0;
      const T* vk = vbase + (k0 - jb) * ldv;
      const T* al = tb == tmin ? nullptr : alpha;
      for (int64_t c = 0; c < nv; c += 4) {
        const T* s = S + col0;
        T* o = acc + c * W;
        if (R == 3)
          pv_block<3>(kn, s, vk + c * W, ldv, o, pl.Dvp, al, c == 0);
        else if (R == 2)
          pv_block<2>(kn, s, vk + c * W, ldv, o, pl.Dvp, al, c == 0);
        else
          pv_block<1>(kn, s, vk + c * W, ldv, o, pl.Dvp, al, c == 0);
      }
    }
  }

  // C (NR rows x 4 vectors, rows ldc apart) = sum over keys [0, kn) of S[i][k] V[k] (S rows LDD
  // apart), plus alpha_i C when alpha is given: summed in registers in key order, then added (one
  // rounding, as gemm's SCALE). The first column pass asks for each value row's lines 8 keys
  // ahead, all four of them at D = 64, so the second pass finds the row in L1.
  template <int NR>
  void pv_block(int64_t kn, const T* s, const T* v, int64_t ldv, T* C, int64_t ldc,
                const T* alpha, bool first_pass) const {
    constexpr int PF = 8;
    const int64_t lines = first_pass ? cdiv((pl.Dvp) * int64_t(sizeof(T)), 64) : 0;
    V acc[NR][4];
    for (int i = 0; i < NR; i++)
      for (int c = 0; c < 4; c++) acc[i][c] = V::zero();
    for (int64_t k = 0; k < kn; k++) {
      V a[NR];
      for (int i = 0; i < NR; i++) a[i] = V::set1(s[i * LDD + k]);
      const T* pf = v + (k + PF) * ldv;
      for (int64_t x = 0; x < lines; x++) __builtin_prefetch(pf + x * (64 / sizeof(T)));
      for (int c = 0; c < 4; c++) {
        const V bv = V::load(v + k * ldv + c * W);
        for (int i = 0; i < NR; i++) acc[i][c] = fmadd(a[i], bv, acc[i][c]);
      }
    }
    for (int i = 0; i < NR; i++)
      for (int c = 0; c < 4; c++) {
        T* ci = C + i * ldc + c * W;
        (alpha ? fmadd(V::load(ci), V::set1(alpha[i]), acc[i][c]) : acc[i][c]).store(ci);
      }
  }

  // acc (R x Dvp) = S[:, 0:nkeys] V for float values. With 16 registers (AVX2) gemm's 6 x 2
  // tiles would make 4 passes over the keys with 6 accumulators each (the FMA latency, not the
  // throughput, bounds that): up to 3 rows take 3 x 4 tiles (2 passes, 12 accumulators), 128
  // keys at a time, so a block's value rows (32 KB at D = 64) stay in L1 for the second pass,
  // each row asked for 8 keys ahead (the register sums of gemm's blocked summation restart every
  // 128 keys anyway: the same result). AVX-512 (one pass at D = 64) was not faster that way.
  void pv_float(const T* S, int64_t nkeys, const T* v, int64_t ldv, T* acc) const {
    const int64_t nv = pl.Dvp / W, ld = pl.Dvp;
    if (W != 8 || R > 3 || nv % 4 != 0) {
      gemm<V, STORE>(R, nv, nkeys, S, LDD, 1, v, ldv, acc, ld, nullptr);
      return;
    }
    constexpr int64_t KB = 128;
    constexpr int PF = 8;
    for (int64_t k0 = 0; k0 < nkeys; k0 += KB) {
      const int64_t kn = imin(KB, nkeys - k0);
      const T *s = S + k0, *vk = v + k0 * ldv;
      for (int64_t c = 0; c < nv; c += 4)
        if (k0 == 0)
          gemm_cols<V, 4, STORE, PF>(R, kn, s, LDD, 1, vk + c * W, ldv, acc + c * W, ld, nullptr);
        else
          gemm_cols<V, 4, ADD, PF>(R, kn, s, LDD, 1, vk + c * W, ldv, acc + c * W, ld, nullptr);
    }
  }

  // Ask for the next tile's key rows and this tile's value rows while the scores are computed:
  // decode streams K and V once, chunk by chunk, and the hardware prefetcher restarts per chunk.
  static void prefetch_tile(int64_t t, int64_t tmax, int64_t jb, const T* k, int64_t ldk,
                            int64_t D, const T* v, int64_t ldv, int64_t Dv) {
    constexpr int LINE = 64 / sizeof(T);
    if (t + 1 < tmax)
      for (int c = 0; c < PW; c++) {
        const T* row = k + ((t + 1) * PW + c - jb) * ldk;
        for (int64_t d = 0; d < D; d += LINE) __builtin_prefetch(row + d, 0, 3);
      }
    if (v)
      for (int c = 0; c < PW; c++) {
        const T* row = v + (t * PW + c - jb) * ldv;
        for (int64_t d = 0; d < Dv; d += LINE) __builtin_prefetch(row + d, 0, 3);
      }
  }

  static bool tile_bad(const uint8_t* bad, int64_t t) {
    for (int c = 0; c < PW; c++)
      if (bad[t * PW + c]) return true;
    return false;
  }

  // The largest of unit u's chunk maxima of row r.
  T row_max(int64_t u, int64_t r) const {
    T M = T(-INFINITY);
    for (int64_t c = 0; c < nc; c++) {
      T mc = pm[(u * nc + c) * R + r];
      M = mc > M ? mc : M;
    }
    return M;
  }

  // Add unit u's chunks of row r into lsum and o, each weighted exp(m_c - base), in order.
  void add_chunks(int64_t u, int64_t r, T base, T& lsum, T* o) const {
    const int64_t Dvp = pl.Dvp;
    for (int64_t c = 0; c < nc; c++) {
      const T mc = pm[(u * nc + c) * R + r];
      const T w = mc == T(-INFINITY) ? T(0) : T(std::exp2((mc - base) * T(LOG2E)));
      lsum += plsum[(u * nc + c) * R + r] * w;
      if (P.need_out) {
        const T* a = pacc + ((u * nc + c) * R + r) * Dvp;
        for (int64_t d = 0; d < Dvp; d++) o[d] += a[d] * w;
      }
    }
  }

  // Combine the chunks of unit u in order (then the float window's, tail) and write out / lse.
  void combine(int64_t u) const {
    const int64_t b = u / P.Hkv, kvh = u % P.Hkv, Dvp = pl.Dvp;
    T* lse = static_cast<T*>(P.lse);
    Buf<T> o(Dvp);
    for (int64_t r = 0; r < R; r++) {
      const int64_t g = r / P.Nq, i = r % P.Nq, h = kvh * P.G + g;
      T M = row_max(u, r);
      if (tail) {
        const T mt = tail->row_max(u, r);
        M = mt > M ? mt : M;
      }
      const T base = M == T(-INFINITY) ? T(0) : M;
      T lsum = 0;
      for (int64_t d = 0; d < Dvp; d++) o[d] = T(0);
      add_chunks(u, r, base, lsum, o.p);
      if (P.need_out && P.v.rotate) hadamard_row(o.p, P.Dv);  // sum p (H v) = H (sum p v)
      if (tail) tail->add_chunks(u, r, base, lsum, o.p);  // float values: after the rotation
      const int64_t bh = b * P.Hq + h;
      const T keep = P.sinks ? add_sink(T(P.sinks[h]), M, lsum) : T(1);
      const bool empty = lsum == T(0);
      lse[bh * P.Nq + i] = empty ? T(-INFINITY) : T(M + std::log(lsum));
      if (P.need_out)
        store_out<T>(P.out, P.out_dt, (bh * P.Nq + i) * P.Dv, o.p, P.Dv,
                     empty ? T(0) : keep / lsum);
    }
  }

  // The statistics of unit u's rows from the kept scores and the final lse (after combine), or
  // the lse the caller gave (Params::lse_in, attention_stats on a decode-sized call): its query
  // heads' columns are its own, so units run in parallel without sharing a column.
  void stats(int64_t u, T* cs, T* cm, T* lp, int64_t* ix) const {
    const int64_t b = u / P.Hkv, kvh = u % P.Hkv, K = P.topk;
    const T* own = static_cast<const T*>(P.lse);
    const View& given = P.lse_in;
    for (int64_t g = 0; g < P.G; g++) {
      const int64_t bh = b * P.Hq + kvh * P.G + g;
      if (cs) zero_bytes(cs, sizeof(T) * LK);
      if (cm) zero_bytes(cm, sizeof(T) * LK);
      for (int64_t i = 0; i < P.Nq; i++) {
        const int64_t r = g * P.Nq + i, row = bh * P.Nq + i;
        for (int64_t o = 0; o < K; o++) {
          lp[o] = T(-INFINITY);
          ix[o] = -1;
        }
        const T l = given.p ? T(load_scalar(given.p, given.dt,
                                            b * given.s[0] + (bh - b * P.Hq) * given.s[1] +
                                                i * given.s[2]))
                            : own[row];
        T e = 0;
        if (l != T(-INFINITY))
          e = stats_row<V>(sk + (u * R + r) * LK, LK, l, cs, cm, P.entropy != nullptr, lp, ix, K,
                           0);
        if (P.entropy) P.entropy[row] = float(e);
        if (K > 0) topk_store(lp, ix, K, P.topk_p + row * K, P.topk_index + row * K);
      }
      if (cs) store_floats(P.col_sum + bh * P.Nk, cs, P.Nk);
      if (cm) store_floats(P.col_max + bh * P.Nk, cm, P.Nk);
    }
  }
};

// The keys before a float window (Params::kw, vw), at their own positions: the call itself
// without one.
static inline Params keys_before_window(const Params& P) {
  Params M = P;
  M.Nk = P.Nk - P.Nw;
  M.kw = M.vw = View{};
  M.Nw = 0;
  return M;
}

// A float window after the keys (a cache's newest tokens): a decode of its own over its Nw keys
// with the rows at the same positions (so causal and window sides hold as over the whole call),
// run before `combine`, which then adds its chunks after those of `main` (Decode::tail). The sink
// stays with `main`'s combine; statistics, masks, biases, ids and dropout never come with a
// window (the bindings refuse them).
template <class V, class F>
static void with_window(const Params& P, const Pool& pool, Decode<V>& main, F&& combine) {
  using T = typename V::T;
  Params W = P;
  W.k = P.kw;
  W.v = P.vw;
  W.kw = W.vw = View{};
  W.Nw = 0;
  W.Nk = P.Nw;
  W.start = P.start - (P.Nk - P.Nw);
  W.sinks = nullptr;
  Plan<V> pl(W, pool);
  pl.nan_keys = 1;
  Decode<V> dw(pl, W);
  const int64_t n = W.B * W.Hkv * dw.nc;
  Buf<T> pm(n * dw.R), pls(n * dw.R), pacc(W.need_out ? n * dw.R * pl.Dvp : 0);
  dw.pm = pm.p;
  dw.plsum = pls.p;
  dw.pacc = pacc.p;
  Buf<double> cost(n);
  for (int64_t x = 0; x < n; x++)
    cost[x] = double(imin(dw.CK, W.Nk - (x % dw.nc) * dw.CK) * (W.D + W.Dv) * 4);
  auto run = [&](int64_t x0, int64_t x1) {
    typename Decode<V>::Scratch sc(dw);
    for (int64_t x = x0; x < x1; x++) dw.item(x / dw.nc, x % dw.nc, sc);
  };
  run_balanced(pool, cost.p, n, run, 512.0 * 1024);
  main.tail = &dw;
  combine();
  main.tail = nullptr;
}

template <class V>
static void forward_decode(const Params& PC, const Pool& pool) {
  using T = typename V::T;
  using DC = Decode<V>;
  const Params P = keys_before_window(PC);  // with a float window: with_window reads it
  Plan<V> pl(P, pool);
  pl.nan_keys = 1;  // a bad value row poisons only its columns (add_bad_values)
  DC dc(pl, P);
  const int64_t units = P.B * P.Hkv, n = units * dc.nc;
  Buf<T> pm(n * dc.R), pls(n * dc.R), pacc(P.need_out ? n * dc.R * pl.Dvp : 0);
  dc.pm = pm.p;
  dc.plsum = pls.p;
  dc.pacc = pacc.p;
  const bool with_stats = wants_stats(P);
  dc.LK = pl.ntiles * DC::PW;
  Buf<T> sk(with_stats ? units * dc.R * dc.LK : 0);
  dc.sk = with_stats ? sk.p : nullptr;
  // cost: bytes of K and V an item reads; below ~512 KB in all a call runs in one thread
  Buf<double> cost(n);
  for (int64_t x = 0; x < n; x++)
    cost[x] = double(imin(dc.CK, P.Nk - (x % dc.nc) * dc.CK) * (P.D + P.Dv) * 4);
  auto run = [&](int64_t x0, int64_t x1) {
    typename DC::Scratch sc(dc);
    for (int64_t x = x0; x < x1; x++) dc.item(x / dc.nc, x % dc.nc, sc);
  };
  run_balanced(pool, cost.p, n, run, 512.0 * 1024);
  // the combine is O(chunks * R * Dv) per unit: in the calling thread unless it is large
  auto comb = [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; u++) dc.combine(u);
  };
  auto combine = [&] {
    if (n * dc.R * pl.Dvp < (int64_t(1) << 20))
      comb(0, units);
    else
      parallel(pool, units, comb);
  };
  if (PC.Nw > 0)
    with_window<V>(PC, pool, dc, combine);
  else
    combine();
  if (!with_stats) return;
  auto st = [&](int64_t u0, int64_t u1) {
    Buf<T> cs(P.col_sum ? dc.LK : 0), cm(P.col_max ? dc.LK : 0), lp(P.topk);
    Buf<int64_t> ix(P.topk);
    for (int64_t u = u0; u < u1; u++)
      dc.stats(u, P.col_sum ? cs.p : nullptr, P.col_max ? cm.p : nullptr, lp.p, ix.p);
  };
  parallel(pool, units, st, units * dc.R * dc.LK < (int64_t(1) << 15));
}

}  // namespace SA_NS
}  // namespace selfattn
