"""Several processes: ring attention and Ulysses attention over ``torch.distributed``.

Ring attention (Liu, Zaharia and Abbeel, 2023) keeps each rank's queries in place and passes the
key/value blocks around the ring, merging the partial results through their log-sum-exp; the
zigzag layout (as in Llama 3's context parallelism) balances the causal work. Ulysses attention
(Jacobs et al., 2023, DeepSpeed-Ulysses) swaps sequence shards for head shards with one
all-to-all, runs plain :func:`selfattn.attention` on whole sequences, and swaps back.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from .api import _check_backend, attention
from .backends import tiled
from .masks import Rules
from .spec import FLOAT_DTYPES, validate

__all__ = [
    "EXCHANGES",
    "LAYOUTS",
    "ring_attention",
    "shard",
    "ulysses_attention",
    "unshard",
]

LAYOUTS = ("zigzag", "contiguous")

#: Messages sent by this process since import (tests reset it): ``"kv"`` key/value blocks passed
#: to the next rank by the ring (forward and backward), ``"dkv"`` key/value gradients travelling
#: with their blocks, ``"all_to_all"`` the exchanges of Ulysses attention.
EXCHANGES: Counter[str] = Counter()

# Bytes of a rank's own error message carried by the metadata all-gather, so that every rank can
# name what went wrong on another rank.
_MSG_BYTES = 320
# dtypes by a code that is the same in every process (a hash of the name would not be)
_DTYPES = (
    *FLOAT_DTYPES, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
    torch.complex64, torch.complex128,
)  # fmt: skip
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "meta")

# -- process groups -----------------------------------------------------------------------------


def _group_info(group: Any, what: str) -> tuple[int, int]:
    """``(rank, world)`` of this process within ``group``; raises if there is no group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{what}: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) on every rank first"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{what}: this process is not a member of the given group")
    return rank, dist.get_world_size(group)


def _global_rank(group: Any, rank: int) -> int:
    """A group rank as the global rank that point-to-point calls expect."""
    return rank if group is None else dist.get_global_rank(group, rank)


def _meta_device(group: Any, x: Any) -> torch.device:
    """Where the metadata tensor lives: with the input, or on the GPU that NCCL needs."""
    if isinstance(x, torch.Tensor) and x.device.type != "meta":
        return x.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- layouts ------------------------------------------------------------------------------------


