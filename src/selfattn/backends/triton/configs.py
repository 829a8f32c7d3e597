"""Tile choice for the compiled kernels: the candidate tables per head dim and dtype, pruning by
shared memory, registers and length, and the autotuned wrappers of the kernels."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import triton

from . import kernels
from .tma import set_block_shapes

__all__ = [
    "AUTOTUNED",
    "DECODE",
    "DKDV",
    "DQ",
    "F32",
    "FLAG_KEYS",
    "FWD",
    "QUANT_KEYS",
    "REG_BUDGET",
    "SMEM_BUDGET",
    "TABLES",
    "autotune_enabled",
    "candidates",
    "config",
    "dim_class",
    "first_fit",
    "max_configs",
    "prune_configs",
    "tile_of",
    "tuned",
    "unique_configs",
]

Tile = tuple[int, ...]


def autotune_enabled() -> bool:
    """``SELFATTN_TRITON_AUTOTUNE=0``: no autotuning, the first candidate tile that fits runs."""
    return os.environ.get("SELFATTN_TRITON_AUTOTUNE", "1") != "0"


def max_configs() -> int:
    """``SELFATTN_TRITON_MAX_CONFIGS=n``: at most n candidate tiles are autotuned per call site
    (0, the default: all that survive pruning); read per call."""
    return int(os.environ.get("SELFATTN_TRITON_MAX_CONFIGS", "0"))


def config(tile: Tile, pre_hook: Callable[[dict], None] | None = None) -> triton.Config:
    """The config of a table row: (BLOCK_M, BLOCK_N, warps, stages), or for the decode kernel
    (whose BLOCK_M follows the group size) (BLOCK_N, warps, stages)."""
    *blocks, w, s = tile
    names = ("BLOCK_M", "BLOCK_N")[-len(blocks) :]
    return triton.Config(dict(zip(names, blocks)), num_warps=w, num_stages=s, pre_hook=pre_hook)


def tile_of(c: triton.Config) -> Tile:
    """The table row of a (BLOCK_M, BLOCK_N) config: (BLOCK_M, BLOCK_N, warps, stages)."""
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


# Candidate tiles (BLOCK_M, BLOCK_N, warps, stages) per head-dim class, best guesses first: the
# first survivor of pruning is what runs when autotuning is off (SELFATTN_TRITON_AUTOTUNE=0).
# Ordered by what the sm_90 compile reports (benchmarks/triton_aot_check.py --configs): tiles
# that fit in registers without spilling first.
FWD = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4),
         (64, 32, 4, 4), (32, 64, 4, 3), (16, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 4), (128, 64, 4, 3), (64, 64, 4, 3),
          (32, 64, 4, 3), (16, 64, 4, 3)],
    256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 8, 2),
          (32, 32, 4, 2), (16, 32, 4, 2)],
}  # fmt: skip
# backward: BLOCK_M = query rows per step, BLOCK_N = keys per program (dK/dV) or per step (dQ);
# the FlashAttention-2 shape: few query rows against many keys for dK/dV, the reverse for dQ
DKDV = {
    64: [(64, 128, 8, 3), (32, 128, 8, 4), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 3)],
    128: [(32, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 2), (64, 128, 8, 2), (64, 64, 4, 3)],
    256: [(32, 64, 8, 2), (64, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
}
DQ = {
    64: [(128, 32, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (16, 64, 4, 3)],
    128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (16, 64, 4, 2)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2), (16, 32, 4, 2)],
}
DECODE = [(64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 3), (32, 4, 4)]  # BLOCK_N, warps, stages
TABLES = {"fwd": FWD, "dkdv": DKDV, "dq": DQ}
# float32 inputs take exact float32 products ("ieee": FMA, no tensor cores), which need far
# more registers per tile: small tiles only (any head dim)
F32 = {
    "fwd": [(64, 32, 8, 3), (32, 32, 4, 2), (16, 32, 4, 2)],
    "dkdv": [(16, 64, 8, 2), (16, 32, 4, 2)],
    "dq": [(64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
}

SMEM_BUDGET = 200 * 1024  # bytes; Hopper offers 227 KB per block, Ampere 163 KB
# fp32 accumulator and score elements per thread (operand tiles live in shared memory on
# Hopper): about 192 leaves registers for addresses and the rest of the 255 per thread
REG_BUDGET = 192


def dim_class(bd: int) -> int:
    """The head-dim row of the tables for a padded head dim."""
    return 64 if bd <= 64 else 128 if bd <= 128 else 256


def candidates(kind: str, bd: int, elt: int) -> list[Tile]:
    """Candidate tiles (BLOCK_M, BLOCK_N, warps, stages) for a kernel kind, head dim, dtype."""
    return F32[kind] if elt == 4 else TABLES[kind][dim_class(bd)]


def prune_configs(
    kind: str, configs: list[triton.Config], bd: int, bdv: int, elt: int, nq: int, nk: int
) -> list[triton.Config]:
    """Keep the tiles that fit this call: shared memory, registers and the lengths.

    Args:
        kind: "fwd", "dkdv", "dq" or "decode".
        configs: candidates; bd, bdv: padded head dims; elt: bytes per element of q/k/v.
        nq, nk: query and key lengths (tiles much longer than the sequence waste work).
    """
    kept = []
    for c in configs:
        bm, bn = c.kwargs.get("BLOCK_M", 16), c.kwargs["BLOCK_N"]
        s, w = c.num_stages, c.num_warps
        threads = 32 * w
        if kind in ("fwd", "decode"):
            smem = elt * (bm * bd + s * bn * (bd + bdv))
            regs = (bm * bdv + bm * bn) / threads
            rows, keys = nq, nk
        elif kind == "dkdv":  # keys stay, query tiles stream
            smem = elt * (bn * (bd + bdv) + s * bm * (bd + bdv))
            regs = (bn * (bd + bdv) + 2 * bm * bn) / threads
            rows, keys = nk, nq
            bm, bn = bn, bm  # "rows" of the program are keys here
        else:  # dq
            smem = elt * (bm * (bd + bdv) + s * bn * (bd + bdv))
            regs = (bm * bd + 2 * bm * bn) / threads
            rows, keys = nq, nk
        if smem > SMEM_BUDGET or regs > REG_BUDGET:
            continue
        if kind != "decode" and bm > max(16, triton.next_power_of_2(rows)):
            continue
        if bn > max(16, triton.next_power_of_2(keys)):
            continue
        kept.append(c)
    if not kept:  # always leave the smallest candidate
        kept = [min(configs, key=lambda c: c.kwargs.get("BLOCK_M", 16) * c.kwargs["BLOCK_N"])]
    cap = max_configs()
    return kept[:cap] if cap > 0 else kept


def first_fit(kind: str, consts: dict[str, Any], elt: int) -> triton.Config:
    """The tile that runs without autotuning: the first candidate that survives pruning."""
    table = DECODE if kind == "decode" else candidates(kind, consts["BLOCK_D"], elt)
    bd, bdv, nq, nk = (consts[name] for name in ("BLOCK_D", "BLOCK_DV", "TUNE_Q", "TUNE_K"))
    return prune_configs(kind, [config(t) for t in table], bd, bdv, elt, nq, nk)[0]


def _make_prune(kind: str) -> Callable[..., list[triton.Config]]:
    """The autotuner's early pruning: this head dim's candidates in their table order, then
    :func:`prune_configs`."""

    def prune(configs: list[triton.Config], nargs: dict, **kwargs: Any) -> list[triton.Config]:
        args = {**nargs, **kwargs}
        elt = args["Q"].element_size()
        if kind in TABLES:  # this head dim's candidates, in their order of preference
            order = {t: i for i, t in enumerate(candidates(kind, args["BLOCK_D"], elt))}
            configs = sorted(
                (c for c in configs if tile_of(c) in order), key=lambda c: order[tile_of(c)]
            )
        return prune_configs(
            kind, configs, args["BLOCK_D"], args["BLOCK_DV"], elt, args["TUNE_Q"], args["TUNE_K"]
        )

    return prune


# the compile-time flags every row/key-tile kernel takes; each setting is autotuned apart
FLAG_KEYS = [
    "CAUSAL",
    "HAS_LEFT",
    "HAS_RIGHT",
    "HAS_BIAS",
    "HAS_ALIBI",
    "HAS_MASK",
    "HAS_SEG",
    "SOFTCAP",
    "DROPOUT",
    "CLEAN",
    "PREC",
    "EVEN_D",
    "UPCAST",
]


def unique_configs(kind: str, hook: Callable[[dict], None] | None = None) -> list[triton.Config]:
    """One config per distinct tile (and warps, stages) over every table of a kind."""
    tables = [DECODE] if kind == "decode" else [*TABLES[kind].values(), F32[kind]]
    seen = dict.fromkeys(c for table in tables for c in table)
    return [config(c, pre_hook=hook) for c in seen]


# how the forward kernels read quantized keys and values (prepare.kv_operands)
QUANT_KEYS = ["K_BITS", "V_BITS", "K_GROUP", "V_GROUP"]

# kernel -> (kind of its tables, autotune keys besides the common ones, outputs the autotuner
# zeroes between trials because the kernel accumulates into them)
AUTOTUNED: dict[str, tuple[str, list[str], list[str] | None]] = {
    "attn_fwd": ("fwd", ["USE_TMA", "HAS_SINKS", *QUANT_KEYS], None),
    "attn_decode": ("decode", ["USE_TMA", "BLOCK_M", *QUANT_KEYS], None),
    "bwd_dkdv": ("dkdv", [], None),
    "bwd_dq": ("dq", ["NEED_DB", "DB_ROWS", "DB_COLS", "NEED_DA"], ["DB", "DA"]),
}
_TUNED: dict[tuple[str, bool], Any] = {}


def tuned(name: str, tma: bool = False) -> Any:
    """The autotuned wrapper of kernel ``name`` (compiled mode only); with ``tma`` (descriptors
    for K/V) each config's pre-hook sets the descriptors' tile shape."""
    fn = _TUNED.get((name, tma))
    if fn is None:
        kind, extra_keys, reset = AUTOTUNED[name]
        hook = set_block_shapes if tma else None
        fn = triton.autotune(
            unique_configs(kind, hook),
            key=["TUNE_Q", "TUNE_K", "BLOCK_D", "BLOCK_DV", *FLAG_KEYS, *extra_keys],
            prune_configs_by={"early_config_prune": _make_prune(kind)},
            reset_to_zero=reset,
        )(getattr(kernels, name))
        _TUNED[(name, tma)] = fn
    return fn
