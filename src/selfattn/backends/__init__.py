"""The backend registry: one object per backend, a priority list per device, and ``select()``.

Each backend says why it cannot run a call (``check`` returns reasons, empty = can run) or
why it cannot run on this machine at all (``unavailable``). ``select`` walks the candidates and
either returns the first that accepts or raises :class:`UnsupportedInputs` listing every refusal.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..spec import AttentionSpec, UnsupportedInputs
from .math import MathBackend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend
from .tiled import TiledBackend
from .triton import TritonBackend  # imports no triton itself: unavailable() says what is missing

__all__ = ["BACKENDS", "Backend", "available", "candidates", "refusals", "select"]


class Backend(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine at all, or None."""

    def check(self, spec: AttentionSpec) -> list[str]:
        """Why this backend declines this call; empty when it can run it."""

    def run(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seed: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(out, lse)``; lse may be None when ``spec.return_lse`` is False."""


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


for _b in (ReferenceBackend(), MathBackend(), TiledBackend(), SdpaBackend()):
    register(_b)

register(TritonBackend())

# Order in which `auto` tries backends: fused kernels first, torch's own fused op for the plain
# calls it covers, then our O(N)-memory engine. `math` and `reference` always accept but are
# slower than `tiled`, so `auto` reaches them only if an earlier one is missing.
_PRIORITY = {
    "cuda": ["triton", "sdpa", "tiled", "math", "reference"],
    "cpu": ["sdpa", "tiled", "math", "reference", "triton"],
}


def candidates(device: torch.device) -> list[str]:
    return _PRIORITY.get(device.type, ["tiled", "math", "sdpa", "reference", "triton"])


def refusals(spec: AttentionSpec, name: str) -> list[str]:
    """Every reason backend ``name`` declines ``spec`` (empty: it can run it)."""
    backend = BACKENDS[name]
    why = backend.unavailable()
    return [why] if why else backend.check(spec)


def available() -> list[str]:
    """Backends that can run on this machine (for some input)."""
    return [name for name, b in BACKENDS.items() if b.unavailable() is None]


def select(spec: AttentionSpec, name: str) -> Backend:
    """The backend to run ``spec``: ``name`` itself, or the first in priority order for "auto".

    Raises:
        UnsupportedInputs: no candidate accepts; the message lists every backend and reason.
    """
    names = candidates(spec.device) if name == "auto" else [name]
    reasons: dict[str, list[str]] = {}
    for n in names:
        why = refusals(spec, n)
        if not why:
            return BACKENDS[n]
        reasons[n] = why
    lines = [f"no backend can run this call (backend={name!r}): {spec.describe()}"]
    for n, why in reasons.items():
        lines.append(f"  - {n}: " + "; ".join(why))
    raise UnsupportedInputs("\n".join(lines), reasons)
