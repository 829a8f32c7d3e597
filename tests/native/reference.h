// The torch-free driver's scalar reference: attention in double precision, written from the
// specification (docs/api.md; selfattn/reference.py) and not from the engine, plus its analytic
// backward and an error budget per row (see `Budget`).
//
// Scores of query row i (absolute position pos = start + i) against key j:
//     x = scale * q_i . k_j;  s = softcap ? softcap * tanh(x / softcap) : x
//     s += bias[b, h, i, j];  s -= slope[b, h] * |pos - j|
// visible when causal => j <= pos; left >= 0 => j >= pos - left; right >= 0 => j <= pos + right;
// mask[b, h, i, j]; segment ids: q_id >= 0 and kv_id == q_id. p = exp(s - lse) over the
// visible keys, out = sum_j p_ij z_ij v_j with z = keep / (1 - dropout_p) (the counter hash of
// selfattn/_rng.py, written out again here), lse = log sum_j exp(s_ij).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tensor.h"

namespace drv {

// ---- the dropout hash of selfattn/_rng.py (64-bit arithmetic, masked to 32 bits) ----
inline uint64_t mix32(uint64_t x) {
  const uint64_t M = 0xFFFFFFFFull;
  x ^= x >> 16;
  x = (x * 0x7FEB352Dull) & M;
  x ^= x >> 15;
  x = (x * 0x846CA68Bull) & M;
  return x ^ (x >> 16);
}
inline bool dropout_keep(uint64_t seed0, uint64_t seed1, uint64_t row, uint64_t col, double p) {
  const uint64_t M = 0xFFFFFFFFull;
  const uint64_t hr = mix32((row * 0x9E3779B9ull + (seed0 & M)) & M);
  const uint64_t hc = (col * 0x85EBCA6Bull + (seed1 & M)) & M;
  const double t = p * 4294967296.0;
  const uint64_t thr = t >= 4294967295.0 ? 4294967295ull : uint64_t(t);
  return mix32(hr ^ hc) >= thr;
}

// Quantized storage of k or v (a QuantizedKV): codes (B, H, N, X) int8 or (B, H, N, X / 2)
// packed 4-bit (code + 8, the even channel low), float32 scales (B, H, N, X / group), both
// contiguous; rotate: the codes are of the Walsh-Hadamard-rotated rows. bits 0: not quantized.
// The Problem's float tensor then holds the values they stand for (rotated back), which the
// reference reads; the engine reads the codes (driver.cpp, params_of).
struct Quantized {
  int bits = 0;
  int64_t group = 0;
  bool rotate = false;
  int64_t pad = 0;  // extra code bytes and scales after each row (a narrowed cache's view)
  std::vector<uint8_t> codes;
  std::vector<float> scales;
};

// One attention call: shapes, rules and inputs (the engine's Params are built from this).
struct Problem {
  int64_t B = 1, Hq = 1, Hkv = 1, Nq = 1, Nk = 1, D = 16, Dv = 16;
  double scale = 0.25, softcap = 0;
  bool causal = false;
  int64_t start = 0, left = -1, right = -1;
  double dropout_p = 0;
  uint32_t seed0 = 0, seed1 = 0;
  int64_t drop_hq = 0, drop_nq = 0, drop_b0 = 0, drop_h0 = 0, drop_r0 = 0;
  Tensor q, k, v;          // (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
  Quantized kq, vq;        // k / v as codes (bits 0: read as the tensors above)
  Tensor mask, bias;       // broadcastable (B, Hq, Nq, Nk), empty: none
  Tensor alibi;            // (alibi_b, Hq) as a 4-D (1, 1, alibi_b, Hq) tensor, empty: none
  std::vector<int64_t> q_ids, kv_ids;  // (B, Nq), (B, Nk), empty: none
  std::vector<double> sinks;  // (Hq,) one logit per query head with no value, empty: none
  Tensor dout;             // (B, Hq, Nq, Dv)
  std::vector<double> dlse;  // (B, Hq, Nq), empty: none
  // forward mode: tangents shaped like q, k, v, the bias and the slopes; empty: zero
  Tensor tq, tk, tv, tbias, talibi;

