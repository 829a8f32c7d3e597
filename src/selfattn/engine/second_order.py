"""A first-order backward that autograd can differentiate again (double backward).

``tiled`` and ``native`` keep their own first-order kernels: under ``create_graph=True`` their
autograd backward runs them through :class:`BackwardFunction`, whose own backward is the
engine's tile-by-tile VJP (``hessian.double_backward``), or a backend's own fused pass
(``second``: native's ``csrc/hessian.h``) where it takes the call. Its inputs include the forward's
``out`` and ``lse`` as saved by the forward's node, so autograd adds their dependence on q, k,
v (a second first-order backward) by itself. Dropout declines: its second derivative is not
written out, and a gradient silently lacking a term is never returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..first_order import first_order
from ..forward_mode import plain_operands
from . import hessian
from .hessian import HessianGrads, double_backward
from .problem import Problem

__all__ = ["DROPOUT_ADVICE", "HIGHER_ADVICE", "differentiable_backward", "tangents_out"]

HIGHER_ADVICE = "use backend='math' for third and higher derivatives"

DROPOUT_ADVICE = (
    "second derivatives under dropout are not written out; use dropout_p=0 or backend='math'"
)

# first(q, k, v, out, lse, dout, dlse) -> (dq, dk, dv, dbias, dalibi), no autograd
FirstOrder = Callable[..., Sequence[torch.Tensor | None]]
# second(q, k, v, out, lse, dout, dlse, gq, gk, gv, need_dout): a backend's fused double
# backward with the forward's own backward folded in (hessian.double_backward's results with
# fold), plain tensors, no bias / slope gradients; None where it declines the call
SecondOrder = Callable[..., HessianGrads | None]


class BackwardFunction(torch.autograd.Function):
    """Forward: the first-order gradients ``first(...)``; backward: their VJP, tile by tile."""

    @staticmethod
    def forward(ctx, first, second, name, prob, need, q, k, v, out, lse, dout, dlse, bias, alibi):  # type: ignore[override]
        with torch.no_grad():
            grads = tuple(first(q, k, v, out, lse, dout, dlse))
        ctx.prob, ctx.need, ctx.name, ctx.second = prob, need, name, second
        ctx.has_dlse = dlse is not None
        ctx.save_for_backward(q, k, v, out, lse, dout, dlse, bias, alibi)
        ctx.set_materialize_grads(False)
        return grads

    @staticmethod
    def backward(ctx, gq, gk, gv, gbias, galibi):  # type: ignore[override]
        q, k, v, out, lse, dout, dlse, bias, alibi = ctx.saved_tensors
        tensors = (q, k, v, out, lse, dout, dlse, gq, gk, gv, gbias, galibi)
        plain = plain_operands(*tensors)  # None under a torch.func transform: this thread
        # (first, second, name, prob, need, q, k, v, out, lse, dout, ...)
        wants = ctx.needs_input_grad[1:]
        # The forward's node would turn the out and lse gradients into a first-order backward
        # of its own (a whole second pass over the tiles): fold it into this one instead when
        # that backward is all the node does with them (no sink gradient), off torch.func.
        sink_grad = len(ctx.need) > 2 and ctx.need[2]
        fold = (wants[7] or wants[8]) and not sink_grad and plain is not None
        bars = None
        # the backend's fused pass: no bias / slope cotangent or gradient (the engine's)
        fused = fold and ctx.second is not None and k.shape[2] <= hessian.FOLD_MAX_KEYS
        if fused and gbias is None and galibi is None and not any(ctx.need[:2]):
            with torch.no_grad():
                bars = ctx.second(*plain[:10], need_dout=wants[9])
        if bars is None:
            with torch.no_grad():  # create_graph=True here: a third derivative, refused below
                bars = double_backward(
                    ctx.prob,
                    *(tensors if plain is None else plain),
                    need_bias=ctx.need[0],
                    need_alibi=ctx.need[1],
                    threads=plain is not None,
                    need_dout=wants[9],
                    fold=fold,
                )
        qb, kb, vb, dob, dlseb, ob, lseb, bb, ab = bars

        def typed(bar: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
            return None if bar is None or like is None else bar.to(like.dtype)

        grads = (
            typed(qb, q),
            typed(kb, k),
            typed(vb, v),
            typed(ob, out),
            typed(lseb, lse),
            typed(dob, dout),
            typed(dlseb, dlse),
            typed(bb, bias),
            typed(ab, alibi),
        )
        anchors = (q, k, v, out, lse, dout, dlse, bias, alibi)
        return (
            None,
            None,
            None,
            None,
            None,
            *first_order(ctx.name, anchors, grads, HIGHER_ADVICE, order=3),
        )


def differentiable_backward(
    first: FirstOrder,
    name: str,
    prob: Problem,
    need: tuple[bool, ...],
    tensors: tuple[Any, ...],
    second: SecondOrder | None = None,
) -> tuple:
    """The first-order gradients ``(dq, dk, dv, dbias, dalibi)``, differentiable again when
    autograd records (``create_graph=True``).

    ``tensors`` = ``(q, k, v, out, lse, dout, dlse, bias, alibi)``: ``out`` and ``lse`` as the
    forward's node saved them (so they carry its graph), dlse and bias/alibi possibly None.
    ``second``: the backend's fused double backward (:data:`SecondOrder`), tried before the
    engine's tile-by-tile VJP where the folded pass applies.
    """
    q, k, v, out, lse, dout, dlse, bias, alibi = tensors
    if not torch.is_grad_enabled():
        return tuple(first(q, k, v, out, lse, dout, dlse))
    if prob.dropout is not None:
        with torch.no_grad():
            grads = tuple(first(q, k, v, out, lse, dout, dlse))
        return first_order(name, (q, k, v, bias, alibi), grads, DROPOUT_ADVICE)
    return BackwardFunction.apply(first, second, name, prob, need, *tensors)


class _RefuseReverse(torch.autograd.Function):
    """A zero scalar hanging from the anchors, whose backward raises ``text``.

    Added to the tangents a node's ``jvp`` returns: under ``torch.func.jvp`` the jvp rule's
    tensors are the transform's wrappers (they do not show ``requires_grad``), yet ops on them
    are recorded for the reverse mode outside; this node is recorded the same way.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(text: str, *anchors: torch.Tensor):  # type: ignore[override]
        return anchors[0].new_zeros(())

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.text = inputs[0]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise NotImplementedError(ctx.text)

    @staticmethod
    def jvp(ctx, *tangents):  # type: ignore[override]
        return torch.zeros(())


