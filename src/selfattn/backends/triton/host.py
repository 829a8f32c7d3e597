"""Launches of the ``triton`` backend: forward (row tiles or split-K decode), backward, the
probabilities kernel and the autograd Function; tiles come from configs.py, arguments from
prepare.py, and interp.py makes every launch runnable under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import triton

from ...first_order import first_order
from ...quant import QuantizedKV, rotated_like
from ...sinks import sink_probability
from ...spec import AttentionSpec
from . import configs, interp, interpreting, kernels
from .prepare import Call, kv_operands, prepare, sink_args
from .tma import descriptor_args, distrust, set_block_shapes, use_tma

__all__ = [
    "DECODE_MAX_NQ",
    "DECODE_MODE",
    "TritonAttention",
    "attention",
    "backward",
    "forward",
    "stats",
    "use_decode",
    "weights",
]

Seed = tuple[int, int] | None
Grid = Callable[[dict[str, Any]], tuple[int, ...]]

# SELFATTN_TRITON_DECODE: "auto" (default) uses the split-K decode kernel for Nq <= DECODE_MAX_NQ
# over long caches, "always" whenever Nq <= DECODE_MAX_NQ, "never" not at all; tests force it
DECODE_MODE = os.environ.get("SELFATTN_TRITON_DECODE", "auto")
DECODE_MAX_NQ = 16
SPLIT_ALIGN = 128  # split lengths are multiples of every decode BLOCK_N


# --------------------------------------------------------------------------------------------
# One autotuned launch
# --------------------------------------------------------------------------------------------


def _launch(name: str, grid: Grid, args: list, consts: dict[str, Any], tune: bool = True) -> dict:
    """Launch kernel ``name``; returns the tile sizes it ran with.

    The candidate tiles for this head dim and dtype are autotuned when enabled; otherwise the
    first that survives pruning runs; under the interpreter ``INTERPRET_BLOCKS`` decides.
    Kernels taking TMA descriptors find them in ``consts`` as DESC_K / DESC_V.
    """
    kind = configs.AUTOTUNED[name][0]
    launch: dict[str, Any] = {}
    if interpreting():
        meta = interp.tiles(kind)
    elif tune and configs.autotune_enabled():
        fn = configs.tuned(name, bool(consts.get("USE_TMA")))
        fn[grid](*args, **consts)
        return dict(fn.best_config.kwargs)
    else:
        c = configs.first_fit(kind, consts, args[0].element_size())
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


def use_decode(spec: AttentionSpec) -> bool:
    """Whether the forward runs the split-K decode kernel (``DECODE_MODE``)."""
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
    seed: Seed,
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
    if spec.Nk == 0:  # nothing to see: output 0, lse -inf (or the sink: its logit alone)
        if spec.sinks is not None:
            return out.zero_(), lse.copy_(spec.sinks.float().view(1, -1, 1).expand_as(lse))
        return out.zero_(), lse.fill_(-math.inf)
    call = prepare(spec, q, seed)
    quant = type(k) is QuantizedKV or type(v) is QuantizedKV
    with_tma = False if quant else use_tma(k, v, forward) if tma is None else tma
    run = _run_decode if use_decode(spec) else _run_rows
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


def _run_rows(call: Call, q, k, v, out, lse, tma: bool, tune: bool) -> None:
    """The forward kernel: one program per tile of query rows of each head."""
    spec = call.spec
    k, v, scales, scale_strides, qconsts = kv_operands(k, v, q)
    sinks, sconsts = sink_args(spec, q)
    args = [q, k, v, out, lse, *call.args_rules, call.qrng, *scales, *sinks]
    args += [*q.stride(), *k.stride(), *v.stride(), *out.stride(), *call.strides_rules]
    args += [*scale_strides, *call.scalars, *call.scale_args, *call.drop_args]
    consts = dict(call.consts, REVERSE=spec.causal, **qconsts, **sconsts)
    consts.update(descriptor_args(k, v, tma))

    def grid(meta):
        return (triton.cdiv(spec.Nq, meta["BLOCK_M"]), spec.B * spec.Hq)

    _launch("attn_fwd", grid, args, consts, tune)


def _run_decode(call: Call, q, k, v, out, lse, tma: bool, tune: bool) -> None:
    """The split-K decode kernel (all query heads of a key/value head in one program, the keys
    split), then the combine of the splits by their lse."""
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
    lpart = torch.empty(rows, n_splits, 2, dtype=torch.float32, device=q.device)  # (m, l)
    k, v, scales, scale_strides, qconsts = kv_operands(k, v, q)
    args = [q, k, v, opart, lpart, *call.args_rules, call.qrng, *scales]
    args += [*q.stride(), *k.stride(), *v.stride(), *call.strides_rules, *scale_strides]
    args += [*call.scalars, *call.scale_args, *call.drop_args]
    args += [split_len, n_splits, heads_per_prog, n_hchunks]
    consts = dict(call.consts, BLOCK_M=block_m, **qconsts, **descriptor_args(k, v, tma))

    def grid(meta):
        return (n_splits, progs)

    _launch("attn_decode", grid, args, consts, tune)
    sinks, sconsts = sink_args(spec, q)  # the sink joins in the combine only
    args = [opart, lpart, out, lse, *sinks, *out.stride(), spec.Hq, nq, spec.Dv, n_splits]
    block_s = max(2, triton.next_power_of_2(n_splits))
    bdv = call.consts["BLOCK_DV"]
    kernels.decode_combine[(rows,)](*args, BLOCK_S=block_s, BLOCK_DV=bdv, **sconsts)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@interp.interpretable
def backward(
    spec: AttentionSpec,
    seed: Seed,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    need_dbias: bool,
    need_dalibi: bool,
    dsink_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dq, dk, dv, dbias, dalibi)``; dq/dk/dv in the inputs' dtypes, dbias shaped
    like ``spec.bias`` and dalibi like ``spec.alibi_slopes`` (float32; None when not asked for).

    ``dsink_rows`` (B * Hq * Nq,) float32, given with sinks: each row's share of the sinks'
    gradient is written there (the caller sums it per head); rows that are never run (an
    empty call) keep what it held."""
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
        if dsink_rows is not None and dlse is not None and spec.Nk == 0:
            # every row is the sink alone: p_sink = 1 (0 for a -inf sink), delta = -dlse
            p_sink = sink_probability(spec.sinks, lse.float())
            dsink_rows.copy_((p_sink * dlse.float()).reshape(-1))
        return dq, dk, dv, dbias, dalibi
    if dout is None:
        dout = torch.zeros_like(out)
    call = prepare(spec, q, seed, need_krng=True)
    rows = spec.B * spec.Hq * spec.Nq
    delta = torch.empty(rows, dtype=torch.float32, device=dev)
    lse_p = torch.empty(rows, dtype=torch.float32, device=dev)
    dlse_c = dlse.float().contiguous() if dlse is not None else delta
    pre_m = 64 if not interpreting() else 16
    sinks, sconsts = sink_args(spec, q)
    sconsts["HAS_SINKS"] = sconsts["HAS_SINKS"] and dsink_rows is not None
    dsink = dsink_rows if dsink_rows is not None else delta
    args = [out, dout, lse.contiguous(), dlse_c, delta, lse_p, sinks[0], dsink]
    args += [*out.stride(), *dout.stride(), spec.Hq, spec.Nq, spec.Dv, sinks[1]]
    consts = {"HAS_DLSE": dlse is not None, "BLOCK_M": pre_m, "BLOCK_DV": call.consts["BLOCK_DV"]}
    consts.update(sconsts)
    kernels.bwd_preprocess[(triton.cdiv(spec.Nq, pre_m), spec.B * spec.Hq)](*args, **consts)

    # dK, dV: one program per key tile of each key/value head
    args = [q, k, v, dout, dk, dv, lse_p, delta, *call.args_rules, call.krng]
    args += [*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride()]
    args += [*call.strides_rules, *call.scalars, spec.scale, *call.scale_args, *call.drop_args]

    def grid_kv(meta):
        return (triton.cdiv(spec.Nk, meta["BLOCK_N"]), spec.B * spec.Hkv)

    _launch("bwd_dkdv", grid_kv, args, call.consts)

    # dQ (and dS for the bias and slope gradients): one program per query tile of each head
    min_bm = 16
    n_m_max = triton.cdiv(spec.Nq, min_bm)
    db_rows = need_dbias and spec.bias.shape[2] > 1
    db_cols = need_dbias and spec.bias.shape[3] > 1
    f32 = {"dtype": torch.float32, "device": dev}
    if need_dbias:
        db_shape = (spec.B, spec.Hq, spec.Nq if db_rows else n_m_max, spec.Nk if db_cols else 1)
        db = torch.zeros(db_shape, **f32)
    else:  # a placeholder of its own: the autotuner zeroes DB and DA between trials
        db = torch.zeros(1, **f32)
    da = torch.zeros(spec.B, spec.Hq, n_m_max, **f32) if need_dalibi else torch.zeros(1, **f32)
    db_strides = list(db.stride()) if need_dbias else [0, 0, 0, 0]
    args = [q, k, v, dout, dq, lse_p, delta, *call.args_rules, call.qrng, db, da]
    args += [*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride()]
    args += [*call.strides_rules, *db_strides, n_m_max, *call.scalars, spec.scale]
    args += [*call.scale_args, *call.drop_args]
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
    recompute the probabilities from the lse (FlashAttention-2). A :class:`QuantizedKV` k or
    v (no gradient) is kept as it is and dequantized, in the basis of its codes, for the
    backward kernels only."""

    @staticmethod
    def forward(ctx, spec, seed, q, k, v, bias, alibi, sinks):  # type: ignore[override]
        out, lse = forward(spec, q, k, v, seed)
        ctx.spec, ctx.seed = spec, seed
        ctx.need_bias = bias is not None and bias.requires_grad
        ctx.need_alibi = alibi is not None and alibi.requires_grad
        ctx.need_sinks = sinks is not None and sinks.requires_grad
        ctx.quantized = [t if type(t) is QuantizedKV else None for t in (k, v)]
        k_saved, v_saved = (q.new_empty(0) if type(t) is QuantizedKV else t for t in (k, v))
        ctx.save_for_backward(q, k_saved, v_saved, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        kq, vq = ctx.quantized
        if kq is not None:
            k = kq.dequantize(rotated=True)
        if vq is not None:
            v = vq.dequantize(rotated=True)
        spec = ctx.spec
        rows = torch.zeros(lse.numel(), dtype=torch.float32, device=lse.device)
        with torch.no_grad():  # create_graph=True: first-order gradients, refused below
            dq, dk, dv, dbias, dalibi = backward(
                spec, ctx.seed, q, k, v, out, lse, dout, dlse, ctx.need_bias, ctx.need_alibi,
                rows if ctx.need_sinks else None,
            )  # fmt: skip
        dsinks = None
        if ctx.need_sinks:  # each row's -p_sink * delta from the preprocess kernel, per head
            dsinks = rows.view(lse.shape).sum((0, 2)).to(spec.sinks.dtype)
        if dbias is not None:
            dbias = dbias.to(spec.bias.dtype)
        if dalibi is not None:
            dalibi = dalibi.to(spec.alibi_slopes.dtype)
        if kq is not None:
            dk = None  # a QuantizedKV gets no gradient
        if vq is not None:
            dv = None
        anchors = (q, k, v, spec.bias, spec.alibi_slopes, spec.sinks)
        grads = (dq, dk, dv, dbias, dalibi, dsinks)
        return (None, None, *first_order("triton", anchors, grads))


def attention(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor | QuantizedKV,
    v: torch.Tensor | QuantizedKV,
    seed: Seed,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend's entry: autograd when the spec needs it, plain kernels otherwise.

    ``k`` and ``v`` may be :class:`QuantizedKV`: the kernels read their codes (never a
    dequantized copy). Rotated codes stay rotated: q is rotated for rotated keys (scores
    ``q . (H r) = (H q) . r``) and the output for rotated values (``sum p (H r) = H sum p r``).
    """
    rotate_out = False
    if type(k) is QuantizedKV or type(v) is QuantizedKV:
        if type(k) is QuantizedKV and k.rotate:
            q = rotated_like(q)  # (B, Hq, Nq, D), differentiable
        rotate_out = type(v) is QuantizedKV and v.rotate
    if spec.requires_grad:
        out, lse = TritonAttention.apply(
            spec, seed, q, k, v, spec.bias, spec.alibi_slopes, spec.sinks
        )
    else:
        out, lse = forward(spec, q, k, v, seed)
    if rotate_out:
        out = rotated_like(out)  # (B, Hq, Nq, Dv) back from the values' rotated basis
    return out, lse


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
    heads, rows = _selection(spec, q.device, head_idx, row_idx)
    probs = torch.zeros(
        spec.B, heads.numel(), rows.numel(), spec.Nk, dtype=torch.float32, device=q.device
    )
    if probs.numel():
        _probs(spec, q, k, lse, heads, rows, probs, {"WRITE_P": True})
    return probs


