"""The backend registry: one object per backend, a priority list per device, and ``select()``.

Every path that runs attention goes through ``select()``: ``selfattn.attention``, the custom
op's forward and backward under ``torch.compile``, ``attention_weights`` and the blocks of ring
attention. A backend says why it cannot run a call (``check`` returns reasons, empty = can
run) or why it cannot run on this machine at all (``unavailable``), and may offer optional
hooks beyond ``run``; ``select(spec, name, need=(...))`` only picks backends that offer the
hooks a path needs:

- ``forward(spec, q, k, v, seed) -> (out, lse)`` without autograd, for any ``spec.start``
  (ring attention's blocks); out (B, Hq, Nq, Dv), lse (B, Hq, Nq) natural log, float32 or the
  accumulation dtype.
- ``backward(spec, q, k, v, out, lse, dout, dlse, seed, need_dbias, need_dalibi)`` ->
  ``(dq, dk, dv, dbias, dalibi)`` (the custom op's backward, ring blocks).
- ``weights(spec, q, k, lse, heads, rows)`` -> exact probabilities (``attention_weights``).
- ``stats(spec, q, k, lse, heads, rows, *, col_sum, col_max, entropy, topk)`` -> the dict of
  ``attention_stats`` (``selfattn.stats``): reductions of the probabilities block by block from
  the lse (recomputed when None), for the selected heads and rows (int64 indices or None).
- ``forward_stats(spec, q, k, v, *, col_sum, col_max, entropy, topk)`` -> ``(out, lse, dict)``
  in one pass, for a call without gradient or dropout (``attention_with_stats``).
- ``prefer(spec) -> (name, why) | None``, asked by ``auto`` only, after the backend accepted the
  call: another backend to run instead where that one accepts it too (``native``: SDPA for
  calls below a measured size, ``native/choice.py``).
- ``plain(spec) -> run(q, k, v) -> (out, lse)``, asked by the front door's fast path
  (``api.plain_call``) once per remembered choice: ``run`` does what ``run(spec, q, k, v,
  None)`` does for a plain call (no rule but causal and scale, no gradient, tangent or
  torch.func transform) on inputs of the spec's shapes, with its per-call setup done once.

A new backend is one module with a class like those below, registered here with its place in
``PRIORITY``.
"""

from __future__ import annotations

import platform
from typing import Protocol

import torch

from ..spec import AttentionSpec, UnsupportedInputs
from .math import MathBackend
from .native.backend import NativeBackend  # builds nothing at import: unavailable() says why not
from .reference import ReferenceBackend
from .sdpa import SdpaBackend
from .tiled import TiledBackend
from .triton import TritonBackend  # imports no triton itself: unavailable() says what is missing

__all__ = [
    "BACKENDS",
    "CHOICES",
    "HOOKS",
    "PRIORITY",
    "Backend",
    "available",
    "candidates",
    "forget_choices",
    "preferred",
    "refusals",
    "register",
    "select",
]

HOOKS = ("forward", "backward", "weights", "stats", "forward_stats")


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
        """``(out, lse)`` with autograd when ``spec.requires_grad``; lse may be None when
        ``spec.return_lse`` is False."""


BACKENDS: dict[str, Backend] = {}


# The backend ``select`` picks for plain calls (no rule but causal and scale, no gradient),
# remembered by the front door's fast path (``api.plain_call``): (spec, backend, run) by a key of
# the backend's name ("auto" or a name), the shapes, dtypes, rules and torch's thread count (auto's
# measured rules depend on it); ``run(q, k, v)`` is the
# backend's ``plain`` hook, or its ``run`` for the spec. Calls over a quantized cache
# (``api.quantized_plain_call``) are keyed ("quantized", backend name, q's shape and dtype, each
# operand's kind, the rules, threads), their run the backend's ``plain_quantized`` hook.
# ``attention_with_stats`` keeps its own
# (spec, backend) pairs here under keys that start with "with_stats". A choice depends on the
# registry only, so ``register`` forgets them all; whoever changes what a backend accepts in
# another way calls ``forget_choices``.
CHOICES: dict[tuple, tuple] = {}


