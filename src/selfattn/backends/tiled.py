"""``tiled``: the FlashAttention-2 algorithm written in torch (Dao, 2023, Algorithms 1 and 2).

For each block of query rows the keys and values are visited in chunks; the softmax is computed
online (running row maximum ``m_i``, running sum ``l_i``, unnormalised output ``acc``), the output
is divided by ``l_i`` once at the end, and the log-sum-exp is kept for the backward pass, which
recomputes the probabilities from it instead of storing them. Memory is O(N): one tile of scores
is alive at a time. Key chunks that the visibility rules leave empty are never computed; chunks
they leave full are computed without a mask (``masks.Rules.key_spans``).

The names follow the paper and the Triton kernels of this package: ``m_i``, ``l_i``, ``acc``,
``BLOCK_M`` rows, ``BLOCK_N`` keys. Scores are kept in base 2 (``log2(e)`` folded into the scale)
so the exponential is ``exp2``, as in the kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _rng
from ..masks import Rules, heads5
from ..spec import AttentionSpec

__all__ = ["BLOCK_N", "ROWS_PER_TILE", "TiledBackend", "backward", "forward"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Rows of one tile (query rows x query heads sharing a key/value head) and keys per chunk.
# Measured on a 2-core AVX2 machine (benchmarks/cpu.py): tiles of ~256 x 512 fp32 scores keep
# the per-op Python overhead small while the tile stays close to the L2/L3 caches.
ROWS_PER_TILE = 256
BLOCK_N = 512


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation, float64 for float64 inputs (API.md section 1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Problem:
    """One tiled problem: q (B, H, M, D) against k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv).

    ``scale``, ``softcap`` as in API.md; ``dropout`` = (seed, p, Hq_total, Nq_total, b0, row0)
    numbering rows as the full call does, so a sub-problem draws the same mask.
    """

    rules: Rules
    scale: float
    softcap: float | None = None
    dropout: tuple[tuple[int, int], float, int, int, int] | None = None

    @property
    def qscale(self) -> float:
        """What q is multiplied by so that ``q @ k^T`` is the score (base 2) or ``s / softcap``."""
        if self.softcap is not None:
            return self.scale / self.softcap
        return self.scale * LOG2E

    def block_m(self) -> int:
        return max(1, ROWS_PER_TILE // self.rules.group)


def _kv_matrix(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(B, Hkv, Nk, X) -> (B*Hkv, Nk, X) in the accumulation dtype (a view when possible)."""
    b, h, n, x = t.shape
    return t.to(acc).reshape(b * h, n, x)


def _bad_keys(k: torch.Tensor, v: torch.Tensor | None, rules: Rules) -> torch.Tensor | None:
    """(B, Hkv, Nk) True where k or v holds NaN/inf, when some key may be hidden from a row.

    Such keys are zeroed before use and their visible scores set to NaN, so padding garbage never
    leaks into rows that cannot see it (0 * NaN is NaN in a matrix product) while rows that do
    see it still get NaN, as in the specification.
    """
    if not rules.restricts:
        return None  # every row sees every key: non-finite values propagate as they should
    # One cheap reduction first: a finite sum means every entry is finite (an overflowing sum
    # of huge finite values only costs the exact check below).
    if all(t is None or bool(torch.isfinite(t.sum())) for t in (k, v)):
        return None
    bad = ~torch.isfinite(k).all(-1)
    if v is not None:
        bad |= ~torch.isfinite(v).all(-1)
    return bad if bool(bad.any()) else None