@interp.interpretable
def stats(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None,
    head_idx: torch.Tensor | None,
    row_idx: torch.Tensor | None,
    *,
    col_sum: bool,
    col_max: bool,
    entropy: bool,
) -> dict[str, torch.Tensor]:
    """``attention_stats``'s column sums and maxima (B, H', Nk) and row entropies (B, H', Nq')
    of the selected heads and rows, float32: the probabilities kernel reduces each tile instead
    of storing it (``lse`` recomputed for the selected rows when None). Only the keys asked for.
    """
    heads, rows = _selection(spec, q.device, head_idx, row_idx)
    f32 = {"dtype": torch.float32, "device": q.device}
    b, hs, m = spec.B, heads.numel(), rows.numel()
    got = {}
    if col_sum:
        got["col_sum"] = torch.zeros(b, hs, spec.Nk, **f32)
    if col_max:
        got["col_max"] = torch.zeros(b, hs, spec.Nk, **f32)
    if entropy:
        got["entropy"] = torch.zeros(b, hs, m, **f32)
    if got and b * hs * m * spec.Nk:
        dummy = next(iter(got.values()))
        outs = [got.get(name, dummy) for name in ("col_sum", "col_max", "entropy")]
        flags = {"WRITE_P": False, "COL_SUM": col_sum, "COL_MAX": col_max, "ENTROPY": entropy}
        _probs(spec, q, k, lse, heads, rows, dummy, flags, outs)
    return got


