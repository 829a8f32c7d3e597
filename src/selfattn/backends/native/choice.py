"""Where ``auto`` lets torch's SDPA run a call that ``native`` could run: measured rules.

``auto`` asks ``native.prefer(spec)`` after native has accepted a call; when it names a backend
that also accepts the call (with the hooks the path needs), that backend runs it. An explicit
``backend="native"`` always runs native.

(On ARM, ``auto`` tries ``sdpa`` before native anyway: ``backends.ARM_CPU``.)

- Small calls: below ``SMALL_CALL_WORK[kind][threads]`` multiply-adds (``call_work``) ``auto``
  prefers ``sdpa``, per thread count (``thread_bucket``: "1", or "2+" for two threads or more,
  measured at two: native's threads cost more than they bring on a small prefill) and per kind of call (``call_kind``: "decode", few query rows per kv head, which
  native runs with its split-K decode kernel; "prefill", the rest). The thresholds are measured
  by ``benchmarks/auto_rules.py`` (both backends called through ``selfattn.attention``, which is
  what ``auto`` chooses between, interleaved, medians, 1 and 2 threads): per kind and thread
  count, one more than the work of the largest shape native was slower on. ``benchmarks/results/auto_rules.json`` holds the
  measurement; a test checks that these constants are the ones it found.
- bfloat16 on a CPU with bf16 dot products (``amx_bf16`` or ``avx512_bf16`` in its flags):
  torch's SDPA runs oneDNN's bf16 kernels there while native converts to float32 and computes
  in it. Measured by ``benchmarks/cpu.py`` (forward N=4096 bf16): on an Intel Xeon with AMX,
  SDPA took 45 ms against native's 122 ms (``results/cpu.json``); on the AMD EPYC without bf16
  dot products native was 2.3x faster. Float16 was not measured, and keeps native.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ...spec import AttentionSpec

__all__ = [
    "SMALL_CALL_WORK",
    "bf16_dot_products",
    "call_kind",
    "call_work",
    "prefer",
    "thread_bucket",
]

# benchmarks/results/auto_rules.json "threshold_work" (0: native was slower on no call of that
# kind at that thread count; prefill at 2 threads: B1 H8 64x64 D64 ran 1.23x slower through native)
SMALL_CALL_WORK = {
    "decode": {"1": 0, "2+": 0},
    "prefill": {"1": 262145, "2+": 4194305},
}


def thread_bucket(threads: int) -> str:
    """The measured thread count a call's threshold is taken from: "1", or "2+" (two or more
    threads: measured at two)."""
    return "1" if threads <= 1 else "2+"


def call_work(spec: AttentionSpec) -> int:
    """Multiply-adds of a call without rules: B * Hq * Nq * Nk * (D + Dv)."""
    return spec.B * spec.Hq * spec.Nq * spec.Nk * (spec.D + spec.Dv)


def call_kind(nq: int, hq: int, hkv: int) -> str:
    """ "decode" where native's split-K decode kernel runs the call (the query rows of a kv
    head's group fit one 16-row tile), else "prefill"."""
    return "decode" if nq * (hq // max(hkv, 1)) <= 16 and nq <= 6 else "prefill"


@functools.cache
def bf16_dot_products() -> bool:
    """Whether this CPU reports bf16 dot-product instructions (AMX-BF16 or AVX512-BF16) in
    Linux's /proc/cpuinfo; False where that file is missing (the rule is not applied)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return "amx_bf16" in flags or "avx512_bf16" in flags


def prefer(spec: AttentionSpec) -> tuple[str, str] | None:
    """``(backend, why)`` that ``auto`` should run instead of native when it accepts the call,
    else None."""
    if spec.dtype == torch.bfloat16 and bf16_dot_products():
        why = "bfloat16 on a CPU with bf16 dot products ran faster through SDPA's oneDNN kernels"
        return "sdpa", why + " (benchmarks/results/cpu.json)"
    kind = call_kind(spec.Nq, spec.Hq, spec.Hkv)
    threads = thread_bucket(torch.get_num_threads())
    limit = SMALL_CALL_WORK[kind][threads]
    if limit > 0 and call_work(spec) < limit:
        why = (
            f"a {kind} call this small ({call_work(spec)} < {limit} multiply-adds, "
            f"{threads} thread(s)) ran faster "
        )
        return "sdpa", why + "through SDPA (benchmarks/results/auto_rules.json)"
    return None
