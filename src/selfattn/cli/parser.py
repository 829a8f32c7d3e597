"""The command line's parser room: every subcommand's arguments, and :func:`main`, which parses,
runs the command and turns bad arguments into one line and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from selfattn.checks import integer

from . import chat, transcribe
from .bench import cmd_bench
from .console import UsageError, make_console, version
from .demo import DEFAULT_TEXT, cmd_demo
from .explain import cmd_explain
from .info import cmd_info
from .train import cmd_train

__all__ = ["build_parser", "main"]

MODEL_HELP = "model folder (default: the bundled MiniLM)"
THREADS_HELP = "torch CPU threads (default: torch's; 1 is steadier if busy)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    try:
        return integer("N", n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}") from None


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
    p.add_argument("--version", action="version", version=f"selfattn {version('selfattn')}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_info(sub)
    _add_demo(sub)
    _add_explain(sub)
    _add_bench(sub)
    _add_train(sub)
    chat.add_parser(sub)
    transcribe.add_parser(sub)
    return p


def _add_info(sub) -> None:
    s = sub.add_parser("info", help="versions, devices, and which backends can run here")
    s.add_argument("--json", action="store_true", help="print JSON instead of tables")
    build = "build the native CPU engine now (again, if a failed build is recorded); 1 if it fails"
    s.add_argument("--build", action="store_true", help=build)
    s.set_defaults(func=cmd_info)


def _add_demo(sub) -> None:
    s = sub.add_parser(
        "demo",
        help="the lesson's five steps, backends against the spec, MiniLM's attention drawn",
        description="Walk the lesson's example through the five steps, show the lesson's "
        "unscaled code going NaN on large scores next to the stable softmax, check every backend "
        "against the float64 specification, then run the bundled MiniLM with "
        "attn_implementation='selfattn' and write heatmaps and the HTML head view into --out.",
    )
    folder = "folder for the pictures (default: ./selfattn-demo)"
    s.add_argument("--out", default="selfattn-demo", metavar="DIR", help=folder)
    s.add_argument("--seed", type=int, default=0, help="seed of the random Wq, Wk, Wv")
    s.add_argument("--text", default=DEFAULT_TEXT, help="sentence for the model")
    s.add_argument("--model", metavar="PATH", help=MODEL_HELP)
    s.add_argument("--no-model", action="store_true", help="skip the real-model part")
    s.set_defaults(func=cmd_demo)


def _add_explain(sub) -> None:
    s = sub.add_parser(
        "explain",
        help="draw a local transformers model's attention on TEXT",
        description="Run TEXT through a local transformers encoder or decoder folder with "
        "attn_implementation='selfattn' and write heatmaps (PNG) and the HTML head view. Only "
        "the layers, heads and rows asked for are materialised.",
    )
    s.add_argument("text", metavar="TEXT")
    s.add_argument("--model", metavar="PATH", help=MODEL_HELP)
    layers = "layers to draw (negative counts from the end; default: all)"
    s.add_argument("--layers", type=int, nargs="+", metavar="L", help=layers)
    s.add_argument("--heads", type=int, nargs="+", metavar="H", help="heads (default: all)")
    rows = "query token positions (default: all)"
    s.add_argument("--rows", type=int, nargs="+", metavar="R", help=rows)
    s.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures")
    s.add_argument("--threads", type=_positive, metavar="T", help=THREADS_HELP)
    s.set_defaults(func=cmd_explain)


def _add_bench(sub) -> None:
    s = sub.add_parser(
        "bench",
        help="time selfattn against torch SDPA (and FlexAttention) on this machine",
        description="Time selfattn's own engine (native C++ kernels, else tiled, on CPU; triton on "
        "CUDA) against torch "
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
    flex = "include FlexAttention (default: yes, no with --quick)"
    s.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None, help=flex)
    limit = "FlexAttention's time limit, compiling included (default 240)"
    s.add_argument("--flex-timeout", type=_seconds, default=240.0, metavar="S", help=limit)
    s.add_argument("--no-math", action="store_true", help="leave out the textbook formula")
    longest = "longest N for the textbook formula (default 4096)"
    s.add_argument("--math-max", type=_positive, default=4096, metavar="N", help=longest)
    s.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    s.add_argument("--threads", type=_positive, metavar="T", help=THREADS_HELP)
    s.set_defaults(func=cmd_bench)


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
    steps = "total optimiser steps (a resumed run continues up to it; default 300)"
    s.add_argument("--steps", type=_positive, default=300, help=steps)
    s.add_argument("--out", required=True, metavar="DIR", help="folder for everything written")
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    s.add_argument("--batch-size", type=_positive, help="default: 32 (gpt), 64 (vit)")
    s.add_argument("--eval-every", type=_positive, default=50, metavar="K")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--threads", type=_positive, metavar="T", help=THREADS_HELP)
    s.set_defaults(func=cmd_train)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a check failed, 2 bad usage,
    130 interrupted by Ctrl-C)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version exit through argparse
        return int(exc.code or 0)
    con = make_console()
    try:
        return args.func(args, con)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT, no traceback
        print(f"selfattn {args.command}: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"selfattn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # the library names the bad values; one line is enough
        if os.environ.get("SELFATTN_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"selfattn {args.command}: error: {first}", file=sys.stderr)
        return 2
