"""Gradients of every autograd backend against a float64 oracle, and gradcheck for ``tiled``.

The oracle is the textbook formula (``helpers.plain_attention``) in float64 under torch's
autograd: independent of the library's code. The tolerance is the FlashAttention rule: a
backend's gradient error is at most a small multiple of the same formula's error in the input
dtype, plus a floor.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import selfattn
from helpers import (
    ERR_FLOOR,
    ERR_MULTIPLE,
    Shape,
    assert_close,
    float64_leaves,
    gen,
    grads,
    make_qkv,
    max_err,
    plain_attention,
    plain_lse,
    run_backend,
    tiled_split,
    to_np,
    torch_threads,
)
from selfattn.engine import BLOCK_N

GRAD_BACKENDS = ["math", "tiled", "sdpa", "auto"]


# One torch thread throughout; the tiled engine's own thread split is tested on purpose
# (the ``*_threaded_*`` tests, with 2 threads).
pytestmark = pytest.mark.usefixtures("one_thread")


def seg_ids(b, n, pad=0, doc=37):
    ids = torch.arange(n).div(doc, rounding_mode="floor").expand(b, n).clone()
    if pad:
        ids[-1, n - pad :] = -1
    return ids


@dataclass(frozen=True)
class GradCase(Shape):
    rules: tuple = field(default=())  # names of rule builders below
    dtype: torch.dtype = torch.float32


def build_rules(c: GradCase) -> tuple[dict, list[str]]:
    """Rule kwargs for a case, and the names of the rule tensors that require grad."""
    g = gen(70)
    kw: dict = {}
    train: list[str] = []
    for r in c.rules:
        if r == "causal":
            kw["causal"] = True
        elif r == "window":
            kw["window"] = (20, 3)
        elif r == "mask":
            m = torch.rand(c.b, 1, c.nq, c.nk, generator=g) < 0.6
            m[:, :, 2] = False  # an empty row
            kw["mask"] = m
        elif r.startswith("bias"):
            shape = {
                "bias": (c.b, c.hq, c.nq, c.nk),
                "bias_b1": (c.b, 1, c.nq, c.nk),
                "bias_2d": (c.nq, c.nk),
                "bias_keys": (c.nk,),
                "bias_rows": (c.hq, c.nq, 1),
                "bias_b_keys": (c.b, 1, 1, c.nk),
            }[r]
            kw["bias"] = torch.randn(shape, generator=g).to(c.dtype)
            train.append("bias")
        elif r.startswith("alibi"):
            shape = (c.hq,) if r == "alibi" else (c.b, c.hq)
            kw["alibi_slopes"] = (torch.rand(shape, generator=g) * 0.1).to(c.dtype)
            train.append("alibi_slopes")
        elif r == "softcap":
            kw["softcap"] = 2.0
        elif r == "segments":
            if c.nq == c.nk:
                kw["segment_ids"] = seg_ids(c.b, c.nq, pad=7)
            else:
                kv = seg_ids(c.b, c.nk, pad=7)
                kw["segment_ids"] = (kv[:, c.nk - c.nq :], kv)
        elif r == "scale":
            kw["scale"] = 0.4
        else:
            raise KeyError(r)
    return kw, train


C = GradCase
COMBO = ("causal", "window", "mask", "bias_b1", "alibi_bh", "softcap", "segments", "scale")
F64_COMBO = ("window", "mask", "bias", "alibi", "softcap", "segments")
GRAD_CASES = [
    C("plain_97_d40", 1, 2, 2, 97, 97, 40),
    C("causal_q113_k255_d80", 2, 2, 2, 113, 255, 80, rules=("causal",)),
    C("causal_q257_k113", 1, 2, 2, 257, 113, 64, rules=("causal",)),
    C("gqa6to2_window", 1, 6, 2, 97, 130, 64, rules=("window",)),
    C("mqa6to1_segments", 2, 6, 1, 113, 113, 40, 80, rules=("segments",)),
    C("mask_empty_rows", 2, 2, 2, 97, 113, 64, rules=("mask",)),
    C("bias_full", 2, 2, 2, 97, 113, 64, rules=("bias",)),
    C("bias_b1", 2, 4, 2, 97, 113, 64, rules=("bias_b1",)),
    C("bias_2d", 2, 2, 2, 97, 113, 64, rules=("bias_2d", "causal")),
    C("bias_keys", 2, 2, 1, 97, 113, 64, rules=("bias_keys",)),
    C("bias_rows", 2, 2, 2, 97, 113, 64, rules=("bias_rows", "window")),
    C("bias_b_keys", 2, 2, 2, 97, 113, 64, rules=("bias_b_keys",)),
    C("alibi_h", 1, 4, 2, 97, 113, 64, rules=("alibi",)),
    C("alibi_bh", 2, 2, 2, 113, 97, 64, rules=("alibi_bh", "causal")),
    C("softcap", 1, 2, 2, 97, 113, 128, rules=("softcap",)),
    C("scale_dv", 1, 2, 2, 97, 97, 64, 40, rules=("scale",)),
    C("combo", 2, 4, 2, 113, 130, 40, rules=COMBO),
    C("long_causal_1025", 1, 1, 1, 1025, 1025, 64, rules=("causal",)),
    C("blocks_bias_alibi", 1, 2, 1, 130, 2 * BLOCK_N + 57, 32,
      rules=("bias_b_keys", "alibi", "segments", "softcap")),
    C("bf16_bias_alibi", 1, 4, 2, 97, 113, 64, rules=("causal", "bias_b1", "alibi"),
      dtype=torch.bfloat16),
    C("fp16_causal", 2, 2, 2, 113, 113, 64, rules=("causal",), dtype=torch.float16),
    C("fp64_combo", 1, 2, 2, 57, 61, 16, rules=F64_COMBO, dtype=torch.float64),
]  # fmt: skip


@functools.cache
def grad_case(c: GradCase):
    """Inputs, dout, the float64 oracle's gradients and the same-dtype plain gradients."""
    q, k, v = c.qkv(c.dtype, seed=71)
    kw, train = build_rules(c)
    dout = torch.randn(c.b, c.hq, c.nq, c.dv or c.d, generator=gen(72)).to(c.dtype)
    names = ["q", "k", "v", *train]

    def oracle(dtype):
        leaves = float64_leaves(q, k, v, *(kw[n] for n in train))
        leaves = [t.to(dtype).detach().requires_grad_(True) for t in leaves]
        kw_t = {**kw, **dict(zip(train, leaves[3:]))}
        out = plain_attention(*leaves[:3], **kw_t)
        return [to_np(g) if dtype == torch.float64 else g for g in grads(out, leaves, dout)]

    return q, k, v, kw, train, dout, names, oracle(torch.float64), oracle(c.dtype)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("c", GRAD_CASES, ids=lambda c: c.name)
