"""What the visibility and score rules mean: dense bool masks (``math``), key-span plans (the
engines), and the tiles of bias, ALiBi distance and visibility that the engines add.

Every function takes an :class:`~selfattn.spec.AttentionSpec`, a whole call or a part of one
(``spec.part``, ``spec.select``), so the same code serves a call, one batch element or the rows
and heads that ``attention_weights`` selects. ``key_spans`` is the block map: for a block of
query rows it lists the key ranges that may be visible, marking those that every row sees in
full (computed without a mask); keys outside every span are never touched. ``bounds`` is its
arithmetic part (causal and window), which the native engine computes with the same formula.
"""

from __future__ import annotations

import torch

from .spec import AttentionSpec

__all__ = [
    "GRANULE",
    "alibi_distance",
    "bias_tile",
    "bounds",
    "dense_visible",
    "heads5",
    "key_spans",
    "max_span",
    "normalized",
    "visible",
]

# Masks and segment ids are summarised per granule of this many keys when planning spans.
GRANULE = 64
# Spans may grow to this many times the chunk when a small masked edge joins its neighbour.
MERGE = 1.25


def heads5(t: torch.Tensor, hkv: int, group: int) -> torch.Tensor:
    """View a (B, Hq|1, M, N) tensor as (B, Hkv|1, G|1, M, N): the GQA grouping of heads.

    Query head ``h`` belongs to key/value head ``h // G``.
    """
    b, h, m, n = t.shape
    if h == 1:
        return t.reshape(b, 1, 1, m, n)
    return t.reshape(b, hkv, group, m, n)


# -- the block map -------------------------------------------------------------------------------


def bounds(spec: AttentionSpec, i0: int, i1: int) -> tuple[int, int, int, int]:
    """What causal and window allow rows ``[i0, i1)`` to see: ``(lo, hi, full_lo, full_hi)``.

    Keys outside ``[lo, hi)`` are hidden from every row of the block; keys in ``[full_lo,
    full_hi)`` are visible to all of them (as far as causal and window go). Empty when
    ``lo >= hi``.
    """
    pmin, pmax = spec.position_bounds(i0, i1)
    lo, hi = 0, spec.Nk
    full_lo, full_hi = 0, spec.Nk
    if spec.causal:
        hi, full_hi = min(hi, pmax + 1), min(full_hi, pmin + 1)
    if spec.window is not None:
        left, right = spec.window
        if right is not None:
            hi, full_hi = min(hi, pmax + right + 1), min(full_hi, pmin + right + 1)
        if left is not None:
            lo, full_lo = max(lo, pmin - left), max(full_lo, pmax - left)
    lo, hi = max(lo, 0), min(hi, spec.Nk)
    full_lo, full_hi = max(full_lo, lo), min(full_hi, hi)
    return lo, hi, full_lo, full_hi


