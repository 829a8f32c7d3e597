"""Attention statistics without the probabilities: ``attention_stats`` and ``attention_with_stats``.

``attention_stats`` gives exact reductions of the probabilities ``attention_weights`` returns
(column sums and maxima, row entropy, top-k keys), computed block by block from the lse by the
backend's ``stats`` hook (``backends``: a backend offers it as one method; ``auto`` takes the
first in the device's priority order that has it and accepts the call). ``attention_with_stats``
returns the output of ``attention`` and those statistics together: ``native`` computes both in
one decode pass where it can (``native.stats``), any other call is ``attention`` then
``attention_stats`` from its lse.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from .api import attention, check_backend, check_lse, remember, selection
from .backends import BACKENDS, CHOICES, select
from .forward_mode import has_tangents
from .kv_residual import ResidualKV
from .quant import QuantizedKV, standin, unwrap_call, unwrap_label
from .spec import AttentionSpec, validate, validate_call

__all__ = ["STATS_HOOKS", "attention_stats", "attention_with_stats", "check_wanted"]

STATS_HOOKS = ("stats",)  # the registry hook attention_stats uses


def check_wanted(col_sum: Any, col_max: Any, entropy: Any, topk: Any) -> dict[str, Any]:
    """The statistics asked for, checked (bools, and topk an int >= 0), as hook keywords."""
    for name, flag in (("col_sum", col_sum), ("col_max", col_max), ("entropy", entropy)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r} ({type(flag).__name__})")
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int >= 0, got {topk!r} ({type(topk).__name__})")
    if topk < 0:
        raise ValueError(f"topk must be >= 0 (0: no top-k), got topk={topk}")
    return {"col_sum": col_sum, "col_max": col_max, "entropy": entropy, "topk": topk}


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor | QuantizedKV,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    segment_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    heads: Any = None,
    rows: Any = None,
    sinks: torch.Tensor | None = None,
    col_sum: bool = True,
    col_max: bool = False,
    entropy: bool = False,
    topk: int = 0,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Exact reductions of the attention probabilities, computed block by block from the lse.

    The probabilities ``p = exp(s - lse)`` are those :func:`selfattn.attention_weights` returns
    (before dropout); no more than one block of scores is live at a time, so the cost is at most
    one forward pass over the selected rows on top of the lse (two when ``lse`` is None).

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D) (or a :class:`selfattn.QuantizedKV`, read as its
            ``dequantize()``: ``native`` reads its codes in place unless ``heads`` are given,
            other backends dequantize it first); the rules as in :func:`selfattn.attention`.
        lse: (B, Hq, Nq) natural-log lse from ``attention(..., return_lse=True)``; recomputed
            (for the selected heads and rows only) when None. With ``sinks``, the lse that
            ``attention(..., sinks=sinks, return_lse=True)`` returns.
        sinks: (Hq,) one logit per query head without a value (as in ``attention``): the
            probabilities of a row then sum to ``1 - exp(sinks[h] - lse)``, and the statistics
            are those of these probabilities (the sink's own share is in none of them).
        heads: query heads (index sequence, slice or int); all when None. H' = how many.
        rows: query rows; all when None. Nq' = how many.
        col_sum: ``"col_sum"`` (B, H', Nk): the sum of ``p`` over the selected rows (the mass
            each key received; H2O's score).
        col_max: ``"col_max"`` (B, H', Nk): the maximum of ``p`` over the selected rows.
        entropy: ``"entropy"`` (B, H', Nq'): ``-sum_j p_j log p_j`` per row (0 for a row that
            sees no key).
        topk: > 0: ``"topk_index"`` (B, H', Nq', topk) int64 and ``"topk_p"`` (B, H', Nq',
            topk): each row's most probable visible keys, highest first; ties go to the lower
            index; where a row sees fewer keys, index -1 and p 0.
        backend: "auto" (the first backend of the device's priority order with a ``stats``
            hook that accepts the call: ``native`` on the CPU, ``tiled`` elsewhere) or a name.

    Returns:
        A dict with only the keys asked for; every tensor but ``topk_index`` is float32.

    Raises:
        TypeError / ValueError: as :func:`selfattn.attention_weights`, a non-bool flag, a
            ``topk`` that is not an int >= 0, bad ``heads``/``rows`` (before any work).
        UnsupportedInputs: the named backend has no ``stats`` hook or declines the call.
    """
    want = check_wanted(col_sum, col_max, entropy, topk)
    backend = check_backend(backend)
    if type(k) is ResidualKV:  # a cache's [quantized | float window]: read as one tensor
        k = k.dequantize()
    codes = k if type(k) is QuantizedKV else None
    spec = validate(
        q,
        standin(k),  # a QuantizedKV: validated as its dequantized shape, no values made
        None,
        need_v=False,
        causal=causal,
        window=window,
        mask=mask,
        bias=bias,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        segment_ids=segment_ids,
        scale=scale,
        sinks=sinks,
    )
    if codes is not None:
        spec = replace(spec, quantized=unwrap_label(codes, None))
    head_idx = selection(heads, spec.Hq, "heads", q.device)
    row_idx = selection(rows, spec.Nq, "rows", q.device)
    check_lse(lse, spec)
    chosen = select(spec, backend, need=STATS_HOOKS)
    in_place = getattr(chosen, "stats_reads_quantized", False)
    if codes is not None and (head_idx is not None or not in_place):
        # a backend whose stats hook reads the codes gets them as they are (all heads)
        q, k, _, _, _ = unwrap_call(q, codes, None)  # rotated keys: q rotated instead
    with torch.no_grad():
        return chosen.stats(spec, q, k, lse, head_idx, row_idx, **want)


def attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor | QuantizedKV,
    v: torch.Tensor | QuantizedKV,
    *,
    col_sum: bool = True,
    col_max: bool = False,
    entropy: bool = False,
    topk: int = 0,
    heads: Any = None,
    rows: Any = None,
    return_lse: bool = False,
    backend: str = "auto",
    **rules: Any,
) -> (
    tuple[torch.Tensor, dict[str, torch.Tensor]]
    | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
):
    """``attention(q, k, v, **rules)`` and ``attention_stats`` of the same call, in one go.

    Where the backend ``attention`` picks offers a ``forward_stats`` hook (``native``), a call
    without gradient, dropout or ``rows`` runs in one pass of it: for a decode step (few query
    rows) the statistics come out of the decode kernel's own pass (it keeps each key's score
    while it computes the output and normalises them by the final lse), so an eviction cache
    pays little for them; other calls get the statistics pass right after the forward, in the
    same C++ call. Any other call runs :func:`selfattn.attention` and then
    :func:`attention_stats` from its lse. The statistics are those of the probabilities before
    dropout.

    Args:
        q, k, v, rules (``causal``, ``window``, ``mask``, ``bias``, ``alibi_slopes``,
            ``softcap``, ``segment_ids``, ``scale``, ``dropout_p``) and ``backend``: as
            :func:`selfattn.attention`.
        col_sum, col_max, entropy, topk, heads, rows: as :func:`attention_stats`.
        return_lse: also return the lse (B, Hq, Nq).

    Returns:
        ``(out, stats)``, or ``(out, lse, stats)`` with ``return_lse``; ``out`` (B, Hq, Nq, Dv)
        with autograd as :func:`selfattn.attention`; ``stats`` as :func:`attention_stats`
        (computed without autograd).
    """
    want = check_wanted(col_sum, col_max, entropy, topk)
    backend = check_backend(backend)
    if rows is None and ResidualKV not in (type(k), type(v)):  # a ResidualKV: two calls below
        fused = _fused(q, k, v, rules, heads, want, backend)
        if fused is not None:
            out, lse, stats = fused
            return (out, lse, stats) if return_lse else (out, stats)
    out, lse = attention(q, k, v, return_lse=True, backend=backend, **rules)
    rules.pop("dropout_p", None)
    # the named backend computes the statistics too where it has the hook
    stats_backend = backend if getattr(BACKENDS.get(backend), "stats", None) else "auto"
    stats = attention_stats(
        q, k, lse=lse.detach(), heads=heads, rows=rows, backend=stats_backend, **rules, **want
    )
    return (out, lse, stats) if return_lse else (out, stats)


