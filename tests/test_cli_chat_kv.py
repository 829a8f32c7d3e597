"""``selfattn chat --kv-bits --kv-rotate --kv-residual --kv-budget --kv-policy --kv-sinks``: the
chat runs on ``make_cache`` (also without them: the in-place float cache) and reports the cache's
size in bytes with each reply; bad values end with one line and exit status 2 before the model
loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from selfattn.cli import kv, main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kv-bits", "3"], "expected 8, 4 or KEY_BITS,VALUE_BITS such as 8,4; got '3'"),
        (["--kv-bits", "eight"], "expected 8, 4 or KEY_BITS,VALUE_BITS .*got 'eight'"),
        (["--kv-bits", "8,3"], "expected 8, 4 or KEY_BITS,VALUE_BITS .*got '8,3'"),
        (["--kv-bits", "8,4,4"], "expected 8, 4 or KEY_BITS,VALUE_BITS .*got '8,4,4'"),
        (["--kv-bits", "8,"], "expected 8, 4 or KEY_BITS,VALUE_BITS .*got '8,'"),
        (["--kv-bits", "8,4", "--attn", "sdpa"], "--kv-bits needs --attn selfattn"),
        (["--kv-budget", "0"], "expected an integer >= 1, got 0"),
        (["--kv-budget", "12", "--kv-policy", "lru"], "invalid choice: 'lru'"),
        (["--kv-budget", "12", "--kv-policy", "sink", "--kv-sinks", "-1"], ">= 0, got -1"),
        (["--kv-rotate"], "--kv-rotate .* needs --kv-bits"),
        (["--kv-residual", "64"], "--kv-residual .* needs --kv-bits"),
        (["--kv-bits", "4", "--kv-residual", "-1"], "expected an integer >= 0, got -1"),
        (["--kv-bits", "4", "--kv-residual", "many"], "expected an integer, got 'many'"),
        (["--kv-policy", "sink"], "--kv-policy .* needs --kv-budget N"),
        (["--kv-budget", "9", "--kv-sinks", "2"], "--kv-sinks is for --kv-policy sink, not h2o"),
        (["--kv-bits", "8", "--attn", "sdpa"], "--kv-bits needs --attn selfattn"),
        (["--kv-budget", "9", "--attn", "eager"], "--kv-policy h2o .* needs --attn selfattn"),
    ],
)
def test_chat_bad_kv_options_end_with_one_line_and_status_2(capsys, argv, message):
    import re

    assert main(["chat", "hi", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfattn chat"), err
    assert re.search(message, err[0]), err[0]


def test_chat_kv_policies_are_make_cache_policies():
    from selfattn.integrations.evict import POLICIES, SCORED

    assert kv.POLICIES == POLICIES and kv.SCORED == SCORED


@pytest.fixture(scope="module")
def smollm2_folder():
    from selfattn.pretrained import smollm2

    try:
        return smollm2.folder()
    except ValueError as exc:  # the message is the pip command
        pytest.skip(str(exc))


def _chat(*argv, stdin=None):
    env = {**os.environ, "TERM": "dumb", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "selfattn", "chat", "--threads", "1", "--json", *argv]
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    replies = [json.loads(line) for line in res.stdout.splitlines()]
    return replies if stdin is not None else replies[0]


def test_chat_reports_the_kv_cache_size_plain_and_quantized_with_a_budget(smollm2_folder):
    """The prompt (about 30 tokens with the template) is past a budget of 16: int8 keys and
    values held to 16 tokens per layer take less than the plain float cache."""
    question = ("What is the capital of France?", "--max-new-tokens", "3")
    plain = _chat(*question)
    small = _chat(*question, "--kv-bits", "8", "--kv-budget", "16", "--kv-policy", "h2o")
    assert plain["kv_cache"] == "float" and small["kv_cache"] == "int8, budget 16 h2o"
    assert plain["reply"] == "The capital of" and small["tokens"] == 3
    assert 0 < small["kv_cache_bytes"] < plain["kv_cache_bytes"]
    assert small["prompt_tokens"] > 16


def test_chat_kv_bits_pair_stores_int8_keys_and_4bit_values(smollm2_folder):
    """``--kv-bits 8,4``: make_cache(bits=(8, 4)); the cache is smaller than int8 for both
    sides and larger than 4 bits for both, and the reply is the plain cache's. (``--kv-residual
    0``: every token quantized at once; make_cache's default window of 128 float tokens would
    hold this whole short chat.)"""
    question = ("What is the capital of France?", "--max-new-tokens", "3", "--kv-residual", "0")
    sizes = {}
    for bits in ("8", "8,4", "4"):
        out = _chat(*question, "--kv-bits", bits, "--kv-rotate")
        sizes[bits] = out["kv_cache_bytes"]
        if bits == "8,4":
            assert out["kv_cache"] == "int8 keys, int4 values+rotation, residual 0"
            assert out["reply"] == "The capital of"
    assert sizes["4"] < sizes["8,4"] < sizes["8"], sizes


def test_chat_keeps_one_budget_cache_across_turns_past_the_budget(smollm2_folder):
    """Three turns on a 24-token sink budget: the second turn prefills only its own tokens (the
    conversation's cache is reused past its budget); /reset starts a fresh cache."""
    stdin = "Name a colour.\nAnd another one?\n/reset\nName a fruit.\n"
    opts = ("--max-new-tokens", "6", "--kv-budget", "24", "--kv-policy", "sink")
    first, second, third = _chat(*opts, stdin=stdin)
    assert first["prefill_tokens"] == first["prompt_tokens"] > 24
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["tokens"]
    assert 0 < second["prefill_tokens"] < second["prompt_tokens"] - first["prompt_tokens"]
    assert third["prefill_tokens"] == third["prompt_tokens"]  # /reset: a fresh cache
    assert second["kv_cache"] == "float, budget 24 sink"
