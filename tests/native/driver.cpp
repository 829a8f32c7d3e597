// The native engine's own test driver: no torch, no Python. It links the engine objects of this
// build's architecture (x86: generic + AVX2 + AVX-512 where the CPU has them; aarch64: generic +
// NEON), builds Params by hand the way bindings.cpp does, and checks forward (prefill and
// decode), backward, probabilities, statistics, forward mode (JVP) and the double backward
// against the scalar double reference of reference.h, on odd shapes and every rule. Run by `make check-native`, `make check-sanitize` (ASan + UBSan) and
// `make check-arm` (cross-compiled, under qemu-aarch64).
//
//     driver [--list] [isa ...]     (isa: generic, avx2, avx512, neon; default: all this CPU has)
//
// Prints one line per failing check and 'N passed, N failed'; exits 1 on any failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cases.h"
#include "checks.h"
#include "common.h"
#include "quantize_check.h"
#include "reference.h"
#include "tensor.h"

using namespace drv;
using selfattn::Engine;
using selfattn::Params;
using selfattn::View;

namespace {

// ---- the pool: serial. Mode 0 runs fn(ctx, 0, n) as one task; mode 1 runs one task per item,
// last first, and reports 3 threads, so the engines split work as on 3 threads and any result
// that depended on the schedule would change ----
int g_pool_mode = 0;
void pool_run(int64_t n, void* ctx, selfattn::TaskFn fn) {
  if (g_pool_mode == 0) {
    fn(ctx, 0, n);
    return;
  }
  for (int64_t i = n - 1; i >= 0; i--) fn(ctx, i, i + 1);
}
int pool_threads() { return g_pool_mode == 0 ? 1 : 3; }
const selfattn::Pool kPool{&pool_run, &pool_threads};

struct Isa {
  const char* name;
  const Engine* f32;  // for float32 / float16 / bfloat16 inputs
};

std::vector<Isa> available_isas() {
  std::vector<Isa> v{{"generic", &selfattn::engine_generic_f32}};
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) v.push_back({"avx2", &selfattn::engine_avx2});
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    v.push_back({"avx512", &selfattn::engine_avx512});
#endif
#if defined(__aarch64__)
  v.push_back({"neon", &selfattn::engine_neon});
#endif
  return v;
}

DT acc_of(DT dt) { return dt == DT::F64 ? DT::F64 : DT::F32; }

// The quantized view of codes (B, H, N, X) (common.h's View), as bindings.cpp's quant_view.
View quant_view(const Quantized& qz, const Tensor& like) {
  const int64_t H = like.shape[1], N = like.shape[2], X = like.shape[3];
  const int64_t row = (qz.bits == 8 ? X : X / 2) + qz.pad, ng = X / qz.group + qz.pad;
  View v;
  v.p = qz.codes.data();
  v.dt = qz.bits == 8 ? DT::Q8 : DT::Q4;
  v.s[0] = H * N * row;
  v.s[1] = N * row;
  v.s[2] = row;
  v.s[3] = 1;
  v.scales = qz.scales.data();
  v.ss[0] = H * N * ng;
  v.ss[1] = N * ng;
  v.ss[2] = ng;
  v.ss[3] = 1;
  v.group = qz.group;
  v.rotate = qz.rotate;
  return v;
}

// The last n keys (axis 2) of t as a float view (Params::kw / vw), as the bindings' view_of of
// a narrowed tensor.
View window_view(const Tensor& t, int64_t n) {
  View v = t.view();
  const int64_t first = t.shape[2] - n;
  v.p = static_cast<const unsigned char*>(v.p) + first * t.stride[2] * dt_size(t.dt);
  if (n == 1) v.s[2] = 0;
  return v;
}

