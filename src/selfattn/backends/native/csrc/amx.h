// Decode key scores from int8 codes on Intel AMX tiles (AMX-INT8), where the CPU and the OS
// offer them: the AVX-512 engine only (the other engines compile none of this).
//
// Why: a decode step's scores of R <= 4 query rows against int8 keys of 64 channels cost about
// 30 vector uops per key on AVX-512 (4 code conversions, 12 FMAs, a quarter of a reduction tree
// per row), most of the kernel's time with the codes in cache. One TDPBSSD multiplies 16 keys'
// 64 codes (a tile loaded straight from the cache's rows) by 16 int8 columns exactly in int32,
// beside the vector ports; what is left on them is converting and combining the results.
//
// Exactness: a q row x (already times the softmax scale, rotated if the keys are) is written as
// x = 2^(e - 30) * Q with 2^e > max|x| and Q an integer rounded from x * 2^(30 - e) (exact for
// every element of magnitude >= 2^(e - 7), whose last significant bit is then >= 2^(e - 30);
// smaller ones lose at most 2^(e - 31), below float32 rounding of the row's largest element),
// Q split into four signed base-256 digits (columns 4r .. 4r + 3 of the B tile). The integer
// dot products of the digits with the codes are exact; score = s_key * sum_p 2^(e - 30 + 8p) *
// dot_p is formed in float32 (each dot_p converts exactly, the powers of two scale exactly), so
// the score differs from q . (codes * s) by float32 rounding plus at most 2^-30 max|x| s sum|codes|:
// float32 rounding at the scale of the row's largest element (a score far smaller than that,
// e.g. the large elements of x meeting zero codes, may carry a larger relative error).
// Rows that are not finite or whose magnitude is outside [2^-60, 2^60] take the vector path.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.h"

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SA_AMX 1
#endif

namespace selfattn {
namespace SA_NS {

// q rows as AMX's B operand: b[(d / 4) * 64 + n * 4 + d % 4] = digit of channel d in column n
// (n = 4r + p: row r's digit p), w[n] = that column's weight 2^(e_r - 30 + 8p); 0 past R rows.
struct AmxRows {
  int8_t* b = nullptr;  // 16 x 64 bytes, 64-aligned
  float* w = nullptr;   // 16 floats, 64-aligned
};

#ifdef SA_AMX
// Digits of R <= 4 rows of 64 floats (ldq apart) into `out`; false (nothing usable) if a row is
// not finite or its largest magnitude is outside [2^-60, 2^60] (its weights would leave
// float32's normal range). Q = x * 2^(30 - e) is exact in float32 (a power of two), rounded to
// an int32 (|Q| <= 2^30); digit p is the low byte sign-extended, then Q = (Q - digit) / 256.
static inline bool amx_digits(const float* q, int64_t ldq, int64_t R, AmxRows out) {
  std::memset(out.b, 0, 16 * 64);
  for (int n = 0; n < 16; n++) out.w[n] = 0.0f;
  for (int64_t r = 0; r < R; r++) {
    const float* x = q + r * ldq;
    __m512 m = _mm512_setzero_ps();
    for (int d = 0; d < 64; d += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + d)));
    const float mx = _mm512_reduce_max_ps(m);
    if (!(mx <= 3.0e38f)) return false;  // inf or NaN (max_ps drops a NaN: checked below too)
    for (int d = 0; d < 64; d += 16) {
      const __m512 v = _mm512_loadu_ps(x + d);
      if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0) return false;
    }
    int e = 0;  // 2^(e - 1) <= mx < 2^e
    if (mx > 0.0f) {
      std::frexp(mx, &e);
      if (e < -60 || e > 60) return false;
    }
    const __m512 sc = _mm512_set1_ps(std::ldexp(1.0f, 30 - e));
    for (int d = 0; d < 64; d += 16) {
      __m512i Q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + d), sc));
      for (int p = 0; p < 4; p++) {
        const __m512i dig = _mm512_srai_epi32(_mm512_slli_epi32(Q, 24), 24);
        Q = _mm512_srai_epi32(_mm512_sub_epi32(Q, dig), 8);
        alignas(16) int8_t bytes[16];  // channels d .. d + 15: 4 groups of 4 consecutive ones
        _mm_store_si128(reinterpret_cast<__m128i*>(bytes), _mm512_cvtepi32_epi8(dig));
        for (int i = 0; i < 4; i++)
          std::memcpy(out.b + (d / 4 + i) * 64 + (r * 4 + p) * 4, bytes + 4 * i, 4);
      }
    }
    for (int p = 0; p < 4; p++) out.w[r * 4 + p] = std::ldexp(1.0f, e - 30 + 8 * p);
  }
  return true;
}

