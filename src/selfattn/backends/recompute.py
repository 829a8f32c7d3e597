"""A backward hook for backends whose gradients come from torch's autograd (``math``, ``sdpa``):
run the forward again with autograd recording and differentiate it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..spec import AttentionSpec

__all__ = ["backward_by_recompute"]


def backward_by_recompute(
    run: Callable,
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    seed: tuple[int, int] | None,
    need_dbias: bool,
    need_dalibi: bool,
) -> tuple:
    """``(dq, dk, dv, dbias, dalibi)`` through ``run(spec, q, k, v, seed)``'s own autograd.

    dbias is shaped like ``spec.bias`` and dalibi like ``spec.alibi_slopes``; None where not
    asked for. The same ``seed`` draws the same dropout mask as the forward did.
    """
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        bias = None if spec.bias is None else spec.bias.detach().requires_grad_(need_dbias)
        slopes = spec.alibi_slopes
        if slopes is not None:
            slopes = slopes.detach().requires_grad_(need_dalibi)
        leaf_spec = replace(
            spec, bias=bias, alibi_slopes=slopes, requires_grad=True, return_lse=dlse is not None
        )
        out, lse = run(leaf_spec, *leaves, seed)
        inputs = leaves + [t for t, need in ((bias, need_dbias), (slopes, need_dalibi)) if need]
        outs, grads = [out], [dout]
        if dlse is not None:
            outs.append(lse)
            grads.append(dlse.to(lse.dtype))
        got = list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))
    dq, dk, dv = (torch.zeros_like(t) if g is None else g for t, g in zip(leaves, got[:3]))
    rest = got[3:]
    dbias = rest.pop(0) if need_dbias else None
    dalibi = rest.pop(0) if need_dalibi else None
    return dq, dk, dv, dbias, dalibi
