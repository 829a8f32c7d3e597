"""Forward pass of every CPU backend against the float64 specification (FlashAttention rule).

A curated list of named shapes (odd and prime lengths, Nq != Nk both ways, head dims 40-128,
Dv != D, GQA and MQA) is crossed with the rules of API.md section 2, alone and combined, and with
the four dtypes on one shape. No full cross product: the list is chosen so that every rule meets
every shape feature somewhere, and the long lengths (1023, 1025) appear only a few times.
Then the edge cases: rows that see nothing, NaN padding, strides, one-hot scores at the ends of
the tiled engine's key blocks, fp16 scores beyond 65504, and bitwise repeatability.
"""

from __future__ import annotations

import functools
import math
import os
import time

import numpy as np
import pytest
import torch

import selfattn
from helpers import (
    CPU_BACKENDS,
    ERR_FLOOR,
    Shape,
    assert_close,
    gen,
    make_qkv,
    max_err,
    packed_ids,
    plain_attention,
    ref_attention,
    run_backend,
    tiled_split,
    to_np,
    torch_threads,
)
from selfattn.engine import BLOCK_N

# One torch thread throughout; the tiled engine's own thread split is tested on purpose
# (the ``*_threaded_*`` tests, with 2 threads).
pytestmark = pytest.mark.usefixtures("one_thread")


def seg_arg(s: Shape, seed: int):
    """A single tensor when Nq == Nk, else a (q_ids, kv_ids) pair with the queries at the end."""
    kv = packed_ids(s.b, s.nk, seed)
    if s.nq == s.nk:
        return kv
    if s.nq < s.nk:
        return (kv[:, s.nk - s.nq :].to(torch.int32), kv.to(torch.int32))
    q_ids = torch.randint(-1, int(kv.max()) + 1, (s.b, s.nq), generator=gen(seed + 1))
    return (q_ids, kv)


def rand_mask(shape, seed: int, p_true: float = 0.7) -> torch.Tensor:
    m = torch.rand(shape, generator=gen(seed)) < p_true
    if len(shape) >= 2 and shape[-2] > 2:
        m[..., 1, :] = False  # one row that sees nothing
    return m


def make_rules(rule: str, s: Shape, dtype: torch.dtype, seed: int = 100) -> dict:
    """Keyword arguments for one named rule (or combination) on shape ``s``."""
    g = gen(seed)
    nq, nk = s.nq, s.nk
    if rule == "none":
        return {}
    if rule == "causal":
        return {"causal": True}
    if rule == "window":
        return {"window": (37, 5)}
    if rule == "window_causal":
        return {"window": (64, 0)}
    if rule == "window_left":
        return {"window": (20, None)}
    if rule == "window_right":
        return {"window": (None, 3)}
    if rule == "mask":
        return {"mask": rand_mask((s.b, s.hq, nq, nk), seed)}
    if rule == "mask_bcast":  # a key-padding mask (B, 1, 1, Nk)
        m = torch.ones(s.b, 1, 1, nk, dtype=torch.bool)
        m[-1, ..., nk - nk // 4 :] = False
        return {"mask": m}
    if rule == "mask_2d":
        return {"mask": rand_mask((nq, nk), seed, 0.5)}
    if rule == "bias":
        return {"bias": torch.randn(s.b, s.hq, nq, nk, generator=g).to(dtype)}
    if rule == "bias_bcast":
        return {"bias": torch.randn(1, s.hq, 1, nk, generator=g).to(dtype)}
    if rule == "alibi":
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / s.hq) for h in range(s.hq)])
        return {"alibi_slopes": slopes.to(dtype)}
    if rule == "alibi_b":
        return {"alibi_slopes": (torch.rand(s.b, s.hq, generator=g) * 0.2).to(dtype)}
    if rule == "softcap":
        return {"softcap": 1.5}
    if rule == "segments":
        return {"segment_ids": seg_arg(s, seed)}
    if rule == "scale":
        return {"scale": 0.3}
    if rule == "combo":
        return {
            "causal": True,
            "window": (50, None),
            "mask": rand_mask((s.b, 1, nq, nk), seed, 0.9),
            "bias": torch.randn(s.b, 1, nq, nk, generator=g).to(dtype),
            "alibi_slopes": (torch.rand(s.hq, generator=g) * 0.1).to(dtype),
            "softcap": 4.0,
            "segment_ids": seg_arg(s, seed),
            "scale": 0.2,
        }
    if rule == "combo2":
        return {
            "window": (None, 2),
            "bias": torch.randn(s.hq, nq, 1, generator=g).to(dtype),
            "segment_ids": seg_arg(s, seed),
            "softcap": 2.5,
        }
    raise KeyError(rule)


