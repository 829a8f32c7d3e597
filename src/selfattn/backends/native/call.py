"""The native engine's call record: everything a kernel call needs besides its tensors, by name.

:func:`record` turns a validated :class:`~selfattn.spec.AttentionSpec` (plus the dropout seed)
into a :data:`NativeCall`, the one argument that carries the rules into the extension's
``forward``, ``backward``, ``probabilities`` and ``bounds``; ``csrc/bindings.cpp`` reads it in one
place (``read_call``) into its ``Call`` struct. Its fields follow from the table of rules the way
``_compile.py`` derives the custom op's schema: each spec field of each row of ``spec.RULES``
maps to record fields (:data:`FROM_SPEC`) or is declined with a reason (:data:`DECLINED`; the
backend then refuses calls that use it), and the fields a call adds (:data:`CALL_FIELDS`) follow.
A rule whose fields are in neither table is refused too, never ignored. The extension exports
its own list (``CALL_FIELDS``), which the tests hold equal to :data:`FIELDS`.

Window sides are clamped here: a side at least as large as every distance between a row and a
key restricts nothing and becomes -1 (unbounded), so any int the spec allows reaches C++ as a
small int64 and no position arithmetic can overflow (the extension checks the same again).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import torch

from ...spec import RULES, AttentionSpec, Rule

__all__ = [
    "CALL_FIELDS",
    "DECLINED",
    "FIELDS",
    "FROM_SPEC",
    "REFUSED",
    "STORAGE_FIELDS",
    "WINDOW_FIELDS",
    "NativeCall",
    "record",
    "records_over",
    "records_with_window",
    "refused_rules",
]

# spec field of a rule -> the record fields that carry it
FROM_SPEC: dict[str, tuple[str, ...]] = {
    "causal": ("causal",),
    "window": ("left", "right"),  # -1: unbounded
    "mask": ("mask",),
    "bias": ("bias",),
    "alibi_slopes": ("alibi",),
    "softcap": ("softcap",),  # 0.0: none
    "q_ids": ("q_ids",),
    "kv_ids": ("kv_ids",),
    "scale": ("scale",),
    "dropout_p": ("dropout_p",),
    "sinks": ("sinks",),  # None: no sink
}
# spec fields of rules the engine does not take, and why (none today)
DECLINED: dict[str, str] = {}
# what a call adds: the position of row 0, dropout's seed words, and where the call's rows sit in
# the dropout numbering of a larger call (0: the call is the whole)
CALL_FIELDS = ("start", "seed0", "seed1", "drop_hq", "drop_nq", "drop_b0", "drop_h0", "drop_r0")
# quantized storage of k and of v (a QuantizedKV read in place; codes None: the tensor is read):
# the code bytes, the float32 scales, bits, channels per scale, and whether the codes are of the
# Walsh-Hadamard-rotated head dim (the engine rotates q or the output instead)
STORAGE = ("codes", "scales", "bits", "group", "rotate")
STORAGE_FIELDS = tuple(f"{x}_{f}" for x in ("k", "v") for f in STORAGE)
PLAIN = (None, None, 0, 0, False)  # the storage fields of a plain tensor
# a float window after the keys (a cache's newest tokens: kv_residual.ResidualKV), read by the
# decode kernel as more chunks of the same call: k and v are then the keys before it (None: none)
WINDOW_FIELDS = ("k_window", "v_window")
NO_WINDOW = (None, None)

FIELDS: tuple[str, ...] = (
    *(name for rule in RULES for f in rule.fields for name in FROM_SPEC.get(f, ())),
    *CALL_FIELDS,
    *STORAGE_FIELDS,
    *WINDOW_FIELDS,
)


def refused_rules(from_spec: dict[str, tuple[str, ...]], declined: dict[str, str]) -> tuple:
    """The rows of ``RULES`` with a spec field that is declined or in neither table."""
    return tuple(
        rule for rule in RULES if any(f in declined or f not in from_spec for f in rule.fields)
    )


# rules the engine cannot honour: its ``check`` refuses a call that uses one
REFUSED: tuple[Rule, ...] = refused_rules(FROM_SPEC, DECLINED)

NativeCall = namedtuple("NativeCall", FIELDS)  # type: ignore[misc]
NativeCall.__doc__ = "The rules of one native kernel call (see the module docstring)."

_new = tuple.__new__  # NativeCall(*values) without its keyword handling: this is the hot path


def storage(x: Any) -> tuple:
    """The storage fields of one operand: those of a ``QuantizedKV`` (anything with ``codes``,
    ``scales``, ``bits``, ``group_size``, ``rotate``), :data:`PLAIN` for a tensor."""
    if isinstance(x, torch.Tensor) or x is None:
        return PLAIN
    return (x.codes, x.scales, x.bits, x.group_size, x.rotate)


def record(
    spec: AttentionSpec, seed: tuple[int, int] | None = None, k: Any = None, v: Any = None
) -> Any:
    """The :data:`NativeCall` of ``spec``; ``seed``: dropout's two seed words (None: no dropout).

    ``k`` / ``v``: a ``QuantizedKV`` read in place (the extension then takes a zero-stride
    stand-in of the dequantized shape for that operand); a tensor or None: read as given.

    The call is the whole of its dropout numbering (``drop_*`` = 0); a part of a larger call
    sets them with ``record(...)._replace(drop_hq=..., ...)``. The values are in the order of
    :data:`FIELDS`; the tests check each by name.
    """
    left = right = -1
    window = spec.window
    if window is not None:
        # a side >= every distance (rows at start .. start + Nq - 1, keys 0 .. Nk - 1) is unbounded
        reach = abs(spec.start) + spec.Nq + spec.Nk
        if window[0] is not None and window[0] < reach:
            left = window[0]
        if window[1] is not None and window[1] < reach:
            right = window[1]
    seed0, seed1 = (0, 0) if seed is None else seed
    softcap = spec.softcap
    return _new(
        NativeCall,
        (
            spec.causal,
            left,
            right,
            spec.mask,
            spec.bias,
            spec.alibi_slopes,
            0.0 if softcap is None else softcap,
            spec.q_ids,
            spec.kv_ids,
            spec.scale,
            spec.dropout_p,
            spec.sinks,
            spec.start,
            seed0,
            seed1,
            0,
            0,
            0,
            0,
            0,
            *(PLAIN if k is None else storage(k)),
            *(PLAIN if v is None else storage(v)),
            *NO_WINDOW,
        ),
    )


def records_over(spec: AttentionSpec, k: Any, v: Any) -> Any:
    """``make(k, v)``: :func:`record` ``(spec, None, k, v)`` for operands of the kind of ``k`` /
    ``v`` (each a ``QuantizedKV`` or a tensor, as now), with everything but the codes and scales
    of each quantized operand made once: ``make`` puts in those of the call's operands (a
    ``QuantizedKV`` of the same bits, group size and rotation where ``k`` / ``v`` is one).
    The front door's fast path over quantized caches (``api.quantized_plain_call``)."""
    base = record(spec, None, k, v)
    head = tuple(base[: len(FIELDS) - len(STORAGE_FIELDS) - len(WINDOW_FIELDS)])
    ks, vs = storage(k)[2:], storage(v)[2:]  # bits, group, rotate (a tensor: PLAIN's)
    kt, vt = isinstance(k, torch.Tensor), isinstance(v, torch.Tensor)
    if not kt and not vt:
        return lambda k, v: _new(
            NativeCall, (*head, k.codes, k.scales, *ks, v.codes, v.scales, *vs, *NO_WINDOW)
        )
    if not kt:
        return lambda k, v: _new(NativeCall, (*head, k.codes, k.scales, *ks, *PLAIN, *NO_WINDOW))
    if not vt:
        return lambda k, v: _new(NativeCall, (*head, *PLAIN, v.codes, v.scales, *vs, *NO_WINDOW))
    return lambda k, v: base


