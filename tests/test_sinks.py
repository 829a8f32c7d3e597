"""Attention sinks (``sinks=``, docs/api.md step 6): the specification at its edges, every
backend forward and backward against the float64 oracle (the FlashAttention tolerance rule),
every rule combined with sinks, gradcheck, weights, validation and the layers.

The oracle is the textbook formula with the sink as one more column of logits whose value is 0
(``helpers.plain_attention``), in float64 under torch's autograd.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import selfattn
from helpers import (
    assert_close,
    float64_leaves,
    gen,
    make_qkv,
    max_err,
    plain_attention,
    plain_lse,
    ref_attention,
    ref_weights,
    run_backend,
    to_np,
)
from selfattn import reference
from selfattn._compile import attention_op

BACKENDS = ["reference", "math", "tiled", "native", "auto"]
GRAD_BACKENDS = ["math", "tiled", "native", "auto"]

pytestmark = pytest.mark.usefixtures("one_thread")


def sinks_for(hq: int, seed: int = 90, dtype=torch.float32) -> torch.Tensor:
    """(Hq,) sinks around the scores' range, one far above them and one of -inf when Hq allows."""
    s = torch.randn(hq, generator=gen(seed)) * 1.5
    if hq >= 3:
        s[1] = 12.0  # takes nearly all the mass
    if hq >= 4:
        s[3] = -math.inf  # no sink on this head
    return s.to(dtype)


# -- the specification at its edges ---------------------------------------------------------------


def test_reference_sink_is_one_more_logit_without_value():
    g = np.random.default_rng(0)
    q, k, v = g.normal(size=(2, 3, 5, 8)), g.normal(size=(2, 3, 7, 8)), g.normal(size=(2, 3, 7, 4))
    sinks = np.array([0.3, -2.0, 4.0])
    out, lse = reference.attention(q, k, v, sinks=sinks, return_lse=True)
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(8)
    ext = np.concatenate([s, np.broadcast_to(sinks[:, None, None], (2, 3, 5, 1))], -1)
    want_lse = np.log(np.exp(ext).sum(-1))
    p = np.exp(ext - want_lse[..., None])[..., :7]
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-13)
    np.testing.assert_allclose(out, p @ v, rtol=0, atol=1e-13)


def test_reference_minus_inf_sink_is_no_sink_exactly():
    g = np.random.default_rng(1)
    q, k, v = g.normal(size=(1, 2, 4, 8)), g.normal(size=(1, 2, 6, 8)), g.normal(size=(1, 2, 6, 8))
    mask = g.random((1, 1, 4, 6)) < 0.5
    mask[..., 0, :] = False
    a = reference.attention(q, k, v, mask=mask, return_lse=True)
    b = reference.attention(q, k, v, mask=mask, sinks=np.full(2, -np.inf), return_lse=True)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_reference_huge_sink_and_empty_rows():
    g = np.random.default_rng(2)
    q, k, v = g.normal(size=(1, 3, 4, 8)), g.normal(size=(1, 3, 6, 8)), g.normal(size=(1, 3, 6, 8))
    mask = np.ones((1, 1, 4, 6), dtype=bool)
    mask[..., 2, :] = False  # a row with no visible key
    sinks = np.array([1e30, -1e30, 0.5])
    with np.errstate(over="raise", invalid="raise"):  # no overflow, no NaN on the way
        out, lse = reference.attention(q, k, v, mask=mask, sinks=sinks, return_lse=True)
    assert np.all(out[0, 0] == 0) and np.all(lse[0, 0] == 1e30)  # the sink takes everything
    plain_out, plain_lse_ = reference.attention(q, k, v, mask=mask, return_lse=True)
    live = [0, 1, 3]
    np.testing.assert_array_equal(out[0, 1, live], plain_out[0, 1, live])  # no weight at all
    np.testing.assert_array_equal(lse[0, 1, live], plain_lse_[0, 1, live])
    assert np.all(out[0, :, 2] == 0)  # the empty row: output 0, lse the sink
    np.testing.assert_array_equal(lse[0, :, 2], sinks)
    # a single head (the lesson's 2-D case) takes a one-element sink
    out2, _lse2 = reference.attention(q[0, 2], k[0, 2], v[0, 2], sinks=sinks[2:], return_lse=True)
    np.testing.assert_allclose(out2, reference.attention(q, k, v, sinks=sinks)[0, 2], atol=1e-14)


