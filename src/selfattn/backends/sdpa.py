"""``sdpa``: torch's own fused ``scaled_dot_product_attention``, for the plain calls it covers.

Added so that ``auto`` never runs slower than torch on a call torch handles. It takes only calls
whose meaning is the same in both libraries: no mask, bias, ALiBi, softcap, segments or dropout
(our dropout mask is shared by every backend), no lse, and causal/window rules only where torch
means the same: a square causal call (torch aligns causal masks top-left, we align them
bottom-right; they agree when Nq == Nk), or rules that hide nothing from these rows (a decode
step, Nq = 1 at the end of the cache, sees every key under ``causal``), run as plain calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from .. import engine
from ..rules import bounds
from ..spec import AttentionSpec

__all__ = ["SdpaBackend"]

# enable_gqa arrived in torch 2.5; the builtin has no inspectable signature, its docstring says.
_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class SdpaBackend:
    """torch.nn.functional.scaled_dot_product_attention for plain calls."""

    name = "sdpa"

    def unavailable(self) -> str | None:
        return None

    def check(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        others = [r for r in spec.rule_names if r not in ("causal", "window")]
        if others:
            reasons.append(f"takes plain calls only, this one uses {', '.join(others)}")
        if _is_causal(spec) is None:
            if spec.window is not None:
                reasons.append(f"has no window (this one hides keys: window={spec.window})")
            else:
                reasons.append(
                    f"torch aligns causal top-left; Nq={spec.Nq} != Nk={spec.Nk} "
                    "(or the rows start elsewhere)"
                )
        if spec.return_lse:
            reasons.append("does not return the lse")
        if spec.Hq != spec.Hkv and not _HAS_GQA:
            reasons.append("this torch has no enable_gqa for GQA")
        if min(spec.Nq, spec.Nk, spec.B, spec.Hq) == 0:
            reasons.append("empty inputs")
        if spec.tangents:
            reasons.append("has no forward-mode (JVP) rule, and the inputs carry tangents")
        return reasons

    def run(self, spec, q, k, v, seed):
        causal = _is_causal(spec)
        if causal and not engine.all_finite(k, v):
            # torch multiplies a value row hidden by the causal mask with a zero probability,
            # and 0 * NaN = NaN: padding garbage would reach rows that cannot see it. Our engine
            # keeps such rows clean (docs/api.md), at the cost of one pass over k and v.
            return engine.attention(engine.Problem.of(spec, seed), q, k, v, spec.requires_grad)
        kwargs = {"enable_gqa": True} if spec.Hq != spec.Hkv else {}
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=spec.scale, **kwargs)
        return out, None

    def plain(self, spec: AttentionSpec) -> Callable:
        """``run(q, k, v)`` for the front door's fast path: torch's call with its arguments
        decided once (a causal one still checks k and v for NaN/inf each time, as ``run``)."""
        sdpa, scale = F.scaled_dot_product_attention, spec.scale
        kwargs = {"enable_gqa": True} if spec.Hq != spec.Hkv else {}
        if _is_causal(spec):

            def run_causal(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, None]:
                if not engine.all_finite(k, v):
                    return self.run(spec, q, k, v, None)  # the engine keeps hidden NaN away
                return sdpa(q, k, v, is_causal=True, scale=scale, **kwargs), None

            return run_causal
        if kwargs:
            return lambda q, k, v: (sdpa(q, k, v, scale=scale, enable_gqa=True), None)
        return lambda q, k, v: (sdpa(q, k, v, scale=scale), None)


def _is_causal(spec: AttentionSpec) -> bool | None:
    """torch's ``is_causal`` that means what the causal/window rules mean here, or None."""
    if not spec.causal and spec.window is None:
        return False
    if spec.Nq == 0 or spec.Nk == 0:
        return False
    if spec.window is None and spec.qpos is None:
        # causal alone, rows at start .. start + Nq - 1 (every small call through auto: no
        # bounds needed): nothing is hidden when row 0 sees the last key
        if spec.start >= spec.Nk - 1:
            return False
        return True if spec.Nq == spec.Nk and spec.start == 0 else None
    _, _, full_lo, full_hi = bounds(spec, 0, spec.Nq)
    if full_lo == 0 and full_hi == spec.Nk:
        return False  # nothing hidden from these rows (e.g. one query at the end of the cache)
    square = spec.Nq == spec.Nk and spec.start == 0 and spec.qpos is None
    if spec.causal and spec.window is None and square:
        return True
    return None
