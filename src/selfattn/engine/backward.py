"""The engine's backward: gradients by recomputation from the lse (FlashAttention-2, Algorithm 2).

``D_i = rowsum(dO_i * O_i)`` first; then for every visible tile ``P = exp(S - lse)``,
``dV += P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - D_i)``, ``dQ += dS K``, ``dK += dS^T Q``.
"""

from __future__ import annotations

import math

import torch

from ..rules import alibi_distance, key_spans
from .problem import BLOCK_N, Problem, acc_dtype
from .threads import Rect, head_slices, run_jobs, split
from .tiles import Scores, dropout_scale, key_matrix, query_block

__all__ = ["Grads", "accumulate_dbias", "backward", "bias_index"]

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def backward(
    prob: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None = None,
    need_dbias: bool = False,
    need_dalibi: bool = False,
) -> Grads:
    """Gradients of q, k, v (and bias, ALiBi slopes when asked).

    ``out`` (B, Hq, Nq, Dv) is the forward's output, best in the accumulation dtype: ``D_i``
    comes from it, and an output rounded to bfloat16 would cost the bias gradient three digits.
    A gradient ``dlse`` of the returned lse adds ``P * dlse_i`` to ``dS``.

    Returns:
        ``(dq, dk, dv, dbias, dalibi)`` in the accumulation dtype, dbias shaped like
        ``spec.bias`` and dalibi like ``spec.alibi_slopes``; None where not asked for.
    """
    spec = prob.spec
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, d = q.shape
    hkv, g = spec.Hkv, spec.group
    prob, k, v = prob.sanitize(k, v)
    nk, dv_dim = k.shape[2], v.shape[-1]
    dq = torch.empty(b, h, m_total, d, dtype=acc_t, device=q.device)
    dk = torch.zeros(b, hkv, nk, d, dtype=acc_t, device=q.device)
    dv = torch.zeros(b, hkv, nk, dv_dim, dtype=acc_t, device=q.device)
    dbias = torch.zeros(spec.bias.shape, dtype=acc_t, device=q.device) if need_dbias else None
    dalibi = (
        torch.zeros(spec.alibi_slopes.shape, dtype=acc_t, device=q.device) if need_dalibi else None
    )
    # D_i = rowsum(dO * O) (minus dlse): the softmax Jacobian's diagonal term
    delta = (dout.to(acc_t) * out.to(acc_t)).sum(-1)  # (B, Hq, Nq)
    if dlse is not None:
        delta = delta - dlse.to(acc_t)
    # rows that see nothing have lse -inf: +inf makes exp(s - lse) = 0 there
    lse2 = torch.where(torch.isneginf(lse), math.inf, lse.to(acc_t))
    plan = split(prob, nk) if q.device.type == "cpu" else None
    if plan is None:
        _backward_part(
            prob,
            q,
            key_matrix(k, acc_t),
            key_matrix(v, acc_t),
            lse2,
            dout,
            delta,
            dq,
            dk.view(b * hkv, nk, d),
            dv.view(b * hkv, nk, dv_dim),
            dbias,
            dalibi,
        )
    else:
        jobs, shared = plan

        def job(rects: list[Rect]):
            with torch.no_grad():
                # a row split shares key/value heads between threads: private dK/dV, summed below
                dk_t = torch.zeros_like(dk) if shared else dk
                dv_t = torch.zeros_like(dv) if shared else dv
                grads = []
                for rect in rects:
                    bs, hs, ks, rs = head_slices(rect, g)
                    part = prob.part(*rect)
                    db = da = None
                    if dbias is not None:
                        db = torch.zeros(part.spec.bias.shape, dtype=acc_t, device=q.device)
                    if dalibi is not None:
                        da = torch.zeros(part.spec.alibi_slopes.shape, dtype=acc_t, device=q.device)
                    kb, vb = dk_t[bs, ks], dv_t[bs, ks]
                    _backward_part(
                        part,
                        q[bs, hs, rs],
                        key_matrix(k[bs, ks], acc_t),
                        key_matrix(v[bs, ks], acc_t),
                        lse2[bs, hs, rs],
                        dout[bs, hs, rs],
                        delta[bs, hs, rs],
                        dq[bs, hs, rs],
                        kb.view(-1, nk, d),
                        vb.view(-1, nk, dv_dim),
                        db,
                        da,
                    )
                    grads.append((rect, db, da))
                return (dk_t, dv_t) if shared else None, grads

        for kv, grads in run_jobs(job, jobs):
            if kv is not None:
                dk += kv[0]
                dv += kv[1]
            for rect, db, da in grads:
                if db is not None:
                    dbias[bias_index(dbias, rect, g)] += db
                if da is not None:
                    bs, hs, _, _ = head_slices(rect, g)
                    dalibi[bs if dalibi.shape[0] > 1 else slice(None), hs] += da
    dq.mul_(spec.scale)
    dk.mul_(spec.scale / prob.qscale)  # dS/dk uses `scale`, qb held `qscale`
    return dq, dk, dv, dbias, dalibi