def test_weights_sum_to_one_minus_the_sinks_share():
    q, k, _ = make_qkv(1, 4, 2, 9, 13, 16, dtype=torch.float64, seed=3)
    sinks = sinks_for(4, dtype=torch.float64)
    mask = torch.rand(1, 1, 9, 13, generator=gen(4)) < 0.6
    mask[..., 5, :] = False
    _, lse = selfattn.attention(q, k, k, mask=mask, sinks=sinks, return_lse=True, backend="math")
    share = torch.exp(sinks.view(1, -1, 1) - lse.double()).nan_to_num(0.0)
    want = ref_weights(q, k, mask=mask, sinks=sinks)
    for backend_lse in (None, lse):
        w = selfattn.attention_weights(q, k, mask=mask, sinks=sinks, lse=backend_lse)
        assert max_err(w, want) < 1e-6
        sums = w.double().sum(-1)
        live = sums > 0
        assert torch.allclose(sums[live], (1 - share)[live], atol=1e-6)
        assert (w[..., 5, :] == 0).all()


# -- forward against the float64 specification ---------------------------------------------------

# (name, B, Hq, Hkv, Nq, Nk, D, rules)
FWD_CASES = [
    ("plain_1key", 1, 4, 4, 1, 1, 64, ()),
    ("decode_97", 2, 4, 2, 1, 97, 64, ("causal",)),
    ("decode_257_gqa", 1, 8, 2, 1, 257, 128, ("window",)),
    ("causal_97", 2, 4, 2, 97, 97, 40, ("causal",)),
    ("q57_k257_window", 1, 4, 1, 57, 257, 64, ("window",)),
    ("mask_empty_rows", 2, 4, 2, 33, 97, 64, ("mask",)),
    ("bias", 1, 4, 2, 33, 97, 40, ("bias",)),
    ("alibi", 1, 4, 4, 33, 97, 64, ("alibi", "causal")),
    ("softcap", 1, 4, 2, 33, 97, 128, ("softcap",)),
    ("segments", 2, 4, 2, 64, 64, 64, ("segments",)),
    ("scale", 1, 4, 2, 33, 257, 40, ("scale",)),
    ("combo", 2, 4, 2, 40, 97, 40, ("causal", "window", "mask", "bias", "alibi", "softcap",
                                   "segments", "scale")),
]  # fmt: skip


def rules_for(names, b, hq, nq, nk, dtype, seed=91) -> dict:
    g = gen(seed)
    kw: dict = {}
    for r in names:
        if r == "causal":
            kw["causal"] = True
        elif r == "window":
            kw["window"] = (20, 3)
        elif r == "mask":
            m = torch.rand(b, 1, nq, nk, generator=g) < 0.6
            m[:, :, nq // 2] = False  # a row that sees no key
            kw["mask"] = m
        elif r == "bias":
            kw["bias"] = torch.randn(b, 1, nq, nk, generator=g).to(dtype)
        elif r == "alibi":
            kw["alibi_slopes"] = (torch.rand(hq, generator=g) * 0.1).to(dtype)
        elif r == "softcap":
            kw["softcap"] = 2.0
        elif r == "segments":
            kv = torch.arange(nk).div(29, rounding_mode="floor").expand(b, nk).clone()
            kv[-1, nk - 5 :] = -1
            kw["segment_ids"] = kv if nq == nk else (kv[:, nk - nq :], kv)
        elif r == "scale":
            kw["scale"] = 0.3
    return kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: c[0])