RULES = [
    "none", "causal", "window", "window_causal", "window_left", "window_right", "mask",
    "mask_bcast", "mask_2d", "bias", "bias_bcast", "alibi", "alibi_b", "softcap", "segments",
    "scale", "combo", "combo2",
]  # fmt: skip
FEW_RULES = ["none", "causal", "window_causal", "bias", "segments", "combo"]

S = Shape
# Small and medium shapes: every rule, float32.
SHAPES_ALL_RULES = [
    S("97_d40", 1, 2, 2, 97, 97, 40),
    S("q113_k255_d80", 2, 2, 2, 113, 255, 80),
    S("q257_k113_d128", 1, 2, 2, 257, 113, 128),
    S("255_d64_dv40", 1, 2, 2, 255, 255, 64, 40),
    S("gqa6to2_q97_k113", 1, 6, 2, 97, 113, 64),
    S("mqa6to1_q113_k97_dv80", 2, 6, 1, 113, 97, 40, 80),
]
# Extremes: a few rules each.
SHAPES_FEW_RULES = [
    S("1x1", 1, 1, 1, 1, 1, 64),
    S("decode_q1_k257", 2, 2, 2, 1, 257, 64),
    S("q257_k1", 1, 2, 1, 257, 1, 40),
    S("257_d128", 1, 1, 1, 257, 257, 128),
]
# The long lengths, only where they add something (several key blocks of the tiled engine).
LONG = [
    ("q1023_k1025_none", S("q1023_k1025", 1, 1, 1, 1023, 1025, 64), "none"),
    ("q1023_k1025_causal", S("q1023_k1025", 1, 1, 1, 1023, 1025, 64), "causal"),
    ("q1025_k1023_window", S("q1025_k1023", 1, 2, 1, 1025, 1023, 80), "window_causal"),
    ("1025_combo", S("1025_d40", 1, 2, 2, 1025, 1025, 40), "combo"),
]

FP32 = torch.float32
# `reference` is the adapter around the oracle itself: it runs on one shape of every rule here
# (and on every case of the dtype sweep), which checks the adapter without doubling the time.
NO_REF = [b for b in CPU_BACKENDS if b != "reference"]


def cases(rows, backends=CPU_BACKENDS):
    """(backend, shape, rule, dtype) params with readable ids."""
    return [
        pytest.param(be, s, r, dt, id=f"{name}-{be}") for name, s, r, dt in rows for be in backends
    ]


FORWARD_CASES = (
    cases([(f"{s.name}-{r}", s, r, FP32) for s in SHAPES_ALL_RULES[4:5] for r in RULES])
    + cases([(f"{s.name}-{r}", s, r, FP32) for s in SHAPES_ALL_RULES[:4] for r in RULES], NO_REF)
    + cases([(f"{s.name}-{r}", s, r, FP32) for s in SHAPES_ALL_RULES[5:] for r in RULES], NO_REF)
    + cases([(f"{s.name}-{r}", s, r, FP32) for s in SHAPES_FEW_RULES for r in FEW_RULES])
    + cases([(name, s, r, FP32) for name, s, r in LONG])
)

DTYPE_SHAPE = S("gqa4to2_q97_k130", 2, 4, 2, 97, 130, 64)
DTYPE_RULES = ["none", "causal", "window", "mask", "bias", "alibi", "softcap", "segments", "combo"]
DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
DTYPE_CASES = cases(
    [(f"{n}-{r}", DTYPE_SHAPE, r, dt) for n, dt in DTYPES.items() for r in DTYPE_RULES]
    + [
        ("q1023_k1025-causal-bf16", LONG[1][1], "causal", torch.bfloat16),
        ("1025-combo-fp16", LONG[3][1], "combo", torch.float16),
    ]
)


