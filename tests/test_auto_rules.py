"""``auto``'s measured rules: where it lets torch's SDPA run a call native could run
(``backends/native/choice.py``); ``backend="native"`` by name always runs native."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import selfattn
from helpers import make_qkv
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


def test_auto_on_arm_prefers_sdpa_where_sdpa_can_run_the_call(monkeypatch):
    monkeypatch.setattr(choice, "MACHINE", "aarch64")
    q, k, v = make_qkv(1, 4, 2, 7, 7, 16)
    plain = validate(q, k, v)
    assert select(plain, "auto").name == "sdpa"
    assert select(validate(q, k, v, causal=True), "auto").name == "sdpa"  # square causal
    assert select(plain, "native").name == "native"  # by name: native
    # what SDPA declines stays with native: windows, the lse, softcap, the hooks
    assert select(validate(q, k, v, window=(2, 0)), "auto").name == "native"
    assert select(validate(q, k, v, return_lse=True), "auto").name == "native"
    assert select(validate(q, k, v, softcap=5.0), "auto").name == "native"
    assert select(plain, "auto", need=("forward",)).name == "native"
    assert "auto prefers sdpa" in selfattn.explain(q, k, v)
    out = selfattn.attention(q, k, v)
    torch.testing.assert_close(out, selfattn.attention(q, k, v, backend="native"))


def test_auto_on_arm64_macos_name_too(monkeypatch):
    monkeypatch.setattr(choice, "MACHINE", "arm64")
    assert select(validate(*make_qkv(1, 2, 2, 3, 3, 8)), "auto").name == "sdpa"


def test_auto_on_x86_keeps_native_above_the_small_call_size(monkeypatch):
    monkeypatch.setattr(choice, "MACHINE", "x86_64")
    spec = validate(*make_qkv(1, 9, 3, 1, 40, 64), causal=True)  # a decode step, 40 keys
    work = choice.call_work(spec)
    assert work == 1 * 9 * 1 * 40 * 128
    assert choice.call_kind(1, 9, 3) == "decode" and choice.call_kind(16, 8, 8) == "prefill"
    monkeypatch.setitem(choice.SMALL_CALL_WORK, "decode", work)
    assert select(spec, "auto").name == "native"  # not below the threshold
    monkeypatch.setitem(choice.SMALL_CALL_WORK, "prefill", work + 1)
    assert select(spec, "auto").name == "native"  # the other kind's threshold
    monkeypatch.setitem(choice.SMALL_CALL_WORK, "decode", work + 1)
    assert select(spec, "auto").name == "sdpa"
    assert select(spec, "native").name == "native"
    assert "auto prefers sdpa: a decode call this small" in selfattn.explain(
        *make_qkv(1, 9, 3, 1, 40, 64), causal=True
    )


def test_auto_sends_a_measured_small_prefill_to_sdpa_and_gets_the_same_answer():
    # on x86, B1 H8 16x16 ran 1.66x slower through native than through SDPA (auto_rules.json)
    q, k, v = make_qkv(1, 8, 8, 16, 16, 64)
    spec = validate(q, k, v)
    expect = (
        "sdpa"
        if choice.MACHINE in choice.ARM
        or choice.SMALL_CALL_WORK["prefill"] > (choice.call_work(spec))
        else "native"
    )
    assert select(spec, "auto").name == expect
    torch.testing.assert_close(
        selfattn.attention(q, k, v), selfattn.attention(q, k, v, backend="native")
    )


def test_small_call_size_is_the_one_benchmarks_measured():
    measured = json.loads(RESULTS.read_text())
    assert measured["threshold_work"] == choice.SMALL_CALL_WORK