def test_forward_matches_float64(case, backend, dtype):
    name, b, hq, hkv, nq, nk, d, names = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype=dtype, seed=92)
    kw = rules_for(names, b, hq, nq, nk, dtype)
    kw["sinks"] = sinks_for(hq)
    out, lse = run_backend(backend, q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = ref_attention(q, k, v, **kw)
    assert_close(out, ref_out, plain_attention(q, k, v, **kw), dtype, f"{backend} {name} out")
    assert lse.dtype == torch.float32
    err = max_err(lse, ref_lse)
    assert err <= 2e-6 * (1 + np.abs(ref_lse[np.isfinite(ref_lse)]).max()), (backend, name, err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_give_zero_and_the_sink(backend):
    q, k, v = make_qkv(2, 4, 2, 6, 9, 16, seed=93)
    sinks = sinks_for(4)
    mask = torch.ones(2, 1, 6, 9, dtype=torch.bool)
    mask[:, :, [0, 4]] = False
    out, lse = run_backend(backend, q, k, v, mask=mask, sinks=sinks, return_lse=True)
    assert (out[:, :, [0, 4]] == 0).all()
    assert torch.equal(lse[:, :, [0, 4]], sinks.view(1, 4, 1).expand(2, 4, 2))
    # no key at all (Nk = 0): the same
    out, lse = run_backend(backend, q, k[:, :, :0], v[:, :, :0], sinks=sinks, return_lse=True)
    assert (out == 0).all() and torch.equal(lse, sinks.view(1, 4, 1).expand(2, 4, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_sinks_are_no_sinks(backend):
    q, k, v = make_qkv(1, 2, 1, 7, 11, 16, seed=94)
    mask = torch.rand(1, 1, 7, 11, generator=gen(95)) < 0.5
    mask[..., 3, :] = False
    none = run_backend(backend, q, k, v, mask=mask, return_lse=True)
    inf = run_backend(
        backend, q, k, v, mask=mask, sinks=torch.full((2,), -math.inf), return_lse=True
    )
    for a, b in zip(none, inf):  # auto may pick another backend for the plain call
        assert torch.equal(a, b) if backend != "auto" else max_err(a, to_np(b)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_sinks_take_all_the_mass_without_overflow(backend):
    q, k, v = make_qkv(1, 2, 2, 5, 8, 16, seed=96)
    sinks = torch.tensor([1e30, -1e30])
    out, lse = run_backend(backend, q, k, v, sinks=sinks, return_lse=True)
    assert (out[:, 0] == 0).all() and (lse[:, 0] == 1e30).all()
    ref_out, ref_lse = ref_attention(q, k, v)
    assert max_err(out[:, 1], ref_out[:, 1]) < 1e-5
    assert max_err(lse[:, 1], ref_lse[:, 1]) < 1e-5


def test_dropout_with_sinks_agrees_across_backends():
    q, k, v = make_qkv(1, 4, 2, 33, 70, 16, seed=97)
    sinks = sinks_for(4)
    outs = {}
    for backend in ("math", "tiled", "native"):
        torch.manual_seed(5)
        outs[backend] = selfattn.attention(
            q, k, v, causal=True, sinks=sinks, dropout_p=0.3, backend=backend
        )
    assert (outs["math"] - outs["tiled"]).abs().max() < 1e-5
    assert (outs["math"] - outs["native"]).abs().max() < 1e-5


# -- gradients -----------------------------------------------------------------------------------

GRAD_CASES = [
    ("causal_97_d40", 1, 4, 2, 97, 97, 40, ("causal",), torch.float32),
    ("decode_257", 2, 4, 1, 1, 257, 64, (), torch.float32),
    ("mask_empty_rows", 2, 4, 2, 33, 97, 64, ("mask",), torch.float32),
    ("bias_alibi", 1, 4, 2, 33, 97, 64, ("bias", "alibi", "window"), torch.float32),
    ("softcap_segments", 2, 4, 4, 64, 64, 128, ("softcap", "segments"), torch.float32),
    ("combo_bf16", 2, 4, 2, 40, 97, 40, ("causal", "window", "mask", "bias", "alibi", "softcap",
                                        "segments", "scale"), torch.bfloat16),
    ("combo_f64", 1, 4, 2, 23, 41, 16, ("window", "mask", "bias", "alibi", "softcap"),
     torch.float64),
]  # fmt: skip


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c[0])
def test_gradients_match_float64(case, backend):
    """dq, dk, dv, dbias, dalibi and dsinks of ``sum(out * dO) + sum(lse * dlse)``."""
    name, b, hq, hkv, nq, nk, d, names, dtype = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype=dtype, seed=98)
    kw = rules_for(names, b, hq, nq, nk, dtype)
    # sinks that leave the keys a gradient; -30 for -inf: the oracle's empty rows would be NaN
    kw["sinks"] = sinks_for(hq, dtype=dtype).clamp(min=-30.0, max=3.0)
    train = ["sinks", *(n for n in ("bias", "alibi_slopes") if n in kw)]
    dout = torch.randn(b, hq, nq, d, generator=gen(99)).to(dtype)
    dlse = torch.randn(b, hq, nq, generator=gen(100))

    def loss_grads(fn, leaves):
        kw_t = {**kw, **dict(zip(train, leaves[3:]))}
        out, lse = fn(*leaves[:3], **kw_t)
        live = torch.isfinite(lse)
        loss = (out * dout.to(out.dtype)).sum() + (lse.where(live, 0) * dlse.to(lse.dtype)).sum()
        return torch.autograd.grad(loss, leaves)

    def plain(*qkv, **kws):
        return plain_attention(*qkv, **kws), plain_lse(qkv[0], qkv[1], **kws)

    tensors = (q, k, v, *(kw[n] for n in train))
    ref = [to_np(g) for g in loss_grads(plain, float64_leaves(*tensors))]
    same = loss_grads(plain, [t.detach().clone().requires_grad_(True) for t in tensors])
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    got = loss_grads(lambda *a, **kws: run_backend(backend, *a, return_lse=True, **kws), leaves)
    for label, g, r, p in zip(["q", "k", "v", *train], got, ref, same):
        assert torch.isfinite(g).all(), f"{backend} {name}: d{label} not finite"
        if label in ("q", "k", "v"):
            assert_close(g, r, p, dtype, f"{backend} {name} d{label}")
        else:  # summed over up to B*Nq*Nk terms: a floor scaled by the magnitude as well
            err, base = max_err(g, r), max_err(p, r)
            tol = 3 * base + 16 * torch.finfo(dtype).eps * (np.abs(r).max() + 1)
            assert err <= tol, f"{backend} {name} d{label}: {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", ["math", "tiled", "native"])
def test_gradcheck_float64_with_sinks(backend):
    q, k, v = make_qkv(1, 4, 2, 6, 9, 8, dtype=torch.float64, seed=101, requires_grad=True)
    sinks = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 1, 6, 9, generator=gen(102), dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 1, 6, 9, generator=gen(103)) < 0.7
    mask[..., 2, :] = False  # an empty row: lse = sink, output 0

    def fn(q, k, v, sinks, bias):
        return selfattn.attention(
            q, k, v, sinks=sinks, bias=bias, mask=mask, causal=True, backend=backend
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, sinks, bias), eps=1e-6, atol=1e-6, rtol=1e-5)

    def op(q, k, v, sinks):  # the torch.compile custom op's backward, same gradients
        return attention_op(q, k, v, sinks=sinks, mask=mask, softcap=3.0, backend=backend)

    assert torch.autograd.gradcheck(op, (q, k, v, sinks), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "tiled", "native"])
