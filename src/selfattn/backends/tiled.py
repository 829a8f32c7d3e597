"""``tiled``: the torch-op engine (``selfattn.engine``, FlashAttention-2 in torch) as a backend.

Every rule, any device torch runs on (built for the CPU), O(N) memory, autograd by
recomputation. It offers every hook: ring blocks, the custom op's backward and exact weights.
"""

from __future__ import annotations

import torch

from .. import engine
from ..rules import normalized
from ..spec import AttentionSpec

__all__ = ["TiledBackend"]


class TiledBackend:
    """O(N)-memory online softmax in torch; every rule; autograd by recomputation."""

    name = "tiled"

    def unavailable(self) -> str | None:
        return None

    def check(self, spec: AttentionSpec) -> list[str]:
        return []

    def run(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seed: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return engine.attention(engine.Problem.of(spec, seed), q, k, v, spec.requires_grad)

    def forward(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seed: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Out in the accumulation dtype (ring attention merges blocks in it), lse likewise."""
        acc = engine.acc_dtype(q.dtype)
        out = torch.empty(spec.B, spec.Hq, spec.Nq, spec.Dv, dtype=acc, device=q.device)
        return engine.forward(engine.Problem.of(spec, seed), q, k, v, out=out)

    def backward(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        dlse: torch.Tensor | None,
        seed: tuple[int, int] | None,
        need_dbias: bool,
        need_dalibi: bool,
    ) -> engine.Grads:
        prob = engine.Problem.of(spec, seed)
        return engine.backward(prob, q, k, v, out, lse, dout, dlse, need_dbias, need_dalibi)

    def weights(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        lse: torch.Tensor | None,
        heads: torch.Tensor | None,
        rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """Probabilities (B, len(heads), len(rows), Nk) float32 of the selected heads and rows."""
        if heads is not None:
            q = q.index_select(1, heads)
            k = k.index_select(1, heads // spec.group)  # one key head per selected query head
            lse = None if lse is None else lse.index_select(1, heads)
        if rows is not None:
            q = q.index_select(2, rows)
            lse = None if lse is None else lse.index_select(2, rows)
        prob = engine.Problem.of(spec.select(heads, rows), None)
        if lse is None:
            _, lse = engine.forward(prob, q, k, None)
            return normalized(engine.probabilities(prob, q, k, lse))
        return engine.probabilities(prob, q, k, lse)
