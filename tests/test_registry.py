"""The backend registry: every path (attention, attention_weights, the custom op's backward,
ring blocks) picks its backend through ``select``, by the hooks it needs."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

import selfattn
from helpers import make_qkv
from selfattn._compile import attention_op
from selfattn.api import WEIGHTS_HOOKS
from selfattn.backends import BACKENDS, HOOKS, refusals, select
from selfattn.distributed.ring import BLOCK_HOOKS
from selfattn.spec import UnsupportedInputs, validate

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_hooks_each_backend_offers():
    """Which optional hooks each backend offers (a missing one is a refusal, not an error)."""
    offered = {
        name: {h for h in HOOKS if getattr(b, h, None) is not None} for name, b in BACKENDS.items()
    }
    assert offered["tiled"] == {"forward", "backward", "weights", "stats"}
    assert offered["triton"] == {"forward", "backward", "weights", "stats"}
    assert offered["math"] == {"backward"}
    assert offered["sdpa"] == set()
    assert offered["reference"] == set()
    assert offered["native"] == {"forward", "backward", "weights", "stats", "forward_stats"}


def test_a_missing_hook_is_a_named_refusal():
    spec = validate(*make_qkv(1, 2, 2, 5, 5, 8))
    assert refusals(spec, "sdpa", need=("weights",)) == ["offers no weights hook"]
    assert refusals(spec, "reference", need=BLOCK_HOOKS) == ["offers no forward or backward hook"]
    cpu_engine = "native" if "native" in selfattn.available_backends() else "tiled"
    assert select(spec, "auto", need=WEIGHTS_HOOKS).name == cpu_engine
    with pytest.raises(UnsupportedInputs, match="needs the weights hook") as info:
        select(spec, "math", need=WEIGHTS_HOOKS)
    assert info.value.reasons == {"math": ["offers no weights hook"]}


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_paths_select_triton(monkeypatch):
    """On a CUDA device every path picks the Triton kernels (the selection logic, run on a CPU
    by declaring a CUDA device: nothing is launched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = replace(validate(*make_qkv(1, 4, 2, 9, 9, 64), causal=True), device=torch.device("cuda"))
    assert select(spec, "auto").name == "triton"  # attention
    assert select(spec, "auto", need=WEIGHTS_HOOKS).name == "triton"  # attention_weights
    assert select(spec, "auto", need=("backward",)).name == "triton"  # the custom op's backward
    block = replace(spec, Nq=4, Nk=9, start=2)  # a ring block: rows at positions 2..5
    assert select(block, "auto", need=BLOCK_HOOKS).name == "triton"
    # float64 is for the CPU backends: the next backend that offers the hook takes it
    spec64 = replace(spec, dtype=torch.float64)
    assert select(spec64, "auto", need=WEIGHTS_HOOKS).name == "tiled"
    assert select(spec64, "auto", need=BLOCK_HOOKS).name == "tiled"


def _spy(monkeypatch, name: str, hook: str) -> list:
    backend = BACKENDS[name]
    real, calls = getattr(backend, hook), []

    def spy(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(backend, hook, spy)
    return calls


@pytest.mark.parametrize("name", ["math", "tiled", "native"])
def test_custom_op_backward_runs_the_forward_backends_own_hook(monkeypatch, name):
    """Under the custom op (torch.compile's path) the backward of backend ``name`` is its own
    hook, not always the tiled engine's, and gives the gradients of eager autograd."""
    if name not in selfattn.available_backends():
        pytest.skip(f"{name}: {BACKENDS[name].unavailable()}")
    q, k, v = make_qkv(1, 4, 2, 6, 6, 8, requires_grad=True)
    calls = _spy(monkeypatch, name, "backward")
    out = attention_op(q, k, v, causal=True, backend=name)
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert len(calls) == 1
    want = torch.autograd.grad(selfattn.attention(q, k, v, causal=True).square().sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_custom_op_backward_without_a_hook_falls_back_to_auto(monkeypatch):
    """``reference`` has no autograd: under the custom op its gradients come from the first
    ``auto`` backend that offers a backward (the native engine on the CPU, else tiled)."""
    q, k, v = make_qkv(1, 2, 1, 5, 7, 8, requires_grad=True)
    cpu_engine = "native" if "native" in selfattn.available_backends() else "tiled"
    calls = _spy(monkeypatch, cpu_engine, "backward")
    out = attention_op(q, k, v, window=(2, 1), backend="reference")
    got = torch.autograd.grad(out.sum(), (q, k, v))
    assert len(calls) == 1
    want = torch.autograd.grad(
        selfattn.attention(q, k, v, window=(2, 1), backend="math").sum(), (q, k, v)
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_weights_goes_through_the_weights_hook(monkeypatch):
    q, k, _ = make_qkv(1, 4, 2, 6, 9, 8)
    cpu_engine = "native" if "native" in selfattn.available_backends() else "tiled"
    calls = _spy(monkeypatch, cpu_engine, "weights")
    p = selfattn.attention_weights(q, k, causal=True, heads=[1, 3], rows=slice(0, 4))
    assert len(calls) == 1 and p.shape == (1, 2, 4, 9)


def test_math_backward_hook_equals_autograd_of_the_formula():
    """The written-out derivative of ``math`` equals torch's autograd of its forward (float64,
    every rule at once, padding rows that see nothing, dropout, a gradient through the lse)."""
    from selfattn.backends.math import math_attention, math_backward

    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 4, 2, 7, 9, 8, dtype=torch.float64)
    bias = torch.randn(2, 1, 7, 9, generator=g, dtype=torch.float64)
    slopes = torch.rand(2, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(7, 9, generator=g) > 0.2
    ids = (torch.tensor([[0] * 4 + [1] * 3, [0] * 6 + [-1]]), torch.tensor([[0] * 5 + [1] * 4] * 2))
    rules = dict(causal=True, window=(6, 1), mask=mask, softcap=2.5, segment_ids=ids, dropout_p=0.3)
    # math returns a float32 lse (the contract), so its autograd through the lse is float32-exact
    for with_dlse, tol in ((False, 1e-12), (True, 1e-6)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias, slopes)]
        spec = validate(
            *leaves[:3], bias=leaves[3], alibi_slopes=leaves[4], return_lse=True, **rules
        )
        out, lse = math_attention(spec, *leaves[:3], seed=(11, 12))
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
        dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64) if with_dlse else None
        loss = (out * dout).sum()
        if with_dlse:
            loss = loss + (torch.where(torch.isinf(lse), 0, lse) * dlse).sum()
        want = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            got = math_backward(spec, q, k, v, dout, dlse, (11, 12), True, True)
        for name, a, b in zip(("dq", "dk", "dv", "dbias", "dalibi"), got, want):
            torch.testing.assert_close(a.reshape(b.shape), b, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize(
    ("nq", "nk", "rules", "picks_sdpa"),
    [
        (1, 300, {"causal": True}, True),  # a decode step sees every key: a plain call for torch
        (1, 300, {"window": (400, 0)}, True),  # a window wider than the cache hides nothing
        (1, 300, {"causal": True, "window": (20, 0)}, False),  # this one hides keys
        (64, 64, {"causal": True}, True),  # square: top-left and bottom-right agree
        (4, 300, {"causal": True}, False),  # torch would align these rows top-left
    ],
)
def test_sdpa_takes_causal_calls_torch_means_the_same(nq, nk, rules, picks_sdpa):
    """sdpa takes a decode step whose causal flag hides nothing (so ``auto`` without the native
    engine never sends it to the slower torch-op engine), and never a causal call that torch
    would align differently."""
    q, k, v = make_qkv(1, 9, 3, nq, nk, 16)
    spec = validate(q, k, v, **rules)
    assert (refusals(spec, "sdpa") == []) == picks_sdpa
    got = selfattn.attention(q, k, v, **rules, backend="sdpa" if picks_sdpa else "auto")
    want = selfattn.attention(q, k, v, **rules, backend="math")
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_without_the_native_engine_auto_falls_back(monkeypatch):
    """Where the extension cannot be built (no compiler), ``native`` is unavailable with the
    reason, and ``auto`` runs what exists without it: sdpa for plain calls, tiled for the rest."""
    from selfattn.backends.native import build

    reason = "no C++ compiler found ('c++' is not an executable; install g++: apt-get install g++)"
    monkeypatch.setattr(build, "unavailable", lambda: reason)
    assert "native" not in selfattn.available_backends()
    assert refusals(validate(*make_qkv(1, 2, 2, 5, 5, 8)), "native") == [reason]
    q, k, v = make_qkv(1, 4, 2, 9, 9, 8)
    assert select(validate(q, k, v), "auto").name == "sdpa"
    assert select(validate(q, k, v, window=(2, 0)), "auto").name == "tiled"
    assert select(validate(q, k, v), "auto", need=WEIGHTS_HOOKS).name == "tiled"
    with pytest.raises(UnsupportedInputs, match="install g\\+\\+"):
        selfattn.attention(q, k, v, backend="native")


def test_native_weights_and_exact_output_for_16_bit_inputs():
    """The native weights hook (its probabilities kernel, runs of rows) equals tiled's, and its
    backward keeps 16-bit inputs' bias gradient float32-accurate through the custom op too."""
    if "native" not in selfattn.available_backends():
        pytest.skip(BACKENDS["native"].unavailable())
    q, k, _ = make_qkv(2, 6, 2, 70, 90, 16)
    bias = torch.randn(1, 6, 70, 90)
    spec = validate(q, k, None, need_v=False, causal=True, bias=bias, softcap=3.0)
    heads, rows = torch.tensor([5, 0, 3]), torch.tensor([7, 8, 9, 69, 0, 1, 40])
    got = BACKENDS["native"].weights(spec, q, k, None, heads, rows)
    want = BACKENDS["tiled"].weights(spec, q, k, None, heads, rows)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    q, k, v = (t.to(torch.bfloat16) for t in make_qkv(1, 2, 1, 64, 64, 16))
    b = torch.randn(1, 2, 64, 1, requires_grad=True)  # a per-query bias: its true gradient is 0
    out = attention_op(q, k, v, bias=b, causal=True, backend="native")
    (grad,) = torch.autograd.grad(out.float().square().sum(), b)
    assert grad.abs().max().item() < 1e-5


def test_native_is_bitwise_repeatable_for_any_threads_and_concurrent_calls():
    """Through selfattn.attention (auto -> native): forward and backward give bitwise the same
    result with 1 or 2 torch threads and when 4 Python threads call at once (the torch-op engine
    once gave 18 of 24 concurrent results that differed bitwise from the sequential ones)."""
    if "native" not in selfattn.available_backends():
        pytest.skip(BACKENDS["native"].unavailable())
    import threading

    from selfattn.testing import torch_threads

    q, k, v = make_qkv(2, 8, 2, 300, 700, 64, requires_grad=True)
    bias = torch.randn(1, 8, 300, 1, requires_grad=True)

    def run():
        out = selfattn.attention(q, k, v, causal=True, window=(400, 0), bias=bias)
        return (out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v, bias)))

    with torch_threads(1):
        want = run()
    with torch_threads(2):
        assert all(torch.equal(a, b) for a, b in zip(run(), want))
        results: list = []

        def worker():
            for _ in range(3):
                results.append(run())

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 12
    assert all(torch.equal(a, b) for got in results for a, b in zip(got, want))
