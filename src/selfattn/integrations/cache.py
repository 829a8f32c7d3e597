"""``make_cache``: a transformers ``Cache`` whose keys and values are written in place, optionally
quantized, optionally held to a token budget.

transformers' ``DynamicCache`` appends each layer's new token with ``torch.cat``, so every decode
step copies every layer's whole cache into fresh memory; after a few thousand tokens that copy is
most of the step. :class:`InPlaceCache` builds one in-place layer per model layer from the
model's config, as ``DynamicCache(config=...)`` chooses ``DynamicLayer`` /
``DynamicSlidingWindowLayer``:

- :class:`~selfattn.integrations.kv_layers.GrowingLayer` for full attention (every token kept),
  or :class:`~selfattn.integrations.evict.BudgetLayer` when a ``budget`` is given;
- :class:`~selfattn.integrations.kv_layers.WindowLayer` for sliding-window and chunked attention
  (they keep their window; a budget never applies to them);
- transformers' ``DummyLayer`` for layers that keep no cache.

With ``bits`` every layer stores int8 or 4-bit codes (:mod:`selfattn.integrations.kv_store`) and
hands attention a :class:`selfattn.QuantizedKV`; a pair ``(key_bits, value_bits)`` sets the two
sides apart (e.g. ``(8, 4)``: int8 keys, 4-bit values), and ``residual`` (128 by default, as
transformers' ``QuantizedCache(residual_length=128)``) keeps each layer's newest tokens in float
until newer ones push them out (see :mod:`selfattn.integrations.kv_layers`). This module imports transformers;
:func:`selfattn.integrations.transformers.make_cache` imports it on first use.
"""

from __future__ import annotations

from typing import Any

from ..quant import kv_bits
from .evict import HEADS, POLICIES, SCORED, BudgetLayer, check_options
from .kv_layers import CHUNK, GrowingLayer, InPlaceLayer, WindowLayer

#: make_cache's float window with ``bits`` (transformers' QuantizedCache: residual_length=128)
RESIDUAL = 128

try:
    from transformers.cache_utils import Cache, DummyLayer, get_layer_types_and_kwargs
except ImportError as exc:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "selfattn's transformers cache needs transformers with the cache-layer interface "
        "(CacheLayerMixin, get_layer_types_and_kwargs: transformers >= 5); "
        "pip install -U 'transformers>=5'"
    ) from exc

__all__ = [
    "CHUNK",
    "POLICIES",
    "RESIDUAL",
    "BudgetLayer",
    "GrowingLayer",
    "InPlaceCache",
    "InPlaceLayer",
    "WindowLayer",
    "make_cache",
]


