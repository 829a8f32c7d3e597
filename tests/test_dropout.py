"""Dropout: one mask for every backend, reproducible, unbiased, and the same in backward.

With ``v`` the identity (Dv = Nk) the output *is* the matrix of dropped and rescaled
probabilities, so the mask can be read off the output: zero where dropped, ``p / (1 - p_drop)``
elsewhere. ``selfattn._rng.draw_seed()`` after the same ``torch.manual_seed`` gives the seed a
call drew, which ``selfattn.reference.attention(..., dropout_seed=seed)`` turns into the
specification's output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import selfattn
from helpers import gen, make_qkv, ref_attention, run_backend, tiled_split, to_np, torch_threads
from selfattn import _rng
from selfattn.engine import BLOCK_N

ENGINES = ["reference", "math", "tiled", "auto"]


# One torch thread throughout; the tiled engine's own thread split is tested on purpose
# (the ``*_threaded_*`` tests, with 2 threads).
pytestmark = pytest.mark.usefixtures("one_thread")


def identity_values(b, hkv, nk, dtype=torch.float32):
    return torch.eye(nk, dtype=dtype).expand(b, hkv, nk, nk)


def seed_of_call(s: int) -> tuple[int, int]:
    """The dropout seed a call makes right after ``torch.manual_seed(s)``."""
    torch.manual_seed(s)
    return _rng.draw_seed()


# Several row tiles (Nq=200 with 2 query heads per key head) and key blocks (Nk > BLOCK_N).
B, HQ, HKV, NQ, NK = 2, 4, 2, 200, BLOCK_N + 88
RULES = {
    "none": {},
    "causal_window": {"causal": True, "window": (200, None)},
    "segments_bias": {
        "segment_ids": (
            torch.arange(NQ).div(90, rounding_mode="floor").expand(B, NQ),
            torch.arange(NK).sub(NK - NQ).div(90, rounding_mode="floor").expand(B, NK),
        ),
        "bias": torch.randn(B, 1, NQ, NK, generator=gen(3)),
    },
}


@pytest.mark.parametrize("rule, p", [("none", 0.1), ("causal_window", 0.5), ("segments_bias", 0.3)])
def test_same_mask_on_every_backend_and_in_the_spec(rule, p):
    q, k, _ = make_qkv(B, HQ, HKV, NQ, NK, 16, seed=1)
    v = identity_values(B, HKV, NK)
    kw = RULES[rule]
    seed = seed_of_call(123)
    spec, _ = ref_attention(q, k, v, dropout_p=p, dropout_seed=seed, **kw)
    kept = spec != 0
    for backend in ENGINES:
        torch.manual_seed(123)
        out = run_backend(backend, q, k, v, dropout_p=p, **kw)
        got = to_np(out)
        assert np.array_equal(got != 0, kept), f"{backend}: a different dropout mask"
        np.testing.assert_allclose(got, spec, atol=2e-6, err_msg=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_same_mask_in_every_dtype(dtype):
    q, k, _ = make_qkv(1, 2, 1, 70, 90, 16, dtype=dtype, seed=2)
    v = identity_values(1, 1, 90, dtype)
    seed = seed_of_call(7)
    spec, _ = ref_attention(q, k, v, dropout_p=0.3, dropout_seed=seed, causal=True)
    for backend in ENGINES:
        torch.manual_seed(7)
        out = run_backend(backend, q, k, v, dropout_p=0.3, causal=True)
        assert out.dtype == dtype
        assert np.array_equal(to_np(out) != 0, spec != 0), backend


@pytest.mark.parametrize("backend", ENGINES)
def test_reproducible_under_manual_seed(backend):
    q, k, v = make_qkv(2, 2, 2, 40, 50, 16, seed=4)
    torch.manual_seed(5)
    a = run_backend(backend, q, k, v, dropout_p=0.4)
    b = run_backend(backend, q, k, v, dropout_p=0.4)  # the RNG moved on: another mask
    torch.manual_seed(5)
    c = run_backend(backend, q, k, v, dropout_p=0.4)
    torch.manual_seed(6)
    d = run_backend(backend, q, k, v, dropout_p=0.4)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)
    assert not torch.equal(a, d)


@pytest.mark.parametrize("backend", ENGINES)
def test_zero_dropout_is_no_dropout(backend):
    q, k, v = make_qkv(1, 2, 2, 30, 40, 8, seed=8)
    state = torch.get_rng_state()
    a = run_backend(backend, q, k, v, dropout_p=0.0, causal=True)
    assert torch.equal(torch.get_rng_state(), state), "p=0 should draw no seed"
    assert torch.equal(a, run_backend(backend, q, k, v, causal=True))


def test_sdpa_declines_dropout_and_auto_uses_the_shared_mask():
    q, k, v = make_qkv(1, 2, 2, 30, 30, 8, seed=9)
    with pytest.raises(selfattn.UnsupportedInputs, match="dropout"):
        selfattn.attention(q, k, v, dropout_p=0.2, backend="sdpa")
    torch.manual_seed(1)
    a = selfattn.attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(1)
    b = selfattn.attention(q, k, v, dropout_p=0.2, backend="tiled")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # the same mask (another would differ)


@pytest.mark.parametrize("backend", ["math", "tiled"])
def test_unbiased(backend):
    """The mean over many draws approaches the output without dropout (within 5 sigma).

    20 seeds x 16 copies of the batch: each copy has its own row ids, hence its own mask.
    """
    q, k, v = make_qkv(1, 2, 2, 8, 64, 8, seed=10)
    want = to_np(selfattn.attention(q, k, v, backend="math"))
    qs, ks, vs = (t.expand(16, -1, -1, -1) for t in (q, k, v))
    torch.manual_seed(11)
    draws = np.concatenate(
        [to_np(run_backend(backend, qs, ks, vs, dropout_p=0.3)) for _ in range(20)]
    )  # (320, 2, 8, 8)
    mean, sd = draws.mean(0, keepdims=True), draws.std(0) / np.sqrt(len(draws))
    z = np.abs(mean - want) / sd
    assert z.max() < 5.0, f"max z-score {z.max():.2f}"
    assert np.abs(mean - want).mean() < 0.2 * np.abs(want).mean()


def test_kept_fraction_matches_p():
    q, k, _ = make_qkv(1, 4, 4, 64, 256, 8, seed=12)
    v = identity_values(1, 4, 256)
    for p in (0.05, 0.3, 0.9):
        torch.manual_seed(13)
        out = selfattn.attention(q, k, v, dropout_p=p, backend="tiled")
        frac = (out != 0).float().mean().item()  # 65536 entries: sd <= 0.002
        assert abs(frac - (1 - p)) < 0.01, (p, frac)


@pytest.mark.parametrize("backend", ENGINES)
def test_lse_and_empty_rows_with_dropout(backend):
    """The lse is that of the scores (before dropout); rows that see nothing stay 0."""
    q, k, v = make_qkv(1, 2, 2, 40, 30, 8, seed=14)
    torch.manual_seed(15)
    out, lse = run_backend(backend, q, k, v, causal=True, dropout_p=0.5, return_lse=True)
    _, lse0 = run_backend(backend, q, k, v, causal=True, return_lse=True)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse0))
    torch.testing.assert_close(lse, lse0)
    assert (out[:, :, :10] == 0).all() and torch.isfinite(out).all()


# -- backward uses the forward's mask -------------------------------------------------------------


def test_gradcheck_tiled_with_a_fixed_seed():
    """Re-seeding before every evaluation fixes the mask: finite differences then see the
    function whose gradient backward must compute, which needs the forward's mask."""
    q, k, v = make_qkv(1, 2, 1, 5, 7, 3, dv=4, dtype=torch.float64, seed=16, requires_grad=True)
    bias = torch.randn(5, 7, dtype=torch.float64, generator=gen(17)).requires_grad_(True)

    def fn(q, k, v, bias):
        torch.manual_seed(18)
        return selfattn.attention(q, k, v, bias=bias, causal=True, dropout_p=0.4, backend="tiled")

    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rule", ["none", "causal_window", "segments_bias"])
