"""The key/value cache for incremental decoding: preallocated buffers filled left to right.

During generation each step adds one token; keeping every earlier key and value means a step
costs O(N) instead of recomputing the whole prefix. Because :func:`selfattn.attention` aligns
causal masks bottom-right, attending ``Nq`` new queries over the ``Nk`` cached keys is exact.
With ``bits`` the cache stores codes and scales (``selfattn.quant``) instead of floats, and
with ``residual`` it keeps its newest tokens in float until newer ones push them out
(``selfattn.kv_residual``).
"""

from __future__ import annotations

import torch

from . import checks
from .kv_residual import ResidualKV
from .quant import QuantizedKV, kv_bits, quantize_kv

__all__ = ["FLUSH", "KVCache"]

#: tokens a residual window gathers beyond ``residual`` before its oldest are quantized at once
FLUSH = 32


class KVCache:
    """Preallocated keys (B, Hkv, max_len, D) and values (B, Hkv, max_len, Dv) of one layer.

    ``append`` writes the new keys and values after what is filled and returns views over
    everything filled so far; nothing is copied on read. One cache serves one attention layer.

    With ``bits=8`` or ``4``, ``append`` quantizes each new token (:func:`selfattn.quantize_kv`
    with its default groups, ``rotate`` as given) into preallocated codes and scales, and the
    views it returns are :class:`selfattn.QuantizedKV` (which :func:`selfattn.attention`
    accepts); older tokens are never re-quantized. ``bits=(key_bits, value_bits)`` stores the two
    apart, each 8, 4 or None (float): ``(8, 4)`` keeps int8 keys, where 4 bits cost most of the
    accuracy, with 4-bit values.

    With ``residual=R`` (and ``bits``) the newest tokens stay in float, as KIVI and transformers'
    ``QuantizedCache(residual_length=)`` keep them: ``append`` writes new tokens into a float
    window, and once the window holds more than ``R + FLUSH`` tokens (``FLUSH`` = 32) the next
    ``append`` quantizes all but its newest ``R`` in one chunk into the quantized storage, in
    place, and slides those ``R`` to the window's front (a copy of ``R`` tokens per ``FLUSH``
    steps, never of the cache). Every token is quantized exactly once, when it leaves the window,
    so appending never re-quantizes older tokens. The window holds at most ``R + FLUSH`` tokens
    plus the newest ``append``'s (a chunk's own keys are always float: a prefill chunk attends
    its own tokens unquantized). ``keys`` / ``values`` (and ``append``'s result) are then
    :class:`selfattn.kv_residual.ResidualKV` views ``[quantized | window]`` that
    :func:`selfattn.attention` reads exactly (one call per part, merged through their lse).
    ``residual=0`` (the default, as the quantized ``KVCache`` always was: every appended token
    quantized at once) gives exactly that behaviour; ``make_cache`` defaults to 128 instead.

    Args:
        batch_size: B.
        max_len: the most tokens the cache can hold.
        num_kv_heads: Hkv (key/value heads; fewer than query heads under GQA/MQA).
        head_dim: D of the keys.
        dtype: storage dtype (the dtype of the keys and values appended).
        device: storage device.
        value_dim: Dv of the values, ``head_dim`` by default.
        bits: None (store floats), 8 or 4 (store quantized codes and float32 scales), or a pair
            ``(key_bits, value_bits)`` of 8, 4 or None.
        rotate: with ``bits``, Walsh-Hadamard-rotate the head dimension before quantizing (the
            quantized sides only).
        residual: with ``bits``, the newest tokens kept in float (an int >= 0; 0: none).

    Example::

        cache = KVCache(2, 64, 4, 32, dtype=torch.float32, device="cpu")
        k_all, v_all = cache.append(k, v)  # k, v: (2, 4, n, 32); k_all: (2, 4, len(cache), 32)
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        value_dim: int | None = None,
        bits: int | tuple[int | None, int | None] | None = None,
        rotate: bool = False,
        residual: int = 0,
    ) -> None:
        dims = {
            "batch_size": batch_size,
            "max_len": max_len,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "value_dim": head_dim if value_dim is None else value_dim,
        }
        for name, x in dims.items():
            checks.integer(name, x)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if bits is not None and not isinstance(bits, (tuple, list)):
            checks.integer("bits", bits)  # a str, float or bool: TypeError, as quantize_kv
        sides = kv_bits(bits)  # (key_bits, value_bits), each 8, 4 or None
        if sides == (None, None):
            bits = None
        if bits is None and rotate is not False:
            raise ValueError(f"rotate={rotate!r} needs bits=8 or 4 (it rotates before quantizing)")
        residual = checks.integer("residual", residual, minimum=0)
        if bits is None and residual:
            raise ValueError(
                f"residual={residual} keeps the newest tokens in float before quantizing them; "
                "it needs bits=8 or 4"
            )
        # a one-token quantization checks bits, rotate and the head dims before any allocation
        probes = [
            None
            if b is None
            else quantize_kv(torch.zeros(1, 1, 1, d, dtype=dtype), bits=b, rotate=rotate)
            for b, d in zip(sides, (head_dim, dims["value_dim"]))
        ]
        self.batch_size = int(batch_size)
        self.max_len = int(max_len)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.value_dim = int(dims["value_dim"])
        shape = (self.batch_size, self.num_kv_heads, self.max_len)
        item = torch.empty((), dtype=dtype).element_size()
        for name, dim in (("keys", self.head_dim), ("values", self.value_dim)):
            nbytes = self.batch_size * self.num_kv_heads * self.max_len * dim * item
            if nbytes >= 2**63:  # beyond any address space: torch's size arithmetic overflows
                raise ValueError(
                    f"KVCache of batch_size={self.batch_size}, max_len={self.max_len}, "
                    f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                    f"value_dim={self.value_dim} ({dtype}) would need {nbytes} bytes for its "
                    f"{name}; no machine can hold that"
                )
        self.bits = bits
        self.key_bits, self.value_bits = sides
        self.rotate = rotate
        self.k: torch.Tensor | QuantizedKV
        self.v: torch.Tensor | QuantizedKV
        # keys (B, Hkv, L, D) and values (B, Hkv, L, Dv): floats, or codes and scales
        self.k, self.v = (
            torch.zeros(*shape, d, dtype=dtype, device=device)
            if p is None
            else QuantizedKV(
                torch.zeros(*shape, p.codes.shape[3], dtype=p.codes.dtype, device=device),
                torch.zeros(*shape, p.scales.shape[3], dtype=torch.float32, device=device),
                bits=p.bits,
                group_size=p.group_size,
                rotate=rotate,
                dtype=dtype,
            )
            for p, d in zip(probes, (self.head_dim, self.value_dim))
        )
        self._dtype = dtype
        self._len = 0
        self.residual = residual
        # the float window (residual > 0): tokens [_qlen, _len) at slots [0, _len - _qlen)
        self._qlen = 0
        self.k_window: torch.Tensor | None = None  # (B, Hkv, window capacity, D)
        self.v_window: torch.Tensor | None = None  # (B, Hkv, window capacity, Dv)
        if residual:
            cap = min(residual + FLUSH, self.max_len)
            self.k_window, self.v_window = (
                torch.zeros(*shape[:2], cap, d, dtype=dtype, device=device)
                for d in (self.head_dim, self.value_dim)
            )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the keys and values appended (and of dequantized ones)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated storage (keys and values; codes and scales when quantized;
        the float window's buffers with ``residual``)."""
        return sum(
            t.nbytes if isinstance(t, QuantizedKV) else t.numel() * t.element_size()
            for t in (self.k, self.v, self.k_window, self.v_window)
            if t is not None
        )

    def __len__(self) -> int:
        """Number of tokens filled."""
        return self._len

    def __repr__(self) -> str:
        return (
            f"KVCache(len={self._len}/{self.max_len}, B={self.batch_size}, "
            f"Hkv={self.num_kv_heads}, D={self.head_dim}, Dv={self.value_dim}, "
            f"{self.dtype}, {self.device}"
            + ("" if self.bits is None else f", bits={self.bits}, rotate={self.rotate}")
            + (f", residual={self.residual}" if self.residual else "")
            + ")"
        )

    @property
    def keys(self) -> torch.Tensor | QuantizedKV | ResidualKV:
        """The filled keys, a view (B, Hkv, len, D) (a QuantizedKV view with ``bits``; a
        ResidualKV ``[quantized | float window]`` with ``residual``)."""
        return self._view(self.k, self.k_window)

    @property
    def values(self) -> torch.Tensor | QuantizedKV | ResidualKV:
        """The filled values, a view (B, Hkv, len, Dv) (as :attr:`keys`)."""
        return self._view(self.v, self.v_window)

    @property
    def window_len(self) -> int:
        """Tokens the float window holds now (0 without ``residual``)."""
        return self._len - self._qlen if self.residual else 0

    def _view(
        self, store: torch.Tensor | QuantizedKV, window: torch.Tensor | None
    ) -> torch.Tensor | QuantizedKV | ResidualKV:
        n = self._len if window is None else self._qlen
        head = store.narrow(0, n) if isinstance(store, QuantizedKV) else store[:, :, :n]
        if window is None:
            return head
        return ResidualKV(head, window[:, :, : self._len - self._qlen])

    def append(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor | QuantizedKV, torch.Tensor | QuantizedKV]:
        """Write ``n`` new tokens after the filled ones and return views over all of them.

        Args:
            k: (B, Hkv, n, D) new keys. v: (B, Hkv, n, Dv) new values. Same dtype and device as
                the cache.

        Returns:
            ``(k_all, v_all)``: views (B, Hkv, len + n, D) and (B, Hkv, len + n, Dv). They alias
            the cache: a later ``append`` or ``reorder`` changes what they show beyond ``len``.
            With ``bits``, each quantized side is a :class:`selfattn.QuantizedKV` view of the
            stored codes.

        Raises:
            TypeError: non-tensor input or a dtype other than the cache's.
            ValueError: shapes or device that do not fit, or an append past ``max_len`` (the
                message names the current, new and maximum lengths). Nothing is written then.
        """
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        b, h = self.batch_size, self.num_kv_heads
        if (
            k.dim() != 4
            or v.dim() != 4
            or tuple(k.shape[:2]) != (b, h)
            or tuple(v.shape[:2]) != (b, h)
            or k.shape[3] != self.head_dim
            or v.shape[3] != self.value_dim
            or k.shape[2] != v.shape[2]
        ):
            raise ValueError(
                f"KVCache.append expects k (B, Hkv, n, D) = ({b}, {h}, n, {self.head_dim}) and "
                f"v (B, Hkv, n, Dv) = ({b}, {h}, n, {self.value_dim}) with one n; "
                f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"KVCache holds {self.dtype}; got k {k.dtype}, v {v.dtype}")
        if k.device != self.device or v.device != self.device:
            raise ValueError(
                f"KVCache lives on {self.device}; got k on {k.device}, v on {v.device}"
            )
        n = k.shape[2]
        end = self._len + n
        if end > self.max_len:
            raise ValueError(
                f"KVCache overflow: holds {self._len} tokens, appending {n} would make {end} "
                f"> max_len={self.max_len}; nothing was written"
            )
        if self.residual:
            self._append_window(k, v)
            return self.keys, self.values
        for store, new in ((self.k, k), (self.v, v)):
            self._store(store, new, self._len)
        self._len = end
        return self.keys, self.values

    def _store(self, store: torch.Tensor | QuantizedKV, new: torch.Tensor, at: int) -> None:
        """Write ``new`` (B, Hkv, n, D) into tokens ``[at, at + n)`` of the main storage,
        quantizing it for a quantized side."""
        n = new.shape[2]
        if isinstance(store, QuantizedKV):
            qx = quantize_kv(new, bits=store.bits, group_size=store.group_size, rotate=self.rotate)
            store.codes[:, :, at : at + n] = qx.codes
            store.scales[:, :, at : at + n] = qx.scales
        else:
            store[:, :, at : at + n] = new

    def _append_window(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """``append`` with a float window: flush its oldest tokens when the new ones would take
        it past ``residual + FLUSH`` (keeping the newest ``residual``), then write the new ones
        after what it holds (its buffers grow for a chunk longer than they are, and shrink back
        to ``residual + FLUSH`` tokens afterwards)."""
        n, held, keep = k.shape[2], self._len - self._qlen, self.residual
        if held + n > keep + FLUSH and held > keep:
            out = held - keep  # the oldest tokens leave the window, quantized once, in place
            for store, win in ((self.k, self.k_window), (self.v, self.v_window)):
                self._store(store, win[:, :, :out], self._qlen)
                win[:, :, :keep] = win[:, :, out:held].clone()  # slide the newest to the front
            self._qlen += out
            held = keep
        usual = min(keep + FLUSH, self.max_len)
        cap = max(usual, held + n)  # a long chunk: room for it and what is held
        if cap != self.k_window.shape[2]:
            # grown for a long chunk, or given back once a flush left a small window
            for name in ("k_window", "v_window"):
                old = getattr(self, name)
                new = old.new_zeros((*old.shape[:2], cap, old.shape[3]))
                new[:, :, :held] = old[:, :, :held]
                setattr(self, name, new)
        self.k_window[:, :, held : held + n] = k
        self.v_window[:, :, held : held + n] = v
        self._len += n

    def reset(self) -> None:
        """Forget every token (the buffers are kept and overwritten by later appends)."""
        self._len = self._qlen = 0

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` tokens (e.g. to undo rejected speculative tokens)."""
        checks.integer("length", length, minimum=None)
        if not 0 <= length <= self._len:
            raise ValueError(f"crop length must be in [0, {self._len}], got {length}")
        self._len = int(length)
        self._qlen = min(self._qlen, self._len)  # the window keeps what it held below length

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder (or repeat) the batch rows in place: row ``b`` becomes old row ``index[b]``.

        Beam search uses this after each step to follow the surviving beams.

        Args:
            index: int (B,) tensor of old batch rows, each in ``[0, B)``; repeats are allowed.
        """
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be an int torch.Tensor, got {type(index).__name__}")
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"index must hold integers, got {index.dtype}")
        if tuple(index.shape) != (self.batch_size,):
            raise ValueError(
                f"index must have shape (B,) = ({self.batch_size},), got {tuple(index.shape)}"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.batch_size):
            raise ValueError(
                f"index values must be in [0, {self.batch_size}), got {index.tolist()}"
            )
        idx = index.to(device=self.device, dtype=torch.long)
        n = self._len
        # index_select makes a copy first, so overlapping moves (a permutation) are safe
        stores = []
        for x in (self.k, self.v):
            stores += [x.codes, x.scales] if isinstance(x, QuantizedKV) else [x]
        if self.residual:
            n = self._qlen
            w = self._len - self._qlen
            for t in (self.k_window, self.v_window):
                t[:, :, :w] = t[:, :, :w].index_select(0, idx)
        for t in stores:
            t[:, :, :n] = t[:, :, :n].index_select(0, idx)
