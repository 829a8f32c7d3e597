"""Double backward on ``tiled`` and ``native``: the backward pass is itself differentiable.

``gradgradcheck`` (float64, finite differences of the analytical first derivative) for every
rule, GQA, the bias and slope gradients; Hessian-vector products through the lse against
``math`` (torch's autograd of the dense formula), since the lse is float32 by contract and
finite differences of it are not float64-exact; the declines (dropout, a third derivative).
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import selfattn
from helpers import gen, make_qkv, packed_ids
from selfattn.backends.native import build

BACKENDS = ["tiled", "native"]


def _skip_native(backend: str) -> None:
    if backend == "native" and build.unavailable():
        pytest.skip(build.unavailable())


def _skip_declined(f, args) -> None:
    """Skip a rule the backend declines for now (native: sinks), with its reason."""
    try:
        f(*args)
    except selfattn.UnsupportedInputs as exc:
        pytest.skip(str(exc).splitlines()[-1])


def _inputs(hq=2, hkv=1, nq=6, nk=7, d=4, dv=3, seed=0):
    return make_qkv(1, hq, hkv, nq, nk, d, dv, torch.float64, seed, requires_grad=True)


def _rules(name: str, nq: int, nk: int, hq: int):
    """(keywords, extra differentiable tensors) of one rule."""
    if name == "plain":
        return {}, {}
    if name == "causal":
        return {"causal": True}, {}
    if name == "window":
        return {"window": (2, 1)}, {}
    if name == "mask":
        mask = torch.rand(1, hq, nq, nk, generator=gen(3)) > 0.3
        mask[..., 0] = True
        mask[0, 0, 1] = False  # a row that sees nothing: zero gradients, never NaN
        return {"mask": mask}, {}
    if name == "bias":
        bias = torch.randn(1, hq, nq, nk, generator=gen(4), dtype=torch.float64)
        return {}, {"bias": bias.requires_grad_(True)}
    if name == "bias_broadcast":
        bias = torch.randn(nq, 1, generator=gen(5), dtype=torch.float64)
        return {}, {"bias": bias.requires_grad_(True)}
    if name == "alibi":
        slopes = torch.rand(hq, generator=gen(6), dtype=torch.float64) * 0.5
        return {"causal": True}, {"alibi_slopes": slopes.requires_grad_(True)}
    if name == "softcap":
        return {"softcap": 0.9}, {}
    if name == "segment_ids":
        return {"segment_ids": packed_ids(1, nk, 7)[:, -nq:] if nq == nk else None}, {}
    if name == "sinks":
        sinks = torch.randn(hq, generator=gen(10), dtype=torch.float64)
        return {"causal": True}, {"sinks": sinks.requires_grad_(True)}
    if name == "everything":
        bias = torch.randn(1, 1, nq, nk, generator=gen(8), dtype=torch.float64)
        slopes = torch.rand(1, hq, generator=gen(9), dtype=torch.float64) * 0.3
        return {"causal": True, "window": (3, None), "softcap": 1.3, "scale": 0.7}, {
            "bias": bias.requires_grad_(True),
            "alibi_slopes": slopes.requires_grad_(True),
        }
    raise AssertionError(name)


RULES = [
    "plain",
    "causal",
    "window",
    "mask",
    "bias",
    "bias_broadcast",
    "alibi",
    "softcap",
    "segment_ids",
    "sinks",
    "everything",
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("heads", [(2, 1), (2, 2)], ids=["gqa", "mha"])
def test_gradgradcheck_every_rule(backend, rule, heads):
    _skip_native(backend)
    hq, hkv = heads
    n = 7
    q, k, v = _inputs(hq, hkv, n, n)
    kw, extra = _rules(rule, n, n, hq)
    names = list(extra)

    def f(q, k, v, *more):
        return selfattn.attention(q, k, v, backend=backend, **kw, **dict(zip(names, more)))

    args = (q, k, v, *extra.values())
    _skip_declined(f, args)
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_cross_lengths_and_dv(backend):
    """Nq != Nk (rows bottom-right aligned), Dv != D, causal: the offsets reach the VJP."""
    _skip_native(backend)
    q, k, v = _inputs(2, 1, 3, 8, 4, 5)

    def f(q, k, v):
        return selfattn.attention(q, k, v, causal=True, backend=backend)

    assert gradgradcheck(f, (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "rule", ["plain", "causal", "bias", "alibi", "softcap", "sinks", "everything"]
)
def test_hessian_vector_products_through_lse_match_math(backend, rule):
    """A gradient penalty on a loss of out and lse: the second derivative in every input
    (and in the lse's own first-order path, dlse) equals math's."""
    _skip_native(backend)
    n = 9

    def penalty(name: str) -> list[torch.Tensor]:
        q, k, v = _inputs(2, 1, n, n, seed=1)
        kw, extra = _rules(rule, n, n, 2)
        out, lse = selfattn.attention(q, k, v, backend=name, return_lse=True, **kw, **extra)
        w = torch.randn(out.shape, generator=gen(11), dtype=out.dtype)
        loss = (out * w).sum() + (lse.double().sin() * 0.5).sum()
        leaves = [q, k, v, *extra.values()]
        first = torch.autograd.grad(loss, leaves, create_graph=True)
        gp = sum((g * g).sum() for g in first)
        return list(torch.autograd.grad(gp, leaves))

    try:
        got = penalty(backend)
    except selfattn.UnsupportedInputs as exc:
        pytest.skip(str(exc).splitlines()[-1])
    want = penalty("math")
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-5 * (1 + b.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivative_under_dropout_declines_clearly(backend):
    """Dropout's second derivative is not written out: a clear error, never a gradient
    penalty that silently lacks a term."""
    _skip_native(backend)
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8, requires_grad=True)
    out = selfattn.attention(q, k, v, causal=True, dropout_p=0.2, backend=backend)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match=rf"backend '{backend}'.*dropout"):
        gq.square().sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_third_derivative_declines_clearly(backend):
    _skip_native(backend)
    q, k, v = _inputs()
    out = selfattn.attention(q, k, v, backend=backend)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (hq,) = torch.autograd.grad(gq.square().sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match=rf"backend '{backend}' differentiates"):
        hq.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_gradient_penalty_matches_math(backend):
    """The everyday case: float32 inputs, a long enough sequence for several key chunks."""
    _skip_native(backend)
    q, k, v = make_qkv(1, 4, 2, 700, 700, 16, requires_grad=True, seed=2)

    def gp(name):
        out = selfattn.attention(q, k, v, causal=True, backend=name)
        (gq, gk, gv) = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
        pen = gq.square().sum() + gk.square().sum() + gv.square().sum()
        return torch.autograd.grad(pen, (q, k, v))

    for a, b in zip(gp(backend), gp("math")):
        assert (a - b).abs().max().item() < 2e-3 * b.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [(8, 4), (2, 1)], ids=["head_split", "row_split"])
def test_double_backward_on_the_worker_threads_matches_math(backend, heads):
    """The VJP split across the engine's threads (by heads, or by row bands whose key/value
    heads, bias and slope gradients are summed over the parts) equals math's."""
    from helpers import tiled_split, torch_threads

    _skip_native(backend)
    hq, hkv = heads
    n = 300

    def penalty(name):
        q, k, v = make_qkv(2, hq, hkv, n, n, 8, dtype=torch.float64, seed=3, requires_grad=True)
        bias = torch.randn(2, 1, n, n, generator=gen(12), dtype=torch.float64).requires_grad_()
        slopes = (torch.rand(2, hq, generator=gen(13), dtype=torch.float64)).requires_grad_()
        leaves = [q, k, v, bias, slopes]
        out, lse = selfattn.attention(
            q, k, v, causal=True, bias=bias, alibi_slopes=slopes, backend=name, return_lse=True
        )
        loss = out.square().sum() + lse.double().sum()
        first = torch.autograd.grad(loss, leaves, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in first), leaves)

    with torch_threads(2), tiled_split():
        got = penalty(backend)
    want = penalty("math")
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-9 * (1 + b.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["plain", "mask", "softcap", "everything"])
@pytest.mark.parametrize("split", [False, True], ids=["one_thread", "worker_threads"])
@pytest.mark.parametrize("max_keys", [8192, 8], ids=["folded", "unfolded"])
def test_gradient_penalty_with_a_constant_dout_matches_math(
    backend, rule, split, max_keys, monkeypatch
):
    """The benchmark's gradient penalty: dO a constant (no dO gradient is computed) and the
    forward's own backward of the out and lse gradients folded into the same pass (or, past
    ``FOLD_MAX_KEYS`` keys, through the forward's node); every input's second derivative (bias
    and slopes included) equals math's, GQA, split or not."""
    from helpers import tiled_split, torch_threads
    from selfattn.engine import hessian

    _skip_native(backend)
    monkeypatch.setattr(hessian, "FOLD_MAX_KEYS", max_keys)
    n = 40

    def penalty(name):
        q, k, v = _inputs(4, 2, n, n, 8, 8, seed=4)
        kw, extra = _rules(rule, n, n, 4)
        leaves = [q, k, v, *extra.values()]
        out = selfattn.attention(q, k, v, backend=name, **kw, **extra)
        do = torch.randn(out.shape, generator=gen(14), dtype=out.dtype)
        first = torch.autograd.grad(out, leaves, do, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in first), leaves)

    with torch_threads(2 if split else 1), tiled_split():
        got = penalty(backend)
    want = penalty("math")
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-9 * (1 + b.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_folded_forward_backward_adds_to_other_uses_of_out_and_lse(backend):
    """The forward's backward of the out and lse gradients runs inside the double backward;
    a loss that also uses out and lse directly still gets their own first-order terms."""
    _skip_native(backend)
    n = 12

    def total(name):
        q, k, v = _inputs(2, 1, n, n, seed=5)
        out, lse = selfattn.attention(q, k, v, causal=True, backend=name, return_lse=True)
        do = torch.randn(out.shape, generator=gen(15), dtype=out.dtype)
        first = torch.autograd.grad(out, (q, k, v), do, create_graph=True)
        loss = sum((g * g).sum() for g in first) + (out * do).sum() + lse.double().sum()
        return torch.autograd.grad(loss, (q, k, v))

    for a, b in zip(total(backend), total("math")):
        assert (a - b).abs().max().item() < 1e-9 * (1 + b.abs().max().item())