_CASES: dict = {}


def case_data(s: Shape, rule: str, dtype):
    """Inputs, rule arguments and the two oracles of one case, computed once for all backends."""
    key = (s, rule, dtype)
    if key not in _CASES:
        q, k, v = s.qkv(dtype)
        kw = make_rules(rule, s, dtype)
        ref, ref_lse = ref_attention(q, k, v, **kw)
        _CASES[key] = (q, k, v, kw, ref, ref_lse, plain_attention(q, k, v, **kw))
    return _CASES[key]


def check_forward(backend, s: Shape, rule: str, dtype) -> None:
    q, k, v, kw, ref, _, plain = case_data(s, rule, dtype)
    out = run_backend(backend, q, k, v, **kw)
    assert out.shape == (s.b, s.hq, s.nq, s.dv or s.d)
    assert_close(out, ref, plain, dtype, f"{backend} {s.name} {rule}")


@pytest.mark.parametrize("backend, s, rule, dtype", FORWARD_CASES)
def test_forward_matches_spec(backend, s, rule, dtype):
    check_forward(backend, s, rule, dtype)


@pytest.mark.parametrize("backend, s, rule, dtype", DTYPE_CASES)
def test_forward_each_dtype(backend, s, rule, dtype):
    check_forward(backend, s, rule, dtype)


# sdpa never returns the lse (tested in test_validation); `reference` on the dtype sweep only.
LSE_CASES = cases(
    [
        (f"{s.name}-{r}", s, r, FP32)
        for s in (SHAPES_ALL_RULES[1], SHAPES_ALL_RULES[2], SHAPES_ALL_RULES[5])
        for r in ("none", "causal", "mask", "alibi", "softcap", "segments", "combo", "combo2")
    ]
    + [("1025-combo", LONG[3][1], "combo", FP32)],
    ["math", "tiled", "auto"],
) + cases(
    [(f"{DTYPE_SHAPE.name}-combo-{n}", DTYPE_SHAPE, "combo", dt) for n, dt in DTYPES.items()],
    ["reference", "math", "tiled", "auto"],
)


def assert_lse_close(lse: torch.Tensor, ref: np.ndarray, what: str = "") -> None:
    assert lse.dtype == torch.float32, f"{what}: lse dtype {lse.dtype}"
    got = to_np(lse)
    assert np.array_equal(np.isneginf(got), np.isneginf(ref)), f"{what}: -inf rows differ"
    fin = np.isfinite(ref)
    assert np.isfinite(got[fin]).all(), f"{what}: non-finite lse on a visible row"
    err = np.abs(got[fin] - ref[fin]) / (1.0 + np.abs(ref[fin]))
    assert err.max(initial=0.0) < 2e-6, f"{what}: lse error {err.max():.3g}"


@pytest.mark.parametrize("backend, s, rule, dtype", LSE_CASES)
def test_lse_matches_spec(backend, s, rule, dtype):
    q, k, v, kw, ref, ref_lse, plain = case_data(s, rule, dtype)
    out, lse = run_backend(backend, q, k, v, return_lse=True, **kw)
    assert lse.shape == (s.b, s.hq, s.nq)
    assert_lse_close(lse, ref_lse, f"{backend} {s.name} {rule}")
    assert_close(out, ref, plain, dtype, f"{backend} {s.name} {rule}")


# -- rows that see no key -------------------------------------------------------------------------

EMPTY_ROW_CASES = {
    # name: (Nq, Nk, rules builder) -> rows that must be empty
    "mask_rows": (40, 70, lambda b: {"mask": _mask_rows_off(b, 40, 70, [0, 7, 39])}),
    "segment_padding": (64, 64, lambda b: {"segment_ids": _padded_ids(b, 64, 9)}),
    "causal_nq_gt_nk": (90, 30, lambda b: {"causal": True}),
    "window_nq_gt_nk": (50, 20, lambda b: {"window": (3, 2)}),
    "all_masked": (17, 600, lambda b: {"mask": torch.zeros(17, 600, dtype=torch.bool)}),
}


