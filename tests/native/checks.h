// The driver's comparisons: the engine's results against the double reference, within an error
// budget derived from float rounding (below), with exact expectations where there is no
// rounding at all: a row that sees no key has out == 0 and lse == -inf exactly, a hidden entry
// has probability 0 exactly, a gradient entry with no contribution is 0 exactly, and NaN appears
// exactly where the reference has it (a row that sees a non-finite key) and nowhere else.
//
// Error budget (u: the unit roundoff of the engine's compute type, 2^-24 or 2^-53). Rounding
// errors of a sum of n terms are bounded by n u sum |terms| in the worst case, and by
// lambda sqrt(n) u sum |terms| except with probability 2 exp(-lambda^2 / 2) when they behave as
// independent random variables (Higham and Mary, "A new approach to probabilistic rounding error
// analysis", SIAM J. Sci. Comput. 2019). The driver uses the latter with lambda = 8 (2e-14 per
// sum: below 1e-6 for a whole run of some 1e7 sums), which is ~sqrt(n) times tighter than the
// worst case, plus a per-entry c u for what does not accumulate. A score is a D-term dot product
// plus scaling, softcap (a float tanh polynomial), bias and ALiBi terms, so its absolute error is
//     e_s = (8 sqrt(D) + 8) u A,   A = |scale| sum_d |q_d k_d| + |bias| + |slope * dist|.
// An error e in the scores changes p = exp(s - lse) by a relative 2e (through s and through the
// lse); exp2 is a degree-6 polynomial with relative error below 4u; the row sum and the sum of
// p v over the n visible keys accumulate. For a row:
//     eps_row = 2 * (2 e_s + 16 sqrt(n) u + 16 u)          (a factor 2 of headroom)
//     |out - ref| <= eps_row * sum_j p_j |z_j v_jc|  (+ the rounding of a 16-bit output:
//                    half an ulp, 2^-8 relative for bfloat16, 2^-11 for float16)
//     |lse - ref| <= 2 * (e_s + 8 sqrt(n) u + 8 u) + 4 u |lse|
// Gradients add the dot product dO . v (Dv terms) and sums over up to B Hq Nq rows or Nk keys:
//     eps_grad = 2 * (2 e_s,max + 8 (sqrt(terms) + sqrt(D) + sqrt(Dv)) u + 32 u)
//                (+ a 16-bit output's rounding, which enters through delta = dO . out),
// applied to the sum of the magnitudes of every term of the entry (the reference's *_mag).
// A wrong rule shows as an exact-zero or NaN mismatch or as an error of the size of a
// probability, orders of magnitude above these budgets.
#pragma once
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "reference.h"
#include "tensor.h"

namespace drv {

inline double out_unit(DT dt) {
  return dt == DT::BF16 ? 0x1.0p-8 : dt == DT::F16 ? 0x1.0p-11 : 0.0;
}

struct Budget {
  std::vector<double> row_eps, lse_tol;
  double grad_eps = 0, u, ou;
  Budget(const Problem& P, const Result& R, double unit, DT out_dt) : u(unit) {
    const double lambda = 8;
    ou = out_unit(out_dt);
    const int64_t rows = P.B * P.Hq * P.Nq;
    row_eps.resize(rows);
    lse_tol.resize(rows);
    double amax = 0;
    for (int64_t r = 0; r < rows; r++) {
      const double es = (lambda * std::sqrt(double(P.D)) + 8) * u * R.score_err[r];
      const double sn = std::sqrt(double(R.nvis[r]));
      row_eps[r] = 2 * (2 * es + 2 * lambda * sn * u + 16 * u);
      const double l = std::isfinite(R.lse[r]) ? std::fabs(R.lse[r]) : 0;
      lse_tol[r] = 2 * (es + lambda * sn * u + 8 * u) + 4 * u * l;
      amax = R.score_err[r] > amax ? R.score_err[r] : amax;
    }
    const double terms = double(P.B * P.Hq * P.Nq + P.Nk);
    const double es_max = (lambda * std::sqrt(double(P.D)) + 8) * u * amax;
    grad_eps = 2 * (2 * es_max +
                    lambda * (std::sqrt(terms) + std::sqrt(double(P.D)) + std::sqrt(double(P.Dv))) * u +
                    32 * u) +
               ou;
  }
};

struct Checker {
  int64_t passed = 0, failed = 0;
  std::string where;
  void begin(const std::string& name, const char* isa) { where = name + " [" + isa + "]"; }

