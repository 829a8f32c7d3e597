"""``math``: attention in plain torch, the whole (Nq, Nk) score matrix at once.

The readable version of API.md section 2, one line per step; torch's autograd differentiates it.
Memory is O(Nq * Nk) per head, so it suits short sequences and checking the other backends.
"""

from __future__ import annotations

import math

import torch

from .. import _rng
from ..engine import acc_dtype, bad_keys
from ..rules import alibi_distance, dense_visible, heads5
from ..spec import AttentionSpec
from .recompute import backward_by_recompute

__all__ = ["MathBackend", "math_attention"]


def math_attention(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seed: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention by materialising the scores; returns ``(out, lse)`` (lse float32)."""
    acc = acc_dtype(q.dtype)
    b, hq, nq, _ = q.shape
    hkv, g, nk = spec.Hkv, spec.group, spec.Nk
    bad = bad_keys(k, v, spec)  # (B, Hkv, Nk) keys holding NaN/inf, if some key can be hidden
    if bad is not None:
        k = torch.where(bad[..., None], 0, k)
        v = torch.where(bad[..., None], 0, v)
    # Query head h reads key/value head h // G: view the query heads as (Hkv, G), no copies.
    q5 = q.to(acc).reshape(b, hkv, g, nq, spec.D)  # (B, Hkv, G, Nq, D)
    k5 = k.to(acc).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    v5 = v.to(acc).unsqueeze(2)  # (B, Hkv, 1, Nk, Dv)

    s = spec.scale * (q5 @ k5.transpose(-1, -2))  # 1. scaled scores (B, Hkv, G, Nq, Nk)
    if spec.softcap is not None:  # 2. softcap
        s = spec.softcap * torch.tanh(s / spec.softcap)
    if spec.bias is not None:  # 3. bias
        s = s + heads5(spec.bias.to(acc), hkv, g)
    if spec.alibi_slopes is not None:  # 4. ALiBi: - slope[h] * |i' - j|
        dist = alibi_distance(spec, 0, nq, 0, nk, q.device, acc)  # (Nq, Nk)
        s = s - spec.alibi_slopes.to(acc).reshape(-1, hkv, g, 1, 1) * dist
    if bad is not None:  # non-finite keys poison only the rows that see them
        s = s.masked_fill(bad[:, :, None, None, :], math.nan)
    vis = dense_visible(spec, q.device)  # 5. visibility, (B|1, Hq|1, Nq, Nk) or None
    if vis is not None:
        s = s.masked_fill(~heads5(vis, hkv, g), -math.inf)

    # 6. softmax; the max is a constant for the gradient, rows with no visible key give p = 0
    if nk == 0:  # no keys at all: every row is empty
        m = s.new_zeros((*s.shape[:-1], 1))
    else:
        m = s.detach().amax(-1, keepdim=True)
        m = torch.where(torch.isneginf(m), 0.0, m)
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    empty = total == 0
    p = e / torch.where(empty, 1.0, total)
    lse = torch.where(empty, -math.inf, m + torch.log(torch.where(empty, 1.0, total)))
    if spec.dropout_p > 0:  # 7. dropout, the same counter-based mask as every backend
        p = p * _keep(seed, spec, q.device).to(acc) / (1.0 - spec.dropout_p)
    out = p @ v5  # 8. weighted sum (B, Hkv, G, Nq, Dv)
    return out.reshape(b, hq, nq, v.shape[-1]).to(q.dtype), lse.reshape(b, hq, nq).float()


def _keep(seed: tuple[int, int], spec: AttentionSpec, device: torch.device) -> torch.Tensor:
    """Keep mask (B, Hkv, G, Nq, Nk) from the shared hash."""
    rows = torch.arange(spec.B * spec.Hq * spec.Nq, device=device)  # the global row ids
    rows = rows.view(spec.B, spec.Hkv, spec.group, spec.Nq, 1)
    return _rng.keep_mask(seed, rows, torch.arange(spec.Nk, device=device), spec.dropout_p)


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
        """Through torch's autograd of the plain formula (the forward runs again)."""
        return backward_by_recompute(
            self.run, spec, q, k, v, dout, dlse, seed, need_dbias, need_dalibi
        )