// Params for (P), as bindings.cpp's fill(): shapes, inputs, rules
Params params_of(const Problem& pb) {
  Params P;
  P.B = pb.B;
  P.Hq = pb.Hq;
  P.Hkv = pb.Hkv;
  P.G = pb.G();
  P.Nq = pb.Nq;
  P.Nk = pb.Nk;
  P.D = pb.D;
  P.Dv = pb.Dv;
  P.dt = pb.q.dt;
  P.q = pb.q.view();
  P.k = pb.k.view();
  P.v = pb.v.view();
  if (pb.kq.bits) P.k = quant_view(pb.kq, pb.k);
  if (pb.vq.bits) P.v = quant_view(pb.vq, pb.v);
  P.scale = pb.scale;
  P.softcap = pb.softcap;
  P.causal = pb.causal;
  P.start = pb.start;
  P.left = pb.left;
  P.right = pb.right;
  if (!pb.mask.empty()) P.mask = pb.mask.view();
  if (!pb.bias.empty()) P.bias = pb.bias.view();
  if (!pb.alibi.empty()) {  // (alibi_b, Hq): s[0] batch (0 when broadcast), s[1] head
    P.alibi.p = pb.alibi.data.data();
    P.alibi.dt = pb.alibi.dt;
    P.alibi.s[0] = pb.alibi_b() == 1 ? 0 : pb.Hq;
    P.alibi.s[1] = pb.Hq == 1 ? 0 : 1;
  }
  if (!pb.q_ids.empty()) {  // (B, Nq), (B, Nk) int64, broadcast dims stride 0
    P.q_ids.p = pb.q_ids.data();
    P.q_ids.dt = DT::I64;
    P.q_ids.s[0] = pb.B == 1 ? 0 : pb.Nq;
    P.q_ids.s[1] = pb.Nq == 1 ? 0 : 1;
    P.kv_ids.p = pb.kv_ids.data();
    P.kv_ids.dt = DT::I64;
    P.kv_ids.s[0] = pb.B == 1 ? 0 : pb.Nk;
    P.kv_ids.s[1] = pb.Nk == 1 ? 0 : 1;
  }
  P.dropout_p = pb.dropout_p;
  P.sinks = pb.sinks.empty() ? nullptr : pb.sinks.data();
  P.seed0 = pb.seed0;
  P.seed1 = pb.seed1;
  P.drop_hq = pb.drop_hq > 0 ? pb.drop_hq : pb.Hq;
  P.drop_nq = pb.drop_nq > 0 ? pb.drop_nq : pb.Nq;
  P.drop_b0 = pb.drop_b0;
  P.drop_h0 = pb.drop_h0;
  P.drop_r0 = pb.drop_r0;
  return P;
}

struct EngineRun {
  Tensor out, lse, probs, dq, dk, dv, dbias, dalibi;
};

// ---- attention_stats from the same lse: reductions of the engine's own probabilities (the
// statistics kernel, or the decode pass for a decode-sized call, recomputes the same tiles) ----
void check_stats(const Engine& eng, Params Q, const Problem& pb, const Tensor& probs,
                 Checker& ck) {
  const int64_t rows = pb.B * pb.Hq * pb.Nq, K = 3;
  std::vector<float> cs(pb.B * pb.Hq * pb.Nk, -1.f), cm(cs.size(), -1.f), ent(rows, -1.f);
  std::vector<float> tp(rows * K, -1.f);
  std::vector<int64_t> ti(rows * K, -2);
  Q.probs = nullptr;
  Q.col_sum = cs.data();
  Q.col_max = cm.data();
  Q.entropy = ent.data();
  Q.topk_p = tp.data();
  Q.topk_index = ti.data();
  Q.topk = K;
  if (rows == 0 || pb.Nk == 0) return;  // the bindings fill these without the engine
  eng.stats(Q, kPool);
  // p = exp(s - lse): a score rounded differently (the decode pass's dot products are not the
  // micro-kernel's) moves p by |s - lse| ulps of float32, hence the |log p| in each magnitude;
  // then vector vs scalar exp2 and float32 sums over a few hundred terms
  const double eps = 0x1.0p-19;
  auto mag = [](double p) { return p > 0 ? p * (4 + std::fabs(std::log(p))) : 0.0; };
  Checker::Check c(ck, "stats");
  for (int64_t bh = 0; bh < pb.B * pb.Hq; bh++)
    for (int64_t j = 0; j < pb.Nk; j++) {
      double sum = 0, sum_mag = 0, mx = 0;
      for (int64_t i = 0; i < pb.Nq; i++) {
        const double p = probs.get((bh * pb.Nq + i) * pb.Nk + j);
        sum += p;
        sum_mag += mag(p);
        mx = p > mx ? p : mx;
      }
      c.entry(bh * pb.Nk + j, cs[bh * pb.Nk + j], sum, eps * sum_mag + 1e-37);
      c.entry(bh * pb.Nk + j, cm[bh * pb.Nk + j], mx, eps * mag(mx) + 1e-37);
    }
  for (int64_t r = 0; r < rows; r++) {
    double e = 0, emag = 0;
    std::vector<double> sorted;
    for (int64_t j = 0; j < pb.Nk; j++) {
      const double p = probs.get(r * pb.Nk + j);
      if (p > 0) {
        e -= p * std::log(p);
        emag += p * (std::fabs(std::log(p)) + 1) * (4 + std::fabs(std::log(p)));
        sorted.push_back(p);
      }
    }
    c.entry(r, ent[r], e, eps * emag + 1e-30);
    std::sort(sorted.rbegin(), sorted.rend());
    for (int64_t o = 0; o < K; o++) {
      const int64_t j = ti[r * K + o];
      const double want = o < int64_t(sorted.size()) ? sorted[o] : 0.0;
      const double got = j < 0 ? 0.0 : probs.get(r * pb.Nk + j);  // the probability it picked
      c.entry(r * K + o, tp[r * K + o], want, eps * mag(want) + 1e-37);
      c.entry(r * K + o, got, want, eps * mag(want) + 1e-37);
    }
  }
}