class InPlaceCache(Cache):
    """One in-place layer per model layer: :class:`GrowingLayer` (or :class:`BudgetLayer` with a
    ``budget``) for full attention, :class:`WindowLayer` for sliding and chunked attention,
    transformers' ``DummyLayer`` for layers that keep no cache (KV sharing, attention-free
    layers), chosen from the config exactly as ``DynamicCache(config=config)`` chooses its layers.

    Args:
        config: the model's config (its decoder's text config is read).
        chunk: tokens the storage grows by at least (a sliding layer's free slots).
        bits, rotate: quantized storage (8 or 4 bits, or a pair ``(key_bits, value_bits)`` of
            8, 4 or None; optional Walsh-Hadamard rotation of the quantized sides).
        budget, policy, sink_tokens, heads, normalize, decay, recent, window_size,
            kernel_size: eviction of the full-attention layers
            (see :mod:`selfattn.integrations.evict`).
        residual: with ``bits``, the newest tokens each layer keeps in float (0: none). An
            evicting layer (``budget``) quantizes every token at once all the same: it evicts
            per key head, which one float window shared by every head cannot follow.

    Raises:
        ValueError: the model has layers of a kind these layers cannot hold (linear attention,
            compressed or indexed attention), naming them.
    """

    def __init__(
        self,
        config: Any,
        *,
        chunk: int = CHUNK,
        bits: int | tuple[int | None, int | None] | None = None,
        rotate: bool = False,
        budget: int | None = None,
        policy: str = "h2o",
        sink_tokens: int = 4,
        heads: str | None = None,
        normalize: bool = False,
        residual: int = 0,
        decay: float | None = None,
        recent: int | None = None,
        window_size: int | None = None,
        kernel_size: int | None = None,
    ) -> None:
        decoder = config.get_text_config(decoder=True)
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(decoder)
        store = {"chunk": chunk, "bits": bits, "rotate": rotate}
        windowed = {**store, "residual": residual}
        layers: list[Any] = []
        unsupported = []
        for i, (kind, kwargs) in enumerate(zip(layer_types, per_layer_kwargs)):
            if kind == "full_attention" and budget is not None:
                layers.append(
                    BudgetLayer(
                        budget,
                        policy,
                        sink_tokens=sink_tokens,
                        heads=heads,
                        normalize=normalize,
                        decay=decay,
                        recent=recent,
                        window_size=window_size,
                        kernel_size=kernel_size,
                        **store,
                    )
                )
            elif kind == "full_attention":
                layers.append(GrowingLayer(**windowed))
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(WindowLayer(int(kwargs["sliding_window"]), **windowed))
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
        self.bits, self.rotate, self.budget, self.policy = bits, rotate, budget, policy
        self.key_bits, self.value_bits = kv_bits(bits)
        self.residual = residual

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's storage (keys, values, their scales, the float windows' buffers,
        and an evicting layer's positions and scores), as allocated: the capacity, not only the
        tokens held."""
        return sum(getattr(x, "nbytes", 0) for x in self.layers)

    @property
    def tokens_held(self) -> list[int]:
        """Tokens each layer holds now (a sliding layer its window, an evicting layer at most
        its budget between calls); 0 for layers that keep none."""
        return [x.held if isinstance(x, InPlaceLayer) else 0 for x in self.layers]


def make_cache(
    model: Any,
    *,
    bits: int | tuple[int | None, int | None] | None = None,
    rotate: bool = False,
    budget: int | None = None,
    policy: str = "h2o",
    sink_tokens: int = 4,
    residual: int | None = None,
    heads: str | None = None,
    normalize: bool = False,
    decay: float | None = None,
    recent: int | None = None,
    window_size: int | None = None,
    kernel_size: int | None = None,
) -> InPlaceCache:
    """A transformers ``Cache`` for ``model`` whose layers write keys and values in place.

    Pass it to ``model.generate(..., cache=cache)`` or ``model(..., cache=cache, use_cache=True)``
    (``past_key_values=cache`` in older transformers; 5.25 still takes it, with a deprecation
    warning). Reuse the cache across ``generate`` calls for a multi-turn chat.

    - Defaults: it behaves exactly like transformers' ``DynamicCache`` (same lengths, masks,
      ``crop``, beam-search reordering, so the same tokens) with any attention implementation
      (``"selfattn"``, ``"sdpa"``, ``"eager"``, ...), but a decode step copies nothing: each
      layer writes its new token into preallocated storage that grows by chunks, and attention
      reads a view of it.
    - ``bits=8`` or ``4`` (``rotate``: Walsh-Hadamard rotation first): keys and values are stored
      quantized per token (:func:`selfattn.quantize_kv`), written in place, and attention gets a
      :class:`selfattn.QuantizedKV` view that selfattn reads directly; needs
      ``attn_implementation="selfattn"``. ``bits=(key_bits, value_bits)`` quantizes the two
      apart, each 8, 4 or None (kept float): ``(8, 4)`` keeps int8 keys, where 4 bits cost most
      of the accuracy, with 4-bit values (as llama.cpp's ``-ctk q8_0 -ctv q4_0``).
    - ``residual`` (with ``bits``; default 128, as transformers' ``QuantizedCache``
      ``residual_length``): each layer keeps its newest tokens in float and quantizes them, in
      chunks of ``FLUSH`` (32) tokens, once ``residual + FLUSH`` are waiting (each token is
      quantized once; a call's own tokens are always float). Attention reads
      ``[quantized | float window]`` exactly (two calls merged through their lse). SmolLM2's
      4096-token perplexity with 4-bit + rotation: +4.0% over the float cache without it,
      about +0.4% with 128 (benchmarks/results/kv_perplexity.json). ``residual=0`` quantizes
      every token at once. Not in evicting layers (``budget``: they quantize at once).
    - ``budget`` (tokens): every full-attention layer holds at most ``budget`` tokens between
      calls (plus the current call's new tokens while attending), evicting by ``policy``:
      ``"window"`` (the most recent), ``"sink"`` (the first ``sink_tokens`` and the most recent),
      ``"h2o"``, ``"tova"``, ``"snapkv"`` (scored by selfattn's kernels; these three need
      ``attn_implementation="selfattn"``, always keep the first ``sink_tokens`` too, and rank
      per key head or per layer: ``heads``); see :mod:`selfattn.integrations.evict`. Sliding-window
      layers keep their window. Kept keys keep their original positions, ``get_seq_length()``
      counts every token seen, and multi-turn use past the budget works. Not with a padded batch
      (refused), nor with assisted or prompt-lookup decoding (``crop`` is refused).

    Args:
        model: a decoder-only transformers model (or its config).
        bits: None (float storage), 8, 4, or a pair ``(key_bits, value_bits)`` of 8, 4 or None.
        rotate: a Walsh-Hadamard rotation of the quantized sides; only with ``bits``.
        budget: None (keep every token) or a positive int.
        policy: the eviction policy for ``budget``, one of :data:`POLICIES`.
        sink_tokens: the first tokens the ``"sink"`` policy and the scored ones always keep
            (>= 0).
        residual: tokens kept in float before quantizing (an int >= 0, only with ``bits``);
            None: 128 with ``bits``, 0 without.
        heads: who ranks a scored policy's tokens: ``"kv"`` (each key head its own) or
            ``"layer"`` (one ranking for all the layer's heads); None: the policy's own
            (``"layer"`` for ``tova``, ``"kv"`` for ``h2o`` and ``snapkv``).
        normalize: ``h2o`` ranks by the total attention mass (False, the default: the H2O
            paper's sum) or by the mass per query that has seen the token (True).
        decay: a scored policy's forgetting factor in [0, 1]: each call's scores are added to
            ``decay`` times the earlier ones (A2SF, arXiv:2407.20485); None: the policy's own
            (1 for ``h2o``, the plain sum; 0 for ``tova`` and ``snapkv``, replaced).
        recent: the newest tokens a scored policy always keeps (0 to ``budget``); None: the
            policy's own (``budget // 2`` for ``h2o``).
        window_size, kernel_size: ``snapkv``'s observation window (queries, default 32) and
            max-pooling width (odd, default 7), as SnapKV (arXiv:2404.14469) names them.

    Returns:
        An :class:`InPlaceCache` with one layer per model layer; ``.nbytes`` is its size.

    Raises:
        TypeError / ValueError: arguments of the wrong type or value, a model without a config,
            an encoder-decoder model, layers of a kind it cannot hold (linear attention ...), or
            ``bits`` / a scored policy with a model whose attention is not selfattn's (named).
    """
    config = getattr(model, "config", model)
    if not hasattr(config, "get_text_config"):
        raise TypeError(
            f"make_cache needs a transformers model (or its config), got {type(model).__name__}"
        )
    key_bits, value_bits = kv_bits(bits)
    if key_bits is None and value_bits is None:
        bits = None  # (None, None): float storage, as bits=None
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
    if heads is not None and heads not in HEADS:
        raise ValueError(f"heads must be None or one of {', '.join(HEADS)}; got {heads!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if budget is not None:
        check_options(budget, policy, decay, recent, window_size, kernel_size)
    elif any(x is not None for x in (decay, recent, window_size, kernel_size)):
        raise ValueError(
            "decay, recent, window_size and kernel_size are eviction options: they need budget"
        )
    if residual is None:
        residual = 0 if bits is None else RESIDUAL
    if isinstance(residual, bool) or not isinstance(residual, int):
        raise TypeError(f"residual must be an int (tokens) or None, got {residual!r}")
    if residual < 0:
        raise ValueError(f"residual must be >= 0 (tokens), got {residual}")
    if residual and bits is None:
        raise ValueError(
            f"residual={residual} keeps the newest tokens in float before quantizing them; "
            "it needs bits=8 or 4"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            "make_cache serves decoder-only models; this model is an encoder-decoder "
            f"({type(config).__name__}): let generate() build its EncoderDecoderCache"
        )
    needs = []
    if bits is not None:
        needs.append(f"bits={bits!r} (attention reads the quantized keys and values)")
    if budget is not None and policy in SCORED:
        needs.append(f"policy={policy!r} (scores from selfattn's kernels)")
    impl = _implementation(config)
    if needs and impl is not None and not _is_selfattn(impl):
        raise ValueError(
            f'make_cache({", ".join(needs)}) needs attn_implementation="selfattn"; this model '
            f"uses {impl!r} (register() then from_pretrained(..., attn_implementation="
            '"selfattn") or model.set_attn_implementation("selfattn"))'
        )
    return InPlaceCache(
        config,
        bits=bits,
        rotate=rotate,
        budget=budget,
        policy=policy,
        sink_tokens=sink_tokens,
        heads=heads,
        normalize=normalize,
        residual=residual,
        decay=decay,
        recent=recent,
        window_size=window_size,
        kernel_size=kernel_size,
    )


def _implementation(config: Any) -> str | None:
    """The attention implementation the config names (its decoder's), or None."""
    for cfg in (config.get_text_config(decoder=True), config):
        impl = getattr(cfg, "_attn_implementation", None)
        if isinstance(impl, str):
            return impl
    return None


def _is_selfattn(impl: str) -> bool:
    """Whether ``impl`` is an attention function registered by selfattn's ``register()``."""
    from .transformers import registered

    return impl in registered()