def test_tiled_and_math_gradients_agree_with_the_same_seed(rule):
    q, k, v = make_qkv(B, HQ, HKV, NQ, NK, 16, seed=19)
    kw = dict(RULES[rule])
    dout = torch.randn(B, HQ, NQ, 16, generator=gen(20))
    res = {}
    for backend in ("math", "tiled"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        extra = {}
        if "bias" in kw:
            extra["bias"] = kw["bias"].clone().requires_grad_(True)
        torch.manual_seed(21)
        out = selfattn.attention(*leaves, dropout_p=0.3, backend=backend, **{**kw, **extra})
        wanted = leaves + list(extra.values())
        res[backend] = (out, torch.autograd.grad(out, wanted, dout))
    torch.testing.assert_close(res["tiled"][0], res["math"][0], atol=2e-5, rtol=1e-5)
    for name, a, b in zip(["q", "k", "v", "bias"], res["tiled"][1], res["math"][1]):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=f"d{name}")
    # and a different seed does change the gradient (the mask is really in there)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch.manual_seed(22)
    out = selfattn.attention(*leaves, dropout_p=0.3, backend="tiled", **kw)
    other = torch.autograd.grad(out, leaves, dout)
    assert not torch.allclose(other[2], res["tiled"][1][2], atol=1e-3)


@pytest.mark.parametrize(
    "b, hq, hkv, nq", [(2, 4, 2, 300), (1, 2, 1, 700)], ids=["heads_split", "rows_split"]
)
def test_tiled_threaded_split_draws_the_same_mask(b, hq, hkv, nq):
    nk = BLOCK_N + 88
    q, k, _ = make_qkv(b, hq, hkv, nq, nk, 16, seed=23)
    v = identity_values(b, hkv, nk)
    torch.manual_seed(24)
    one = selfattn.attention(q, k, v, dropout_p=0.3, causal=True, backend="tiled")
    with torch_threads(2), tiled_split():
        torch.manual_seed(24)
        two = selfattn.attention(q, k, v, dropout_p=0.3, causal=True, backend="tiled")
    assert torch.equal(one != 0, two != 0)
    spec, _ = ref_attention(q, k, v, causal=True, dropout_p=0.3, dropout_seed=seed_of_call(24))
    assert np.array_equal(to_np(two) != 0, spec != 0)
    # backward with the same seed on 2 threads gives the 1-thread gradients
    dout = torch.randn(b, hq, nq, nk, generator=gen(25))
    res = []
    for threads in (1, 2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k)]
        with torch_threads(threads), tiled_split():
            torch.manual_seed(24)
            out = selfattn.attention(*leaves, v, dropout_p=0.3, causal=True, backend="tiled")
            res.append(torch.autograd.grad(out, leaves, dout))
    for a, b2 in zip(*res):
        torch.testing.assert_close(a, b2, atol=1e-5, rtol=1e-5)
