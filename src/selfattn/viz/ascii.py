"""The terminal room: :func:`mask_ascii` draws which keys each query may see, as text, from the
specification's visibility rule.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import reference
from .maps import to_numpy

__all__ = ["mask_ascii"]


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
    the bottom-right alignment of docs/api.md shows: query row ``i`` sits at position
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
                np.asarray(to_numpy(x, "segment_ids"), dtype=np.int64) for x in segment_ids
            )
        else:
            q_ids = kv_ids = np.asarray(to_numpy(segment_ids, "segment_ids"), dtype=np.int64)
        if q_ids.shape != (nq,) or kv_ids.shape != (nk,):
            raise ValueError(
                f"segment_ids must be (N,) or a pair ((Nq,), (Nk,)) = (({nq},), ({nk},)), "
                f"got {q_ids.shape} and {kv_ids.shape}"
            )
        seg = (q_ids, kv_ids)
    if mask is not None:
        mask = np.asarray(to_numpy(mask, "mask") != 0)
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


def _ascii_cells(
    vis: np.ndarray, seg: tuple[np.ndarray, np.ndarray] | None, head: str, visible: str, hidden: str
) -> str:
    """One character per (row, key) of ``vis`` (Nq, Nk), with row and column labels."""
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
