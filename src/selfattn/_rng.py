"""Dropout masks from a counter-based hash: the torch twin of ``reference.dropout_keep``.

A mask is never stored. Forward and backward (and every backend) regenerate entry ``(row, col)``
from ``seed``, the global row id ``(b * Hq + h) * Nq + i`` and the key index ``j``, so tiles of
any size see the same mask. The seed is drawn from torch's CPU generator, so
``torch.manual_seed`` makes dropout reproducible.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def seed_tensor() -> torch.Tensor:
    """Two 32-bit words from torch's default (CPU) generator, as an int64 tensor (2,)."""
    return torch.randint(0, 2**32, (2,), dtype=torch.int64)


def draw_seed() -> tuple[int, int]:
    """Two 32-bit words from torch's default (CPU) generator."""
    words = seed_tensor().tolist()
    return int(words[0]), int(words[1])


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """In-place 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    x.bitwise_xor_(x >> 16)
    x.mul_(0x7FEB352D).bitwise_and_(_M32)  # int64 products wrap; the low 32 bits are exact
    x.bitwise_xor_(x >> 15)
    x.mul_(0x846CA68B).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16)
    return x


def threshold(dropout_p: float) -> int:
    """Keep an entry when its 32-bit hash is at least this."""
    return min(int(dropout_p * 2.0**32), 2**32 - 1)


def keep_mask(
    seed: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """Boolean keep mask of shape ``rows.shape + cols.shape``-broadcast (rows (..., R, 1), cols (C,)).

    Args:
        seed: two 32-bit words from :func:`draw_seed`.
        rows: int64 global row ids, shaped to broadcast against ``cols`` (e.g. (R, 1)).
        cols: int64 key indices (e.g. (C,)).
        dropout_p: drop probability.
    """
    hr = _mix32_((rows * 0x9E3779B9 + (seed[0] & _M32)).bitwise_and_(_M32))
    hc = (cols * 0x85EBCA6B + (seed[1] & _M32)).bitwise_and_(_M32)
    h = _mix32_(torch.bitwise_xor(hr, hc))
    return h >= threshold(dropout_p)
