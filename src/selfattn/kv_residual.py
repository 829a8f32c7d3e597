"""Keys and values held in two parts: older tokens (usually quantized) then a float window.

A quantized cache with a *residual window* (KIVI; transformers' ``QuantizedCache(residual_length=)``)
keeps its most recent tokens in float and quantizes them only once newer ones push them out. What
attention then reads is :class:`ResidualKV`: an older part (a :class:`selfattn.QuantizedKV`, or a
tensor) followed along the token axis by a float window, both views of the cache's storage.

:func:`residual_call` is :func:`selfattn.attention` over such keys and values, exactly: one call
over each part, merged through their log-sum-exps. With ``L = logaddexp(lse_a, lse_b)`` the
output is ``exp(lse_a - L) * out_a + exp(lse_b - L) * out_b``; that is the softmax over the
concatenation, not an approximation. Positions stay those of the concatenation (bottom-right
aligned over all ``Nk`` keys): the window's call keeps every rule as it is (the window is the
last keys, where the alignment sits), and the older part's call shifts ``causal`` and ``window``
by the window's length (an explicit mask where the shift would leave a negative window side) and
turns ALiBi into the equivalent bias.
"""

from __future__ import annotations

from typing import Any

import torch

from .backends import BACKENDS, CHOICES, candidates, select
from .checks import F32_HIGH
from .forward_mode import has_tangents, transformed
from .quant import QuantizedKV, standin, unwrap_label

__all__ = ["ResidualKV", "fused_call", "merge", "residual_call", "split_at"]


class ResidualKV:
    """Keys or values (B, Hkv, Nh + Nw, D): ``head`` (B, Hkv, Nh, D), a :class:`QuantizedKV` or
    a tensor, followed by ``window`` (B, Hkv, Nw, D), a float tensor of the same dtype.

    Both are usually views of a cache's storage (no copy). :func:`selfattn.attention` accepts it
    for ``k`` and/or ``v`` (a tensor or ``QuantizedKV`` on the other side is split at the same
    token): the result equals ``attention`` over :meth:`dequantize` up to float32 rounding.
    Gradients reach the window (a tensor head too), never a ``QuantizedKV`` head.
    """

    __slots__ = ("head", "window")

    def __init__(self, head: QuantizedKV | torch.Tensor, window: torch.Tensor) -> None:
        if not isinstance(head, (QuantizedKV, torch.Tensor)):
            raise TypeError(f"head must be a QuantizedKV or a tensor, got {type(head).__name__}")
        if not isinstance(window, torch.Tensor) or not window.is_floating_point():
            got = window.dtype if isinstance(window, torch.Tensor) else type(window).__name__
            raise TypeError(f"window must be a float tensor, got {got}")
        hs = tuple(head.shape)
        ws = tuple(window.shape)
        if len(hs) != 4 or len(ws) != 4 or hs[:2] != ws[:2] or hs[3] != ws[3]:
            raise ValueError(
                f"head (B, Hkv, Nh, D) and window (B, Hkv, Nw, D) must agree in B, Hkv and D; "
                f"got head {hs}, window {ws}"
            )
        if head.dtype != window.dtype or head.device != window.device:
            raise ValueError(
                f"head ({head.dtype}, {head.device}) and window ({window.dtype}, "
                f"{window.device}) must share one dtype and device"
            )
        self.head = head
        self.window = window

    @classmethod
    def of_views(cls, head: QuantizedKV | torch.Tensor, window: torch.Tensor) -> ResidualKV:
        """A ResidualKV of parts known to fit (a cache's own views of its storage, made once
        each decode step per layer and side): the constructor's checks skipped."""
        x = object.__new__(cls)
        x.head = head
        x.window = window
        return x

    @property
    def shape(self) -> torch.Size:
        """(B, Hkv, Nh + Nw, D)."""
        b, h, n, d = self.window.shape
        return torch.Size((b, h, self.head.shape[2] + n, d))

    @property
    def split(self) -> int:
        """Nh: the tokens of the older part (the window starts there)."""
        return int(self.head.shape[2])

    @property
    def dtype(self) -> torch.dtype:
        return self.window.dtype

    @property
    def device(self) -> torch.device:
        return self.window.device

    @property
    def nbytes(self) -> int:
        """Bytes of both parts' tokens (codes and scales for a quantized head)."""
        head = (
            self.head.nbytes
            if isinstance(self.head, QuantizedKV)
            else self.head.numel() * self.head.element_size()
        )
        return head + self.window.numel() * self.window.element_size()

    @property
    def requires_grad(self) -> bool:
        return bool(self.window.requires_grad or self.head.requires_grad)

    def dim(self) -> int:
        return 4

    def detach(self) -> ResidualKV:
        return ResidualKV(self.head.detach(), self.window.detach())

    def __repr__(self) -> str:
        kind = "QuantizedKV" if isinstance(self.head, QuantizedKV) else "tensor"
        return (
            f"ResidualKV(shape={tuple(self.shape)}, head={kind} of {self.split} tokens, "
            f"window={self.window.shape[2]} tokens, dtype={self.dtype}, device={self.device})"
        )

    def narrow(self, start: int, length: int) -> ResidualKV | QuantizedKV | torch.Tensor:
        """Tokens ``[start, start + length)`` (views): a ResidualKV when they span both parts,
        else the one part's view."""
        n = self.shape[2]
        if (
            isinstance(start, bool)
            or isinstance(length, bool)
            or not isinstance(start, int)
            or not isinstance(length, int)
            or start < 0
            or length < 0
            or start + length > n
        ):
            raise ValueError(f"narrow({start!r}, {length!r}) must lie within the {n} tokens")
        m, end = self.split, start + length
        if end <= m:
            return narrowed(self.head, start, length)
        if start >= m:
            return self.window[:, :, start - m : end - m]
        return ResidualKV(narrowed(self.head, start, m - start), self.window[:, :, : end - m])

    def dequantize(self) -> torch.Tensor:
        """The concatenation (B, Hkv, Nh + Nw, D) in ``dtype`` (a copy)."""
        head = self.head.dequantize() if isinstance(self.head, QuantizedKV) else self.head
        return torch.cat([head, self.window], dim=2)


