// Shared, torch-free definitions for the native attention engine.
//
// Every translation unit includes this file: the bindings (compiled with the default flags), the
// generic engine, and the AVX2 / AVX-512 engines (compiled with their own -m flags). So that no
// function compiled for a wider ISA can be merged (by the linker's COMDAT folding) into code that
// runs on a narrower CPU, this header holds only types, constants and `static inline` functions
// (internal linkage: each TU gets its own copy). Engine code lives in a per-ISA namespace.
#pragma once

#include <cstddef>
#include <cstdint>

namespace selfattn {

// Q8 / Q4: quantized keys or values (selfattn.QuantizedKV): int8 codes, or 4-bit codes stored
// as code + 8 two per byte (the even channel in the low nibble); see View.
enum class DT : int32_t { F32 = 0, F64 = 1, F16 = 2, BF16 = 3, U8 = 4, I64 = 5, Q8 = 6, Q4 = 7 };

// A strided view: element strides (0 along broadcast dims), dims only where they matter.
// Quantized (dt Q8 / Q4, (B, H, N, X) of X channels): p and s are the code bytes (s[3]: bytes
// between codes for Q8, between bytes of code pairs for Q4), element d of a row is
// code(d) * scales[... + (d / group) * ss[3]] (float32 scales, strides ss). rotate: the codes
// are of the Walsh-Hadamard-rotated row (quant.h): the engines rotate q (keys) or the output
// (values) instead, never the rows.
struct View {
  const void* p = nullptr;
  DT dt = DT::F32;
  int64_t s[4] = {0, 0, 0, 0};
  const float* scales = nullptr;
  int64_t ss[4] = {0, 0, 0, 0};
  int64_t group = 0;
  bool rotate = false;
};
static inline bool quantized(DT dt) { return dt == DT::Q8 || dt == DT::Q4; }

// Everything one forward / backward call needs. Rows are query rows of one head, "positions"
// are absolute: row i sits at start + i. left / right < 0 mean unbounded.
struct Params {
  int64_t B = 0, Hq = 0, Hkv = 0, G = 1, Nq = 0, Nk = 0, D = 0, Dv = 0;
  DT dt = DT::F32;      // of q, k, v
  DT out_dt = DT::F32;  // of out: q's dtype, or the accumulation dtype when asked
  View q, k, v;     // (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
  // A float window after the keys (a cache's newest tokens, kv_residual.ResidualKV): kw
  // (B, Hkv, Nw, D) and vw (B, Hkv, Nw, Dv) hold keys Nk - Nw .. Nk - 1, k and v the first
  // Nk - Nw. Nw = 0: none. Only the decode kernel reads it (decode.h, with_window).
  View kw, vw;
  int64_t Nw = 0;
  double scale = 1.0, softcap = 0.0;
  bool causal = false;
  int64_t start = 0, left = -1, right = -1;
  View mask;            // uint8 (torch.bool), broadcastable (B, Hq, Nq, Nk); p == nullptr: none
  View bias;            // any float dtype, broadcastable (B, Hq, Nq, Nk)
  View alibi;           // any float dtype, s[0] batch (0 when broadcast), s[1] head
  View q_ids, kv_ids;   // int64, s[0] batch, s[1] position
  double dropout_p = 0.0;
  const double* sinks = nullptr;  // (Hq,) one logit per query head with no value; null: none
  uint32_t seed0 = 0, seed1 = 0;
  int64_t drop_hq = 0, drop_nq = 0, drop_b0 = 0, drop_h0 = 0, drop_r0 = 0;
  bool need_out = true;
  // forward outputs: out (B, Hq, Nq, Dv) contiguous in out_dt; lse (B, Hq, Nq) contiguous, acc
  void* out = nullptr;
  void* lse = nullptr;
  // probabilities output: (B, Hq, Nq, Nk) contiguous float32, zero-filled by the caller
  void* probs = nullptr;
  // backward inputs / outputs (contiguous unless a View)
  View dout;            // (B, Hq, Nq, Dv)
  View o;               // forward output, any float dtype (B, Hq, Nq, Dv)
  View lse_in;          // (B, Hq, Nq) acc dtype
  View dlse;            // (B, Hq, Nq) any float, p == nullptr: none
  void* dq = nullptr;   // (B, Hq, Nq, D) acc dtype
  void* dk = nullptr;   // (B, Hkv, Nk, D)
  void* dv = nullptr;   // (B, Hkv, Nk, Dv)
  void* dbias = nullptr;     // contiguous, shape bias_shape, acc dtype
  int64_t bias_shape[4] = {1, 1, 1, 1};
  void* dalibi = nullptr;    // contiguous (alibi_b, Hq), acc dtype
  int64_t alibi_b = 1;
  // attention statistics, contiguous float32 outputs (null / topk 0: not asked for): col_sum and
  // col_max (B, Hq, Nk) and entropy (B, Hq, Nq) written whole, topk_p / topk_index (B, Hq, Nq,
  // topk). The stats entry point reads lse_in; a decode forward with any of them set writes them
  // from its own pass and its own lse (decode.h).
  float* col_sum = nullptr;
  float* col_max = nullptr;
  float* entropy = nullptr;
  float* topk_p = nullptr;
  int64_t* topk_index = nullptr;
  int64_t topk = 0;
  // forward mode (jvp.h): tangents of q, k, v (shaped like them), of the bias (broadcastable
  // (B, Hq, Nq, Nk)) and of the slopes (as alibi); p == nullptr: zero. Outputs tout (B, Hq, Nq,
  // Dv) and tlse (B, Hq, Nq), contiguous in the accumulation dtype, besides out and lse.
  View tq, tk, tv, tbias, talibi;
  void* tout = nullptr;
  void* tlse = nullptr;
  // The double backward (hessian.h) reads tq, tk, tv as the cotangents of dq, dk, dv (all
  // given), dout, o, lse_in and dlse as the backward does, and writes the gradients of q, k, v
  // to dq, dk, dv, of dout to tout (null: not asked) and of dlse to tlse (null: no dlse).
};

// The thread pool, provided by the bindings (torch's intra-op pool).
using TaskFn = void (*)(void* ctx, int64_t begin, int64_t end);
struct Pool {
  void (*run)(int64_t n, void* ctx, TaskFn fn) = nullptr;
  int (*threads)() = nullptr;
};

// What each compiled engine exports.
struct Engine {
  const char* name;
  void (*forward)(const Params&, const Pool&);
  void (*backward)(const Params&, const Pool&);
  void (*probabilities)(const Params&, const Pool&);
  void (*stats)(const Params&, const Pool&);
  bool (*jvp)(const Params&, const Pool&);  // false: declined (a non-finite k / v row)
  bool (*hessian)(const Params&, const Pool&);  // false: declined (a non-finite k / v row)
};

// The compiled engines, each defined in its kernels_<isa>.cpp; which exist depends on the
// architecture (build.py's objects_for), hence the guards.
extern const Engine engine_generic_f32;
extern const Engine engine_generic_f64;
#if defined(__x86_64__) || defined(__i386__)
extern const Engine engine_avx2;
extern const Engine engine_avx512;
#endif
#if defined(__aarch64__)
extern const Engine engine_neon;
#endif

// ---- key bounds of a block of rows (the formulas of rules.bounds) ------------------------------

struct Bounds {
  int64_t lo, hi, full_lo, full_hi;  // visible keys [lo, hi); seen by every row: [full_lo, full_hi)
};

// Saturating int64 arithmetic for positions plus window sides: a side may be as large as the
// caller likes (sys.maxsize), and a side larger than any distance must restrict nothing.
static inline int64_t sat_add(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) return b > 0 ? INT64_MAX : INT64_MIN;
  return r;
}
static inline int64_t sat_sub(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_sub_overflow(a, b, &r)) return b > 0 ? INT64_MIN : INT64_MAX;
  return r;
}

