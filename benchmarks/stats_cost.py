"""What ``attention_stats`` costs beside the attention call it describes (issue 18, item 2).

Two cases, each timed through the public functions, interleaved round by round (medians):

- decode: one token (Nq=1) of SmolLM2's shape (Hq 9, Hkv 3, D 64) over ``--decode-nk`` keys
  (default 8192). ``decode`` is ``attention`` alone; ``with_stats`` is
  ``attention_with_stats(col_sum=True)`` (on ``native``: the statistics from the decode kernel's
  own pass); ``two_calls`` is ``attention(return_lse=True)`` then ``attention_stats(lse=...)``.
  Target: ``with_stats`` <= 1.3x ``decode``.
- prefill: a causal forward over ``--prefill-n`` tokens (default 4096; B 1, H 8, D 64).
  ``forward`` is ``attention(return_lse=True)`` alone; ``stats`` is ``attention_stats(lse=...)``
  alone (column sums); ``with_stats`` is ``attention_with_stats``. Target: ``with_stats`` <= 1.6x
  ``forward`` (the statistics pass costs at most 0.6 of a forward).

Each ratio is over the case's own baseline in the same run. Writes benchmarks/results/
stats_cost.json with the CPU (model, ISA, threads) and the command line.

    python benchmarks/stats_cost.py                       # the targets' sizes, 1 thread
    python benchmarks/stats_cost.py --quick               # small sizes, a smoke run
    python benchmarks/stats_cost.py --threads 2 --backend tiled
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import selfattn
from selfattn.bench.machine import cpu_info
from selfattn.testing import torch_threads

RESULTS = Path(__file__).parent / "results" / "stats_cost.json"
TARGETS = {"decode": 1.3, "prefill": 1.6}


def timed(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, called in turn once per round (after one warm-up)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def decode_case(nk: int, backend: str, rounds: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 64, generator=g)
    k, v = torch.randn(1, 3, nk, 64, generator=g), torch.randn(1, 3, nk, 64, generator=g)

    def two_calls():
        _, lse = selfattn.attention(q, k, v, return_lse=True, backend=backend)
        return selfattn.attention_stats(q, k, lse=lse, backend=backend)

    times = timed(
        {
            "decode": lambda: selfattn.attention(q, k, v, backend=backend),
            "with_stats": lambda: selfattn.attention_with_stats(q, k, v, backend=backend),
            "two_calls": two_calls,
        },
        rounds,
    )
    return {
        "case": "decode",
        "shape": {"B": 1, "Hq": 9, "Hkv": 3, "Nq": 1, "Nk": nk, "D": 64},
        "ms": {name: round(t * 1e3, 4) for name, t in times.items()},
        "with_stats_over_decode": round(times["with_stats"] / times["decode"], 3),
        "two_calls_over_decode": round(times["two_calls"] / times["decode"], 3),
        "target": f"with_stats <= {TARGETS['decode']}x decode",
    }


def prefill_case(n: int, backend: str, rounds: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 8, n, 64, generator=g) for _ in range(3))
    _, lse = selfattn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    times = timed(
        {
            "forward": lambda: selfattn.attention(
                q, k, v, causal=True, return_lse=True, backend=backend
            ),
            "stats": lambda: selfattn.attention_stats(q, k, causal=True, lse=lse, backend=backend),
            "with_stats": lambda: selfattn.attention_with_stats(
                q, k, v, causal=True, backend=backend
            ),
        },
        rounds,
    )
    return {
        "case": "prefill",
        "shape": {"B": 1, "H": 8, "N": n, "D": 64, "causal": True},
        "ms": {name: round(t * 1e3, 3) for name, t in times.items()},
        "stats_over_forward": round(times["stats"] / times["forward"], 3),
        "with_stats_over_forward": round(times["with_stats"] / times["forward"], 3),
        "target": f"with_stats <= {TARGETS['prefill']}x forward",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-nk", type=int, default=8192)
    parser.add_argument("--prefill-n", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="native", help="native or tiled (default native)")
    parser.add_argument("--quick", action="store_true", help="Nk 1024, N 512, 3 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.decode_nk, args.prefill_n, args.rounds = 1024, 512, 3
    with torch_threads(args.threads):
        rows = [
            decode_case(args.decode_nk, args.backend, args.rounds),
            prefill_case(args.prefill_n, args.backend, args.rounds),
        ]
    result = {
        "what": "attention_stats cost beside the attention call (issue 18 item 2)",
        "cpu": cpu_info(args.threads),
        "torch": torch.__version__,
        "backend": args.backend,
        "command": "python benchmarks/stats_cost.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(json.dumps({k: row[k] for k in row if k != "shape"}))
    return result


if __name__ == "__main__":
    main()
