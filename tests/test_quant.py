"""Quantized keys and values: ``quantize_kv``, ``QuantizedKV``, attention on them, ``KVCache(bits)``.

The error bound is checked element by element (|x - dequantized| <= scale / 2, in the rotated
basis when rotated); attention on a ``QuantizedKV`` must equal attention on its ``dequantize()``
for every rule and every CPU backend (``native`` reads the codes in place: test_quant_native.py).
"""

from __future__ import annotations

import re

import pytest
import torch

import selfattn
from helpers import CPU_BACKENDS, MAY_DECLINE, gen
from selfattn import KVCache, MultiHeadSelfAttention, QuantizedKV, quantize_kv
from selfattn.quant import hadamard, pack4, rotate_heads, unpack4

pytestmark = pytest.mark.usefixtures("one_thread")

QMAX = {8: 127, 4: 7}  # the largest code
LOWEST = {8: -127, 4: -8}  # the smallest
FORMATS = [(8, False), (8, True), (4, False), (4, True)]


def _x(shape=(2, 3, 7, 64), dtype=torch.float32, seed=0, outliers=True):
    x = torch.randn(*shape, generator=gen(seed), dtype=torch.float64)
    if outliers:  # a few large channels, as real keys have
        x[..., 3] *= 20.0
    return x.to(dtype)


def _unpacked(qx: QuantizedKV) -> torch.Tensor:
    return qx.codes if qx.bits == 8 else unpack4(qx.codes)


# -- the format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,rotate", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_error_is_at_most_half_a_scale_per_element(bits, rotate, dtype):
    x = _x(dtype=dtype)
    qx = quantize_kv(x, bits=bits, rotate=rotate)
    assert qx.bits == bits and qx.rotate is rotate and qx.dtype == dtype
    assert qx.shape == x.shape and qx.scales.dtype == torch.float32
    g = qx.group_size
    codes = _unpacked(qx)
    assert int(codes.max()) <= QMAX[bits] and int(codes.min()) >= LOWEST[bits]
    # the bound holds in the basis that was rounded: rotated when rotate=True
    ref = x.double()
    if rotate:
        ref = rotate_heads(ref)
    scale = qx.scales.double().repeat_interleave(g, dim=-1)
    approx = codes.double() * scale
    half = scale.abs() / 2
    # up to the float32 rounding of x / scale (a tie may round either way)
    rounding = codes.double().abs() * half * 2**-22
    err = (ref - approx).abs()
    # 4 bits: elements clamped to code 7 (the sign opposite to the group's largest, beyond
    # 7.5 steps) are within one step; nothing else may exceed half a step
    clamped = (codes == 7) & (ref / scale > 7.5) if bits == 4 else torch.zeros_like(err).bool()
    assert bool((err <= torch.where(clamped, 2 * half, half) + rounding + 1e-12).all())
    # the scale: max|x| / 127 of its group at 8 bits; at 4 bits -m / 8 with m the group's
    # element of largest magnitude, signed (float32-rounded), so m is exactly code -8
    grouped = ref.reshape(*ref.shape[:-1], -1, g)
    big = grouped.gather(-1, grouped.abs().argmax(-1, keepdim=True)).squeeze(-1)
    want = grouped.abs().amax(-1) / 127 if bits == 8 else big / -8
    rtol = 1e-5 if rotate else 1e-7  # rotated in float32 there, in float64 here
    torch.testing.assert_close(qx.scales.double(), want.float().double(), rtol=rtol, atol=0)
    # dequantize returns x's dtype, un-rotated: close to x within the bound (rotation is
    # orthonormal, so the error's norm per token is the same in both bases)
    dq = qx.dequantize()
    assert dq.dtype == dtype and dq.shape == x.shape
    err = (dq.double() - x.double()).norm(dim=-1)
    bound = torch.where(clamped, 2 * half, half).norm(dim=-1)
    slack = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    assert bool((err <= bound + slack * x.double().norm(dim=-1) + 1e-12).all())