def _check_layout(layout: Any, what: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{what}: layout must be 'zigzag' or 'contiguous', got {layout!r}")
    return layout


def _runs(layout: str, rank: int, world: int, n: int) -> list[tuple[int, int, int]]:
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


def _natural_order(layout: str, world: int, n: int, device: torch.device) -> torch.Tensor:
    """Index into the rank-ordered concatenation of shards that yields positions 0..W*n-1."""
    perm = torch.empty(world * n, dtype=torch.int64)
    for r in range(world):
        for row0, pos0, length in _runs(layout, r, world, n):
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
    layout = _check_layout(layout, "shard")
    rank, world = _group_info(group, "shard")
    total = x.shape[dim]
    parts = world if layout == "contiguous" else 2 * world
    if total % parts:
        raise ValueError(
            f"shard: layout={layout!r} cuts the sequence into {parts} equal parts for "
            f"{world} ranks, but its length along dim {dim} is {total}; pad it to a multiple of "
            f"{parts}"
        )
    n = total // world
    pieces = [x.narrow(dim, pos0, length) for _, pos0, length in _runs(layout, rank, world, n)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


class _Gather(torch.autograd.Function):
    """All-gather of equal shards; the gradient keeps this rank's slice of the incoming one."""

    @staticmethod
    def forward(ctx, x, dim, group, layout, rank, world):  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        n = x.shape[dim]
        order = _natural_order(layout, world, n, x.device)
        ctx.dim, ctx.n, ctx.runs = dim, n, _runs(layout, rank, world, n)
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
        layout = _check_layout(layout, "unshard")
    except (TypeError, ValueError) as exc:
        error = exc
    rank, world = _group_info(group, "unshard")
    ok = error is None
    fields = {
        "ndim": x.dim() if ok else 0,
        "dim": dim if ok else 0,
        "n": x.shape[dim] if ok else 0,
        "shape": _shape_code(x.shape) if ok else 0,
        "dtype": _code(x.dtype) if ok else 0,
        "layout": LAYOUTS.index(layout) if ok else 0,
    }
    table = _agree(fields, error, group, _meta_device(group, x), "unshard")
    for key, label in (("dim", "dim"), ("layout", "layout"), ("dtype", "dtype")):
        _same(table, key, label, "unshard")
    _same(table, "ndim", "number of dimensions", "unshard")
    _same(table, "n", f"shard length along dim {dim}", "unshard")
    _same(table, "shape", "shape (apart from the sequence dim)", "unshard")
    if layout == "zigzag":
        _even(table, "unshard")
    return _Gather.apply(x, dim, group, layout, rank, world)


# -- metadata that every rank checks before any data moves ----------------------------------------


def _code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 1000 + zlib.crc32(str(dtype).encode())


def _shape_code(shape: torch.Size) -> int:
    return zlib.crc32(repr(tuple(shape)).encode())


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _fmt(key: str, value: int) -> str:
    if key == "dtype":
        return str(_DTYPES[value - 1]) if 1 <= value <= len(_DTYPES) else f"dtype #{value}"
    if key == "layout":
        return repr(LAYOUTS[value])
    if key in ("left", "right"):
        return "None" if value < 0 else str(value)
    if key == "scale":
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    if key == "device":
        return _DEVICE_TYPES[value] if 0 <= value < len(_DEVICE_TYPES) else f"device #{value}"
    if key in ("causal", "grad"):
        return str(bool(value))
    if key == "segments":
        return ("none", "one tensor", "a (q_ids, kv_ids) pair")[value]
    return str(value)


def _agree(
    fields: dict[str, int], error: Exception | None, group: Any, device: torch.device, what: str
) -> list[dict[str, int]]:
    """All-gather a few integers (and any local error) so every rank judges the same table.

    A rank whose own input is invalid re-raises its error; every other rank raises a
    ``ValueError`` naming that rank and quoting its message. Nothing else is exchanged before
    this, so a bad input on one rank can never leave another waiting.
    """
    keys = list(fields)
    vec = torch.zeros(1 + len(keys) + _MSG_BYTES, dtype=torch.int64)
    if error is not None:
        vec[0] = 1
        msg = f"{type(error).__name__}: {error}".encode()[:_MSG_BYTES]
        vec[1 + len(keys) : 1 + len(keys) + len(msg)] = torch.tensor(list(msg), dtype=torch.int64)
    else:
        vec[1 : 1 + len(keys)] = torch.tensor([fields[k] for k in keys], dtype=torch.int64)
    vec = vec.to(device)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    parts = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(parts, vec, group=group)
    rows = torch.stack(parts).cpu().tolist()
    if error is not None:
        raise type(error)(f"{what}: rank {rank}: {error}") from error
    for r, row in enumerate(rows):
        if row[0]:
            msg = bytes(b for b in row[1 + len(keys) :] if b).decode(errors="replace")
            raise ValueError(f"{what}: rank {r} rejected its input, so no rank goes on: {msg}")
    return [dict(zip(keys, row[1 : 1 + len(keys)])) for row in rows]


def _same(table: list[dict[str, int]], key: str, label: str, what: str) -> None:
    values = [row[key] for row in table]
    if len(set(values)) > 1:
        per_rank = ", ".join(f"rank {r}: {_fmt(key, v)}" for r, v in enumerate(values))
        raise ValueError(f"{what}: the {label} must be the same on every rank, got {per_rank}")


def _even(table: list[dict[str, int]], what: str) -> None:
    odd = [(r, row["n"]) for r, row in enumerate(table) if row["n"] % 2]
    if odd:
        world = len(table)
        ranks = ", ".join(f"rank {r} has {n}" for r, n in odd)
        raise ValueError(
            f"{what}: layout='zigzag' gives each rank two equal chunks, so the local length must "
            f"be even, but {ranks}; pad the sequence to a multiple of 2*W = {2 * world} or use "
            "layout='contiguous'"
        )


# -- ring attention --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ring:
    """Who holds what on the ring, agreed by every rank before any key or value moves."""

    group: Any
    rank: int
    world: int
    layout: str
    n: int
    causal: bool
    left: int | None
    right: int | None
    scale: float
    hops: int  # ring steps: W, or fewer when no rank needs the blocks further away

    @property
    def next(self) -> int:
        return _global_rank(self.group, (self.rank + 1) % self.world)

    @property
    def prev(self) -> int:
        return _global_rank(self.group, (self.rank - 1) % self.world)

    def pairs(self, src: int) -> list[tuple[int, int, int, int, int]]:
        """Query run x key run pairs of this rank and block ``src`` that may see something.

        Returns ``(qrow0, qlen, krow0, klen, start)``: ``start`` is the query run's position
        relative to the key run's, which is all that causal and window rules look at.
        """
        return _pairs(self, self.rank, src)


def _pairs(ring: _Ring, rank: int, src: int) -> list[tuple[int, int, int, int, int]]:
    out = []
    for qr0, qp0, qlen in _runs(ring.layout, rank, ring.world, ring.n):
        for kr0, kp0, klen in _runs(ring.layout, src, ring.world, ring.n):
            if qlen == 0 or klen == 0:
                continue
            # d = i' - j ranges over [lo, hi] for this pair of runs
            lo, hi = qp0 - (kp0 + klen - 1), qp0 + qlen - 1 - kp0
            need_lo = max(
                0 if ring.causal else -math.inf, -math.inf if ring.right is None else -ring.right
            )
            need_hi = math.inf if ring.left is None else ring.left
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


def _start(ops: list[tuple[str, torch.Tensor, int, int]]) -> list[Any]:
    """Post point-to-point sends and receives as one batch; returns the requests to wait on."""
    p2p = [
        dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer, tag=tag)
        for kind, t, peer, tag in ops
    ]
    return dist.batch_isend_irecv(p2p) if p2p else []


def _wait(reqs: list[Any]) -> None:
    for req in reqs:
        req.wait()


def _pass_on(
    ring: _Ring, tensors: list[torch.Tensor], tag0: int, kind: str
) -> tuple[list[torch.Tensor], list[Any]]:
    """Send ``tensors`` to the next rank and receive their like from the previous one."""
    received = [torch.empty_like(t) for t in tensors]
    ops = [("send", t, ring.next, tag0 + i) for i, t in enumerate(tensors)]
    ops += [("recv", t, ring.prev, tag0 + i) for i, t in enumerate(received)]
    EXCHANGES[kind] += 1
    return received, _start(ops)


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


def _problem(
    ring: _Ring,
    q: torch.Tensor,
    k: torch.Tensor,
    pair: tuple[int, int, int, int, int],
    q_ids: torch.Tensor | None,
    kv_ids: torch.Tensor | None,
) -> tiled.Problem | None:
    """The tiled problem of one query run against one key run, or None when it sees nothing."""
    qr0, qlen, kr0, klen, start = pair
    qi = None if q_ids is None else q_ids[:, qr0 : qr0 + qlen]
    ki = None if kv_ids is None else kv_ids[:, kr0 : kr0 + klen]
    if not _ids_overlap(qi, ki):
        return None
    rules = Rules(
        B=q.shape[0], H=q.shape[1], Hkv=k.shape[1], M=qlen, Nk=klen, start=start,
        causal=ring.causal, left=ring.left, right=ring.right, q_ids=qi, kv_ids=ki,
    )  # fmt: skip
    return tiled.Problem(rules, ring.scale)


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
    acc_t = tiled.acc_dtype(q.dtype)
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
            prob = _problem(ring, q, kb, pair, q_ids, ib)
            if prob is None:
                continue
            o_p = torch.empty(b, h, qlen, dv, dtype=acc_t, device=q.device)
            o_p, l_p = tiled.forward(
                prob, q[:, :, qr0 : qr0 + qlen], kb[:, :, kr0 : kr0 + klen],
                vb[:, :, kr0 : kr0 + klen], out=o_p,
            )  # fmt: skip
            _merge_(out[:, :, qr0 : qr0 + qlen], lse[:, :, qr0 : qr0 + qlen], o_p, l_p)
        if reqs:
            _wait(reqs)
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
    acc_t = tiled.acc_dtype(q.dtype)
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
            prob = _problem(ring, q, kb, pair, q_ids, ib)
            if prob is None:
                continue
            rows, keys = slice(qr0, qr0 + qlen), slice(kr0, kr0 + klen)
            dq_p, dk_p, dv_p, _, _ = tiled.backward(
                prob, q[:, :, rows], kb[:, :, keys], vb[:, :, keys], out[:, :, rows],
                lse[:, :, rows], dout[:, :, rows], None if dlse is None else dlse[:, :, rows],
            )  # fmt: skip
            dq[:, :, rows] += dq_p
            dk_t[:, :, keys] += dk_p
            dv_t[:, :, keys] += dv_p
        if t > 0:  # this block's gradients so far, sent by the previous rank
            _wait(greqs)
            dk_t += grads[0]
            dv_t += grads[1]
        if reqs:
            _wait(reqs)
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
    owner = _global_rank(ring.group, src)
    peer = _global_rank(ring.group, holder)
    ops = [("send", dk, owner, 8), ("send", dv, owner, 9)]
    ops += [("recv", mine[0], peer, 8), ("recv", mine[1], peer, 9)]
    EXCHANGES["dkv"] += 1
    _wait(_start(ops))
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
        dq, dk, dv = _ring_backward(ctx.ring, q, k, v, *ctx.ids, out, lse, dout, dlse)
        return None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _local_spec(q, k, v, causal, window, segment_ids, scale, what):
    spec = validate(q, k, v, causal=causal, window=window, segment_ids=segment_ids, scale=scale)
    if spec.Nq != spec.Nk:
        raise ValueError(
            f"{what} attends within one sharded sequence, so q and k/v must hold the same local "
            f"length, got Nq={spec.Nq}, Nk={spec.Nk}"
        )
    return spec


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a sequence sharded across the ranks of ``group``, by a ring of key/value
    blocks. Every rank must call it with its own shard.

    Each rank keeps its queries; the key/value blocks travel around the ring (batched
    ``isend``/``irecv``, the next block in flight while the current one is computed), exactly
    W - 1 hops per forward, or fewer when a window leaves the distant blocks empty for every
    rank. Each block is computed by the ``tiled`` engine at its global positions and folded in
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
    rank, world = _group_info(group, what)
    error, spec = None, None
    try:
        layout = _check_layout(layout, what)
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
        spec = _local_spec(q, k, v, causal, window, segment_ids, scale, what)
    except (TypeError, ValueError) as exc:
        error = exc
    fields: dict[str, int] = dict.fromkeys(
        ("n", "dtype", "device", "B", "Hq", "Hkv", "D", "Dv", "layout", "causal", "left",
         "right", "segments", "scale", "grad"), 0,
    )  # fmt: skip
    if spec is not None:
        left, right = spec.window if spec.window is not None else (None, None)
        fields.update(
            n=spec.Nq, dtype=_code(spec.dtype), device=_device_code(spec.device), B=spec.B,
            Hq=spec.Hq, Hkv=spec.Hkv, D=spec.D, Dv=spec.Dv, layout=LAYOUTS.index(layout),
            causal=int(spec.causal), left=-1 if left is None else left,
            right=-1 if right is None else right,
            segments=_segment_kind(segment_ids),
            scale=_bits(spec.scale), grad=int(spec.requires_grad),
        )  # fmt: skip
    table = _agree(fields, error, group, _meta_device(group, q), what)
    labels = {
        "n": "local sequence length (use selfattn.distributed.shard to cut equal shards)",
        "dtype": "dtype", "device": "device type", "B": "batch size", "Hq": "number of query heads",
        "Hkv": "number of key/value heads", "D": "head dim", "Dv": "value head dim",
        "layout": "layout", "causal": "causal flag", "left": "window left", "right": "window right",
        "segments": "use of segment_ids", "scale": "scale",
        "grad": "need for gradients (every rank must run backward together)",
    }  # fmt: skip
    for key, label in labels.items():
        _same(table, key, label, what)
    if layout == "zigzag":
        _even(table, what)

    ring = _Ring(
        group=group, rank=rank, world=world, layout=layout, n=spec.Nq, causal=spec.causal,
        left=fields["left"] if fields["left"] >= 0 else None,
        right=fields["right"] if fields["right"] >= 0 else None, scale=spec.scale, hops=0,
    )  # fmt: skip
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


def _segment_kind(segment_ids: Any) -> int:
    return 0 if segment_ids is None else (2 if isinstance(segment_ids, (tuple, list)) else 1)


def _device_code(device: torch.device) -> int:
    t = device.type
    return _DEVICE_TYPES.index(t) if t in _DEVICE_TYPES else 99


# -- Ulysses attention ---------------------------------------------------------------------------


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
        **attention_kwargs: any keyword of :func:`selfattn.attention`. ``mask``, ``bias`` and
            ``alibi_slopes`` describe the *whole* problem (every rank passes the same, e.g.
            bias (B, Hq, N, N)); each rank uses its heads. ``segment_ids`` is this rank's shard
            (B, n) or a pair of shards. ``bias``/``alibi_slopes`` gradients cover only this
            rank's heads: all-reduce (sum) them as for any replicated parameter. Dropout masks
            differ from a single-process run's (the heads are numbered per rank).

    Returns:
        ``out`` (B, Hq, n, Dv), or ``(out, lse)`` with ``return_lse=True``.

    Raises:
        ValueError: on every rank, before any exchange, when ``Hq`` or ``Hkv`` is not a multiple
            of the world size, when inputs differ across ranks, or when any rank's input is
            invalid (the message names the rank).
    """
    what = "ulysses_attention"
    rank, world = _group_info(group, what)
    error, spec = None, None
    kw = dict(attention_kwargs)
    seg = kw.pop("segment_ids", None)
    try:
        layout = _check_layout(layout, what)
        _check_backend(kw.get("backend", "auto"))
        spec = _local_spec(q, k, v, False, None, seg, None, what)
        total = spec.Nq * world
        # the rules describe the whole sequence: check them against zero-stride full-size views
        full_q = q.new_zeros(()).expand(spec.B, spec.Hq, total, spec.D)
        full_k = k.new_zeros(()).expand(spec.B, spec.Hkv, total, spec.D)
        full_v = v.new_zeros(()).expand(spec.B, spec.Hkv, total, spec.Dv)
        check = {key: val for key, val in kw.items() if key != "backend"}
        validate(full_q, full_k, full_v, **check)
    except (TypeError, ValueError) as exc:
        error = exc
    fields: dict[str, int] = dict.fromkeys(
        ("n", "dtype", "device", "B", "Hq", "Hkv", "D", "Dv", "layout", "segments", "options",
         "grad"), 0,
    )  # fmt: skip
    if spec is not None:
        options = repr(sorted((key, _describe(val)) for key, val in kw.items()))
        fields.update(
            n=spec.Nq, dtype=_code(spec.dtype), device=_device_code(spec.device), B=spec.B,
            Hq=spec.Hq, Hkv=spec.Hkv, D=spec.D, Dv=spec.Dv, layout=LAYOUTS.index(layout),
            segments=_segment_kind(seg),
            options=zlib.crc32(options.encode()), grad=int(spec.requires_grad),
        )  # fmt: skip
    table = _agree(fields, error, group, _meta_device(group, q), what)
    labels = {
        "n": "local sequence length", "dtype": "dtype", "device": "device type",
        "B": "batch size", "Hq": "number of query heads", "Hkv": "number of key/value heads",
        "D": "head dim", "Dv": "value head dim", "layout": "layout",
        "segments": "use of segment_ids",
        "options": "attention keywords (causal, window, scale, ... and tensor shapes)",
        "grad": "need for gradients (every rank must run backward together)",
    }  # fmt: skip
    for key, label in labels.items():
        _same(table, key, label, what)
    if layout == "zigzag":
        _even(table, what)
    if spec.Hq % world or spec.Hkv % world:
        raise ValueError(
            f"{what}: the heads are split over W = {world} ranks, so Hq and Hkv must be "
            f"multiples of {world}, got Hq={spec.Hq}, Hkv={spec.Hkv}; use ring_attention instead"
        )

    n = spec.Nq
    order = _natural_order(layout, world, n, q.device)  # rank order -> positions 0..N-1
    back = torch.argsort(order)
    if seg is not None:
        seg = _gather_ids(spec, seg, group, world, order)
    for name in ("mask", "bias"):
        if kw.get(name) is not None:
            t4 = kw[name].reshape((1,) * (4 - kw[name].dim()) + tuple(kw[name].shape))
            kw[name] = _heads(t4, 1, spec.Hq, rank, world)  # broadcastable to (B, Hq/W, N, N)
    slopes = kw.get("alibi_slopes")
    if slopes is not None:
        kw["alibi_slopes"] = _heads(slopes, slopes.dim() - 1, spec.Hq, rank, world)
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