// Rows at positions [pmin, pmax] (pmin <= pmax): the keys some row may see and the keys every row
// sees under causal / window rules (masks and ids are not included).
static inline Bounds key_bounds(int64_t pmin, int64_t pmax, int64_t nk, bool causal, int64_t left,
                                int64_t right) {
  int64_t lo = 0, hi = nk, flo = 0, fhi = nk;
  if (causal) {
    hi = hi < pmax + 1 ? hi : pmax + 1;
    fhi = fhi < pmin + 1 ? fhi : pmin + 1;
  }
  if (right >= 0) {
    const int64_t h = sat_add(sat_add(pmax, right), 1), fh = sat_add(sat_add(pmin, right), 1);
    hi = hi < h ? hi : h;
    fhi = fhi < fh ? fhi : fh;
  }
  if (left >= 0) {
    const int64_t l = sat_sub(pmin, left), fl = sat_sub(pmax, left);
    lo = lo > l ? lo : l;
    flo = flo > fl ? flo : fl;
  }
  lo = lo > 0 ? lo : 0;
  hi = hi < nk ? hi : nk;
  flo = flo > lo ? flo : lo;
  fhi = fhi < hi ? fhi : hi;
  if (lo >= hi) {
    lo = hi = 0;
  }
  if (flo >= fhi) {
    flo = fhi = lo;  // no key is seen by every row
  }
  return {lo, hi, flo, fhi};
}