def _backward_part(
    prob: Problem,
    q: torch.Tensor,
    kmat: torch.Tensor,
    vmat: torch.Tensor,
    lse2: torch.Tensor,
    dout: torch.Tensor,
    delta: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    dbias: torch.Tensor | None,
    dalibi: torch.Tensor | None,
) -> None:
    """FlashAttention-2's backward loop over one (sub-)problem.

    Writes dq (B, Hq, Nq, D) (unscaled: the caller multiplies by ``scale``) and accumulates into
    dk (B*Hkv, Nk, D) (in ``qscale`` units), dv (B*Hkv, Nk, Dv), dbias and dalibi.
    ``lse2`` is the lse with ``+inf`` for rows that see nothing (so p = 0); ``delta`` is
    ``rowsum(dO * O) - dlse``.
    """
    spec = prob.spec
    acc_t = kmat.dtype
    b, h, m_total, d = q.shape
    hkv, g = spec.Hkv, spec.group
    dv_dim = vmat.shape[-1] - 1  # vmat carries a column of ones (see below)
    bm = prob.block_m()
    scores = Scores(prob, g * bm, kmat, buffers=2)
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        qb = query_block(q, i0, i1, hkv, prob.qscale)  # (B*Hkv, G*m, D+1)
        dob = query_block(dout, i0, i1, hkv, 1.0)  # (B*Hkv, G*m, Dv+1)
        lse_b = lse2[:, :, i0:i1].reshape(b * hkv, g * m, 1)
        delta_b = delta[:, :, i0:i1].reshape(b * hkv, g * m, 1)
        # Fold the subtractions into the GEMMs: [q, -lse] @ [k, 1]^T = s - lse and
        # [dO, -D] @ [v, 1]^T = dP - D (with dropout, D comes after the mask instead).
        if spec.softcap is None:
            qb[..., d : d + 1] = -lse_b  # finite: rows that see nothing have lse +inf here
        if prob.dropout is None:
            dob[..., dv_dim : dv_dim + 1] = -delta_b
        do_v = dob[..., :dv_dim]
        dqb = torch.zeros(b * hkv, g * m, d, dtype=acc_t, device=q.device)
        for j0, j1, full in key_spans(spec, i0, i1, BLOCK_N):
            s, t = scores(qb, i0, i1, j0, j1, full, keep_tanh=True)
            if spec.softcap is not None:
                s.sub_(lse_b)
            p = torch.exp(s, out=s)  # (B*Hkv, G*m, n) probabilities
            dp = torch.bmm(  # dP - D = [dO, -D] [V, 1]^T
                dob, vmat[:, j0:j1].transpose(1, 2), out=scores.buffer(1, g * m, j1 - j0)
            )
            if prob.dropout is not None:
                drop = dropout_scale(prob, i0, i1, j0, j1, p)
                dv[:, j0:j1].baddbmm_((p * drop).transpose(1, 2), do_v)
                dp.mul_(drop).sub_(delta_b)
            else:
                dv[:, j0:j1].baddbmm_(p.transpose(1, 2), do_v)  # dV += P^T dO
            ds = dp.mul_(p)  # dS = P * (dP - D), natural-log units
            if dbias is not None:
                accumulate_dbias(dbias, ds, prob, i0, i1, j0, j1)
            if dalibi is not None:
                dist = alibi_distance(spec, i0, i1, j0, j1, ds.device, ds.dtype)
                per_head = (ds.view(b, hkv * g, m, j1 - j0) * dist).sum((2, 3))  # (B, Hq)
                dalibi -= per_head.sum(0, keepdim=True) if dalibi.shape[0] == 1 else per_head
            if t is not None:
                ds.mul_(1.0 - t * t)  # through softcap: d tanh = 1 - tanh^2
            dqb.baddbmm_(ds, kmat[:, j0:j1, :d])  # dQ += dS K
            dk[:, j0:j1].baddbmm_(ds.transpose(1, 2), qb[..., :d])  # dK += dS^T Q
        dq[:, :, i0:i1] = dqb.view(b, h, m, d)


def bias_index(dbias: torch.Tensor, rect: Rect, g: int) -> tuple[slice, ...]:
    """Where a part's bias slice sits in the full (broadcast) bias."""
    b0, b1, kh0, kh1, r0, r1 = rect
    ranges = ((b0, b1), (kh0 * g, kh1 * g), (r0, r1))
    return tuple(
        slice(None) if dbias.shape[d] == 1 else slice(*rng) for d, rng in enumerate(ranges)
    )


def accumulate_dbias(
    dbias: torch.Tensor, ds: torch.Tensor, prob: Problem, i0: int, i1: int, j0: int, j1: int
) -> None:
    """Add the tile's dS into dbias, summed over the dims the bias broadcasts along."""
    b, hq, m, n = prob.spec.B, prob.spec.Hq, i1 - i0, j1 - j0
    ds4 = ds.view(b, hq, m, n)
    dims = [i for i in range(4) if dbias.shape[i] == 1 and ds4.shape[i] != 1]
    part = ds4.sum(dims, keepdim=True) if dims else ds4
    rows = slice(None) if dbias.shape[2] == 1 else slice(i0, i1)
    cols = slice(None) if dbias.shape[3] == 1 else slice(j0, j1)
    dbias[:, :, rows, cols] += part
