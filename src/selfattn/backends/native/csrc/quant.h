// Quantized keys and values (selfattn.QuantizedKV) read in place: rows dequantized straight from
// the code bytes into the float rows or tiles the kernels already use, and the Walsh-Hadamard
// rotation the codes may carry undone on q (keys) and on the output (values).
//
// Layout (common.h, View): Q8 rows are int8 codes, Q4 rows two codes per byte stored as
// code + 8 (the even channel in the low nibble); element d is code(d) * scale(d / group), the
// scale a float32. Dequantizing is c * s in the accumulation type, one rounding, exactly what
// QuantizedKV.dequantize computes (so an engine reading the codes and one reading the
// dequantized tensor see the same numbers).
#pragma once
#include <cmath>
#include <type_traits>

#include "common.h"
#include "microkernel.h"
#include "util.h"

namespace selfattn {
namespace SA_NS {

// Row j of a quantized (B, H, N, X) view at (b, h) as T[0:X]. The inner loops run over one
// group of contiguous codes with one scale, which the compiler turns into vector conversions
// (int8 -> int32 -> float, times the broadcast scale).
template <class T>
static inline void dequant_row(const View& t, int64_t b, int64_t h, int64_t j, int64_t X, T* dst) {
  const int64_t off = b * t.s[0] + h * t.s[1] + j * t.s[2], st = t.s[3];
  const float* sc = t.scales + b * t.ss[0] + h * t.ss[1] + j * t.ss[2];
  const int64_t g = t.group, sg = t.ss[3];
  if (t.dt == DT::Q8) {
    const int8_t* c = static_cast<const int8_t*>(t.p) + off;
    for (int64_t d0 = 0; d0 < X; d0 += g) {
      const T s = T(sc[(d0 / g) * sg]);
      const int8_t* cg = c + d0 * st;
      T* o = dst + d0;
      if (st == 1)
        for (int64_t d = 0; d < g; d++) o[d] = T(cg[d]) * s;
      else
        for (int64_t d = 0; d < g; d++) o[d] = T(cg[d * st]) * s;
    }
  } else {  // Q4: byte d / 2 holds channels d (low nibble) and d + 1 (high), each as code + 8
    const uint8_t* c = static_cast<const uint8_t*>(t.p) + off;
    for (int64_t d0 = 0; d0 < X; d0 += g) {
      const T s = T(sc[(d0 / g) * sg]);
      T* o = dst + d0;
      if (st == 1 && g % 2 == 0) {
        const uint8_t* cg = c + d0 / 2;
        for (int64_t e = 0; e < g / 2; e++) {
          o[2 * e] = T(int(cg[e] & 15) - 8) * s;
          o[2 * e + 1] = T(int(cg[e] >> 4) - 8) * s;
        }
      } else {
        for (int64_t d = d0; d < d0 + g; d++) {
          const uint8_t byte = c[(d / 2) * st];
          o[d - d0] = T(int(d % 2 ? byte >> 4 : byte & 15) - 8) * s;
        }
      }
    }
  }
}

// Rows [j0, j0 + n) of a quantized view at (b, h) as rows of Xp (zero-padded past X) at dst:
// one tile of keys or values, dequantized where the kernels read it (it stays in L1). Whole
// vectors of contiguous codes with one scale each (group a multiple of W) convert W at a time.
template <class V>
static inline void dequant_tile(const View& t, int64_t b, int64_t h, int64_t j0, int64_t n,
                                int64_t X, int64_t Xp, typename V::T* dst) {
  using T = typename V::T;
  constexpr int W = V::W;
  const int64_t g = t.group;
  if (t.s[3] != 1 || g % W != 0 || (t.dt == DT::Q4 && W % 2 != 0)) {
    for (int64_t r = 0; r < n; r++) {
      T* o = dst + r * Xp;
      dequant_row<T>(t, b, h, j0 + r, X, o);
      for (int64_t d = X; d < Xp; d++) o[d] = T(0);
    }
    return;
  }
  const int64_t ng = X / g;
  const float* sc = t.scales + b * t.ss[0] + h * t.ss[1] + j0 * t.ss[2];
  const int64_t sr = t.ss[2], sg = t.ss[3];
  if (t.dt == DT::Q8) {
    const int8_t* c = static_cast<const int8_t*>(t.p) + b * t.s[0] + h * t.s[1] + j0 * t.s[2];
    for (int64_t r = 0; r < n; r++) {
      const int8_t* cr = c + r * t.s[2];
      T* o = dst + r * Xp;
      for (int64_t k = 0; k < ng; k++) {
        const V s = V::set1(T(sc[r * sr + k * sg]));
        for (int64_t d = k * g; d < (k + 1) * g; d += W) (V::load_i8(cr + d) * s).store(o + d);
      }
      for (int64_t d = X; d < Xp; d++) o[d] = T(0);
    }
  } else {
    const uint8_t* c = static_cast<const uint8_t*>(t.p) + b * t.s[0] + h * t.s[1] + j0 * t.s[2];
    for (int64_t r = 0; r < n; r++) {
      const uint8_t* cr = c + r * t.s[2];
      T* o = dst + r * Xp;
      for (int64_t k = 0; k < ng; k++) {
        const V s = V::set1(T(sc[r * sr + k * sg]));
        for (int64_t d = k * g; d < (k + 1) * g; d += W) (V::load_u4(cr + d / 2) * s).store(o + d);
      }
      for (int64_t d = X; d < Xp; d++) o[d] = T(0);
    }
  }
}

// Whether the decode kernels below can read rows of a quantized view straight from their codes:
// unit stride, and every vector inside one scale group (Q8: W codes; Q4: W bytes = 2W codes).
template <class V>
static inline bool direct_codes(const View& t, int64_t X) {
  constexpr int W = V::W;
  if (t.s[3] != 1 || X == 0) return false;
  if (t.dt == DT::Q8) return X % W == 0 && t.group % W == 0;
  return t.dt == DT::Q4 && X % (2 * W) == 0 && t.group % (2 * W) == 0;
}

// Q4 reads (V::u4_pair) give each block of 2W channels as its W even channels, then its W odd
// ones: q rows are put in that order before the key dot products (q4_order), and P V rows come
// out in it (q4_unorder puts them back).
template <class T, int W>
static inline void q4_order(const T* src, T* dst, int64_t X) {
  for (int64_t b0 = 0; b0 < X; b0 += 2 * W)
    for (int e = 0; e < W; e++) {
      dst[b0 + e] = src[b0 + 2 * e];
      dst[b0 + W + e] = src[b0 + 2 * e + 1];
    }
}
template <class T, int W>
static inline void q4_unorder(T* x, int64_t X) {
  T tmp[2 * W];
  for (int64_t b0 = 0; b0 < X; b0 += 2 * W) {
    for (int e = 0; e < W; e++) {
      tmp[2 * e] = x[b0 + e];
      tmp[2 * e + 1] = x[b0 + W + e];
    }
    for (int e = 0; e < 2 * W; e++) x[b0 + e] = tmp[e];
  }
}

// Vectors c0 .. c0 + n - 1 of one code row as floats (n even for Q4, c0 too), each times its
// group's scale when SCALE (else the bare codes: the caller applies the scale once per key).
template <class V, bool Q4, bool SCALE>
static inline void code_vectors(const uint8_t* row, const float* sc, int64_t sg, int64_t g,
                                int64_t c0, int n, V* x) {
  using T = typename V::T;
  constexpr int W = V::W;
  if (Q4) {
    for (int c = 0; c < n; c += 2) {
      const T s = SCALE ? T(sc[(((c0 + c) * W) / g) * sg]) : T(1);
      V::u4_pair(row + (c0 + c) * (W / 2), s, x[c], x[c + 1]);
    }
  } else {
    for (int c = 0; c < n; c++) {
      const V v = V::load_i8(reinterpret_cast<const int8_t*>(row) + (c0 + c) * W);
      x[c] = SCALE ? v * V::set1(T(sc[(((c0 + c) * W) / g) * sg])) : v;
    }
  }
}

// Software prefetch of the code rows the decode kernels read straight from their codes, a fixed
// number of rows ahead, one row per row read (and a scales line per 16 rows), into L2
// (prefetcht2): a core has few L1 fill buffers, and a stream of short rows with ~10 ns of work
// each outruns the hardware prefetchers (which stop at every 4 KB page), so without these the
// codes of a cache larger than L2 arrive at about the memory latency. A row's scales are asked
// for where they start a new 16-float line ((j * ss) % 16 < ss). Rows past the chunk are
// the next chunk's (keys and values are contiguous per kv head); past the tensor, a prefetch
// does not fault. Distances measured on AVX-512 (Nk 8k / 32k, D 64): keys 64 rows, values 32.
constexpr int64_t QK_AHEAD = 64, PV_AHEAD = 32;
// whether offset x (floats, >= 0) of a scales row starts a new 16-float line for a stride ss:
// x % 16 < ss, in unsigned arithmetic (a signed % costs the per-row loop five more uops)
static inline bool line_start(int64_t x, int64_t ss) { return (uint64_t(x) & 15u) < uint64_t(ss); }
static inline void prefetch_row(const uint8_t* row, int64_t bytes, const float* sc, bool scales) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(row + o, 0, 1);
  if (scales) __builtin_prefetch(sc, 0, 1);
}

// Whether V reduces partial-sum vectors a pair at a time (reduce_pair / reduce_pairs).
template <class V, class = void>
struct PairReduce : std::false_type {};
template <class V>
struct PairReduce<V, std::void_t<decltype(V::reduce_pair(V(), V()))>> : std::true_type {};

// The dot products of RB rows with one key's codes (NV vectors; 0: nv at run time) as RB
// partial-sum vectors.
template <class V, int RB, int NV, bool Q4, bool SCALE, bool QUADS = false>
static inline void qk_key(const typename V::T* q, int64_t ldq, int nv, const uint8_t* row,
                          const float* sr, int64_t sg, int64_t g, V* a) {
  constexpr int W = V::W, STEP = Q4 || QUADS ? (QUADS ? 4 : 2) : 1;
  const int n = NV ? NV : nv;
  for (int r = 0; r < RB; r++) a[r] = V::zero();
  for (int c = 0; c < n; c += STEP) {
    V x[STEP];
    if constexpr (QUADS)  // 64 int8 codes, one load, channels 4i + u (q in q8_quads_order)
      V::i8_quads(reinterpret_cast<const int8_t*>(row) + c * W, x);
    else
      code_vectors<V, Q4, SCALE>(row, sr, sg, g, c, STEP, x);
    for (int u = 0; u < STEP; u++)
      for (int r = 0; r < RB; r++) a[r] = fmadd(V::load(q + r * ldq + (c + u) * W), x[u], a[r]);
  }
}

// S[r][0:2W] = q_r . k_j for the RB rows of q (ldq apart; Q4: in q4_order, QUADS: in
// q8_quads_order) and the keys j < nvalid of a tile of 2W keys read from their codes (0 past
// nvalid): each key's nv vectors are
// converted once for all RB rows, and W keys' partial-sum vectors reduce by one tree per row
// (with PairReduce, its first level as each pair of keys is done: fewer live vectors).
// Without SCALE the key has one scale group and its scale multiplies the W reduced scores.
template <class V, int RB, int NV, bool Q4, bool SCALE, bool QUADS = false>
static void qk_codes_tile(const typename V::T* q, int64_t ldq, int nv, const uint8_t* codes,
                          int64_t cs, const float* sc, int64_t ss, int64_t sg, int64_t g,
                          int nvalid, typename V::T* S, int64_t lds) {
  using T = typename V::T;
  constexpr int W = V::W;
  const int64_t rb = Q4 ? nv * W / 2 : nv * W;  // code bytes of a key
  if constexpr (PairReduce<V>::value) {  // keys two at a time, the tree's first level at once
    for (int h0 = 0; h0 < 2 * W; h0 += W) {
      if (h0 >= nvalid) {
        for (int r = 0; r < RB; r++) V::zero().store(S + r * lds + h0);
        continue;
      }
      V t[RB][W / 2];
      T s[W];
      for (int jj = 0; jj < W; jj += 2) {
        V a[RB], b[RB];
        const int key = h0 + jj;
        for (int64_t a = key + QK_AHEAD; a < key + QK_AHEAD + 2; a++)
          prefetch_row(codes + a * cs, rb, sc + a * ss, line_start(a * ss, ss));
        if (key < nvalid) {
          qk_key<V, RB, NV, Q4, SCALE, QUADS>(q, ldq, nv, codes + key * cs, sc + key * ss, sg, g, a);
        } else {
          for (int r = 0; r < RB; r++) a[r] = V::zero();
        }
        if (key + 1 < nvalid) {
          qk_key<V, RB, NV, Q4, SCALE, QUADS>(q, ldq, nv, codes + (key + 1) * cs, sc + (key + 1) * ss,
                                       sg, g, b);
        } else {
          for (int r = 0; r < RB; r++) b[r] = V::zero();
        }
        s[jj] = key < nvalid ? T(sc[key * ss]) : T(0);
        s[jj + 1] = key + 1 < nvalid ? T(sc[(key + 1) * ss]) : T(0);
        for (int r = 0; r < RB; r++) t[r][jj / 2] = V::reduce_pair(a[r], b[r]);
      }
      for (int r = 0; r < RB; r++) {
        V res = V::reduce_pairs(t[r]);
        if (!SCALE) res = res * V::load(s);
        res.store(S + r * lds + h0);
      }
    }
    return;
  }
  for (int h0 = 0; h0 < 2 * W; h0 += W) {  // W keys' vectors, then one tree per row
    V p[RB][W];
    T s[W];
    for (int jj = 0; jj < W; jj++) {
      const int key = h0 + jj;
      V a[RB];
      prefetch_row(codes + (key + QK_AHEAD) * cs, rb, sc + (key + QK_AHEAD) * ss,
                   line_start((key + QK_AHEAD) * ss, ss));
      if (key < nvalid)
        qk_key<V, RB, NV, Q4, SCALE, QUADS>(q, ldq, nv, codes + key * cs, sc + key * ss, sg, g, a);
      else
        for (int r = 0; r < RB; r++) a[r] = V::zero();
      s[jj] = key < nvalid ? T(sc[key * ss]) : T(0);
      for (int r = 0; r < RB; r++) p[r][jj] = a[r];
    }
    for (int r = 0; r < RB; r++) {
      V res = V::reduce_lanes(p[r]);
      if (!SCALE) res = res * V::load(s);
      res.store(S + r * lds + h0);
    }
  }
}

// Whether V converts int8 codes 64 at a time from one load (V::i8_quads: AVX-512).
template <class V, class = void>
struct Quads : std::false_type {};
template <class V>
struct Quads<V, std::void_t<decltype(V::i8_quads(nullptr, nullptr))>> : std::true_type {};

// Whether qk_codes reads the int8 keys of t with one load per key (qk_codes_tile, QUADS): rows
// of X = 64 channels in unit stride, one scale each. On AVX-512 the whole-line load and shifts
// scored keys about 1.1x faster than four 16-byte widening loads, with the codes streamed from
// memory, from L3 and in L1 alike; with 128 channels (two loads) they were slower in L1.
template <class V>
static inline bool q8_quads(const View& t, int64_t X) {
  if constexpr (Quads<V>::value && V::W == 16)
    return t.dt == DT::Q8 && t.s[3] == 1 && X == 64 && t.group == X;
  return false;
}

// A q row in the order the QUADS key dot products read it: per block of 64 channels, vector k
// holds channels 4i + k (i < 16).
template <class T>
static inline void q8_quads_order(const T* src, T* dst, int64_t X) {
  for (int64_t b = 0; b < X; b += 64)
    for (int k = 0; k < 4; k++)
      for (int i = 0; i < 16; i++) dst[b + 16 * k + i] = src[b + 4 * i + k];
}

// Whether V converts 4-bit codes 8 nibbles of a dword at a time, two 32-byte rows to a vector
// (V::u4_octets, V::reduce_octets: AVX-512).
template <class V, class = void>
struct Octets : std::false_type {};
template <class V>
struct Octets<V, std::void_t<decltype(V::reduce_octets(nullptr))>> : std::true_type {};

// Whether qk_codes reads the keys of t two rows to a vector (qk_q4_pairs_tile): 4-bit codes,
// rows of X = 64 channels (32 bytes: a vector's half) in unit stride, one scale per row or
// groups of 8, 16 or 32 channels with a row's scales contiguous (the default layout).
template <class V>
static inline bool q4_pairs(const View& t, int64_t X) {
  if constexpr (Octets<V>::value && V::W == 16) {
    if (t.dt != DT::Q4 || t.s[3] != 1 || X != 64) return false;
    return t.group == 64 || (t.group % 8 == 0 && t.ss[3] == 1 && t.ss[2] == 64 / t.group);
  }
  return false;
}

// A q row of 64 channels in the order qk_q4_pairs_tile reads it: 8 vectors, vector k holding
// channels 8i + k (i < 8) in both of its halves (once per key of a pair). 128 values.
template <class T>
static inline void q4_pairs_order(const T* src, T* dst) {
  for (int k = 0; k < 8; k++)
    for (int i = 0; i < 8; i++) dst[16 * k + i] = dst[16 * k + 8 + i] = src[8 * i + k];
}

// S[r][0:2W] = q_r . k_j for RB rows (q4_pairs_order, ldq apart) and the keys j < nvalid of a
// tile of 2W = 32 keys whose 4-bit rows of 64 channels sit cs bytes apart (V::u4_octets: two
// keys per vector, a conversion of 2 uops per 16 codes for all RB rows, half a tree level less
// than one key per vector). Lane i of a key's partial sums holds channels 8i .. 8i + 7, all in
// one scale group: with NG groups (a row's NG scales contiguous, ss = NG) each pair's partial
// sums are multiplied by their lanes' scales; with one (NG = 1) the reduced scores are. Keys
// past nvalid read their pair's valid row again (finite) and get scale 0.
template <class V, int RB, int NG>
static void qk_q4_pairs_tile(const float* q, int64_t ldq, const uint8_t* codes, int64_t cs,
                             const float* sc, int64_t ss, int nvalid, float* S, int64_t lds) {
  constexpr int W = V::W;
  // lane i of a pair's partial sums: scale i * NG / 8 of key 2j, lane 8 + i: of key 2j + 1
  alignas(64) int32_t lane[W];
  for (int i = 0; i < 8; i++) {
    lane[i] = i * NG / 8;
    lane[8 + i] = NG + i * NG / 8;
  }
  for (int h0 = 0; h0 < 2 * W; h0 += W) {
    if (h0 >= nvalid) {
      for (int r = 0; r < RB; r++) V::zero().store(S + r * lds + h0);
      continue;
    }
    V t[RB][W / 2];
    float s[W];
    for (int jp = 0; jp < W / 2; jp++) {
      const int key = h0 + 2 * jp;
      for (int64_t a = key + QK_AHEAD; a < key + QK_AHEAD + 2; a++)
        prefetch_row(codes + a * cs, 32, sc + a * ss, line_start(a * ss, ss));
      if (NG == 1) {
        s[2 * jp] = key < nvalid ? sc[key * ss] : 0.0f;
        s[2 * jp + 1] = key + 1 < nvalid ? sc[(key + 1) * ss] : 0.0f;
      }
      if (key >= nvalid) {
        for (int r = 0; r < RB; r++) t[r][jp] = V::zero();
        continue;
      }
      const uint8_t* a = codes + key * cs;
      V x[8];
      V::u4_octets(a, key + 1 < nvalid ? a + cs : a, x);
      V sv = V::zero();
      if (NG > 1)  // the pair's 2 NG scales (contiguous), B's 0 past nvalid, to their lanes
        sv = V::scales_to_lanes(sc + key * ss, key + 1 < nvalid ? 2 * NG : NG, lane);
      for (int r = 0; r < RB; r++) {
        const float* qr = q + r * ldq;
        V e = V::load(qr) * x[0], o = V::load(qr + 16) * x[1];  // two chains of 4 FMAs
        for (int k = 2; k < 8; k += 2) {
          e = fmadd(V::load(qr + 16 * k), x[k], e);
          o = fmadd(V::load(qr + 16 * k + 16), x[k + 1], o);
        }
        t[r][jp] = NG > 1 ? (e + o) * sv : e + o;
      }
    }
    for (int r = 0; r < RB; r++) {
      const V res = V::reduce_octets(t[r]);
      (NG == 1 ? res * V::load(s) : res).store(S + r * lds + h0);
    }
  }
}

template <class V, int NG>
static inline void qk_q4_pairs(int64_t R, const float* q, int64_t ldq, const uint8_t* c,
                               int64_t cs, const float* sc, int64_t ss, int nvalid, float* S,
                               int64_t lds) {
  switch (R) {
    case 1: return qk_q4_pairs_tile<V, 1, NG>(q, ldq, c, cs, sc, ss, nvalid, S, lds);
    case 2: return qk_q4_pairs_tile<V, 2, NG>(q, ldq, c, cs, sc, ss, nvalid, S, lds);
    case 3: return qk_q4_pairs_tile<V, 3, NG>(q, ldq, c, cs, sc, ss, nvalid, S, lds);
    default: return qk_q4_pairs_tile<V, 4, NG>(q, ldq, c, cs, sc, ss, nvalid, S, lds);
  }
}

// S[r][0:2W] = q_r . k_j for RB rows (q8_quads_order, ldq apart) and a whole tile of 2W int8
// keys of 64 channels (cs bytes apart, one scale each, ss apart): qk_codes_tile's QUADS work
// without its per-key bounds checks (a partial tile goes there), which made the key loop
// about 1.1x faster again in a harness with the codes in L3.
template <class V, int RB>
static void qk_q8_quads_tile(const float* q, int64_t ldq, const uint8_t* codes, int64_t cs,
                             const float* sc, int64_t ss, float* S, int64_t lds) {
  constexpr int W = V::W;
  for (int h0 = 0; h0 < 2 * W; h0 += W) {
    V t[RB][W / 2];
    alignas(64) float s[W];
    for (int jj = 0; jj < W; jj += 2) {
      V a[2][RB];
      for (int u = 0; u < 2; u++) {
        const int64_t key = h0 + jj + u, f = key + QK_AHEAD;
        prefetch_row(codes + f * cs, 64, sc + f * ss, line_start(f * ss, ss));
        V c[4];
        V::i8_quads(reinterpret_cast<const int8_t*>(codes + key * cs), c);
        for (int r = 0; r < RB; r++) {
          const float* qr = q + r * ldq;
          V acc = V::load(qr) * c[0];
          for (int k = 1; k < 4; k++) acc = fmadd(V::load(qr + W * k), c[k], acc);
          a[u][r] = acc;
        }
        s[jj + u] = sc[key * ss];
      }
      for (int r = 0; r < RB; r++) t[r][jj / 2] = V::reduce_pair(a[0][r], a[1][r]);
    }
    for (int r = 0; r < RB; r++) (V::reduce_pairs(t[r]) * V::load(s)).store(S + r * lds + h0);
  }
}

// The scores of R <= 4 rows against one tile of keys (qk_codes_tile for the view's format; q4_pairs:
// qk_q4_pairs_tile, q in q4_pairs_order).
template <class V>
static inline void qk_codes(int64_t R, const typename V::T* q, int64_t ldq, const View& t,
                            int64_t b, int64_t h, int64_t j0, int nvalid, int64_t X,
                            typename V::T* S, int64_t lds) {
  const uint8_t* c = static_cast<const uint8_t*>(t.p) + b * t.s[0] + h * t.s[1] + j0 * t.s[2];
  const float* sc = t.scales + b * t.ss[0] + h * t.ss[1] + j0 * t.ss[2];
  const int64_t cs = t.s[2], ss = t.ss[2], sg = t.ss[3], g = t.group;
  const int nv = int(X / V::W);
  if constexpr (Octets<V>::value)
    if (q4_pairs<V>(t, X)) switch (64 / g) {  // q in q4_pairs_order
        case 1: return qk_q4_pairs<V, 1>(R, q, ldq, c, cs, sc, ss, nvalid, S, lds);
        case 2: return qk_q4_pairs<V, 2>(R, q, ldq, c, cs, sc, ss, nvalid, S, lds);
        case 4: return qk_q4_pairs<V, 4>(R, q, ldq, c, cs, sc, ss, nvalid, S, lds);
        default: return qk_q4_pairs<V, 8>(R, q, ldq, c, cs, sc, ss, nvalid, S, lds);
      }
  if constexpr (Quads<V>::value)
    if (q8_quads<V>(t, X)) {  // q in q8_quads_order
      if (nvalid == 2 * V::W) switch (R) {
          case 1: return qk_q8_quads_tile<V, 1>(q, ldq, c, cs, sc, ss, S, lds);
          case 2: return qk_q8_quads_tile<V, 2>(q, ldq, c, cs, sc, ss, S, lds);
          case 3: return qk_q8_quads_tile<V, 3>(q, ldq, c, cs, sc, ss, S, lds);
          default: return qk_q8_quads_tile<V, 4>(q, ldq, c, cs, sc, ss, S, lds);
        }
#define SA_QQ(RB)                                                                           \
  case RB:                                                                                  \
    if (nv == 4)                                                                            \
      return qk_codes_tile<V, RB, 4, false, false, true>(q, ldq, nv, c, cs, sc, ss, sg, g,  \
                                                         nvalid, S, lds);                   \
    return qk_codes_tile<V, RB, 0, false, false, true>(q, ldq, nv, c, cs, sc, ss, sg, g, nvalid, \
                                                       S, lds);
      switch (R) { SA_QQ(1) SA_QQ(2) SA_QQ(3) SA_QQ(4) default: return; }
#undef SA_QQ
    }
  const int mode = int(R) * 4 + (t.dt == DT::Q4 ? 2 : 0) + (g == X ? 0 : 1);
#define SA_QK(RB, Q4, SC)                                                                  \
  case RB * 4 + (Q4 ? 2 : 0) + (SC ? 1 : 0):                                               \
    if (nv == 4)                                                                           \
      return qk_codes_tile<V, RB, 4, Q4, SC>(q, ldq, nv, c, cs, sc, ss, sg, g, nvalid, S, lds); \
    return qk_codes_tile<V, RB, 0, Q4, SC>(q, ldq, nv, c, cs, sc, ss, sg, g, nvalid, S, lds);
  switch (mode) {
    SA_QK(1, false, false) SA_QK(1, false, true) SA_QK(1, true, false) SA_QK(1, true, true)
    SA_QK(2, false, false) SA_QK(2, false, true) SA_QK(2, true, false) SA_QK(2, true, true)
    SA_QK(3, false, false) SA_QK(3, false, true) SA_QK(3, true, false) SA_QK(3, true, true)
    SA_QK(4, false, false) SA_QK(4, false, true) SA_QK(4, true, false) SA_QK(4, true, true)
    default: break;
  }
#undef SA_QK
}

// O[i][c0*W : (c0+NB)*W] = sum_k A[i * lda + k] * value(k) over n value rows read from their
// codes (cs bytes apart; scales ss apart per row, sg per group of g): each row's NB vectors are
// converted once for all RB rows. Without SCALE the rows have one group each and A already holds
// p * scale (pv_codes folds it in), so the codes go straight into the FMAs.
template <class V, int RB, int NB, bool Q4, bool SCALE>
static void pv_codes_tile(const typename V::T* A, int64_t lda, int64_t n, const uint8_t* codes,
                          int64_t cs, const float* sc, int64_t ss, int64_t sg, int64_t g,
                          int64_t c0, typename V::T* O, int64_t ldo) {
  constexpr int W = V::W;
  const int64_t rb = (Q4 ? NB * W / 2 : NB * W), off = Q4 ? c0 * W / 2 : c0 * W;
  V acc[RB][NB];
  for (int i = 0; i < RB; i++)
    for (int c = 0; c < NB; c++) acc[i][c] = V::zero();
  for (int64_t k = 0; k < n; k++) {
    V x[NB];
    prefetch_row(codes + (k + PV_AHEAD) * cs + off, rb, sc + (k + PV_AHEAD) * ss,
                 line_start((k + PV_AHEAD) * ss, ss));
    code_vectors<V, Q4, SCALE>(codes + k * cs, sc + k * ss, sg, g, c0, NB, x);
    for (int i = 0; i < RB; i++) {
      const V a = V::set1(A[i * lda + k]);
      for (int c = 0; c < NB; c++) acc[i][c] = fmadd(a, x[c], acc[i][c]);
    }
  }
  for (int i = 0; i < RB; i++)
    for (int c = 0; c < NB; c++) acc[i][c].store(O + i * ldo + (c0 + c) * W);
}

template <class V, int NB, bool Q4, bool SCALE>
static inline void pv_codes_rows(int rb, const typename V::T* A, int64_t lda, int64_t n,
                                 const uint8_t* codes, int64_t cs, const float* sc, int64_t ss,
                                 int64_t sg, int64_t g, int64_t c0, typename V::T* O, int64_t ldo) {
  switch (rb) {
    case 1: return pv_codes_tile<V, 1, NB, Q4, SCALE>(A, lda, n, codes, cs, sc, ss, sg, g, c0, O, ldo);
    case 2: return pv_codes_tile<V, 2, NB, Q4, SCALE>(A, lda, n, codes, cs, sc, ss, sg, g, c0, O, ldo);
    case 3: return pv_codes_tile<V, 3, NB, Q4, SCALE>(A, lda, n, codes, cs, sc, ss, sg, g, c0, O, ldo);
    default: return pv_codes_tile<V, 4, NB, Q4, SCALE>(A, lda, n, codes, cs, sc, ss, sg, g, c0, O, ldo);
  }
}

template <class V, bool Q4, bool SCALE>
static inline void pv_codes_fmt(int64_t R, const typename V::T* A, int64_t lda, int64_t n,
                                const uint8_t* codes, int64_t cs, const float* sc, int64_t ss,
                                int64_t sg, int64_t g, int64_t nv, typename V::T* O, int64_t ldo) {
  constexpr int NB = ColBlock<V>::value, TAIL = Q4 ? 2 : 1;
  static_assert(!Q4 || NB % 2 == 0, "Q4 column blocks hold whole pairs of vectors");
  for (int64_t c0 = 0; c0 < nv;) {
    const bool whole = c0 + NB <= nv;
    for (int64_t i0 = 0; i0 < R; i0 += 4) {
      const int rb = int(imin(4, R - i0));
      if (whole)
        pv_codes_rows<V, NB, Q4, SCALE>(rb, A + i0 * lda, lda, n, codes, cs, sc, ss, sg, g, c0,
                                        O + i0 * ldo, ldo);
      else
        pv_codes_rows<V, TAIL, Q4, SCALE>(rb, A + i0 * lda, lda, n, codes, cs, sc, ss, sg, g,
                                          c0, O + i0 * ldo, ldo);
    }
    c0 += whole ? NB : TAIL;
  }
}

// O (R x X, ldo) = A (R x n, lda) times value rows [j0, j0 + n) of the quantized view t at
// (b, h), read from their codes in registers (direct_codes(t, X) must hold). With one scale
// group per row, A's rows are multiplied by the rows' scales first (in place). Q4: O's rows in
// q4_order (the caller puts them back).
template <class V>
static inline void pv_codes(int64_t R, typename V::T* A, int64_t lda, const View& t, int64_t b,
                            int64_t h, int64_t j0, int64_t n, int64_t X, typename V::T* O,
                            int64_t ldo) {
  using T = typename V::T;
  const uint8_t* c = static_cast<const uint8_t*>(t.p) + b * t.s[0] + h * t.s[1] + j0 * t.s[2];
  const float* sc = t.scales + b * t.ss[0] + h * t.ss[1] + j0 * t.ss[2];
  const int64_t cs = t.s[2], ss = t.ss[2], sg = t.ss[3], g = t.group, nv = X / V::W;
  const bool fold = g == X, q4 = t.dt == DT::Q4;
  if (fold)  // p_j * s_j once per row and key instead of a multiply per code vector
    for (int64_t r = 0; r < R; r++) {
      T* a = A + r * lda;
      int64_t k = 0;
      if constexpr (std::is_same<T, float>::value)  // the scales of consecutive keys, W at a time
        if (ss == 1)
          for (; k + V::W <= n; k += V::W) (V::load(a + k) * V::load(sc + k)).store(a + k);
      for (; k < n; k++) a[k] *= T(sc[k * ss]);
    }
  if (q4 && fold) return pv_codes_fmt<V, true, false>(R, A, lda, n, c, cs, sc, ss, sg, g, nv, O, ldo);
  if (q4) return pv_codes_fmt<V, true, true>(R, A, lda, n, c, cs, sc, ss, sg, g, nv, O, ldo);
  if (fold) return pv_codes_fmt<V, false, false>(R, A, lda, n, c, cs, sc, ss, sg, g, nv, O, ldo);
  pv_codes_fmt<V, false, true>(R, A, lda, n, c, cs, sc, ss, sg, g, nv, O, ldo);
}

// Ask for the code bytes and scales of rows [j0, j0 + 32) (those below nk) of a quantized view:
// the next tile's, while this one is computed (the hardware prefetcher restarts per chunk).
static inline void prefetch_codes(const View& t, int64_t b, int64_t h, int64_t j0, int64_t nk) {
  const int64_t j1 = j0 + 32 < nk ? j0 + 32 : nk;
  const char* c = static_cast<const char*>(t.p) + b * t.s[0] + h * t.s[1];
  const char* sc = reinterpret_cast<const char*>(t.scales + b * t.ss[0] + h * t.ss[1]);
  for (int64_t j = j0; j < j1; j++) {
    __builtin_prefetch(c + j * t.s[2], 0, 3);
    __builtin_prefetch(sc + j * t.ss[2] * 4, 0, 3);
  }
}

// The orthonormal block Walsh-Hadamard transform of x[0:n] in place (blocks of n's largest
// power-of-two divisor, as quant.rotate_heads): log2(block) stages of sums and differences of
// channels i and i + h, then the 1 / sqrt(block) normalisation. Its own inverse.
template <class T>
static inline void hadamard_row(T* x, int64_t n) {
  const int64_t blk = n & -n;
  if (blk < 2) return;
  for (int64_t h = 1; h < blk; h *= 2)
    for (int64_t b0 = 0; b0 < n; b0 += 2 * h)  // 2h divides blk: no pair crosses a block
      for (int64_t i = b0; i < b0 + h; i++) {
        const T a = x[i], c = x[i + h];
        x[i] = a + c;
        x[i + h] = a - c;
      }
  const T norm = T(1.0 / std::sqrt(double(blk)));
  for (int64_t i = 0; i < n; i++) x[i] *= norm;
}

}  // namespace SA_NS
}  // namespace selfattn
