"""A float residual window: ``ResidualKV`` ([older part | float window]) read exactly by
``attention``, and ``KVCache(bits=..., residual=R)`` keeping its newest tokens in float.

Attention over a ``ResidualKV`` runs one call per part and merges them through their lse; it
must equal attention over the concatenation (``dequantize()``) for every rule, every CPU backend,
decode steps and chunks alike (a chunk longer than the window, one shorter, rows that see
nothing). The cache must hold exactly what quantizing each token once, when it leaves the window,
gives; never more than ``R + FLUSH`` window tokens besides the newest append's; and
``residual=0`` must stay what the quantized cache always was.
"""

from __future__ import annotations

import re

import pytest
import torch

import selfattn
from selfattn import KVCache, quantize_kv
from selfattn.kv_cache import FLUSH
from selfattn.kv_residual import ResidualKV

pytestmark = pytest.mark.usefixtures("one_thread")

B, HQ, HKV, D = 2, 4, 2, 32


def _parts(nq, m, w, seed=0, kbits=4, vbits=8):
    g = torch.Generator().manual_seed(seed)
    nk = m + w
    q = torch.randn(B, HQ, nq, D, generator=g)
    k, v = torch.randn(B, HKV, nk, D, generator=g), torch.randn(B, HKV, nk, D, generator=g)
    kq = quantize_kv(k[:, :, :m], bits=kbits, rotate=True)
    vq = quantize_kv(v[:, :, :m], bits=vbits)
    return q, ResidualKV(kq, k[:, :, m:]), ResidualKV(vq, v[:, :, m:])


def _rules(nq, nk):
    g = torch.Generator().manual_seed(1)
    out = {
        "plain": {},
        "causal": {"causal": True},
        "causal window": {"causal": True, "window": (3, 0)},
        "wide window": {"causal": True, "window": (40, 0)},
        "two-sided window": {"window": (2, 1)},
        "right side only": {"window": (None, 0)},
        "alibi": {"causal": True, "alibi_slopes": selfattn.alibi_slopes(HQ)},
        "softcap": {"causal": True, "softcap": 5.0},
        "mask": {"mask": torch.rand(B, 1, nq, nk, generator=g) > 0.3},
        "bias": {"bias": torch.randn(1, HQ, nq, nk, generator=g)},
        "sinks": {"causal": True, "sinks": torch.randn(HQ, generator=g)},
        "sinks window": {"causal": True, "window": (1, 0), "sinks": torch.randn(HQ, generator=g)},
        "segments": {
            "segment_ids": (
                torch.randint(-1, 2, (B, nq), generator=g),
                torch.randint(0, 2, (B, nk), generator=g),
            )
        },
    }
    if nq == nk:
        out["one segment tensor"] = {"segment_ids": torch.randint(0, 2, (B, nk), generator=g)}
    return out


# (Nq, older tokens, window tokens): decode steps, a chunk inside the window, a chunk longer
# than it (rows with nothing visible in it under causality), one part empty
SHAPES = [(1, 20, 5), (3, 20, 5), (5, 10, 5), (7, 10, 5), (15, 0, 15), (4, 0, 8), (4, 8, 0)]


@pytest.mark.parametrize("backend", ["auto", "math", "tiled", "native"])
@pytest.mark.parametrize("nq, m, w", SHAPES)
def test_attention_over_a_residual_kv_equals_attention_over_its_concatenation(backend, nq, m, w):
    if backend != "auto" and backend not in selfattn.available_backends():
        pytest.skip(f"{backend} is not available here")
    q, k, v = _parts(nq, m, w)
    kd, vd = k.dequantize(), v.dequantize()
    for name, rules in _rules(nq, m + w).items():
        out, lse = selfattn.attention(q, k, v, return_lse=True, backend=backend, **rules)
        ref, ref_lse = selfattn.attention(q, kd, vd, return_lse=True, backend="math", **rules)
        assert torch.equal(lse.isinf(), ref_lse.isinf()), name
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5, msg=name)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5, msg=name)


def test_a_residual_kv_beside_a_tensor_is_split_at_the_same_token():
    q, k, v = _parts(3, 12, 6)
    vd = v.dequantize()
    out = selfattn.attention(q, k, vd, causal=True)
    ref = selfattn.attention(q, k.dequantize(), vd, causal=True, backend="math")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_residual_kv_split_at_different_tokens_is_refused():
    q, k, _ = _parts(1, 12, 6)
    _, _, v = _parts(1, 10, 8)
    with pytest.raises(ValueError, match=r"split at different tokens \(\[10, 12\]\)"):
        selfattn.attention(q, k, v)


