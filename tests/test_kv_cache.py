"""KVCache bookkeeping, and cached decoding equal to one full causal pass."""

from __future__ import annotations

import pytest
import torch

from selfattn import KVCache, MultiHeadSelfAttention

pytestmark = pytest.mark.usefixtures("one_thread")


def _kv(b=2, h=3, n=4, d=5, dv=None, dtype=torch.float32):
    return torch.randn(b, h, n, d, dtype=dtype), torch.randn(b, h, n, dv or d, dtype=dtype)


def test_append_returns_views_of_everything_filled():
    cache = KVCache(2, 10, 3, 5, dtype=torch.float32, device="cpu")
    assert len(cache) == 0
    k1, v1 = _kv(n=4)
    ka, va = cache.append(k1, v1)
    assert len(cache) == 4 and ka.shape == (2, 3, 4, 5)
    assert ka.data_ptr() == cache.k.data_ptr()  # a view, no copy
    k2, v2 = _kv(n=1)
    ka, va = cache.append(k2, v2)
    assert len(cache) == 5
    assert torch.equal(ka, torch.cat([k1, k2], 2)) and torch.equal(va, torch.cat([v1, v2], 2))
    assert torch.equal(cache.keys, ka) and torch.equal(cache.values, va)


def test_value_dim_may_differ():
    cache = KVCache(1, 4, 2, 8, value_dim=3)
    k, v = _kv(b=1, h=2, n=2, d=8, dv=3)
    ka, va = cache.append(k, v)
    assert ka.shape == (1, 2, 2, 8) and va.shape == (1, 2, 2, 3)


def test_overflow_raises_before_writing():
    cache = KVCache(2, 6, 3, 5)
    cache.append(*_kv(n=4))
    before_k, before_v = cache.k.clone(), cache.v.clone()
    with pytest.raises(ValueError, match=r"holds 4 tokens, appending 3 would make 7 > max_len=6"):
        cache.append(*_kv(n=3))
    assert len(cache) == 4
    assert torch.equal(cache.k, before_k) and torch.equal(cache.v, before_v)
    cache.append(*_kv(n=2))  # exactly full is fine
    assert len(cache) == 6


def test_reset_and_crop():
    cache = KVCache(2, 6, 3, 5)
    k, v = _kv(n=5)
    cache.append(k, v)
    cache.crop(2)
    assert len(cache) == 2 and torch.equal(cache.keys, k[:, :, :2])
    cache.reset()
    assert len(cache) == 0 and cache.keys.shape == (2, 3, 0, 5)
    k2, v2 = _kv(n=6)
    assert torch.equal(cache.append(k2, v2)[0], k2)
    with pytest.raises(ValueError):
        cache.crop(7)


def test_reorder_follows_beams():
    cache = KVCache(3, 5, 2, 4)
    k, v = _kv(b=3, h=2, n=3, d=4)
    cache.append(k, v)
    cache.reorder(torch.tensor([2, 0, 0]))  # beam search: repeats allowed
    assert torch.equal(cache.keys, k[[2, 0, 0]]) and torch.equal(cache.values, v[[2, 0, 0]])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        cache.reorder(torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=r"\(B,\) = \(3,\)"):
        cache.reorder(torch.tensor([0, 1]))
    with pytest.raises(TypeError):
        cache.reorder(torch.tensor([0.0, 1.0, 2.0]))


def test_append_errors_name_the_shapes():
    cache = KVCache(2, 6, 3, 5)
    with pytest.raises(ValueError, match=r"\(2, 3, n, 5\).*got k \(2, 4, 1, 5\)"):
        cache.append(*_kv(h=4, n=1))
    with pytest.raises(ValueError, match="one n"):
        cache.append(torch.randn(2, 3, 2, 5), torch.randn(2, 3, 1, 5))
    with pytest.raises(TypeError, match="float32"):
        cache.append(*_kv(n=1, dtype=torch.float64))
    with pytest.raises(TypeError):
        cache.append([1], [2])


@pytest.mark.parametrize(
    "args, exc",
    [((0, 4, 2, 8), ValueError), ((1, 4, 2, 8.0), TypeError), ((1, -1, 2, 8), ValueError)],
)
def test_constructor_errors(args, exc):
    with pytest.raises(exc):
        KVCache(*args)
    with pytest.raises(TypeError):
        KVCache(1, 4, 2, 8, dtype=torch.int64)


# -- decoding --------------------------------------------------------------------------------------

DECODE_CASES = {
    "rope_gqa": {"num_kv_heads": 2, "rope": True},
    "rope_mqa_qknorm": {"num_kv_heads": 1, "rope": True, "qk_norm": True},
    "alibi": {"alibi": True},
    "window_rope": {"num_kv_heads": 2, "rope": True, "window": (3, 0)},
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_cached_decoding_equals_full_causal_pass(name):
    torch.manual_seed(0)
    layer = MultiHeadSelfAttention(32, 4, causal=True, dtype=torch.float64, **DECODE_CASES[name])
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        # prefill 5, then one token at a time
        cache = layer.make_cache(2, 13)
        steps = [layer(x[:, :5], cache=cache)]
        steps += [layer(x[:, i : i + 1], cache=cache) for i in range(5, 13)]
        assert len(cache) == 13
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=0)
        # chunked prefill of uneven chunks
        cache.reset()
        chunks = [layer(x[:, a:b], cache=cache) for a, b in ((0, 3), (3, 4), (4, 9), (9, 13))]
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-10, rtol=0)


def test_cached_decoding_with_padding_mask_and_weights():
    """A key-padding mask over all keys (cached + new) and need_weights work through the cache."""
    torch.manual_seed(1)
    layer = MultiHeadSelfAttention(16, 2, causal=True, rope=True, dtype=torch.float64)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, 0:2] = False  # left padding in the second sequence
    with torch.no_grad():
        full, w_full = layer(x, mask=pad, need_weights=True)
        cache = layer.make_cache(2, 7)
        y0, w0 = layer(x[:, :4], mask=pad[:, :4], cache=cache, need_weights=True)
        ys, ws = [y0], []
        for i in range(4, 7):
            y, w = layer(x[:, i : i + 1], mask=pad[:, : i + 1], cache=cache, need_weights=True)
            ys.append(y)
            ws.append(w)
    torch.testing.assert_close(torch.cat(ys, 1)[1, 2:], full[1, 2:], atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cat(ys, 1)[0], full[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(w0, w_full[:, :, :4, :4].float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ws[-1][:, :, 0], w_full[:, :, 6].float(), atol=1e-6, rtol=0)


def test_cache_shape_mismatch_is_reported():
    layer = MultiHeadSelfAttention(16, 4, num_kv_heads=2, causal=True)
    wrong = KVCache(1, 8, 4, 4)  # 4 kv heads, the layer has 2
    with pytest.raises(ValueError, match=r"KVCache\.append"):
        layer(torch.randn(1, 3, 16), cache=wrong)
    with pytest.raises(TypeError, match="KVCache"):
        layer(torch.randn(1, 3, 16), cache=(torch.zeros(1), torch.zeros(1)))
