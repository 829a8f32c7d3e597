"""``reference``: the numpy float64 specification behind the backend interface.

Converts to numpy, runs :func:`selfattn.reference.attention`, converts back. No autograd.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import reference as spec_np
from ..spec import AttentionSpec

__all__ = ["ReferenceBackend"]


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
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
        if spec.requires_grad:
            reasons.append("has no autograd (inputs require grad)")
        return reasons

    def run(self, spec, q, k, v, seed):
        seg = None
        if spec.q_ids is not None:
            seg = (_np(spec.q_ids), _np(spec.kv_ids))
        out, lse = spec_np.attention(
            _np(q), _np(k), _np(v),
            causal=spec.causal, window=spec.window,
            mask=_np(spec.mask),
            bias=_np(spec.bias),
            alibi_slopes=_np(spec.alibi),  # (B|1, Hq)
            softcap=spec.softcap, segment_ids=seg, scale=spec.scale,
            dropout_p=spec.dropout_p, dropout_seed=seed, return_lse=True,
        )  # fmt: skip
        out_t = torch.from_numpy(np.ascontiguousarray(out)).to(q.dtype)
        lse_t = torch.from_numpy(np.ascontiguousarray(lse)).float()
        return out_t, lse_t
