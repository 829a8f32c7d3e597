"""Quantized keys and values: ``quantize_kv`` and the ``QuantizedKV`` it returns.

Each token's vector of each head is quantized on its own, symmetrically, with one float32
scale per group of ``group_size`` channels, so a cache that appends a token never touches the
codes of older ones. Codes:

- 8 bits: int8 in ``[-127, 127]``, ``scale = max|x| / 127`` over the group.
- 4 bits: all 16 codes ``[-8, 7]``: ``scale = m / -8`` where ``m`` is the group's element of
  largest magnitude (with its sign; the scale is negative when ``m`` is positive), so ``m`` is
  code ``-8`` exactly and the step is ``max|x| / 8``. Stored two per byte (uint8) as
  ``code + 8`` (offset binary), the even channel in the low nibble; a value is always
  ``code * scale``. Elements of the sign opposite to ``m`` and magnitude above ``7.5 |scale|``
  clamp to code 7 (error up to ``|scale|``); every other element is within ``|scale| / 2``.

``rotate=True`` first multiplies the head dimension by a fixed orthonormal Walsh-Hadamard
matrix (block-diagonal: blocks of the largest power of two dividing D, so D=64 is one block of
64 and D=96 three blocks of 32), which spreads an outlier channel over the block before
rounding. ``dequantize`` rotates back (the matrix is its own inverse), so callers never see
rotated values; ``unwrap_call`` (the front door's) rotates q or the output instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import checks

__all__ = [
    "BITS",
    "QuantizedKV",
    "hadamard",
    "kv_bits",
    "pack4",
    "quantize_kv",
    "standin",
    "unpack4",
]

BITS = (8, 4)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
QMAX = {8: 127, 4: 7}  # the largest code; the smallest is -127 (8 bits) or -8 (4 bits)
#: up to this many tokens (a decode step's, a float window's flush of 32), and for any number
#: with rotation, quantize_kv asks the native engine, when loaded, for the codes: one call
#: instead of some twenty torch operations (fifty with rotation) that cost far more than their
#: arithmetic at that size (1 token, one thread: ~9 us instead of ~65 for int8, ~7 instead of
#: ~190 rotated 4-bit; 4096 tokens rotated: ~12 ms instead of ~47); for more tokens without
#: rotation torch's vectorized operations are as fast
NATIVE_TOKENS = 64
#: ``quantize(x, bits, group, rotate)`` of the native engine (csrc/quantize.h), set by
#: ``selfattn.backends.native.build`` when this process loads the engine; None before
NATIVE_QUANTIZE: Any = None
_HADAMARD: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
_STANDINS: dict[tuple, torch.Tensor] = {}  # recent stand-ins, by codes shape, bits, dtype, device


def kv_bits(bits: Any) -> tuple[int | None, int | None]:
    """A cache's ``bits`` as ``(key_bits, value_bits)``, each 8, 4 or None (stored as floats).

    ``bits`` is None (float keys and values), 8 or 4 (both sides), or a pair
    ``(key_bits, value_bits)`` so that keys and values may differ: 4-bit keys cost most of the
    accuracy of a 4-bit cache, so ``(8, 4)`` keeps int8 keys with 4-bit values (llama.cpp's
    ``-ctk q8_0 -ctv q4_0``). ``(None, None)`` is the same as None.

    Raises:
        ValueError: anything else (a bool, 2, 3, a pair of another length or with a bad side),
            naming the value.
    """
    sides = tuple(bits) if isinstance(bits, (tuple, list)) else (bits, bits)
    if len(sides) != 2 or any(
        b is not None and (isinstance(b, bool) or not isinstance(b, int) or b not in BITS)
        for b in sides
    ):
        raise ValueError(
            "bits must be None, 8 or 4, or a pair (key_bits, value_bits) of 8, 4 or None; "
            f"got bits={bits!r}"
        )
    return sides[0], sides[1]


def default_group(bits: int, d: int) -> int:
    """The default group size: the whole head for 8 bits, gcd(D, 32) for 4 bits."""
    return d if bits == 8 else math.gcd(d, 32)


def rotation_block(d: int) -> int:
    """The Walsh-Hadamard block used for head dim ``d``: its largest power-of-two divisor."""
    return d & -d


def hadamard(n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The orthonormal (Sylvester) Walsh-Hadamard matrix (n, n), ``n`` a power of two.

    Symmetric and orthonormal, so it is its own inverse: ``H @ H == I``.
    """
    key = (n, dtype, torch.device(device))
    h = _HADAMARD.get(key)
    if h is None:
        m = torch.ones(1, 1, dtype=torch.float64)
        while m.shape[0] < n:
            m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
        h = (m / math.sqrt(n)).to(dtype=dtype, device=device)
        _HADAMARD[key] = h
    return h


