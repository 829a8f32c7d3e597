"""Compile the ``triton`` backend's kernels for a GPU target without a GPU, and report what the
compiler says: registers, spills, shared memory, and whether the matrix products became
Hopper ``wgmma`` (HGMMA in SASS).

Triton's pip wheel carries ``ptxas`` and ``cuobjdump``, so the whole pipeline (Python AST ->
TTIR -> TTGIR -> LLVM -> PTX -> cubin) runs on a CPU machine. The kernel arguments come from
the backend's own host code (``host.forward`` / ``host.backward`` on CPU tensors with the
launches intercepted), so this also checks that host and kernel signatures agree. It cannot
show speed or catch a wrong answer that only the hardware produces: the GPU tests do that.

Usage: ``python benchmarks/triton_aot_check.py [--target cuda:90] [--quick]``; prints a table.
Another Triton (e.g. the GPU machine's 3.6: ``pip install --target DIR --no-deps triton==3.6.0``)
is checked by putting it first on the path: ``PYTHONPATH=DIR python benchmarks/...``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["SELFATTN_TRITON_AUTOTUNE"] = "0"  # the fixed-config launch path, intercepted below

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from selfattn.backends.triton import configs, host, kernels  # noqa: E402
from selfattn.quant import quantize_kv  # noqa: E402
from selfattn.spec import validate  # noqa: E402


class _Capture:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, args, kwargs))

        return launch


class _FakeModule:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __getattr__(self, name: str) -> _Capture:
        return _Capture(name, self.calls)


def capture(fn) -> list:
    """Run host code with every launch recorded instead of executed (host launches through its
    module global ``kernels``; autotuning is off, so no autotuned wrapper is built)."""
    calls: list = []
    host.kernels = _FakeModule(calls)
    try:
        fn()
    finally:
        host.kernels = kernels
    return calls


def compile_call(kernels, name: str, args, kwargs, target: GPUTarget):
    """Compile one recorded launch; returns the CompiledKernel."""
    fn = getattr(kernels, name)
    params = fn.arg_names
    values = dict(zip(params, args))
    values.update(kwargs)
    num_warps = values.pop("num_warps", 4)
    num_stages = values.pop("num_stages", 2)
    constexprs, signature, attrs = {}, {}, {}
    const_names = {p.name for p in fn.params if p.is_constexpr}
    no_spec = set(getattr(fn, "do_not_specialize", []) or [])
    no_spec |= {params[i] for i in no_spec if isinstance(i, int)}
    for i, p in enumerate(params):
        val = values[p]
        if p in const_names:
            constexprs[p] = val
            signature[p] = "constexpr"
            continue
        if isinstance(val, int) and not isinstance(val, bool) and val == 1 and p not in no_spec:
            constexprs[p] = 1  # Triton's launcher specialises integers equal to 1 the same way
            signature[p] = "constexpr"
            continue
        signature[p] = mangle_type(val)
        aligned = (
            (isinstance(val, torch.Tensor) and val.data_ptr() % 16 == 0)
            or (isinstance(val, int) and not isinstance(val, bool) and val % 16 == 0 and p not in no_spec)
        )  # fmt: skip
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(src, target=target, options=options.__dict__), num_warps, num_stages


def ptxas_report(ck, arch: str) -> dict:
    """Registers, spills and shared memory from ``ptxas -v``, HGMMA count from the SASS."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    out = {"shared": ck.metadata.shared}
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(ck.asm["ptx"])
        # the newer of the bundled assemblers reads the PTX versions recent Triton emits
        ptxas = bin_dir / "ptxas-blackwell"
        if not ptxas.exists():
            ptxas = bin_dir / "ptxas"
        res = subprocess.run(
            [str(ptxas), f"--gpu-name={arch}", "-v", str(ptx), "-o", f"{tmp}/k.o"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        text = res.stdout + res.stderr
        m = re.search(r"Used (\d+) registers", text)
        out["regs"] = int(m.group(1)) if m else None
        if m is None:
            out["ptxas"] = text.strip()[-300:]
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        out["spill"] = f"{m.group(1)}/{m.group(2)}" if m else "?"
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        sass = subprocess.run(
            [str(bin_dir / "cuobjdump"), "-sass", str(cubin)],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        out["HGMMA"] = sass.count("HGMMA")
        out["HMMA"] = sass.count("HMMA.")
        out["LDGSTS"] = sass.count("LDGSTS")  # cp.async
        out["UTMALDG"] = sass.count("UTMALDG")  # TMA loads
    return out


def scenarios(quick: bool):
    """(label, host call) pairs: CPU tensors, the launches are only recorded."""
    bf16 = torch.bfloat16

    def qkv(b, hq, hkv, nq, nk, d, dtype=bf16, grad=False):
        g = torch.Generator().manual_seed(0)
        ts = [
            torch.randn(b, h, n, d, generator=g).to(dtype)
            for h, n in ((hq, nq), (hkv, nk), (hkv, nk))
        ]
        return ts

    n = 1024  # lengths only change integer specialisations, not the code

    def fwd(kw, shape=(2, 16, 16, n, n, 128), dtype=bf16, tma=False, seed=None, bits=(0, 0)):
        q, k, v = qkv(*shape, dtype=dtype)
        spec = validate(q, k, v, **kw)
        # quantized keys/values (the kernels read codes and scales; never through TMA)
        k = quantize_kv(k, bits=bits[0]) if bits[0] else k
        v = quantize_kv(v, bits=bits[1]) if bits[1] else v

        def run():
            old = host.DECODE_MODE
            host.DECODE_MODE = "always" if q.shape[2] <= host.DECODE_MAX_NQ else "never"
            try:
                host.forward(spec, q, k, v, seed, tma=tma, tune=False)
            finally:
                host.DECODE_MODE = old

        return run

    def bwd(kw, shape=(2, 16, 16, n, n, 128), dtype=bf16, need_bias=False, seed=None):
        q, k, v = qkv(*shape, dtype=dtype)
        spec = validate(q, k, v, **kw)
        out = torch.zeros((*q.shape[:3], v.shape[-1]), dtype=dtype)
        lse = torch.zeros(q.shape[:3])

        rows = torch.zeros(lse.numel()) if spec.sinks is not None else None

        def run():
            host.backward(
                spec, seed, q, k, v, out, lse, torch.ones_like(out), None, need_bias, False, rows
            )

        return run

    def probs(kw, shape=(2, 16, 16, n, n, 128), dtype=bf16, lse=False, stats=False):
        q, k, _ = qkv(*shape, dtype=dtype)
        spec = validate(q, k, None, need_v=False, **kw)
        given = torch.zeros(q.shape[:3]) if lse else None

        def run():
            if stats:  # attention_stats: the same kernel reducing its tiles
                host.stats(spec, q, k, given, None, None, col_sum=True, col_max=True, entropy=True)
            else:
                host.weights(spec, q, k, given, None, None)

        return run

    yield "fwd bf16 D128 causal", fwd({"causal": True})
    yield "fwd bf16 D128 causal TMA", fwd({"causal": True}, tma=True)
    yield "bwd bf16 D128 causal", bwd({"causal": True})
    if quick:
        return
    yield "fwd fp16 D64 full", fwd({}, shape=(4, 32, 32, 2048, 2048, 64), dtype=torch.float16)
    ids = torch.zeros(1, n, dtype=torch.long)
    yield "fwd bf16 D128 segments", fwd({"segment_ids": ids}, shape=(1, 16, 16, n, n, 128))
    yield "fwd bf16 D128 window", fwd({"window": (256, 0)})
    everything = {
        "causal": True, "window": (100, None), "mask": torch.ones(n, n, dtype=torch.bool),
        "bias": torch.zeros(1, 16, n, n), "alibi_slopes": torch.ones(16), "softcap": 30.0,
        "segment_ids": torch.zeros(2, n, dtype=torch.long), "dropout_p": 0.1,
    }  # fmt: skip
    yield "fwd bf16 D128 every rule", fwd(everything, seed=(1, 2))
    yield (
        "fwd fp32 D40 causal",
        fwd({"causal": True}, shape=(1, 4, 4, 512, 512, 40), dtype=torch.float32),
    )
    yield "fwd bf16 D256", fwd({}, shape=(1, 8, 8, n, n, 256))
    yield "decode bf16 GQA 32->8", fwd({}, shape=(1, 32, 8, 1, 16384, 128))
    yield "decode bf16 GQA TMA", fwd({}, shape=(1, 32, 8, 1, 16384, 128), tma=True)
    yield "decode bf16 GQA int8", fwd({}, shape=(1, 32, 8, 1, 16384, 128), bits=(8, 8))
    yield "decode bf16 GQA int4", fwd({}, shape=(1, 32, 8, 1, 16384, 128), bits=(4, 4))
    sinks = torch.zeros(16)
    yield "fwd bf16 D128 causal sinks", fwd({"causal": True, "sinks": sinks})
    yield "decode bf16 GQA sinks", fwd({"sinks": torch.zeros(32)}, shape=(1, 32, 8, 1, 16384, 128))
    yield "bwd bf16 D128 causal sinks", bwd({"causal": True, "sinks": sinks})
    yield "fwd bf16 D128 causal int8", fwd({"causal": True}, bits=(8, 8))
    yield (
        "fwd fp16 D64 causal int4",
        fwd({"causal": True}, shape=(4, 32, 32, 2048, 2048, 64), dtype=torch.float16, bits=(4, 4)),
    )
    bias = torch.zeros(1, 16, n, n).requires_grad_(True)
    yield "bwd bf16 D128 bias grad", bwd({"bias": bias}, need_bias=True)
    yield "bwd bf16 D128 every rule", bwd(everything, seed=(1, 2))
    yield "bwd bf16 D256", bwd({}, shape=(1, 8, 8, n, n, 256))
    yield "weights bf16 D128 causal lse", probs({"causal": True}, lse=True)
    no_dropout = {name: val for name, val in everything.items() if name != "dropout_p"}
    yield "weights bf16 D128 every rule", probs(no_dropout)
    yield "stats bf16 D128 causal lse", probs({"causal": True}, lse=True, stats=True)
    yield "stats bf16 D128 sinks", probs({"causal": True, "sinks": sinks}, stats=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cuda:90", help="backend:arch, e.g. cuda:90 or cuda:80")
    ap.add_argument("--quick", action="store_true", help="three kernels only")
    ap.add_argument(
        "--configs", action="store_true",
        help="every candidate tile of the D=64/128 tables for the forward, dK/dV and dQ kernels",
    )  # fmt: skip
    args = ap.parse_args(argv)
    backend, arch = args.target.split(":")
    target = GPUTarget(backend, int(arch), 32)
    sm = f"sm_{arch}a" if arch == "90" else f"sm_{arch}"
    rows, failures = [], 0
    todo = []
    for label, run in scenarios(args.quick or args.configs):
        for name, kargs, kkw in capture(run):
            if not args.configs:
                todo.append((label, name, kargs, kkw))
                continue
            kind = {"attn_fwd": "fwd", "bwd_dkdv": "dkdv", "bwd_dq": "dq"}.get(name)
            if kind is None or "TMA" in label:
                continue
            for dim in (64, 128):
                for bm, bn, w, st in configs.TABLES[kind][dim]:
                    kw = dict(kkw, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
                    kw["BLOCK_D"] = kw["BLOCK_DV"] = dim
                    todo.append((f"{label} -> D{dim}", name, kargs, kw))
    for label, name, kargs, kkw in todo:
        t0 = time.perf_counter()
        try:
            ck, w, s = compile_call(kernels, name, kargs, kkw, target)
            rep = ptxas_report(ck, sm)
            meta = {k: kkw[k] for k in ("BLOCK_M", "BLOCK_N") if k in kkw}
            rows.append((label, name, meta, w, s, rep, time.perf_counter() - t0, None))
        except Exception as exc:  # report every failure, keep going
            failures += 1
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
            rows.append((label, name, {}, None, None, {}, time.perf_counter() - t0, msg))
        print(_fmt(rows[-1]), flush=True)
    print(f"\n{len(rows)} kernels compiled for {args.target}, {failures} failed")
    return 1 if failures else 0


def _fmt(row) -> str:
    label, name, meta, w, s, rep, secs, err = row
    if err:
        return f"FAIL {label:28s} {name:16s} {err}"
    tiles = "x".join(str(v) for v in meta.values()) or "-"
    return (
        f"ok   {label:28s} {name:16s} tiles {tiles:8s} w{w} s{s} regs {rep['regs']} "
        f"spill {rep['spill']} smem {rep['shared']} HGMMA {rep['HGMMA']} HMMA {rep['HMMA']} "
        f"cp.async {rep['LDGSTS']} TMA {rep['UTMALDG']} ({secs:.0f} s)"
    )


if __name__ == "__main__":
    sys.exit(main())
