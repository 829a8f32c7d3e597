"""Where ``auto`` lets torch's SDPA run a call that ``native`` could run: measured rules.

``auto`` asks ``native.prefer(spec)`` after native has accepted a call; when it names a backend
that also accepts the call (with the hooks the path needs), that backend runs it. An explicit
``backend="native"`` always runs native.

(On ARM, ``auto`` tries ``sdpa`` before native anyway: ``backends.ARM_CPU``.)

- Small calls: below ``SMALL_CALL_WORK[kind]`` multiply-adds (``call_work``) ``auto``
  prefers ``sdpa``, per kind of call (``call_kind``: "decode", few query rows per kv head, which
  native runs with its split-K decode kernel; "prefill", the rest). The thresholds are measured
  by ``benchmarks/auto_rules.py`` (both backends called through ``selfattn.attention``, which is
  what ``auto`` chooses between, interleaved, medians, 1 and 2 threads): per kind, one more
  than the work of the largest shape native was slower on. ``benchmarks/results/auto_rules.json`` holds the
  measurement; a test checks that these constants are the ones it found.
"""

from __future__ import annotations

from ...spec import AttentionSpec

__all__ = ["SMALL_CALL_WORK", "call_kind", "call_work", "prefer"]

# benchmarks/results/auto_rules.json "threshold_work" (0: native was slower on no call of that
# kind; prefill: B1 H8 16x16 D64 ran 1.66x slower through native, 1 thread)
SMALL_CALL_WORK = {"decode": 0, "prefill": 262145}


def call_work(spec: AttentionSpec) -> int:
    """Multiply-adds of a call without rules: B * Hq * Nq * Nk * (D + Dv)."""
    return spec.B * spec.Hq * spec.Nq * spec.Nk * (spec.D + spec.Dv)


def call_kind(nq: int, hq: int, hkv: int) -> str:
    """ "decode" where native's split-K decode kernel runs the call (the query rows of a kv
    head's group fit one 16-row tile), else "prefill"."""
    return "decode" if nq * (hq // max(hkv, 1)) <= 16 and nq <= 6 else "prefill"


def prefer(spec: AttentionSpec) -> tuple[str, str] | None:
    """``(backend, why)`` that ``auto`` should run instead of native when it accepts the call,
    else None."""
    kind = call_kind(spec.Nq, spec.Hq, spec.Hkv)
    limit = SMALL_CALL_WORK[kind]
    if limit > 0 and call_work(spec) < limit:
        why = f"a {kind} call this small ({call_work(spec)} < {limit} multiply-adds) ran faster "
        return "sdpa", why + "through SDPA (benchmarks/results/auto_rules.json)"
    return None
