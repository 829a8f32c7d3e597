"""torch.compile: the ``selfattn::attention`` custom op (fake implementation, autograd) and whole
models compiled with ``fullgraph=True`` (which fails on any graph break) matching eager."""

from __future__ import annotations

import os

import pytest
import torch

import selfattn
from helpers import make_qkv
from selfattn import MultiHeadSelfAttention
from selfattn._compile import attention_op, op_arguments
from selfattn.models import GPT, Encoder, ViT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


OP_CASES = {
    "causal_gqa": {"causal": True},
    "mask_bias_alibi": {"mask": "mask", "bias": "bias", "alibi_slopes": "alibi"},
    "window_softcap_segments": {"window": (2, 1), "softcap": 3.0, "segment_ids": "seg"},
    "dropout_scale": {"dropout_p": 0.3, "scale": 0.2, "causal": True},
}


def _materialise(kwargs, b=2, hq=4, nq=5, nk=5, grad=False):
    g = torch.Generator().manual_seed(1)
    out = {}
    for key, val in kwargs.items():
        if val == "mask":
            val = torch.rand(b, 1, nq, nk, generator=g) > 0.3
        elif val == "bias":
            val = torch.randn(1, hq, nq, nk, generator=g).requires_grad_(grad)
        elif val == "alibi":
            val = torch.rand(hq, generator=g).requires_grad_(grad)
        elif val == "seg":
            val = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, -1]])
        out[key] = val
    return out


@pytest.mark.parametrize("name", list(OP_CASES))
def test_opcheck(name):
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    q, k, v = make_qkv(2, 4, 2, 5, 5, 8, requires_grad=True)
    kw = _materialise(OP_CASES[name], grad=True)
    seed = torch.tensor([7, 9]) if kw.get("dropout_p", 0) > 0 else None
    args = (q, k, v, *op_arguments(**kw), seed, "auto")
    torch.library.opcheck(torch.ops.selfattn.attention.default, args)


@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_equals_attention_forward_and_backward(name):
    """In eager mode the op is selfattn.attention: same output, same dropout, same gradients."""
    q, k, v = make_qkv(2, 4, 2, 5, 5, 8, requires_grad=True)
    kw = _materialise(OP_CASES[name], grad=True)
    torch.manual_seed(3)
    ref = selfattn.attention(q, k, v, backend="tiled", **kw)
    ref_grads = torch.autograd.grad(ref.square().sum(), [q, k, v])
    torch.manual_seed(3)  # the op draws its dropout seed the same way
    out = attention_op(q, k, v, backend="tiled", **kw)
    grads = torch.autograd.grad(out.square().sum(), [q, k, v])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_op_gradcheck_with_bias_alibi_and_masked_row():
    q, k, v = make_qkv(1, 2, 1, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    alibi = torch.rand(2, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 0, :] = False  # one fully masked row: zero output, zero gradient

    def f(q, k, v, bias, alibi):
        return attention_op(
            q, k, v, causal=True, bias=bias, alibi_slopes=alibi, mask=mask, softcap=4.0
        )

    assert torch.autograd.gradcheck(f, (q, k, v, bias, alibi))


def test_op_lse_gradient_equals_attention():
    """The lse (float32 by contract, so no float64 gradcheck) back-propagates like the core's."""
    q, k, v = make_qkv(2, 4, 2, 5, 7, 8, requires_grad=True)
    grads = []
    for fn in (attention_op, selfattn.attention):
        out, lse = fn(q, k, v, causal=True, window=(3, 0), return_lse=True)
        loss = out.square().sum() + (lse * torch.linspace(-1, 1, 5)).sum()
        grads.append(torch.autograd.grad(loss, [q, k, v]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_by_recompute_path():
    """The backward hook of the math backend (the formula's derivative written out), checked
    against the tiled engine's backward through the custom op; dropout mask included."""
    from selfattn.backends import BACKENDS
    from selfattn.spec import validate

    q, k, v = make_qkv(2, 4, 2, 5, 6, 8)
    bias = torch.randn(2, 4, 5, 6)
    alibi = torch.rand(4)
    dout, dlse = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5)
    rules = dict(causal=True, softcap=3.0, dropout_p=0.25, bias=bias, alibi_slopes=alibi)
    spec = validate(q, k, v, return_lse=True, **rules)
    got = BACKENDS["math"].backward(spec, q, k, v, None, None, dout, dlse, (5, 6), True, True)
    seed = torch.tensor([5, 6])
    op_rules = op_arguments(**rules)
    out, lse = torch.ops.selfattn.attention(q, k, v, *op_rules, seed, "tiled")
    want = torch.ops.selfattn.attention_backward(
        dout, dlse, q, k, v, out, lse, *op_rules, seed, "tiled", True, True, False
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a.reshape(b.shape), b, atol=1e-5, rtol=1e-4)


def _tiny_gpt():
    torch.manual_seed(0)
    return GPT(29, 16, 32, 1, 4, num_kv_heads=2, qk_norm=True)


def test_compiled_gpt_has_no_graph_break_and_matches_eager():
    model = _tiny_gpt()
    idx = torch.randint(0, 29, (2, 9))
    explanation = torch._dynamo.explain(model)(idx)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits_c, loss_c = compiled(idx, idx)
    loss_c.backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, loss = model(idx, idx)
    loss.backward()
    torch.testing.assert_close(logits_c, logits, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads_c[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_encoder_with_padding_and_vit():
    torch.manual_seed(1)
    enc = Encoder(40, 16, 32, 1, 4, pooling="mean").eval()
    idx = torch.randint(0, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    got = torch.compile(enc, fullgraph=True, backend="aot_eager")(idx, mask)
    torch.testing.assert_close(got.pooled, enc(idx, mask).pooled, atol=1e-5, rtol=1e-5)
    vit = ViT(embed_dim=16, num_layers=1, num_heads=2).eval()
    x = torch.randn(3, 1, 8, 8)
    got = torch.compile(vit, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, vit(x), atol=1e-5, rtol=1e-5)


def test_compiled_layer_with_dropout_trains():
    torch.manual_seed(2)
    layer = MultiHeadSelfAttention(16, 4, num_kv_heads=2, dropout=0.2, causal=True, rope=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 16, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and layer.qkv.weight.grad is not None


def test_bad_input_fails_while_tracing():
    def f(q, k, v):
        return selfattn.attention(q, k, v, causal=True)

    q, k, v = make_qkv(1, 6, 4, 3, 3, 8)
    with pytest.raises(Exception, match="Hq=6, Hkv=4"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SELFATTN_TEST_INDUCTOR"),
    reason="inductor compiles C++ for minutes on a shared 2-core CPU; set SELFATTN_TEST_INDUCTOR=1",
)
def test_inductor_compiles_gpt_forward_and_backward():
    """The default backend (inductor, C++ codegen on the CPU) around the opaque op."""
    model = _tiny_gpt()
    idx = torch.randint(0, 29, (2, 9))
    logits_c, loss_c = torch.compile(model, fullgraph=True)(idx, idx)
    loss_c.backward()
    grad_c = model.tok.weight.grad.clone()
    model.zero_grad()
    logits, loss = model(idx, idx)
    loss.backward()
    torch.testing.assert_close(logits_c, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_c, model.tok.weight.grad, atol=1e-4, rtol=1e-3)


def test_plain_attention_call_compiles_without_graph_break():
    """Bug: calling selfattn.attention directly inside compiled code graph-broke; it now routes
    through the custom op while tracing."""

    def f(q, k, v):
        return selfattn.attention(q, k, v, causal=True, window=(3, 0)) * 2

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
