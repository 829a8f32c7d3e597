"""The interactive head view (after bertviz's, Vig 2019): one offline, self-contained HTML file.

Its style and script are the package data files ``head_view.css`` and ``head_view.js`` beside it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .maps import AttentionMaps, to_numpy

__all__ = ["PALETTE", "head_view"]

#: One colour per head (and per method in the benchmark plot), cycled beyond twelve.
PALETTE = [
    "#4363d8",
    "#f58231",
    "#3cb44b",
    "#e6194b",
    "#911eb4",
    "#9a6324",
    "#f032e6",
    "#469990",
    "#808000",
    "#42d4f4",
    "#000075",
    "#800000",
]

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{css}</style>
</head>
<body>
<h1>{title}</h1>
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
<script>
{js}</script>
</body>
</html>
"""


@cache
def _asset(name: str) -> str:
    """The text of a package data file next to this module (``head_view.css`` or ``.js``)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


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
        tokens: the N key tokens when ``maps`` is an array.
        title: shown at the top of the page.
        digits: decimals kept for each probability (keeps the file small).

    Returns:
        The path written.
    """
    if not isinstance(maps, AttentionMaps):
        w = to_numpy(maps, "maps")
        if w.ndim != 4 or tokens is None:
            raise ValueError(
                "head_view needs AttentionMaps, or a (L, H, N, N) array together with tokens"
            )
        n_l, n_h, n_r = w.shape[:3]
        maps = AttentionMaps(
            weights=w,
            tokens=list(tokens),
            layers=list(range(n_l)),
            heads=list(range(n_h)),
            rows=list(range(n_r)),
        )
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
        "colors": PALETTE,
        "textWidth": int(8 * min(max(longest, 4), 18) + 8),
        "weights": np.round(maps.weights.astype(np.float64), digits).tolist(),  # (L, H, R, Nk)
    }
    # "<" escaped so that no token can close the <script> element early.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    page = _PAGE.format(
        title=html.escape(title),
        css=_asset("head_view.css"),
        js=_asset("head_view.js"),
        payload=payload,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