// ---- forward mode: out, lse and their tangents in one pass (jvp.h), against the forward's
// reference and run_reference_jvp. A non-finite key row declines the call (false) ----
void check_jvp(const Engine& eng, const Spec& spec, const Problem& pb, const Result& ref,
               const Budget& bud, Checker& ck) {
  const DT acc = acc_of(spec.dt);
  Tensor out(spec.out_dt, pb.B, pb.Hq, pb.Nq, pb.Dv), lse(acc, 1, pb.B, pb.Hq, pb.Nq);
  Tensor tout(acc, pb.B, pb.Hq, pb.Nq, pb.Dv), tlse(acc, 1, pb.B, pb.Hq, pb.Nq);
  Params P = params_of(pb);
  P.out_dt = spec.out_dt;
  P.out = const_cast<void*>(out.view().p);
  P.lse = const_cast<void*>(lse.view().p);
  P.tout = const_cast<void*>(tout.view().p);
  P.tlse = const_cast<void*>(tlse.view().p);
  if (!pb.tq.empty()) P.tq = pb.tq.view();
  if (!pb.tk.empty()) P.tk = pb.tk.view();
  if (!pb.tv.empty()) P.tv = pb.tv.view();
  if (!pb.tbias.empty()) P.tbias = pb.tbias.view();
  if (!pb.talibi.empty()) {  // as the slopes: s[0] batch (0 when broadcast), s[1] head
    P.talibi.p = pb.talibi.data.data();
    P.talibi.dt = pb.talibi.dt;
    P.talibi.s[0] = pb.talibi.shape[2] == 1 ? 0 : pb.Hq;
    P.talibi.s[1] = pb.Hq == 1 ? 0 : 1;
  }
  if (pb.B * pb.Hq * pb.Nq == 0 || pb.Nk == 0) return;  // the bindings fill these themselves
  const bool took = eng.jvp(P, kPool);
  {
    Checker::Check c(ck, "jvp declines exactly a non-finite key");
    c.entry(0, took ? 1 : 0, spec.nan_key ? 0 : 1, 0);
  }
  if (!took) return;
  ck.compare_forward(pb, ref, bud, out, lse, true);  // the pass's own out and lse
  const JvpResult J = run_reference_jvp(pb, ref, bud.u);
  const double lambda = 8, u = bud.u;
  Checker::Check co(ck, "jvp tout"), cl(ck, "jvp tlse");
  for (int64_t r = 0; r < pb.B * pb.Hq * pb.Nq; r++) {
    // p's error (the forward's row budget), dS's (a 2D-term dot product) and the sums over
    // the row's keys, with a factor 2 of headroom
    const double eps = 2 * (bud.row_eps[r] + 2 * (lambda * std::sqrt(2.0 * double(pb.D)) + 8) * u +
                            2 * lambda * std::sqrt(double(ref.nvis[r])) * u);
    cl.entry(r, tlse.get(r), J.tlse[r], eps * J.tlse_mag[r]);
    for (int64_t x = 0; x < pb.Dv; x++) {
      const int64_t e = r * pb.Dv + x;
      co.entry(e, tout.get(e), J.tout[e], eps * J.tout_mag[e]);
    }
  }
}

