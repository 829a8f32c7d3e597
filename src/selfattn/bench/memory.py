"""Memory room of the benchmarks: the process's resident set, its high-water mark and how to
reset it (Linux ``/proc``), and the peak growth of a snippet run in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

__all__ = ["peak_memory_growth", "peak_rss_bytes", "reset_peak", "rss_bytes"]


def rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident set (VmHWM) in bytes, since the start or
    the last :func:`reset_peak`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def reset_peak() -> bool:
    """Reset the high-water mark to the current resident set (Linux >= 4.0); False where the
    system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
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
        "from selfattn.bench.memory import peak_rss_bytes, reset_peak, rss_bytes\n"
        f"{setup}\n"
        "gc.collect()\n"
        "base = rss_bytes()\n"
        "if not reset_peak():\n"
        "    sys.exit('cannot reset the peak RSS on this system')\n"
        f"{code}\n"
        "peak = peak_rss_bytes()\n"
        "print(json.dumps({'baseline': base, 'peak': peak, 'growth': peak - base}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
