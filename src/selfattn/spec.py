"""One attention call, checked once: the table of rules, ``validate()`` and :class:`AttentionSpec`.

``RULES`` is the one description of the keywords of :func:`selfattn.attention`: for each, the
fields of the spec it fills, its arguments in the ``selfattn::attention`` custom op's schema,
and whether it gets a gradient. Validation, the custom op's schema and the packing of a call
into the op's arguments are all derived from it, so a new rule is one new row (and its meaning
in ``rules.py`` and the engines).

``validate()`` is the only place that looks at user input: ``TypeError`` for a wrong type or
dtype, ``ValueError`` for a wrong value, each naming what arrived and what was expected, before
any work. Backends receive an :class:`AttentionSpec` and may trust it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch

from . import checks
from .sinks import check_sinks

__all__ = [
    "FLOAT_DTYPES",
    "RULES",
    "AttentionSpec",
    "Rule",
    "UnsupportedInputs",
    "check_qkv",
    "validate",
    "validate_call",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_SET = frozenset(FLOAT_DTYPES)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class UnsupportedInputs(NotImplementedError):
    """A valid call that the requested backend(s) cannot run.

    The message lists every backend considered and every reason it declined.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons or {}


# -- the spec ------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class AttentionSpec:
    """A validated call of :func:`selfattn.attention` (docs/api.md), or a part of one.

    Shapes: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv). ``mask`` and ``bias`` are
    4-D views broadcastable to (B, Hq, Nq, Nk); ``alibi_slopes`` is (B|1, Hq); ``q_ids`` (B, Nq)
    and ``kv_ids`` (B, Nk); ``sinks`` (Hq,). Query row ``i`` sits at absolute position ``start + i`` (``validate``
    sets ``start = Nk - Nq``, the bottom-right alignment), or at ``qpos[i]`` when the rows are a
    selection (``select``). Treat a spec as immutable: ``part`` and ``select`` return new ones.
    """

    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    dtype: torch.dtype
    device: torch.device
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    softcap: float | None = None
    q_ids: torch.Tensor | None = None
    kv_ids: torch.Tensor | None = None
    scale: float = 1.0
    dropout_p: float = 0.0
    sinks: torch.Tensor | None = None  # (Hq,): one extra logit per query head, no value
    return_lse: bool = False
    requires_grad: bool = False
    start: int = 0
    qpos: torch.Tensor | None = field(default=None)
    quantized: str = ""  # "" or which of k/v arrived as a QuantizedKV, e.g. "k int8, v int4"
    tangents: bool = False  # some input carries a forward-mode tangent (forward_ad, torch.func.jvp)

    @property
    def group(self) -> int:
        """Query heads per key/value head (query head ``h`` reads key/value head ``h // group``)."""
        return self.Hq // self.Hkv

    @property
    def left(self) -> int | None:
        return None if self.window is None else self.window[0]

    @property
    def right(self) -> int | None:
        return None if self.window is None else self.window[1]

    @property
    def restricts(self) -> bool:
        """Whether some rule can hide a key from a query."""
        return (
            self.causal
            or self.window is not None
            or self.mask is not None
            or self.q_ids is not None
        )

    @property
    def rule_names(self) -> list[str]:
        """The keywords of the rules this call uses, for messages."""
        return [r.label or r.keyword for r in RULES if r.label != "-" and r.used(self)]

    def describe(self) -> str:
        rules = ", ".join(self.rule_names) or "no rules"
        return (
            f"q (B={self.B}, Hq={self.Hq}, Nq={self.Nq}, D={self.D}), "
            f"k/v (Hkv={self.Hkv}, Nk={self.Nk}, Dv={self.Dv}), {self.dtype}, {self.device}; {rules}"
        ) + (f"; quantized {self.quantized}" if self.quantized else "")

    def keywords(self) -> dict[str, Any]:
        """The call as keyword arguments of :func:`selfattn.attention` (its rules only)."""
        return {
            r.keyword: getattr(self, r.fields[0])
            if len(r.fields) == 1
            else r.unpack(*(getattr(self, f) for f in r.fields))
            for r in RULES
        }

    # -- positions and parts ---------------------------------------------------------------------

    def positions(self, i0: int, i1: int, device: torch.device | str) -> torch.Tensor:
        """Absolute positions of rows ``[i0, i1)``, int64 (i1 - i0,)."""
        if self.qpos is None:
            return torch.arange(self.start + i0, self.start + i1, device=device)
        return self.qpos[i0:i1].to(device)

    def position_bounds(self, i0: int, i1: int) -> tuple[int, int]:
        """The first and last absolute position of rows ``[i0, i1)`` (not empty)."""
        if self.qpos is None:
            return self.start + i0, self.start + i1 - 1
        block = self.qpos[i0:i1]
        return int(block.min()), int(block.max())

    def part(self, b0: int, b1: int, kh0: int, kh1: int, r0: int, r1: int) -> AttentionSpec:
        """The call restricted to batch [b0, b1), key/value heads [kh0, kh1) and rows [r0, r1).

        Query heads follow their key/value heads: [kh0 * G, kh1 * G).
        """
        g = self.group
        h0, h1 = kh0 * g, kh1 * g
        return replace(
            self,
            B=b1 - b0,
            Hq=h1 - h0,
            Hkv=kh1 - kh0,
            Nq=r1 - r0,
            start=self.start + r0,
            qpos=None if self.qpos is None else self.qpos[r0:r1],
            mask=cut(self.mask, (b0, b1), (h0, h1), (r0, r1)),
            bias=cut(self.bias, (b0, b1), (h0, h1), (r0, r1)),
            alibi_slopes=cut(self.alibi_slopes, (b0, b1), (h0, h1)),
            q_ids=cut(self.q_ids, (b0, b1), (r0, r1)),
            kv_ids=cut(self.kv_ids, (b0, b1)),
            sinks=None if self.sinks is None else self.sinks[h0:h1],
        )

    def select(self, heads: torch.Tensor | None, rows: torch.Tensor | None) -> AttentionSpec:
        """The call for some query heads and rows; key/value heads become one per query head.

        Args:
            heads: int64 indices into the Hq query heads, or None for all.
            rows: int64 indices into the Nq rows, or None for all.
        """
        s = self
        if heads is not None:
            s = replace(
                s,
                Hq=len(heads),
                Hkv=len(heads),
                mask=pick(s.mask, 1, heads),
                bias=pick(s.bias, 1, heads),
                alibi_slopes=pick(s.alibi_slopes, 1, heads, broadcast=False),
                sinks=pick(s.sinks, 0, heads, broadcast=False),
            )
        if rows is not None:
            s = replace(
                s,
                Nq=len(rows),
                start=0,
                qpos=self.positions(0, self.Nq, rows.device)[rows],
                mask=pick(s.mask, 2, rows),
                bias=pick(s.bias, 2, rows),
                q_ids=pick(s.q_ids, 1, rows),
            )
        return s


