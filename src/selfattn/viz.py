"""Pictures of attention: matplotlib heatmaps, attention rollout, an ASCII visibility picture and
an offline interactive HTML head view (after bertviz's head view, Vig 2019; rollout after Abnar &
Zuidema 2020). A leaf: it imports the library, the library never imports it.

The probabilities come from :func:`selfattn.attention_weights`, so the model itself runs on the
fast path and only the layers, heads and query rows that are drawn are ever materialised.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import reference

__all__ = [
    "AttentionMaps",
    "attention_rollout",
    "capture_transformers",
    "head_view",
    "heatmap",
    "heatmap_grid",
    "load_transformers",
    "maps_from_qk",
    "mask_ascii",
    "plot_bench",
    "transformers_maps",
    "write_pictures",
]


# -- data ---------------------------------------------------------------------------------------


def _numpy(x: Any, what: str) -> np.ndarray:
    """A float64 numpy copy of a tensor or array-like, with a readable error for anything else."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what} must be an array or tensor of numbers, got {type(x).__name__}"
        ) from exc
    return arr


def _int_list(sel: Any, n: int, what: str) -> list[int]:
    """Normalise None / int / slice / sequence to a list of indices in ``range(n)``."""
    if sel is None:
        return list(range(n))
    if isinstance(sel, slice):
        return list(range(n))[sel]
    if isinstance(sel, (int, np.integer)) and not isinstance(sel, bool):
        sel = [int(sel)]
    try:
        out = [int(i) for i in sel]
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what} must be an int, a slice or a sequence of ints, got {sel!r}"
        ) from exc
    bad = [i for i in out if not -n <= i < n]
    if bad:
        raise ValueError(f"{what} {bad} out of range for {n} {what}")
    return [i % n for i in out]


@dataclass(frozen=True)
class AttentionMaps:
    """Attention probabilities for some layers, heads and query rows of one sequence.

    Attributes:
        weights: float32 (L, H, R, Nk): ``weights[l, h, r, j]`` is the probability with which
            query row ``rows[r]`` of head ``heads[h]`` in layer ``layers[l]`` reads key ``j``.
        tokens: the Nk key tokens.
        layers: the L layer numbers drawn (labels; any ints).
        heads: the H head numbers drawn.
        rows: the R query rows drawn (indices into ``query_tokens``).
        query_tokens: all Nq query tokens; ``tokens`` when None (self-attention, Nq == Nk).
    """

    weights: np.ndarray
    tokens: list[str]
    layers: list[int]
    heads: list[int]
    rows: list[int]
    query_tokens: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        w = _numpy(self.weights, "weights").astype(np.float32)
        if w.ndim != 4:
            raise ValueError(
                f"weights must be 4-D (layers, heads, rows, keys), got shape {w.shape}"
            )
        n_l, n_h, n_r, n_k = w.shape
        qt = self.tokens if self.query_tokens is None else self.query_tokens
        checks = [
            ("tokens", len(self.tokens), n_k),
            ("layers", len(self.layers), n_l),
            ("heads", len(self.heads), n_h),
            ("rows", len(self.rows), n_r),
        ]
        for name, got, want in checks:
            if got != want:
                raise ValueError(f"{name} has {got} entries but weights {w.shape} needs {want}")
        bad = [r for r in self.rows if not 0 <= r < len(qt)]
        if bad:
            raise ValueError(f"rows {bad} out of range for {len(qt)} query tokens")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "tokens", [str(t) for t in self.tokens])
        object.__setattr__(self, "query_tokens", [str(t) for t in qt])
        object.__setattr__(self, "layers", [int(x) for x in self.layers])
        object.__setattr__(self, "heads", [int(x) for x in self.heads])
        object.__setattr__(self, "rows", [int(x) for x in self.rows])

    def full_square(self) -> bool:
        """Whether every query row of a self-attention (Nq == Nk) is present, in order."""
        return self.rows == list(range(len(self.tokens))) and len(self.query_tokens) == len(
            self.tokens
        )