def test_residual_kv_call_is_validated_over_the_full_shapes_first():
    q, k, v = _parts(1, 12, 6)
    with pytest.raises(ValueError, match=r"mask"):
        selfattn.attention(q, k, v, mask=torch.ones(1, 1, 1, 17, dtype=torch.bool))


def test_residual_kv_gradients_reach_the_window_as_through_the_concatenation():
    q, k, v = _parts(3, 10, 6)
    kw = k.window.clone().requires_grad_(True)
    qg = q.clone().requires_grad_(True)
    out = selfattn.attention(qg, ResidualKV(k.head, kw), v, causal=True, backend="tiled")
    out.square().sum().backward()
    kw2 = k.window.clone().requires_grad_(True)
    qg2 = q.clone().requires_grad_(True)
    kd = torch.cat([k.head.dequantize(), kw2], 2)
    ref = selfattn.attention(qg2, kd, v.dequantize(), causal=True, backend="math")
    ref.square().sum().backward()
    torch.testing.assert_close(kw.grad, kw2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qg.grad, qg2.grad, atol=1e-4, rtol=1e-4)


def test_residual_kv_narrow_shape_and_bytes():
    _, k, _ = _parts(1, 12, 6)
    assert k.shape == (B, HKV, 18, D) and k.split == 12 and k.dim() == 4
    assert k.nbytes == k.head.nbytes + k.window.numel() * 4
    full = k.dequantize()
    for start, length in [(0, 18), (0, 12), (3, 5), (12, 6), (10, 4), (14, 0)]:
        part = k.narrow(start, length)
        got = part.dequantize() if hasattr(part, "dequantize") else part
        torch.testing.assert_close(got, full[:, :, start : start + length])
    with pytest.raises(ValueError, match=r"narrow\(10, 9\)"):
        k.narrow(10, 9)


def test_residual_kv_refuses_parts_that_do_not_fit():
    _, k, _ = _parts(1, 12, 6)
    with pytest.raises(ValueError, match="must agree in B, Hkv and D"):
        ResidualKV(k.head, k.window[:, :1])
    with pytest.raises(TypeError, match="window must be a float tensor"):
        ResidualKV(k.head, k.window.long())
    with pytest.raises(ValueError, match="one dtype and device"):
        ResidualKV(k.head, k.window.double())


# -- KVCache(residual=R) ----------------------------------------------------------------------


def _steps():
    """Append sizes: a prompt, decode steps across several flushes, a chunk, more steps."""
    return [7, 1, 1, 50] + [1] * 70 + [3, 1]


@pytest.mark.parametrize("bits, rotate", [(4, True), (8, False), ((8, None), False)])
@pytest.mark.parametrize("residual", [1, 5, 40])
def test_kv_cache_window_holds_the_newest_tokens_and_quantizes_each_once(bits, rotate, residual):
    kbits, vbits = selfattn.quant.kv_bits(bits)
    cache = KVCache(B, 200, HKV, D, bits=bits, rotate=rotate, residual=residual)
    ks, vs = [], []
    g = torch.Generator().manual_seed(0)
    for n in _steps():
        k, v = torch.randn(B, HKV, n, D, generator=g), torch.randn(B, HKV, n, D, generator=g)
        ks.append(k)
        vs.append(v)
        kall, vall = cache.append(k, v)
        full_k, full_v = torch.cat(ks, 2), torch.cat(vs, 2)
        m = kall.split
        assert isinstance(kall, ResidualKV) and vall.split == m and len(cache) == full_k.shape[2]
        # the window: the newest tokens as written, never more than residual + FLUSH + n
        assert torch.equal(kall.window, full_k[:, :, m:]) and torch.equal(
            vall.window, full_v[:, :, m:]
        )
        assert cache.window_len == kall.window.shape[2] <= residual + FLUSH + n
        assert m == 0 or cache.window_len >= residual  # flushes keep the newest residual
        # the older part: each token quantized on its own (as quantizing them all at once)
        for got, x, b in ((kall.head, full_k, kbits), (vall.head, full_v, vbits)):
            if b is None:
                assert torch.equal(got, x[:, :, :m])
            else:
                want = quantize_kv(x[:, :, :m], bits=b, rotate=rotate)
                assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)


