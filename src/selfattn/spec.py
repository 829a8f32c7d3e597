"""One validated attention call: every input checked before any work, then frozen.

``validate()`` is the only place that looks at user input. It raises ``TypeError`` for a wrong
type or dtype and ``ValueError`` for a wrong value, naming what arrived and what was expected;
backends receive a :class:`AttentionSpec` and may trust it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FLOAT_DTYPES", "AttentionSpec", "UnsupportedInputs", "validate"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class UnsupportedInputs(NotImplementedError):
    """A valid call that the requested backend(s) cannot run.

    The message lists every backend considered and every reason it declined.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons or {}


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """A validated call of :func:`selfattn.attention` (API.md section 2).

    Shapes: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv). Optional tensors are stored
    as 4-D views broadcastable to (B, Hq, Nq, Nk) (``mask``, ``bias``), (B, Hq) (``alibi``) and
    (B, Nq) / (B, Nk) (``q_ids``, ``kv_ids``).
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
    alibi: torch.Tensor | None = None
    softcap: float | None = None
    q_ids: torch.Tensor | None = None
    kv_ids: torch.Tensor | None = None
    scale: float = 1.0
    dropout_p: float = 0.0
    return_lse: bool = False
    requires_grad: bool = False

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.Hq // self.Hkv

    @property
    def offset(self) -> int:
        """Absolute position of query row 0: ``i' = i + Nk - Nq`` (bottom-right alignment)."""
        return self.Nk - self.Nq

    @property
    def has_segments(self) -> bool:
        return self.q_ids is not None

    @property
    def rule_names(self) -> list[str]:
        """The rules of section 2 this call uses, for messages."""
        names = []
        for name, on in (
            ("causal", self.causal),
            ("window", self.window is not None),
            ("mask", self.mask is not None),
            ("bias", self.bias is not None),
            ("alibi_slopes", self.alibi is not None),
            ("softcap", self.softcap is not None),
            ("segment_ids", self.q_ids is not None),
            ("dropout", self.dropout_p > 0),
        ):
            if on:
                names.append(name)
        return names

    def describe(self) -> str:
        rules = ", ".join(self.rule_names) or "no rules"
        return (
            f"q (B={self.B}, Hq={self.Hq}, Nq={self.Nq}, D={self.D}), "
            f"k/v (Hkv={self.Hkv}, Nk={self.Nk}, Dv={self.Dv}), {self.dtype}, {self.device}; {rules}"
        )


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _broadcastable(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(shape[::-1], target[::-1]))


def _check_tensor_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but q, k, v are on {device}; move it to {device}"
        )


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def _real(name: str, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {x!r} ({type(x).__name__})")
    return float(x)


def _check_window(window: Any) -> tuple[int | None, int | None] | None:
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(
            f"window must be a pair (left, right) of non-negative ints or None, got {window!r}"
        )
    sides = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            sides.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise ValueError(
                f"window {side} must be an int >= 0 or None, got {w!r} in window={window!r}"
            )
        if w < 0:
            raise ValueError(
                f"window {side} must be >= 0 (use None for unbounded), got {w} in window={window!r}"
            )
        sides.append(int(w))
    if sides[0] is None and sides[1] is None:
        return None  # (None, None) restricts nothing
    return (sides[0], sides[1])


def _check_ids(name: str, t: Any, b: int, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name} must be an integer torch.Tensor of shape ({b}, {n}), got {type(t).__name__}"
        )
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if tuple(t.shape) != (b, n):
        raise ValueError(f"{name} must have shape (B, N) = ({b}, {n}), got {tuple(t.shape)}")
    _check_tensor_device(name, t, device)
    return t


