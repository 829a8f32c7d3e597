"""The front door's fast path over quantized caches (``api.quantized_plain_call``): a decode step
whose ``k`` and/or ``v`` is a ``QuantizedKV`` gets the spec ``quantized_call`` builds, the backend
``select`` picks and bit for bit its result, with the choice remembered per kind of operand; it
declines (the full path runs, with its errors) everything else. Issue 18: the Python front door
cost a quantized decode step 10-35 us on top of the kernel, where a float call paid ~3.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields

import pytest
import torch

import selfattn
from helpers import make_qkv
from selfattn import api, backends
from selfattn.backends import CHOICES
from selfattn.kv_residual import ResidualKV, older_rules
from selfattn.quant import quantize_kv, standin, unwrap_label
from selfattn.spec import validate_call

pytestmark = pytest.mark.usefixtures("one_thread")

CPU_BACKENDS = [n for n in selfattn.available_backends() if n != "triton"]
# (B, Hq, Hkv, Nq, Nk, D): decode steps (GQA and not), a short prefill, an empty cache
SHAPES = [(1, 9, 3, 1, 40, 64), (2, 4, 4, 1, 33, 16), (1, 4, 2, 5, 9, 32), (1, 2, 1, 1, 0, 8)]
PLAIN = [(c, s, r) for c in (False, True) for s in (None, 0.3) for r in (False, True)]
# (key format, value format): (bits, rotate) or None for a float tensor
FORMATS = [
    ((8, False), (8, False)),
    ((4, False), (4, False)),
    ((4, True), (4, True)),
    ((8, True), (4, False)),
    ((8, False), None),
    (None, (4, True)),
]
RULE_DEFAULTS = dict.fromkeys(
    ("window", "mask", "bias", "alibi_slopes", "softcap", "segment_ids", "sinks")
)


def quantized(x, fmt):
    return x if fmt is None else quantize_kv(x, bits=fmt[0], rotate=fmt[1])


def make_call(shape, formats, dtype=torch.float32, seed=0):
    q, k, v = make_qkv(*shape, dtype=dtype, seed=seed)
    return q, quantized(k, formats[0]), quantized(v, formats[1])


def rules_of(causal, scale):
    return {**RULE_DEFAULTS, "causal": causal, "scale": scale, "dropout_p": 0.0}


def full_path(q, k, v, causal, scale, return_lse, backend):
    """What ``attention`` does for a quantized call without the fast path."""
    return api.quantized_call(q, k, v, rules_of(causal, scale), return_lse, backend)


def spy(monkeypatch) -> list:
    """Record which calls reach the quantized fast path (and whether it answered)."""
    real, seen = api.quantized_plain_call, []

    def spied(*args):
        got = real(*args)
        seen.append(got is not None)
        return got

    monkeypatch.setattr(api, "quantized_plain_call", spied)
    return seen


def remembered():
    return [x for key, x in CHOICES.items() if key[0] == "quantized"]


@pytest.mark.parametrize("formats", FORMATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_remembered_spec_is_the_spec_quantized_call_validates(shape, formats, dtype):
    q, k, v = make_call(shape, formats, dtype)
    for causal, scale, return_lse in PLAIN:
        CHOICES.clear()
        selfattn.attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        (spec, _, _), *more = remembered()
        assert not more
        rules = rules_of(causal, scale)
        want = validate_call(q, standin(k), standin(v), rules, return_lse)
        want.quantized = unwrap_label(k, v)
        for f in fields(want):
            x, y = getattr(spec, f.name), getattr(want, f.name)
            assert x == y and type(x) is type(y), f"{f.name}: {x!r} != {y!r}"


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("formats", FORMATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fast_path_gives_the_full_paths_result_bit_for_bit(monkeypatch, shape, formats, backend):
    seen = spy(monkeypatch)
    q, k, v = make_call(shape, formats)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # any strides
    for causal, scale, return_lse in PLAIN:
        spec = validate_call(q, standin(k), standin(v), rules_of(causal, scale), return_lse)
        if backend != "auto" and backends.refusals(spec, backend):
            continue  # sdpa declines lse and top-left causality (refusals: checked below)
        for _ in range(2):  # the second time from the remembered choice
            got = selfattn.attention(
                q, k, v, causal=causal, scale=scale, return_lse=return_lse, backend=backend
            )
            want = full_path(q, k, v, causal, scale, return_lse, backend)
            for a, b in zip(got, want) if return_lse else [(got, want)]:
                assert torch.equal(a, b) and a.dtype == b.dtype
            assert seen.pop() is True


@pytest.mark.parametrize("formats", FORMATS, ids=str)
def test_a_remembered_choice_reads_each_calls_own_codes(formats):
    """The call record is made once per kind of operand; the codes and scales (and a float
    side) are those of the call: another cache of the same shape gives its own result."""
    shape = (1, 9, 3, 1, 40, 64)
    calls = [make_call(shape, formats, seed=s) for s in range(3)]
    q = calls[0][0]
    for _, k, v in calls:
        got = selfattn.attention(q, k, v, causal=True, return_lse=True)
        want = full_path(q, k, v, True, None, True, "auto")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(remembered()) == 1


@pytest.mark.parametrize("formats", FORMATS, ids=str)
def test_a_remembered_choice_keeps_no_cache_alive(formats):
    """The remembered run holds the stand-ins and the spec's fields, never the codes, scales or
    float side of the call that made it (up to 256 remembered shapes would pin 256 caches)."""
    import gc
    import weakref

    q, k, v = make_call((1, 4, 2, 1, 24, 32), formats)
    held = [weakref.ref(x.codes if hasattr(x, "codes") else x) for x in (k, v)]
    held += [weakref.ref(x.scales) for x in (k, v) if hasattr(x, "scales")]
    selfattn.attention(q, k, v, causal=True)
    assert len(remembered()) == 1
    del k, v
    gc.collect()
    assert all(r() is None for r in held)


def test_float64_lse_is_float32_from_the_remembered_choice():
    q, k, v = make_call((1, 4, 2, 1, 17, 16), ((4, True), (8, False)), torch.float64)
    for _ in range(2):
        out, lse = selfattn.attention(q, k, v, return_lse=True)
        assert out.dtype == torch.float64 and lse.dtype == torch.float32


def test_the_choice_is_remembered_per_bits_group_and_rotation():
    q, k, v = make_qkv(1, 4, 2, 1, 24, 32)
    kinds = [
        quantize_kv(k, bits=8),
        quantize_kv(k, bits=4),
        quantize_kv(k, bits=4, rotate=True),
        quantize_kv(k, bits=4, group_size=8),
    ]
    for kk in kinds:
        got = selfattn.attention(q, kk, v, causal=True)
        assert torch.equal(got, full_path(q, kk, v, True, None, False, "auto"))
    assert len(remembered()) == len(kinds)


def test_a_refused_call_is_never_remembered():
    q, k, v = make_call((1, 4, 2, 1, 9, 16), ((8, False), (8, False)))
    for _ in range(2):  # refused each time, with select's message
        with pytest.raises(selfattn.UnsupportedInputs, match="does not return the lse"):
            selfattn.attention(q, k, v, return_lse=True, backend="sdpa")
    assert remembered() == []


def test_a_call_with_another_rule_takes_the_full_path(monkeypatch):
    seen = spy(monkeypatch)
    q, k, v = make_call((1, 2, 1, 1, 5, 8), ((8, False), (4, True)))
    got = selfattn.attention(q, k, v, window=(2, 0))
    assert seen == []
    rules = {**rules_of(False, None), "window": (2, 0)}
    assert torch.equal(got, api.quantized_call(q, k, v, rules, False, "auto"))


def declined_cases():
    q, k, v = make_call((1, 2, 1, 1, 5, 8), ((8, False), (8, False)))
    yield "a Parameter q", (torch.nn.Parameter(q, requires_grad=False), k, v), {}
    yield "a gradient to record", (q.clone().requires_grad_(), k, v), {}
    yield "a float v with a gradient", (q, k, torch.randn(1, 1, 5, 8, requires_grad=True)), {}
    yield "causal=1", (q, k, v), {"causal": 1}
    yield "return_lse=1", (q, k, v), {"return_lse": 1}
    yield "an int scale", (q, k, v), {"scale": 1}
    yield "a nan scale", (q, k, v), {"scale": float("nan")}
    yield "an unknown backend", (q, k, v), {"backend": "nope"}
    yield "a backend that is not a str", (q, k, v), {"backend": None}
    yield "a list for v", (q, k, [1.0]), {}


@pytest.mark.parametrize("case", list(declined_cases()), ids=lambda c: c[0])
def test_the_fast_path_declines_what_it_does_not_check(monkeypatch, case):
    """These reach the full path (which runs them, or raises its own error)."""
    _, args, kwargs = case
    seen = spy(monkeypatch)
    with contextlib.suppress(TypeError, ValueError):
        selfattn.attention(*args, **kwargs)
    assert seen == [False]
    assert remembered() == []


def test_errors_are_the_full_paths():
    q, k, v = make_call((1, 4, 2, 1, 9, 16), ((8, False), (8, False)))
    with pytest.raises(TypeError, match="share one dtype"):
        selfattn.attention(q.double(), k, v)
    with pytest.raises(ValueError, match="head dims differ"):
        selfattn.attention(q[..., :8], k, v)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        selfattn.attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        selfattn.attention(q[0], k, v, backend="nope")
    assert remembered() == []


# -- a cache with a float residual window (ResidualKV): one call per part, merged ----------------


def residual_parts(nq, m, w, dtype=torch.float32, seed=0):
    q, k, v = make_qkv(1, 9, 3, nq, m + w, 64, dtype=dtype, seed=seed)
    kk = ResidualKV(quantize_kv(k[:, :, :m], bits=4, rotate=True), k[:, :, m:])
    vv = ResidualKV(quantize_kv(v[:, :, :m], bits=8), v[:, :, m:])
    return q, kk, vv


def test_a_residual_decode_step_takes_both_fast_paths(monkeypatch):
    """The older part's call carried a window that restricts nothing (causal shifted by the
    window's length), so it always took the full quantized path (~25 us more per step). Where
    the fused call declines (here: a backend other than native), both parts' fast paths run."""
    seen_q = spy(monkeypatch)
    real, seen_p = api.plain_call, []
    monkeypatch.setattr(api, "plain_call", lambda *a: seen_p.append(real(*a)) or seen_p[-1])
    monkeypatch.setattr(api, "fused_call", lambda *a: None)
    q, k, v = residual_parts(1, 40, 8)
    want = selfattn.attention(
        q, k.dequantize(), v.dequantize(), causal=True, return_lse=True, backend="math"
    )
    for return_lse in (False, True):
        seen_q.clear(), seen_p.clear()
        got = selfattn.attention(q, k, v, causal=True, return_lse=return_lse)
        # the window's call, then the older part's (the outer call: api.residual_plain_call)
        assert len(seen_p) == 1 and seen_p[0] is not None
        assert seen_q == [True]
        torch.testing.assert_close(got[0] if return_lse else got, want[0], atol=2e-5, rtol=2e-5)
        if return_lse:
            torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("nq, m, w", [(1, 40, 8), (3, 40, 1), (4, 300, 2), (2, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_residual_decode_step_is_one_kernel_call(monkeypatch, nq, m, w, dtype):
    """A decode step over a quantized cache with a float window ran three calls (the window's,
    the older part's, then a merge of four torch operations): ~130 us a layer in SmolLM2 at 4k
    tokens, a sixth of its attention. Native's decode kernel now reads the window as more key
    chunks of the same call (kv_residual.fused_call), rows at their positions over both parts
    (so causal holds where the window is shorter than Nq - 1), and the full path gives the same
    result, bit for bit."""
    from selfattn import kv_residual

    seen_q = spy(monkeypatch)
    real, seen_p = api.plain_call, []
    monkeypatch.setattr(api, "plain_call", lambda *a: seen_p.append(real(*a)) or seen_p[-1])
    q, k, v = residual_parts(nq, m, w, dtype=dtype, seed=5)
    for causal in (True, False):
        want = selfattn.attention(
            q, k.dequantize(), v.dequantize(), causal=causal, return_lse=True, backend="math"
        )
        for return_lse in (False, True):
            seen_q.clear(), seen_p.clear()
            got = selfattn.attention(q, k, v, causal=causal, return_lse=return_lse)
            assert not seen_p and not seen_q  # neither part's own call ran
            full = kv_residual.residual_call(q, k, v, rules_of(causal, None), return_lse, "auto")
            out = got[0] if return_lse else got
            for a, b in zip(got, full) if return_lse else [(got, full)]:
                assert torch.equal(a, b) and a.dtype == b.dtype
            tol = {torch.bfloat16: 2e-2, torch.float32: 2e-5, torch.float64: 1e-5}[dtype]
            torch.testing.assert_close(out, want[0], atol=tol, rtol=tol)
            if return_lse:
                assert got[1].dtype == torch.float32
                torch.testing.assert_close(got[1], want[1].float(), atol=tol, rtol=tol)


def visible(nq, nk, causal, window, lo, hi):
    """(Nq, hi - lo) bool: which of keys [lo, hi) each row sees (bottom-right aligned at Nk)."""
    rows = torch.arange(nk - nq, nk).unsqueeze(-1)  # (Nq, 1)
    cols = torch.arange(lo, hi)
    vis = torch.ones(nq, hi - lo, dtype=torch.bool)
    if causal:
        vis &= cols <= rows
    left, right = (None, None) if window is None else window
    if left is not None:
        vis &= cols >= rows - left
    if right is not None:
        vis &= cols <= rows + right
    return vis


@pytest.mark.parametrize("nq, m, w", [(1, 20, 5), (3, 20, 5), (7, 10, 5), (6, 3, 2), (1, 1, 1)])
def test_the_older_parts_rules_see_exactly_what_the_call_sees(nq, m, w):
    """The older part's rules (``older_rules``) give each row the keys ``[0, m)`` it sees in
    the whole call: with no window at all where it would restrict nothing."""
    q = torch.zeros(1, 1, nq, 8)
    nk = m + w
    sides = [None, 0, 1, 2, 4, 9, 30]
    for causal in (False, True):
        for window in [None, *((a, b) for a in sides for b in sides)]:
            rules = {"causal": causal, "window": window, "mask": None}
            got = older_rules(rules, m, nq, nk, q)
            assert got["causal"] is False
            if got["mask"] is not None:
                seen = got["mask"]
            else:
                seen = visible(nq, m, False, got["window"], 0, m)
            want = visible(nq, nk, causal, window, 0, m)
            assert torch.equal(seen, want), (causal, window, got["window"])
            if want.all() and (causal or window != (None, None)):  # (None, None): as given
                assert got["window"] is None and got["mask"] is None, (causal, window)


def test_the_merge_keeps_forward_mode_tangents():
    """The merge works in place only without a graph or a tangent to carry: the tangent is
    that of the call over the concatenation (the parts' lse are float32: to float32 rounding)."""
    from torch.autograd import forward_ad

    q, k, v = residual_parts(2, 12, 4, dtype=torch.float64)
    t = torch.randn_like(q)
    tangents = []
    with forward_ad.dual_level():
        for kk, vv in ((k, v), (k.dequantize(), v.dequantize())):
            out = selfattn.attention(forward_ad.make_dual(q, t), kk, vv, causal=True)
            tangents.append(forward_ad.unpack_dual(out).tangent)
    torch.testing.assert_close(*tangents, atol=1e-5, rtol=1e-5)


def test_a_plain_residual_call_is_checked_as_validate_checks_it():
    """A plain call over a ResidualKV is checked by ``check_qkv`` alone (``plain_rules``): that
    holds only while its keywords are exactly attention's rules, and anything else still gets
    ``validate_call``'s errors before any work."""
    from selfattn.kv_residual import PLAIN_KEYS
    from selfattn.spec import KEYWORDS

    assert PLAIN_KEYS == KEYWORDS
    q, k, v = residual_parts(1, 20, 4)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        selfattn.attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="causal"):
        selfattn.attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        selfattn.attention(q, k, v, return_lse=1)
    with pytest.raises(ValueError, match="head dims differ"):
        selfattn.attention(q[..., :32], k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        selfattn.attention(q.double(), k, v)


# -- the fast path over a ResidualKV (api.residual_plain_call) ------------------------------------

RESIDUAL_SHAPES = [
    (1, 40, 8),
    (3, 40, 8),
    (3, 40, 2),
    (1, 0, 8),
    (5, 6, 3),
    (4, 9, 1),
    (1, 7, 0),
]  # (Nq, m, w)


def residual_of(q, k, v, m, formats):
    """k and v (B, Hkv, m + w, D) as ResidualKV split at ``m``: the older part quantized by
    ``formats`` (a float tensor where a format is None), the rest a float window."""
    kk = ResidualKV(quantized(k[:, :, :m], formats[0]), k[:, :, m:])
    vv = ResidualKV(quantized(v[:, :, :m], formats[1]), v[:, :, m:])
    return q, kk, vv


@pytest.mark.parametrize("formats", [*FORMATS, (None, None)], ids=str)
@pytest.mark.parametrize("nq, m, w", RESIDUAL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_residual_decode_step_never_builds_the_parts_rules(monkeypatch, nq, m, w, formats, dtype):
    """A decode step over a cache with a float window went through ``residual_call``: the whole
    call checked over stand-ins, each part's rules built (``window_rules``, ``older_rules``)
    and each part's call through ``attention``'s keywords, ~40 us per layer before any
    kernel. The fast path calls the two parts' fast paths directly, or one native decode call
    over both (a quantized older part, Nq <= 4: ``kv_residual.fused_call``), and gives the
    full path's result, bit for bit (otherwise declining where the older part is not wholly
    behind every row)."""
    from selfattn import kv_residual

    calls = []
    real = kv_residual.residual_call
    monkeypatch.setattr(api, "residual_call", lambda *a: calls.append(1) or real(*a))
    q, k, v = make_qkv(1, 9, 3, nq, m + w, 64, dtype=dtype, seed=3)
    q, kk, vv = residual_of(q, k, v, m, formats)
    for causal, scale, return_lse in PLAIN:
        calls.clear()
        got = selfattn.attention(q, kk, vv, causal=causal, scale=scale, return_lse=return_lse)
        fast = not calls
        rules = {**rules_of(causal, scale)}
        want = real(q, kk, vv, rules, return_lse, "auto")
        for a, b in zip(got, want) if return_lse else [(got, want)]:
            assert torch.equal(a, b) and a.dtype == b.dtype
        # declined only where some row sees part of the older tokens (causal, w < Nq - 1) and
        # the parts are not read in one decode call
        fused = formats != (None, None) and nq <= 4
        assert fast == (fused or not causal or m == 0 or w >= nq - 1), (causal, fast)


def test_residual_fast_path_declines_to_the_full_paths_errors():
    """What the fast path cannot run (splits that differ, parts that do not fit q, an unknown
    backend) gets the full path's checks and messages, over the whole call's shapes."""
    q, k, v = residual_parts(1, 20, 4)
    other = ResidualKV(
        quantize_kv(v.head.dequantize()[:, :, :19], bits=8), v.dequantize()[:, :, 19:]
    )
    with pytest.raises(ValueError, match="split at different tokens"):
        selfattn.attention(q, k, other, causal=True)
    with pytest.raises(ValueError, match=r"k=\(1, 3, 24, 64\)"):
        selfattn.attention(q[:, :4], k, v, causal=True)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        selfattn.attention(q, k, v, causal=True, backend="nope")
    assert api.residual_plain_call(q, k, v.dequantize(), True, None, False, "auto") is None
    assert api.residual_plain_call(q, k, other, True, None, False, "auto") is None
