"""The front door: ``attention``, ``attention_weights``, ``explain``, ``available_backends``.

Each call is validated in full (``spec.validate``) before any work, then handed to one backend.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _rng
from .backends import BACKENDS, available, candidates, refusals, select
from .backends.tiled import Problem, forward, probabilities
from .masks import Rules
from .spec import validate

__all__ = ["attention", "attention_weights", "available_backends", "explain"]


def _check_backend(backend: Any) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        names = ", ".join(["auto", *BACKENDS])
        raise ValueError(f"unknown backend {backend!r}; choose one of: {names}")
    return backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    segment_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with every rule of API.md section 2.

    Query row ``i`` sits at absolute position ``i' = i + Nk - Nq`` (aligned bottom-right, so
    ``Nq`` new tokens after a cache of ``Nk - Nq`` are exactly right)::

        causal=True, Nq=3, Nk=5        keys: 0 1 2 3 4
            query 0 (i' = 2)                 x x x . .
            query 1 (i' = 3)                 x x x x .
            query 2 (i' = 4)                 x x x x x

    torch's SDPA aligns causal masks top-left instead; the two agree when Nq == Nk. A row that
    sees no key gives output 0, lse ``-inf`` and zero gradients, never NaN.

    Args:
        q: (B, Hq, Nq, D) queries. k: (B, Hkv, Nk, D) keys. v: (B, Hkv, Nk, Dv) values.
            One dtype (float16, bfloat16, float32; float64 on CPU backends) and one device;
            ``Hq % Hkv == 0`` and query head ``h`` reads key/value head ``h // (Hq // Hkv)``.
            Any strides.
        causal: key ``j`` visible to query ``i`` only when ``j <= i'``.
        window: ``(left, right)``: visible only when ``i' - left <= j <= i' + right``; None on a
            side is unbounded. ``(w, 0)`` is a causal sliding window of ``w + 1`` keys.
        mask: bool, broadcastable to (B, Hq, Nq, Nk); True = visible. (Additive masks: ``bias``.)
        bias: float, broadcastable to (B, Hq, Nq, Nk), added to the scores; gets a gradient.
        alibi_slopes: (Hq,) or (B, Hq); subtracts ``slope[h] * |i' - j|``; gets a gradient.
        softcap: ``s = softcap * tanh(s / softcap)`` before bias and ALiBi.
        segment_ids: int (B, N) when Nq == Nk, or ``(q_ids (B, Nq), kv_ids (B, Nk))``: visible
            only where ids are equal; negative ids are padding and see nothing.
        scale: score scale, ``1 / sqrt(D)`` by default.
        dropout_p: probability of dropping an attention probability (rescaling the rest by
            ``1 / (1 - p)``). The mask comes from a seed drawn from torch's RNG and is
            regenerated in backward; every backend but ``sdpa`` draws the same mask.
        return_lse: also return the natural-log logsumexp of the visible scores, float32
            (B, Hq, Nq). It is differentiable.
        backend: "auto", "triton", "sdpa", "tiled", "math" or "reference".

    Returns:
        ``out`` (B, Hq, Nq, Dv) in q's dtype, or ``(out, lse)``.

    Raises:
        TypeError: non-tensor input or a dtype outside the four float types.
        ValueError: shapes, devices or argument values that do not fit (message names them).
        UnsupportedInputs: the requested backend cannot run this valid call (message lists every
            backend considered and why it declined).
    """
    backend = _check_backend(backend)
    if torch.compiler.is_compiling():  # one opaque custom op for torch.compile (no graph break)
        from ._custom_op import attention_op

        return attention_op(
            q, k, v, causal=causal, window=window, mask=mask, bias=bias,
            alibi_slopes=alibi_slopes, softcap=softcap, segment_ids=segment_ids, scale=scale,
            dropout_p=dropout_p, return_lse=return_lse, backend=backend,
        )  # fmt: skip
    spec = validate(
        q, k, v, causal=causal, window=window, mask=mask, bias=bias, alibi_slopes=alibi_slopes,
        softcap=softcap, segment_ids=segment_ids, scale=scale, dropout_p=dropout_p,
        return_lse=return_lse,
    )  # fmt: skip
    chosen = select(spec, backend)
    seed = _rng.draw_seed() if spec.dropout_p > 0 else None
    out, lse = chosen.run(spec, q, k, v, seed)
    return (out, lse) if return_lse else out


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return available()


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> str:
    """Which backend ``auto`` would pick for this call, and why each other one declined."""
    backend = _check_backend(kwargs.pop("backend", "auto"))
    spec = validate(q, k, v, **kwargs)
    names = candidates(spec.device) if backend == "auto" else [backend]
    lines = [f"call: {spec.describe()}"]
    picked = None
    for n in names:
        why = refusals(spec, n)
        if why:
            lines.append(f"  {n}: declines - " + "; ".join(why))
        elif picked is None:
            picked = n
            lines.append(f"  {n}: runs it")
        else:
            lines.append(f"  {n}: could run it (lower priority than {picked})")
    lines.insert(1, f"backend={backend!r} picks: {picked or 'nothing (UnsupportedInputs)'}")
    return "\n".join(lines)


