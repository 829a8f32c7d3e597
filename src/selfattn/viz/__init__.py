"""Pictures of attention: matplotlib heatmaps, attention rollout, an ASCII visibility picture and
an offline interactive HTML head view (after bertviz's head view, Vig 2019; rollout after Abnar &
Zuidema 2020). A leaf: it imports the library, the library never imports it.

The probabilities come from :func:`selfattn.attention_weights`, so the model itself runs on the
fast path and only the layers, heads and query rows that are drawn are ever materialised.

The rooms, one job each (importing this package imports neither torch nor matplotlib nor
transformers; each is imported by the function that needs it):

- ``maps``: :class:`AttentionMaps` (the probabilities drawn), :func:`maps_from_qk` and
  :func:`attention_rollout`;
- ``hf``: a transformers model on selfattn (:func:`capture_transformers`,
  :func:`load_transformers`, :func:`transformers_maps`);
- ``plots``: the matplotlib pictures (:func:`heatmap`, :func:`heatmap_grid`, :func:`plot_bench`)
  and :func:`write_pictures`, the standard set of files;
- ``ascii``: :func:`mask_ascii`, a visibility rule drawn for the terminal;
- ``head_view``: :func:`head_view`, the HTML page, with its ``head_view.css`` and
  ``head_view.js`` beside it as package data.
"""

from __future__ import annotations

from .ascii import mask_ascii
from .head_view import head_view
from .hf import capture_transformers, load_transformers, transformers_maps
from .maps import AttentionMaps, attention_rollout, maps_from_qk
from .plots import heatmap, heatmap_grid, plot_bench, write_pictures

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