def cut(t: torch.Tensor | None, *ranges: tuple[int, int] | None) -> torch.Tensor | None:
    """``t[r0:r1, ...]`` per leading dim, leaving broadcast (size-1) dims whole."""
    if t is None:
        return None
    index = tuple(
        slice(None) if rng is None or t.shape[d] == 1 else slice(*rng)
        for d, rng in enumerate(ranges)
    )
    return t[index]


def pick(
    t: torch.Tensor | None, dim: int, idx: torch.Tensor, broadcast: bool = True
) -> torch.Tensor | None:
    """``t.index_select(dim, idx)``, leaving a broadcast (size-1) dim whole."""
    if t is None or (broadcast and t.shape[dim] == 1):
        return t
    return t.index_select(dim, idx.to(t.device))


# -- the table of rules --------------------------------------------------------------------------


class _Call(NamedTuple):
    """What a rule's check may need to know about the call."""

    B: int
    Hq: int
    Nq: int
    Nk: int
    device: torch.device

    @property
    def target(self) -> tuple[int, int, int, int]:
        return (self.B, self.Hq, self.Nq, self.Nk)


@dataclass(frozen=True)
class Rule:
    """One keyword of :func:`selfattn.attention`.

    ``check(value, call)`` validates a value that is not None/False and returns the values of
    ``fields``; ``schema`` is the rule's part of the custom op's argument list; ``pack`` turns a
    keyword value into those op arguments and ``unpack`` turns them back into the keyword
    value. ``grad`` marks a tensor that gets a gradient; ``hook_grad=False`` one whose gradient
    the backends' ``backward`` hooks do not compute (the front end does, from out and lse).
    """

    keyword: str
    fields: tuple[str, ...]
    schema: tuple[str, ...]
    check: Callable[[Any, _Call], tuple]
    empty: tuple
    pack: Callable[[Any], tuple] = lambda value: (value,)
    unpack: Callable[..., Any] = lambda *fields: fields[0]
    grad: bool = False
    hook_grad: bool = True  # its gradient comes from the backends' ``backward`` hooks
    label: str = ""  # its name in messages: "" = the keyword, "-" = never listed (scale)
    on: Callable[[Any], bool] = lambda first: first is not None and first is not False

    def used(self, spec: AttentionSpec) -> bool:
        """Whether ``spec`` uses this rule (for messages and backends' refusals)."""
        return self.on(getattr(spec, self.fields[0]))


