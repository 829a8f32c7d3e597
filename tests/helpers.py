"""Shared test cases, the float64 oracle and the FlashAttention tolerance rule.

The rule (from flash-attention's tests): a backend's error against the float64 specification
must be at most a small multiple of the error of a plain same-dtype torch implementation, plus a
small floor for the dtype. "Plain" means the textbook formula computed in the input dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from selfattn import reference

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
    return reference.attention(to_np(q), to_np(k), to_np(v), return_lse=True, **reference_kwargs(kwargs))


def plain_attention(q, k, v, **kwargs) -> torch.Tensor:
    """The textbook formula in the inputs' own dtype (the yardstick of the tolerance rule)."""
    dt = q.dtype
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = kwargs.get("scale") or 1.0 / math.sqrt(d)
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
    seg = kwargs.get("segment_ids")
    if isinstance(seg, torch.Tensor):
        seg = (seg.numpy(), seg.numpy())
    elif seg is not None:
        seg = tuple(x.numpy() for x in seg)
    vis = reference.visibility(
        nq, nk, causal=kwargs.get("causal", False), window=kwargs.get("window"),
        mask=to_np(kwargs.get("mask")), segment_ids=seg, q_ndim=4,
    )  # fmt: skip
    vis_t = torch.from_numpy(np.ascontiguousarray(vis))
    s = s.masked_fill(~vis_t, -math.inf)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows
    return p @ v


def max_err(a: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    a = to_np(a) if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    both_inf = np.isneginf(a) & np.isneginf(ref)
    diff = np.where(both_inf, 0.0, np.abs(a - ref))
    return float(np.max(diff)) if diff.size else 0.0


def assert_close(out: torch.Tensor, ref: np.ndarray, plain: torch.Tensor | None, dtype, what="") -> None:
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
