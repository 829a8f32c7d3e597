"""Ring attention (Liu, Zaharia and Abbeel, 2023): each rank keeps its queries and the key/value
blocks travel around the ring, the partial results merged through their log-sum-exp. Each block
is computed by the backend that the registry picks for it (``select(..., need=("forward",
"backward"))``): the Triton kernels on CUDA, the CPU engine elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..api import check_backend
from ..backends import select
from ..engine import acc_dtype
from ..first_order import first_order
from ..spec import AttentionSpec, UnsupportedInputs
from .group import EXCHANGES, global_rank, group_info, start, wait
from .layout import check_layout, runs
from .meta import bits, check_shards, local_spec

__all__ = ["BLOCK_HOOKS", "ring_attention"]

# The registry hooks a ring block uses: forward (and backward when gradients are needed).
BLOCK_HOOKS = ("forward", "backward")


@dataclass(frozen=True)
class _Ring:
    """Who holds what on the ring, agreed by every rank before any key or value moves."""

    group: Any
    rank: int
    world: int
    layout: str
    spec: AttentionSpec  # this rank's call: Nq == Nk == n local rows; causal, window, scale
    backend: str  # the backend asked for ("auto": the registry picks, block by block)
    hops: int = 0  # ring steps: W, or fewer when no rank needs the blocks further away

    @property
    def n(self) -> int:
        return self.spec.Nq

    @property
    def next(self) -> int:
        return global_rank(self.group, (self.rank + 1) % self.world)

    @property
    def prev(self) -> int:
        return global_rank(self.group, (self.rank - 1) % self.world)

    def pairs(self, src: int) -> list[tuple[int, int, int, int, int]]:
        """Query run x key run pairs of this rank and block ``src`` that may see something.

        Returns ``(qrow0, qlen, krow0, klen, start)``: ``start`` is the query run's position
        relative to the key run's, which is all that causal and window rules look at.
        """
        return _pairs(self, self.rank, src)


def _pairs(ring: _Ring, rank: int, src: int) -> list[tuple[int, int, int, int, int]]:
    out = []
    for qr0, qp0, qlen in runs(ring.layout, rank, ring.world, ring.n):
        for kr0, kp0, klen in runs(ring.layout, src, ring.world, ring.n):
            if qlen == 0 or klen == 0:
                continue
            # d = i' - j ranges over [lo, hi] for this pair of runs
            lo, hi = qp0 - (kp0 + klen - 1), qp0 + qlen - 1 - kp0
            need_lo = max(
                0 if ring.spec.causal else -math.inf,
                -math.inf if ring.spec.right is None else -ring.spec.right,
            )
            need_hi = math.inf if ring.spec.left is None else ring.spec.left
            if hi >= need_lo and lo <= need_hi:
                out.append((qr0, qlen, kr0, klen, qp0 - kp0))
    return out


def _hops(ring: _Ring) -> int:
    """Ring steps needed: 1 + the furthest block (in hops upstream) that any rank can see."""
    furthest = 0
    for r in range(ring.world):
        for t in range(1, ring.world):
            if _pairs(ring, r, (r - t) % ring.world):
                furthest = max(furthest, t)
    return furthest + 1


def _pass_on(
    ring: _Ring, tensors: list[torch.Tensor], tag0: int, kind: str
) -> tuple[list[torch.Tensor], list[Any]]:
    """Send ``tensors`` to the next rank and receive their like from the previous one."""
    received = [torch.empty_like(t) for t in tensors]
    ops = [("send", t, ring.next, tag0 + i) for i, t in enumerate(tensors)]
    ops += [("recv", t, ring.prev, tag0 + i) for i, t in enumerate(received)]
    EXCHANGES[kind] += 1
    return received, start(ops)


def _ids_overlap(q_ids: torch.Tensor | None, kv_ids: torch.Tensor | None) -> bool:
    """False when no query id of the run can equal a key id of the run (their ranges miss)."""
    if q_ids is None:
        return True
    big = torch.iinfo(torch.int64).max
    q, kv = q_ids.long(), kv_ids.long()
    qmin = torch.where(q >= 0, q, big).amin(1)
    qmax = torch.where(q >= 0, q, -1).amax(1)
    kmin = torch.where(kv >= 0, kv, big).amin(1)
    kmax = torch.where(kv >= 0, kv, -1).amax(1)
    return bool(((qmin <= kmax) & (kmin <= qmax)).any())


def _block(
    ring: _Ring,
    pair: tuple[int, int, int, int, int],
    q_ids: torch.Tensor | None,
    kv_ids: torch.Tensor | None,
) -> AttentionSpec | None:
    """The call of one query run against one key run, or None when it sees nothing."""
    qr0, qlen, kr0, klen, start_pos = pair
    qi = None if q_ids is None else q_ids[:, qr0 : qr0 + qlen]
    ki = None if kv_ids is None else kv_ids[:, kr0 : kr0 + klen]
    if not _ids_overlap(qi, ki):
        return None
    return replace(
        ring.spec, Nq=qlen, Nk=klen, start=start_pos, q_ids=qi, kv_ids=ki, requires_grad=False
    )


def _backend(ring: _Ring, spec: AttentionSpec, backward: bool):
    """The backend for a block, through the registry (its forward, and backward, hooks)."""
    return select(spec, ring.backend, need=BLOCK_HOOKS if backward else BLOCK_HOOKS[:1])


def _merge_(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> None:
    """Fold a partial result ``(o, l)`` into the running ``(out, lse)`` of the same rows, in place
    (``o`` is overwritten).

    Both weights are ``exp(lse - max)`` <= 1, so lse values hundreds apart never overflow; rows
    that have seen no key in either part (both lse ``-inf``) keep output 0 and lse ``-inf``.
    """
    m = torch.maximum(lse, l)
    m = torch.where(torch.isneginf(m), 0.0, m)  # nothing seen yet: both weights become 0
    wa, wb = torch.exp(lse - m), torch.exp(l - m)  # (B, H, M)
    total = wa + wb
    inv = 1.0 / torch.where(total > 0, total, 1.0)
    out.mul_((wa * inv)[..., None]).add_(o.mul_((wb * inv)[..., None]))  # o is ours to scale
    lse.copy_(m + torch.log(total))


def _ring_forward(
    ring: _Ring,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ids: torch.Tensor | None,
    kv_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out (B, H, n, Dv) in the accumulation dtype and lse (B, H, n), natural log."""
    acc_t = acc_dtype(q.dtype)
    b, h, n, _ = q.shape
    dv = v.shape[-1]
    out = torch.zeros(b, h, n, dv, dtype=acc_t, device=q.device)
    lse = torch.full((b, h, n), -math.inf, dtype=acc_t, device=q.device)
    block = [k, v] if kv_ids is None else [k, v, kv_ids]
    for t in range(ring.hops):
        src = (ring.rank - t) % ring.world
        reqs: list[Any] = []
        if t + 1 < ring.hops:  # the next block travels while this one is computed
            nxt, reqs = _pass_on(ring, block, 0, "kv")
        kb, vb = block[0], block[1]
        ib = block[2] if kv_ids is not None else None
        for pair in ring.pairs(src):
            qr0, qlen, kr0, klen, _ = pair
            spec = _block(ring, pair, q_ids, ib)
            if spec is None:
                continue
            rows, keys = slice(qr0, qr0 + qlen), slice(kr0, kr0 + klen)
            o_p, l_p = _backend(ring, spec, ring.spec.requires_grad).forward(
                spec, q[:, :, rows], kb[:, :, keys], vb[:, :, keys], None
            )
            _merge_(out[:, :, rows], lse[:, :, rows], o_p.to(acc_t), l_p.to(acc_t))
        if reqs:
            wait(reqs)
            block = nxt
    return out, lse


