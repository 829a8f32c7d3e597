"""CPU benchmark of the `tiled` engine against torch's SDPA, the targets of the Core issue.

Setting: float32, B=1, D=64, on this machine's threads; every ratio is SDPA's time over ours,
measured in the same run with the methods interleaved round by round (so machine noise hits
both alike), medians over the rounds. The whole set is repeated ``--runs`` times and the
repeat with the median ratio is shown (every repeat's ratio is kept in the JSON). Writes
benchmarks/results/cpu.json and prints a table.

    python benchmarks/cpu.py            # the four targets
    python benchmarks/cpu.py --quick    # smaller sizes, for a smoke run
    python benchmarks/cpu.py --flex     # also compiled FlexAttention on the window case
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import selfattn
from selfattn.bench import attention_flops, peak_memory_growth

RESULTS = Path(__file__).parent / "results" / "cpu.json"


def interleaved(methods: dict, rounds: int) -> dict[str, float]:
    """Median seconds per method, calling each once per round in turn (after one warm-up)."""
    for fn in methods.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def qkv(h: int, n: int, d: int = 64, grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, n, d, generator=g).requires_grad_(grad) for _ in range(3))


def case_forward(n: int, causal: bool, rounds: int) -> dict:
    q, k, v = qkv(8, n)
    with torch.no_grad():
        t = interleaved(
            {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                "tiled": lambda: selfattn.attention(q, k, v, causal=causal, backend="tiled"),
            },
            rounds,
        )
    flops = attention_flops(1, 8, n, n, 64, causal=causal)
    return {"case": f"forward N={n}" + (" causal" if causal else ""), "times": t, "flops": flops}


def case_forward_backward(n: int, rounds: int) -> dict:
    q, k, v = qkv(8, n, grad=True)
    do = torch.randn(1, 8, n, 64)

    def run(fn):
        def go():
            q.grad = k.grad = v.grad = None
            fn().backward(do)

        return go

    t = interleaved(
        {
            "sdpa": run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            "tiled": run(lambda: selfattn.attention(q, k, v, causal=True, backend="tiled")),
        },
        rounds,
    )
    flops = attention_flops(1, 8, n, n, 64, causal=True, mode="fwd_bwd")
    return {"case": f"forward+backward N={n} causal", "times": t, "flops": flops}


def case_window(n: int, w: int, rounds: int, flex: bool) -> dict:
    q, k, v = qkv(4, n)
    i = torch.arange(n)
    dense = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - w)  # (N, N) bool
    methods = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
        "tiled": lambda: selfattn.attention(q, k, v, window=(w, 0), backend="tiled"),
    }
    extra = {}
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def rule(b, h, qi, kj):
            return (kj <= qi) & (kj >= qi - w)

        t0 = time.perf_counter()
        block_mask = create_block_mask(rule, None, None, n, n, device="cpu")
        compiled = torch.compile(flex_attention)
        compiled(q, k, v, block_mask=block_mask)
        extra["flex_compile_s"] = time.perf_counter() - t0
        methods["flex"] = lambda: compiled(q, k, v, block_mask=block_mask)
    with torch.no_grad():
        t = interleaved(methods, rounds)
    frac = (w + 1) / n  # visible fraction of the square, about
    flops = attention_flops(1, 4, n, n, 64, visible_fraction=frac)
    return {"case": f"window=({w}, 0) N={n} H=4", "times": t, "flops": flops, **extra}


def case_memory(n: int) -> dict:
    setup = (
        "import torch, selfattn\n"
        f"q, k, v = (torch.randn(1, 8, {n}, 64) for _ in range(3))\n"
        "selfattn.attention(q[:, :, :512], k[:, :, :512], v[:, :, :512], causal=True, backend='tiled')\n"
    )
    code = "out = selfattn.attention(q, k, v, causal=True, backend='tiled')"
    mem = peak_memory_growth(code, setup=setup)
    qkvo = 4 * (8 * n * 64 * 4)
    return {
        "case": f"memory: causal forward N={n} H=8",
        "growth_bytes": mem["growth"],
        "qkvo_bytes": qkvo,
        "ratio_to_qkvo": mem["growth"] / qkvo,
        "math_scores_bytes": 8 * n * n * 4,
    }


def _median_run(cases: list[dict]) -> dict:
    """The repeat whose SDPA/tiled ratio is the median, with every repeat's ratio kept."""
    ratios = [c["times"]["sdpa"] / c["times"]["tiled"] for c in cases]
    mid = sorted(range(len(cases)), key=lambda i: ratios[i])[len(cases) // 2]
    out = {**cases[mid], "ratios_of_runs": ratios}
    if "flex" not in out["times"] and "flex" in cases[0]["times"]:
        out["flex"] = {"times": cases[0]["times"], "compile_s": cases[0]["flex_compile_s"]}
    return out


def table(results: list[dict]) -> str:
    rows = [
        "| case | SDPA | tiled | tiled GFLOP/s | SDPA / tiled | target |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        if "times" not in r:
            continue
        t = r["times"]
        rows.append(
            f"| {r['case']} | {t['sdpa'] * 1e3:.0f} ms | {t['tiled'] * 1e3:.0f} ms | "
            f"{r['flops'] / t['tiled'] / 1e9:.0f} | {t['sdpa'] / t['tiled']:.2f}x | {r.get('target', '')} |"
        )
        if "flex" in t:
            rows.append(
                f"| {r['case']}, compiled FlexAttention | {t['sdpa'] * 1e3:.0f} ms | "
                f"{t['flex'] * 1e3:.0f} ms (flex) | | {t['sdpa'] / t['flex']:.2f}x (flex) | "
                f"compile {r['flex_compile_s']:.0f} s |"
            )
    for r in results:
        if "growth_bytes" in r:
            rows.append(
                f"| {r['case']} | | {r['growth_bytes'] / 2**20:.0f} MiB peak growth | | "
                f"{r['ratio_to_qkvo']:.2f}x bytes of q, k, v, out | <= 2x (math would need "
                f"{r['math_scores_bytes'] / 2**30:.0f} GiB) |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--flex", action="store_true", help="also compiled FlexAttention (window case)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case")
    ap.add_argument("--runs", type=int, default=3, help="repeats; the median ratio is reported")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    quick = args.quick
    r = 3 if quick else args.rounds
    runs = []
    for i in range(1 if quick else args.runs):
        n_fwd, n_fb, n_win = (1024, 512, 2048) if quick else (4096, 2048, 16384)
        run = [
            {**case_forward(n_fwd, False, r), "target": ">= 0.9x (aim 1.0x)"},
            {**case_forward(n_fwd, True, r), "target": ">= 0.9x (aim 1.0x)"},
            {**case_forward_backward(n_fb, r), "target": ">= 1.0x"},
            {**case_window(n_win, 512, max(3, r // 2), args.flex and i == 0), "target": ">= 20x"},
        ]
        runs.append(run)
        if not quick:
            print(f"run {i + 1}:\n{table(run)}\n", flush=True)
    results = [_median_run([run[c] for run in runs]) for c in range(len(runs[0]))]
    results.append(case_memory(4096 if quick else 32768))
    print(table(results))
    if not quick:
        meta = {
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "selfattn": selfattn.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
