"""The yardsticks room: what the tests, the demo and the benchmarks share to judge a result: the
thread switch, the float64 reference for torch inputs, the plain same-dtype formula and the
FlashAttention tolerance rule (:func:`agreement`, :func:`assert_close`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import reference

__all__ = [
    "ERR_FLOOR",
    "ERR_MULTIPLE",
    "Agreement",
    "agreement",
    "assert_close",
    "max_err",
    "plain_attention",
    "plain_lse",
    "plain_scores",
    "ref_attention",
    "ref_stats",
    "ref_visibility",
    "ref_weights",
    "reference_kwargs",
    "to_np",
    "tolerance",
    "torch_threads",
]

# The tolerance rule (from flash-attention's tests): a result's error against the float64
# specification may be at most ERR_MULTIPLE times the error of the plain formula computed in the
# inputs' own dtype, plus a small floor for the dtype.
ERR_MULTIPLE = 3.0
ERR_FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``threads`` inside the block (left alone when None), and
    restored after it. On a busy machine 1 thread is often the fastest."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# -- the float64 reference for torch inputs -----------------------------------------------------


def to_np(t: torch.Tensor | None) -> np.ndarray | None:
    """A tensor as a numpy array on the CPU: floating dtypes as float64, others kept; None stays
    None."""
    if t is None:
        return None
    t = t.detach().cpu()
    return (t.double() if t.is_floating_point() else t).numpy()


def reference_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``selfattn.attention``, converted for ``selfattn.reference``
    (tensors, and tuples of tensors, become numpy arrays; ``backend`` is dropped)."""
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
    """``(out, lse)`` of the float64 specification for the torch inputs and rules of a
    ``selfattn.attention`` call."""
    return reference.attention(
        to_np(q), to_np(k), to_np(v), return_lse=True, **reference_kwargs(kwargs)
    )


def ref_visibility(nq: int, nk: int, **kwargs) -> np.ndarray:
    """The specification's visibility for torch-valued rule arguments, broadcastable to 4-D."""
    seg = kwargs.get("segment_ids")
    if isinstance(seg, torch.Tensor):
        seg = (to_np(seg), to_np(seg))
    elif seg is not None:
        seg = tuple(to_np(x) for x in seg)
    mask = to_np(kwargs.get("mask"))
    causal, window = kwargs.get("causal", False), kwargs.get("window")
    return reference.visibility(
        nq, nk, causal=causal, window=window, mask=mask, segment_ids=seg, q_ndim=4
    )


def ref_weights(q, k, **kwargs) -> np.ndarray:
    """The specification's probabilities, float64 (B, Hq, Nq, Nk); rows seeing nothing are 0."""
    qn, kn = to_np(q), to_np(k)
    kn = np.repeat(kn, qn.shape[1] // kn.shape[1], axis=1)
    rk = reference_kwargs(kwargs)
    terms = {name: rk.get(name) for name in ("scale", "softcap", "bias", "alibi_slopes")}
    s = reference.scores(qn, kn, **terms)
    vis = np.broadcast_to(ref_visibility(qn.shape[2], kn.shape[2], **kwargs), s.shape)
    sinks = rk.get("sinks")
    p, _ = reference.softmax(s, vis, None if sinks is None else sinks.reshape(-1, 1))
    return p


def ref_stats(
    q,
    k,
    *,
    heads: Any = None,
    rows: Any = None,
    col_sum: bool = True,
    col_max: bool = False,
    entropy: bool = False,
    topk: int = 0,
    **kwargs,
) -> dict[str, np.ndarray]:
    """``selfattn.attention_stats`` of the specification, float64, from :func:`ref_weights`.

    ``heads`` / ``rows`` are index lists (or None: all). Top-k ranks the visible keys of each row
    by probability, ties in index order (a stable sort); a row seeing fewer keys pads with
    index -1 and p 0.
    """
    p = ref_weights(q, k, **kwargs)  # (B, Hq, Nq, Nk)
    vis = np.broadcast_to(ref_visibility(p.shape[2], p.shape[3], **kwargs), p.shape)
    if heads is not None:
        p, vis = p[:, list(heads)], vis[:, list(heads)]
    if rows is not None:
        p, vis = p[:, :, list(rows)], vis[:, :, list(rows)]
    got: dict[str, np.ndarray] = {}
    if col_sum:
        got["col_sum"] = p.sum(2)
    if col_max:
        got["col_max"] = p.max(2, initial=0.0)
    if entropy:
        with np.errstate(divide="ignore", invalid="ignore"):
            got["entropy"] = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    if topk:
        rank = np.where(vis, p, -1.0)  # hidden keys after every visible one
        order = np.argsort(-rank, axis=-1, kind="stable")[..., :topk]
        top_p = np.take_along_axis(p, order, -1)
        seen = np.take_along_axis(vis, order, -1)
        pad = topk - order.shape[-1]  # fewer keys than topk
        widths = [(0, 0)] * 3 + [(0, pad)]
        got["topk_index"] = np.pad(np.where(seen, order, -1), widths, constant_values=-1)
        got["topk_p"] = np.pad(np.where(seen, top_p, 0.0), widths)
    return got


# -- the plain formula in the inputs' own dtype -------------------------------------------------


def plain_scores(q, k, **kwargs) -> torch.Tensor:
    """Scores after steps 1-5 in q's dtype, invisible ones -inf, (B, Hq, Nq, Nk); differentiable.

    Steps 1-5 of the textbook formula that :func:`plain_attention` completes: ``q k^T * scale``,
    softcap, bias, ALiBi, then the visibility rules (causal, window, mask, segment_ids).
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


def _with_sink(s: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Scores (B, Hq, Nq, Nk) with the sink logit of each head as one more column (Nk + 1)."""
    if sinks is None:
        return s
    col = sinks.to(s.dtype).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    return torch.cat([s, col], -1)


def plain_attention(q, k, v, **kwargs) -> torch.Tensor:
    """The textbook formula in the inputs' own dtype (the yardstick of the tolerance rule); rows
    that see no key give 0. ``sinks``: one more column of logits whose value is 0."""
    nk = k.shape[2]
    p = torch.softmax(_with_sink(plain_scores(q, k, **kwargs), kwargs.get("sinks")), dim=-1)
    p = torch.nan_to_num(p, nan=0.0)[..., :nk]  # fully masked rows; the sink's column dropped
    return p @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)


