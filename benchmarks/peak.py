"""This machine's FMA peak, and the native engine's GFLOP/s as a fraction of it.

The peak is a plain loop of independent fused multiply-adds (12 ymm chains for AVX2, 24 zmm
chains for AVX-512: more chains than FMA latency x ports, so nothing but the FMA ports limits
it), compiled here with the same C++ compiler as the engine and called through ctypes (which
releases the GIL, so N Python threads run it on N cores at once); each thread's rate is over its
own CPU time, so a busy machine does not lower it. Then, for the forward rows of
the issue (B1 H8, fp32, N=4096 D=64/128 and causal), native's and SDPA's GFLOP/s, interleaved in
the same run, medians, each as a fraction of ``threads x`` the per-core peak of the ISA the
kernel runs (ymm for avx2, zmm for avx512); and MKL's sgemm 2048^3 for scale.

Phases (``--phases``), native only, by difference through the public API: Q K^T costs in
proportion to D, P V to Dv, the softmax to neither. With t(D, Dv) the time of a call: QK =
t(2D, 8) - t(D, 8), PV = (t(D, D) - t(D, 8)) * D / (D - 8), softmax (and the rest) = t(D, D) -
QK - PV. Each product's GFLOP/s is its FLOPs (2 N^2 D per head) over its time.

For an AVX2 run on an AVX-512 machine, restrict all three engines alike:

    SELFATTN_NATIVE_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/peak.py --threads 1 2 --phases

Writes benchmarks/results/peak-<native isa>.json (the machine, the ISAs and threads inside).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import selfattn
from selfattn.bench import attention_flops
from selfattn.bench.machine import cpu_info, cpu_label
from selfattn.testing import torch_threads

RESULTS = Path(__file__).parent / "results"

# 12 ymm accumulators (AVX2 has 16 registers) and 24 zmm (AVX-512 has 32): at least latency (4)
# x FMA ports (2) chains, so each FMA issues as soon as a port is free
SOURCE = r"""
#include <immintrin.h>
#include <cstdint>
extern "C" int has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
extern "C" int has_avx512() { return __builtin_cpu_supports("avx512f"); }
extern "C" __attribute__((target("avx2,fma"))) float fma_ymm(int64_t iters) {
  __m256 a[12];
  const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps(float(i));
  for (int64_t t = 0; t < iters; t++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], m, c);
  }
  __m256 s = a[0];
  for (int i = 1; i < 12; i++) s = _mm256_add_ps(s, a[i]);
  float o[8];
  _mm256_storeu_ps(o, s);
  return o[0];
}
extern "C" __attribute__((target("avx512f"))) float fma_zmm(int64_t iters) {
  __m512 a[24];
  const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 24; i++) a[i] = _mm512_set1_ps(float(i));
  for (int64_t t = 0; t < iters; t++) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; i++) a[i] = _mm512_fmadd_ps(a[i], m, c);
  }
  __m512 s = a[0];
  for (int i = 1; i < 24; i++) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}
"""
# flops of one iteration: chains x lanes x 2
KERNELS = {"avx2": ("fma_ymm", 12 * 8 * 2), "avx512": ("fma_zmm", 24 * 16 * 2)}


def fma_library() -> ctypes.CDLL:
    """The FMA loops, compiled once per source and compiler into selfattn's cache folder."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the FMA loops are x86 code; this machine is {platform.machine()}")
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    ident = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256((SOURCE + ident).encode()).hexdigest()[:16]
    root = Path(os.environ.get("SELFATTN_CACHE") or Path.home() / ".cache" / "selfattn")
    so = root / f"peak-{key}" / "fma.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        src = so.parent / "fma.cpp"
        src.write_text(SOURCE)
        tmp = so.with_suffix(f".{os.getpid()}.so")
        subprocess.run([cxx, "-O2", "-shared", "-fPIC", str(src), "-o", str(tmp)], check=True)
        tmp.replace(so)
    lib = ctypes.CDLL(str(so))
    for name, _ in KERNELS.values():
        getattr(lib, name).argtypes = [ctypes.c_int64]
        getattr(lib, name).restype = ctypes.c_float
    return lib


