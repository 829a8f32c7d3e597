"""Per-call kernel arguments: a validated :class:`AttentionSpec` becomes a :class:`Call` (rule
tensors and their broadcast strides, segment ranges, scales, dropout seeds, compile-time flags)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ... import _rng
from ...quant import QuantizedKV
from ...rules import bounds
from ...spec import AttentionSpec
from . import interpreting

__all__ = [
    "Call",
    "broadcast_strides",
    "kv_operands",
    "match_ranges",
    "may_hide",
    "prepare",
    "sink_args",
]


def broadcast_strides(t: torch.Tensor | None, n: int) -> list[int]:
    """Strides of a broadcastable tensor, 0 along its size-1 dimensions (n entries)."""
    if t is None:
        return [0] * n
    return [0 if size == 1 else st for size, st in zip(t.shape, t.stride())]


def match_ranges(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each id in ``a`` (B, Na): the span of positions of ``b`` (B, Nb) holding the same id.

    Returns int32 (4, B, Na): ``lo, hi`` (the first and one past the last match; ``Nb, 0`` when
    none or the id is negative) and ``full_lo, full_hi`` (the same span when every position in
    it matches, i.e. the document is contiguous; ``Nb, 0`` otherwise). A stable sort keeps the
    original order within equal ids, so the first and last match sit at the ends of their run.
    """
    nb = b.shape[1]
    a = a.long()
    sorted_b, order = torch.sort(b.long(), dim=1, stable=True)
    left = torch.searchsorted(sorted_b, a, right=False)
    right = torch.searchsorted(sorted_b, a, right=True)
    count = right - left
    found = (count > 0) & (a >= 0)
    lo = order.gather(1, left.clamp(max=nb - 1))
    hi = order.gather(1, (right - 1).clamp(min=0)) + 1
    exact = found & (hi - lo == count)
    none = torch.full_like(lo, nb)
    zero = torch.zeros_like(lo)
    out = torch.stack(
        [
            torch.where(found, lo, none),
            torch.where(found, hi, zero),
            torch.where(exact, lo, none),
            torch.where(exact, hi, zero),
        ]
    )
    return out.to(torch.int32).contiguous()


def may_hide(spec: AttentionSpec) -> bool:
    """Whether some rule may hide some key from some row (then non-finite keys are cleaned)."""
    if spec.mask is not None or spec.q_ids is not None:
        return True
    if not (spec.causal or spec.window is not None) or spec.Nq == 0:
        return False
    _, _, full_lo, full_hi = bounds(spec, 0, spec.Nq)
    return full_lo > 0 or full_hi < spec.Nk


@dataclass
class Call:
    """Everything but q/k/v that the kernels take, derived once per call; the lists are in the
    kernels' argument order."""

    spec: AttentionSpec
    args_rules: list  # BIAS, SLOPES, MASK, QIDS, KVIDS
    strides_rules: list  # bias(4), mask(4), slopes(2), ids(4)
    qrng: torch.Tensor  # segment ranges of the queries' ids among the keys (q if none)
    krng: torch.Tensor  # and of the keys' ids among the queries (backward only; q if none)
    scalars: list  # B, H, G, Nq, Nk, D, DV, OFF
    scale_args: list  # qk_scale, cap, win_left, win_right
    drop_args: list  # seed0, seed1, thresh, drop_scale
    consts: dict  # compile-time flags and sizes