def _fused(
    q: Any, k: Any, v: Any, rules: dict[str, Any], heads: Any, want: dict[str, Any], backend: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None:
    """``(out, lse, stats)`` from one pass of the ``forward_stats`` hook of the backend that
    ``attention`` would pick, or None where it has none or the call needs autograd, forward-mode
    tangents or dropout (the caller then runs the two apart). A ``QuantizedKV`` goes to a
    backend that reads the codes itself (``reads_quantized``) as it is, validated with
    stand-ins as ``attention`` does. All heads are computed and ``heads`` picked after."""
    if torch.compiler.is_compiling():
        return None
    key = _plain_key(q, k, v, rules, backend)
    got = CHOICES.get(key) if key is not None else None
    if got is None:
        got = _choose(q, k, v, rules, backend)
        if got is None:
            return None
        if key is not None:
            remember(key, got)
    spec, _, hook = got
    if hook is None:
        return None
    head_idx = selection(heads, spec.Hq, "heads", q.device)
    with torch.no_grad():
        out, lse, stats = hook(spec, q, k, v, **want)
    if head_idx is not None:
        stats = {key: t.index_select(1, head_idx) for key, t in stats.items()}
    return out, lse, stats


def _graded(rules: dict[str, Any]) -> tuple[Any, Any]:
    """The rule tensors that may carry forward-mode tangents (bias, ALiBi slopes)."""
    return rules.get("bias"), rules.get("alibi_slopes")


def _choose(
    q: Any, k: Any, v: Any, rules: dict[str, Any], backend: str
) -> tuple[AttentionSpec, Any, Any] | None:
    """``(spec, backend, hook)`` for a fused pass, ``hook`` the backend's ``forward_stats``
    (None where the one ``attention`` would pick has none, or cannot read a ``QuantizedKV``
    given), or None where the call needs autograd, forward-mode tangents or dropout."""
    quantized = unwrap_label(k, v) if QuantizedKV in (type(k), type(v)) else ""
    spec = validate_call(q, standin(k), standin(v), rules, True)  # as attention(return_lse=True)
    if spec.requires_grad or spec.dropout_p > 0 or has_tangents(q, k, v, *_graded(rules)):
        return None
    if quantized:
        spec = replace(spec, quantized=quantized)
    chosen = select(spec, backend)
    hook = getattr(chosen, "forward_stats", None)
    if quantized and not getattr(chosen, "reads_quantized", False):
        hook = None
    return spec, chosen, hook


def _plain_key(q: Any, k: Any, v: Any, rules: dict[str, Any], backend: str) -> tuple | None:
    """The key under which ``backends.CHOICES`` remembers the fused pass's (spec, backend, hook)
    for a plain call (CPU tensors, no rule but ``causal`` and a float ``scale``, no dropout,
    nothing to differentiate: every decode step of a cache), or None for any other call (chosen
    afresh). Its keys start with "with_stats"; attention's start with a backend name."""
    tensor = torch.Tensor
    if type(q) is not tensor or type(k) is not tensor or type(v) is not tensor:
        return None
    if not (q.is_cpu and k.is_cpu and v.is_cpu):
        return None
    causal, scale = rules.get("causal", False), rules.get("scale")
    if causal is not True and causal is not False:
        return None
    if scale is not None and not (type(scale) is float and math.isfinite(scale)):
        return None
    for name, value in rules.items():
        plain = name in ("causal", "scale") or value is None
        plain = plain or (name == "dropout_p" and type(value) in (int, float) and value == 0.0)
        if not plain:
            return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if has_tangents(q, k, v):
        return None
    return (
        "with_stats",
        torch.get_num_threads(),  # auto's measured rules depend on it
        backend,
        q.shape,
        k.shape,
        v.shape,
        q.dtype,
        k.dtype,
        v.dtype,
        causal,
        scale,
    )
