// Register-blocked GEMM micro-kernels, generic over the vector type V.
//
// One kernel shape serves every product of the engine: a tile of R rows x NV vectors of C is
// kept in registers while the reduction index k runs, each step loading NV vectors of a row of B
// and broadcasting one element of A per row:
//
//     C[i][c] (=, +=, alpha_i * C +) sum_k A[i * sa + k * sk] * B[k * ldb + c]
//
// With sa = lda, sk = 1 this is A B (S = Q K^T against K packed as [d][PW] panels; O += P V);
// with sa = 1, sk = lda it is A^T B (backward: dV += P^T dO, dK += dS^T Q). 12 x 32 (AVX-512,
// 24 accumulators), 6 x 16 (AVX2, 12 accumulators) and 12 x 8 (NEON, 24 accumulators of 32
// registers) leave registers for B and a broadcast.
#pragma once

#include <type_traits>

#include "common.h"

namespace selfattn {
namespace SA_NS {

enum Mode { STORE = 0, ADD = 1, SCALE = 2 };

// An ISA may bring its own inner loop over k for a tile (V::kloop<R, NV>, same arithmetic:
// acc[i][c] += A[i * sa + k * sk] * B[k * ldb + c] for k in order), e.g. NEON's FMA by lane,
// which takes the broadcast operand from a vector register instead of one load per row.
template <class V, class = void>
struct HasKLoop {
  static constexpr bool value = false;
};
template <class V>
struct HasKLoop<V, std::void_t<decltype(V::lane_fma)>> {
  static constexpr bool value = V::lane_fma;
};

template <class V, int R, int NV, int MODE, int PF = 0>
static inline __attribute__((always_inline)) void mk(int64_t K, const typename V::T* A, int64_t sa,
                                                     int64_t sk, const typename V::T* B,
                                                     int64_t ldb, typename V::T* C, int64_t ldc,
                                                     const typename V::T* alpha) {
  using T = typename V::T;
  // Blocked summation: the register sums restart every KBLK terms and each block's sum is added
  // to C. A single running sum over a long reduction (head dim 512) rounds ~sqrt(K) times at the
  // size of the total; blocks keep the error about that of a BLAS GEMM (issue 17, item 11). For
  // K <= KBLK (head dims up to 128) this is one block, the plain kernel.
  constexpr int64_t KBLK = 128;
  int64_t k0 = 0;
  do {
    const int64_t k1 = K - k0 < KBLK ? K : k0 + KBLK;
    V acc[R][NV];
    for (int i = 0; i < R; i++)
      for (int c = 0; c < NV; c++) acc[i][c] = V::zero();
    if constexpr (HasKLoop<V>::value) {
      V::template kloop<R, NV>(acc, k0, k1, A, sa, sk, B, ldb);
    } else {
      for (int64_t k = k0; k < k1; k++) {
        V b[NV];
        for (int c = 0; c < NV; c++) b[c] = V::load(B + k * ldb + c * V::W);
        if constexpr (PF > 0) {  // row k + PF of B into L1 ahead of use (one prefetch a line)
          constexpr int step = 64 / int(sizeof(T) * V::W) > 0 ? 64 / int(sizeof(T) * V::W) : 1;
          for (int c = 0; c < NV; c += step) __builtin_prefetch(B + (k + PF) * ldb + c * V::W);
        }
        const T* a = A + k * sk;
        for (int i = 0; i < R; i++) {
          V ai = V::set1(a[i * sa]);
          for (int c = 0; c < NV; c++) acc[i][c] = fmadd(ai, b[c], acc[i][c]);
        }
      }
    }
    const int mode = k0 == 0 ? MODE : ADD;  // later blocks add to what the first one wrote
    for (int i = 0; i < R; i++) {
      T* ci = C + i * ldc;
      if (mode == SCALE) {
        V al = V::set1(alpha[i]);
        for (int c = 0; c < NV; c++) acc[i][c] = fmadd(V::load(ci + c * V::W), al, acc[i][c]);
      } else if (mode == ADD) {
        for (int c = 0; c < NV; c++) acc[i][c] = acc[i][c] + V::load(ci + c * V::W);
      }
      for (int c = 0; c < NV; c++) acc[i][c].store(ci + c * V::W);
    }
    k0 = k1;
  } while (k0 < K);
}

// Rows of one register tile for NV vectors of columns: 2 * MR accumulators at most.
template <class V, int NV>
struct RowBlock {
  static constexpr int value = NV >= 3 ? V::MR / 2 : V::MR;
};

// A tile of `rows` (1..R) rows: the register tile for that exact count.
template <class V, int NV, int MODE, int R>
static inline void mk_rows(int rows, int64_t K, const typename V::T* A, int64_t sa, int64_t sk,
                           const typename V::T* B, int64_t ldb, typename V::T* C, int64_t ldc,
                           const typename V::T* alpha) {
  if constexpr (R > 0) {
    if (rows == R)
      mk<V, R, NV, MODE>(K, A, sa, sk, B, ldb, C, ldc, alpha);
    else
      mk_rows<V, NV, MODE, R - 1>(rows, K, A, sa, sk, B, ldb, C, ldc, alpha);
  }
}

template <class V, int NV, int MODE, int PF = 0>
static inline void gemm_cols(int64_t M, int64_t K, const typename V::T* A, int64_t sa, int64_t sk,
                             const typename V::T* B, int64_t ldb, typename V::T* C, int64_t ldc,
                             const typename V::T* alpha) {
  constexpr int R = RowBlock<V, NV>::value;
  int64_t i = 0;
  for (; i + R <= M; i += R)
    mk<V, R, NV, MODE, PF>(K, A + i * sa, sa, sk, B, ldb, C + i * ldc, ldc,
                           alpha ? alpha + i : nullptr);
  if (i < M)
    mk_rows<V, NV, MODE, R - 1>(int(M - i), K, A + i * sa, sa, sk, B, ldb, C + i * ldc, ldc,
                                alpha ? alpha + i : nullptr);
}

// Vectors per column block of `gemm`: 4 unless the vector type says otherwise (V::NB). With 16
// registers (AVX2) a 3 x 4 tile needs 12 accumulators + 4 of B + 1 broadcast = 17, so the
// compiler reloads B from memory inside the loop; 6 x 2 needs 12 + 2 + 1 = 15.
template <class V, class = void>
struct ColBlock {
  static constexpr int value = 4;
};
template <class V>
struct ColBlock<V, std::void_t<decltype(V::NB)>> {
  static constexpr int value = V::NB;
};

// C (M x nvec*W): column blocks of up to ColBlock vectors, rows in blocks of RowBlock (any M).
// ldb / ldc / the columns of B and C are padded to whole vectors by the caller.
template <class V, int MODE, int PF = 0>
static inline void gemm(int64_t M, int64_t nvec, int64_t K, const typename V::T* A, int64_t sa,
                        int64_t sk, const typename V::T* B, int64_t ldb, typename V::T* C,
                        int64_t ldc, const typename V::T* alpha) {
  constexpr int W = V::W, NB = ColBlock<V>::value;
  static_assert(NB >= 1 && NB <= 4, "column blocks of 1 to 4 vectors");
  int64_t c = 0;
  for (; c + NB <= nvec; c += NB)
    gemm_cols<V, NB, MODE, PF>(M, K, A, sa, sk, B + c * W, ldb, C + c * W, ldc, alpha);
  switch (nvec - c) {
    case 3: gemm_cols<V, 3, MODE>(M, K, A, sa, sk, B + c * W, ldb, C + c * W, ldc, alpha); break;
    case 2: gemm_cols<V, 2, MODE>(M, K, A, sa, sk, B + c * W, ldb, C + c * W, ldc, alpha); break;
    case 1: gemm_cols<V, 1, MODE>(M, K, A, sa, sk, B + c * W, ldb, C + c * W, ldc, alpha); break;
    default: break;
  }
}

}  // namespace SA_NS
}  // namespace selfattn
