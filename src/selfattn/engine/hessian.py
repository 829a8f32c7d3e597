"""The engine's double backward: the gradient of the first-order backward, tile by tile.

The first-order backward (``backward.py``) maps ``(q, k, v, out, lse, dO, dlse)`` to
``(dq, dk, dv, dbias, dalibi)``. Given cotangents ``(Qc, Kc, Vc, Bc, Ac)`` of those, this is
its vector-Jacobian product with ``out`` and ``lse`` taken as independent inputs (autograd
carries their own dependence on q, k, v through the forward's node). With ``P = exp(S - lse)``,
``dP = dO V^T``, ``D = rowsum(dO * O) - dlse``, ``dS = P (dP - D)``, ``t' = 1 - tanh^2`` (1
without softcap) and ``dU = dS t'`` (docs/derivatives.md)::

    R  = scale (Qc K^T + Q Kc^T) t' + Bc - Ac |i' - j|     (the scores' "tangent" along Qc, Kc)
    W  = dO Vc^T
    X  = (dP - D) R + W,   PX = P X                          (dL/dS with lse held)
    U  = PX t' - 2 dS scale (Qc K^T + Q Kc^T) t' tanh / softcap
    q-bar  = scale (U K + dU Kc)        k-bar  = scale (U^T Q + dU^T Qc)
    dO-bar = (P R) V + P Vc - r O       v-bar  = (P R)^T dO
    out-bar = -r dO,  dlse-bar = r,  lse-bar = -rowsum(PX),  bias-bar = PX,  slope-bar = -PX |i' - j|

with ``r = rowsum(P R)``. Every term is a tile product; one pass, O(N) memory beyond a tile.

With ``fold`` the forward's own backward of ``(out-bar, lse-bar)`` runs in the same pass
instead of as a second first-order backward through the forward's node: its ``dS`` is
``a dS + c P`` per row, ``a = -r``, ``c = lse-bar + r dlse``, so it adds ``t' (a dS + c P)`` to
``U`` and ``a P`` to ``P R``. ``r`` and ``lse-bar`` are row sums, known only once a block of rows
has met every key, so such a block keeps its tiles (a band of rows; O(N) memory) and does its
key-side products (``U K``, ``U^T Q``, ``(P R)^T dO``) at the end of the block.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..rules import alibi_distance, key_spans
from .backward import accumulate_dbias, bias_index
from .problem import BLOCK_N, Problem, acc_dtype
from .tangent import block_rows, scaled_rows, score_tangent
from .threads import Rect, head_slices, run_jobs, split
from .tiles import Scores, key_matrix, kv_matrix, query_block

__all__ = ["HessianGrads", "double_backward"]

# (q, k, v, dout, dlse, out, lse, bias, alibi) bars; None where not asked for
HessianGrads = tuple[torch.Tensor | None, ...]

# With ``fold`` a block of rows keeps its tiles until its row sums are known: the rows of a
# block are cut so that one of its tiles spans at most FOLD_BAND scores (several tiles are kept,
# so a worker holds a few times this), but no fewer than FOLD_MIN_ROWS rows. Beyond FOLD_MAX_KEYS
# keys such a band would outgrow the tiles of an unfolded pass: the pass does not fold then.
FOLD_BAND = 1 << 20
FOLD_MIN_ROWS = 32
FOLD_MAX_KEYS = 8192
# Keys per tile when folding: the kept tiles are revisited once more, and fewer, wider tiles
# cost less per-op work (N=2048 H8: 15% less CPU time than 512-key tiles in one thread).
FOLD_CHUNK = 2048


def double_backward(
    prob: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    gq: torch.Tensor | None,
    gk: torch.Tensor | None,
    gv: torch.Tensor | None,
    gbias: torch.Tensor | None,
    galibi: torch.Tensor | None,
    need_bias: bool = False,
    need_alibi: bool = False,
    threads: bool = False,
    need_dout: bool = True,
    fold: bool = False,
) -> HessianGrads:
    """The VJP of the first-order backward.

    Args:
        prob: the problem (no dropout: its second derivative is declined upstream).
        q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), out (B, Hq, Nq, Dv), lse
            (B, Hq, Nq), dout like out, dlse like lse or None: the first-order backward's inputs.
        gq, gk, gv: cotangents of dq, dk, dv (None for zero); gbias shaped like ``spec.bias``,
            galibi like the slopes (cotangents of dbias, dalibi), or None.
        need_bias, need_alibi: whether to return the bias / slope gradients.
        threads: the tensors are plain (no torch.func wrappers): split the call across the
            engine's worker threads (``threads.split``), summing what parts share.
        need_dout: whether to return dout's gradient (two products a tile; a gradient penalty
            whose dout is a constant needs none).
        fold: also apply the forward's own backward to the ``out`` and ``lse`` gradients, in
            the same pass, and add it to the q, k, v, bias and slope gradients (the caller then
            passes nothing to the forward's node; only valid where that node's backward is the
            first-order backward of the same problem and nothing else, e.g. no sink gradient).
            Declined (out's and lse's gradients returned) beyond ``FOLD_MAX_KEYS`` keys.

    Returns:
        ``(q, k, v, dout, dlse, out, lse, bias, alibi)`` gradients in the accumulation dtype
        (dout's None unless ``need_dout``; dlse's None when ``dlse`` is None; out's and lse's
        None with ``fold``; bias/alibi None unless asked for).
    """
    args = (q, k, v, out, lse, dout, dlse, gq, gk, gv)
    plan = split(prob, k.shape[2]) if threads and q.device.type == "cpu" else None
    fold = fold and k.shape[2] <= FOLD_MAX_KEYS
    flags = (need_bias, need_alibi, need_dout, fold)
    if plan is None:
        return _double_part(prob, *args, gbias, galibi, *flags)
    spec, g = prob.spec, prob.spec.group
    # the cotangents of dbias and dalibi cut like the primal bias and slopes: a spec holding them
    gspec = replace(spec, bias=gbias, alibi_slopes=galibi)

    def job(rects: list[Rect]) -> list:
        done = []
        with torch.no_grad():
            for rect in rects:
                bs, hs, ks, rs = head_slices(rect, g)
                rows = (bs, hs, rs)
                cut = [
                    None if t is None else t[(bs, ks) if i in (1, 2, 8, 9) else rows]
                    for i, t in enumerate(args)
                ]
                gpart = gspec.part(*rect)
                part = prob.part(*rect)
                got = _double_part(part, *cut, gpart.bias, gpart.alibi_slopes, *flags)
                done.append((rect, got))
        return done

    results = [r for done in run_jobs(job, plan[0]) for r in done]
    return _gather(prob, q, k, v, results, shared=plan[1])


def _gather(prob: Problem, q, k, v, results: list, shared: bool):
    """The parts' results in whole-call tensors: rows written, key/value heads written (summed
    when parts share them: a row split), bias and slopes summed (in this thread, so nothing
    races)."""
    spec, g = prob.spec, prob.spec.group
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, d = q.shape
    dv_dim = v.shape[-1]
    new = {"device": q.device, "dtype": acc_t}
    first = results[0][1]  # which results exist is the same in every part

    def rows_like(i: int, *tail: int) -> torch.Tensor | None:
        return None if first[i] is None else torch.empty(b, h, m_total, *tail, **new)

    qbar = torch.empty(b, h, m_total, d, **new)
    kbar = torch.zeros(k.shape, **new) if shared else torch.empty(k.shape, **new)
    vbar = torch.zeros(v.shape, **new) if shared else torch.empty(v.shape, **new)
    dobar, rbar = rows_like(3, dv_dim), rows_like(4)
    obar, lsebar = rows_like(5, dv_dim), rows_like(6)
    bbar = None if first[7] is None else torch.zeros(spec.bias.shape, **new)
    abar = None if first[8] is None else torch.zeros(spec.alibi_slopes.shape, **new)
    for rect, (qb, kb, vb, dob, rb, ob, lb, bb, ab) in results:
        bs, hs, ks, rs = head_slices(rect, g)
        qbar[bs, hs, rs] = qb
        if shared:
            kbar[bs, ks] += kb
            vbar[bs, ks] += vb
        else:  # a split by heads: every key/value head belongs to one part
            kbar[bs, ks] = kb
            vbar[bs, ks] = vb
        for whole, got in ((dobar, dob), (rbar, rb), (obar, ob), (lsebar, lb)):
            if whole is not None:
                whole[bs, hs, rs] = got
        if bb is not None:
            bbar[bias_index(bbar, rect, g)] += bb
        if ab is not None:
            abar[bs if abar.shape[0] > 1 else slice(None), hs] += ab
    return (qbar, kbar, vbar, dobar, rbar, obar, lsebar, bbar, abar)


class _Band:
    """Contiguous tiles carved one after another from one flat buffer, reused across row blocks
    (fresh multi-megabyte tensors cost page faults on every allocation, see ``tiles.py``)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.flat = torch.empty(0, dtype=dtype, device=device)
        self.used = 0

    def reserve(self, size: int) -> None:
        """Start over with room for ``size`` elements (tiles taken before are given up)."""
        if self.flat.numel() < size:
            self.flat = torch.empty(size, dtype=self.flat.dtype, device=self.flat.device)
        self.used = 0

    def take(self, *shape: int) -> torch.Tensor:
        size = math.prod(shape)
        view = self.flat[self.used : self.used + size].view(shape)
        self.used += size
        return view