def maps_from_qk(
    qk: Mapping[int, tuple[Any, Any, Mapping[str, Any]]]
    | Sequence[tuple[Any, Any, Mapping[str, Any]]],
    tokens: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    heads: Any = None,
    rows: Any = None,
    query_tokens: Sequence[str] | None = None,
) -> AttentionMaps:
    """Probabilities of chosen layers, heads and rows from captured queries and keys.

    Each layer's probabilities come from :func:`selfattn.attention_weights` restricted to
    ``heads`` and ``rows``, so a long sequence costs ``len(heads) * len(rows) * Nk`` numbers per
    layer, never the full (H, N, N).

    Args:
        qk: per layer ``(q, k, rules)``: q (1, Hq, Nq, D), k (1, Hkv, Nk, D) and the keyword
            arguments of :func:`selfattn.attention` that shape the scores (``causal``, ``mask``,
            ``scale``, ...). A mapping from layer number, or a sequence (layers 0, 1, ...).
        tokens: the Nk key tokens.
        layers: which layers of ``qk`` to draw (all when None).
        heads: query heads (int, slice or sequence); all when None.
        rows: query rows; all when None.
        query_tokens: the Nq query tokens when they differ from ``tokens``.

    Returns:
        :class:`AttentionMaps` with weights (L, H, R, Nk).
    """
    import torch

    from .api import attention_weights

    by_layer = dict(qk) if isinstance(qk, Mapping) else dict(enumerate(qk))
    if not by_layer:
        raise ValueError("qk holds no layer")
    chosen = sorted(by_layer) if layers is None else [int(x) for x in layers]
    missing = [x for x in chosen if x not in by_layer]
    if missing:
        raise ValueError(f"layers {missing} were not captured; captured: {sorted(by_layer)}")
    q0 = by_layer[chosen[0]][0]
    if q0.shape[0] != 1:
        raise ValueError(
            f"maps_from_qk draws one sequence: q must have batch 1, got {tuple(q0.shape)}"
        )
    head_list = _int_list(heads, q0.shape[1], "heads")
    row_list = _int_list(rows, q0.shape[2], "rows")
    out = []
    for layer in chosen:
        q, k, rules = by_layer[layer]
        w = attention_weights(q, k, heads=head_list, rows=row_list, **dict(rules))
        out.append(w[0].to(torch.float32).cpu().numpy())  # (H, R, Nk)
    return AttentionMaps(
        weights=np.stack(out),
        tokens=list(tokens),
        layers=chosen,
        heads=head_list,
        rows=row_list,
        query_tokens=None if query_tokens is None else list(query_tokens),
    )


# -- weights from a Hugging Face model running on selfattn ---------------------------------------


def _hf_rules(module, query, key, attention_mask, kwargs) -> tuple[Any, dict[str, Any]]:
    """The key tensor and score rules the ``selfattn`` attention function uses for this call.

    Mirrors ``integrations.transformers.attention_forward`` (the tests compare the result with
    that function's own ``output_attentions`` weights, so a drift would be caught).
    """
    from .integrations.transformers import visibility

    nq, nk = query.shape[2], key.shape[2]
    mask, bias = visibility(attention_mask, nq, nk)
    if kwargs.get("position_bias") is not None:
        bias = kwargs["position_bias"] if bias is None else bias + kwargs["position_bias"]
    causal, window = False, None
    if mask is None:
        is_causal = kwargs.get("is_causal")
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
        if causal and 1 < nq < nk:  # prefill into an empty static cache: the first Nq keys
            key = key[:, :, :nq]
            if bias is not None and bias.shape[-1] > 1:
                bias = bias[..., :nq]
            nk = nq
        sw = kwargs.get("sliding_window")
        if causal and sw is not None and nk > sw:
            window = (int(sw) - 1, 0)
    rules = {
        "causal": causal,
        "window": window,
        "mask": mask,
        "bias": None if bias is None else bias.to(query.dtype),
        "softcap": kwargs.get("softcap"),
        "scale": kwargs.get("scaling"),
    }
    return key, rules


@contextmanager
def capture_transformers(layers: Sequence[int] | None = None, *, name: str = "selfattn"):
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

    from .integrations import transformers as sa_hf

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
            k_used, rules = _hf_rules(module, query, key, attention_mask, kwargs)
            captured[int(idx)] = (query.detach(), k_used.detach(), rules)
        return out

    AttentionInterface.register(name, recording)
    try:
        yield captured
    finally:
        AttentionInterface.register(name, previous)


def load_transformers(path: str | Path, *, name: str = "selfattn"):
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

    from .integrations import transformers as sa_hf

    sa_hf.register(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation=name)
    return model.eval(), tokenizer


def _num_layers(model) -> int | None:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    return None


