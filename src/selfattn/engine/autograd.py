"""Autograd for the engine: the forward saves q, k, v, out and lse; backward recomputes P.

With float16/bfloat16 inputs the saved output is the float32 accumulator, not the rounded
result: ``D_i = rowsum(dO * O)`` from a rounded O would cost the bias and ALiBi gradients about
three digits (a per-query bias, whose true gradient is 0, came back up to 4e-3).
"""

from __future__ import annotations

import torch

from ..first_order import first_order
from ..sinks import sink_grad
from .backward import backward
from .forward import forward
from .problem import Problem, acc_dtype

__all__ = ["attention"]


class _EngineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob: Problem, q, k, v, bias, alibi, sinks):  # type: ignore[override]
        acc_t = acc_dtype(q.dtype)
        b, h, m, _ = q.shape
        exact = torch.empty(b, h, m, v.shape[-1], dtype=acc_t, device=q.device)
        exact, lse = forward(prob, q, k, v, out=exact)
        ctx.prob = prob
        ctx.save_for_backward(q, k, v, exact, lse)
        ctx.need = (
            bias is not None and bias.requires_grad,
            alibi is not None and alibi.requires_grad,
            sinks is not None and sinks.requires_grad,
        )
        ctx.dtypes = (None if bias is None else bias.dtype, None if alibi is None else alibi.dtype)
        return exact.to(q.dtype), lse.float()

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, exact, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(exact)
        with torch.no_grad():  # create_graph=True: first-order gradients, refused below
            dq, dk, dv, dbias, dalibi = backward(
                ctx.prob,
                q,
                k,
                v,
                exact,
                lse,
                dout,
                dlse,
                need_dbias=ctx.need[0],
                need_dalibi=ctx.need[1],
            )
        if dbias is not None:
            dbias = dbias.to(ctx.dtypes[0])
        if dalibi is not None:
            dalibi = dalibi.to(ctx.dtypes[1])
        spec = ctx.prob.spec
        dsinks = None
        if ctx.need[2]:  # from out and lse alone (selfattn.sinks)
            dsinks = sink_grad(spec.sinks, exact, lse, dout, dlse)
        grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, dalibi, dsinks)
        anchors = (q, k, v, spec.bias, spec.alibi_slopes, spec.sinks)
        return (None, *first_order("tiled", anchors, grads))


def attention(
    prob: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, requires_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the problem: out (B, Hq, Nq, Dv) in q's dtype, lse float32 (B, Hq, Nq);
    recorded for autograd when ``requires_grad``."""
    if requires_grad:
        spec = prob.spec
        return _EngineFunction.apply(prob, q, k, v, spec.bias, spec.alibi_slopes, spec.sinks)
    out, lse = forward(prob, q, k, v)
    return out, lse.float()