def _double_part(
    prob: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    gq: torch.Tensor | None,
    gk: torch.Tensor | None,
    gv: torch.Tensor | None,
    gbias: torch.Tensor | None,
    galibi: torch.Tensor | None,
    need_bias: bool,
    need_alibi: bool,
    need_dout: bool,
    fold: bool,
) -> HessianGrads:
    """:func:`double_backward` of one (sub-)problem in the calling thread."""
    spec = prob.spec
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, d = q.shape
    hkv, g = spec.Hkv, spec.group
    prob, k, v = prob.sanitize(k, v)
    nk, dv_dim = k.shape[2], v.shape[-1]
    dev = q.device
    new = {"dtype": acc_t, "device": dev}
    kmat = key_matrix(k, acc_t)  # (B*Hkv, Nk, D+1)
    vmat = key_matrix(v, acc_t)  # (B*Hkv, Nk, Dv+1): dO's column -D makes the GEMM dP - D
    # the keys and values alone (views of k, v when they are contiguous in acc_t): products
    # reading rows of D floats run about a third faster than over the D + 1 columns' views
    kraw, vraw = kv_matrix(k, acc_t), kv_matrix(v, acc_t)
    gkmat = kv_matrix(gk, acc_t) if gk is not None else None
    gvmat = kv_matrix(gv, acc_t) if gv is not None else None
    qbar = torch.empty(b, h, m_total, d, **new)
    kbar = torch.zeros(b * hkv, nk, d, **new)
    vbar = torch.zeros(b * hkv, nk, dv_dim, **new)
    dobar = torch.empty(b, h, m_total, dv_dim, **new) if need_dout else None
    rbar = torch.empty(b, h, m_total, **new) if dlse is not None else None  # r: dlse's gradient
    obar = None if fold else torch.empty(b, h, m_total, dv_dim, **new)
    lsebar = None if fold else torch.empty(b, h, m_total, **new)
    bbar = torch.zeros(spec.bias.shape, **new) if need_bias else None
    abar = torch.zeros(spec.alibi_slopes.shape, **new) if need_alibi else None
    delta = (dout.to(acc_t) * out.to(acc_t)).sum(-1)  # (B, Hq, Nq)
    if dlse is not None:
        delta = delta - dlse.to(acc_t)
    lse2 = torch.where(torch.isneginf(lse), math.inf, lse.to(acc_t))  # +inf: p = 0
    bm = prob.block_m()
    if fold:  # a row block keeps every tile until its row sums are known: bound the band
        bm = max(FOLD_MIN_ROWS // g, min(bm, FOLD_BAND // max(1, b * hkv * g * nk)), 1)
    scores = Scores(prob, g * bm, kmat, buffers=0)  # tiles come from the band
    cap = spec.softcap
    in_gemm = cap is None  # a softcap's tanh comes between the GEMM and the lse's shift
    keep = need_bias or need_alibi
    tiles_per_key = 4 + (3 if cap is not None else 0) + (2 if fold and keep else 0)
    band = _Band(acc_t, dev)
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        rows = (b * hkv, g * m)
        spans = key_spans(spec, i0, i1, FOLD_CHUNK if fold else BLOCK_N)
        widest = max((j1 - j0 for j0, j1, _ in spans), default=0)
        width = sum(j1 - j0 for j0, j1, _ in spans) if fold else widest
        band.reserve(tiles_per_key * rows[0] * rows[1] * width)
        qb = query_block(q, i0, i1, hkv, prob.qscale)  # (B*Hkv, G*m, D+1)
        lse_b = lse2[:, :, i0:i1].reshape(*rows, 1)
        if in_gemm:  # q's shift column holds -lse: the scores GEMM gives S - lse
            qb[..., d : d + 1].copy_(lse_b).neg_()
        # the query sides of R and of k-bar, scaled here (a block of rows) rather than per tile
        q_s = scaled_rows(q, i0, i1, hkv, acc_t, spec.scale)  # (B*Hkv, G*m, D)
        gq_s = scaled_rows(gq, i0, i1, hkv, acc_t, spec.scale) if gq is not None else None
        do1 = torch.empty(*rows, dv_dim + 1, **new)  # dO and -D: (B*Hkv, G*m, Dv+1)
        do_b = block_rows(dout, i0, i1, hkv, acc_t)  # (B*Hkv, G*m, Dv), contiguous for W, v-bar
        do1[..., :dv_dim] = do_b
        do1[..., dv_dim] = delta[:, :, i0:i1].reshape(rows).neg()
        qbar_b = torch.zeros(*rows, d, **new)
        dobar_b = torch.zeros(*rows, dv_dim, **new) if need_dout else None
        r_b = torch.zeros(*rows, 1, **new)
        lsebar_b = torch.zeros(*rows, 1, **new)
        held = []
        for j0, j1, full in spans:
            n = j1 - j0
            if not fold:
                band.reserve(tiles_per_key * rows[0] * rows[1] * n)
            s, t = scores(qb, i0, i1, j0, j1, full, keep_tanh=True, out=band.take(*rows, n))
            if not in_gemm:
                s.sub_(lse_b)
            p = s.exp_()  # (B*Hkv, G*m, n)
            kc = kraw[:, j0:j1]
            # R before t': scale (Qc K^T + Q Kc^T), the scores' tangent along the cotangents
            ru = band.take(*rows, n)
            if gq_s is not None:
                torch.bmm(gq_s, kc.transpose(1, 2), out=ru)
                if gkmat is not None:
                    ru.baddbmm_(q_s, gkmat[:, j0:j1].transpose(1, 2))
            elif gkmat is not None:
                torch.bmm(q_s, gkmat[:, j0:j1].transpose(1, 2), out=ru)
            else:
                ru.zero_()
            tp = None
            if t is not None:
                tp = t.mul(t).neg_().add_(1.0)  # t' = 1 - tanh^2
                big_r = torch.mul(ru, tp, out=band.take(*rows, n))
            else:
                big_r = ru
            if gbias is not None or galibi is not None:
                big_r.add_(
                    score_tangent(spec, None, None, kmat, None, gbias, galibi, None, i0, i1, j0, j1)
                )
            x = torch.bmm(do1, vmat[:, j0:j1].transpose(1, 2), out=band.take(*rows, n))  # dP - D
            ds = torch.mul(p, x, out=band.take(*rows, n))  # dS
            x.mul_(big_r)  # (dP - D) R
            if gvmat is not None:
                x.baddbmm_(do_b, gvmat[:, j0:j1].transpose(1, 2))  # + W = dO Vc^T
            px = x.mul_(p)  # dL/dS with lse held
            pr = big_r.mul_(p)  # P R
            r_b.add_(pr.sum(-1, keepdim=True))
            lsebar_b.sub_(px.sum(-1, keepdim=True))
            kept = None
            if keep and fold:  # the forward's own backward adds to these (below)
                kept = (band.take(*rows, n).copy_(px), band.take(*rows, n).copy_(ds))
            elif keep:
                _rule_bars(prob, bbar, abar, px, i0, i1, j0, j1)
            if tp is not None:
                # U = PX t' + dS R_u d(t')/du, d(t')/du = -2 tanh t' / softcap
                u = px.mul_(tp).sub_(ds * ru * t * tp * (2.0 / cap))
                du = ds.mul_(tp)
                pt = torch.mul(p, tp, out=band.take(*rows, n)) if fold else None
            else:
                u, du, pt = px, ds, p
            if gkmat is not None:
                qbar_b.baddbmm_(du, gkmat[:, j0:j1])  # dU Kc
            if gq_s is not None:
                kbar[:, j0:j1].baddbmm_(du.transpose(1, 2), gq_s)  # dU^T Qc
            if dobar_b is not None:
                dobar_b.baddbmm_(pr, vraw[:, j0:j1])  # (P R) V
                if gvmat is not None:
                    dobar_b.baddbmm_(p, gvmat[:, j0:j1])  # P Vc
            if fold:
                held.append((j0, j1, u, du, p, pt, pr, kept))
            else:
                _key_side(qbar_b, kbar, vbar, kc, q_s, do_b, u, pr, j0, j1)
        if fold:
            # the forward's backward of (out-bar, lse-bar) = (-r dO, lse-bar): its dS is
            # a dS + c P with a = -r, c = lse-bar + r dlse (docs/derivatives.md)
            a = r_b.neg()
            c = lsebar_b if dlse is None else lsebar_b + r_b * dlse_rows(dlse, i0, i1, hkv, acc_t)
            for j0, j1, u, du, p, pt, pr, kept in held:
                u.addcmul_(du, a).addcmul_(pt, c)
                pr.addcmul_(p, a)
                if kept is not None:
                    _rule_bars(
                        prob,
                        bbar,
                        abar,
                        kept[0].addcmul_(kept[1], a).addcmul_(p, c),
                        i0,
                        i1,
                        j0,
                        j1,
                    )
                _key_side(qbar_b, kbar, vbar, kraw[:, j0:j1], q_s, do_b, u, pr, j0, j1)
        qbar[:, :, i0:i1] = qbar_b.view(b, h, m, d)
        if dobar is not None:
            out_b = block_rows(out, i0, i1, hkv, acc_t)
            dobar[:, :, i0:i1] = dobar_b.sub_(r_b * out_b).view(b, h, m, dv_dim)
        if rbar is not None:
            rbar[:, :, i0:i1] = r_b.view(b, h, m)
        if not fold:
            obar[:, :, i0:i1] = (do_b * r_b).neg_().view(b, h, m, dv_dim)
            lsebar[:, :, i0:i1] = lsebar_b.view(b, h, m)
    qbar.mul_(spec.scale)
    return (
        qbar,
        kbar.view(b, hkv, nk, d),
        vbar.view(b, hkv, nk, dv_dim),
        dobar,
        rbar,
        obar,
        lsebar,
        bbar,
        abar,
    )


def dlse_rows(dlse: torch.Tensor, i0: int, i1: int, hkv: int, acc: torch.dtype) -> torch.Tensor:
    """Rows [i0, i1) of dlse (B, Hq, Nq) as (B*Hkv, G*m, 1)."""
    b, h, _ = dlse.shape
    return dlse[:, :, i0:i1].to(acc).reshape(b * hkv, (h // hkv) * (i1 - i0), 1)


def _key_side(qbar_b, kbar, vbar, kc, q_s, do_b, u, pr, j0: int, j1: int) -> None:
    """The products of a finished tile: q-bar += U K, k-bar += U^T Q (q scaled), v-bar += (P R)^T dO."""
    qbar_b.baddbmm_(u, kc)
    kbar[:, j0:j1].baddbmm_(u.transpose(1, 2), q_s)
    vbar[:, j0:j1].baddbmm_(pr.transpose(1, 2), do_b)


def _rule_bars(prob: Problem, bbar, abar, px: torch.Tensor, i0: int, i1: int, j0: int, j1: int):
    """The bias and slope gradients of a tile from its dL/dS (bias-bar = dL/dS)."""
    spec = prob.spec
    if bbar is not None:
        accumulate_dbias(bbar, px, prob, i0, i1, j0, j1)
    if abar is not None:
        b, hq, m = spec.B, spec.Hq, i1 - i0
        dist = alibi_distance(spec, i0, i1, j0, j1, px.device, px.dtype)
        per_head = (px.view(b, hq, m, j1 - j0) * dist).sum((2, 3))  # (B, Hq)
        abar -= per_head.sum(0, keepdim=True) if abar.shape[0] == 1 else per_head