def test_kv_cache_residual_zero_is_the_quantized_cache_as_it_was():
    """residual=0 (the default): append returns QuantizedKV views of every token, quantized at
    once, with the storage (and bytes) of before; no window is allocated."""
    g = torch.Generator().manual_seed(0)
    a = KVCache(B, 40, HKV, D, bits=4, rotate=True)
    b = KVCache(B, 40, HKV, D, bits=4, rotate=True, residual=0)
    ks = []
    for n in (5, 1, 1, 9):
        k, v = torch.randn(B, HKV, n, D, generator=g), torch.randn(B, HKV, n, D, generator=g)
        ks.append(k)
        for cache in (a, b):
            kall, _ = cache.append(k, v)
            want = quantize_kv(torch.cat(ks, 2), bits=4, rotate=True)
            assert type(kall) is selfattn.QuantizedKV
            assert torch.equal(kall.codes, want.codes) and torch.equal(kall.scales, want.scales)
    assert a.nbytes == b.nbytes and b.k_window is None and b.window_len == 0
    assert a.residual == 0 and "residual" not in repr(a)


def test_kv_cache_nbytes_include_the_float_window():
    plain = KVCache(1, 100, 2, 16, bits=8)
    windowed = KVCache(1, 100, 2, 16, bits=8, residual=10)
    # the window's two float32 buffers: (residual + FLUSH) tokens x 2 heads x 16 x 4 bytes each
    assert windowed.nbytes - plain.nbytes == 2 * (10 + FLUSH) * 2 * 16 * 4
    windowed.append(torch.randn(1, 2, 60, 16), torch.randn(1, 2, 60, 16))  # a long chunk
    assert windowed.nbytes - plain.nbytes == 2 * 60 * 2 * 16 * 4  # grown for it
    windowed.append(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert windowed.window_len == 11  # flushed down to residual, then the new token
    assert windowed.nbytes - plain.nbytes == 2 * (10 + FLUSH) * 2 * 16 * 4  # given back


def test_kv_cache_residual_crop_reorder_and_reset():
    g = torch.Generator().manual_seed(3)
    cache = KVCache(3, 100, 2, 8, bits=8, residual=4)
    k, v = torch.randn(3, 2, 50, 8, generator=g), torch.randn(3, 2, 50, 8, generator=g)
    cache.append(k[:, :, :45], v[:, :, :45])
    for i in range(45, 50):
        cache.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
    # the first step flushed all but 4 of the prompt; four more steps since
    assert len(cache) == 50 and cache.window_len == 9
    before = cache.keys.dequantize()
    idx = torch.tensor([2, 0, 0])
    cache.reorder(idx)
    torch.testing.assert_close(cache.keys.dequantize(), before[idx])
    cache.crop(48)  # inside the window
    assert len(cache) == 48 and cache.window_len == 7
    cache.crop(40)  # into the quantized part: the window empties
    assert len(cache) == 40 and cache.window_len == 0
    torch.testing.assert_close(cache.keys.dequantize(), before[idx][:, :, :40])
    cache.reset()
    assert len(cache) == 0 and cache.window_len == 0


def test_layer_with_a_residual_cache_equals_one_full_causal_pass_over_the_same_storage():
    """MultiHeadSelfAttention fed token by token over KVCache(bits=8, residual=3) equals the
    layer over a cache without window whose keys and values were fake-quantized the same way
    (checked through the attention of the cache's own views)."""
    torch.manual_seed(0)
    layer = selfattn.MultiHeadSelfAttention(32, 4, num_kv_heads=2, causal=True, rope=True).eval()
    x = torch.randn(1, 40, 32)
    cache = KVCache(1, 40, 2, 8, bits=8, residual=3)
    with torch.no_grad():
        outs = [layer(x[:, i : i + 1], cache=cache) for i in range(40)]
        full = layer(x)
    got = torch.cat(outs, 1)
    assert isinstance(cache.keys, ResidualKV) and cache.keys.split > 0
    # int8 keys and values: within the quantizer's error of the float pass
    assert (got - full).abs().max() < 0.05


@pytest.mark.parametrize(
    "residual, exc, match",
    [
        (-1, ValueError, "residual must be >= 0, got -1"),
        (1.5, TypeError, r"residual must be an int, got 1\.5"),
        ("8", TypeError, "residual must be an int, got '8'"),
        (True, TypeError, "residual must be an int, got True"),
    ],
)
def test_kv_cache_bad_residual_is_refused_before_any_allocation(residual, exc, match):
    with pytest.raises(exc, match=match):
        KVCache(1, 2**62, 2, 8, bits=8, residual=residual)  # 2**62 tokens: never allocated


def test_kv_cache_residual_needs_bits():
    with pytest.raises(ValueError, match=re.escape("residual=4 keeps the newest tokens")):
        KVCache(1, 8, 2, 8, residual=4)
    KVCache(1, 8, 2, 8, residual=0)  # nothing to delay: fine