def plain_lse(q, k, **kwargs) -> torch.Tensor:
    """Natural-log logsumexp of the visible scores (and the sink), in q's dtype, (B, Hq, Nq);
    -inf when empty."""
    return torch.logsumexp(_with_sink(plain_scores(q, k, **kwargs), kwargs.get("sinks")), dim=-1)


# -- the tolerance rule -------------------------------------------------------------------------


def max_err(a: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    """``max |a - ref|`` in float64, where entries that are -inf in both count as equal (0 for
    empty arrays; NaN when ``a`` holds a NaN)."""
    a = to_np(a) if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    both_inf = np.isneginf(a) & np.isneginf(ref)
    with np.errstate(invalid="ignore"):  # -inf - -inf: those entries are masked out below
        diff = np.where(both_inf, 0.0, np.abs(a - ref))
    return float(np.max(diff)) if diff.size else 0.0


def tolerance(plain_err: float, dtype: torch.dtype) -> float:
    """The largest error the rule allows: ``ERR_MULTIPLE * plain_err + ERR_FLOOR[dtype]``."""
    return ERR_MULTIPLE * plain_err + ERR_FLOOR[dtype]


@dataclass(frozen=True)
class Agreement:
    """How a result stands against the float64 specification.

    Attributes:
        err: ``max |out - ref|`` (:func:`max_err`).
        plain_err: the plain same-dtype formula's error (0 when not given or not finite).
        tol: the largest error allowed (:func:`tolerance`).
    """

    err: float
    plain_err: float
    tol: float

    @property
    def ok(self) -> bool:
        """Whether the result passes: a finite error of at most ``tol``."""
        return math.isfinite(self.err) and self.err <= self.tol


def agreement(
    out: torch.Tensor | np.ndarray,
    ref: np.ndarray,
    plain: torch.Tensor | np.ndarray | None = None,
    dtype: torch.dtype | None = None,
) -> Agreement:
    """Measure ``out`` against the float64 ``ref`` under the tolerance rule.

    Args:
        out: the result to judge.
        ref: the float64 specification's result (e.g. from :func:`ref_attention`).
        plain: :func:`plain_attention` on the same inputs (its error sets the allowance).
        dtype: the inputs' dtype, for the floor (default: ``out``'s dtype).
    """
    dtype = out.dtype if dtype is None else dtype
    base = max_err(plain, ref) if plain is not None else 0.0
    if not math.isfinite(base):
        base = 0.0
    return Agreement(max_err(out, ref), base, tolerance(base, dtype))


def assert_close(
    out: torch.Tensor, ref: np.ndarray, plain: torch.Tensor | None, dtype, what: str = ""
) -> None:
    """The FlashAttention rule: ``err(out) <= ERR_MULTIPLE * err(plain) + ERR_FLOOR[dtype]``.

    Raises:
        AssertionError: ``out`` is not of ``dtype``, holds a NaN, or fails the rule (the message
            starts with ``what`` and gives both errors).
    """
    if out.dtype != dtype:
        raise AssertionError(f"{what}: output dtype {out.dtype}, expected {dtype}")
    if np.isnan(to_np(out)).any():
        raise AssertionError(f"{what}: NaN in output")
    a = agreement(out, ref, plain, dtype)
    if not a.err <= a.tol:
        raise AssertionError(
            f"{what}: error {a.err:.3g} > {a.tol:.3g} (plain {dtype} error {a.plain_err:.3g})"
        )
