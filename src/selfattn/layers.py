"""Layers: multi-head self-attention (Vaswani et al., 2017, with GQA, RoPE, ALiBi, QK-norm and a
KV cache) and the pre-norm Transformer block (LayerNorm/RMSNorm, GELU/SwiGLU MLP).

The layers call :func:`selfattn.attention`, which becomes a ``torch.library`` custom op while
``torch.compile`` traces, so compiled models have no graph break.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .api import attention, attention_weights
from .kv_cache import KVCache
from .positional import RotaryEmbedding, alibi_slopes

__all__ = ["MultiHeadSelfAttention", "TransformerBlock"]


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    ``x`` (B, N, E) is projected once to queries (Hq heads), keys and values (Hkv heads each) of
    width D; query head ``h`` reads key/value head ``h // (Hq / Hkv)`` (MHA when Hkv = Hq, GQA
    when fewer, MQA when 1) without repeating keys or values. The heads' outputs are
    concatenated and projected back to E.

    Args:
        embed_dim: E.
        num_heads: Hq, query heads.
        num_kv_heads: Hkv, key/value heads (divides Hq); Hq by default.
        head_dim: D; ``embed_dim // num_heads`` by default (then E must be a multiple of Hq).
        bias: biases in the projections.
        dropout: attention-probability dropout while training.
        causal: each token sees itself and the tokens before it.
        window: ``(left, right)`` sliding window, as in :func:`selfattn.attention`.
        rope: rotate queries and keys with :class:`selfattn.RotaryEmbedding`.
        rope_base: the RoPE frequency base.
        alibi: add ALiBi distance penalties with :func:`selfattn.alibi_slopes`.
        qk_norm: RMS-normalise each query and key head (learned scale) before attention.
        sinks: learn one attention-sink logit per query head (GPT-OSS), the parameter
            ``self.sinks`` (Hq,), initialised to 0; passed to :func:`selfattn.attention` as
            ``sinks=``.
        backend: the :func:`selfattn.attention` backend.
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        causal: bool = False,
        window: tuple[int | None, int | None] | None = None,
        rope: bool = False,
        rope_base: float = 10000.0,
        alibi: bool = False,
        qk_norm: bool = False,
        sinks: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = checks.integer("embed_dim", embed_dim)
        self.num_heads = checks.integer("num_heads", num_heads)
        self.num_kv_heads = (
            self.num_heads if num_kv_heads is None else checks.integer("num_kv_heads", num_kv_heads)
        )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads}, "
                f"num_kv_heads={num_kv_heads}"
            )
        if head_dim is None:
            if self.embed_dim % self.num_heads:
                raise ValueError(
                    f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; "
                    "pass head_dim="
                )
            head_dim = self.embed_dim // self.num_heads
        self.head_dim = checks.integer("head_dim", head_dim)
        self.dropout = checks.probability("dropout", dropout)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        self.causal = causal
        self.window = checks.window(window)
        if rope and alibi:
            raise ValueError("choose one of rope=True and alibi=True, not both")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        self.qkv = nn.Linear(self.embed_dim, (hq + 2 * hkv) * d, bias=bias, **factory)
        self.out = nn.Linear(hq * d, self.embed_dim, bias=bias, **factory)
        self.rope = RotaryEmbedding(d, base=rope_base) if rope else None
        self.slopes: torch.Tensor | None
        if alibi:
            self.register_buffer("slopes", alibi_slopes(hq).to(device), persistent=False)
        else:
            self.slopes = None
        self.q_norm = nn.RMSNorm(d, eps=1e-6, **factory) if qk_norm else None
        self.k_norm = nn.RMSNorm(d, eps=1e-6, **factory) if qk_norm else None
        if not isinstance(sinks, bool):
            raise TypeError(f"sinks must be a bool, got {sinks!r}")
        self.sinks = nn.Parameter(torch.zeros(hq, **factory)) if sinks else None  # (Hq,)

    def extra_repr(self) -> str:
        parts = [
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}",
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}",
        ]
        if self.causal:
            parts.append("causal=True")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.slopes is not None:
            parts.append("alibi=True")
        if self.sinks is not None:
            parts.append("sinks=True")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        return ", ".join(parts)

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty :class:`KVCache` shaped for this layer (parameters' dtype and device)."""
        w = self.qkv.weight
        return KVCache(
            batch_size, max_len, self.num_kv_heads, self.head_dim, dtype=w.dtype, device=w.device
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend every token of ``x`` over ``x`` (and the cached tokens before it).

        Args:
            x: (B, N, E) input.
            mask: bool, True = visible. Either a key-padding mask (B, Nk) (True = real token),
                a per-sequence mask (B, N, Nk), or a full mask broadcastable to (B, Hq, N, Nk).
                Nk is N plus the tokens already in ``cache``.
            segment_ids: packed documents, as in :func:`selfattn.attention` (with a cache, pass
                the pair ``(q_ids (B, N), kv_ids (B, Nk))``).
            positions: RoPE positions (N,) or (B, N); default ``len(cache) .. len(cache)+N-1``.
                Causal, window and ALiBi rules follow the order of the keys, not ``positions``.
            cache: a :class:`KVCache` (see :meth:`make_cache`); the new keys and values are
                appended and attention runs over all of them. Meant for inference (no_grad).
            need_weights: also return the attention probabilities (from
                :func:`selfattn.attention_weights`, so the output itself keeps the fast path).

        Returns:
            y (B, N, E), or ``(y, weights)`` with weights float32 (B, Hq, N, Nk) (before dropout).

        Raises:
            TypeError / ValueError: input of the wrong type, dtype or shape (named in the message).
        """
        b, n = self._check_input(x)
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)  # (B, N, (Hq + 2 Hkv) D)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q = q.view(b, n, hq, d).transpose(1, 2)  # (B, Hq, N, D)
        k = k.view(b, n, hkv, d).transpose(1, 2)  # (B, Hkv, N, D)
        v = v.view(b, n, hkv, d).transpose(1, 2)  # (B, Hkv, N, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a selfattn.KVCache, got {type(cache).__name__}")
        past = 0 if cache is None else len(cache)
        if self.rope is not None:
            # keys are rotated once, at their own position, before they enter the cache
            pos = past if positions is None else positions
            q, k = self.rope(q, pos), self.rope(k, pos)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, Hkv, past + N, D)
        nk = k.shape[2]
        rules: dict[str, Any] = {
            "causal": self.causal,
            "window": self.window,
            "mask": self._full_mask(mask, b, n, nk),
            "alibi_slopes": self.slopes,
            "segment_ids": segment_ids,
            "sinks": self.sinks,
        }
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, lse = attention(
                q, k, v, **rules, dropout_p=dropout_p, return_lse=True, backend=self.backend
            )
            plain = {n: x.detach() if isinstance(x, torch.Tensor) else x for n, x in rules.items()}
            weights = attention_weights(q.detach(), k.detach(), **plain, lse=lse.detach())
        else:
            out = attention(q, k, v, **rules, dropout_p=dropout_p, backend=self.backend)
        y = self.out(out.transpose(1, 2).reshape(b, n, hq * d))  # (B, N, E)
        return (y, weights) if need_weights else y

    def _check_input(self, x: Any) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, N, E) with E = {self.embed_dim}, got {tuple(x.shape)}")
        w = self.qkv.weight
        if x.dtype != w.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the layer's parameters are {w.dtype}")
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {w.device}")
        return x.shape[0], x.shape[1]

    @staticmethod
    def _full_mask(mask: Any, b: int, n: int, nk: int) -> torch.Tensor | None:
        """Key-padding (B, Nk) and per-sequence (B, N, Nk) masks as 4-D views."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (True = visible / real token), got {mask.dtype}")
        if mask.dim() == 2:
            if tuple(mask.shape) != (b, nk):
                raise ValueError(
                    f"a 2-D mask is a key-padding mask of shape (B, Nk) = ({b}, {nk}) "
                    f"(Nk counts cached tokens too), got {tuple(mask.shape)}"
                )
            return mask[:, None, None, :]  # (B, 1, 1, Nk)
        if mask.dim() == 3:
            return mask[:, None]  # (B, 1, N, Nk)
        if mask.dim() == 4:
            return mask
        raise ValueError(
            "mask must be (B, Nk) key padding, (B, N, Nk) or 4-D (B, Hq, N, Nk), "
            f"got {tuple(mask.shape)}"
        )


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Normalising before each sub-layer (Xiong et al., 2020) keeps the residual stream an
    identity path, which is what lets deep stacks train without warm-up tricks.

    Args:
        embed_dim, num_heads, num_kv_heads, head_dim, bias, causal, window, rope, rope_base,
            alibi, qk_norm, sinks, backend, device, dtype: as in :class:`MultiHeadSelfAttention`.
        mlp_hidden: MLP hidden width; ``4 E`` for GELU, ``8 E / 3`` rounded up to a multiple
            of 8 for SwiGLU (the same parameter count).
        norm: ``"layernorm"`` or ``"rmsnorm"``.
        mlp: ``"gelu"`` (Linear-GELU-Linear) or ``"swiglu"`` (Shazeer, 2020).
        norm_eps: epsilon of the norms.
        dropout: dropout on each sub-layer's output (residual dropout) while training.
        attn_dropout: attention-probability dropout while training.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        mlp_hidden: int | None = None,
        norm: str = "layernorm",
        mlp: str = "gelu",
        norm_eps: float = 1e-5,
        bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        causal: bool = False,
        window: tuple[int | None, int | None] | None = None,
        rope: bool = False,
        rope_base: float = 10000.0,
        alibi: bool = False,
        qk_norm: bool = False,
        sinks: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {norm!r}")
        if mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {mlp!r}")
        self.attn = MultiHeadSelfAttention(
            embed_dim,
            num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            bias=bias,
            dropout=attn_dropout,
            causal=causal,
            window=window,
            rope=rope,
            rope_base=rope_base,
            alibi=alibi,
            qk_norm=qk_norm,
            sinks=sinks,
            backend=backend,
            **factory,
        )
        e = self.attn.embed_dim
        if mlp_hidden is None:
            third = -(-8 * e // 3)  # ceil(8 E / 3)
            mlp_hidden = 4 * e if mlp == "gelu" else -(-third // 8) * 8
        hidden = checks.integer("mlp_hidden", mlp_hidden)
        self.norm1 = self._norm(norm, e, norm_eps, bias, factory)
        self.norm2 = self._norm(norm, e, norm_eps, bias, factory)
        self.mlp_kind = mlp
        # SwiGLU: one projection makes both the gate and the value, (E -> 2H)
        self.fc1 = nn.Linear(e, hidden * (2 if mlp == "swiglu" else 1), bias=bias, **factory)
        self.fc2 = nn.Linear(hidden, e, bias=bias, **factory)
        self.drop = nn.Dropout(checks.probability("dropout", dropout))

    @staticmethod
    def _norm(kind: str, e: int, eps: float, bias: bool, factory: dict) -> nn.Module:
        if kind == "rmsnorm":
            return nn.RMSNorm(e, eps=eps, **factory)
        return nn.LayerNorm(e, eps=eps, bias=bias, **factory)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The position-wise feed-forward network, (B, N, E) -> (B, N, E)."""
        h = self.fc1(x)
        if self.mlp_kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.fc2(h)

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, E) -> (B, N, E); the keyword arguments go to :class:`MultiHeadSelfAttention`.

        Returns ``(y, weights)`` when ``need_weights``.
        """
        a = self.attn(
            self.norm1(x),
            mask=mask,
            segment_ids=segment_ids,
            positions=positions,
            cache=cache,
            need_weights=need_weights,
        )
        weights = None
        if need_weights:
            a, weights = a
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return (x, weights) if need_weights else x
