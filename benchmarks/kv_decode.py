"""Decode attention on a quantized KV cache: ``native`` reading int8 / 4-bit codes in place
against the same call on float32 keys and values (issue 18, item 1).

One decode step (B=1, Hq=9 query heads over Hkv=3 key/value heads, D=64, one query row, as
SmolLM2-135M), one thread, through the public ``selfattn.attention(..., backend="native")``. The
cases run interleaved round after round; figures are medians. Targets: int8 >= 2.5x faster than
float32, 4-bit with rotation >= 4x, and the quantized bytes (codes + scales) read at >= 70% of the
machine's copy bandwidth (``bandwidth_vs_copy``: bytes read / time over bytes copied / time of a
one-thread tensor copy of as many bytes as the call reads, measured in the same run: the same
level of the memory hierarchy; on a CPU with a large L3 a cache of 8k tokens lives there). Each
round starts one case later than the round before, so no case always runs right after another
(whose reads leave the caches in a state that favours or hurts the next call).

    python benchmarks/kv_decode.py               # Nk 8192 and 32768
    python benchmarks/kv_decode.py --quick       # Nk 1024 and 2048, a smoke run
    python benchmarks/kv_decode.py --nk 16384 --rounds 50

Writes benchmarks/results/kv_decode.json.
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

import selfattn
from selfattn import QuantizedKV, quantize_kv
from selfattn.bench.machine import cpu_info
from selfattn.testing import torch_threads

RESULTS = Path(__file__).parent / "results" / "kv_decode.json"
HQ, HKV, D = 9, 3, 64
FORMATS = {"float32": None, "int8": (8, False), "int4+rotation": (4, True)}
TARGET = {"int8": 2.5, "int4+rotation": 4.0}


def nbytes(x: Any) -> int:
    """Bytes a call reads for keys or values: codes and scales, or the float tensor."""
    return x.nbytes if isinstance(x, QuantizedKV) else x.numel() * x.element_size()


def copy_bandwidth(nbytes: int, rounds: int) -> float:
    """Bytes per second of a plain tensor copy of ``nbytes`` (bytes copied / time, median)."""
    src = torch.ones(max(1, nbytes // 4))
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return src.numel() * 4 / statistics.median(times)


def measure(nk: int, rounds: int) -> list[dict[str, Any]]:
    """One row per format at ``nk`` keys: median time, speedup over float32, bandwidth."""
    g = torch.Generator().manual_seed(nk)
    q = torch.randn(1, HQ, 1, D, generator=g)
    k = torch.randn(1, HKV, nk, D, generator=g)
    v = torch.randn(1, HKV, nk, D, generator=g)
    inputs = {}
    for name, fmt in FORMATS.items():
        if fmt is None:
            inputs[name] = (k, v)
        else:
            bits, rotate = fmt
            inputs[name] = (
                quantize_kv(k, bits=bits, rotate=rotate),
                quantize_kv(v, bits=bits, rotate=rotate),
            )
    # each call must compute attention on the values its codes stand for
    for name, (kk, vv) in inputs.items():
        got = selfattn.attention(q, kk, vv, backend="native")
        kd = kk.dequantize() if isinstance(kk, QuantizedKV) else kk
        vd = vv.dequantize() if isinstance(vv, QuantizedKV) else vv
        want = selfattn.attention(q, kd, vd, backend="math")
        gap = (got - want).abs().max().item()
        if gap > 1e-4:
            raise RuntimeError(f"{name} at Nk={nk}: native differs from math by {gap:.3g}")
    times: dict[str, list[float]] = {name: [] for name in inputs}
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        names = list(inputs)  # each round starts one case later: no case always follows another
        for name in names[r % len(names) :] + names[: r % len(names)]:
            kk, vv = inputs[name]
            t0 = time.perf_counter()
            selfattn.attention(q, kk, vv, backend="native")
            seconds = time.perf_counter() - t0
            if r:
                times[name].append(seconds)
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, (kk, vv) in inputs.items():
        read = nbytes(kk) + nbytes(vv)
        bps = read / med[name]
        copy_bps = copy_bandwidth(read, rounds)
        row = {
            "nk": nk,
            "format": name,
            "us": round(med[name] * 1e6, 1),
            "speedup_vs_float32": round(med["float32"] / med[name], 2),
            "bytes_read": read,
            "read_gb_s": round(bps / 1e9, 2),
            "copy_gb_s": round(copy_bps / 1e9, 2),
            "bandwidth_vs_copy": round(bps / copy_bps, 2),
            "rounds": rounds,
        }
        if name in TARGET:
            row["target_speedup"] = TARGET[name]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nk", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="Nk 1024 and 2048, 5 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.nk, args.rounds = [1024, 2048], 5
    if args.rounds < 1 or any(n < 1 for n in args.nk):
        parser.error("--rounds and --nk must be positive")
    load_before = os.getloadavg()[0]  # a busy machine inflates (and blurs) every figure
    rows = []
    with torch_threads(1), torch.inference_mode():
        for nk in args.nk:
            for row in measure(nk, args.rounds):
                rows.append(row)
                target = f" (target {row['target_speedup']}x)" if "target_speedup" in row else ""
                print(
                    f"Nk {nk:>6}  {row['format']:<14} {row['us']:9.1f} us  "
                    f"{row['speedup_vs_float32']:5.2f}x{target}  {row['read_gb_s']:6.1f} GB/s "
                    f"read = {row['bandwidth_vs_copy']:.2f} of copy ({row['copy_gb_s']:.1f} GB/s)",
                    flush=True,
                )
    meta = {
        "what": f"native decode attention, B=1 Hq={HQ} Hkv={HKV} D={D}, Nq=1, one thread",
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_info(),
        "native_isa": selfattn.backends.BACKENDS["native"].detail(),
        "torch_threads": 1,
        "torch": torch.__version__,
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
