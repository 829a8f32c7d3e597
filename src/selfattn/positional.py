"""Positional encodings: sinusoidal tables (Vaswani et al., 2017), rotary embeddings (RoPE, Su et
al., 2021) and the ALiBi head slopes (Press et al., 2022).

Attention itself is blind to order; these are the three common ways of telling it where a token is.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import checks

__all__ = ["RotaryEmbedding", "alibi_slopes", "sinusoidal_positions"]


def sinusoidal_positions(
    n: int,
    dim: int,
    *,
    base: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The fixed sinusoidal position table of "Attention Is All You Need".

    ``P[pos, 2i] = sin(pos / base^(2i / dim))`` and ``P[pos, 2i + 1] = cos(pos / base^(2i / dim))``.
    An odd ``dim`` ends with a sine column.

    Args:
        n: number of positions (rows), ``>= 0``.
        dim: embedding width (columns), ``>= 1``.
        base: wavelength base (10000 in the paper).
        dtype: result dtype (computed in float64, then cast).
        device: result device.

    Returns:
        (n, dim) tensor, added to token embeddings.

    Raises:
        TypeError / ValueError: ``n`` or ``dim`` not a non-negative / positive int, bad ``base``.
    """
    n = checks.integer("n", n, minimum=0)
    dim = checks.integer("dim", dim)
    if not (isinstance(base, numbers.Real) and base > 1):
        raise ValueError(f"base must be a number > 1, got {base!r}")
    pos = torch.arange(n, dtype=torch.float64)[:, None]  # (n, 1)
    # inverse wavelength of the pair of columns (2i, 2i+1)
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(base) / dim))
    angle = pos * inv  # (n, ceil(dim / 2))
    table = torch.empty(n, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return table.to(dtype=dtype, device=device)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), rotating pairs of channels by position-dependent angles.

    Channel ``c`` and channel ``c + D/2`` form a pair (the "rotate half" layout of GPT-NeoX and
    Llama) rotated by ``pos * base^(-2c / D)``. The dot product of a rotated query at position
    ``m`` and a rotated key at position ``n`` then depends on ``m - n`` only, which is why
    positions may start anywhere: a KV cache rotates each key once, at its own position.

    Args:
        head_dim: D, the per-head width; must be even.
        base: the frequency base (10000 in the paper).
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        head_dim = checks.integer("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding needs an even head_dim, got {head_dim}")
        if not (isinstance(base, numbers.Real) and base > 1):
            raise ValueError(f"base must be a number > 1, got {base!r}")
        self.head_dim = head_dim
        self.base = float(base)

    def inv_freq(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The pair frequencies ``base^(-2c / D)``, (D/2,) in ``dtype``.

        Computed on demand rather than stored, so casting the model to half precision never
        rounds them.
        """
        exponent = torch.arange(0, self.head_dim, 2, dtype=dtype, device=device) / self.head_dim
        return self.base**-exponent

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles in ``dtype``, shape ``positions.shape + (D,)``."""
        freq = self.inv_freq(positions.device, dtype)
        angle = positions.to(dtype)[..., None] * freq  # (..., N, D/2)
        angle = torch.cat((angle, angle), dim=-1)  # (..., N, D): both halves of a pair
        return angle.cos(), angle.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor | int | None = None) -> torch.Tensor:
        """Rotate queries or keys.

        Args:
            x: (B, H, N, D) (or any (..., N, D)) queries or keys.
            positions: int positions, (N,) shared by the batch or (B, N) one row per sequence
                (broadcast over the heads of a 4-D ``x``); an int ``start`` means
                ``start .. start + N - 1``; None means ``0 .. N - 1``.

        Returns:
            Tensor like ``x`` (same dtype), rotated. The rotation is computed in float32
            (float64 for float64 input).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x must be (..., N, D) with D = head_dim = {self.head_dim}, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor, got {x.dtype}")
        n = x.shape[-2]
        pos = self._positions(positions, n, x)
        # float32 maths for half-precision input (angles of large positions need it)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.cos_sin(pos, compute)  # (N, D) or (B, N, D)
        if pos.dim() == 2 and x.dim() == 4:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, N, D): shared by the heads
        xf = x.to(compute)
        half = self.head_dim // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)  # "rotate half"
        return (xf * cos + rotated * sin).to(x.dtype)

    def _positions(
        self, positions: torch.Tensor | int | None, n: int, x: torch.Tensor
    ) -> torch.Tensor:
        if positions is None:
            return torch.arange(n, device=x.device)
        if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
            return torch.arange(int(positions), int(positions) + n, device=x.device)
        if not isinstance(positions, torch.Tensor):
            raise TypeError(
                f"positions must be an int tensor, an int or None, got {type(positions).__name__}"
            )
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"positions must hold integers, got {positions.dtype}")
        if positions.dim() == 1:
            ok = positions.shape[0] == n
        elif positions.dim() == 2:
            ok = positions.shape[1] == n and (x.dim() != 4 or positions.shape[0] in (1, x.shape[0]))
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"positions must be (N,) or (B, N) with N = {n}"
                + (f", B = {x.shape[0]}" if x.dim() == 4 else "")
                + f"; got {tuple(positions.shape)} for x of shape {tuple(x.shape)}"
            )
        return positions.to(x.device)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The head-specific ALiBi slopes of Press et al. (2022).

    For ``n`` a power of two the slopes are the geometric sequence ``2^(-8/n), 2^(-16/n), ...,
    2^(-8)``. Otherwise the paper's recipe: the slopes of the closest smaller power of two ``m``,
    followed by every other slope of ``2m`` (the odd-numbered ones) until there are ``n``.

    Args:
        num_heads: number of attention heads, ``>= 1``.

    Returns:
        float32 (num_heads,), for ``attention(..., alibi_slopes=...)``.
    """
    num_heads = checks.integer("num_heads", num_heads)

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    m = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(m)
    if m < num_heads:
        slopes += geometric(2 * m)[0::2][: num_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)