def transformers_maps(
    model,
    tokenizer,
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


def write_pictures(
    maps: AttentionMaps, out_dir: str | Path, *, title: str = "attention"
) -> dict[str, Path]:
    """Write the standard set of pictures of ``maps`` into ``out_dir``.

    ``attention_grid.png`` (layers x heads), ``head_L{l}_H{h}.png`` (the deepest layer's
    first head), ``rollout.png`` (when every row of consecutive layers from 0 is present) and
    ``head_view.html``.

    Returns:
        ``{name: path}`` of the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    # panels grow with the tokens so that their labels stay readable
    cell = min(max(1.3 if len(maps.heads) > 6 else 1.8, 0.06 * len(maps.tokens)), 4.0)
    heatmap_grid(maps, title=title, cell=cell, path=out / "attention_grid.png")
    files["grid"] = out / "attention_grid.png"
    deepest = int(np.argmax(maps.layers))
    layer, head = maps.layers[deepest], maps.heads[0]
    one = out / f"head_L{layer}_H{head}.png"
    qtok = [maps.query_tokens[r] for r in maps.rows]
    heatmap(maps.weights[deepest, 0], maps.tokens, query_tokens=qtok,
            title=f"{title}: layer {layer}, head {head}", path=one)  # fmt: skip
    files["head"] = one
    if maps.full_square() and maps.layers == list(range(len(maps.layers))):
        heatmap(attention_rollout(maps), maps.tokens, title=f"{title}: rollout over "
                f"{len(maps.layers)} layers", path=out / "rollout.png")  # fmt: skip
        files["rollout"] = out / "rollout.png"
    files["head_view"] = head_view(maps, out / "head_view.html", title=title)
    return files


# -- heatmaps -----------------------------------------------------------------------------------


def _figure(width: float, height: float):
    # The object-oriented API: no pyplot, so no global state and no GUI backend is touched.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _label(tok: str, limit: int = 14) -> str:
    return tok if len(tok) <= limit else tok[: limit - 1] + "…"


def _default_query_tokens(tokens: Sequence[str] | None, nq: int, nk: int) -> list[str] | None:
    if tokens is None:
        return None
    if nq == nk:
        return list(tokens)
    if nq < nk:  # bottom-right alignment: query row i sits at key position i + Nk - Nq
        return list(tokens)[nk - nq :]
    return None


def _draw(ax, w: np.ndarray, qtok, ktok, title, cmap, labels: str = "both", vmax=None):
    im = ax.imshow(w, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    nq, nk = w.shape
    few = 48  # beyond this many tokens the labels would overlap: fall back to numbers
    # Inner panels of a grid get no ticks at all: the outer ones carry the tokens, and every
    # tick label is a text object that the layout engine has to measure.
    if labels not in ("both", "x"):
        ax.set_xticks([])
    elif ktok is not None and nk <= few:
        ax.set_xticks(range(nk), [_label(t) for t in ktok], rotation=90, fontsize=7)
    if labels not in ("both", "y"):
        ax.set_yticks([])
    elif qtok is not None and nq <= few:
        ax.set_yticks(range(nq), [_label(t) for t in qtok], fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    return im


def heatmap(
    weights: Any,
    tokens: Sequence[str] | None = None,
    *,
    query_tokens: Sequence[str] | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    path: str | Path | None = None,
    dpi: int = 120,
):
    """One head's attention as a heatmap: query tokens down, key tokens across.

    Args:
        weights: (Nq, Nk) probabilities (numpy or torch).
        tokens: the Nk key tokens (axis labels); numbers when None.
        query_tokens: the Nq query tokens; by default ``tokens`` (or its last Nq entries, the
            bottom-right alignment of API.md, when Nq < Nk).
        title: figure title.
        cmap: a matplotlib colormap name.
        path: where to save a PNG (parent folders are created).
        dpi: resolution of the saved PNG.

    Returns:
        The matplotlib ``Figure``.
    """
    w = _numpy(weights, "weights")
    if w.ndim != 2:
        raise ValueError(f"heatmap draws one head: weights must be (Nq, Nk), got shape {w.shape}")
    nq, nk = w.shape
    if tokens is not None and len(tokens) != nk:
        raise ValueError(f"{len(tokens)} tokens for {nk} keys")
    qtok = list(query_tokens) if query_tokens is not None else _default_query_tokens(tokens, nq, nk)
    if qtok is not None and len(qtok) != nq:
        raise ValueError(f"{len(qtok)} query tokens for {nq} query rows")
    side = min(max(3.0, 0.28 * max(nq, nk) + 1.5), 14.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = _draw(ax, w, qtok, tokens, title, cmap)
    ax.set_xlabel("key", fontsize=8)
    ax.set_ylabel("query", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8, label="probability")
    _save(fig, path, dpi)
    return fig


def heatmap_grid(
    maps: AttentionMaps | Any,
    tokens: Sequence[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    cell: float = 1.6,
    path: str | Path | None = None,
    dpi: int = 110,
):
    """A grid of heatmaps: one row per layer, one column per head, tokens on the outer axes.

    Args:
        maps: an :class:`AttentionMaps`, or an array (L, H, Nq, Nk) of probabilities.
        tokens: key tokens when ``maps`` is an array.
        layers, heads: labels for the rows and columns when ``maps`` is an array.
        title: figure title.
        cmap: a matplotlib colormap name.
        cell: inches per panel.
        path: where to save a PNG.
        dpi: resolution of the saved PNG.

    Returns:
        The matplotlib ``Figure``.
    """
    if not isinstance(maps, AttentionMaps):
        w = _numpy(maps, "maps")
        if w.ndim != 4:
            raise ValueError(f"maps must be AttentionMaps or a (L, H, Nq, Nk) array, got {w.shape}")
        n_l, n_h, nq, nk = w.shape
        toks = list(tokens) if tokens is not None else [str(j) for j in range(nk)]
        maps = AttentionMaps(
            weights=w,
            tokens=toks,
            layers=list(layers) if layers is not None else list(range(n_l)),
            heads=list(heads) if heads is not None else list(range(n_h)),
            rows=list(range(nq)),
            query_tokens=_default_query_tokens(toks, nq, nk) or [str(i) for i in range(nq)],
        )
    n_l, n_h, n_r, n_k = maps.weights.shape
    qtok = [maps.query_tokens[r] for r in maps.rows]
    # Fixed margins (inches) sized from the longest labels: a layout engine measuring every
    # panel of a 6 x 12 grid costs seconds.
    size = 5 if n_r > 16 else 6

    def label_room(toks, n):
        longest = max((len(_label(t)) for t in toks), default=1) if n <= 48 else len(str(n))
        return 0.075 * size / 6 * longest + 0.12

    left = 0.3 + label_room(qtok, n_r)
    bottom = 0.25 + label_room(maps.tokens, n_k)
    top = 0.3 + (0.3 if title else 0.0)
    right = 1.0  # the colorbar
    width, height = cell * n_h + left + right, cell * n_l + bottom + top
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    grid = fig.subplots(
        n_l, n_h, squeeze=False,
        gridspec_kw={"left": left / width, "right": 1 - right / width, "bottom": bottom / height,
                     "top": 1 - top / height, "wspace": 0.08, "hspace": 0.08},
    )  # fmt: skip
    im = None
    for li in range(n_l):
        for hi in range(n_h):
            ax = grid[li][hi]
            labels = {(True, True): "both", (True, False): "x", (False, True): "y"}.get(
                (li == n_l - 1, hi == 0), "none"
            )
            im = _draw(ax, maps.weights[li, hi], qtok, maps.tokens, None, cmap, labels, vmax=1.0)
            if li == 0:
                ax.set_title(f"head {maps.heads[hi]}", fontsize=8)
            if hi == 0:
                ax.set_ylabel(f"layer {maps.layers[li]}", fontsize=8)
            ax.tick_params(labelsize=size)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.12 / height)
    cax = fig.add_axes([1 - 0.75 / width, 0.25, 0.18 / width, 0.5])
    fig.colorbar(im, cax=cax, label="probability")
    _save(fig, path, dpi)
    return fig


def _save(fig, path, dpi) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)


# -- attention rollout --------------------------------------------------------------------------


def attention_rollout(
    weights: AttentionMaps | Any, *, residual: float = 0.5, head_fusion: str = "mean"
) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input.

    Each layer's heads are fused (mean, max or min), the residual connection is modelled by
    ``A' = residual * I + (1 - residual) * A`` with rows renormalised, and the layers are chained:
    ``R = A'_L @ ... @ A'_1``.

    Args:
        weights: :class:`AttentionMaps` holding every query row, or an array (L, H, N, N) (or a
            sequence of L arrays (H, N, N)) in layer order, first layer first.
        residual: weight of the identity (0 ignores the residual stream).
        head_fusion: "mean", "max" or "min".

    Returns:
        (N, N) float64: row i is the share of output token i coming from each input token.
    """
    if isinstance(weights, AttentionMaps):
        if not weights.full_square():
            raise ValueError("rollout needs every query row of a self-attention (rows=None)")
        w = weights.weights.astype(np.float64)
    else:
        w = _numpy(weights, "weights")
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"rollout needs (layers, heads, N, N) probabilities, got shape {w.shape}")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must lie in [0, 1], got {residual}")
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}.get(head_fusion)
    if fuse is None:
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    n = w.shape[-1]
    eye = np.eye(n)
    out = eye
    for layer in w:  # (H, N, N), first layer first
        a = residual * eye + (1.0 - residual) * fuse(layer, axis=0)
        a = a / np.maximum(a.sum(axis=-1, keepdims=True), 1e-30)  # rows of masked tokens stay 0
        out = a @ out
    return out