def _index(sel: Any, n: int, what: str, device: torch.device) -> torch.Tensor | None:
    """Normalise ``heads``/``rows`` (None, int, slice, sequence, tensor) to int64 indices."""
    if sel is None:
        return None
    if isinstance(sel, slice):
        idx = torch.arange(n)[sel]
    elif isinstance(sel, int) and not isinstance(sel, bool):
        idx = torch.tensor([sel])
    else:
        try:
            idx = torch.as_tensor(sel).reshape(-1).cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{what} must be an index sequence or a slice, got {sel!r}") from exc
        if idx.numel() and (idx.is_floating_point() or idx.dtype == torch.bool):
            raise TypeError(f"{what} must hold integer indices, got {idx.dtype}")
        idx = idx.long()
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise ValueError(f"{what} index out of range for size {n}: {sel!r}")
    return (idx % n if n else idx).to(device)


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
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
) -> torch.Tensor:
    """Exact attention probabilities, computed block by block from the lse.

    Only one tile of scores is alive at a time beyond the result itself, so asking for a few
    heads and rows of a long sequence stays cheap. The probabilities are those before dropout.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); the rules as in :func:`attention`.
        lse: (B, Hq, Nq) natural-log lse from ``attention(..., return_lse=True)``; recomputed
            (for the selected heads and rows only) when None.
        heads: query heads to return (index sequence, slice or int); all when None.
        rows: query rows to return; all when None.

    Returns:
        float32 (B, len(heads), len(rows), Nk); rows with no visible key are 0.
    """
    spec = validate(
        q, k, None, causal=causal, window=window, mask=mask, bias=bias,
        alibi_slopes=alibi_slopes, softcap=softcap, segment_ids=segment_ids, scale=scale,
        need_v=False,
    )  # fmt: skip
    head_idx = _index(heads, spec.Hq, "heads", q.device)
    row_idx = _index(rows, spec.Nq, "rows", q.device)
    if lse is not None:
        if not isinstance(lse, torch.Tensor):
            raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
        if tuple(lse.shape) != (spec.B, spec.Hq, spec.Nq):
            raise ValueError(
                f"lse must have shape (B, Hq, Nq) = {(spec.B, spec.Hq, spec.Nq)}, got {tuple(lse.shape)}"
            )
        if lse.device != q.device:
            raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    with torch.no_grad():
        return _weights(spec, q, k, lse, head_idx, row_idx)


def _weights(spec, q, k, lse, head_idx, row_idx) -> torch.Tensor:
    if q.device.type == "cuda" and not refusals(spec, "triton"):  # the Triton probs kernel
        from .backends.triton import weights

        return weights(spec, q, k, lse, head_idx, row_idx)
    rules = Rules.from_spec(spec)
    if head_idx is not None:
        q = q.index_select(1, head_idx)
        k = k.index_select(1, head_idx // spec.group)  # one key head per selected query head
        lse = None if lse is None else lse.index_select(1, head_idx)
    if row_idx is not None:
        q = q.index_select(2, row_idx)
        lse = None if lse is None else lse.index_select(2, row_idx)
    if head_idx is not None or row_idx is not None:
        rules = rules.select(head_idx, row_idx)
    prob = Problem(rules, spec.scale, spec.softcap)
    if lse is None:
        _, lse = forward(prob, q, k, None)
    return probabilities(prob, q, k, lse)
