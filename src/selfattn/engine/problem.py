"""The engine's unit of work: one (part of a) call, its dropout numbering and its bad keys.

A :class:`Problem` is an :class:`~selfattn.spec.AttentionSpec` plus what the engine derives for
it: where its rows sit in the full call (so every part of a split problem draws exactly the
dropout mask the whole would) and which keys hold NaN/inf (padding garbage to keep out).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..constants import LOG2E
from ..spec import AttentionSpec, cut

__all__ = ["BLOCK_N", "ROWS_PER_TILE", "Dropout", "Problem", "acc_dtype", "all_finite", "bad_keys"]

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

    ``bad`` (B, Hkv, Nk) marks keys whose k or v is not finite; they are zeroed before use and
    their visible scores set to NaN (see :func:`sanitize`).
    """

    spec: AttentionSpec
    dropout: Dropout | None = None
    bad: torch.Tensor | None = None

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
            self.spec.part(b0, b1, kh0, kh1, r0, r1), drop, cut(self.bad, (b0, b1), (kh0, kh1))
        )

    @property
    def qscale(self) -> float:
        """What q is multiplied by so that ``q @ k^T`` is the score (base 2) or ``s / softcap``."""
        spec = self.spec
        if spec.softcap is not None:
            return spec.scale / spec.softcap
        return spec.scale * LOG2E

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
        self, k: torch.Tensor, v: torch.Tensor | None
    ) -> tuple[Problem, torch.Tensor, torch.Tensor | None]:
        """Zero non-finite keys/values that a rule may hide, and mark them (see ``bad_keys``)."""
        bad = bad_keys(k, v, self.spec)
        if bad is None:
            return self, k, v
        k = torch.where(bad[..., None], 0, k)
        v = torch.where(bad[..., None], 0, v) if v is not None else None
        return replace(self, bad=bad), k, v


def all_finite(*tensors: torch.Tensor | None) -> bool:
    """True when no tensor holds NaN/inf: one cheap sum each, the exact check only if it overflows."""
    for t in tensors:
        if t is None or bool(torch.isfinite(t.sum())):
            continue  # a finite sum means every entry is finite
        if not bool(torch.isfinite(t).all()):
            return False
    return True


def bad_keys(k: torch.Tensor, v: torch.Tensor | None, spec: AttentionSpec) -> torch.Tensor | None:
    """(B, Hkv, Nk) True where k or v holds NaN/inf, when some key may be hidden from a row.

    Such keys are zeroed before use and their visible scores set to NaN, so padding garbage never
    leaks into rows that cannot see it (0 * NaN is NaN in a matrix product) while rows that do
    see it still get NaN, as in the specification.
    """
    if not spec.restricts:
        return None  # every row sees every key: non-finite values propagate as they should
    if all_finite(k, v):
        return None
    bad = ~torch.isfinite(k).all(-1)
    if v is not None:
        bad |= ~torch.isfinite(v).all(-1)
    return bad if bool(bad.any()) else None
