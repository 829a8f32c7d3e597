// The portable engines, compiled for the baseline ISA: float64 (with the C library's exp2 and
// tanh, to keep float64 accuracy) and float32 for CPUs without AVX2.
#define SA_NS generic
#include "simd_generic.h"
#include "engine.h"

namespace selfattn {
namespace generic {
using VF = GV<float, 16, 4>;
using VD = GV<double, 8, 4>;
}  // namespace generic
extern const Engine engine_generic_f32 = {"generic", &generic::forward<generic::VF>,
                                          &generic::backward<generic::VF>,
                                          &generic::probabilities<generic::VF>,
                                          &generic::stats<generic::VF>,
                                          &generic::jvp<generic::VF>,
                                          &generic::hessian<generic::VF>};
extern const Engine engine_generic_f64 = {"generic", &generic::forward<generic::VD>,
                                          &generic::backward<generic::VD>,
                                          &generic::probabilities<generic::VD>,
                                          &generic::stats<generic::VD>,
                                          &generic::jvp<generic::VD>,
                                          &generic::hessian<generic::VD>};
}  // namespace selfattn
