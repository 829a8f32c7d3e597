"""Benchmark primitives: FLOP counts, a timer, and peak-memory measurement.

Used by ``benchmarks/*.py`` and ``selfattn bench``. Times are medians over repeats (interleaved
between methods by the callers, so machine noise hits every method alike); memory is the peak
growth of the process while one call runs.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Timing", "attention_flops", "peak_memory_growth", "time_fn"]


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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    # VmHWM: the high-water mark of the resident set, reset below via /proc/self/clear_refs
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory_growth(code: str, *, setup: str = "", timeout: float = 1800.0) -> dict[str, int]:
    """Peak resident-memory growth of ``code`` in a fresh Python process.

    ``setup`` runs first (allocate inputs, import, warm caches); then the high-water mark is
    reset and ``code`` runs once. On CUDA-free machines this measures the host allocator, which
    is what the CPU engine uses.

    Returns:
        ``{"baseline": rss_after_setup, "peak": peak_rss, "growth": peak - baseline}`` in bytes.
    """
    script = (
        "import gc, json, sys\n"
        "from selfattn.bench import _rss_bytes, _peak_rss_bytes, _reset_peak\n"
        f"{setup}\n"
        "gc.collect()\n"
        "base = _rss_bytes()\n"
        "if not _reset_peak():\n"
        "    sys.exit('cannot reset the peak RSS on this system')\n"
        f"{code}\n"
        "peak = _peak_rss_bytes()\n"
        "print(json.dumps({'baseline': base, 'peak': peak, 'growth': peak - base}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def collect() -> None:
    """Free what can be freed between measurements."""
    gc.collect()
