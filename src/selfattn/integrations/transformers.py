"""Hugging Face transformers drop-in: ``attn_implementation="selfattn"`` for any model that supports
the attention interface (Llama, Mistral, Gemma, Qwen, BERT, GPT-OSS, ...).

``register()`` adds one attention function to ``AttentionInterface`` and one mask builder to
``AttentionMaskInterface``. Both are needed: a model whose implementation has no registered mask
builder silently gets *no mask at all* (no padding, no causality), so the mask registration is
what makes the outputs right, not an optimisation.

Example::

    import selfattn.integrations.transformers as sa_hf
    sa_hf.register()
    model = AutoModel.from_pretrained(path, attn_implementation="selfattn")
    out = model(**batch, output_attentions=True)  # exact weights from selfattn.attention_weights

``make_cache(model)`` gives a transformers ``Cache`` that writes keys and values in place (no
per-step copy of the cache), for any attention implementation, optionally quantized (``bits``)
and held to a token budget by an eviction policy; see :mod:`selfattn.integrations.cache`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..api import attention, attention_weights, fast_call
from ..quant import QuantizedKV
from ..stats import attention_with_stats
from . import scoring

__all__ = [
    "NAME",
    "attention_forward",
    "call_rules",
    "make_cache",
    "mask_builder",
    "register",
    "registered",
    "visibility",
]

NAME = "selfattn"
_NAMES: set[str] = set()  # the names register() gave selfattn's attention function


def visibility(
    attention_mask: Any, nq: int, nk: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The ``mask`` and ``bias`` of :func:`selfattn.attention` for one transformers attention mask.

    transformers builds boolean masks (B|1, 1|H, Nq, Nk) for sdpa-style implementations and
    additive float masks (0 = visible, dtype minimum = hidden) for eager ones; both are accepted.
    A mask longer than the call (older models) is cut to its last Nq rows and first Nk keys.
    :func:`attention_forward` uses it, and so does ``selfattn.viz`` to draw the same weights.

    Args:
        attention_mask: the 4-D mask transformers passes to the attention function, or None.
        nq: query rows of the call; nk: keys of the call.

    Returns:
        ``(mask, bias)``: ``mask`` bool (B|1, 1|H, Nq, Nk), True = visible, or None when
        ``attention_mask`` is None; ``bias`` the finite non-zero entries of a float mask as an
        additive float (B|1, 1|H, Nq, Nk) bias, or None when there are none.

    Raises:
        TypeError: a mask that is not a tensor, or neither bool nor floating point.
        ValueError: a mask that is not 4-D.
    """
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"selfattn takes boolean or additive float attention masks, got "
            f"{type(attention_mask).__name__}; was the model loaded with another implementation?"
        )
    if attention_mask.dim() != 4:
        raise ValueError(
            f"expected a 4-D attention mask (B, H|1, Nq, Nk), got {tuple(attention_mask.shape)}"
        )
    if attention_mask.shape[-1] > nk:  # older models hand over a mask longer than the keys
        attention_mask = attention_mask[..., :nk]
    if attention_mask.shape[-2] > nq:
        attention_mask = attention_mask[..., -nq:, :]
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    if not attention_mask.is_floating_point():
        raise TypeError(f"attention mask must be bool or float, got {attention_mask.dtype}")
    # entries at (or near) the dtype's minimum mean "hidden"; anything else is an additive bias
    visible = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    bias = torch.where(visible, attention_mask, 0)
    if not bool(torch.count_nonzero(bias)):
        bias = None
    return visible, bias


