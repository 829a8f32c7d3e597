"""The executable specification: self-attention in numpy float64, written as the lesson's steps.

embeddings -> Q, K, V -> scores -> softmax -> weighted sum (Vaswani et al., 2017, eq. 1), with
every rule of ``docs/api.md``. Every fast backend is tested against this file. It imports no
torch, on purpose: the specification must not share a bug with the code it checks.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Steps",
    "attention",
    "dropout_keep",
    "lesson_self_attention",
    "scores",
    "self_attention",
    "softmax",
    "visibility",
    "weighted_sum",
]

_M32 = np.uint64(0xFFFFFFFF)


def _mix32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer finaliser (xor-shift / multiply rounds), on uint64 holding 32-bit values."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & _M32
    return x ^ (x >> np.uint64(16))


def dropout_keep(
    seed: tuple[int, int], rows: np.ndarray, cols: np.ndarray, dropout_p: float
) -> np.ndarray:
    """The dropout rule shared by every backend: a counter-based hash, so no mask is ever stored.

    Entry ``(row, col)`` of the attention matrix is kept when ``hash(seed, row, col) >= p * 2**32``,
    where ``row = (b * Hq + h) * Nq + i`` and ``col = j``. The torch backends draw ``seed`` from
    torch's RNG and regenerate the same mask in backward from it.

    Args:
        seed: two 32-bit words.
        rows: global row ids, any integer shape.
        cols: key indices, any integer shape broadcastable against ``rows``.
        dropout_p: probability of dropping an entry.

    Returns:
        Boolean array of the broadcast shape, True where the entry is kept.
    """
    s0, s1 = np.uint64(seed[0] & 0xFFFFFFFF), np.uint64(seed[1] & 0xFFFFFFFF)
    r = np.asarray(rows).astype(np.uint64)
    c = np.asarray(cols).astype(np.uint64)
    with np.errstate(over="ignore"):
        hr = _mix32((r * np.uint64(0x9E3779B9) + s0) & _M32)
        hc = (c * np.uint64(0x85EBCA6B) + s1) & _M32
        h = _mix32(hr ^ hc)
    threshold = min(int(dropout_p * 2.0**32), 2**32 - 1)
    return h >= np.uint64(threshold)


def _window(window: Any) -> tuple[int | None, int | None]:
    """``(left, right)`` as Python ints (any size) or None; anything else is a ValueError."""
    if window is None:
        return (None, None)
    left, right = window
    for side in (left, right):
        if side is not None and (
            isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < 0
        ):
            raise ValueError(f"window sides must be ints >= 0 or None, got window={window!r}")
    return (None if left is None else int(left), None if right is None else int(right))


def visibility(
    nq: int,
    nk: int,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    mask: np.ndarray | None = None,
    segment_ids: Any = None,
    q_ndim: int = 2,
) -> np.ndarray:
    """Which keys each query may see (docs/api.md, step 5), as a boolean array.

    Query row ``i`` sits at absolute position ``i' = i + nk - nq`` (bottom-right alignment).

    Returns:
        Boolean array broadcastable to ``(..., nq, nk)``; True means visible.
    """
    i_abs = np.arange(nq)[:, None] + (nk - nq)  # (Nq, 1)
    j = np.arange(nk)[None, :]  # (1, Nk)
    vis = np.ones((nq, nk), dtype=bool)
    if causal:
        vis &= j <= i_abs
    left, right = _window(window)
    # Compare distances, never shifted positions: |i' - j| < nq + nk, so a side of that length
    # or more restricts nothing, and sides of any size (sys.maxsize, 2**100) need no arithmetic.
    dist = i_abs - j  # (Nq, Nk) i' - j
    reach = nq + nk
    if left is not None and left < reach:
        vis &= dist <= left  # j >= i' - left
    if right is not None and right < reach:
        vis &= -dist <= right  # j <= i' + right
    if mask is not None:
        vis = vis & np.asarray(mask, dtype=bool)
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            q_ids, kv_ids = (np.asarray(x) for x in segment_ids)
        else:
            q_ids = kv_ids = np.asarray(segment_ids)
        qi = q_ids[..., :, None]
        kj = kv_ids[..., None, :]
        same = (qi == kj) & (qi >= 0) & (kj >= 0)  # (..., Nq, Nk); negative id = padding
        if q_ndim >= 4 and same.ndim == 3:
            same = same[:, None]  # (B, 1, Nq, Nk): the same documents for every head
        vis = vis & same
    return vis


def scores(
    q: np.ndarray,
    k: np.ndarray,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    bias: np.ndarray | None = None,
    alibi_slopes: np.ndarray | None = None,
) -> np.ndarray:
    """Step 3: the score of every query against every key, steps 1-4 of docs/api.md.

    Args:
        q: (..., Nq, D) queries.
        k: (..., Nk, D) keys, same leading shape as ``q`` (heads already grouped).
        scale: multiplies ``q @ k^T``; ``1 / sqrt(D)`` when None.
        softcap: ``s = softcap * tanh(s / softcap)`` when given.
        bias: added to the scores, broadcastable to (..., Nq, Nk).
        alibi_slopes: (Hq,) or (B, Hq): subtracts ``slope[h] * |i' - j|``.

    Returns:
        (..., Nq, Nk) float64 scores (before the visibility rules).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    d = q.shape[-1]
    nq, nk = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    s = scale * (q @ np.swapaxes(k, -1, -2))  # (..., Nq, Nk)
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    if bias is not None:
        s = s + np.asarray(bias, dtype=np.float64)
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=np.float64)
        i_abs = np.arange(nq)[:, None] + (nk - nq)
        dist = np.abs(i_abs - np.arange(nk)[None, :]).astype(np.float64)  # (Nq, Nk)
        s = s - slopes[..., None, None] * dist
    return s


