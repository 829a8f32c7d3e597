"""Metadata that every rank checks before any data moves: a few integers per rank, all-gathered,
so that a bad input on one rank raises ``ValueError`` on every rank instead of a hang.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..spec import FLOAT_DTYPES, AttentionSpec, validate
from .group import meta_device

__all__ = [
    "LAYOUTS",
    "agree",
    "bits",
    "code",
    "device_code",
    "even",
    "local_spec",
    "same",
    "segment_kind",
    "shape_code",
]

LAYOUTS = ("zigzag", "contiguous")

# Bytes of a rank's own error message carried by the metadata all-gather, so that every rank can
# name what went wrong on another rank.
_MSG_BYTES = 320
# dtypes by a code that is the same in every process (a hash of the name would not be)
_DTYPES = (
    *FLOAT_DTYPES,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "meta")


def code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 1000 + zlib.crc32(str(dtype).encode())


def shape_code(shape: torch.Size) -> int:
    return zlib.crc32(repr(tuple(shape)).encode())


def bits(x: float) -> int:
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


def agree(
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


def same(table: list[dict[str, int]], key: str, label: str, what: str) -> None:
    values = [row[key] for row in table]
    if len(set(values)) > 1:
        per_rank = ", ".join(f"rank {r}: {_fmt(key, v)}" for r, v in enumerate(values))
        raise ValueError(f"{what}: the {label} must be the same on every rank, got {per_rank}")


def even(table: list[dict[str, int]], what: str) -> None:
    odd = [(r, row["n"]) for r, row in enumerate(table) if row["n"] % 2]
    if odd:
        world = len(table)
        ranks = ", ".join(f"rank {r} has {n}" for r, n in odd)
        raise ValueError(
            f"{what}: layout='zigzag' gives each rank two equal chunks, so the local length must "
            f"be even, but {ranks}; pad the sequence to a multiple of 2*W = {2 * world} or use "
            "layout='contiguous'"
        )


def segment_kind(segment_ids: Any) -> int:
    return 0 if segment_ids is None else (2 if isinstance(segment_ids, (tuple, list)) else 1)


def device_code(device: torch.device) -> int:
    t = device.type
    return _DEVICE_TYPES.index(t) if t in _DEVICE_TYPES else 99


def local_spec(q, k, v, causal, window, segment_ids, scale, what: str) -> AttentionSpec:
    """This rank's shard, validated as a call of one sequence against itself (Nq == Nk)."""
    spec = validate(q, k, v, causal=causal, window=window, segment_ids=segment_ids, scale=scale)
    if spec.Nq != spec.Nk:
        raise ValueError(
            f"{what} attends within one sharded sequence, so q and k/v must hold the same local "
            f"length, got Nq={spec.Nq}, Nk={spec.Nk}"
        )
    return spec


# What every rank's shard must agree on before any data moves (ring and Ulysses add their own).
SHARD_LABELS = {
    "n": "local sequence length (use selfattn.distributed.shard to cut equal shards)",
    "dtype": "dtype",
    "device": "device type",
    "B": "batch size",
    "Hq": "number of query heads",
    "Hkv": "number of key/value heads",
    "D": "head dim",
    "Dv": "value head dim",
    "layout": "layout",
    "segments": "use of segment_ids",
    "grad": "need for gradients (every rank must run backward together)",
}


def check_shards(
    spec: AttentionSpec | None,
    layout: str,
    segment_ids: Any,
    extra: dict[str, str],
    extra_values: Callable[[AttentionSpec], dict[str, int]],
    error: Exception | None,
    group: Any,
    x: Any,
    what: str,
) -> list[dict[str, int]]:
    """Agree with every rank on the shards (``SHARD_LABELS`` and ``extra``: key -> label, with
    ``extra_values(spec)`` giving their values) and raise on every rank where any differs, or
    where a zigzag shard is odd. ``spec`` is None where this rank's input was invalid
    (``error``). Returns the table of every rank's fields.
    """
    labels = {**SHARD_LABELS, **extra}
    fields = dict.fromkeys(labels, 0)
    if spec is not None:
        fields.update(
            n=spec.Nq,
            dtype=code(spec.dtype),
            device=device_code(spec.device),
            B=spec.B,
            Hq=spec.Hq,
            Hkv=spec.Hkv,
            D=spec.D,
            Dv=spec.Dv,
            layout=LAYOUTS.index(layout),
            segments=segment_kind(segment_ids),
            grad=int(spec.requires_grad),
            **extra_values(spec),
        )
    table = agree(fields, error, group, meta_device(group, x), what)
    for key, label in labels.items():
        same(table, key, label, what)
    if layout == "zigzag":
        even(table, what)
    return table
