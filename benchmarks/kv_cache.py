"""SmolLM2 decode step after a long context: selfattn's in-place ``make_cache()`` against
transformers' ``DynamicCache`` (which concatenates every layer's whole cache at every step), with
``sdpa`` and with ``selfattn`` attention, one thread (issue 18: target >= 1.8x faster at 4k and 8k).

For each context length the prompt (CPython's own ``pydoc_data/topics.py``, which ships with
every Python) is prefilled once, in chunks, into a ``DynamicCache``; a ``make_cache()`` cache is
filled with the same keys and values. Then, round after round, every (attention, cache) pair runs
one timed decode step (one token, batch 1) interleaved with the others, and the cache is cropped
back by that token, so every timed step sees the same length. Figures are medians over the rounds;
``speedup`` is DynamicCache's time over make_cache's with the same attention, and
``speedup_vs_dynamic_cache_sdpa`` is the time of transformers' default (DynamicCache, sdpa) over
make_cache's. Writes benchmarks/results/kv_cache.json.

    python benchmarks/kv_cache.py                 # contexts 4096 and 8192 (minutes on 1 core)
    python benchmarks/kv_cache.py --quick         # contexts 512 and 1024, a smoke run
    python benchmarks/kv_cache.py --contexts 2048 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from selfattn.bench.machine import cpu_info
from selfattn.testing import torch_threads

RESULTS = Path(__file__).parent / "results" / "kv_cache.json"
ATTENTION = ("sdpa", "selfattn")
CACHES = ("DynamicCache", "make_cache")
PREFILL_CHUNK = 512


def context_ids(tok: Any, n: int) -> torch.Tensor:
    """The first ``n`` tokens (1, n) of CPython's ``pydoc_data/topics.py``."""
    import pydoc_data.topics as topics

    text = Path(topics.__file__).read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"pydoc_data/topics.py gives {ids.shape[1]} tokens, fewer than {n}")
    return ids


def prefill(model: Any, ids: torch.Tensor) -> Any:
    """A ``DynamicCache`` holding ``ids``, filled ``PREFILL_CHUNK`` tokens at a time."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(0, ids.shape[1], PREFILL_CHUNK):
        model(input_ids=ids[:, i : i + PREFILL_CHUNK], cache=cache, use_cache=True)
    return cache


def in_place_copy(model: Any, dynamic: Any) -> Any:
    """A ``make_cache()`` cache holding the same keys and values as ``dynamic``."""
    from selfattn.integrations.transformers import make_cache

    cache = make_cache(model)
    for ours, theirs in zip(cache.layers, dynamic.layers):
        ours.update(theirs.keys, theirs.values)
    return cache


def decode_step(model: Any, cache: Any, token: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds and logits (1, 1, vocab) of one decode step of ``token`` (1, 1) over ``cache``;
    the cache is cropped back afterwards, so it holds what it held before."""
    t0 = time.perf_counter()
    logits = model(input_ids=token, cache=cache, use_cache=True).logits
    seconds = time.perf_counter() - t0
    cache.crop(-1)
    return seconds, logits


def measure(model: Any, tok: Any, context: int, rounds: int) -> list[dict[str, Any]]:
    """One row per attention implementation: median step times of both caches."""
    ids = context_ids(tok, context + 1)
    caches = {"DynamicCache": prefill(model, ids[:, :context])}
    caches["make_cache"] = in_place_copy(model, caches["DynamicCache"])
    for cache in caches.values():
        if cache.get_seq_length() != context:
            raise RuntimeError(f"the cache holds {cache.get_seq_length()} tokens, not {context}")
    token = ids[:, context:]
    times: dict[tuple[str, str], list[float]] = {(a, c): [] for a in ATTENTION for c in CACHES}
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        for attn in ATTENTION:
            model.set_attn_implementation(attn)
            logits = {}
            for name in CACHES:
                seconds, logits[name] = decode_step(model, caches[name], token)
                if r:
                    times[(attn, name)].append(seconds)
            # both caches must compute the same step, or the comparison means nothing
            gap = (logits["DynamicCache"] - logits["make_cache"]).abs().max().item()
            if gap > 1e-3:
                raise RuntimeError(f"{attn}: the caches' logits differ by {gap:.3g}")
    ms = {key: round(1000 * statistics.median(t), 2) for key, t in times.items()}
    today = ms[("sdpa", "DynamicCache")]  # what transformers users run by default
    rows = []
    for attn in ATTENTION:
        ours = ms[(attn, "make_cache")]
        rows.append(
            {
                "context": context,
                "attention": attn,
                "dynamic_cache_ms": ms[(attn, "DynamicCache")],
                "make_cache_ms": ours,
                "speedup": round(ms[(attn, "DynamicCache")] / ours, 2),
                "speedup_vs_dynamic_cache_sdpa": round(today / ours, 2),
                "rounds": rounds,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="contexts 512 and 1024, 5 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.rounds = [512, 1024], 5
    if args.rounds < 1 or any(c < 1 for c in args.contexts):
        parser.error("--rounds and --contexts must be positive")

    import transformers

    import selfattn.integrations.transformers as sa_hf
    from selfattn.pretrained import smollm2

    sa_hf.register()
    model, tok = smollm2.load("selfattn")
    load_before = os.getloadavg()[0]  # a busy machine inflates (and blurs) every figure
    rows = []
    with torch_threads(1), torch.inference_mode():
        for context in args.contexts:
            for row in measure(model, tok, context, args.rounds):
                rows.append(row)
                print(
                    f"context {row['context']:>6}  {row['attention']:<8}  DynamicCache "
                    f"{row['dynamic_cache_ms']:8.1f} ms  make_cache {row['make_cache_ms']:8.1f} ms"
                    f"  {row['speedup']:.2f}x ({row['speedup_vs_dynamic_cache_sdpa']:.2f}x vs "
                    "DynamicCache+sdpa)",
                    flush=True,
                )
    meta = {
        "what": "SmolLM2-135M-Instruct (fp32) decode step, batch 1, after `context` tokens",
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_info(),
        "torch_threads": 1,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "quick": bool(args.quick),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
