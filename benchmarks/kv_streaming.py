"""Streaming perplexity of SmolLM2 over 4k tokens of pydoc text with a cache bounded to a token
budget, for every eviction policy of ``make_cache(budget=, policy=)`` against the full cache
(issue 18: at budget 1024 the best policy within +3% of the full cache; ``sink`` better than
``window``).

The text (CPython's ``pydoc_data/topics.py``) is fed in chunks of ``--chunk`` tokens (default 64:
token by token is 4096 model calls per run, too slow for ten runs on two shared cores); the cache
evicts down to its budget right after each chunk's attention, so each chunk attends over what the
policy kept of the past (at most the budget) and over itself causally: a chunk's first token sees
``budget`` earlier tokens, its last ``budget + chunk - 1`` (every policy alike). The scores a
policy ranks by come from the chunk's queries: ``h2o`` adds every row's column sums, ``tova``
takes the chunk's last row, ``snapkv`` rescores with the chunk's last 32 rows. ``--chunk 1`` is the
token-by-token run (StreamingLLM's evaluation: the cache at the budget at every step). ``ppl`` is over all tokens 1..N-1;
``ppl_evicted`` over the tokens predicted once the past no longer fits the budget (from position
``budget`` on), the part where a policy matters;
``snapkv:layer`` (and ``h2o:layer``, ``tova:kv``) runs the policy with make_cache's ``heads``
the other way, ``h2o:norm`` with ``normalize=True``, ``snapkv:layer:decay=0.5`` (and the other
``name=value`` runs of kv_common's ``RUNS``) with that option too; ``--keep`` runs the full cache and the
policies named and keeps the results file's other rows; ``vs_full`` compares each with the full cache fed
the same way. ``max_held`` is the most tokens a layer held after a chunk (never above the
budget). Writes benchmarks/results/kv_streaming.json.

    python benchmarks/kv_streaming.py                                  # budgets 512 1024, chunk 64
    python benchmarks/kv_streaming.py --threads 1 --keep --policies snapkv:layer:decay=0.5 \\
        snapkv:layer:recent=256 tova:decay=0.5                       # add rows
    python benchmarks/kv_streaming.py --chunk 1 --budgets 1024 --policies sink h2o \\
        --out benchmarks/results/kv_streaming_tokens.json             # token by token
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# kv_common.py sits beside this file (appended: the folder's names must shadow nothing)
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
from kv_common import (
    RUNS,
    add_runs_argument,
    budget_cache,
    held_tokens,
    load_model,
    perplexity,
    run_label,
    run_meta,
    score_chunks,
    text_ids,
    write_results,
)

from selfattn.testing import torch_threads

RESULTS = Path(__file__).parent / "results" / "kv_streaming.json"


def run_one(
    model: Any, ids: torch.Tensor, chunk: int, budget: int | None, policy: str | None
) -> dict[str, Any]:
    """One streaming run: perplexities, the most tokens held, seconds."""
    cache = budget_cache(model, budget, policy)
    most = [0]

    def watch(end: int, cache: Any) -> None:
        most[0] = max(most[0], held_tokens(cache))

    t0 = time.perf_counter()
    nll = score_chunks(model, ids, cache, chunk, watch)
    seconds = time.perf_counter() - t0
    if budget is not None and most[0] > budget:
        raise RuntimeError(f"{policy}: a layer held {most[0]} tokens, over the budget {budget}")
    start = budget if budget is not None else 0
    return {
        "budget": budget,
        "policy": policy or "full",
        "ppl": round(perplexity(nll), 4),
        "nll": nll,  # dropped before writing; the evicted part is scored against the full cache
        "max_held": most[0],
        "seconds": round(seconds, 1),
        "from_token": start,
    }


def measure(
    model: Any,
    ids: torch.Tensor,
    chunk: int,
    budgets: list[int],
    policies: list[str],
    save: Callable[[list[dict[str, Any]], dict[str, str]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The full cache, then every (budget, policy); ``skipped`` names the policies that raised
    ``NotImplementedError`` (not built yet); ``save(rows, skipped)`` runs after each row (a long
    run keeps what it finished)."""
    full = run_one(model, ids, chunk, None, None)
    print(f"full cache          ppl {full['ppl']:.4f}  ({full['seconds']} s)", flush=True)
    rows, skipped = [], {}
    for budget in budgets:
        for policy in policies:
            try:
                row = run_one(model, ids, chunk, budget, policy)
            except NotImplementedError as exc:
                skipped[f"{policy}@{budget}"] = str(exc)
                print(f"{policy:>6} @ {budget:<5}  skipped: {exc}", flush=True)
                continue
            tail, full_tail = row["nll"][budget:], full["nll"][budget:]
            row["ppl_evicted"] = round(perplexity(tail), 4)
            row["full_ppl_evicted"] = round(perplexity(full_tail), 4)
            row["vs_full_pct"] = round(100 * (row["ppl"] / full["ppl"] - 1), 3)
            row["evicted_vs_full_pct"] = round(
                100 * (row["ppl_evicted"] / row["full_ppl_evicted"] - 1), 3
            )
            rows.append(row)
            print(
                f"{policy:>6} @ {budget:<5}  ppl {row['ppl']:.4f} ({row['vs_full_pct']:+.2f}%)  "
                f"evicted part {row['ppl_evicted']:.4f} ({row['evicted_vs_full_pct']:+.2f}%)  "
                f"held <= {row['max_held']}  ({row['seconds']} s)",
                flush=True,
            )
            if save is not None:
                save(written(full, rows), skipped)
    return written(full, rows), skipped