def narrowed(x: QuantizedKV | torch.Tensor, start: int, length: int) -> Any:
    """Tokens ``[start, start + length)`` (axis 2) of a tensor or a QuantizedKV, as a view."""
    return (
        x.narrow(start, length) if isinstance(x, QuantizedKV) else x[:, :, start : start + length]
    )


def split_at(x: Any, m: int) -> tuple[Any, Any]:
    """``(older, window)``: a ResidualKV's parts, or a tensor / QuantizedKV cut at token ``m``."""
    if isinstance(x, ResidualKV):
        return x.head, x.window
    n = x.shape[2]
    return narrowed(x, 0, m), narrowed(x, m, n - m)


def stand_in(x: Any) -> Any:
    """A memory-less tensor of ``x``'s full shape, dtype and device for validation (a
    ResidualKV or QuantizedKV); anything else unchanged."""
    if isinstance(x, ResidualKV):
        key = (x.shape, x.dtype, x.device)
        got = _STANDINS.get(key)
        if got is None:  # a decode step asks twice (k, v), every layer the same shape
            if len(_STANDINS) > 64:
                _STANDINS.clear()
            got = _STANDINS[key] = torch.empty((), dtype=x.dtype, device=x.device).expand(key[0])
        return got
    return standin(x)


_STANDINS: dict[tuple, torch.Tensor] = {}  # recent stand-ins, by shape, dtype and device


