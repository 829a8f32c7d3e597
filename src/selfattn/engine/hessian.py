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
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..rules import alibi_distance, key_spans
from .backward import accumulate_dbias, bias_index
from .problem import BLOCK_N, Problem, acc_dtype
from .tangent import block_rows, score_tangent
from .threads import Rect, head_slices, run_jobs, split
from .tiles import Scores, key_matrix, kv_matrix, query_block

__all__ = ["HessianGrads", "double_backward"]

# (q, k, v, dout, dlse, out, lse, bias, alibi) bars; None where not asked for
HessianGrads = tuple[torch.Tensor | None, ...]


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

    Returns:
        ``(q, k, v, dout, dlse, out, lse, bias, alibi)`` gradients in the accumulation dtype
        (dlse's None when ``dlse`` is None; bias/alibi None unless asked for).
    """
    args = (q, k, v, out, lse, dout, dlse, gq, gk, gv)
    plan = split(prob, k.shape[2]) if threads and q.device.type == "cpu" else None
    if plan is None:
        return _double_part(prob, *args, gbias, galibi, need_bias, need_alibi)
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
                got = _double_part(
                    part, *cut, gpart.bias, gpart.alibi_slopes, need_bias, need_alibi
                )
                done.append((rect, got))
        return done

    results = [r for done in run_jobs(job, plan[0]) for r in done]
    return _gather(prob, q, k, v, dlse, results, need_bias, need_alibi)


def _gather(prob: Problem, q, k, v, dlse, results: list, need_bias: bool, need_alibi: bool):
    """The parts' results in whole-call tensors: rows written, shared key/value heads, bias
    and slopes summed (in this thread, so nothing races)."""
    spec, g = prob.spec, prob.spec.group
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, d = q.shape
    dv_dim = v.shape[-1]
    new = {"device": q.device, "dtype": acc_t}
    qbar = torch.empty(b, h, m_total, d, **new)
    kbar = torch.zeros(k.shape, **new)
    vbar = torch.zeros(v.shape, **new)
    dobar = torch.empty(b, h, m_total, dv_dim, **new)
    obar = torch.empty(b, h, m_total, dv_dim, **new)
    rbar = torch.empty(b, h, m_total, **new)
    lsebar = torch.empty(b, h, m_total, **new)
    bbar = torch.zeros(spec.bias.shape, **new) if need_bias else None
    abar = torch.zeros(spec.alibi_slopes.shape, **new) if need_alibi else None
    for rect, (qb, kb, vb, dob, rb, ob, lb, bb, ab) in results:
        bs, hs, ks, rs = head_slices(rect, g)
        qbar[bs, hs, rs] = qb
        kbar[bs, ks] += kb
        vbar[bs, ks] += vb
        dobar[bs, hs, rs] = dob
        obar[bs, hs, rs] = ob
        lsebar[bs, hs, rs] = lb
        if rb is not None:
            rbar[bs, hs, rs] = rb
        if bb is not None:
            bbar[bias_index(bbar, rect, g)] += bb
        if ab is not None:
            abar[bs if abar.shape[0] > 1 else slice(None), hs] += ab
    return (qbar, kbar, vbar, dobar, rbar if dlse is not None else None, obar, lsebar, bbar, abar)


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
) -> HessianGrads:
    """:func:`double_backward` of one (sub-)problem in the calling thread."""
    spec = prob.spec
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, d = q.shape
    hkv, g = spec.Hkv, spec.group
    prob, k, v = prob.sanitize(k, v)
    nk, dv_dim = k.shape[2], v.shape[-1]
    dev = q.device
    kmat = key_matrix(k, acc_t)
    vmat = kv_matrix(v, acc_t)
    gkmat = kv_matrix(gk, acc_t) if gk is not None else None
    gvmat = kv_matrix(gv, acc_t) if gv is not None else None
    qbar = torch.empty(b, h, m_total, d, dtype=acc_t, device=dev)
    kbar = torch.zeros(b * hkv, nk, d, dtype=acc_t, device=dev)
    vbar = torch.zeros(b * hkv, nk, dv_dim, dtype=acc_t, device=dev)
    dobar = torch.empty(b, h, m_total, dv_dim, dtype=acc_t, device=dev)
    obar = torch.empty(b, h, m_total, dv_dim, dtype=acc_t, device=dev)
    rbar = torch.empty(b, h, m_total, dtype=acc_t, device=dev)  # r: the dlse gradient
    lsebar = torch.empty(b, h, m_total, dtype=acc_t, device=dev)
    bbar = torch.zeros(spec.bias.shape, dtype=acc_t, device=dev) if need_bias else None
    abar = torch.zeros(spec.alibi_slopes.shape, dtype=acc_t, device=dev) if need_alibi else None
    delta = (dout.to(acc_t) * out.to(acc_t)).sum(-1)  # (B, Hq, Nq)
    if dlse is not None:
        delta = delta - dlse.to(acc_t)
    lse2 = torch.where(torch.isneginf(lse), math.inf, lse.to(acc_t))  # +inf: p = 0
    bm = prob.block_m()
    scores = Scores(prob, g * bm, kmat, buffers=1)
    cap = spec.softcap
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        rows = (b * hkv, g * m)
        qb = query_block(q, i0, i1, hkv, prob.qscale)  # (B*Hkv, G*m, D+1)
        q_raw = block_rows(q, i0, i1, hkv, acc_t)  # (B*Hkv, G*m, D)
        gq_b = block_rows(gq, i0, i1, hkv, acc_t) if gq is not None else None
        do_b = block_rows(dout, i0, i1, hkv, acc_t)  # (B*Hkv, G*m, Dv)
        lse_b = lse2[:, :, i0:i1].reshape(*rows, 1)
        delta_b = delta[:, :, i0:i1].reshape(*rows, 1)
        qbar_b = torch.zeros(*rows, d, dtype=acc_t, device=dev)
        dobar_b = torch.zeros(*rows, dv_dim, dtype=acc_t, device=dev)
        r_b = torch.zeros(*rows, 1, dtype=acc_t, device=dev)
        lsebar_b = torch.zeros(*rows, 1, dtype=acc_t, device=dev)
        for j0, j1, full in key_spans(spec, i0, i1, BLOCK_N):
            s, t = scores(qb, i0, i1, j0, j1, full, keep_tanh=True)
            p = torch.exp(s.sub_(lse_b), out=s)  # (B*Hkv, G*m, n)
            kc, vc = kmat[:, j0:j1, :d], vmat[:, j0:j1]
            # the score-space part of R before t' (its softcap derivative needs it alone)
            ru = score_tangent(spec, q_raw, gq_b, kmat, gkmat, None, None, None, i0, i1, j0, j1)
            tp = None if t is None else 1.0 - t * t
            big_r = ru * tp if tp is not None else ru.clone()
            if gbias is not None or galibi is not None:
                big_r.add_(
                    score_tangent(spec, None, None, kmat, None, gbias, galibi, None, i0, i1, j0, j1)
                )
            dmd = torch.bmm(do_b, vc.transpose(1, 2)).sub_(delta_b)  # dP - D
            ds = p * dmd  # dS
            x = dmd.mul_(big_r)  # (dP - D) R
            if gvmat is not None:
                x.baddbmm_(do_b, gvmat[:, j0:j1].transpose(1, 2))  # + W = dO Vc^T
            px = x.mul_(p)  # dL/dS with lse held
            pr = big_r.mul_(p)  # P R
            r_b.add_(pr.sum(-1, keepdim=True))
            lsebar_b.sub_(px.sum(-1, keepdim=True))
            if bbar is not None:
                accumulate_dbias(bbar, px, prob, i0, i1, j0, j1)
            if abar is not None:
                dist = alibi_distance(spec, i0, i1, j0, j1, dev, acc_t)
                per_head = (px.view(b, hkv * g, m, j1 - j0) * dist).sum((2, 3))  # (B, Hq)
                abar -= per_head.sum(0, keepdim=True) if abar.shape[0] == 1 else per_head
            if tp is not None:
                # U = PX t' + dS R_u d(t')/du, d(t')/du = -2 tanh t' / softcap
                u = px.mul_(tp).sub_(ds * ru * t * tp * (2.0 / cap))
                du = ds.mul_(tp)
            else:
                u, du = px, ds
            qbar_b.baddbmm_(u, kc)  # U K
            kbar[:, j0:j1].baddbmm_(u.transpose(1, 2), q_raw)  # U^T Q
            if gkmat is not None:
                qbar_b.baddbmm_(du, gkmat[:, j0:j1])  # dU Kc
            if gq_b is not None:
                kbar[:, j0:j1].baddbmm_(du.transpose(1, 2), gq_b)  # dU^T Qc
            dobar_b.baddbmm_(pr, vc)  # (P R) V
            if gvmat is not None:
                dobar_b.baddbmm_(p, gvmat[:, j0:j1])  # P Vc
            vbar[:, j0:j1].baddbmm_(pr.transpose(1, 2), do_b)  # (P R)^T dO
        out_b = block_rows(out, i0, i1, hkv, acc_t)
        dobar_b.sub_(r_b * out_b)
        qbar[:, :, i0:i1] = qbar_b.view(b, h, m, d)
        dobar[:, :, i0:i1] = dobar_b.view(b, h, m, dv_dim)
        obar[:, :, i0:i1] = (do_b * r_b).neg_().view(b, h, m, dv_dim)
        rbar[:, :, i0:i1] = r_b.view(b, h, m)
        lsebar[:, :, i0:i1] = lsebar_b.view(b, h, m)
    qbar.mul_(spec.scale)
    kbar.mul_(spec.scale)
    return (
        qbar,
        kbar.view(b, hkv, nk, d),
        vbar.view(b, hkv, nk, dv_dim),
        dobar,
        rbar if dlse is not None else None,
        obar,
        lsebar,
        bbar,
        abar,
    )