def rotate_heads(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., D) times the block-diagonal Walsh-Hadamard matrix (its own inverse).

    A fast Walsh-Hadamard transform (log2 of the block stages of sums and differences):
    elementwise arithmetic, so a token's result does not depend on how many tokens are
    rotated together, and appending in chunks gives the same codes as quantizing at once.
    """
    d = x.shape[-1]
    blk = rotation_block(d)
    lead = x.shape[:-1]
    y = x.reshape(-1, d // blk, blk)
    h = 1
    while h < blk:
        pairs = y.reshape(-1, d // blk, blk // (2 * h), 2, h)  # channels i and i + h paired
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y * (1.0 / math.sqrt(blk))).reshape(*lead, d)


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes in ``[-8, 7]`` (..., D), D even, to uint8 (..., D / 2).

    Each byte holds ``code + 8`` of the even channel in its low nibble, of the odd one in its
    high nibble.
    """
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack4`: uint8 (..., D / 2) to int8 codes (..., D)."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


class QuantizedKV:
    """Quantized keys or values of shape (B, Hkv, N, D), as :func:`quantize_kv` returns them.

    Attributes:
        codes: int8 (B, Hkv, N, D) for 8 bits; uint8 (B, Hkv, N, D / 2) for 4 bits (two codes
            per byte, see the module docstring).
        scales: float32 (B, Hkv, N, D / group_size).
        bits: 8 or 4. group_size: channels per scale. rotate: whether the codes are of the
            Walsh-Hadamard-rotated head dimension.
        dtype: the dtype ``dequantize`` returns (that of the quantized tensor).

    A ``QuantizedKV`` holds no gradient: quantizing is not differentiable, so gradients stop
    here (``selfattn.attention`` gives none for a quantized ``k`` or ``v``).
    """

    __slots__ = ("bits", "codes", "dtype", "group_size", "rotate", "scales")

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        *,
        bits: int,
        group_size: int,
        rotate: bool,
        dtype: torch.dtype,
    ) -> None:
        if bits not in BITS or isinstance(bits, bool):
            raise ValueError(f"bits must be 8 or 4, got bits={bits!r}")
        want = torch.int8 if bits == 8 else torch.uint8
        if not isinstance(codes, torch.Tensor) or codes.dtype != want:
            got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise TypeError(f"codes of {bits} bits must be a {want} tensor, got {got}")
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
            got = scales.dtype if isinstance(scales, torch.Tensor) else type(scales).__name__
            raise TypeError(f"scales must be a float32 tensor, got {got}")
        d = codes.shape[-1] * (8 // bits) if codes.dim() == 4 else 0
        if (
            codes.dim() != 4
            or scales.dim() != 4
            or tuple(scales.shape[:3]) != tuple(codes.shape[:3])
            or scales.shape[3] * group_size != d
            or codes.device != scales.device
        ):
            raise ValueError(
                f"codes {tuple(codes.shape)} ({codes.device}) and scales {tuple(scales.shape)} "
                f"({scales.device}) do not fit bits={bits}, group_size={group_size}"
            )
        if dtype not in FLOATS:
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        self.codes = codes
        self.scales = scales
        self.bits = bits
        self.group_size = group_size
        self.rotate = bool(rotate)
        self.dtype = dtype

    @classmethod
    def of_views(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        *,
        bits: int,
        group_size: int,
        rotate: bool,
        dtype: torch.dtype,
    ) -> QuantizedKV:
        """A QuantizedKV of codes and scales known to fit (a cache layer's views of its own
        storage, made at every decode step): the constructor's checks skipped."""
        x = object.__new__(cls)
        x.codes = codes
        x.scales = scales
        x.bits = bits
        x.group_size = group_size
        x.rotate = rotate
        x.dtype = dtype
        return x

    @property
    def shape(self) -> torch.Size:
        """(B, Hkv, N, D) of the dequantized tensor."""
        b, h, n, c = self.codes.shape
        return torch.Size((b, h, n, c * (8 // self.bits)))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales covered (for a view: those of its tokens only)."""
        return (
            self.codes.numel() * self.codes.element_size()
            + self.scales.numel() * self.scales.element_size()
        )

    @property
    def requires_grad(self) -> bool:
        """Always False: a ``QuantizedKV`` holds no gradient."""
        return False

    def dim(self) -> int:
        return 4

    def detach(self) -> QuantizedKV:
        """Itself (there is no gradient to detach from)."""
        return self

    def __repr__(self) -> str:
        return (
            f"QuantizedKV(shape={tuple(self.shape)}, bits={self.bits}, "
            f"group_size={self.group_size}, rotate={self.rotate}, dtype={self.dtype}, "
            f"device={self.device}, nbytes={self.nbytes})"
        )

    def narrow(self, start: int, length: int) -> QuantizedKV:
        """Tokens ``[start, start + length)`` as a view (no copy): (B, Hkv, length, D)."""
        checks.integer("start", start, minimum=0)
        checks.integer("length", length, minimum=0)
        n = self.codes.shape[2]
        if start + length > n:
            raise ValueError(f"narrow({start}, {length}) is past the {n} tokens")
        return QuantizedKV(
            self.codes.narrow(2, start, length),
            self.scales.narrow(2, start, length),
            bits=self.bits,
            group_size=self.group_size,
            rotate=self.rotate,
            dtype=self.dtype,
        )

    def dequantize(self, *, rotated: bool = False) -> torch.Tensor:
        """The values (B, Hkv, N, D) in ``self.dtype``, rotated back when ``rotate``.

        ``rotated=True`` skips rotating back: the values in the basis the codes encode (for a
        caller that rotates q, or the output, instead; the same as ``dequantize()`` when the
        codes are not rotated).
        """
        codes = self.codes if self.bits == 8 else unpack4(self.codes)  # (B, Hkv, N, D) int8
        b, h, n, d = codes.shape
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        g = self.group_size
        x = codes.to(work).view(b, h, n, d // g, g) * self.scales.to(work).unsqueeze(-1)
        x = x.view(b, h, n, d)
        if self.rotate and not rotated:
            x = rotate_heads(x)
        return x.to(self.dtype)


def quantize_kv(
    x: torch.Tensor, *, bits: int = 8, group_size: int | None = None, rotate: bool = False
) -> QuantizedKV:
    """Quantize keys or values (B, Hkv, N, D) per token and head.

    Args:
        x: float (float16, bfloat16, float32, float64) (B, Hkv, N, D), finite.
        bits: 8 (int8 codes in [-127, 127], scale = max|x| / 127) or 4 (codes in [-8, 7],
            scale = m / -8 with m the group's signed element of largest magnitude, packed two
            per byte; see the module docstring).
        group_size: channels sharing one float32 scale; must divide D. Default: D for 8 bits,
            gcd(D, 32) for 4 bits.
        rotate: multiply the head dimension by the block Walsh-Hadamard matrix first (D even).

    Returns:
        A :class:`QuantizedKV`; ``.dequantize()`` gives back x's dtype, each element of the
        (rotated) vector within half its group's ``|scale|`` of the input (4 bits: those
        clamped to code 7 within one ``|scale|``).

    Raises:
        TypeError: x not a float tensor; bits, group_size or rotate of a wrong type.
        ValueError: x not 4-D, D == 0, bits not 8 or 4, a group_size that does not divide D,
            an odd D for 4 bits or for rotate=True.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 4 or x.shape[-1] == 0:
        raise ValueError(f"x must be (B, Hkv, N, D) with D >= 1, got shape {tuple(x.shape)}")
    checks.integer("bits", bits)
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got bits={bits}")
    if not isinstance(rotate, bool):
        raise TypeError(f"rotate must be a bool, got {rotate!r}")
    d = x.shape[-1]
    g = default_group(bits, d) if group_size is None else checks.integer("group_size", group_size)
    if d % g:
        raise ValueError(f"group_size={g} must divide the head dim D={d}")
    if bits == 4 and d % 2:
        raise ValueError(f"4-bit codes are packed two per byte: the head dim D={d} must be even")
    if rotate and d % 2:
        raise ValueError(
            f"rotate=True needs an even head dim (Walsh-Hadamard blocks of the largest power "
            f"of two dividing D), got D={d}"
        )
    b, h, n, _ = x.shape
    got = native_codes(x, bits, g, rotate)
    if got is not None:  # the same codes and scales as below, in one call
        return QuantizedKV(*got, bits=bits, group_size=g, rotate=rotate, dtype=x.dtype)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        y = x.detach().to(work)
        if rotate:
            y = rotate_heads(y)
        y = y.reshape(b, h, n, d // g, g)  # (B, Hkv, N, groups, g)
        if bits == 8:
            # stored as float32: round it first so the codes are rounded against the stored scale
            scale = (y.abs().amax(dim=-1) / 127).to(torch.float32)  # (B, Hkv, N, groups)
            lo = -127
        else:
            # all 16 codes: the element of largest magnitude m maps to -8 (scale = m / -8, of
            # either sign), so the step is max|x| / 8 rather than / 7
            big = y.gather(-1, y.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
            scale = (big / -8).to(torch.float32)  # (B, Hkv, N, groups)
            lo = -8
        safe = torch.where(scale != 0, scale, torch.ones_like(scale)).to(work)  # zero groups: 0
        codes = torch.round(y / safe.unsqueeze(-1)).clamp_(lo, QMAX[bits]).to(torch.int8)
        codes = codes.reshape(b, h, n, d)
        if bits == 4:
            codes = pack4(codes)
    return QuantizedKV(codes, scale, bits=bits, group_size=g, rotate=rotate, dtype=x.dtype)


def native_codes(
    x: torch.Tensor, bits: int, group: int, rotate: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`native_quantize` where it is the faster way to :func:`quantize_kv`'s codes (float32 /
    float64 on the CPU, a rotation or at most :data:`NATIVE_TOKENS` tokens: torch's vectorised
    ops do as well on longer unrotated runs), else None."""
    if (
        (x.shape[2] <= NATIVE_TOKENS or rotate)
        and x.is_cpu
        and (x.dtype is torch.float32 or x.dtype is torch.float64)
    ):
        return native_quantize(x, bits, group, rotate)
    return None


def native_quantize(
    x: torch.Tensor, bits: int, group: int, rotate: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(codes, scales)`` of :func:`quantize_kv` for float32 / float64 ``x`` (B, Hkv, N, D) on
    the CPU from the native engine (csrc/quantize.h: the same operations in the same order, so
    the same bits), or None: the engine not loaded in this process (it is never built or loaded
    for this: :data:`NATIVE_QUANTIZE` is set when it loads), or a non-finite value (torch's
    rules then decide)."""
    native = NATIVE_QUANTIZE
    if native is None:
        return None
    return native(x.detach().contiguous(), bits, group, rotate)


def dequantized(x: Any) -> Any:
    """``x.dequantize()`` for a :class:`QuantizedKV`, anything else unchanged."""
    return x.dequantize() if isinstance(x, QuantizedKV) else x


def standin(x: Any) -> Any:
    """For a :class:`QuantizedKV`, a tensor of its dequantized shape (B, Hkv, N, D), dtype and
    device that owns no memory (one element, expanded with zero strides): what validation and a
    backend reading the codes itself see in place of the values. Anything else unchanged."""
    if not isinstance(x, QuantizedKV):
        return x
    key = (x.codes.shape, x.bits, x.dtype, x.codes.device)
    got = _STANDINS.get(key)
    if got is None:  # a call asks twice (validation, the kernel); decode steps grow by one token
        if len(_STANDINS) > 64:
            _STANDINS.clear()
        got = _STANDINS[key] = torch.empty((), dtype=x.dtype, device=x.device).expand(x.shape)
    return got


def describe(x: QuantizedKV) -> str:
    """``int8`` / ``int4``, with ``+rotation`` when rotated (for messages and ``explain``)."""
    return f"int{x.bits}" + ("+rotation" if x.rotate else "")


def unwrap_label(k: Any, v: Any) -> str:
    """Which of k, v are a :class:`QuantizedKV` (``""`` when neither), e.g.
    ``"k int8, v int4+rotation"``."""
    return ", ".join(
        f"{name} {describe(t)}" for name, t in (("k", k), ("v", v)) if isinstance(t, QuantizedKV)
    )


def unwrap(k: Any, v: Any) -> tuple[Any, Any, str]:
    """``(k, v, label)``: any :class:`QuantizedKV` among k, v dequantized, and a label saying
    which were quantized (``""`` when neither), e.g. ``"k int8, v int4+rotation"``."""
    label = unwrap_label(k, v)
    if not label:
        return k, v, ""
    return dequantized(k), dequantized(v), label


def rotated_like(t: torch.Tensor) -> torch.Tensor:
    """``t`` (..., D) rotated by the block Walsh-Hadamard matrix, computed in float32 (float64
    for float64) and returned in its dtype; differentiable (gradients flow through it)."""
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    return rotate_heads(t.to(work)).to(t.dtype)


def unwrap_call(q: Any, k: Any, v: Any) -> tuple[Any, Any, Any, str, bool]:
    """A call's ``(q, k, v, label, rotate_out)`` with any :class:`QuantizedKV` made a tensor.

    Rotation is undone where it is cheapest, never on the keys and values themselves: scores
    ``q . (H r)`` equal ``(H q) . r`` (H symmetric), so rotated keys are read in the rotated
    basis with q rotated; an output ``sum p (H r)`` is ``H (sum p r)``, so rotated values are
    read rotated and the caller rotates the output back (``rotate_out``). That needs q to be a
    4-D tensor of the keys' dtype, device and head dim; otherwise everything is dequantized
    plainly and validation reports what is wrong.
    """
    label = unwrap_label(k, v)
    if not label:
        return q, k, v, "", False
    ref = k if isinstance(k, QuantizedKV) else v
    fits = (
        isinstance(q, torch.Tensor)
        and q.dim() == 4
        and q.dtype == ref.dtype
        and q.device == ref.device
        and (not isinstance(k, torch.Tensor) or (k.dtype == q.dtype and k.device == q.device))
        and (not isinstance(v, torch.Tensor) or (v.dtype == q.dtype and v.device == q.device))
    )
    rotate_out = False
    if fits and isinstance(k, QuantizedKV) and k.rotate and q.shape[-1] == k.shape[-1]:
        q, k = rotated_like(q), k.dequantize(rotated=True)
    if fits and isinstance(v, QuantizedKV) and v.rotate:
        v, rotate_out = v.dequantize(rotated=True), True
    return q, dequantized(k), dequantized(v), label, rotate_out
