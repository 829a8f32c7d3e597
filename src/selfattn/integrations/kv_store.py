"""How a cache layer stores its keys or values: float tensors, or quantized codes and scales.

A cache layer keeps each of its keys and values as a tuple of *parts*, tensors shaped
(B, Hkv, capacity, C) that share the token axis 2: one part (the float tensor itself) for float
storage, two (codes, scales) for quantized storage. Tokens are written into, moved within and
gathered out of every part alike, so the layer's bookkeeping never looks at what a part holds.
A codec turns new tokens into parts (:meth:`FloatCodec.encode`, :meth:`QuantCodec.encode`) and
a token range of the parts into what attention reads (:meth:`view`): a view of the float
tensor, or a :class:`selfattn.QuantizedKV` over views of the codes and scales; never a copy.

This module imports no transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import quant
from ..quant import QuantizedKV, quantize_kv

__all__ = [
    "Codec",
    "FloatCodec",
    "Parts",
    "QuantCodec",
    "empty_like",
    "gather",
    "nbytes",
    "scatter",
    "write",
]

#: a layer's storage of keys or values: tensors (B, Hkv, capacity, C) sharing axis 2
Parts = tuple[torch.Tensor, ...]


class FloatCodec:
    """Float storage: the one part is the keys (or values) themselves, in their own dtype."""

    bits = None

    def encode(self, x: torch.Tensor) -> Parts:
        """New tokens (B, Hkv, n, D) as parts: the tensor itself (copied when written)."""
        return (x,)

    def view(self, parts: Parts, start: int, end: int) -> torch.Tensor:
        """Tokens ``[start, end)``: a view (B, Hkv, end - start, D) of the storage."""
        return parts[0].narrow(2, start, end - start)

    def dim(self, parts: Parts) -> int:
        """The head dim D the parts hold."""
        return parts[0].shape[3]

    def dtype(self, parts: Parts) -> torch.dtype:
        return parts[0].dtype


class QuantCodec:
    """Quantized storage (``bits`` 8 or 4, optional Walsh-Hadamard rotation): codes and
    float32 scales per token and head, as :func:`selfattn.quantize_kv` makes them. Each chunk of
    new tokens is quantized on its own (a token's codes never depend on its neighbours), so
    writing tokens in chunks gives the codes of quantizing them all at once."""

    def __init__(self, bits: int, rotate: bool, dtype: torch.dtype) -> None:
        self.bits = bits
        self.rotate = rotate
        self.float_dtype = dtype
        self.group = 0  # channels per scale: known once the first tokens are encoded

    def encode(self, x: torch.Tensor) -> Parts:
        """New tokens (B, Hkv, n, D) as ``(codes, scales)`` (B, Hkv, n, D or D/2), (B, Hkv, n, G).

        The first call goes through :func:`selfattn.quantize_kv` (which checks bits, rotation
        and D against each other); later ones, whose tokens the layer has checked against its
        storage, ask the native engine directly where ``quantize_kv`` would (the same codes,
        without building and checking a :class:`QuantizedKV` at every decode step)."""
        if self.group:
            got = quant.native_codes(x, self.bits, self.group, self.rotate)
            if got is not None:
                return got
        q = quantize_kv(x, bits=self.bits, rotate=self.rotate)
        self.group = q.group_size
        return (q.codes, q.scales)

    def view(self, parts: Parts, start: int, end: int) -> QuantizedKV:
        """Tokens ``[start, end)`` as a :class:`QuantizedKV` over views of the codes and scales."""
        codes, scales = parts
        g = self.dim(parts) // scales.shape[3]  # keys and values may differ in D, hence in G
        n = end - start
        return QuantizedKV.of_views(  # views of storage that encode() filled: they fit
            codes.narrow(2, start, n),
            scales.narrow(2, start, n),
            bits=self.bits,
            group_size=g,
            rotate=self.rotate,
            dtype=self.float_dtype,
        )

    def dim(self, parts: Parts) -> int:
        """The head dim D the codes hold (two per byte at 4 bits)."""
        return parts[0].shape[3] * (8 // self.bits)

    def dtype(self, parts: Parts) -> torch.dtype:
        return self.float_dtype


Codec = FloatCodec | QuantCodec


def empty_like(parts: Parts, capacity: int, batch: int | None = None) -> Parts:
    """Fresh parts like ``parts`` holding ``capacity`` tokens (and ``batch`` rows when given)."""
    out = []
    for p in parts:
        b = p.shape[0] if batch is None else batch
        out.append(p.new_empty((b, p.shape[1], capacity, p.shape[3])))
    return tuple(out)


def write(parts: Parts, new: Sequence[torch.Tensor], at: int) -> None:
    """Copy ``new`` (each (B, Hkv, n, C)) into tokens ``[at, at + n)`` of ``parts``."""
    for p, x in zip(parts, new):
        p.narrow(2, at, x.shape[2]).copy_(x)


def gather(parts: Parts, index: torch.Tensor) -> Parts:
    """New tensors holding, for each (batch row, head), the tokens ``index`` (B, Hkv, m) names."""
    out = []
    for p in parts:
        idx = index.unsqueeze(-1).expand(*index.shape, p.shape[3])
        out.append(p.gather(2, idx))
    return tuple(out)


def scatter(parts: Parts, index: torch.Tensor, src: Parts) -> None:
    """Write ``src`` (each (B, Hkv, m, C)) into the tokens ``index`` (B, Hkv, m) names."""
    for p, s in zip(parts, src):
        idx = index.unsqueeze(-1).expand(*index.shape, p.shape[3])
        p.scatter_(2, idx, s)


def nbytes(parts: Parts | None) -> int:
    """Bytes the storage occupies (its whole capacity, not only the tokens held)."""
    if parts is None:
        return 0
    return sum(p.numel() * p.element_size() for p in parts)