// Whether this process may run AMX-INT8: the CPU has it, the OS enabled its state (XCR0 bits
// 17, 18) and Linux granted this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, once).
// SELFATTN_NATIVE_AMX=0 turns it off (the vector kernels then run: A/B comparisons, bugs).
static inline bool amx_usable() {
  static const bool ok = [] {
    const char* env = std::getenv("SELFATTN_NATIVE_AMX");
    if (env != nullptr && env[0] == '0') return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1u) || !((d >> 25) & 1u)) return false;  // AMX-TILE, AMX-INT8
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return ok;
}

// The tile configuration this thread had before amx_begin, given back by amx_end: other AMX
// code in the same thread (torch's brgemm kernels) may keep its configuration loaded between
// its calls, and a tilerelease under it would leave its next tile instruction without one.
struct AmxSaved {
  alignas(64) uint8_t cfg[64];
};

// Tiles: tmm2 the q digits (loaded once by amx_begin); blocks of 16 keys rotate over the pairs
// (tmm0, tmm1), (tmm3, tmm4), (tmm5, tmm6) (results, codes), so a block's load and product need
// not wait for the one before to be stored. All 16 rows x 64 bytes.
static inline void amx_begin(const AmxRows& q, AmxSaved& saved) {
  __asm__ volatile("sttilecfg %0" : "=m"(saved.cfg));  // all zero when none is loaded
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;  // palette 1
  for (int t = 0; t < 7; t++) {
    cfg[16 + 2 * t] = 64;  // bytes per row
    cfg[48 + t] = 16;      // rows
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm2" ::"r"(q.b), "r"(int64_t(64)) : "memory");
}
static inline void amx_end(const AmxSaved& saved) {
  if (saved.cfg[0] != 0)  // palette 0: nothing was loaded
    __asm__ volatile("ldtilecfg %0" ::"m"(saved.cfg));
  else
    __asm__ volatile("tilerelease" ::);
}

// c[0:16][0:16] (int32) = the 16 keys at `codes` (cs bytes apart) times the digit columns:
// block j of a run uses tile pair j % 3.
static inline void amx_block(int j, const uint8_t* codes, int64_t cs, int32_t* c) {
  const int64_t ld = 64;
  switch (j % 3) {
    case 0:
      __asm__ volatile(
          "tilezero %%tmm0\n\ttileloadd (%0,%1,1), %%tmm1\n\ttdpbssd %%tmm2, %%tmm1, %%tmm0\n\t"
          "tilestored %%tmm0, (%2,%3,1)" ::"r"(codes), "r"(cs), "r"(c), "r"(ld) : "memory");
      break;
    case 1:
      __asm__ volatile(
          "tilezero %%tmm3\n\ttileloadd (%0,%1,1), %%tmm4\n\ttdpbssd %%tmm2, %%tmm4, %%tmm3\n\t"
          "tilestored %%tmm3, (%2,%3,1)" ::"r"(codes), "r"(cs), "r"(c), "r"(ld) : "memory");
      break;
    default:
      __asm__ volatile(
          "tilezero %%tmm5\n\ttileloadd (%0,%1,1), %%tmm6\n\ttdpbssd %%tmm2, %%tmm6, %%tmm5\n\t"
          "tilestored %%tmm5, (%2,%3,1)" ::"r"(codes), "r"(cs), "r"(c), "r"(ld) : "memory");
  }
}

// S[r][0:16] = q_r . k_j (r < R) from a block's int32 results c (16 keys x 16 columns) and the
// keys' scales: per key the results converted and weighted, each row's 4 digit columns summed
// (two levels of the transpose-and-add tree: v4[m] block r holds keys 4m .. 4m + 3 of row r),
// then the 128-bit blocks (rows) transposed into rows of S.
static inline void amx_scores(int64_t R, const __m512 w, const int32_t* c, const float* sc,
                              int64_t ss, float* S, int64_t lds) {
  __m512 v4[4];
  for (int m = 0; m < 4; m++) {
    __m512 x[4];
    for (int j = 0; j < 4; j++)
      x[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + (m * 4 + j) * 16)), w);
    const __m512 u0 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    const __m512 u1 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    const __m512d a = _mm512_castps_pd(u0), b = _mm512_castps_pd(u1);
    v4[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                          _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 t0 = _mm512_shuffle_f32x4(v4[0], v4[1], 0x44);
  const __m512 t1 = _mm512_shuffle_f32x4(v4[0], v4[1], 0xEE);
  const __m512 t2 = _mm512_shuffle_f32x4(v4[2], v4[3], 0x44);
  const __m512 t3 = _mm512_shuffle_f32x4(v4[2], v4[3], 0xEE);
  __m512 s;
  if (ss == 1) {
    s = _mm512_loadu_ps(sc);
  } else {
    alignas(64) float tmp[16];
    for (int j = 0; j < 16; j++) tmp[j] = sc[j * ss];
    s = _mm512_load_ps(tmp);
  }
  _mm512_storeu_ps(S, _mm512_mul_ps(_mm512_shuffle_f32x4(t0, t2, 0x88), s));
  if (R > 1) _mm512_storeu_ps(S + lds, _mm512_mul_ps(_mm512_shuffle_f32x4(t0, t2, 0xDD), s));
  if (R > 2) _mm512_storeu_ps(S + 2 * lds, _mm512_mul_ps(_mm512_shuffle_f32x4(t1, t3, 0x88), s));
  if (R > 3) _mm512_storeu_ps(S + 3 * lds, _mm512_mul_ps(_mm512_shuffle_f32x4(t1, t3, 0xDD), s));
}

// S[r][0:n] = q_r . k_j, r < R, for n (a multiple of 16) int8 keys of 64 channels (cs bytes
// apart, one scale each, ss apart), amx_begin's digits in tmm2. The products of the next two
// blocks of 16 keys are issued before this pair's results are combined (the tile unit and the
// vector ports then overlap; in a harness, 2 blocks a group beat 1 and 4), and each block asks
// for the rows `ahead` keys on into L1 (TILELOADD waits for its rows: into L2 only, keys
// streamed from L3 cost about 1.3x more).
static inline void qk_q8_amx(int64_t R, const AmxRows& q, const uint8_t* codes, int64_t cs,
                             const float* sc, int64_t ss, int64_t n, float* S, int64_t lds,
                             int64_t ahead) {
  constexpr int GB = 2;  // blocks of 16 keys a group
  alignas(64) int32_t c[2][GB][16 * 16];
  const __m512 w = _mm512_load_ps(q.w);
  const int64_t nb = n / 16, ng = (nb + GB - 1) / GB;
  auto issue = [&](int64_t g) {
    for (int64_t j = g * GB; j < nb && j < (g + 1) * GB; j++) {
      const uint8_t* f = codes + (j * 16 + ahead) * cs;  // past the tensor: a prefetch never faults
      for (int i = 0; i < 16; i++) __builtin_prefetch(f + i * cs, 0, 3);
      const float* fs = sc + (j * 16 + ahead) * ss;
      for (int64_t i = 0; i < 16 * ss; i += 16) __builtin_prefetch(fs + i, 0, 3);
      amx_block(int(j), codes + j * 16 * cs, cs, c[g % 2][j - g * GB]);
    }
  };
  if (ng > 0) issue(0);
  for (int64_t g = 0; g < ng; g++) {
    if (g + 1 < ng) issue(g + 1);
    for (int64_t j = g * GB; j < nb && j < (g + 1) * GB; j++)
      amx_scores(R, w, c[g % 2][j - g * GB], sc + j * 16 * ss, ss, S + j * 16, lds);
  }
}
#else
static inline bool amx_usable() { return false; }
static inline bool amx_digits(const float*, int64_t, int64_t, AmxRows) { return false; }
struct AmxSaved {};
static inline void amx_begin(const AmxRows&, AmxSaved&) {}
static inline void amx_end(const AmxSaved&) {}
static inline void qk_q8_amx(int64_t, const AmxRows&, const uint8_t*, int64_t, const float*,
                             int64_t, int64_t, float*, int64_t, int64_t) {}
#endif

}  // namespace SA_NS
}  // namespace selfattn