def test_gradients_match_float64(backend, c):
    q, k, v, kw, train, dout, names, ref, plain = grad_case(c)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, *(kw[n] for n in train))]
    kw_t = {**kw, **dict(zip(train, leaves[3:]))}
    out = run_backend(backend, *leaves[:3], **kw_t)
    got = grads(out, leaves, dout)
    for name, g, r, p, leaf in zip(names, got, ref, plain, leaves):
        assert g is not None, f"{backend}: no gradient for {name}"
        assert g.shape == leaf.shape, f"{name}: grad shape {tuple(g.shape)} vs {tuple(leaf.shape)}"
        assert torch.isfinite(g).all(), f"{backend} {c.name}: non-finite d{name}"
        assert_grad_close(g, r, p, leaf.dtype, f"{backend} {c.name} d{name}", name in train)


def assert_grad_close(g, ref, plain, dtype, what, reduced=False):
    """The FlashAttention rule; a bias/ALiBi gradient sums up to Nq*Nk terms per entry, so its
    floor also scales with its magnitude (a few float ulps), whatever the summation order."""
    if not reduced:
        assert_close(g, ref, plain, dtype, what)
        return
    err = max_err(g, ref)
    base = max_err(plain, ref)
    tol = ERR_MULTIPLE * base + ERR_FLOOR[dtype] + 16 * torch.finfo(dtype).eps * np.abs(ref).max()
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g} (plain error {base:.3g})"


