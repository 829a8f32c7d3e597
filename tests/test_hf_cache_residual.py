"""make_cache(bits=..., residual=R): each layer's newest tokens kept in float, the older ones
quantized once, in chunks, as they leave the float window (KIVI; transformers' QuantizedCache
residual_length).

The reference is transformers' own ``DynamicLayer`` fed the same schedule: it holds floats and,
whenever the window would pass ``R + FLUSH`` tokens, replaces all but the newest ``R`` by their
quantize-then-dequantize values (per token, so the same as quantizing them in that chunk).
The in-place layers must give its keys and values, and SmolLM2 through ``generate()`` its tokens
and logits; ``residual=0`` stays what it was; the float window never holds more than
``R + FLUSH`` tokens besides the current call's; ``nbytes`` counts the window.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

import selfattn
import selfattn.integrations.transformers as sa_hf
from helpers import tiny_llama
from selfattn.integrations.cache import RESIDUAL, GrowingLayer, InPlaceCache, WindowLayer
from selfattn.integrations.kv_layers import FLUSH
from selfattn.kv_residual import ResidualKV

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def _registered():
    sa_hf.register()


def _kv(n, b=2, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def _fake(x, bits, rotate):
    return x if bits is None else selfattn.quantize_kv(x, bits=bits, rotate=rotate).dequantize()


class _Schedule:
    """The float window's schedule, on float tensors: the reference's bookkeeping."""

    def __init__(self, residual, kbits, vbits, rotate):
        self.residual, self.kbits, self.vbits, self.rotate = residual, kbits, vbits, rotate
        self.quantized = 0  # tokens of the layer's keys that are fake-quantized

    def flush(self, layer, n):
        """Before ``n`` new tokens: fake-quantize all but the newest ``residual`` of the window
        when it would pass ``residual + FLUSH``."""
        if not getattr(layer, "is_initialized", False) or layer.keys is None:
            return
        total = layer.keys.shape[2]
        self.quantized = min(self.quantized, total)  # a sliding layer dropped its oldest
        held = total - self.quantized
        if held + n > self.residual + FLUSH and held > self.residual:
            a, b = self.quantized, total - self.residual
            layer.keys[:, :, a:b] = _fake(layer.keys[:, :, a:b], self.kbits, self.rotate)
            layer.values[:, :, a:b] = _fake(layer.values[:, :, a:b], self.vbits, self.rotate)
            self.quantized = b


class _FakeResidualLayer(DynamicLayer):
    def __init__(self, residual, kbits, vbits, rotate=True):
        super().__init__()
        self.schedule = _Schedule(residual, kbits, vbits, rotate)

    def update(self, key_states, value_states, *args, **kwargs):
        self.schedule.flush(self, key_states.shape[2])
        return super().update(key_states, value_states, *args, **kwargs)


def _same(got, want):
    """``got`` (a ResidualKV) equals the float tensor ``want`` up to float32 rounding."""
    assert isinstance(got, ResidualKV)
    torch.testing.assert_close(got.dequantize(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8, (8, 4), (None, 4)])
@pytest.mark.parametrize("residual", [1, 5, 40])
def test_growing_layer_window_equals_the_fake_quantized_schedule(bits, residual):
    kbits, vbits = selfattn.quant.kv_bits(bits)
    ours = GrowingLayer(chunk=4, bits=bits, rotate=True, residual=residual)
    ref = _FakeResidualLayer(residual, kbits, vbits)
    for seed, n in enumerate([7, 1, 1, 50] + [1] * 45 + [3, 1]):
        k, v = _kv(n, seed=seed)
        got = ours.update(k, v)
        want = ref.update(k, v)
        _same(got[0], want[0])
        _same(got[1], want[1])
        # the window: the newest tokens, exactly as written; at most residual + FLUSH + n
        assert got[0].window.shape[2] <= residual + FLUSH + n
        assert torch.equal(got[0].window, want[0][:, :, got[0].split :])
        assert ours.get_seq_length() == ref.get_seq_length()


class _FakeResidualSlidingLayer(DynamicSlidingWindowLayer):
    """``DynamicSlidingWindowLayer`` on the same schedule (tokens it drops leave the count)."""

    def __init__(self, sliding_window, residual, kbits, vbits, rotate=True):
        super().__init__(sliding_window)
        self.schedule = _Schedule(residual, kbits, vbits, rotate)

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[2]
        self.schedule.flush(self, n)
        before = self.keys.shape[2] if self.is_initialized else 0
        out = super().update(key_states, value_states, *args, **kwargs)
        dropped = before + n - self.keys.shape[2]  # the oldest left the sliding window
        self.schedule.quantized = max(0, self.schedule.quantized - dropped)
        return out


@pytest.mark.parametrize("window", [3, 40, 70])
def test_window_layer_with_a_float_window_equals_the_fake_quantized_sliding_layer(window):
    ours = WindowLayer(window, chunk=3, bits=4, rotate=True, residual=6)
    ref = _FakeResidualSlidingLayer(window, 6, 4, 4)
    for seed, n in enumerate([5, 1, 1, 90] + [1] * 50 + [20, 1]):
        k, v = _kv(n, seed=seed)
        got, want = ours.update(k, v), ref.update(k, v)
        torch.testing.assert_close(got[0].dequantize(), want[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got[1].dequantize(), want[1], atol=1e-6, rtol=1e-6)
        assert ours.get_mask_sizes(1) == ref.get_mask_sizes(1)
        assert ours.held <= window - 1


# -- make_cache(residual=...) ------------------------------------------------------------------


def _generate(model, ids, cache, n=8):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=n,
            do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits)


def test_make_cache_default_residual_is_transformers_residual_length_with_bits_only():
    model = tiny_llama()
    assert RESIDUAL == 128
    assert all(x.residual == 128 for x in sa_hf.make_cache(model, bits=8).layers)
    assert all(x.residual == 0 for x in sa_hf.make_cache(model).layers)
    assert all(x.residual == 7 for x in sa_hf.make_cache(model, bits=4, residual=7).layers)
    assert sa_hf.make_cache(model, bits=8, residual=0).residual == 0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"bits": 8, "residual": -1}, ValueError, "residual must be >= 0 (tokens), got -1"),
        ({"bits": 8, "residual": 2.0}, TypeError, "residual must be an int (tokens) or None"),
        ({"bits": 8, "residual": True}, TypeError, "residual must be an int (tokens) or None"),
        ({"bits": 8, "residual": "128"}, TypeError, "residual must be an int (tokens) or None"),
        ({"residual": 16}, ValueError, "residual=16 keeps the newest tokens in float"),
    ],
)
def test_make_cache_bad_residual_is_refused(kwargs, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        sa_hf.make_cache(tiny_llama(), **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"chunk": 3}])
def test_layer_bad_residual_is_refused(kwargs):
    with pytest.raises(ValueError, match="residual must be >= 0"):
        GrowingLayer(bits=8, residual=-2, **kwargs)
    with pytest.raises(TypeError, match="residual must be an int"):
        WindowLayer(5, bits=8, residual=1.0, **kwargs)


def test_make_cache_residual_zero_stores_what_it_always_did():
    """residual=0: QuantizedKV views, no window, and the logits of the cache built as before the
    window existed (InPlaceCache's own default), bit for bit, through a prefill and steps."""
    ids = torch.randint(1, 101, (1, 9), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    cache = sa_hf.make_cache(model, bits=4, rotate=True, residual=0)
    seq, got = _generate(model, ids, cache, 6)
    seq_ref, want = _generate(model, ids, InPlaceCache(model.config, bits=4, rotate=True), 6)
    assert torch.equal(seq, seq_ref) and torch.equal(got, want)
    for layer in cache.layers:
        assert type(layer.keys) is selfattn.QuantizedKV and layer.kwin is None


def test_make_cache_nbytes_count_the_float_window():
    ids = torch.randint(1, 101, (1, 60), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    cache = sa_hf.make_cache(model, bits=8, residual=16)
    with torch.no_grad():
        model(input_ids=ids[:, :9], cache=cache, use_cache=True)
    assert cache.tokens_held == [9, 9]
    # all 9 in the window: per layer two float32 buffers of 16 + FLUSH tokens, 2 heads of 8;
    # the quantized storage is not allocated yet
    assert cache.nbytes == 2 * 2 * (16 + FLUSH) * 2 * 8 * 4
    with torch.no_grad():
        model(input_ids=ids[:, 9:], cache=cache, use_cache=True)  # 51 more: grows the window
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)  # flushes all but 16
    assert cache.tokens_held == [61, 61]
    for layer in cache.layers:
        window = 2 * (16 + FLUSH) * 2 * 8 * 4
        quantized = sum(p.numel() * p.element_size() for p in (*layer.kparts, *layer.vparts))
        assert layer.nbytes == quantized + window and quantized > 0
        assert layer.keys.split == 61 - 17 and layer.keys.window.shape[2] == 17
    assert cache.nbytes == sum(x.nbytes for x in cache.layers)


def test_tiny_llama_generate_with_a_float_window_equals_the_fake_quantized_schedule():
    ids = torch.randint(1, 101, (1, 50), generator=torch.Generator().manual_seed(1))
    model = tiny_llama()
    seq, got = _generate(model, ids, sa_hf.make_cache(model, bits=4, rotate=True, residual=3), 40)
    ref = Cache(layers=[_FakeResidualLayer(3, 4, 4) for _ in range(2)])
    ref_seq, want = _generate(model, ids, ref, 40)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_smollm2_float_window_greedy_tokens_and_logits_equal_the_fake_quantized_schedule():
    """SmolLM2 (4-bit + rotation, residual 4): a 60-token prompt (all in the window while it
    attends), the first step flushes all but 4, later steps flush again; the tokens and logits
    are those of DynamicLayer fed the same quantize-then-dequantize schedule. Without the window
    the logits differ far more (the check sees the window)."""
    from selfattn.pretrained import smollm2

    try:
        smollm2.stamp()
    except ValueError as exc:
        pytest.skip(str(exc))
    model, tok = smollm2.load("selfattn")
    text = "The quick brown fox jumps over the lazy dog, and then it runs into the forest. " * 4
    ids = tok([text], return_tensors="pt")["input_ids"][:, :60]
    layers = model.config.num_hidden_layers
    cache = sa_hf.make_cache(model, bits=4, rotate=True, residual=4)
    seq, got = _generate(model, ids, cache, 40)
    ref = Cache(layers=[_FakeResidualLayer(4, 4, 4) for _ in range(layers)])
    ref_seq, want = _generate(model, ids, ref, 40)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    assert all(x.keys.split > 0 and x.keys.window.shape[2] <= 4 + FLUSH for x in cache.layers)
    _, plain = _generate(model, ids, sa_hf.make_cache(model, bits=4, rotate=True, residual=0), 40)
    assert (plain - want).abs().max() > 20 * (got - want).abs().max()


def test_gemma3_sliding_and_global_layers_with_a_float_window_equal_the_fake_schedule():
    """Gemma-3-270M (int8, residual 4): its sliding layers (window 512) and global layers both
    keep a float window; 40 greedy tokens after a 60-token prompt equal DynamicLayer /
    DynamicSlidingWindowLayer fed the same quantize-then-dequantize schedule."""
    from selfattn.pretrained import gemma3

    try:
        gemma3.stamp()
    except ValueError as exc:
        pytest.skip(str(exc))
    model, tok = gemma3.load("selfattn")
    text = "The quick brown fox jumps over the lazy dog, and then it runs into the forest. " * 4
    ids = tok([text], return_tensors="pt")["input_ids"][:, :60]
    cfg = model.config.get_text_config(decoder=True)
    cache = sa_hf.make_cache(model, bits=8, residual=4)
    assert {type(x) for x in cache.layers} == {GrowingLayer, WindowLayer}
    ref = Cache(
        layers=[
            _FakeResidualSlidingLayer(cfg.sliding_window, 4, 8, 8, rotate=False)
            if kind == "sliding_attention"
            else _FakeResidualLayer(4, 8, 8, rotate=False)
            for kind in cfg.layer_types
        ]
    )
    seq, got = _generate(model, ids, cache, 40)
    ref_seq, want = _generate(model, ids, ref, 40)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    assert all(x.keys.split > 0 for x in cache.layers)


def test_make_cache_with_a_budget_keeps_no_window_in_its_evicting_layers():
    """An evicting layer evicts per key head, which one float window cannot follow: it quantizes
    every token at once (as residual=0) and still holds its budget; generate() runs."""
    from selfattn.integrations.evict import BudgetLayer

    ids = torch.randint(1, 101, (1, 40), generator=torch.Generator().manual_seed(2))
    model = tiny_llama()
    cache = sa_hf.make_cache(model, bits=8, budget=16, policy="h2o", residual=8)
    assert all(type(x) is BudgetLayer and x.residual == 0 for x in cache.layers)
    seq, _ = _generate(model, ids, cache, 5)
    assert seq.shape[1] == 45 and cache.tokens_held == [16, 16]
    assert all(type(x.keys) is selfattn.QuantizedKV for x in cache.layers)


def test_tiny_llama_beam_search_with_a_float_window_equals_the_fake_quantized_schedule():
    """Beam search reorders (and first repeats) the batch rows: the window follows them."""
    ids = torch.randint(1, 101, (2, 30), generator=torch.Generator().manual_seed(3))
    model = tiny_llama()
    kw = {"max_new_tokens": 30, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cache = sa_hf.make_cache(model, bits=4, rotate=True, residual=3)
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, **kw)
        ref = Cache(layers=[_FakeResidualLayer(3, 4, 4) for _ in range(2)])
        want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=ref, **kw)
    assert torch.equal(got, want)
    assert all(x.keys.split > 0 for x in cache.layers)


def test_a_decode_step_reuses_the_main_storages_views():
    """Every update made two QuantizedKV views of the main storage (each checked in full), ~20
    us per layer per step, though with a float window those tokens change only at a flush:
    the views are reused until the tokens held there (or the storage) change, and read what
    the storage holds then."""
    layer = GrowingLayer(chunk=8, bits=8, residual=4)
    ref = _FakeResidualLayer(4, 8, 8, rotate=False)
    heads, flushes = [], 0
    for seed, n in enumerate([10] + [1] * 80):
        k, v = _kv(n, seed=seed)
        got, want = layer.update(k, v), ref.update(k, v)
        _same(got[0], want[0])
        _same(got[1], want[1])
        head = got[0].head
        if heads and head.shape[2] == heads[-1].shape[2]:
            assert head is heads[-1] and got[1].head is layer.values.head
        elif heads:
            flushes += 1  # a flush: new views of the longer main part
            assert head is not heads[-1]
        heads.append(head)
    assert flushes >= 2 and layer.capacity > 8  # flushes, and the storage moved (grew)
    layer.crop(-40)  # past the window into the main storage: new views of fewer tokens
    ref.crop(-40)
    _same(layer.keys, ref.keys)
    _same(layer.values, ref.values)
    assert layer.keys.head.shape[2] < heads[-1].shape[2]
    layer.reset()
    assert layer.main_views == (None,) * 6  # nothing of the old storage kept alive
