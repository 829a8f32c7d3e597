"""Timing room of the benchmarks: FLOP counts (the FlashAttention convention) and a timer that
keeps every sample."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Timing", "attention_flops", "time_fn"]


def attention_flops(
    b: int,
    h: int,
    nq: int,
    nk: int,
    d: int,
    dv: int | None = None,
    *,
    causal: bool = False,
    mode: str = "fwd",
    visible_fraction: float | None = None,
) -> float:
    """Floating-point operations of attention, the FlashAttention convention.

    Forward: ``2*Nq*Nk*D`` for the scores plus ``2*Nq*Nk*Dv`` for the weighted sum, per head
    (``4*B*H*Nq*Nk*D`` when Dv == D); halved for causal; ``mode="fwd_bwd"`` multiplies by 3.5
    (backward = 2.5x forward). ``visible_fraction`` overrides the causal factor (e.g. windows).
    """
    dv = d if dv is None else dv
    total = 2.0 * b * h * nq * nk * (d + dv)
    if visible_fraction is not None:
        total *= visible_fraction
    elif causal:
        total *= 0.5
    if mode == "fwd_bwd":
        total *= 3.5
    elif mode == "bwd":
        total *= 2.5
    elif mode != "fwd":
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd_bwd', got {mode!r}")
    return total


@dataclass
class Timing:
    """Seconds per call: the median and every sample."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def best(self) -> float:
        return min(self.samples) if self.samples else float("nan")


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | None = None,
    timing: Timing | None = None,
) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` calls; appends to ``timing`` if given."""
    timing = timing or Timing()
    for _ in range(warmup):
        fn()
    _sync(device)
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        timing.samples.append(time.perf_counter() - t0)
    return timing
