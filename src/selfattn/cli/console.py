"""The command line's console room: the usage error, the rich console, tables of numbers, the
progress bar, output folders and package versions that every command shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = ["UsageError", "make_console", "matrix", "num", "out_dir", "progress", "version"]


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


def make_console():
    """The rich console every command prints to (no automatic highlighting)."""
    from rich.console import Console

    return Console(highlight=False)


def version(dist: str) -> str:
    """The installed version of the distribution ``dist``, or "not installed"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def num(x: float) -> str:
    """One table cell: 4 decimals, scientific past 1e5, a red nan, -inf / inf."""
    if math.isnan(x):
        return "[bold red]nan[/]"
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    return f"{x:.4f}" if abs(x) < 1e5 else f"{x:.3e}"


def matrix(title: str, m: np.ndarray, rows: Sequence[str], cols: Sequence[str] | None = None):
    """A rich table of the 2-D array ``m`` with named rows and columns (default: 0, 1, ...)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    t.add_column("")
    cols = cols or [str(j) for j in range(m.shape[1])]
    for c in cols:
        t.add_column(c, justify="right")
    for name, row in zip(rows, m):
        t.add_row(name, *(num(x) for x in row))
    return t


def out_dir(path: str, *, make: bool = True) -> Path:
    """The ``--out`` folder, made if missing (``make=False``: only checked, for a command that
    makes it when it writes); a :class:`UsageError` when it is a file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path!r} exists and is not a folder")
    if make:
        out.mkdir(parents=True, exist_ok=True)
    return out


def progress(con):
    """A rich progress bar: description, bar, done/total, elapsed, remaining, then ``info``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    times = [TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    return Progress(*bar, *times, console=con)