def test_math_and_tiled_gradients_agree_closely():
    """On the combined case the two engines agree far below the tolerance of either."""
    c = next(x for x in GRAD_CASES if x.name == "combo")
    q, k, v, kw, train, dout, names, ref, _ = grad_case(c)
    res = {}
    for backend in ("math", "tiled"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        extra = [kw[n].detach().clone().requires_grad_(True) for n in train]
        out = selfattn.attention(*leaves, backend=backend, **{**kw, **dict(zip(train, extra))})
        res[backend] = grads(out, leaves + extra, dout)
    for name, a, b in zip(names, res["math"], res["tiled"]):
        scale = float(np.abs(ref[names.index(name)]).max()) + 1.0
        assert (a - b).abs().max().item() <= 1e-5 * scale, name


# -- empty rows and NaN padding ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["math", "tiled", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_rows_have_zero_finite_gradients(backend, dtype):
    q, k, v = make_qkv(2, 2, 2, 60, 700, 16, dtype=dtype, seed=73, requires_grad=True)
    mask = torch.rand(2, 1, 60, 700, generator=gen(74)) < 0.5
    mask[:, :, [0, 31, 59]] = False  # rows with no visible key
    mask[:, :, :, 600:] = False  # keys nobody sees
    bias = torch.randn(2, 2, 60, 700, generator=gen(75)).to(dtype).requires_grad_(True)
    alibi = torch.full((2,), 0.01, dtype=dtype).requires_grad_(True)
    out, lse = run_backend(
        backend, q, k, v, mask=mask, bias=bias, alibi_slopes=alibi, return_lse=True
    )
    assert (out[:, :, [0, 31, 59]] == 0).all()
    assert torch.isneginf(lse[:, :, [0, 31, 59]]).all()
    live = torch.isfinite(lse)
    loss = out.float().sum() + lse.float().where(live, 0.0).sum()
    dq, dk, dv, dbias, dalibi = torch.autograd.grad(loss, (q, k, v, bias, alibi))
    for name, g in (("q", dq), ("k", dk), ("v", dv), ("bias", dbias), ("alibi", dalibi)):
        assert torch.isfinite(g).all(), f"d{name} not finite"
    assert (dq[:, :, [0, 31, 59]] == 0).all()
    assert (dbias[:, :, [0, 31, 59]] == 0).all()
    assert (dk[:, :, 600:] == 0).all() and (dv[:, :, 600:] == 0).all()
    assert (dbias[..., 600:] == 0).all()


@pytest.mark.parametrize("backend", ["math", "tiled", "auto"])
@pytest.mark.parametrize("how", ["segments", "mask", "window", "causal"])
def test_nan_padding_never_reaches_gradients(backend, how):
    n = 600
    q, k, v = make_qkv(2, 2, 1, n, n, 16, seed=76)
    if how == "segments":
        kw, hidden = {"segment_ids": seg_ids(2, n, pad=40)}, (slice(1, 2), slice(n - 40, n))
    elif how == "mask":
        kw, hidden = {"mask": torch.arange(n) < n - 40}, (slice(None), slice(n - 40, n))
    elif how == "window":  # keys 0..29 are hidden from every row only in the last 300 queries
        kw, hidden = {"window": (100, 0)}, (slice(None), slice(0, 30))
        q = q[:, :, -300:]
    else:  # the last key is seen by the last query only; mask it from that one too
        m = torch.ones(q.shape[2], n, dtype=torch.bool)
        m[-1, -1] = False
        kw, hidden = {"causal": True, "mask": m}, (slice(None), slice(n - 1, n))
    clean = [t.clone().requires_grad_(True) for t in (q, k, v)]
    dirty = [t.clone() for t in (q, k, v)]
    dirty[1][hidden[0], :, hidden[1]] = math.nan
    dirty[2][hidden[0], :, hidden[1]] = math.inf
    dirty = [t.requires_grad_(True) for t in dirty]
    dout = torch.randn(2, 2, q.shape[2], 16, generator=gen(77))
    g_clean = grads(run_backend(backend, *clean, **kw), clean, dout)
    out = run_backend(backend, *dirty, **kw)
    assert torch.isfinite(out).all()
    g_dirty = grads(out, dirty, dout)
    for name, a, b in zip("qkv", g_clean, g_dirty):
        assert torch.isfinite(b).all(), f"{backend} {how}: NaN/inf reached d{name}"
        assert (a - b).abs().max().item() < 1e-5, f"{backend} {how}: d{name} differs"


# -- gradcheck in float64 ------------------------------------------------------------------------


def _gradcheck(fn, inputs, fast_mode=True):
    """float64 finite differences; fast mode checks random projections u^T J v (cheap)."""
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast_mode)


def _small(b=1, hq=2, hkv=2, nq=5, nk=7, d=4, dv=None, seed=80):
    return make_qkv(b, hq, hkv, nq, nk, d, dv, torch.float64, seed=seed, requires_grad=True)


