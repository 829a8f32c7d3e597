"""Autograd for the engine: the forward saves q, k, v, out and lse; backward recomputes P.

The node returns ``out`` and ``lse`` in the accumulation dtype (the caller casts them): with
float16/bfloat16 inputs the saved output is the float32 accumulator, not the rounded result
(``D_i = rowsum(dO * O)`` from a rounded O would cost the bias and ALiBi gradients about three
digits), and being the node's own outputs they carry its graph into a double backward.

Differentiable twice (``second_order.py``) and in forward mode: ``jvp`` is the tangent pass of
``tangent.py``; under ``torch.func.vmap`` the node runs once per vmapped slice.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..forward_mode import plain_operands
from ..sinks import sink_grad, sink_probability
from .backward import backward
from .forward import forward
from .problem import Problem, acc_dtype
from .second_order import differentiable_backward, tangents_out
from .tangent import jvp

__all__ = ["attention", "sink_tangent", "tangent_pass", "vmap_slices", "with_inputs"]


def with_inputs(
    prob: Problem,
    bias: torch.Tensor | None,
    alibi: torch.Tensor | None,
    sinks: torch.Tensor | None,
) -> Problem:
    """``prob`` reading the bias, slopes and sinks the node was given (under torch.func the spec
    holds the transform's wrapped tensors, the node's forward gets them unwrapped)."""
    spec = prob.spec
    if spec.bias is bias and spec.alibi_slopes is alibi and spec.sinks is sinks:
        return prob
    return replace(prob, spec=replace(spec, bias=bias, alibi_slopes=alibi, sinks=sinks))


class _EngineFunction(torch.autograd.Function):
    @staticmethod
    def forward(prob: Problem, q, k, v, bias, alibi, sinks):  # type: ignore[override]
        # under forward_ad the inputs may be duals, which the worker threads would see as such
        plain = plain_operands(q, k, v, bias, alibi, sinks)
        if plain is not None:
            q, k, v, bias, alibi, sinks = plain
        prob = with_inputs(prob, bias, alibi, sinks)
        b, h, m, _ = q.shape
        exact = torch.empty(b, h, m, v.shape[-1], dtype=acc_dtype(q.dtype), device=q.device)
        return forward(prob, q, k, v, out=exact)

    @staticmethod
    def setup_context(ctx, inputs, output):
        prob, q, k, v, bias, alibi, sinks = inputs
        exact, lse = output
        ctx.prob = with_inputs(prob, bias, alibi, sinks)
        ctx.save_for_backward(q, k, v, exact, lse, bias, alibi, sinks)
        ctx.save_for_forward(q, k, v, exact, lse, sinks)
        ctx.set_materialize_grads(False)  # an unused out or lse: None, no tensor of zeros
        ctx.need = (
            bias is not None and bias.requires_grad,
            alibi is not None and alibi.requires_grad,
            sinks is not None and sinks.requires_grad,
        )

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, exact, lse, bias, alibi, sinks = ctx.saved_tensors
        prob, need = ctx.prob, ctx.need
        if dout is None and dlse is None:  # e.g. a double backward folded this node's share
            return (None,) * 7

        def first(q, k, v, out, lse, dout, dlse):
            return backward(prob, q, k, v, out, lse, dout, dlse, need[0], need[1])

        if dout is None:
            dout = torch.zeros_like(exact)
        tensors = (q, k, v, exact, lse, dout, dlse, bias, alibi)
        dq, dk, dv, dbias, dalibi = differentiable_backward(first, "tiled", prob, need, tensors)
        if dbias is not None:
            dbias = dbias.to(bias.dtype)
        if dalibi is not None:
            dalibi = dalibi.to(alibi.dtype)
        dsinks = None
        if need[2]:  # from out and lse alone, in torch ops: autograd differentiates it again
            dsinks = sink_grad(sinks, exact, lse, dout, dlse)
        return None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, dalibi, dsinks

    @staticmethod
    def jvp(ctx, _prob, tq, tk, tv, tbias, talibi, tsinks):  # type: ignore[override]
        q, k, v, exact, lse, sinks = ctx.saved_tensors
        spec = ctx.prob.spec
        with torch.no_grad():
            tout, tlse = tangent_pass(ctx.prob, q, k, v, exact, lse, tq, tk, tv, tbias, talibi)
            tangents = sink_tangent(sinks, tsinks, exact, lse, tout, tlse)
        anchors = (q, k, v, spec.bias, spec.alibi_slopes, sinks, tq, tk, tv, tbias, talibi, tsinks)
        return tangents_out("tiled", anchors, tangents)

    @staticmethod
    def vmap(info, in_dims, prob, q, k, v, bias, alibi, sinks):  # type: ignore[override]
        tensors = (q, k, v, bias, alibi, sinks)
        outs = [
            _EngineFunction.apply(prob, *vmap_slices(tensors, in_dims[1:], i))
            for i in range(info.batch_size)
        ]
        return (torch.stack([o for o, _ in outs]), torch.stack([x for _, x in outs])), (0, 0)


def tangent_pass(prob: Problem, *tensors: torch.Tensor | None) -> tuple:
    """:func:`tangent.jvp` on ``(q, k, v, out, lse, tq, tk, tv, tbias, talibi)``: on the
    engine's worker threads when torch.func's wrappers can be taken off (plain
    ``torch.func.jvp``, ``forward_ad``), else as given in this thread (``jacfwd``)."""
    plain = plain_operands(*tensors)
    if plain is None:
        return jvp(prob, *tensors)
    spec = prob.spec
    bias, alibi, sinks = plain_operands(spec.bias, spec.alibi_slopes, spec.sinks)
    return jvp(with_inputs(prob, bias, alibi, sinks), *plain, threads=True)


def sink_tangent(
    sinks: torch.Tensor | None,
    tsinks: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    tout: torch.Tensor,
    tlse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add a sink's tangent to ``(tout, tlse)``: the sink is one more logit with probability
    ``p_sink`` and no value, so ``c`` gains ``p_sink * dsink`` (docs/derivatives.md)."""
    if sinks is None or tsinks is None:
        return tout, tlse
    c = sink_probability(sinks, lse.to(tlse.dtype)) * tsinks.to(tlse.dtype).reshape(1, -1, 1)
    return tout - out.to(tout.dtype) * c[..., None], tlse + c


def vmap_slices(tensors: tuple, dims: tuple, i: int) -> list:
    """Slice ``i`` of each vmapped input (a ``dim`` of None: not vmapped, passed as it is).

    A custom Function's vmap rule: torch.func hands the inputs unwrapped with their vmapped
    dims; the node then runs once per slice (``info.batch_size`` times) and the results stack.
    """
    return [t if t is None or d is None else t.select(d, i) for t, d in zip(tensors, dims)]


def attention(
    prob: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, requires_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the problem: out (B, Hq, Nq, Dv) in q's dtype, lse float32 (B, Hq, Nq);
    recorded for autograd (and forward mode, torch.func) when ``requires_grad``."""
    if requires_grad:
        spec = prob.spec
        exact, lse = _EngineFunction.apply(prob, q, k, v, spec.bias, spec.alibi_slopes, spec.sinks)
        return exact.to(q.dtype), lse.float()
    out, lse = forward(prob, q, k, v)
    return out, lse.float()
