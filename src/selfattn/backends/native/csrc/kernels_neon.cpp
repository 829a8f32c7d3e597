// The AArch64 NEON engine: compiled for aarch64 only (NEON is baseline there, so no -m flag and
// no run-time CPU check; bindings.cpp picks it on every aarch64 CPU).
#define SA_NS neon
#include "simd_neon.h"
#include "engine.h"

namespace selfattn {
extern const Engine engine_neon = {"neon", &neon::forward<neon::V>, &neon::backward<neon::V>,
                                   &neon::probabilities<neon::V>,
                                   &neon::stats<neon::V>,
                                   &neon::jvp<neon::V>,
                                   &neon::hessian<neon::V>};
}  // namespace selfattn
