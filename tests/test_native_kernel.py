"""The native C++ engine called directly (selfattn.backends.native), against the float64 spec.

Forward and backward over odd shapes, every rule alone and combined, GQA, the four dtypes,
strides, empty rows, NaN padding, dropout (bit-for-bit the spec's mask), the key-bound plan
against ``rules.bounds`` and ``rules.key_spans``, bitwise determinism across thread counts and concurrent
callers, both compiled ISAs, and the broken-compiler fallback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import (
    ERR_FLOOR,
    assert_close,
    float64_leaves,
    make_qkv,
    max_err,
    packed_ids,
    plain_attention,
    plain_lse,
    plain_scores,
    ref_attention,
    torch_threads,
)
from selfattn.backends import native
from selfattn.backends.native.call import record
from selfattn.spec import validate

pytestmark = pytest.mark.usefixtures("one_thread")

WHY = native.unavailable()
if WHY is not None:
    pytest.skip(f"native extension unavailable: {WHY}", allow_module_level=True)
EXT = native.load()


def _isa_supported(isa: str) -> bool:
    old = os.environ.get("SELFATTN_NATIVE_ISA")
    os.environ["SELFATTN_NATIVE_ISA"] = isa
    try:
        EXT.isa()
        return True
    except RuntimeError:
        return False
    finally:
        if old is None:
            os.environ.pop("SELFATTN_NATIVE_ISA", None)
        else:
            os.environ["SELFATTN_NATIVE_ISA"] = old


ISAS = [isa for isa in ("avx512", "avx2", "neon", "generic") if _isa_supported(isa)]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Run under each compiled instruction set this CPU supports."""
    monkeypatch.setenv("SELFATTN_NATIVE_ISA", request.param)
    return request.param


# -- calling the op ------------------------------------------------------------------------------


def call_of(q, k, v, *, dropout_seed=None, start=None, **rules):
    """The native call record of ``selfattn.attention``-style keyword arguments (``start``: the
    position of row 0, default the bottom-right alignment Nk - Nq)."""
    spec = validate(q, k, v, **rules)
    if start is not None:
        spec = replace(spec, start=start)
    return record(spec, dropout_seed)


def nat(q, k, v, need_out=True, **kw):
    """(out, lse) of the native forward for selfattn.attention-style keyword arguments."""
    return EXT.forward(q, k, v, call_of(q, k, v, **kw), need_out)


def nat_backward(dout, q, k, v, out, lse, dlse=None, need_dbias=False, need_dalibi=False, **kw):
    empty = torch.empty(0)
    return EXT.backward(
        dout, q, k, v, out, lse, empty if dlse is None else dlse, call_of(q, k, v, **kw),
        need_dbias, need_dalibi,
    )  # fmt: skip


def check_forward(q, k, v, what="", **kw):
    out, lse = nat(q, k, v, **kw)
    ref_out, ref_lse = ref_attention(q, k, v, **kw)
    dt = q.dtype
    assert_close(out, ref_out, plain_attention(q, k, v, **kw), dt, f"{what} out")
    assert lse.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
    assert_close(lse.to(dt), ref_lse, plain_lse(q, k, **kw), dt, f"{what} lse")
    return out, lse


# -- forward: shapes, rules, dtypes --------------------------------------------------------------

