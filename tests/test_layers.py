"""MultiHeadSelfAttention and TransformerBlock against independent plain-torch versions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfattn import MultiHeadSelfAttention, TransformerBlock, alibi_slopes

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """RoPE written out: pair (c, c + D/2) rotated by pos * 10000^(-2c/D)."""
    d = x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=D64) / d)
    ang = pos.to(D64)[:, None] * theta  # (N, D/2)
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def plain_mhsa(layer: MultiHeadSelfAttention, x: torch.Tensor, mask=None, segment_ids=None):
    """The layer's function with repeat_interleave'd heads and a dense masked softmax."""
    b, n, _ = x.shape
    hq, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    qkv = F.linear(x, layer.qkv.weight, layer.qkv.bias)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q = q.reshape(b, n, hq, d).transpose(1, 2)
    k = k.reshape(b, n, hkv, d).transpose(1, 2)
    v = v.reshape(b, n, hkv, d).transpose(1, 2)
    if layer.q_norm is not None:

        def rms(t, w):
            return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

        q, k = rms(q, layer.q_norm.weight), rms(k, layer.k_norm.weight)
    if layer.rope is not None:
        q, k = _rotate(q, torch.arange(n)), _rotate(k, torch.arange(n))
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, Hq, N, N)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    if layer.slopes is not None:
        s = s - alibi_slopes(hq).to(D64)[:, None, None] * (i - j).abs()
    vis = torch.ones(b, hq, n, n, dtype=torch.bool)
    if layer.causal:
        vis &= j <= i
    if layer.window is not None:
        left, right = layer.window
        if left is not None:
            vis &= j >= i - left
        if right is not None:
            vis &= j <= i + right
    if mask is not None:
        vis &= mask[:, None, None, :] if mask.dim() == 2 else mask
    if segment_ids is not None:
        vis &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    s = s.masked_fill(~vis, -math.inf)
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    out = (p @ v).transpose(1, 2).reshape(b, n, hq * d)
    return F.linear(out, layer.out.weight, layer.out.bias), p


LAYER_CASES = {
    "mha": {},
    "gqa_causal": {"num_kv_heads": 2, "causal": True},
    "mqa_window": {"num_kv_heads": 1, "window": (2, 1)},
    "rope_causal": {"rope": True, "causal": True},
    "alibi_causal_window": {"alibi": True, "causal": True, "window": (4, 0)},
    "qk_norm_head_dim": {"qk_norm": True, "head_dim": 12, "num_kv_heads": 2},
    "no_bias": {"bias": False, "num_kv_heads": 2},
}


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_matches_plain_version(name):
    torch.manual_seed(0)
    layer = MultiHeadSelfAttention(32, 4, dtype=D64, **LAYER_CASES[name])
    if layer.q_norm is not None:  # non-trivial norm scales
        with torch.no_grad():
            layer.q_norm.weight.uniform_(0.5, 1.5)
            layer.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 11, 32, dtype=D64)
    pad = torch.ones(3, 11, dtype=torch.bool)
    pad[1, 8:] = False
    pad[2, :3] = False
    y, w = layer(x, mask=pad, need_weights=True)
    ref, p = plain_mhsa(layer, x, mask=pad)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(w, p.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x, mask=pad), y)  # need_weights does not change y


def test_matches_torch_multihead_attention():
    """With Hkv = Hq our fused layout is nn.MultiheadAttention's in_proj layout."""
    torch.manual_seed(1)
    ours = MultiHeadSelfAttention(24, 3, dtype=D64)
    theirs = torch.nn.MultiheadAttention(24, 3, batch_first=True, dtype=D64)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.qkv.weight)
        theirs.in_proj_bias.copy_(ours.qkv.bias)
        theirs.out_proj.weight.copy_(ours.out.weight)
        theirs.out_proj.bias.copy_(ours.out.bias)
    x = torch.randn(2, 9, 24, dtype=D64)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, 6:] = False
    y, w = ours(x, mask=pad, need_weights=True)
    y_t, w_t = theirs(x, x, x, key_padding_mask=~pad, average_attn_weights=False)
    torch.testing.assert_close(y, y_t, atol=1e-10, rtol=0)
    torch.testing.assert_close(w, w_t.float(), atol=1e-6, rtol=0)


def test_full_and_per_sequence_masks():
    torch.manual_seed(2)
    layer = MultiHeadSelfAttention(16, 2, dtype=D64)
    x = torch.randn(2, 6, 16, dtype=D64)
    m3 = torch.rand(2, 6, 6) > 0.4
    m3[:, :, 0] = True
    y3 = layer(x, mask=m3)
    y4 = layer(x, mask=m3[:, None])
    ref, _ = plain_mhsa(layer, x, mask=m3[:, None])
    torch.testing.assert_close(y3, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(y4, ref, atol=1e-10, rtol=0)


def test_fully_masked_rows_give_bias_only_never_nan():
    layer = MultiHeadSelfAttention(8, 2, dtype=D64)
    x = torch.randn(1, 4, 8, dtype=D64)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1:, :] = True
    y, w = layer(x, mask=mask, need_weights=True)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y[0, 0], layer.out.bias)  # attention output 0 -> just the bias
    assert torch.all(w[0, :, 0] == 0)


def test_padding_content_does_not_leak():
    torch.manual_seed(3)
    layer = MultiHeadSelfAttention(16, 4, num_kv_heads=2, causal=False, rope=True)
    x = torch.randn(2, 7, 16)
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[:, 5:] = False
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 2, 16) * 100
    x2[0, 6] = float("nan")  # garbage in a padded slot
    y1, y2 = layer(x, mask=pad), layer(x2, mask=pad)
    torch.testing.assert_close(y1[:, :5], y2[:, :5])


