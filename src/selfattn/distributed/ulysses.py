"""Ulysses attention (Jacobs et al., 2023, DeepSpeed-Ulysses): swap sequence shards for head
shards with one all-to-all, run plain :func:`selfattn.attention` on whole sequences, swap back.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from ..api import attention, check_backend
from ..spec import validate
from .group import EXCHANGES, group_info
from .layout import check_layout, natural_order
from .meta import check_shards, local_spec

__all__ = ["ulysses_attention"]


class _AllToAll(torch.autograd.Function):
    """``to_heads``: a (B, H, n, X) sequence shard -> a (B, H/W, W*n, X) head shard in rank
    order; otherwise back. The gradient takes the other way."""

    @staticmethod
    def forward(ctx, x, group, world, to_heads):  # type: ignore[override]
        ctx.group, ctx.world, ctx.to_heads = group, world, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, world)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        back = _heads_to_seq if ctx.to_heads else _seq_to_heads
        return back(grad, ctx.group, ctx.world), None, None, None


def _seq_to_heads(x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    b, h, n, d = x.shape
    send = x.reshape(b, world, h // world, n, d).transpose(0, 1).contiguous()  # (W, B, h, n, D)
    recv = torch.empty_like(send)  # recv[r] = rank r's positions of this rank's heads
    EXCHANGES["all_to_all"] += 1
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * n, d)


def _heads_to_seq(x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    b, hw, total, d = x.shape
    n = total // world
    send = x.reshape(b, hw, world, n, d).permute(2, 0, 1, 3, 4).contiguous()  # (W, B, h, n, D)
    recv = torch.empty_like(send)  # recv[r] = this rank's positions of rank r's heads
    EXCHANGES["all_to_all"] += 1
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(b, world * hw, n, d)


def _heads(t: torch.Tensor, dim: int, full: int, rank: int, world: int) -> torch.Tensor:
    """The slice of a per-head tensor that belongs to this rank's heads (broadcast dims kept)."""
    if t.shape[dim] == 1 and full != 1:
        return t
    part = full // world
    return t.narrow(dim, rank * part, part)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Any = None,
    layout: str = "zigzag",
    **attention_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a sharded sequence by swapping sequence shards for head shards.

    One all-to-all gives each rank ``Hq/W`` query heads (and ``Hkv/W`` key/value heads) over the
    whole sequence; :func:`selfattn.attention` runs there with any rule; a second all-to-all
    brings the output (and lse) back to sequence shards. Memory per rank is that of one full-
    length attention over ``H/W`` heads.

    Args:
        q: (B, Hq, n, D), k: (B, Hkv, n, D), v: (B, Hkv, n, Dv): this rank's shards.
        group: the process group (default: the world).
        layout: how the sequence was sharded (``"zigzag"`` or ``"contiguous"``).
        **attention_kwargs: any keyword of :func:`selfattn.attention`. ``mask``, ``bias``,
            ``alibi_slopes`` and ``sinks`` describe the *whole* problem (every rank passes the
            same, e.g. bias (B, Hq, N, N)); each rank uses its heads. ``segment_ids`` is this
            rank's shard (B, n) or a pair of shards. ``bias``/``alibi_slopes``/``sinks``
            gradients cover only this rank's heads: all-reduce (sum) them as for any replicated
            parameter. Dropout masks differ from a single-process run's (the heads are numbered
            per rank).

    Returns:
        ``out`` (B, Hq, n, Dv), or ``(out, lse)`` with ``return_lse=True``.

    Raises:
        ValueError: on every rank, before any exchange, when ``Hq`` or ``Hkv`` is not a multiple
            of the world size, when inputs differ across ranks, or when any rank's input is
            invalid (the message names the rank).
    """
    what = "ulysses_attention"
    rank, world = group_info(group, what)
    error, spec = None, None
    kw = dict(attention_kwargs)
    seg = kw.pop("segment_ids", None)
    try:
        layout = check_layout(layout, what)
        check_backend(kw.get("backend", "auto"))
        spec = local_spec(q, k, v, False, None, seg, None, what)
        total = spec.Nq * world
        # the rules describe the whole sequence: check them against zero-stride full-size views
        full_q = q.new_zeros(()).expand(spec.B, spec.Hq, total, spec.D)
        full_k = k.new_zeros(()).expand(spec.B, spec.Hkv, total, spec.D)
        full_v = v.new_zeros(()).expand(spec.B, spec.Hkv, total, spec.Dv)
        check = {key: val for key, val in kw.items() if key != "backend"}
        validate(full_q, full_k, full_v, **check)
    except (TypeError, ValueError) as exc:
        error = exc
    options = repr(sorted((key, _describe(val)) for key, val in kw.items()))
    check_shards(
        spec,
        layout,
        seg,
        {"options": "attention keywords (causal, window, scale, ... and tensor shapes)"},
        lambda _: {"options": zlib.crc32(options.encode())},
        error,
        group,
        q,
        what,
    )
    if spec.Hq % world or spec.Hkv % world:
        raise ValueError(
            f"{what}: the heads are split over W = {world} ranks, so Hq and Hkv must be "
            f"multiples of {world}, got Hq={spec.Hq}, Hkv={spec.Hkv}; use ring_attention instead"
        )

    n = spec.Nq
    order = natural_order(layout, world, n, q.device)  # rank order -> positions 0..N-1
    back = torch.argsort(order)
    if seg is not None:
        seg = _gather_ids(spec, seg, group, world, order)
    for name in ("mask", "bias"):
        if kw.get(name) is not None:
            t4 = kw[name].reshape((1,) * (4 - kw[name].dim()) + tuple(kw[name].shape))
            kw[name] = _heads(t4, 1, spec.Hq, rank, world)  # broadcastable to (B, Hq/W, N, N)
    for name in ("alibi_slopes", "sinks"):  # per query head: (Hq,) or (B, Hq)
        per_head = kw.get(name)
        if per_head is not None:
            kw[name] = _heads(per_head, per_head.dim() - 1, spec.Hq, rank, world)
    return_lse = kw.pop("return_lse", False)

    qh = _AllToAll.apply(q, group, world, True).index_select(2, order)  # (B, Hq/W, N, D)
    kh = _AllToAll.apply(k, group, world, True).index_select(2, order)  # (B, Hkv/W, N, D)
    vh = _AllToAll.apply(v, group, world, True).index_select(2, order)  # (B, Hkv/W, N, Dv)
    res = attention(qh, kh, vh, segment_ids=seg, return_lse=True, **kw)
    out_h, lse_h = res
    out = _AllToAll.apply(out_h.index_select(2, back), group, world, False)  # (B, Hq, n, Dv)
    if not return_lse:
        return out
    lse = _AllToAll.apply(lse_h.index_select(2, back)[..., None], group, world, False)[..., 0]
    return out, lse


def _describe(val: Any) -> Any:
    """What must agree across ranks about a keyword: its value, or a tensor's shape and dtype."""
    if isinstance(val, torch.Tensor):
        return ("tensor", tuple(val.shape), str(val.dtype))
    return val


def _gather_ids(spec, seg, group, world, order):
    """All-gather the segment-id shards into whole-sequence ids (B, N) in position order."""
    pair = seg if isinstance(seg, (tuple, list)) else (seg,)
    full = []
    for ids in pair:
        parts = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(parts, ids.contiguous(), group=group)
        full.append(torch.cat(parts, 1).index_select(1, order))  # (B, N)
    return full[0] if len(full) == 1 else (full[0], full[1])