# -- the ASCII picture of a visibility rule -----------------------------------------------------


def mask_ascii(
    nq: int,
    nk: int | None = None,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    segment_ids: Any = None,
    mask: Any = None,
    max_cells: int = 64,
    visible: str = "x",
    hidden: str = ".",
    partial: str = "+",
) -> str:
    """Draw which keys each query may see, for the terminal.

    Uses the visibility rule of the specification (:func:`selfattn.reference.visibility`), so
    the bottom-right alignment of API.md shows: query row ``i`` sits at position
    ``i' = i + Nk - Nq``. Beyond ``max_cells`` rows or keys, each character stands for a block
    of positions (``visible`` all seen, ``partial`` some, ``hidden`` none), like a block mask.

    Args:
        nq: query rows; nk: keys (``nq`` when None).
        causal, window, mask: the rules of :func:`selfattn.attention` (``mask`` 2-D (Nq, Nk)).
        segment_ids: (N,) ids, or a pair ``(q_ids (Nq,), kv_ids (Nk,))`` for one sequence.
        max_cells: most characters per side before positions are grouped into blocks.
        visible, hidden, partial: the characters drawn.

    Returns:
        A multi-line string.
    """
    nk = nq if nk is None else nk
    for name, val in (("nq", nq), ("nk", nk), ("max_cells", max_cells)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    seg = None
    if segment_ids is not None:
        if (
            isinstance(segment_ids, (tuple, list))
            and len(segment_ids) == 2
            and np.ndim(segment_ids[0])
        ):
            q_ids, kv_ids = (
                np.asarray(_numpy(x, "segment_ids"), dtype=np.int64) for x in segment_ids
            )
        else:
            q_ids = kv_ids = np.asarray(_numpy(segment_ids, "segment_ids"), dtype=np.int64)
        if q_ids.shape != (nq,) or kv_ids.shape != (nk,):
            raise ValueError(
                f"segment_ids must be (N,) or a pair ((Nq,), (Nk,)) = (({nq},), ({nk},)), "
                f"got {q_ids.shape} and {kv_ids.shape}"
            )
        seg = (q_ids, kv_ids)
    if mask is not None:
        mask = np.asarray(_numpy(mask, "mask") != 0)
        if mask.shape != (nq, nk):
            raise ValueError(f"mask must be 2-D (Nq, Nk) = ({nq}, {nk}) here, got {mask.shape}")
    vis = np.broadcast_to(
        reference.visibility(nq, nk, causal=causal, window=window, mask=mask, segment_ids=seg),
        (nq, nk),
    )
    rules = []
    if causal:
        rules.append("causal")
    if window is not None:
        rules.append(f"window={tuple(window)}")
    if seg is not None:
        rules.append("segments")
    if mask is not None:
        rules.append("mask")
    head = f"{' + '.join(rules) or 'full'}: Nq={nq}, Nk={nk}, query row i at position i+{nk - nq}"
    bq = math.ceil(nq / max_cells)
    bk = math.ceil(nk / max_cells)
    if bq == 1 and bk == 1:
        return _ascii_cells(vis, seg, head, visible, hidden)
    # Blocks: count visible pairs per (row block, key block).
    rows_out = []
    for i0 in range(0, nq, bq):
        cells = []
        for j0 in range(0, nk, bk):
            blk = vis[i0 : i0 + bq, j0 : j0 + bk]
            cells.append(visible if blk.all() else partial if blk.any() else hidden)
        rows_out.append(f"  q{i0:>6}-{min(i0 + bq, nq) - 1:<6} " + "".join(cells))
    legend = (
        f"one character = {bq} rows x {bk} keys "
        f"({visible} all visible, {partial} some, {hidden} none)"
    )
    return "\n".join([head, legend, *rows_out])


def _ascii_cells(vis, seg, head, visible, hidden) -> str:
    nq, nk = vis.shape
    offset = nk - nq
    spaced = nk <= 32  # small pictures get a column per key with its full index
    cols = [str(j) if spaced else str(j % 10) for j in range(nk)]
    if seg is not None and spaced:
        cols_seg = [str(s) for s in seg[1]]
        width = max(len(c) for c in cols + cols_seg)
    else:
        cols_seg = [str(s)[-1] for s in seg[1]] if seg is not None else []
        width = 1
    sep = " " if spaced else ""
    tags = []
    for i in range(nq):
        tag = f"query {i:>{len(str(nq - 1))}} (pos {i + offset:>{len(str(nq - 1 + offset))}})"
        if seg is not None:
            tag += f" seg {seg[0][i]:>{max(len(str(s)) for s in seg[0])}}"
        tags.append(tag)
    lab = max(len(t) for t in tags) + 2

    def line(tag: str, cells: list[str]) -> str:
        return f"{tag:>{lab}}" + sep.join(f"{c:>{width}}" for c in cells)

    lines = [head, f"{visible} = visible, {hidden} = hidden", line("key  ", cols)]
    if seg is not None:
        lines.append(line("seg  ", cols_seg))
    for i in range(nq):
        cells = [visible if vis[i, j] else hidden for j in range(nk)]
        lines.append(f"{tags[i]:<{lab}}" + sep.join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


# -- the HTML head view -------------------------------------------------------------------------

_PALETTE = [
    "#4363d8", "#f58231", "#3cb44b", "#e6194b", "#911eb4", "#9a6324",
    "#f032e6", "#469990", "#808000", "#42d4f4", "#000075", "#800000",
]  # fmt: skip

_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px;
       color: #222; background: #fff; }
h1 { font-size: 18px; margin: 0 0 8px; }
#controls { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin-bottom: 8px; }
#heads label { display: inline-flex; align-items: center; gap: 3px; margin-right: 6px;
               cursor: pointer; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; }
#hint { color: #666; font-size: 12px; }
svg text { font: 13px ui-monospace, "DejaVu Sans Mono", monospace; cursor: default; }
svg .tok.active { cursor: pointer; }
svg .tok.inactive text { fill: #bbb; }
svg .tok rect { fill: transparent; }
svg .tok.focus rect { fill: #ffe58a; }
svg .key rect { fill: #2b6cb0; }
#main { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
#detail { white-space: pre; font: 12px ui-monospace, "DejaVu Sans Mono", monospace;
          min-height: 3em; margin-top: 40px; }
"""

_JS = r"""
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("hv-data").textContent);
  const NS = "http://www.w3.org/2000/svg";  // the SVG namespace name, not a fetched address
  const LH = 20, TOP = 44, GAP = 260, PADX = 12;
  const svg = document.getElementById("hv-svg");
  const detail = document.getElementById("detail");
  const layerSel = document.getElementById("layer");
  const headBox = document.getElementById("heads");
  const rowOf = new Map(D.rows.map((q, r) => [q, r]));  // query position -> row in weights
  const state = { layer: 0, heads: new Set(D.heads.map((_, i) => i)), focus: null, pinned: null };

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function short(t) { return t.length > 18 ? t.slice(0, 17) + "\u2026" : t; }

  // Token columns: queries on the left, keys on the right.
  const width = D.textWidth * 2 + GAP + 2 * PADX;
  const n = Math.max(D.query_tokens.length, D.tokens.length);
  svg.setAttribute("width", width);
  svg.setAttribute("height", TOP + n * LH + 8);
  el("text", { x: PADX + D.textWidth, y: 16, "text-anchor": "end", fill: "#666" }, svg)
    .textContent = "query";
  el("text", { x: PADX + D.textWidth + GAP, y: 16, fill: "#666" }, svg).textContent = "key";
  const lines = el("g", { id: "lines" }, svg);
  const xL = PADX + D.textWidth, xR = xL + GAP;
  const qNodes = D.query_tokens.map((t, i) => {
    const g = el("g", { class: "tok query " + (rowOf.has(i) ? "active" : "inactive"),
                        "data-pos": i }, svg);
    el("rect", { x: PADX, y: TOP + i * LH - 14, width: D.textWidth + 4, height: LH - 2, rx: 3 }, g);
    el("text", { x: xL - 4, y: TOP + i * LH, "text-anchor": "end" }, g).textContent = short(t);
    if (rowOf.has(i)) {
      g.addEventListener("mouseenter", () => { state.focus = { row: rowOf.get(i) }; render(); });
      g.addEventListener("mouseleave", () => { state.focus = null; render(); });
      g.addEventListener("click", () => {
        state.pinned = state.pinned && state.pinned.row === rowOf.get(i) ? null
                                                                        : { row: rowOf.get(i) };
        render();
      });
    }
    return g;
  });
  const kNodes = D.tokens.map((t, j) => {
    const g = el("g", { class: "tok key active", "data-pos": j }, svg);
    el("rect", { x: xR, y: TOP + j * LH - 14, width: D.textWidth + 4, height: LH - 2, rx: 3,
                 "fill-opacity": 0 }, g);
    el("text", { x: xR + 4, y: TOP + j * LH }, g).textContent = short(t);
    g.addEventListener("mouseenter", () => { state.focus = { key: j }; render(); });
    g.addEventListener("mouseleave", () => { state.focus = null; render(); });
    return g;
  });

  // Controls: the layer and the heads.
  D.layers.forEach((l, i) => {
    const o = document.createElement("option");
    o.value = i; o.textContent = "layer " + l; layerSel.appendChild(o);
  });
  layerSel.addEventListener("change", () => { state.layer = +layerSel.value; render(); });
  D.heads.forEach((h, i) => {
    const lab = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.checked = true; box.dataset.head = i;
    box.addEventListener("change", () => {
      if (box.checked) state.heads.add(i); else state.heads.delete(i);
      render();
    });
    const sw = document.createElement("span");
    sw.className = "swatch"; sw.style.background = D.colors[i % D.colors.length];
    lab.append(box, sw, document.createTextNode(String(h)));
    headBox.appendChild(lab);
  });

  function fmt(p) { return p.toFixed(3); }

  function render() {
    const W = D.weights[state.layer];  // [head][row][key]
    const focus = state.pinned || state.focus;
    const heads = [...state.heads].sort((a, b) => a - b);
    lines.replaceChildren();
    let drawn = 0;
    const rows = focus && focus.row !== undefined ? [focus.row] : D.rows.map((_, r) => r);
    const onlyKey = focus && focus.key !== undefined ? focus.key : null;
    const faint = !focus;  // every row at once: thinner lines so the picture stays readable
    const keyMass = new Float64Array(D.tokens.length);
    heads.forEach((h, hi) => {
      const color = D.colors[h % D.colors.length];
      // heads fan out by a pixel or two at each end, so lines to the same key stay visible
      const dy = (hi - (heads.length - 1) / 2) * Math.min(2.5, 12 / heads.length);
      for (const r of rows) {
        const yq = TOP + D.rows[r] * LH - 4;
        for (let j = 0; j < D.tokens.length; j++) {
          if (onlyKey !== null && j !== onlyKey) continue;
          const p = W[h][r][j];
          if (focus && focus.row !== undefined) keyMass[j] += p / heads.length;
          if (p < (faint ? 0.02 : 0.005)) continue;
          el("line", { x1: xL + 6, y1: yq + dy, x2: xR - 2, y2: TOP + j * LH - 4 + dy,
                       stroke: color,
                       "stroke-width": faint ? 1 : 1 + 3 * p,
                       "stroke-opacity": (faint ? 0.5 : 1) * p,
                       "data-head": D.heads[h], "data-row": D.rows[r], "data-key": j,
                       "data-p": p }, lines);
          drawn++;
        }
      }
    });
    svg.dataset.lines = drawn;
    qNodes.forEach((g, i) => g.classList.toggle("focus",
      !!focus && focus.row !== undefined && D.rows[focus.row] === i));
    kNodes.forEach((g, j) => {
      const r = g.querySelector("rect");
      r.setAttribute("fill-opacity", focus && focus.row !== undefined ? keyMass[j] * 0.6 : 0);
      g.classList.toggle("focus", !!focus && focus.key === j);
    });
    detail.textContent = describe(W, heads, focus);
  }

  function describe(W, heads, focus) {
    if (!focus) {
      return "Hover a query token (left) to see the keys it reads; " +
             "hover a key to see who reads it.";
    }
    const out = [];
    if (focus.row !== undefined) {
      const q = D.rows[focus.row];
      out.push("query " + q + " \"" + D.query_tokens[q] + "\" (layer " +
               D.layers[state.layer] + ")");
      for (const h of heads) {
        const ps = W[h][focus.row].map((p, j) => [p, j]).sort((a, b) => b[0] - a[0]).slice(0, 3);
        out.push("  head " + D.heads[h] + ": " +
                 ps.map(([p, j]) => D.tokens[j] + " " + fmt(p)).join(", "));
      }
    } else {
      out.push("key " + focus.key + " \"" + D.tokens[focus.key] + "\" (layer " +
               D.layers[state.layer] + ")");
      for (const h of heads) {
        let best = -1, who = -1;
        D.rows.forEach((_, r) => {
          if (W[h][r][focus.key] > best) { best = W[h][r][focus.key]; who = r; }
        });
        out.push("  head " + D.heads[h] + ": read most by " + D.query_tokens[D.rows[who]] +
                 " " + fmt(best));
      }
    }
    return out.join("\n");
  }

  window.selfattnHeadView = { data: D, state: state, render: render };
  render();
})();
"""


def head_view(
    maps: AttentionMaps | Any,
    path: str | Path,
    *,
    tokens: Sequence[str] | None = None,
    title: str = "selfattn head view",
    digits: int = 4,
) -> Path:
    """Write an interactive head view as ONE self-contained HTML file (no network access).

    The reader picks a layer and heads; hovering a query token (left column) draws lines to
    the keys it attends to, coloured by head with opacity equal to the probability; hovering a
    key shows which queries read it; a click pins a query. All JavaScript, CSS and data are
    inline, and a Content-Security-Policy of ``default-src 'none'`` forbids the page to load
    anything.

    Args:
        maps: :class:`AttentionMaps` (e.g. from :func:`maps_from_qk`, which computes only the
            layers, heads and rows asked for), or an array (L, H, N, N) with ``tokens``.
        path: the HTML file to write (parent folders are created).
        tokens: key tokens when ``maps`` is an array.
        title: shown at the top of the page.
        digits: decimals kept for each probability (keeps the file small).

    Returns:
        The path written.
    """
    if not isinstance(maps, AttentionMaps):
        w = _numpy(maps, "maps")
        if w.ndim != 4 or tokens is None:
            raise ValueError(
                "head_view needs AttentionMaps, or a (L, H, N, N) array together with tokens"
            )
        maps = AttentionMaps(
            weights=w, tokens=list(tokens), layers=list(range(w.shape[0])),
            heads=list(range(w.shape[1])), rows=list(range(w.shape[2])),
        )  # fmt: skip
    if not isinstance(digits, int) or not 1 <= digits <= 8:
        raise ValueError(f"digits must be an int in [1, 8], got {digits!r}")
    longest = max((len(t) for t in [*maps.tokens, *maps.query_tokens]), default=1)
    data = {
        "title": title,
        "tokens": maps.tokens,
        "query_tokens": maps.query_tokens,
        "layers": maps.layers,
        "heads": maps.heads,
        "rows": maps.rows,
        "colors": _PALETTE,
        "textWidth": int(8 * min(max(longest, 4), 18) + 8),
        "weights": np.round(maps.weights.astype(np.float64), digits).tolist(),
    }
    # "<" escaped so that no token can close the <script> element early.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<div id="controls">
  <label>Layer <select id="layer"></select></label>
  <span>Heads <span id="heads"></span></span>
  <span id="hint">hover a token; click a query to pin it</span>
</div>
<div id="main">
<svg id="hv-svg" role="img" aria-label="attention lines between tokens"></svg>
<div id="detail"></div>
</div>
<script type="application/json" id="hv-data">{payload}</script>
<script>{_JS}</script>
</body>
</html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# -- the benchmark plot -------------------------------------------------------------------------


def plot_bench(results: Mapping[str, Any], path: str | Path | None = None, *, dpi: int = 120):
    """Log-log plot of a ``selfattn bench`` result: time and memory against sequence length.

    The left panel shows each method's median time with an ``N^2`` guide (the compute every exact
    method must do); the right panel the peak memory each method needed, with ``N`` and ``N^2``
    guides (the O(N) engines follow the first, methods that build the score matrix the second).

    Args:
        results: the dictionary ``selfattn bench --json`` writes (``rows`` with ``method``,
            ``n``, ``median_s`` and optional ``memory_bytes``).
        path: where to save a PNG.
        dpi: resolution of the saved PNG.

    Returns:
        The matplotlib ``Figure``.
    """
    rows = list(results.get("rows", []))
    if not rows:
        raise ValueError("results hold no rows to plot")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = _figure(11, 4.4)
    ax_t, ax_m = fig.subplots(1, 2)
    colors = dict(zip(methods, _PALETTE))
    for m in methods:
        pts = sorted(
            (r["n"], r["median_s"]) for r in rows if r["method"] == m and r.get("median_s")
        )
        if pts:
            ax_t.loglog(*zip(*pts), "o-", color=colors[m], label=m)
        mem = sorted(
            (r["n"], r["memory_bytes"] / 2**20)
            for r in rows
            if r["method"] == m and r.get("memory_bytes")
        )
        if mem:
            ax_m.loglog(*zip(*mem), "o-", color=colors[m], label=m)
    ns = sorted({r["n"] for r in rows})
    last = ns[-1]
    # Guides drawn through the measurements at the longest N, where the asymptotics show.
    t_last = [r["median_s"] for r in rows if r["n"] == last and r.get("median_s")]
    if len(ns) > 1 and t_last:
        t0 = min(t_last)
        ax_t.loglog(ns, [t0 * (n / last) ** 2 for n in ns], "k--", lw=1, label="∝ N² (compute)")
    m_last = [r["memory_bytes"] / 2**20 for r in rows if r["n"] == last and r.get("memory_bytes")]
    mems = [r for r in rows if r.get("memory_bytes")]
    if len(ns) > 1 and m_last:
        lo, hi = min(m_last), max(m_last)
        ax_m.loglog(ns, [lo * (n / last) for n in ns], "k:", lw=1, label="∝ N")
        ax_m.loglog(ns, [hi * (n / last) ** 2 for n in ns], "k--", lw=1, label="∝ N²")
    cfg = results.get("config", {})
    names = {"device": "device", "dtype": "dtype", "batch": "B", "heads": "H", "head_dim": "D"}
    sub = ", ".join(f"{short}={cfg[k]}" for k, short in names.items() if k in cfg)
    if cfg.get("causal"):
        sub += ", causal"
    if cfg.get("device") == "cpu" and cfg.get("threads"):
        sub += f", {cfg['threads']} thread" + ("s" if cfg["threads"] > 1 else "")
    ax_t.set(xlabel="sequence length N", ylabel="seconds per call (median)")
    ax_t.set_title(f"time ({sub})" if sub else "time", fontsize=10)
    ax_m.set(xlabel="sequence length N", ylabel="peak memory growth of one call (MiB)")
    ax_m.set_title("memory", fontsize=10)
    from matplotlib.ticker import NullFormatter, NullLocator

    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel may hold no labelled line (no memory)
            ax.legend(fontsize=8)
        ax.set_xticks(ns, [str(n) for n in ns])  # the measured lengths, not powers of ten
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
    if not mems:
        ax_m.text(
            0.5, 0.5, "memory not measured", ha="center", va="center", transform=ax_m.transAxes
        )
    _save(fig, path, dpi)
    return fig