@pytest.mark.parametrize("rotate", [False, True])
def test_4bit_uses_all_16_codes_with_a_step_of_max_over_8(rotate):
    """4-bit codes span [-8, 7] (the old quantizer stopped at [-7, 7], a step of max|x| / 7):
    the element of largest magnitude is code -8, exact up to float32 rounding, whatever its
    sign, and the squared error is below what a symmetric [-7, 7] grid gives."""
    x = _x(shape=(4, 3, 50, 64), outliers=False)
    x[0] *= -1.0  # largest elements of both signs
    qx = quantize_kv(x, bits=4, rotate=rotate)
    codes = unpack4(qx.codes).reshape(4, 3, 50, 2, 32)
    assert bool((codes.min(-1).values == -8).all())  # every group's largest element is -8
    assert bool((qx.scales > 0).any()) and bool((qx.scales < 0).any())
    y = rotate_heads(x) if rotate else x
    grouped = y.reshape(4, 3, 50, 2, 32)
    big = grouped.gather(-1, grouped.abs().argmax(-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(-8 * qx.scales, big, rtol=1e-6, atol=0)
    err = (qx.dequantize(rotated=True) - y).pow(2).sum()
    old_step = grouped.abs().amax(-1, keepdim=True) / 7
    old = ((grouped / old_step).round().clamp(-7, 7) * old_step - grouped).pow(2).sum()
    assert err < 0.9 * old


def test_default_groups_and_nbytes():
    x = _x(shape=(2, 3, 5, 64))
    q8 = quantize_kv(x)
    assert q8.group_size == 64 and q8.codes.dtype == torch.int8
    assert q8.nbytes == 2 * 3 * 5 * 64 + 2 * 3 * 5 * 1 * 4
    q4 = quantize_kv(x, bits=4)
    assert q4.group_size == 32 and q4.codes.dtype == torch.uint8
    assert q4.codes.shape == (2, 3, 5, 32) and q4.scales.shape == (2, 3, 5, 2)
    assert q4.nbytes == 2 * 3 * 5 * 32 + 2 * 3 * 5 * 2 * 4
    assert quantize_kv(_x(shape=(1, 1, 2, 80)), bits=4).group_size == 16  # gcd(80, 32)
    assert quantize_kv(x, bits=8, group_size=16).scales.shape == (2, 3, 5, 4)


def test_pack4_round_trip_is_exact_for_all_16_codes():
    codes = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(codes, codes).reshape(1, 1, 256, 2)  # every (low, high) pair
    packed = pack4(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 1, 256, 1)
    assert torch.equal(unpack4(packed), pairs)
    # the layout: code + 8, even channel in the low nibble
    assert int(pack4(torch.tensor([[-8, 7]], dtype=torch.int8))[0, 0]) == 0xF0
    assert int(pack4(torch.tensor([[1, -1]], dtype=torch.int8))[0, 0]) == 0x79


def test_hadamard_is_orthonormal_and_its_own_inverse():
    for n in (1, 2, 16, 64, 128):
        h = hadamard(n, torch.float64, "cpu")
        torch.testing.assert_close(h @ h, torch.eye(n, dtype=torch.float64))
        torch.testing.assert_close(h, h.T)
        y = _x(shape=(1, 1, 3, n), dtype=torch.float64, outliers=False)
        torch.testing.assert_close(rotate_heads(y), y @ h)  # the fast transform is H
    x = _x(shape=(1, 2, 3, 96), dtype=torch.float64)  # three blocks of 32
    blocks = torch.block_diag(*[hadamard(32, torch.float64, "cpu")] * 3)
    torch.testing.assert_close(rotate_heads(x), x @ blocks)
    torch.testing.assert_close(rotate_heads(rotate_heads(x)), x)
    torch.testing.assert_close(rotate_heads(x).norm(dim=-1), x.norm(dim=-1))


def test_rotation_spreads_an_outlier_channel():
    """One huge channel: without rotation it sets the scale of its group and the other channels
    round to nearly nothing; rotated, 4-bit error is smaller."""
    x = _x(shape=(1, 4, 64, 64), outliers=False)
    x[..., 5] = 50.0
    plain = (quantize_kv(x, bits=4, group_size=64).dequantize() - x).norm()
    rotated = (quantize_kv(x, bits=4, group_size=64, rotate=True).dequantize() - x).norm()
    assert rotated < plain


def test_zero_and_empty_inputs():
    z = torch.zeros(1, 2, 3, 8)
    qz = quantize_kv(z, bits=4, rotate=True)
    assert torch.equal(qz.dequantize(), z) and bool((qz.scales == 0).all())
    e = quantize_kv(torch.zeros(1, 2, 0, 8))
    assert e.shape == (1, 2, 0, 8) and e.nbytes == 0


def test_appending_never_requantizes_older_tokens():
    x = _x(shape=(2, 2, 9, 32))
    whole = quantize_kv(x, bits=4, rotate=True)
    for i in range(9):
        one = quantize_kv(x[:, :, i : i + 1], bits=4, rotate=True)
        assert torch.equal(one.codes, whole.codes[:, :, i : i + 1])
        assert torch.equal(one.scales, whole.scales[:, :, i : i + 1])


def test_narrow_is_a_view():
    qx = quantize_kv(_x(shape=(1, 2, 6, 16)), bits=4)
    part = qx.narrow(2, 3)
    assert part.shape == (1, 2, 3, 16)
    assert part.codes.data_ptr() == qx.codes[:, :, 2:].data_ptr()
    assert torch.equal(part.dequantize(), qx.dequantize()[:, :, 2:5])
    with pytest.raises(ValueError, match="narrow"):
        qx.narrow(4, 3)


def test_no_gradient_flows_through_quantization():
    x = _x(shape=(1, 1, 2, 8)).requires_grad_(True)
    qx = quantize_kv(x)
    assert not qx.requires_grad and not qx.codes.requires_grad
    assert not qx.dequantize().requires_grad


@pytest.mark.parametrize(
    "x,kwargs,exc,match",
    [
        ("list", {}, TypeError, "torch.Tensor"),
        (torch.zeros(1, 2, 3, 8, dtype=torch.int32), {}, TypeError, "torch.int32"),
        (torch.zeros(2, 3, 8), {}, ValueError, r"\(2, 3, 8\)"),
        (torch.zeros(1, 2, 3, 0), {}, ValueError, "D >= 1"),
        (torch.zeros(1, 2, 3, 8), {"bits": 3}, ValueError, "bits=3"),
        (torch.zeros(1, 2, 3, 8), {"bits": True}, TypeError, "bits"),
        (torch.zeros(1, 2, 3, 8), {"bits": 8.0}, TypeError, "bits"),
        (torch.zeros(1, 2, 3, 48), {"group_size": 32}, ValueError, "group_size=32.*D=48"),
        (torch.zeros(1, 2, 3, 8), {"group_size": 0}, ValueError, "group_size"),
        (torch.zeros(1, 2, 3, 7), {"bits": 4, "group_size": 7}, ValueError, "D=7"),
        (torch.zeros(1, 2, 3, 7), {"rotate": True}, ValueError, "D=7"),
        (torch.zeros(1, 2, 3, 8), {"rotate": 1}, TypeError, "rotate"),
    ],
)
def test_bad_arguments_name_the_values(x, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        quantize_kv(x, **kwargs)


# -- attention on quantized keys and values --------------------------------------------------------

B, HQ, HKV, NQ, NK, D = 2, 4, 2, 5, 11, 32


def _rules(name: str) -> dict:
    g = gen(7)
    if name == "none":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "window":
        return {"window": (3, 1)}
    if name == "mask":
        return {"mask": torch.rand(B, HQ, NQ, NK, generator=g) < 0.7}
    if name == "bias":
        return {"bias": torch.randn(B, HQ, NQ, NK, generator=g)}
    if name == "alibi":
        return {"alibi_slopes": torch.rand(HQ, generator=g) * 0.2}
    if name == "softcap":
        return {"softcap": 2.0}
    if name == "segments":
        ids = torch.tensor([[0] * 6 + [1] * 5, [0] * 3 + [1] * 6 + [-1] * 2])
        return {"segment_ids": (ids[:, -NQ:], ids)}
    if name == "scale":
        return {"scale": 0.3}
    if name == "dropout":
        return {"dropout_p": 0.25}
    raise KeyError(name)


RULE_NAMES = ["none", "causal", "window", "mask", "bias", "alibi", "softcap", "segments", "scale"]


def _qkv(kfmt, vfmt, seed=3):
    g = gen(seed)
    q = torch.randn(B, HQ, NQ, D, generator=g)
    k = torch.randn(B, HKV, NK, D, generator=g)
    v = torch.randn(B, HKV, NK, D, generator=g)
    kq = k if kfmt is None else quantize_kv(k, bits=kfmt[0], rotate=kfmt[1])
    vq = v if vfmt is None else quantize_kv(v, bits=vfmt[0], rotate=vfmt[1])
    return q, kq, vq


def _dense(t):
    return t.dequantize() if isinstance(t, QuantizedKV) else t


@pytest.mark.parametrize("rule", [*RULE_NAMES, "dropout"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", ["k8_v8", "k4rot_v4", "k4rot_only", "v8_only"])
def test_attention_on_quantized_equals_attention_on_dequantized(rule, backend, fmt):
    kfmt, vfmt = {
        "k8_v8": ((8, False), (8, False)),
        "k4rot_v4": ((4, True), (4, False)),
        "k4rot_only": ((4, True), None),
        "v8_only": (None, (8, True)),
    }[fmt]
    q, k, v = _qkv(kfmt, vfmt)
    rules = _rules(rule)
    kd, vd = _dense(k), _dense(v)
    lse = backend != "sdpa"  # sdpa returns no lse
    torch.manual_seed(11)
    try:
        got = selfattn.attention(q, k, v, backend=backend, return_lse=lse, **rules)
    except selfattn.UnsupportedInputs as exc:
        if backend not in MAY_DECLINE:
            raise
        pytest.skip(f"{backend} declines: {exc.reasons.get(backend)}")
    torch.manual_seed(11)
    want = selfattn.attention(q, kd, vd, backend=backend, return_lse=lse, **rules)
    # the same backend on the same values: bitwise equal (auto: native runs the float call;
    # rotated codes: q and the output are rotated instead of keys and values, float32 rounding)
    rotated = "rot" in fmt or fmt == "v8_only"
    exact = {"atol": 0, "rtol": 0}
    if backend in ("auto", "native") or rotated:  # native reads the codes (quant.h)
        exact = {"atol": 2e-6, "rtol": 2e-5}
    torch.testing.assert_close(got, want, **exact)
    if rule != "dropout":  # and native on the dequantized values agrees to float32 rounding
        out = got[0] if lse else got
        torch.testing.assert_close(
            out, selfattn.attention(q, kd, vd, backend="native", **rules), atol=2e-6, rtol=2e-5
        )


def test_native_reads_quantized_and_auto_picks_it():
    q, k, v = _qkv((8, False), (4, True))
    got = selfattn.attention(q, k, v, backend="native")
    torch.testing.assert_close(
        got, selfattn.attention(q, _dense(k), _dense(v)), atol=2e-6, rtol=2e-5
    )
    why = selfattn.explain(q, k, v, causal=True)
    assert "quantized k int8, v int4+rotation" in why
    assert "picks: native" in why


def test_attention_weights_accepts_quantized_keys():
    q, k, _ = _qkv((4, True), None)
    got = selfattn.attention_weights(q, k, causal=True)
    torch.testing.assert_close(got, selfattn.attention_weights(q, k.dequantize(), causal=True))


def test_quantized_dtype_must_match_q():
    q, k, v = _qkv((8, False), (8, False))
    with pytest.raises(TypeError, match="one dtype"):
        selfattn.attention(q.double(), k, v)


@pytest.mark.parametrize("rotate", [False, True])
def test_queries_still_get_gradients_with_quantized_kv(rotate):
    q, k, v = _qkv((8, rotate), (4, rotate))
    q.requires_grad_(True)
    selfattn.attention(q, k, v, causal=True).sum().backward()
    q2 = q.detach().clone().requires_grad_(True)
    selfattn.attention(q2, k.dequantize(), v.dequantize(), causal=True).sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-6, rtol=1e-5)


# -- KVCache(bits) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,rotate", FORMATS)
def test_quantized_cache_appends_views(bits, rotate):
    cache = KVCache(2, 10, 3, 16, dtype=torch.float32, device="cpu", bits=bits, rotate=rotate)
    k1, v1 = _x((2, 3, 4, 16), seed=1), _x((2, 3, 4, 16), seed=2)
    ka, va = cache.append(k1, v1)
    assert isinstance(ka, QuantizedKV) and isinstance(va, QuantizedKV)
    assert ka.shape == (2, 3, 4, 16) and len(cache) == 4 and ka.dtype == torch.float32
    assert ka.codes.data_ptr() == cache.k.codes.data_ptr()  # a view of the storage
    k2, v2 = _x((2, 3, 1, 16), seed=3), _x((2, 3, 1, 16), seed=4)
    ka, va = cache.append(k2, v2)
    want_k = quantize_kv(torch.cat([k1, k2], 2), bits=bits, rotate=rotate)
    want_v = quantize_kv(torch.cat([v1, v2], 2), bits=bits, rotate=rotate)
    assert torch.equal(ka.codes, want_k.codes) and torch.equal(ka.scales, want_k.scales)
    assert torch.equal(va.dequantize(), want_v.dequantize())
    assert torch.equal(cache.keys.codes, ka.codes) and cache.values.shape == (2, 3, 5, 16)
    # storage: codes + scales of max_len tokens, keys and values
    per_token = 16 * bits // 8 + 4 * (16 // ka.group_size)
    assert cache.nbytes == 2 * 2 * 3 * 10 * per_token
    assert ka.nbytes == 2 * 3 * 5 * per_token


def test_quantized_cache_overflow_raises_before_writing():
    cache = KVCache(1, 4, 2, 8, bits=8)
    cache.append(_x((1, 2, 3, 8)), _x((1, 2, 3, 8)))
    before = cache.k.codes.clone(), cache.v.scales.clone()
    with pytest.raises(ValueError, match="holds 3 tokens, appending 2 would make 5 > max_len=4"):
        cache.append(_x((1, 2, 2, 8)), _x((1, 2, 2, 8)))
    assert len(cache) == 3
    assert torch.equal(cache.k.codes, before[0]) and torch.equal(cache.v.scales, before[1])


def test_quantized_cache_reset_crop_reorder():
    cache = KVCache(3, 6, 1, 8, bits=4, rotate=True)
    k, v = _x((3, 1, 5, 8), seed=5), _x((3, 1, 5, 8), seed=6)
    cache.append(k, v)
    full_k = cache.keys.dequantize()
    cache.reorder(torch.tensor([2, 0, 0]))
    assert torch.equal(cache.keys.dequantize(), full_k[[2, 0, 0]])
    cache.crop(2)
    assert len(cache) == 2 and cache.keys.shape == (3, 1, 2, 8)
    cache.reset()
    assert len(cache) == 0 and cache.values.shape == (3, 1, 0, 8)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"bits": 3}, ValueError, "bits=3"),
        ({"bits": "8"}, TypeError, "bits"),
        ({"rotate": True}, ValueError, "needs bits"),
        ({"bits": 8, "rotate": "yes"}, TypeError, "rotate"),
    ],
)
def test_quantized_cache_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        KVCache(1, 4, 2, 8, **kwargs)


