"""Measure the small-call size below which ``auto`` should prefer SDPA to native.

``auto`` chooses between backends called through ``selfattn.attention`` (validation, selection,
the backend's own wrapper), so that is what is timed here: ``backend="native"`` against
``backend="sdpa"`` on the small calls SDPA can run (decode steps over short caches, GQA and not;
small square prefills, causal and not), at 1 and 2 threads, interleaved round by round, medians.
Torch's own ``F.scaled_dot_product_attention`` and ``auto`` are timed alongside, for the issue's
target (a decode step over 40-64 keys through ``auto`` within 1.2x of SDPA's time: ``auto /
torch`` per row, and the worst decode row over 40-64 keys in ``target``). The ``hf`` rows time
one decode step's attention as a Hugging Face model calls it (a transposed query, GQA as
SmolLM2-135M has it: 9 query heads, 3 kv heads, D=64): selfattn's ``attention_forward`` against
transformers' own ``sdpa_attention_forward``, the per-layer cost behind the SmolLM2 decode row
of ``benchmarks/models.py``.

The thresholds (``threshold_work``, per kind of call of ``choice.call_kind`` and per thread
count of ``choice.thread_bucket`` ("1"; "2+" measured at 2), in multiply-adds B*Hq*Nq*Nk*(D+Dv)
of ``choice.call_work``): one more than the work of the largest shape of that kind on which
native through selfattn was more than 3% slower than SDPA through selfattn at that thread count
(0 when there is none), so ``auto`` sends every call of that kind up to that size to SDPA when
it runs at that many threads.
``SMALL_CALL_WORK`` in ``native/choice.py`` must equal them (a test checks), so after a new
measurement, copy them there.

One thread is timed on the thread's CPU time (another process on the core does not count), two
threads on wall time. Writes benchmarks/results/auto_rules.json.

    python benchmarks/auto_rules.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import selfattn
from selfattn.backends.native.choice import SMALL_CALL_WORK, call_kind, thread_bucket
from selfattn.bench.machine import cpu_info, cpu_label
from selfattn.testing import torch_threads

RESULTS = Path(__file__).parent / "results" / "auto_rules.json"
SLOWER = 1.03  # native counts as slower beyond 3% (the noise of a quiet machine)


def shapes() -> list[dict]:
    """The small calls SDPA accepts: (B, Hq, Hkv, Nq, Nk, D, causal)."""
    out = []
    for nk in (16, 40, 64, 128, 256, 512):
        out.append({"B": 1, "Hq": 9, "Hkv": 3, "Nq": 1, "Nk": nk, "D": 64, "causal": True})
    for nk in (16, 40, 64, 256):
        out.append({"B": 1, "Hq": 8, "Hkv": 8, "Nq": 1, "Nk": nk, "D": 64, "causal": True})
    for n in (16, 32, 64, 128):
        for causal in (False, True):
            out.append({"B": 1, "Hq": 8, "Hkv": 8, "Nq": n, "Nk": n, "D": 64, "causal": causal})
    return out


def work(s: dict) -> int:
    return s["B"] * s["Hq"] * s["Nq"] * s["Nk"] * 2 * s["D"]


def measure(s: dict, threads: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each way to run shape ``s``."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s["B"], s["Hq"], s["Nq"], s["D"], generator=g)
    k, v = (torch.randn(s["B"], s["Hkv"], s["Nk"], s["D"], generator=g) for _ in range(2))
    c = s["causal"]
    gqa = {"enable_gqa": True} if s["Hq"] != s["Hkv"] else {}
    # torch's is_causal aligns top-left; a decode step (Nq=1) sees every key: no mask there
    torch_causal = c and s["Nq"] == s["Nk"]
    methods = {
        "torch_sdpa": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=torch_causal, **gqa
        ),
        "native": lambda: selfattn.attention(q, k, v, causal=c, backend="native"),
        "sdpa": lambda: selfattn.attention(q, k, v, causal=c, backend="sdpa"),
        "auto": lambda: selfattn.attention(q, k, v, causal=c),
    }
    return timed(methods, threads, rounds)


def measure_hf(nk: int, threads: int, rounds: int) -> dict[str, float] | None:
    """Median seconds of one decode step's attention call through each Hugging Face attention
    function (SmolLM2's heads), or None without transformers."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return None
    from selfattn.integrations.transformers import attention_forward

    class Layer(torch.nn.Module):  # what the functions read of the calling attention module
        is_causal = True
        num_key_value_groups = 3

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 9, 64, generator=g).transpose(1, 2)  # (B, Hq, 1, D) as a view
    k, v = (torch.randn(1, 3, nk, 64, generator=g) for _ in range(2))
    layer = Layer()
    kwargs = {"dropout": 0.0, "scaling": 0.125, "position_ids": None}
    methods = {
        "hf_sdpa": lambda: sdpa_attention_forward(layer, q, k, v, None, **kwargs),
        "hf_selfattn": lambda: attention_forward(layer, q, k, v, None, **kwargs),
    }
    return timed(methods, threads, rounds)