// The work of query block qb (rows [qb * BM, qb * BM + BM), panels of MR rows): (row, key) pairs
// its panels visit under causal / window rules, plus a fixed share per row; what the forward
// passes balance their threads by.
static inline double block_cost(const Params& P, int64_t qb, int64_t BM, int64_t MR) {
  double c = 64.0 * double(BM);
  for (int64_t r0 = qb * BM; r0 < (P.Nq < qb * BM + BM ? P.Nq : qb * BM + BM); r0 += MR) {
    const int64_t nr = MR < P.Nq - r0 ? MR : P.Nq - r0;
    const Bounds kb = key_bounds(P.start + r0, P.start + r0 + nr - 1, P.Nk, P.causal, P.left, P.right);
    c += double(kb.hi - kb.lo) * double(MR);
  }
  return c;
}

// ---- dropout: the counter-based hash of selfattn/_rng.py, in 32-bit arithmetic ------------------

static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}
static inline uint32_t drop_row_hash(uint64_t row, uint32_t seed0) {
  return mix32(static_cast<uint32_t>(row) * 0x9E3779B9u + seed0);
}
static inline uint32_t drop_col_word(uint64_t col, uint32_t seed1) {
  return static_cast<uint32_t>(col) * 0x85EBCA6Bu + seed1;
}
static inline uint32_t drop_threshold(double p) {
  double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// ---- scalar conversions (portable; the SIMD engines have vector versions) -----------------------

static inline float bits_to_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
static inline uint32_t float_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}
static inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
static inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return uint16_t(u >> 16);
}
static inline float f16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    float f = float(man) * (1.0f / 16777216.0f);  // subnormal: man * 2^-24
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
static inline uint16_t float_to_f16(float f) {
  uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return uint16_t(sign | 0x7E00u);
  if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                  // below 2^-14: subnormal or zero
    // f * 2^24 rounded to nearest even, exactly via the float adder
    float r = bits_to_float(a) + 0.5f;  // 0.5 = 2^-1 puts 2^-24 at the last mantissa bit
    return uint16_t(sign | (float_to_bits(r) - 0x3F000000u));
  }
  uint32_t m = a + 0xC8000FFFu + ((a >> 13) & 1u);  // rebias (-112 << 23) and round to even
  return uint16_t(sign | (m >> 13));
}

static inline double load_scalar(const void* p, DT dt, int64_t off) {
  switch (dt) {
    case DT::F32: return static_cast<const float*>(p)[off];
    case DT::F64: return static_cast<const double*>(p)[off];
    case DT::F16: return f16_to_float(static_cast<const uint16_t*>(p)[off]);
    case DT::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[off]);
    case DT::U8: return static_cast<const uint8_t*>(p)[off];
    case DT::I64: return double(static_cast<const int64_t*>(p)[off]);
    case DT::Q8:
    case DT::Q4: break;  // rows of quantized views are read by load_row (quant.h)
  }
  return 0.0;
}

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace selfattn
