"""Tiles of the torch-op engine: the operand matrices, the score workspace and dropout tiles.

Scores are computed in natural-log units (the row maximum or the lse is subtracted before
``exp``, so no score near the float32 maximum overflows) into one reusable workspace per problem: fresh multi-megabyte
tensors cost page faults on every allocation (as much as the matrix product itself at these
sizes). Subtractions ride inside the GEMMs: keys (and values, in backward) carry a column of
ones, queries a column holding ``-m_i``, ``-lse`` or ``-D``.
"""

from __future__ import annotations

import math

import torch

from .. import _rng
from ..rules import alibi_distance, bias_tile, heads5, max_span, visible
from .problem import BLOCK_N, Problem, acc_dtype

__all__ = ["Scores", "bad_values", "dropout_scale", "key_matrix", "kv_matrix", "query_block"]


def kv_matrix(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(B, Hkv, Nk, X) -> (B*Hkv, Nk, X) in the accumulation dtype (a view when possible)."""
    b, h, n, x = t.shape
    return t.to(acc).reshape(b * h, n, x)


def key_matrix(k: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(B, Hkv, Nk, D) -> (B*Hkv, Nk, D + 1): the keys and a column of ones.

    With the matching query column holding ``-shift`` (see :func:`query_block`), one matrix
    product gives ``q @ k^T - shift``: the running maximum (forward) or the lse (backward) is
    subtracted inside the GEMM instead of in a separate pass over the scores.
    """
    b, h, n, d = k.shape
    kmat = torch.empty(b * h, n, d + 1, dtype=acc, device=k.device)
    kmat[..., :d] = k.reshape(b * h, n, d)
    kmat[..., d] = 1.0
    return kmat


def query_block(q: torch.Tensor, i0: int, i1: int, hkv: int, qscale: float) -> torch.Tensor:
    """Rows [i0, i1) of q (B, Hq, Nq, D), scaled, as (B*Hkv, G*m, D + 1) with a zero shift column."""
    b, h, _, d = q.shape
    m = i1 - i0
    g = h // hkv
    qb = torch.empty(b * hkv, g * m, d + 1, dtype=acc_dtype(q.dtype), device=q.device)
    rows = q[:, :, i0:i1].reshape(b * hkv, g * m, d)
    if rows.dtype == qb.dtype:
        torch.mul(rows, qscale, out=qb[..., :d])
    else:
        qb[..., :d] = rows  # cast first: scale in the accumulation dtype
        if qscale != 1.0:
            qb[..., :d].mul_(qscale)
    qb[..., d] = 0.0
    return qb


class Scores:
    """Computes score tiles for one problem into a reusable workspace.

    Causal/window masks are additive (0 / -inf) tiles cached by their geometry: adding is an
    order of magnitude faster than ``masked_fill_`` on the CPU.
    """

    def __init__(self, prob: Problem, qb_rows: int, kmat: torch.Tensor, buffers: int):
        self.prob, self.spec, self.kmat = prob, prob.spec, kmat
        spec = prob.spec
        # one tile at most: rows of a block (fewer when the problem is short) x the widest span
        rows = min(qb_rows, spec.group * spec.Nq)
        size = kmat.shape[0] * rows * min(max_span(BLOCK_N), kmat.shape[1])
        self.bufs = [
            torch.empty(size, dtype=kmat.dtype, device=kmat.device) for _ in range(buffers)
        ]
        self.cache: dict[tuple[int, int, int], torch.Tensor] = {}
        # additive masks are exact unless a score can be NaN/inf before masking
        self.additive = spec.bias is None and prob.bad is None
        self.cacheable = spec.qpos is None and spec.mask is None and spec.q_ids is None

    def buffer(self, idx: int, rows: int, n: int) -> torch.Tensor:
        """A contiguous (B*Hkv, rows, n) view of workspace ``idx``."""
        bh = self.kmat.shape[0]
        return self.bufs[idx][: bh * rows * n].view(bh, rows, n)

    def _mask(self, i0: int, i1: int, j0: int, j1: int, device) -> torch.Tensor | None:
        """Additive 0/-inf visibility of the tile, broadcastable to (B, Hkv, G, m, n)."""
        spec = self.spec
        key = (spec.start + i0 - j0, i1 - i0, j1 - j0)
        if self.cacheable and key in self.cache:
            return self.cache[key]
        vis = visible(spec, i0, i1, j0, j1, device)
        if vis is None:
            return None
        zero = torch.zeros((), dtype=self.kmat.dtype, device=device)
        add = torch.where(heads5(vis, spec.Hkv, spec.group), zero, -math.inf)
        if self.cacheable:
            if len(self.cache) > 64:
                self.cache.clear()
            self.cache[key] = add
        return add

    def __call__(
        self,
        qb: torch.Tensor,
        i0: int,
        i1: int,
        j0: int,
        j1: int,
        full: bool,
        buf: int = 0,
        keep_tanh: bool = False,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores of rows [i0, i1) x keys [j0, j1), invisible ones -inf.

        Returns ``(s, t)``: s (B*Hkv, G*m, n), a view of workspace ``buf`` (or ``out``, a
        contiguous tensor of that shape, when given), and with ``keep_tanh`` the softcap's tanh
        (for its derivative), else None.
        """
        spec, bad = self.spec, self.prob.bad
        b, hkv, g, m, n = spec.B, spec.Hkv, spec.group, i1 - i0, j1 - j0
        dest = self.buffer(buf, g * m, n) if out is None else out
        s = torch.bmm(qb, self.kmat[:, j0:j1].transpose(1, 2), out=dest)
        s5 = s.view(b, hkv, g, m, n)
        t = None
        if spec.softcap is not None:
            if self.prob.cap_div:  # a tiny softcap: q holds the scale alone
                s.div_(spec.softcap)
            s.tanh_()
            if keep_tanh:
                t = s.clone()
            s.mul_(spec.softcap)
        if spec.bias is not None:
            bias = heads5(bias_tile(spec, i0, i1, j0, j1), hkv, g)
            s5.add_(bias.to(s.dtype))
        if spec.alibi_slopes is not None:
            slopes = spec.alibi_slopes.to(s.dtype).reshape(-1, hkv, g, 1, 1)
            dist = alibi_distance(spec, i0, i1, j0, j1, s.device, s.dtype)
            s5.addcmul_(slopes, dist, value=-1.0)
        if bad is not None:
            s5.masked_fill_(bad[:, :, None, None, j0:j1], math.nan)
        if not full:
            if self.additive:
                add = self._mask(i0, i1, j0, j1, s.device)
                if add is not None:
                    s5.add_(add)
            else:
                vis = visible(spec, i0, i1, j0, j1, s.device)
                if vis is not None:
                    s5.masked_fill_(~heads5(vis, hkv, g), -math.inf)
        return s, t


def dropout_scale(
    prob: Problem, i0: int, i1: int, j0: int, j1: int, like: torch.Tensor
) -> torch.Tensor:
    """keep / (1 - p) for the tile, (B*Hkv, G*m, n), from the counter-based hash."""
    drop, spec = prob.dropout, prob.spec
    b, hkv, g, m = spec.B, spec.Hkv, spec.group, i1 - i0
    device = like.device
    heads = torch.arange(drop.h0, drop.h0 + hkv * g, device=device).view(1, hkv, g, 1)
    batch = torch.arange(drop.b0, drop.b0 + b, device=device).view(b, 1, 1, 1)
    rows = torch.arange(drop.r0 + i0, drop.r0 + i1, device=device).view(1, 1, 1, m)
    row_ids = ((batch * drop.hq_total + heads) * drop.nq_total + rows).reshape(b * hkv, g * m, 1)
    keep = _rng.keep_mask(drop.seed, row_ids, torch.arange(j0, j1, device=device), drop.p)
    return keep.to(like.dtype).mul_(1.0 / (1.0 - drop.p))


def bad_values(p: torch.Tensor, seen: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What ``p @ v`` adds for value rows holding NaN/inf, exactly as the formula says for the
    rows that see them and nothing for the rows that do not (a matrix product would give those
    ``0 * NaN``). The rows are zeroed in the product itself (``Problem.sanitize``), so their
    finite entries are added here too.

    Args:
        p: (..., M, n) probabilities of the n keys (after dropout).
        seen: (..., M, n) bool, whether each row sees each key.
        v: (..., n, Dv) the keys' raw value rows.

    Returns:
        (..., M, Dv): NaN where a seen ``v[j, c]`` is NaN, is +-inf times a zero probability, or
        where +inf and -inf meet; +-inf where a seen +-inf meets p > 0; else the finite sum.
    """
    dt = p.dtype
    finite = torch.isfinite(v)
    part = torch.where(seen, p, 0) @ torch.where(finite, v, 0)
    nan = torch.isnan(v).to(dt)
    up_v, down_v = (v == math.inf).to(dt), (v == -math.inf).to(dt)
    pos = (seen & (p > 0)).to(dt)
    zero = (seen & (p == 0)).to(dt)
    poisoned = (seen.to(dt) @ nan + zero @ (up_v + down_v)) > 0
    up, down = (pos @ up_v) > 0, (pos @ down_v) > 0
    out = part.expand(poisoned.shape).clone()
    out.masked_fill_(up, math.inf).masked_fill_(down, -math.inf)
    return out.masked_fill_(poisoned | (up & down), math.nan)
