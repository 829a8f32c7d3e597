// The per-call plan shared by forward, backward and decode: derived constants, the tile map of
// the visibility rules, and the score epilogue of one tile (score mods, padding garbage, masks).
//
// Keys are handled in tiles of PW = 2 vectors (32 keys for AVX-512), rows in panels of MR. For a
// panel and a tile the rules give one of three classes: EMPTY (never computed), FULL (every row
// sees every key: no mask at all) or PARTIAL (an edge: masks applied element-wise). Causal and
// window bounds are index arithmetic (key_bounds, the formulas of rules.bounds); bool
// masks and segment ids are summarised per (panel, tile) once per call.
#pragma once
#include <cmath>

#include "common.h"
#include "util.h"

namespace selfattn {
namespace SA_NS {

enum TileClass : uint8_t { EMPTY = 0, PARTIAL = 1, FULL = 2 };

static constexpr double LOG2E = 1.4426950408889634;
static constexpr double LN2 = 0.6931471805599453;

// Segment-id summary of a set of rows or keys: the range of real (>= 0) ids.
struct IdStats {
  int64_t lo, hi;
  bool any, all;
};

static inline uint8_t id_class(const IdStats& q, const IdStats& k) {
  if (!q.any || !k.any || k.hi < q.lo || k.lo > q.hi) return EMPTY;
  if (q.all && k.all && q.lo == q.hi && k.lo == k.hi && k.lo == q.lo) return FULL;
  return PARTIAL;
}

template <class V>
struct Plan {
  using T = typename V::T;
  static constexpr int W = V::W, MR = V::MR, PW = 2 * V::W;

  const Params& P;
  int64_t ntiles, Dp, Dvp;
  // Scores are natural-log units: the row maximum is subtracted before the change to base 2
  // (exp2((s - m) * log2 e)), so a score near FLT_MAX (a bias of 3e38) never overflows.
  T qscale, cap;  // q is scaled by qscale; softcap: s = cap * tanh(q.k) (or tanh(q.k / cap))
  bool softcap, cap_div, bias, alibi, mask, ids, dropout, index_rules;
  // pack flags (1: key row, 2: value row not finite) whose visible scores become NaN: the forward
  // sets 1 (a bad value row poisons only its non-finite columns, see forward.h), the backward 3
  uint8_t nan_keys = 3;
  uint32_t thr;
  T keep_scale;
  // segment ids of the keys per (b, tile)
  Buf<IdStats> kstats;
  // bool mask summary per (mask batch, mask head, row panel, tile)
  int64_t mB = 1, mH = 1, mP = 1, mT = 1;
  Buf<uint8_t> mmap;

  explicit Plan(const Params& p, const Pool& pool) : P(p) {
    ntiles = cdiv(p.Nk, PW);
    Dp = cdiv(p.D, W) * W;
    Dvp = cdiv(p.Dv, W) * W;
    softcap = p.softcap > 0;
    // A tiny softcap would make scale / softcap overflow when folded into q (inf * 0 = NaN in
    // the dot product): then q holds only the scale and the epilogue divides by the softcap.
    const double fold = softcap ? p.scale / p.softcap : p.scale;
    cap_div = softcap && fold > 0x1p64;
    qscale = T(cap_div ? p.scale : fold);
    cap = T(p.softcap);
    bias = p.bias.p != nullptr;
    alibi = p.alibi.p != nullptr;
    mask = p.mask.p != nullptr;
    ids = p.q_ids.p != nullptr;
    dropout = p.dropout_p > 0;
    thr = drop_threshold(p.dropout_p);
    keep_scale = dropout ? T(1.0 / (1.0 - p.dropout_p)) : T(1);
    index_rules = p.causal || p.left >= 0 || p.right >= 0;
    if (ids) build_kstats(pool);
    if (mask) build_mmap(pool);
  }

  // ---- segment ids ----
  int64_t kv_id(int64_t b, int64_t j) const {
    return static_cast<const int64_t*>(P.kv_ids.p)[b * P.kv_ids.s[0] + j * P.kv_ids.s[1]];
  }
  int64_t q_id(int64_t b, int64_t i) const {
    return static_cast<const int64_t*>(P.q_ids.p)[b * P.q_ids.s[0] + i * P.q_ids.s[1]];
  }
  void build_kstats(const Pool& pool) {
    kstats.alloc(P.B * ntiles);
    auto body = [&](int64_t b0, int64_t b1) {
      for (int64_t x = b0; x < b1; x++) {
        int64_t b = x / ntiles, t = x % ntiles;
        kstats[x] = ids_of_keys(b, t * PW, imin(P.Nk, t * PW + PW));
      }
    };
    parallel(pool, P.B * ntiles, body, P.B * P.Nk < (int64_t(1) << 16));
  }
  // The real (>= 0) ids of one batch row's ids [x0, x1) of a (B, N) id view.
  static IdStats id_stats(const View& ids, int64_t b, int64_t x0, int64_t x1) {
    const int64_t* p = static_cast<const int64_t*>(ids.p) + b * ids.s[0];
    IdStats s{INT64_MAX, INT64_MIN, false, true};
    for (int64_t x = x0; x < x1; x++) {
      int64_t id = p[x * ids.s[1]];
      if (id < 0) {
        s.all = false;
        continue;
      }
      s.any = true;
      s.lo = id < s.lo ? id : s.lo;
      s.hi = id > s.hi ? id : s.hi;
    }
    return s;
  }
  IdStats ids_of_keys(int64_t b, int64_t j0, int64_t j1) const {
    return id_stats(P.kv_ids, b, j0, j1);
  }
  IdStats ids_of_rows(int64_t b, int64_t i0, int64_t i1) const {
    return id_stats(P.q_ids, b, i0, i1);
  }