class _Scores:
    """Computes score tiles for one problem into a reusable workspace.

    Fresh multi-megabyte tensors cost page faults on every allocation (as much as the matrix
    product itself at these sizes), so every tile is written into one preallocated buffer.
    Causal/window masks are additive (0 / -inf) tiles cached by their geometry: adding is an
    order of magnitude faster than ``masked_fill_`` on the CPU.
    """

    def __init__(self, prob: Problem, rules: Rules, qb_rows: int, kmat: torch.Tensor, buffers: int):
        self.prob, self.rules, self.kmat = prob, rules, kmat
        size = kmat.shape[0] * qb_rows * BLOCK_N
        self.bufs = [torch.empty(size, dtype=kmat.dtype, device=kmat.device) for _ in range(buffers)]
        self.cache: dict[tuple[int, int, int], torch.Tensor] = {}
        # additive masks are exact unless a score can be NaN/inf before masking
        self.additive = rules.bias is None and rules.bad_keys is None
        self.cacheable = rules.qpos is None and rules.mask is None and rules.q_ids is None

    def buffer(self, idx: int, rows: int, n: int) -> torch.Tensor:
        """A contiguous (B*Hkv, rows, n) view of workspace ``idx``."""
        bh = self.kmat.shape[0]
        return self.bufs[idx][: bh * rows * n].view(bh, rows, n)

    def _mask(self, i0: int, i1: int, j0: int, j1: int, device) -> torch.Tensor | None:
        """Additive 0/-inf visibility of the tile, broadcastable to (B, Hkv, G, m, n)."""
        rules = self.rules
        key = (rules.start + i0 - j0, i1 - i0, j1 - j0)
        if self.cacheable and key in self.cache:
            return self.cache[key]
        vis = rules.visible(i0, i1, j0, j1, device)
        if vis is None:
            return None
        zero = torch.zeros((), dtype=self.kmat.dtype, device=device)
        add = torch.where(heads5(vis, rules.Hkv, rules.group), zero, -math.inf)
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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores of rows [i0, i1) x keys [j0, j1) in base 2, invisible ones -inf.

        Returns ``(s, t)``: s (B*Hkv, G*m, n), a view of workspace ``buf``, and with
        ``keep_tanh`` the softcap's tanh (for its derivative), else None.
        """
        prob, rules = self.prob, self.rules
        b, hkv, g, m, n = rules.B, rules.Hkv, rules.group, i1 - i0, j1 - j0
        s = torch.bmm(qb, self.kmat[:, j0:j1].transpose(1, 2), out=self.buffer(buf, g * m, n))
        s5 = s.view(b, hkv, g, m, n)
        t = None
        if prob.softcap is not None:
            s.tanh_()
            if keep_tanh:
                t = s.clone()
            s.mul_(prob.softcap * LOG2E)
        if rules.bias is not None:
            bias = heads5(rules.bias_tile(i0, i1, j0, j1), hkv, g)
            s5.add_(bias.to(s.dtype), alpha=LOG2E)
        if rules.alibi is not None:
            slopes = rules.alibi.to(s.dtype).reshape(rules.alibi.shape[0], hkv, g, 1, 1)
            dist = rules.alibi_distance(i0, i1, j0, j1, s.device, s.dtype)
            s5.addcmul_(slopes, dist, value=-LOG2E)
        if rules.bad_keys is not None:
            s5.masked_fill_(rules.bad_keys[:, :, None, None, j0:j1], math.nan)
        if not full:
            if self.additive:
                add = self._mask(i0, i1, j0, j1, s.device)
                if add is not None:
                    s5.add_(add)
            else:
                vis = rules.visible(i0, i1, j0, j1, s.device)
                if vis is not None:
                    s5.masked_fill_(~heads5(vis, hkv, g), -math.inf)
        return s, t


def _dropout_scale(
    prob: Problem, rules: Rules, i0: int, i1: int, j0: int, j1: int, like: torch.Tensor
) -> torch.Tensor:
    """keep / (1 - p) for the tile, (B*Hkv, G*m, n), from the counter-based hash."""
    seed, p, hq_total, nq_total, b0 = prob.dropout
    b, hkv, g, m = rules.B, rules.Hkv, rules.group, i1 - i0
    device = like.device
    heads = torch.arange(hkv * g, device=device).view(1, hkv, g, 1)
    batch = torch.arange(b0, b0 + b, device=device).view(b, 1, 1, 1)
    rows = torch.arange(i0, i1, device=device).view(1, 1, 1, m)
    row_ids = ((batch * hq_total + heads) * nq_total + rows).reshape(b * hkv, g * m, 1)
    keep = _rng.keep_mask(seed, row_ids, torch.arange(j0, j1, device=device), p)
    return keep.to(like.dtype).mul_(1.0 / (1.0 - p))


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
        q: (B, H, M, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) or None to compute lse only.
        out: optional (B, H, M, Dv) tensor to write into.

    Returns:
        ``(out, lse)``: out (B, H, M, Dv) in q's dtype (None without v) and the natural-log lse
        (B, H, M) in the accumulation dtype; rows that see no key give 0 and ``-inf``.
    """
    rules = prob.rules
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, d = q.shape
    hkv, g = rules.Hkv, rules.group
    bad = _bad_keys(k, v, rules)
    if bad is not None:
        rules = _with_bad(rules, bad)
        k = torch.where(bad[..., None], 0, k)
        v = torch.where(bad[..., None], 0, v) if v is not None else None
    kmat = _kv_matrix(k, acc_t)
    vmat = _kv_matrix(v, acc_t) if v is not None else None
    dv = v.shape[-1] if v is not None else 0
    if v is not None and out is None:
        out = torch.empty(b, h, m_total, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, m_total, dtype=acc_t, device=q.device)
    floor = torch.finfo(acc_t).min  # stands in for -inf in m_i so exp2(-inf - m_i) stays 0
    bm = prob.block_m()
    scores = _Scores(prob, rules, g * bm, kmat, buffers=1)
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        qb = (q[:, :, i0:i1].to(acc_t) * prob.qscale).reshape(b * hkv, g * m, d)
        m_i = torch.full((b * hkv, g * m, 1), floor, dtype=acc_t, device=q.device)
        l_i = torch.zeros((b * hkv, g * m, 1), dtype=acc_t, device=q.device)
        acc = torch.zeros((b * hkv, g * m, dv), dtype=acc_t, device=q.device) if v is not None else None
        for j0, j1, full in rules.key_spans(i0, i1, BLOCK_N):
            s, _ = scores(qb, i0, i1, j0, j1, full)
            m_new = torch.maximum(m_i, s.amax(-1, keepdim=True))
            alpha = torch.exp2(m_i - m_new)
            p = torch.exp2(s.sub_(m_new), out=s)  # (B*Hkv, G*m, n), reuses the score tile
            l_i.mul_(alpha).add_(p.sum(-1, keepdim=True))
            m_i = m_new
            if acc is None:
                continue
            if prob.dropout is not None:
                p.mul_(_dropout_scale(prob, rules, i0, i1, j0, j1, p))
            acc.mul_(alpha).baddbmm_(p, vmat[:, j0:j1])
        # every visible row has l_i >= 1 (its maximum contributes exp2(0)), empty rows have 0
        if acc is not None:
            acc.div_(l_i.clamp(min=1.0))
            out[:, :, i0:i1] = acc.view(b, h, m, dv)
        lse[:, :, i0:i1] = ((m_i + torch.log2(l_i)) * LN2).view(b, h, m)
    return out, lse


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients by recomputation from the lse (FlashAttention-2, Algorithm 2).

    ``D_i = rowsum(dO_i * O_i)`` first; then for every visible tile ``P = exp(S - lse)``,
    ``dV += P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - D_i)``, ``dQ += dS K``, ``dK += dS^T Q``.
    A gradient ``dlse`` of the returned lse adds ``P * dlse_i`` to ``dS``.

    Returns:
        ``(dq, dk, dv, dbias, dalibi)`` with dbias shaped like ``rules.bias`` (float32/64) and
        dalibi like ``rules.alibi``; None where not asked for.
    """
    rules = prob.rules
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, d = q.shape
    hkv, g = rules.Hkv, rules.group
    dv_dim = v.shape[-1]
    bad = _bad_keys(k, v, rules)
    if bad is not None:
        rules = _with_bad(rules, bad)
        k = torch.where(bad[..., None], 0, k)
        v = torch.where(bad[..., None], 0, v)
    kmat = _kv_matrix(k, acc_t)
    vmat = _kv_matrix(v, acc_t)
    nk = kmat.shape[1]
    dq = torch.empty(b, h, m_total, d, dtype=acc_t, device=q.device)
    dk = torch.zeros(b * hkv, nk, d, dtype=acc_t, device=q.device)
    dvv = torch.zeros(b * hkv, nk, dv_dim, dtype=acc_t, device=q.device)
    dbias = torch.zeros(rules.bias.shape, dtype=acc_t, device=q.device) if need_dbias else None
    dalibi = torch.zeros(rules.alibi.shape, dtype=acc_t, device=q.device) if need_dalibi else None
    # D_i = rowsum(dO * O) (minus dlse): the softmax Jacobian's diagonal term
    delta = (dout.to(acc_t) * out.to(acc_t)).sum(-1)  # (B, H, M)
    if dlse is not None:
        delta = delta - dlse.to(acc_t)
    # rows that see nothing have lse -inf: +inf makes exp2(s - lse) = 0 there
    lse2 = torch.where(torch.isneginf(lse), math.inf, lse.to(acc_t) * LOG2E)
    grad_scale = prob.scale / prob.qscale  # dS/dq uses `scale`, qb holds `qscale`
    bm = prob.block_m()
    scores = _Scores(prob, rules, g * bm, kmat, buffers=2)
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        qb = (q[:, :, i0:i1].to(acc_t) * prob.qscale).reshape(b * hkv, g * m, d)
        dob = dout[:, :, i0:i1].to(acc_t).reshape(b * hkv, g * m, dv_dim)
        lse_b = lse2[:, :, i0:i1].reshape(b * hkv, g * m, 1)
        delta_b = delta[:, :, i0:i1].reshape(b * hkv, g * m, 1)
        dqb = torch.zeros(b * hkv, g * m, d, dtype=acc_t, device=q.device)
        for j0, j1, full in rules.key_spans(i0, i1, BLOCK_N):
            s, t = scores(qb, i0, i1, j0, j1, full, keep_tanh=True)
            p = torch.exp2(s.sub_(lse_b), out=s)  # (B*Hkv, G*m, n) probabilities
            dp = torch.bmm(  # dP = dO V^T
                dob, vmat[:, j0:j1].transpose(1, 2), out=scores.buffer(1, g * m, j1 - j0)
            )
            if prob.dropout is not None:
                drop = _dropout_scale(prob, rules, i0, i1, j0, j1, p)
                dvv[:, j0:j1].baddbmm_((p * drop).transpose(1, 2), dob)
                dp.mul_(drop)
            else:
                dvv[:, j0:j1].baddbmm_(p.transpose(1, 2), dob)  # dV += P^T dO
            ds = dp.sub_(delta_b).mul_(p)  # dS = P * (dP - D), natural-log units
            if dbias is not None:
                _accumulate_dbias(dbias, ds, rules, i0, i1, j0, j1)
            if dalibi is not None:
                dist = rules.alibi_distance(i0, i1, j0, j1, ds.device, ds.dtype)
                per_head = (ds.view(b, hkv * g, m, j1 - j0) * dist).sum((2, 3))  # (B, Hq)
                dalibi -= per_head.sum(0, keepdim=True) if dalibi.shape[0] == 1 else per_head
            if t is not None:
                ds.mul_(1.0 - t * t)  # through softcap: d tanh = 1 - tanh^2
            dqb.baddbmm_(ds, kmat[:, j0:j1])  # dQ += dS K
            dk[:, j0:j1].baddbmm_(ds.transpose(1, 2), qb)  # dK += dS^T Q
        dq[:, :, i0:i1] = dqb.view(b, h, m, d)
    dq.mul_(prob.scale)
    dk.mul_(grad_scale)
    return (
        dq,
        dk.view(b, hkv, nk, d),
        dvv.view(b, hkv, nk, dv_dim),
        dbias,
        dalibi,
    )


def _accumulate_dbias(
    dbias: torch.Tensor, ds: torch.Tensor, rules: Rules, i0: int, i1: int, j0: int, j1: int
) -> None:
    """Add the tile's dS into dbias, summed over the dims the bias broadcasts along."""
    b, hq, m, n = rules.B, rules.H, i1 - i0, j1 - j0
    ds4 = ds.view(b, hq, m, n)
    dims = [i for i in range(4) if dbias.shape[i] == 1 and ds4.shape[i] != 1]
    part = ds4.sum(dims, keepdim=True) if dims else ds4
    rows = slice(None) if dbias.shape[2] == 1 else slice(i0, i1)
    cols = slice(None) if dbias.shape[3] == 1 else slice(j0, j1)
    dbias[:, :, rows, cols] += part