def prepare(
    spec: AttentionSpec, q: torch.Tensor, seed: tuple[int, int] | None, need_krng: bool = False
) -> Call:
    """The kernel arguments of a call; absent rule tensors are replaced by ``q`` (never read)."""
    dummy = q
    bias = spec.bias
    mask = spec.mask.view(torch.uint8) if spec.mask is not None else None
    slopes = spec.alibi_slopes
    q_ids, kv_ids = spec.q_ids, spec.kv_ids
    strides_rules = (
        broadcast_strides(bias, 4)
        + broadcast_strides(mask, 4)
        + broadcast_strides(slopes, 2)
        + (list(q_ids.stride()) if q_ids is not None else [0, 0])
        + (list(kv_ids.stride()) if kv_ids is not None else [0, 0])
    )
    qrng = krng = None
    if q_ids is not None:
        qrng = match_ranges(q_ids, kv_ids)
        if need_krng:
            krng = match_ranges(kv_ids, q_ids)
    big = spec.Nq + spec.Nk + 1  # a window wider than this restricts nothing
    left, right = spec.window if spec.window is not None else (None, None)
    # natural-log scores: the kernels multiply by log2(e) only after subtracting the row
    # maximum, and apply the softcap themselves (kernels._softcap), so no factor overflows
    qk_scale, cap = spec.scale, spec.softcap if spec.softcap is not None else 1.0
    p = spec.dropout_p
    if p > 0:
        seed0, seed1 = int(seed[0]) & 0xFFFFFFFF, int(seed[1]) & 0xFFFFFFFF
        thresh = _rng.threshold(p)
        drop_args = [seed0, seed1, thresh, 1.0 / (1.0 - p)]
    else:
        drop_args = [0, 0, 0, 1.0]
    # Triton's interpreter cannot multiply bfloat16 (triton-lang/triton#11584): widen first
    upcast = interpreting() and spec.dtype == torch.bfloat16
    bd = max(16, triton.next_power_of_2(spec.D))
    bdv = max(16, triton.next_power_of_2(spec.Dv))
    consts = {
        "CAUSAL": spec.causal,
        "HAS_LEFT": left is not None and left < big,
        "HAS_RIGHT": right is not None and right < big,
        "HAS_BIAS": bias is not None,
        "HAS_ALIBI": slopes is not None,
        "HAS_MASK": mask is not None,
        "HAS_SEG": q_ids is not None,
        "SOFTCAP": spec.softcap is not None,
        "DROPOUT": p > 0,
        "CLEAN": may_hide(spec),
        # float32 inputs get exact float32 products (no TF32), as torch does by default
        "PREC": "ieee" if spec.dtype == torch.float32 or upcast else "tf32",
        "UPCAST": upcast,
        "EVEN_D": bd == spec.D and bdv == spec.Dv,
        "BLOCK_D": bd,
        "BLOCK_DV": bdv,
        "TUNE_Q": min(triton.next_power_of_2(spec.Nq), 1 << 16),
        "TUNE_K": min(triton.next_power_of_2(spec.Nk), 1 << 20),
    }
    return Call(
        spec=spec,
        args_rules=[
            bias if bias is not None else dummy,
            slopes if slopes is not None else dummy,
            mask if mask is not None else dummy,
            q_ids if q_ids is not None else dummy,
            kv_ids if kv_ids is not None else dummy,
        ],
        strides_rules=strides_rules,
        qrng=qrng if qrng is not None else dummy,
        krng=krng if krng is not None else dummy,
        scalars=[spec.B, spec.Hq, spec.group, spec.Nq, spec.Nk, spec.D, spec.Dv, spec.start],
        scale_args=[
            qk_scale,
            cap,
            min(left, big) if left is not None else 0,
            min(right, big) if right is not None else 0,
        ],
        drop_args=drop_args,
        consts=consts,
    )


def kv_operands(
    k: torch.Tensor | QuantizedKV, v: torch.Tensor | QuantizedKV, dummy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list, list, dict]:
    """What the forward kernels take for keys and values that may be :class:`QuantizedKV`.

    Returns ``(k, v, [KS, VS], scale strides (8), consts)``: a quantized operand becomes its
    codes (int8 (B, Hkv, N, D), or uint8 (B, Hkv, N, D / 2) for 4 bits) and its float32
    scales (B, Hkv, N, D / group), read in the basis the codes encode (rotation is the
    caller's: ``host.attention``); a float tensor stays itself, with ``dummy`` for its scales
    and zero strides. ``consts`` holds ``K_BITS``, ``V_BITS`` (0 for float) and the groups
    (``K_GROUP``, ``V_GROUP``: channels per scale, 0 when one scale covers the row).
    """
    scales, strides = [], []
    consts: dict = {}
    ops = []
    for name, t in (("K", k), ("V", v)):
        if type(t) is QuantizedKV:
            ops.append(t.codes)
            scales.append(t.scales)
            strides += list(t.scales.stride())
            # group 0: one scale for the whole row (one load per row in the kernel)
            group = 0 if t.group_size == t.shape[-1] else t.group_size
            consts[f"{name}_BITS"], consts[f"{name}_GROUP"] = t.bits, group
        else:
            ops.append(t)
            scales.append(dummy)
            strides += [0, 0, 0, 0]
            consts[f"{name}_BITS"], consts[f"{name}_GROUP"] = 0, 1
    return ops[0], ops[1], scales, strides, consts


def sink_args(spec: AttentionSpec, dummy: torch.Tensor) -> tuple[list, dict]:
    """``[SINKS, stride_sinks]`` and ``{"HAS_SINKS": ...}`` for the kernels that fold the sinks
    (forward epilogue, decode combine, backward preprocess, probabilities); ``dummy`` (never
    read) when the call has none."""
    if spec.sinks is None:
        return [dummy, 0], {"HAS_SINKS": False}
    return [spec.sinks, spec.sinks.stride(0)], {"HAS_SINKS": True}
