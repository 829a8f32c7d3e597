"""Forward mode (JVP) of the engine: the output's and the lse's tangents in one pass over tiles.

With the primal ``lse`` known, ``P = exp(S - lse)`` is exact tile by tile, and for tangents
``dq, dk, dv`` (and ``dbias``, ``dalibi``) of the inputs (docs/derivatives.md)::

    dS  = scale (dQ K^T + Q dK^T) * (1 - tanh^2) + dbias - dalibi * |i' - j|
    c_i = sum_j P_ij dS_ij
    T_i = sum_j P_ij (dv_j + dS_ij v_j)
    d lse_i = c_i,   d out_i = T_i - out_i c_i

(dropout multiplies ``P`` by its kept mask in ``T`` and ``out`` only). Memory is one tile and
O(N) accumulators; the (N, N) scores never exist.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..rules import alibi_distance, heads5, key_spans, max_span
from ..spec import AttentionSpec
from .problem import BLOCK_N, Problem, acc_dtype
from .threads import Rect, head_slices, run_jobs, split
from .tiles import Scores, dropout_scale, key_matrix, kv_matrix, query_block

__all__ = ["block_rows", "jvp", "jvp_into", "score_tangent", "tile_of"]


def block_rows(t: torch.Tensor, i0: int, i1: int, hkv: int, acc: torch.dtype) -> torch.Tensor:
    """Rows [i0, i1) of a (B, Hq, Nq, X) tensor as (B*Hkv, G*m, X) in ``acc`` (a copy when the
    rows are not contiguous)."""
    b, h, _, x = t.shape
    return t[:, :, i0:i1].to(acc).reshape(b * hkv, (h // hkv) * (i1 - i0), x)


def scaled_rows(
    t: torch.Tensor, i0: int, i1: int, hkv: int, acc: torch.dtype, scale: float
) -> torch.Tensor:
    """:func:`block_rows` times ``scale``, always a fresh tensor (B*Hkv, G*m, X)."""
    b, h, _, x = t.shape
    rows = t[:, :, i0:i1].reshape(b * hkv, (h // hkv) * (i1 - i0), x)
    if rows.dtype == acc:
        return torch.mul(rows, scale)
    return rows.to(acc).mul_(scale)


def tile_of(
    t: torch.Tensor, spec: AttentionSpec, i0: int, i1: int, j0: int, j1: int, dtype: torch.dtype
) -> torch.Tensor:
    """The tile of a bias-shaped (B|1, Hq|1, Nq|1, Nk|1) tensor ``t``, as (B|1, Hkv|1, G|1, m, n)."""
    rows = slice(None) if t.shape[2] == 1 else slice(i0, i1)
    cols = slice(None) if t.shape[3] == 1 else slice(j0, j1)
    return heads5(t[:, :, rows, cols], spec.Hkv, spec.group).to(dtype)


def jvp(
    prob: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tq: torch.Tensor | None,
    tk: torch.Tensor | None,
    tv: torch.Tensor | None,
    tbias: torch.Tensor | None = None,
    talibi: torch.Tensor | None = None,
    threads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tangents ``(d out, d lse)`` of the call given the primal ``out`` and ``lse``.

    Args:
        prob: the problem (its spec's bias and ALiBi slopes are the primal ones).
        q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): the primal inputs.
        out (B, Hq, Nq, Dv), lse (B, Hq, Nq): the forward's results (lse natural log, ``-inf``
            for rows that see nothing).
        tq, tk, tv: tangents shaped like q, k, v, or None for zero.
        tbias: tangent of the bias, shaped like ``spec.bias``; talibi like the slopes; or None.
        threads: the tensors are plain (no torch.func wrappers): split the call across the
            engine's worker threads (``threads.split``), each part with single-threaded ops
            written in place into the preallocated results (:func:`jvp_into`).

    Returns:
        ``(tout, tlse)``: (B, Hq, Nq, Dv) and (B, Hq, Nq), in the accumulation dtype.
    """
    if not threads:  # torch.func's wrappers: out of place
        return _jvp_part(prob, q, k, v, out, lse, tq, tk, tv, tbias, talibi)
    spec, g = prob.spec, prob.spec.group
    b, h, m_total, _ = q.shape
    acc_t = acc_dtype(q.dtype)
    tout = torch.empty(b, h, m_total, v.shape[-1], dtype=acc_t, device=q.device)
    tlse = torch.empty(b, h, m_total, dtype=acc_t, device=q.device)
    plan = split(prob, k.shape[2]) if q.device.type == "cpu" else None
    if plan is None:
        with torch.no_grad():
            jvp_into(prob, q, k, v, out, lse, tq, tk, tv, tbias, talibi, tout, tlse)
        return tout, tlse
    # the tangents of the bias and slopes cut like the primal ones: a spec holding them
    tspec = replace(spec, bias=tbias, alibi_slopes=talibi)

    def job(rects: list[Rect]) -> None:
        with torch.no_grad():
            for rect in rects:
                bs, hs, ks, rs = head_slices(rect, g)
                part, tpart = prob.part(*rect), tspec.part(*rect)
                jvp_into(
                    part,
                    q[bs, hs, rs],
                    k[bs, ks],
                    v[bs, ks],
                    out[bs, hs, rs],
                    lse[bs, hs, rs],
                    None if tq is None else tq[bs, hs, rs],
                    None if tk is None else tk[bs, ks],
                    None if tv is None else tv[bs, ks],
                    tpart.bias,
                    tpart.alibi_slopes,
                    tout[bs, hs, rs],  # written in place: no per-part result to copy
                    tlse[bs, hs, rs],
                )

    run_jobs(job, plan[0])
    return tout, tlse