def _with_bad(rules: Rules, bad: torch.Tensor) -> Rules:
    from dataclasses import replace

    return replace(rules, bad_keys=bad)


class _TiledFunction(torch.autograd.Function):
    """Autograd for the tiled engine: saves q, k, v, out and lse, recomputes P in backward."""

    @staticmethod
    def forward(ctx, prob: Problem, q, k, v, bias, alibi):  # type: ignore[override]
        out, lse = forward(prob, q, k, v)
        ctx.prob = prob
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.need_bias = bias is not None and bias.requires_grad
        ctx.need_alibi = alibi is not None and alibi.requires_grad
        ctx.shapes = (
            None if bias is None else bias.shape,
            None if alibi is None else (alibi.shape, alibi.dtype),
        )
        lse_out = lse.float()
        return out, lse_out

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dbias, dalibi = backward(
            ctx.prob, q, k, v, out, lse, dout, dlse,
            need_dbias=ctx.need_bias, need_dalibi=ctx.need_alibi,
        )  # fmt: skip
        if dbias is not None:
            dbias = dbias.to(ctx.prob.rules.bias.dtype)
        if dalibi is not None:
            dalibi = dalibi.to(ctx.shapes[1][1])
        return None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, dalibi


def problem_from_spec(spec: AttentionSpec, seed: tuple[int, int] | None) -> Problem:
    dropout = None
    if spec.dropout_p > 0:
        dropout = (seed, spec.dropout_p, spec.Hq, spec.Nq, 0)
    return Problem(Rules.from_spec(spec), spec.scale, spec.softcap, dropout)


class TiledBackend:
    """O(N)-memory online softmax in torch; every rule; autograd by recomputation."""

    name = "tiled"

    def unavailable(self) -> str | None:
        return None

    def check(self, spec: AttentionSpec) -> list[str]:
        return []

    def run(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seed: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prob = problem_from_spec(spec, seed)
        if spec.requires_grad:
            return _TiledFunction.apply(prob, q, k, v, spec.bias, spec.alibi)
        out, lse = forward(prob, q, k, v)
        return out, lse.float()
