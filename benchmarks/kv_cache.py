"""SmolLM2 decode step after a long context through each cache, one thread (issue 18):
selfattn's in-place ``make_cache()`` against transformers' ``DynamicCache`` (which concatenates
every layer's whole cache at every step; target >= 1.8x faster at 4k and 8k), and the quantized
``make_cache(bits=8)`` / ``make_cache(bits=4, rotate=True)`` (make_cache's default float window
of the newest 128 tokens; the ``residual=0`` rows quantize every token, which shows the window's
cost per step) against ``DynamicCache`` and against
transformers' ``QuantizedCache(backend="quanto")`` (which dequantizes the whole cache in every
layer at every step; target: faster than ``make_cache()``, >= 3x faster than ``QuantizedCache``).

For each context length the prompt (CPython's own ``pydoc_data/topics.py``) is prefilled once,
in chunks, into a ``DynamicCache``; every other cache is filled with the same keys and values
(each layer's ``update`` with the whole context: quantized caches quantize it). Then, round after
round, every (attention, cache) pair of ``--pairs`` runs one timed decode step (one token, batch
1), interleaved with the others, and the cache is put back as it was before the step (each
layer's state restored), so every timed step sees the same length. For ``QuantizedCache`` that
step is its steady state: dequantize everything, concatenate the few float tokens it keeps
(its re-quantization every 128 tokens is not timed). Figures are medians over the rounds.
``vs_dynamic_sdpa`` is the time of transformers' default (DynamicCache, sdpa) over the row's;
``vs_make_cache`` the time of ``make_cache`` with the same attention over the row's;
``vs_quanto`` the time of ``QuantizedCache(quanto, 4)`` (sdpa) over the row's. ``logit_gap`` is
the largest difference of the step's logits from DynamicCache's with the same attention (float
caches must agree to 1e-3; quantized ones show what rounding did). Writes the top level of
benchmarks/results/kv_cache.json (other sections of the file, e.g. the kernel-level one, kept).

The ``floor`` row of each context (``--floor N`` tokens, 16 by default; 0: none) is the same
decode step through ``make_cache()`` after a prompt of only N tokens, timed in the same rounds:
a step whose attention and cache cost next to nothing, so the model's own work (its matrix
products, norms and Python) is all it measures. No cache can make a step faster than that, so
its ``vs_quanto`` is the most any row of that context can reach against ``QuantizedCache``.

    python benchmarks/kv_cache.py                 # contexts 4096 and 8192 (many minutes on 1 core)
    python benchmarks/kv_cache.py --quick         # contexts 512 and 1024, a smoke run
    python benchmarks/kv_cache.py --contexts 2048 --rounds 9 --pairs sdpa:DynamicCache selfattn:make_cache
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

# kv_common.py sits beside this file (appended: the folder's names must shadow nothing)
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
from kv_common import CACHE_LABELS, load_model, new_cache, run_meta, text_ids, write_results

from selfattn.testing import torch_threads

RESULTS = Path(__file__).parent / "results" / "kv_cache.json"
#: (attention, cache) pairs timed by default: transformers' default and its quantized cache on
#: sdpa, the in-place cache on both, the quantized in-place caches on selfattn (which reads them)
PAIRS = (
    ("sdpa", "DynamicCache"),
    ("selfattn", "DynamicCache"),
    ("sdpa", "make_cache"),
    ("selfattn", "make_cache"),
    ("selfattn", "make_cache(bits=8)"),
    ("selfattn", "make_cache(bits=8, residual=0)"),
    ("selfattn", "make_cache(bits=4, rotate=True)"),
    ("selfattn", "make_cache(bits=4, rotate=True, residual=0)"),
    ("sdpa", "QuantizedCache(quanto, 4)"),
    ("sdpa", "QuantizedCache(quanto, 2)"),
)
PREFILL_CHUNK = 512
#: the floor row's cache label (see the module docstring)
FLOOR = "make_cache() after {} tokens (floor)"
FLOAT_CACHES = ("DynamicCache", "make_cache")


def prefill(model: Any, ids: torch.Tensor) -> Any:
    """A ``DynamicCache`` holding ``ids``, filled ``PREFILL_CHUNK`` tokens at a time."""
    cache = new_cache(model, "DynamicCache")
    for i in range(0, ids.shape[1], PREFILL_CHUNK):
        model(input_ids=ids[:, i : i + PREFILL_CHUNK], cache=cache, use_cache=True)
    return cache


def filled_like(model: Any, label: str, dynamic: Any) -> Any:
    """A cache of kind ``label`` holding the keys and values of ``dynamic``.

    A cache with a float window (make_cache's default ``residual`` with ``bits``) gets the last
    token apart, so that its window is flushed then, as in a running generation: the timed step
    sees ``residual + 1`` float tokens and quantizes none (a flush, 32 tokens once every 32 steps,
    is not timed, as QuantizedCache's re-quantization is not)."""
    if label == "DynamicCache":
        return dynamic
    cache = new_cache(model, label)
    for ours, theirs in zip(cache.layers, dynamic.layers):
        if getattr(ours, "residual", 0):
            ours.update(theirs.keys[:, :, :-1], theirs.values[:, :, :-1])
            ours.update(theirs.keys[:, :, -1:], theirs.values[:, :, -1:])
        else:
            ours.update(theirs.keys, theirs.values)
    return cache


def snapshot(cache: Any) -> list[dict[str, Any]]:
    """Each layer's attributes (shallow): every cache here replaces or writes past its held
    tokens on a step, never rewrites them, so restoring these undoes the step."""
    return [dict(layer.__dict__) for layer in cache.layers]


def restore(cache: Any, saved: list[dict[str, Any]]) -> None:
    for layer, state in zip(cache.layers, saved):
        layer.__dict__.clear()
        layer.__dict__.update(state)


def decode_step(model: Any, cache: Any, token: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds and logits (1, 1, vocab) of one decode step of ``token`` (1, 1) over ``cache``;
    the cache is restored afterwards, so it holds what it held before."""
    saved = snapshot(cache)
    t0 = time.perf_counter()
    logits = model(input_ids=token, cache=cache, use_cache=True).logits
    seconds = time.perf_counter() - t0
    restore(cache, saved)
    return seconds, logits


def measure(
    model: Any,
    tok: Any,
    context: int,
    rounds: int,
    pairs: list[tuple[str, str]],
    floor: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One row per (attention, cache) pair that runs, and the ``floor`` row (``make_cache()``
    after ``floor`` tokens, with selfattn; none for 0); ``skipped`` says why the others did not
    run (not built yet, a package missing)."""
    ids = text_ids(tok, context + 1)
    dynamic = prefill(model, ids[:, :context])
    short = None
    if floor:  # (DynamicCache, make_cache, next token) after the first `floor` tokens
        small = prefill(model, ids[:, :floor])
        short = (small, filled_like(model, "make_cache", small), ids[:, floor : floor + 1])
    caches, skipped = {}, {}
    for label in dict.fromkeys(c for _, c in pairs):
        try:
            caches[label] = filled_like(model, label, dynamic)
        except (NotImplementedError, ImportError) as exc:
            skipped[label] = f"{type(exc).__name__}: {exc}"
            print(f"{label:<34} skipped: {skipped[label]}", flush=True)
    pairs = [(a, c) for a, c in pairs if c in caches]
    for label, cache in caches.items():
        if cache.get_seq_length() != context:
            raise RuntimeError(f"{label} holds {cache.get_seq_length()} tokens, not {context}")
    token = ids[:, context:]
    times: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    gaps: dict[tuple[str, str], float] = dict.fromkeys(pairs, 0.0)
    floor_times: list[float] = []
    floor_gap = 0.0
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        if short is not None:
            model.set_attn_implementation("selfattn")
            want = decode_step(model, short[0], short[2])[1]
            seconds, logits = decode_step(model, short[1], short[2])
            floor_gap = max(floor_gap, (logits - want).abs().max().item())
            if r:
                floor_times.append(seconds)
        ref: dict[str, torch.Tensor] = {}
        for attn in dict.fromkeys(a for a, _ in pairs):
            model.set_attn_implementation(attn)
            ref[attn] = decode_step(model, dynamic, token)[1]  # what every cache should give
            for pair in (p for p in pairs if p[0] == attn):
                seconds, logits = decode_step(model, caches[pair[1]], token)
                if r:
                    times[pair].append(seconds)
                gaps[pair] = max(gaps[pair], (logits - ref[attn]).abs().max().item())
                if pair[1] in FLOAT_CACHES and gaps[pair] > 1e-3:
                    # a float cache that computes another step makes the comparison meaningless
                    raise RuntimeError(
                        f"{pair}: logits differ from DynamicCache's by {gaps[pair]:.3g}"
                    )
    for label, cache in {"DynamicCache": dynamic, **caches}.items():
        if cache.get_seq_length() != context:  # every step must have been undone
            raise RuntimeError(f"{label} holds {cache.get_seq_length()} tokens after the steps")
    ms = {p: 1000 * statistics.median(t) for p, t in times.items()}
    rows = []
    for attn, label in pairs:
        t = ms[(attn, label)]
        row = {"context": context, "attention": attn, "cache": label, "ms": round(t, 2)}
        for key, base in (
            ("vs_dynamic_sdpa", ("sdpa", "DynamicCache")),
            ("vs_make_cache", (attn, "make_cache")),
            ("vs_quanto", ("sdpa", "QuantizedCache(quanto, 4)")),
        ):
            if base in ms:
                row[key] = round(ms[base] / t, 2)
        row["logit_gap"] = float(f"{gaps[(attn, label)]:.3g}")
        row["rounds"] = rounds
        rows.append(row)
    if floor_times:
        t = 1000 * statistics.median(floor_times)
        row = {"context": context, "attention": "selfattn", "cache": FLOOR.format(floor)}
        row["ms"] = round(t, 2)
        quanto = ms.get(("sdpa", "QuantizedCache(quanto, 4)"))
        if quanto is not None:
            row["vs_quanto"] = round(quanto / t, 2)  # the most any row of this context reaches
        row["logit_gap"] = float(f"{floor_gap:.3g}")
        row["rounds"] = rounds
        row["floor"] = floor
        rows.append(row)
    return rows, skipped


def table(result: dict[str, Any]) -> str:
    """The README's table: step time of each (attention, cache) and its ratios."""
    meta = result["meta"]
    lines = [
        f"SmolLM2-135M-Instruct (fp32) decode step, batch 1, torch threads: {meta['torch_threads']}, "
        f"median of {result['rows'][0]['rounds']} steps; a ratio is the other's time over the "
        "row's (above 1: the row is faster); load average at the start "
        f"{meta['load_average_1min']}"
        + (" (`--quick`: a smoke run)." if meta.get("quick") else "."),
        "",
        "| context | attention | cache | step ms | vs DynamicCache (sdpa) | vs make_cache | "
        "vs QuantizedCache (quanto 4-bit) |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        cells = [
            f"{r[k]:.2f}x" if k in r else ""
            for k in ("vs_dynamic_sdpa", "vs_make_cache", "vs_quanto")
        ]
        lines.append(
            f"| {r['context']} | `{r['attention']}` | `{r['cache']}` | {r['ms']:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def parse_pair(text: str) -> tuple[str, str]:
    attn, sep, label = text.partition(":")
    if not sep or label not in CACHE_LABELS:
        raise argparse.ArgumentTypeError(
            f"a pair is attention:cache with cache one of {', '.join(CACHE_LABELS)}; got {text!r}"
        )
    return attn, label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="contexts 512 and 1024, 5 rounds")
    parser.add_argument(
        "--pairs", type=parse_pair, nargs="+", default=list(PAIRS), help="attention:cache ..."
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--floor", type=int, default=16, help="tokens of the floor row's prompt (0: no row)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.rounds = [512, 1024], 5
    if args.rounds < 1 or args.threads < 1 or any(c < 1 for c in args.contexts):
        parser.error("--rounds, --threads and --contexts must be positive")
    if args.floor < 0:
        parser.error(f"--floor must be >= 0 tokens, got {args.floor}")
    model, tok = load_model("smollm2", "selfattn")
    rows, skipped = [], {}
    with torch_threads(args.threads), torch.inference_mode():
        for context in args.contexts:
            more, why = measure(model, tok, context, args.rounds, args.pairs, args.floor)
            skipped.update(why)
            for row in more:
                rows.append(row)
                ratios = "  ".join(
                    f"{k} {row[k]:.2f}x"
                    for k in ("vs_dynamic_sdpa", "vs_make_cache", "vs_quanto")
                    if k in row
                )
                print(
                    f"context {row['context']:>6}  {row['attention']:<8}  {row['cache']:<32}"
                    f"{row['ms']:8.1f} ms  {ratios}  gap {row['logit_gap']:.2g}",
                    flush=True,
                )
    meta = run_meta(
        "SmolLM2-135M-Instruct (fp32) decode step, batch 1, after `context` tokens",
        args.threads,
        Path(__file__).name,
        argv,
        quick=bool(args.quick),
        skipped=skipped,
    )
    write_results(args.out, rows, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
