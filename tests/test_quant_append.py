"""Quantizing on append (issue 18): a decode step's token, or a float window's oldest tokens as
they leave it, were quantized by ``quantize_kv``'s torch operations, some twenty per tensor and
fifty with rotation, each costing more than its arithmetic at one token (~65 us for int8 keys
of one SmolLM2 layer, ~190 rotated 4-bit, twice per layer per step). Where this process has the
native engine loaded, a few tokens (and any number of rotated ones) take one call of
csrc/quantize.h instead, which must give the same codes and scales, bit for bit; a non-finite
value is left to torch's rules.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import gen
from selfattn import quant, quantize_kv
from selfattn.backends.native import build
from selfattn.integrations import kv_store

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(build.unavailable() is not None, reason="native engine not available"),
]


def torch_path(monkeypatch, x, **kw):
    """What quantize_kv gives with the native call switched off."""
    with monkeypatch.context() as m:
        m.setattr(quant, "native_quantize", lambda *a: None)
        return quantize_kv(x, **kw)


def inputs(shape, dtype, seed):
    g = gen(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = x * torch.rand(*shape[:-1], 1, generator=g, dtype=torch.float64).mul(30).exp()
    x[..., 0, 1] *= 50.0  # an outlier channel
    if shape[-1] >= 8:
        x[0, 0, 0, :8] = torch.arange(8, dtype=torch.float64) * 0.5 - 2  # half steps: ties
        x[0, 0, -1] = 0.0  # a group of zeros: scale 0, codes 0
    return x.to(dtype)


CASES = list(
    itertools.product(
        [torch.float32, torch.float64],
        [(8, None), (8, 16), (4, None), (4, 2), (4, 3)],
        [False, True],
        [(1, 3, 1, 64), (2, 3, 5, 64), (1, 2, 33, 96), (1, 1, 7, 6), (1, 3, 300, 64)],
    )
)


@pytest.mark.parametrize("dtype, bits_group, rotate, shape", CASES, ids=str)
def test_a_few_tokens_quantize_in_one_native_call_bit_for_bit(
    monkeypatch, dtype, bits_group, rotate, shape
):
    bits, group = bits_group
    if group is not None and shape[-1] % group:
        pytest.skip("the group must divide D")
    build.load()
    x = inputs(shape, dtype, seed=shape[2])
    calls = []
    real = quant.native_quantize
    monkeypatch.setattr(quant, "native_quantize", lambda *a: calls.append(1) or real(*a))
    got = quantize_kv(x, bits=bits, group_size=group, rotate=rotate)
    # a few tokens, or rotated ones: one native call (more plain tokens: torch is as fast)
    assert bool(calls) == (shape[2] <= quant.NATIVE_TOKENS or rotate)
    want = torch_path(monkeypatch, x, bits=bits, group_size=group, rotate=rotate)
    assert torch.equal(got.codes, want.codes) and got.codes.dtype == want.codes.dtype
    assert torch.equal(got.scales, want.scales) and got.scales.dtype == torch.float32
    assert (got.bits, got.group_size, got.rotate, got.dtype) == (
        want.bits,
        want.group_size,
        want.rotate,
        want.dtype,
    )


def test_a_strided_view_of_a_window_quantizes_as_its_copy(monkeypatch):
    """The oldest tokens of a float window are a strided view of its buffer."""
    build.load()
    buf = inputs((2, 3, 40, 64), torch.float32, seed=1)
    view = buf[:, :, 3:35]
    got = quantize_kv(view, bits=4, rotate=True)
    want = torch_path(monkeypatch, view.contiguous(), bits=4, rotate=True)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_is_left_to_torchs_rules(monkeypatch, bad):
    build.load()
    x = inputs((1, 2, 3, 8), torch.float32, seed=2)
    x[0, 1, 2, 5] = bad
    assert quant.native_quantize(x, 8, 8, False) is None
    got, want = quantize_kv(x, bits=8), torch_path(monkeypatch, x, bits=8)
    assert torch.equal(got.codes, want.codes)
    assert torch.equal(got.scales.nan_to_num(), want.scales.nan_to_num())


def test_16_bit_inputs_keep_the_torch_path(monkeypatch):
    build.load()
    calls = []
    monkeypatch.setattr(quant, "native_quantize", lambda *a: calls.append(1))
    quantize_kv(torch.randn(1, 2, 1, 8, dtype=torch.bfloat16), bits=8)
    assert calls == []


@pytest.mark.parametrize(
    "bits, rotate, dtype",
    [
        (8, False, torch.float32),
        (4, True, torch.float32),
        (4, False, torch.float64),
        (8, True, torch.float64),
    ],
)
def test_a_cache_codec_appending_step_by_step_stores_quantize_kv_of_everything(
    monkeypatch, bits, rotate, dtype
):
    """A cache layer's codec quantizes a decode step's token with the native call directly (no
    QuantizedKV built and checked at every step): what it stores, a token at a time, a few, and
    a chunk past NATIVE_TOKENS, is quantize_kv of all the tokens at once, bit for bit."""
    build.load()
    steps = (1, 1, 5, 1, quant.NATIVE_TOKENS + 3)
    x = inputs((2, 3, sum(steps), 64), dtype, seed=3)
    codec = kv_store.QuantCodec(bits, rotate, dtype)
    parts = kv_store.empty_like(codec.encode(x[:, :, :0]), sum(steps) + 5)
    calls = []
    real = quant.native_quantize
    monkeypatch.setattr(
        quant, "native_quantize", lambda x, *a: calls.append(x.shape[2]) or real(x, *a)
    )
    at = 0
    for n in steps:
        kv_store.write(parts, codec.encode(x[:, :, at : at + n]), at)
        at += n
    got = codec.view(parts, 0, at)
    assert calls[:4] == [1, 1, 5, 1]  # the decode steps took the one native call
    want = torch_path(monkeypatch, x, bits=bits, rotate=rotate)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert (got.bits, got.group_size, got.rotate, got.dtype) == (
        bits,
        want.group_size,
        rotate,
        dtype,
    )
