// The fused register tiles of the forward-mode pass (jvp.h): the scores with their tangent
// from one pass over a key tile's [dK^T; K^T] panel, and O with T from one pass over the rows of
// V and dV. Each keeps 4 vectors a row in registers (rows R = MR / 2: the 2 MR accumulators of
// the scores' MR x 2 tile) and loads every operand row once for all the products that read it.
#pragma once

#include "microkernel.h"

namespace selfattn {
namespace SA_NS {

// The score tile of R rows: S = a K^T and dS = da K^T + a dK^T (DQ: the da term, DK: the a dK
// term) in one pass over the tile's panel rows K (D x 2W, ld 2W) and dK; element k of row i's
// q at A[i * sa + k * sk], of its dq at A[dqo + i * sa + k * sk] (the pass keeps them d-major:
// sa = 1, so every broadcast is at a fixed offset from one of two pointers). Each step loads
// K's and dK's row once for both products. S is summed as the forward's micro-kernel sums it
// (same order, the same blocks of KBLK steps), so the pass's probabilities are the forward's;
// dS in the same blocks (2 KBLK terms each).
template <class V, int R, bool DQ, bool DK>
static inline __attribute__((always_inline)) void score_pair(
    int64_t D, const typename V::T* A, int64_t sa, int64_t sk, int64_t dqo,
    const typename V::T* K, const typename V::T* dK, typename V::T* S, typename V::T* dS,
    int64_t ldc) {
  using T = typename V::T;
  constexpr int W = V::W, PW = 2 * W;
  constexpr int64_t KBLK = 128;
  int64_t k0 = 0;
  do {
    const int64_t k1 = D - k0 < KBLK ? D : k0 + KBLK;
    V s[R][2], d[R][2];
    for (int i = 0; i < R; i++)
      for (int c = 0; c < 2; c++) s[i][c] = d[i][c] = V::zero();
    for (int64_t k = k0; k < k1; k++) {
      const V b0 = V::load(K + k * PW), b1 = V::load(K + k * PW + W);
      V e0, e1;
      if (DK) {
        e0 = V::load(dK + k * PW);
        e1 = V::load(dK + k * PW + W);
      }
      const typename V::T* ak = A + k * sk;
      for (int i = 0; i < R; i++) {
        const V a = V::set1(ak[i * sa]);
        s[i][0] = fmadd(a, b0, s[i][0]);
        s[i][1] = fmadd(a, b1, s[i][1]);
        if (DQ) {
          const V da = V::set1(ak[dqo + i * sa]);
          d[i][0] = fmadd(da, b0, d[i][0]);
          d[i][1] = fmadd(da, b1, d[i][1]);
        }
        if (DK) {
          d[i][0] = fmadd(a, e0, d[i][0]);
          d[i][1] = fmadd(a, e1, d[i][1]);
        }
      }
    }
    for (int i = 0; i < R; i++)
      for (int c = 0; c < 2; c++) {
        T* si = S + i * ldc + c * W;
        T* di = dS + i * ldc + c * W;
        if (k0 > 0) {  // later blocks add to what the first one wrote
          s[i][c] = s[i][c] + V::load(si);
          d[i][c] = d[i][c] + V::load(di);
        }
        s[i][c].store(si);
        d[i][c].store(di);
      }
    k0 = k1;
  } while (k0 < D);
}

// O and T of R rows x NV vectors over n keys (one block): O (+)= P V and T (+)= X V
// (XV) + P dV (PDV) in one pass over the rows of V and dV, each loaded once for every product
// that reads it. P, X: the rows' probabilities and p * dS (ld sa); MODE as the micro-kernel's
// (SCALE: C = al C + sum; ADD: C += sum), O and T both.
template <class V, int R, int NV, bool XV, bool PDV, int MODE>
static inline __attribute__((always_inline)) void value_pair(
    int64_t n, const typename V::T* P, const typename V::T* X, int64_t sa,
    const typename V::T* Vr, int64_t ldv, const typename V::T* dVr, int64_t lddv,
    typename V::T* O, typename V::T* Tt, int64_t ldc, const typename V::T* al) {
  using T = typename V::T;
  constexpr int W = V::W;
  V o[R][NV], t[R][NV];
  for (int i = 0; i < R; i++)
    for (int c = 0; c < NV; c++) o[i][c] = t[i][c] = V::zero();
  for (int64_t k = 0; k < n; k++) {
    V v[NV], dv[NV];
    for (int c = 0; c < NV; c++) {
      v[c] = V::load(Vr + k * ldv + c * W);
      if (PDV) dv[c] = V::load(dVr + k * lddv + c * W);
    }
    for (int i = 0; i < R; i++) {
      const V p = V::set1(P[i * sa + k]);
      for (int c = 0; c < NV; c++) o[i][c] = fmadd(p, v[c], o[i][c]);
      if (PDV)
        for (int c = 0; c < NV; c++) t[i][c] = fmadd(p, dv[c], t[i][c]);
      if (XV) {
        const V x = V::set1(X[i * sa + k]);
        for (int c = 0; c < NV; c++) t[i][c] = fmadd(x, v[c], t[i][c]);
      }
    }
  }
  for (int i = 0; i < R; i++) {
    T* oi = O + i * ldc;
    T* ti = Tt + i * ldc;
    if (MODE == SCALE) {
      const V a = V::set1(al[i]);
      for (int c = 0; c < NV; c++) {
        o[i][c] = fmadd(V::load(oi + c * W), a, o[i][c]);
        t[i][c] = fmadd(V::load(ti + c * W), a, t[i][c]);
      }
    } else if (MODE == ADD) {
      for (int c = 0; c < NV; c++) {
        o[i][c] = o[i][c] + V::load(oi + c * W);
        t[i][c] = t[i][c] + V::load(ti + c * W);
      }
    }
    for (int c = 0; c < NV; c++) {
      o[i][c].store(oi + c * W);
      t[i][c].store(ti + c * W);
    }
  }
}

}  // namespace SA_NS
}  // namespace selfattn