@pytest.mark.parametrize(
    "bias_shape, alibi_shape",
    [((1, 2, 5, 7), (2,)), ((5, 7), (1, 2)), ((1, 1, 1, 7), (2,)), ((2, 5, 1), (1, 2))],
)
def test_gradcheck_tiled_bias_and_alibi(bias_shape, alibi_shape):
    q, k, v = _small()
    full = bias_shape == (1, 2, 5, 7)  # one full Jacobian check; the rest in fast mode
    bias = torch.randn(bias_shape, dtype=torch.float64, generator=gen(81)).requires_grad_(True)
    slopes = (torch.rand(alibi_shape, generator=gen(82)).double() * 0.5).requires_grad_(True)

    def fn(q, k, v, bias, slopes):
        return selfattn.attention(q, k, v, bias=bias, alibi_slopes=slopes, backend="tiled")

    _gradcheck(fn, (q, k, v, bias, slopes), fast_mode=not full)


def test_gradcheck_tiled_causal_window_segments_bias():
    q, k, v = _small(b=2, hq=4, hkv=2, nq=6, nk=9, d=3, dv=5)
    bias = torch.randn(2, 1, 6, 9, dtype=torch.float64, generator=gen(83)).requires_grad_(True)
    slopes = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1, -1, -1]])
    seg = (ids[:, 3:], ids)

    def fn(q, k, v, bias, slopes):
        return selfattn.attention(
            q, k, v, causal=True, window=(3, None), segment_ids=seg, bias=bias,
            alibi_slopes=slopes, backend="tiled",
        )  # fmt: skip

    _gradcheck(fn, (q, k, v, bias, slopes))


def test_gradcheck_tiled_softcap():
    q, k, v = _small(nq=6, nk=6)
    q.data.mul_(3.0)  # scores large enough for the tanh to bend

    def fn(q, k, v):
        return selfattn.attention(q, k, v, softcap=1.5, backend="tiled")

    _gradcheck(fn, (q, k, v))


def test_gradcheck_tiled_gqa_with_empty_rows():
    q, k, v = _small(hq=4, hkv=1, nq=6, nk=4)

    def fn(q, k, v):  # rows 0, 1 sit before key 0 (Nq > Nk, bottom-right): no key visible
        return selfattn.attention(q, k, v, causal=True, backend="tiled")

    _gradcheck(fn, (q, k, v))


def test_gradcheck_tiled_across_key_blocks():
    """A key length beyond one block; only a few queries and a tiny head dim keep it cheap."""
    q, k, v = _small(hq=1, hkv=1, nq=2, nk=BLOCK_N + 3, d=2, dv=1)
    bias = torch.randn(1, 1, 1, BLOCK_N + 3, dtype=torch.float64, generator=gen(84))

    def fn(q, v):
        return selfattn.attention(q, k.detach(), v, bias=bias, backend="tiled")

    _gradcheck(fn, (q, v))


# -- the lse as an output ------------------------------------------------------------------------


# The lse is float32 by contract (also for float64 inputs), too coarse for finite differences:
# its gradient is checked against the float64 oracle instead.
@pytest.mark.parametrize("backend", ["math", "tiled", "auto"])
@pytest.mark.parametrize("rules", ["none", "causal_bias_alibi", "softcap_window"])
def test_gradient_through_lse(backend, rules):
    q, k, v = make_qkv(2, 4, 2, 97, 600, 32, seed=85)
    kw = {}
    train = []
    if rules == "softcap_window":
        kw = {"softcap": 1.5, "window": (300, 0), "scale": 0.5}
    elif rules != "none":
        kw = {
            "causal": True,
            "bias": torch.randn(2, 1, 97, 600, generator=gen(86)),
            "alibi_slopes": torch.rand(4, generator=gen(87)) * 0.05,
        }
        train = ["bias", "alibi_slopes"]
    dout = torch.randn(2, 4, 97, 32, generator=gen(88))
    dlse = torch.randn(2, 4, 97, generator=gen(89))

    def loss_grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        extra = [kw[n].detach().to(dtype).requires_grad_(True) for n in train]
        kw_t = {**kw, **dict(zip(train, extra))}
        out, lse = fn(leaves, kw_t)
        loss = (out * dout.to(dtype)).sum() + (lse * dlse.to(lse.dtype)).sum()
        return torch.autograd.grad(loss, leaves + extra)

    def ours(leaves, kw_t):
        return run_backend(backend, *leaves, return_lse=True, **kw_t)

    def plain(leaves, kw_t):
        return plain_attention(*leaves, **kw_t), plain_lse(leaves[0], leaves[1], **kw_t)

    got = loss_grads(ours, torch.float32)
    ref = loss_grads(plain, torch.float64)
    base = loss_grads(plain, torch.float32)
    for name, g, r, p in zip(["q", "k", "v", *train], got, ref, base):
        what = f"{backend} {rules} d{name} via lse"
        assert_grad_close(g, to_np(r), p, torch.float32, what, name in train)


