"""GPU benchmark of the ``triton`` backend against torch SDPA (flash, efficient, cuDNN) and
compiled FlexAttention, in one run under a time budget (run by ``benchmarks/gpu_check.sh``).

Sweep (issue 3): bf16 and fp16, D 64 and 128, N 1k to 16k, causal and not, forward and
forward+backward; a causal window (4096, 0) at 32k; packed documents at 16k; decode (Nq=1)
over 32k and 128k keys with GQA 32 -> 8. Each point reports the median time (``do_bench``,
CUDA events, warm-up first), TFLOP/s and the ratio to the best competitor, and checks the
Triton output against that competitor (relative error). FLOPs: ``4 B H Nq Nk D`` forward,
halved for causal, x3.5 for forward+backward; windows and packed documents count the
visible (query, key) pairs exactly. Decode reports HBM bandwidth (K and V read once).

Results go to ``<out>/gpu_h200.json`` (rewritten after every section, so a timeout keeps
what was measured) and ``<out>/gpu_h200.md``; the table is printed last. ``--smoke`` runs
tiny shapes on the CPU under ``TRITON_INTERPRET=1`` to check the wiring without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import selfattn  # noqa: E402
from selfattn.backends.triton import host, tma  # noqa: E402

SDPA = ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn"]


# --------------------------------------------------------------------------------------------
# timing and budget
# --------------------------------------------------------------------------------------------


class Budget:
    """Seconds left for the whole run; sections stop starting new points when it runs out."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def bench_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None) -> float:
    """Median milliseconds per call: CUDA events through ``triton.testing.do_bench`` on a GPU,
    a wall clock (after one warm-up call) on the CPU smoke run."""
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"
            )
        )
    fn()
    samples = []
    for _ in range(3):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return sorted(samples)[1]


def ceilings(device: torch.device) -> dict:
    """The two measured ceilings of METHOD.md: copy bandwidth and bf16 matmul rate."""
    if device.type != "cuda":
        return {}
    n = 1 << 30  # 2 GiB of bf16 per buffer
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    copy_tbs = 2 * n * 2 / (ms * 1e-3) / 1e12  # bytes read plus bytes written
    src = dst = None  # free before the matmul
    m = 8192
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = bench_ms(lambda: x @ y, device)
    mm_tflops = 2 * m**3 / (ms * 1e-3) / 1e12
    return {"copy_TBps": round(copy_tbs, 3), "bf16_matmul_TFLOPs": round(mm_tflops, 1)}


# --------------------------------------------------------------------------------------------
# the methods
# --------------------------------------------------------------------------------------------


def sdpa_fn(name: str, q, k, v, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)

    return run


_FLEX_CACHE: dict = {}


