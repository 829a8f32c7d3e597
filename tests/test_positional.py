"""Positional encodings: sinusoidal table, RoPE, ALiBi slopes, each against its own formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfattn import RotaryEmbedding, alibi_slopes, sinusoidal_positions

# -- sinusoidal ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, dim", [(1, 1), (7, 6), (50, 33), (97, 64)])
def test_sinusoidal_matches_the_paper(n, dim):
    table = sinusoidal_positions(n, dim, dtype=torch.float64).numpy()
    expect = np.zeros((n, dim))
    for pos in range(n):
        for i in range(dim):
            angle = pos / 10000 ** ((i - i % 2) / dim)
            expect[pos, i] = math.sin(angle) if i % 2 == 0 else math.cos(angle)
    np.testing.assert_allclose(table, expect, atol=1e-12)


def test_sinusoidal_dtype_device_and_empty():
    t = sinusoidal_positions(5, 8)
    assert t.dtype == torch.float32 and t.shape == (5, 8)
    assert sinusoidal_positions(0, 8).shape == (0, 8)
    assert sinusoidal_positions(3, 4, dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize(
    "args, exc",
    [((-1, 4), ValueError), ((3, 0), ValueError), ((3.0, 4), TypeError), ((3, True), TypeError)],
)
def test_sinusoidal_errors(args, exc):
    with pytest.raises(exc):
        sinusoidal_positions(*args)


# -- RoPE ------------------------------------------------------------------------------------------


def _rope_complex(x: np.ndarray, pos: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """RoPE as complex multiplication: channel c pairs with c + D/2 (the rotate-half layout)."""
    d = x.shape[-1]
    half = d // 2
    theta = base ** (-np.arange(half) * 2.0 / d)  # (D/2,)
    z = x[..., :half] + 1j * x[..., half:]
    z = z * np.exp(1j * pos[..., None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_complex_rotation():
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 3, 11, 16, dtype=torch.float64)
    pos = torch.arange(5, 16)
    got = rope(x, pos).numpy()
    np.testing.assert_allclose(got, _rope_complex(x.numpy(), pos.numpy()), atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(32)
    q = torch.randn(1, 1, 1, 32, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def score(m, n):
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum().item()

    assert score(3, 1) == pytest.approx(score(103, 101), abs=1e-4)
    assert score(7, 7) == pytest.approx((q * k).sum().item(), abs=1e-5)  # distance 0: no rotation
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_rope_positions_forms_agree():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 4, 6, 8)
    default = rope(x)
    assert torch.allclose(default, rope(x, torch.arange(6)))
    assert torch.allclose(rope(x, 4), rope(x, torch.arange(4, 10)))
    per_batch = torch.stack([torch.arange(6), torch.arange(10, 16)])  # (B, N)
    both = rope(x, per_batch)
    assert torch.allclose(both[0], rope(x[:1], torch.arange(6))[0], atol=1e-6)
    assert torch.allclose(both[1], rope(x[1:], torch.arange(10, 16))[0], atol=1e-6)


def test_rope_keeps_dtype_and_norm():
    rope = RotaryEmbedding(64)
    x = torch.randn(2, 2, 9, 64, dtype=torch.bfloat16)
    y = rope(x, 1000)
    assert y.dtype == torch.bfloat16
    x32 = x.float()
    y32 = rope(x32, 1000)
    assert torch.allclose(y32.norm(dim=-1), x32.norm(dim=-1), rtol=1e-5)


def test_rope_survives_half_precision_cast():
    """The frequencies are computed on demand, so casting a module to bf16 cannot round them."""
    rope = RotaryEmbedding(16).to(torch.bfloat16)
    assert rope.inv_freq().dtype == torch.float32
    assert list(rope.state_dict()) == []


def test_rope_errors():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match="head_dim = 8"):
        rope(torch.randn(1, 1, 3, 6))
    with pytest.raises(ValueError, match=r"\(N,\) or \(B, N\)"):
        rope(torch.randn(1, 1, 3, 8), torch.arange(4))
    with pytest.raises(TypeError, match="integers"):
        rope(torch.randn(1, 1, 3, 8), torch.arange(3.0))
    with pytest.raises(TypeError):
        rope(torch.arange(8).view(1, 1, 1, 8))


# -- ALiBi -----------------------------------------------------------------------------------------


def test_alibi_power_of_two():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(1), torch.tensor([2.0**-8]))
    assert torch.allclose(alibi_slopes(2), torch.tensor([2.0**-4, 2.0**-8]))


def test_alibi_other_head_counts_follow_the_paper():
    # 6 heads: the 4-head slopes (2^-2, 2^-4, 2^-6, 2^-8), then the odd-numbered 8-head
    # slopes (2^-1, 2^-3, ...) until there are 6
    expect = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    assert torch.allclose(alibi_slopes(6), torch.tensor(expect))
    for n in (3, 5, 12, 24, 40):
        s = alibi_slopes(n)
        assert s.shape == (n,) and s.dtype == torch.float32
        assert len(set(s.tolist())) == n and bool((s > 0).all() and (s < 1).all())


def test_alibi_errors():
    with pytest.raises(ValueError):
        alibi_slopes(0)
    with pytest.raises(TypeError):
        alibi_slopes(4.0)