def jvp_into(
    prob: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tq: torch.Tensor | None,
    tk: torch.Tensor | None,
    tv: torch.Tensor | None,
    tbias: torch.Tensor | None,
    talibi: torch.Tensor | None,
    tout: torch.Tensor,
    tlse: torch.Tensor,
) -> None:
    """:func:`jvp` of one (sub-)problem on plain tensors, written into ``tout`` (B, Hq, Nq, Dv)
    and ``tlse`` (B, Hq, Nq) (views allowed), in the calling thread.

    Lean where :func:`_jvp_part` cannot be (it must stay out of place for torch.func's batched
    wrappers): the score tangent and the tangent accumulator are updated in place in
    preallocated tiles (``baddbmm_``), and each row block lands in ``tout`` as it is done, so
    the memory beyond the results is a few tiles and this part's key matrix.
    """
    spec = prob.spec
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, _ = q.shape
    hkv, g = spec.Hkv, spec.group
    prob, k, v = prob.sanitize(k, v)
    d, dv_dim = k.shape[-1], v.shape[-1]
    kmat = key_matrix(k, acc_t)  # (B*Hkv, Nk, D+1)
    vmat = kv_matrix(v, acc_t)
    tkmat = kv_matrix(tk, acc_t) if tk is not None else None
    tvmat = kv_matrix(tv, acc_t) if tv is not None else None
    bm = prob.block_m()
    scores = Scores(prob, g * bm, kmat, buffers=1)
    bh, rows_max = b * hkv, g * min(bm, m_total)
    span = min(max_span(BLOCK_N), kmat.shape[1])
    ds_buf = torch.empty(bh * rows_max * span, dtype=acc_t, device=q.device)
    acc_buf = torch.empty(bh * rows_max * dv_dim, dtype=acc_t, device=q.device)
    c_buf = torch.empty(bh * rows_max, dtype=acc_t, device=q.device)
    five_of = (spec.B, hkv, g)
    in_gemm = spec.softcap is None  # a softcap's tanh comes between the GEMM and the shift
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        rows = g * m
        qb = query_block(q, i0, i1, hkv, prob.qscale)  # (B*Hkv, G*m, D+1)
        lse_b = lse[:, :, i0:i1].to(acc_t).reshape(bh, rows, 1)
        lse_b = lse_b.masked_fill(torch.isneginf(lse_b), math.inf)  # +inf: p = 0
        if in_gemm:  # q's shift column holds -lse: the scores GEMM gives S - lse
            qb[..., d : d + 1].copy_(lse_b).neg_()
        # the query side of dS, scaled here (a block of rows) rather than each (m, n) tile
        q_raw = scaled_rows(q, i0, i1, hkv, acc_t, spec.scale) if tkmat is not None else None
        tq_b = scaled_rows(tq, i0, i1, hkv, acc_t, spec.scale) if tq is not None else None
        c = c_buf[: bh * rows].view(bh, rows, 1).zero_()
        tacc = acc_buf[: bh * rows * dv_dim].view(bh, rows, dv_dim).zero_()
        for j0, j1, full in key_spans(spec, i0, i1, BLOCK_N):
            n = j1 - j0
            s, t = scores(qb, i0, i1, j0, j1, full, keep_tanh=True)
            if not in_gemm:
                s.sub_(lse_b)
            p = s.exp_()  # (B*Hkv, G*m, n)
            ds = ds_buf[: bh * rows * n].view(bh, rows, n)
            if tq_b is not None:  # dQ K^T, then + Q dK^T into the same tile
                torch.bmm(tq_b, kmat[:, j0:j1, :d].transpose(1, 2), out=ds)
                if tkmat is not None:
                    ds.baddbmm_(q_raw, tkmat[:, j0:j1].transpose(1, 2))
            elif tkmat is not None:
                torch.bmm(q_raw, tkmat[:, j0:j1].transpose(1, 2), out=ds)
            else:
                ds.zero_()
            if t is not None and (tq_b is not None or tkmat is not None):
                ds.mul_(t.mul_(t).neg_().add_(1.0))  # through the softcap: d tanh = 1 - tanh^2
            ds5 = ds.view(*five_of, m, n)
            if tbias is not None:
                ds5.add_(tile_of(tbias, spec, i0, i1, j0, j1, acc_t))
            if talibi is not None:
                slopes = talibi.to(acc_t).reshape(-1, hkv, g, 1, 1)
                ds5.addcmul_(
                    slopes, alibi_distance(spec, i0, i1, j0, j1, ds.device, acc_t), value=-1.0
                )
            pds = ds.mul_(p)  # P * dS, in place
            c.add_(pds.sum(-1, keepdim=True))
            if prob.dropout is not None:
                drop = dropout_scale(prob, i0, i1, j0, j1, p)
                pds.mul_(drop)
                p.mul_(drop)
            tacc.baddbmm_(pds, vmat[:, j0:j1])  # sum_j P dS_j v_j
            if tvmat is not None:
                tacc.baddbmm_(p, tvmat[:, j0:j1])  # sum_j P dv_j
        out_b = block_rows(out, i0, i1, hkv, acc_t)
        tacc.addcmul_(out_b, c, value=-1.0)  # T - out c
        tout[:, :, i0:i1] = tacc.view(b, h, m, dv_dim)
        tlse[:, :, i0:i1] = c.view(b, h, m)