def _check_device(name: str, t: torch.Tensor, call: _Call) -> None:
    if t.device != call.device:
        raise ValueError(
            f"{name} is on {t.device} but q, k, v are on {call.device}; move it to {call.device}"
        )


def _broadcastable(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(shape[::-1], target[::-1]))


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def _causal(value: Any, call: _Call) -> tuple:
    if not isinstance(value, bool):
        raise TypeError(f"causal must be a bool, got {value!r}")
    return (value,)


def _window(value: Any, call: _Call) -> tuple:
    return (checks.window(value),)


def _score_shaped(name: str, t: torch.Tensor, call: _Call) -> torch.Tensor:
    """A mask or bias: broadcastable to (B, Hq, Nq, Nk), on the call's device, viewed as 4-D."""
    if not _broadcastable(tuple(t.shape), call.target):
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} is not broadcastable to (B, Hq, Nq, Nk) = "
            f"{call.target}"
        )
    _check_device(name, t, call)
    return _as_4d(t)


def _mask(mask: Any, call: _Call) -> tuple:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool (True = visible), got {mask.dtype}; pass an additive mask as bias="
        )
    return (_score_shaped("mask", mask, call),)


def _bias(bias: Any, call: _Call) -> tuple:
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a float torch.Tensor, got {type(bias).__name__}")
    if bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"bias must have a float dtype, got {bias.dtype}")
    return (_score_shaped("bias", bias, call),)


def _alibi(slopes: Any, call: _Call) -> tuple:
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a float torch.Tensor, got {type(slopes).__name__}")
    if slopes.dtype not in FLOAT_DTYPES:
        raise TypeError(f"alibi_slopes must have a float dtype, got {slopes.dtype}")
    b, hq = call.B, call.Hq
    if tuple(slopes.shape) not in ((hq,), (b, hq)):
        raise ValueError(
            f"alibi_slopes must have shape (Hq,) = ({hq},) or (B, Hq) = ({b}, {hq}), "
            f"got {tuple(slopes.shape)}"
        )
    _check_device("alibi_slopes", slopes, call)
    return (slopes if slopes.dim() == 2 else slopes.reshape(1, hq),)


def _softcap(value: Any, call: _Call) -> tuple:
    return (checks.float32("softcap", value, positive=True),)


def _ids(name: str, t: Any, b: int, n: int, call: _Call) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name} must be an integer torch.Tensor of shape ({b}, {n}), got {type(t).__name__}"
        )
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if tuple(t.shape) != (b, n):
        raise ValueError(f"{name} must have shape (B, N) = ({b}, {n}), got {tuple(t.shape)}")
    _check_device(name, t, call)
    return t


def _pair(value: tuple | list) -> tuple:
    if len(value) != 2:
        raise ValueError(
            f"segment_ids must be a tensor (B, N) or a pair (q_ids, kv_ids), got {len(value)} items"
        )
    return tuple(value)


def _segments(value: Any, call: _Call) -> tuple:
    b, nq, nk = call.B, call.Nq, call.Nk
    if isinstance(value, (tuple, list)):
        value = _pair(value)
        return (
            _ids("segment_ids[0] (q_ids)", value[0], b, nq, call),
            _ids("segment_ids[1] (kv_ids)", value[1], b, nk, call),
        )
    if nq != nk:
        raise ValueError(
            f"a single segment_ids tensor needs Nq == Nk, got Nq={nq}, Nk={nk}; "
            "pass a pair (q_ids (B, Nq), kv_ids (B, Nk))"
        )
    ids = _ids("segment_ids", value, b, nq, call)
    return (ids, ids)


def _scale(value: Any, call: _Call) -> tuple:
    return (checks.float32("scale", value, positive=False),)


def _dropout(value: Any, call: _Call) -> tuple:
    p = value if type(value) is float else checks.real("dropout_p", value)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got dropout_p={value!r}")
    return (p,)


