// The driver's cases: odd shapes (1, 17, 97, 113, 130 rows / keys; head dims 5, 40, 64, 80;
// Dv != D; GQA), every rule alone and all together, the decode path (few rows over up to 600
// keys, several chunks), 16-bit and float64 inputs, strided views, sinks, and the edges: Nq == 0,
// Nk == 0, Dv == 0, rows that see nothing, window sides near INT64_MAX, a non-finite key.
// Shapes stay small: the driver also runs under sanitizers and under qemu.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "reference.h"
#include "tensor.h"

namespace drv {

enum MaskKind { NO_MASK, MASK_FULL, MASK_ROWS_KEYS, MASK_KEY_PADDING };
enum BiasKind { NO_BIAS, BIAS_FULL, BIAS_HEADS, BIAS_KEYS, BIAS_ROWS };

struct Spec {
  std::string name;
  int64_t B = 1, Hq = 1, Hkv = 1, Nq = 17, Nk = 17, D = 40, Dv = 40;
  bool causal = false;
  bool start_set = false;
  int64_t start = 0;  // default: Nk - Nq (the last query row sits at the last key)
  int64_t left = -1, right = -1;
  MaskKind mask = NO_MASK;
  BiasKind bias = NO_BIAS;
  int alibi_b = 0;  // 0: none, 1: (Hq,), B: (B, Hq)
  double softcap = 0, dropout_p = 0;
  bool ids = false, dlse = false, strided = false, lse_only = false, nan_key = false;
  bool sinks = false;  // per head: random, one far above the scores (8), one -inf
  bool backward = true, dbias = true, dalibi = true;
  bool probs = true;  // check probabilities and statistics from the engine's lse
  int tangents = 7;  // forward mode: tangents of q (1), k (2), v (4); the bias and slopes' too
  DT dt = DT::F32, out_dt = DT::F32;
  DT bias_dt = DT::F32;
  double amp = 1.0;
  int pool_mode = 0;
  uint64_t seed = 1;
  int kbits = 0, vbits = 0;  // quantized k / v (8 or 4; 0: plain)
  bool rotate = false;       // ... with Walsh-Hadamard-rotated codes
  int64_t group = 0;         // channels per scale (0: the default)
  int64_t qpad = 0;          // code bytes and scales past each row (a strided cache view)
  int64_t tail = 0;  // the last keys also read as a float window (Params::kw, vw; forward)
};

// Random codes and scales for t (B, H, N, X) at `bits`, with groups of the default size (the
// whole row for 8 bits, gcd(X, 32) for 4), and t set to the values they stand for: code *
// scale, rotated back (an orthonormal block Walsh-Hadamard transform, in double) when rotated.
// `group` (0: default) overrides the group size; `pad` leaves that many unused code bytes and
// scales (random) after each row, as a view of a larger cache has.
inline Quantized quantize_random(Tensor& t, int bits, bool rotate, Rng& rng, int64_t group = 0,
                                 int64_t pad = 0) {
  Quantized qz;
  const int64_t B = t.shape[0], H = t.shape[1], N = t.shape[2], X = t.shape[3];
  int64_t g = X;
  if (bits == 4)
    for (g = 32; X % g; g /= 2) {
    }
  if (group) g = group;
  qz.bits = bits;
  qz.group = g;
  qz.rotate = rotate;
  qz.pad = pad;
  const int64_t row = (bits == 8 ? X : X / 2) + pad, qmax = bits == 8 ? 127 : 7;
  const int64_t srow = X / g + pad;
  qz.codes.assign(size_t(B * H * N * row), 0);
  qz.scales.assign(size_t(B * H * N * srow), 0.0f);
  for (auto& c : qz.codes) c = uint8_t(rng.below(256));  // padding: garbage the kernels skip
  for (auto& x : qz.scales) x = float(rng.uniform() * 1e30);
  std::vector<double> r(static_cast<size_t>(X), 0.0);
  for (int64_t b = 0; b < B; b++)
    for (int64_t h = 0; h < H; h++)
      for (int64_t j = 0; j < N; j++) {
        const int64_t x = (b * H + h) * N + j;
        for (int64_t k = 0; k < X / g; k++)
          qz.scales[size_t(x * srow + k)] = float((0.2 + rng.uniform()) / double(qmax));
        for (int64_t d = 0; d < X; d++) {
          const int64_t c = rng.below(2 * qmax + 1) - qmax;
          if (bits == 8) {
            qz.codes[size_t(x * row + d)] = uint8_t(int8_t(c));
          } else {
            uint8_t& byte = qz.codes[size_t(x * row + d / 2)];
            if (d % 2 == 0) byte = 0;
            byte = uint8_t(byte | (uint8_t(c + 8) << (d % 2 ? 4 : 0)));
          }
          r[size_t(d)] = double(c) * double(qz.scales[size_t(x * srow + d / g)]);
        }
        if (rotate) {
          const int64_t blk = X & -X;
          for (int64_t s = 1; s < blk; s *= 2)
            for (int64_t i = 0; i < X; i++)
              if ((i % (2 * s)) < s) {
                const double a = r[size_t(i)], c = r[size_t(i + s)];
                r[size_t(i)] = a + c;
                r[size_t(i + s)] = a - c;
              }
          for (double& y : r) y /= std::sqrt(double(blk));
        }
        for (int64_t d = 0; d < X; d++) t.set(b, h, j, d, r[size_t(d)]);
      }
  return qz;
}

inline Problem make_problem(const Spec& s) {
  Rng rng(s.seed * 1000003 + std::hash<std::string>()(s.name));
  Problem p;
  p.B = s.B;
  p.Hq = s.Hq;
  p.Hkv = s.Hkv;
  p.Nq = s.Nq;
  p.Nk = s.Nk;
  p.D = s.D;
  p.Dv = s.Dv;
  p.scale = 1.0 / std::sqrt(double(s.D > 0 ? s.D : 1));
  p.softcap = s.softcap;
  p.causal = s.causal;
  p.start = s.start_set ? s.start : s.Nk - s.Nq;
  p.left = s.left;
  p.right = s.right;
  static const int bnhd[4] = {0, 2, 1, 3};  // (B, N, H, D) storage, as a transposed view
  const int* order = s.strided ? bnhd : nullptr;
  p.q = Tensor(s.dt, s.B, s.Hq, s.Nq, s.D, order);
  p.k = Tensor(s.dt, s.B, s.Hkv, s.Nk, s.D, order);
  p.v = Tensor(s.dt, s.B, s.Hkv, s.Nk, s.Dv, order);
  fill_normal(p.q, rng, s.amp);
  fill_normal(p.k, rng, s.amp);
  fill_normal(p.v, rng, 1.0);
  if (s.kbits) p.kq = quantize_random(p.k, s.kbits, s.rotate, rng, s.group, s.qpad);
  if (s.vbits) p.vq = quantize_random(p.v, s.vbits, s.rotate, rng, s.group, s.qpad);
  if (s.nan_key && s.Nk > 0) {  // key Nk / 2 of kv head 0 not finite: seen by later rows only
    const int64_t j = s.Nk / 2;
    p.k.set(0, 0, j, 0, NAN);
  }
  switch (s.mask) {
    case NO_MASK: break;
    case MASK_FULL: p.mask = Tensor(DT::U8, s.B, s.Hq, s.Nq, s.Nk); break;
    case MASK_ROWS_KEYS: p.mask = Tensor(DT::U8, 1, 1, s.Nq, s.Nk); break;
    case MASK_KEY_PADDING: p.mask = Tensor(DT::U8, s.B, 1, 1, s.Nk); break;
  }
  if (s.mask != NO_MASK) {
    Tensor& m = p.mask;
    for (int64_t a = 0; a < m.shape[0]; a++)
      for (int64_t b = 0; b < m.shape[1]; b++)
        for (int64_t c = 0; c < m.shape[2]; c++) {
          const bool dead_row = m.shape[2] > 2 && c % 7 == 3;  // some rows see nothing
          for (int64_t d = 0; d < m.shape[3]; d++) {
            bool vis = !dead_row && rng.uniform() < 0.7;
            if (s.mask == MASK_KEY_PADDING) vis = d < s.Nk - 1 - a * 5;  // trailing padding
            m.set(a, b, c, d, vis);
          }
        }
  }
  switch (s.bias) {
    case NO_BIAS: break;
    case BIAS_FULL: p.bias = Tensor(s.bias_dt, s.B, s.Hq, s.Nq, s.Nk); break;
    case BIAS_HEADS: p.bias = Tensor(s.bias_dt, 1, s.Hq, s.Nq, s.Nk); break;
    case BIAS_KEYS: p.bias = Tensor(s.bias_dt, 1, 1, 1, s.Nk); break;
    case BIAS_ROWS: p.bias = Tensor(s.bias_dt, s.B, 1, s.Nq, 1); break;
  }
  if (s.bias != NO_BIAS) fill_normal(p.bias, rng, 1.0);
  if (s.alibi_b > 0) {
    p.alibi = Tensor(DT::F32, 1, 1, s.alibi_b, s.Hq);
    for (int64_t b = 0; b < s.alibi_b; b++)
      for (int64_t h = 0; h < s.Hq; h++) p.alibi.set(0, 0, b, h, 0.02 + 0.3 * rng.uniform());
  }
  if (s.ids) {  // documents of random lengths; padding (-1) at the end of some sequences
    p.q_ids.resize(s.B * s.Nq);
    p.kv_ids.resize(s.B * s.Nk);
    for (int64_t b = 0; b < s.B; b++) {
      int64_t doc = 0, left = 1 + rng.below(40);
      for (int64_t j = 0; j < s.Nk; j++) {
        if (--left == 0) {
          doc++;
          left = 1 + rng.below(40);
        }
        p.kv_ids[b * s.Nk + j] = j >= s.Nk - 3 * b ? -1 : doc;
      }
      // rows follow their positions' documents (bottom-right), with padded rows at the end
      for (int64_t i = 0; i < s.Nq; i++) {
        const int64_t pos = p.start + i;
        int64_t id = pos >= 0 && pos < s.Nk ? p.kv_ids[b * s.Nk + pos] : doc + 1;
        if (i >= s.Nq - 2 * b) id = -1;
        p.q_ids[b * s.Nq + i] = id;
      }
    }
  }
  p.dropout_p = s.dropout_p;
  if (s.dropout_p > 0) {
    p.seed0 = uint32_t(rng.next());
    p.seed1 = uint32_t(rng.next());
    // a shard of a larger call, as ring attention passes: offsets into the global row ids
    p.drop_hq = s.Hq + 2;
    p.drop_nq = s.Nq + 5;
    p.drop_b0 = 1;
    p.drop_h0 = 2;
    p.drop_r0 = 3;
  }
  if (s.sinks) {
    p.sinks.resize(s.Hq);
    for (int64_t h = 0; h < s.Hq; h++) p.sinks[h] = 1.5 * rng.normal();
    if (s.Hq > 1) p.sinks[1] = 8.0;
    if (s.Hq > 3) p.sinks[3] = -INFINITY;
  }
  p.dout = Tensor(DT::F32, s.B, s.Hq, s.Nq, s.Dv);
  fill_normal(p.dout, rng, 1.0);
  if (s.dlse) {
    p.dlse.resize(s.B * s.Hq * s.Nq);
    for (double& x : p.dlse) x = rng.normal();
  }
  // forward mode's tangents, drawn last (the draws above stay those of every other check)
  if (s.tangents & 1) {
    p.tq = Tensor(s.dt, s.B, s.Hq, s.Nq, s.D, order);
    fill_normal(p.tq, rng, 1.0);
  }
  if (s.tangents & 2) {
    p.tk = Tensor(s.dt, s.B, s.Hkv, s.Nk, s.D, order);
    fill_normal(p.tk, rng, 1.0);
  }
  if (s.tangents & 4) {
    p.tv = Tensor(s.dt, s.B, s.Hkv, s.Nk, s.Dv, order);
    fill_normal(p.tv, rng, 1.0);
  }
  if (!p.bias.empty()) {
    p.tbias = Tensor(s.bias_dt, p.bias.shape[0], p.bias.shape[1], p.bias.shape[2],
                     p.bias.shape[3]);
    fill_normal(p.tbias, rng, 1.0);
  }
  if (!p.alibi.empty()) {
    p.talibi = Tensor(DT::F32, 1, 1, s.alibi_b, s.Hq);
    fill_normal(p.talibi, rng, 0.1);
  }
  return p;
}

inline std::vector<Spec> all_specs() {
  const int64_t M = INT64_MAX;
  std::vector<Spec> v;
  auto add = [&](const std::string& name, auto&& tweak) {
    Spec s;
    s.name = name;
    tweak(s);
    v.push_back(s);
  };
  // ---- shapes ----
  add("tiny 1x1 D1", [](Spec& s) { s.Nq = s.Nk = 1; s.D = s.Dv = 1; });
  add("plain 17x17 D64", [](Spec& s) { s.D = s.Dv = 64; });
  add("odd D5 Dv3", [](Spec& s) { s.Nq = 97; s.Nk = 113; s.D = 5; s.Dv = 3; });
  add("gqa 97x113 D40 Dv80", [](Spec& s) {
    s.B = 2; s.Hq = 4; s.Hkv = 2; s.Nq = 97; s.Nk = 113; s.D = 40; s.Dv = 80; s.dlse = true;
  });
  add("130x130 D80 Dv64 pool", [](Spec& s) {
    s.Nq = s.Nk = 130; s.D = 80; s.Dv = 64; s.Hq = 2; s.Hkv = 1; s.pool_mode = 1;
  });
  add("head dim 261 (blocked sums)", [](Spec& s) { s.Nq = 17; s.Nk = 33; s.D = 261; s.Dv = 8; });
  add("peaky scores", [](Spec& s) { s.Nq = 97; s.Nk = 97; s.D = 64; s.Dv = 64; s.amp = 3; });
  add("strided BNHD", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Hkv = 2; s.Nq = 113; s.Nk = 97; s.D = s.Dv = 64; s.strided = true;
  });
  // ---- rules, one at a time ----
  add("causal 130x130", [](Spec& s) { s.Nq = s.Nk = 130; s.D = s.Dv = 64; s.causal = true; });
  add("causal Nq>Nk (start<0)", [](Spec& s) {
    s.Nq = 130; s.Nk = 97; s.D = 80; s.Dv = 40; s.causal = true;
  });
  add("causal start 0", [](Spec& s) {
    s.Nq = 97; s.Nk = 130; s.causal = true; s.start_set = true; s.start = 0;
  });
  add("window (17, 5)", [](Spec& s) { s.Nq = s.Nk = 113; s.left = 17; s.right = 5; });
  add("window (31, 0) causal", [](Spec& s) {
    s.Nq = s.Nk = 130; s.left = 31; s.right = 0; s.causal = true; s.pool_mode = 1;
  });
  add("window (0, 0)", [](Spec& s) { s.Nq = s.Nk = 97; s.left = 0; s.right = 0; });
  add("window past the keys", [](Spec& s) {  // rows whose window holds no key: see nothing
    s.Nq = 17; s.Nk = 97; s.left = 3; s.right = 3; s.start_set = true; s.start = 90;
  });
  add("window (max, max)", [=](Spec& s) { s.Nq = 17; s.Nk = 97; s.left = M; s.right = M; });
  add("window (max, 0)", [=](Spec& s) { s.Nq = 97; s.Nk = 97; s.left = M; s.right = 0; });
  add("window (0, max) start<0", [=](Spec& s) {
    s.Nq = 113; s.Nk = 97; s.left = M - 1; s.right = M; s.start_set = true; s.start = -40;
  });
  add("mask full", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Hkv = 1; s.Nq = 97; s.Nk = 113; s.mask = MASK_FULL;
  });
  add("mask rows x keys", [](Spec& s) { s.Nq = 113; s.Nk = 130; s.mask = MASK_ROWS_KEYS; });
  add("mask key padding", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Hkv = 2; s.Nq = 17; s.Nk = 97; s.mask = MASK_KEY_PADDING;
  });
  add("bias full", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Hkv = 1; s.Nq = 97; s.Nk = 113; s.bias = BIAS_FULL;
  });
  add("bias heads (B broadcast)", [](Spec& s) {
    s.B = 2; s.Hq = 4; s.Hkv = 2; s.Nq = 17; s.Nk = 113; s.bias = BIAS_HEADS;
  });
  add("bias keys float64", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Hkv = 2; s.Nq = 97; s.Nk = 97; s.bias = BIAS_KEYS;
    s.bias_dt = DT::F64; s.pool_mode = 1;
  });
  add("bias rows", [](Spec& s) { s.B = 2; s.Nq = 113; s.Nk = 17; s.bias = BIAS_ROWS; });
  add("alibi (Hq)", [](Spec& s) { s.Hq = 4; s.Hkv = 1; s.Nq = 97; s.Nk = 113; s.alibi_b = 1; });
  add("alibi (B, Hq) causal", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Hkv = 2; s.Nq = s.Nk = 113; s.alibi_b = 2; s.causal = true;
  });
  add("softcap 5", [](Spec& s) { s.Nq = 97; s.Nk = 113; s.softcap = 5; s.amp = 3; });
  // scores near 1e11: the softmax's one-FMA exponent carried the rounding of m * log2 e
  // (thousands) into every exponent and the rows came out NaN (exp_row subtracts first now)
  // (no probabilities: exp(s - lse) from a float32 lse near 1e11, whose ulp is 8192, is not
  // defined to better than a factor e^4096 in any implementation)
  add("huge scores", [](Spec& s) {
    s.Nq = 97; s.Nk = 97; s.D = 64; s.Dv = 64; s.amp = 3e5; s.probs = false;
  });
  add("huge scores decode", [](Spec& s) {
    s.Hq = 4; s.Hkv = 1; s.Nq = 1; s.Nk = 640; s.D = s.Dv = 64; s.amp = 3e5; s.backward = false;
    s.probs = false;
  });
  add("softcap 50 D80", [](Spec& s) { s.Nq = 113; s.Nk = 97; s.D = 80; s.Dv = 80; s.softcap = 50; });
  add("segment ids", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Hkv = 1; s.Nq = s.Nk = 130; s.ids = true;
  });
  add("segment ids causal", [](Spec& s) {
    s.B = 2; s.Nq = 97; s.Nk = 113; s.ids = true; s.causal = true;
  });
  add("dropout 0.3", [](Spec& s) { s.Hq = 2; s.Nq = 97; s.Nk = 113; s.dropout_p = 0.3; });
  add("dropout 0.9 causal", [](Spec& s) {
    s.Nq = s.Nk = 113; s.dropout_p = 0.9; s.causal = true; s.pool_mode = 1;
  });
  // ---- everything at once ----
  add("all rules GQA Dv!=D", [](Spec& s) {
    s.B = 2; s.Hq = 4; s.Hkv = 2; s.Nq = 97; s.Nk = 130; s.D = 40; s.Dv = 64;
    s.causal = true; s.left = 60; s.right = 0; s.mask = MASK_FULL; s.bias = BIAS_HEADS;
    s.alibi_b = 2; s.softcap = 20; s.ids = true; s.dropout_p = 0.2; s.dlse = true;
  });
  add("all rules strided pool", [](Spec& s) {
    s.B = 1; s.Hq = 2; s.Hkv = 1; s.Nq = 113; s.Nk = 113; s.D = 64; s.Dv = 40;
    s.left = 40; s.right = 7; s.mask = MASK_ROWS_KEYS; s.bias = BIAS_FULL; s.alibi_b = 1;
    s.softcap = 30; s.ids = true; s.dropout_p = 0.1; s.strided = true; s.pool_mode = 1;
  });
  // ---- decode: few rows (G * Nq <= 16) over a long cache, split into key chunks ----
  add("decode 1 row 600 keys G3", [](Spec& s) {
    s.Hq = 6; s.Hkv = 2; s.Nq = 1; s.Nk = 600; s.D = s.Dv = 64; s.causal = true;
  });
  // the float path's P V in blocks of 128 keys with 3 x 4 register tiles (AVX2, up to 3 rows):
  // 2 rows, 3 column blocks, a chunk ending mid-block; 1 row of D 32 with a non-finite key
  add("decode 2 rows G2 Dv 96 Nk 1031", [](Spec& s) {
    s.Hq = 4; s.Hkv = 2; s.Nq = 1; s.Nk = 1031; s.D = 64; s.Dv = 96; s.causal = true;
    s.pool_mode = 1;
  });
  add("decode 1 row D32 Nk 300 nan key", [](Spec& s) {
    s.Hq = 2; s.Hkv = 2; s.Nq = 1; s.Nk = 300; s.D = s.Dv = 32; s.nan_key = true;
  });
  // the float path's blocks of 128 keys with the softmax online over them (AVX2, up to 3 rows,
  // no dropout): every rule on 3 rows (forward), scores spread enough that later blocks raise
  // the maximum; 1 row of D 128 over 5 chunks with a non-finite key (the retry)
  add("decode blocks 3 rows every rule but dropout", [](Spec& s) {
    s.Hq = 3; s.Hkv = 1; s.Nq = 1; s.Nk = 700; s.D = s.Dv = 64; s.causal = true; s.left = 450;
    s.mask = MASK_FULL; s.bias = BIAS_FULL; s.alibi_b = 1; s.softcap = 20; s.amp = 1.5;
    s.backward = false;
  });
  add("decode blocks 1 row D128 nan key", [](Spec& s) {
    s.Hq = 1; s.Hkv = 1; s.Nq = 1; s.Nk = 1100; s.D = s.Dv = 128; s.nan_key = true;
  });
  add("decode 2 rows G4 (panels)", [](Spec& s) {
    s.Hq = 4; s.Hkv = 1; s.Nq = 2; s.Nk = 600; s.D = 64; s.Dv = 40; s.pool_mode = 1;
  });
  add("decode rules", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Hkv = 2; s.Nq = 3; s.Nk = 600; s.D = 40; s.Dv = 80; s.causal = true;
    s.left = 300; s.mask = MASK_FULL; s.bias = BIAS_FULL; s.alibi_b = 2; s.softcap = 10;
    s.dropout_p = 0.25;
  });
  add("decode ids float16 in", [](Spec& s) {
    s.Hq = 3; s.Hkv = 1; s.Nq = 1; s.Nk = 130; s.ids = true; s.dt = DT::F16; s.out_dt = DT::F32;
  });
  add("decode strided D80", [](Spec& s) {
    s.B = 2; s.Hq = 8; s.Hkv = 2; s.Nq = 1; s.Nk = 113; s.D = s.Dv = 80; s.strided = true;
  });
  // ---- dtypes ----
  add("bfloat16 in and out", [](Spec& s) {
    s.Hq = 2; s.Nq = 97; s.Nk = 113; s.D = s.Dv = 64; s.dt = DT::BF16; s.out_dt = DT::BF16;
    s.causal = true;
  });
  add("float16 in, float32 out", [](Spec& s) {
    s.Nq = 113; s.Nk = 97; s.D = 40; s.Dv = 80; s.dt = DT::F16; s.out_dt = DT::F32;
  });
  add("float16 out", [](Spec& s) { s.Nq = 17; s.Nk = 130; s.dt = DT::F16; s.out_dt = DT::F16; });
  add("float64", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Hkv = 1; s.Nq = 97; s.Nk = 113; s.dt = s.out_dt = DT::F64;
    s.causal = true; s.bias = BIAS_FULL; s.alibi_b = 1; s.softcap = 20; s.dropout_p = 0.2;
  });
  add("float64 decode", [](Spec& s) {
    s.Hq = 2; s.Nq = 1; s.Nk = 600; s.dt = s.out_dt = DT::F64; s.mask = MASK_FULL;
  });
  // ---- sinks (one logit per head with no value) ----
  add("sinks GQA mask empty rows", [](Spec& s) {
    s.B = 2; s.Hq = 4; s.Hkv = 2; s.Nq = 33; s.Nk = 97; s.mask = MASK_FULL; s.sinks = true;
    s.dlse = true;
  });
  add("sinks decode window", [](Spec& s) {
    s.Hq = 6; s.Hkv = 2; s.Nq = 1; s.Nk = 600; s.D = s.Dv = 64; s.left = 200; s.sinks = true;
  });
  add("sinks float64 rules", [](Spec& s) {
    s.Hq = 4; s.Hkv = 1; s.Nq = 40; s.Nk = 97; s.dt = s.out_dt = DT::F64; s.causal = true;
    s.bias = BIAS_HEADS; s.alibi_b = 1; s.softcap = 20; s.sinks = true; s.dlse = true;
  });
  add("sinks window past the keys", [](Spec& s) {  // rows that see nothing: lse = the sink
    s.Hq = 2; s.Nq = 17; s.Nk = 97; s.left = 3; s.right = 3; s.start_set = true; s.start = 90;
    s.sinks = true;
  });
  // ---- quantized keys and values, read from their codes (small: also under qemu) ----
  add("q8 decode G3", [](Spec& s) {
    s.Hq = 6; s.Hkv = 2; s.Nq = 1; s.Nk = 600; s.D = s.Dv = 64; s.causal = true;
    s.kbits = s.vbits = 8; s.backward = false;
  });
  add("q4 rotated decode rules D40 Dv80", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Hkv = 2; s.Nq = 3; s.Nk = 300; s.D = 40; s.Dv = 80; s.causal = true;
    s.left = 200; s.mask = MASK_FULL; s.bias = BIAS_FULL; s.alibi_b = 2; s.softcap = 10;
    s.kbits = s.vbits = 4; s.rotate = true; s.backward = false;
  });
  add("q8 rotated k, plain v, prefill", [](Spec& s) {
    s.Hq = 2; s.Hkv = 1; s.Nq = s.Nk = 97; s.D = s.Dv = 64; s.causal = true; s.kbits = 8;
    s.rotate = true; s.backward = false;
  });
  add("q4 v, plain k, prefill ids", [](Spec& s) {
    s.B = 2; s.Nq = 97; s.Nk = 113; s.D = 40; s.Dv = 64; s.ids = true; s.vbits = 4;
    s.backward = false;
  });
  add("q4 rotated float64 decode", [](Spec& s) {
    s.Hq = 2; s.Nq = 1; s.Nk = 130; s.dt = s.out_dt = DT::F64; s.kbits = 4; s.vbits = 8;
    s.rotate = true; s.backward = false;
  });
  // decode read straight from the codes (quant.h's direct_codes: D a multiple of 2W, groups of
  // whole vectors): every format, R = G * Nq of 1..4 and past it, odd key counts across split-K
  // chunks, a scale per row (folded into the scores / probabilities) or per group, padded rows
  const int64_t nks[] = {1, 97, 257, 1023, 1025};
  for (int bits : {8, 4})
    for (int64_t nk : nks)
      add("q" + std::to_string(bits) + " codes decode G3 Nk " + std::to_string(nk), [=](Spec& s) {
        s.Hq = 3; s.Nq = 1; s.Nk = nk; s.D = s.Dv = 64; s.causal = true; s.kbits = s.vbits = bits;
        s.rotate = bits == 4; s.backward = false;
      });
  // int8 keys of 64 channels with one scale per row: scored on AMX tiles where the CPU has them
  // (amx.h; q rows as int8 digits scaled by a power of two: tiny and large rows too)
  for (double amp : {1e-3, 8.0})
    add("q8 codes decode R 4 Nk 200 amplitude " + std::to_string(amp), [=](Spec& s) {
      s.Hq = 4; s.Nq = 1; s.Nk = 200; s.D = s.Dv = 64; s.kbits = s.vbits = 8; s.amp = amp;
      s.backward = false;
    });
  add("q8 codes decode groups of 16, R 4, padded rows", [](Spec& s) {
    s.Hq = 4; s.Hkv = 2; s.Nq = 2; s.Nk = 301; s.D = s.Dv = 64; s.kbits = s.vbits = 8;
    s.group = 16; s.qpad = 3; s.bias = BIAS_FULL; s.backward = false;
  });
  add("q4 codes decode one group per row, R 2, padded rows", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Nq = 1; s.Nk = 555; s.D = s.Dv = 128; s.kbits = s.vbits = 4;
    s.group = 128; s.qpad = 5; s.left = 300; s.backward = false;
  });
  add("q4 codes decode R 1 D32, q8 v groups of 8", [](Spec& s) {
    s.Nq = 1; s.Nk = 1025; s.D = 32; s.Dv = 32; s.kbits = 4; s.vbits = 8; s.group = 8;
    s.rotate = true; s.sinks = true; s.backward = false;
  });
  add("q4 codes decode R 6 (panels), float64", [](Spec& s) {
    s.Hq = 6; s.Hkv = 2; s.Nq = 2; s.Nk = 257; s.D = s.Dv = 64; s.kbits = s.vbits = 4;
    s.dt = s.out_dt = DT::F64; s.causal = true; s.backward = false;
  });
  // 4-bit keys of 64 channels read two rows to a vector (quant.h, qk_q4_pairs_tile): groups of
  // 8, 16, 32 (the default) and 64 channels, R 1..4, pairs cut by the end of the keys (odd and
  // short last tiles), rows padded (the two halves loaded apart), scales padded (another path)
  add("q4 pairs decode groups of 8, R 4, Nk 45", [](Spec& s) {
    s.Hq = 4; s.Hkv = 1; s.Nq = 1; s.Nk = 45; s.D = s.Dv = 64; s.kbits = s.vbits = 4;
    s.group = 8; s.backward = false;
  });
  add("q4 pairs decode groups of 16, R 2, Nk 50, causal", [](Spec& s) {
    s.Hq = 2; s.Hkv = 1; s.Nq = 1; s.Nk = 50; s.D = s.Dv = 64; s.kbits = 4; s.vbits = 8;
    s.group = 16; s.causal = true; s.backward = false;
  });
  add("q4 pairs decode one group per row, R 1, padded rows", [](Spec& s) {
    s.Nq = 1; s.Nk = 333; s.D = s.Dv = 64; s.kbits = s.vbits = 4; s.group = 64; s.qpad = 3;
    s.backward = false;
  });
  add("q4 pairs decode groups of 32 padded (not paired), R 3", [](Spec& s) {
    s.Hq = 3; s.Nq = 1; s.Nk = 77; s.D = s.Dv = 64; s.kbits = s.vbits = 4; s.qpad = 1;
    s.backward = false;
  });
  add("q4 pairs decode G4 x Nq 1 rotated, amp 6, Nk 1031", [](Spec& s) {
    s.Hq = 8; s.Hkv = 2; s.Nq = 1; s.Nk = 1031; s.D = s.Dv = 64; s.kbits = s.vbits = 4;
    s.rotate = true; s.amp = 6; s.backward = false;
  });
  // int8 keys of 64 channels read one 64-byte load per key (quant.h, q8_quads): R 1, 2 and 4
  // (3: the G3 cases above), rows padded (loads off the line), a short last tile
  add("q8 quads decode R 4, padded rows, Nk 77", [](Spec& s) {
    s.Hq = 4; s.Hkv = 1; s.Nq = 1; s.Nk = 77; s.D = s.Dv = 64; s.kbits = s.vbits = 8;
    s.qpad = 5; s.backward = false;
  });
  add("q8 quads decode R 1, Nk 33, amp 6", [](Spec& s) {
    s.Nq = 1; s.Nk = 33; s.D = s.Dv = 64; s.kbits = 8; s.amp = 6; s.backward = false;
  });
  add("q8 quads decode R 2 (Nq 2), causal, Nk 1100, q4 v", [](Spec& s) {
    s.Nq = 2; s.Nk = 1100; s.D = s.Dv = 64; s.kbits = 8; s.vbits = 4; s.causal = true;
    s.backward = false;
  });
  // more layouts read from the codes: groups under, equal to and over 64 channels, several
  // 64-channel blocks, R 1..4, scales strided (padded rows), a 4-bit k with an int8 v; D 96
  add("q8 codes decode D128 groups of 32, R 1, padded rows", [](Spec& s) {
    s.Nq = 1; s.Nk = 333; s.D = s.Dv = 128; s.kbits = s.vbits = 8; s.group = 32; s.qpad = 7;
    s.causal = true; s.backward = false;
  });
  add("q8 codes decode D256 groups of 128, R 4", [](Spec& s) {
    s.Hq = 4; s.Nq = 1; s.Nk = 200; s.D = s.Dv = 256; s.kbits = s.vbits = 8; s.group = 128;
    s.backward = false;
  });
  add("q4 codes decode D192 groups of 64, R 3, softcap", [](Spec& s) {
    s.Hq = 3; s.Nq = 1; s.Nk = 150; s.D = s.Dv = 192; s.kbits = s.vbits = 4; s.group = 64;
    s.softcap = 15; s.backward = false;
  });
  add("q4 rotated codes decode D128 groups of 32, R 2 (GQA 2 x Nq 1), amp 6", [](Spec& s) {
    s.Hq = 4; s.Hkv = 2; s.Nq = 1; s.Nk = 77; s.D = s.Dv = 128; s.kbits = 4; s.vbits = 8;
    s.rotate = true; s.amp = 6; s.backward = false;
  });
  add("q8 codes decode D96", [](Spec& s) {
    s.Hq = 3; s.Nq = 1; s.Nk = 100; s.D = s.Dv = 96; s.kbits = s.vbits = 8; s.backward = false;
  });
  add("q8 codes decode dropout", [](Spec& s) {
    s.Hq = 3; s.Nq = 1; s.Nk = 400; s.D = s.Dv = 64; s.kbits = s.vbits = 8; s.dropout_p = 0.3;
    s.backward = false;
  });
  // ---- a float window after the keys (a cache's newest tokens): decode reads it as more
  // chunks of the same call, rows at their positions over both parts ----
  add("q8 decode float window G3", [](Spec& s) {
    s.Hq = 9; s.Hkv = 3; s.Nq = 1; s.Nk = 1100; s.D = s.Dv = 64; s.causal = true;
    s.kbits = s.vbits = 8; s.tail = 130; s.backward = false;
  });
  add("q4 rotated decode float window of 1, Nq 3 (some keys before it hidden)", [](Spec& s) {
    s.Hq = 4; s.Hkv = 2; s.Nq = 3; s.Nk = 300; s.D = 40; s.Dv = 80; s.causal = true;
    s.kbits = s.vbits = 4; s.rotate = true; s.tail = 1; s.backward = false; s.pool_mode = 1;
  });
  add("float decode float window, sinks alibi softcap window sides", [](Spec& s) {
    s.B = 2; s.Hq = 4; s.Hkv = 2; s.Nq = 2; s.Nk = 600; s.D = s.Dv = 64; s.causal = true;
    s.left = 300; s.alibi_b = 2; s.softcap = 10; s.sinks = true; s.tail = 37;
  });
  add("q8 k, q4 v decode, the float window is every key", [](Spec& s) {
    s.Hq = 3; s.Nq = 1; s.Nk = 40; s.D = s.Dv = 64; s.kbits = 8; s.vbits = 4; s.tail = 40;
    s.backward = false;
  });
  add("q8 float64 decode float window", [](Spec& s) {
    s.Hq = 2; s.Nq = 1; s.Nk = 300; s.dt = s.out_dt = DT::F64; s.kbits = s.vbits = 8;
    s.tail = 20; s.backward = false;
  });
  add("decode float16 float window", [](Spec& s) {  // (codes stand for float32 values)
    s.Hq = 3; s.Nq = 1; s.Nk = 200; s.D = s.Dv = 64; s.dt = DT::F16; s.out_dt = DT::F32;
    s.tail = 50;
  });
  add("non-finite key, decode float window", [](Spec& s) {
    s.Nq = 1; s.Nk = 600; s.nan_key = true; s.tail = 300;
  });
  // ---- forward mode with tangents on some operands only (every case checks all three) ----
  add("jvp tangent of q alone, causal", [](Spec& s) {
    s.Hq = 2; s.Nq = 97; s.Nk = 113; s.causal = true; s.tangents = 1;
  });
  add("jvp tangent of k alone, GQA softcap", [](Spec& s) {
    s.Hq = 4; s.Hkv = 2; s.Nq = s.Nk = 97; s.softcap = 5; s.tangents = 2; s.pool_mode = 1;
  });
  add("jvp tangent of v alone, window", [](Spec& s) {
    s.Nq = s.Nk = 130; s.left = 20; s.right = 3; s.tangents = 4;
  });
  add("jvp no tangent of q, k, v: bias and slopes", [](Spec& s) {
    s.B = 2; s.Hq = 2; s.Nq = 33; s.Nk = 97; s.bias = BIAS_FULL; s.alibi_b = 2; s.tangents = 0;
  });
  // ---- the double backward over several row blocks and segments, scheduled as on 3 threads
  // (hessian.h; every case without a softcap, dropout or quantized operands checks it) ----
  add("hessian GQA causal dlse, row blocks", [](Spec& s) {
    s.Hq = 4; s.Hkv = 2; s.Nq = 150; s.Nk = 161; s.D = 64; s.Dv = 40; s.causal = true;
    s.dlse = true; s.pool_mode = 1;
  });
  add("hessian over several 256-key chunks", [](Spec& s) {
    s.Hq = 2; s.Hkv = 1; s.Nq = 40; s.Nk = 300; s.D = s.Dv = 32; s.dlse = true;
  });
  // ---- edges ----
  add("Nq 0", [](Spec& s) { s.Hq = 2; s.Nq = 0; s.Nk = 97; });
  add("Nk 0", [](Spec& s) { s.Hq = 2; s.Nq = 17; s.Nk = 0; s.dlse = true; });
  add("Nk 0 decode", [](Spec& s) { s.Nq = 1; s.Nk = 0; });
  add("Dv 0 (lse alone)", [](Spec& s) { s.Nq = 97; s.Nk = 113; s.Dv = 0; s.dlse = true; });
  add("Dv 0 decode", [](Spec& s) { s.Nq = 1; s.Nk = 130; s.Dv = 0; s.dlse = true; });
  add("lse only (no out)", [](Spec& s) {
    s.Nq = 97; s.Nk = 113; s.causal = true; s.lse_only = true; s.backward = false;
  });
  add("non-finite key, causal", [](Spec& s) {
    s.Nq = 97; s.Nk = 97; s.D = s.Dv = 64; s.causal = true; s.nan_key = true;
  });
  add("non-finite key, decode", [](Spec& s) {
    s.Nq = 1; s.Nk = 600; s.nan_key = true; s.left = 200;
  });
  return v;
}

}  // namespace drv