// ---- the double backward (hessian.h) from the engine's out and lse, with the forward-mode
// tangents as the cotangents of dq, dk, dv (zero where a case has none), against
// run_reference_hessian. Its errors are the first-order backward's, carried through the row
// sums r and c once more: four times the gradients' budget ----
void check_hessian(const Engine& eng, const Problem& pb, const Result& ref, const Params& Bp,
                   const Budget& bud, DT acc, Checker& ck) {
  if (pb.B * pb.Hq * pb.Nq == 0 || pb.Nk == 0) return;  // the bindings fill these themselves
  Tensor zq(acc, pb.B, pb.Hq, pb.Nq, pb.D), zk(acc, pb.B, pb.Hkv, pb.Nk, pb.D),
      zv(acc, pb.B, pb.Hkv, pb.Nk, pb.Dv);
  Tensor hq(acc, pb.B, pb.Hq, pb.Nq, pb.D), hk(acc, pb.B, pb.Hkv, pb.Nk, pb.D),
      hv(acc, pb.B, pb.Hkv, pb.Nk, pb.Dv), hdo(acc, pb.B, pb.Hq, pb.Nq, pb.Dv),
      hdl(acc, 1, pb.B, pb.Hq, pb.Nq);
  Params H = Bp;
  H.dbias = nullptr;
  H.dalibi = nullptr;
  H.tq = pb.tq.empty() ? zq.view() : pb.tq.view();
  H.tk = pb.tk.empty() ? zk.view() : pb.tk.view();
  H.tv = pb.tv.empty() ? zv.view() : pb.tv.view();
  H.dq = const_cast<void*>(hq.view().p);
  H.dk = const_cast<void*>(hk.view().p);
  H.dv = const_cast<void*>(hv.view().p);
  H.tout = const_cast<void*>(hdo.view().p);
  H.tlse = pb.dlse.empty() ? nullptr : const_cast<void*>(hdl.view().p);
  const bool took = eng.hessian(H, kPool);
  {
    Checker::Check c(ck, "hessian takes a finite call");
    c.entry(0, took ? 1 : 0, 1, 0);
  }
  if (!took) return;
  const HessResult R = run_reference_hessian(pb, ref);
  const double eps = 4 * bud.grad_eps;
  ck.compare_grad("hessian q", R.q, R.q_mag, hq, eps);
  ck.compare_grad("hessian k", R.k, R.k_mag, hk, eps);
  ck.compare_grad("hessian v", R.v, R.v_mag, hv, eps);
  ck.compare_grad("hessian dout", R.dout, R.dout_mag, hdo, eps);
  if (H.tlse) ck.compare_grad("hessian dlse", R.dlse, R.dlse_mag, hdl, eps);
}

