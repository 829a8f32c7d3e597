"""``sinks=`` on ``triton`` (docs/api.md, step 6): the forward kernel folds the sink into its
epilogue, the split-K decode into its combine, the backward preprocess writes each row's share
of the sinks' gradient (``-p_sink * delta``), and the probabilities kernel includes the sink in
a recomputed lse. Held to ``math`` in float64 (forward, lse, dq, dk, dv, dsinks).

Under Triton's interpreter (``TRITON_INTERPRET=1``) and, where there is one, on a CUDA GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import selfattn
import test_triton
from helpers import ERR_FLOOR, gen, make_qkv, max_err, to_np
from selfattn.backends import BACKENDS
from selfattn.backends.triton import host, interp
from selfattn.spec import validate
from test_triton import rules, to

dev = test_triton.dev  # the fixture: the interpreter on CPU tensors, or the GPU


def some_sinks(hq: int) -> torch.Tensor:
    """Sinks of every kind: moderate, dominant, negligible and none (-inf)."""
    base = [0.5, 3.0, -4.0, -math.inf, 1.5, -0.5]
    return torch.tensor([base[h % len(base)] for h in range(hq)])


def results(backend, dev, q, k, v, sinks, dout, dlse, kw):
    """out, lse and the gradients of q, k, v, sinks for one backend on ``dev``."""
    leaves = [t.detach().to(dev).requires_grad_(True) for t in (q, k, v, sinks)]
    out, lse = selfattn.attention(
        *leaves[:3], sinks=leaves[3], backend=backend, return_lse=True, **to(kw, dev)
    )
    loss = (out * dout.to(dev, out.dtype)).sum()
    loss = loss + (lse.masked_fill(torch.isneginf(lse), 0) * dlse.to(dev)).sum()
    return [out, lse, *torch.autograd.grad(loss, leaves)]


def check(dev, shape, rule, dtype=torch.float32):
    b, hq, hkv, nq, nk, d = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype=dtype, seed=31)
    sinks = some_sinks(hq).to(dtype)
    kw = rules(rule, b, hq, nq, nk, dtype)
    g = gen(32)
    dout = torch.randn(b, hq, nq, d, generator=g)
    dlse = torch.randn(b, hq, nq, generator=g)
    got = results("triton", dev, q, k, v, sinks, dout, dlse, kw)
    wide = [t.double() for t in (q, k, v, sinks)]
    kw64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in kw.items()}  # fmt: skip
    want = results("math", "cpu", *wide, dout.double(), dlse.double(), kw64)
    names = ["out", "lse", "dq", "dk", "dv", "dsinks"]
    for name, a, w in zip(names, got, want):
        w = to_np(w)
        fin = torch.isfinite(torch.as_tensor(w))
        assert torch.equal(torch.isfinite(a.cpu()), fin), f"{rule} {name}: where finite"
        scale = max(1.0, float(abs(w[fin.numpy()]).max(initial=0.0)))
        tol = (4e-5 if name == "dsinks" else 1e-5) * scale + 4 * ERR_FLOOR[dtype]
        if dtype != torch.float32:
            tol = 4e-2 * scale
        err = max_err(a.cpu()[fin], w[fin.numpy()])
        assert err <= tol, f"{rule} {name}: error {err:.3g} > {tol:.3g}"


SHAPE = (2, 6, 2, 37, 67, 40)  # GQA 6 -> 2, every kind of sink, padded head dim


@pytest.mark.parametrize("rule", ["none", "causal", "segments", "combo"])
def test_sinks_forward_and_backward_match_float64(dev, rule, monkeypatch):
    monkeypatch.setattr(host, "DECODE_MODE", "never")
    check(dev, SHAPE, rule)


@pytest.mark.parametrize("rule", ["mask", "combo"])
def test_sinks_in_split_k_decode(dev, rule, monkeypatch):
    """The sink joins the split-K combine as one more split with no value (three splits)."""
    monkeypatch.setattr(host, "DECODE_MODE", "always")
    monkeypatch.setitem(interp.INTERPRET_BLOCKS, "decode_splits", 3)
    check(dev, (1, 6, 2, 3, 150, 32), rule)


def test_sinks_half_dtype(dev, monkeypatch):
    monkeypatch.setattr(host, "DECODE_MODE", "never")
    check(dev, (1, 6, 2, 37, 67, 64), "causal", torch.float16)


def test_sinks_rows_that_see_nothing(dev, monkeypatch):
    """A row with no visible key: output 0, lse = the sink (-inf without one), finite
    gradients; its sink's gradient is exactly dlse's (p_sink = 1, delta = -dlse)."""
    monkeypatch.setattr(host, "DECODE_MODE", "never")
    q, k, v = make_qkv(1, 2, 2, 5, 9, 32, seed=33)
    sinks = torch.tensor([0.7, -math.inf], device=dev, requires_grad=True)
    mask = torch.zeros(5, 9, dtype=torch.bool, device=dev)
    qq, kk, vv = (t.to(dev).requires_grad_(True) for t in (q, k, v))
    out, lse = selfattn.attention(qq, kk, vv, mask=mask, sinks=sinks, backend="triton",
                                  return_lse=True)  # fmt: skip
    assert (out == 0).all()
    assert torch.equal(lse[0, 0].cpu(), torch.full((5,), 0.7)) and torch.isneginf(lse[0, 1]).all()
    dlse = torch.arange(5.0, device=dev)
    grads = torch.autograd.grad((lse[0, 0] * dlse).sum() + out.sum(), [qq, kk, vv, sinks])
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[3].tolist() == [10.0, 0.0]


@pytest.mark.parametrize("given_lse", [False, True], ids=["recomputed_lse", "given_lse"])
def test_sinks_in_weights_and_stats(dev, given_lse):
    """attention_weights' probabilities take the sink's share (rows sum to less than 1), from a
    given lse or one the kernel recomputes; attention_stats' reductions agree with them."""
    q, k, v = make_qkv(1, 6, 2, 37, 67, 32, seed=34)
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    sinks = some_sinks(6).to(dev)
    lse = None
    if given_lse:
        _, lse = selfattn.attention(q, k, v, sinks=sinks, causal=True, return_lse=True,
                                    backend="triton")  # fmt: skip
    spec = validate(q, k, None, need_v=False, sinks=sinks, causal=True)
    got = BACKENDS["triton"].weights(spec, q, k, lse, None, None)
    want = selfattn.attention_weights(
        q.cpu().double(), k.cpu().double(), sinks=sinks.cpu().double(), causal=True
    )
    assert max_err(got.cpu(), to_np(want)) < 1e-6
    assert (got.sum(-1)[:, 1] < 0.99).all()  # head 1's sink (3.0) takes a visible share
    st = BACKENDS["triton"].stats(
        spec, q, k, lse, None, None, col_sum=True, col_max=True, entropy=False, topk=0
    )
    assert max_err(st["col_sum"].cpu(), to_np(got.sum(2))) < 1e-5
    assert max_err(st["col_max"].cpu(), to_np(got.amax(2))) < 1e-6