def timed(methods: dict, threads: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each method, interleaved round by round."""
    clock = time.thread_time if threads == 1 else time.perf_counter
    with torch_threads(threads), torch.no_grad():
        for fn in methods.values():
            fn()
        first = next(iter(methods.values()))
        t0 = clock()
        first()
        inner = max(20, min(2000, int(2e-3 / max(clock() - t0, 1e-7))))
        samples: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(rounds):
            for m, fn in methods.items():
                t0 = clock()
                for _ in range(inner):
                    fn()
                samples[m].append((clock() - t0) / inner)
    return {m: statistics.median(x) for m, x in samples.items()}


def threshold(rows: list[dict]) -> int:
    """One more than the work of the largest shape native was slower on (0: none), so every
    call up to that size goes to SDPA. ``rows``: one kind of call at one thread count."""
    works = [r["work"] for r in rows if r["times"]["native"] > SLOWER * r["times"]["sdpa"]]
    return max(works) + 1 if works else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    cpu = cpu_info()
    print(cpu_label(cpu), flush=True)
    rows = []
    print(
        "| shape | threads | work | torch SDPA | sdpa | native | auto | native / sdpa "
        "| auto / torch |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in shapes():
        for t in args.threads:
            times = measure(s, t, args.rounds)
            kind = call_kind(s["Nq"], s["Hq"], s["Hkv"])
            row = {"shape": s, "kind": kind, "threads": t, "work": work(s), "times": times}
            row["auto_over_torch"] = times["auto"] / times["torch_sdpa"]
            rows.append(row)
            name = f"B{s['B']} Hq{s['Hq']} Hkv{s['Hkv']} Nq{s['Nq']} Nk{s['Nk']} D{s['D']}" + (
                " causal" if s["causal"] else ""
            )
            us = {m: f"{x * 1e6:.1f} us" for m, x in times.items()}
            print(
                f"| {name} | {t} | {row['work']} | {us['torch_sdpa']} | {us['sdpa']} | "
                f"{us['native']} | {us['auto']} | {times['native'] / times['sdpa']:.2f} | "
                f"{row['auto_over_torch']:.2f} |",
                flush=True,
            )
    hf_rows = []
    for nk in (40, 64):
        for t in args.threads:
            times = measure_hf(nk, t, args.rounds)
            if times is None:
                break
            ratio = times["hf_selfattn"] / times["hf_sdpa"]
            hf_rows.append({"nk": nk, "threads": t, "times": times, "selfattn_over_sdpa": ratio})
            print(
                f"hf decode step Hq9 Hkv3 Nk{nk} D64, {t} thread(s): transformers sdpa "
                f"{times['hf_sdpa'] * 1e6:.1f} us, selfattn {times['hf_selfattn'] * 1e6:.1f} us "
                f"({ratio:.2f}x its time)",
                flush=True,
            )
    small = [r for r in rows if r["kind"] == "decode" and 40 <= r["shape"]["Nk"] <= 64]
    target = {
        "case": "a decode call over 40-64 keys through auto, time over torch SDPA's",
        "worst": max(r["auto_over_torch"] for r in small),
        "limit": 1.2,
    }
    print(f"target: {target['case']}: worst {target['worst']:.2f} (<= {target['limit']})")
    found = {
        kind: {
            bucket: threshold(
                [r for r in rows if r["kind"] == kind and thread_bucket(r["threads"]) == bucket]
            )
            for bucket in sorted({thread_bucket(t) for t in args.threads})
        }
        for kind in ("decode", "prefill")
    }
    print(f"threshold_work = {found} (native/choice.py SMALL_CALL_WORK = {SMALL_CALL_WORK})")
    result = {
        "meta": {"cpu": cpu, "date": time.strftime("%Y-%m-%d %H:%M"), "slower": SLOWER},
        "threshold_work": found,
        "target": target,
        "rows": rows,
        "hf_rows": hf_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