def _ring_backward(
    ring: _Ring,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ids: torch.Tensor | None,
    kv_ids: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (accumulation dtype) by a second trip of the blocks around the ring.

    Each block's probabilities are recomputed from the *global* lse and its ``D = rowsum(dO *
    O)`` uses the global output, so the per-block gradients add up to the exact ones. The dk/dv
    of a block ride along with it, gaining every rank's contribution, and go home at the end.
    """
    acc_t = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_t, device=q.device)
    block = [k, v] if kv_ids is None else [k, v, kv_ids]
    grads: list[torch.Tensor] = []  # dk, dv accumulated so far for the block held now
    greqs: list[Any] = []
    for t in range(ring.hops):
        src = (ring.rank - t) % ring.world
        reqs: list[Any] = []
        if t + 1 < ring.hops:
            nxt, reqs = _pass_on(ring, block, 0, "kv")
        kb, vb = block[0], block[1]
        ib = block[2] if kv_ids is not None else None
        dk_t = torch.zeros(kb.shape, dtype=acc_t, device=q.device)
        dv_t = torch.zeros(vb.shape, dtype=acc_t, device=q.device)
        for pair in ring.pairs(src):
            qr0, qlen, kr0, klen, _ = pair
            spec = _block(ring, pair, q_ids, ib)
            if spec is None:
                continue
            rows, keys = slice(qr0, qr0 + qlen), slice(kr0, kr0 + klen)
            dq_p, dk_p, dv_p, _, _ = _backend(ring, spec, True).backward(
                spec,
                q[:, :, rows],
                kb[:, :, keys],
                vb[:, :, keys],
                out[:, :, rows],
                lse[:, :, rows],
                dout[:, :, rows],
                None if dlse is None else dlse[:, :, rows],
                None,
                False,
                False,
            )
            dq[:, :, rows] += dq_p
            dk_t[:, :, keys] += dk_p
            dv_t[:, :, keys] += dv_p
        if t > 0:  # this block's gradients so far, sent by the previous rank
            wait(greqs)
            dk_t += grads[0]
            dv_t += grads[1]
        if reqs:
            wait(reqs)
            block = nxt
            grads, greqs = _pass_on(ring, [dk_t, dv_t], 8, "dkv")
        else:
            dk_t, dv_t = _send_home(ring, src, dk_t, dv_t)
    return dq, dk_t, dv_t


def _send_home(
    ring: _Ring, src: int, dk: torch.Tensor, dv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the finished dk/dv of block ``src`` to its owner; receive this rank's own."""
    if src == ring.rank:
        return dk, dv
    holder = (ring.rank + ring.hops - 1) % ring.world  # who holds this rank's block at the end
    mine = [torch.empty_like(dk), torch.empty_like(dv)]
    owner = global_rank(ring.group, src)
    peer = global_rank(ring.group, holder)
    ops = [("send", dk, owner, 8), ("send", dv, owner, 9)]
    ops += [("recv", mine[0], peer, 8), ("recv", mine[1], peer, 9)]
    EXCHANGES["dkv"] += 1
    wait(start(ops))
    return mine[0], mine[1]