def forget_choices() -> None:
    """Forget the remembered choices (``CHOICES``)."""
    CHOICES.clear()


def register(backend: Backend) -> None:
    """Add a backend (or replace the one of the same name)."""
    BACKENDS[backend.name] = backend
    forget_choices()


for _b in (
    ReferenceBackend(),
    MathBackend(),
    TiledBackend(),
    SdpaBackend(),
    NativeBackend(),
    TritonBackend(),
):
    register(_b)

# Order in which `auto` tries backends, by measured cost (benchmarks/results/cpu.json): our fused
# kernels first (on the CPU `native` beats torch's SDPA on every row measured, decode and tiny
# calls included), torch's own fused op for the plain calls it covers, then the torch-op engine.
# `math` and `reference` always accept but are slower than `tiled`, so `auto` reaches them only
# if an earlier one is missing.
PRIORITY = {
    "cuda": ["triton", "sdpa", "tiled", "math", "reference"],
    "cpu": ["native", "sdpa", "tiled", "math", "reference", "triton"],
}


# On ARM CPUs the NEON engine is checked for correctness (make check-arm) but its speed has not
# been measured: until it is, `auto` prefers torch's SDPA wherever SDPA runs the call and gives
# `native` what SDPA declines (windows, softcap, segment ids, ...), ahead of the torch-op engine.
ARM_CPU = ["sdpa", "native", "tiled", "math", "reference", "triton"]
ARM_MACHINES = ("aarch64", "arm64")
# any other device type
OTHER_DEVICES = ["tiled", "math", "sdpa", "reference", "triton"]


def candidates(device: torch.device) -> list[str]:
    """The backends ``auto`` tries for a device, in order."""
    kind = device.type
    if kind == "cpu" and platform.machine().lower() in ARM_MACHINES:
        return ARM_CPU
    return PRIORITY.get(kind, OTHER_DEVICES)


def refusals(spec: AttentionSpec, name: str, need: tuple[str, ...] = ()) -> list[str]:
    """Every reason backend ``name`` declines ``spec`` (empty: it can run it).

    ``need`` names the hooks (``HOOKS``) the caller will use.
    """
    backend = BACKENDS[name]
    why = backend.unavailable()
    if why:
        return [why]
    if need:
        missing = [h for h in need if getattr(backend, h, None) is None]
        if missing:
            return [f"offers no {' or '.join(missing)} hook"]
    return backend.check(spec)


def preferred(spec: AttentionSpec, name: str, need: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """For ``auto``: the backend that runs ``spec`` instead of ``name`` (which accepts it) and
    why, when ``name`` prefers one and that one accepts the call with ``need``; else None."""
    prefer = getattr(BACKENDS[name], "prefer", None)
    alt = prefer(spec) if prefer is not None else None
    if alt is None or alt[0] not in BACKENDS or refusals(spec, alt[0], need):
        return None
    return alt


def available() -> list[str]:
    """Backends that can run on this machine (for some input)."""
    return [name for name, b in BACKENDS.items() if b.unavailable() is None]


def select(spec: AttentionSpec, name: str, need: tuple[str, ...] = ()) -> Backend:
    """The backend to run ``spec``: ``name`` itself, or the first in priority order for "auto".

    Args:
        spec: the validated call.
        name: a backend name or "auto".
        need: hooks the caller will use (``HOOKS``); backends without them decline.

    Raises:
        UnsupportedInputs: no candidate accepts; the message lists every backend and reason.
    """
    names = candidates(spec.device) if name == "auto" else [name]
    reasons: dict[str, list[str]] = {}
    for n in names:
        why = refusals(spec, n, need)
        if not why:
            alt = preferred(spec, n, need) if name == "auto" else None
            return BACKENDS[alt[0] if alt else n]
        reasons[n] = why
    lines = [f"no backend can run this call (backend={name!r}): {spec.describe()}"]
    if need:
        lines[0] += f" [needs the {', '.join(need)} hook]"
    for n, why in reasons.items():
        lines.append(f"  - {n}: " + "; ".join(why))
    raise UnsupportedInputs("\n".join(lines), reasons)
