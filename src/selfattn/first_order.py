"""Fused backward kernels give first-order gradients only: refuse a second derivative loudly.

docs/api.md: a backend that cannot differentiate twice raises a clear error when a second
derivative is asked of it, and never returns a gradient that silently lacks a term. Inside a
custom ``torch.autograd.Function``'s backward, grad mode is on exactly when the caller passed
``create_graph=True``. Then :func:`first_order` computes nothing new: it attaches the
first-order gradients to a node whose own backward raises, anchored on the inputs that require
grad, so taking the gradients works but differentiating them again (a gradient penalty) fails
with a message naming the backend, instead of silently adding nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["ADVICE", "first_order", "message"]


ADVICE = "use backend='math' for second derivatives"


def message(backend: str, advice: str = ADVICE, order: int = 2) -> str:
    """The error for a derivative of ``order`` (2: double backward) asked of ``backend``."""
    if order > 2:
        return (
            f"selfattn: backend {backend!r} differentiates attention twice, not {order} times "
            f"(create_graph=True on its double backward); {advice}"
        )
    return (
        f"selfattn: backend {backend!r} does not support double backward (create_graph=True "
        f"followed by a second derivative) yet; {advice}"
    )


class _Refuse(torch.autograd.Function):
    """Identity on the gradients, anchored on the inputs; its backward raises."""

    @staticmethod
    def forward(ctx, text: str, n_anchors: int, *tensors: torch.Tensor):  # type: ignore[override]
        ctx.text = text
        return tuple(t.clone() for t in tensors[n_anchors:])

    @staticmethod
    def backward(ctx, *grads: Any):  # type: ignore[override]
        raise NotImplementedError(ctx.text)


def first_order(
    backend: str,
    anchors: Sequence[torch.Tensor | None],
    grads: Sequence[Any],
    advice: str = ADVICE,
    order: int = 2,
    text: str | None = None,
) -> tuple:
    """``grads`` as they are, or (under ``create_graph=True``) attached to a refusing node.

    Args:
        backend: the backend's name, for the message.
        anchors: the Function's tensor inputs (q, k, v, bias, ...); those requiring grad carry
            the refusing node into the graph.
        grads: what the Function's backward returns (tensors or None), computed without grad.
        advice: what the message suggests instead.
        order: the derivative refused (2: double backward; 3 for a backend that differentiates
            twice).
        text: the whole message instead (another derivative than a higher order).
    """
    if not torch.is_grad_enabled():
        return tuple(grads)
    live = [a for a in anchors if isinstance(a, torch.Tensor) and a.requires_grad]
    slots = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not live or not slots:
        return tuple(grads)
    wrapped = _Refuse.apply(
        text or message(backend, advice, order), len(live), *live, *(grads[i] for i in slots)
    )
    out = list(grads)
    for i, g in zip(slots, wrapped):
        out[i] = g
    return tuple(out)