def flex_fn(q, k, v, mask_mod, smoke: bool):
    """Compiled FlexAttention with a block mask built from ``mask_mod`` (None: no mask)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX_CACHE:
        _FLEX_CACHE["fn"] = flex_attention if smoke else torch.compile(flex_attention)
    fn = _FLEX_CACHE["fn"]
    block = None
    if mask_mod is not None:
        block = create_block_mask(
            mask_mod, None, None, q.shape[2], k.shape[2], device=str(q.device)
        )
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return lambda: fn(q, k, v, block_mask=block, **gqa)


def triton_fn(q, k, v, **kw):
    return lambda: selfattn.attention(q, k, v, backend="triton", **kw)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure(fn, mode: str, leaves, device) -> tuple[float, float, torch.Tensor]:
    """(first-call seconds incl. compile/autotune, median ms, output) for fwd or fwd_bwd."""
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if mode == "fwd":
        first = time.perf_counter() - t0
        return first, bench_ms(fn, device), out
    dout = torch.randn_like(out)

    def step():
        fn().backward(dout)

    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    return first, bench_ms(step, device, grad_to_none=leaves), out


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


def make(b, hq, hkv, nq, nk, d, dtype, device, grad: bool, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hq, nq, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(b, hkv, nk, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(b, hkv, nk, d, device=device, dtype=dtype, generator=g)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def run_case(case: dict, methods: list[str], device, budget: Budget, results: list, smoke: bool):
    """Measure one case for each method; the first method is ``triton``."""
    b, hq, hkv, nq, nk, d = case["shape"]
    dtype = getattr(torch, case["dtype"])
    mode = case["mode"]
    outs = {}
    for method in methods:
        row = {**{k: v for k, v in case.items() if k not in ("kw", "mask_mod")}, "method": method}
        if budget.left() < case.get("need_s", 5.0):
            row["error"] = "skipped: time budget"
            results.append(row)
            continue
        try:
            q, k, v = make(b, hq, hkv, nq, nk, d, dtype, device, grad=mode == "fwd_bwd")
            if method == "triton":
                fn = triton_fn(q, k, v, **case.get("kw", {}))
            elif method.startswith("sdpa"):
                fn = sdpa_fn(method, q, k, v, case.get("kw", {}).get("causal", False))
            elif method == "flex":
                fn = flex_fn(q, k, v, case.get("mask_mod"), smoke)
            else:
                raise KeyError(method)
            first, ms, out = measure(fn, mode, [q, k, v] if mode == "fwd_bwd" else None, device)
            row.update(first_call_s=round(first, 3), ms=round(ms, 4))
            if case.get("flops"):
                row["TFLOPs"] = round(case["flops"] / (ms * 1e-3) / 1e12, 1)
            if case.get("bytes"):
                row["TBps"] = round(case["bytes"] / (ms * 1e-3) / 1e12, 3)
            outs[method] = out.detach()
            if method != "triton" and "triton" in outs:
                row["rel_err_vs_triton"] = rel_err(outs["triton"], out)
        except Exception as exc:  # record and go on: one failing method must not end the run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            if os.environ.get("GPU_BENCH_TRACE"):
                traceback.print_exc()
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(row)
    # ratio of triton to the best competitor that ran (>1: triton faster)
    rows = [r for r in results[-len(methods) :] if "ms" in r]
    tri = next((r for r in rows if r["method"] == "triton"), None)
    others = [r for r in rows if r["method"] != "triton"]
    if tri and others:
        best = min(others, key=lambda r: r["ms"])
        tri["best_other"] = best["method"]
        tri["speedup_vs_best"] = round(best["ms"] / tri["ms"], 3)


def attn_flops(b, h, nq, nk, d, causal, mode, pairs=None) -> float:
    per_pair = 4.0 * d  # 2 D for q.k, 2 D for p.v
    total = b * h * per_pair * (pairs if pairs is not None else nq * nk * (0.5 if causal else 1.0))
    return total * (3.5 if mode == "fwd_bwd" else 1.0)


def window_pairs(n: int, w: int) -> int:
    """Visible pairs of a causal window (w, 0) with Nq == Nk == n."""
    full = min(n, w + 1)
    return full * (full + 1) // 2 + (n - full) * (w + 1)


def doc_lengths(n: int, seed: int = 0) -> list[int]:
    """Packed documents: random lengths between 256 and 3072 summing to n."""
    g = torch.Generator().manual_seed(seed)
    lens, total = [], 0
    while total < n:
        ln = int(torch.randint(256, 3073, (1,), generator=g))
        ln = min(ln, n - total)
        lens.append(ln)
        total += ln
    return lens


def cases(smoke: bool, device: torch.device) -> list[tuple[str, list[dict], list[str]]]:
    """The sweep, most important first, as (section, cases, methods)."""
    tokens = 256 if smoke else 16384
    ns = [64, 128] if smoke else [1024, 2048, 4096, 8192, 16384]
    ns_short = [64] if smoke else [1024, 4096, 16384]
    sections = []

    def plain(dtype, d, n, causal, mode):
        h = max(1, (32 if smoke else 2048) // d)
        b = max(1, tokens // n)
        return {
            "case": f"{dtype} D{d} N{n} {'causal' if causal else 'full'} {mode}",
            "dtype": dtype, "mode": mode, "shape": (b, h, h, n, n, d),
            "kw": {"causal": causal}, "flops": attn_flops(b, h, n, n, d, causal, mode),
            "mask_mod": _causal_mod if causal else None, "need_s": 3.0 if smoke else 8.0,
        }  # fmt: skip

    head = [plain("bfloat16", 128 if not smoke else 32, n, c, m)
            for m in ("fwd", "fwd_bwd") for c in (False, True) for n in ns]  # fmt: skip
    sections.append(("bf16 D128 sweep", head, ["triton", *SDPA]))
    # decode: Nq = 1 over a long cache, GQA 32 -> 8
    dec = []
    for nk in [512] if smoke else [32768, 131072]:
        hq, hkv, d = (4, 2, 32) if smoke else (32, 8, 128)
        kv_bytes = 2 * hkv * nk * d * 2
        dec.append({
            "case": f"decode Nq1 Nk{nk} GQA {hq}->{hkv}", "dtype": "bfloat16", "mode": "fwd",
            "shape": (1, hq, hkv, 1, nk, d), "kw": {},
            "flops": attn_flops(1, hq, 1, nk, d, False, "fwd"), "bytes": kv_bytes,
        })  # fmt: skip
    sections.append(("decode", dec, ["triton", *SDPA, "flex"]))

    # causal sliding window (4096, 0) at 32k, and packed documents at 16k: against Flex
    n, w = (256, 32) if smoke else (32768, 4096)
    h, d = (2, 32) if smoke else (16, 128)
    win = [
        {
            "case": f"window ({w},0) N{n} {mode}",
            "dtype": "bfloat16",
            "mode": mode,
            "shape": (1, h, h, n, n, d),
            "kw": {"window": (w, 0)},
            "flops": attn_flops(1, h, n, n, d, False, mode, window_pairs(n, w)),
            "mask_mod": _window_mod(w),
            "need_s": 40.0,
        }
        for mode in ("fwd", "fwd_bwd")
    ]
    n = 256 if smoke else 16384
    lens = doc_lengths(n) if not smoke else [100, 156]
    ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(device)
    pairs = sum(ln * ln for ln in lens)
    docs = [
        {
            "case": f"packed {len(lens)} docs N{n} {mode}",
            "dtype": "bfloat16",
            "mode": mode,
            "shape": (1, h, h, n, n, d),
            "kw": {"segment_ids": ids[None]},
            "flops": attn_flops(1, h, n, n, d, False, mode, pairs),
            "mask_mod": _doc_mod(ids),
            "need_s": 40.0,
        }
        for mode in ("fwd", "fwd_bwd")
    ]
    sections.append(("window and packed documents", win + docs, ["triton", "flex"]))

    rest = [plain(dt, d, n, c, m)
            for dt, d in (("float16", 128), ("bfloat16", 64), ("float16", 64))
            for m in ("fwd", "fwd_bwd") for c in (False, True) for n in ns_short]  # fmt: skip
    if smoke:
        rest = rest[:2]
    sections.append(("fp16 and D64 sweep", rest, ["triton", *SDPA]))

    # compiled FlexAttention on the plain sweep too, at the longest length (compiles are slow)
    n = 128 if smoke else 16384
    flex_plain = [plain("bfloat16", 32 if smoke else 128, n, c, m)
                  for m in ("fwd", "fwd_bwd") for c in (False, True)]  # fmt: skip
    for c in flex_plain:
        c["need_s"] = 5.0 if smoke else 45.0
    sections.append(("flex on the plain sweep", flex_plain, ["triton", "flex"]))
    return sections


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window_mod(w: int):
    def mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= w)

    return mod


def _doc_mod(ids: torch.Tensor):
    def mod(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    return mod


# --------------------------------------------------------------------------------------------
# A/B checks of design choices (TMA on/off, split-K decode on/off)
# --------------------------------------------------------------------------------------------


def ab_checks(device, budget: Budget, smoke: bool) -> list[dict]:
    rows = []
    n, d, h = (128, 32, 2) if smoke else (8192, 128, 16)
    b = 1 if smoke else 2
    for label, attr, values in (("TMA", "MODE", ("0", "1")),):
        for val in values:
            if budget.left() < 20:
                break
            old = getattr(tma, attr)
            setattr(tma, attr, val)
            try:
                q, k, v = make(b, h, h, n, n, d, torch.bfloat16, device, grad=False)
                first, ms, _ = measure(triton_fn(q, k, v), "fwd", None, device)
                flops = attn_flops(b, h, n, n, d, False, "fwd")
                rows.append({"ab": f"{label}={val}", "case": f"bf16 D{d} N{n} fwd", "ms": ms,
                             "TFLOPs": round(flops / (ms * 1e-3) / 1e12, 1),
                             "first_call_s": round(first, 2)})  # fmt: skip
            except Exception as exc:
                rows.append({"ab": f"{label}={val}", "error": f"{type(exc).__name__}: {exc}"[:300]})
            finally:
                setattr(tma, attr, old)
    nk = 512 if smoke else 131072
    for val in ("always", "never"):
        if budget.left() < 20:
            break
        old = host.DECODE_MODE
        host.DECODE_MODE = val
        try:
            hq, hkv, d = (4, 2, 32) if smoke else (32, 8, 128)
            q, k, v = make(1, hq, hkv, 1, nk, d, torch.bfloat16, device, grad=False)
            first, ms, _ = measure(triton_fn(q, k, v), "fwd", None, device)
            rows.append({"ab": f"split-K decode={val}", "case": f"decode Nk{nk}", "ms": ms,
                         "TBps": round(2 * hkv * nk * d * 2 / (ms * 1e-3) / 1e12, 3)})  # fmt: skip
        except Exception as exc:
            rows.append({"ab": f"decode={val}", "error": f"{type(exc).__name__}: {exc}"[:300]})
        finally:
            host.DECODE_MODE = old
    return rows


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    lines = [
        "| case | method | ms | TFLOP/s | TB/s | vs best other | rel err vs triton | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        speed = f"{r['speedup_vs_best']:.2f}x ({r['best_other']})" if "speedup_vs_best" in r else ""
        err = f"{r['rel_err_vs_triton']:.1e}" if "rel_err_vs_triton" in r else ""
        lines.append(
            f"| {r.get('case', '')} | {r.get('method', r.get('ab', ''))} | "
            f"{r.get('ms', '')} | {r.get('TFLOPs', '')} | {r.get('TBps', '')} | {speed} | "
            f"{err} | {r.get('error', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    ap.add_argument("--sections", default="", help="comma-separated section name prefixes")
    args = ap.parse_args(argv)
    budget = Budget(args.budget)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: run with --smoke to check the script on the CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("SELFATTN_", "TRITON_"))},
        "flops_convention": "4 B H Nq Nk D fwd, x0.5 causal, x3.5 fwd+bwd; window/packed: "
        "visible pairs counted exactly",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    report = {"meta": meta, "ceilings": {}, "results": [], "ab": []}
    path = out_dir / ("gpu_smoke.json" if args.smoke else "gpu_h200.json")

    def save():
        path.write_text(json.dumps(report, indent=1))

    report["ceilings"] = ceilings(device)
    save()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    sections = cases(args.smoke, device)
    for name, section, methods in sections[:-1]:
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        print(f"== {name} ({budget.left():.0f} s left)", flush=True)
        for case in section:
            run_case(case, methods, device, budget, report["results"], args.smoke)
            last = [r for r in report["results"][-len(methods) :]]
            print("   " + case["case"] + ": " + ", ".join(
                f"{r['method']} {r['ms']:.3f} ms" if "ms" in r else f"{r['method']} -"
                for r in last), flush=True)  # fmt: skip
        save()
    if not wanted or "ab" in wanted:
        report["ab"] = ab_checks(device, budget, args.smoke)
        save()
    name, section, methods = sections[-1]  # last: whatever budget is left goes to Flex compiles
    if not wanted or any(name.startswith(w) for w in wanted):
        print(f"== {name} ({budget.left():.0f} s left)", flush=True)
        for case in section:
            run_case(case, methods, device, budget, report["results"], args.smoke)
        save()
    md = table(report["results"] + report["ab"])
    (path.with_suffix(".md")).write_text(
        f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}; "
        f"ceilings {report['ceilings']}\n\n{md}\n"
    )
    print(md)
    print(f"wrote {path} and {path.with_suffix('.md')} ({budget.left():.0f} s of budget left)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
