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

Written in torch operations, the engine's cost beyond its two GEMMs per tile is the passes over
each tile of scores, so it keeps them few: subtractions ride inside the GEMMs (a column of ones
on K or V against ``-m_i``, ``-lse`` or ``-D`` on the other side), the running maximum is frozen
after the first chunk when a Cauchy-Schwarz bound allows (``_forward_part``), masks are cached
additive tiles, and tiles live in one reusable workspace. A large call is split across CPU
threads by heads or by bands of rows (``_split``).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from .. import _rng
from ..masks import Rules, heads5, max_span
from ..spec import AttentionSpec

__all__ = [
    "BLOCK_N",
    "ROWS_PER_TILE",
    "Dropout",
    "Problem",
    "TiledBackend",
    "backward",
    "forward",
    "probabilities",
]

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
class Dropout:
    """Dropout of a (sub-)problem: the seed, ``p``, and where the problem sits in the full call.

    Rows are numbered ``((b0 + b) * hq_total + h0 + h) * nq_total + r0 + i`` as in the full call,
    so every part of a split problem draws exactly the mask the whole would.
    """

    seed: tuple[int, int]
    p: float
    hq_total: int
    nq_total: int
    b0: int = 0
    h0: int = 0
    r0: int = 0


@dataclass(frozen=True)
class Problem:
    """One tiled problem: q (B, H, M, D) against k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv).

    ``scale``, ``softcap`` as in API.md; ``dropout`` numbers rows as the full call does.
    """

    rules: Rules
    scale: float
    softcap: float | None = None
    dropout: Dropout | None = None

    def part(self, b0: int, b1: int, kh0: int, kh1: int, r0: int, r1: int) -> Problem:
        """The sub-problem of batch [b0, b1), key/value heads [kh0, kh1), rows [r0, r1)."""
        drop = self.dropout
        if drop is not None:
            g = self.rules.group
            drop = replace(drop, b0=drop.b0 + b0, h0=drop.h0 + kh0 * g, r0=drop.r0 + r0)
        return Problem(self.rules.part(b0, b1, kh0, kh1, r0, r1), self.scale, self.softcap, drop)

    @property
    def qscale(self) -> float:
        """What q is multiplied by so that ``q @ k^T`` is the score (base 2) or ``s / softcap``."""
        if self.softcap is not None:
            return self.scale / self.softcap
        return self.scale * LOG2E

    def block_m(self) -> int:
        """Query rows per block: ``ROWS_PER_TILE`` rows of scores across the query heads of a
        key/value head; under a narrow window, fewer, since a block of ``m`` rows reads
        ``window + m`` keys for ``window`` useful ones."""
        rows = ROWS_PER_TILE
        widths = [w for w in (self.rules.left, self.rules.right) if w is not None]
        if len(widths) == 2 or (widths and self.rules.causal):
            rows = min(rows, max(64, sum(widths) // 4))
        return max(1, rows // self.rules.group)


def _kv_matrix(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(B, Hkv, Nk, X) -> (B*Hkv, Nk, X) in the accumulation dtype (a view when possible)."""
    b, h, n, x = t.shape
    return t.to(acc).reshape(b * h, n, x)


def _key_matrix(k: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(B, Hkv, Nk, D) -> (B*Hkv, Nk, D + 1): the keys and a column of ones.

    With the matching query column holding ``-shift`` (see :func:`_query_block`), one matrix
    product gives ``q @ k^T - shift``: the running maximum (forward) or the lse (backward) is
    subtracted inside the GEMM instead of in a separate pass over the scores.
    """
    b, h, n, d = k.shape
    kmat = torch.empty(b * h, n, d + 1, dtype=acc, device=k.device)
    kmat[..., :d] = k.reshape(b * h, n, d)
    kmat[..., d] = 1.0
    return kmat


def _query_block(q: torch.Tensor, i0: int, i1: int, hkv: int, qscale: float) -> torch.Tensor:
    """Rows [i0, i1) of q (B, H, M, D), scaled, as (B*Hkv, G*m, D + 1) with a zero shift column."""
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


def all_finite(*tensors: torch.Tensor | None) -> bool:
    """True when no tensor holds NaN/inf: one cheap sum each, the exact check only if it overflows."""
    for t in tensors:
        if t is None or bool(torch.isfinite(t.sum())):
            continue  # a finite sum means every entry is finite
        if not bool(torch.isfinite(t).all()):
            return False
    return True


def _bad_keys(k: torch.Tensor, v: torch.Tensor | None, rules: Rules) -> torch.Tensor | None:
    """(B, Hkv, Nk) True where k or v holds NaN/inf, when some key may be hidden from a row.

    Such keys are zeroed before use and their visible scores set to NaN, so padding garbage never
    leaks into rows that cannot see it (0 * NaN is NaN in a matrix product) while rows that do
    see it still get NaN, as in the specification.
    """
    if not rules.restricts:
        return None  # every row sees every key: non-finite values propagate as they should
    if all_finite(k, v):
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
        # one tile at most: rows of a block (fewer when the problem is short) x the widest span
        rows = min(qb_rows, rules.group * rules.M)
        size = kmat.shape[0] * rows * min(max_span(BLOCK_N), kmat.shape[1])
        self.bufs = [
            torch.empty(size, dtype=kmat.dtype, device=kmat.device) for _ in range(buffers)
        ]
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
    drop = prob.dropout
    b, hkv, g, m = rules.B, rules.Hkv, rules.group, i1 - i0
    device = like.device
    heads = torch.arange(drop.h0, drop.h0 + hkv * g, device=device).view(1, hkv, g, 1)
    batch = torch.arange(drop.b0, drop.b0 + b, device=device).view(b, 1, 1, 1)
    rows = torch.arange(drop.r0 + i0, drop.r0 + i1, device=device).view(1, 1, 1, m)
    row_ids = ((batch * drop.hq_total + heads) * drop.nq_total + rows).reshape(b * hkv, g * m, 1)
    keep = _rng.keep_mask(drop.seed, row_ids, torch.arange(j0, j1, device=device), drop.p)
    return keep.to(like.dtype).mul_(1.0 / (1.0 - drop.p))


def _static_ok(prob: Problem, rules: Rules) -> bool:
    """Whether a per-row upper bound on the scores is known (see ``_forward_part``)."""
    if rules.bias is not None or rules.bad_keys is not None:
        return False  # a bias is unbounded; NaN keys must reach the exact path
    return rules.alibi is None or bool((rules.alibi >= 0).all())


def _forward_part(
    prob: Problem,
    q: torch.Tensor,
    kmat: torch.Tensor,
    vmat: torch.Tensor | None,
    out: torch.Tensor | None,
    lse: torch.Tensor,
) -> None:
    """The online-softmax loop over one (sub-)problem, writing into ``out`` and ``lse``.

    q (B, H, M, D); kmat (B*Hkv, Nk, D+1) from :func:`_key_matrix` and vmat (B*Hkv, Nk, Dv) in
    the accumulation dtype; out (B, H, M, Dv) or None (lse only); lse (B, H, M).

    After the first key chunk the running maximum ``m_i`` is frozen when no later score can
    exceed it by more than ``STATIC_SLACK`` (base 2): by Cauchy-Schwarz a score is at most
    ``|q_i| * max_j |k_j|`` (or ``softcap``), so ``exp2(s - m_i)`` cannot overflow, and since
    ``m_i`` is an actual score no row underflows. The remaining chunks then skip the row maximum,
    the rescaling of ``l_i`` and ``acc``, and (folded into the GEMM) the subtraction.
    """
    rules = prob.rules
    acc_t = kmat.dtype
    b, h, m_total, d = q.shape
    hkv, g = rules.Hkv, rules.group
    dv = vmat.shape[-1] if vmat is not None else 0
    floor = torch.finfo(acc_t).min  # stands in for -inf in m_i so exp2(-inf - m_i) stays 0
    bm = prob.block_m()
    scores = _Scores(prob, rules, g * bm, kmat, buffers=1)
    static_ok = _static_ok(prob, rules)
    knorm = kmat[..., :d].norm(dim=-1) if static_ok and prob.softcap is None else None
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        qb = _query_block(q, i0, i1, hkv, prob.qscale)  # (B*Hkv, G*m, D+1)
        # full chunks first: after one of them every row has seen a key
        spans = sorted(rules.key_spans(i0, i1, BLOCK_N), key=lambda span: not span[2])
        if not spans:  # no row of the block sees any key
            if out is not None:
                out[:, :, i0:i1] = 0
            lse[:, :, i0:i1] = -math.inf
            continue
        frozen = False
        m_i = l_i = acc = None
        for c, (j0, j1, full) in enumerate(spans):
            s, _ = scores(qb, i0, i1, j0, j1, full)
            if c == 0:  # the chunk's own row maximum; nothing to rescale yet
                m_i = s.amax(-1, keepdim=True).clamp_(min=floor)  # (B*Hkv, G*m, 1)
                p = torch.exp2(s.sub_(m_i), out=s)  # (B*Hkv, G*m, n), reuses the score tile
                l_i = p.sum(-1, keepdim=True)
            elif frozen:  # m_i fixed: s already holds s - m_i (softcap: subtract here)
                if prob.softcap is not None:
                    s.sub_(m_i)
                p = torch.exp2(s, out=s)
                l_i.add_(p.sum(-1, keepdim=True))
            else:
                m_new = torch.maximum(m_i, s.amax(-1, keepdim=True))
                alpha = torch.exp2(m_i - m_new)
                p = torch.exp2(s.sub_(m_new), out=s)
                l_i.mul_(alpha).add_(p.sum(-1, keepdim=True))
                m_i = m_new
                if acc is not None:
                    acc.mul_(alpha)
            if out is not None:
                if prob.dropout is not None:
                    p.mul_(_dropout_scale(prob, rules, i0, i1, j0, j1, p))
                if acc is None:
                    acc = torch.bmm(p, vmat[:, j0:j1])  # (B*Hkv, G*m, Dv)
                else:
                    acc.baddbmm_(p, vmat[:, j0:j1])
            if c == 0 and static_ok and len(spans) > 1:
                frozen = _freeze(prob, qb, knorm, m_i, spans, d)
        # every visible row has l_i >= 1 (its maximum contributes exp2(0)), empty rows have 0
        if acc is not None:
            acc.div_(l_i.clamp(min=1.0))
            out[:, :, i0:i1] = acc.view(b, h, m, dv)
        lse[:, :, i0:i1] = ((m_i + torch.log2(l_i)) * LN2).view(b, h, m)


STATIC_SLACK = 64.0  # base 2: p <= 2**64, so even acc = sum p * v (|v| * Nk < 2**60) stays finite


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
    if prob.softcap is not None:
        bound = prob.softcap * LOG2E  # tanh <= 1
        return bool(bound - m_i.min() <= STATIC_SLACK)
    lo, hi = min(j0 for j0, _, _ in spans), max(j1 for _, j1, _ in spans)
    kmax = knorm[:, lo:hi].amax(-1).view(-1, 1, 1)  # (B*Hkv, 1, 1)
    bound = qb[..., :d].norm(dim=-1, keepdim=True) * kmax  # (B*Hkv, G*m, 1), base 2
    if not bool(((bound - m_i) <= STATIC_SLACK).all()):
        return False
    qb[..., d : d + 1] = -m_i  # the GEMM now yields s - m_i
    return True


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

    Writes dq (B, H, M, D) (unscaled: the caller multiplies by ``scale``) and accumulates into
    dk (B*Hkv, Nk, D) (in ``qscale`` units), dv (B*Hkv, Nk, Dv), dbias and dalibi.
    ``lse2`` is the base-2 lse with ``+inf`` for rows that see nothing; ``delta`` is
    ``rowsum(dO * O) - dlse``.
    """
    rules = prob.rules
    acc_t = kmat.dtype
    b, h, m_total, d = q.shape
    hkv, g = rules.Hkv, rules.group
    dv_dim = vmat.shape[-1] - 1  # vmat carries a column of ones (see below)
    bm = prob.block_m()
    scores = _Scores(prob, rules, g * bm, kmat, buffers=2)
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        qb = _query_block(q, i0, i1, hkv, prob.qscale)  # (B*Hkv, G*m, D+1)
        dob = _query_block(dout, i0, i1, hkv, 1.0)  # (B*Hkv, G*m, Dv+1)
        lse_b = lse2[:, :, i0:i1].reshape(b * hkv, g * m, 1)
        delta_b = delta[:, :, i0:i1].reshape(b * hkv, g * m, 1)
        # Fold the subtractions into the GEMMs: [q, -lse] @ [k, 1]^T = s - lse and
        # [dO, -D] @ [v, 1]^T = dP - D (with dropout, D comes after the mask instead).
        if prob.softcap is None:
            qb[..., d : d + 1] = -lse_b  # finite: rows that see nothing have lse +inf here
        if prob.dropout is None:
            dob[..., dv_dim : dv_dim + 1] = -delta_b
        do_v = dob[..., :dv_dim]
        dqb = torch.zeros(b * hkv, g * m, d, dtype=acc_t, device=q.device)
        for j0, j1, full in rules.key_spans(i0, i1, BLOCK_N):
            s, t = scores(qb, i0, i1, j0, j1, full, keep_tanh=True)
            if prob.softcap is not None:
                s.sub_(lse_b)
            p = torch.exp2(s, out=s)  # (B*Hkv, G*m, n) probabilities
            dp = torch.bmm(  # dP - D = [dO, -D] [V, 1]^T
                dob, vmat[:, j0:j1].transpose(1, 2), out=scores.buffer(1, g * m, j1 - j0)
            )
            if prob.dropout is not None:
                drop = _dropout_scale(prob, rules, i0, i1, j0, j1, p)
                dv[:, j0:j1].baddbmm_((p * drop).transpose(1, 2), do_v)
                dp.mul_(drop).sub_(delta_b)
            else:
                dv[:, j0:j1].baddbmm_(p.transpose(1, 2), do_v)  # dV += P^T dO
            ds = dp.mul_(p)  # dS = P * (dP - D), natural-log units
            if dbias is not None:
                _accumulate_dbias(dbias, ds, rules, i0, i1, j0, j1)
            if dalibi is not None:
                dist = rules.alibi_distance(i0, i1, j0, j1, ds.device, ds.dtype)
                per_head = (ds.view(b, hkv * g, m, j1 - j0) * dist).sum((2, 3))  # (B, Hq)
                dalibi -= per_head.sum(0, keepdim=True) if dalibi.shape[0] == 1 else per_head
            if t is not None:
                ds.mul_(1.0 - t * t)  # through softcap: d tanh = 1 - tanh^2
            dqb.baddbmm_(ds, kmat[:, j0:j1, :d])  # dQ += dS K
            dk[:, j0:j1].baddbmm_(ds.transpose(1, 2), qb[..., :d])  # dK += dS^T Q
        dq[:, :, i0:i1] = dqb.view(b, h, m, d)


# -- splitting one call across CPU threads ------------------------------------------------------
#
# torch parallelises each op internally, with a fork/join per op; at these tile sizes that costs
# much of the second core, and collapses when the machine is busy. Instead each worker thread
# runs whole parts of the problem with single-threaded ops (torch releases the GIL inside ops),
# the way fused CPU kernels split work: by (batch, key/value head) when there are enough of them,
# else by bands of query rows balanced by their visible keys.

MIN_PARALLEL_SCORES = 1 << 24  # below this many scores a call runs in the calling thread
# Key/value heads a worker computes together (one batched GEMM): fewer keep a tile of scores in
# the core's own cache, more amortise the per-op Python cost.
KV_HEADS_PER_PART = 8
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_PID = 0  # a forked child inherits the pool object but none of its threads
_POOL_LOCK = threading.Lock()
_IN_WORKER = threading.local()


def _init_worker() -> None:
    torch.set_num_threads(
        1
    )  # per-thread setting (OpenMP/MKL thread-local): other threads keep theirs
    _IN_WORKER.active = True


def _run_jobs(fn, jobs: list) -> list:
    """Run ``fn(job)`` for every job on the worker pool and return the results in order."""
    global _POOL, _POOL_SIZE, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or len(jobs) > _POOL_SIZE or os.getpid() != _POOL_PID:
            _POOL = ThreadPoolExecutor(
                len(jobs), thread_name_prefix="selfattn", initializer=_init_worker
            )
            _POOL_SIZE, _POOL_PID = len(jobs), os.getpid()
        pool = _POOL
    futures = [pool.submit(fn, job) for job in jobs]
    return [f.result() for f in futures]


Rect = tuple[int, int, int, int, int, int]  # b0, b1, kh0, kh1, r0, r1


def _split(prob: Problem, nk: int) -> tuple[list[list[Rect]], bool] | None:
    """Per-thread lists of parts, and whether parts share key/value heads (a row split).

    None when the call should run in the calling thread.
    """
    rules = prob.rules
    threads = torch.get_num_threads()
    b, hkv, m = rules.B, rules.Hkv, rules.M
    if threads < 2 or getattr(_IN_WORKER, "active", False):
        return None
    if b * rules.H * m * nk < MIN_PARALLEL_SCORES:
        return None
    units = b * hkv
    # By heads when they divide evenly and give each op several heads' worth of rows; else by
    # bands of rows, so each op still spans every head (a window over 4 heads: +15%).
    row_blocks = -(-m // prob.block_m())
    per_thread = units * rules.group // threads
    even = units >= threads and (units % threads == 0 or units >= 4 * threads)
    if even and (per_thread >= 4 or row_blocks < 2 * threads):
        jobs: list[list[Rect]] = []
        for t in range(threads):
            lo, hi = t * units // threads, (t + 1) * units // threads
            rects = []
            u = lo
            while u < hi:  # cut the run of units at batch boundaries
                bi, kh = divmod(u, hkv)
                end = min(hi, (bi + 1) * hkv, u + KV_HEADS_PER_PART)
                rects.append((bi, bi + 1, kh, kh + end - u, 0, m))
                u = end
            jobs.append(rects)
        return jobs, False
    # bands of rows with equal numbers of visible keys (causal bands are not equal in height)
    bm = prob.block_m()
    starts = list(range(0, m, bm))
    work = [sum(j1 - j0 for j0, j1, _ in rules.key_spans(i, min(i + bm, m), nk)) for i in starts]
    total = sum(work)
    if total == 0 or len(starts) < threads:
        return None
    jobs, acc, r0, t = [], 0, 0, 1
    for i, w in zip(starts, work):
        acc += w
        if acc >= total * t / threads and t < threads:
            end = min(i + bm, m)
            jobs.append([(0, b, 0, hkv, r0, end)])
            r0, t = end, t + 1
    jobs.append([(0, b, 0, hkv, r0, m)])
    jobs = [j for j in jobs if j[0][4] < j[0][5]]
    return (jobs, True) if len(jobs) > 1 else None


def _heads(rect: Rect, g: int) -> tuple[slice, slice, slice, slice]:
    b0, b1, kh0, kh1, r0, r1 = rect
    return slice(b0, b1), slice(kh0 * g, kh1 * g), slice(kh0, kh1), slice(r0, r1)


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
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, _ = q.shape
    prob, k, v = _sanitize(prob, k, v)
    if v is not None and out is None:
        out = torch.empty(b, h, m_total, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, m_total, dtype=acc_t, device=q.device)
    plan = _split(prob, k.shape[2]) if q.device.type == "cpu" else None
    if plan is None:
        vmat = _kv_matrix(v, acc_t) if v is not None else None
        _forward_part(prob, q, _key_matrix(k, acc_t), vmat, out, lse)
        return out, lse
    g = prob.rules.group

    def job(rects: list[Rect]) -> None:
        with torch.no_grad():
            for rect in rects:
                bs, hs, ks, rs = _heads(rect, g)
                vmat = _kv_matrix(v[bs, ks], acc_t) if v is not None else None
                o = out[bs, hs, rs] if out is not None else None
                _forward_part(
                    prob.part(*rect),
                    q[bs, hs, rs],
                    _key_matrix(k[bs, ks], acc_t),
                    vmat,
                    o,
                    lse[bs, hs, rs],
                )

    _run_jobs(job, plan[0])
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
        ``(dq, dk, dv, dbias, dalibi)`` in the accumulation dtype, dbias shaped like
        ``rules.bias`` and dalibi like ``rules.alibi``; None where not asked for.
    """
    rules = prob.rules
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, d = q.shape
    hkv, g = rules.Hkv, rules.group
    prob, k, v = _sanitize(prob, k, v)
    nk, dv_dim = k.shape[2], v.shape[-1]
    dq = torch.empty(b, h, m_total, d, dtype=acc_t, device=q.device)
    dk = torch.zeros(b, hkv, nk, d, dtype=acc_t, device=q.device)
    dv = torch.zeros(b, hkv, nk, dv_dim, dtype=acc_t, device=q.device)
    dbias = torch.zeros(rules.bias.shape, dtype=acc_t, device=q.device) if need_dbias else None
    dalibi = torch.zeros(rules.alibi.shape, dtype=acc_t, device=q.device) if need_dalibi else None
    # D_i = rowsum(dO * O) (minus dlse): the softmax Jacobian's diagonal term
    delta = (dout.to(acc_t) * out.to(acc_t)).sum(-1)  # (B, H, M)
    if dlse is not None:
        delta = delta - dlse.to(acc_t)
    # rows that see nothing have lse -inf: +inf makes exp2(s - lse) = 0 there
    lse2 = torch.where(torch.isneginf(lse), math.inf, lse.to(acc_t) * LOG2E)
    plan = _split(prob, nk) if q.device.type == "cpu" else None
    if plan is None:
        _backward_part(
            prob, q, _key_matrix(k, acc_t), _key_matrix(v, acc_t), lse2, dout, delta, dq,
            dk.view(b * hkv, nk, d), dv.view(b * hkv, nk, dv_dim), dbias, dalibi,
        )  # fmt: skip
    else:
        jobs, shared = plan

        def job(rects: list[Rect]):
            with torch.no_grad():
                # a row split shares key/value heads between threads: private dK/dV, summed below
                dk_t = torch.zeros_like(dk) if shared else dk
                dv_t = torch.zeros_like(dv) if shared else dv
                grads = []
                for rect in rects:
                    bs, hs, ks, rs = _heads(rect, g)
                    part = prob.part(*rect)
                    db = (
                        None
                        if dbias is None
                        else torch.zeros(part.rules.bias.shape, dtype=acc_t, device=q.device)
                    )
                    da = (
                        None
                        if dalibi is None
                        else torch.zeros(part.rules.alibi.shape, dtype=acc_t, device=q.device)
                    )
                    kb, vb = dk_t[bs, ks], dv_t[bs, ks]
                    _backward_part(
                        part, q[bs, hs, rs], _key_matrix(k[bs, ks], acc_t), _key_matrix(v[bs, ks], acc_t),
                        lse2[bs, hs, rs], dout[bs, hs, rs], delta[bs, hs, rs], dq[bs, hs, rs],
                        kb.view(-1, nk, d), vb.view(-1, nk, dv_dim), db, da,
                    )  # fmt: skip
                    grads.append((rect, db, da))
                return (dk_t, dv_t) if shared else None, grads

        for kv, grads in _run_jobs(job, jobs):
            if kv is not None:
                dk += kv[0]
                dv += kv[1]
            for rect, db, da in grads:
                if db is not None:
                    dbias[_bias_index(dbias, rect, g)] += db
                if da is not None:
                    bs, hs, _, _ = _heads(rect, g)
                    dalibi[bs if dalibi.shape[0] > 1 else slice(None), hs] += da
    dq.mul_(prob.scale)
    dk.mul_(prob.scale / prob.qscale)  # dS/dk uses `scale`, qb held `qscale`
    return dq, dk, dv, dbias, dalibi


def probabilities(
    prob: Problem, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    """Exact softmax probabilities ``exp(S - lse)``, tile by tile.

    q (B, H, M, D), k (B, Hkv, Nk, D), lse (B, H, M) natural log. Returns float32
    (B, H, M, Nk); keys outside every visible span stay 0, rows with lse ``-inf`` are 0.
    """
    prob, k, _ = _sanitize(prob, k, None)
    rules = prob.rules
    acc_t = acc_dtype(q.dtype)
    b, h, m_total, d = q.shape
    hkv, g, nk = rules.Hkv, rules.group, k.shape[2]
    kmat = _key_matrix(k, acc_t)
    out = torch.zeros(b, h, m_total, nk, dtype=torch.float32, device=q.device)
    lse2 = torch.where(torch.isneginf(lse), math.inf, lse.to(acc_t) * LOG2E)
    bm = prob.block_m()
    scores = _Scores(prob, rules, g * bm, kmat, buffers=1)
    for i0 in range(0, m_total, bm):
        i1 = min(i0 + bm, m_total)
        m = i1 - i0
        qb = _query_block(q, i0, i1, hkv, prob.qscale)
        lse_b = lse2[:, :, i0:i1].reshape(b * hkv, g * m, 1)
        if prob.softcap is None:
            qb[..., d : d + 1] = -lse_b  # the GEMM yields s - lse
        for j0, j1, full in rules.key_spans(i0, i1, BLOCK_N):
            s, _ = scores(qb, i0, i1, j0, j1, full)
            if prob.softcap is not None:
                s.sub_(lse_b)
            p = torch.exp2(s, out=s)
            out[:, :, i0:i1, j0:j1] = p.view(b, h, m, j1 - j0)
    return out


def _bias_index(dbias: torch.Tensor, rect: Rect, g: int) -> tuple[slice, ...]:
    """Where a part's bias slice sits in the full (broadcast) bias."""
    b0, b1, kh0, kh1, r0, r1 = rect
    ranges = ((b0, b1), (kh0 * g, kh1 * g), (r0, r1))
    return tuple(
        slice(None) if dbias.shape[d] == 1 else slice(*rng) for d, rng in enumerate(ranges)
    )


def _sanitize(
    prob: Problem, k: torch.Tensor, v: torch.Tensor | None
) -> tuple[Problem, torch.Tensor, torch.Tensor | None]:
    """Zero non-finite keys/values that a rule may hide, and mark them (see ``_bad_keys``)."""
    bad = _bad_keys(k, v, prob.rules)
    if bad is None:
        return prob, k, v
    k = torch.where(bad[..., None], 0, k)
    v = torch.where(bad[..., None], 0, v) if v is not None else None
    return replace(prob, rules=replace(prob.rules, bad_keys=bad)), k, v


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
        dropout = Dropout(seed, spec.dropout_p, spec.Hq, spec.Nq)
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