def fma_peak(isa: str, threads: int = 1, seconds: float = 0.05, repeats: int = 7) -> float | None:
    """GFLOP/s of ``threads`` cores running the FMA loop of ``isa`` ("avx2" or "avx512") at
    once, the best of ``repeats``; None where this CPU lacks the ISA. Each thread's rate is
    taken over its own CPU time (``time.thread_time``), so other processes sharing the cores
    lower how often the loop runs but not the rate it reaches while it runs."""
    lib = fma_library()
    if not (lib.has_avx512() if isa == "avx512" else lib.has_avx2()):
        return None
    name, flops = KERNELS[isa]
    fn = getattr(lib, name)
    t0 = time.thread_time()
    fn(100_000)
    iters = max(1000, int(100_000 * seconds / max(time.thread_time() - t0, 1e-6)))
    best = 0.0
    for _ in range(repeats):
        rates = [0.0] * threads

        def work(i: int, rates: list[float] = rates) -> None:
            c0 = time.thread_time()
            fn(iters)
            rates[i] = iters * flops / max(time.thread_time() - c0, 1e-9) / 1e9

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, sum(rates))
    return best


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """torch.mm n^3 (MKL, or whatever torch's CPU BLAS is) GFLOP/s on one thread, the best of
    ``repeats`` over the thread's CPU time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch_threads(1):
        a @ b
        best = min(_timed(lambda: a @ b, time.thread_time) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn, clock) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def _interleaved(methods: dict, rounds: int, threads: int) -> dict[str, float]:
    """Median seconds of each method, called in turn each round. One thread runs the kernels in
    the calling thread, so its CPU time is used (other processes on the core do not count);
    more threads: wall time."""
    clock = time.thread_time if threads == 1 else time.perf_counter
    for fn in methods.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for k, fn in methods.items():
            samples[k].append(_timed(fn, clock))
    return {k: statistics.median(s) for k, s in samples.items()}


def _methods(q, k, v, causal: bool, phases: bool) -> dict:
    """SDPA and native on (q, k, v); with ``phases`` also native at Dv=8 and at (2D, Dv=8)."""

    def nat(q, k, v):
        return lambda: selfattn.attention(q, k, v, causal=causal, backend="native")

    methods = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "native": nat(q, k, v),
    }
    if phases:
        v8 = v[..., :8].contiguous()
        methods["dv8"] = nat(q, k, v8)
        methods["d2_dv8"] = nat(torch.cat([q, q], -1), torch.cat([k, k], -1), v8)
    return methods


def kernel_rows(threads: int, rounds: int, phases: bool, peak_core: float | None) -> list[dict]:
    """Forward B1 H8 fp32 rows: native and SDPA GFLOP/s and their fractions of the peak."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, d, causal in ((4096, 64, False), (4096, 128, False), (4096, 64, True), (2048, 64, True)):
        q, k, v = (torch.randn(1, 8, n, d, generator=g) for _ in range(3))
        methods = _methods(q, k, v, causal, phases)
        flops = attention_flops(1, 8, n, n, d, causal=causal)
        with torch_threads(threads), torch.no_grad():
            t = _interleaved(methods, rounds, threads)
        row = {
            "case": f"forward B1 H8 N={n} D={d}" + (" causal" if causal else ""),
            "threads": threads,
            "times": t,
            "flops": flops,
            "gflops": {e: flops / t[e] / 1e9 for e in ("sdpa", "native")},
            "sdpa_over_native": t["sdpa"] / t["native"],
        }
        if peak_core:
            row["fraction_of_peak"] = {
                e: row["gflops"][e] / (threads * peak_core) for e in ("sdpa", "native")
            }
        if phases:
            half = flops / 2  # each product
            qk = max(t["d2_dv8"] - t["dv8"], 1e-12)  # Q K^T over D more columns
            pv = max((t["native"] - t["dv8"]) * d / (d - 8), 1e-12)
            soft = max(t["native"] - qk - pv, 0.0)
            row["phases"] = {
                "qk": {"s": qk, "gflops": half / qk / 1e9},
                "softmax": {"s": soft, "share": soft / t["native"]},
                "pv": {"s": pv, "gflops": half / pv / 1e9},
            }
            if peak_core:
                for ph in ("qk", "pv"):
                    row["phases"][ph]["fraction_of_peak"] = row["phases"][ph]["gflops"] / (
                        threads * peak_core
                    )
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| case | threads | native GFLOP/s | SDPA GFLOP/s | native / peak | SDPA / peak "
        "| SDPA / native | phases (QK, PV GFLOP/s; softmax share) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        fr = r.get("fraction_of_peak", {})
        ph = r.get("phases")
        phs = (
            f"QK {ph['qk']['gflops']:.0f}, PV {ph['pv']['gflops']:.0f}; "
            f"softmax {ph['softmax']['share']:.0%}"
            if ph
            else ""
        )
        out.append(
            f"| {r['case']} | {r['threads']} | {r['gflops']['native']:.0f} | "
            f"{r['gflops']['sdpa']:.0f} | {fr.get('native', float('nan')):.0%} | "
            f"{fr.get('sdpa', float('nan')):.0%} | {r['sdpa_over_native']:.2f}x | {phs} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per row")
    ap.add_argument("--phases", action="store_true", help="native's QK / softmax / PV split")
    ap.add_argument("--peak-only", action="store_true", help="the FMA peak and sgemm only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    cpu = cpu_info()
    meta = {
        "cpu": cpu,
        "threads": args.threads,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    isa = cpu["isa"]
    peak = {kind: {str(t): fma_peak(kind, t) for t in args.threads} for kind in ("avx2", "avx512")}
    per_core = peak.get(isa, {}).get("1") if isa in peak else None
    if per_core is None and isa in peak:
        per_core = peak[isa][str(args.threads[0])] / args.threads[0]
    result = {
        "meta": meta,
        "fma_peak_gflops": peak,
        "peak_per_core_of_native_isa": per_core,
        "sgemm_2048_1_thread_gflops": sgemm_gflops(),
    }
    print(cpu_label(cpu))
    for kind, by_t in peak.items():
        for t, gf in by_t.items():
            print(f"FMA peak {kind}, {t} thread(s): " + ("n/a" if gf is None else f"{gf:.0f}"))
    print(f"sgemm 2048^3, 1 thread: {result['sgemm_2048_1_thread_gflops']:.0f} GFLOP/s")
    if not args.peak_only:
        if "native" not in selfattn.available_backends():
            print("native is unavailable", file=sys.stderr)
            return 1
        rows = []
        for t in args.threads:
            rows += kernel_rows(t, args.rounds, args.phases, per_core)
        result["rows"] = rows
        print(table(rows))
    out = args.out or RESULTS / f"peak-{isa}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
