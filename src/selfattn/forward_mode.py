"""Whether a call carries forward-mode tangents or runs under a torch.func transform.

``torch.autograd.forward_ad`` and ``torch.func.jvp`` both attach tangents at a forward-AD dual
level; a backend without a forward-mode rule must decline such a call (docs/api.md) instead of
returning an output whose tangent silently lacks its attention term. The checks cost one
attribute read when no dual level is open, so the front door's hot path pays nothing.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

__all__ = ["has_tangents", "plain_operands", "transformed"]


def has_tangents(*tensors: torch.Tensor | None) -> bool:
    """True when some tensor carries a forward-mode tangent (``forward_ad`` or ``torch.func.jvp``)."""
    if getattr(forward_ad, "_current_level", -1) < 0:
        return False  # no dual level open: no tensor can carry a tangent
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def transformed() -> bool:
    """True inside a ``torch.func`` transform (vmap, jvp, grad, ...): the engines then run
    through their ``autograd.Function``, whose vmap and jvp rules torch.func uses."""
    return torch._C._functorch.maybe_current_level() is not None


def plain_operands(*tensors: torch.Tensor | None) -> list[torch.Tensor | None] | None:
    """The tensors a node's jvp rule got, without torch.func.jvp's wrappers, or None.

    Under plain ``torch.func.jvp`` (every active transform a jvp) the rule's tensors are
    wrappers whose values are ordinary tensors, under ``forward_ad`` they may be duals:
    unwrapped (primals), the tangent pass can run on the engine's worker threads (the
    transforms' state is per thread) with ``out=`` ops. Under vmap or grad
    transforms (``jacfwd``, a grad of a jvp) None: the rule keeps the wrapped tensors.
    """
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() or []
    if any(i.key() != functorch.TransformType.Jvp for i in stack):
        return None
    plain = []
    dual = getattr(forward_ad, "_current_level", -1) >= 0
    for t in tensors:
        while t is not None and functorch.is_functorch_wrapped_tensor(t):
            t = functorch.get_unwrapped(t)
        if t is not None and dual:  # forward_ad: the primal alone (a view, no copy)
            t = forward_ad.unpack_dual(t).primal
        plain.append(t)
    return plain
