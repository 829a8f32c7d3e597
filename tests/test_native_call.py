"""The native engine's call record (``backends/native/call.py``) and the extension's side of it.

The record's fields follow from ``spec.RULES`` and equal the extension's ``CALL_FIELDS``; each
field carries what the spec says; window sides larger than any distance (up to any int) reach
C++ as unbounded; the extension refuses records it cannot honour with a message naming the field.
"""

from __future__ import annotations

import sys

import pytest
import torch

import selfattn
from helpers import make_qkv
from selfattn.backends import native
from selfattn.backends.native import backend as native_backend
from selfattn.backends.native.call import (
    CALL_FIELDS,
    DECLINED,
    FIELDS,
    FROM_SPEC,
    REFUSED,
    STORAGE_FIELDS,
    WINDOW_FIELDS,
    NativeCall,
    record,
    records_with_window,
    refused_rules,
)
from selfattn.spec import RULES, validate

pytestmark = pytest.mark.usefixtures("one_thread")

WHY = native.unavailable()
if WHY is not None:
    pytest.skip(f"native extension unavailable: {WHY}", allow_module_level=True)
EXT = native.load()
M = sys.maxsize  # 2**63 - 1


# -- the record follows the table of rules -------------------------------------------------------


def test_every_rule_field_is_in_the_record_or_declined():
    for rule in RULES:
        for f in rule.fields:
            assert f in FROM_SPEC or f in DECLINED, (
                f"rule {rule.keyword}: spec field {f!r} is neither mapped to record fields "
                "(FROM_SPEC) nor declined (DECLINED) in backends/native/call.py"
            )
    assert not set(FROM_SPEC) & set(DECLINED)
    assert set(FROM_SPEC) <= {f for rule in RULES for f in rule.fields}  # no stale entries
    assert REFUSED == ()  # every rule runs natively today


def test_a_rule_missing_from_the_record_is_refused_not_ignored(monkeypatch):
    """A new rule whose field is in neither table (or declined) makes native decline the calls
    that use it, and ``auto`` picks another backend; calls without it still run natively."""
    softcap = next(rule for rule in RULES if rule.keyword == "softcap")
    without = {f: names for f, names in FROM_SPEC.items() if f != "softcap"}
    assert refused_rules(without, {}) == (softcap,)
    assert refused_rules(FROM_SPEC, {"softcap": "not yet"}) == (softcap,)
    monkeypatch.setattr(native_backend, "REFUSED", (softcap,))
    q, k, v = make_qkv(1, 2, 1, 5, 8, 16)
    reasons = native_backend.NativeBackend().check(validate(q, k, v, softcap=2.0))
    assert reasons == ["softcap is not in its call record (native/call.py)"]
    assert native_backend.NativeBackend().check(validate(q, k, v, causal=True)) == []
    with pytest.raises(selfattn.UnsupportedInputs, match="softcap is not in its call record"):
        selfattn.attention(q, k, v, softcap=2.0, backend="native")


def test_record_fields_match_the_extension():
    assert tuple(EXT.CALL_FIELDS) == FIELDS == NativeCall._fields
    tail = (*CALL_FIELDS, *STORAGE_FIELDS, *WINDOW_FIELDS)
    assert FIELDS[-len(tail) :] == tail


def test_record_carries_every_rule_by_name():
    q, k, v = make_qkv(2, 4, 2, 6, 9, 16)
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(2, 9, dtype=torch.long)
    spec = validate(
        q, k, v, causal=True, window=(5, 3), mask=torch.rand(2, 1, 6, 9, generator=g) > 0.5,
        bias=torch.randn(4, 6, 9, generator=g), alibi_slopes=torch.rand(4, generator=g),
        softcap=2.5, segment_ids=(ids[:, :6], ids), scale=0.3, dropout_p=0.25,
        sinks=torch.randn(4, generator=g),
    )  # fmt: skip
    call = record(spec, (7, 9))
    assert isinstance(call, tuple) and len(call) == len(FIELDS)
    assert call.causal is True and (call.left, call.right) == (5, 3)
    assert call.mask is spec.mask and call.bias is spec.bias and call.alibi is spec.alibi_slopes
    assert call.q_ids is spec.q_ids and call.kv_ids is spec.kv_ids and call.sinks is spec.sinks
    assert (call.softcap, call.scale, call.dropout_p) == (2.5, 0.3, 0.25)
    assert (call.start, call.seed0, call.seed1) == (3, 7, 9)
    assert (call.drop_hq, call.drop_nq, call.drop_b0, call.drop_h0, call.drop_r0) == (0,) * 5

    plain = record(validate(q, k, v))
    assert plain._asdict() == {
        **dict.fromkeys(FIELDS, 0),
        "causal": False,
        "left": -1,
        "right": -1,
        **dict.fromkeys(("mask", "bias", "alibi", "q_ids", "kv_ids", "sinks")),
        "softcap": 0.0,
        "scale": 0.25,
        "dropout_p": 0.0,
        "start": 3,
        **dict(zip(STORAGE_FIELDS, (None, None, 0, 0, False) * 2)),
        **dict.fromkeys(WINDOW_FIELDS),
    }