def records_with_window(spec: AttentionSpec, k: Any, v: Any) -> Any:
    """``make(k, v, kw, vw, start)``: the records of :func:`records_over` for keys and values
    ``k`` / ``v`` (of the kind given) followed by float windows ``kw`` / ``vw``, the call's
    ``start`` (``Nk - Nq`` over both parts) put in per call: everything else in ``spec`` holds
    for any number of tokens in either part (a decode step over a cache with a float window,
    ``kv_residual.fused_call``). Each record is built in one go from the parts made here (a
    decode step makes one per layer)."""
    base = record(spec, None, k, v)
    i, n = FIELDS.index("start"), len(FIELDS) - len(STORAGE_FIELDS) - len(WINDOW_FIELDS)
    before, after = tuple(base[:i]), tuple(base[i + 1 : n])  # the fields around ``start``
    ks, vs = storage(k)[2:], storage(v)[2:]  # bits, group, rotate (a tensor: PLAIN's)
    kt, vt = isinstance(k, torch.Tensor), isinstance(v, torch.Tensor)

    def build(k: Any, v: Any, kw: torch.Tensor, vw: torch.Tensor, start: int) -> Any:
        kstore = PLAIN if kt else (k.codes, k.scales, *ks)
        vstore = PLAIN if vt else (v.codes, v.scales, *vs)
        return _new(NativeCall, (*before, start, *after, *kstore, *vstore, kw, vw))

    return build
