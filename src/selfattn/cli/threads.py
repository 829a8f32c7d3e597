"""The command line's thread room: how many torch threads to run when the user did not say, from
how much CPU other processes are using right now.

Why: torch's default is one thread per physical core. On a machine where another process keeps a
core busy, the decode step's OpenMP threads wait for the descheduled one at every op: on a loaded
2-core machine ``selfattn chat`` ran several times slower at torch's default than with 1 thread.

How: :class:`CpuWatch` reads the busy time of the CPUs this process may run on (Linux
``/proc/stat``, one line per CPU, steal time counted as busy) at a mark and later, and subtracts
this process's own CPU time (``os.times``: its threads and waited-for children), so the window
may include our own work (loading the model, the previous reply). Elsewhere the 1-minute load
average stands in (macOS); without either (Windows) torch's default is kept.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

__all__ = ["SLACK", "CpuWatch", "usable_cores"]

#: the free share of the cores is rounded to the nearest thread: other processes must hold more
#: than half a core to cost a thread (a blip while the model loads should not)
SLACK = 0.5
#: the shortest window worth measuring (seconds); a shorter one waits this long first
SHORTEST = 0.2


def _cgroup_cores() -> float | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``) in cores, None when unlimited."""
    try:
        rel = next(
            line.split("::", 1)[1].strip()
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
    except (OSError, StopIteration):
        return None
    for folder in (Path("/sys/fs/cgroup") / rel.lstrip("/"), Path("/sys/fs/cgroup")):
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    return None


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return list(range(os.cpu_count() or 1))


def usable_cores() -> float:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    n = float(len(_cpus()))
    quota = _cgroup_cores()
    return min(n, quota) if quota else n


def _busy_ticks(cpus: list[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks summed over ``cpus`` since boot, None without /proc/stat."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{i}" for i in cpus}
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if name not in wanted:
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user already)
        t = [int(x) for x in fields[:8]] + [0] * max(0, 8 - len(fields))
        busy += t[0] + t[1] + t[2] + t[5] + t[6] + t[7]
        total += sum(t)
    return (busy, total) if total else None


def _own_seconds() -> float:
    """CPU seconds used by this process (all its threads) and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """How many cores other processes kept busy between :meth:`mark` and now.

    ``CpuWatch()`` marks at once; :meth:`threads` measures since the last mark, picks a thread
    count and marks again, so each call looks at the time since the previous one.
    """

    def __init__(self) -> None:
        self._cpus = _cpus()
        self.mark()

    def mark(self) -> None:
        """Start a new window now."""
        self._wall = time.monotonic()
        self._ticks = _busy_ticks(self._cpus)
        self._own = _own_seconds()

    def others_busy(self) -> float | None:
        """Cores' worth of CPU time other processes used since the mark (0.0 = all idle);
        None when it cannot be measured here."""
        if self._ticks is None:
            try:
                return os.getloadavg()[0]
            except (AttributeError, OSError):
                return None
        if time.monotonic() - self._wall < SHORTEST:
            time.sleep(SHORTEST)
        now = _busy_ticks(self._cpus)
        if now is None:
            return None
        busy, total = now[0] - self._ticks[0], now[1] - self._ticks[1]
        if total <= 0:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        own = (_own_seconds() - self._own) * hz
        per_cpu = total / len(self._cpus)  # ticks that passed on each CPU
        return max(0.0, busy - own) / per_cpu

    def threads(self, cap: int) -> int:
        """Threads for the next piece of work: ``cap`` (torch's default) scaled by the share of
        the usable cores that other processes left free, at least 1; marks again.

        With 2 cores and one busy loop elsewhere: 1. Nothing else running: ``cap``.
        """
        others = self.others_busy()
        self.mark()
        if others is None:
            return cap
        cores = usable_cores()
        free = max(0.0, cores - others) / cores
        return max(1, min(cap, math.floor(cap * free + SLACK)))
