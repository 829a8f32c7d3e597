"""Input validation, ``UnsupportedInputs``, ``explain()`` and ``available_backends()``.

Every bad input must raise ``ValueError`` (``TypeError`` for a wrong type or dtype) before any
work starts, with a message that names the values that arrived. A valid call that a backend
cannot run raises ``UnsupportedInputs`` (a ``NotImplementedError``) listing the reasons.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import selfattn
from selfattn.backends import BACKENDS, preferred, refusals
from selfattn.spec import validate


def qkv(b=2, hq=4, hkv=2, nq=5, nk=7, d=8, dv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, dv or d, generator=g).to(dtype)
    return q, k, v


def raises(exc, *fragments):
    """pytest.raises that requires every fragment (literal text) in the message."""
    pattern = "".join(f"(?=[\\s\\S]*{re.escape(f)})" for f in fragments)
    return pytest.raises(exc, match=pattern)


# -- shapes, dtypes, devices of q, k, v --------------------------------------------------------


def test_wrong_ndim_names_all_three_shapes():
    q, k, v = qkv()
    with raises(ValueError, "4-D", "q=(2, 5, 8)", "k=(2, 2, 7, 8)", "v=(2, 2, 7, 8)"):
        selfattn.attention(q[:, 0], k, v)
    with raises(ValueError, "v=(2, 2, 1, 7, 8)"):
        selfattn.attention(q, k, v[:, :, None])


def test_mismatched_batch_names_shapes():
    q, k, v = qkv()
    with raises(ValueError, "batch", "q=(2, 4, 5, 8)", "k=(1, 2, 7, 8)", "v=(2, 2, 7, 8)"):
        selfattn.attention(q, k[:1], v)


def test_mismatched_head_dim_names_both():
    q, _, v = qkv()
    k = torch.randn(2, 2, 7, 6)
    with raises(ValueError, "D=8 vs 6", "k=(2, 2, 7, 6)"):
        selfattn.attention(q, k, v)


def test_k_and_v_lengths_differ():
    q, k, v = qkv()
    with raises(ValueError, "Nk", "k=(2, 2, 7, 8)", "v=(2, 2, 6, 8)"):
        selfattn.attention(q, k, v[:, :, :6])
    with raises(ValueError, "Hkv", "v=(2, 1, 7, 8)"):
        selfattn.attention(q, k, v[:, :1])


def test_heads_not_a_multiple():
    q, k, v = qkv(hq=6, hkv=4)
    with raises(ValueError, "Hq=6, Hkv=4"):
        selfattn.attention(q, k, v)


def test_mixed_dtypes_are_named():
    q, k, v = qkv()
    with raises(TypeError, "q=torch.float32", "k=torch.float16", "v=torch.float32"):
        selfattn.attention(q, k.half(), v)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtype(dtype):
    q, k, v = (t.to(dtype) for t in qkv())
    with raises(TypeError, str(dtype)):
        selfattn.attention(q, k, v)


def test_non_tensor_input():
    q, k, v = qkv()
    with raises(TypeError, "q must be a torch.Tensor", "ndarray"):
        selfattn.attention(q.numpy(), k, v)
    with raises(TypeError, "v must be a torch.Tensor", "list"):
        selfattn.attention(q, k, [1.0])


def test_mixed_devices_are_named():
    """The meta device stands in for a second device, so this runs without a GPU."""
    q, k, v = qkv()
    with raises(ValueError, "one device", "q=cpu", "k=meta", "v=cpu"):
        selfattn.attention(q, k.to("meta"), v)


@pytest.mark.gpu
def test_mixed_cuda_and_cpu_devices():
    q, k, v = qkv()
    with raises(ValueError, "cuda", "cpu"):
        selfattn.attention(q.cuda(), k, v)


def test_rule_tensor_on_another_device():
    q, k, v = qkv()
    with raises(ValueError, "mask", "meta"):
        selfattn.attention(q, k, v, mask=torch.ones(5, 7, dtype=torch.bool, device="meta"))
    with raises(ValueError, "bias", "meta"):
        selfattn.attention(q, k, v, bias=torch.zeros(5, 7, device="meta"))


# -- rule arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_non_bool_mask_is_refused(dtype):
    q, k, v = qkv()
    with raises(ValueError, "mask must be bool", str(dtype), "bias="):
        selfattn.attention(q, k, v, mask=torch.ones(5, 7, dtype=dtype))


@pytest.mark.parametrize("shape", [(5, 6), (3, 1, 1), (2, 4, 5, 7, 1), (3, 4, 5, 7)])
def test_mask_not_broadcastable(shape):
    q, k, v = qkv()
    with raises(ValueError, f"mask of shape {shape}", "(2, 4, 5, 7)"):
        selfattn.attention(q, k, v, mask=torch.ones(shape, dtype=torch.bool))


def test_mask_not_a_tensor():
    q, k, v = qkv()
    with raises(TypeError, "mask", "ndarray"):
        selfattn.attention(q, k, v, mask=np.ones((5, 7), dtype=bool))


@pytest.mark.parametrize("shape", [(5, 6), (4, 4, 5, 7), (7,) * 5])
def test_bias_wrong_shape(shape):
    q, k, v = qkv()
    with raises(ValueError, f"bias of shape {shape}", "(2, 4, 5, 7)"):
        selfattn.attention(q, k, v, bias=torch.zeros(shape))


def test_bias_wrong_dtype_or_type():
    q, k, v = qkv()
    with raises(TypeError, "bias", "torch.int64"):
        selfattn.attention(q, k, v, bias=torch.zeros(5, 7, dtype=torch.int64))
    with raises(TypeError, "bias", "torch.bool"):
        selfattn.attention(q, k, v, bias=torch.zeros(5, 7, dtype=torch.bool))
    with raises(TypeError, "bias", "float"):
        selfattn.attention(q, k, v, bias=0.5)


@pytest.mark.parametrize("shape", [(3,), (2, 3), (4, 2), (1, 4, 1), ()])
def test_alibi_wrong_shape(shape):
    q, k, v = qkv()
    with raises(ValueError, "alibi_slopes", "(4,)", "(2, 4)", f"got {shape}"):
        selfattn.attention(q, k, v, alibi_slopes=torch.ones(shape))


def test_alibi_wrong_dtype():
    q, k, v = qkv()
    with raises(TypeError, "alibi_slopes", "torch.int64"):
        selfattn.attention(q, k, v, alibi_slopes=torch.ones(4, dtype=torch.int64))
    with raises(TypeError, "alibi_slopes", "list"):
        selfattn.attention(q, k, v, alibi_slopes=[0.5] * 4)


@pytest.mark.parametrize(
    "window, fragments",
    [
        ((-1, 0), ["left", ">= 0", "-1"]),
        ((3, -2), ["right", "-2"]),
        ((1, 2, 3), ["pair", "(1, 2, 3)"]),
        ((4,), ["pair", "(4,)"]),
        ((2.0, 0), ["left", "2.0"]),
        ((0, 1.5), ["right", "1.5"]),
        ((True, 0), ["left", "True"]),
        (5, ["pair", "5"]),
        ("ab", ["pair", "'ab'"]),
    ],
)
def test_bad_window(window, fragments):
    q, k, v = qkv()
    with raises(ValueError, "window", *fragments):
        selfattn.attention(q, k, v, window=window)


def test_window_accepts_numpy_ints_and_lists():
    q, k, v = qkv()
    a = selfattn.attention(q, k, v, window=[np.int64(2), None], backend="math")
    b = selfattn.attention(q, k, v, window=(2, None), backend="math")
    assert torch.equal(a, b)


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_softcap(softcap):
    q, k, v = qkv()
    with raises(ValueError, "softcap", repr(softcap)):
        selfattn.attention(q, k, v, softcap=softcap)


def test_softcap_wrong_type():
    q, k, v = qkv()
    with raises(TypeError, "softcap", "'2'"):
        selfattn.attention(q, k, v, softcap="2")


def test_segment_ids_single_tensor_needs_nq_equal_nk():
    q, k, v = qkv(nq=5, nk=7)
    with raises(ValueError, "Nq=5, Nk=7", "pair"):
        selfattn.attention(q, k, v, segment_ids=torch.zeros(2, 7, dtype=torch.int64))


def test_segment_ids_wrong_shape():
    q, k, v = qkv(nq=7, nk=7)
    with raises(ValueError, "segment_ids", "(2, 7)", "(2, 6)"):
        selfattn.attention(q, k, v, segment_ids=torch.zeros(2, 6, dtype=torch.int64))
    q, k, v = qkv(nq=5, nk=7)
    ids = (torch.zeros(2, 5, dtype=torch.int64), torch.zeros(1, 7, dtype=torch.int64))
    with raises(ValueError, "kv_ids", "(2, 7)", "(1, 7)"):
        selfattn.attention(q, k, v, segment_ids=ids)
    ids = (torch.zeros(2, 7, dtype=torch.int64), torch.zeros(2, 7, dtype=torch.int64))
    with raises(ValueError, "q_ids", "(2, 5)", "(2, 7)"):
        selfattn.attention(q, k, v, segment_ids=ids)


def test_segment_ids_wrong_dtype_or_arity():
    q, k, v = qkv(nq=7, nk=7)
    with raises(TypeError, "segment_ids", "torch.float32"):
        selfattn.attention(q, k, v, segment_ids=torch.zeros(2, 7))
    with raises(TypeError, "segment_ids", "torch.bool"):
        selfattn.attention(q, k, v, segment_ids=torch.zeros(2, 7, dtype=torch.bool))
    with raises(TypeError, "segment_ids", "ndarray"):
        selfattn.attention(q, k, v, segment_ids=np.zeros((2, 7), dtype=np.int64))
    three = (torch.zeros(2, 7, dtype=torch.int64),) * 3
    with raises(ValueError, "segment_ids", "3 items"):
        selfattn.attention(q, k, v, segment_ids=three)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_scale_not_finite(scale):
    q, k, v = qkv()
    with raises(ValueError, "scale", repr(scale)):
        selfattn.attention(q, k, v, scale=scale)


def test_scale_wrong_type():
    q, k, v = qkv()
    with raises(TypeError, "scale", "'0.5'"):
        selfattn.attention(q, k, v, scale="0.5")
    with raises(TypeError, "scale", "tensor"):
        selfattn.attention(q, k, v, scale=torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("p", [1.5, -0.1, 1.0, float("nan")])
def test_bad_dropout_p(p):
    q, k, v = qkv()
    with raises(ValueError, f"dropout_p={p!r}", "[0, 1)"):
        selfattn.attention(q, k, v, dropout_p=p)


def test_dropout_p_wrong_type():
    q, k, v = qkv()
    with raises(TypeError, "dropout_p", "True"):
        selfattn.attention(q, k, v, dropout_p=True)


def test_flags_must_be_bools():
    q, k, v = qkv()
    with raises(TypeError, "causal", "'yes'"):
        selfattn.attention(q, k, v, causal="yes")
    with raises(TypeError, "return_lse", "1"):
        selfattn.attention(q, k, v, return_lse=1)


def test_unknown_backend_lists_the_choices():
    q, k, v = qkv()
    with raises(ValueError, "'flash'", "auto", "tiled", "math", "reference"):
        selfattn.attention(q, k, v, backend="flash")
    with raises(TypeError, "backend", "int"):
        selfattn.attention(q, k, v, backend=3)


def test_validation_comes_before_backend_refusals():
    """A bad input raises ValueError even when the requested backend would decline the call."""
    q, k, v = qkv()
    with raises(ValueError, "mask must be bool"):
        selfattn.attention(q, k, v, mask=torch.ones(5, 7), backend="sdpa")
    with raises(ValueError, "dropout_p"):
        selfattn.attention(q.requires_grad_(True), k, v, dropout_p=2.0, backend="reference")


# -- before any work ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "tiled", "math", "reference"])
def test_errors_come_before_any_work(backend):
    """A bad last argument on inputs that would take hours: the error must come at once.

    q, k, v are expanded views of (2**20)-long sequences (no memory behind them); any attention
    work would run out of memory (math, reference) or run for hours (tiled). The dropout seed is
    drawn after validation, so torch's RNG state must be untouched too.
    """
    n = 2**20
    q = torch.zeros(1, 1, 1, 64).expand(1, 8, n, 64)
    k = torch.zeros(1, 1, 1, 64).expand(1, 8, n, 64)
    state = torch.get_rng_state()
    with raises(ValueError, "dropout_p=1.5"):
        selfattn.attention(q, k, k, causal=True, dropout_p=1.5, backend=backend)
    with raises(ValueError, "scale", "nan"):
        selfattn.attention(q, k, k, dropout_p=0.5, scale=float("nan"), backend=backend)
    with raises(ValueError, "window"):
        selfattn.attention(q, k, k, dropout_p=0.5, window=(1, -1), backend=backend)
    assert torch.equal(torch.get_rng_state(), state)


# -- UnsupportedInputs --------------------------------------------------------------------------


def test_unsupported_inputs_is_a_not_implemented_error():
    assert issubclass(selfattn.UnsupportedInputs, NotImplementedError)


def test_reference_declines_autograd():
    q, k, v = qkv()
    q.requires_grad_(True)
    with pytest.raises(selfattn.UnsupportedInputs) as info:
        selfattn.attention(q, k, v, backend="reference")
    msg = str(info.value)
    assert "reference" in msg and "autograd" in msg and "B=2, Hq=4, Nq=5" in msg
    assert list(info.value.reasons) == ["reference"]
    with torch.no_grad():  # no autograd wanted: the reference runs
        selfattn.attention(q, k, v, backend="reference")


def test_sdpa_lists_every_reason_it_declines():
    q, k, v = qkv(nq=5, nk=7)
    with pytest.raises(selfattn.UnsupportedInputs) as info:
        selfattn.attention(
            q, k, v, causal=True, mask=torch.ones(5, 7, dtype=torch.bool), return_lse=True,
            backend="sdpa",
        )  # fmt: skip
    msg = str(info.value)
    assert "sdpa" in msg
    assert "mask" in msg
    assert "Nq=5 != Nk=7" in msg
    assert "lse" in msg
    assert len(info.value.reasons["sdpa"]) == 3


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"bias": torch.zeros(5, 7)}, "bias"),
        ({"alibi_slopes": torch.ones(4)}, "alibi_slopes"),
        ({"softcap": 3.0}, "softcap"),
        ({"window": (2, 2)}, "window"),
        ({"segment_ids": (torch.zeros(2, 5).long(), torch.zeros(2, 7).long())}, "segment_ids"),
        ({"dropout_p": 0.1}, "dropout"),
    ],
)
def test_sdpa_declines_each_rule_by_name(kwargs, word):
    q, k, v = qkv()
    with pytest.raises(selfattn.UnsupportedInputs, match=word):
        selfattn.attention(q, k, v, backend="sdpa", **kwargs)
    assert refusals(validate(q, k, v, **kwargs), "sdpa")


def test_engines_never_decline_on_cpu():
    q, k, v = qkv(nq=7, nk=7)
    spec = validate(
        q.requires_grad_(True), k, v, causal=True, window=(3, 1), mask=torch.rand(7, 7) > 0.3,
        bias=torch.randn(4, 7, 7), alibi_slopes=torch.ones(2, 4), softcap=5.0,
        segment_ids=torch.zeros(2, 7, dtype=torch.int64), scale=0.5, dropout_p=0.2,
        return_lse=True,
    )  # fmt: skip
    assert refusals(spec, "math") == []
    assert refusals(spec, "tiled") == []
    assert refusals(spec, "reference") == ["has no autograd (inputs require grad)"]


def test_unavailable_backend_says_why():
    missing = [n for n in BACKENDS if n not in selfattn.available_backends()]
    if not missing:
        pytest.skip("every backend is available on this machine")
    q, k, v = qkv()
    for name in missing:
        with pytest.raises(selfattn.UnsupportedInputs) as info:
            selfattn.attention(q, k, v, backend=name)
        assert name in str(info.value) and info.value.reasons[name][0]


# -- explain() and available_backends() -----------------------------------------------------------


def _picked(text: str) -> str:
    m = re.search(r"picks: (\w+)", text)
    assert m, text
    return m.group(1)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, "sdpa"),
        ({"causal": True}, "sdpa"),
        ({"mask": torch.ones(7, 7, dtype=torch.bool)}, "tiled"),
        ({"return_lse": True}, "tiled"),
        ({"dropout_p": 0.3}, "tiled"),
    ],
)
def test_explain_names_the_chosen_backend_and_auto_runs_it(kwargs, expected):
    """``expected`` is auto's pick without the native engine, which, when built, comes first
    unless its measured rules prefer another backend that accepts the call (``choice.py``)."""
    q, k, v = qkv(nq=7, nk=7)
    text = selfattn.explain(q, k, v, **kwargs)
    declines = expected != "sdpa"
    if "native" in selfattn.available_backends():
        alt = preferred(validate(q, k, v, **kwargs), "native")
        expected = alt[0] if alt else "native"
    assert _picked(text) == expected, text
    for name in ("sdpa", "tiled", "math", "reference"):
        assert name in text
    if declines:
        assert re.search(r"sdpa: declines - .+", text), text
    # `auto` really runs the backend explain() names: the same bits.
    torch.manual_seed(0)
    got = selfattn.attention(q, k, v, **kwargs)
    torch.manual_seed(0)
    want = selfattn.attention(q, k, v, backend=expected, **kwargs)
    got, want = (got[0], want[0]) if kwargs.get("return_lse") else (got, want)
    assert torch.equal(got, want)


def test_explain_for_a_named_backend_that_declines():
    q, k, v = qkv()
    text = selfattn.explain(q.requires_grad_(True), k, v, backend="reference")
    assert "nothing" in text and "autograd" in text


def test_explain_validates_its_input():
    q, k, v = qkv()
    with raises(ValueError, "dropout_p=1.5"):
        selfattn.explain(q, k, v, dropout_p=1.5)
    with raises(ValueError, "'nope'"):
        selfattn.explain(q, k, v, backend="nope")


def test_available_backends():
    names = selfattn.available_backends()
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    assert {"reference", "math", "tiled", "sdpa"} <= set(names)
    assert set(names) <= set(BACKENDS)
    q, k, v = qkv()
    want = selfattn.attention(q, k, v, backend="reference")
    for name in names:
        try:
            got = selfattn.attention(q, k, v, backend=name)
        except selfattn.UnsupportedInputs as exc:
            # "available" means it runs on this machine for some input (triton: CUDA tensors)
            assert name not in ("reference", "math", "tiled", "sdpa"), name
            assert exc.reasons[name], name
            continue
        assert (got - want).abs().max() < 1e-5, name


# -- attention_weights arguments -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, fragments",
    [
        ({"heads": [0, 4]}, ValueError, ["heads", "out of range", "4"]),
        ({"heads": [-5]}, ValueError, ["heads", "-5"]),
        ({"heads": 7}, ValueError, ["heads", "7"]),
        ({"heads": [0.5, 1.0]}, TypeError, ["heads", "integer"]),
        ({"heads": [True, False]}, TypeError, ["heads", "torch.bool"]),
        ({"heads": "ab"}, TypeError, ["heads", "'ab'"]),
        ({"rows": [5]}, ValueError, ["rows", "out of range", "5"]),
        ({"rows": [[0, 1], [9, 2]]}, ValueError, ["rows", "1-D", "(2, 2)"]),
        ({"rows": [1.0]}, TypeError, ["rows", "integer"]),
        ({"lse": torch.zeros(2, 4, 4)}, ValueError, ["lse", "(2, 4, 5)", "(2, 4, 4)"]),
        ({"lse": torch.zeros(2, 4)}, ValueError, ["lse", "(2, 4, 5)", "(2, 4)"]),
        ({"lse": np.zeros((2, 4, 5))}, TypeError, ["lse", "ndarray"]),
        ({"lse": torch.zeros(2, 4, 5, device="meta")}, ValueError, ["lse", "meta"]),
        ({"mask": torch.ones(5, 7)}, ValueError, ["mask must be bool"]),
        ({"window": (0, -3)}, ValueError, ["window", "-3"]),
    ],
)
def test_attention_weights_bad_arguments(kwargs, exc, fragments):
    q, k, _ = qkv()
    with raises(exc, *fragments):
        selfattn.attention_weights(q, k, **kwargs)


def test_attention_weights_validates_q_and_k():
    q, k, _ = qkv(hq=6, hkv=4)
    with raises(ValueError, "Hq=6, Hkv=4"):
        selfattn.attention_weights(q, k)
    q, k, _ = qkv()
    with raises(TypeError, "q=torch.float32", "k=torch.float64"):
        selfattn.attention_weights(q, k.double())