def test_only_some_inputs_require_grad():
    q, k, v = make_qkv(1, 2, 2, 33, 41, 8, seed=90)
    bias = torch.randn(33, 41, generator=gen(91)).requires_grad_(True)
    v.requires_grad_(True)
    out = selfattn.attention(q, k, v, bias=bias, causal=True, backend="tiled")
    dv, dbias = torch.autograd.grad(out.sum(), (v, bias))
    ref = selfattn.attention(q, k, v, bias=bias, causal=True, backend="math")
    rdv, rdbias = torch.autograd.grad(ref.sum(), (v, bias))
    torch.testing.assert_close(dv, rdv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dbias, rdbias, atol=1e-5, rtol=1e-5)


def test_no_grad_forward_tracks_nothing():
    q, k, v = make_qkv(1, 2, 2, 9, 11, 8, seed=92, requires_grad=True)
    with torch.no_grad():
        out = selfattn.attention(q, k, v, backend="tiled")
    assert not out.requires_grad


# -- the tiled engine's split across threads ----------------------------------------------------


@pytest.mark.parametrize(
    "b, hq, hkv, nq, nk",
    [(2, 4, 2, 300, 500), (1, 4, 1, 700, 800), (3, 2, 1, 400, 400)],
    ids=["heads_split", "rows_split", "rows_split_odd_units"],
)
def test_tiled_threaded_gradients_match_one_thread(b, hq, hkv, nq, nk):
    """Row bands share key/value heads, so dK, dV, dbias and dalibi are summed across threads."""
    q, k, v = make_qkv(b, hq, hkv, nq, nk, 16, seed=93)
    kw = {
        "causal": True,
        "segment_ids": (seg_ids(b, nk, pad=30)[:, nk - nq :], seg_ids(b, nk, pad=30)),
    }
    bias = torch.randn(b, 1, nq, nk, generator=gen(94))
    slopes = torch.rand(hq, generator=gen(95)) * 0.05
    dout = torch.randn(b, hq, nq, 16, generator=gen(96))
    res = []
    for threads in (1, 2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias, slopes)]
        with torch_threads(threads), tiled_split():
            out = selfattn.attention(
                *leaves[:3], bias=leaves[3], alibi_slopes=leaves[4], backend="tiled", **kw
            )
            res.append(grads(out, leaves, dout))
    for name, a, b2 in zip(["q", "k", "v", "bias", "alibi"], *res):
        scale = b2.abs().max().item() + 1.0
        assert (a - b2).abs().max().item() <= 2e-6 * scale, f"d{name}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias_shape", [(1, 1, 256, 256), (2, 4, 256, 1)])
def test_16bit_inputs_give_float32_accurate_bias_and_alibi_gradients(dtype, bias_shape):
    """With bf16/fp16 q, k, v and a float32 bias, the bias and ALiBi gradients are as accurate as
    a float32 computation's (the bug: tiled's backward took D = rowsum(dO * O) from the output
    rounded to 16 bits, 1000x less accurate than math's; a per-query bias, whose true gradient
    is 0, came back up to 4e-3)."""
    g = gen(91)
    q, k, v = (torch.randn(2, 4, 256, 64, generator=g).to(dtype) for _ in range(3))
    bias = torch.randn(bias_shape, generator=g)
    slopes = torch.rand(4, generator=g)
    dout = torch.randn(2, 4, 256, 64, generator=g).to(dtype)

    def grads(backend, qkv, b, s):
        b, s = b.clone().requires_grad_(), s.clone().requires_grad_()
        out = selfattn.attention(*qkv, bias=b, alibi_slopes=s, causal=True, backend=backend)
        return torch.autograd.grad(out, (b, s), dout.to(out.dtype))

    want = grads("math", [t.double() for t in (q, k, v)], bias.double(), slopes.double())
    got = {name: grads(name, (q, k, v), bias, slopes) for name in ("math", "tiled")}
    for i, what in enumerate(("dbias", "dalibi")):
        yardstick = (got["math"][i].double() - want[i]).abs().max().item()
        err = (got["tiled"][i].double() - want[i]).abs().max().item()
        scale = want[i].abs().max().item()
        assert err <= 3 * yardstick + 1e-6 * max(scale, 1.0), (
            f"{what}: {err:.3g} vs {yardstick:.3g}"
        )