def _may_record(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether reverse mode may record through ops on ``tensors``: under a ``torch.func``
    transform other than jvp, always (its wrappers track gradients themselves); else when one of
    them, without torch.func.jvp's wrappers (which never show ``requires_grad``), requires grad."""
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() or []
    if any(i.key() != functorch.TransformType.Jvp for i in stack):
        return True
    for t in tensors:
        while functorch.is_functorch_wrapped_tensor(t):
            t = functorch.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def tangents_out(name: str, anchors: Sequence[Any], tangents: tuple) -> tuple:
    """The forward-mode tangents a node's ``jvp`` returns, refusing reverse mode through them.

    The tangent pass is computed under no_grad; when reverse mode is recording, a gradient
    through the tangent would silently lack every term, so the tangents then carry a node whose
    backward raises. Where it cannot record (no ``torch.func`` grad transform, and no operand
    or tangent requires grad) they are returned as they are. Consistency-model targets take
    the JVP's tangent under a stop-gradient and never reach it; the primal output stays
    differentiable.
    """
    live = [a for a in anchors if isinstance(a, torch.Tensor)]
    if not torch.is_grad_enabled() or not live:
        return tangents
    if not _may_record(live):  # nothing to refuse, and no add over the whole tangent to pay
        return tangents
    text = (
        f"selfattn: backend {name!r} gives forward-mode tangents that are not differentiable "
        "again (reverse mode over forward mode); detach them (a stop-gradient target) or use "
        "backend='math'"
    )
    zero = _RefuseReverse.apply(text, *live)
    # in place: the tangents are this pass's own tensors, and a copy would cost one output
    return tuple(t.add_(zero.to(t.dtype)) for t in tangents)