# -- window sides: clamped where the record is built ---------------------------------------------


@pytest.mark.parametrize("nq, nk", [(6, 9), (9, 6), (1, 40)])
def test_window_sides_clamped_at_the_reach_of_the_call(nq, nk):
    """A side >= |start| + Nq + Nk (more than any row-key distance) becomes -1; below, it stays."""
    q, k, v = make_qkv(1, 2, 1, nq, nk, 16)
    reach = abs(nk - nq) + nq + nk
    for side in (0, 3, reach - 1):
        assert record(validate(q, k, v, window=(side, side)))[1:3] == (side, side)
    for side in (reach, reach + 1, M, 2**63, 2**200):
        call = record(validate(q, k, v, window=(side, side)))
        assert (call.left, call.right) == (-1, -1), side
        assert (record(validate(q, k, v, window=(None, side))).right, call.left) == (-1, -1)
    # either side of the threshold, the result is the unrestricted one
    want = selfattn.attention(q, k, v, backend="native")
    for side in (reach - 1, reach):
        got = selfattn.attention(q, k, v, window=(side, side), backend="native")
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "window, same",
    [((None, M), {}), ((M, None), {}), ((M, M), {}), ((M, 0), {"causal": True}),
     ((2**63, 2**64), {}), ((None, 2**100), {}), ((2**70, 0), {"causal": True})],
)  # fmt: skip
def test_window_side_near_or_beyond_int64_restricts_nothing_on_native(window, same):
    """Issue 17 rows 1-2: (None, M) dropped keys (positions wrapped in C++), (M, 0) gave an
    all-zero gradient, and a side >= 2**63 failed with pybind's "incompatible function
    arguments". A side larger than any distance restricts nothing, for every int."""
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 4, 2, 7, 11, 16, seed=3))
    out, lse = selfattn.attention(q, k, v, window=window, backend="native", return_lse=True)
    want, want_lse = selfattn.attention(q, k, v, backend="native", return_lse=True, **same)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out * dout).sum(), (q, k, v))
    exp = torch.autograd.grad((want * dout).sum(), (q, k, v))
    for a, b in zip(got, exp):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- the extension refuses what it cannot honour --------------------------------------------------


def _direct():
    q, k, v = make_qkv(1, 2, 1, 5, 8, 16)
    return q, k, v, record(validate(q, k, v, causal=True))


def test_extension_clamps_huge_int64_window_sides():
    """A direct call with a side near 2**63 (no record builder in between) is unbounded too;
    before, ``pos + right + 1`` overflowed in C++ (issue 17 row 1)."""
    q, k, v, call = _direct()
    want = EXT.forward(q, k, v, call)
    for left, right in ((M, M), (M, -1), (-1, M), (M - 1, 2**62)):
        got = EXT.forward(q, k, v, call._replace(left=left, right=right))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    plain = EXT.bounds(call._replace(causal=False), 5, 8, 2)
    wide = EXT.bounds(call._replace(causal=False, left=M, right=M), 5, 8, 2)
    assert torch.equal(plain, wide) and plain[:, :2].tolist() == [[0, 8]] * 3
    # a block larger than the call is one block (nq + block - 1 overflowed for block near 2**63)
    assert EXT.bounds(call, 5, 8, M).tolist() == EXT.bounds(call, 5, 8, 5).tolist()
    with pytest.raises(RuntimeError, match="block must be positive"):
        EXT.bounds(call, 5, 8, 0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"left": -2}, "window sides must be >= 0 or -1"),
        ({"right": -(2**40)}, "window sides must be >= 0 or -1"),
        ({"left": 2**63}, "call record field left must be an int within int64"),
        ({"start": 2**61}, r"start=\d+ is beyond"),
        ({"start": -(2**64)}, "call record field start must be an int within int64"),
        ({"causal": 1}, "call record field causal must be a bool"),
        ({"scale": float("nan")}, "scale=nan is not finite"),
        ({"scale": "0.3"}, "call record field scale must be a real number"),
        ({"softcap": -1.0}, "softcap must be finite and > 0"),
        ({"mask": "all"}, "call record field mask must be a torch.Tensor or None"),
        ({"dropout_p": 1.0}, "dropout_p=1"),
        ({"drop_hq": 1}, "dropout rows"),
        ({"drop_r0": 4}, "dropout rows"),
        ({"drop_b0": M}, "dropout rows"),
        ({"drop_hq": 2**40, "drop_nq": 2**40}, "dropout rows"),
    ],
    ids=str,
)
def test_extension_refuses_bad_record_fields(change, message):
    q, k, v, call = _direct()
    with pytest.raises(RuntimeError, match=message):
        EXT.forward(q, k, v, call._replace(**change))


