"""The engine's forward: online softmax over key chunks (FlashAttention-2, Algorithm 1), and the
exact probabilities ``exp(S - lse)`` tile by tile for ``attention_weights``.

For each block of query rows the keys and values are visited in the chunks that
``rules.key_spans`` plans; the running row maximum ``m_i``, the running sum ``l_i`` and the
unnormalised output ``acc`` are updated per chunk and the output is divided by ``l_i`` once.
"""

from __future__ import annotations

import math

import torch

from ..rules import key_spans
from ..sinks import sink_rows
from .problem import BLOCK_N, Problem, acc_dtype
from .threads import Rect, head_slices, run_jobs, split
from .tiles import Scores, bad_values, dropout_scale, key_matrix, kv_matrix, query_block

__all__ = ["forward", "probabilities"]

STATIC_SLACK = 44.0  # p <= e**44 < 2**64, so even acc = sum p * v (|v| * Nk < 2**60) stays finite


def forward(
    prob: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Online-softmax forward over key chunks.

    Args:
        prob: the problem (rules, scale, softcap, dropout).
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) or None to compute lse only.
        out: optional (B, Hq, Nq, Dv) tensor to write into (any float dtype: the accumulator is
            cast to it once).

    Returns:
        ``(out, lse)``: out (B, Hq, Nq, Dv) in q's dtype (None without v) and the natural-log lse
        (B, Hq, Nq) in the accumulation dtype; rows that see no key give 0 and ``-inf``.
    """
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, _ = q.shape
    v_raw = v
    prob, k, v = prob.sanitize(k, v, values_apart=True)
    if v is not None and out is None:
        out = torch.empty(b, h, m_total, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, m_total, dtype=acc_t, device=q.device)
    plan = split(prob, k.shape[2]) if q.device.type == "cpu" else None
    if plan is None:
        vmat = kv_matrix(v, acc_t) if v is not None else None
        raw = kv_matrix(v_raw, acc_t) if prob.vbad is not None else None
        _forward_part(prob, q, key_matrix(k, acc_t), vmat, out, lse, raw)
        return out, lse
    g = prob.spec.group

    def job(rects: list[Rect]) -> None:
        with torch.no_grad():
            for rect in rects:
                bs, hs, ks, rs = head_slices(rect, g)
                vmat = kv_matrix(v[bs, ks], acc_t) if v is not None else None
                raw = kv_matrix(v_raw[bs, ks], acc_t) if prob.vbad is not None else None
                o = out[bs, hs, rs] if out is not None else None
                kmat = key_matrix(k[bs, ks], acc_t)
                part = prob.part(*rect)
                _forward_part(part, q[bs, hs, rs], kmat, vmat, o, lse[bs, hs, rs], raw)

    run_jobs(job, plan[0])
    return out, lse


def _forward_part(
    prob: Problem,
    q: torch.Tensor,
    kmat: torch.Tensor,
    vmat: torch.Tensor | None,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    v_raw: torch.Tensor | None = None,
) -> None:
    """The online-softmax loop over one (sub-)problem, writing into ``out`` and ``lse``.

    q (B, Hq, Nq, D); kmat (B*Hkv, Nk, D+1) from :func:`key_matrix` and vmat (B*Hkv, Nk, Dv) in
    the accumulation dtype; out (B, Hq, Nq, Dv) or None (lse only); lse (B, Hq, Nq); v_raw
    (B*Hkv, Nk, Dv): the values before ``sanitize`` zeroed the bad rows ``prob.vbad`` marks.

    After the first key chunk the running maximum ``m_i`` is frozen when no later score can
    exceed it by more than ``STATIC_SLACK``: by Cauchy-Schwarz a score is at most
    ``|q_i| * max_j |k_j|`` (or ``softcap``), so ``exp2(s - m_i)`` cannot overflow, and since
    ``m_i`` is an actual score no row underflows. The remaining chunks then skip the row maximum,
    the rescaling of ``l_i`` and ``acc``, and (folded into the GEMM) the subtraction.
    """
    spec = prob.spec
    acc_t = kmat.dtype
    b, h, m_total, d = q.shape
    hkv, g = spec.Hkv, spec.group
    dv = vmat.shape[-1] if vmat is not None else 0
    floor = torch.finfo(acc_t).min  # stands in for -inf in m_i so exp2(-inf - m_i) stays 0
    bm = prob.block_m()
    scores = Scores(prob, g * bm, kmat, buffers=1)
    static_ok = _static_ok(prob)
    vbad = prob.vbad.reshape(-1, prob.vbad.shape[-1]) if v_raw is not None else None  # (BH, Nk)
    knorm = kmat[..., :d].norm(dim=-1) if static_ok and spec.softcap is None else None
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        qb = query_block(q, i0, i1, hkv, prob.qscale)  # (B*Hkv, G*m, D+1)
        # full chunks first: after one of them every row has seen a key
        spans = sorted(key_spans(spec, i0, i1, BLOCK_N), key=lambda span: not span[2])
        if not spans:  # no row of the block sees any key: out 0, lse -inf (or the sink)
            if out is not None:
                out[:, :, i0:i1] = 0
            if spec.sinks is None:
                lse[:, :, i0:i1] = -math.inf
            else:
                lse[:, :, i0:i1] = spec.sinks.to(acc_t).view(1, h, 1)
            continue
        frozen = False
        m_i = l_i = acc = None
        for c, (j0, j1, full) in enumerate(spans):
            s, _ = scores(qb, i0, i1, j0, j1, full)
            cols = None  # keys of the chunk whose value row alone is not finite
            if vbad is not None and out is not None:
                cols = vbad[:, j0:j1].any(0).nonzero().flatten()  # bad for some (b, head)
                if len(cols):  # which rows see which of them, before exp overwrites s
                    seen = (s[..., cols] != -math.inf) & vbad[:, None, j0 + cols]
            if c == 0:  # the chunk's own row maximum; nothing to rescale yet
                m_i = s.amax(-1, keepdim=True).clamp_(min=floor)  # (B*Hkv, G*m, 1)
                p = torch.exp(s.sub_(m_i), out=s)  # (B*Hkv, G*m, n), reuses the score tile
                l_i = p.sum(-1, keepdim=True)
            elif frozen:  # m_i fixed: s already holds s - m_i (softcap: subtract here)
                if spec.softcap is not None:
                    s.sub_(m_i)
                p = torch.exp(s, out=s)
                l_i.add_(p.sum(-1, keepdim=True))
            else:
                m_new = torch.maximum(m_i, s.amax(-1, keepdim=True))
                alpha = torch.exp(m_i - m_new)
                p = torch.exp(s.sub_(m_new), out=s)
                l_i.mul_(alpha).add_(p.sum(-1, keepdim=True))
                m_i = m_new
                if acc is not None:
                    acc.mul_(alpha)
            if out is not None:
                if prob.dropout is not None:
                    p.mul_(dropout_scale(prob, i0, i1, j0, j1, p))
                if acc is None:
                    acc = torch.bmm(p, vmat[:, j0:j1])  # (B*Hkv, G*m, Dv)
                else:
                    acc.baddbmm_(p, vmat[:, j0:j1])
                if cols is not None and len(cols):
                    acc.add_(bad_values(p[..., cols], seen, v_raw[:, j0 + cols]))
            if c == 0 and static_ok and len(spans) > 1:
                frozen = _freeze(prob, qb, knorm, m_i, spans, d)
        if spec.sinks is not None:  # the sink: one more logit of every row, with no value
            sink = sink_rows(spec.sinks, b, hkv, g, m, acc_t)  # (B*Hkv, G*m, 1)
            m_new = torch.maximum(m_i, sink)  # a sink of -inf leaves the row as it is
            alpha = torch.exp(m_i - m_new)
            l_i = l_i.mul(alpha).add_(torch.exp(sink - m_new))
            m_i = m_new
            if acc is not None:
                acc.mul_(alpha)
        # every visible row has l_i >= 1 (its maximum contributes exp2(0)), empty rows have 0
        if acc is not None:
            acc.div_(l_i.clamp(min=1.0))
            out[:, :, i0:i1] = acc.view(b, h, m, dv)
        lse[:, :, i0:i1] = (m_i + torch.log(l_i)).view(b, h, m)


def _static_ok(prob: Problem) -> bool:
    """Whether a per-row upper bound on the scores is known (see ``_forward_part``)."""
    spec = prob.spec
    if spec.bias is not None or prob.bad is not None:
        return False  # a bias is unbounded; NaN keys must reach the exact path
    return spec.alibi_slopes is None or bool((spec.alibi_slopes >= 0).all())


def _freeze(
    prob: Problem,
    qb: torch.Tensor,
    knorm: torch.Tensor | None,
    m_i: torch.Tensor,
    spans: list[tuple[int, int, bool]],
    d: int,
) -> bool:
    """Freeze ``m_i`` for the remaining chunks when the score bound allows (see above)."""
    floor = torch.finfo(m_i.dtype).min
    if bool((m_i <= floor).any()):
        return False  # a row saw nothing yet: its maximum is still unknown
    if prob.spec.softcap is not None:
        bound = prob.spec.softcap  # tanh <= 1
        return bool(bound - m_i.min() <= STATIC_SLACK)
    lo, hi = min(j0 for j0, _, _ in spans), max(j1 for _, j1, _ in spans)
    kmax = knorm[:, lo:hi].amax(-1).view(-1, 1, 1)  # (B*Hkv, 1, 1)
    bound = qb[..., :d].norm(dim=-1, keepdim=True) * kmax  # (B*Hkv, G*m, 1)
    if not bool(((bound - m_i) <= STATIC_SLACK).all()):
        return False
    qb[..., d : d + 1] = -m_i  # the GEMM now yields s - m_i
    return True


def probabilities(
    prob: Problem, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    """Exact softmax probabilities ``exp(S - lse)``, tile by tile.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), lse (B, Hq, Nq) natural log. Returns float32
    (B, Hq, Nq, Nk); keys outside every visible span stay 0, rows with lse ``-inf`` are 0.
    """
    prob, k, _ = prob.sanitize(k, None)
    spec = prob.spec
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, d = q.shape
    hkv, g, nk = spec.Hkv, spec.group, k.shape[2]
    kmat = key_matrix(k, acc_t)
    out = torch.zeros(b, h, m_total, nk, dtype=torch.float32, device=q.device)
    lse2 = torch.where(torch.isneginf(lse), math.inf, lse.to(acc_t))  # +inf: p = 0
    bm = prob.block_m()
    scores = Scores(prob, g * bm, kmat, buffers=1)
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        qb = query_block(q, i0, i1, hkv, prob.qscale)
        lse_b = lse2[:, :, i0:i1].reshape(b * hkv, g * m, 1)
        if spec.softcap is None:
            qb[..., d : d + 1] = -lse_b  # the GEMM yields s - lse
        for j0, j1, full in key_spans(spec, i0, i1, BLOCK_N):
            s, _ = scores(qb, i0, i1, j0, j1, full)
            if spec.softcap is not None:
                s.sub_(lse_b)
            p = torch.exp(s, out=s)
            out[:, :, i0:i1, j0:j1] = p.view(b, h, m, j1 - j0)
    return out
