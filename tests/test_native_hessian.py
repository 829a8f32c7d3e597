"""native's fused double backward (``csrc/hessian.h`` through ``backends/native/second.py``).

A gradient penalty on ``native`` runs the first-order backward's own backward in one C++ pass
where the folded structure applies. These tests hold it to ``math`` (torch's autograd of the
dense formula) on odd shapes and rules in float64 and float32, check that the fused pass is what
ran (the torch-op pass replaced by one that fails), that it declines cleanly to the torch-op
pass (softcap, bias gradients, non-finite rows), and that its results do not depend on the
thread count. ``tests/test_second_order.py``'s gradgradchecks run through it too.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradgradcheck

import selfattn
from helpers import gen, make_qkv, packed_ids, torch_threads
from selfattn.backends.native import build
from selfattn.engine import second_order

pytestmark = pytest.mark.skipif(build.unavailable() is not None, reason="no native build")


def _torch_pass_fails(monkeypatch) -> None:
    """Make the torch-op double backward raise: a test passing proves the fused pass ran."""

    def fail(*args, **kwargs):
        raise AssertionError("the torch-op double backward ran")

    monkeypatch.setattr(second_order, "double_backward", fail)


def _penalty(backend: str, q, k, v, *, with_lse: bool = False, dout=None, **kw):
    """Second derivatives of a gradient penalty: ``grad(sum g^2)`` over g = d loss / d(q, k, v).
    ``with_lse``: the loss also reads the lse and squares out (dO and dlse both vary)."""
    leaves = [q, k, v]
    if with_lse:
        out, lse = selfattn.attention(q, k, v, backend=backend, return_lse=True, **kw)
        loss = out.square().sum() + lse.double().sin().sum()
        first = torch.autograd.grad(loss, leaves, create_graph=True)
    else:
        out = selfattn.attention(q, k, v, backend=backend, **kw)
        first = torch.autograd.grad(out, leaves, dout, create_graph=True)
    return torch.autograd.grad(sum((g * g).sum() for g in first), leaves)


def _close(got, want, rtol: float) -> None:
    for a, b in zip(got, want):
        err = (a.double() - b.double()).abs().max().item()
        assert err <= rtol * (1 + b.double().abs().max().item()), err


def _rule(name: str, hq: int, n: int) -> dict:
    if name == "plain":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "window":
        return {"window": (13, 4), "scale": 0.3}
    if name == "mask":
        mask = torch.rand(1, hq, n, n, generator=gen(3)) > 0.4
        mask[0, 0, 0] = False  # a row that sees nothing: zero gradients, never NaN
        return {"mask": mask}
    if name == "segment_ids":
        return {"segment_ids": packed_ids(2, n, 7), "causal": True}
    if name == "constant_bias_alibi_sinks":  # no gradient of their own: the fused pass takes it
        return {
            "bias": torch.randn(1, 1, n, n, generator=gen(4), dtype=torch.float64),
            "alibi_slopes": torch.rand(hq, generator=gen(5), dtype=torch.float64),
            "sinks": torch.randn(hq, generator=gen(6), dtype=torch.float64),
            "causal": True,
        }
    raise AssertionError(name)


@pytest.mark.parametrize(
    "n,d,rule",
    [
        (1, 40, "plain"),
        (97, 40, "causal"),
        (97, 64, "mask"),
        (257, 80, "window"),
        (257, 64, "plain"),
        (97, 80, "segment_ids"),
        (97, 64, "constant_bias_alibi_sinks"),
    ],
)
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_fused_double_backward_float64_matches_math(n, d, rule, heads, monkeypatch):
    hq, hkv = heads
    q, k, v = make_qkv(2, hq, hkv, n, n, d, dtype=torch.float64, seed=n + d, requires_grad=True)
    kw = _rule(rule, hq, n)
    dout = torch.randn(2, hq, n, d, generator=gen(7), dtype=torch.float64)
    want = _penalty("math", q, k, v, dout=dout, **kw)
    _torch_pass_fails(monkeypatch)
    got = _penalty("native", q, k, v, dout=dout, **kw)
    _close(got, want, 1e-10)


@pytest.mark.parametrize("rule", ["plain", "causal"])
def test_fused_double_backward_with_dout_and_dlse_gradients_matches_math(rule, monkeypatch):
    """A loss of out and lse: dO varies with q, k, v (its gradient is asked for) and dlse is
    given (the folded lse term). Nq < Nk: every row sees a key (sin of a -inf lse is NaN)."""
    q, k, v = make_qkv(1, 4, 2, 90, 97, 40, 24, dtype=torch.float64, seed=1, requires_grad=True)
    kw = _rule(rule, 4, 97)
    want = _penalty("math", q, k, v, with_lse=True, **kw)
    _torch_pass_fails(monkeypatch)
    got = _penalty("native", q, k, v, with_lse=True, **kw)
    _close(got, want, 1e-10)


def test_fused_double_backward_dout_gradient_over_several_key_chunks(monkeypatch):
    """Sweep 2 runs a chunk of 256 keys at a time: with 300 keys dO-bar's products (asked for
    when dO varies), q-bar's and the key-side ones each add a second, partial chunk."""
    q, k, v = make_qkv(1, 4, 2, 70, 300, 40, 24, dtype=torch.float64, seed=6, requires_grad=True)
    want = _penalty("math", q, k, v, with_lse=True)
    _torch_pass_fails(monkeypatch)
    got = _penalty("native", q, k, v, with_lse=True)
    _close(got, want, 1e-10)


