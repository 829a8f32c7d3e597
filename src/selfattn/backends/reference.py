"""``reference``: the numpy float64 specification behind the backend interface.

Converts to numpy, runs :func:`selfattn.reference.attention`, converts back. No autograd.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import reference as spec_np
from ..spec import AttentionSpec

__all__ = ["ReferenceBackend"]


def _np(t):
    """A tensor as a numpy array (floats in float64); anything else unchanged."""
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach().cpu()
    return (t.double() if t.is_floating_point() else t).numpy()


class ReferenceBackend:
    """The numpy float64 specification (CPU, no autograd)."""

    name = "reference"

    def unavailable(self) -> str | None:
        return None

    def check(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.device.type != "cpu":
            reasons.append(f"numpy runs on the CPU, inputs are on {spec.device}")
        if spec.qpos is not None or spec.start != spec.Nk - spec.Nq:
            reasons.append("aligns query rows bottom-right only (this part starts elsewhere)")
        if spec.requires_grad:
            reasons.append("has no autograd (inputs require grad)")
        if spec.tangents:
            reasons.append("has no forward-mode (JVP) rule, and the inputs carry tangents")
        return reasons

    def run(self, spec, q, k, v, seed):
        rules = {
            name: tuple(map(_np, x)) if isinstance(x, tuple) else _np(x)
            for name, x in spec.keywords().items()
        }
        out, lse = spec_np.attention(
            _np(q), _np(k), _np(v), **rules, dropout_seed=seed, return_lse=True
        )
        out_t = torch.from_numpy(np.ascontiguousarray(out)).to(q.dtype)
        lse_t = torch.from_numpy(np.ascontiguousarray(lse)).float()
        return out_t, lse_t