void run_case(const Spec& spec, const Isa& isa, Checker& ck) {
  Problem pb = make_problem(spec);
  const bool f64 = spec.dt == DT::F64;
  if (f64 && std::strcmp(isa.name, "generic") != 0) return;  // float64 runs on generic only
  const Engine& eng = f64 ? selfattn::engine_generic_f64 : *isa.f32;
  const DT acc = acc_of(spec.dt);
  const bool backward = spec.backward && !spec.nan_key;
  const Result ref = run_reference(pb, backward);
  Budget bud(pb, ref, f64 ? 0x1.0p-53 : 0x1.0p-24, spec.out_dt);
  ck.begin(spec.name, isa.name);
  g_pool_mode = spec.pool_mode;

  // ---- forward ----
  EngineRun er;
  er.out = Tensor(spec.out_dt, pb.B, pb.Hq, pb.Nq, pb.Dv);
  er.lse = Tensor(acc, 1, pb.B, pb.Hq, pb.Nq);
  Params P = params_of(pb);
  P.out_dt = spec.out_dt;
  P.need_out = !spec.lse_only;
  P.out = spec.lse_only ? nullptr : const_cast<void*>(er.out.view().p);
  P.lse = const_cast<void*>(er.lse.view().p);
  if (spec.tail) {  // the last keys as a float window: its values are pb.k / pb.v's own
    P.kw = window_view(pb.k, spec.tail);
    P.vw = window_view(pb.v, spec.tail);
    P.Nw = spec.tail;
  }
  eng.forward(P, kPool);
  ck.compare_forward(pb, ref, bud, er.out, er.lse, !spec.lse_only);

  // ---- probabilities from the engine's lse (attention_weights) ----
  if (spec.probs) {
    er.probs = Tensor(DT::F32, pb.B, pb.Hq, pb.Nq, pb.Nk);
    Params Q = params_of(pb);
    Q.v = Q.k;  // as the bindings: k narrowed to no columns, never read
    Q.Dv = 0;
    Q.dropout_p = 0;
    Q.need_out = false;
    Q.lse_in = er.lse.view();
    Q.lse_in.s[0] = Q.lse_in.s[1];  // (B, Hq, Nq) in dims 0..2
    Q.lse_in.s[1] = Q.lse_in.s[2];
    Q.lse_in.s[2] = Q.lse_in.s[3];
    Q.lse_in.s[3] = 0;
    Q.probs = const_cast<void*>(er.probs.view().p);
    eng.probabilities(Q, kPool);
    ck.compare_probs(pb, ref, bud, er.probs, er.lse);
    if (!spec.nan_key) check_stats(eng, Q, pb, er.probs, ck);
  }
  if (!spec.lse_only && !spec.kbits && !spec.vbits) check_jvp(eng, spec, pb, ref, bud, ck);
  if (!backward) return;

  // ---- backward from the engine's out and lse ----
  er.dq = Tensor(acc, pb.B, pb.Hq, pb.Nq, pb.D);
  er.dk = Tensor(acc, pb.B, pb.Hkv, pb.Nk, pb.D);
  er.dv = Tensor(acc, pb.B, pb.Hkv, pb.Nk, pb.Dv);
  Params Bp = params_of(pb);
  Bp.dout = pb.dout.view();
  Bp.o = er.out.view();
  Bp.lse_in = P.lse ? er.lse.view() : View{};
  Bp.lse_in.s[0] = Bp.lse_in.s[1];
  Bp.lse_in.s[1] = Bp.lse_in.s[2];
  Bp.lse_in.s[2] = Bp.lse_in.s[3];
  Bp.lse_in.s[3] = 0;
  Tensor dlse;
  if (!pb.dlse.empty()) {
    dlse = Tensor(acc, 1, pb.B, pb.Hq, pb.Nq);
    for (int64_t r = 0; r < pb.B * pb.Hq * pb.Nq; r++)
      dlse.set(0, r / (pb.Hq * pb.Nq), (r / pb.Nq) % pb.Hq, r % pb.Nq, pb.dlse[r]);
    Bp.dlse = dlse.view();
    Bp.dlse.s[0] = Bp.dlse.s[1];
    Bp.dlse.s[1] = Bp.dlse.s[2];
    Bp.dlse.s[2] = Bp.dlse.s[3];
    Bp.dlse.s[3] = 0;
  }
  Bp.dq = const_cast<void*>(er.dq.view().p);
  Bp.dk = const_cast<void*>(er.dk.view().p);
  Bp.dv = const_cast<void*>(er.dv.view().p);
  if (!pb.bias.empty() && spec.dbias) {
    er.dbias = Tensor(acc, pb.bias.shape[0], pb.bias.shape[1], pb.bias.shape[2],
                      pb.bias.shape[3]);
    for (int x = 0; x < 4; x++) Bp.bias_shape[x] = pb.bias.shape[x];
    Bp.dbias = const_cast<void*>(er.dbias.view().p);
  }
  if (!pb.alibi.empty() && spec.dalibi) {
    er.dalibi = Tensor(acc, 1, 1, pb.alibi_b(), pb.Hq);
    Bp.alibi_b = pb.alibi_b();
    Bp.dalibi = const_cast<void*>(er.dalibi.view().p);
  }
  eng.backward(Bp, kPool);
  ck.compare_grads(pb, ref, bud, er.dq, er.dk, er.dv, Bp.dbias ? &er.dbias : nullptr,
                   Bp.dalibi ? &er.dalibi : nullptr);
  // the fused double backward: no softcap, dropout or quantized operands (the caller's)
  if (spec.softcap == 0 && spec.dropout_p == 0 && !spec.kbits && !spec.vbits)
    check_hessian(eng, pb, ref, Bp, bud, acc, ck);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<Isa> isas = available_isas(), chosen;
  bool list = false;
  for (int a = 1; a < argc; a++) {
    if (std::strcmp(argv[a], "--list") == 0) {
      list = true;
      continue;
    }
    bool found = false;
    for (const Isa& i : isas)
      if (std::strcmp(i.name, argv[a]) == 0) {
        chosen.push_back(i);
        found = true;
      }
    if (!found) {
      std::fprintf(stderr, "driver: ISA '%s' is not built for or not supported by this CPU\n",
                   argv[a]);
      return 2;
    }
  }
  if (chosen.empty()) chosen = isas;
  const std::vector<Spec> specs = all_specs();
  if (list) {
    for (const Spec& s : specs) std::printf("%s\n", s.name.c_str());
    return 0;
  }
  std::printf("selfattn native driver: %zu cases on", specs.size());
  for (const Isa& i : chosen) std::printf(" %s", i.name);
  std::printf("\n");
  Checker ck;
  for (const Isa& isa : chosen)
    for (const Spec& s : specs) run_case(s, isa, ck);
  check_quantize(ck);  // csrc/quantize.h: scalar, the same on every ISA
  std::printf("%lld passed, %lld failed\n", (long long)ck.passed, (long long)ck.failed);
  return ck.failed == 0 ? 0 : 1;
}
