"""The ``triton`` backend against the float64 specification: every rule, forward and backward,
split-K decode, dropout masks shared with the other backends, NaN padding, lse and weights.

Each case runs twice: under Triton's CPU interpreter (``TRITON_INTERPRET=1``, marked
``interpret``; set per test with monkeypatch so no other test file sees it) and natively on a
CUDA GPU (marked ``gpu``; skipped where there is none). The interpreter is slow (tens of ms per
tile), so shapes are small and odd (lengths 1, 5, 37, 67, 129, 300; head dims 32, 40, 64) and
the tiles are small (``interp.INTERPRET_BLOCKS``) so that every shape still spans several tiles:
masked, unmasked and skipped stretches all run.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import selfattn
from helpers import (
    ERR_FLOOR,
    assert_close,
    float64_leaves,
    gen,
    make_qkv,
    max_err,
    packed_ids,
    plain_attention,
    plain_lse,
    ref_attention,
    ref_weights,
    to_np,
)
from selfattn import _rng
from selfattn.backends import BACKENDS, candidates
from selfattn.backends.triton import configs, host, interp, tma
from selfattn.spec import validate

DEVICES = [
    pytest.param("interpret", marks=pytest.mark.interpret, id="interp"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
]


@pytest.fixture(params=DEVICES)
def dev(request, monkeypatch) -> torch.device:
    """Where the kernels run: the interpreter on CPU tensors, or natively on the GPU."""
    if request.param == "interpret":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        for kind, blocks in INTERPRET_BLOCKS.items():
            monkeypatch.setitem(interp.INTERPRET_BLOCKS, kind, blocks)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device("cuda")


# tiles under the interpreter: small enough that 67 keys span three tiles
INTERPRET_BLOCKS = {
    "fwd": (32, 32),
    "dkdv": (32, 32),
    "dq": (32, 32),
    "decode_n": 32,
    "decode_splits": None,
    "probs": (32, 32),
}


def seg_arg(b: int, nq: int, nk: int, seed: int):
    kv = packed_ids(b, nk, seed, pad=4, shortest=3)
    if nq == nk:
        return kv
    if nq < nk:  # the queries are the last Nq positions (a cache)
        return (kv[:, nk - nq :].to(torch.int32), kv.to(torch.int32))
    return (torch.randint(-1, int(kv.max()) + 1, (b, nq), generator=gen(seed + 1)), kv)


def rand_mask(shape, seed: int, p_true: float = 0.7) -> torch.Tensor:
    m = torch.rand(shape, generator=gen(seed)) < p_true
    if len(shape) >= 2 and shape[-2] > 2:
        m[..., 1, :] = False  # a row that sees nothing
    return m


def rules(name: str, b: int, hq: int, nq: int, nk: int, dtype, seed: int = 7) -> dict:
    """Keyword arguments of one named rule (or combination) for shape (b, hq, nq, nk)."""
    g = gen(seed)
    table = {
        "none": lambda: {},
        "causal": lambda: {"causal": True},
        "window": lambda: {"window": (9, 4)},
        "window_causal": lambda: {"window": (20, 0)},
        "window_left": lambda: {"window": (15, None)},
        "window_right": lambda: {"window": (None, 3)},
        "mask": lambda: {"mask": rand_mask((b, hq, nq, nk), seed)},
        "mask_bcast": lambda: {"mask": torch.arange(nk) < nk - nk // 3},
        "bias": lambda: {"bias": torch.randn(b, hq, nq, nk, generator=g).to(dtype)},
        "bias_bcast": lambda: {"bias": torch.randn(1, hq, 1, nk, generator=g).to(dtype)},
        "bias_rows": lambda: {"bias": torch.randn(b, 1, nq, 1, generator=g).to(dtype)},
        "alibi": lambda: {"alibi_slopes": torch.tensor([2.0 ** (-(h + 1)) for h in range(hq)])},
        "alibi_b": lambda: {"alibi_slopes": torch.rand(b, hq, generator=g) * 0.2},
        "softcap": lambda: {"softcap": 1.5},
        "segments": lambda: {"segment_ids": seg_arg(b, nq, nk, seed)},
        "scale": lambda: {"scale": 0.3},
        "combo": lambda: {
            "causal": True,
            "window": (40, None),
            "mask": rand_mask((b, 1, nq, nk), seed, 0.9),
            "bias": torch.randn(b, 1, nq, nk, generator=g).to(dtype),
            "alibi_slopes": torch.rand(hq, generator=g) * 0.1,
            "softcap": 4.0,
            "segment_ids": seg_arg(b, nq, nk, seed),
            "scale": 0.2,
        },
        "combo2": lambda: {
            "window": (None, 2),
            "bias": torch.randn(hq, nq, 1, generator=g).to(dtype),
            "segment_ids": seg_arg(b, nq, nk, seed),
            "softcap": 2.5,
        },
    }
    return table[name]()


RULES = [
    "none", "causal", "window", "window_causal", "window_left", "window_right", "mask",
    "mask_bcast", "bias", "bias_bcast", "bias_rows", "alibi", "alibi_b", "softcap", "segments",
    "scale", "combo", "combo2",
]  # fmt: skip
FEW_RULES = ["none", "causal", "window", "mask", "segments", "combo"]


def to(kw: dict, device) -> dict:
    """The rule arguments on ``device`` (tensors and pairs of tensors)."""
    out = {}
    for name, val in kw.items():
        if isinstance(val, torch.Tensor):
            val = val.to(device)
        elif isinstance(val, tuple) and val and isinstance(val[0], torch.Tensor):
            val = tuple(x.to(device) for x in val)
        out[name] = val
    return out


def run(q, k, v, dev, **kw):
    return selfattn.attention(
        q.to(dev), k.to(dev), v.to(dev), backend="triton", **to(kw, dev)
    )  # fmt: skip


# (B, Hq, Hkv, Nq, Nk, D, Dv): GQA, Nq < Nk and Nq > Nk, Dv != D, padded head dims
SHAPES = {
    "gqa_q37_k67_d40": (1, 4, 2, 37, 67, 40, 40),
    "q67_k37_d32_dv40": (2, 2, 2, 67, 37, 32, 40),
    "mqa_129_d64": (1, 2, 1, 129, 129, 64, 64),
}


# -- forward ------------------------------------------------------------------------------------


def check_forward(dev, shape, rule, dtype=torch.float32, seed=0):
    b, hq, hkv, nq, nk, d, dv = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dv, dtype=dtype, seed=seed)
    kw = rules(rule, b, hq, nq, nk, dtype)
    ref, ref_lse = ref_attention(q, k, v, **kw)
    plain = plain_attention(q, k, v, **kw)
    lse_scale = max(1.0, float(np.abs(ref_lse[np.isfinite(ref_lse)]).max(initial=1.0)))
    # on a GPU both ways of reading keys and values: TMA descriptors (where the probe keeps
    # them) and plain pointers
    for mode in ("auto", "0") if dev.type == "cuda" else (None,):
        with pytest.MonkeyPatch.context() as mp:
            if mode is not None:
                mp.setattr(tma, "MODE", mode)
            out, lse = run(q, k, v, dev, return_lse=True, **kw)
        assert out.shape == (b, hq, nq, dv) and out.device.type == dev.type
        assert_close(out, ref, plain, dtype, f"triton {rule} (TMA {mode})")
        assert lse.dtype == torch.float32
        assert np.array_equal(np.isneginf(to_np(lse)), np.isneginf(ref_lse))
        assert max_err(lse, ref_lse) < 1e-5 * lse_scale


FORWARD_CASES = [
    pytest.param(shape, rule, id=f"{shape}-{rule}")
    for shape in SHAPES
    for rule in (RULES if shape != "mqa_129_d64" else FEW_RULES)
]


@pytest.mark.parametrize("shape, rule", FORWARD_CASES)
def test_forward_matches_spec(dev, shape, rule):
    check_forward(dev, SHAPES[shape], rule)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rule", ["none", "causal", "combo"])
def test_forward_half_dtypes(dev, rule, dtype):
    check_forward(dev, SHAPES["gqa_q37_k67_d40"], rule, dtype)


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1, 1, 32, 32), (1, 2, 1, 5, 1, 32, 32), (1, 2, 2, 1, 300, 64, 64),
     (2, 1, 1, 300, 5, 40, 40)],
    ids=["1x1", "q5_k1", "q1_k300", "q300_k5"],
)  # fmt: skip
@pytest.mark.parametrize("rule", ["none", "causal", "window_causal", "segments"])
def test_forward_extreme_lengths(dev, shape, rule):
    check_forward(dev, shape, rule)


def test_forward_small_tiles_and_long_keys(dev, monkeypatch):
    """16 x 16 tiles over 300 keys: many unmasked tiles between masked edges and skipped ones."""
    if dev.type == "cpu":
        monkeypatch.setitem(interp.INTERPRET_BLOCKS, "fwd", (16, 16))
    check_forward(dev, (1, 1, 1, 37, 300, 32, 32), "window")
    check_forward(dev, (1, 1, 1, 129, 129, 32, 32), "segments")


# -- decode (split-K) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    ["none", "causal", "window_causal", "mask", "bias", "alibi_b", "softcap", "segments", "combo"],
)
def test_decode_matches_spec(dev, rule, monkeypatch):
    """Few queries over many keys through the split-K kernel: GQA 6 -> 2, three splits."""
    monkeypatch.setattr(host, "DECODE_MODE", "always")
    monkeypatch.setitem(interp.INTERPRET_BLOCKS, "decode_splits", 3)
    check_forward(dev, (2, 6, 2, 5, 150, 40, 32), rule)


def test_decode_single_query_and_mqa(dev, monkeypatch):
    monkeypatch.setattr(host, "DECODE_MODE", "always")
    check_forward(dev, (1, 8, 1, 1, 300, 64, 64), "none")
    check_forward(dev, (1, 8, 1, 1, 300, 64, 64), "window_causal")


def test_decode_is_chosen_automatically_for_few_queries_over_long_keys(monkeypatch):
    monkeypatch.setattr(host, "DECODE_MODE", "auto")
    spec = validate(*make_qkv(1, 4, 2, 3, 4096, 64), causal=True)
    assert host.use_decode(spec)
    spec = validate(*make_qkv(1, 4, 2, 64, 4096, 64), causal=True)
    assert not host.use_decode(spec)


# -- backward -------------------------------------------------------------------------------------


def grad_errors(dev, shape, rule, dtype=torch.float32, seed=1, **extra):
    """Max |grad - float64 grad| for q, k, v (and bias, slopes) of triton and of plain torch."""
    b, hq, hkv, nq, nk, d, dv = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dv, dtype=dtype, seed=seed)
    kw = {**rules(rule, b, hq, nq, nk, dtype), **extra}
    learn = [n for n in ("bias", "alibi_slopes") if n in kw]
    g = gen(seed + 5)
    dout = torch.randn(b, hq, nq, dv, generator=g)
    dlse = torch.randn(b, hq, nq, generator=g)

    def loss_grads(backend, tensors, device):
        qq, kk, vv, *ll = (t.detach().to(device).requires_grad_(True) for t in tensors)
        kwd = dict(to(kw, device), **dict(zip(learn, ll)))
        out, lse = selfattn.attention(qq, kk, vv, backend=backend, return_lse=True, **kwd)
        loss = (out * dout.to(device, out.dtype)).sum()
        loss = loss + (lse.masked_fill(torch.isneginf(lse), 0) * dlse.to(device)).sum()
        return torch.autograd.grad(loss, [qq, kk, vv, *ll])

    def plain_grads(tensors):  # the textbook formula in the inputs' dtype: the yardstick
        qq, kk, vv, *ll = (t.detach().requires_grad_(True) for t in tensors)
        kwd = dict(kw, **dict(zip(learn, ll)))
        out = plain_attention(qq, kk, vv, **kwd)
        lse = plain_lse(qq, kk, **kwd)
        loss = (out * dout.to(out.dtype)).sum()
        loss = loss + (lse.masked_fill(torch.isneginf(lse), 0) * dlse.to(lse.dtype)).sum()
        return torch.autograd.grad(loss, [qq, kk, vv, *ll])

    tensors = [q, k, v] + [kw[n] for n in learn]
    got = loss_grads("triton", tensors, dev)
    want = loss_grads("math", float64_leaves(*tensors), "cpu")
    plain = plain_grads(tensors)
    names = ["dq", "dk", "dv", *("d" + n for n in learn)]
    return {
        n: (max_err(a, to_np(w)), max_err(p, to_np(w)), a)
        for n, a, w, p in zip(names, got, want, plain)
    }


def assert_grads_close(errs, dtype=torch.float32, what=""):
    for name, (err, base, grad) in errs.items():
        assert torch.isfinite(grad).all(), f"{what} {name}: non-finite gradient"
        tol = 4.0 * base + 4 * ERR_FLOOR[dtype]
        assert err <= tol, f"{what} {name}: error {err:.3g} > {tol:.3g} (plain {base:.3g})"


BWD_RULES = [
    "none", "causal", "window", "window_left", "mask", "mask_bcast", "bias", "bias_bcast",
    "bias_rows", "alibi", "alibi_b", "softcap", "segments", "combo", "combo2",
]  # fmt: skip


@pytest.mark.parametrize("rule", BWD_RULES)
def test_backward_matches_spec(dev, rule):
    """GQA 4 -> 2, Nq < Nk, padded D = 40: dq, dk, dv, dbias, dslopes and the lse's gradient."""
    errs = grad_errors(dev, (1, 4, 2, 37, 67, 40, 40), rule)
    assert_grads_close(errs, what=rule)


