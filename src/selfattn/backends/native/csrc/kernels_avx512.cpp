// The AVX-512 engine: compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma, used only
// when the CPU reports those features (bindings.cpp).
#define SA_NS avx512
#include "simd_avx512.h"
#include "engine.h"

namespace selfattn {
extern const Engine engine_avx512 = {"avx512", &avx512::forward<avx512::V>,
                                     &avx512::backward<avx512::V>,
                                     &avx512::probabilities<avx512::V>,
                                     &avx512::stats<avx512::V>,
                                     &avx512::jvp<avx512::V>,
                                     &avx512::hessian<avx512::V>};
}  // namespace selfattn