def residual_call(
    q: torch.Tensor, k: Any, v: Any, rules: dict[str, Any], return_lse: bool, backend: str
) -> Any:
    """:func:`selfattn.attention` with ``k`` and/or ``v`` a :class:`ResidualKV` (``rules``: its
    keywords but ``return_lse`` and ``backend``).

    The call is validated over the full shapes first; then one call reads the older part, one
    the window, and the two are merged through their lse (see the module docstring).

    Raises:
        ValueError: a ResidualKV on both sides whose parts split at different tokens, and what
            :func:`selfattn.attention` raises for the full call.
    """
    from .api import attention  # the front door; imported here: it dispatches to this module
    from .spec import check_qkv, validate_call

    splits = {x.split for x in (k, v) if isinstance(x, ResidualKV)}
    if len(splits) != 1:
        raise ValueError(
            f"k and v are ResidualKV split at different tokens ({sorted(splits)}); a cache's "
            "keys and values split at the same token"
        )
    if plain_rules(rules) and (return_lse is True or return_lse is False):
        # all validate_call can refuse in a call with no rule but causal and scale (checked here
        # as the front door's fast path checks them); a decode step pays for no spec it drops
        check_qkv(q, stand_in(k), stand_in(v), True)
    else:
        validate_call(q, stand_in(k), stand_in(v), rules, return_lse)
    if type(k) is ResidualKV and type(v) is ResidualKV and plain_rules(rules):
        # a decode step: both parts in one kernel call, as the front door's fast path runs it
        got = fused_call(q, k, v, rules["causal"], rules["scale"], return_lse, backend)
        if got is not None:
            return got
    m = splits.pop()
    nq, nk = q.shape[2], k.shape[2]
    w = nk - m
    k_old, k_new = split_at(k, m)
    v_old, v_new = split_at(v, m)
    if m == 0 or w == 0:  # one part: the call as it is, on that part
        kk, vv = (k_new, v_new) if m == 0 else (k_old, v_old)
        return attention(q, kk, vv, **rules, return_lse=return_lse, backend=backend)
    new_rules = window_rules(rules, m, nq, nk)
    old_rules = older_rules(rules, m, nq, nk, q)
    out_b, lse_b = attention(q, k_new, v_new, **new_rules, return_lse=True, backend=backend)
    out_a, lse_a = attention(q, k_old, v_old, **old_rules, return_lse=True, backend=backend)
    return merge(out_a, lse_a, out_b, lse_b, return_lse)


