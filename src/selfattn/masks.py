"""Visibility rules -> dense bool masks (``math``) and key-span plans (``tiled``).

A :class:`Rules` holds the rules of one (sub)problem with explicit query positions, so the same
code serves a whole call, one batch element, or the rows and heads that ``attention_weights``
selects. ``key_spans`` is the block map: for a block of query rows it lists the key ranges that
may be visible, marking those that every row sees in full (computed without a mask); keys outside
every span are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .spec import AttentionSpec

__all__ = ["GRANULE", "Rules", "heads5", "max_span"]

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


@dataclass(frozen=True, eq=False)
class Rules:
    """The visibility and score rules of one problem of ``B x H`` query heads and ``M`` rows.

    Query row ``r`` sits at absolute position ``qpos[r]`` (``start + r`` when ``qpos`` is None).
    Tensors are 4-D and broadcastable to (B, H, M, Nk): ``mask``, ``bias``; ``alibi`` is
    (B|1, H); ``q_ids`` (B, M) and ``kv_ids`` (B, Nk).
    """

    B: int
    H: int
    Hkv: int
    M: int
    Nk: int
    start: int = 0
    qpos: torch.Tensor | None = None
    causal: bool = False
    left: int | None = None
    right: int | None = None
    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    alibi: torch.Tensor | None = None
    softcap: float | None = None
    q_ids: torch.Tensor | None = None
    kv_ids: torch.Tensor | None = None
    bad_keys: torch.Tensor | None = None  # (B, Hkv, Nk): k or v not finite there

    @property
    def group(self) -> int:
        return self.H // self.Hkv

    @staticmethod
    def from_spec(spec: AttentionSpec) -> Rules:
        left, right = spec.window if spec.window is not None else (None, None)
        return Rules(
            B=spec.B, H=spec.Hq, Hkv=spec.Hkv, M=spec.Nq, Nk=spec.Nk, start=spec.offset,
            causal=spec.causal, left=left, right=right, mask=spec.mask, bias=spec.bias,
            alibi=spec.alibi, softcap=spec.softcap, q_ids=spec.q_ids, kv_ids=spec.kv_ids,
        )  # fmt: skip

    # -- restriction to a part of the problem ---------------------------------------------------

    @property
    def restricts(self) -> bool:
        """Whether any rule can hide a key from a query."""
        return (
            self.causal
            or self.left is not None
            or self.right is not None
            or self.mask is not None
            or self.q_ids is not None
        )

    def part(self, b0: int, b1: int, kh0: int, kh1: int, r0: int, r1: int) -> Rules:
        """The rules of batch elements [b0, b1), key/value heads [kh0, kh1) and rows [r0, r1).

        Query heads follow their key/value heads: [kh0 * G, kh1 * G).
        """
        g = self.group
        h0, h1 = kh0 * g, kh1 * g

        def cut(t: torch.Tensor | None, *ranges: tuple[int, int] | None) -> torch.Tensor | None:
            if t is None:
                return None
            index = tuple(
                slice(None) if rng is None or t.shape[d] == 1 else slice(*rng)
                for d, rng in enumerate(ranges)
            )
            return t[index]

        return replace(
            self, B=b1 - b0, H=h1 - h0, Hkv=kh1 - kh0, M=r1 - r0,
            start=self.start + r0, qpos=None if self.qpos is None else self.qpos[r0:r1],
            mask=cut(self.mask, (b0, b1), (h0, h1), (r0, r1)),
            bias=cut(self.bias, (b0, b1), (h0, h1), (r0, r1)),
            alibi=cut(self.alibi, (b0, b1), (h0, h1)),
            q_ids=cut(self.q_ids, (b0, b1), (r0, r1)),
            kv_ids=cut(self.kv_ids, (b0, b1)),
            bad_keys=cut(self.bad_keys, (b0, b1), (kh0, kh1)),
        )  # fmt: skip

    def select(self, heads: torch.Tensor | None, rows: torch.Tensor | None) -> Rules:
        """The rules for some query heads and rows (key/value heads become one per query head).

        Args:
            heads: int64 indices into the H query heads, or None for all.
            rows: int64 indices into the M rows, or None for all.
        """
        r = self
        if heads is not None:
            kv_heads = heads // self.group

            def pick_h(t: torch.Tensor | None) -> torch.Tensor | None:
                return t if t is None or t.shape[1] == 1 else t.index_select(1, heads.to(t.device))

            r = replace(
                r, H=len(heads), Hkv=len(heads), mask=pick_h(r.mask), bias=pick_h(r.bias),
                alibi=None if r.alibi is None else r.alibi.index_select(1, heads.to(r.alibi.device)),
                bad_keys=None if r.bad_keys is None else r.bad_keys.index_select(1, kv_heads.to(r.bad_keys.device)),
            )  # fmt: skip
        if rows is not None:

            def pick_r(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
                return (
                    t if t is None or t.shape[dim] == 1 else t.index_select(dim, rows.to(t.device))
                )

            r = replace(
                r, M=len(rows), start=0, qpos=self.positions(0, self.M, rows.device)[rows],
                mask=pick_r(r.mask, 2), bias=pick_r(r.bias, 2), q_ids=pick_r(r.q_ids, 1),
            )  # fmt: skip
        return r

    # -- positions -------------------------------------------------------------------------------

    def positions(self, i0: int, i1: int, device: torch.device | str) -> torch.Tensor:
        """Absolute positions of rows ``[i0, i1)``, int64 (i1 - i0,)."""
        if self.qpos is None:
            return torch.arange(self.start + i0, self.start + i1, device=device)
        return self.qpos[i0:i1].to(device)

    def _pos_bounds(self, i0: int, i1: int) -> tuple[int, int]:
        if self.qpos is None:
            return self.start + i0, self.start + i1 - 1
        block = self.qpos[i0:i1]
        return int(block.min()), int(block.max())

    # -- the block map ----------------------------------------------------------------------------

    def key_spans(self, i0: int, i1: int, chunk: int) -> list[tuple[int, int, bool]]:
        """Key ranges that rows ``[i0, i1)`` may see, as ``(j0, j1, full)`` chunks of <= ``chunk``.

        Chunks hold at most ``max_span(chunk)`` keys.
        ``full`` means every row of the block sees every key of the chunk (for every batch and
        head), so it needs no mask. Keys outside the returned chunks are invisible to all rows.
        Causal and window bounds come from the row positions; masks and segment ids are read per
        granule of ``GRANULE`` keys (any/all over the block), so their empty granules are skipped.
        """
        pmin, pmax = self._pos_bounds(i0, i1)
        lo, hi = 0, self.Nk
        full_lo, full_hi = 0, self.Nk
        if self.causal:
            hi, full_hi = min(hi, pmax + 1), min(full_hi, pmin + 1)
        if self.right is not None:
            hi, full_hi = min(hi, pmax + self.right + 1), min(full_hi, pmin + self.right + 1)
        if self.left is not None:
            lo, full_lo = max(lo, pmin - self.left), max(full_lo, pmax - self.left)
        lo, hi = max(lo, 0), min(hi, self.Nk)
        full_lo, full_hi = max(full_lo, lo), min(full_hi, hi)
        if lo >= hi:
            return []
        if self.mask is None and self.q_ids is None:
            parts = [(lo, full_lo, False), (full_lo, full_hi, True), (full_hi, hi, False)]
            if full_lo >= full_hi:
                parts = [(lo, hi, False)]
        else:
            parts = self._data_parts(i0, i1, lo, hi, full_lo, full_hi)
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
        self, i0: int, i1: int, lo: int, hi: int, full_lo: int, full_hi: int
    ) -> list[tuple[int, int, bool]]:
        """Split ``[lo, hi)`` by what the mask and segment ids say per granule of keys."""
        g = GRANULE
        g_lo, g_hi = lo // g, -(-hi // g)
        any_vis = torch.ones(g_hi - g_lo, dtype=torch.bool)
        all_vis = torch.ones(g_hi - g_lo, dtype=torch.bool)
        if self.mask is not None:
            a, b = _granule_any_all(self.mask[:, :, _rows(self.mask, i0, i1)], g, g_lo, g_hi)
            any_vis &= a
            all_vis &= b
        if self.q_ids is not None:
            a, b = self._segment_granules(i0, i1, g_lo, g_hi)
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
        self, i0: int, i1: int, g_lo: int, g_hi: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per key granule: may any (row, key) pair match, and do all of them match?"""
        g = GRANULE
        big = torch.iinfo(torch.int64).max
        q = self.q_ids[:, i0:i1].long().cpu()  # (B, M)
        q_real = q >= 0
        q_any = q_real.any(1)  # (B,)
        q_all = q_real.all(1)
        qmin = torch.where(q_real, q, big).amin(1)
        qmax = torch.where(q_real, q, -big).amax(1)
        kv = self.kv_ids[:, g_lo * g : g_hi * g].long().cpu()  # (B, <= ng*g)
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

    # -- tiles -------------------------------------------------------------------------------------

    def visible(
        self, i0: int, i1: int, j0: int, j1: int, device: torch.device | str
    ) -> torch.Tensor | None:
        """Visibility of rows ``[i0, i1)`` x keys ``[j0, j1)``: bool, broadcastable to
        (B, H, i1-i0, j1-j0); None when every key is visible."""
        vis: torch.Tensor | None = None
        if self.causal or self.left is not None or self.right is not None:
            i_abs = self.positions(i0, i1, device)[:, None]  # (M, 1)
            j = torch.arange(j0, j1, device=device)[None, :]  # (1, N)
            if self.causal:
                vis = j <= i_abs
            if self.right is not None:
                ok = j <= i_abs + self.right
                vis = ok if vis is None else vis & ok
            if self.left is not None:
                ok = j >= i_abs - self.left
                vis = ok if vis is None else vis & ok
            vis = vis[None, None]  # (1, 1, M, N)
        if self.mask is not None:
            m = self.mask[:, :, _rows(self.mask, i0, i1), _cols(self.mask, j0, j1)]
            vis = m if vis is None else vis & m
        if self.q_ids is not None:
            qi = self.q_ids[:, i0:i1, None]
            kj = self.kv_ids[:, None, j0:j1]
            same = ((qi == kj) & (qi >= 0) & (kj >= 0))[:, None]  # (B, 1, M, N)
            vis = same if vis is None else vis & same
        return vis

    def dense_visible(self, device: torch.device | str) -> torch.Tensor | None:
        """The whole visibility matrix, broadcastable to (B, H, M, Nk), or None (all visible)."""
        if not self.restricts:
            return None
        return self.visible(0, self.M, 0, self.Nk, device)

    def bias_tile(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """The bias of rows ``[i0, i1)`` x keys ``[j0, j1)``, broadcastable to (B, H, M, N)."""
        b = self.bias
        return b[:, :, _rows(b, i0, i1), _cols(b, j0, j1)]

    def alibi_distance(self, i0: int, i1: int, j0: int, j1: int, device, dtype) -> torch.Tensor:
        """``|i' - j|`` for rows ``[i0, i1)`` x keys ``[j0, j1)``, (M, N)."""
        i_abs = self.positions(i0, i1, device)[:, None]
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
