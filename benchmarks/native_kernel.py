"""The native C++ kernel against torch's SDPA on the rows of the native-engine targets.

Each row is timed in interleaved rounds (SDPA, native, SDPA, native, ...), each round the
median of a few calls, and the table reports the median over rounds, the ratio SDPA / native
and the kernel's GFLOP/s (useful FLOPs: 4 * rows * visible keys * D forward, 2.5x that
backward). Rows run at each thread count asked for. The machine's speed drifts, so only ratios
from the same run mean anything.

    python benchmarks/native_kernel.py [--threads 1 2] [--rows fwd causal ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfattn.backends import native
from selfattn.backends.native.call import record
from selfattn.spec import validate


def _call(q, k, v, **rules):
    """The native call record of ``selfattn.attention``-style keyword arguments."""
    return record(validate(q, k, v, **rules))


@dataclass
class Row:
    name: str
    what: str
    sdpa: Callable[[], object]
    native: Callable[[], object]
    flops: float
    calls: int = 3  # calls per round (median)
    rounds: int = 5


def _time(fn: Callable[[], object], calls: int) -> float:
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def rows(names: list[str]) -> list[Row]:
    ext = native.load()
    out: list[Row] = []
    g = torch.Generator().manual_seed(0)

    def qkv(b, hq, hkv, nq, nk, d, dtype=torch.float32):
        return tuple(
            torch.randn(b, h, n, d, generator=g).to(dtype)
            for h, n in ((hq, nq), (hkv, nk), (hkv, nk))
        )

    if "fwd" in names or "causal" in names:
        q, k, v = qkv(1, 8, 8, 4096, 4096, 64)
        for causal in (False, True):
            name = "causal" if causal else "fwd"
            if name not in names:
                continue
            a = _call(q, k, v, causal=causal)
            out.append(Row(
                name, f"forward fp32 B1 H8 N4096 D64{' causal' if causal else ''}",
                lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c),
                lambda q=q, k=k, v=v, a=a: ext.forward(q, k, v, a),
                4 * 8 * 4096 * 4096 * 64 * (0.5 if causal else 1.0),
            ))  # fmt: skip
    if "train" in names:
        q, k, v = qkv(1, 8, 8, 2048, 2048, 64)
        dout = torch.randn(1, 8, 2048, 64, generator=g)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        a = _call(q, k, v, causal=True)
        empty = torch.empty(0)

        def sdpa_train(leaves=leaves, dout=dout):
            o = F.scaled_dot_product_attention(*leaves, is_causal=True)
            o.backward(dout)

        def native_train(q=q, k=k, v=v, a=a, dout=dout):
            o, lse = ext.forward(q, k, v, a)
            ext.backward(dout, q, k, v, o, lse, empty, a)

        out.append(Row("train", "forward+backward fp32 B1 H8 N2048 D64 causal", sdpa_train,
                       native_train, 3.5 * 4 * 8 * 2048 * 2048 * 64 * 0.5))  # fmt: skip
    if "window" in names:
        n = 16384
        q, k, v = qkv(1, 4, 4, n, n, 64)
        i = torch.arange(n)
        dense = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - 512)
        a = _call(q, k, v, causal=True, window=(512, 0))
        out.append(Row(
            "window", "window (512, 0) fp32 B1 H4 N16384 D64 (SDPA: dense bool mask)",
            lambda q=q, k=k, v=v, m=dense: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
            lambda q=q, k=k, v=v, a=a: ext.forward(q, k, v, a),
            4 * 4 * n * 513 * 64, calls=1, rounds=3,
        ))  # fmt: skip
    for nk in (1024, 8192, 32768):
        name = f"decode{nk // 1024}k"
        if name not in names:
            continue
        q, k, v = qkv(1, 9, 3, 1, nk, 64)
        a = _call(q, k, v, causal=True)
        out.append(Row(
            name, f"decode fp32 Nq1 Hq9 Hkv3 D64 Nk{nk} (SDPA enable_gqa)",
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            lambda q=q, k=k, v=v, a=a: ext.forward(q, k, v, a),
            4 * 9 * nk * 64, calls=21 if nk < 32768 else 7,
        ))  # fmt: skip
    if "tiny" in names:
        q, k, v = qkv(1, 9, 9, 1, 64, 64)
        a = _call(q, k, v)
        out.append(Row(
            "tiny", "tiny call B1 H9 Nq1 Nk64 D64 (kernel call, no dispatcher)",
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            lambda q=q, k=k, v=v, a=a: ext.forward(q, k, v, a), 4 * 9 * 64 * 64, calls=201,
        ))  # fmt: skip
    if "bf16" in names:
        q, k, v = qkv(1, 8, 8, 4096, 4096, 64, torch.bfloat16)
        a = _call(q, k, v)
        out.append(Row(
            "bf16", "forward bf16 B1 H8 N4096 D64",
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            lambda q=q, k=k, v=v, a=a: ext.forward(q, k, v, a), 4 * 8 * 4096 * 4096 * 64,
        ))  # fmt: skip
    return out


ALL = ["fwd", "causal", "train", "window", "decode1k", "decode8k", "decode32k", "tiny", "bf16"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", nargs="+", default=ALL, choices=ALL)
    ap.add_argument("--rounds", type=int, default=None, help="override the rounds of every row")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    why = native.unavailable()
    if why:
        print(f"native unavailable: {why}", file=sys.stderr)
        return 1
    ext = native.load()
    print(f"native ISA {ext.isa()}, torch {torch.__version__}")
    results = []
    table = rows(args.rows)
    print(
        f"{'row':10} {'thr':>3} {'sdpa ms':>10} {'native ms':>10} {'ratio':>6} {'GFLOP/s':>8}  what"
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        for row in table:
            row.sdpa()
            row.native()  # warm up (page faults, lazy init)
            ts_s, ts_n = [], []
            for _ in range(args.rounds or row.rounds):
                ts_s.append(_time(row.sdpa, row.calls))
                ts_n.append(_time(row.native, row.calls))
            s, n = statistics.median(ts_s), statistics.median(ts_n)
            gf = row.flops / n / 1e9
            print(f"{row.name:10} {threads:3d} {s * 1e3:10.3f} {n * 1e3:10.3f} {s / n:6.2f} "
                  f"{gf:8.1f}  {row.what}", flush=True)  # fmt: skip
            results.append({
                "row": row.name, "what": row.what, "threads": threads, "sdpa_ms": s * 1e3,
                "native_ms": n * 1e3, "ratio": s / n, "native_gflops": gf,
                "sdpa_rounds_ms": [t * 1e3 for t in ts_s],
                "native_rounds_ms": [t * 1e3 for t in ts_n],
            })  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"isa": ext.isa(), "torch": torch.__version__, "results": results}, f,
                      indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
