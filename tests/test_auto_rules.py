"""``auto``'s measured rules: where it lets torch's SDPA run a call native could run
(``backends/native/choice.py``); ``backend="native"`` by name always runs native."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import selfattn
from helpers import make_qkv
from selfattn import backends
from selfattn.backends import BACKENDS, select
from selfattn.backends.native import choice
from selfattn.spec import validate

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        BACKENDS["native"].unavailable() is not None, reason="the native engine is unavailable"
    ),
]

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "auto_rules.json"


def test_auto_keeps_native_above_the_small_call_size(monkeypatch):
    monkeypatch.setattr(backends, "ARM_MACHINES", ())  # on ARM, sdpa comes first anyway
    spec = validate(*make_qkv(1, 9, 3, 1, 40, 64), causal=True)  # a decode step, 40 keys
    work = choice.call_work(spec)
    assert work == 1 * 9 * 1 * 40 * 128
    assert choice.call_kind(1, 9, 3) == "decode" and choice.call_kind(16, 8, 8) == "prefill"
    monkeypatch.setitem(choice.SMALL_CALL_WORK, "decode", {"1": work, "2+": work + 1})
    assert select(spec, "auto").name == "native"  # not below the threshold (one thread)
    monkeypatch.setitem(choice.SMALL_CALL_WORK, "prefill", {"1": work + 1, "2+": work + 1})
    assert select(spec, "auto").name == "native"  # the other kind's threshold
    monkeypatch.setitem(choice.SMALL_CALL_WORK, "decode", {"1": work + 1, "2+": 0})
    assert select(spec, "auto").name == "sdpa"
    assert select(spec, "native").name == "native"
    assert "auto prefers sdpa: a decode call this small" in selfattn.explain(
        *make_qkv(1, 9, 3, 1, 40, 64), causal=True
    )


def test_auto_sends_a_measured_small_prefill_to_sdpa_and_gets_the_same_answer():
    # on x86, B1 H8 16x16 ran 1.66x slower through native than through SDPA (auto_rules.json)
    q, k, v = make_qkv(1, 8, 8, 16, 16, 64)
    spec = validate(q, k, v)
    limit = choice.SMALL_CALL_WORK["prefill"]["1"]  # the one_thread fixture
    expect = "sdpa" if limit > choice.call_work(spec) else "native"
    assert select(spec, "auto").name == expect
    torch.testing.assert_close(
        selfattn.attention(q, k, v), selfattn.attention(q, k, v, backend="native")
    )


def test_auto_takes_the_threshold_of_the_thread_count_it_runs_at(monkeypatch):
    """Measured: a 64x64 prefill (B1 H8 D64) ran 1.23x slower through native at two threads and
    0.91x at one (auto_rules.json), so the thresholds are kept per thread count."""
    monkeypatch.setattr(backends, "ARM_MACHINES", ())
    spec = validate(*make_qkv(1, 8, 8, 64, 64, 64))
    work = choice.call_work(spec)
    monkeypatch.setitem(choice.SMALL_CALL_WORK, "prefill", {"1": 0, "2+": work + 1})
    assert choice.thread_bucket(1) == "1" and choice.thread_bucket(2) == choice.thread_bucket(16)
    assert select(spec, "auto").name == "native"  # one thread (fixture)
    torch.set_num_threads(2)
    try:
        assert select(spec, "auto").name == "sdpa"
    finally:
        torch.set_num_threads(1)


def test_small_call_size_is_the_one_benchmarks_measured():
    measured = json.loads(RESULTS.read_text())
    assert measured["threshold_work"] == choice.SMALL_CALL_WORK


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_sends_bfloat16_to_sdpa_only_on_a_cpu_with_bf16_dot_products(monkeypatch, has_bf16):
    """Measured: on an Intel Xeon with AMX, SDPA's bf16 forward N=4096 took 45 ms against
    native's 122 ms (results/cpu.json); without bf16 dot products native was faster."""
    monkeypatch.setattr(backends, "ARM_MACHINES", ())
    monkeypatch.setattr(choice, "bf16_dot_products", lambda: has_bf16)
    q, k, v = (t.to(torch.bfloat16) for t in make_qkv(1, 4, 4, 97, 113, 64))
    spec = validate(q, k, v)
    assert select(spec, "auto").name == ("sdpa" if has_bf16 else "native")
    assert select(validate(*make_qkv(1, 4, 4, 97, 113, 64)), "auto").name == "native"  # fp32
    assert select(spec, "native").name == "native"
    if has_bf16:
        assert "bf16 dot products" in selfattn.explain(q, k, v)


def test_bf16_dot_products_reads_this_cpus_flags():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    expect = "amx_bf16" in flags.split() or "avx512_bf16" in flags.split()
    assert choice.bf16_dot_products() == expect