def _jvp_part(
    prob: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tq: torch.Tensor | None,
    tk: torch.Tensor | None,
    tv: torch.Tensor | None,
    tbias: torch.Tensor | None = None,
    talibi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`jvp` of one (sub-)problem in the calling thread; its tangent tensors may be
    torch.func's wrappers (batched under ``jacfwd``), so they are built out of place."""
    spec = prob.spec
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, _ = q.shape
    hkv, g = spec.Hkv, spec.group
    prob, k, v = prob.sanitize(k, v)
    dv_dim = v.shape[-1]
    kmat = key_matrix(k, acc_t)
    vmat = kv_matrix(v, acc_t)
    tkmat = kv_matrix(tk, acc_t) if tk is not None else None
    tvmat = kv_matrix(tv, acc_t) if tv is not None else None
    lse2 = torch.where(torch.isneginf(lse), math.inf, lse.to(acc_t))  # +inf: p = 0
    bm = prob.block_m()
    scores = Scores(prob, g * bm, kmat, buffers=1)
    # Tangent-carrying tensors are built out of place: under torch.func.jacfwd (vmap over
    # jvp) they are batched while the primal tiles are not, and an in-place op would mix them.
    touts, tlses = [], []
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        qb = query_block(q, i0, i1, hkv, prob.qscale)  # (B*Hkv, G*m, D+1)
        lse_b = lse2[:, :, i0:i1].reshape(b * hkv, g * m, 1)
        q_raw = block_rows(q, i0, i1, hkv, acc_t) if tkmat is not None else None
        tq_b = block_rows(tq, i0, i1, hkv, acc_t) if tq is not None else None
        c = torch.zeros(b * hkv, g * m, 1, dtype=acc_t, device=q.device)
        tacc = torch.zeros(b * hkv, g * m, dv_dim, dtype=acc_t, device=q.device)
        for j0, j1, full in key_spans(spec, i0, i1, BLOCK_N):
            s, t = scores(qb, i0, i1, j0, j1, full, keep_tanh=True)
            p = torch.exp(s.sub_(lse_b), out=s)  # (B*Hkv, G*m, n)
            ds = score_tangent(spec, q_raw, tq_b, kmat, tkmat, tbias, talibi, t, i0, i1, j0, j1)
            pds = ds * p  # P * dS
            c = c + pds.sum(-1, keepdim=True)
            if prob.dropout is not None:
                drop = dropout_scale(prob, i0, i1, j0, j1, p)
                pds = pds * drop
                p = p.mul_(drop)
            tacc = tacc + torch.bmm(pds, vmat[:, j0:j1])  # sum_j P dS_j v_j
            if tvmat is not None:
                tacc = tacc + torch.bmm(p, tvmat[:, j0:j1])  # sum_j P dv_j
        out_b = block_rows(out, i0, i1, hkv, acc_t)
        touts.append((tacc - out_b * c).view(b, h, m, dv_dim))
        tlses.append(c.view(b, h, m))
    if not touts:  # no query rows
        z = torch.zeros(b, h, 0, dv_dim, dtype=acc_t, device=q.device)
        return z, z[..., 0]
    return torch.cat(touts, 2), torch.cat(tlses, 2)


def score_tangent(
    spec: AttentionSpec,
    q_raw: torch.Tensor | None,
    tq_b: torch.Tensor | None,
    kmat: torch.Tensor,
    tkmat: torch.Tensor | None,
    tbias: torch.Tensor | None,
    talibi: torch.Tensor | None,
    t: torch.Tensor | None,
    i0: int,
    i1: int,
    j0: int,
    j1: int,
) -> torch.Tensor:
    """The scores' tangent on a tile, (B*Hkv, G*m, n), a fresh tensor.

    ``q_raw`` (B*Hkv, G*m, D) unscaled query rows (needed with ``tkmat``), ``tq_b`` their
    tangent; kmat (B*Hkv, Nk, D+1) from ``key_matrix``, ``tkmat`` (B*Hkv, Nk, D) the keys'
    tangent; ``tbias`` bias-shaped, ``talibi`` slope-shaped; ``t`` the softcap's tanh of the
    tile. Also the coefficient ``R`` of the double backward (docs/derivatives.md).
    """
    d = kmat.shape[-1] - 1
    ds = None
    if tq_b is not None:
        ds = torch.bmm(tq_b, kmat[:, j0:j1, :d].transpose(1, 2))  # dQ K^T
    if tkmat is not None:
        qdk = torch.bmm(q_raw, tkmat[:, j0:j1].transpose(1, 2))  # Q dK^T
        ds = qdk if ds is None else ds + qdk
    if ds is None:
        shape = (kmat.shape[0], spec.group * (i1 - i0), j1 - j0)
        ds = torch.zeros(shape, dtype=kmat.dtype, device=kmat.device)
    else:
        ds = ds * spec.scale
        if t is not None:
            ds = ds * (1.0 - t * t)  # through the softcap: d tanh = 1 - tanh^2
    five = (spec.B, spec.Hkv, spec.group, i1 - i0, j1 - j0)
    if tbias is not None:
        ds = (ds.view(five) + tile_of(tbias, spec, i0, i1, j0, j1, ds.dtype)).reshape(ds.shape)
    if talibi is not None:
        slopes = talibi.to(ds.dtype).reshape(-1, spec.Hkv, spec.group, 1, 1)
        dist = alibi_distance(spec, i0, i1, j0, j1, ds.device, ds.dtype)
        ds = (ds.view(five) - slopes * dist).reshape(ds.shape)
    return ds