def key_spans(spec: AttentionSpec, i0: int, i1: int, chunk: int) -> list[tuple[int, int, bool]]:
    """Key ranges that rows ``[i0, i1)`` may see, as ``(j0, j1, full)`` chunks of <= ``chunk``.

    Chunks hold at most ``max_span(chunk)`` keys.
    ``full`` means every row of the block sees every key of the chunk (for every batch and
    head), so it needs no mask. Keys outside the returned chunks are invisible to all rows.
    Causal and window bounds come from the row positions; masks and segment ids are read per
    granule of ``GRANULE`` keys (any/all over the block), so their empty granules are skipped.
    """
    lo, hi, full_lo, full_hi = bounds(spec, i0, i1)
    if lo >= hi:
        return []
    if spec.mask is None and spec.q_ids is None:
        parts = [(lo, full_lo, False), (full_lo, full_hi, True), (full_hi, hi, False)]
        if full_lo >= full_hi:
            parts = [(lo, hi, False)]
    else:
        parts = _data_parts(spec, i0, i1, lo, hi, full_lo, full_hi)
    spans: list[tuple[int, int, bool]] = []
    for a, b, full in parts:
        if b <= a:
            continue
        # equal chunks of at most `chunk` keys: no tiny remainder tile (e.g. the one key
        # j = i0 that a causal row block sees in full past a multiple of `chunk`)
        n = -(-(b - a) // chunk)
        size = -(-(b - a) // n)
        for j0 in range(a, b, size):
            j1 = min(j0 + size, b)
            # A small masked edge next to its neighbour is cheaper inside one larger masked
            # tile than as a GEMM of its own (the cached additive mask costs one pass).
            if (
                spans
                and spans[-1][1] == j0
                and j1 - spans[-1][0] <= max_span(chunk)
                and not (full and spans[-1][2])
            ):
                spans[-1] = (spans[-1][0], j1, False)
                continue
            spans.append((j0, j1, full))
    return spans


def _data_parts(
    spec: AttentionSpec, i0: int, i1: int, lo: int, hi: int, full_lo: int, full_hi: int
) -> list[tuple[int, int, bool]]:
    """Split ``[lo, hi)`` by what the mask and segment ids say per granule of keys."""
    g = GRANULE
    g_lo, g_hi = lo // g, -(-hi // g)
    any_vis = torch.ones(g_hi - g_lo, dtype=torch.bool)
    all_vis = torch.ones(g_hi - g_lo, dtype=torch.bool)
    if spec.mask is not None:
        a, b = _granule_any_all(spec.mask[:, :, _rows(spec.mask, i0, i1)], g, g_lo, g_hi)
        any_vis &= a
        all_vis &= b
    if spec.q_ids is not None:
        a, b = _segment_granules(spec, i0, i1, g_lo, g_hi)
        any_vis &= a
        all_vis &= b
    any_l, all_l = any_vis.tolist(), all_vis.tolist()
    parts: list[tuple[int, int, bool]] = []
    for t in range(g_hi - g_lo):
        if not any_l[t]:
            continue
        a, b = max((g_lo + t) * g, lo), min((g_lo + t + 1) * g, hi)
        full = all_l[t] and full_lo <= a and b <= full_hi
        if parts and parts[-1][1] == a and parts[-1][2] == full:
            parts[-1] = (parts[-1][0], b, full)
        else:
            parts.append((a, b, full))
    return parts


def _segment_granules(
    spec: AttentionSpec, i0: int, i1: int, g_lo: int, g_hi: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key granule: may any (row, key) pair match, and do all of them match?"""
    g = GRANULE
    big = torch.iinfo(torch.int64).max
    q = spec.q_ids[:, i0:i1].long().cpu()  # (B, M)
    q_real = q >= 0
    q_any = q_real.any(1)  # (B,)
    q_all = q_real.all(1)
    qmin = torch.where(q_real, q, big).amin(1)
    qmax = torch.where(q_real, q, -big).amax(1)
    kv = spec.kv_ids[:, g_lo * g : g_hi * g].long().cpu()  # (B, <= ng*g)
    pad = (g_hi - g_lo) * g - kv.shape[1]
    kv = torch.nn.functional.pad(kv, (0, pad), value=-1).view(kv.shape[0], -1, g)
    k_real = kv >= 0
    kmin = torch.where(k_real, kv, big).amin(2)  # (B, ng)
    kmax = torch.where(k_real, kv, -big).amax(2)
    empty = ~q_any[:, None] | ~k_real.any(2) | (kmax < qmin[:, None]) | (kmin > qmax[:, None])
    full = (
        q_all[:, None]
        & k_real.all(2)
        & (qmin == qmax)[:, None]
        & (kmin == qmin[:, None])
        & (kmax == qmin[:, None])
    )
    return ~empty.all(0), full.all(0)


# -- tiles -----------------------------------------------------------------------------------------


def visible(
    spec: AttentionSpec, i0: int, i1: int, j0: int, j1: int, device: torch.device | str
) -> torch.Tensor | None:
    """Visibility of rows ``[i0, i1)`` x keys ``[j0, j1)``: bool, broadcastable to
    (B, Hq, i1-i0, j1-j0); None when every key is visible."""
    vis: torch.Tensor | None = None
    if spec.causal or spec.window is not None:
        i_abs = spec.positions(i0, i1, device)[:, None]  # (M, 1)
        j = torch.arange(j0, j1, device=device)[None, :]  # (1, N)
        if spec.causal:
            vis = j <= i_abs
        if spec.right is not None:
            ok = j <= i_abs + spec.right
            vis = ok if vis is None else vis & ok
        if spec.left is not None:
            ok = j >= i_abs - spec.left
            vis = ok if vis is None else vis & ok
        vis = vis[None, None]  # (1, 1, M, N)
    if spec.mask is not None:
        m = spec.mask[:, :, _rows(spec.mask, i0, i1), _cols(spec.mask, j0, j1)]
        vis = m if vis is None else vis & m
    if spec.q_ids is not None:
        qi = spec.q_ids[:, i0:i1, None]
        kj = spec.kv_ids[:, None, j0:j1]
        same = ((qi == kj) & (qi >= 0) & (kj >= 0))[:, None]  # (B, 1, M, N)
        vis = same if vis is None else vis & same
    return vis


def dense_visible(spec: AttentionSpec, device: torch.device | str) -> torch.Tensor | None:
    """The whole visibility matrix, broadcastable to (B, Hq, Nq, Nk), or None (all visible)."""
    if not spec.restricts:
        return None
    return visible(spec, 0, spec.Nq, 0, spec.Nk, device)


def bias_tile(spec: AttentionSpec, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
    """The bias of rows ``[i0, i1)`` x keys ``[j0, j1)``, broadcastable to (B, Hq, m, n)."""
    b = spec.bias
    return b[:, :, _rows(b, i0, i1), _cols(b, j0, j1)]


def alibi_distance(
    spec: AttentionSpec, i0: int, i1: int, j0: int, j1: int, device, dtype
) -> torch.Tensor:
    """``|i' - j|`` for rows ``[i0, i1)`` x keys ``[j0, j1)``, (M, N)."""
    i_abs = spec.positions(i0, i1, device)[:, None]
    j = torch.arange(j0, j1, device=device)[None, :]
    return (i_abs - j).abs_().to(dtype)


def max_span(chunk: int) -> int:
    """The longest span ``key_spans(..., chunk)`` returns (small edges merge into neighbours)."""
    return int(chunk * MERGE)


def _rows(t: torch.Tensor, i0: int, i1: int) -> slice:
    return slice(None) if t.shape[2] == 1 else slice(i0, i1)


def _cols(t: torch.Tensor, j0: int, j1: int) -> slice:
    return slice(None) if t.shape[3] == 1 else slice(j0, j1)


def _granule_any_all(
    m: torch.Tensor, g: int, g_lo: int, g_hi: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any/all of a bool (B, H, M, Nk|1) mask over every granule of ``g`` keys in [g_lo, g_hi)."""
    ng = g_hi - g_lo
    if m.shape[3] == 1:
        return m.any().cpu().expand(ng), m.all().cpu().expand(ng)
    part = m[..., g_lo * g : g_hi * g]
    pad = ng * g - part.shape[-1]
    lead = part.shape[:-1]
    any_in = torch.nn.functional.pad(part, (0, pad), value=False).reshape(*lead, ng, g)
    all_in = torch.nn.functional.pad(part, (0, pad), value=True).reshape(*lead, ng, g)
    return (
        any_in.any(-1).flatten(0, -2).any(0).cpu(),
        all_in.all(-1).flatten(0, -2).all(0).cpu(),
    )


def normalized(p: torch.Tensor, sink_p: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities ``exp(s - lse)`` (..., Nk) computed from a recomputed lse, divided by their
    row sums, in place: the rounding of the float32 lse then cancels, as in a plain softmax
    (``exp(s - max) / sum``), which halves the error where scores are large (softcap 50,
    ALiBi). Rows with no visible key (sum 0) stay 0. With sinks, ``sink_p`` (..., 1) is each
    row's ``exp(sink - lse)`` from the same lse: it joins the row sum (the row sums to 1 - the
    sink's share)."""
    total = p.sum(-1, keepdim=True)
    if sink_p is not None:
        total = total + sink_p.to(total.dtype)
    return p.div_(torch.where(total > 0, total, 1.0))