def validate(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: Any = False,
    window: Any = None,
    mask: Any = None,
    bias: Any = None,
    alibi_slopes: Any = None,
    softcap: Any = None,
    segment_ids: Any = None,
    scale: Any = None,
    dropout_p: Any = 0.0,
    return_lse: Any = False,
    need_v: bool = True,
) -> AttentionSpec:
    """Check every argument of :func:`selfattn.attention` and freeze them into a spec.

    With ``need_v=False`` (for :func:`selfattn.attention_weights`), ``v`` may be None.

    Raises:
        TypeError: a non-tensor, or a dtype outside float16/bfloat16/float32/float64.
        ValueError: shapes, devices or argument values that do not fit together.
    """
    named = {"q": q, "k": k, "v": v} if need_v else {"q": q, "k": k}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    tensors = list(named.values())
    shapes = ", ".join(f"{n}={_shape(t)}" for n, t in named.items())
    if any(t.dim() != 4 for t in tensors):
        raise ValueError(
            f"q, k, v must be 4-D: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); got {shapes}"
        )
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise TypeError(
            "q, k, v must share one dtype, got "
            + ", ".join(f"{n}={t.dtype}" for n, t in named.items())
        )
    dtype = q.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"q, k, v must be float16, bfloat16, float32 or float64, got {dtype}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            "q, k, v must be on one device, got "
            + ", ".join(f"{n}={t.device}" for n, t in named.items())
        )
    device = q.device
    b, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if need_v:
        bv, hv, nv, dv = v.shape
    else:
        bv, hv, nv, dv = bk, hkv, nk, dk
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: {shapes}")
    if d != dk:
        raise ValueError(f"q and k head dims differ (D={d} vs {dk}): {shapes}")
    if not (hkv == hv and nk == nv):
        raise ValueError(f"k and v must agree on heads and length (Hkv, Nk): {shapes}")
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"query heads must be a multiple of key/value heads, got Hq={hq}, Hkv={hkv} ({shapes})"
        )
    if d == 0:
        raise ValueError(f"head dim D must be >= 1: {shapes}")
    target = (b, hq, nq, nk)

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    win = _check_window(window)

    mask4 = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be bool (True = visible), got {mask.dtype}; pass an additive mask as bias="
            )
        if not _broadcastable(tuple(mask.shape), target):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} is not broadcastable to (B, Hq, Nq, Nk) = {target}"
            )
        _check_tensor_device("mask", mask, device)
        mask4 = _as_4d(mask)

    bias4 = None
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a float torch.Tensor, got {type(bias).__name__}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must have a float dtype, got {bias.dtype}")
        if not _broadcastable(tuple(bias.shape), target):
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} is not broadcastable to (B, Hq, Nq, Nk) = {target}"
            )
        _check_tensor_device("bias", bias, device)
        bias4 = _as_4d(bias)

    alibi = None
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(
                f"alibi_slopes must be a float torch.Tensor, got {type(alibi_slopes).__name__}"
            )
        if alibi_slopes.dtype not in FLOAT_DTYPES:
            raise TypeError(f"alibi_slopes must have a float dtype, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((hq,), (b, hq)):
            raise ValueError(
                f"alibi_slopes must have shape (Hq,) = ({hq},) or (B, Hq) = ({b}, {hq}), "
                f"got {tuple(alibi_slopes.shape)}"
            )
        _check_tensor_device("alibi_slopes", alibi_slopes, device)
        alibi = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes.reshape(1, hq)

    cap = None
    if softcap is not None:
        cap = _real("softcap", softcap)
        if not (cap > 0 and math.isfinite(cap)):
            raise ValueError(f"softcap must be a finite float > 0, got {softcap!r}")

    q_ids = kv_ids = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError(
                    f"segment_ids must be a tensor (B, N) or a pair (q_ids, kv_ids), got {len(segment_ids)} items"
                )
            q_ids = _check_ids("segment_ids[0] (q_ids)", segment_ids[0], b, nq, device)
            kv_ids = _check_ids("segment_ids[1] (kv_ids)", segment_ids[1], b, nk, device)
        else:
            if nq != nk:
                raise ValueError(
                    f"a single segment_ids tensor needs Nq == Nk, got Nq={nq}, Nk={nk}; "
                    "pass a pair (q_ids (B, Nq), kv_ids (B, Nk))"
                )
            q_ids = kv_ids = _check_ids("segment_ids", segment_ids, b, nq, device)

    if scale is None:
        scale_f = 1.0 / math.sqrt(d)
    else:
        scale_f = _real("scale", scale)
        if not math.isfinite(scale_f):
            raise ValueError(f"scale must be finite, got {scale!r}")

    p = _real("dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got dropout_p={dropout_p!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")

    requires_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v if need_v else None, bias, alibi_slopes)
    )
    return AttentionSpec(
        B=b, Hq=hq, Hkv=hkv, Nq=nq, Nk=nk, D=d, Dv=dv, dtype=dtype, device=device,
        causal=causal, window=win, mask=mask4, bias=bias4, alibi=alibi, softcap=cap,
        q_ids=q_ids, kv_ids=kv_ids, scale=scale_f, dropout_p=p, return_lse=return_lse,
        requires_grad=requires_grad,
    )  # fmt: skip
