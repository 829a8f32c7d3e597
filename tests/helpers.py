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


def tiny_llama(
    layers: int = 2, kv_heads: int = 2, positions: int = 256, attn: str | None = "selfattn"
):
    """A seeded random Llama from transformers' own config class (vocabulary 101, hidden 32, 4
    query heads), in eval mode; ``attn`` its attention implementation (None: transformers')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    extra = {} if attn is None else {"attn_implementation": attn}
    cfg = LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=positions,
        **extra,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def replay_two_turns_against_masked_reference(model, cache, budget: int, check=None) -> None:
    """Feed ``model`` a 20-token prompt, 6 greedy decode steps, a 5-token second turn and 4 more
    steps through ``cache`` (an eviction cache of ``budget`` tokens), and before each call mask
    a ``DynamicCache`` reference to exactly the tokens layer 0 kept (and the new ones, causally),
    at their original positions: the logits must agree and the layer hold ``min(budget, seen)``
    tokens. ``check(layer, seen, n)`` runs after each call."""
    from transformers.cache_utils import DynamicCache

    ref = DynamicCache()
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(1)
    feeds = [torch.randint(1, 101, (1, 20), generator=g)] + [None] * 6
    feeds += [torch.randint(1, 101, (1, 5), generator=g)] + [None] * 4
    logits = None
    with torch.no_grad():
        for ids in feeds:
            if ids is None:
                ids = logits[:, -1:].argmax(-1)
            seen, n = cache.get_seq_length(), ids.shape[1]
            kept = layer.positions[0, 0, : layer.end].tolist() if layer.is_initialized else []
            mask = torch.zeros(1, 1, n, seen + n, dtype=torch.bool)
            mask[..., kept] = True
            mask[0, 0, :, seen:] = torch.ones(n, n).tril().bool()
            pos = torch.arange(seen, seen + n)[None]
            want = model(input_ids=ids, attention_mask=mask, cache=ref, position_ids=pos).logits
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
            assert layer.end == min(budget, seen + n) and cache.get_seq_length() == seen + n
            if check is not None:
                check(layer, seen, n)
