"""The engine's unit of work: one (part of a) call, its dropout numbering and its bad keys.

A :class:`Problem` is an :class:`~selfattn.spec.AttentionSpec` plus what the engine derives for
it: where its rows sit in the full call (so every part of a split problem draws exactly the
dropout mask the whole would) and which keys hold NaN/inf (padding garbage to keep out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..spec import AttentionSpec, cut

__all__ = ["BLOCK_N", "ROWS_PER_TILE", "Dropout", "Problem", "acc_dtype", "all_finite", "bad_keys"]

# scale / softcap beyond this is not folded into q (q * 2**64 could overflow: inf * 0 = NaN in
# the matrix product); q then holds the scale alone and the scores are divided by the softcap
FOLD_MAX = 2.0**64

# Rows of one tile (query rows x query heads sharing a key/value head) and keys per chunk.
# Measured on a 2-core AVX2 machine (benchmarks/cpu.py): tiles of ~256 x 512 fp32 scores keep
# the per-op Python overhead small while the tile stays close to the L2/L3 caches.
ROWS_PER_TILE = 256
BLOCK_N = 512


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation, float64 for float64 inputs (docs/api.md, shapes and dtypes)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Dropout:
    """The dropout of a (sub-)problem: the seed, ``p``, and where the problem sits in the call.

    Rows are numbered ``((b0 + b) * hq_total + h0 + h) * nq_total + r0 + i`` as in the full call.
    """

    seed: tuple[int, int]
    p: float
    hq_total: int
    nq_total: int
    b0: int = 0
    h0: int = 0
    r0: int = 0


@dataclass(frozen=True)
class Problem:
    """q (B, Hq, Nq, D) against k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) under ``spec``'s rules.

    ``bad`` (B, Hkv, Nk) marks keys that are zeroed before use and whose visible scores become
    NaN; ``vbad`` (B, Hkv, Nk) keys whose value row alone is zeroed, for the forward to add
    back to the rows that see them (see :func:`sanitize`).
    """

    spec: AttentionSpec
    dropout: Dropout | None = None
    bad: torch.Tensor | None = None
    vbad: torch.Tensor | None = None

    @staticmethod
    def of(spec: AttentionSpec, seed: tuple[int, int] | None) -> Problem:
        """The problem of a whole validated call (``seed`` for dropout)."""
        drop = None
        if spec.dropout_p > 0:
            drop = Dropout(seed, spec.dropout_p, spec.Hq, spec.Nq)
        return Problem(spec, drop)

    def part(self, b0: int, b1: int, kh0: int, kh1: int, r0: int, r1: int) -> Problem:
        """The sub-problem of batch [b0, b1), key/value heads [kh0, kh1), rows [r0, r1)."""
        drop = self.dropout
        if drop is not None:
            g = self.spec.group
            drop = replace(drop, b0=drop.b0 + b0, h0=drop.h0 + kh0 * g, r0=drop.r0 + r0)
        return Problem(
            self.spec.part(b0, b1, kh0, kh1, r0, r1),
            drop,
            cut(self.bad, (b0, b1), (kh0, kh1)),
            cut(self.vbad, (b0, b1), (kh0, kh1)),
        )

    @property
    def qscale(self) -> float:
        """What q is multiplied by so that ``q @ k^T`` is the score or ``s / softcap``.

        Scores are natural-log units: the row maximum is subtracted before ``exp``, so a score
        near the float32 maximum (a bias of 3e38) never overflows. A tiny softcap is not folded
        (see ``cap_div``).
        """
        spec = self.spec
        if self.cap_div:
            return spec.scale
        if spec.softcap is not None:
            return spec.scale / spec.softcap
        return spec.scale

    @property
    def cap_div(self) -> bool:
        """Whether the scores are divided by the softcap after the matrix product."""
        spec = self.spec
        return spec.softcap is not None and spec.scale / spec.softcap > FOLD_MAX

    def block_m(self) -> int:
        """Query rows per block: ``ROWS_PER_TILE`` rows of scores across the query heads of a
        key/value head; under a narrow window, fewer, since a block of ``m`` rows reads
        ``window + m`` keys for ``window`` useful ones."""
        spec = self.spec
        rows = ROWS_PER_TILE
        widths = [w for w in (spec.left, spec.right) if w is not None]
        if len(widths) == 2 or (widths and spec.causal):
            rows = min(rows, max(64, sum(widths) // 4))
        return max(1, rows // spec.group)

    def sanitize(
        self, k: torch.Tensor, v: torch.Tensor | None, values_apart: bool = False
    ) -> tuple[Problem, torch.Tensor, torch.Tensor | None]:
        """Zero non-finite keys/values that a rule may hide, and mark them (see ``bad_keys``).

        By default a key whose k or v row is not finite gets NaN scores where visible (the
        backward: rows that see it get NaN gradients). With ``values_apart`` (the forward), a
        bad value row alone keeps its key's scores: it is zeroed and marked in ``vbad``, and
        the forward adds its non-finite entries back to the rows that see it, so NaN in
        ``v[j, c]`` poisons column c only and never the lse (docs/api.md).
        """
        kbad, vbad = bad_keys(k, v, self.spec)
        if kbad is None and vbad is None:
            return self, k, v
        if values_apart:
            keys = kbad
            values = vbad if kbad is None or vbad is None else vbad & ~kbad
            values = values if values is not None and bool(values.any()) else None
        else:
            keys = kbad if vbad is None else (vbad if kbad is None else kbad | vbad)
            values = None
        if keys is not None:
            k = torch.where(keys[..., None], 0, k)
        zero_v = keys if not values_apart else vbad
        if v is not None and zero_v is not None:
            v = torch.where(zero_v[..., None], 0, v)
        return replace(self, bad=keys, vbad=values), k, v


def all_finite(*tensors: torch.Tensor | None) -> bool:
    """True when no tensor holds NaN/inf: one cheap sum each, the exact check only if it overflows."""
    for t in tensors:
        # a finite sum means every entry is finite (read as a Python float: torch.isfinite is
        # several ops, and this runs before every small causal SDPA call)
        if t is None or math.isfinite(float(t.detach().sum())):
            continue
        if not bool(torch.isfinite(t).all()):
            return False
    return True


def bad_keys(
    k: torch.Tensor, v: torch.Tensor | None, spec: AttentionSpec
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(kbad, vbad)``: (B, Hkv, Nk) True where the k row / the v row holds NaN/inf (None where
    none does), when some key may be hidden from a row.

    Such rows are zeroed before use, so padding garbage never leaks into rows that cannot see it
    (0 * NaN is NaN in a matrix product), while rows that do see it still get what the
    specification says (see ``Problem.sanitize``).
    """
    if not spec.restricts:
        return None, None  # every row sees every key: non-finite values propagate as they should
    if all_finite(k, v):
        return None, None
    kbad = ~torch.isfinite(k).all(-1)
    vbad = ~torch.isfinite(v).all(-1) if v is not None else None
    return (
        kbad if bool(kbad.any()) else None,
        vbad if vbad is not None and bool(vbad.any()) else None,
    )
