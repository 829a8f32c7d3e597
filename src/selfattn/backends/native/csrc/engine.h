// The engine entry points, generic over the vector type V; each kernels_<isa>.cpp instantiates
// them inside its own namespace (SA_NS).
#pragma once
#include "backward.h"
#include "decode.h"
#include "forward.h"
#include "probs.h"

namespace selfattn {
namespace SA_NS {

template <class V>
static void forward(const Params& P, const Pool& pool) {
  if (Decode<V>::applies(P))
    forward_decode<V>(P, pool);
  else
    forward_prefill<V>(P, pool);
}

template <class V>
static void backward(const Params& P, const Pool& pool) {
  backward_all<V>(P, pool);
}

}  // namespace SA_NS
}  // namespace selfattn
