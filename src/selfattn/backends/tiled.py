"""``tiled``: the torch-op engine (``selfattn.engine``, FlashAttention-2 in torch) as a backend.

Every rule, any device torch runs on (built for the CPU), O(N) memory, autograd by
recomputation, differentiable twice and in forward mode (``torch.func.jvp``, ``forward_ad``). It
offers every hook: ring blocks, the custom op's backward, exact weights and statistics.
"""

from __future__ import annotations

import torch

from .. import engine
from ..forward_mode import transformed
from ..rules import normalized
from ..sinks import sink_probability
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
        record = spec.requires_grad or spec.tangents or transformed()
        return engine.attention(engine.Problem.of(spec, seed), q, k, v, record)

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
        prob, q, k, lse = _selected(spec, q, k, lse, heads, rows)
        if lse is None:
            _, lse = engine.forward(prob, q, k, None)
            sinks = prob.spec.sinks
            sink_p = None if sinks is None else sink_probability(sinks, lse)[..., None]
            return normalized(engine.probabilities(prob, q, k, lse), sink_p)
        return engine.probabilities(prob, q, k, lse)

    def stats(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        lse: torch.Tensor | None,
        heads: torch.Tensor | None,
        rows: torch.Tensor | None,
        *,
        col_sum: bool,
        col_max: bool,
        entropy: bool,
        topk: int,
    ) -> dict[str, torch.Tensor]:
        """``attention_stats`` of the selected heads and rows, tile by tile from the lse (one
        lse-only forward over those rows first when ``lse`` is None)."""
        prob, q, k, lse = _selected(spec, q, k, lse, heads, rows)
        if lse is None:
            _, lse = engine.forward(prob, q, k, None)
        want = {"col_sum": col_sum, "col_max": col_max, "entropy": entropy, "topk": topk}
        return engine.statistics(prob, q, k, lse, **want)


def _selected(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None,
    heads: torch.Tensor | None,
    rows: torch.Tensor | None,
) -> tuple[engine.Problem, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The problem of the selected heads and rows, with q (B, H', Nq', D), k (B, H', Nk, D)
    (one key head per selected query head) and lse (B, H', Nq') cut to match."""
    if heads is not None:
        q = q.index_select(1, heads)
        k = k.index_select(1, heads // spec.group)  # one key head per selected query head
        lse = None if lse is None else lse.index_select(1, heads)
    if rows is not None:
        q = q.index_select(2, rows)
        lse = None if lse is None else lse.index_select(2, rows)
    return engine.Problem.of(spec.select(heads, rows), None), q, k, lse
