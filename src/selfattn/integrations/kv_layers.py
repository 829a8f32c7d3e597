"""Cache layers that write keys and values in place: no copy of the cache per step.

transformers' ``DynamicCache`` appends each layer's new token with ``torch.cat``, so every decode
step copies every layer's whole cache into fresh memory; after a few thousand tokens that copy is
most of the step. Here each layer keeps preallocated storage (B, Hkv, capacity, D) that grows by
chunks (geometrically, so growth copies O(1) tokens per step amortised), new tokens are written
into it, and attention receives a view (a slice) of it. The storage is float, or quantized codes
and scales (``bits``, see :mod:`selfattn.integrations.kv_store`), whose view is a
:class:`selfattn.QuantizedKV` that selfattn's attention reads directly.

- :class:`InPlaceLayer`: the storage and its bookkeeping (``[start, end)`` held, moves, batch
  operations), shared by every kind.
- :class:`GrowingLayer` serves full-attention layers (everything is kept).
- :class:`WindowLayer` serves sliding-window (and chunked) layers: the last ``window - 1`` tokens
  are kept in a buffer with ``chunk`` free slots after them; when those are used up the kept
  tokens are moved to the front of a fresh buffer (once per ``chunk`` steps, not per step).

With ``residual=R`` and quantized storage, a layer keeps its newest tokens in a float *window*
(KIVI; transformers' ``QuantizedCache(residual_length=)``): new tokens are written there, and
once it holds more than ``R + FLUSH`` tokens the next call quantizes all but its newest ``R``
in one chunk into the quantized storage (each token quantized once, when it leaves the window;
nothing older is re-quantized) and slides those ``R`` to the window's front (a copy of ``R``
tokens per ``FLUSH`` steps). Attention gets a :class:`selfattn.kv_residual.ResidualKV`
``[quantized | window]``, read exactly; a call's own tokens are always in the window.

Their behaviour (lengths, masks, ``crop``, ``reorder_cache``, the batch operations) mirrors
``DynamicLayer`` and ``DynamicSlidingWindowLayer``, so ``generate()`` gives the same tokens.
This module imports transformers.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from ..kv_cache import FLUSH
from ..kv_residual import ResidualKV
from ..quant import kv_bits
from . import kv_store

try:
    from transformers.cache_utils import CacheLayerMixin
except ImportError as exc:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "selfattn's transformers cache needs transformers with the cache-layer interface "
        "(CacheLayerMixin, get_layer_types_and_kwargs: transformers >= 5); "
        "pip install -U 'transformers>=5'"
    ) from exc

__all__ = ["CHUNK", "FLUSH", "GrowingLayer", "InPlaceLayer", "WindowLayer", "round_up"]

#: tokens a layer's storage grows by at least (and a sliding layer's free slots)
CHUNK = 256


def round_up(n: int, chunk: int) -> int:
    """The next multiple of ``chunk`` strictly above ``n``: at least one free slot remains."""
    return (n // chunk + 1) * chunk


class InPlaceLayer(CacheLayerMixin):
    """Storage for (B, Hkv, capacity, D) keys and (B, Hkv, capacity, Dv) values, float or
    quantized (``bits``: 8 or 4 for both, or a pair ``(key_bits, value_bits)`` of 8, 4 or None,
    see :func:`selfattn.quant.kv_bits`); the tokens held are ``[start, end)`` of it, and
    ``self.keys`` / ``self.values`` are views of exactly those (tensors, or
    :class:`selfattn.QuantizedKV` over views of the codes and scales for a quantized side).

    With ``residual`` > 0 and a quantized side, the newest tokens are held in float buffers
    (B, Hkv, window capacity, D) at slots ``[wstart, wend)`` after those (see the module
    docstring), and ``keys`` / ``values`` are :class:`selfattn.kv_residual.ResidualKV`."""

    is_compileable = False  # shapes change every step, like DynamicLayer
    is_croppable = True

    def __init__(
        self,
        chunk: int = CHUNK,
        *,
        bits: int | tuple[int | None, int | None] | None = None,
        rotate: bool = False,
        residual: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int (tokens), got {chunk!r}")
        if isinstance(residual, bool) or not isinstance(residual, int):
            raise TypeError(f"residual must be an int (tokens), got {residual!r}")
        if residual < 0:
            raise ValueError(f"residual must be >= 0 (tokens), got {residual}")
        self.key_bits, self.value_bits = kv_bits(bits)
        # a float window only delays quantizing: float storage has none
        quantized = self.key_bits is not None or self.value_bits is not None
        self.residual = residual if quantized else 0
        self.kwin: torch.Tensor | None = None  # (B, Hkv, window capacity, D) float
        self.vwin: torch.Tensor | None = None
        self.wstart = self.wend = 0
        self.chunk = chunk
        self.bits = bits
        self.rotate = bool(rotate)
        # one codec per side: keys and values may be stored at different widths
        self.kcodec: kv_store.Codec = kv_store.FloatCodec()
        self.vcodec: kv_store.Codec = kv_store.FloatCodec()
        self.kparts: kv_store.Parts | None = None  # (B, Hkv, capacity, C) each
        self.vparts: kv_store.Parts | None = None
        self.start = 0
        self.end = 0
        # the views of the main storage's tokens last made: (kparts, vparts, start, end, keys,
        # values), reused while those four are the same (the views read the storage as it is)
        self.main_views: tuple = (None,) * 6

    def __repr__(self) -> str:
        bits = "" if self.bits is None else f", bits={self.bits}"
        if self.residual:
            bits += f", residual={self.residual}"
        return f"{type(self).__name__}(tokens={self.held}, capacity={self.capacity}{bits})"

    @property
    def held(self) -> int:
        """Tokens held: the main storage's ``[start, end)`` and the float window's."""
        return self.end - self.start + self.wend - self.wstart

    @property
    def buffer_k(self) -> torch.Tensor | None:
        """The keys' storage (B, Hkv, capacity, D) (the codes when quantized), or None."""
        return None if self.kparts is None else self.kparts[0]

    @property
    def buffer_v(self) -> torch.Tensor | None:
        """The values' storage (B, Hkv, capacity, Dv) (the codes when quantized), or None."""
        return None if self.vparts is None else self.vparts[0]

    @property
    def capacity(self) -> int:
        """Tokens the storage holds before it must move or grow."""
        return 0 if self.kparts is None else self.kparts[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the keys' and values' storage (its capacity, codes and scales included, and
        the float window's buffers)."""
        win = sum(t.numel() * t.element_size() for t in (self.kwin, self.vwin) if t is not None)
        return kv_store.nbytes(self.kparts) + kv_store.nbytes(self.vparts) + win

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty storage shaped like the first keys and values (B, Hkv, 0, D)."""
        self.device = key_states.device
        quantized = self.key_bits is not None or self.value_bits is not None
        if quantized and key_states.dtype != value_states.dtype:
            raise TypeError(
                f"quantized storage needs keys and values of one dtype, got "
                f"{key_states.dtype} and {value_states.dtype}"
            )
        dtype = key_states.dtype
        self.kcodec, self.vcodec = (
            kv_store.FloatCodec() if b is None else kv_store.QuantCodec(b, self.rotate, dtype)
            for b in (self.key_bits, self.value_bits)
        )
        self.kparts = kv_store.empty_like(self.kcodec.encode(key_states[:, :, :0]), 0)
        self.vparts = kv_store.empty_like(self.vcodec.encode(value_states[:, :, :0]), 0)
        self.start = self.end = 0
        if self.residual:
            cap = self.residual + FLUSH
            self.kwin = key_states.new_zeros((*key_states.shape[:2], cap, key_states.shape[3]))
            self.vwin = value_states.new_zeros(
                (*value_states.shape[:2], cap, value_states.shape[3])
            )
        self.wstart = self.wend = 0
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        """Point ``keys`` / ``values`` at the tokens held (views, no copy)."""
        self.keys, self.values = self._views(0)

    def _views(self, skip: int) -> tuple[Any, Any]:
        """Views of the tokens held but the first ``skip``: (B, Hkv, held - skip, D) keys and
        values (a ResidualKV ``[main | window]`` with a float window)."""
        a = min(self.start + skip, self.end)
        kparts, vparts, end = self.kparts, self.vparts, self.end
        made = self.main_views
        # with a float window the main storage's tokens change once per FLUSH steps: its views
        # (a QuantizedKV each, checked when made) are made then, not at every step
        if made[0] is kparts and made[1] is vparts and made[2] == a and made[3] == end:
            keys, values = made[4], made[5]
        else:
            keys = self.kcodec.view(kparts, a, end)
            values = self.vcodec.view(vparts, a, end)
            self.main_views = (kparts, vparts, a, end, keys, values)
        if not self.residual:
            return keys, values
        w = self.wstart + max(0, skip - (end - self.start))
        n = self.wend - w
        return (  # views of this layer's own storage: they fit (checked when it was made)
            ResidualKV.of_views(keys, self.kwin.narrow(2, w, n)),
            ResidualKV.of_views(values, self.vwin.narrow(2, w, n)),
        )

    def _drop_oldest(self, count: int) -> None:
        """Forget the ``count`` oldest tokens held (the main storage's first, then the
        window's)."""
        from_main = min(count, self.end - self.start)
        self.start += from_main
        self.wstart += count - from_main

    def _drop_newest(self, count: int) -> None:
        """Forget the ``count`` newest tokens held (the window's first, then the main's)."""
        from_win = min(count, self.wend - self.wstart)
        self.wend -= from_win
        self.end = max(self.start, self.end - (count - from_win))

    def _put(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Add ``n`` new tokens after those held: into the main storage, or, with a float
        window, into the window after flushing its oldest tokens (all but the newest
        ``residual``) into the main storage once it would hold more than ``residual + FLUSH``."""
        if not self.residual:
            self._make_room(key_states.shape[2])
            self._write(key_states, value_states)
            return
        n, keep = key_states.shape[2], self.residual
        held = self.wend - self.wstart
        if held + n > keep + FLUSH and held > keep:
            out = held - keep  # quantized once, as they leave the window
            a = self.wstart
            self._make_room(out)
            self._write(self.kwin[:, :, a : a + out], self.vwin[:, :, a : a + out])
            self.wstart += out
            held = keep
        cap = max(keep + FLUSH, held + n)
        if cap != self.kwin.shape[2] or self.wend + n > cap:
            # a fresh buffer (grown for a long chunk, or back to the usual size) or a slide of
            # what is held to the front (once per FLUSH steps: at most residual tokens)
            for name in ("kwin", "vwin"):
                old = getattr(self, name)
                kept = old[:, :, self.wstart : self.wend]
                new = (
                    old
                    if cap == old.shape[2]
                    else old.new_empty((*old.shape[:2], cap, old.shape[3]))
                )
                new[:, :, :held] = kept.clone() if new is old else kept
                setattr(self, name, new)
            self.wstart, self.wend = 0, held
        self.kwin.narrow(2, self.wend, n).copy_(key_states)
        self.vwin.narrow(2, self.wend, n).copy_(value_states)
        self.wend += n

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New keys (B, Hkv, n, D) and values (B, Hkv, n, Dv) that fit the storage."""
        bk = self.kparts[0]
        d, dv = self.kcodec.dim(self.kparts), self.vcodec.dim(self.vparts)
        if (
            key_states.dim() != 4
            or value_states.dim() != 4
            or key_states.shape[:2] != bk.shape[:2]
            or key_states.shape[3] != d
            or value_states.shape[:3] != key_states.shape[:3]
            or value_states.shape[3] != dv
        ):
            raise ValueError(
                f"{type(self).__name__}.update expects keys (B, Hkv, n, D) = "
                f"({bk.shape[0]}, {bk.shape[1]}, n, {d}) and values (B, Hkv, n, Dv) with "
                f"Dv = {dv}; got {tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if key_states.device != bk.device or value_states.device != bk.device:
            raise ValueError(
                f"{type(self).__name__} lives on {bk.device}; got keys on {key_states.device}, "
                f"values on {value_states.device}"
            )
        kd, vd = self.kcodec.dtype(self.kparts), self.vcodec.dtype(self.vparts)
        if key_states.dtype != kd or value_states.dtype != vd:
            raise TypeError(
                f"{type(self).__name__} holds {kd} keys and {vd} values; got "
                f"{key_states.dtype} and {value_states.dtype}"
            )

    @abstractmethod
    def _new_capacity(self, needed: int) -> int:
        """The capacity of new storage that must hold ``needed`` tokens (each kind decides)."""

    def _make_room(self, n: int) -> None:
        """Ensure ``n`` tokens fit after ``end``: else move the held tokens to the front of new
        storage (one copy of what is held, once per chunk, never per step)."""
        if self.end + n <= self.capacity:
            return
        held = self.end - self.start
        cap = self._new_capacity(held + n)
        self._move(cap)

    def _move(self, capacity: int, index: torch.Tensor | None = None) -> None:
        """New storage of ``capacity`` tokens holding the held tokens at its front (batch rows
        picked by ``index``, a long tensor, when given)."""
        moved = []
        for parts in (self.kparts, self.vparts):
            held = tuple(p[:, :, self.start : self.end] for p in parts)  # old storage
            if index is not None:
                held = tuple(p.index_select(0, index) for p in held)
            new = kv_store.empty_like(held, capacity)
            kv_store.write(new, held, 0)
            moved.append(new)
        self.kparts, self.vparts = moved
        self.start, self.end = 0, self.end - self.start
        if index is not None and self.kwin is not None:  # the window follows the batch rows
            self.kwin = self.kwin.index_select(0, index)
            self.vwin = self.vwin.index_select(0, index)
        self._refresh()

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Copy ``n`` new tokens into ``[end, end + n)`` (room was made), quantizing them
        first for quantized storage."""
        n = key_states.shape[2]
        kv_store.write(self.kparts, self.kcodec.encode(key_states), self.end)
        kv_store.write(self.vparts, self.vcodec.encode(value_states), self.end)
        self.end += n

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget everything and drop the storage (as ``DynamicLayer.reset``)."""
        self.kparts = self.vparts = None
        self.kwin = self.vwin = None
        self.keys = self.values = None
        self.main_views = (None,) * 6
        self.start = self.end = self.wstart = self.wend = 0
        self.is_initialized = False
        if hasattr(self, "cumulative_length"):
            self.cumulative_length = 0

    def offload(self) -> None:
        if self.is_initialized:
            self.kparts = tuple(p.to("cpu", non_blocking=True) for p in self.kparts)
            self.vparts = tuple(p.to("cpu", non_blocking=True) for p in self.vparts)
            if self.kwin is not None:
                self.kwin, self.vwin = (
                    t.to("cpu", non_blocking=True) for t in (self.kwin, self.vwin)
                )
            self._refresh()

    def prefetch(self) -> None:
        if self.is_initialized and self.kparts[0].device != self.device:
            self.kparts = tuple(p.to(self.device, non_blocking=True) for p in self.kparts)
            self.vparts = tuple(p.to(self.device, non_blocking=True) for p in self.vparts)
            if self.kwin is not None:
                self.kwin, self.vwin = (
                    t.to(self.device, non_blocking=True) for t in (self.kwin, self.vwin)
                )
            self._refresh()

    def _select_rows(self, index: torch.Tensor) -> None:
        """Batch row ``b`` becomes old row ``index[b]`` (``index`` may change the batch size)."""
        if not self.is_initialized:
            return
        index = index.to(self.kparts[0].device)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.long().flatten()
        if index.numel() == self.kparts[0].shape[0]:
            # same batch: write back in place (index_select copies first, so a permutation is safe)
            for p in (*self.kparts, *self.vparts):
                held = p[:, :, self.start : self.end]
                held.copy_(held.index_select(0, index))
            if self.kwin is not None:
                for t in (self.kwin, self.vwin):
                    held = t[:, :, self.wstart : self.wend]
                    held.copy_(held.index_select(0, index))
            self._refresh()
        else:
            self._move(self.capacity, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Follow the surviving beams: row ``b`` becomes old row ``beam_idx[b]``."""
        if self.get_seq_length() > 0:
            self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (beam search and sampling set-up)."""
        if self.get_seq_length() > 0:
            rows = torch.arange(self.kparts[0].shape[0], device=self.kparts[0].device)
            self._select_rows(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (ints or a bool mask)."""
        if self.get_seq_length() > 0:
            if not isinstance(indices, torch.Tensor):
                indices = torch.as_tensor(indices)
            self._select_rows(indices)


class GrowingLayer(InPlaceLayer):
    """A full-attention layer's cache: every token kept, written in place into storage that grows
    by at least ``chunk`` tokens and by a quarter of its size (amortised O(1) copying per token).

    ``update`` returns views (B, Hkv, len, D) and (B, Hkv, len, Dv) of the storage; a step that
    fits the capacity allocates nothing. Lengths, masks and ``crop`` behave as ``DynamicLayer``.
    """

    is_sliding = False

    def _new_capacity(self, needed: int) -> int:
        return round_up(max(needed, self.capacity + self.capacity // 4), self.chunk)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append keys (B, Hkv, n, D) and values (B, Hkv, n, Dv); return views over all tokens."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check(key_states, value_states)
        self._put(key_states, value_states)
        self._refresh()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the next call's mask: all tokens held plus the query."""
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.held if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative int, as ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative number of tokens to remove, got {tokens_to_remove} "
                "(as transformers' DynamicLayer)"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._drop_newest(-tokens_to_remove)
        self._refresh()


class WindowLayer(InPlaceLayer):
    """A sliding-window (or chunked) layer's cache: the last ``sliding_window - 1`` tokens, written
    in place, as ``DynamicSlidingWindowLayer`` keeps them but without its per-step ``torch.cat``.

    The storage holds the kept tokens and ``chunk`` free slots; when they are used up, the kept
    tokens move to the front of fresh storage (one copy of ``sliding_window - 1`` tokens per
    ``chunk`` steps). ``update`` returns what ``DynamicSlidingWindowLayer`` returns (the kept
    tokens and the new ones, the window's last ``sliding_window - 1 + n`` while recording the
    past), as views. A prefill longer than the storage grows it for that call, and the kept
    tokens move back into storage of the usual size afterwards.
    """

    is_sliding = True

    def __init__(
        self,
        sliding_window: int,
        chunk: int = CHUNK,
        *,
        bits: int | tuple[int | None, int | None] | None = None,
        rotate: bool = False,
        residual: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(chunk=chunk, bits=bits, rotate=rotate, residual=residual)
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise TypeError(f"sliding_window must be an int, got {sliding_window!r}")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.sliding_window = sliding_window
        self.cumulative_length = 0
        self.record_past = False

    def activate_past_recording(self, **kwargs: Any) -> None:
        """Keep every token until the next ``crop`` (assisted decoding rolls tokens back)."""
        self.record_past = True

    @property
    def usual_capacity(self) -> int:
        """The storage of a layer past its first prefill: the window and ``chunk`` free slots."""
        return round_up(self.sliding_window - 1 + self.chunk - 1, self.chunk)

    def _new_capacity(self, needed: int) -> int:
        return max(self.usual_capacity, round_up(needed, self.chunk))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append keys (B, Hkv, n, D) and values (B, Hkv, n, Dv); return views over the kept
        tokens and the new ones."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check(key_states, value_states)
        n = key_states.shape[2]
        self.cumulative_length += n
        self._put(key_states, value_states)
        skip = 0
        if self.record_past:
            skip = max(0, self.held - (self.sliding_window - 1 + n))
        # views of the storage as it is now: moving the kept tokens below leaves them valid
        keys, values = self._views(skip)
        if not self.record_past:
            self._drop_oldest(max(0, self.held - (self.sliding_window - 1)))
            if self.capacity > self.usual_capacity:  # after a long prefill: give it back
                self._move(self.usual_capacity)
        self._refresh()
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the next call's mask, as ``DynamicSlidingWindowLayer``."""
        w = self.sliding_window
        kv_offset = max(self.cumulative_length - w + 1, 0)
        if self.cumulative_length >= w:
            return w - 1 + query_length, kv_offset
        return self.cumulative_length + query_length, kv_offset

    def get_seq_length(self) -> int:
        """Tokens seen so far (not just those kept), as ``DynamicSlidingWindowLayer``."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        """As ``DynamicSlidingWindowLayer.crop``: drop the last ``-tokens_to_remove`` tokens, and
        keep no more than the window needs (so ``crop(0)`` may drop tokens kept while recording).

        Raises:
            RuntimeError: the window is full and the past was not recorded, or a positive count
                once the window is full.
            ValueError: a positive count before the window is full.
        """
        w = self.sliding_window
        if self.cumulative_length >= w:
            if not self.record_past:
                raise RuntimeError(
                    "crop after the sliding window filled needs the past recorded: call "
                    "activate_past_recording() before the tokens to roll back are added"
                )
            if tokens_to_remove > 0:
                raise RuntimeError(
                    "a full sliding-window layer is cropped by a negative number of tokens to "
                    f"remove, got {tokens_to_remove}"
                )
            self._drop_newest(-tokens_to_remove)
            self._drop_oldest(max(0, self.held - (w - 1)))
            self.cumulative_length += tokens_to_remove
            self._refresh()
            return
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative number of tokens to remove, got {tokens_to_remove} "
                "(as transformers' DynamicSlidingWindowLayer)"
            )
        if not self.is_initialized:
            return
        self._drop_newest(-tokens_to_remove)
        self._refresh()
        self.cumulative_length = self.held
