"""A transformers ``Cache`` whose keys and values are written in place: no copy of the cache per step.

transformers' ``DynamicCache`` appends each layer's new token with ``torch.cat``, so every decode
step copies every layer's whole cache into fresh memory; after a few thousand tokens that copy is
most of the step. Here each layer keeps preallocated storage (B, Hkv, capacity, D) that grows by
chunks (geometrically, so growth copies O(1) tokens per step amortised), new tokens are written
into it, and attention receives a view (a slice) of it.

- :class:`GrowingLayer` serves full-attention layers (everything is kept).
- :class:`WindowLayer` serves sliding-window (and chunked) layers: the last ``window - 1`` tokens
  are kept in a buffer with ``chunk`` free slots after them; when those are used up the kept
  tokens are moved to the front of a fresh buffer (once per ``chunk`` steps, not per step).
- :class:`InPlaceCache` builds one layer per model layer from the model's config, as
  ``DynamicCache(config=...)`` chooses ``DynamicLayer`` / ``DynamicSlidingWindowLayer``.

Their behaviour (lengths, masks, ``crop``, ``reorder_cache``, the batch operations) mirrors
``DynamicLayer`` and ``DynamicSlidingWindowLayer``, so ``generate()`` gives the same tokens.
This module imports transformers; :func:`selfattn.integrations.transformers.make_cache` imports
it on first use.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

try:
    from transformers.cache_utils import (
        Cache,
        CacheLayerMixin,
        DummyLayer,
        get_layer_types_and_kwargs,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "selfattn's transformers cache needs transformers with the cache-layer interface "
        "(CacheLayerMixin, get_layer_types_and_kwargs: transformers >= 5); "
        "pip install -U 'transformers>=5'"
    ) from exc

__all__ = ["CHUNK", "POLICIES", "GrowingLayer", "InPlaceCache", "WindowLayer", "make_cache"]

#: tokens a layer's storage grows by at least (and a sliding layer's free slots)
CHUNK = 256
#: the eviction policies ``make_cache(budget=...)`` will take (see docs/api.md)
POLICIES = ("window", "sink", "h2o", "tova", "snapkv")


def _round_up(n: int, chunk: int) -> int:
    """The next multiple of ``chunk`` strictly above ``n``: at least one free slot remains."""
    return (n // chunk + 1) * chunk


class _InPlaceLayer(CacheLayerMixin):
    """Storage (B, Hkv, capacity, D) and (B, Hkv, capacity, Dv); the tokens held are
    ``[start, end)`` of it, and ``self.keys`` / ``self.values`` are views of exactly those."""

    is_compileable = False  # shapes change every step, like DynamicLayer
    is_croppable = True

    def __init__(self, chunk: int = CHUNK, **kwargs: Any) -> None:
        super().__init__()
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int (tokens), got {chunk!r}")
        self.chunk = chunk
        self.buffer_k: torch.Tensor | None = None  # (B, Hkv, capacity, D)
        self.buffer_v: torch.Tensor | None = None  # (B, Hkv, capacity, Dv)
        self.start = 0
        self.end = 0

    def __repr__(self) -> str:
        cap = 0 if self.buffer_k is None else self.capacity
        return f"{type(self).__name__}(tokens={self.end - self.start}, capacity={cap})"

    @property
    def capacity(self) -> int:
        """Tokens the storage holds before it must move or grow."""
        return 0 if self.buffer_k is None else self.buffer_k.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty storage shaped like the first keys and values (B, Hkv, 0, D)."""
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self.buffer_k = key_states.new_empty((b, h, 0, d))
        self.buffer_v = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.start = self.end = 0
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        """Point ``keys`` / ``values`` at the tokens held (views, no copy)."""
        self.keys = self.buffer_k[:, :, self.start : self.end]
        self.values = self.buffer_v[:, :, self.start : self.end]

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New keys (B, Hkv, n, D) and values (B, Hkv, n, Dv) that fit the storage."""
        bk, bv = self.buffer_k, self.buffer_v
        if (
            key_states.dim() != 4
            or key_states.shape[:2] != bk.shape[:2]
            or key_states.shape[3] != bk.shape[3]
            or value_states.shape[:3] != key_states.shape[:3]
            or value_states.shape[3] != bv.shape[3]
        ):
            raise ValueError(
                f"{type(self).__name__}.update expects keys (B, Hkv, n, D) = "
                f"({bk.shape[0]}, {bk.shape[1]}, n, {bk.shape[3]}) and values (B, Hkv, n, Dv) with "
                f"Dv = {bv.shape[3]}; got {tuple(key_states.shape)} and "
                f"{tuple(value_states.shape)}"
            )
        if key_states.device != bk.device or value_states.device != bk.device:
            raise ValueError(
                f"{type(self).__name__} lives on {bk.device}; got keys on {key_states.device}, "
                f"values on {value_states.device}"
            )
        if key_states.dtype != bk.dtype or value_states.dtype != bv.dtype:
            raise TypeError(
                f"{type(self).__name__} holds {bk.dtype} keys and {bv.dtype} values; got "
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
        k = self.buffer_k[:, :, self.start : self.end]  # (B, Hkv, held, D), old storage
        v = self.buffer_v[:, :, self.start : self.end]
        if index is not None:
            k, v = k.index_select(0, index), v.index_select(0, index)
        b, h, held, d = k.shape
        new_k = k.new_empty((b, h, capacity, d))
        new_v = v.new_empty((b, h, capacity, v.shape[-1]))
        new_k[:, :, :held] = k
        new_v[:, :, :held] = v
        self.buffer_k, self.buffer_v = new_k, new_v
        self.start, self.end = 0, held
        self._refresh()

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Copy ``n`` new tokens into ``[end, end + n)`` (room was made)."""
        n = key_states.shape[2]
        self.buffer_k[:, :, self.end : self.end + n] = key_states
        self.buffer_v[:, :, self.end : self.end + n] = value_states
        self.end += n

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget everything and drop the storage (as ``DynamicLayer.reset``)."""
        self.buffer_k = self.buffer_v = None
        self.keys = self.values = None
        self.start = self.end = 0
        self.is_initialized = False
        if hasattr(self, "cumulative_length"):
            self.cumulative_length = 0

    def offload(self) -> None:
        if self.is_initialized:
            self.buffer_k = self.buffer_k.to("cpu", non_blocking=True)
            self.buffer_v = self.buffer_v.to("cpu", non_blocking=True)
            self._refresh()

    def prefetch(self) -> None:
        if self.is_initialized and self.buffer_k.device != self.device:
            self.buffer_k = self.buffer_k.to(self.device, non_blocking=True)
            self.buffer_v = self.buffer_v.to(self.device, non_blocking=True)
            self._refresh()

    def _select_rows(self, index: torch.Tensor) -> None:
        """Batch row ``b`` becomes old row ``index[b]`` (``index`` may change the batch size)."""
        if not self.is_initialized:
            return
        index = index.to(self.buffer_k.device)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.long().flatten()
        if index.numel() == self.buffer_k.shape[0]:
            # same batch: write back in place (index_select copies first, so a permutation is safe)
            k = self.keys.index_select(0, index)
            v = self.values.index_select(0, index)
            self.keys.copy_(k)
            self.values.copy_(v)
        else:
            self._move(self.capacity, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Follow the surviving beams: row ``b`` becomes old row ``beam_idx[b]``."""
        if self.get_seq_length() > 0:
            self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (beam search and sampling set-up)."""
        if self.get_seq_length() > 0:
            rows = torch.arange(self.buffer_k.shape[0], device=self.buffer_k.device)
            self._select_rows(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (ints or a bool mask)."""
        if self.get_seq_length() > 0:
            if not isinstance(indices, torch.Tensor):
                indices = torch.as_tensor(indices)
            self._select_rows(indices)


