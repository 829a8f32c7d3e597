"""``native``'s double backward in one fused C++ pass (``csrc/hessian.h``).

A gradient penalty (``grad(..., create_graph=True)`` then a gradient of the gradients) runs the
first-order backward's own backward: ``engine.second_order`` tries the backend's fused pass
first, where the folded structure applies (the forward's backward of the out and lse gradients
done in the same pass), and the engine's tile-by-tile torch-op VJP (``engine.hessian``) where
this declines (None): a softcap, dropout (declined upstream anyway), or a non-finite row of k,
v or their cotangents. Bias and slope gradients never reach it (``engine.second_order`` keeps
those calls on the engine's pass); a constant bias, slopes, masks, segment ids and sinks do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...engine import HessianGrads
from ...spec import AttentionSpec
from . import build

__all__ = ["fused_second"]


def fused_second(spec: AttentionSpec, call: tuple) -> Callable[..., HessianGrads | None] | None:
    """The :data:`engine.second_order.SecondOrder` hook of one call, or None where the fused
    kernel never applies (a softcap or dropout).

    Args:
        spec: the validated call.
        call: its native call record (``call.record``).
    """
    if spec.softcap is not None or spec.dropout_p > 0:
        return None

    def second(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        dlse: torch.Tensor | None,
        gq: torch.Tensor | None,
        gk: torch.Tensor | None,
        gv: torch.Tensor | None,
        need_dout: bool = True,
    ) -> HessianGrads | None:
        """Gradients ``(q, k, v, dout, dlse, out, lse, bias, alibi)`` of the first-order
        backward's outputs against cotangents gq, gk, gv (B, Hq, Nq, D) / (B, Hkv, Nk, D) /
        (B, Hkv, Nk, Dv) (None: zero), out's and lse's folded in (None), or None if declined."""
        empty = torch.empty(0, dtype=lse.dtype)
        with torch._C._DisableFuncTorch():  # the extension allocates plain tensors
            got = build.load().hessian(
                dout,
                q,
                k,
                v,
                out,
                lse,
                empty if dlse is None else dlse,
                gq,
                gk,
                gv,
                call,
                need_dout,
            )
        if got is None:
            return None
        qb, kb, vb, dob, dlseb = got
        return (qb, kb, vb, dob, dlseb, None, None, None, None)

    return second