class _RingFunction(torch.autograd.Function):
    """Autograd through the ring: saves the local q, k, v, output and lse; backward is a ring."""

    @staticmethod
    def forward(ctx, ring, q, k, v, q_ids, kv_ids):  # type: ignore[override]
        out, lse = _ring_forward(ring, q, k, v, q_ids, kv_ids)
        out = out.to(q.dtype)
        ctx.set_materialize_grads(False)  # an unused lse then gets no gradient at all
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ids = (q_ids, kv_ids)
        return out, lse.float()

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        with torch.no_grad():  # create_graph=True: first-order gradients, refused below
            dq, dk, dv = _ring_backward(ctx.ring, q, k, v, *ctx.ids, out, lse, dout, dlse)
        grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
        return (None, *first_order("ring_attention", (q, k, v), grads), None, None)


def _rule_fields(spec: AttentionSpec) -> dict[str, int]:
    """The rules every rank must share, as integers."""
    left, right = spec.window if spec.window is not None else (None, None)
    return {
        "causal": int(spec.causal),
        "left": -1 if left is None else left,
        "right": -1 if right is None else right,
        "scale": bits(spec.scale),
    }


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Any = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    segment_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a sequence sharded across the ranks of ``group``, by a ring of key/value
    blocks. Every rank must call it with its own shard.

    Each rank keeps its queries; the key/value blocks travel around the ring (batched
    ``isend``/``irecv``, the next block in flight while the current one is computed), exactly
    W - 1 hops per forward, or fewer when a window leaves the distant blocks empty for every
    rank. Each block is computed at its global positions by the backend the registry picks for
    it (the Triton kernels on CUDA, the CPU engine elsewhere) and folded in
    through its lse; blocks (and chunks) that causal, window or segment rules leave empty are
    skipped. Backward sends the blocks around once more, their dk/dv travelling with them.

    The result equals single-process :func:`selfattn.attention` on the unsharded input (bottom-
    right alignment is moot: Nq == Nk), forward and backward, with float32 accumulation (float64
    for float64 input)::

        layout="zigzag", W = 2, N = 8, causal       key position  0 1 2 3 4 5 6 7
                                                    held by rank  0 0 1 1 1 1 0 0
            rank 0: rows at positions 0, 1 (chunk 0)            x . . . . . . .
                                                                x x . . . . . .
                    rows at positions 6, 7 (chunk 3)            x x x x x x x .
                                                                x x x x x x x x
            rank 1: rows at positions 2, 3 (chunk 1)            x x x . . . . .
                                                                x x x x . . . .
                    rows at positions 4, 5 (chunk 2)            x x x x x . . .
                                                                x x x x x x . .

    Both ranks compute 18 of the 36 visible scores; with ``contiguous`` rank 0 would have 10
    and rank 1 26.

    Args:
        q: (B, Hq, n, D) this rank's queries; k: (B, Hkv, n, D); v: (B, Hkv, n, Dv), as
            :func:`shard` cuts them. ``Hq % Hkv == 0`` (GQA). One dtype and device.
        group: the process group (default: the world). gloo (CPU) and NCCL (GPU) both work.
        causal, window, scale: as in :func:`selfattn.attention`, in global positions.
        segment_ids: this rank's shard of the ids, (B, n), or a pair (q_ids, kv_ids) of shards.
        layout: ``"zigzag"`` or ``"contiguous"``: how the sequence was sharded.
        return_lse: also return the lse (B, Hq, n), float32, differentiable.
        backend: the backend of every block, or "auto" (the first that offers the forward and
            backward hooks of the registry and accepts the block).

    Returns:
        ``out`` (B, Hq, n, Dv) in q's dtype, or ``(out, lse)``.

    Raises:
        ValueError: on every rank, before any key or value moves, when any rank's input is
            invalid, when local lengths, dtypes, heads, head dims, layout or rules differ across
            ranks, or when a zigzag shard has an odd length. The message names the ranks and
            their values.
        TypeError: on the rank whose input has a wrong type or dtype (the others: ValueError).
        RuntimeError: torch.distributed is not initialised, or a peer died (within the
            process group's timeout).
    """
    what = "ring_attention"
    rank, world = group_info(group, what)
    error, spec = None, None
    try:
        layout = check_layout(layout, what)
        backend = check_backend(backend)
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
        spec = local_spec(q, k, v, causal, window, segment_ids, scale, what)
        # the backend is chosen before anything moves: a refusal must stop every rank at once
        select(spec, backend, need=BLOCK_HOOKS if spec.requires_grad else BLOCK_HOOKS[:1])
    except (TypeError, ValueError, UnsupportedInputs) as exc:
        error = exc
    extra = {"causal": "causal flag", "left": "window left", "right": "window right"}
    check_shards(
        spec, layout, segment_ids, {**extra, "scale": "scale"}, _rule_fields, error, group, q, what
    )

    ring = _Ring(group=group, rank=rank, world=world, layout=layout, spec=spec, backend=backend)
    ring = replace(ring, hops=_hops(ring))
    q_ids, kv_ids = spec.q_ids, spec.kv_ids
    k, v = k.contiguous(), v.contiguous()  # they are sent as they are
    if kv_ids is not None:
        kv_ids = kv_ids.contiguous()
    if spec.requires_grad:
        out, lse = _RingFunction.apply(ring, q, k, v, q_ids, kv_ids)
    else:
        out, lse = _ring_forward(ring, q, k, v, q_ids, kv_ids)
        out, lse = out.to(q.dtype), lse.float()
    return (out, lse) if return_lse else out
