"""The data room: :class:`AttentionMaps` (the probabilities drawn), :func:`maps_from_qk` (from
captured queries and keys, on the fast path) and :func:`attention_rollout` (chained layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checks import index_list

__all__ = ["AttentionMaps", "attention_rollout", "maps_from_qk", "to_numpy"]


def to_numpy(x: Any, what: str) -> np.ndarray:
    """A float64 numpy copy of a tensor or array-like, with a readable error for anything else.

    ``what`` names the argument in the error. Torch tensors are detached and moved to the CPU
    without this module importing torch.
    """
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what} must be an array or tensor of numbers, got {type(x).__name__}"
        ) from exc
    return arr


@dataclass(frozen=True)
class AttentionMaps:
    """Attention probabilities for some layers, heads and query rows of one sequence.

    Attributes:
        weights: float32 (L, H, R, Nk): ``weights[l, h, r, j]`` is the probability with which
            query row ``rows[r]`` of head ``heads[h]`` in layer ``layers[l]`` reads key ``j``.
        tokens: the Nk key tokens.
        layers: the L layer numbers drawn (labels; any ints).
        heads: the H head numbers drawn.
        rows: the R query rows drawn (indices into ``query_tokens``).
        query_tokens: all Nq query tokens; ``tokens`` when None (self-attention, Nq == Nk).
    """

    weights: np.ndarray
    tokens: list[str]
    layers: list[int]
    heads: list[int]
    rows: list[int]
    query_tokens: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        w = to_numpy(self.weights, "weights").astype(np.float32)
        if w.ndim != 4:
            raise ValueError(
                f"weights must be 4-D (layers, heads, rows, keys), got shape {w.shape}"
            )
        n_l, n_h, n_r, n_k = w.shape
        qt = self.tokens if self.query_tokens is None else self.query_tokens
        checks = [
            ("tokens", len(self.tokens), n_k),
            ("layers", len(self.layers), n_l),
            ("heads", len(self.heads), n_h),
            ("rows", len(self.rows), n_r),
        ]
        for name, got, want in checks:
            if got != want:
                raise ValueError(f"{name} has {got} entries but weights {w.shape} needs {want}")
        bad = [r for r in self.rows if not 0 <= r < len(qt)]
        if bad:
            raise ValueError(f"rows {bad} out of range for {len(qt)} query tokens")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "tokens", [str(t) for t in self.tokens])
        object.__setattr__(self, "query_tokens", [str(t) for t in qt])
        object.__setattr__(self, "layers", [int(x) for x in self.layers])
        object.__setattr__(self, "heads", [int(x) for x in self.heads])
        object.__setattr__(self, "rows", [int(x) for x in self.rows])

    def full_square(self) -> bool:
        """Whether every query row of a self-attention (Nq == Nk) is present, in order."""
        n = len(self.tokens)
        return self.rows == list(range(n)) and len(self.query_tokens) == n


def maps_from_qk(
    qk: Mapping[int, tuple[Any, Any, Mapping[str, Any]]]
    | Sequence[tuple[Any, Any, Mapping[str, Any]]],
    tokens: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    heads: Any = None,
    rows: Any = None,
    query_tokens: Sequence[str] | None = None,
) -> AttentionMaps:
    """Probabilities of chosen layers, heads and rows from captured queries and keys.

    Each layer's probabilities come from :func:`selfattn.attention_weights` restricted to
    ``heads`` and ``rows``, so a long sequence costs ``len(heads) * len(rows) * Nk`` numbers per
    layer, never the full (H, N, N).

    Args:
        qk: per layer ``(q, k, rules)``: q (1, Hq, Nq, D), k (1, Hkv, Nk, D) and the keyword
            arguments of :func:`selfattn.attention` that shape the scores (``causal``, ``mask``,
            ``scale``, ...). A mapping from layer number, or a sequence (layers 0, 1, ...).
        tokens: the Nk key tokens.
        layers: which layers of ``qk`` to draw (all when None).
        heads: query heads (int, slice or sequence); all when None.
        rows: query rows; all when None.
        query_tokens: the Nq query tokens when they differ from ``tokens``.

    Returns:
        :class:`AttentionMaps` with weights (L, H, R, Nk).
    """
    import torch

    from ..api import attention_weights

    by_layer = dict(qk) if isinstance(qk, Mapping) else dict(enumerate(qk))
    if not by_layer:
        raise ValueError("qk holds no layer")
    chosen = sorted(by_layer) if layers is None else [int(x) for x in layers]
    missing = [x for x in chosen if x not in by_layer]
    if missing:
        raise ValueError(f"layers {missing} were not captured; captured: {sorted(by_layer)}")
    q0 = by_layer[chosen[0]][0]
    if q0.shape[0] != 1:
        raise ValueError(
            f"maps_from_qk draws one sequence: q must have batch 1, got {tuple(q0.shape)}"
        )
    n_heads, n_rows = q0.shape[1], q0.shape[2]
    head_list = list(range(n_heads)) if heads is None else index_list(heads, n_heads, "heads")
    row_list = list(range(n_rows)) if rows is None else index_list(rows, n_rows, "rows")
    out = []
    for layer in chosen:
        q, k, rules = by_layer[layer]
        w = attention_weights(q, k, heads=head_list, rows=row_list, **dict(rules))
        out.append(w[0].to(torch.float32).cpu().numpy())  # (H, R, Nk)
    return AttentionMaps(
        weights=np.stack(out),
        tokens=list(tokens),
        layers=chosen,
        heads=head_list,
        rows=row_list,
        query_tokens=None if query_tokens is None else list(query_tokens),
    )


# -- attention rollout -----------------------------------------------------------------------------


def attention_rollout(
    weights: AttentionMaps | Any, *, residual: float = 0.5, head_fusion: str = "mean"
) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input.

    Each layer's heads are fused (mean, max or min), the residual connection is modelled by
    ``A' = residual * I + (1 - residual) * A`` with rows renormalised, and the layers are chained:
    ``R = A'_L @ ... @ A'_1``.

    Args:
        weights: :class:`AttentionMaps` holding every query row, or an array (L, H, N, N) (or a
            sequence of L arrays (H, N, N)) in layer order, first layer first.
        residual: weight of the identity (0 ignores the residual stream).
        head_fusion: "mean", "max" or "min".

    Returns:
        (N, N) float64: row i is the share of output token i coming from each input token.
    """
    if isinstance(weights, AttentionMaps):
        if not weights.full_square():
            raise ValueError("rollout needs every query row of a self-attention (rows=None)")
        w = weights.weights.astype(np.float64)
    else:
        w = to_numpy(weights, "weights")
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"rollout needs (layers, heads, N, N) probabilities, got shape {w.shape}")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must lie in [0, 1], got {residual}")
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}.get(head_fusion)
    if fuse is None:
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    n = w.shape[-1]
    eye = np.eye(n)
    out = eye
    for layer in w:  # (H, N, N), first layer first
        a = residual * eye + (1.0 - residual) * fuse(layer, axis=0)
        a = a / np.maximum(a.sum(axis=-1, keepdims=True), 1e-30)  # rows of masked tokens stay 0
        out = a @ out
    return out
