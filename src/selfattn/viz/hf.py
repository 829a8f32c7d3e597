"""The Hugging Face room: run a transformers model on selfattn's fast path and capture the queries,
keys and rules of its attention calls (:func:`capture_transformers`, :func:`transformers_maps`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .maps import AttentionMaps, maps_from_qk

__all__ = ["capture_transformers", "load_transformers", "transformers_maps"]


def _call_rules(module, query, key, attention_mask, kwargs) -> tuple[Any, dict[str, Any]]:
    """The keys and score rules the adapter's attention function uses for this call (the
    adapter's own :func:`~selfattn.integrations.transformers.call_rules`)."""
    from ..integrations import transformers as sa_hf

    names = ("is_causal", "softcap", "sliding_window", "scaling", "position_bias")
    key, _, rules = sa_hf.call_rules(
        module, query, key, None, attention_mask, **{n: kwargs.get(n) for n in names}
    )
    return key, rules


@contextmanager
def capture_transformers(
    layers: Sequence[int] | None = None, *, name: str = "selfattn"
) -> Iterator[dict[int, tuple[Any, Any, dict[str, Any]]]]:
    """Record the queries, keys and rules of a transformers model running on selfattn.

    While the context is open, every call of the ``name`` attention function still runs
    :func:`selfattn.attention` (the fast path, no probabilities materialised) and additionally
    stores ``(q, k, rules)`` for the layers asked for, ready for :func:`maps_from_qk`.

    Args:
        layers: layer indices to record (``module.layer_idx``, else the order of the calls);
            all when None.
        name: the registered implementation (:func:`selfattn.integrations.transformers.register`).

    Yields:
        A dict ``{layer: (q (B, Hq, Nq, D), k (B, Hkv, Nk, D), rules)}`` filled by the forward
        pass.
    """
    from transformers import AttentionInterface

    from ..integrations import transformers as sa_hf

    sa_hf.register(name)
    previous = AttentionInterface._global_mapping[name]
    wanted = None if layers is None else {int(x) for x in layers}
    captured: dict[int, tuple[Any, Any, dict[str, Any]]] = {}
    order: dict[int, int] = {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        out = previous(module, query, key, value, attention_mask, **kwargs)
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            idx = order.setdefault(id(module), len(order))
        if wanted is None or idx in wanted:
            if kwargs.get("s_aux") is not None:
                warnings.warn(
                    "attention sinks (s_aux) are not drawn: weights shown are before the sink",
                    stacklevel=2,
                )
            k_used, rules = _call_rules(module, query, key, attention_mask, kwargs)
            captured[int(idx)] = (query.detach(), k_used.detach(), rules)
        return out

    AttentionInterface.register(name, recording)
    try:
        yield captured
    finally:
        AttentionInterface.register(name, previous)


def load_transformers(path: str | Path, *, name: str = "selfattn") -> tuple[Any, Any]:
    """Load a local transformers model folder with ``attn_implementation="selfattn"``.

    Args:
        path: a folder holding ``config.json``, the weights and the tokenizer.
        name: the implementation name to register and load with.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ValueError: ``path`` is not a model folder.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a transformers model folder (no config.json)")
    from transformers import AutoModel, AutoTokenizer

    from ..integrations import transformers as sa_hf

    sa_hf.register(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation=name)
    return model.eval(), tokenizer


def _num_layers(model: Any) -> int | None:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    return None


def transformers_maps(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    layers: Sequence[int] | None = None,
    heads: Any = None,
    rows: Any = None,
    max_length: int = 512,
    name: str = "selfattn",
) -> AttentionMaps:
    """Run a transformers model on ``text`` on the fast path and return the chosen probabilities.

    Args:
        model, tokenizer: e.g. from :func:`load_transformers`; the model must use the ``name``
            attention implementation.
        text: the input.
        layers: layer indices (negative counts from the end); all when None.
        heads: query heads (int, slice or sequence); all when None.
        rows: query rows (token positions); all when None.
        max_length: tokens kept (truncation).
        name: the implementation name.

    Returns:
        :class:`AttentionMaps` holding only the layers, heads and rows asked for.
    """
    import torch

    impl = getattr(model.config, "_attn_implementation", None)
    if impl != name:
        raise ValueError(f"the model runs attn_implementation={impl!r}; load it with {name!r}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    n_layers = _num_layers(model)
    chosen = None
    if layers is not None:
        chosen = []
        for x in layers:
            if n_layers is not None and not -n_layers <= x < n_layers:
                raise ValueError(f"layer {x} out of range for a model of {n_layers} layers")
            chosen.append(x % n_layers if n_layers else x)
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
    with capture_transformers(chosen, name=name) as captured, torch.no_grad():
        model(**enc)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    return maps_from_qk(captured, tokens, layers=chosen, heads=heads, rows=rows)
