"""``triton``: fused Triton kernels for every rule of the contract (forward, backward, decode).

This package imports neither triton nor CUDA at import time, so ``selfattn`` loads on any
machine: :meth:`TritonBackend.unavailable` says why the backend cannot run here (triton
missing, no CUDA GPU). With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through
Triton's interpreter, for testing; the environment variable is read at call time.
"""

from __future__ import annotations

import os

import torch

from ...quant import QuantizedKV
from ...spec import AttentionSpec

__all__ = ["MAX_HEAD_DIM", "TritonBackend", "interpreting"]

MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({exc}); pip install selfattn[triton]"
    return None


class TritonBackend:
    """Fused FlashAttention-2 kernels in Triton; every rule; autograd; split-K decode."""

    name = "triton"

    def unavailable(self) -> str | None:
        why = _triton_missing()
        if why:
            return why
        if interpreting():
            return None
        if not torch.cuda.is_available():
            return "needs a CUDA GPU (none here); TRITON_INTERPRET=1 runs it on the CPU for testing"
        return None

    def check(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.dtype == torch.float64:
            reasons.append("float64 is for CPU backends (the kernels accumulate in float32)")
        if spec.D > MAX_HEAD_DIM or spec.Dv > MAX_HEAD_DIM:
            reasons.append(f"head dims up to {MAX_HEAD_DIM}, got D={spec.D}, Dv={spec.Dv}")
        if spec.qpos is not None:
            reasons.append("selects rows inside the probabilities kernel, not as a part")
        if spec.device.type != "cuda" and not interpreting():
            reasons.append(
                f"runs on CUDA tensors, got {spec.device} (TRITON_INTERPRET=1 runs CPU tensors)"
            )
        if spec.tangents:
            reasons.append("has no forward-mode (JVP) rule, and the inputs carry tangents")
        return reasons

    def run(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seed: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from . import host

        return host.attention(spec, q, k, v, seed)

    # the front door hands it QuantizedKV operands as they are (``run_quantized``)
    reads_quantized = True

    def run_quantized(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor | QuantizedKV,
        v: torch.Tensor | QuantizedKV,
        seed: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``run`` with ``k`` and/or ``v`` a ``QuantizedKV`` (``spec`` validated on stand-ins of
        the dequantized shape): the forward and decode kernels read the codes and scales in
        place and dequantize them in registers; q is rotated for rotated keys and the output
        for rotated values (``host.attention``). A gradient of q (or a rule) runs the backward
        kernels on a dequantized copy made then."""
        from . import host

        return host.attention(spec, q, k, v, seed)

    def forward(self, spec, q, k, v, seed):
        """The forward kernels (decode or row tiles), no autograd; out in q's dtype."""
        from . import host

        return host.forward(spec, q, k, v, seed)

    def backward(self, spec, q, k, v, out, lse, dout, dlse, seed, need_dbias, need_dalibi):
        """The backward kernels (dK/dV, then dQ with the bias and slope gradients)."""
        from . import host

        return host.backward(spec, seed, q, k, v, out, lse, dout, dlse, need_dbias, need_dalibi)

    def weights(self, spec, q, k, lse, heads, rows):
        """The probabilities kernel; heads and rows are selected inside it."""
        from . import host

        return host.weights(spec, q, k, lse, heads, rows)

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
        """``attention_stats``: column sums and maxima and row entropies from the probabilities
        kernel, reducing each tile of ``exp(s - lse)`` in registers (never storing it). Top-k
        has no Triton kernel: it comes from ``tiled``'s statistics (torch ops on the same
        device, tile by tile from the lse)."""
        from ..tiled import TiledBackend
        from . import host

        got = host.stats(
            spec, q, k, lse, heads, rows, col_sum=col_sum, col_max=col_max, entropy=entropy
        )
        if topk:
            none = {"col_sum": False, "col_max": False, "entropy": False}
            got.update(TiledBackend().stats(spec, q, k, lse, heads, rows, topk=topk, **none))
        return got