def test_empty_rows_gradients_with_sinks(backend):
    """An empty row's lse is its sink: d lse / d sink = 1 there, and nothing reaches q, k, v."""
    q, k, v = make_qkv(1, 2, 1, 4, 6, 8, seed=104, requires_grad=True)
    sinks = torch.tensor([0.5, -0.5], requires_grad=True)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., :, :] = False
    out, lse = selfattn.attention(q, k, v, mask=mask, sinks=sinks, return_lse=True, backend=backend)
    dq, dk, dv, ds = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, sinks))
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()
    assert torch.equal(ds, torch.full((2,), 4.0))


def test_sinks_under_torch_compile_match_eager():
    """The custom op carries the sinks (its schema comes from RULES) and their gradient."""
    q, k, v = make_qkv(1, 4, 2, 9, 13, 16, seed=105)
    sinks = sinks_for(4).clamp(min=-30.0)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, sinks)]
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad(out.square().sum(), leaves)]

    def call(q, k, v, s):
        return selfattn.attention(q, k, v, causal=True, sinks=s)

    torch._dynamo.reset()
    try:
        got = run(torch.compile(call, fullgraph=True, backend="eager"))
    finally:
        torch._dynamo.reset()
    for a, b in zip(got, run(call)):
        assert (a - b).abs().max() < 1e-5