def _sinks(sinks: Any, call: _Call) -> tuple:
    checked = check_sinks(sinks, call.Hq)
    _check_device("sinks", sinks, call)
    return (checked,)


RULES: tuple[Rule, ...] = (
    Rule("causal", ("causal",), ("bool causal",), _causal, (False,)),
    Rule(
        "window",
        ("window",),
        ("int? window_left", "int? window_right"),
        _window,
        (None,),
        pack=lambda w: checks.window(w) or (None, None),
        unpack=lambda left, right: None if left is None and right is None else (left, right),
    ),
    Rule("mask", ("mask",), ("Tensor? mask",), _mask, (None,)),
    Rule("bias", ("bias",), ("Tensor? bias",), _bias, (None,), grad=True),
    Rule("alibi_slopes", ("alibi_slopes",), ("Tensor? alibi_slopes",), _alibi, (None,), grad=True),
    Rule("softcap", ("softcap",), ("float? softcap",), _softcap, (None,)),
    Rule(
        "segment_ids",
        ("q_ids", "kv_ids"),
        ("Tensor? q_ids", "Tensor? kv_ids"),
        _segments,
        (None, None),
        pack=lambda s: (s, s) if not isinstance(s, (tuple, list)) else _pair(s),
        unpack=lambda q_ids, kv_ids: None if q_ids is None else (q_ids, kv_ids),
    ),
    Rule("scale", ("scale",), ("float? scale",), _scale, (None,), label="-"),
    Rule(
        "dropout_p",
        ("dropout_p",),
        ("float dropout_p",),
        _dropout,
        (0.0,),
        label="dropout",
        on=lambda p: p > 0,
    ),
    # gets a gradient, but not from the backends' backward hooks: it follows from out, lse, dout
    # and dlse alone (``selfattn.sinks.sink_grad``)
    Rule("sinks", ("sinks",), ("Tensor? sinks",), _sinks, (None,), grad=True, hook_grad=False),
)
KEYWORDS = frozenset(r.keyword for r in RULES)
_BY_KEYWORD = {r.keyword: r for r in RULES}
_DEFAULTS = {f: x for r in RULES for f, x in zip(r.fields, r.empty)}
_SPEC_FIELDS = tuple(f.name for f in fields(AttentionSpec))
if _SPEC_FIELDS[9 : 9 + len(_DEFAULTS) + 3] != (*_DEFAULTS, "return_lse", "requires_grad", "start"):
    raise RuntimeError(f"AttentionSpec's fields {_SPEC_FIELDS} do not follow RULES' order")
_NOT_NONE = frozenset(("causal", "dropout_p"))  # a bool and a float: None is not a value


# -- validation ----------------------------------------------------------------------------------


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def validate(
    q: Any, k: Any, v: Any, *, return_lse: Any = False, need_v: bool = True, **rules: Any
) -> AttentionSpec:
    """Check a call of :func:`selfattn.attention` and freeze it into a spec.

    ``rules`` are the keywords of ``RULES`` (``causal``, ``window``, ``mask``, ``bias``,
    ``alibi_slopes``, ``softcap``, ``segment_ids``, ``scale``, ``dropout_p``, ``sinks``). With
    ``need_v=False`` (for :func:`selfattn.attention_weights`), ``v`` may be None.

    A decode step is microseconds of work, so this is written for speed: a rule left at its
    default costs two comparisons, and messages are only formatted when something is wrong.

    Raises:
        TypeError: a non-tensor, a dtype outside float16/bfloat16/float32/float64, an unknown
            keyword.
        ValueError: shapes, devices or argument values that do not fit together.
    """
    return validate_call(q, k, v, rules, return_lse, need_v)


