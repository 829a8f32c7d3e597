// The AVX2 + FMA engine: compiled with -mavx2 -mfma -mf16c.
#define SA_NS avx2
#include "simd_avx2.h"
#include "engine.h"

namespace selfattn {
extern const Engine engine_avx2 = {"avx2", &avx2::forward<avx2::V>, &avx2::backward<avx2::V>,
                                   &avx2::probabilities<avx2::V>,
                                   &avx2::stats<avx2::V>,
                                   &avx2::jvp<avx2::V>,
                                   &avx2::hessian<avx2::V>};
}  // namespace selfattn