class GrowingLayer(_InPlaceLayer):
    """A full-attention layer's cache: every token kept, written in place into storage that grows
    by at least ``chunk`` tokens and by a quarter of its size (amortised O(1) copying per token).

    ``update`` returns views (B, Hkv, len, D) and (B, Hkv, len, Dv) of the storage; a step that
    fits the capacity allocates nothing. Lengths, masks and ``crop`` behave as ``DynamicLayer``.
    """

    is_sliding = False

    def _new_capacity(self, needed: int) -> int:
        return _round_up(max(needed, self.capacity + self.capacity // 4), self.chunk)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append keys (B, Hkv, n, D) and values (B, Hkv, n, Dv); return views over all tokens."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check(key_states, value_states)
        self._make_room(key_states.shape[2])
        self._write(key_states, value_states)
        self._refresh()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the next call's mask: all tokens held plus the query."""
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.end - self.start if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative int, as ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative number of tokens to remove, got {tokens_to_remove} "
                "(as transformers' DynamicLayer)"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.end = max(self.start, self.end + tokens_to_remove)
        self._refresh()


class WindowLayer(_InPlaceLayer):
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

    def __init__(self, sliding_window: int, chunk: int = CHUNK, **kwargs: Any) -> None:
        super().__init__(chunk=chunk)
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
        return _round_up(self.sliding_window - 1 + self.chunk - 1, self.chunk)

    def _new_capacity(self, needed: int) -> int:
        return max(self.usual_capacity, _round_up(needed, self.chunk))

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
        self._make_room(n)
        self._write(key_states, value_states)
        first = self.start
        if self.record_past:
            first = max(self.start, self.end - (self.sliding_window - 1 + n))
        # views of the storage as it is now: moving the kept tokens below leaves them valid
        keys = self.buffer_k[:, :, first : self.end]
        values = self.buffer_v[:, :, first : self.end]
        if not self.record_past:
            self.start = max(self.start, self.end - (self.sliding_window - 1))
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
            self.end = max(self.start, self.end + tokens_to_remove)
            self.start = max(self.start, self.end - (w - 1))
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
        self.end = max(self.start, self.end + tokens_to_remove)
        self._refresh()
        self.cumulative_length = self.end - self.start


class InPlaceCache(Cache):
    """One in-place layer per model layer: :class:`GrowingLayer` for full attention,
    :class:`WindowLayer` for sliding and chunked attention, transformers' ``DummyLayer`` for
    layers that keep no cache (KV sharing, attention-free layers), chosen from the config exactly
    as ``DynamicCache(config=config)`` chooses its layers.

    Args:
        config: the model's config (its decoder's text config is read).
        chunk: tokens the storage grows by at least (a sliding layer's free slots).

    Raises:
        ValueError: the model has layers of a kind these layers cannot hold (linear attention,
            compressed or indexed attention), naming them.
    """

    def __init__(self, config: Any, *, chunk: int = CHUNK) -> None:
        decoder = config.get_text_config(decoder=True)
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(decoder)
        layers: list[Any] = []
        unsupported = []
        for i, (kind, kwargs) in enumerate(zip(layer_types, per_layer_kwargs)):
            if kind == "full_attention":
                layers.append(GrowingLayer(chunk=chunk))
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(WindowLayer(int(kwargs["sliding_window"]), chunk=chunk))
            elif kind == "dummy":
                layers.append(DummyLayer())
            else:
                unsupported.append(f"{i}: {kind!r}")
        if unsupported:
            raise ValueError(
                "selfattn.make_cache holds full, sliding-window and chunked attention layers; "
                f"this model also has layers {', '.join(unsupported)} (use transformers' own "
                "cache for it)"
            )
        super().__init__(layers=layers)


def make_cache(
    model: Any,
    *,
    bits: int | None = None,
    rotate: bool = False,
    budget: int | None = None,
    policy: str = "h2o",
    sink_tokens: int = 4,
) -> InPlaceCache:
    """A transformers ``Cache`` for ``model`` whose layers write keys and values in place.

    Pass it to ``model.generate(..., cache=cache)`` or ``model(..., cache=cache, use_cache=True)``
    (``past_key_values=cache`` in older transformers; 5.25 still takes it, with a deprecation
    warning). With the defaults it behaves exactly like transformers' ``DynamicCache`` (same
    lengths, masks, ``crop``, beam-search reordering, so the same tokens) with any attention
    implementation (``"selfattn"``, ``"sdpa"``, ``"eager"``, ...), but a decode step copies
    nothing: each layer writes its new token into preallocated storage that grows by chunks, and
    attention reads a view of it. Reuse the cache across ``generate`` calls for a multi-turn chat.

    Not implemented yet (issue 18, later work): quantized storage (``bits=8`` or ``4``, with
    ``rotate``) and eviction to a token ``budget`` by ``policy`` (``"window"``, ``"sink"`` with
    ``sink_tokens``, ``"h2o"``, ``"tova"``, ``"snapkv"``). Those arguments are checked, and asking
    for them raises ``NotImplementedError`` rather than silently giving the plain cache.

    Args:
        model: a decoder-only transformers model (or its config).
        bits: None (float storage); 8 or 4 raise NotImplementedError for now.
        rotate: a Walsh-Hadamard rotation for quantized storage; only with ``bits``.
        budget: None (keep every token); a positive int raises NotImplementedError for now.
        policy: the eviction policy for ``budget``, one of :data:`POLICIES`.
        sink_tokens: the first tokens the ``"sink"`` policy always keeps (>= 0).

    Returns:
        An :class:`InPlaceCache` with one layer per model layer.

    Raises:
        TypeError / ValueError: arguments of the wrong type or value, a model without a config,
            an encoder-decoder model, or layers of a kind it cannot hold (linear attention ...).
        NotImplementedError: ``bits`` not None or ``budget`` not None.
    """
    config = getattr(model, "config", model)
    if not hasattr(config, "get_text_config"):
        raise TypeError(
            f"make_cache needs a transformers model (or its config), got {type(model).__name__}"
        )
    if bits is not None and (isinstance(bits, bool) or bits not in (8, 4)):
        raise ValueError(f"bits must be None, 8 or 4, got {bits!r}")
    if not isinstance(rotate, bool):
        raise TypeError(f"rotate must be a bool, got {type(rotate).__name__}")
    if rotate and bits is None:
        raise ValueError("rotate=True rotates quantized keys and values; it needs bits=8 or 4")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
    ):
        raise ValueError(f"budget must be None or a positive int (tokens), got {budget!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            "make_cache serves decoder-only models; this model is an encoder-decoder "
            f"({type(config).__name__}): let generate() build its EncoderDecoderCache"
        )
    if bits is not None:
        raise NotImplementedError(
            f"selfattn.make_cache: bits={bits} (quantized keys and values) is not implemented "
            "yet (issue 18); use bits=None for the float in-place cache"
        )
    if budget is not None:
        raise NotImplementedError(
            f"selfattn.make_cache: budget={budget} (eviction by policy={policy!r}) is not "
            "implemented yet (issue 18); use budget=None to keep every token"
        )
    return InPlaceCache(config)