def fused_call(
    q: Any, k: ResidualKV, v: ResidualKV, causal: Any, scale: Any, return_lse: Any, backend: Any
) -> Any:
    """Both parts of ``k`` and ``v`` (ResidualKV split at the same token, either part possibly
    empty) in one kernel call: a plain decode step (no rule but ``causal`` and ``scale``, at most 4
    query rows, ``Nq * Hq / Hkv <= 16``, no gradient or tangent) with a quantized older part,
    on ``native`` (its decode kernel reads the float window as more key chunks of the same call,
    ``plain_residual``). Returns what :func:`selfattn.attention` returns, or None to decline
    (the caller then runs one call per part and merges them).

    The choice is remembered in ``backends.CHOICES`` per q's shape and dtype, each part's kind
    (codes shape but the token count, bits, group size, rotation, dtype; a tensor's shape but
    the token count and dtype), the rules and the thread count: nothing there depends on how
    many tokens either part holds (the whole call is checked by ``check_qkv`` over stand-ins
    when first seen; native's acceptance reads no length, and ``auto`` keeps a quantized call
    on native where native comes first)."""
    from .api import plain_arguments, plain_spec, remember  # the front door imports this module

    kh, kw, vh, vw = k.head, k.window, v.head, v.window
    kq, vq = type(kh) is QuantizedKV, type(vh) is QuantizedKV
    if (
        not (kq or vq)
        or type(kw) is not torch.Tensor
        or type(vw) is not torch.Tensor
        or not plain_arguments(q, kh, vh, causal, scale, return_lse, backend, kq, vq)
        or q.dim() != 4
        or (torch.is_grad_enabled() and (kw.requires_grad or vw.requires_grad))
        or has_tangents(kw, vw)
    ):
        return None
    hq, nq, hkv = q.shape[1], q.shape[2], kw.shape[1]
    kc = kh.codes if kq else kh
    vc = vh.codes if vq else vh
    if (
        vc.shape[2] != kc.shape[2]  # parts that split at different tokens: the full path says so
        or vw.shape[2] != kw.shape[2]
        or nq > 4
        or not hkv
        or nq * (hq // hkv) > 16
        or not (q.is_cpu and kw.is_cpu and vw.is_cpu and kc.is_cpu and vc.is_cpu)
    ):
        return None
    ks = (kc.shape[:2], kc.shape[3], kh.bits, kh.group_size, kh.rotate) if kq else kc.shape[:2]
    vs = (vc.shape[:2], vc.shape[3], vh.bits, vh.group_size, vh.rotate) if vq else vc.shape[:2]
    key = ("residual", backend, q.shape, q.dtype, ks, vs, kc.dtype, vc.dtype, kw.dtype, vw.dtype)
    key += (kw.shape[:2], kw.shape[3], vw.shape[3], causal, scale, return_lse)
    key += (torch.get_num_threads(),)
    got = CHOICES.get(key)
    if got is None:
        if backend != "auto" and backend not in BACKENDS:
            return None  # the full path names it
        try:  # the whole call, checked over stand-ins of its full shapes (check_qkv's errors)
            spec = plain_spec(q, stand_in(k), stand_in(v), causal, scale, return_lse)
        except (TypeError, ValueError):
            return None  # the full path says what is wrong
        spec.quantized = unwrap_label(kh, vh)
        chosen = select(spec, backend)
        first = backend == "native" or candidates(q.device)[0] == "native"
        prepare = getattr(chosen, "plain_residual", None)
        run = prepare(spec, kh, vh) if first and chosen.name == "native" and prepare else None
        got = (spec, chosen, run)
        remember(key, got)
    if got[2] is None:
        return None
    out, lse = got[2](q, kh, vh, kw, vw)
    return (out, lse) if return_lse else out


def merge(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    return_lse: bool,
) -> Any:
    """The call over the older part's keys and the window's together, from each part's call:
    ``out_a`` / ``out_b`` (B, Hq, Nq, Dv) in q's dtype, ``lse_a`` / ``lse_b`` (B, Hq, Nq)
    float32. Returns ``out`` (or ``(out, lse)``): ``lerp(out_b, out_a, sigmoid(lse_a - lse_b))``
    (see the module docstring), in place on ``out_b`` when there is no graph or tangent to carry
    (:func:`residual_call` and the front door's fast path ``api.residual_plain_call``)."""
    lse = torch.logaddexp(lse_a, lse_b) if return_lse else None  # (B, Hq, Nq) float32
    # the older part's share of each row, exp(lse_a - L) = sigmoid(lse_a - lse_b) (B, Hq, Nq):
    # 0 or 1 where one side sees nothing; NaN where neither does (both outputs are 0 there).
    # Without a graph to record, in place on the calls' own results (a decode step is a few
    # microseconds of work per part: each new tensor costs about as much)
    share = lse_a - lse_b
    graph = (
        (torch.is_grad_enabled() and (out_a.requires_grad or out_b.requires_grad))
        or has_tangents(out_a, out_b)
        or transformed()
    )
    if not graph:
        share = share.sigmoid_().nan_to_num_(0.0).unsqueeze(-1)
    else:
        share = torch.sigmoid(share).nan_to_num(0.0).unsqueeze(-1)
    dtype = out_b.dtype
    if dtype == torch.float32:
        out = out_b.lerp_(out_a, share) if not graph else torch.lerp(out_b, out_a, share)
    else:
        work = torch.float64 if dtype == torch.float64 else torch.float32
        out = torch.lerp(out_b.to(work), out_a.to(work), share.to(work)).to(dtype)
    return (out, lse) if return_lse else out  # (B, Hq, Nq, Dv); lse -inf where both are


PLAIN_NONE = ("window", "mask", "bias", "alibi_slopes", "softcap", "segment_ids", "sinks")
PLAIN_KEYS = frozenset((*PLAIN_NONE, "causal", "scale", "dropout_p"))  # attention's rules


def plain_rules(rules: dict[str, Any]) -> bool:
    """Whether ``rules`` (all of attention's keywords) hold no rule but a bool ``causal`` and a
    float32-finite float ``scale`` (or None), without dropout: nothing ``validate_call`` refuses."""
    if rules.keys() != PLAIN_KEYS:  # (attention passes every keyword; others: validate_call)
        return False
    scale, causal, drop = rules["scale"], rules["causal"], rules["dropout_p"]
    return (
        (causal is True or causal is False)
        and type(drop) is float
        and not drop
        and (scale is None or (type(scale) is float and abs(scale) < F32_HIGH))
        and all(rules[name] is None for name in PLAIN_NONE)
    )


def cut_keys(x: Any, lo: int, hi: int, nk: int) -> Any:
    """Keys ``[lo, hi)`` of a mask or bias broadcastable to (..., Nk) (kept when broadcast)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != nk or nk == 1:
        return x
    return x[..., lo:hi]


def cut_segments(seg: Any, lo: int, hi: int, nq: int, nk: int) -> Any:
    """``segment_ids`` for keys ``[lo, hi)``: always a pair ``(q_ids, kv_ids)``."""
    if seg is None:
        return None
    if isinstance(seg, (tuple, list)):
        return (seg[0], seg[1][:, lo:hi])
    return (seg, seg[:, lo:hi])  # one (B, N) tensor: Nq == Nk, the queries' ids are the keys'


def positions(nq: int, m: int, nk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The true positions ``i'`` (Nq, 1) of the query rows and ``j`` (m,) of the older keys."""
    rows = torch.arange(nk - nq, nk, device=device).unsqueeze(-1)
    return rows, torch.arange(m, device=device)


def window_rules(rules: dict[str, Any], m: int, nq: int, nk: int) -> dict[str, Any]:
    """The rules of the window's call (keys ``[m, Nk)``): bottom-right alignment is unchanged,
    so only the per-key tensors are cut."""
    out = dict(rules)
    out["mask"] = cut_keys(rules.get("mask"), m, nk, nk)
    out["bias"] = cut_keys(rules.get("bias"), m, nk, nk)
    out["segment_ids"] = cut_segments(rules.get("segment_ids"), m, nk, nq, nk)
    return out


def older_rules(rules: dict[str, Any], m: int, nq: int, nk: int, q: torch.Tensor) -> dict[str, Any]:
    """The rules of the older part's call (keys ``[0, m)``, aligned at ``m`` instead of ``Nk``:
    its row ``i`` sits ``Nk - m`` before the true ``i'``). The sink is counted once, in the
    window's call."""
    w = nk - m
    out = dict(rules)
    out["sinks"] = None
    out["mask"] = cut_keys(rules.get("mask"), 0, m, nk)
    bias = cut_keys(rules.get("bias"), 0, m, nk)
    out["segment_ids"] = cut_segments(rules.get("segment_ids"), 0, m, nq, nk)
    slopes = rules.get("alibi_slopes")
    if slopes is not None:  # -slope * |i' - j|, with the true i'
        rows, cols = positions(nq, m, nk, q.device)
        dist = (rows - cols).abs().to(torch.float32)  # (Nq, m)
        s = slopes.to(torch.float32)
        s = s[:, None, None] if s.dim() == 1 else s[:, :, None, None]  # (Hq|B,Hq, 1, 1)
        alibi = (-s * dist).to(q.dtype)  # (Hq, Nq, m) or (B, Hq, Nq, m)
        bias = alibi if bias is None else bias + alibi
        out["alibi_slopes"] = None
    out["bias"] = bias
    causal = bool(rules.get("causal"))
    win = rules.get("window")
    left, right = (None, None) if win is None else win
    if not causal and left is None and right is None:
        return out
    # true visibility: i' - left <= j <= i' + right (causal: right <= 0); in the call's frame
    # i'' = i' - w, so the sides become (left - w, right + w)
    if causal:
        right = 0 if right is None else min(right, 0)
    new_left = None if left is None else left - w
    new_right = None if right is None else right + w
    out["causal"] = False
    # rows at m - Nq .. m - 1 of this call: where every row sees all m keys (a decode step: the
    # older part lies wholly behind the query), no window at all (the front door's fast path)
    if (new_left is None or new_left >= m - 1) and (new_right is None or new_right >= nq - 1):
        out["window"] = None
        return out
    if new_left is None or new_left >= 0:
        out["window"] = (new_left, new_right)
        return out
    # a left side below zero has no window form: the same visibility as an explicit mask
    rows, cols = positions(nq, m, nk, q.device)
    vis = torch.ones(nq, m, dtype=torch.bool, device=q.device)
    if left is not None:
        vis &= cols >= rows - left
    if right is not None:
        vis &= cols <= rows + right
    mask = out["mask"]
    out["mask"] = vis if mask is None else mask & vis
    out["window"] = None
    return out
