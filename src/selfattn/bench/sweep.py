"""The sweep room: ``selfattn bench``'s measurement of selfattn against torch SDPA, the textbook
formula and FlexAttention over sequence lengths, and the worker process it measures memory in."""

from __future__ import annotations

import gc
import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..checks import integer, real
from .machine import cpu_info
from .memory import peak_rss_bytes, reset_peak, rss_bytes
from .timing import Timing, attention_flops, time_fn

__all__ = ["METHODS", "SweepConfig", "count_steps", "run_sweep"]

# name -> what it runs (written into the results, so a reader knows what was compared)
METHODS = {
    "selfattn": "selfattn.attention with the package's own engine (native, else tiled, on CPU; triton on CUDA)",
    "sdpa": "torch.nn.functional.scaled_dot_product_attention",
    "math": "selfattn.attention(backend='math'): the textbook formula, full (N, N) scores",
    "flex": "torch.compile(flex_attention) with a block mask",
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SweepConfig:
    """What to measure.

    Attributes:
        lengths: sequence lengths N (queries = keys).
        methods: names from :data:`METHODS`.
        device: "cpu" or "cuda".
        dtype: "float32", "float16" or "bfloat16".
        batch, heads, head_dim: the problem is (batch, heads, N, head_dim).
        causal: causal masking (the FLOP count halves).
        repeats: timed calls per method and length (after one warm-up call).
        memory: measure the peak memory of each call in a worker process.
        flex_timeout: seconds FlexAttention's worker may take (compilation included).
        math_max: longest N for ``math``, whose (N, N) scores grow quadratically.
        seed: for the random inputs.
        threads: torch CPU threads during the sweep (torch's default when None). On a machine
            shared with other busy processes, 1 thread gives steadier times.
    """

    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    methods: list[str] = field(default_factory=lambda: ["selfattn", "sdpa", "math", "flex"])
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    causal: bool = True
    repeats: int = 3
    memory: bool = True
    flex_timeout: float = 240.0
    math_max: int = 4096
    seed: int = 0
    threads: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        try:
            self._validate()
        except TypeError as exc:  # one kind of error for every bad setting, as the command expects
            raise ValueError(str(exc)) from None

    def _validate(self) -> None:
        if not self.lengths:
            raise ValueError(f"lengths must be positive ints, got {self.lengths}")
        for n in self.lengths:
            integer("lengths", n)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch sees no CUDA device here")
        if self.threads is not None:
            integer("threads", self.threads)
        for name in ("batch", "heads", "head_dim", "repeats"):
            integer(name, getattr(self, name))
        if real("flex_timeout", self.flex_timeout) <= 0:
            raise ValueError(f"flex_timeout must be > 0 seconds, got {self.flex_timeout}")


def _engine(device: str) -> str:
    from ..backends import BACKENDS

    if device == "cuda" and BACKENDS["triton"].unavailable() is None:
        return "triton"
    if device == "cpu" and BACKENDS["native"].unavailable() is None:
        return "native"
    return "tiled"


def _inputs(cfg: SweepConfig, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed + n)
    shape = (cfg.batch, cfg.heads, n, cfg.head_dim)
    dt = _DTYPES[cfg.dtype]
    return tuple(torch.randn(shape, generator=g).to(device=cfg.device, dtype=dt) for _ in range(3))


def _method(cfg: SweepConfig, name: str, q, k, v) -> Callable[[], torch.Tensor]:
    """A no-argument callable running ``name`` on (q, k, v), gradients off."""
    import torch.nn.functional as F

    import selfattn

    causal = cfg.causal
    if name == "selfattn":
        engine = _engine(cfg.device)
        return lambda: selfattn.attention(q, k, v, causal=causal, backend=engine)
    if name == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name == "math":
        return lambda: selfattn.attention(q, k, v, causal=causal, backend="math")
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        n = q.shape[2]
        block = None
        if causal:
            block = create_block_mask(
                lambda b, h, qi, kj: qi >= kj, None, None, n, n, device=cfg.device
            )
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda: compiled(q, k, v, block_mask=block)
    raise ValueError(f"unknown method {name!r}")


# -- the worker: memory (and, for flex, time) in a fresh process --------------------------------


def _worker(cfg: SweepConfig, methods: list[str], timed: bool) -> None:
    """Print one JSON line per (method, length): peak memory growth and optionally times."""
    cuda = cfg.device == "cuda"
    torch.set_grad_enabled(False)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for n in cfg.lengths:
        for m in methods:
            if m == "math" and n > cfg.math_max:
                continue
            q, k, v = _inputs(cfg, n)
            fn = _method(cfg, m, q, k, v)
            t0 = time.perf_counter()
            out = fn()  # warm-up (and compilation for flex) is not counted
            row: dict[str, Any] = {"method": m, "n": n, "warmup_s": time.perf_counter() - t0}
            if timed:
                import torch.nn.functional as F

                ref = F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal)
                row["max_abs_diff"] = float((out.float() - ref.float()).abs().max())
                del ref
                row["samples"] = time_fn(fn, repeats=cfg.repeats, warmup=0, device=q.device).samples
            del out
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                row["memory_bytes"] = torch.cuda.max_memory_allocated() - base
            elif reset_peak():
                base = rss_bytes()
                reset_peak()
                fn()
                row["memory_bytes"] = max(peak_rss_bytes() - base, 0)
            print(json.dumps(row), flush=True)
            del fn, q, k, v


