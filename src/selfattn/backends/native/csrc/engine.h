// The engine entry points (forward, backward, probabilities, statistics, forward mode), generic over the
// vector type V; each kernels_<isa>.cpp instantiates
// them inside its own namespace (SA_NS).
#pragma once
#include "backward.h"
#include "decode.h"
#include "forward.h"
#include "hessian.h"
#include "jvp.h"
#include "probs.h"
#include "stats.h"

namespace selfattn {
namespace SA_NS {

// With statistics asked for (Params' col_sum ... topk), a decode step computes them in its own
// pass; any other call runs the statistics pass after the forward, from the lse it wrote.
template <class V>
static void forward(const Params& P, const Pool& pool) {
  using T = typename V::T;
  if (Decode<V>::applies(P)) {
    forward_decode<V>(P, pool);
    return;
  }
  forward_prefill<V>(P, pool);
  if (!wants_stats(P)) return;
  Params S = P;
  S.lse_in.p = P.lse;  // (B, Hq, Nq) contiguous, in the accumulation dtype
  S.lse_in.dt = sizeof(T) == 4 ? DT::F32 : DT::F64;
  S.lse_in.s[0] = P.Hq * P.Nq;
  S.lse_in.s[1] = P.Nq;
  S.lse_in.s[2] = 1;
  S.lse_in.s[3] = 0;
  statistics<V>(S, pool);
}

// attention_stats from a given lse (Params::lse_in): a decode-sized call runs the split-K decode
// pass without values (its statistics pass reads lse_in), any other the tiled statistics pass.
template <class V>
static void stats(const Params& P, const Pool& pool) {
  using T = typename V::T;
  if (!Decode<V>::applies(P)) {
    statistics<V>(P, pool);
    return;
  }
  Params D = P;
  Buf<T> lse(P.B * P.Hq * P.Nq);  // the pass's own lse, unused: the given one normalises
  D.lse = lse.p;
  D.need_out = false;
  D.out = nullptr;
  forward_decode<V>(D, pool);
}

// Forward mode: out, lse and their tangents in one pass (jvp.h); false if declined.
template <class V>
static bool jvp(const Params& P, const Pool& pool) {
  return jvp_prefill<V>(P, pool);
}

// The double backward of a gradient penalty in one fused pass (hessian.h); false if declined.
template <class V>
static bool hessian(const Params& P, const Pool& pool) {
  return hessian_all<V>(P, pool);
}

template <class V>
static void backward(const Params& P, const Pool& pool) {
  backward_all<V>(P, pool);
}

}  // namespace SA_NS
}  // namespace selfattn