  int64_t G() const { return Hq / Hkv; }
  int64_t alibi_b() const { return alibi.shape[2]; }
  double slope(int64_t b, int64_t h) const {
    return alibi.at(0, 0, alibi_b() == 1 ? 0 : b, h);
  }
  bool visible(int64_t b, int64_t h, int64_t i, int64_t j) const {
    // long double: positions near INT64_MAX must not wrap (a huge side restricts nothing)
    const long double pos = (long double)start + (long double)i, jj = (long double)j;
    if (causal && jj > pos) return false;
    if (left >= 0 && jj < pos - (long double)left) return false;
    if (right >= 0 && jj > pos + (long double)right) return false;
    if (!mask.empty() && mask.at(b, h, i, j) == 0) return false;
    if (!q_ids.empty()) {
      const int64_t qi = q_ids[b * Nq + i], kj = kv_ids[b * Nk + j];
      if (qi < 0 || kj != qi) return false;
    }
    return true;
  }
  double distance(int64_t i, int64_t j) const {
    return std::fabs(double(start + i) - double(j));
  }
  // z = keep / (1 - p) of entry (b, h, i, j)
  double keep(int64_t b, int64_t h, int64_t i, int64_t j) const {
    if (dropout_p <= 0) return 1.0;
    const int64_t hq = drop_hq > 0 ? drop_hq : Hq, nq = drop_nq > 0 ? drop_nq : Nq;
    const uint64_t row = uint64_t(((drop_b0 + b) * hq + drop_h0 + h) * nq + drop_r0 + i);
    return dropout_keep(seed0, seed1, row, uint64_t(j), dropout_p) ? 1.0 / (1.0 - dropout_p) : 0;
  }
};

// The reference's results with, per entry, the magnitude its rounding error scales with.
struct Result {
  // forward
  std::vector<double> out, out_mag;  // (B, Hq, Nq, Dv): value; sum_j p |z v_jc|
  std::vector<double> lse;           // (B, Hq, Nq)
  std::vector<double> probs;         // (B, Hq, Nq, Nk), 0 where hidden
  std::vector<uint8_t> vis;          // (B, Hq, Nq, Nk)
  std::vector<uint8_t> row_nan;      // (B, Hq, Nq): sees a non-finite key
  std::vector<double> score_err;     // (B, Hq, Nq): |score| scale, see Budget
  std::vector<int64_t> nvis;         // (B, Hq, Nq)
  // backward: value and magnitude of every gradient entry
  std::vector<double> dq, dq_mag, dk, dk_mag, dv, dv_mag, dbias, dbias_mag, dalibi, dalibi_mag;
};

inline Result run_reference(const Problem& P, bool with_backward) {
  Result R;
  const int64_t rows = P.B * P.Hq * P.Nq;
  R.out.assign(rows * P.Dv, 0);
  R.out_mag.assign(rows * P.Dv, 0);
  R.lse.assign(rows, -INFINITY);
  R.probs.assign(rows * P.Nk, 0);
  R.vis.assign(rows * P.Nk, 0);
  R.row_nan.assign(rows, 0);
  R.score_err.assign(rows, 0);
  R.nvis.assign(rows, 0);
  std::vector<double> s(P.Nk), x(P.Nk), t(P.Nk), xabs(P.Nk);
  // per entry, for the backward: dL/ds and its magnitude, tanh' of the softcap
  std::vector<double> gs(rows * P.Nk, 0), gmag(rows * P.Nk, 0), dtanh(rows * P.Nk, 1);
  for (int64_t b = 0; b < P.B; b++)
    for (int64_t h = 0; h < P.Hq; h++) {
      const int64_t kvh = h / P.G();
      for (int64_t i = 0; i < P.Nq; i++) {
        const int64_t r = (b * P.Hq + h) * P.Nq + i;
        double m = -INFINITY, amax = 0;
        bool bad = false;
        for (int64_t j = 0; j < P.Nk; j++) {
          const bool vis = P.visible(b, h, i, j);
          R.vis[r * P.Nk + j] = vis;
          double dot = 0, dabs = 0;
          for (int64_t d = 0; d < P.D; d++) {
            const double qd = P.q.at(b, h, i, d), kd = P.k.at(b, kvh, j, d);
            dot += qd * kd;
            dabs += std::fabs(qd * kd);
          }
          x[j] = P.scale * dot;
          xabs[j] = std::fabs(P.scale) * dabs;
          double sj = x[j];
          if (P.softcap > 0) {
            t[j] = std::tanh(x[j] / P.softcap);
            sj = P.softcap * t[j];
            dtanh[r * P.Nk + j] = 1 - t[j] * t[j];
          }
          double a = xabs[j];
          if (!P.bias.empty()) {
            const double bj = P.bias.at(b, h, i, j);
            sj += bj;
            a += std::fabs(bj);
          }
          if (!P.alibi.empty()) {
            const double al = P.slope(b, h) * P.distance(i, j);
            sj -= al;
            a += std::fabs(al);
          }
          s[j] = sj;
          if (!vis) continue;
          R.nvis[r]++;
          if (!std::isfinite(dot)) {
            bad = true;
            continue;
          }
          m = sj > m ? sj : m;
          amax = a > amax ? a : amax;
        }
        R.score_err[r] = amax;
        if (bad) {
          R.row_nan[r] = 1;
          R.lse[r] = NAN;
          for (int64_t c = 0; c < P.Dv; c++) R.out[r * P.Dv + c] = NAN;
          continue;
        }
        // the sink: one more logit of the row, with no value (docs/api.md step 6)
        const double sink = P.sinks.empty() ? -INFINITY : P.sinks[h];
        m = sink > m ? sink : m;
        if (m == -INFINITY) continue;  // sees nothing (and no sink): out 0, lse -inf
        double l = sink == -INFINITY ? 0 : std::exp(sink - m);
        for (int64_t j = 0; j < P.Nk; j++)
          if (R.vis[r * P.Nk + j]) l += std::exp(s[j] - m);
        const double lse = m + std::log(l);
        R.lse[r] = lse;
        for (int64_t j = 0; j < P.Nk; j++) {
          if (!R.vis[r * P.Nk + j]) continue;
          const double p = std::exp(s[j] - lse), z = P.keep(b, h, i, j);
          R.probs[r * P.Nk + j] = p;
          for (int64_t c = 0; c < P.Dv; c++) {
            const double vc = P.v.at(b, kvh, j, c);
            R.out[r * P.Dv + c] += p * z * vc;
            R.out_mag[r * P.Dv + c] += p * std::fabs(z * vc);
          }
        }
      }
    }
  if (!with_backward) return R;

  // ---- backward: g = dL/ds = p (z dO.v - delta), delta = dO.out - dlse ----
  R.dq.assign(rows * P.D, 0);
  R.dq_mag.assign(rows * P.D, 0);
  R.dk.assign(P.B * P.Hkv * P.Nk * P.D, 0);
  R.dk_mag.assign(R.dk.size(), 0);
  R.dv.assign(P.B * P.Hkv * P.Nk * P.Dv, 0);
  R.dv_mag.assign(R.dv.size(), 0);
  const int64_t nbias = P.bias.empty() ? 0 : P.bias.numel();
  R.dbias.assign(nbias, 0);
  R.dbias_mag.assign(nbias, 0);
  const int64_t nal = P.alibi.empty() ? 0 : P.alibi_b() * P.Hq;
  R.dalibi.assign(nal, 0);
  R.dalibi_mag.assign(nal, 0);
  for (int64_t b = 0; b < P.B; b++)
    for (int64_t h = 0; h < P.Hq; h++) {
      const int64_t kvh = h / P.G();
      for (int64_t i = 0; i < P.Nq; i++) {
        const int64_t r = (b * P.Hq + h) * P.Nq + i;
        if (R.lse[r] == -INFINITY || R.row_nan[r]) continue;
        double delta = 0, delta_mag = 0;
        for (int64_t c = 0; c < P.Dv; c++) {
          const double g = P.dout.at(b, h, i, c);
          delta += g * R.out[r * P.Dv + c];
          delta_mag += std::fabs(g) * R.out_mag[r * P.Dv + c];
        }
        if (!P.dlse.empty()) {
          delta -= P.dlse[r];
          delta_mag += std::fabs(P.dlse[r]);
        }
        for (int64_t j = 0; j < P.Nk; j++) {
          if (!R.vis[r * P.Nk + j]) continue;
          const double p = R.probs[r * P.Nk + j], z = P.keep(b, h, i, j);
          double dp = 0, dp_mag = 0;
          for (int64_t c = 0; c < P.Dv; c++) {
            const double g = P.dout.at(b, h, i, c), vc = P.v.at(b, kvh, j, c);
            dp += g * vc;
            dp_mag += std::fabs(g * vc);
            R.dv[((b * P.Hkv + kvh) * P.Nk + j) * P.Dv + c] += p * z * g;
            R.dv_mag[((b * P.Hkv + kvh) * P.Nk + j) * P.Dv + c] += p * std::fabs(z * g);
          }
          gs[r * P.Nk + j] = p * (z * dp - delta);
          gmag[r * P.Nk + j] = p * (std::fabs(z) * dp_mag + delta_mag);
        }
      }
    }
  // through the scores: ds/dx = tanh' (1 without softcap), dx/dq = scale * k
  const double u_tanh = 1e-6;  // tanh' is computed from a float tanh: cancellation near 1
  for (int64_t b = 0; b < P.B; b++)
    for (int64_t h = 0; h < P.Hq; h++) {
      const int64_t kvh = h / P.G();
      for (int64_t i = 0; i < P.Nq; i++) {
        const int64_t r = (b * P.Hq + h) * P.Nq + i;
        for (int64_t j = 0; j < P.Nk; j++) {
          const int64_t e = r * P.Nk + j;
          if (gmag[e] == 0) continue;
          const double gx = gs[e] * dtanh[e] * P.scale;
          const double gxm = gmag[e] * (dtanh[e] + (P.softcap > 0 ? u_tanh : 0)) *
                             std::fabs(P.scale);
          for (int64_t d = 0; d < P.D; d++) {
            const double kd = P.k.at(b, kvh, j, d), qd = P.q.at(b, h, i, d);
            R.dq[r * P.D + d] += gx * kd;
            R.dq_mag[r * P.D + d] += gxm * std::fabs(kd);
            R.dk[((b * P.Hkv + kvh) * P.Nk + j) * P.D + d] += gx * qd;
            R.dk_mag[((b * P.Hkv + kvh) * P.Nk + j) * P.D + d] += gxm * std::fabs(qd);
          }
          if (nbias) {
            const int64_t off = P.bias.dense_offset(b, h, i, j);
            R.dbias[off] += gs[e];
            R.dbias_mag[off] += gmag[e];
          }
          if (nal) {
            const int64_t off = (P.alibi_b() == 1 ? 0 : b) * P.Hq + h;
            const double dist = P.distance(i, j);
            R.dalibi[off] -= gs[e] * dist;
            R.dalibi_mag[off] += gmag[e] * dist;
          }
        }
      }
    }
  return R;
}

// ---- forward mode (JVP) from the forward's results ----
// With p = exp(s - lse) (the sink inside the lse), per visible key
//     dS = scale (tq . k + q . tk) tanh' + tbias - tslope |pos - j|
//     c = sum_j p dS,   T_c = sum_j p z (tv_jc + dS v_jc),   d out = T - out c,   d lse = c
// and the magnitudes the rounding errors scale with (dS by its absolute sum dSm).
struct JvpResult {
  std::vector<double> tout, tout_mag;  // (B, Hq, Nq, Dv)
  std::vector<double> tlse, tlse_mag;  // (B, Hq, Nq)
};

inline JvpResult run_reference_jvp(const Problem& P, const Result& R, double u) {
  JvpResult J;
  const int64_t rows = P.B * P.Hq * P.Nq;
  J.tout.assign(rows * P.Dv, 0);
  J.tout_mag.assign(rows * P.Dv, 0);
  J.tlse.assign(rows, 0);
  J.tlse_mag.assign(rows, 0);
  std::vector<double> tacc(P.Dv), tmag(P.Dv);
  for (int64_t b = 0; b < P.B; b++)
    for (int64_t h = 0; h < P.Hq; h++) {
      const int64_t kvh = h / P.G();
      for (int64_t i = 0; i < P.Nq; i++) {
        const int64_t r = (b * P.Hq + h) * P.Nq + i;
        if (R.row_nan[r] || !std::isfinite(R.lse[r])) continue;
        double c = 0, cm = 0;
        for (int64_t x = 0; x < P.Dv; x++) tacc[x] = tmag[x] = 0;
        for (int64_t j = 0; j < P.Nk; j++) {
          if (!R.vis[r * P.Nk + j]) continue;
          double dot = 0, tdot = 0, tabs = 0;
          for (int64_t d = 0; d < P.D; d++) {
            const double qd = P.q.at(b, h, i, d), kd = P.k.at(b, kvh, j, d);
            dot += qd * kd;
            const double a = P.tq.empty() ? 0 : P.tq.at(b, h, i, d) * kd;
            const double e = P.tk.empty() ? 0 : qd * P.tk.at(b, kvh, j, d);
            tdot += a + e;
            tabs += std::fabs(a) + std::fabs(e);
          }
          double dtanh = 1, dtanh_mag = 1;
          if (P.softcap > 0) {
            const double t = std::tanh(P.scale * dot / P.softcap);
            dtanh = 1 - t * t;
            dtanh_mag = dtanh + 16 * u;  // from a rounded tanh: cancellation near 1
          }
          double ds = P.scale * tdot * dtanh, dsm = std::fabs(P.scale) * tabs * dtanh_mag;
          if (!P.tbias.empty()) {
            const double tb = P.tbias.at(b, h, i, j);
            ds += tb;
            dsm += std::fabs(tb);
          }
          if (!P.talibi.empty()) {
            const double ta = P.talibi.at(0, 0, P.talibi.shape[2] == 1 ? 0 : b, h) *
                              P.distance(i, j);
            ds -= ta;
            dsm += std::fabs(ta);
          }
          const double p = R.probs[r * P.Nk + j], z = P.keep(b, h, i, j);
          c += p * ds;
          cm += p * dsm;
          for (int64_t x = 0; x < P.Dv; x++) {
            const double vx = P.v.at(b, kvh, j, x);
            const double tvx = P.tv.empty() ? 0 : P.tv.at(b, kvh, j, x);
            tacc[x] += p * z * (tvx + ds * vx);
            tmag[x] += p * std::fabs(z) * (std::fabs(tvx) + dsm * std::fabs(vx));
          }
        }
        J.tlse[r] = c;
        J.tlse_mag[r] = cm;
        for (int64_t x = 0; x < P.Dv; x++) {
          J.tout[r * P.Dv + x] = tacc[x] - R.out[r * P.Dv + x] * c;
          J.tout_mag[r * P.Dv + x] = tmag[x] + R.out_mag[r * P.Dv + x] * cm;
        }
      }
    }
  return J;
}


// ---- the double backward (a gradient penalty's second pass) from the forward's results ----
// The VJP of the first-order backward with cotangents tq, tk, tv (of dq, dk, dv; empty: zero),
// the forward's own backward of the out and lse gradients folded in (hessian.h). Per visible
// key, D = dO.out - dlse:
//     dS = p (dO.v - D),  R = scale (tq.k + q.tk),  PX = p ((dO.v - D) R + dO.tv),  PR = p R
//     r = sum PR,  c = -sum PX + r dlse,  U = PX - r dS + c p,  PR' = PR - r p
//     q-bar += scale (U k + dS tk),  k-bar += scale (U q + dS tq),  v-bar += PR' dO
//     dO-bar = sum (PR v + p tv) - r out,  dlse-bar = r
// with the magnitude of every entry (the same sums over absolute values).
struct HessResult {
  std::vector<double> q, q_mag, k, k_mag, v, v_mag, dout, dout_mag, dlse, dlse_mag;
};

inline HessResult run_reference_hessian(const Problem& P, const Result& R) {
  HessResult H;
  const int64_t rows = P.B * P.Hq * P.Nq, keys = P.B * P.Hkv * P.Nk;
  H.q.assign(rows * P.D, 0);
  H.q_mag.assign(rows * P.D, 0);
  H.k.assign(keys * P.D, 0);
  H.k_mag.assign(keys * P.D, 0);
  H.v.assign(keys * P.Dv, 0);
  H.v_mag.assign(keys * P.Dv, 0);
  H.dout.assign(rows * P.Dv, 0);
  H.dout_mag.assign(rows * P.Dv, 0);
  H.dlse.assign(rows, 0);
  H.dlse_mag.assign(rows, 0);
  auto at = [](const Tensor& t, int64_t b, int64_t h, int64_t i, int64_t d) {
    return t.empty() ? 0.0 : t.at(b, h, i, d);
  };
  std::vector<double> ds(P.Nk), dsm(P.Nk), px(P.Nk), pxm(P.Nk), pr(P.Nk), prm(P.Nk);
  const double sc = std::fabs(P.scale);
  for (int64_t b = 0; b < P.B; b++)
    for (int64_t h = 0; h < P.Hq; h++) {
      const int64_t kvh = h / P.G();
      for (int64_t i = 0; i < P.Nq; i++) {
        const int64_t r = (b * P.Hq + h) * P.Nq + i;
        if (R.row_nan[r] || !std::isfinite(R.lse[r])) continue;
        const double dl = P.dlse.empty() ? 0 : P.dlse[r];
        double delta = -dl, delta_m = std::fabs(dl);
        for (int64_t c = 0; c < P.Dv; c++) {
          delta += P.dout.at(b, h, i, c) * R.out[r * P.Dv + c];
          delta_m += std::fabs(P.dout.at(b, h, i, c)) * R.out_mag[r * P.Dv + c];
        }
        double rs = 0, rsm = 0, xs = 0, xsm = 0;
        for (int64_t j = 0; j < P.Nk; j++) {
          ds[j] = dsm[j] = px[j] = pxm[j] = pr[j] = prm[j] = 0;
          if (!R.vis[r * P.Nk + j]) continue;
          const double p = R.probs[r * P.Nk + j];
          double dp = 0, dpm = 0, w = 0, wm = 0, rr = 0, rm = 0;
          for (int64_t c = 0; c < P.Dv; c++) {
            const double g = P.dout.at(b, h, i, c), vc = P.v.at(b, kvh, j, c);
            const double tvc = at(P.tv, b, kvh, j, c);
            dp += g * vc;
            dpm += std::fabs(g * vc);
            w += g * tvc;
            wm += std::fabs(g * tvc);
          }
          for (int64_t d = 0; d < P.D; d++) {
            const double x = at(P.tq, b, h, i, d) * P.k.at(b, kvh, j, d);
            const double y = P.q.at(b, h, i, d) * at(P.tk, b, kvh, j, d);
            rr += x + y;
            rm += std::fabs(x) + std::fabs(y);
          }
          rr *= P.scale;
          rm *= sc;
          ds[j] = p * (dp - delta);
          dsm[j] = p * (dpm + delta_m);
          px[j] = p * ((dp - delta) * rr + w);
          pxm[j] = p * ((dpm + delta_m) * rm + wm);
          pr[j] = p * rr;
          prm[j] = p * rm;
          rs += pr[j];
          rsm += prm[j];
          xs += px[j];
          xsm += pxm[j];
        }
        const double c0 = -xs + rs * dl, cm = xsm + rsm * std::fabs(dl);
        H.dlse[r] = rs;
        H.dlse_mag[r] = rsm;
        for (int64_t j = 0; j < P.Nk; j++) {
          if (!R.vis[r * P.Nk + j]) continue;
          const double p = R.probs[r * P.Nk + j];
          const double u = px[j] - rs * ds[j] + c0 * p, um = pxm[j] + rsm * dsm[j] + cm * p;
          const double pf = pr[j] - rs * p, pfm = prm[j] + rsm * p;
          const int64_t kj = (b * P.Hkv + kvh) * P.Nk + j;
          for (int64_t d = 0; d < P.D; d++) {
            const double kd = P.k.at(b, kvh, j, d), tkd = at(P.tk, b, kvh, j, d);
            const double qd = P.q.at(b, h, i, d), tqd = at(P.tq, b, h, i, d);
            H.q[r * P.D + d] += P.scale * (u * kd + ds[j] * tkd);
            H.q_mag[r * P.D + d] += sc * (um * std::fabs(kd) + dsm[j] * std::fabs(tkd));
            H.k[kj * P.D + d] += P.scale * (u * qd + ds[j] * tqd);
            H.k_mag[kj * P.D + d] += sc * (um * std::fabs(qd) + dsm[j] * std::fabs(tqd));
          }
          for (int64_t c = 0; c < P.Dv; c++) {
            const double g = P.dout.at(b, h, i, c), vc = P.v.at(b, kvh, j, c);
            const double tvc = at(P.tv, b, kvh, j, c);
            H.v[kj * P.Dv + c] += pf * g;
            H.v_mag[kj * P.Dv + c] += pfm * std::fabs(g);
            H.dout[r * P.Dv + c] += pr[j] * vc + p * tvc;
            H.dout_mag[r * P.Dv + c] += prm[j] * std::fabs(vc) + p * std::fabs(tvc);
          }
        }
        for (int64_t c = 0; c < P.Dv; c++) {
          H.dout[r * P.Dv + c] -= rs * R.out[r * P.Dv + c];
          H.dout_mag[r * P.Dv + c] += rsm * R.out_mag[r * P.Dv + c];
        }
      }
    }
  return H;
}

}  // namespace drv
