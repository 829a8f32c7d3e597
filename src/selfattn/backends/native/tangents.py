"""``native``'s forward mode in one fused C++ pass (``csrc/jvp.h``).

Under ``torch.func.jvp`` or ``torch.autograd.forward_ad`` a custom Function runs its forward,
then its ``jvp`` rule from the saved ``out`` and ``lse``: two passes over the keys. The C++ pass
computes ``out``, ``lse`` and both tangents in one online-softmax pass instead, so the backend
reads the tangents before the node runs (:func:`fused_pass`) and hands the node the results
(:class:`FusedJvp`): its forward returns ``out`` and ``lse``, its ``jvp`` the tangents.

The fused pass takes the call only where the tangents can be read as plain tensors here: plain
``forward_ad`` or a single ``torch.func.jvp`` (no vmap, grad or nested jvp around it). It
declines (None) otherwise, and when a row of k, v or their tangents is not finite; the node then
runs the forward and the torch-op tangent pass (``engine.tangent``) as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.autograd import forward_ad

from ...spec import AttentionSpec
from . import build
from .call import record

__all__ = ["FusedJvp", "at_current_level", "fused_pass", "split_dual"]

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class FusedJvp:
    """One call's results of the fused pass: out (B, Hq, Nq, Dv) and lse (B, Hq, Nq) as the
    forward kernel gives them, and their tangents ``tout``, ``tlse`` in the accumulation dtype
    (without the sinks' own tangent, which the node adds from out and lse)."""

    out: torch.Tensor
    lse: torch.Tensor
    tout: torch.Tensor
    tlse: torch.Tensor


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    functorch = torch._C._functorch
    while t is not None and functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    if t is not None and t._is_zerotensor():
        return None  # forward AD's symbolic zero: no tangent
    return t


def split_dual(x: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(primal, tangent)`` of an operand as plain tensors (tangent None: zero), under
    ``forward_ad`` or one ``torch.func.jvp``."""
    if x is None:
        return None, None
    primal, tangent = forward_ad.unpack_dual(x)
    return _plain(primal), _plain(tangent)


def at_current_level(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a plain tensor) as a tensor of the active torch.func transform's level, without a
    copy; as it is without one. The node's ``jvp`` returns the fused pass's tangents through
    ``engine.tangents_out``, which may update them in place, and torch.func refuses in-place
    updates of tensors from outside the transform."""
    functorch = torch._C._functorch
    level = functorch.maybe_current_level()
    return t if level is None else functorch._wrap_for_grad(t, level)


def _one_jvp_level() -> bool:
    """True under plain forward_ad or exactly one torch.func.jvp and nothing else."""
    if getattr(forward_ad, "_current_level", -1) != 0:
        return False  # no dual level, or nested ones
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() or []
    return len(stack) == 0 or (len(stack) == 1 and stack[0].key() == functorch.TransformType.Jvp)


def fused_pass(
    spec: AttentionSpec,
    seed: tuple[int, int] | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> FusedJvp | None:
    """The call's out, lse and tangents from the fused kernel, or None where it declines.

    Args:
        spec: the validated call; its bias, slopes and sinks may carry tangents.
        seed: dropout's seed words (None: no dropout).
        q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): the operands as the call got
            them (dual tensors or torch.func.jvp's wrappers).
    """
    if not _one_jvp_level():
        return None
    (pq, tq), (pk, tk), (pv, tv) = split_dual(q), split_dual(k), split_dual(v)
    pbias, tbias = split_dual(spec.bias)
    palibi, talibi = split_dual(spec.alibi_slopes)
    psinks, _ = split_dual(spec.sinks)
    plain = replace(spec, bias=pbias, alibi_slopes=palibi, sinks=psinks)
    # 16-bit inputs whose bias, slopes or sinks need a gradient: out in float32, as the node's
    # own forward keeps it (backend._NativeFunction)
    need = any(
        t is not None and t.requires_grad for t in (spec.bias, spec.alibi_slopes, spec.sinks)
    )
    out_acc = pq.dtype in _HALF and need
    # functorch's layer off: the extension's own allocations (at::empty) would otherwise be
    # made at the jvp transform's level, as wrappers without storage
    with torch.no_grad(), torch._C._DisableFuncTorch():
        got = build.load().jvp(pq, pk, pv, tq, tk, tv, tbias, talibi, record(plain, seed), out_acc)
    return None if got is None else FusedJvp(*got)
