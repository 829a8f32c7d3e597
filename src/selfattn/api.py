"""The front door: ``attention``, ``attention_weights``, ``explain``, ``available_backends``.

Dispatch only: each call is validated in full (``spec.validate``) before any work, then handed
to the backend that ``backends.select`` picks. A plain call (no rule but ``causal`` and
``scale``, no dropout, no gradient: a decode step) takes ``plain_call``, which checks the same
in fewer steps and remembers the backend's choice per call shape (``quantized_plain_call`` the
same over a quantized cache). While ``torch.compile`` traces,
``attention`` becomes the ``selfattn::attention`` custom op (``_compile``), one opaque node.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from . import _compile, _rng, checks
from .backends import (
    BACKENDS,
    CHOICES,
    available,
    candidates,
    forget_choices,
    preferred,
    refusals,
    select,
)
from .forward_mode import has_tangents, transformed
from .kv_residual import ResidualKV, fused_call, merge, residual_call
from .quant import QuantizedKV, rotated_like, standin, unwrap, unwrap_call, unwrap_label
from .spec import AttentionSpec, check_qkv, validate, validate_call

__all__ = [
    "WEIGHTS_HOOKS",
    "attention",
    "attention_weights",
    "available_backends",
    "check_lse",
    "explain",
    "selection",
]

WEIGHTS_HOOKS = ("weights",)  # the registry hook attention_weights uses
CHOICES_KEPT = 256  # call shapes whose choice plain_call remembers (then it starts over)


def check_backend(backend: Any) -> str:
    """A backend name (or "auto"), checked."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        names = ", ".join(["auto", *BACKENDS])
        raise ValueError(f"unknown backend {backend!r}; choose one of: {names}")
    return backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor | QuantizedKV,
    v: torch.Tensor | QuantizedKV,
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
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with every rule of docs/api.md.

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
            Any strides. ``k`` and ``v`` may be :class:`selfattn.QuantizedKV` (its ``dtype``
            must be q's): the result is that of their ``dequantize()`` up to float32 rounding;
            they get no gradient. ``native`` reads their codes in place (no dequantized copy);
            the other backends get them dequantized (rotated codes stay rotated: q, or the
            output, is rotated instead). They may also be :class:`selfattn.kv_residual.ResidualKV`
            (older tokens, then a float window: a cache's residual window), read as one call per
            part merged exactly through the lse.
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
        return_lse: also return the natural-log logsumexp of the visible scores (and the sink),
            float32 (B, Hq, Nq). It is differentiable.
        backend: "auto" (the first of the device's priority list that accepts the call:
            ``native`` first on an x86-64 CPU, where its measured rule may hand a small call
            to ``sdpa``; ``sdpa`` first on an ARM CPU; ``triton`` on CUDA), or a name from
            ``selfattn.backends.BACKENDS``: "native", "triton", "sdpa", "tiled", "math" or
            "reference".
        sinks: float (Hq,), one learned logit per query head (GPT-OSS's attention sinks): an
            extra logit in every row's softmax that carries no value, so
            ``lse = log(exp(sinks[h]) + sum_j exp(s_j))`` and a row's probabilities sum to less
            than 1; a row with no visible key gives output 0 and lse ``sinks[h]``; ``-inf`` is
            no sink. Gets a gradient. ``sdpa`` declines it.

    Returns:
        ``out`` (B, Hq, Nq, Dv) in q's dtype, or ``(out, lse)``.

    Raises:
        TypeError: non-tensor input or a dtype outside the four float types.
        ValueError: shapes, devices or argument values that do not fit (message names them).
        UnsupportedInputs: the requested backend cannot run this valid call (message lists every
            backend considered and why it declined).
    """
    if (  # no rule but causal and scale, no dropout: the fast path (None: it declines)
        window is None
        and mask is None
        and bias is None
        and alibi_slopes is None
        and softcap is None
        and segment_ids is None
        and sinks is None
        and type(dropout_p) is float
        and not dropout_p
    ):
        got = fast_call(q, k, v, causal, scale, return_lse, backend)
        if got is not None:
            return got
    rules = {
        "causal": causal,
        "window": window,
        "mask": mask,
        "bias": bias,
        "alibi_slopes": alibi_slopes,
        "softcap": softcap,
        "segment_ids": segment_ids,
        "scale": scale,
        "dropout_p": dropout_p,
        "sinks": sinks,
    }
    backend = check_backend(backend)
    if type(k) is ResidualKV or type(v) is ResidualKV:  # older tokens, then a float window
        return residual_call(q, k, v, rules, return_lse, backend)
    if type(k) is QuantizedKV or type(v) is QuantizedKV:
        return quantized_call(q, k, v, rules, return_lse, backend)
    if torch.compiler.is_compiling():  # one opaque custom op for torch.compile (no graph break)
        return _compile.attention_op(q, k, v, return_lse=return_lse, backend=backend, **rules)
    spec = validate_call(q, k, v, rules, return_lse)
    if has_tangents(q, k, v, bias, alibi_slopes, sinks):  # backends without a JVP rule decline
        spec = replace(spec, tangents=True)
    chosen = select(spec, backend)
    seed = _rng.draw_seed() if spec.dropout_p > 0 else None
    out, lse = chosen.run(spec, q, k, v, seed)
    return (out, lse) if return_lse else out


def quantized_call(
    q: Any, k: Any, v: Any, rules: dict[str, Any], return_lse: bool, backend: str
) -> Any:
    """:func:`attention` with ``k`` and/or ``v`` a :class:`QuantizedKV`.

    The call is validated with zero-stride stand-ins of the dequantized shape (no values are
    made for that). A backend that reads the codes itself (``reads_quantized``: ``native``) gets
    the ``QuantizedKV`` as it is; any other gets (B, Hkv, Nk, D) tensors in q's dtype, with
    rotated codes kept rotated and q (for keys) or the output (for values) rotated instead.
    """
    if torch.compiler.is_compiling():
        q, k, v, _, rotate_out = unwrap_call(q, k, v)
        got = _compile.attention_op(q, k, v, return_lse=return_lse, backend=backend, **rules)
        return unrotated(got, return_lse) if rotate_out else got
    spec = validate_call(q, standin(k), standin(v), rules, return_lse)
    # recorded so that backends can tell (and explain) what they were given; the spec was
    # made by this call (dataclasses.replace would cost a fifth of a short decode step)
    spec.quantized = unwrap_label(k, v)
    if has_tangents(q, rules["bias"], rules["alibi_slopes"], rules["sinks"]):  # QuantizedKV: none
        spec.tangents = True
    chosen = select(spec, backend)
    seed = _rng.draw_seed() if spec.dropout_p > 0 else None
    out, lse = quantized_run(spec, chosen, q, k, v, seed)
    return (out, lse) if return_lse else out


def quantized_run(
    spec: AttentionSpec, chosen: Any, q: torch.Tensor, k: Any, v: Any, seed: Any
) -> tuple[torch.Tensor, Any]:
    """``(out, lse)`` of ``chosen`` over a validated quantized call: the codes as they are for a
    backend that reads them (``run_quantized``), else dequantized (rotated codes kept rotated)."""
    if getattr(chosen, "reads_quantized", False):
        return chosen.run_quantized(spec, q, k, v, seed)
    q, k, v, _, rotate_out = unwrap_call(q, k, v)
    out, lse = chosen.run(spec, q, k, v, seed)
    if rotate_out:
        out = rotated_like(out)  # (B, Hq, Nq, Dv) back from the values' rotated basis
    return out, lse


def fast_call(
    q: Any, k: Any, v: Any, causal: Any, scale: Any, return_lse: Any, backend: Any
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """The fast path of a call with no rule but ``causal`` and ``scale`` and no dropout, for
    whatever kind ``k`` and ``v`` are: :func:`residual_plain_call` for a cache with a float
    window (:class:`ResidualKV`), :func:`quantized_plain_call` for a :class:`QuantizedKV`,
    :func:`plain_call` for tensors; None when it declines (the full path then runs). What
    :func:`attention` tries first, and transformers' attention function for a decode step."""
    if type(k) is ResidualKV or type(v) is ResidualKV:  # a quantized cache with a float window
        return residual_plain_call(q, k, v, causal, scale, return_lse, backend)
    if type(k) is QuantizedKV or type(v) is QuantizedKV:  # a quantized cache's decode step
        return quantized_plain_call(q, k, v, causal, scale, return_lse, backend)
    return plain_call(q, k, v, causal, scale, return_lse, backend)


def residual_plain_call(
    q: Any, k: Any, v: Any, causal: Any, scale: Any, return_lse: Any, backend: Any
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`plain_call` over a cache with a float window: ``k`` and ``v`` both a
    :class:`ResidualKV` split at the same token, or None to decline.

    What ``residual_call`` does for such a call, without building the rules of each part: a
    decode step over a quantized older part is one kernel call (``kv_residual.fused_call``);
    otherwise the window's call is the plain call itself (:func:`plain_call`), the older part's a plain call
    without causality (:func:`quantized_plain_call` for a quantized part), as ``older_rules``
    makes it wherever the older part lies wholly behind every query row (causal with at least
    ``Nq - 1`` window tokens: a decode step); the two merge as ``residual_call`` merges them
    (``kv_residual.merge``), so the result is the same, bit for bit. It declines anything else
    (an older part that some row sees only in part, splits that differ, any value a part's fast
    path declines or refuses): the full path then validates the whole call and raises what it
    raises.
    """
    if (
        type(k) is not ResidualKV
        or type(v) is not ResidualKV
        or type(q) is not torch.Tensor
        or (return_lse is not True and return_lse is not False)
    ):
        return None
    try:
        got = fused_call(q, k, v, causal, scale, return_lse, backend)  # both in one kernel call
    except (TypeError, ValueError, NotImplementedError):
        return None  # the full path checks the whole call and says what is wrong with it
    if got is not None:
        return got
    kh, kw, vh, vw = k.head, k.window, v.head, v.window
    m, w = kh.shape[2], kw.shape[2]
    if vh.shape[2] != m or vw.shape[2] != w or q.dim() != 4:
        return None
    quantized = type(kh) is QuantizedKV or type(vh) is QuantizedKV
    try:
        if not m or not w:  # one part: the call as it is, on that part (as residual_call)
            if not m:
                return plain_call(q, kw, vw, causal, scale, return_lse, backend)
            head = quantized_plain_call if quantized else plain_call
            return head(q, kh, vh, causal, scale, return_lse, backend)
        if causal is True and w < q.shape[2] - 1:
            return None  # some query row sees only part of the older tokens: rules needed
        got_b = plain_call(q, kw, vw, causal, scale, True, backend)
        if got_b is None:
            return None
        head = quantized_plain_call if quantized else plain_call
        got_a = head(q, kh, vh, False, scale, True, backend)
    except (TypeError, ValueError, NotImplementedError):
        return None  # the full path checks the whole call and says what is wrong with it
    if got_a is None:
        return None
    return merge(got_a[0], got_a[1], got_b[0], got_b[1], return_lse)


def quantized_plain_call(
    q: Any, k: Any, v: Any, causal: Any, scale: Any, return_lse: Any, backend: Any
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`plain_call` for a call over a quantized cache: ``k`` and/or ``v`` a
    :class:`QuantizedKV` (the other a tensor), or None to decline it.

    The same checks, and the spec :func:`quantized_call` builds (validated with the same
    stand-ins, labelled the same); on the CPU the choice is remembered (``backends.CHOICES``)
    per backend name, q's shape and dtype, each operand's codes shape, bits, group size,
    rotation and dtype (a tensor's shape and dtype), the rules and the thread count, with the
    backend's prepared ``plain_quantized`` run (the stand-ins and the spec's part of the call
    record made once; only each call's codes and scales are put in). It declines what
    :func:`plain_call` declines.
    """
    kq, vq = type(k) is QuantizedKV, type(v) is QuantizedKV
    if not plain_arguments(q, k, v, causal, scale, return_lse, backend, kq, vq):
        return None
    key = None
    kc = k.codes if kq else k
    vc = v.codes if vq else v
    if q.is_cpu and kc.is_cpu and vc.is_cpu:
        # everything check_qkv (on the stand-ins), the label and select read
        ks = (kc.shape, k.bits, k.group_size, k.rotate, k.dtype) if kq else (k.shape, k.dtype)
        vs = (vc.shape, v.bits, v.group_size, v.rotate, v.dtype) if vq else (v.shape, v.dtype)
        key = ("quantized", backend, q.shape, q.dtype, ks, vs)
        key += (causal, scale, return_lse, torch.get_num_threads())
        got = CHOICES.get(key)
        if got is not None:
            out, lse = got[2](q, k, v)
            return (out, lse) if return_lse else out
    if backend != "auto" and backend not in BACKENDS:
        return None
    spec = plain_spec(q, standin(k), standin(v), causal, scale, return_lse)
    spec.quantized = unwrap_label(k, v)  # the spec was made here (as in quantized_call)
    chosen = select(spec, backend)
    prepare = getattr(chosen, "plain_quantized", None)
    if key is None or prepare is None:  # a backend that dequantizes: as quantized_call runs it
        out, lse = quantized_run(spec, chosen, q, k, v, None)
        return (out, lse) if return_lse else out
    run = prepare(spec, k, v)
    remember(key, (spec, chosen, run))
    out, lse = run(q, k, v)
    return (out, lse) if return_lse else out


def plain_call(
    q: Any, k: Any, v: Any, causal: Any, scale: Any, return_lse: Any, backend: Any
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`attention` for a call that uses no rule but ``causal`` and ``scale``, without
    dropout or a gradient (a decode step, an inference prefill), or None to decline it.

    A decode step over a short cache is a few microseconds of work, so this path checks in a
    few comparisons what :func:`attention` would check, builds the spec ``validate_call``
    builds (:func:`plain_spec`) and runs the backend ``select`` picks: the same result, bit
    for bit. On the CPU the choice is remembered per backend name and call shape
    (``backends.CHOICES``) with the backend's prepared ``plain`` run (its call record built
    once), so a repeated shape (every layer of a decode step) costs one dict lookup.

    It declines (the full path then runs, and raises what it raises) anything unusual: a
    tensor subclass or a QuantizedKV, an argument of an unexpected type or a value the full
    path would refuse, a gradient or a forward-mode tangent to carry, a torch.func transform,
    or tracing by ``torch.compile``. The errors it raises itself are those of ``check_qkv``
    (the full path's first check after the backend's name) and ``select``'s, for the same spec.
    """
    if not plain_arguments(q, k, v, causal, scale, return_lse, backend):
        return None
    key = None
    if q.is_cpu and k.is_cpu and v.is_cpu:
        # everything check_qkv and select read: shapes and dtypes (the device is the CPU), and
        # the thread count (auto's measured rules depend on it: native.choice.thread_bucket)
        key = (backend, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype)
        key += (causal, scale, return_lse, torch.get_num_threads())
        got = CHOICES.get(key)
        if got is not None:
            out, lse = got[2](q, k, v)
            return (out, lse) if return_lse else out
    if backend != "auto" and backend not in BACKENDS:
        return None
    spec = plain_spec(q, k, v, causal, scale, return_lse)
    chosen = select(spec, backend)
    if key is None:
        out, lse = chosen.run(spec, q, k, v, None)
        return (out, lse) if return_lse else out
    prepare = getattr(chosen, "plain", None)
    run = prepare(spec) if prepare is not None else runner(chosen, spec)
    remember(key, (spec, chosen, run))
    out, lse = run(q, k, v)
    return (out, lse) if return_lse else out


def remember(key: tuple, entry: tuple) -> None:
    """Keep ``entry`` (spec, backend, run) under ``key`` in ``backends.CHOICES``, starting over
    once it holds ``CHOICES_KEPT`` (a decode step may bring a new shape every call)."""
    if len(CHOICES) >= CHOICES_KEPT:
        forget_choices()
    CHOICES[key] = entry


def runner(backend: Any, spec: AttentionSpec) -> Any:
    """``run(q, k, v)``: ``backend.run`` for ``spec`` (a backend without a ``plain`` hook)."""
    return lambda q, k, v: backend.run(spec, q, k, v, None)


def plain_spec(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None,
    return_lse: bool,
) -> AttentionSpec:
    """The spec ``validate_call`` gives a call of :func:`plain_call`'s kind (no gradient), from
    ``check_qkv`` (which raises what the full path raises for q, k, v) and the rules' defaults."""
    b, hq, nq, hkv, nk, d, dv = check_qkv(q, k, v, True)
    return AttentionSpec(
        b,
        hq,
        hkv,
        nq,
        nk,
        d,
        dv,
        q.dtype,
        q.device,
        causal=causal,
        scale=1.0 / math.sqrt(d) if scale is None else scale,
        return_lse=return_lse,
        start=nk - nq,
    )


def unrotated(got: Any, return_lse: bool) -> Any:
    """``out`` (or ``(out, lse)``) with out rotated back from the values' rotated basis."""
    return (rotated_like(got[0]), got[1]) if return_lse else rotated_like(got)


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return available()


def explain(
    q: torch.Tensor, k: torch.Tensor | QuantizedKV, v: torch.Tensor | QuantizedKV, **kwargs: Any
) -> str:
    """Which backend ``auto`` would pick for this call, and why each other one declined."""
    backend = check_backend(kwargs.pop("backend", "auto"))
    k, v = (x.dequantize() if type(x) is ResidualKV else x for x in (k, v))
    k, v, quantized = unwrap(k, v)
    spec = validate(q, k, v, **kwargs)
    if quantized:
        spec = replace(spec, quantized=quantized)
    names = candidates(spec.device) if backend == "auto" else [backend]
    lines = [f"call: {spec.describe()}"]
    picked = None
    for n in names:
        why = refusals(spec, n)
        if why:
            lines.append(f"  {n}: declines - " + "; ".join(why))
        elif picked is None:
            alt = preferred(spec, n) if backend == "auto" else None
            picked = alt[0] if alt else n
            lines.append(
                f"  {n}: could run it; auto prefers {alt[0]}: {alt[1]}"
                if alt
                else f"  {n}: runs it"
            )
        elif n == picked:
            lines.append(f"  {n}: runs it")
        else:
            lines.append(f"  {n}: could run it (lower priority than {picked})")
    lines.insert(1, f"backend={backend!r} picks: {picked or 'nothing (UnsupportedInputs)'}")
    return "\n".join(lines)


def selection(sel: Any, n: int, what: str, device: torch.device) -> torch.Tensor | None:
    """``heads``/``rows`` (None, int, slice, sequence, tensor) as int64 indices, or None (all)."""
    if sel is None:
        return None
    if not isinstance(sel, (slice, int)):
        try:
            t = torch.as_tensor(sel)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{what} must be an index sequence or a slice, got {sel!r}") from exc
        if t.numel() and (t.is_floating_point() or t.dtype == torch.bool):
            raise TypeError(f"{what} must hold integer indices, got {t.dtype}")
        if t.dim() > 1:
            raise ValueError(
                f"{what} must be a 1-D index sequence or a slice, got shape {tuple(t.shape)}"
            )
        sel = t.reshape(-1).tolist()
    return torch.tensor(checks.index_list(sel, n, what), dtype=torch.long, device=device)


def check_lse(lse: Any, spec: AttentionSpec) -> None:
    """A given lse (None: recomputed) must be a float (B, Hq, Nq) tensor on the call's device."""
    if lse is None:
        return
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if not lse.is_floating_point():
        raise TypeError(f"lse must be a float tensor (float32 from attention), got {lse.dtype}")
    if tuple(lse.shape) != (spec.B, spec.Hq, spec.Nq):
        raise ValueError(
            f"lse must have shape (B, Hq, Nq) = {(spec.B, spec.Hq, spec.Nq)}, got {tuple(lse.shape)}"
        )
    if lse.device != spec.device:
        raise ValueError(f"lse is on {lse.device} but q is on {spec.device}")


def attention_weights(
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
) -> torch.Tensor:
    """Exact attention probabilities, computed block by block from the lse.

    Only one tile of scores is alive at a time beyond the result itself, so asking for a few
    heads and rows of a long sequence stays cheap. The probabilities are those before dropout.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D) (or a :class:`selfattn.QuantizedKV`, read as its
            ``dequantize()``); the rules as in :func:`attention`.
        lse: (B, Hq, Nq) natural-log lse from ``attention(..., return_lse=True)``; recomputed
            (for the selected heads and rows only) when None. With ``sinks``, the lse that
            ``attention(..., sinks=sinks, return_lse=True)`` returns.
        heads: query heads to return (index sequence, slice or int); all when None.
        rows: query rows to return; all when None.

    Returns:
        float32 (B, len(heads), len(rows), Nk); rows with no visible key are 0. With ``sinks``
        (Hq,) a row sums to ``1 - exp(sinks[h] - lse)``: the sink's share is not returned.
    """
    if type(k) is ResidualKV:  # a cache's [quantized | float window]: read as one tensor
        k = k.dequantize()
    q, k, _, quantized, _ = unwrap_call(q, k, None)  # rotated keys: q rotated instead
    spec = validate(
        q,
        k,
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
    if quantized:
        spec = replace(spec, quantized=quantized)
    head_idx = selection(heads, spec.Hq, "heads", q.device)
    row_idx = selection(rows, spec.Nq, "rows", q.device)
    check_lse(lse, spec)
    chosen = select(spec, "auto", need=WEIGHTS_HOOKS)
    with torch.no_grad():
        return chosen.weights(spec, q, k, lse, head_idx, row_idx)


def plain_arguments(
    q: Any,
    k: Any,
    v: Any,
    causal: Any,
    scale: Any,
    return_lse: Any,
    backend: Any,
    kq: bool = False,
    vq: bool = False,
) -> bool:
    """Whether a call's arguments are plain enough for :func:`plain_call` (``kq``/``vq``: k/v
    is a :class:`QuantizedKV`, for :func:`quantized_plain_call`): exact tensors, bool flags,
    a str backend, a finite float32 scale, no gradient or tangent to carry, no torch.func
    transform, no tracing. Anything else is declined to the full path, which raises what it
    raises."""
    tensor = torch.Tensor
    if (
        type(q) is not tensor
        or not (kq or type(k) is tensor)
        or not (vq or type(v) is tensor)
        or (causal is not True and causal is not False)
        or (return_lse is not True and return_lse is not False)
        or type(backend) is not str
    ):
        return False
    if scale is not None and not (type(scale) is float and abs(scale) < checks.F32_HIGH):
        return False  # NaN, inf or beyond float32 (the full path says so), or not a float
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False  # (a QuantizedKV never requires one)
    # the full path marks tangents; under torch.func a backend's run decides
    return not (
        torch.compiler.is_compiling()
        or has_tangents(q, None if kq else k, None if vq else v)
        or transformed()
    )