def test_extension_refuses_a_record_of_the_wrong_length():
    q, k, v, call = _direct()
    for bad in (tuple(call)[:-1], (*call, 0), list(call)):
        with pytest.raises(RuntimeError, match="CALL_FIELDS"):
            EXT.forward(q, k, v, bad)


def test_probabilities_ignore_the_records_dropout():
    """The probabilities are before dropout: a record with dropout gives the same ones."""
    q, k, v = make_qkv(1, 2, 1, 5, 8, 16)
    call = record(validate(q, k, v, causal=True, dropout_p=0.5), (1, 2))
    _, lse = EXT.forward(q, k, v, call)
    plain = EXT.probabilities(q, k, lse, call._replace(dropout_p=0.0))
    assert torch.equal(EXT.probabilities(q, k, lse, call), plain)
    torch.testing.assert_close(plain.sum(-1), torch.ones(1, 2, 5))


# -- a float window after the keys (k_window, v_window): the decode kernel's extra chunks ---------


def window_record(spec, k_window, v_window, **fields):
    return record(spec)._replace(k_window=k_window, v_window=v_window, **fields)


@pytest.mark.parametrize("kq, vq", [(True, True), (True, False), (False, True), (False, False)])
def test_records_with_window_build_the_record_with_its_start_and_window(kq, vq):
    """The decode step's record over a cache with a float window, built in one go per call, is
    the call's own record with the operands' storage, ``start`` and the window put in."""
    q, k, v = make_qkv(1, 4, 2, 1, 40, 16)
    qk, qv = selfattn.quantize_kv(k[:, :, :30], bits=8), selfattn.quantize_kv(v[:, :, :30], bits=4)
    kk, vv = qk if kq else k[:, :, :30], qv if vq else v[:, :, :30]
    spec = validate(q, k[:, :, :30], v[:, :, :30], causal=True)
    make = records_with_window(spec, kk, vv)
    kw, vw = k[:, :, 30:], v[:, :, 30:]
    got = make(kk, vv, kw, vw, 39)
    want = record(spec, None, kk, vv)._replace(start=39, k_window=kw, v_window=vw)
    assert type(got) is NativeCall and len(got) == len(FIELDS)
    for name, a, b in zip(FIELDS, got, want):
        assert a is b or a == b, name


@pytest.mark.parametrize("nq, w", [(1, 5), (3, 1), (4, 9)])
def test_a_float_window_is_read_as_the_last_keys_of_the_call(nq, w):
    """The window's keys sit after the others: the call equals one over the concatenation,
    causal included where the window is shorter than the rows (rows see part of the keys
    before it)."""
    q, k, v = make_qkv(1, 4, 2, nq, 40, 16)
    m = 40 - w
    for causal in (False, True):
        spec = validate(q, k[:, :, :m], v[:, :, :m], causal=causal)
        call = window_record(spec, k[:, :, m:], v[:, :, m:], start=40 - nq)
        out, lse = EXT.forward(q, k[:, :, :m], v[:, :, :m], call, True, False)
        want, want_lse = selfattn.attention(q, k, v, causal=causal, return_lse=True)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_a_float_window_is_refused_where_the_decode_kernel_cannot_read_it():
    """Only a decode-sized forward without per-key rules takes a window; anything else is a
    ValueError naming it, before any work."""
    q, k, v = make_qkv(1, 4, 2, 1, 40, 16)
    kk, vv, kw, vw = k[:, :, :30], v[:, :, :30], k[:, :, 30:], v[:, :, 30:]
    spec = validate(q, kk, vv)
    with pytest.raises(ValueError, match="k_window and v_window go together"):
        EXT.forward(q, kk, vv, window_record(spec, kw, None), True, False)
    with pytest.raises(ValueError, match=r"must be CPU tensors \(B, Hkv, Nw, D\)"):
        EXT.forward(q, kk, vv, window_record(spec, kw[..., :8], vw), True, False)
    with pytest.raises(ValueError, match=r"must be CPU tensors \(B, Hkv, Nw, D\)"):
        EXT.forward(q, kk, vv, window_record(spec, kw.double(), vw.double()), True, False)
    mask = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    with pytest.raises(ValueError, match="read by the decode kernel only"):
        EXT.forward(q, kk, vv, window_record(spec, kw, vw, mask=mask), True, False)
    q5 = make_qkv(1, 4, 2, 5, 40, 16)[0]
    with pytest.raises(ValueError, match="read by the decode kernel only"):
        EXT.forward(q5, kk, vv, window_record(validate(q5, kk, vv), kw, vw), True, False)
    lse = torch.zeros(1, 4, 1)
    with pytest.raises(ValueError, match="only the forward reads a float window"):
        EXT.probabilities(q, kk, lse, window_record(spec, kw, vw))