  // One named check over many entries: passes when every entry is within its tolerance.
  struct Check {
    Checker& ck;
    const char* what;
    int64_t bad = 0;
    std::string first;
    Check(Checker& c, const char* w) : ck(c), what(w) {}
    void entry(int64_t idx, double got, double want, double tol) {
      bool ok;
      if (std::isnan(want)) ok = std::isnan(got);
      else if (std::isinf(want)) ok = got == want;
      else ok = std::isfinite(got) && std::fabs(got - want) <= tol;
      if (ok) return;
      if (bad++ == 0) {
        char buf[200];
        std::snprintf(buf, sizeof buf, "entry %lld: got %.9g, want %.9g (tolerance %.3g)",
                      (long long)idx, got, want, tol);
        first = buf;
      }
    }
    ~Check() {
      if (bad == 0) {
        ck.passed++;
        return;
      }
      ck.failed++;
      std::printf("FAIL %s %s: %lld entries off; first %s\n", ck.where.c_str(), what,
                  (long long)bad, first.c_str());
    }
  };

  void compare_forward(const Problem& P, const Result& R, const Budget& bud, const Tensor& out,
                       const Tensor& lse, bool with_out) {
    const int64_t rows = P.B * P.Hq * P.Nq;
    {
      Check c(*this, "lse");
      for (int64_t r = 0; r < rows; r++)
        c.entry(r, lse.get(r), R.lse[r], bud.lse_tol[r]);
    }
    if (!with_out) return;
    Check c(*this, "out");
    for (int64_t r = 0; r < rows; r++)
      for (int64_t x = 0; x < P.Dv; x++) {
        const int64_t e = r * P.Dv + x;
        const double want = R.out[e];
        const double tol = bud.row_eps[r] * R.out_mag[e] + bud.ou * std::fabs(want) +
                           (out.dt == DT::F16 ? 0x1.0p-24 : 0.0);
        c.entry(e, out.get(e), want, tol);
      }
  }

  // probabilities in float32 from the engine's own lse: its error enters once more
  void compare_probs(const Problem& P, const Result& R, const Budget& bud, const Tensor& probs,
                     const Tensor& lse) {
    Check c(*this, "probabilities");
    const int64_t rows = P.B * P.Hq * P.Nq;
    for (int64_t r = 0; r < rows; r++) {
      if (R.row_nan[r]) continue;  // NaN rows: their lse is NaN, so no probability is defined
      const double dl = std::isfinite(R.lse[r]) ? std::fabs(lse.get(r) - R.lse[r]) : 0;
      for (int64_t j = 0; j < P.Nk; j++) {
        const int64_t e = r * P.Nk + j;
        const double want = R.probs[e];
        // hidden: exactly 0; visible: relative error, with float32's underflow near 2^-126
        const double tol = R.vis[e] ? (bud.row_eps[r] + 2 * dl + 0x1.0p-23) * want + 1e-37 : 0;
        c.entry(e, probs.get(e), want, tol);
      }
    }
  }

  void compare_grad(const char* what, const std::vector<double>& want,
                    const std::vector<double>& mag, const Tensor& got, double eps) {
    Check c(*this, what);
    for (size_t e = 0; e < want.size(); e++)
      c.entry(int64_t(e), got.get(int64_t(e)), want[e], eps * mag[e]);
  }

  void compare_grads(const Problem& P, const Result& R, const Budget& bud, const Tensor& dq,
                     const Tensor& dk, const Tensor& dv, const Tensor* dbias,
                     const Tensor* dalibi) {
    (void)P;
    compare_grad("dq", R.dq, R.dq_mag, dq, bud.grad_eps);
    compare_grad("dk", R.dk, R.dk_mag, dk, bud.grad_eps);
    compare_grad("dv", R.dv, R.dv_mag, dv, bud.grad_eps);
    if (dbias) compare_grad("dbias", R.dbias, R.dbias_mag, *dbias, bud.grad_eps);
    if (dalibi) compare_grad("dalibi", R.dalibi, R.dalibi_mag, *dalibi, bud.grad_eps);
  }
};

}  // namespace drv
