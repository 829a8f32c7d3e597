"""selfattn.integrations.transformers.make_cache: an in-place transformers Cache.

Each layer kind is checked against the transformers layer it replaces (``DynamicLayer``,
``DynamicSlidingWindowLayer``) on the same sequence of operations, that its storage is written in
place (views, stable pointers within a chunk), and whole models give the same greedy tokens as
``DynamicCache``: SmolLM2-135M's packaged weights (left-padded batch, multi-turn, beam search) for
"selfattn", "sdpa" and "eager", and a small random Gemma-3 whose sliding window and storage chunks
are a few tokens, so every boundary is crossed many times.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

import selfattn.integrations.transformers as sa_hf
from helpers import tiny_llama
from selfattn.integrations.cache import GrowingLayer, InPlaceCache, WindowLayer

pytestmark = pytest.mark.usefixtures("one_thread")

IMPLS = ("selfattn", "sdpa", "eager")


@pytest.fixture(autouse=True, scope="module")
def _registered():
    sa_hf.register()


def _kv(n, b=2, h=3, d=4, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, dv, generator=g)


def _same_state(ours, ref):
    assert ours.get_seq_length() == ref.get_seq_length()
    for q in (1, 3):
        assert ours.get_mask_sizes(q) == ref.get_mask_sizes(q)
    if ref.is_initialized and ref.keys is not None:
        assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)


# -- the layers against transformers' own ----------------------------------------------------------


def test_growing_layer_equals_dynamic_layer_step_by_step_across_chunks():
    ours, ref = GrowingLayer(chunk=4), DynamicLayer()
    sizes = (3, 1, 1, 1, 1, 2, 7, 1, 1, 13, 1, 1, 1)
    for seed, n in enumerate(sizes):
        k, v = _kv(n, seed=seed)
        a, b = ours.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        _same_state(ours, ref)
    assert ours.capacity > ours.get_seq_length() == sum(sizes)


def test_growing_layer_crop_reorder_and_batch_ops_equal_dynamic_layer():
    ours, ref = GrowingLayer(chunk=4), DynamicLayer()
    k, v = _kv(6, b=3)
    ours.update(k, v), ref.update(k, v)
    for layer in (ours, ref):
        layer.crop(-2)
    _same_state(ours, ref)
    with pytest.raises(ValueError, match="negative"):
        ours.crop(3)
    beams = torch.tensor([2, 0, 0])
    ours.reorder_cache(beams), ref.reorder_cache(beams)
    _same_state(ours, ref)
    ours.batch_repeat_interleave(2), ref.batch_repeat_interleave(2)
    _same_state(ours, ref)
    assert ours.keys.shape[0] == 6
    keep = torch.tensor([True, False, True, True, False, False])
    ours.batch_select_indices(keep), ref.batch_select_indices(keep)
    _same_state(ours, ref)
    k, v = _kv(2, b=3, seed=9)  # the new batch size keeps appending
    a, b = ours.update(k, v), ref.update(k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ours.reset(), ref.reset()
    assert ours.get_seq_length() == ref.get_seq_length() == 0
    k, v = _kv(1, b=5, seed=10)  # after reset the storage follows the new keys
    assert torch.equal(ours.update(k, v)[0], ref.update(k, v)[0])


@pytest.mark.parametrize("window", [2, 3, 5])
def test_window_layer_equals_dynamic_sliding_window_layer(window):
    ours, ref = WindowLayer(window, chunk=3), DynamicSlidingWindowLayer(window)
    sizes = (2, 1, 1, 1, 1, 1, 9, 1, 1, 1, 4, 1, 1, 1, 1, 1, 1, 1, 20, 1, 1)
    for seed, n in enumerate(sizes):
        k, v = _kv(n, seed=seed)
        a, b = ours.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), n
        _same_state(ours, ref)
    # a long prefill grew the storage for its call only
    assert ours.capacity == ours.usual_capacity


def test_window_layer_crop_while_recording_equals_transformers():
    ours, ref = WindowLayer(4, chunk=2), DynamicSlidingWindowLayer(4)
    k, v = _kv(5)
    ours.update(k, v), ref.update(k, v)
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        ours.crop(-1)
    for layer in (ours, ref):
        layer.activate_past_recording()
    seed = 20
    for n in (3, 1, 2):
        seed += 1
        k, v = _kv(n, seed=seed)
        a, b = ours.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        _same_state(ours, ref)
    for steps in (-2, 0):
        ours.crop(steps), ref.crop(steps)
        _same_state(ours, ref)
    beams = torch.tensor([1, 1])
    ours.reorder_cache(beams), ref.reorder_cache(beams)
    _same_state(ours, ref)


def test_window_layer_before_the_window_fills_crops_like_a_full_layer():
    ours, ref = WindowLayer(8), DynamicSlidingWindowLayer(8)
    k, v = _kv(5)
    ours.update(k, v), ref.update(k, v)
    ours.crop(-2), ref.crop(-2)
    _same_state(ours, ref)


def test_layers_refuse_keys_that_do_not_fit_before_writing():
    for layer in (GrowingLayer(chunk=4), WindowLayer(3, chunk=4)):
        layer.update(*_kv(2))
        k, v = _kv(1)
        with pytest.raises(ValueError, match=r"expects keys \(B, Hkv, n, D\) = \(2, 3, n, 4\)"):
            layer.update(k[:1], v[:1])  # a batch of 1 would broadcast into the storage
        with pytest.raises(TypeError, match=r"holds torch\.float32 keys"):
            layer.update(k.double(), v.double())
        assert layer.get_seq_length() == 2  # nothing was written


# -- in place: views, no copy per step -----------------------------------------------------------


def test_growing_layer_steps_write_in_place_and_return_views():
    layer = GrowingLayer(chunk=8)
    layer.update(*_kv(3))
    storage = layer.buffer_k.data_ptr(), layer.buffer_v.data_ptr()
    cap = layer.capacity
    for step in range(cap - 3):  # every step that fits the chunk
        keys, values = layer.update(*_kv(1, seed=step + 1))
        assert (layer.buffer_k.data_ptr(), layer.buffer_v.data_ptr()) == storage
        assert keys.data_ptr() == storage[0] and values.data_ptr() == storage[1]
        assert keys._base is layer.buffer_k and values._base is layer.buffer_v
    assert layer.capacity == cap
    layer.update(*_kv(1, seed=99))  # the chunk is full: one move to larger storage
    assert layer.capacity > cap and layer.buffer_k.data_ptr() != storage[0]


def test_window_layer_moves_its_tokens_once_per_chunk():
    layer = WindowLayer(4, chunk=8)
    layer.update(*_kv(2))
    moves, last = 0, layer.buffer_k.data_ptr()
    for step in range(40):
        keys, _ = layer.update(*_kv(1, seed=step + 1))
        assert keys._base is not None  # a view of the storage, never a concatenation
        if layer.buffer_k.data_ptr() != last:
            moves, last = moves + 1, layer.buffer_k.data_ptr()
    # 3 tokens kept and at least 8 free slots: a move at most every 8 steps, not every step
    assert layer.usual_capacity - 3 >= 8
    assert 1 <= moves <= 40 // 8


# -- make_cache's arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"bits": 3}, ValueError, "bits must be None, 8 or 4"),
        ({"bits": True}, ValueError, "bits must be"),
        ({"rotate": True}, ValueError, "needs bits"),
        ({"rotate": 1}, TypeError, "rotate must be a bool"),
        ({"budget": 0}, ValueError, "budget must be"),
        ({"policy": "lru"}, ValueError, "policy must be one of"),
        ({"sink_tokens": -1}, ValueError, "sink_tokens"),
    ],
)
def test_make_cache_refuses_what_it_cannot_honour(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sa_hf.make_cache(tiny_llama(positions=128, attn=None), **kwargs)


def test_make_cache_needs_a_decoder_model():
    with pytest.raises(TypeError, match="transformers model"):
        sa_hf.make_cache(object())
    from transformers import T5Config

    with pytest.raises(ValueError, match="encoder-decoder"):
        sa_hf.make_cache(T5Config(num_layers=1, d_model=8, d_ff=8, num_heads=1, d_kv=8))


def test_make_cache_layers_follow_the_config():
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(**_gemma_kwargs())
    cache = sa_hf.make_cache(cfg)
    ref = DynamicCache(config=cfg)
    assert [type(x) for x in cache.layers] == [
        WindowLayer if type(r) is DynamicSlidingWindowLayer else GrowingLayer for r in ref.layers
    ]
    assert cache.is_sliding == ref.is_sliding and any(cache.is_sliding)
    assert [x.get_max_length() for x in cache.layers] == [x.get_max_length() for x in ref.layers]


def test_make_cache_through_past_key_values_as_the_api_spells_it():
    """``generate(past_key_values=cache)`` (transformers 5.25 renamed it ``cache=`` and still
    takes the old name) and the forward call both fill and use the cache."""
    model = tiny_llama(positions=128, attn=None)
    ids = torch.randint(1, 101, (1, 7), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, cache=DynamicCache(config=model.config), max_new_tokens=5)
    cache = sa_hf.make_cache(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation of the old name
        ours = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
        assert cache.get_seq_length() == ours.shape[1] - 1
        with torch.no_grad():
            out = model(input_ids=ours[:, -1:], past_key_values=cache, use_cache=True)
    assert torch.equal(ours, ref)
    assert cache.get_seq_length() == ours.shape[1]
    assert out.logits.shape == (1, 1, 101)


# -- whole models: the same tokens as DynamicCache -----------------------------------------------


def _generate(model, batch, cache, **kw):
    kw = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0, **kw}
    with torch.no_grad():
        return model.generate(**batch, cache=cache, **kw)


@pytest.fixture(scope="module")
def smol():
    from selfattn.pretrained import smollm2

    try:
        smollm2.stamp()
    except ValueError as exc:
        pytest.skip(str(exc))
    model, tok = smollm2.load("selfattn")
    tok.padding_side = "left"
    return model, tok


PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived"]


@pytest.mark.parametrize("impl", IMPLS)
def test_smollm2_left_padded_batch_same_greedy_tokens_as_dynamic_cache(smol, impl):
    model, tok = smol
    model.set_attn_implementation(impl)
    try:
        batch = tok(PROMPTS, return_tensors="pt", padding=True)
        assert not batch["attention_mask"].all()  # really padded
        ref = _generate(model, batch, DynamicCache(config=model.config))
        cache = sa_hf.make_cache(model)
        ours = _generate(model, batch, cache)
    finally:
        model.set_attn_implementation("selfattn")
    assert torch.equal(ours, ref)
    assert cache.get_seq_length() == ours.shape[1] - 1  # the last token is never fed back


def test_smollm2_decode_step_writes_in_place(smol):
    model, tok = smol
    batch = tok(PROMPTS[:1], return_tensors="pt")
    cache = sa_hf.make_cache(model)
    with torch.no_grad():
        out = model(**batch, cache=cache, use_cache=True)
        storage = [(x.buffer_k.data_ptr(), x.buffer_v.data_ptr()) for x in cache.layers]
        n = cache.get_seq_length()
        for step in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.ones(1, n + step + 1, dtype=torch.long)
            out = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
    assert [(x.buffer_k.data_ptr(), x.buffer_v.data_ptr()) for x in cache.layers] == storage
    assert all(x.keys._base is x.buffer_k for x in cache.layers)
    assert cache.get_seq_length() == n + 3


def test_smollm2_multi_turn_with_one_cache_same_as_dynamic_cache(smol):
    model, tok = smol
    results = []
    for cache in (DynamicCache(config=model.config), sa_hf.make_cache(model)):
        first = tok(["Name a colour."], return_tensors="pt")
        out = _generate(model, first, cache, max_new_tokens=8)
        follow = tok([" And another one?"], return_tensors="pt", add_special_tokens=False)
        ids = torch.cat([out, follow["input_ids"]], 1)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        results.append(_generate(model, batch, cache, max_new_tokens=8))
        assert cache.get_seq_length() == results[-1].shape[1] - 1
    assert torch.equal(results[0], results[1])


def test_smollm2_beam_search_same_as_dynamic_cache(smol):
    model, tok = smol
    batch = tok(PROMPTS[:1], return_tensors="pt")
    kw = {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2}
    ref = _generate(model, batch, DynamicCache(config=model.config), **kw)
    ours = _generate(model, batch, sa_hf.make_cache(model), **kw)
    assert torch.equal(ours, ref)


def test_smollm2_prompt_lookup_decoding_crops_like_dynamic_cache(smol, monkeypatch):
    """Prompt-lookup decoding proposes tokens copied from the prompt and rolls the rejected ones
    back with ``crop``: the same tokens as DynamicCache, and crop really ran."""
    model, tok = smol
    crops = []
    real_crop = GrowingLayer.crop

    def counted(self, tokens_to_remove):
        crops.append(tokens_to_remove)
        return real_crop(self, tokens_to_remove)

    monkeypatch.setattr(GrowingLayer, "crop", counted)
    text = "one two three four, one two three four, one two three four, one two"
    batch = tok([text], return_tensors="pt")
    kw = {"max_new_tokens": 12, "prompt_lookup_num_tokens": 3}
    ref = _generate(model, batch, DynamicCache(config=model.config), **kw)
    cache = sa_hf.make_cache(model)
    ours = _generate(model, batch, cache, **kw)
    assert torch.equal(ours, ref)
    assert any(n < 0 for n in crops)  # rejected candidates were rolled back
    assert cache.get_seq_length() == ours.shape[1] - 1


def _gemma_kwargs():
    return {
        "vocab_size": 101, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "max_position_embeddings": 256, "sliding_window": 5, "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                        "full_attention"],
    }  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_gemma3_sliding_layers_same_greedy_tokens_as_dynamic_cache(impl):
    """Window 5 and storage chunks of 3: the prompt is longer than the window, and decoding
    crosses the sliding layers' moves and the full layer's growth many times; two turns."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**_gemma_kwargs())).eval()
    model.set_attn_implementation(impl)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 101, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    follow = torch.randint(1, 101, (2, 4), generator=g)  # the second turn
    outs = []
    for cache in (DynamicCache(config=model.config), InPlaceCache(model.config, chunk=3)):
        out = _generate(model, {"input_ids": ids, "attention_mask": mask}, cache)
        more = torch.cat([out, follow], 1)
        more_mask = torch.cat([mask, torch.ones(2, more.shape[1] - mask.shape[1])], 1).long()
        outs.append(_generate(model, {"input_ids": more, "attention_mask": more_mask}, cache))
    assert torch.equal(outs[0], outs[1])


def test_gemma3_270m_prompt_past_the_window_same_greedy_tokens_as_dynamic_cache():
    """The real Gemma-3-270M (local window 512): a 600-token prompt, so its sliding layers drop
    tokens during the prefill and keep moving while decoding."""
    import pydoc_data.topics as topics

    from selfattn.pretrained import gemma3

    try:
        gemma3.stamp()
    except ValueError as exc:
        pytest.skip(str(exc))
    model, tok = gemma3.load("selfattn")
    text = Path(topics.__file__).read_text(encoding="utf-8")[:20000]
    ids = tok(text, return_tensors="pt")["input_ids"][:, :600]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ref = _generate(model, batch, DynamicCache(config=model.config), max_new_tokens=10)
    cache = InPlaceCache(model.config, chunk=4)  # small chunks: the sliding layers move often
    ours = _generate(model, batch, cache, max_new_tokens=10)
    assert torch.equal(ours, ref)
    assert any(isinstance(x, WindowLayer) for x in cache.layers)
    assert all(x.keys.shape[2] == 511 for x in cache.layers if isinstance(x, WindowLayer))
