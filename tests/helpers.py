"""Shared test cases: curated shapes, seeded inputs, running a backend, gradient helpers.

The float64 oracle, the plain same-dtype formula and the FlashAttention tolerance rule live in
:mod:`selfattn.testing` (the demo uses them too); they are re-exported here for the tests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from selfattn.testing import (  # noqa: F401  (re-exported: the tests import them from here)
    ERR_FLOOR,
    ERR_MULTIPLE,
    assert_close,
    max_err,
    plain_attention,
    plain_lse,
    plain_scores,
    ref_attention,
    ref_stats,
    ref_visibility,
    ref_weights,
    reference_kwargs,
    to_np,
    torch_threads,
)

# Curated odd shapes: (Nq, Nk). Lengths 1, 97, 113, 255, 257, 1023, 1025; Nq != Nk both ways.
LENGTHS = [1, 97, 113, 255, 257, 1023, 1025]
HEAD_DIMS = [40, 64, 80, 128]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def packed_ids(b: int, n: int, seed: int, *, pad: int = 5, shortest: int = 1) -> torch.Tensor:
    """(B, N) ids of packed documents of random lengths (at least ``shortest``); odd batch
    elements end in ``pad`` padding positions (-1)."""
    g = gen(seed)
    ids = torch.empty(b, n, dtype=torch.int64)
    for i in range(b):
        cuts = torch.randint(shortest, max(shortest + 1, n // 3), (n,), generator=g).cumsum(0)
        ids[i] = torch.bucketize(torch.arange(n), cuts, right=True)
        if i % 2 == 1 and n > pad:
            ids[i, n - pad :] = -1
    return ids


def make_qkv(b, hq, hkv, nq, nk, d, dv=None, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, dv, generator=g).to(dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


@dataclass(frozen=True)
class Shape:
    """A named attention problem: batch, query and key/value heads, lengths, head dims."""

    name: str
    b: int
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    dv: int | None = None

    def qkv(self, dtype, seed=0):
        return make_qkv(self.b, self.hq, self.hkv, self.nq, self.nk, self.d, self.dv, dtype, seed)


# --- Running backends, and float64 oracles for gradients and weights ---------------------------

# Every backend that runs on the CPU, plus the dispatcher. `reference` declines autograd and
# `sdpa` declines every rule but causal; the others must accept every valid call.
CPU_BACKENDS = ["reference", "math", "tiled", "native", "sdpa", "auto"]
MAY_DECLINE = {"reference", "sdpa"}


def run_backend(backend: str, q, k, v, **kwargs):
    """``selfattn.attention`` on one backend; skips with the backend's own reason if it declines.

    Only ``reference`` and ``sdpa`` may decline: for any other backend a refusal fails the test.
    """
    import pytest

    import selfattn

    try:
        return selfattn.attention(q, k, v, backend=backend, **kwargs)
    except selfattn.UnsupportedInputs as exc:
        if backend not in MAY_DECLINE:
            raise
        why = "; ".join(exc.reasons.get(backend, [])) or str(exc)
        pytest.skip(f"{backend} declines: {why}")


def float64_leaves(*tensors):
    """Detached float64 copies that require grad (None stays None): inputs for the oracle."""
    return [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]


def grads(out: torch.Tensor, inputs, dout: torch.Tensor) -> list[torch.Tensor | None]:
    """d(sum(out * dout)) / d(inputs); None for inputs that are None or unused."""
    live = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, live, dout.to(out.dtype), allow_unused=True)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


@contextlib.contextmanager
def tiled_split(min_scores: int = 1 << 10):
    """Let the tiled engine split even small calls across threads (its threshold is tuned for
    speed, so test-sized calls would otherwise run in one thread)."""
    from selfattn.engine import threads

    old = threads.MIN_PARALLEL_SCORES
    threads.MIN_PARALLEL_SCORES = min_scores
    try:
        yield
    finally:
        threads.MIN_PARALLEL_SCORES = old


def jvp_memory_growth(backend: str, n: int = 4096) -> tuple[int, int]:
    """(JVP's, forward's) peak memory growth in bytes of ``attention`` on ``backend`` at B1 H8
    N=n D64 float32, each in a fresh process (``selfattn.bench.memory``), after a warm-up call
    of both on 64 rows (so neither counts a first call's one-off allocations)."""
    from selfattn.bench.memory import peak_memory_growth

    setup = (
        "import torch, selfattn\n"
        "g = torch.Generator().manual_seed(0)\n"
        f"q, k, v, tq, tk, tv = [torch.randn(1, 8, {n}, 64, generator=g) for _ in range(6)]\n"
        f"f = lambda q, k, v: selfattn.attention(q, k, v, backend={backend!r})\n"
        "s = slice(0, 64)\n"
        "torch.func.jvp(f, (q[:, :, s], k[:, :, s], v[:, :, s]), "
        "(tq[:, :, s], tk[:, :, s], tv[:, :, s]))\n"
    )
    fwd = peak_memory_growth("with torch.no_grad():\n    f(q, k, v)\n", setup=setup)["growth"]
    jvp = peak_memory_growth("torch.func.jvp(f, (q, k, v), (tq, tk, tv))\n", setup=setup)
    return jvp["growth"], fwd
