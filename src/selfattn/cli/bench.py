"""``selfattn bench``: selfattn's own engine against torch SDPA, the textbook formula and
FlexAttention over sequence lengths, as a table, JSON and a log-log plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .console import progress

__all__ = ["cmd_bench"]

COLUMNS = ("N", "method", "median ms", "vs sdpa", "GFLOP/s", "peak MiB", "max |diff|")


def _cells(r: dict) -> list[str]:
    """One result row as the table's cells ("-" where a value is missing)."""
    mem, diff = r.get("memory_bytes"), r.get("max_abs_diff")
    ratio, rate = r.get("vs_sdpa"), r.get("flops_per_s")
    return [
        str(r["n"]),
        r["method"],
        f"{r['median_s'] * 1e3:.2f}",
        f"{ratio:.2f}x" if ratio else "-",
        f"{rate / 1e9:.1f}" if rate else "-",
        f"{mem / 2**20:.1f}" if mem is not None else "-",
        f"{diff:.1e}" if diff is not None else "-",
    ]


def cmd_bench(args: argparse.Namespace, con) -> int:
    """selfattn against torch SDPA (and FlexAttention) over sequence lengths."""
    import torch
    from rich.table import Table

    from selfattn.bench.sweep import SweepConfig, count_steps, run_sweep

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        lengths = [128, 256, 512, 1024]
        heads, repeats = 4, 2
    else:
        lengths = [256, 512, 1024, 2048, 4096] + ([8192, 16384] if device == "cuda" else [])
        heads, repeats = 8, 3
    flex = args.flex if args.flex is not None else not args.quick
    methods = ["selfattn", "sdpa"] + ([] if args.no_math else ["math"]) + (["flex"] if flex else [])
    cfg = SweepConfig(
        lengths=args.lengths or lengths,
        methods=methods,
        device=device,
        dtype=args.dtype,
        batch=args.batch,
        heads=args.heads or heads,
        head_dim=args.head_dim,
        causal=not args.non_causal,
        repeats=args.repeats or repeats,
        memory=not args.no_memory,
        flex_timeout=args.flex_timeout,
        math_max=args.math_max,
        threads=args.threads,
    )
    cfg.validate()
    con.print(
        f"device {device}, {cfg.dtype}, (B, H, N, D) = ({cfg.batch}, {cfg.heads}, N, "
        f"{cfg.head_dim}), causal={cfg.causal}, N in {cfg.lengths}, methods {methods}, "
        f"{cfg.threads or torch.get_num_threads()} CPU threads"
    )
    with progress(con) as bar:
        task = bar.add_task("bench", total=count_steps(cfg), info="")
        results = run_sweep(cfg, lambda desc, k: bar.update(task, advance=k, info=desc))
        bar.update(task, completed=count_steps(cfg), info="done")
    t = Table(title="median seconds per call; vs sdpa = time / sdpa's time", title_justify="left")
    for c in COLUMNS:
        t.add_column(c, justify="right" if c != "method" else "left")
    for r in results["rows"]:
        t.add_row(*_cells(r))
    con.print(t)
    for m, why in results["skipped"].items():
        con.print(f"[yellow]{m}[/]: {why}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        con.print(f"results: {path}")
    if args.plot:
        from selfattn.viz import plot_bench

        plot_bench(results, args.plot)
        con.print(f"plot: {args.plot}")
    return 0
