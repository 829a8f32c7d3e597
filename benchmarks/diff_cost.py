"""What forward mode and double backward cost against the first-order passes (issue 19).

Rows, each for ``native``, ``tiled`` and ``math`` on the same machine in the same run:

- ``jvp``: ``torch.func.jvp`` of ``attention`` (tangents on q, k and v; forward included)
  against the forward alone (no grad), N = ``--n-jvp`` (4096). Target: native <= 2.5x.
- ``double``: a gradient penalty, ``grad(out, (q, k, v), dO, create_graph=True)`` then the
  gradient of ``sum(g^2)`` over the three gradients (forward included), against forward +
  backward alone, N = ``--n-double`` (2048). Target: native <= 3x.
- ``memory``: peak resident growth of the JVP against the forward's own, each in a fresh
  process (``selfattn.bench.memory``), N = ``--n-mem`` (8192). Target: native < 2x; ``math``
  would hold (N, N) scores per head (B*H*N^2*4 bytes = 2 GiB at N=8192 H8 per tensor), so it
  runs only with ``--math-memory``.

B=1, H=8, D=64, float32, no mask (``--causal`` for causal rows). The two sides of a ratio are
timed alternately, ``--repeats`` rounds (9) after one warm-up call each; times are medians and
``ratio`` the median of the per-round ratios. The CPU, ISA and threads go into the JSON.

    python benchmarks/diff_cost.py                      # the issue's sizes
    python benchmarks/diff_cost.py --small              # seconds: N 256/256/512, a smoke run

Writes benchmarks/results/diff_cost.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import selfattn
from selfattn.bench.machine import cpu_info, cpu_label
from selfattn.bench.memory import peak_memory_growth

RESULTS = Path(__file__).parent / "results"


def _qkv(n: int, h: int, d: int, seed: int, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, n, d, generator=g).requires_grad_(grad) for _ in range(3)]


def _paired(base, fn, repeats: int) -> tuple[float, float, float]:
    """Medians of ``base`` and ``fn`` timed alternately (their order swapped every round, after
    one warm-up call each: builds, caches, first-touch pages) and the median of the per-round
    ratios fn / base, so a slow spell of a shared machine hits both sides of a ratio."""
    base(), fn()
    tb, tf, ratios = [], [], []
    for r in range(repeats):
        pair = {}
        for name, call in (("b", base), ("f", fn)) if r % 2 == 0 else (("f", fn), ("b", base)):
            t0 = time.perf_counter()
            call()
            pair[name] = time.perf_counter() - t0
        tb.append(pair["b"])
        tf.append(pair["f"])
        ratios.append(pair["f"] / pair["b"])
    return statistics.median(tb), statistics.median(tf), statistics.median(ratios)


def time_jvp(backend: str, n: int, h: int, d: int, causal: bool, repeats: int) -> dict:
    q, k, v = _qkv(n, h, d, 0)
    tq, tk, tv = _qkv(n, h, d, 1)

    def f(q, k, v):
        return selfattn.attention(q, k, v, causal=causal, backend=backend)

    def fwd():
        with torch.no_grad():
            f(q, k, v)

    def jvp():
        torch.func.jvp(f, (q, k, v), (tq, tk, tv))

    t_f, t_j, ratio = _paired(fwd, jvp, repeats)
    return {"forward_s": t_f, "jvp_s": t_j, "ratio": ratio}


def time_double(backend: str, n: int, h: int, d: int, causal: bool, repeats: int) -> dict:
    q, k, v = _qkv(n, h, d, 0, grad=True)
    (do,) = _qkv(n, h, d, 2)[:1]

    def first():
        out = selfattn.attention(q, k, v, causal=causal, backend=backend)
        torch.autograd.grad(out, (q, k, v), do)

    def double():
        out = selfattn.attention(q, k, v, causal=causal, backend=backend)
        gs = torch.autograd.grad(out, (q, k, v), do, create_graph=True)
        penalty = sum((g * g).sum() for g in gs)
        torch.autograd.grad(penalty, (q, k, v))

    t_b, t_d, ratio = _paired(first, double, repeats)
    return {"forward_backward_s": t_b, "double_s": t_d, "ratio": ratio}


def peak_growth(backend: str, n: int, h: int, d: int, causal: bool, what: str) -> int:
    setup = (
        "import torch, selfattn\n"
        f"g = torch.Generator().manual_seed(0)\n"
        f"q, k, v, tq, tk, tv = [torch.randn(1, {h}, {n}, {d}, generator=g) for _ in range(6)]\n"
        f"f = lambda q, k, v: selfattn.attention(q, k, v, causal={causal}, backend={backend!r})\n"
        # a small call first: the engine is built/loaded and torch's pools exist before the mark
        "torch.func.jvp(f, (q[:, :, :64], k[:, :, :64], v[:, :, :64]), "
        "(tq[:, :, :64], tk[:, :, :64], tv[:, :, :64]))\n"
    )
    code = (
        "with torch.no_grad():\n    f(q, k, v)\n"
        if what == "forward"
        else "torch.func.jvp(f, (q, k, v), (tq, tk, tv))\n"
    )
    return peak_memory_growth(code, setup=setup)["growth"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-jvp", type=int, default=4096)
    ap.add_argument("--n-double", type=int, default=2048)
    ap.add_argument("--n-mem", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--backends", nargs="+", default=["native", "tiled", "math"])
    ap.add_argument("--math-memory", action="store_true", help="also measure math's memory")
    ap.add_argument("--small", action="store_true", help="N 256/256/512: a smoke run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "diff_cost.json")
    args = ap.parse_args(argv)
    if args.small:
        args.n_jvp, args.n_double, args.n_mem = 256, 256, 512
    if args.threads:
        torch.set_num_threads(args.threads)
    h, d, c = args.heads, args.dim, args.causal
    cpu = cpu_info()
    result: dict = {
        "cpu": cpu,
        "label": cpu_label(cpu),
        "torch": torch.__version__,
        "shape": {"B": 1, "H": h, "D": d, "dtype": "float32", "causal": c},
        "jvp": {"N": args.n_jvp},
        "double": {"N": args.n_double},
        "memory": {"N": args.n_mem},
    }
    for b in args.backends:
        result["jvp"][b] = time_jvp(b, args.n_jvp, h, d, c, args.repeats)
        print(f"jvp     {b:7s} N={args.n_jvp}: {result['jvp'][b]}", flush=True)
    for b in args.backends:
        result["double"][b] = time_double(b, args.n_double, h, d, c, args.repeats)
        print(f"double  {b:7s} N={args.n_double}: {result['double'][b]}", flush=True)
    for b in args.backends:
        if b == "math" and not args.math_memory:
            scores = h * args.n_mem * args.n_mem * 4
            result["memory"][b] = {"skipped": f"(N, N) scores alone: {scores / 2**30:.1f} GiB"}
            continue
        fwd = peak_growth(b, args.n_mem, h, d, c, "forward")
        jvp = peak_growth(b, args.n_mem, h, d, c, "jvp")
        result["memory"][b] = {"forward_bytes": fwd, "jvp_bytes": jvp, "ratio": jvp / max(fwd, 1)}
        print(f"memory  {b:7s} N={args.n_mem}: {result['memory'][b]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
