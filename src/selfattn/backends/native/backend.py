"""``native``: the fused C++ CPU engine (``csrc/``, built by ``build.py``) as a backend.

Every rule, float32/float64 compute (float16/bfloat16 inputs accumulate in float32), forward,
backward, split-K decode and exact probabilities, threads from torch's intra-op pool. It offers
every hook of the registry. The rules reach the extension as one record built from the spec
(``call.record``). A decode call is microseconds of work, so ``run`` does as little as it can in
Python: the spec is already validated, and the tensors go to the extension as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ... import engine
from ...engine.autograd import sink_tangent
from ...forward_mode import transformed
from ...quant import QuantizedKV, rotated_like, standin, unwrap_call
from ...rules import normalized
from ...sinks import sink_grad, sink_probability
from ...spec import AttentionSpec
from . import build, choice
from .call import REFUSED, record, records_over, records_with_window
from .second import fused_second
from .tangents import at_current_level, fused_pass

__all__ = ["NativeBackend"]

_HALF = (torch.float16, torch.bfloat16)


class _NativeFunction(torch.autograd.Function):
    """Autograd: saves q, k, v, out and lse; the backward kernels recompute P from the lse.

    Returns ``out`` and ``lse`` as the kernels give them (the caller casts): being the node's
    own outputs, they carry its graph into a double backward, whose second-order terms are the
    fused C++ pass (``second.py``) or, where that declines, the torch-op engine's tile-by-tile
    VJP (``engine.second_order``). Forward mode: ``fused`` holds
    out, lse and their tangents from the one-pass C++ kernel (``tangents.fused_pass``), which
    the forward and ``jvp`` return; where it is None (the kernel declined, or vmap / grad
    transforms), ``jvp`` is the engine's tangent pass from this node's ``out`` and ``lse``
    (``engine.jvp``).
    """

    @staticmethod
    def forward(spec, seed, fused, q, k, v, bias, alibi, sinks):  # type: ignore[override]
        if fused is not None:
            return fused.out, fused.lse
        spec = _with_inputs(spec, bias, alibi, sinks)
        need = [t is not None and t.requires_grad for t in (bias, alibi, sinks)]
        out_acc = q.dtype in _HALF and any(need)
        # 16-bit inputs: D = rowsum(dO * O) from the rounded output would cost the bias and ALiBi
        # gradients three digits, so the output is also kept in float32 for the backward
        return tuple(build.load().forward(q, k, v, record(spec, seed), True, out_acc))

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, seed, fused, q, k, v, bias, alibi, sinks = inputs
        out, lse = output
        ctx.spec, ctx.seed, ctx.fused = _with_inputs(spec, bias, alibi, sinks), seed, fused
        ctx.call = record(ctx.spec, seed)
        ctx.need = tuple(t is not None and t.requires_grad for t in (bias, alibi, sinks))
        ctx.save_for_backward(q, k, v, out, lse, bias, alibi, sinks)
        ctx.save_for_forward(q, k, v, out, lse, sinks)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse, bias, alibi, sinks = ctx.saved_tensors
        spec, call, need = ctx.spec, ctx.call, ctx.need
        if dout is None and dlse is None:  # e.g. a double backward folded this node's share
            return (None,) * 9  # spec, seed, fused, q, k, v, bias, alibi, sinks
        if dout is None:
            dout = torch.zeros(out.shape, dtype=q.dtype)

        def first(q, k, v, out, lse, dout, dlse):
            dlse = torch.empty(0) if dlse is None else dlse
            dq, dk, dv, dbias, dalibi = build.load().backward(
                dout, q, k, v, out, lse, dlse, call, *need[:2]
            )
            if dbias is not None:
                dbias = dbias.reshape(spec.bias.shape)
            if dalibi is not None:
                dalibi = dalibi.reshape(spec.alibi_slopes.shape)
            return dq, dk, dv, dbias, dalibi

        prob = engine.Problem.of(spec, ctx.seed)
        tensors = (q, k, v, out, lse, dout, dlse, bias, alibi)
        # a double backward runs the fused C++ pass (second.py) where it applies
        dq, dk, dv, dbias, dalibi = engine.differentiable_backward(
            first, "native", prob, need, tensors, fused_second(spec, call)
        )
        if dbias is not None:
            dbias = dbias.to(bias.dtype)
        if dalibi is not None:
            dalibi = dalibi.to(alibi.dtype)
        dsinks = None
        if need[2]:  # from out and lse alone, in torch ops: autograd differentiates it again
            dsinks = sink_grad(sinks, out, lse, dout, dlse)
        grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, dalibi, dsinks)
        return None, None, None, *grads

    @staticmethod
    def jvp(ctx, _spec, _seed, _fused, tq, tk, tv, tbias, talibi, tsinks):  # type: ignore[override]
        q, k, v, out, lse, sinks = ctx.saved_tensors
        fused, ctx.fused = ctx.fused, None  # the node keeps no tangent alive
        with torch.no_grad():
            if fused is not None:  # computed with out and lse in the fused pass
                tout, tlse = at_current_level(fused.tout), at_current_level(fused.tlse)
            else:
                prob = engine.Problem.of(ctx.spec, ctx.seed)
                tout, tlse = engine.tangent_pass(prob, q, k, v, out, lse, tq, tk, tv, tbias, talibi)
            tout, tlse = sink_tangent(sinks, tsinks, out, lse, tout, tlse)
        spec = ctx.spec
        anchors = (q, k, v, spec.bias, spec.alibi_slopes, sinks, tq, tk, tv, tbias, talibi, tsinks)
        return engine.tangents_out("native", anchors, (tout.to(out.dtype), tlse.to(lse.dtype)))

    @staticmethod
    def vmap(info, in_dims, spec, seed, fused, q, k, v, bias, alibi, sinks):  # type: ignore[override]
        tensors = (q, k, v, bias, alibi, sinks)
        outs = [
            _NativeFunction.apply(spec, seed, None, *engine.vmap_slices(tensors, in_dims[3:], i))
            for i in range(info.batch_size)
        ]
        return (torch.stack([o for o, _ in outs]), torch.stack([x for _, x in outs])), (0, 0)


def _with_inputs(spec: AttentionSpec, bias, alibi, sinks) -> AttentionSpec:
    """``spec`` reading the bias, slopes and sinks the node was given (``engine.with_inputs``)."""
    if spec.bias is bias and spec.alibi_slopes is alibi and spec.sinks is sinks:
        return spec
    return replace(spec, bias=bias, alibi_slopes=alibi, sinks=sinks)


class NativeBackend:
    """Fused C++ kernels for the CPU (AVX-512 or AVX2 chosen at run time); every rule."""

    name = "native"

    def unavailable(self) -> str | None:
        return build.unavailable()

    def detail(self) -> str:
        """Which compiled kernels run here, and where the build lives."""
        ext = build.load()
        return (
            f"{ext.isa('float32')} kernels for float32/16-bit, {ext.isa('float64')} for float64; "
            f"built in {build.build_dir()}"
        )

    def prefer(self, spec: AttentionSpec) -> tuple[str, str] | None:
        """For ``auto`` only: the backend to run instead where it accepts the call, and why
        (``choice.prefer``: SDPA for calls below the measured small-call size). Quantized keys or
        values stay here: native reads their codes, SDPA would need them dequantized first."""
        return None if spec.quantized else choice.prefer(spec)

    def check(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.device.type != "cpu":
            reasons.append(f"runs on the CPU, inputs are on {spec.device}")
        if spec.qpos is not None:
            reasons.append("rows are selected in its weights hook, not as a part")
        for rule in REFUSED:  # a rule missing from the call record is refused, never ignored
            if rule.used(spec):
                reasons.append(f"{rule.keyword} is not in its call record (native/call.py)")
        return reasons

    def run(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seed: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if spec.requires_grad or spec.tangents or transformed():
            args = (spec.bias, spec.alibi_slopes, spec.sinks)
            # forward mode: out, lse and tangents in one fused pass where the kernel takes it
            fused = fused_pass(spec, seed, q, k, v) if spec.tangents else None
            out, lse = _NativeFunction.apply(spec, seed, fused, q, k, v, *args)
            return out.to(q.dtype), lse.float()
        out, lse = build.load().forward(q, k, v, record(spec, seed), True, False)
        return out, lse if lse.dtype == torch.float32 else lse.float()  # float32 (docs/api.md)

    def plain(self, spec: AttentionSpec) -> Callable:
        """``run(q, k, v)`` for the front door's fast path: this plain spec's forward (no
        gradient, tangent or transform, no dropout), with the call record built once."""
        forward, call = build.load().forward, record(spec)
        if spec.dtype != torch.float64:
            return lambda q, k, v: forward(q, k, v, call, True, False)

        def run64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
            out, lse = forward(q, k, v, call, True, False)
            return out, lse.float()  # float32 (docs/api.md)

        return run64

    reads_quantized = True  # the front door hands it QuantizedKV operands as they are

    def run_quantized(
        self, spec: AttentionSpec, q: torch.Tensor, k: Any, v: Any, seed: tuple[int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``run`` with ``k`` and/or ``v`` a ``QuantizedKV`` (validated by the front door with
        stand-ins): the kernels read the codes in place, one key row or tile at a time, and
        rotate q (rotated keys) and the output (rotated values) themselves. A call that needs a
        gradient (of q or a rule) goes through the dequantized values instead: the backward
        kernels read K and V several times."""
        if spec.requires_grad or spec.tangents or transformed():
            q, k, v, _, rotate_out = unwrap_call(q, k, v)
            out, lse = self.run(spec, q, k, v, seed)
            return (rotated_like(out) if rotate_out else out), lse
        call = record(spec, seed, k, v)
        out, lse = build.load().forward(q, standin(k), standin(v), call, True, False)
        return out, lse if lse.dtype == torch.float32 else lse.float()

    def plain_quantized(self, spec: AttentionSpec, k: Any, v: Any) -> Callable:
        """``run(q, k, v)`` for the front door's fast path over a quantized cache: this plain
        spec's ``run_quantized`` (no gradient, tangent or transform, no dropout) for operands of
        the kind of ``k`` / ``v`` (a ``QuantizedKV`` of the same shape, bits, group size,
        rotation and dtype, or a tensor of the same shape), with the stand-ins and the spec's
        part of the call record made once."""
        forward, make = build.load().forward, records_over(spec, k, v)
        sk = standin(k) if isinstance(k, QuantizedKV) else None  # None: the call's tensor
        sv = standin(v) if isinstance(v, QuantizedKV) else None
        wide = spec.dtype == torch.float64  # lse comes back float64: float32 (docs/api.md)
        if sk is not None and sv is not None and not wide:  # the usual case: both quantized
            return lambda q, k, v: forward(q, sk, sv, make(k, v), True, False)

        def run(q: torch.Tensor, k: Any, v: Any) -> tuple:
            out, lse = forward(
                q, k if sk is None else sk, v if sv is None else sv, make(k, v), True, False
            )
            return out, lse.float() if wide else lse

        return run

    def plain_residual(self, spec: AttentionSpec, k: Any, v: Any) -> Callable:
        """``run(q, k, v, kw, vw)`` for a decode step over a cache with a float window
        (``kv_residual.fused_call``): keys ``k`` and values ``v`` (each a ``QuantizedKV`` of
        the kind given, or a tensor), then the float windows ``kw`` / ``vw``, read in one
        decode call (the window's chunks combined with the others'). ``spec`` is the whole
        call's (no gradient, tangent, transform or dropout; a decode-sized plain call); the
        lengths of either part are the call's own."""
        forward, make = build.load().forward, records_with_window(spec, k, v)
        wide = spec.dtype == torch.float64  # lse comes back float64: float32 (docs/api.md)

        def run(q: torch.Tensor, k: Any, v: Any, kw: torch.Tensor, vw: torch.Tensor) -> tuple:
            start = k.shape[2] + kw.shape[2] - q.shape[2]
            out, lse = forward(q, standin(k), standin(v), make(k, v, kw, vw, start), True, False)
            return out, lse.float() if wide else lse

        return run

    def forward(self, spec, q, k, v, seed):
        """The forward kernels (decode or row tiles), no autograd; out in the accumulation dtype
        (ring attention merges blocks in it)."""
        return build.load().forward(q, k, v, record(spec, seed), True, True)

    def backward(self, spec, q, k, v, out, lse, dout, dlse, seed, need_dbias, need_dalibi):
        """The backward kernels, from ``out`` and ``lse`` as given (best in the accumulation
        dtype: see ``_compile``)."""
        dlse = torch.empty(0) if dlse is None else dlse
        call = record(spec, seed)
        return build.load().backward(dout, q, k, v, out, lse, dlse, call, need_dbias, need_dalibi)

    def weights(self, spec, q, k, lse, heads, rows):
        """Probabilities (B, len(heads), len(rows), Nk) float32 of the selected heads and rows,
        from the probabilities kernel, one contiguous run of rows at a time (each run is a part
        of the call with its own start, so no more rows than asked for are computed)."""
        if heads is not None:
            q = q.index_select(1, heads)
            k = k.index_select(1, heads // spec.group)  # one key head per selected query head
            lse = None if lse is None else lse.index_select(1, heads)
            spec = spec.select(heads, None)
        ext = build.load()
        runs = [(0, spec.Nq)] if rows is None else _runs(rows.tolist())
        pieces = []
        for r0, r1 in runs:
            part = spec.part(0, spec.B, 0, spec.Hkv, r0, r1)
            call = record(part)  # probabilities ignore dropout: they are before it
            qr = q[:, :, r0:r1]
            if lse is None:
                _, lse_r = ext.forward(qr, k, k[..., :0], call, False, False)
                p = ext.probabilities(qr, k, lse_r, call)
                sink_p = None if part.sinks is None else sink_probability(part.sinks, lse_r)
                pieces.append(normalized(p, None if sink_p is None else sink_p[..., None]))
            else:
                pieces.append(ext.probabilities(qr, k, lse[:, :, r0:r1], call))
        if not pieces:  # no rows asked for
            return torch.zeros(spec.B, spec.Hq, 0, spec.Nk, dtype=torch.float32)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 2)

    stats_reads_quantized = True  # attention_stats hands its stats hook a QuantizedKV k as is

    def stats(self, spec, q, k, lse, heads, rows, *, col_sum, col_max, entropy, topk):
        """``attention_stats`` of the selected heads and rows from the statistics kernel
        (``csrc/stats.h``), one contiguous run of rows at a time as in ``weights`` (column
        statistics add up over the runs, row statistics follow the runs' order); the lse of a
        run is recomputed (lse-only forward) when not given. ``k`` may be a ``QuantizedKV``
        (``heads`` None): the kernels read its codes in place."""
        codes = k if isinstance(k, QuantizedKV) else None
        k = standin(k)  # (B, Hkv, Nk, D) of no memory for codes, else k itself
        if heads is not None:
            q = q.index_select(1, heads)
            k = k.index_select(1, heads // spec.group)  # one key head per selected query head
            lse = None if lse is None else lse.index_select(1, heads)
            spec = spec.select(heads, None)
        ext = build.load()
        runs = [(0, spec.Nq)] if rows is None else _runs(rows.tolist())
        want = (col_sum, col_max, entropy, topk)
        pieces = []
        for r0, r1 in runs:
            call = record(spec.part(0, spec.B, 0, spec.Hkv, r0, r1), None, codes)
            qr = q[:, :, r0:r1]
            if lse is None:
                _, lse_r = ext.forward(qr, k, k[..., :0], call, False, False)
            else:
                lse_r = lse[:, :, r0:r1]
            pieces.append(ext.stats(qr, k, lse_r, call, *want))
        if not pieces:  # no rows asked for: what an empty run gives
            pieces.append(
                ext.stats(
                    q[:, :, :0],
                    k,
                    q.new_zeros(spec.B, spec.Hq, 0),
                    record(spec.part(0, spec.B, 0, spec.Hkv, 0, 0), None, codes),
                    *want,
                )
            )
        return _gathered(pieces)

    def forward_stats(self, spec, q, k, v, *, col_sum, col_max, entropy, topk):
        """``(out, lse, stats)`` of a call without gradient or dropout in one C++ call: a decode
        step computes the statistics in its own pass (``csrc/decode.h``), any other call in a
        statistics pass after the forward. ``k`` / ``v`` may be ``QuantizedKV`` (the spec
        validated with stand-ins): their codes are read in place, as in ``run_quantized``."""
        call = record(spec, None, k, v)
        want = (col_sum, col_max, entropy, topk)
        got = build.load().forward_stats(q, standin(k), standin(v), call, *want)
        out, lse = got[0], got[1]
        return out, lse if lse.dtype == torch.float32 else lse.float(), _gathered([got[2:]])


_STATS_KEYS = ("col_sum", "col_max", "entropy", "topk_p", "topk_index")


def _gathered(pieces: list[tuple]) -> dict[str, torch.Tensor]:
    """The statistics dict of the runs' kernel results ``(col_sum, col_max, entropy, topk_p,
    topk_index)`` (None where not asked): columns summed / maxed over the runs, rows
    concatenated in the runs' order."""
    got = {}
    for i, key in enumerate(_STATS_KEYS):
        parts = [p[i] for p in pieces]
        if parts[0] is None:
            continue
        if key == "col_sum":
            got[key] = functools.reduce(torch.add, parts)
        elif key == "col_max":
            got[key] = functools.reduce(torch.maximum, parts)
        else:
            got[key] = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
    return got


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """``rows`` as runs ``[r0, r1)`` of consecutive indices, in their order."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return [(a, b) for a, b in runs]