@pytest.mark.parametrize(
    "shape, rule",
    [
        pytest.param((2, 2, 2, 67, 37, 32, 40), "none", id="q67_k37_dv40-none"),
        pytest.param((2, 2, 2, 67, 37, 32, 40), "causal", id="q67_k37_dv40-causal"),
        pytest.param((1, 2, 1, 129, 129, 64, 64), "causal", id="mqa_129_d64-causal"),
        pytest.param((1, 3, 3, 5, 67, 32, 32), "window_causal", id="q5_k67-window"),
    ],
)
def test_backward_shapes(dev, shape, rule):
    assert_grads_close(grad_errors(dev, shape, rule), what=f"{shape} {rule}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_backward_half_dtypes(dev, dtype):
    errs = grad_errors(dev, (1, 2, 1, 37, 67, 64, 64), "causal", dtype)
    assert_grads_close(errs, dtype, what=str(dtype))


def test_backward_through_decode_forward(dev, monkeypatch):
    """The split-K forward saves the same out and lse, so the backward kernels follow it."""
    monkeypatch.setattr(host, "DECODE_MODE", "always")
    assert_grads_close(grad_errors(dev, (1, 4, 2, 3, 150, 32, 32), "causal"), what="decode")


def test_backward_is_deterministic(dev):
    """No atomics: two backward passes agree bit for bit."""
    q, k, v = (t.to(dev) for t in make_qkv(1, 2, 1, 37, 67, 32, seed=3))
    bias = torch.randn(1, 1, 37, 67, device=dev)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        out = selfattn.attention(*leaves[:3], bias=leaves[3], causal=True, backend="triton")
        runs.append(torch.autograd.grad(out.square().sum(), leaves))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# -- dropout ------------------------------------------------------------------------------------


def test_dropout_mask_is_the_shared_counter_hash(dev):
    """With q = 0 every probability is 1/Nk, and with V = I the output row i is
    keep[i, :] / ((1 - p) Nk): the kernel's mask must equal ``_rng.keep_mask`` bit for bit."""
    b, hq, nq, nk, p = 2, 2, 37, 67, 0.3
    q = torch.zeros(b, hq, nq, 16)
    k = torch.randn(b, hq, nk, 16, generator=gen(0))
    v = torch.eye(nk).expand(b, hq, nk, nk)
    torch.manual_seed(1234)
    out = run(q, k, v, dev, dropout_p=p).cpu()
    torch.manual_seed(1234)
    seed = _rng.draw_seed()
    rows = torch.arange(b * hq * nq).view(b, hq, nq, 1)
    keep = _rng.keep_mask(seed, rows, torch.arange(nk), p)
    got = out * (1 - p) * nk
    assert torch.allclose(got, keep.float(), atol=1e-4)
    assert 0.2 < 1 - keep.float().mean() < 0.4


@pytest.mark.parametrize("decode", [False, True], ids=["fwd", "decode"])
def test_dropout_matches_tiled_and_math(dev, decode, monkeypatch):
    """Same seed, same mask: triton, tiled and math agree on outputs and gradients."""
    if decode:
        monkeypatch.setattr(host, "DECODE_MODE", "always")
    nq = 3 if decode else 37
    q, k, v = make_qkv(1, 2, 1, nq, 67, 32, seed=4)
    kw = {"causal": True, "bias": torch.randn(1, 2, nq, 67, generator=gen(5))}
    outs, grads = {}, {}
    for backend, device in (("triton", dev), ("tiled", "cpu"), ("math", "cpu")):
        leaves = [t.to(device).requires_grad_(True) for t in (q, k, v)]
        torch.manual_seed(99)
        out = selfattn.attention(*leaves, backend=backend, dropout_p=0.25, **to(kw, device))
        outs[backend] = out.detach().cpu()
        grads[backend] = [g.cpu() for g in torch.autograd.grad(out.square().sum(), leaves)]
    for other in ("tiled", "math"):
        assert max_err(outs["triton"], to_np(outs[other])) < 2e-5
        for a, b in zip(grads["triton"], grads[other]):
            assert max_err(a, to_np(b)) < 1e-4
    assert not torch.allclose(outs["triton"], run(q, k, v, dev, **kw).cpu(), atol=1e-3)


# -- rows that see nothing, NaN padding ------------------------------------------------------------


def test_fully_masked_rows_are_zero_with_zero_gradients(dev):
    b, hq, nq, nk = 2, 2, 37, 67
    q, k, v = make_qkv(b, hq, hq, nq, nk, 32, seed=6)
    mask = torch.rand(b, hq, nq, nk, generator=gen(6)) < 0.5
    mask[:, :, 3] = False
    mask[1, :, 20:] = False
    ids = (torch.zeros(b, nq, dtype=torch.long), torch.zeros(b, nk, dtype=torch.long))
    ids[0][0, 30:] = -1  # padding queries see nothing
    leaves = [t.to(dev).requires_grad_(True) for t in (q, k, v)]
    kw = to({"mask": mask, "segment_ids": ids, "causal": True}, dev)
    out, lse = selfattn.attention(*leaves, backend="triton", return_lse=True, **kw)
    _, ref_lse = ref_attention(q, k, v, mask=mask, segment_ids=ids, causal=True)
    empty = torch.from_numpy(np.isneginf(ref_lse))
    assert empty.sum() > 40
    assert torch.equal(torch.isneginf(lse.cpu()), empty)
    assert (out.detach().cpu()[empty] == 0).all() and torch.isfinite(out).all()
    dq, dk, dv = torch.autograd.grad(out.sum() + lse.masked_fill(lse.isneginf(), 0).sum(), leaves)
    assert (dq.cpu()[empty] == 0).all()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


NAN_CASES = {
    # name: (Nq, Nk, rule kwargs, keys holding NaN, invisible to every row)
    "segment_padding": (
        37,
        67,
        {"segment_ids": (torch.zeros(2, 37), torch.tensor([[0] * 60 + [-1] * 7] * 2))},
        [61, 66],
    ),
    "mask": (37, 67, {"mask": torch.arange(67) % 7 != 3}, [3, 10, 66]),
    "window": (37, 100, {"window": (10, 0)}, [0, 5, 40, 52]),
    "causal_cache": (8, 40, {"causal": True, "mask": torch.arange(40) != 39}, [39]),
}


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_in_hidden_keys_never_leaks(dev, case, where):
    nq, nk, kw, keys = NAN_CASES[case]
    q, k, v = make_qkv(2, 2, 1, nq, nk, 16, seed=8)
    if "segment_ids" in kw:
        kw = {"segment_ids": tuple(x.long() for x in kw["segment_ids"])}
    clean, _ = ref_attention(q, k, v, **kw)
    t = k if where == "k" else v
    t[:, :, keys] = math.nan
    leaves = [x.to(dev).requires_grad_(True) for x in (q, k, v)]
    out = selfattn.attention(*leaves, backend="triton", **to(kw, dev))
    assert torch.isfinite(out).all(), f"NaN from hidden keys leaked ({case})"
    assert max_err(out, clean) < 1e-5
    dq, dk, dv = torch.autograd.grad(out.sum(), leaves)
    assert torch.isfinite(dq).all()
    visible = [j for j in range(nk) if j not in keys]
    assert torch.isfinite(dk[:, :, visible]).all() and torch.isfinite(dv[:, :, visible]).all()


def test_nan_in_a_visible_key_reaches_exactly_the_rows_that_see_it(dev):
    q, k, v = make_qkv(1, 1, 1, 150, 150, 16, seed=9)
    v[0, 0, 60] = math.nan
    out = run(q, k, v, dev, window=(10, 0)).cpu()
    want = torch.zeros(150, dtype=torch.bool)
    want[60:71] = True
    assert torch.equal(torch.isnan(out[0, 0]).any(-1), want)


def test_nan_without_rules_propagates_everywhere(dev):
    q, k, v = make_qkv(1, 2, 2, 9, 13, 16, seed=10)
    k[:, :, 4] = math.nan
    assert torch.isnan(run(q, k, v, dev)).all()


# -- strides, empty inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["none", "combo"])
def test_non_contiguous_and_expanded_inputs(dev, rule):
    g = gen(11)
    q = torch.randn(2, 37, 4, 48, generator=g).transpose(1, 2)  # (2, 4, 37, 48)
    k = torch.randn(2, 2, 134, 64, generator=g)[:, :, ::2, 8:56]  # (2, 2, 67, 48)
    v = torch.randn(2, 1, 67, 40, generator=g).expand(2, 2, 67, 40)
    kw = rules(rule, 2, 4, 37, 67, torch.float32)
    if "bias" in kw:  # an expanded bias and a transposed mask
        kw["bias"] = kw["bias"][:, :, :, :1].expand(2, 1, 37, 67)
        kw["mask"] = kw["mask"].transpose(-1, -2).contiguous().transpose(-1, -2)
    q, k, v = (t.to(dev) for t in (q, k, v))
    out = selfattn.attention(q, k, v, backend="triton", **to(kw, dev))
    ref, _ = ref_attention(q, k, v, **kw)
    plain = plain_attention(q.cpu().contiguous(), k.cpu().contiguous(), v.cpu().contiguous(), **kw)
    assert_close(out, ref, plain, torch.float32, f"strided {rule}")


def test_empty_inputs(dev):
    q, k, v = make_qkv(1, 2, 2, 5, 0, 16)
    out, lse = run(q, k, v, dev, return_lse=True)
    assert out.shape == (1, 2, 5, 16) and (out == 0).all() and torch.isneginf(lse).all()
    q, k, v = make_qkv(1, 2, 2, 0, 7, 16)
    out, lse = run(q, k, v, dev, return_lse=True)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


# -- attention_weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["none", "causal", "combo", "combo2", "alibi"])
def test_weights_match_spec(dev, rule):
    """Probabilities from the kernel-computed lse, and from a given lse for chosen heads/rows."""
    weights = BACKENDS["triton"].weights

    b, hq, nq, nk = 2, 2, 37, 67
    q, k, v = (t.to(dev) for t in make_qkv(b, hq, 1, nq, nk, 32, seed=12))
    kw = to(rules(rule, b, hq, nq, nk, torch.float32), dev)
    spec = validate(q, k, None, need_v=False, **kw)
    ref = ref_weights(q.cpu(), k.cpu(), **to(kw, "cpu"))
    w = weights(spec, q, k, None, None, None)
    assert w.dtype == torch.float32 and w.shape == (b, hq, nq, nk)
    assert max_err(w, ref) < 1e-6
    _, lse = selfattn.attention(q, k, v, backend="triton", return_lse=True, **kw)
    heads, rows = torch.tensor([1]), torch.tensor([36, 5, 0, 1, 17])
    w2 = weights(spec, q, k, lse, heads, rows)
    assert max_err(w2, ref[:, [1]][:, :, [36, 5, 0, 1, 17]]) < 1e-6


@pytest.mark.gpu
def test_attention_weights_on_cuda_uses_triton():
    q, k, _ = (t.cuda() for t in make_qkv(1, 2, 2, 67, 129, 64, seed=13))
    w = selfattn.attention_weights(q, k, causal=True, rows=slice(0, 10))
    ref = ref_weights(q.cpu(), k.cpu(), causal=True)[:, :, :10]
    assert max_err(w, ref) < 1e-6


# -- the backend object and the tile pruning --------------------------------------------------------


def test_backend_availability_follows_the_environment(monkeypatch):
    backend = BACKENDS["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.unavailable() is None
    monkeypatch.delenv("TRITON_INTERPRET")
    why = backend.unavailable()
    assert (why is None) == torch.cuda.is_available()
    if why:
        assert "CUDA" in why


def test_backend_declines_what_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = BACKENDS["triton"]
    assert backend.check(validate(*make_qkv(1, 1, 1, 4, 4, 16))) == []
    why = backend.check(validate(*make_qkv(1, 1, 1, 4, 4, 16, dtype=torch.float64)))
    assert any("float64" in r for r in why)
    why = backend.check(validate(*make_qkv(1, 1, 1, 4, 4, 320)))
    assert any("320" in r for r in why)
    with pytest.raises(selfattn.UnsupportedInputs, match="float64"):
        selfattn.attention(*make_qkv(1, 1, 1, 4, 4, 16, dtype=torch.float64), backend="triton")


def test_auto_never_picks_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert candidates(torch.device("cpu"))[-1] == "triton"
    assert "triton" not in selfattn.explain(*make_qkv(1, 1, 1, 4, 4, 16)).splitlines()[1]


def test_prune_keeps_tiles_that_fit():
    import triton

    fwd = configs.unique_configs("fwd")
    for bd, elt in ((64, 2), (128, 2), (256, 2), (256, 4)):
        kept = configs.prune_configs("fwd", fwd, bd, bd, elt, 4096, 4096)
        assert kept
        for c in kept:
            bm, bn, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
            assert elt * (bm * bd + s * bn * 2 * bd) <= configs.SMEM_BUDGET
    short = configs.prune_configs("fwd", fwd, 64, 64, 2, 16, 4096)
    assert short and all(c.kwargs["BLOCK_M"] <= 16 for c in short)
    assert isinstance(short[0], triton.Config)


# -- TMA descriptors ----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["none", "causal", "combo"])
def test_tma_path_matches_spec(dev, rule, monkeypatch):
    """Keys and values through 4-D TMA descriptors (zero fill past Nk and D), forced on."""
    if tma.TensorDescriptor is None:
        pytest.skip("this Triton has no host TensorDescriptor")
    if dev.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    monkeypatch.setattr(tma, "MODE", "1")
    check_forward(dev, (2, 4, 2, 37, 67, 40, 24), rule)


def test_tma_declines_layouts_it_cannot_describe():
    k = torch.randn(2, 2, 67, 64)
    assert tma.layout_ok(k)
    assert tma.layout_ok(k[..., :40])  # a narrower view keeps aligned strides
    assert not tma.layout_ok(k.transpose(-1, -2))
    assert not tma.layout_ok(torch.randn(2, 1, 67, 64).expand(2, 2, 67, 64))  # stride 0
    assert not tma.layout_ok(torch.randn(2, 2, 67, 33)[..., :32])  # 33 * 4 bytes


# -- GPU only: sizes the interpreter cannot reach, autotuning, the decode regime ---------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (the norm rule of METHOD.md)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _gpu_pair(b, hq, hkv, nq, nk, d, dtype, seed, **kw):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = selfattn.attention(*leaves, backend="triton", **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    ref = selfattn.attention(*ref_leaves, backend="math", **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    return (out, *grads), (ref, *ref_grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "kw", [{}, {"causal": True}, {"window": (300, 0)}, {"causal": True, "softcap": 30.0}],
    ids=["none", "causal", "window", "softcap"],
)  # fmt: skip
def test_gpu_large_against_float32_math(dtype, kw):
    """B=2, GQA 8 -> 2, Nq=1000 < Nk=2048, D=128: every output within bf16/fp16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    got, want = _gpu_pair(2, 8, 2, 1000, 2048, 128, dtype, 0, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        # bf16/fp16 rounding of P and dS gives ~0.3-1%; a wrong tile or mask gives O(1)
        assert _rel(a, b) < (1e-2 if name == "out" else 2e-2), f"{name}: {_rel(a, b):.3g}"


@pytest.mark.gpu
def test_gpu_float32_is_not_tf32():
    """float32 inputs use exact float32 products: error far below TF32's ~3e-4."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    got, want = _gpu_pair(1, 4, 4, 512, 512, 64, torch.float32, 1, causal=True)
    for a, b in zip(got, want):
        assert _rel(a, b) < 2e-5


@pytest.mark.gpu
@pytest.mark.parametrize("nk", [32768, 131072])
def test_gpu_decode_long_cache_gqa(nk):
    """Nq=1 over a long cache, GQA 32 -> 8: the split-K kernel against float32 math."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, nk, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 8, nk, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    assert host.use_decode(validate(q, k, v))
    out, lse = selfattn.attention(q, k, v, backend="triton", return_lse=True)
    ref, ref_lse = selfattn.attention(
        q.float(), k.float(), v.float(), backend="math", return_lse=True
    )
    assert _rel(out, ref) < 1e-2 and (lse - ref_lse).abs().max() < 1e-3


@pytest.mark.gpu
def test_gpu_output_fully_written_and_repeatable():
    """A NaN-filled block freed just before the call is what the caching allocator hands the
    output: any element the kernel skipped would stay NaN. Two runs agree bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (
        torch.randn(3, 5, 777, 80, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(3)
    )
    junk = torch.full((3, 5, 777, 80), math.nan, device="cuda", dtype=torch.bfloat16)
    del junk
    a = selfattn.attention(q, k, v, backend="triton", causal=True)
    b = selfattn.attention(q, k, v, backend="triton", causal=True)
    ref = selfattn.attention(q.float(), k.float(), v.float(), backend="math", causal=True)
    assert torch.isfinite(a).all() and torch.equal(a, b) and _rel(a, ref) < 1e-2


def test_autotuners_build_and_prune(monkeypatch):
    """The compiled-mode autotuners accept their keys and prune to this head dim's tiles, in
    the table's order (no GPU needed to build them)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.empty(1, dtype=torch.bfloat16)
    for name, kind in (("attn_fwd", "fwd"), ("bwd_dkdv", "dkdv"), ("bwd_dq", "dq")):
        tuner = configs.tuned(name)
        assert set(tuner.keys) <= set(tuner.arg_names)
        tuner.nargs = {"Q": q}
        kept = tuner.prune_configs(
            {"BLOCK_D": 128, "BLOCK_DV": 128, "TUNE_Q": 8192, "TUNE_K": 8192}
        )
        want = configs.candidates(kind, 128, 2)
        got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
        assert got and got == [c for c in want if c in got]
    with_tma = configs.tuned("attn_fwd", tma=True)
    assert all(c.pre_hook is tma.set_block_shapes for c in with_tma.configs)
    decode = configs.tuned("attn_decode")
    decode.nargs = {"Q": q}
    assert decode.prune_configs(
        {"BLOCK_D": 128, "BLOCK_DV": 128, "TUNE_Q": 1, "TUNE_K": 131072, "BLOCK_M": 16}
    )


def test_tma_failure_falls_back_to_pointers(dev, monkeypatch):
    """A TMA kernel that cannot be built is reported once and the pointer kernel runs."""
    real = tma.descriptor_args

    def broken(k, v, with_tma):
        if with_tma:
            raise RuntimeError("no TMA here")
        return real(k, v, with_tma)

    # host calls these by the names it imported from tma
    monkeypatch.setattr(host, "use_tma", lambda k, v, forward: True)
    monkeypatch.setattr(host, "descriptor_args", broken)
    monkeypatch.setattr(tma, "VERIFIED", {})
    q, k, v = make_qkv(1, 2, 2, 37, 67, 32, seed=14)
    with pytest.warns(RuntimeWarning, match="TMA kernel failed"):
        out = run(q, k, v, dev, causal=True)
    ref, _ = ref_attention(q, k, v, causal=True)
    assert max_err(out, ref) < 1e-5
    assert tma.VERIFIED[tma.device_key(dev)] is False


# -- issue 17: values at the edges (NaN/inf values, float32 extremes, huge windows) -----------------


def _same_nonfinite(got, expect, what):
    """NaN, +inf and -inf exactly where the float64 specification has them, the rest close."""
    got = to_np(got)
    assert (np.isnan(got) == np.isnan(expect)).all(), f"{what}: NaN pattern differs from the spec"
    assert (np.isposinf(got) == np.isposinf(expect)).all(), f"{what}: +inf pattern"
    assert (np.isneginf(got) == np.isneginf(expect)).all(), f"{what}: -inf pattern"
    fin = np.isfinite(expect)
    np.testing.assert_allclose(got[fin], expect[fin], atol=2e-5, err_msg=what)


VALUE_RULES = {
    "causal": lambda nq: {"causal": True},
    "window": lambda nq: {"window": (3, 1)},
    "mask": lambda nq: {"mask": (torch.rand(9, 40, generator=gen(2)) > 0.3)[-nq:]},
}


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the spec's inf + -inf
@pytest.mark.parametrize("decode", [False, True], ids=["rows", "decode"])
@pytest.mark.parametrize("rule", list(VALUE_RULES))
def test_nan_in_visible_value_poisons_its_column_only(dev, rule, decode, monkeypatch):
    """One NaN in v[j, c]: column c of the rows that see key j is NaN, nothing else, and the lse
    is untouched (the kernels made the whole row and its lse NaN under any hiding rule). inf
    in v[j', :] gives +-inf, or NaN where +inf meets -inf, as p @ v says."""
    nq = 9
    if decode:  # the split-K kernel, two splits over the 40 keys
        monkeypatch.setattr(host, "DECODE_MODE", "always")
        monkeypatch.setitem(interp.INTERPRET_BLOCKS, "decode_splits", 2)
        nq = 3
    q, k, v = make_qkv(1, 4, 2, nq, 40, 16, seed=7)
    v[0, 0, 37, 3] = math.nan  # key 37: seen by the last rows under causal
    v[0, 1, 20, 5] = math.nan
    v[0, 1, 33, :] = math.inf
    v[0, 0, 39, 2] = -math.inf
    v[0, 0, 38, 2] = math.inf  # meets the -inf of key 39 in the rows that see both
    kw = VALUE_RULES[rule](nq)
    expect, expect_lse = ref_attention(q, k, v, **kw)
    assert np.isnan(expect).any() and np.isfinite(expect).any()  # the case is not vacuous
    out, lse = run(q, k, v, dev, return_lse=True, **kw)
    _same_nonfinite(out, expect, f"{rule} out")
    _same_nonfinite(lse, expect_lse, f"{rule} lse")


def test_nan_in_visible_value_gradient_is_not_silently_finite(dev):
    """The rows that see a value holding NaN get NaN query gradients (never a finite gradient
    lacking the term); the rows that do not see it stay finite."""
    q, k, v = make_qkv(1, 2, 1, 12, 12, 8, seed=9)
    v[0, 0, 8, 3] = math.nan
    q = q.to(dev).requires_grad_(True)
    out = selfattn.attention(q, k.to(dev), v.to(dev), causal=True, backend="triton")
    (dq,) = torch.autograd.grad(out.nan_to_num().sum(), q)
    assert torch.isfinite(dq[:, :, :8]).all() and torch.isnan(dq[:, :, 8:]).all()


@pytest.mark.parametrize("softcap", [1.5e-45, 1e-38, 3.4e38])
def test_softcap_at_float32_edges_is_honoured(dev, softcap):
    """softcap * log2(e) overflowed to inf for caps near FLT_MAX (all-NaN output), and
    scale / softcap for tiny caps (inf * 0 = NaN where q . k is exactly 0); and the tanh lost
    every digit for |s / softcap| << 1. Forward, lse and gradients follow float64 now."""
    q, k, v = make_qkv(1, 2, 2, 37, 45, 16, seed=3)
    q[0, 0, :, :4] = 0.0
    q[0, 1, 3] = 0.0  # a row whose scores are exactly 0
    expect, expect_lse = ref_attention(q, k, v, causal=True, softcap=softcap)
    leaves = [t.to(dev).requires_grad_(True) for t in (q, k, v)]
    out, lse = selfattn.attention(
        *leaves, causal=True, softcap=softcap, return_lse=True, backend="triton"
    )  # fmt: skip
    assert max_err(out, expect) < 5e-6 and max_err(lse, expect_lse) < 5e-6
    grads = torch.autograd.grad(out.square().sum(), leaves)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    out64 = selfattn.attention(q64, k64, v64, causal=True, softcap=softcap, backend="math")
    oracle = torch.autograd.grad(out64.square().sum(), (q64, k64, v64))
    for got, want in zip(grads, oracle):
        assert torch.isfinite(got).all() and max_err(got, to_np(want)) < 5e-5


@pytest.mark.parametrize("decode", [False, True], ids=["rows", "decode"])
def test_bias_near_float32_max_gives_no_nan(dev, decode, monkeypatch):
    """A finite bias of 3e38 made the kernels NaN (scores were multiplied by log2(e) before the
    row maximum was subtracted, and overflowed). Output and lse match the float64 spec."""
    nq = 19
    if decode:
        monkeypatch.setattr(host, "DECODE_MODE", "always")
        monkeypatch.setitem(interp.INTERPRET_BLOCKS, "decode_splits", 3)
        nq = 4
    q, k, v = make_qkv(2, 2, 1, nq, 70, 16, seed=5)
    bias = torch.randn(2, 1, nq, 70, generator=gen(5))
    bias[0, :, :, 7] = 3e38  # one key dominates every row of batch 0
    bias[1, :, :, 3:9] = -3e38
    bias[1, :, 2, :] = 2.9e38  # a row whose scores are all near the top
    for kw in ({}, {"causal": True}, {"window": (30, 0)}):
        expect, expect_lse = ref_attention(q, k, v, bias=bias, **kw)
        out, lse = run(q, k, v, dev, bias=bias, return_lse=True, **kw)
        assert max_err(out, expect) < 2e-5, kw
        lse_err = np.abs(to_np(lse) - expect_lse) / np.maximum(1.0, np.abs(expect_lse))
        assert lse_err.max() < 1e-6, kw


def test_decode_splits_with_huge_scores_keep_their_weights(dev, monkeypatch):
    """The split-K combine weighted each split by exp(lse_split - max): with scores near 1e38
    every lse_split = m + log(l) rounded to m, so splits of 64 and 22 keys weighed alike. The
    splits now hand over their maximum and sum apart."""
    monkeypatch.setattr(host, "DECODE_MODE", "always")
    monkeypatch.setitem(interp.INTERPRET_BLOCKS, "decode_splits", 3)
    q, k, v = make_qkv(1, 2, 1, 1, 150, 16, seed=5)
    bias = torch.full((1, 1, 1, 150), 2.9e38)
    expect, expect_lse = ref_attention(q, k, v, bias=bias)
    out, lse = run(q, k, v, dev, bias=bias, return_lse=True)
    assert max_err(out, expect) < 1e-6
    assert np.abs(to_np(lse) / expect_lse - 1).max() < 1e-6


def test_weights_bias_near_float32_max_gives_no_nan(dev):
    q, k, _ = (t.to(dev) for t in make_qkv(1, 2, 2, 19, 70, 16, seed=6))
    bias = torch.zeros(1, 1, 19, 70, device=dev)
    bias[..., 11] = 3e38
    spec = validate(q, k, None, need_v=False, bias=bias)
    w = BACKENDS["triton"].weights(spec, q, k, None, None, None)
    expect = torch.zeros(1, 2, 19, 70)
    expect[..., 11] = 1.0
    assert torch.equal(w.cpu(), expect)


@pytest.mark.parametrize("window", [(None, sys.maxsize), (sys.maxsize, 0), (2**70, 2**64)])
def test_window_side_near_int64_max_restricts_nothing(dev, window):
    """Sides beyond any distance restrict nothing (they are clamped before the kernels see
    them, so no position arithmetic wraps): forward, gradients and weights."""
    left, right = ((None if w is None or w >= sys.maxsize else w) for w in window)
    q, k, v = make_qkv(1, 2, 2, 7, 5, 8)
    expect, _ = ref_attention(q, k, v, window=(left, right))
    assert max_err(run(q, k, v, dev, window=window), expect) < 1e-6
    grads = []
    for kw in ({"window": window}, {"window": (left, right)}):
        leaves = [t.to(dev).requires_grad_(True) for t in (q, k, v)]
        out = selfattn.attention(*leaves, backend="triton", **kw)
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_second_derivative_raises_clearly(dev):
    """create_graph=True works for the first derivative; differentiating it again raises,
    naming the backend, instead of adding nothing to a gradient penalty."""
    q, k, v = (t.to(dev).requires_grad_(True) for t in make_qkv(1, 2, 2, 5, 5, 8))
    out = selfattn.attention(q, k, v, causal=True, backend="triton")
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    assert gq.requires_grad
    with pytest.raises(NotImplementedError, match="backend 'triton' does not support double"):
        gq.square().sum().backward()


def test_empty_value_head_dim(dev):
    """Dv == 0: an empty output, and the lse (and its gradient) of the scores."""
    q, k, v = make_qkv(2, 2, 1, 9, 40, 8, dv=0)
    _, expect_lse = ref_attention(q, k, v, causal=True)
    leaves = [t.to(dev).requires_grad_(True) for t in (q, k, v)]
    out, lse = selfattn.attention(*leaves, causal=True, return_lse=True, backend="triton")
    assert out.shape == (2, 2, 9, 0) and max_err(lse, expect_lse) < 1e-5
    dq, dk = torch.autograd.grad(lse.sum(), leaves[:2])
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    _, lse64 = selfattn.attention(q64, k64, v64, causal=True, return_lse=True, backend="math")
    want = torch.autograd.grad(lse64.sum(), (q64, k64))
    assert max_err(dq, to_np(want[0])) < 1e-5 and max_err(dk, to_np(want[1])) < 1e-5
