"""make_cache(bits=(key_bits, value_bits)): keys and values stored at different widths.

4-bit keys cost most of a 4-bit cache's accuracy, so ``(8, 4)`` keeps int8 keys with 4-bit values.
The layers hold exactly ``quantize_kv`` of what was written, side by side; ``nbytes`` counts each
side's own bytes; SmolLM2 through ``generate()`` gives the logits of transformers'
``DynamicCache`` fed the same quantize-then-dequantize keys and values (which differ from those
of int8 values, so the check sees the values' width).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from transformers.cache_utils import Cache, DynamicLayer

import selfattn
import selfattn.integrations.transformers as sa_hf
from helpers import tiny_llama
from selfattn.integrations.cache import BudgetLayer, GrowingLayer, WindowLayer

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [(8, 4), (4, 8), (8, None), (None, 4)]


@pytest.fixture(autouse=True, scope="module")
def _registered():
    sa_hf.register()


def _kv(n, b=1, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def _same(got, x, bits, rotate):
    """``got`` (what a layer returned) is ``x`` stored with ``bits`` (None: floats)."""
    if bits is None:
        assert isinstance(got, torch.Tensor) and torch.equal(got, x)
        return
    want = selfattn.quantize_kv(x, bits=bits, rotate=rotate)
    assert isinstance(got, selfattn.QuantizedKV) and got.bits == bits
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)


@pytest.mark.parametrize("kbits, vbits", PAIRS)
def test_layers_store_keys_and_values_at_their_own_bits(kbits, vbits):
    """A growing layer across chunk growth, and a window layer, hold each side as quantize_kv
    of everything written (of the window kept)."""
    grow = GrowingLayer(chunk=4, bits=(kbits, vbits), rotate=True)
    window = WindowLayer(5, chunk=3, bits=(kbits, vbits), rotate=True)
    ks, vs = [], []
    for seed, n in enumerate((5, 1, 1, 3, 1, 7)):
        k, v = _kv(n, seed=seed)
        ks.append(k), vs.append(v)
        keys, values = grow.update(k, v)
        wk, wv = window.update(k, v)
        _same(wk, torch.cat(ks, 2)[:, :, -wk.shape[2] :], kbits, True)
        _same(wv, torch.cat(vs, 2)[:, :, -wv.shape[2] :], vbits, True)
    _same(keys, torch.cat(ks, 2), kbits, True)
    _same(values, torch.cat(vs, 2), vbits, True)
    assert grow.get_seq_length() == 18 and (grow.key_bits, grow.value_bits) == (kbits, vbits)


def test_budget_layer_keeps_keys_and_values_at_their_own_bits():
    layer = BudgetLayer(6, "window", chunk=4, bits=(8, 4))
    for seed, n in enumerate((9, 1, 1)):
        keys, values = layer.update(*_kv(n, seed=seed))
    assert keys.bits == 8 and values.bits == 4 and keys.shape[2] == values.shape[2] == 7


def test_make_cache_pair_nbytes_count_each_side():
    """float32 D=8 is 32 bytes a token per side; int8 keys 8 + a 4-byte scale, 4-bit values
    4 + a 4-byte scale (one group of 8): a (8, 4) cache is 20/64 of the float one."""
    ids = torch.randint(1, 101, (1, 9), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(positions=128)
    sizes = {}
    for bits in (None, (8, 4), (None, None)):
        cache = sa_hf.make_cache(model, bits=bits, residual=0)  # every token quantized at once
        with torch.no_grad():
            model(input_ids=ids, cache=cache, use_cache=True)
        sizes[bits] = cache.nbytes
    assert sizes[(8, 4)] * 64 == sizes[None] * 20
    assert sizes[(None, None)] == sizes[None]
    cache = sa_hf.make_cache(model, bits=(8, 4), rotate=True, residual=0)
    assert (cache.key_bits, cache.value_bits) == (8, 4) and cache.bits == (8, 4)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    assert cache.layers[0].keys.bits == 8 and cache.layers[0].values.bits == 4
    assert cache.layers[0].keys.rotate and cache.layers[0].values.rotate


@pytest.mark.parametrize("bits", [(8,), (8, 4, 4), (8, 2), (3, 4), (True, 4), (4, 8.0), "84", 2])
def test_make_cache_bad_bits_pair_names_it(bits):
    with pytest.raises(ValueError, match=re.escape(f"bits={bits!r}")):
        sa_hf.make_cache(tiny_llama(positions=128), bits=bits)


def test_make_cache_pair_needs_selfattn_attention_and_rotate_needs_a_quantized_side():
    model = tiny_llama(positions=128)
    with pytest.raises(ValueError, match=r"rotate=True .* needs bits"):
        sa_hf.make_cache(model, bits=(None, None), rotate=True)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match=r"bits=\(8, 4\).*'sdpa'"):
        sa_hf.make_cache(model, bits=(8, 4))


# -- SmolLM2: the logits of DynamicCache over the same quantized-then-dequantized keys/values -----


class _FakeQuantLayer(DynamicLayer):
    """``DynamicLayer`` storing ``quantize_kv(x).dequantize()`` of each new token (per token,
    so the same as quantizing the whole cache at once)."""

    def __init__(self, kbits, vbits):
        super().__init__()
        self.kbits, self.vbits = kbits, vbits

    def update(self, key_states, value_states, *args, **kwargs):
        k = selfattn.quantize_kv(key_states, bits=self.kbits, rotate=True).dequantize()
        v = selfattn.quantize_kv(value_states, bits=self.vbits, rotate=True).dequantize()
        return super().update(k, v, *args, **kwargs)


def _logits(model, ids, cache):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, cache=cache, max_new_tokens=6, do_sample=False, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits)


def test_smollm2_pair_cache_equals_dynamic_cache_over_the_same_fake_quantization():
    from selfattn.pretrained import smollm2

    try:
        smollm2.stamp()
    except ValueError as exc:
        pytest.skip(str(exc))
    model, tok = smollm2.load("selfattn")
    ids = tok(["Once upon a time, in a land far away, there lived"], return_tensors="pt")
    ids = ids["input_ids"]
    layers = model.config.num_hidden_layers
    cache = sa_hf.make_cache(model, bits=(8, 4), rotate=True, residual=0)  # no float window
    seq, got = _logits(model, ids, cache)
    ref_seq, ref = _logits(model, ids, Cache(layers=[_FakeQuantLayer(8, 4) for _ in range(layers)]))
    _, int8 = _logits(model, ids, Cache(layers=[_FakeQuantLayer(8, 8) for _ in range(layers)]))
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-4)
    # int8 values give other logits: the check above sees which width the values were stored at
    assert (int8 - ref).abs().max() > 20 * (got - ref).abs().max()
