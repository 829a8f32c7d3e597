"""The engine's attention statistics: reductions of ``exp(S - lse)`` tile by tile, never holding
the (Nq, Nk) probabilities (``selfattn.attention_stats`` on ``tiled``).

Each score tile comes from the same workspace and epilogue as :func:`forward.probabilities`
(the lse rides in the GEMM as the forward's running maximum does), so ``S - lse`` is the
natural-log probability of each visible pair and ``-inf`` for the rest. A tile then feeds the
top-k merge (on ``log p``: underflowed but visible keys still rank above hidden ones), and,
after one ``exp`` in place, the column sums and maxima and the row entropies.
"""

from __future__ import annotations

import math

import torch

from ..rules import key_spans
from .problem import BLOCK_N, Problem, acc_dtype
from .tiles import Scores, key_matrix, query_block

__all__ = ["statistics"]


def statistics(
    prob: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    col_sum: bool,
    col_max: bool,
    entropy: bool,
    topk: int,
) -> dict[str, torch.Tensor]:
    """Exact reductions of the probabilities ``p = exp(s - lse)`` of every row of q.

    Args:
        prob: the problem (its dropout is ignored: the statistics are before dropout).
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); lse: (B, Hq, Nq) natural log (-inf: the row sees
            nothing).
        col_sum, col_max, entropy, topk: what to compute (docs/api.md, ``attention_stats``).

    Returns:
        Only the keys asked for: ``col_sum`` / ``col_max`` (B, Hq, Nk), ``entropy`` (B, Hq, Nq),
        ``topk_index`` (B, Hq, Nq, topk) int64 and ``topk_p`` (B, Hq, Nq, topk); float32.
    """
    prob, k, _ = prob.sanitize(k, None)
    spec = prob.spec
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, d = q.shape
    hkv, g, nk = spec.Hkv, spec.group, k.shape[2]
    dev = q.device
    kmat = key_matrix(k, acc_t)
    lse2 = torch.where(torch.isneginf(lse), math.inf, lse.to(acc_t))  # +inf: every p is 0
    csum = torch.zeros(b, h, nk, dtype=acc_t, device=dev) if col_sum else None
    cmax = torch.zeros(b, h, nk, dtype=acc_t, device=dev) if col_max else None
    ent = torch.zeros(b, h, m_total, dtype=acc_t, device=dev) if entropy else None
    top_lp = top_ix = None
    if topk:
        top_lp = torch.full((b, h, m_total, topk), -math.inf, dtype=acc_t, device=dev)
        top_ix = torch.full((b, h, m_total, topk), -1, dtype=torch.long, device=dev)
    bm = prob.block_m()
    scores = Scores(prob, g * bm, kmat, buffers=1)
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        qb = query_block(q, i0, i1, hkv, prob.qscale)  # (B*Hkv, G*m, D+1)
        lse_b = lse2[:, :, i0:i1].reshape(b * hkv, g * m, 1)
        if spec.softcap is None:
            qb[..., d : d + 1] = -lse_b  # the GEMM yields s - lse
        # ascending keys: the top-k merge keeps ties in index order (lower index first)
        for j0, j1, full in sorted(key_spans(spec, i0, i1, BLOCK_N)):
            s, _ = scores(qb, i0, i1, j0, j1, full)
            if spec.softcap is not None:
                s.sub_(lse_b)
            logp = s.view(b, h, m, j1 - j0)  # natural-log probabilities, -inf where hidden
            if topk:
                _merge_topk(top_lp[:, :, i0:i1], top_ix[:, :, i0:i1], logp, j0)
            p = torch.exp(logp, out=logp)  # (B, Hq, m, n), in the score workspace
            if csum is not None:
                csum[:, :, j0:j1] += p.sum(2)
            if cmax is not None:
                torch.maximum(cmax[:, :, j0:j1], p.amax(2), out=cmax[:, :, j0:j1])
            if ent is not None:
                ent[:, :, i0:i1] += torch.special.entr(p).sum(-1)
    got: dict[str, torch.Tensor] = {}
    if csum is not None:
        got["col_sum"] = csum.float()
    if cmax is not None:
        got["col_max"] = cmax.float()
    if ent is not None:
        got["entropy"] = ent.float()
    if topk:
        hidden = torch.isneginf(top_lp)  # fewer visible keys than topk
        got["topk_index"] = top_ix.masked_fill_(hidden, -1)
        got["topk_p"] = torch.exp(top_lp).float()
    return got


def _merge_topk(best_lp: torch.Tensor, best_ix: torch.Tensor, logp: torch.Tensor, j0: int) -> None:
    """Merge one tile of keys into the running top-k of its rows, in place.

    best_lp / best_ix (B, Hq, m, k): the running best, highest first; logp (B, Hq, m, n): keys
    ``j0 .. j0 + n - 1``, all above the running ones' indices. A stable sort of [running, tile]
    keeps equal probabilities in index order, so ties go to the lower index.
    """
    kk = best_lp.shape[-1]
    n = logp.shape[-1]
    idx = torch.arange(j0, j0 + n, device=logp.device).expand(logp.shape)
    cand_lp = torch.cat([best_lp, logp], -1)
    cand_ix = torch.cat([best_ix, idx], -1)
    vals, order = torch.sort(cand_lp, dim=-1, descending=True, stable=True)
    best_lp.copy_(vals[..., :kk])
    best_ix.copy_(cand_ix.gather(-1, order[..., :kk]))
