"""Process groups and point-to-point messages: who this rank is, and batched sends/receives.

``EXCHANGES`` counts the messages this process has sent, by kind (tests read it).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["EXCHANGES", "global_rank", "group_info", "meta_device", "start", "wait"]

#: Messages sent by this process since import (tests reset it): ``"kv"`` key/value blocks passed
#: to the next rank by the ring (forward and backward), ``"dkv"`` key/value gradients travelling
#: with their blocks, ``"all_to_all"`` the exchanges of Ulysses attention.
EXCHANGES: Counter[str] = Counter()


def group_info(group: Any, what: str) -> tuple[int, int]:
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


def global_rank(group: Any, rank: int) -> int:
    """A group rank as the global rank that point-to-point calls expect."""
    return rank if group is None else dist.get_global_rank(group, rank)


def meta_device(group: Any, x: Any) -> torch.device:
    """Where the metadata tensor lives: with the input, or on the GPU that NCCL needs."""
    if isinstance(x, torch.Tensor) and x.device.type != "meta":
        return x.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def start(ops: list[tuple[str, torch.Tensor, int, int]]) -> list[Any]:
    """Post point-to-point sends and receives as one batch; returns the requests to wait on."""
    p2p = [
        dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer, tag=tag)
        for kind, t, peer, tag in ops
    ]
    return dist.batch_isend_irecv(p2p) if p2p else []


def wait(reqs: list[Any]) -> None:
    for req in reqs:
        req.wait()