def validate_call(
    q: Any, k: Any, v: Any, rules: dict[str, Any], return_lse: Any = False, need_v: bool = True
) -> AttentionSpec:
    """:func:`validate` with the rules in a dict (the front door's hot path: no copy of it)."""
    if not KEYWORDS.issuperset(rules):
        unknown = ", ".join(sorted(set(rules) - KEYWORDS))
        raise TypeError(f"unexpected keyword argument(s): {unknown}")
    b, hq, nq, hkv, nk, d, dv = check_qkv(q, k, v, need_v)
    call = None
    values = dict(_DEFAULTS)
    enabled = torch.is_grad_enabled()
    grad = enabled and (q.requires_grad or k.requires_grad or (need_v and v.requires_grad))
    for keyword, value in rules.items():
        if value is None:
            if keyword in _NOT_NONE:  # the signature has no None here: the check says why
                _BY_KEYWORD[keyword].check(value, None)
            continue
        if (value is True or value is False) and keyword == "causal":
            values["causal"] = value  # a bool is all its check asks of it
            continue
        rule = _BY_KEYWORD[keyword]
        if type(value) is float and value == rule.empty[0]:
            continue
        if call is None:
            call = _Call(b, hq, nq, nk, q.device)
        got = rule.check(value, call)
        if rule.grad and not grad and got[0].requires_grad:
            grad = enabled
        if len(got) == 1:
            values[rule.fields[0]] = got[0]
        else:
            values.update(zip(rule.fields, got))
    if values["scale"] is None:
        values["scale"] = 1.0 / math.sqrt(d)
    if return_lse is not False and return_lse is not True:
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    # positional: the rule fields follow the spec's first nine in _DEFAULTS' order (checked
    # at import, by _SPEC_FIELDS); keywords cost a dict per call
    return AttentionSpec(
        b, hq, hkv, nq, nk, d, dv, q.dtype, q.device, *values.values(), return_lse, grad, nk - nq
    )


def check_qkv(q: Any, k: Any, v: Any, need_v: bool) -> tuple[int, ...]:
    """Types, dtypes, devices and shapes of q, k, v; returns (B, Hq, Nq, Hkv, Nk, D, Dv).

    The common case (everything fits) is checked in one pass of cheap comparisons; anything
    else goes through :func:`_explain_qkv`, which finds what is wrong and says so.
    """
    tensor = torch.Tensor
    if isinstance(q, tensor) and isinstance(k, tensor) and (not need_v or isinstance(v, tensor)):
        qs, ks = q.shape, k.shape
        vs = v.shape if need_v else ks
        dtype, device = q.dtype, q.device
        if (
            len(qs) == 4
            and len(ks) == 4
            and len(vs) == 4
            and dtype in _FLOAT_SET
            and k.dtype is dtype
            and (not need_v or v.dtype is dtype)
            # CPU tensors share the one CPU device: three flags instead of three device objects
            and (
                (q.is_cpu and k.is_cpu and (not need_v or v.is_cpu))
                or (k.device == device and (not need_v or v.device == device))
            )
        ):
            b, hq, nq, d = qs
            bk, hkv, nk, dk = ks
            bv, hv, nv, dv = vs
            if b == bk == bv and d == dk and hkv == hv and nk == nv and hkv and not hq % hkv and d:
                return b, hq, nq, hkv, nk, d, dv
    return _explain_qkv(q, k, v, need_v)


def _explain_qkv(q: Any, k: Any, v: Any, need_v: bool) -> tuple[int, ...]:
    """The slow path of :func:`check_qkv`: the first thing wrong, as a TypeError/ValueError."""
    named = {"q": q, "k": k, "v": v} if need_v else {"q": q, "k": k}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    qs, ks = q.shape, k.shape
    vs = v.shape if need_v else ks
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise ValueError(
            "q, k, v must be 4-D: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); "
            f"got {_shapes(named)}"
        )
    dtype, device = q.dtype, q.device
    if k.dtype != dtype or (need_v and v.dtype != dtype):
        raise TypeError(
            "q, k, v must share one dtype, got "
            + ", ".join(f"{n}={t.dtype}" for n, t in named.items())
        )
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"q, k, v must be float16, bfloat16, float32 or float64, got {dtype}")
    if k.device != device or (need_v and v.device != device):
        raise ValueError(
            "q, k, v must be on one device, got "
            + ", ".join(f"{n}={t.device}" for n, t in named.items())
        )
    b, hq, nq, d = qs
    bk, hkv, nk, dk = ks
    bv, hv, nv, dv = vs
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: {_shapes(named)}")
    if d != dk:
        raise ValueError(f"q and k head dims differ (D={d} vs {dk}): {_shapes(named)}")
    if not (hkv == hv and nk == nv):
        raise ValueError(f"k and v must agree on heads and length (Hkv, Nk): {_shapes(named)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"query heads must be a multiple of key/value heads, got Hq={hq}, Hkv={hkv} "
            f"({_shapes(named)})"
        )
    if d == 0:
        raise ValueError(f"head dim D must be >= 1: {_shapes(named)}")
    return b, hq, nq, hkv, nk, d, dv


def _shapes(named: dict[str, Any]) -> str:
    return ", ".join(f"{n}={_shape(t)}" for n, t in named.items())