SHAPES = [  # (B, Hq, Hkv, Nq, Nk, D, Dv)
    (1, 1, 1, 1, 1, 64, 64),
    (2, 6, 2, 97, 113, 64, 64),
    (1, 6, 1, 113, 97, 40, 80),
    (1, 2, 2, 255, 257, 80, 40),
    (1, 2, 1, 257, 255, 128, 128),
    (1, 2, 2, 1023, 1025, 64, 64),
    (1, 3, 1, 1025, 1023, 40, 40),
    (1, 6, 2, 1, 1025, 128, 64),
    (2, 6, 3, 7, 1023, 64, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_forward_shapes(shape, causal):
    b, hq, hkv, nq, nk, d, dv = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dv, seed=nq + nk)
    check_forward(q, k, v, causal=causal, what=str(shape))


def _rules(b, hq, nq, nk, seed=0):
    """One example of every rule for (b, hq, nq, nk)."""
    g = torch.Generator().manual_seed(seed)
    ids = packed_ids(b, max(nq, nk), seed)
    return {
        "causal": {"causal": True},
        "window": {"window": (17, 5)},
        "window_left": {"window": (40, None)},
        "window_right": {"window": (None, 3)},
        "mask": {"mask": torch.rand(b, 1, nq, nk, generator=g) > 0.3},
        "mask_rows": {"mask": torch.rand(1, hq, nq, 1, generator=g) > 0.2},
        "bias": {"bias": torch.randn(b, hq, nq, nk, generator=g)},
        "bias_bcast": {"bias": torch.randn(1, hq, 1, nk, generator=g).double()},
        "alibi": {"alibi_slopes": torch.rand(hq, generator=g)},
        "alibi_b": {"alibi_slopes": torch.rand(b, hq, generator=g)},
        "softcap": {"softcap": 2.0},
        "segments": {"segment_ids": (ids[:, -nq:], ids[:, -nk:])},
        "scale": {"scale": 0.3},
    }


RULE_NAMES = list(_rules(1, 1, 4, 4))


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("lens", [(113, 257), (257, 113), (97, 97)])
def test_forward_rule(rule, lens, isa):
    nq, nk = lens
    q, k, v = make_qkv(2, 6, 2, nq, nk, 64, 48, seed=3)
    check_forward(q, k, v, what=rule, **_rules(2, 6, nq, nk)[rule])


COMBOS = [
    ("causal", "bias", "alibi"),
    ("window", "mask", "softcap"),
    ("causal", "segments", "bias_bcast"),
    ("mask_rows", "alibi_b", "window_left"),
    ("causal", "window", "mask", "bias", "alibi", "softcap", "segments"),
]


@pytest.mark.parametrize("combo", COMBOS, ids="+".join)
def test_forward_combined(combo, isa):
    q, k, v = make_qkv(2, 6, 3, 200, 300, 80, 64, seed=5)
    rules = _rules(2, 6, 200, 300, seed=1)
    kw = {}
    for name in combo:
        kw.update(rules[name])
    check_forward(q, k, v, what="+".join(combo), **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("rules", [(), ("causal",), ("window", "bias", "alibi", "softcap")])
def test_forward_dtypes(dtype, rules):
    q, k, v = make_qkv(2, 4, 2, 130, 257, 64, 64, dtype=dtype, seed=7)
    kw = {}
    for name in rules:
        kw.update(_rules(2, 4, 130, 257)[name])
    out, _ = check_forward(q, k, v, what=str(dtype), **kw)
    assert out.dtype == dtype


def test_forward_gqa_no_copies():
    """GQA 6 -> 2 and 6 -> 1 equal MHA on repeated heads."""
    for hkv in (2, 1):
        q, k, v = make_qkv(1, 6, hkv, 150, 150, 64, seed=hkv)
        out, lse = nat(q, k, v, causal=True)
        rk, rv = (t.repeat_interleave(6 // hkv, 1) for t in (k, v))
        out2, lse2 = nat(q, rk, rv, causal=True)
        assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_forward_strides_and_expand():
    g = torch.Generator().manual_seed(0)
    # q as a transposed (B, N, H, D) tensor, k expanded over heads and batch, v sliced
    q = torch.randn(2, 100, 4, 64, generator=g).transpose(1, 2)
    k = torch.randn(1, 1, 120, 64, generator=g).expand(2, 2, 120, 64)
    v = torch.randn(2, 2, 120, 128, generator=g)[..., ::2]
    bias = torch.randn(100, 120, generator=g).t().contiguous().t()  # column-major 2-D
    mask = (torch.rand(1, 1, 1, 120, generator=g) > 0.5).expand(2, 4, 100, 120)
    for kw in ({}, {"causal": True}, {"bias": bias[None, None], "mask": mask}):
        check_forward(q, k, v, what=str(list(kw)), **kw)
        out, lse = nat(q, k, v, **kw)
        out2, lse2 = nat(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
        assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_forward_empty_rows():
    q, k, v = make_qkv(2, 2, 1, 64, 64, 64, seed=2)
    # rows before the cache start see nothing under causal with a negative start
    out, lse = nat(q, k, v, causal=True, start=-10)
    assert torch.all(out[:, :, :10] == 0) and torch.all(torch.isneginf(lse[:, :, :10]))
    assert torch.isfinite(lse[:, :, 10:]).all()
    # padding ids (-1) and a mask that hides everything for some rows
    ids = packed_ids(2, 64, 1, pad=7)
    mask = torch.ones(2, 2, 64, 64, dtype=torch.bool)
    mask[:, :, 5:9] = False
    for kw in ({"segment_ids": ids}, {"mask": mask}, {"window": (3, 0), "start": 200}):
        out, lse = nat(q, k, v, **kw)
        assert not torch.isnan(out).any()
        if "window" not in kw:
            check_forward(q, k, v, what=str(list(kw)), **kw)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    # Nk == 0
    out, lse = nat(q, k[:, :, :0], v[:, :, :0])
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("where", ["k", "v"])
def test_forward_nan_padding(where, isa):
    """NaN/inf at keys a rule hides never reach the rows that cannot see them."""
    q, k, v = make_qkv(2, 4, 2, 100, 100, 64, seed=4)
    bad = k if where == "k" else v
    bad[:, :, 90:, 3] = float("nan")
    bad[:, :, 80, :] = float("inf")
    out, lse = nat(q, k, v, causal=True)
    assert torch.isfinite(out[:, :, :80]).all() and torch.isfinite(lse[:, :, :80]).all()
    # rows that see a non-finite key: NaN (a key row: every column and the lse; a value row:
    # what p * v gives in its non-finite columns only, docs/api.md), exactly as the specification
    ref_out, ref_lse = ref_attention(q, k, v, causal=True)
    for got, ref in ((out, ref_out), (lse, ref_lse)):
        got = got.numpy()
        assert (np.isnan(got) == np.isnan(ref)).all() and (np.isinf(got) == np.isinf(ref)).all()
    if where == "k":
        assert torch.isnan(out[:, :, 80:]).all()
    else:
        assert torch.isnan(out[:, :, 90:, 3]).all() and torch.isfinite(lse).all()
    ids = torch.zeros(2, 100, dtype=torch.long)
    ids[:, 80:] = -1  # padding
    out, _ = nat(q, k, v, segment_ids=ids, bias=torch.randn(100, 100)[None, None])
    assert torch.isfinite(out[:, :, :80]).all() and torch.all(out[:, :, 80:] == 0)
    # no rule hides anything: the bad entries reach every row, as in the specification
    out, _ = nat(q, k, v)
    ref_out, _ = ref_attention(q, k, v)
    assert (np.isnan(out.numpy()) == np.isnan(ref_out)).all() and not torch.isfinite(out).any()


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("rules", [(), ("causal", "bias")])
def test_forward_dropout_matches_spec(p, rules, isa):
    q, k, v = make_qkv(2, 4, 2, 97, 130, 64, 32, seed=8)
    kw = {}
    for name in rules:
        kw.update(_rules(2, 4, 97, 130)[name])
    seed = (0x12345678, 0x9ABCDEF0)
    out, lse = nat(q, k, v, dropout_p=p, dropout_seed=seed, **kw)
    ref_out, ref_lse = ref_attention(q, k, v, dropout_p=p, dropout_seed=seed, **kw)
    assert max_err(out, ref_out) < 1e-5
    assert max_err(lse, ref_lse) < 1e-5  # lse is of the scores before dropout


def test_forward_dropout_rows_offset():
    """drop_* place a part in the numbering of the whole call (ring attention, row splits)."""
    q, k, v = make_qkv(2, 4, 2, 64, 80, 64, seed=9)
    seed = (11, 22)
    full, _ = nat(q, k, v, dropout_p=0.3, dropout_seed=seed)
    whole = call_of(q, k, v, dropout_p=0.3, dropout_seed=seed)
    qp, kp, vp = q[1:, 2:, 16:], k[1:, 1:], v[1:, 1:]
    part_call = call_of(qp, kp, vp, dropout_p=0.3, dropout_seed=seed, start=whole.start + 16)
    part_call = part_call._replace(drop_hq=4, drop_nq=64, drop_b0=1, drop_h0=2, drop_r0=16)
    part, _ = EXT.forward(qp, kp, vp, part_call, True)
    torch.testing.assert_close(part, full[1:, 2:, 16:], rtol=0, atol=0)


DECODE_SHAPES = [(1, 9, 3, 1, 1025), (2, 6, 2, 3, 700), (1, 4, 1, 4, 97), (1, 2, 2, 1, 1)]


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_decode_rules(shape, rule, isa):
    """Few query rows over a long cache (the split-K path): every rule."""
    b, hq, hkv, nq, nk = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, 64, 64, seed=nk)
    check_forward(q, k, v, what=f"decode {rule}", **_rules(b, hq, nq, nk)[rule])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_decode_dtypes_and_strides(dtype):
    q, k, v = make_qkv(1, 9, 3, 1, 1500, 80, 40, dtype=dtype, seed=21)
    check_forward(q, k, v, causal=True, what=str(dtype))
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)  # key rows not contiguous
    check_forward(q, kt, v, causal=True, what="strided k")


def test_decode_nan_padding(isa):
    q, k, v = make_qkv(1, 6, 2, 2, 1000, 64, seed=22)
    k[:, :, 900:, 0] = float("nan")
    v[:, :, 950:] = float("inf")
    out, _ = nat(q, k, v, window=(None, 0), start=800)  # rows at 800, 801 see keys <= 801
    assert torch.isfinite(out).all()
    out2, _ = nat(q, k[:, :, :850], v[:, :, :850], window=(None, 0), start=800)
    torch.testing.assert_close(out, out2)
    out, _ = nat(q, k, v)  # every key visible: NaN
    assert torch.isnan(out).all()


def test_forward_wide_head_and_transposed_mask():
    q, k, v = make_qkv(1, 2, 1, 70, 90, 256, 200, seed=23)
    check_forward(q, k, v, causal=True, what="D=256")
    mask = (torch.rand(1, 1, 90, 70, generator=torch.Generator().manual_seed(0)) > 0.4).transpose(
        2, 3
    )
    check_forward(q, k, v, mask=mask, what="transposed mask")


@pytest.mark.parametrize("nq", [1, 3])
def test_decode_dropout_matches_spec(nq):
    q, k, v = make_qkv(2, 6, 2, nq, 900, 64, seed=24)
    seed = (7, 8)
    out, _ = nat(q, k, v, causal=True, dropout_p=0.25, dropout_seed=seed)
    ref, _ = ref_attention(q, k, v, causal=True, dropout_p=0.25, dropout_seed=seed)
    assert max_err(out, ref) < 1e-5


@pytest.mark.parametrize("nq", [100, 2])
def test_forward_lse_only(nq, isa):
    q, k, v = make_qkv(1, 4, 2, nq, 200, 64, seed=1)
    out, lse = nat(q, k, v, causal=True, need_out=False)
    _, lse2 = nat(q, k, v, causal=True)
    assert out.numel() == 0 and torch.equal(lse, lse2)
    v[:, :, 150:] = float("nan")  # the lse alone never reads v
    _, lse3 = nat(q, k, v, causal=True, window=(120, None), need_out=False)
    _, lse4 = nat(q, k, torch.zeros_like(v), causal=True, window=(120, None), need_out=False)
    assert torch.isfinite(lse3).all() and torch.equal(lse3, lse4)


# -- backward -------------------------------------------------------------------------------------


def math_grads(q, k, v, dout, dlse, need=("q", "k", "v"), **kw):
    """Gradients of sum(out * dout) + sum(lse * dlse) by autograd through the math backend, in
    float64 (bias and alibi slopes get gradients when in ``need``)."""
    import selfattn

    q6, k6, v6 = float64_leaves(q, k, v)
    kw6 = dict(kw)
    leaves = [q6, k6, v6]
    for name in ("bias", "alibi_slopes"):
        if name in need:
            kw6[name] = kw[name].detach().double().requires_grad_(True)
            leaves.append(kw6[name])
        elif kw.get(name) is not None:
            kw6[name] = kw[name].double()
    out, lse = selfattn.attention(q6, k6, v6, backend="math", return_lse=True, **kw6)
    loss = (out * dout.double()).sum() + (lse.double() * dlse.double()).sum()
    return torch.autograd.grad(loss, leaves)


def native_grads(q, k, v, dout, dlse, need=(), out_dtype=None, **kw):
    out, lse = nat(q, k, v, **kw)
    if out_dtype is not None:  # the engine passes its float32 output for 16-bit inputs
        out = nat(q.to(out_dtype), k.to(out_dtype), v.to(out_dtype), **kw)[0]
    got = nat_backward(dout, q, k, v, out, lse, dlse, "bias" in need, "alibi_slopes" in need,
                       **kw)  # fmt: skip
    dq, dk, dv, db, da = got
    return (
        [dq, dk, dv] + ([db] if "bias" in need else []) + ([da] if "alibi_slopes" in need else [])
    )


def _grad_rules(b, hq, nq, nk):
    r = _rules(b, hq, nq, nk, seed=2)
    return {
        "none": ({}, ()),
        "causal": (r["causal"], ()),
        "window": (r["window"], ()),
        "mask": (r["mask"], ()),
        "segments": (r["segments"], ()),
        "softcap": (r["softcap"], ()),
        "bias": (r["bias"], ("bias",)),
        "bias_bcast": ({"bias": r["bias_bcast"]["bias"].float()}, ("bias",)),
        "alibi": (r["alibi"], ("alibi_slopes",)),
        "alibi_b": ({**r["alibi_b"], "causal": True}, ("alibi_slopes",)),
        "all": ({**r["window"], **r["mask"], **r["bias"], **r["alibi"], **r["softcap"],
                 **r["segments"], "causal": True}, ("bias", "alibi_slopes")),
    }  # fmt: skip


GRAD_RULES = list(_grad_rules(1, 1, 4, 4))


@pytest.mark.parametrize("rule", GRAD_RULES)
@pytest.mark.parametrize("lens", [(97, 130), (130, 97)])
def test_backward_float64_vs_math(rule, lens, isa):
    nq, nk = lens
    q, k, v = make_qkv(2, 6, 2, nq, nk, 40, 48, dtype=torch.float64, seed=13)
    kw, need = _grad_rules(2, 6, nq, nk)[rule]
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(2, 6, nq, 48, generator=g, dtype=torch.float64)
    # float32 values: the math backend returns lse (and takes its gradient) in float32
    dlse = torch.randn(2, 6, nq, generator=g).double()
    want = math_grads(q, k, v, dout, dlse, need, **kw)
    got = native_grads(q, k, v, dout, dlse, need, **kw)
    for name, a, w in zip(["dq", "dk", "dv", *need], got, want):
        assert a.dtype == torch.float64
        scale = float(w.abs().max()) + 1e-30
        assert max_err(a, w.numpy()) <= 1e-10 * scale, f"{rule} {name}"


@pytest.mark.parametrize("rule", ["none", "causal", "bias", "alibi", "all"])
def test_backward_float32_tolerance(rule, isa):
    """float32 gradients within the tolerance rule against the float64 oracle."""
    q, k, v = make_qkv(1, 6, 3, 200, 257, 64, 64, seed=14)
    kw, need = _grad_rules(1, 6, 200, 257)[rule]
    g = torch.Generator().manual_seed(2)
    dout, dlse = torch.randn(1, 6, 200, 64, generator=g), torch.randn(1, 6, 200, generator=g)
    want = math_grads(q, k, v, dout, dlse, need, **kw)
    got = native_grads(q, k, v, dout, dlse, need, **kw)
    # the yardstick: autograd of the plain float32 formula
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    kw32 = dict(kw)
    for name in need:
        kw32[name] = kw[name].detach().float().requires_grad_(True)
        leaves.append(kw32[name])
    s = plain_scores(*leaves[:2], **kw32)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = p @ leaves[2].repeat_interleave(2, 1)
    loss = (out * dout).sum() + (torch.logsumexp(s, -1).nan_to_num(0.0) * dlse).sum()
    plain = torch.autograd.grad(loss, leaves, allow_unused=True)
    for name, a, w, pl in zip(["dq", "dk", "dv", *need], got, want, plain):
        base = max_err(pl, w.numpy())
        err = max_err(a, w.numpy())
        scale = max(1.0, float(w.abs().max()))
        assert err <= 3 * base + ERR_FLOOR[torch.float32] * scale, f"{rule} {name}: {err} vs {base}"


@pytest.mark.parametrize(
    "shape", [(1, 1, 97, 130), (2, 1, 97, 130), (1, 6, 1, 130), (2, 6, 97, 1), (97, 130), (1,)]
)
def test_backward_dbias_broadcast(shape):
    q, k, v = make_qkv(2, 6, 2, 97, 130, 32, dtype=torch.float64, seed=15)
    bias = torch.randn(*shape, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(2, 6, 97, 32, generator=g, dtype=torch.float64)
    dlse = torch.zeros(2, 6, 97, dtype=torch.float64)
    for kw in ({"bias": bias}, {"bias": bias, "causal": True, "alibi_slopes": torch.rand(2, 6)}):
        need = ("bias",)
        want = math_grads(q, k, v, dout, dlse, need, **kw)
        got = native_grads(q, k, v, dout, dlse, need, **kw)
        assert got[3].shape == (1,) * (4 - bias.dim()) + bias.shape  # as the spec views it
        for a, w in zip(got, want):
            assert max_err(a, w.numpy()) <= 1e-10 * (float(w.abs().max()) + 1)


def test_backward_dropout_matches_math():
    import selfattn
    from selfattn import _rng

    q, k, v = make_qkv(2, 4, 2, 97, 120, 32, dtype=torch.float64, seed=16)
    torch.manual_seed(123)
    seed = _rng.draw_seed()
    kw = {"causal": True, "dropout_p": 0.3}
    g = torch.Generator().manual_seed(4)
    dout = torch.randn(2, 4, 97, 32, generator=g, dtype=torch.float64)
    q6, k6, v6 = float64_leaves(q, k, v)
    torch.manual_seed(123)
    out_m = selfattn.attention(q6, k6, v6, backend="math", **kw)
    want = torch.autograd.grad((out_m * dout).sum(), [q6, k6, v6])
    out, lse = nat(q, k, v, dropout_seed=seed, **kw)
    assert max_err(out, out_m.detach().numpy()) < 1e-12  # the same mask
    got = nat_backward(dout, q, k, v, out, lse, dropout_seed=seed, **kw)[:3]
    for a, w in zip(got, want):
        assert max_err(a, w.numpy()) <= 1e-10 * float(w.abs().max())


class _NativeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, alibi, kw):
        out, lse = nat(q, k, v, bias=bias, alibi_slopes=alibi, **kw)
        ctx.save_for_backward(q, k, v, bias, alibi, out, lse)
        ctx.kw = kw
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias, alibi, out, lse = ctx.saved_tensors
        dq, dk, dv, db, da = nat_backward(
            dout.contiguous(), q, k, v, out, lse, dlse.contiguous(), True, True, bias=bias,
            alibi_slopes=alibi, **ctx.kw,
        )  # fmt: skip
        return dq, dk, dv, db, da, None


@pytest.mark.parametrize("kw", [{}, {"causal": True, "softcap": 1.5}, {"window": (2, 1)}])
def test_backward_gradcheck(kw):
    """Finite differences on tiny float64 problems with bias and ALiBi."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    bias = torch.randn(1, 2, 5, 7, generator=g, dtype=torch.float64)
    alibi = torch.rand(1, 2, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (q, k, v, bias, alibi)]

    def fn(*xs):
        return _NativeFn.apply(*xs, kw)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_backward_16bit_bias_grad_accuracy():
    """bf16/fp16 inputs with the float32 output passed: dbias as accurate as math's."""
    for dt in (torch.bfloat16, torch.float16):
        q, k, v = make_qkv(2, 4, 4, 256, 256, 64, dtype=dt, seed=17)
        bias = torch.randn(1, 1, 256, 256) * 0.5
        g = torch.Generator().manual_seed(6)
        dout = torch.randn(2, 4, 256, 64, generator=g).to(dt)
        dlse = torch.zeros(2, 4, 256)
        want = math_grads(q, k, v, dout, dlse, ("bias",), bias=bias)[3]
        got = native_grads(q, k, v, dout, dlse, ("bias",), out_dtype=torch.float32, bias=bias)[3]
        assert got.dtype == torch.float32
        assert max_err(got, want.numpy()) < 1e-5, dt


def test_backward_empty_rows_and_nan_padding():
    q, k, v = make_qkv(2, 4, 2, 100, 100, 32, seed=18)
    k[:, :, 90:] = float("nan")
    v[:, :, 85:] = float("inf")
    ids = torch.zeros(2, 100, dtype=torch.long)
    ids[:, 80:] = -1
    # rows at positions < 0 see nothing; no row sees the keys >= 80
    for kw in ({"segment_ids": ids}, {"causal": True, "start": -20, "window": (70, 0)}):
        out, lse = nat(q, k, v, **kw)
        dout, dlse = torch.randn_like(out), torch.randn_like(lse)
        dq, dk, dv, _, _ = nat_backward(dout, q, k, v, out, lse, dlse, **kw)
        seen = slice(0, 80) if "segment_ids" in kw else slice(20, 100)
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
        empty = torch.isneginf(lse)
        assert empty.any() and torch.all(dq[empty] == 0)
        assert torch.isfinite(out[:, :, seen]).all()


def test_backward_deterministic():
    (q, k, v), kw = _det_case()
    kw = {**kw, "bias": kw["bias"][:, :1]}  # (1, 1, Nq, Nk): dbias gathers heads
    out, lse = nat(q, k, v, **kw)
    g = torch.Generator().manual_seed(7)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)

    def run(threads):
        with torch_threads(threads):
            return nat_backward(dout, q, k, v, out, lse, dlse, True, True, **kw)

    want = run(1)
    results = [run(2)]
    lock_results = [None] * 4

    def work(i):
        lock_results[i] = run(1 + i % 2)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for r in results + lock_results:
        for a, w in zip(r, want):
            assert torch.equal(a, w)


# -- the key-bound plan ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "causal,left,right,start",
    [(True, None, None, 0), (False, 100, 20, 0), (True, 300, None, 50), (False, None, 7, -30),
     (True, 64, 0, 1000), (False, None, None, 0)],
)  # fmt: skip
def test_bounds_match_key_spans(causal, left, right, start):
    from selfattn import rules
    from selfattn.spec import AttentionSpec

    nq, nk, block = 700, 900, 96
    window = None if left is None and right is None else (left, right)
    spec = AttentionSpec(
        B=1,
        Hq=1,
        Hkv=1,
        Nq=nq,
        Nk=nk,
        D=8,
        Dv=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
        causal=causal,
        window=window,
        start=start,
    )
    got = EXT.bounds(record(spec), nq, nk, block).tolist()
    for i, (lo, hi, flo, fhi) in enumerate(got):
        i0, i1 = i * block, min(nq, i * block + block)
        r_lo, r_hi, r_flo, r_fhi = rules.bounds(spec, i0, i1)
        spans = rules.key_spans(spec, i0, i1, 128)
        if r_lo >= r_hi:
            assert lo == hi and not spans
            continue
        assert (lo, hi) == (r_lo, r_hi) == (spans[0][0], spans[-1][1])
        assert (flo, fhi) == ((r_flo, r_fhi) if r_flo < r_fhi else (lo, lo))
        # every key of [flo, fhi) is seen by every row of the block
        vis = rules.visible(spec, i0, i1, flo, fhi, "cpu")
        assert vis is None or bool(vis.all())


# -- determinism and thread safety ---------------------------------------------------------------


def _det_case():
    q, k, v = make_qkv(2, 6, 2, 300, 700, 64, seed=12)
    return (q, k, v), {"causal": True, "bias": torch.randn(1, 6, 300, 700), "alibi_slopes":
                       torch.rand(6), "dropout_p": 0.2, "dropout_seed": (5, 6)}  # fmt: skip


def test_deterministic_across_threads():
    (q, k, v), kw = _det_case()
    with torch_threads(1):
        a = nat(q, k, v, **kw)
    with torch_threads(2):
        b = nat(q, k, v, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_deterministic_concurrent_callers():
    (q, k, v), kw = _det_case()
    want = nat(q, k, v, **kw)
    results = [None] * 8

    def work(i):
        with torch_threads(1 + i % 2):
            results[i] = nat(q, k, v, **kw)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads[:4]:
        t.start()
    for t in threads[:4]:
        t.join()
    for t in threads[4:]:
        t.start()
    for t in threads[4:]:
        t.join()
    for r in results[:8]:
        assert torch.equal(r[0], want[0]) and torch.equal(r[1], want[1])


# -- the build -----------------------------------------------------------------------------------


def test_cached_load_is_fast(tmp_path):
    code = (
        "import time, torch; from selfattn.backends import native; t=time.perf_counter();"
        "native.load(); print(time.perf_counter()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 1.0


def test_broken_compiler_gives_reason(tmp_path):
    code = "from selfattn.backends import native; import torch;print(repr(native.unavailable()))"
    env = dict(os.environ, CXX="/nonexistent/g++", SELFATTN_CACHE=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    line = out.stdout.strip().splitlines()[-1]
    assert "no C++ compiler found" in line and "/nonexistent/g++" in line


def test_compile_error_gives_first_error_line(tmp_path):
    fake = tmp_path / "fake-g++"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "fake g++ 1.0"; exit 0; fi\n'
        'echo "kernels.cpp:1:1: error: no vectors today" >&2; exit 1\n'
    )
    fake.chmod(0o755)
    code = "from selfattn.backends import native; print(repr(native.unavailable()))"
    env = dict(os.environ, CXX=str(fake), SELFATTN_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    line = out.stdout.strip().splitlines()[-1]
    assert "C++ build failed" in line and "error: no vectors today" in line


def test_isa_override(monkeypatch):
    monkeypatch.setenv("SELFATTN_NATIVE_ISA", "bogus")
    with pytest.raises(RuntimeError, match="SELFATTN_NATIVE_ISA"):
        nat(*make_qkv(1, 1, 1, 4, 4, 16))
    monkeypatch.delenv("SELFATTN_NATIVE_ISA")
    assert EXT.isa() in ("avx512", "avx2", "generic")
    assert EXT.isa("float64") == "generic"