def _run_worker(
    cfg: SweepConfig,
    methods: list[str],
    *,
    timed: bool,
    timeout: float,
    on_row: Callable[[dict], None],
) -> str | None:
    """Run :func:`_worker` in a fresh process; returns why it stopped early, or None."""
    env = dict(os.environ)
    # Large buffers go straight to mmap and back to the system when freed, so each measurement
    # starts from a clean heap even though one process measures every length in turn.
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    payload = json.dumps({"cfg": asdict(cfg), "methods": methods, "timed": timed})
    cmd = [sys.executable, "-m", "selfattn.bench.sweep", payload]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(left, 0.01))
        except queue.Empty:
            proc.kill()
            proc.wait()
            return f"stopped after the {timeout:.0f} s limit"
        if line is None:
            break
        if line.startswith("{"):
            on_row(json.loads(line))
    proc.wait()
    if proc.returncode != 0:
        err = proc.stderr.read().strip().splitlines()
        return f"worker failed: {err[-1] if err else f'exit {proc.returncode}'}"
    return None


# -- the sweep ----------------------------------------------------------------------------------


def run_sweep(
    cfg: SweepConfig, progress: Callable[[str, int], None] | None = None
) -> dict[str, Any]:
    """Measure every method at every length.

    Times are interleaved between methods (one call of each per round), so machine noise hits
    every method alike; FLOPs use the FlashAttention convention (:func:`.attention_flops`);
    memory is the peak growth of a fresh worker process while one call runs (host RSS on CPU,
    the CUDA allocator's peak on GPU). FlexAttention compiles first (tens of seconds on CPU), so
    it runs in its own worker with a time limit and is left out, with the reason, when it does
    not finish.

    Args:
        cfg: what to measure (validated first).
        progress: called as ``progress(description, steps_done)`` after each step; the total
            number of steps is :func:`count_steps`.

    Returns:
        A JSON-ready dict: ``config``, ``methods`` (what each ran), ``rows`` (one per method and
        length: ``median_s``, ``best_s``, ``samples``, ``flops``, ``flops_per_s``, ``vs_sdpa``,
        ``memory_bytes``, ``max_abs_diff`` against sdpa), ``skipped`` (method -> reason).
    """
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _sweep(cfg, progress or (lambda desc, k: None))
    finally:
        torch.set_num_threads(threads)


