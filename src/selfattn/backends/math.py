"""``math``: attention in plain torch, the whole (Nq, Nk) score matrix at once.

The readable version of docs/api.md, one line per step; torch's autograd differentiates it. Its
backward hook (the custom op's backward under ``torch.compile``) is the same formula's
derivative written out. Memory is O(Nq * Nk) per head, so it suits short sequences and checking
the other backends.
"""

from __future__ import annotations

import math

import torch

from .. import _rng
from ..engine import acc_dtype, bad_keys, bad_values
from ..rules import alibi_distance, dense_visible, heads5
from ..spec import AttentionSpec

__all__ = ["MathBackend", "math_attention", "math_backward"]


def _scores(
    spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, values_apart=False
):
    """Steps 1-5: the scores (B, Hkv, G, Nq, Nk), the softcap's tanh, and the operands.

    Query head h reads key/value head h // G: the query heads are viewed as (Hkv, G), no copies.
    Rows of k or v holding NaN/inf (when some key can be hidden) are zeroed, so padding garbage
    never reaches a row that cannot see it; a bad key row makes its visible scores NaN. A bad
    value row does too, unless ``values_apart`` (the forward): then it is returned in ``vbad``
    for :func:`_bad_value_terms` to add back to the rows that see it.
    Returns ``(s, tanh, q5, k5, v5, dist, vbad)``.
    """
    acc = acc_dtype(q.dtype)
    b, _, nq, _ = q.shape
    hkv, g, nk = spec.Hkv, spec.group, spec.Nk
    bad, vbad = bad_keys(k, v, spec)  # (B, Hkv, Nk) rows holding NaN/inf, or None
    if vbad is not None and not values_apart:
        bad, vbad = (vbad if bad is None else bad | vbad), None
    if bad is not None:
        k = torch.where(bad[..., None], 0, k)
        v = torch.where(bad[..., None], 0, v)
    if vbad is not None:
        v = torch.where(vbad[..., None], 0, v)
    q5 = q.to(acc).reshape(b, hkv, g, nq, spec.D)  # (B, Hkv, G, Nq, D)
    k5 = k.to(acc).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    v5 = v.to(acc).unsqueeze(2)  # (B, Hkv, 1, Nk, Dv)

    s = spec.scale * (q5 @ k5.transpose(-1, -2))  # 1. scaled scores (B, Hkv, G, Nq, Nk)
    t = None
    if spec.softcap is not None:  # 2. softcap
        t = torch.tanh(s / spec.softcap)
        s = spec.softcap * t
    if spec.bias is not None:  # 3. bias
        s = s + heads5(spec.bias.to(acc), hkv, g)
    dist = None
    if spec.alibi_slopes is not None:  # 4. ALiBi: - slope[h] * |i' - j|
        dist = alibi_distance(spec, 0, nq, 0, nk, q.device, acc)  # (Nq, Nk)
        s = s - spec.alibi_slopes.to(acc).reshape(-1, hkv, g, 1, 1) * dist
    if bad is not None:  # non-finite keys poison only the rows that see them
        s = s.masked_fill(bad[:, :, None, None, :], math.nan)
    vis = dense_visible(spec, q.device)  # 5. visibility, (B|1, Hq|1, Nq, Nk) or None
    if vis is not None:
        s = s.masked_fill(~heads5(vis, hkv, g), -math.inf)
    return s, t, q5, k5, v5, dist, vbad


class _NaNGradRows(torch.autograd.Function):
    """Identity on p whose gradient is NaN in the flagged rows: they see a value row holding
    NaN/inf, so their true dP = dO v^T is not finite, and the forward adds those values outside
    the matrix product, where autograd cannot see them."""

    @staticmethod
    def forward(ctx, p, rows):  # type: ignore[override]
        ctx.save_for_backward(rows)
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        return grad.masked_fill(rows, math.nan), None


def _bad_value_terms(spec: AttentionSpec, p: torch.Tensor, vbad: torch.Tensor, v: torch.Tensor):
    """``(p', fix)``: what the zeroed value rows ``vbad`` (B, Hkv, Nk) leave out of ``p @ v``,
    for the rows that see them (``fix`` (B|1, Hkv, G|1, Nq, Dv)), and p (B, Hkv, G, Nq, Nk)
    with NaN gradients in those rows (``p'``). NaN in ``v[j, c]`` reaches column c only."""
    cols = vbad.any(0).any(0).nonzero().flatten()  # keys bad in some batch element or head
    vis = heads5(dense_visible(spec, p.device), spec.Hkv, spec.group)[..., cols]
    seen = vis & vbad[:, :, None, None, cols]  # (B, Hkv, 1|G, Nq|1, n)
    fix = bad_values(p[..., cols], seen, v[:, :, cols].to(p.dtype).unsqueeze(2))
    if p.requires_grad:
        p = _NaNGradRows.apply(p, seen.any(-1, keepdim=True).expand((*p.shape[:-1], 1)))
    return p, fix


def _sink(spec: AttentionSpec, dtype: torch.dtype) -> torch.Tensor | None:
    """The sinks as (1, Hkv, G, 1, 1) in ``dtype`` (autograd sees them), or None."""
    if spec.sinks is None:
        return None
    return spec.sinks.to(dtype).reshape(1, spec.Hkv, spec.group, 1, 1)