def test_fused_double_backward_float32_within_the_tolerance_rule(monkeypatch):
    """float32 against math in float64: the FlashAttention rule (twice the error of math's own
    float32 result, plus a small floor)."""
    q, k, v = make_qkv(1, 4, 2, 300, 300, 64, seed=2, requires_grad=True)
    dout = torch.randn(1, 4, 300, 64, generator=gen(8))
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    oracle = _penalty("math", *leaves64, dout=dout.double(), causal=True)
    math32 = _penalty("math", q, k, v, dout=dout, causal=True)
    _torch_pass_fails(monkeypatch)
    got = _penalty("native", q, k, v, dout=dout, causal=True)
    for g, m, o in zip(got, math32, oracle):
        err, ref = (g.double() - o).abs().max().item(), (m.double() - o).abs().max().item()
        assert err <= 2 * ref + 1e-5 * o.abs().max().item(), (err, ref)


def test_fused_double_backward_gradgradcheck(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 6, 7, 4, 3, dtype=torch.float64, requires_grad=True)
    _torch_pass_fails(monkeypatch)

    def f(q, k, v):
        return selfattn.attention(q, k, v, causal=True, backend="native")

    assert gradgradcheck(f, (q, k, v))


@pytest.mark.parametrize("rule", ["softcap", "bias_gradient"])
def test_fused_double_backward_declines_to_the_torch_pass(rule, monkeypatch):
    """A softcap or a bias gradient is the torch-op pass's: it runs, and the result is math's."""
    q, k, v = make_qkv(1, 2, 1, 20, 20, 8, dtype=torch.float64, seed=3, requires_grad=True)
    ran = []
    real = second_order.double_backward

    def counted(*args, **kwargs):
        ran.append(1)
        return real(*args, **kwargs)

    kw: dict = {"softcap": 1.5}
    if rule == "bias_gradient":
        kw = {"bias": torch.randn(1, 2, 20, 20, dtype=torch.float64, requires_grad=True)}
    dout = torch.randn(1, 2, 20, 8, generator=gen(9), dtype=torch.float64)
    want = _penalty("math", q, k, v, dout=dout, **kw)
    monkeypatch.setattr(second_order, "double_backward", counted)
    got = _penalty("native", q, k, v, dout=dout, **kw)
    assert ran
    _close(got, want, 1e-10)


def test_fused_double_backward_declines_a_non_finite_key_row():
    """The kernel returns None for a non-finite row of k, v or their cotangents (the torch-op
    pass then takes the call, with the forward's semantics for such rows)."""
    from selfattn.backends.native.second import fused_second

    q, k, v = make_qkv(1, 2, 1, 9, 9, 8, dtype=torch.float64, seed=4)
    out, lse = selfattn.attention(q, k, v, backend="native", return_lse=True)
    second = fused_second(*_call_of(q, k, v))
    dout = torch.randn_like(out)
    gk = torch.randn_like(k)
    assert second(q, k, v, out, lse.double(), dout, None, None, gk, None) is not None
    gk[0, 0, 3, 2] = float("inf")
    assert second(q, k, v, out, lse.double(), dout, None, None, gk, None) is None


def _call_of(q, k, v, **kw):
    """(spec, native call record) of an attention call, as the backend builds them."""
    from selfattn.backends.native.call import record
    from selfattn.spec import validate

    spec = validate(q, k, v, **kw)
    return spec, record(spec)


def test_fused_double_backward_does_not_depend_on_the_thread_count():
    q, k, v = make_qkv(2, 4, 2, 300, 300, 32, dtype=torch.float64, seed=5, requires_grad=True)
    dout = torch.randn(2, 4, 300, 32, generator=gen(10), dtype=torch.float64)
    with torch_threads(1):
        one = _penalty("native", q, k, v, dout=dout, causal=True)
    with torch_threads(2):
        two = _penalty("native", q, k, v, dout=dout, causal=True)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
