"""Host side of the ``triton`` backend: argument packing, autotuning, launches, autograd.

The kernels live in ``kernels.py``. Here a validated :class:`AttentionSpec` becomes kernel
arguments (strides with 0 on broadcast dimensions, segment-id ranges for block skipping,
dropout seeds), each kernel gets an autotuner whose configurations are pruned per head dim,
dtype and length, and :class:`TritonAttention` wires forward and backward into autograd.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through Triton's interpreter
with fixed small tiles instead of autotuning (interp.py).

Environment knobs (read at import, or per call where noted):
  ``SELFATTN_TRITON_AUTOTUNE=0``       no autotuning: the first candidate tile that fits runs.
  ``SELFATTN_TRITON_MAX_CONFIGS=n``    autotune at most n candidates per kernel (per call).
  ``SELFATTN_TRITON_DECODE=auto|always|never``  the split-K kernel for Nq <= 16.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
import triton

from ...spec import AttentionSpec
from . import interp, interpreting, kernels
from .prepare import Call, prepare
from .tma import descriptor_args, distrust, set_block_shapes, use_tma

__all__ = [
    "TritonAttention",
    "attention",
    "backward",
    "forward",
    "interpreting",
    "prune_configs",
    "weights",
]

# "auto" uses the split-K decode kernel for Nq <= DECODE_MAX_NQ over long caches; tests force it.
DECODE_MODE = os.environ.get("SELFATTN_TRITON_DECODE", "auto")  # auto | always | never
DECODE_MAX_NQ = 16
SPLIT_ALIGN = 128  # split lengths are multiples of every decode BLOCK_N


def _autotune_enabled() -> bool:
    return os.environ.get("SELFATTN_TRITON_AUTOTUNE", "1") != "0"


def _max_configs() -> int:
    """At most this many candidate tiles are autotuned per call site (0: all survivors)."""
    return int(os.environ.get("SELFATTN_TRITON_MAX_CONFIGS", "0"))


# --------------------------------------------------------------------------------------------
# Autotuned wrappers
# --------------------------------------------------------------------------------------------

_TUNED: dict[str, Any] = {}


def _elt(t: torch.Tensor) -> int:
    return t.element_size()


def _cfg(tile: tuple, pre_hook=None) -> triton.Config:
    """The config of a table row: (BLOCK_M, BLOCK_N, warps, stages), or for the decode kernel
    (whose BLOCK_M follows the group size) (BLOCK_N, warps, stages)."""
    *blocks, w, s = tile
    names = ("BLOCK_M", "BLOCK_N")[-len(blocks) :]
    return triton.Config(dict(zip(names, blocks)), num_warps=w, num_stages=s, pre_hook=pre_hook)


# Candidate tiles (BLOCK_M, BLOCK_N, warps, stages) per head-dim class, best guesses first: the
# first survivor of pruning is what runs when autotuning is off (SELFATTN_TRITON_AUTOTUNE=0).
# Ordered by what the sm_90 compile reports (benchmarks/triton_aot_check.py --configs): tiles
# that fit in registers without spilling first.
_FWD = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4),
         (64, 32, 4, 4), (32, 64, 4, 3), (16, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 4), (128, 64, 4, 3), (64, 64, 4, 3),
          (32, 64, 4, 3), (16, 64, 4, 3)],
    256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 8, 2),
          (32, 32, 4, 2), (16, 32, 4, 2)],
}  # fmt: skip
# backward: BLOCK_M = query rows per step, BLOCK_N = keys per program (dK/dV) or per step (dQ);
# the FlashAttention-2 shape: few query rows against many keys for dK/dV, the reverse for dQ
_DKDV = {
    64: [(64, 128, 8, 3), (32, 128, 8, 4), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 3)],
    128: [(32, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 2), (64, 128, 8, 2), (64, 64, 4, 3)],
    256: [(32, 64, 8, 2), (64, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
}
_DQ = {
    64: [(128, 32, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (16, 64, 4, 3)],
    128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (16, 64, 4, 2)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2), (16, 32, 4, 2)],
}
_DECODE = [(64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 3), (32, 4, 4)]  # BLOCK_N, warps, stages
_TABLES = {"fwd": _FWD, "dkdv": _DKDV, "dq": _DQ}
# float32 inputs take exact float32 products ("ieee": FMA, no tensor cores), which need far
# more registers per tile: small tiles only (any head dim)
_F32 = {
    "fwd": [(64, 32, 8, 3), (32, 32, 4, 2), (16, 32, 4, 2)],
    "dkdv": [(16, 64, 8, 2), (16, 32, 4, 2)],
    "dq": [(64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
}

SMEM_BUDGET = 200 * 1024  # bytes; Hopper offers 227 KB per block, Ampere 163 KB
# fp32 accumulator and score elements per thread (operand tiles live in shared memory on
# Hopper): about 192 leaves registers for addresses and the rest of the 255 per thread
REG_BUDGET = 192


def _dim_class(bd: int) -> int:
    return 64 if bd <= 64 else 128 if bd <= 128 else 256


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
    cap = _max_configs()
    return kept[:cap] if cap > 0 else kept


def _make_prune(kind: str):
    def prune(configs, nargs, **kwargs):
        args = {**nargs, **kwargs}
        if kind in _TABLES:  # this head dim's candidates, in their order of preference
            cands = _candidates(kind, args["BLOCK_D"], _elt(args["Q"]))
            order = {c: i for i, c in enumerate(cands)}
            key = {id(c): (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                   for c in configs}  # fmt: skip
            configs = sorted(
                (c for c in configs if key[id(c)] in order), key=lambda c: order[key[id(c)]]
            )
        elt = _elt(args["Q"])
        return prune_configs(
            kind, configs, args["BLOCK_D"], args["BLOCK_DV"], elt, args["TUNE_Q"], args["TUNE_K"]
        )

    return prune


_FLAG_KEYS = [
    "CAUSAL", "HAS_LEFT", "HAS_RIGHT", "HAS_BIAS", "HAS_ALIBI", "HAS_MASK", "HAS_SEG",
    "SOFTCAP", "DROPOUT", "CLEAN", "PREC", "EVEN_D", "UPCAST",
]  # fmt: skip


def _unique_configs(kind: str, hook=None) -> list[triton.Config]:
    """One config per distinct tile (and warps, stages) over every table of a kind."""
    tables = [_DECODE] if kind == "decode" else [*_TABLES[kind].values(), _F32[kind]]
    seen = dict.fromkeys(c for table in tables for c in table)
    return [_cfg(c, pre_hook=hook) for c in seen]


# kernel -> (kind of its tables, autotune keys besides the common ones, outputs the autotuner
# zeroes between trials because the kernel accumulates into them)
_AUTOTUNED = {
    "attn_fwd": ("fwd", ["USE_TMA"], None),
    "attn_decode": ("decode", ["USE_TMA", "BLOCK_M"], None),
    "bwd_dkdv": ("dkdv", [], None),
    "bwd_dq": ("dq", ["NEED_DB", "DB_ROWS", "DB_COLS", "NEED_DA"], ["DB", "DA"]),
}


def _tuned(name: str, tma: bool = False) -> Any:
    """The autotuned wrapper of kernel ``name`` (compiled mode only)."""
    fn = _TUNED.get((name, tma))
    if fn is None:
        kind, extra_keys, reset = _AUTOTUNED[name]
        fn = triton.autotune(
            _unique_configs(kind, set_block_shapes if tma else None),
            key=["TUNE_Q", "TUNE_K", "BLOCK_D", "BLOCK_DV", *_FLAG_KEYS, *extra_keys],
            prune_configs_by={"early_config_prune": _make_prune(kind)},
            reset_to_zero=reset,
        )(getattr(kernels, name))
        _TUNED[(name, tma)] = fn
    return fn


def _candidates(kind: str, bd: int, elt: int) -> list[tuple]:
    """Candidate tiles (BLOCK_M, BLOCK_N, warps, stages) for a kernel kind, head dim, dtype."""
    return _F32[kind] if elt == 4 else _TABLES[kind][_dim_class(bd)]


def _launch(name: str, grid, args: list, consts: dict[str, Any], tune: bool = True) -> dict:
    """Launch kernel ``name``; returns the tile sizes it ran with.

    The candidate tiles for this head dim and dtype are autotuned when enabled; otherwise the
    first that survives pruning runs; under the interpreter ``INTERPRET_BLOCKS`` decides.
    Kernels taking TMA descriptors find them in ``consts`` as DESC_K / DESC_V.
    """
    kind = _AUTOTUNED[name][0]
    launch: dict[str, Any] = {}
    if interpreting():
        meta = interp.tiles(kind)
    elif tune and _autotune_enabled():
        fn = _tuned(name, bool(consts.get("USE_TMA")))
        fn[grid](*args, **consts)
        return dict(fn.best_config.kwargs)
    else:
        elt = _elt(args[0])
        table = _DECODE if kind == "decode" else _candidates(kind, consts["BLOCK_D"], elt)
        c = prune_configs(
            kind, [_cfg(t) for t in table], consts["BLOCK_D"], consts["BLOCK_DV"], elt,
            consts["TUNE_Q"], consts["TUNE_K"],
        )[0]  # fmt: skip
        meta = dict(c.kwargs)
        launch = {"num_warps": c.num_warps, "num_stages": c.num_stages}
    set_block_shapes({**consts, **meta})
    getattr(kernels, name)[grid(meta)](*args, **consts, **meta, **launch)
    return meta


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits exercise the combine


def _use_decode(spec: AttentionSpec) -> bool:
    if DECODE_MODE == "never" or spec.Nq > DECODE_MAX_NQ:
        return False
    if DECODE_MODE == "always":
        return True
    # Few queries over a long cache: one program reads each key/value tile once for all the
    # query heads of its group, and the keys are split so that the GPU fills up even for a
    # single sequence (with many sequences the split count falls to 1).
    return spec.Nk >= 4 * SPLIT_ALIGN


@interp.interpretable
def forward(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seed,
    tma: bool | None = None,
    tune: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernels. Returns ``out`` (B, Hq, Nq, Dv) in q's dtype and the natural-log
    ``lse`` (B, Hq, Nq) float32 (-inf for rows that see nothing).

    ``tma`` forces the TMA path on or off (None: :func:`tma.use_tma` decides); ``tune=False``
    skips autotuning (the first candidate tile that fits runs).
    """
    out = torch.empty(spec.B, spec.Hq, spec.Nq, spec.Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(spec.B, spec.Hq, spec.Nq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if spec.Nk == 0:
        return out.zero_(), lse.fill_(-math.inf)
    call = prepare(spec, q, seed)
    with_tma = use_tma(k, v, forward) if tma is None else tma
    run = _decode if _use_decode(spec) else _forward
    try:
        run(call, q, k, v, out, lse, with_tma, tune)
    except Exception as exc:
        if not with_tma or tma is not None:
            raise
        # a TMA variant this Triton cannot build (the probe covers one dtype and head dim):
        # remember, warn once, and run the pointer kernel
        distrust(q.device)
        warnings.warn(
            f"selfattn: TMA kernel failed ({type(exc).__name__}: {str(exc)[:200]}); "
            "using pointers from now on",
            RuntimeWarning,
            stacklevel=2,
        )
        run(call, q, k, v, out, lse, False, tune)
    return out, lse


def _forward(call: Call, q, k, v, out, lse, tma: bool, tune: bool) -> None:
    spec = call.spec
    args = [
        q, k, v, out, lse, *call.args_rules, call.qrng,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *call.strides_rules,
        *call.scalars, *call.scale_args, *call.drop_args,
    ]  # fmt: skip
    consts = dict(call.consts, REVERSE=spec.causal, **descriptor_args(k, v, tma))

    def grid(meta):
        return (triton.cdiv(spec.Nq, meta["BLOCK_M"]), spec.B * spec.Hq)

    _launch("attn_fwd", grid, args, consts, tune)


def _decode(call: Call, q, k, v, out, lse, tma: bool, tune: bool) -> None:
    spec = call.spec
    g, nq = spec.group, spec.Nq
    block_m = max(16, triton.next_power_of_2(min(g * nq, 64)))
    heads_per_prog = max(1, block_m // nq)
    n_hchunks = triton.cdiv(g, heads_per_prog)
    progs = spec.B * spec.Hkv * n_hchunks
    forced = interp.INTERPRET_BLOCKS["decode_splits"] if interpreting() else None
    align = interp.INTERPRET_BLOCKS["decode_n"] if interpreting() else SPLIT_ALIGN
    # about three programs per SM hide the memory latency; more only add partial results
    n_splits = forced if forced is not None else max(1, triton.cdiv(3 * _num_sms(q.device), progs))
    n_splits = max(1, min(n_splits, triton.cdiv(spec.Nk, align)))
    split_len = triton.cdiv(triton.cdiv(spec.Nk, n_splits), align) * align
    n_splits = triton.cdiv(spec.Nk, split_len)
    rows = spec.B * spec.Hq * nq
    opart = torch.empty(rows, n_splits, spec.Dv, dtype=torch.float32, device=q.device)
    lpart = torch.empty(rows, n_splits, dtype=torch.float32, device=q.device)
    args = [
        q, k, v, opart, lpart, *call.args_rules, call.qrng,
        *q.stride(), *k.stride(), *v.stride(), *call.strides_rules,
        *call.scalars, *call.scale_args, *call.drop_args,
        split_len, n_splits, heads_per_prog, n_hchunks,
    ]  # fmt: skip
    consts = dict(call.consts, BLOCK_M=block_m, **descriptor_args(k, v, tma))

    def grid(meta):
        return (n_splits, progs)

    _launch("attn_decode", grid, args, consts, tune)
    kernels.decode_combine[(rows,)](
        opart, lpart, out, lse, *out.stride(), spec.Hq, nq, spec.Dv, n_splits,
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_DV=call.consts["BLOCK_DV"],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@interp.interpretable
def backward(
    spec: AttentionSpec,
    seed,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    need_dbias: bool,
    need_dalibi: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dq, dk, dv, dbias, dalibi)``; dq/dk/dv in the inputs' dtypes, dbias shaped
    like ``spec.bias`` and dalibi like ``spec.alibi_slopes`` (float32; None when not asked for)."""
    dev = q.device
    dq = torch.zeros(q.shape, dtype=q.dtype, device=dev)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=dev)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=dev)
    dbias = dalibi = None
    if need_dbias:
        dbias = torch.zeros(spec.bias.shape, dtype=torch.float32, device=dev)
    if need_dalibi:
        dalibi = torch.zeros(spec.alibi_slopes.shape, dtype=torch.float32, device=dev)
    if min(spec.B, spec.Hq, spec.Nq, spec.Nk) == 0:
        return dq, dk, dv, dbias, dalibi
    if dout is None:
        dout = torch.zeros_like(out)
    call = prepare(spec, q, seed, need_krng=True)
    rows = spec.B * spec.Hq * spec.Nq
    delta = torch.empty(rows, dtype=torch.float32, device=dev)
    lse2 = torch.empty(rows, dtype=torch.float32, device=dev)
    dlse_c = dlse.float().contiguous() if dlse is not None else delta
    pre_m = 64 if not interpreting() else 16
    kernels.bwd_preprocess[(triton.cdiv(spec.Nq, pre_m), spec.B * spec.Hq)](
        out, dout, lse.contiguous(), dlse_c, delta, lse2, *out.stride(), *dout.stride(),
        spec.Hq, spec.Nq, spec.Dv,
        HAS_DLSE=dlse is not None, BLOCK_M=pre_m, BLOCK_DV=call.consts["BLOCK_DV"],
    )  # fmt: skip

    # dK, dV: one program per key tile of each key/value head
    args = [
        q, k, v, dout, dk, dv, lse2, delta, *call.args_rules, call.krng,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        *call.strides_rules, *call.scalars, spec.scale, *call.scale_args, *call.drop_args,
    ]  # fmt: skip

    def grid_kv(meta):
        return (triton.cdiv(spec.Nk, meta["BLOCK_N"]), spec.B * spec.Hkv)

    _launch("bwd_dkdv", grid_kv, args, call.consts)

    # dQ (and dS for the bias and slope gradients): one program per query tile of each head
    min_bm = 16
    n_m_max = triton.cdiv(spec.Nq, min_bm)
    db_rows = need_dbias and spec.bias.shape[2] > 1
    db_cols = need_dbias and spec.bias.shape[3] > 1
    if need_dbias:
        db = torch.zeros(
            spec.B, spec.Hq, spec.Nq if db_rows else n_m_max, spec.Nk if db_cols else 1,
            dtype=torch.float32, device=dev,
        )  # fmt: skip
    else:  # a placeholder of its own: the autotuner zeroes DB and DA between trials
        db = torch.zeros(1, dtype=torch.float32, device=dev)
    if need_dalibi:
        da = torch.zeros(spec.B, spec.Hq, n_m_max, dtype=torch.float32, device=dev)
    else:
        da = torch.zeros(1, dtype=torch.float32, device=dev)
    db_strides = list(db.stride()) if need_dbias else [0, 0, 0, 0]
    args = [
        q, k, v, dout, dq, lse2, delta, *call.args_rules, call.qrng, db, da,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        *call.strides_rules, *db_strides, n_m_max, *call.scalars, spec.scale, *call.scale_args,
        *call.drop_args,
    ]  # fmt: skip
    consts = dict(
        call.consts, NEED_DB=need_dbias, DB_ROWS=db_rows, DB_COLS=db_cols, NEED_DA=need_dalibi
    )

    def grid_q(meta):
        return (triton.cdiv(spec.Nq, meta["BLOCK_M"]), spec.B * spec.Hq)

    _launch("bwd_dq", grid_q, args, consts)

    if need_dbias:
        part = db if db_rows else db.sum(2, keepdim=True)
        dims = [d for d in (0, 1) if spec.bias.shape[d] == 1 and part.shape[d] != 1]
        dbias = part.sum(dims, keepdim=True) if dims else part
        dbias = dbias.reshape(spec.bias.shape)
    if need_dalibi:
        per_head = da.sum(2)  # (B, Hq)
        dalibi = per_head.sum(0, keepdim=True) if spec.alibi_slopes.shape[0] == 1 else per_head
    return dq, dk, dv, dbias, dalibi


class TritonAttention(torch.autograd.Function):
    """Autograd for the fused kernels: saves q, k, v, out and lse; the backward kernels
    recompute the probabilities from the lse (FlashAttention-2)."""

    @staticmethod
    def forward(ctx, spec, seed, q, k, v, bias, alibi):  # type: ignore[override]
        out, lse = forward(spec, q, k, v, seed)
        ctx.spec, ctx.seed = spec, seed
        ctx.need_bias = bias is not None and bias.requires_grad
        ctx.need_alibi = alibi is not None and alibi.requires_grad
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        spec = ctx.spec
        dq, dk, dv, dbias, dalibi = backward(
            spec, ctx.seed, q, k, v, out, lse, dout, dlse, ctx.need_bias, ctx.need_alibi
        )
        if dbias is not None:
            dbias = dbias.to(spec.bias.dtype)
        if dalibi is not None:
            dalibi = dalibi.to(spec.alibi_slopes.dtype)
        return None, None, dq, dk, dv, dbias, dalibi


def attention(
    spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend's entry: autograd when the spec needs it, plain kernels otherwise."""
    if spec.requires_grad:
        return TritonAttention.apply(spec, seed, q, k, v, spec.bias, spec.alibi_slopes)
    return forward(spec, q, k, v, seed)


# --------------------------------------------------------------------------------------------
# attention_weights
# --------------------------------------------------------------------------------------------


@interp.interpretable
def weights(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None,
    head_idx: torch.Tensor | None,
    row_idx: torch.Tensor | None,
) -> torch.Tensor:
    """Probabilities of the selected heads and rows, (B, len(heads), len(rows), Nk) float32.

    ``lse`` (B, Hq, Nq) natural log, e.g. from the forward kernel; when None the kernel computes
    it for the selected rows only. Selection happens inside the kernel (row and head index
    vectors), so q, k and the rule tensors are never gathered.
    """
    dev = q.device
    heads = (torch.arange(spec.Hq, device=dev) if head_idx is None else head_idx.to(dev)).to(
        torch.int32
    )
    rows = (torch.arange(spec.Nq, device=dev) if row_idx is None else row_idx.to(dev)).to(
        torch.int32
    )
    hs, m = heads.numel(), rows.numel()
    probs = torch.zeros(spec.B, hs, m, spec.Nk, dtype=torch.float32, device=dev)
    if probs.numel() == 0:
        return probs
    call = prepare(spec, q, None)
    lse_t = lse if lse is not None else probs
    lse_strides = list(lse.stride()) if lse is not None else [0, 0, 0]
    consts = {
        name: call.consts[name]
        for name in (
            "CAUSAL", "HAS_LEFT", "HAS_RIGHT", "HAS_BIAS", "HAS_ALIBI", "HAS_MASK", "HAS_SEG",
            "SOFTCAP", "CLEAN", "PREC", "UPCAST", "BLOCK_D",
        )
    }  # fmt: skip
    if interpreting():
        bm, bn = interp.INTERPRET_BLOCKS["probs"]
        launch = {}
    else:
        bm, bn = 64, 64
        launch = {"num_warps": 4, "num_stages": 2}
    b, hq, g, nq, nk, d, _, off = call.scalars
    kernels.attn_probs[(triton.cdiv(m, bm), spec.B * hs)](
        q, k, probs, lse_t, rows, heads, *call.args_rules, call.qrng,
        *q.stride(), *k.stride(), *probs.stride(), *lse_strides, *call.strides_rules,
        b, hq, g, nq, nk, d, off, m, hs, *call.scale_args,
        **consts, HAS_LSE=lse is not None, BLOCK_M=bm, BLOCK_N=bn, **launch,
    )  # fmt: skip
    return probs