def test_segment_ids_equal_separate_runs():
    torch.manual_seed(4)
    layer = MultiHeadSelfAttention(16, 2, causal=True, dtype=D64)
    a, b = torch.randn(1, 4, 16, dtype=D64), torch.randn(1, 6, 16, dtype=D64)
    packed = layer(torch.cat([a, b], 1), segment_ids=torch.tensor([[0] * 4 + [1] * 6]))
    torch.testing.assert_close(packed[:, :4], layer(a), atol=1e-10, rtol=0)
    torch.testing.assert_close(packed[:, 4:], layer(b), atol=1e-10, rtol=0)


def test_dropout_only_while_training_and_seeded():
    torch.manual_seed(5)
    layer = MultiHeadSelfAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(11)
    y1 = layer(x)
    torch.manual_seed(11)
    y2 = layer(x)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, layer.eval()(x))


def test_gradients_reach_every_parameter():
    torch.manual_seed(6)
    layer = MultiHeadSelfAttention(16, 4, num_kv_heads=2, rope=True, qk_norm=True, causal=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradcheck_through_the_layer():
    torch.manual_seed(7)
    layer = MultiHeadSelfAttention(8, 2, num_kv_heads=1, causal=True, alibi=True, dtype=D64)
    x = torch.randn(1, 5, 8, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))


def test_state_dict_round_trip():
    torch.manual_seed(8)
    kw = {"num_kv_heads": 2, "rope": True, "qk_norm": True, "causal": True}
    a = MultiHeadSelfAttention(16, 4, **kw)
    b = MultiHeadSelfAttention(16, 4, **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 16)
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {
        "qkv.weight", "qkv.bias", "out.weight", "out.bias", "q_norm.weight", "k_norm.weight",
    }  # fmt: skip


def test_reduced_precision_runs():
    layer = MultiHeadSelfAttention(16, 4, num_kv_heads=2, rope=True, dtype=torch.bfloat16)
    y = layer(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"embed_dim": 10, "num_heads": 4}, ValueError, "not divisible"),
        (
            {"embed_dim": 16, "num_heads": 4, "num_kv_heads": 3},
            ValueError,
            "multiple of num_kv_heads",
        ),
        ({"embed_dim": 16, "num_heads": 4, "rope": True, "alibi": True}, ValueError, "rope"),
        ({"embed_dim": 16, "num_heads": 0}, ValueError, "num_heads"),
        ({"embed_dim": 16.0, "num_heads": 4}, TypeError, "embed_dim"),
        ({"embed_dim": 16, "num_heads": 4, "dropout": 1.0}, ValueError, "dropout"),
        ({"embed_dim": 16, "num_heads": 4, "window": (-1, 0)}, ValueError, "window"),
        ({"embed_dim": 16, "num_heads": 4, "rope": True, "head_dim": 5}, ValueError, "even"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MultiHeadSelfAttention(**kwargs)


def test_forward_errors_name_the_problem():
    layer = MultiHeadSelfAttention(16, 4)
    with pytest.raises(ValueError, match=r"E = 16, got \(2, 3, 8\)"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="B, N, E"):
        layer(torch.randn(3, 16))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(2, 3, 16, dtype=D64))
    with pytest.raises(TypeError):
        layer([[1.0] * 16])
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="bool"):
        layer(x, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(B, Nk\) = \(2, 3\)"):
        layer(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=torch.ones(3, dtype=torch.bool))


# -- TransformerBlock ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_block_is_prenorm_residual(norm, mlp):
    torch.manual_seed(9)
    blk = TransformerBlock(16, 4, norm=norm, mlp=mlp, causal=True, dtype=D64)
    x = torch.randn(2, 5, 16, dtype=D64)
    h = x + blk.attn(blk.norm1(x))
    u = blk.fc1(blk.norm2(h))
    if mlp == "swiglu":
        gate, val = u.chunk(2, -1)
        u = gate * torch.sigmoid(gate) * val
    else:
        u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    expect = h + blk.fc2(u)
    torch.testing.assert_close(blk(x), expect, atol=1e-12, rtol=0)
    norm_cls = torch.nn.RMSNorm if norm == "rmsnorm" else torch.nn.LayerNorm
    assert isinstance(blk.norm1, norm_cls)
    hidden = 64 if mlp == "gelu" else 48  # SwiGLU keeps the parameter count: 8E/3 -> 48
    assert blk.fc2.in_features == hidden


def test_block_weights_and_state_dict():
    torch.manual_seed(10)
    a = TransformerBlock(16, 4, num_kv_heads=2, mlp="swiglu", norm="rmsnorm", rope=True)
    b = TransformerBlock(16, 4, num_kv_heads=2, mlp="swiglu", norm="rmsnorm", rope=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 16)
    y, w = a(x, need_weights=True)
    assert torch.equal(y, b(x, need_weights=True)[0]) and w.shape == (2, 4, 6, 6)
    torch.testing.assert_close(y, b(x))  # another backend may run without weights
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 6))


def test_block_errors():
    with pytest.raises(ValueError, match="norm"):
        TransformerBlock(16, 4, norm="batchnorm")
    with pytest.raises(ValueError, match="mlp"):
        TransformerBlock(16, 4, mlp="relu")
    with pytest.raises(ValueError, match="mlp_hidden"):
        TransformerBlock(16, 4, mlp_hidden=0)
