"""The matplotlib room: :func:`heatmap`, :func:`heatmap_grid`, :func:`plot_bench` and
:func:`write_pictures` (the standard set of files). matplotlib is imported only when drawing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .head_view import PALETTE, head_view
from .maps import AttentionMaps, attention_rollout, to_numpy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["heatmap", "heatmap_grid", "plot_bench", "write_pictures"]


# -- heatmaps --------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
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


def _ticks(n: int, room: float, points: float) -> range:
    """Every k-th of ``n`` positions, k the smallest step at which labels of ``points`` points
    fit into ``room`` inches side by side (a little apart): all of them when they fit."""
    step = max(1, math.ceil(n * points * 1.25 / 72 / max(room, 1e-3)))
    return range(0, n, step)


def _draw(ax, w, qtok, ktok, title, cmap, labels="both", vmax=None, room=(4.0, 4.0), points=7):
    """``room``: inches along the query and key axes, for as many token labels of ``points``
    points as fit there (every k-th token past that: tokens, never bare positions)."""
    im = ax.imshow(w, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    nq, nk = w.shape
    # Inner panels of a grid get no ticks at all: the outer ones carry the tokens, and every
    # tick label is a text object that the layout engine has to measure.
    if labels not in ("both", "x"):
        ax.set_xticks([])
    elif ktok is not None:
        at = _ticks(nk, room[1], points)
        ax.set_xticks(at, [_label(ktok[j]) for j in at], rotation=90, fontsize=points)
    if labels not in ("both", "y"):
        ax.set_yticks([])
    elif qtok is not None:
        at = _ticks(nq, room[0], points)
        ax.set_yticks(at, [_label(qtok[i]) for i in at], fontsize=points)
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
) -> Figure:
    """One head's attention as a heatmap: query tokens down, key tokens across.

    Args:
        weights: (Nq, Nk) probabilities (numpy or torch).
        tokens: the Nk key tokens (axis labels); numbers when None.
        query_tokens: the Nq query tokens; by default ``tokens`` (or its last Nq entries, the
            bottom-right alignment of docs/api.md, when Nq < Nk).
        title: figure title.
        cmap: a matplotlib colormap name.
        path: where to save a PNG (parent folders are created).
        dpi: resolution of the saved PNG.

    Returns:
        The matplotlib ``Figure``.
    """
    w = to_numpy(weights, "weights")
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
    im = _draw(ax, w, qtok, tokens, title, cmap, room=(0.75 * side, 0.75 * side))
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
) -> Figure:
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
        w = to_numpy(maps, "maps")
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
    n_l, n_h, n_r = maps.weights.shape[:3]
    qtok = [maps.query_tokens[r] for r in maps.rows]
    # Fixed margins (inches) sized from the longest labels: a layout engine measuring every
    # panel of a 6 x 12 grid costs seconds.
    size = 5 if n_r > 16 else 6

    def label_room(toks):
        longest = max((len(_label(t)) for t in toks), default=1)
        return 0.075 * size / 6 * longest + 0.12

    left = 0.3 + label_room(qtok)
    bottom = 0.25 + label_room(maps.tokens)
    top = 0.3 + (0.3 if title else 0.0)
    right = 1.0  # the colorbar
    width, height = cell * n_h + left + right, cell * n_l + bottom + top
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    margins = {
        "left": left / width,
        "right": 1 - right / width,
        "bottom": bottom / height,
        "top": 1 - top / height,
        "wspace": 0.08,
        "hspace": 0.08,
    }
    grid = fig.subplots(n_l, n_h, squeeze=False, gridspec_kw=margins)
    im = None
    for li in range(n_l):
        for hi in range(n_h):
            ax = grid[li][hi]
            labels = {(True, True): "both", (True, False): "x", (False, True): "y"}.get(
                (li == n_l - 1, hi == 0), "none"
            )
            w = maps.weights[li, hi]
            room = (cell, cell)
            im = _draw(ax, w, qtok, maps.tokens, None, cmap, labels, 1.0, room, size)
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


def _save(fig: Figure, path: str | Path | None, dpi: int) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)


# -- the benchmark plot ----------------------------------------------------------------------------


def plot_bench(
    results: Mapping[str, Any], path: str | Path | None = None, *, dpi: int = 120
) -> Figure:
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
    colors = dict(zip(methods, PALETTE))
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
    cpu = cfg.get("cpu") or {}
    if cpu.get("model") and cfg.get("device") == "cpu":  # every benchmark figure names its CPU
        engine = f"; selfattn = the {cfg['engine']} engine" if cfg.get("engine") else ""
        fig.suptitle(f"CPU: {cpu['model']}{engine}", fontsize=10)
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


# -- the standard set of pictures ------------------------------------------------------------------


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
    heatmap(
        maps.weights[deepest, 0],
        maps.tokens,
        query_tokens=qtok,
        title=f"{title}: layer {layer}, head {head}",
        path=one,
    )
    files["head"] = one
    if maps.full_square() and maps.layers == list(range(len(maps.layers))):
        rollout_title = f"{title}: rollout over {len(maps.layers)} layers"
        heatmap(attention_rollout(maps), maps.tokens, title=rollout_title, path=out / "rollout.png")
        files["rollout"] = out / "rollout.png"
    files["head_view"] = head_view(maps, out / "head_view.html", title=title)
    return files
