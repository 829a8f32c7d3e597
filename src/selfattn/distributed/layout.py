"""Layouts of a sharded sequence (contiguous and zigzag), and ``shard`` / ``unshard``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .group import group_info, meta_device
from .meta import LAYOUTS, agree, code, even, same, shape_code

__all__ = ["check_layout", "natural_order", "runs", "shard", "unshard"]


def check_layout(layout: Any, what: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{what}: layout must be 'zigzag' or 'contiguous', got {layout!r}")
    return layout


def runs(layout: str, rank: int, world: int, n: int) -> list[tuple[int, int, int]]:
    """The local shard as runs ``(row0, pos0, length)``: local rows ``[row0, row0 + length)``
    hold the global positions ``[pos0, pos0 + length)``.

    ``contiguous``: rank r holds ``[r*n, (r+1)*n)``. ``zigzag``: the sequence is cut into 2W
    chunks of ``c = n/2`` and rank r holds chunks ``r`` and ``2W-1-r``::

        W = 2, n = 4:   positions 0 1 | 2 3 | 4 5 | 6 7
                        chunk     0   | 1   | 2   | 3
                        rank      0   | 1   | 1   | 0
    """
    if layout == "contiguous":
        return [(0, rank * n, n)]
    c = n // 2
    return [(0, rank * c, c), (c, (2 * world - 1 - rank) * c, c)]


def natural_order(layout: str, world: int, n: int, device: torch.device) -> torch.Tensor:
    """Index into the rank-ordered concatenation of shards that yields positions 0..W*n-1."""
    perm = torch.empty(world * n, dtype=torch.int64)
    for r in range(world):
        for row0, pos0, length in runs(layout, r, world, n):
            perm[pos0 : pos0 + length] = torch.arange(r * n + row0, r * n + row0 + length)
    return perm.to(device)


def _check_dim(x: Any, dim: Any, what: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{what}: dim must be an int, got {dim!r}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"{what}: dim={dim} is out of range for a {x.dim()}-D tensor {tuple(x.shape)}"
        )
    return dim % x.dim()


def shard(
    x: torch.Tensor, *, dim: int = 2, group: Any = None, layout: str = "zigzag"
) -> torch.Tensor:
    """This rank's part of a full sequence (no communication; differentiable).

    Args:
        x: the whole tensor, the same on every rank, e.g. q (B, H, N, D) with ``dim=2`` or
            segment ids (B, N) with ``dim=1``.
        dim: the sequence dimension.
        group: the process group (default: the world).
        layout: ``"contiguous"`` (rank r holds ``[r*n, (r+1)*n)``) or ``"zigzag"`` (the sequence
            is cut into 2W chunks and rank r holds chunks r and 2W-1-r, which balances causal
            work).

    Returns:
        The local shard, ``N / W`` long along ``dim``.

    Raises:
        ValueError: N is not a multiple of W (contiguous) or of 2W (zigzag).
    """
    dim = _check_dim(x, dim, "shard")
    layout = check_layout(layout, "shard")
    rank, world = group_info(group, "shard")
    total = x.shape[dim]
    parts = world if layout == "contiguous" else 2 * world
    if total % parts:
        raise ValueError(
            f"shard: layout={layout!r} cuts the sequence into {parts} equal parts for "
            f"{world} ranks, but its length along dim {dim} is {total}; pad it to a multiple of "
            f"{parts}"
        )
    n = total // world
    pieces = [x.narrow(dim, pos0, length) for _, pos0, length in runs(layout, rank, world, n)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


class _Gather(torch.autograd.Function):
    """All-gather of equal shards; the gradient keeps this rank's slice of the incoming one."""

    @staticmethod
    def forward(ctx, x, dim, group, layout, rank, world):  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        n = x.shape[dim]
        order = natural_order(layout, world, n, x.device)
        ctx.dim, ctx.n, ctx.runs = dim, n, runs(layout, rank, world, n)
        return torch.cat(parts, dim).index_select(dim, order)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pieces = [grad.narrow(ctx.dim, pos0, length) for _, pos0, length in ctx.runs]
        return torch.cat(pieces, ctx.dim), None, None, None, None, None


def unshard(
    x: torch.Tensor, *, dim: int = 2, group: Any = None, layout: str = "zigzag"
) -> torch.Tensor:
    """The inverse of :func:`shard`: all-gather the shards of every rank in sequence order.

    Every rank must call it. Shapes and dtypes are compared first (one small all-gather), so
    unequal shards raise ``ValueError`` on every rank instead of leaving one waiting.

    Gradient: every rank is assumed to compute the same function of the gathered tensor, so the
    gradient of ``x`` is this rank's slice of the incoming gradient (no sum over ranks).

    Args:
        x: the local shard, n long along ``dim``.
        dim, group, layout: as in :func:`shard`.

    Returns:
        The full tensor, ``W * n`` long along ``dim``, on every rank.
    """
    error = None
    try:
        dim = _check_dim(x, dim, "unshard")
        layout = check_layout(layout, "unshard")
    except (TypeError, ValueError) as exc:
        error = exc
    rank, world = group_info(group, "unshard")
    ok = error is None
    fields = {
        "ndim": x.dim() if ok else 0,
        "dim": dim if ok else 0,
        "n": x.shape[dim] if ok else 0,
        "shape": shape_code(x.shape) if ok else 0,
        "dtype": code(x.dtype) if ok else 0,
        "layout": LAYOUTS.index(layout) if ok else 0,
    }
    table = agree(fields, error, group, meta_device(group, x), "unshard")
    for key, label in (("dim", "dim"), ("layout", "layout"), ("dtype", "dtype")):
        same(table, key, label, "unshard")
    same(table, "ndim", "number of dimensions", "unshard")
    same(table, "n", f"shard length along dim {dim}", "unshard")
    same(table, "shape", "shape (apart from the sequence dim)", "unshard")
    if layout == "zigzag":
        even(table, "unshard")
    return _Gather.apply(x, dim, group, layout, rank, world)