def _softmax(
    s: torch.Tensor, sink: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """6. softmax over keys and the lse; rows with no visible key give p = 0 and lse -inf.

    ``sink`` (broadcastable to (..., 1)): one more logit per row with no value; it joins the
    maximum and the sum, so a row's p sums to less than 1 and an empty row's lse is the sink.
    """
    if s.shape[-1] == 0:  # no keys at all: every row is empty
        m = s.new_zeros((*s.shape[:-1], 1))
        if sink is not None:
            m = torch.maximum(torch.full_like(m, -math.inf), sink.detach())
            m = torch.where(torch.isneginf(m), 0.0, m)
    else:  # the max is a constant for the gradient
        m = s.detach().amax(-1, keepdim=True)
        if sink is not None:
            m = torch.maximum(m, sink.detach())
        m = torch.where(torch.isneginf(m), 0.0, m)
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    if sink is not None:
        total = total + torch.exp(sink - m)  # the sink's share of the denominator, no value
    empty = total == 0
    p = e / torch.where(empty, 1.0, total)
    lse = torch.where(empty, -math.inf, m + torch.log(torch.where(empty, 1.0, total)))
    return p, lse


def math_attention(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seed: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention by materialising the scores; returns ``(out, lse)`` (lse float32)."""
    b, hq, nq, _ = q.shape
    s, _, _, _, v5, _, vbad = _scores(spec, q, k, v, values_apart=True)
    p, lse = _softmax(s, _sink(spec, s.dtype))
    if spec.dropout_p > 0:  # 7. dropout, the same counter-based mask as every backend
        p = p * _keep_scale(seed, spec, q.device, p.dtype)
    fix = None
    if vbad is not None:  # value rows holding NaN/inf, zeroed in v5: added back where seen
        p, fix = _bad_value_terms(spec, p, vbad, v)
    out = p @ v5  # 8. weighted sum (B, Hkv, G, Nq, Dv)
    if fix is not None:
        out = out + fix
    return out.reshape(b, hq, nq, v.shape[-1]).to(q.dtype), lse.reshape(b, hq, nq).float()


def math_backward(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    seed: tuple[int, int] | None,
    need_dbias: bool,
    need_dalibi: bool,
) -> tuple:
    """The gradients of :func:`math_attention`, written out (no autograd).

    ``dP = dO V^T`` (times the dropout mask), ``dS = P * (dP - rowsum(P * dP) + dlse)``,
    ``dV = P'^T dO`` (P' after dropout), ``dQ = scale dS K``, ``dK = scale dS^T Q`` (through the
    softcap's ``1 - tanh^2``). Returns ``(dq, dk, dv, dbias, dalibi)`` in the accumulation
    dtype, dbias shaped like ``spec.bias`` and dalibi like ``spec.alibi_slopes`` (None when not
    asked for). P includes the sinks' share; their own gradient is ``sinks.sink_grad``'s.
    """
    b, hq, nq, d = q.shape
    hkv, g = spec.Hkv, spec.group
    s, t, q5, k5, v5, dist, _ = _scores(spec, q, k, v)
    p, _ = _softmax(s, _sink(spec, s.dtype))
    do5 = dout.to(p.dtype).reshape(b, hkv, g, nq, -1)  # (B, Hkv, G, Nq, Dv)
    dp = do5 @ v5.transpose(-1, -2)  # (B, Hkv, G, Nq, Nk)
    pd = p
    if spec.dropout_p > 0:
        keep = _keep_scale(seed, spec, q.device, p.dtype)
        pd, dp = p * keep, dp * keep
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    if dlse is not None:
        ds = ds + p * dlse.to(p.dtype).reshape(b, hkv, g, nq, 1)
    dv = (pd.transpose(-1, -2) @ do5).sum(2)  # (B, Hkv, Nk, Dv)
    dbias = dalibi = None
    ds4 = ds.reshape(b, hq, nq, -1)
    if need_dbias:
        dims = [i for i in range(4) if spec.bias.shape[i] == 1 and ds4.shape[i] != 1]
        dbias = (ds4.sum(dims, keepdim=True) if dims else ds4).reshape(spec.bias.shape)
    if need_dalibi:
        per_head = -(ds4 * dist).sum((2, 3))  # (B, Hq)
        dalibi = per_head.sum(0, keepdim=True) if spec.alibi_slopes.shape[0] == 1 else per_head
    if t is not None:
        ds = ds * (1.0 - t * t)  # through softcap: d tanh = 1 - tanh^2
    dq = spec.scale * (ds @ k5)  # (B, Hkv, G, Nq, D)
    dk = spec.scale * (ds.transpose(-1, -2) @ q5).sum(2)  # (B, Hkv, Nk, D)
    return dq.reshape(b, hq, nq, d), dk, dv, dbias, dalibi


def _keep_scale(seed, spec: AttentionSpec, device: torch.device, dtype) -> torch.Tensor:
    """keep / (1 - p), (B, Hkv, G, Nq, Nk), from the shared hash of global row ids."""
    rows = torch.arange(spec.B * spec.Hq * spec.Nq, device=device)
    rows = rows.view(spec.B, spec.Hkv, spec.group, spec.Nq, 1)
    keep = _rng.keep_mask(seed, rows, torch.arange(spec.Nk, device=device), spec.dropout_p)
    return keep.to(dtype) / (1.0 - spec.dropout_p)


class MathBackend:
    """Plain torch; materialises the scores; torch autograd."""

    name = "math"

    def unavailable(self) -> str | None:
        return None

    def check(self, spec: AttentionSpec) -> list[str]:
        return []

    def run(self, spec, q, k, v, seed):
        return math_attention(spec, q, k, v, seed)

    def backward(self, spec, q, k, v, out, lse, dout, dlse, seed, need_dbias, need_dalibi):
        """The formula's derivative in plain torch (the scores are recomputed)."""
        return math_backward(spec, q, k, v, dout, dlse, seed, need_dbias, need_dalibi)