def test_quantized_cache_odd_head_dim_for_4_bits():
    with pytest.raises(ValueError, match="D=5"):
        KVCache(1, 4, 2, 5, bits=4)


@pytest.mark.parametrize("kbits,vbits", [(8, 4), (4, 8), (8, None), (None, 4)])
def test_quantized_cache_keys_and_values_of_different_bits(kbits, vbits):
    """bits=(key_bits, value_bits): each side stored as quantize_kv makes it (None: floats), the
    storage counts each side's own bytes, and reorder moves both."""
    cache = KVCache(2, 10, 3, 16, value_dim=32, bits=(kbits, vbits), rotate=True)
    assert (cache.key_bits, cache.value_bits) == (kbits, vbits)
    k1, v1 = _x((2, 3, 4, 16), seed=1), _x((2, 3, 4, 32), seed=2)
    k2, v2 = _x((2, 3, 1, 16), seed=3), _x((2, 3, 1, 32), seed=4)
    cache.append(k1, v1)
    ka, va = cache.append(k2, v2)
    nbytes = 0
    for got, new, b, d in ((ka, (k1, k2), kbits, 16), (va, (v1, v2), vbits, 32)):
        x = torch.cat(new, 2)
        if b is None:
            assert isinstance(got, torch.Tensor) and torch.equal(got, x)
            nbytes += 2 * 3 * 10 * d * 4
            continue
        want = quantize_kv(x, bits=b, rotate=True)
        assert isinstance(got, QuantizedKV) and got.bits == b
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
        nbytes += 2 * 3 * 10 * (d * b // 8 + 4 * (d // want.group_size))
    assert cache.nbytes == nbytes
    q = _x((2, 6, 1, 16), seed=7)
    deq = [t.dequantize() if isinstance(t, QuantizedKV) else t for t in (ka, va)]
    torch.testing.assert_close(
        selfattn.attention(q, ka, va), selfattn.attention(q, *deq), atol=1e-5, rtol=1e-5
    )
    keys = deq[0].clone()
    cache.reorder(torch.tensor([1, 1]))
    got = cache.keys.dequantize() if kbits else cache.keys
    assert torch.equal(got, keys[[1, 1]])


@pytest.mark.parametrize("bits", [(8,), (8, 4, 4), (8, 2), (3, 4), (True, 4), (8, "4"), []])
def test_quantized_cache_bad_bits_pair_names_it(bits):
    with pytest.raises(ValueError, match=re.escape(f"bits={bits!r}")):
        KVCache(1, 4, 2, 8, bits=bits)


def test_quantized_cache_float_pair_is_a_float_cache():
    """bits=(None, None) stores floats, as bits=None, and refuses rotate as bits=None does."""
    cache = KVCache(1, 4, 2, 8, bits=(None, None))
    assert cache.bits is None and isinstance(cache.k, torch.Tensor)
    with pytest.raises(ValueError, match="needs bits"):
        KVCache(1, 4, 2, 8, bits=(None, None), rotate=True)


@pytest.mark.parametrize("bits,rotate", FORMATS)
def test_token_at_a_time_layer_with_quantized_cache_matches_full_pass_on_dequantized(bits, rotate):
    """A GPT-style layer (causal, RoPE, GQA) fed one token at a time over a quantized cache
    gives what one full causal pass gives over the dequantized keys and values."""
    torch.manual_seed(0)
    layer = MultiHeadSelfAttention(64, 4, num_kv_heads=2, causal=True, rope=True)
    layer = layer.to(torch.float64)
    b, n, hq, hkv, d = 2, 9, 4, 2, 16
    x = torch.randn(b, n, 64, dtype=torch.float64)
    with torch.no_grad():
        cache = KVCache(b, n, hkv, d, dtype=torch.float64, device="cpu", bits=bits, rotate=rotate)
        steps = [layer(x[:, :3], cache=cache)]
        steps += [layer(x[:, i : i + 1], cache=cache) for i in range(3, n)]
        got = torch.cat(steps, 1)
        # the full pass, by hand, over dequantized keys and values
        q, k, v = layer.qkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        q = layer.rope(q.view(b, n, hq, d).transpose(1, 2), 0)
        k = layer.rope(k.view(b, n, hkv, d).transpose(1, 2), 0)
        v = v.view(b, n, hkv, d).transpose(1, 2)
        kd = quantize_kv(k, bits=bits, rotate=rotate).dequantize()
        vd = quantize_kv(v, bits=bits, rotate=rotate).dequantize()
        out = selfattn.attention(q, kd, vd, causal=True, backend="math")
        want = layer.out(out.transpose(1, 2).reshape(b, n, hq * d))
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        # and quantization really happened (the float pass differs)
        assert (layer(x) - want).abs().max() > 1e-6


def test_layer_need_weights_through_a_quantized_cache():
    """need_weights passes the cache's QuantizedKV views to attention_weights (via .detach())."""
    torch.manual_seed(2)
    layer = MultiHeadSelfAttention(32, 4, num_kv_heads=2, causal=True, rope=True)
    cache = KVCache(1, 8, 2, 8, bits=4, rotate=True)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        layer(x[:, :3], cache=cache)
        _, w = layer(x[:, 3:], cache=cache, need_weights=True)
        q = layer.qkv(x[:, 3:])[..., :32]
        q = layer.rope(q.view(1, 2, 4, 8).transpose(1, 2), 3)
        want = selfattn.attention_weights(q, cache.keys.dequantize(), causal=True)
    assert w.shape == (1, 4, 2, 5)
    torch.testing.assert_close(w, want)


def test_torch_compile_traces_a_quantized_call():
    q, k, v = _qkv((4, True), (8, False))
    compiled = torch.compile(lambda q: selfattn.attention(q, k, v, causal=True), backend="eager")
    torch.testing.assert_close(compiled(q), selfattn.attention(q, k, v, causal=True))


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("interpret", marks=pytest.mark.interpret),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ],
)
def test_triton_on_quantized_equals_triton_on_dequantized(where, monkeypatch):
    """Under Triton's CPU interpreter, and on a GPU where there is one (quantizing there too)."""
    pytest.importorskip("triton")
    if where == "interpret":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        device = torch.device("cuda")
    q, k, v = (t.to(device) for t in _qkv(None, None, seed=9))
    qk, qv = quantize_kv(k, bits=4, rotate=True), quantize_kv(v, bits=8)
    assert qk.device == device and qk.codes.device == device
    # the same format wherever it is made: dequantized values agree with the CPU's
    cpu = quantize_kv(k.cpu(), bits=4, rotate=True).dequantize()
    torch.testing.assert_close(qk.dequantize().cpu(), cpu, atol=1e-5, rtol=1e-5)
    got = selfattn.attention(q, qk, qv, causal=True, backend="triton")
    want = selfattn.attention(q, qk.dequantize(), qv.dequantize(), causal=True, backend="triton")
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)  # q rotated, not k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_rotated_call_matches_dequantized_in_every_dtype(dtype):
    """Rotating q and the output instead of the keys and values agrees to the dtype's rounding."""
    q, k, v = (t.to(dtype) for t in _qkv(None, None, seed=4))
    qk, qv = quantize_kv(k, bits=4, rotate=True), quantize_kv(v, bits=8, rotate=True)
    for backend in ("math", "tiled", "auto"):
        got, lse = selfattn.attention(q, qk, qv, causal=True, backend=backend, return_lse=True)
        want, want_lse = selfattn.attention(
            q, qk.dequantize(), qv.dequantize(), causal=True, backend="math", return_lse=True
        )
        tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        torch.testing.assert_close(lse, want_lse, atol=tol * 10, rtol=tol)


def test_dequantize_rotated_gives_the_encoded_basis():
    x = _x(shape=(1, 2, 3, 32))
    qx = quantize_kv(x, rotate=True)
    torch.testing.assert_close(rotate_heads(qx.dequantize(rotated=True)), qx.dequantize())
    plain = quantize_kv(x)
    assert torch.equal(plain.dequantize(rotated=True), plain.dequantize())