# -- declining, validation, layers ---------------------------------------------------------------


def test_sdpa_declines_sinks_and_auto_picks_another():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(selfattn.UnsupportedInputs, match="sinks"):
        selfattn.attention(q, k, v, sinks=torch.zeros(2), backend="sdpa")
    text = selfattn.explain(q, k, v, sinks=torch.zeros(2))
    assert "sdpa: declines - takes plain calls only, this one uses sinks" in text
    assert "picks: sdpa" not in text


@pytest.mark.parametrize(
    ("sinks", "error", "match"),
    [
        ([0.0, 1.0], TypeError, "sinks must be a float torch.Tensor of shape"),
        (
            torch.zeros(2, dtype=torch.long),
            TypeError,
            "sinks must have a float dtype, got torch.int64",
        ),
        (torch.zeros(3), ValueError, r"sinks must have shape \(Hq,\) = \(2,\).*got \(3,\)"),
        (torch.zeros(1, 2), ValueError, r"got \(1, 2\)"),
        (torch.zeros(2, device="meta"), ValueError, "sinks is on meta but q, k, v are on cpu"),
    ],
)
def test_bad_sinks_are_refused_before_any_work(sinks, error, match):
    q, k, v = make_qkv(1, 2, 1, 4, 4, 8)
    with pytest.raises(error, match=match):
        selfattn.attention(q, k, v, sinks=sinks)
    with pytest.raises(error, match=match):
        selfattn.attention_weights(q, k, sinks=sinks)


def test_layer_learns_sinks():
    torch.manual_seed(0)
    layer = selfattn.MultiHeadSelfAttention(32, 4, num_kv_heads=2, causal=True, sinks=True)
    assert layer.sinks.shape == (4,) and "sinks=True" in repr(layer)
    with torch.no_grad():
        layer.sinks.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    x = torch.randn(2, 7, 32)
    y, w = layer(x, need_weights=True)
    assert (w.sum(-1) < 1).all()  # the sinks take their share
    y.square().sum().backward()
    assert layer.sinks.grad is not None and (layer.sinks.grad != 0).all()
    ref = selfattn.MultiHeadSelfAttention(32, 4, num_kv_heads=2, causal=True, sinks=True,
                                          backend="math")  # fmt: skip
    ref.load_state_dict(layer.state_dict())
    assert (ref(x) - y).abs().max() < 1e-5
    with pytest.raises(TypeError, match="sinks must be a bool"):
        selfattn.MultiHeadSelfAttention(32, 4, sinks=1)


@pytest.mark.parametrize("backend", ["native", "tiled"])
def test_sinks_with_quantized_keys_and_values(backend):
    """native reads the codes in place (the sinks ride in the same call record); the result is
    that of the dequantized values."""
    q, k, v = make_qkv(1, 4, 2, 1, 300, 64, seed=106)
    sinks = sinks_for(4)
    qk, qv = selfattn.quantize_kv(k, bits=8, rotate=True), selfattn.quantize_kv(v, bits=4)
    out, lse = selfattn.attention(q, qk, qv, sinks=sinks, return_lse=True, backend=backend)
    want = ref_attention(q, qk.dequantize(), qv.dequantize(), sinks=sinks)
    assert max_err(out, want[0]) < 1e-5 and max_err(lse, want[1]) < 1e-5


def test_layer_with_sinks_decodes_token_by_token_like_one_pass():
    torch.manual_seed(0)
    layer = selfattn.MultiHeadSelfAttention(
        32, 4, num_kv_heads=2, causal=True, rope=True, sinks=True
    )
    with torch.no_grad():
        layer.sinks.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        full = layer(x)
        cache = layer.make_cache(2, 7)
        steps = torch.cat([layer(x[:, i : i + 1], cache=cache) for i in range(7)], 1)
    assert (full - steps).abs().max() < 1e-5