def written(full: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as the results file holds them (without the per-token losses)."""
    return [
        {k: v for k, v in r.items() if k != "nll"} for r in ({**full, "vs_full_pct": 0.0}, *rows)
    ]


def table(result: dict[str, Any]) -> str:
    """The README's table: one row per policy, perplexity at each budget against the full cache
    (all tokens; and the tokens past the budget, where eviction happened)."""
    meta, rows = result["meta"], result["rows"]
    full = next(r for r in rows if r["policy"] == "full")
    budgets = meta["budgets"]
    policies = [p for p in RUNS if any(r["policy"] == p for r in rows)]
    by = {(r["policy"], r["budget"]): r for r in rows}
    how = "token by token" if meta["chunk"] == 1 else f"in chunks of {meta['chunk']} tokens"
    lines = [
        f"SmolLM2-135M-Instruct, {meta['tokens']} tokens of pydoc text fed {how} (the cache "
        f"evicts after each), attention `{meta['attention']}`; full cache: perplexity "
        f"{full['ppl']:.3f}. Each cell: perplexity over all tokens (vs the full cache) / over the "
        "tokens past the budget (vs the full cache on the same tokens)."
        + (
            f" Rows kept from an earlier run ({meta['kept']['date']}): "
            f"{', '.join(meta['kept']['rows'])}."
            if meta.get("kept")
            else ""
        ),
        "",
        "| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |",
        "| --- |" + " ---: |" * len(budgets),
    ]
    for p in policies:
        cells = []
        for b in budgets:
            r = by.get((p, b))
            cells.append(
                "not run"
                if r is None
                else f"{r['ppl']:.3f} ({r['vs_full_pct']:+.1f}%) / {r['ppl_evicted']:.3f} "
                f"({r['evicted_vs_full_pct']:+.1f}%)"
            )
        lines.append(f"| {run_label(p)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merged(keep: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` and the (policy, budget) rows of ``keep`` that ``rows`` lacks, in table order
    (the full cache first, then budgets, then :data:`RUNS`)."""
    ran = {(r["policy"], r["budget"]) for r in rows}
    out = rows + [r for r in keep if (r["policy"], r["budget"]) not in ran]
    order = ("full", *RUNS)
    return sorted(out, key=lambda r: (r["budget"] or 0, order.index(r["policy"])))


def kept_rows(
    path: Path, meta: dict[str, Any], runs: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of the results file ``path`` that ``--keep`` keeps (those of no policy in
    ``runs``; the file checked to be of the same cases) and what the new file records of them:
    the old run's date and the rows kept.

    Raises:
        ValueError: no such file, or one whose cases differ (named).
    """
    if not path.exists():
        raise ValueError(f"--keep: {path} does not exist")
    old = json.loads(path.read_text())
    differ = [k for k in ("tokens", "chunk", "budgets", "attention") if old["meta"][k] != meta[k]]
    if differ:
        raise ValueError(f"--keep: {path} holds other cases ({', '.join(differ)} differ)")
    rows = [r for r in old["rows"] if r["policy"] not in ("full", *runs)]
    names = [f"{run_label(r['policy'])} @ {r['budget']}" for r in rows]
    return rows, {"date": old["meta"]["date"], "rows": names, "before": old["meta"].get("kept")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024])
    add_runs_argument(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", default="selfattn", help="attn_implementation")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="run the full cache and the policies named; keep --out's other rows (same cases)",
    )
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.chunk < 1 or args.threads < 1 or min(args.budgets) < 1:
        parser.error("--tokens must be >= 2; --chunk, --threads and --budgets >= 1")
    model, tok = load_model("smollm2", args.attention)
    ids = text_ids(tok, args.tokens)
    meta = run_meta(
        "SmolLM2-135M-Instruct (fp32) streaming perplexity over pydoc_data/topics.py with "
        "make_cache(budget=, policy=)",
        args.threads,
        Path(__file__).name,
        argv,
        tokens=args.tokens,
        chunk=args.chunk,
        budgets=args.budgets,
        attention=args.attention,
    )

    keep: list[dict[str, Any]] = []
    if args.keep:
        keep, meta["kept"] = kept_rows(args.out, meta, args.policies)

    def save(rows: list[dict[str, Any]], skipped: dict[str, str]) -> None:
        write_results(args.out, merged(keep, rows), {**meta, "skipped": skipped})

    with torch_threads(args.threads), torch.inference_mode():
        rows, skipped = measure(model, ids, args.chunk, args.budgets, args.policies, save)
    save(rows, skipped)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