def _mask_rows_off(b, nq, nk, rows):
    m = torch.rand(b, 1, nq, nk, generator=gen(5)) < 0.6
    m[:, :, rows] = False
    return m


def _padded_ids(b, n, pad):
    ids = torch.zeros(b, n, dtype=torch.int64)
    ids[:, n // 2 :] = 1
    ids[:, n - pad :] = -1  # padding queries see nothing
    return ids


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(EMPTY_ROW_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_with_no_visible_key_are_exactly_zero(backend, case, dtype):
    nq, nk, build = EMPTY_ROW_CASES[case]
    q, k, v = make_qkv(2, 2, 2, nq, nk, 32, dtype=dtype, seed=3)
    kw = build(2)
    ref, ref_lse = ref_attention(q, k, v, **kw)
    empty = np.isneginf(ref_lse)
    assert empty.any(), "the case must contain an empty row"
    out = run_backend(backend, q, k, v, **kw)
    got = to_np(out)
    assert np.isfinite(got).all()
    assert (got[empty] == 0.0).all(), f"{backend}: empty rows are not exactly 0"
    assert_close(out, ref, plain_attention(q, k, v, **kw), dtype, f"{backend} {case}")
    if backend != "sdpa":
        _, lse = run_backend(backend, q, k, v, return_lse=True, **kw)
        assert torch.isneginf(lse[torch.from_numpy(empty)]).all()
        assert torch.isfinite(lse[torch.from_numpy(~empty)]).all()


# -- NaN padding ----------------------------------------------------------------------------------


def _nan_at(t: torch.Tensor, keys) -> torch.Tensor:
    t = t.clone()
    t[:, :, keys] = math.nan
    return t


# name: (Nq, Nk, rule kwargs, keys that hold NaN in k and v, invisible to every row)
NAN_HIDDEN = {
    "segment_padding": (
        70, 70, {"segment_ids": _padded_ids(2, 70, 6)}, list(range(64, 70)),
    ),
    "bool_mask": (
        33, 600,
        {"mask": torch.arange(600) % 7 != 3},
        list(range(3, 600, 7)),
    ),
    "window": (
        40, 1100, {"window": (30, 0)}, [0, 5, 512, 1000, 1029],
    ),
    "causal_cache": (
        8, 20, {"causal": True, "mask": torch.arange(20) != 19}, [19],
    ),
}  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(NAN_HIDDEN))
@pytest.mark.parametrize("where", ["k", "v", "kv"])
def test_nan_in_hidden_keys_never_leaks(backend, case, where):
    q, k, v, kw, keys, clean_ref, plain = nan_case(case)
    if "k" in where:
        k = _nan_at(k, keys)
    if "v" in where:
        v = _nan_at(v, keys)
    out = run_backend(backend, q, k, v, **kw)
    assert torch.isfinite(out).all(), f"{backend}: NaN from hidden keys leaked ({case})"
    assert_close(out, clean_ref, plain, torch.float32, f"{backend} {case}")


@functools.cache
def nan_case(case):
    """Clean inputs and oracles; the test writes NaN into the hidden keys of a copy."""
    nq, nk, kw, keys = NAN_HIDDEN[case]
    q, k, v = make_qkv(2, 2, 1, nq, nk, 16, dtype=torch.float32, seed=4)
    clean_ref, _ = ref_attention(q, k, v, **kw)
    return q, k, v, kw, keys, clean_ref, plain_attention(q, k, v, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["k", "v"])
def test_nan_in_causally_hidden_future_key_never_leaks(backend, where):
    """Regression: sdpa (and so ``auto``) multiplied hidden NaN values by a zero probability.

    With ``causal=True`` and Nq == Nk, a NaN in value row 10 is invisible to queries 0..9, but
    torch's fused kernel gave NaN for every row (0 * NaN = NaN in ``p @ v``).
    """
    q, k, v = make_qkv(1, 2, 2, 64, 64, 32, seed=6)
    ref, _ = ref_attention(q, k, v, causal=True)
    if where == "k":
        k = _nan_at(k, [10])
    else:
        v = _nan_at(v, [10])
    out = run_backend(backend, q, k, v, causal=True)
    assert torch.isfinite(out[:, :, :10]).all(), f"{backend}: NaN reached rows before key 10"
    assert torch.isnan(out[:, :, 10:]).all(-1).all(), f"{backend}: NaN did not propagate"
    assert max_err(out[:, :, :10], ref[:, :, :10]) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_in_a_visible_key_propagates_to_the_rows_that_see_it(backend):
    # Window (10, 0): key 600 is seen by the queries at positions 600..610 only.
    nq = nk = 1100
    q, k, v = make_qkv(1, 1, 1, nq, nk, 16, seed=7)
    v = _nan_at(v, [600])
    out = run_backend(backend, q, k, v, window=(10, 0))
    bad = torch.isnan(out[0, 0]).any(-1)
    want = torch.zeros(nq, dtype=torch.bool)
    want[600:611] = True
    assert torch.equal(bad, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_without_rules_propagates_everywhere(backend):
    q, k, v = make_qkv(1, 2, 2, 9, 13, 8, seed=8)
    k = _nan_at(k, [4])
    out = run_backend(backend, q, k, v)
    assert torch.isnan(out).all()


# -- strides ---------------------------------------------------------------------------------------


def strided_inputs(dtype=torch.float32):
    """q transposed from (B, N, H, D), k a strided slice, v expanded over heads."""
    g = gen(9)
    q = torch.randn(2, 97, 4, 48, generator=g).to(dtype).transpose(1, 2)  # (2, 4, 97, 48)
    k = torch.randn(2, 2, 226, 64, generator=g).to(dtype)[:, :, ::2, 8:56]  # (2, 2, 113, 48)
    v = torch.randn(2, 1, 113, 40, generator=g).to(dtype).expand(2, 2, 113, 40)
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(1) == 0
    return q, k, v


@functools.cache
def strided_case(rule, dtype):
    q, k, v = strided_inputs(dtype)
    s = Shape("strided", 2, 4, 2, 97, 113, 48, 40)
    kw = make_rules(rule, s, dtype)
    if "bias" in kw:  # an expanded bias and a transposed mask too
        kw["bias"] = kw["bias"][:, :, :, :1].expand(2, 1, 97, 113)
        kw["mask"] = kw["mask"].transpose(-1, -2).contiguous().transpose(-1, -2)
    ref, _ = ref_attention(q, k, v, **kw)
    plain = plain_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    return q, k, v, kw, ref, plain


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule", ["none", "causal", "combo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_and_expanded_inputs(backend, rule, dtype):
    q, k, v, kw, ref, plain = strided_case(rule, dtype)
    out = run_backend(backend, q, k, v, **kw)
    assert_close(out, ref, plain, dtype, f"{backend} strided {rule}")
    same = run_backend(backend, q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    assert max_err(out, to_np(same)) <= 4 * ERR_FLOOR[dtype] + 8 * max_err(plain, ref)


# -- one-hot scores at the ends of the tiled engine's key blocks ----------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_hot_score_in_first_and_last_key_block(backend, where, dtype):
    q, k, v, ref, plain = one_hot_case(where, dtype)
    out = run_backend(backend, q, k, v, scale=1.0)
    assert_close(out, ref, plain, dtype, f"{backend} {where}")


@functools.cache
def one_hot_case(where, dtype):
    nk = 2 * BLOCK_N + 77
    q, k, v = make_qkv(1, 2, 2, 50, nk, 32, dtype=dtype, seed=10)
    hot = [0, 3, BLOCK_N - 1] if where == "first" else [nk - 1, nk - 30, 2 * BLOCK_N]
    # Hot keys get norm 30 and each query is one of them: its score is 900, the others O(100).
    kk = k.float()
    for j in hot:
        kk[:, :, j] = 30.0 * kk[:, :, j] / kk[:, :, j].norm(dim=-1, keepdim=True)
    target = torch.tensor(hot)[torch.arange(50) % len(hot)]
    q, k = kk[:, :, target].to(dtype), kk.to(dtype)
    ref, _ = ref_attention(q, k, v, scale=1.0)
    # The spec is (numerically) one-hot: the output is the hot key's value row.
    np.testing.assert_allclose(ref, to_np(v[:, :, target]), atol=1e-6)
    return q, k, v, ref, plain_attention(q, k, v, scale=1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_hot_with_huge_scores_across_blocks(backend):
    """Scores of ~1e4 in one block and O(1) in the others: the running max must rescale."""
    nk = 2 * BLOCK_N + 10
    q, k, v = make_qkv(1, 1, 1, 2, nk, 16, seed=11)
    k[0, 0, 5] = q[0, 0, 0] * 100.0  # row 0: huge score in the first block
    k[0, 0, nk - 2] = q[0, 0, 1] * 100.0  # row 1: huge score in the last block
    out = run_backend(backend, q, k, v, scale=1.0)
    np.testing.assert_allclose(to_np(out[0, 0, 0]), to_np(v[0, 0, 5]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(to_np(out[0, 0, 1]), to_np(v[0, 0, nk - 2]), rtol=1e-6, atol=1e-7)


# -- fp16 beyond its range -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule", ["none", "causal", "bias"])
def test_fp16_raw_scores_beyond_65504(backend, rule):
    """q.k in fp16 would overflow (|q.k| > 65504): the backends must accumulate in float32."""
    g = gen(12)
    c = 60.0
    q = (torch.randn(1, 2, 97, 64, generator=g) * c).half()
    k = (torch.randn(1, 2, 97, 64, generator=g) * c).half()
    v = torch.randn(1, 2, 97, 64, generator=g).half()
    raw = (q.double() @ k.double().transpose(-1, -2)).abs().max().item()
    assert raw > 65504, raw
    scale = 1.0 / (c * c * 8.0)  # the scaled scores are O(1)
    s = Shape("fp16big", 1, 2, 2, 97, 97, 64)
    kw = {"scale": scale, **make_rules(rule, s, torch.float16)}
    out = run_backend(backend, q, k, v, **kw)
    ref, _ = ref_attention(q, k, v, **kw)
    # The yardstick: the plain formula in float32, rounded to fp16 (fp16 itself gives inf/NaN).
    plain = plain_attention(q.float(), k.float(), v.float(), **kw).half()
    assert_close(out, ref, plain, torch.float16, f"{backend} fp16 > 65504")


# -- repeatability -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule", ["none", "combo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_is_bitwise_repeatable(backend, rule, dtype):
    s = Shape("rep", 1, 4, 2, 260, 600, 64)  # 3 row tiles x 2 key blocks
    q, k, v = s.qkv(dtype, seed=13)
    kw = make_rules(rule, s, dtype)
    a = run_backend(backend, q, k, v, **kw)
    b = run_backend(backend, q, k, v, **kw)
    assert torch.equal(a, b)


def test_auto_never_declines_on_cpu():
    """``auto`` on the CPU always finds a backend, even for every rule at once with autograd."""
    s = SHAPES_ALL_RULES[4]
    q, k, v = s.qkv(torch.float32)
    kw = make_rules("combo", s, torch.float32)
    q.requires_grad_(True)
    out, lse = selfattn.attention(q, k, v, return_lse=True, **kw)
    assert out.requires_grad and lse.requires_grad


# -- the tiled engine's split across threads ----------------------------------------------------

# With tiled_split() the tiled engine splits these calls across threads: by (batch, key/value
# head) when there are enough units, else by bands of query rows.
THREAD_CASES = {
    "heads_split": (Shape("h", 2, 4, 2, 300, 500, 32), "causal"),
    "rows_split_causal": (Shape("r", 1, 2, 1, 1025, 1025, 32), "causal"),
    "rows_split_combo": (Shape("rc", 1, 4, 1, 700, 800, 32), "combo"),
    "rows_split_odd_units": (Shape("o", 3, 2, 1, 400, 400, 32, 24), "combo2"),
}


@pytest.mark.parametrize("case", list(THREAD_CASES))
def test_tiled_threaded_split_matches_one_thread(case):
    s, rule = THREAD_CASES[case]
    q, k, v, kw, ref, ref_lse, plain = case_data(s, rule, FP32)
    with torch_threads(2), tiled_split():
        out2, lse2 = selfattn.attention(q, k, v, return_lse=True, backend="tiled", **kw)
    out1, lse1 = selfattn.attention(q, k, v, return_lse=True, backend="tiled", **kw)
    assert_close(out2, ref, plain, FP32, f"2 threads {case}")
    assert_lse_close(lse2, ref_lse, f"2 threads {case}")
    assert max_err(out2, to_np(out1)) < 1e-6
    assert torch.equal(torch.isneginf(lse1), torch.isneginf(lse2))


# -- empty dimensions -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["math", "tiled", "auto"])
@pytest.mark.parametrize(("b", "nq", "nk"), [(1, 3, 0), (1, 0, 5), (0, 3, 5)])
def test_empty_dimensions(backend, b, nq, nk):
    """Bug: math raised IndexError for Nk = 0 and math/tiled failed to reshape B = 0 or Nq = 0.
    No keys means every row is empty (0, lse -inf, zero gradients); no rows, an empty result."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, 4, nq, 8, generator=g).requires_grad_(True)
    k = torch.randn(b, 2, nk, 8, generator=g).requires_grad_(True)
    v = torch.randn(b, 2, nk, 6, generator=g).requires_grad_(True)
    out, lse = selfattn.attention(q, k, v, causal=True, backend=backend, return_lse=True)
    assert out.shape == (b, 4, nq, 6) and lse.shape == (b, 4, nq)
    assert torch.equal(out, torch.zeros_like(out))
    assert bool(torch.isneginf(lse).all())
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_tiled_threads_work_in_a_forked_child():
    """Bug: a child forked after the tiled engine had used its worker pool inherited the pool
    object without its threads, so its first threaded call waited forever."""
    q, k, v = make_qkv(1, 4, 2, 300, 300, 16)
    with torch_threads(2), tiled_split():
        ref = selfattn.attention(q, k, v, causal=True, backend="tiled")  # starts the pool
        pid = os.fork()
        if pid == 0:  # child: must finish (and match) rather than hang
            code = 1
            try:
                out = selfattn.attention(q, k, v, causal=True, backend="tiled")
                code = 0 if torch.equal(out, ref) else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in a threaded tiled call")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_frozen_maximum_near_its_bound_stays_exact():
    """The forward freezes the running maximum after the first key chunk when Cauchy-Schwarz
    bounds every later score within 2**64 of it. Here a later key reaches that bound (its score
    is 60 base-2 units above every score of the first chunk) and the values are large: the
    result must still match the specification, with nothing overflowing."""
    nk, d = 3 * BLOCK_N, 16
    q = torch.zeros(1, 1, 4, d)
    q[..., 0] = 10.0
    k = torch.zeros(1, 1, nk, d)
    k[..., :BLOCK_N, 0] = 0.84 + 0.01 * torch.rand(BLOCK_N, generator=gen(7))  # first chunk
    k[..., -1, 0] = 5.0  # the largest key: its score 50 is the bound itself
    k[..., BLOCK_N:-1, 0] = torch.rand(nk - BLOCK_N - 1, generator=gen(8))
    v = torch.randn(1, 1, nk, d, generator=gen(9))
    out = selfattn.attention(q, k, v, scale=1.0, backend="tiled")
    ref, _ = ref_attention(q, k, v, scale=1.0)
    assert_close(out, ref, plain_attention(q, k, v, scale=1.0), FP32, "frozen maximum")
    big = selfattn.attention(q, k, v * 1e6, scale=1.0, backend="tiled")  # sum p*v near 2**80
    assert torch.isfinite(big).all()
    assert max_err(big / 1e6, ref) < 1e-6
