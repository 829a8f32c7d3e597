"""Shared test cases, the float64 oracle and the FlashAttention tolerance rule.

The rule (from flash-attention's tests): a backend's error against the float64 specification
must be at most a small multiple of the error of a plain same-dtype torch implementation, plus a
small floor for the dtype. "Plain" means the textbook formula computed in the input dtype.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from selfattn import reference
from selfattn.trainer import torch_threads  # noqa: F401  (the tests' thread switch)

# Curated odd shapes: (Nq, Nk). Lengths 1, 97, 113, 255, 257, 1023, 1025; Nq != Nk both ways.
LENGTHS = [1, 97, 113, 255, 257, 1023, 1025]
HEAD_DIMS = [40, 64, 80, 128]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# How many times the plain implementation's error a backend may have, and the floor per dtype.
ERR_MULTIPLE = 3.0
ERR_FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def to_np(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    t = t.detach().cpu()
    return (t.double() if t.is_floating_point() else t).numpy()


def reference_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of selfattn.attention, converted for selfattn.reference."""
    out = {}
    for name, val in kwargs.items():
        if name == "backend":
            continue
        if isinstance(val, torch.Tensor):
            val = to_np(val)
        elif isinstance(val, tuple) and val and isinstance(val[0], torch.Tensor):
            val = tuple(to_np(x) for x in val)
        out[name] = val
    return out


def ref_attention(q, k, v, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(out, lse) of the float64 specification for torch inputs."""
    return reference.attention(
        to_np(q), to_np(k), to_np(v), return_lse=True, **reference_kwargs(kwargs)
    )


def plain_attention(q, k, v, **kwargs) -> torch.Tensor:
    """The textbook formula in the inputs' own dtype (the yardstick of the tolerance rule)."""
    p = torch.softmax(plain_scores(q, k, **kwargs), dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows
    return p @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)


def max_err(a: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    a = to_np(a) if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    both_inf = np.isneginf(a) & np.isneginf(ref)
    with np.errstate(invalid="ignore"):  # -inf - -inf: those entries are masked out below
        diff = np.where(both_inf, 0.0, np.abs(a - ref))
    return float(np.max(diff)) if diff.size else 0.0


def assert_close(
    out: torch.Tensor, ref: np.ndarray, plain: torch.Tensor | None, dtype, what=""
) -> None:
    """The FlashAttention rule: err(out) <= ERR_MULTIPLE * err(plain) + floor(dtype)."""
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    o = to_np(out)
    assert not np.isnan(o).any(), f"{what}: NaN in output"
    err = max_err(o, ref)
    base = max_err(plain, ref) if plain is not None else 0.0
    if not math.isfinite(base):
        base = 0.0
    tol = ERR_MULTIPLE * base + ERR_FLOOR[dtype]
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g} (plain {dtype} error {base:.3g})"


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
CPU_BACKENDS = ["reference", "math", "tiled", "sdpa", "auto"]
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


def plain_scores(q, k, **kwargs) -> torch.Tensor:
    """Scores after steps 1-5 in q's dtype, invisible ones -inf, (B, Hq, Nq, Nk); differentiable.

    Steps 1-5 of the textbook formula that :func:`plain_attention` completes.
    """
    dt = q.dtype
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = kwargs.get("scale")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if kwargs.get("softcap"):
        c = kwargs["softcap"]
        s = c * torch.tanh(s / c)
    if kwargs.get("bias") is not None:
        s = s + kwargs["bias"].to(dt)
    if kwargs.get("alibi_slopes") is not None:
        sl = kwargs["alibi_slopes"].to(dt)
        i = torch.arange(nq)[:, None] + nk - nq
        dist = (i - torch.arange(nk)[None]).abs().to(dt)
        s = s - sl[..., None, None] * dist
    vis = ref_visibility(nq, nk, **kwargs)
    return s.masked_fill(~torch.from_numpy(np.ascontiguousarray(vis)), -math.inf)


def ref_visibility(nq: int, nk: int, **kwargs) -> np.ndarray:
    """The specification's visibility for torch-valued rule arguments, broadcastable to 4-D."""
    seg = kwargs.get("segment_ids")
    if isinstance(seg, torch.Tensor):
        seg = (to_np(seg), to_np(seg))
    elif seg is not None:
        seg = tuple(to_np(x) for x in seg)
    return reference.visibility(
        nq, nk, causal=kwargs.get("causal", False), window=kwargs.get("window"),
        mask=to_np(kwargs.get("mask")), segment_ids=seg, q_ndim=4,
    )  # fmt: skip


def plain_lse(q, k, **kwargs) -> torch.Tensor:
    """Natural-log logsumexp of the visible scores, in q's dtype, (B, Hq, Nq); -inf when empty."""
    return torch.logsumexp(plain_scores(q, k, **kwargs), dim=-1)


def ref_weights(q, k, **kwargs) -> np.ndarray:
    """The specification's probabilities, float64 (B, Hq, Nq, Nk); rows seeing nothing are 0."""
    qn, kn = to_np(q), to_np(k)
    kn = np.repeat(kn, qn.shape[1] // kn.shape[1], axis=1)
    rk = reference_kwargs(kwargs)
    s = reference.scores(
        qn, kn, scale=rk.get("scale"), softcap=rk.get("softcap"), bias=rk.get("bias"),
        alibi_slopes=rk.get("alibi_slopes"),
    )  # fmt: skip
    vis = np.broadcast_to(ref_visibility(qn.shape[2], kn.shape[2], **kwargs), s.shape)
    p, _ = reference.softmax(s, vis)
    return p


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
    from selfattn.backends import tiled

    old = tiled.MIN_PARALLEL_SCORES
    tiled.MIN_PARALLEL_SCORES = min_scores
    try:
        yield
    finally:
        tiled.MIN_PARALLEL_SCORES = old