def test_sinks_with_no_keys_at_all(dev):
    """Nk = 0: every row is its sink alone: output 0, lse = sinks[h], dsinks = sum of dlse (the
    early return that skips the kernels gave lse -inf and dsinks 0 before)."""
    q, k, v = make_qkv(1, 2, 1, 3, 0, 16, seed=35)
    sinks = torch.tensor([0.25, -math.inf], device=dev, requires_grad=True)
    qq = q.to(dev).requires_grad_(True)
    out, lse = selfattn.attention(qq, k.to(dev), v.to(dev), sinks=sinks, backend="triton",
                                  return_lse=True)  # fmt: skip
    assert (out == 0).all() and (lse[0, 0] == 0.25).all() and torch.isneginf(lse[0, 1]).all()
    dlse = torch.tensor([1.0, 2.0, 4.0], device=dev)
    (ds,) = torch.autograd.grad((lse[0, 0] * dlse).sum(), [sinks])
    assert ds.tolist() == [7.0, 0.0]


@pytest.mark.parametrize("decode", [False, True], ids=["rows", "decode"])
def test_sinks_with_quantized_keys_and_values(dev, decode, monkeypatch):
    """Sinks and codes read in the kernels together: the same as math on dequantize()."""
    from selfattn.quant import quantize_kv

    monkeypatch.setattr(host, "DECODE_MODE", "always" if decode else "never")
    q, k, v = make_qkv(1, 6, 2, 3 if decode else 37, 90, 32, seed=36)
    kq, vq = quantize_kv(k, bits=8), quantize_kv(v, bits=4, rotate=True)
    sinks = some_sinks(6)
    want, want_lse = selfattn.attention(
        q, kq.dequantize(), vq.dequantize(), sinks=sinks, causal=True, return_lse=True,
        backend="math",
    )  # fmt: skip
    kd, vd = (
        type(t)(t.codes.to(dev), t.scales.to(dev), bits=t.bits, group_size=t.group_size,
                rotate=t.rotate, dtype=t.dtype)
        for t in (kq, vq)
    )  # fmt: skip
    out, lse = selfattn.attention(
        q.to(dev), kd, vd, sinks=sinks.to(dev), causal=True, return_lse=True, backend="triton"
    )
    assert max_err(out.cpu(), to_np(want)) < 2e-6
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin)
    assert max_err(lse.cpu()[fin], to_np(want_lse[fin])) < 1e-5