def _selection(
    spec: AttentionSpec,
    dev: torch.device,
    head_idx: torch.Tensor | None,
    row_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected heads and rows as int32 index vectors on ``dev`` (all when None)."""
    heads = torch.arange(spec.Hq, device=dev) if head_idx is None else head_idx.to(dev)
    rows = torch.arange(spec.Nq, device=dev) if row_idx is None else row_idx.to(dev)
    return heads.to(torch.int32), rows.to(torch.int32)


def _probs(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None,
    heads: torch.Tensor,
    rows: torch.Tensor,
    probs: torch.Tensor,
    flags: dict[str, bool],
    outs: list[torch.Tensor] | None = None,
) -> None:
    """Launch ``attn_probs``: ``probs`` (B, H', Nq', Nk) written with ``WRITE_P``, ``outs``
    (col_sum, col_max, entropy; contiguous) reduced into with the stats flags."""
    hs, m = heads.numel(), rows.numel()
    call = prepare(spec, q, None)
    lse_t = lse if lse is not None else probs
    lse_strides = list(lse.stride()) if lse is not None else [0, 0, 0]
    # the call's flags but DROPOUT and EVEN_D, which the probabilities kernel does not take
    consts = {n: call.consts[n] for n in configs.FLAG_KEYS if n not in ("DROPOUT", "EVEN_D")}
    consts["BLOCK_D"] = call.consts["BLOCK_D"]
    consts.update({"COL_SUM": False, "COL_MAX": False, "ENTROPY": False}, **flags)
    if interpreting():
        (bm, bn), launch = interp.INTERPRET_BLOCKS["probs"], {}
    else:
        (bm, bn), launch = (64, 64), {"num_warps": 4, "num_stages": 2}
    b, hq, g, nq, nk, d, _, off = call.scalars
    outs = outs if outs is not None else [probs] * 3
    sinks, sconsts = sink_args(spec, q)
    consts.update(sconsts)
    args = [q, k, probs, lse_t, rows, heads, *call.args_rules, call.qrng, *outs, *sinks]
    p_strides = list(probs.stride()) if flags["WRITE_P"] else [0, 0, 0, 0]
    args += [*q.stride(), *k.stride(), *p_strides, *lse_strides, *call.strides_rules]
    args += [b, hq, g, nq, nk, d, off, m, hs, *call.scale_args]
    consts.update(HAS_LSE=lse is not None, BLOCK_M=bm, BLOCK_N=bn, **launch)
    kernels.attn_probs[(triton.cdiv(m, bm), spec.B * hs)](*args, **consts)