def _sweep(cfg: SweepConfig, tell: Callable[[str, int], None]) -> dict[str, Any]:
    device = torch.device(cfg.device)
    eager = [m for m in cfg.methods if m != "flex"]
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        for n in cfg.lengths:
            q, k, v = _inputs(cfg, n)
            here = [m for m in eager if not (m == "math" and n > cfg.math_max)]
            if "math" in eager and n > cfg.math_max:
                skipped["math"] = f"N > {cfg.math_max} (its (N, N) scores; --math-max)"
            fns = {m: _method(cfg, m, q, k, v) for m in here}
            outs = {m: fns[m]() for m in here}  # warm-up round, kept to compare the outputs
            ref = outs.get("sdpa")
            timings = {m: Timing() for m in here}
            for _ in range(cfg.repeats):
                for m in here:  # interleaved: one call of each method per round
                    time_fn(fns[m], repeats=1, warmup=0, device=device, timing=timings[m])
                    tell(f"N={n} {m}", 1)
            for m in here:
                diff = None if ref is None else float((outs[m].float() - ref.float()).abs().max())
                rows[(m, n)] = _row(cfg, m, n, timings[m].samples, diff)
            del outs, fns, q, k, v, ref
            gc.collect()
    if cfg.memory and eager:

        def got_mem(r: dict) -> None:
            if (r["method"], r["n"]) in rows:
                rows[(r["method"], r["n"])]["memory_bytes"] = r.get("memory_bytes")
            tell(f"memory N={r['n']} {r['method']}", 1)

        why = _run_worker(cfg, eager, timed=False, timeout=600.0, on_row=got_mem)
        if why:
            skipped["memory"] = why
    if "flex" in cfg.methods:

        def got_flex(r: dict) -> None:
            rows[("flex", r["n"])] = _row(cfg, "flex", r["n"], r["samples"], r["max_abs_diff"])
            rows[("flex", r["n"])]["memory_bytes"] = r.get("memory_bytes")
            rows[("flex", r["n"])]["compile_s"] = r["warmup_s"]
            tell(f"flex N={r['n']}", cfg.repeats + 1)

        why = _run_worker(cfg, ["flex"], timed=True, timeout=cfg.flex_timeout, on_row=got_flex)
        if why:
            done = sorted(n for m, n in rows if m == "flex")
            skipped["flex"] = f"{why}; measured N={done}" if done else why
    for (_, n), r in rows.items():
        sdpa = rows.get(("sdpa", n))
        r["vs_sdpa"] = r["median_s"] / sdpa["median_s"] if sdpa and sdpa["median_s"] else None
    import selfattn

    return {
        "config": {
            **asdict(cfg),
            "engine": _engine(cfg.device),
            "torch": torch.__version__,
            "selfattn": selfattn.__version__,
            "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu": cpu_info(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if cfg.device == "cuda" else None,
        },
        "methods": {m: METHODS[m] for m in cfg.methods},
        "rows": sorted(rows.values(), key=lambda r: (r["n"], cfg.methods.index(r["method"]))),
        "skipped": skipped,
    }


def _row(cfg: SweepConfig, m: str, n: int, samples: list[float], diff: float | None) -> dict:
    t = Timing(list(samples))
    flops = attention_flops(cfg.batch, cfg.heads, n, n, cfg.head_dim, causal=cfg.causal)
    return {
        "method": m,
        "n": n,
        "median_s": t.median,
        "best_s": t.best,
        "samples": list(samples),
        "flops": flops,
        "flops_per_s": flops / t.median if t.median > 0 else None,
        "max_abs_diff": diff,
        "memory_bytes": None,
    }


def count_steps(cfg: SweepConfig) -> int:
    """How many progress steps :func:`run_sweep` reports (for a progress bar's total)."""
    eager = [m for m in cfg.methods if m != "flex"]
    steps = 0
    for n in cfg.lengths:
        here = [m for m in eager if not (m == "math" and n > cfg.math_max)]
        steps += cfg.repeats * len(here) + (len(here) if cfg.memory else 0)
        if "flex" in cfg.methods:
            steps += cfg.repeats + 1
    return steps


if __name__ == "__main__":  # the worker process of _run_worker
    spec = json.loads(sys.argv[1])
    _worker(SweepConfig(**spec["cfg"]), spec["methods"], spec["timed"])