  // ---- bool mask ----
  const uint8_t* mask_row(int64_t b, int64_t h, int64_t i) const {
    return static_cast<const uint8_t*>(P.mask.p) + b * P.mask.s[0] + h * P.mask.s[1] +
           i * P.mask.s[2];
  }
  void build_mmap(const Pool& pool) {
    const View& m = P.mask;
    mB = m.s[0] ? P.B : 1;
    mH = m.s[1] ? P.Hq : 1;
    mP = m.s[2] ? cdiv(P.Nq, MR) : 1;
    mT = m.s[3] ? ntiles : 1;
    mmap.alloc(mB * mH * mP * mT);
    auto body = [&](int64_t x0, int64_t x1) {
      for (int64_t x = x0; x < x1; x++) {
        int64_t t = x % mT, pm = (x / mT) % mP, hm = (x / (mT * mP)) % mH, bm = x / (mT * mP * mH);
        // a broadcast dim (stride 0) is summarised from its one row / key
        int64_t r0 = pm * MR, r1 = m.s[2] == 0 ? 1 : imin(P.Nq, r0 + MR);
        int64_t j0 = t * PW, j1 = m.s[3] == 0 ? 1 : imin(P.Nk, j0 + PW);
        bool any = false, all = true;
        for (int64_t i = r0; i < r1; i++) {
          const uint8_t* row = mask_row(bm, hm, i);
          for (int64_t j = j0; j < j1; j++) {
            bool vis = row[j * m.s[3]] != 0;
            any |= vis;
            all &= vis;
          }
        }
        mmap[x] = any ? (all ? FULL : PARTIAL) : EMPTY;
      }
    };
    const int64_t bytes = mB * mH * (m.s[2] ? P.Nq : 1) * (m.s[3] ? P.Nk : 1);
    parallel(pool, mB * mH * mP * mT, body, bytes < (int64_t(1) << 18));
  }
  uint8_t mask_class(int64_t b, int64_t h, int64_t panel, int64_t t) const {
    int64_t bm = mB == 1 ? 0 : b, hm = mH == 1 ? 0 : h, pm = mP == 1 ? 0 : panel,
            tm = mT == 1 ? 0 : t;
    return mmap[((bm * mH + hm) * mP + pm) * mT + tm];
  }

  // ---- one panel of rows: bounds and the class of each tile ----
  struct Panel {
    int64_t b, h, row0, nreal, index;  // rows [row0, row0 + nreal), panel number row0 / MR
    Bounds kb;                         // index-rule bounds of its real rows
    IdStats q;
  };
  Panel panel(int64_t b, int64_t h, int64_t row0) const {
    Panel pn;
    pn.b = b;
    pn.h = h;
    pn.row0 = row0;
    pn.nreal = imin(MR, P.Nq - row0);
    pn.index = row0 / MR;
    pn.kb = key_bounds(P.start + row0, P.start + row0 + pn.nreal - 1, P.Nk, P.causal, P.left,
                       P.right);
    if (ids) pn.q = ids_of_rows(b, row0, row0 + pn.nreal);
    return pn;
  }
  // Tiles [t_lo, t_hi) that may hold a visible key for the panel (t_lo == t_hi: none).
  void tile_range(const Panel& pn, int64_t& t_lo, int64_t& t_hi) const {
    t_lo = pn.kb.lo / PW;
    t_hi = pn.kb.hi > pn.kb.lo ? cdiv(pn.kb.hi, PW) : t_lo;
  }
  uint8_t tile_class(const Panel& pn, int64_t t) const {
    int64_t j0 = t * PW, j1 = j0 + PW;
    if (j1 <= pn.kb.lo || j0 >= pn.kb.hi) return EMPTY;
    uint8_t c = (j0 >= pn.kb.full_lo && j1 <= pn.kb.full_hi) ? FULL : PARTIAL;
    if (ids) {
      uint8_t ci = id_class(pn.q, kstats[pn.b * ntiles + t]);
      c = ci < c ? ci : c;
    }
    if (mask) {
      uint8_t cm = mask_class(pn.b, pn.h, pn.index, t);
      c = cm < c ? cm : c;
    }
    return c;
  }

