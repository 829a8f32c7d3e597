"""The front door's fast path for plain calls (``api.plain_call``): the same spec, the same
backend and bit for bit the same result as the full path wherever it runs, and it declines (the
full path runs, with its errors) everything else. Issue 16: a decode step over 40-64 keys
through ``auto`` must cost no more than torch's SDPA, so validation and dispatch must be cheap.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import fields

import numpy as np
import pytest
import torch

import selfattn
import selfattn.integrations.transformers as sa_hf
from helpers import make_qkv
from selfattn import api, backends
from selfattn.backends import BACKENDS, CHOICES, select
from selfattn.quant import quantize_kv
from selfattn.spec import validate

pytestmark = pytest.mark.usefixtures("one_thread")

CPU_BACKENDS = [n for n in selfattn.available_backends() if n != "triton"]
# (B, Hq, Hkv, Nq, Nk, D, Dv): decode steps (GQA and not), a prefill, Nq > Nk, empty calls
SHAPES = [
    (1, 9, 3, 1, 48, 64, 64),
    (2, 4, 4, 1, 40, 16, 16),
    (1, 4, 2, 7, 7, 8, 8),
    (2, 6, 2, 5, 9, 8, 12),
    (1, 2, 2, 6, 3, 8, 8),
    (1, 2, 1, 1, 0, 8, 8),
]
PLAIN = [  # (causal, scale, return_lse): every rule combination the fast path takes
    (c, s, r) for c in (False, True) for s in (None, 0.3) for r in (False, True)
]


def spy_plain(monkeypatch) -> list:
    """Record which calls reach the fast path (and what it answered)."""
    real, seen = api.plain_call, []

    def spy(*args):
        got = real(*args)
        seen.append(got is not None)
        return got

    monkeypatch.setattr(api, "plain_call", spy)
    return seen


def full_path(q, k, v, causal, scale, return_lse, backend):
    """What ``attention`` did before the fast path: validate, select, run."""
    spec = validate(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
    out, lse = select(spec, backend).run(spec, q, k, v, None)
    return (out, lse) if return_lse else out


def same_spec(a, b) -> None:
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x == y and type(x) is type(y), f"{f.name}: {x!r} != {y!r}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_plain_spec_is_the_spec_validate_builds(shape, dtype):
    q, k, v = make_qkv(*shape, dtype=dtype)
    for causal, scale, return_lse in PLAIN:
        want = validate(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        same_spec(api.plain_spec(q, k, v, causal, scale, return_lse), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_path_gives_the_full_paths_result_bit_for_bit(monkeypatch, backend, shape, dtype):
    seen = spy_plain(monkeypatch)
    q, k, v = make_qkv(*shape, dtype=dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # any strides, as a model hands them over
    for causal, scale, return_lse in PLAIN:
        spec = validate(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        if backends.refusals(spec, backend if backend != "auto" else "reference"):
            continue  # sdpa declines lse and top-left causality; the fast path raises the same
        for _ in range(2):  # the second time from the remembered choice (auto)
            got = selfattn.attention(
                q, k, v, causal=causal, scale=scale, return_lse=return_lse, backend=backend
            )
            want = full_path(q, k, v, causal, scale, return_lse, backend)
            for a, b in zip(got, want) if return_lse else [(got, want)]:
                assert torch.equal(a, b) and a.dtype == b.dtype
            assert seen.pop() is True


def test_auto_remembers_the_choice_select_makes_per_shape():
    decode = make_qkv(1, 9, 3, 1, 48, 64)
    prefill = make_qkv(1, 8, 8, 16, 16, 64)  # below native's measured small-call size
    for q, k, v in (decode, prefill):
        selfattn.attention(q, k, v, causal=True)
        (spec, chosen, _), *_ = [x for key, x in CHOICES.items() if key[1] == q.shape]
        same_spec(spec, validate(q, k, v, causal=True))
        assert chosen is select(validate(q, k, v, causal=True), "auto")
    assert len(CHOICES) == 2


def test_a_named_backend_is_remembered_only_where_it_accepts_the_call():
    q, k, v = make_qkv(1, 4, 2, 1, 40, 16)
    selfattn.attention(q, k, v, causal=True, backend="sdpa")
    assert [key[0] for key in CHOICES] == ["sdpa"]
    for _ in range(2):  # refused each time, with select's message; nothing remembered
        with pytest.raises(selfattn.UnsupportedInputs, match="does not return the lse"):
            selfattn.attention(q, k, v, causal=True, return_lse=True, backend="sdpa")
    assert len(CHOICES) == 1


def test_register_forgets_the_remembered_choices(monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 1, 40, 16)
    selfattn.attention(q, k, v, causal=True)
    assert CHOICES
    first = backends.candidates(q.device)[0]
    monkeypatch.setitem(BACKENDS, first, BACKENDS[first])  # restored afterwards
    calls = []

    class Spy:
        name = first

        def unavailable(self):
            return None

        def check(self, spec):
            return []

        def run(self, spec, q, k, v, seed):
            calls.append(spec)
            return BACKENDS["reference"].run(spec, q, k, v, seed)

    backends.register(Spy())
    assert not CHOICES
    selfattn.attention(q, k, v, causal=True)
    assert len(calls) == 1  # the new backend runs it, not the remembered one


def test_remembered_choices_are_bounded():
    for nk in range(1, api.CHOICES_KEPT + 10):  # one new shape per decode step
        q, k, v = make_qkv(1, 2, 1, 1, nk, 4)
        selfattn.attention(q, k, v, causal=True)
        assert 0 < len(CHOICES) <= api.CHOICES_KEPT


# a value for each keyword of attention that the fast path must hand to the full path
NOT_PLAIN = {
    "window": (2, 0),
    "mask": torch.ones(1, 1, 1, 5, dtype=torch.bool),
    "bias": torch.zeros(1, 1, 1, 5),
    "alibi_slopes": torch.ones(2),
    "softcap": 5.0,
    "segment_ids": (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)),
    "dropout_p": 0.25,
    "sinks": torch.zeros(2),
}
TAKEN = ("causal", "scale", "return_lse", "backend")  # what the fast path reads itself


def test_every_keyword_of_attention_is_either_taken_or_declined():
    """A new keyword of ``attention`` (a new rule) must be added to the fast path's conditions
    (and here): a fast path that ignored it would give a wrong result."""
    params = inspect.signature(selfattn.attention).parameters
    keywords = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
    assert sorted(keywords) == sorted([*TAKEN, *NOT_PLAIN])


@pytest.mark.parametrize("keyword", sorted(NOT_PLAIN))
def test_a_call_with_another_rule_takes_the_full_path(monkeypatch, keyword):
    seen = spy_plain(monkeypatch)
    q, k, v = make_qkv(1, 2, 1, 1, 5, 8)
    value = NOT_PLAIN[keyword]
    got = selfattn.attention(q, k, v, causal=True, **{keyword: value})
    assert seen == []
    if keyword != "dropout_p":  # dropout draws a seed: the same seed gives the same mask
        assert torch.equal(got, full_path_with(q, k, v, causal=True, **{keyword: value}))


def full_path_with(q, k, v, **rules):
    spec = validate(q, k, v, **rules)
    return select(spec, "auto").run(spec, q, k, v, None)[0]


def declined_cases():
    q, k, v = make_qkv(1, 2, 1, 1, 5, 8)
    yield "a Parameter", (torch.nn.Parameter(q, requires_grad=False), k, v), {}
    yield "a gradient to record", (q.clone().requires_grad_(), k, v), {}
    yield "causal=1", (q, k, v), {"causal": 1}
    yield "return_lse=1", (q, k, v), {"return_lse": 1}
    yield "an int scale", (q, k, v), {"scale": 1}
    yield "a numpy scale", (q, k, v), {"scale": np.float32(0.5)}
    yield "an unknown backend", (q, k, v), {"backend": "nope"}
    yield "a backend that is not a str", (q, k, v), {"backend": None}
    yield "an int dropout_p", (q, k, v), {"dropout_p": 0}
    yield "a quantized k", (q, quantize_kv(k, bits=8), v), {}


@pytest.mark.parametrize("case", list(declined_cases()), ids=lambda c: c[0])
def test_the_fast_path_declines_what_it_does_not_check(monkeypatch, case):
    """These reach the full path (which runs them, or raises its own error)."""
    _, args, kwargs = case
    seen = spy_plain(monkeypatch)
    with contextlib.suppress(TypeError, ValueError):  # the full path's error for causal=1 etc.
        selfattn.attention(*args, **kwargs)
    assert seen in ([], [False])


@pytest.mark.parametrize(
    "scale", [float("nan"), float("inf"), 1e39], ids=["nan", "inf", "beyond-float32"]
)
def test_a_scale_the_full_path_refuses_still_raises_its_error(scale):
    q, k, v = make_qkv(1, 2, 1, 1, 5, 8)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        selfattn.attention(q, k, v, scale=scale)


def test_a_bad_backend_name_is_reported_before_bad_shapes():
    q, k, v = make_qkv(1, 2, 1, 1, 5, 8)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        selfattn.attention(q[0], k, v, backend="nope")
    with pytest.raises(ValueError, match="4-D"):
        selfattn.attention(q[0], k, v)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize(
    "causal, nq, nk, window",
    [
        (True, 1, 9, None),  # a decode step
        (True, 6, 6, None),  # a first prefill
        (False, 6, 9, None),  # an encoder
        (True, 4, 9, None),  # a prefill into an empty static cache: keys are cut
        (True, 1, 9, 4),  # a sliding layer past its window
        (True, 1, 9, 16),  # a sliding layer within its window
    ],
)
def test_hf_adapter_fast_branch_equals_call_rules(causal, nq, nk, window, dropout):
    """Without a mask ``attention_forward`` skips ``call_rules``; where it does, the result is
    that of the rules ``call_rules`` gives, bit for bit."""

    class Module(torch.nn.Module):
        is_causal = causal

    q, k, v = make_qkv(1, 6, 2, nq, nk, 8)
    mod = Module()
    kw = {"scaling": 0.3, "sliding_window": window, "dropout": dropout}
    torch.manual_seed(0)
    got, weights = sa_hf.attention_forward(mod, q, k, v, None, **kw)
    key, value, rules = sa_hf.call_rules(
        mod, q, k, v, None, is_causal=None, sliding_window=window, scaling=0.3
    )
    torch.manual_seed(0)
    want = selfattn.attention(q, key, value, **rules, dropout_p=dropout).transpose(1, 2)
    assert weights is None and got.is_contiguous()
    assert torch.equal(got, want)


def test_a_forward_mode_tangent_takes_the_full_path(monkeypatch):
    """A dual q (forward_ad) must reach the full path, which marks the tangent so that only a
    backend with a JVP rule runs it: the output's tangent carries the attention term."""
    from torch.autograd import forward_ad

    seen = spy_plain(monkeypatch)
    q, k, v = make_qkv(1, 4, 2, 1, 9, 8, dtype=torch.float64)
    t = torch.randn_like(q)
    with forward_ad.dual_level():
        out = selfattn.attention(forward_ad.make_dual(q, t), k, v, causal=True)
        tangent = forward_ad.unpack_dual(out).tangent
    assert seen == [False]
    eps = 1e-6
    plus = selfattn.attention(q + eps * t, k, v, causal=True)
    minus = selfattn.attention(q - eps * t, k, v, causal=True)
    torch.testing.assert_close(tangent, (plus - minus) / (2 * eps), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("nq, nk", [(1, 1), (1, 9), (3, 9), (9, 9), (9, 3), (4, 4), (2, 1)])
@pytest.mark.parametrize("shift", [0, -1, 1, 5])
def test_sdpa_takes_a_causal_call_exactly_where_nothing_is_hidden_or_it_is_square(nq, nk, shift):
    """sdpa's causal test without ``rules.bounds`` (the small-call path) accepts the calls the
    bounds accept: every row sees every key, or a square call from position 0 (torch's
    top-left causality); rows elsewhere (a ring block's ``start``) are declined."""
    from dataclasses import replace

    from selfattn.rules import bounds

    q, k, v = make_qkv(1, 2, 2, nq, nk, 8)
    spec = validate(q, k, v, causal=True)
    spec = replace(spec, start=spec.start + shift)
    _, _, full_lo, full_hi = bounds(spec, 0, nq)
    everything = full_lo == 0 and full_hi == nk
    expect = everything or (nq == nk and spec.start == 0)
    assert (backends.refusals(spec, "sdpa") == []) == expect
    if expect:
        got = BACKENDS["sdpa"].run(spec, q, k, v, None)[0]
        want = BACKENDS["math"].run(spec, q, k, v, None)[0]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_sdpa_keeps_nan_in_hidden_value_rows_away_from_causal_rows():
    """The cheaper finiteness test before a causal SDPA call still finds NaN and inf."""
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8)
    for bad in (float("nan"), float("inf")):
        v2 = v.clone()
        v2[0, 0, 5, 0] = bad  # only row 5 sees key 5
        out = selfattn.attention(q, k, v2, causal=True, backend="sdpa")
        assert out[0, 0, :5].isfinite().all()


def test_under_torch_func_vmap_the_fast_path_declines(monkeypatch):
    """Inside a torch.func transform the backend's own ``run`` decides how to run (its
    autograd Function's vmap rule): the fast path hands such a call to the full path."""
    seen = spy_plain(monkeypatch)
    q, k, v = (t.reshape(3, 1, *t.shape[1:]) for t in make_qkv(3, 2, 1, 1, 5, 8))
    got = torch.func.vmap(lambda a, b, c: selfattn.attention(a, b, c, causal=True))(q, k, v)
    assert seen and not any(seen)
    for i in range(3):
        want = selfattn.attention(q[i], k[i], v[i], causal=True)
        torch.testing.assert_close(got[i], want, atol=1e-6, rtol=1e-5)