def call_rules(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    attention_mask: Any,
    *,
    is_causal: bool | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    scaling: float | None = None,
    position_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """The keys, values and score rules of :func:`selfattn.attention` for one transformers call.

    :func:`attention_forward` runs them, and ``selfattn.viz`` draws the same weights from them.
    A mask (bool or additive) decides visibility when there is one; otherwise ``is_causal``
    (default ``module.is_causal``) and the sliding window do. For a prefill into an empty static
    cache (causal, no mask, 1 < Nq < Nk) transformers relies on sdpa's top-left causality, the
    first Nq keys being the only ones filled: those are the keys returned.

    Args:
        module: the calling attention module.
        query: (B, Hq, Nq, D); key: (B, Hkv, Nk, D); value: (B, Hkv, Nk, Dv) or None.
        attention_mask: what transformers passed (4-D bool or additive float, or None).
        is_causal, softcap, sliding_window, scaling: the call's keywords.
        position_bias: an additive (T5-style) bias, added to the mask's own.

    Returns:
        ``(key, value, rules)``: the keys (and values) the call reads, (B, Hkv, Nk', D) with
        Nk' <= Nk, and the keyword arguments of :func:`selfattn.attention` that shape the
        scores (causal, window, mask, bias, softcap, scale).
    """
    nq, nk = query.shape[2], key.shape[2]
    mask, bias = visibility(attention_mask, nq, nk)
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    causal = False
    window = None
    if mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
        if causal and 1 < nq < nk:
            key = _first(key, nq)
            value = None if value is None else _first(value, nq)
            if bias is not None and bias.shape[-1] > 1:
                bias = bias[..., :nq]
            nk = nq
        if causal and sliding_window is not None and nk > sliding_window:
            window = (int(sliding_window) - 1, 0)
    rules = {
        "causal": causal,
        "window": window,
        "mask": mask,
        "bias": None if bias is None else bias.to(query.dtype),
        "softcap": softcap,
        "scale": scaling,
    }
    return key, value, rules


def _first(x: torch.Tensor | QuantizedKV, n: int) -> torch.Tensor | QuantizedKV:
    """The first ``n`` tokens (axis 2) of keys or values, float or quantized, as a view."""
    return x.narrow(0, n) if isinstance(x, QuantizedKV) else x[:, :, :n]


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function transformers calls for ``attn_implementation="selfattn"``.

    Args:
        module: the calling attention module (read for ``is_causal`` when not passed).
        query: (B, Hq, Nq, D); key: (B, Hkv, Nk, D); value: (B, Hkv, Nk, Dv). GQA is handled by
            :func:`selfattn.attention` itself: keys and values are never repeated. ``key`` and
            ``value`` may be :class:`selfattn.QuantizedKV` (``make_cache(bits=...)``), read as
            they are stored. Keys an evicting cache layer offered scores for
            (:mod:`selfattn.integrations.scoring`) get them after the output is computed.
        attention_mask: what the registered mask builder made: a bool (B, 1, Nq, Nk) mask
            (True = visible), an additive float mask, or None when nothing beyond plain
            causality (``is_causal``) restricts the call.
        dropout: attention dropout probability (transformers passes 0 in eval mode).
        scaling: score scale (``1 / sqrt(D)`` when None).
        is_causal: causality when no mask is given (default ``module.is_causal``).
        softcap: logit soft-capping (Gemma 2): ``s = softcap * tanh(s / softcap)``.
        sliding_window: the model's window; already in the mask when there is one, applied as
            ``window=(sliding_window - 1, 0)`` when there is none.
        s_aux: (Hq,) learned attention-sink logits (GPT-OSS): an extra logit per head in every
            softmax, with no value; passed straight through as ``sinks=`` (gets its gradient).
        backend: the :func:`selfattn.attention` backend.
        kwargs: ``output_attentions`` (return the probabilities), ``position_bias`` (an additive
            bias, T5-style); the rest is ignored.

    Returns:
        ``(out (B, Nq, Hq, Dv), weights)``; weights (B, Hq, Nq, Nk) in the query dtype when
        ``output_attentions`` is set, else None. Rows that see no key give 0 (eager gives the
        mean of the values there; such rows are padding).
    """
    request = scoring.claim(key)  # an evicting cache layer asked for the scores of these keys
    if (
        (request is None or request.rows is False)
        and attention_mask is None
        and softcap is None
        and s_aux is None
        and not kwargs.get("output_attentions", False)
        and kwargs.get("position_bias") is None
    ):
        # a decode step or a first prefill without padding: causality alone decides what is
        # visible, and no key is cut (the rules call_rules would give, without building them)
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
        nq = query.shape[2]
        plain = True  # not causal, or a decode step without a window: no key count needed
        if causal and (nq > 1 or sliding_window is not None):  # (a ResidualKV builds its shape)
            nk = key.shape[2]
            plain = not 1 < nq < nk and (sliding_window is None or nk <= sliding_window)
        if plain:
            # without dropout, attention's own fast path, entered directly (None: it declined)
            out = None if dropout else fast_call(query, key, value, causal, scaling, False, backend)
            if out is None:
                out = attention(
                    query,
                    key,
                    value,
                    causal=causal,
                    scale=scaling,
                    dropout_p=float(dropout),
                    backend=backend,
                )
            if request is not None:
                request.deliver(None)  # attention is done: the layer may evict now
            return out.transpose(1, 2).contiguous(), None
    key, value, rules = call_rules(
        module,
        query,
        key,
        value,
        attention_mask,
        is_causal=is_causal,
        softcap=softcap,
        sliding_window=sliding_window,
        scaling=scaling,
        position_bias=kwargs.get("position_bias"),
    )
    want_weights = bool(kwargs.get("output_attentions", False))
    if s_aux is not None:  # GPT-OSS's sinks are selfattn's: the kernels take them as they are
        rules["sinks"] = s_aux
    rows = False if request is None else request.rows
    stats = None
    if rows is False:
        result = attention(
            query,
            key,
            value,
            **rules,
            dropout_p=float(dropout),
            return_lse=want_weights,
            backend=backend,
        )
        out, lse = result if want_weights else (result, None)
    else:  # the output and the layer's column sums in one call (one pass for a decode step)
        out, lse, stats = attention_with_stats(
            query,
            key,
            value,
            **rules,
            dropout_p=float(dropout),
            col_sum=True,
            rows=rows,
            return_lse=True,
            backend=backend,
        )
    weights = None
    if want_weights:
        weights = attention_weights(
            query.detach(), key.detach(), **_detached(rules), lse=lse.detach()
        )
        weights = weights.to(query.dtype)
    if request is not None:  # last: the layer may evict (move tokens within its storage) now
        request.deliver(
            None if stats is None else scoring.group_sum(stats["col_sum"], key.shape[1])
        )
    return out.transpose(1, 2).contiguous(), weights


def _detached(rules: dict[str, Any]) -> dict[str, Any]:
    """The rules with their tensors detached (the weights carry no gradient)."""
    return {n: x.detach() if isinstance(x, torch.Tensor) else x for n, x in rules.items()}


def mask_builder(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask builder registered for ``"selfattn"``: transformers' own sdpa builder, except that
    sliding-window layers get no mask where the window rule says everything.

    It returns a bool (B, 1, Nq, Nk) mask with True = visible (the convention of
    :func:`selfattn.attention`) or None when ``is_causal`` (and ``sliding_window``, which
    :func:`call_rules` turns into ``window=(sliding_window - 1, 0)``) alone say everything.
    transformers' builder never skips the mask of a sliding layer once the sequence reaches the
    window (sdpa has no window); selfattn has one, so a first prefill or a decode step without
    padding runs the local layers on the window rule instead of an (N, N) dense mask.
    """
    from transformers.masking_utils import AttentionMaskInterface

    if _window_says_everything(kwargs):
        return None
    return AttentionMaskInterface._global_mapping["sdpa"](*args, **kwargs)


def _window_says_everything(kw: dict[str, Any]) -> bool:
    """A sliding-window layer's causal mask that ``causal`` + ``window`` describe exactly."""
    if kw.get("local_size") is None or not kw.get("allow_is_causal_skip", True):
        return False
    if torch.compiler.is_compiling():
        return False  # the padding check below reads tensor values
    q_length, kv_length = kw.get("q_length"), kw.get("kv_length")
    q_offset = kw.get("q_offset", 0)
    if not isinstance(q_offset, int) or not isinstance(q_length, int):
        return False  # static caches pass tensor offsets
    first_prefill = q_offset == 0 and kv_length == q_length
    if not (q_length == 1 or first_prefill):
        return False  # a chunk onto a filled sliding cache: keep transformers' exact mask
    padding = kw.get("attention_mask")
    if padding is not None:
        kv_offset = kw.get("kv_offset", 0)
        padding = padding[:, kv_offset : kv_offset + kv_length]
        if not bool(padding.all()):
            return False
    return True


def register(name: str = NAME, *, backend: str = "auto") -> str:
    """Register selfattn with transformers under ``name``.

    After this, ``from_pretrained(..., attn_implementation=name)`` (or
    ``model.set_attn_implementation(name)``) runs every attention layer through
    :func:`selfattn.attention`. Calling it again is harmless.

    Args:
        name: the implementation name ("selfattn").
        backend: the :func:`selfattn.attention` backend the layers use.

    Returns:
        ``name``.

    Raises:
        ImportError: transformers is missing or too old to have an attention interface.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    try:
        from transformers import AttentionInterface
    except ImportError as exc:  # pragma: no cover - depends on the installed transformers
        raise ImportError(
            "selfattn.integrations.transformers needs transformers with AttentionInterface "
            "(>= 4.48); pip install 'selfattn[hf]'"
        ) from exc

    def selfattn_attention(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(
            module, query, key, value, attention_mask, backend=backend, **kwargs
        )

    selfattn_attention.__doc__ = attention_forward.__doc__
    AttentionInterface.register(name, selfattn_attention)
    _NAMES.add(name)
    try:
        from transformers import AttentionMaskInterface
    except ImportError:
        try:
            from transformers.masking_utils import AttentionMaskInterface
        except ImportError:  # older versions build the (additive) mask inside each model
            AttentionMaskInterface = None
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(name, mask_builder)
    return name


def registered() -> frozenset[str]:
    """The names :func:`register` has registered selfattn's attention under (in this process)."""
    return frozenset(_NAMES)


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
) -> Any:
    """A transformers ``Cache`` for ``model`` that writes keys and values in place.

    ``selfattn.integrations.cache.make_cache`` (imported here on first use, as it needs
    transformers); see its documentation. With the defaults it behaves exactly like
    ``DynamicCache`` without copying the cache at each step; ``bits`` stores keys and values
    quantized (a pair ``(key_bits, value_bits)``, e.g. ``(8, 4)``, sets them apart) with the
    newest ``residual`` tokens (128 by default) kept in float, ``budget`` holds every
    full-attention layer to that many tokens by ``policy`` (ranked per key head or per layer:
    ``heads``; ``h2o``'s mass per query or in total: ``normalize``; a forgetting factor:
    ``decay``; the newest tokens always kept: ``recent``; SnapKV's ``window_size`` and
    ``kernel_size``).

    Example::

        cache = make_cache(model, bits=8, budget=1024, policy="h2o")
        out = model.generate(**batch, past_key_values=cache, max_new_tokens=20)
        cache.nbytes  # the cache's size in bytes
    """
    from . import cache

    return cache.make_cache(
        model,
        bits=bits,
        rotate=rotate,
        budget=budget,
        policy=policy,
        sink_tokens=sink_tokens,
        residual=residual,
        heads=heads,
        normalize=normalize,
        decay=decay,
        recent=recent,
        window_size=window_size,
        kernel_size=kernel_size,
    )