  // ---- the score epilogue of one tile ----
  // S: rows of the panel x PW keys of tile t (row stride ld), holding q.k (q scaled by qscale).
  // Leaves natural-log scores; invisible -inf. `bad`: the unit's non-finite-key flags (or null);
  // `th`: where to keep tanh for the softcap derivative (or null).
  void epilogue(T* S, int64_t ld, const Panel& pn, int64_t t, uint8_t cls, const uint8_t* bad,
                T* th) const {
    const int64_t j0 = t * PW;
    const int nreal = int(pn.nreal);
    if (softcap) {
      V c2 = V::set1(cap);
      for (int r = 0; r < nreal; r++)
        for (int v = 0; v < 2; v++) {
          V x = V::load(S + r * ld + v * W);
          x = V::tanh(cap_div ? x / c2 : x);
          if (th) x.store(th + r * ld + v * W);
          (x * c2).store(S + r * ld + v * W);
        }
    }
    if (bias) apply_bias(S, ld, pn, j0);
    if (alibi) {
      const View& a = P.alibi;
      T slope = T(load_scalar(a.p, a.dt, pn.b * a.s[0] + pn.h * a.s[1]));
      V ns = V::set1(-slope);
      for (int r = 0; r < nreal; r++) {
        int64_t pos = P.start + pn.row0 + r;
        for (int v = 0; v < 2; v++) {
          T* s = S + r * ld + v * W;
          fmadd(V::distance(pos, j0 + v * W), ns, V::load(s)).store(s);
        }
      }
    }
    if (bad) {  // a visible non-finite key gives NaN (masks below turn invisible ones to -inf)
      for (int c = 0; c < PW; c++)
        if (bad[j0 + c] & nan_keys)
          for (int r = 0; r < nreal; r++) S[r * ld + c] = T(NAN);
    }
    if (cls == PARTIAL) apply_masks(S, ld, pn, j0);
  }

  void apply_bias(T* S, int64_t ld, const Panel& pn, int64_t j0) const {
    const View& bv = P.bias;
    const int nreal = int(pn.nreal);
    const int64_t jn = imin(PW, P.Nk - j0);
    for (int r = 0; r < nreal; r++) {
      int64_t off = pn.b * bv.s[0] + pn.h * bv.s[1] + (pn.row0 + r) * bv.s[2] + j0 * bv.s[3];
      T* s = S + r * ld;
      if (bv.dt == DT::F32 && bv.s[3] == 1 && jn == PW && sizeof(T) == 4) {
        const float* bp = static_cast<const float*>(bv.p) + off;
        for (int v = 0; v < 2; v++)
          (V::load(reinterpret_cast<const T*>(bp) + v * W) + V::load(s + v * W)).store(s + v * W);
      } else {
        for (int64_t c = 0; c < jn; c++) s[c] += T(load_scalar(bv.p, bv.dt, off + c * bv.s[3]));
      }
    }
  }

  // Visible keys of one row by the index rules: [lo, hi) (absolute key indices).
  void row_range(int64_t row, int64_t& lo, int64_t& hi) const {
    int64_t pos = P.start + row;
    lo = 0;
    hi = P.Nk;
    if (P.causal) hi = imin(hi, pos + 1);
    if (P.right >= 0) hi = imin(hi, sat_add(sat_add(pos, P.right), 1));
    if (P.left >= 0) lo = imax(lo, sat_sub(pos, P.left));
  }

  void apply_masks(T* S, int64_t ld, const Panel& pn, int64_t j0) const {
    const int nreal = int(pn.nreal);
    const int64_t jn = imin(PW, P.Nk - j0);
    for (int r = 0; r < nreal; r++) {
      int64_t row = pn.row0 + r;
      T* s = S + r * ld;
      int64_t lo, hi;
      row_range(row, lo, hi);
      int a = int(imax(0, imin(PW, lo - j0))), e = int(imax(0, imin(PW, hi - j0)));
      if (a > 0 || e < PW)
        for (int v = 0; v < 2; v++) V::keep_range(V::load(s + v * W), v * W, a, e).store(s + v * W);
      if (ids) {
        int64_t qi = q_id(pn.b, row);
        for (int64_t c = 0; c < jn; c++) {
          int64_t kj = kv_id(pn.b, j0 + c);
          if (qi < 0 || kj != qi) s[c] = T(-INFINITY);
        }
      }
      if (mask) {
        const uint8_t* m = mask_row(pn.b, pn.h, row) + j0 * P.mask.s[3];
        if (P.mask.s[3] == 1 && jn == PW) {
          for (int v = 0; v < 2; v++) V::keep_bytes(V::load(s + v * W), m + v * W).store(s + v * W);
        } else {
          for (int64_t c = 0; c < jn; c++)
            if (!m[c * P.mask.s[3]]) s[c] = T(-INFINITY);
        }
      }
    }
  }

  // Dropout: global row id of row i of (b, h), as in _rng.keep_mask.
  uint32_t drop_row(int64_t b, int64_t h, int64_t i) const {
    const int64_t bh = (P.drop_b0 + b) * P.drop_hq + P.drop_h0 + h;
    const uint64_t row = uint64_t(bh * P.drop_nq + P.drop_r0 + i);
    return drop_row_hash(row, P.seed0);
  }
};

}  // namespace SA_NS
}  // namespace selfattn