def softmax(
    s: np.ndarray, visible: np.ndarray | None = None, sinks: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Step 4: normalise the scores of each row into probabilities, stably.

    The row maximum is subtracted before ``exp``, so scores of any size never overflow (the
    lesson's ``np.exp(scores) / sum`` turns into NaN once a score passes ~709). A row with no
    visible key gets probabilities 0 and lse ``-inf``.

    ``sinks`` (broadcastable to (..., Nq), one logit per head: (Hq, 1) for 4-D scores) adds one
    extra logit to every row's softmax that carries no value (GPT-OSS's attention sinks): the
    lse is ``log(exp(sink) + sum_j exp(s_j))`` and the row's probabilities sum to less than 1.
    A row with no visible key then has probabilities 0 and lse ``sink``; a sink of ``-inf`` is
    no sink at all.

    Returns:
        ``(p, lse)``: probabilities (..., Nq, Nk) and natural-log logsumexp (..., Nq).
    """
    if visible is not None:
        s = np.where(visible, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True) if s.shape[-1] else np.full((*s.shape[:-1], 1), -np.inf)
    if sinks is not None:  # the sink is one more logit of the row: it takes part in the maximum
        sink = np.broadcast_to(np.asarray(sinks, dtype=np.float64)[..., None], m.shape)
        m = np.maximum(m, sink)
    empty = np.isneginf(m)  # rows that see no key (and no sink) at all
    m_safe = np.where(empty, 0.0, m)
    e = np.exp(s - m_safe)  # exp(-inf) = 0 for invisible keys
    total = np.sum(e, axis=-1, keepdims=True)
    if sinks is not None:
        total = total + np.exp(sink - m_safe)  # the sink's share of the denominator, no value
    p = np.where(empty, 0.0, e / np.where(empty, 1.0, total))
    with np.errstate(divide="ignore"):
        lse = np.where(empty, -np.inf, m_safe + np.log(np.where(empty, 1.0, total)))
    return p, lse[..., 0]


def weighted_sum(p: np.ndarray, v: np.ndarray, visible: np.ndarray | None = None) -> np.ndarray:
    """Step 5: each output row is the probability-weighted sum of the value rows it can see.

    A value row a query cannot see is never read, so padding garbage (NaN, inf) stays out of
    that query's output, while non-finite values at visible positions propagate.
    """
    v = np.asarray(v, dtype=np.float64)
    bad = ~np.isfinite(v)  # (..., Nk, Dv)
    if visible is None or not bad.any():
        return p @ v
    out = p @ np.where(bad, 0.0, v)
    # Add the non-finite entries back only where the (row, key) pair is visible: 0 * NaN is NaN,
    # so they must be selected, not multiplied by a zero probability.
    vis = np.broadcast_to(visible, p.shape)
    v_bad = np.where(bad, v, 0.0)
    for j in np.flatnonzero(bad.any(axis=-1).reshape(-1, bad.shape[-2]).any(axis=0)):
        with np.errstate(invalid="ignore"):
            term = p[..., :, j, None] * v_bad[..., j, None, :]  # (..., Nq, Dv)
        out = out + np.where(vis[..., :, j, None], term, 0.0)
    return out


def _group_heads(q: np.ndarray, kv: np.ndarray) -> np.ndarray:
    """Query head h reads key/value head h // (Hq // Hkv) (``repeat_interleave`` grouping)."""
    if q.ndim < 3 or kv.ndim < 3 or q.shape[-3] == kv.shape[-3]:
        return kv
    hq, hkv = q.shape[-3], kv.shape[-3]
    if hq % hkv:
        raise ValueError(
            f"query heads must be a multiple of key/value heads, got Hq={hq}, Hkv={hkv}"
        )
    return np.repeat(kv, hq // hkv, axis=-3)


def _row_ids(lead: tuple[int, ...], nq: int) -> np.ndarray:
    """Global row ids ``(b * Hq + h) * Nq + i`` for the dropout hash, shape lead + (Nq, 1)."""
    flat = np.arange(int(np.prod(lead, dtype=np.int64)), dtype=np.int64).reshape(lead or ())
    return (flat[..., None] * nq + np.arange(nq))[..., None]


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    mask: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    alibi_slopes: np.ndarray | None = None,
    softcap: float | None = None,
    segment_ids: Any = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: tuple[int, int] | None = None,
    return_lse: bool = False,
    sinks: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention as specified in docs/api.md, in float64, over any leading batch shape.

    ``q`` is (..., Nq, D), ``k`` (..., Nk, D), ``v`` (..., Nk, Dv); with four dimensions they are
    (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv) and query head ``h`` reads key/value head
    ``h // (Hq // Hkv)``. The lesson's single-head example is the 2-D case.

    Query row ``i`` sits at absolute position ``i' = i + Nk - Nq`` (bottom-right)::

        causal, Nq=2, Nk=5      keys 0 1 2 3 4
            query 0 (i'=3)           x x x x .
            query 1 (i'=4)           x x x x x

    Args:
        q, k, v: arrays as above (any float dtype; computed in float64).
        causal: key ``j`` visible only when ``j <= i'``.
        window: ``(left, right)``: visible only when ``i' - left <= j <= i' + right``; None on a
            side means unbounded.
        mask: boolean, broadcastable to (..., Nq, Nk); True means visible.
        bias: added to the scores, broadcastable to (..., Nq, Nk).
        alibi_slopes: (Hq,) or (B, Hq); subtracts ``slope[h] * |i' - j|``.
        softcap: ``s = softcap * tanh(s / softcap)``, applied before bias and ALiBi.
        segment_ids: (B, N) ids when Nq == Nk, or a pair ``(q_ids, kv_ids)``; visible only where
            equal; a negative id is padding and sees nothing.
        scale: defaults to ``1 / sqrt(D)``.
        dropout_p: drop probability applied to the probabilities (then rescaled by ``1/(1-p)``).
        dropout_seed: two 32-bit words for :func:`dropout_keep`; required when ``dropout_p > 0``.
        return_lse: also return the natural-log logsumexp of the visible scores (and the sink).
        sinks: (Hq,): one extra logit per query head in every row's softmax, with no value
            (GPT-OSS); the probabilities of a row then sum to less than 1 (see :func:`softmax`).

    Returns:
        ``out`` (..., Nq, Dv) float64, or ``(out, lse)`` with ``lse`` (..., Nq). Rows with no
        visible key give 0 and lse ``-inf`` (``sinks[h]`` with sinks).
    """
    q = np.asarray(q, dtype=np.float64)  # step 2's Q (the projections happen in self_attention)
    k = _group_heads(q, np.asarray(k, dtype=np.float64))
    v = _group_heads(q, np.asarray(v, dtype=np.float64))
    nq, nk = q.shape[-2], k.shape[-2]
    s = scores(q, k, scale=scale, softcap=softcap, bias=bias, alibi_slopes=alibi_slopes)
    vis = visibility(
        nq, nk, causal=causal, window=window, mask=mask, segment_ids=segment_ids, q_ndim=q.ndim
    )
    vis = np.broadcast_to(vis, np.broadcast_shapes(vis.shape, s.shape))
    sink = None
    if sinks is not None:  # (Hq,) -> (Hq, 1): one logit per head, the same for every row
        sink = np.asarray(sinks, dtype=np.float64).reshape(-1, 1)
        if q.ndim < 3:
            sink = sink.reshape(())
    p, lse = softmax(s, vis, sink)
    if dropout_p > 0.0:
        if dropout_seed is None:
            raise ValueError("dropout_p > 0 needs dropout_seed (two 32-bit words)")
        keep = dropout_keep(dropout_seed, _row_ids(p.shape[:-2], nq), np.arange(nk), dropout_p)
        p = np.where(keep, p / (1.0 - dropout_p), 0.0)
    out = weighted_sum(p, v, vis)
    return (out, lse) if return_lse else out


@dataclass(frozen=True)
class Steps:
    """Every intermediate of the five steps, for printing and teaching."""

    x: np.ndarray  # step 1: input embeddings (N, E)
    q: np.ndarray  # step 2: queries (N, d_k)
    k: np.ndarray  #         keys (N, d_k)
    v: np.ndarray  #         values (N, d_v)
    scores: np.ndarray  # step 3: scaled scores (N, N), invisible entries -inf
    weights: np.ndarray  # step 4: softmax probabilities (N, N)
    output: np.ndarray  # step 5: weighted sum of values (N, d_v)


def self_attention(
    x: np.ndarray,
    wq: np.ndarray,
    wk: np.ndarray,
    wv: np.ndarray,
    *,
    scale: float | None = None,
    return_steps: bool = False,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray] | Steps:
    """The lesson's five steps, from input embeddings to the attention output.

    1. input embeddings ``x`` (..., N, E);
    2. ``Q = x Wq``, ``K = x Wk``, ``V = x Wv``;
    3. scores ``scale * Q K^T`` (``scale`` defaults to ``1/sqrt(d_k)``; ``scale=1.0`` is the
       lesson's unscaled example);
    4. softmax over keys, subtracting the row maximum so large scores never overflow;
    5. weighted sum ``softmax(...) V``.

    Args:
        x: (..., N, E) input embeddings.
        wq, wk: (E, d_k) projections; wv: (E, d_v).
        scale: score scale; ``1 / sqrt(d_k)`` when None.
        return_steps: return a :class:`Steps` with every intermediate instead of the output
            (single sequence, no dropout).
        **kwargs: any rule of :func:`attention` (causal, window, mask, bias, ...).

    Returns:
        (..., N, d_v) output (or ``(out, lse)`` with ``return_lse=True``, or :class:`Steps`).
    """
    x = np.asarray(x, dtype=np.float64)  # step 1
    q = x @ np.asarray(wq, dtype=np.float64)  # step 2
    k = x @ np.asarray(wk, dtype=np.float64)
    v = x @ np.asarray(wv, dtype=np.float64)
    if not return_steps:
        return attention(q, k, v, scale=scale, **kwargs)  # steps 3-5
    rules = {n: kwargs.pop(n) for n in ("causal", "window", "mask", "segment_ids") if n in kwargs}
    if kwargs.pop("dropout_p", 0.0) or kwargs.pop("return_lse", False):
        raise ValueError("return_steps=True shows the deterministic steps: no dropout, no lse")
    kwargs.pop("dropout_seed", None)
    s = scores(q, k, scale=scale, **kwargs)  # step 3
    vis = visibility(q.shape[-2], k.shape[-2], q_ndim=q.ndim, **rules)
    vis = np.broadcast_to(vis, s.shape)
    p, _ = softmax(s, vis)  # step 4
    out = weighted_sum(p, v, vis)  # step 5
    return Steps(x=x, q=q, k=k, v=v, scores=np.where(vis, s, -np.inf), weights=p, output=out)


def lesson_self_attention(
    x: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray
) -> np.ndarray:
    """The lesson's code, kept verbatim in spirit: unscaled scores and an unguarded ``exp``.

    It is here to be compared against: once a score passes ~709, ``np.exp`` overflows to inf and
    the weights become NaN. :func:`self_attention` with ``scale=1.0`` gives the same numbers
    wherever this one is finite.
    """
    q = np.dot(x, wq)
    k = np.dot(x, wk)
    v = np.dot(x, wv)
    s = np.dot(q, k.T)
    with np.errstate(over="ignore", invalid="ignore"):
        weights = np.exp(s) / np.sum(np.exp(s), axis=1, keepdims=True)
    return np.dot(weights, v)
