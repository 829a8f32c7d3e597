"""Three small models built from :class:`selfattn.TransformerBlock`: a decoder-only ``GPT``
(Radford et al., 2019) with KV-cached ``generate()``, a BERT-like ``Encoder`` (Devlin et al., 2019)
and a Vision Transformer ``ViT`` (Dosovitskiy et al., 2021).

Each is small and readable and trains on a 2-core CPU in minutes (see ``examples/``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .kv_cache import KVCache
from .layers import TransformerBlock

__all__ = ["GPT", "Encoder", "EncoderOutput", "ViT"]


def _init_weights(model: nn.Module, num_layers: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and residual-branch output
    projections scaled by ``1 / sqrt(2 L)`` so the residual stream does not grow with depth."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            if name.endswith("bias"):
                nn.init.zeros_(p)
            continue
        std = 0.02
        if name.endswith(("attn.out.weight", "fc2.weight")):
            std = 0.02 / math.sqrt(2 * num_layers)
        nn.init.normal_(p, mean=0.0, std=std)


def _stack(
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    norm: str,
    bias: bool,
    factory: dict,
    **block: Any,
) -> tuple[nn.ModuleList, nn.Module]:
    """``num_layers`` pre-norm :class:`TransformerBlock` s and the norm after the last one."""
    blocks = nn.ModuleList(
        TransformerBlock(embed_dim, num_heads, norm=norm, bias=bias, **block, **factory)
        for _ in range(num_layers)
    )
    return blocks, TransformerBlock._norm(norm, embed_dim, 1e-5, bias, factory)


def _run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, need_weights: bool, **kwargs: Any
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """(B, N, E) through every block; each block's attention probabilities when asked for."""
    attentions = [] if need_weights else None
    for blk in blocks:
        x = blk(x, need_weights=need_weights, **kwargs)
        if need_weights:
            x, w = x
            attentions.append(w)
    return x, attentions


def _check_tokens(idx: Any, vocab_size: int) -> tuple[int, int]:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be an int torch.Tensor (B, N), got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"idx must hold token ids (an integer dtype), got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (B, N) with N >= 1, got {tuple(idx.shape)}")
    # the value check reads the data, which torch.compile cannot trace (Embedding still checks)
    if (
        not torch.compiler.is_compiling()
        and idx.numel()
        and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size)
    ):
        raise ValueError(
            f"token ids must be in [0, {vocab_size}), "
            f"got min {int(idx.min())}, max {int(idx.max())}"
        )
    return idx.shape[0], idx.shape[1]


class GPT(nn.Module):
    """A decoder-only language model: token embedding, causal pre-norm blocks, tied output head.

    Args:
        vocab_size: V.
        max_len: longest sequence (size of the learned position table when
            ``positions="learned"``; RoPE and ALiBi have no hard limit).
        embed_dim, num_layers, num_heads: E, L, Hq.
        num_kv_heads: Hkv (GQA/MQA); Hq by default.
        positions: ``"rope"`` (default), ``"learned"`` or ``"alibi"``.
        norm, mlp, mlp_hidden, qk_norm, window, bias, backend: as in
            :class:`selfattn.TransformerBlock`.
        dropout: embedding and residual dropout while training.
        device, dtype: of the parameters.

    The output head shares the token-embedding matrix (weight tying, Press & Wolf, 2017).
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 256,
        embed_dim: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        *,
        num_kv_heads: int | None = None,
        positions: str = "rope",
        norm: str = "layernorm",
        mlp: str = "gelu",
        mlp_hidden: int | None = None,
        qk_norm: bool = False,
        window: tuple[int | None, int | None] | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = checks.integer("vocab_size", vocab_size)
        self.max_len = checks.integer("max_len", max_len)
        self.num_layers = checks.integer("num_layers", num_layers)
        if positions not in ("rope", "learned", "alibi"):
            raise ValueError(f"positions must be 'rope', 'learned' or 'alibi', got {positions!r}")
        self.positions = positions
        factory = {"device": device, "dtype": dtype}
        self.tok = nn.Embedding(self.vocab_size, embed_dim, **factory)
        self.pos = (
            nn.Embedding(self.max_len, embed_dim, **factory) if positions == "learned" else None
        )
        self.drop = nn.Dropout(checks.probability("dropout", dropout))
        self.blocks, self.norm = _stack(
            self.num_layers,
            embed_dim,
            num_heads,
            norm,
            bias,
            factory,
            num_kv_heads=num_kv_heads,
            mlp_hidden=mlp_hidden,
            mlp=mlp,
            dropout=dropout,
            causal=True,
            window=window,
            rope=positions == "rope",
            alibi=positions == "alibi",
            qk_norm=qk_norm,
            backend=backend,
        )
        self.head = nn.Linear(embed_dim, self.vocab_size, bias=False, **factory)
        _init_weights(self, self.num_layers)
        self.head.weight = self.tok.weight  # tied after init: one matrix, N(0, 0.02)

    def num_params(self) -> int:
        """Number of parameters (the tied matrix counted once)."""
        return sum(p.numel() for p in self.parameters())

    def make_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        """One empty :class:`selfattn.KVCache` per layer."""
        return [blk.attn.make_cache(batch_size, max_len) for blk in self.blocks]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        caches: list[KVCache] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits.

        Args:
            idx: (B, N) token ids (continuing after the tokens in ``caches``, if given).
            targets: (B, N) next-token ids (``-100`` = ignored) to also return the mean
                cross-entropy loss.
            caches: one :class:`KVCache` per layer (see :meth:`make_caches`), for decoding.
            mask: bool key-padding mask (B, Nk), True = real token (Nk includes cached tokens).

        Returns:
            logits (B, N, V), or ``(logits, loss)`` when ``targets`` is given.
        """
        b, n = _check_tokens(idx, self.vocab_size)
        if caches is not None and len(caches) != self.num_layers:
            raise ValueError(
                f"caches must hold one KVCache per layer ({self.num_layers}), got {len(caches)}"
            )
        past = 0 if caches is None else len(caches[0])
        x = self.tok(idx)  # (B, N, E)
        if self.pos is not None:
            if past + n > self.max_len:
                raise ValueError(
                    f"sequence of {past + n} tokens (cached {past} + new {n}) "
                    f"exceeds max_len={self.max_len}"
                )
            x = x + self.pos(torch.arange(past, past + n, device=idx.device))
        x = self.drop(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask=mask, cache=None if caches is None else caches[i])
        logits = self.head(self.norm(x))  # (B, N, V)
        if targets is None:
            return logits
        if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (b, n):
            got = (
                tuple(targets.shape)
                if isinstance(targets, torch.Tensor)
                else type(targets).__name__
            )
            raise ValueError(f"targets must be (B, N) = ({b}, {n}) token ids, got {got}")
        loss = F.cross_entropy(logits.reshape(b * n, -1).float(), targets.reshape(b * n).long())
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue the prompts ``idx`` by ``max_new_tokens`` tokens.

        The prompt is run once (prefill) into a KV cache per layer; each new token then costs
        one single-token forward pass over the cache. The model never sees more than
        ``max_len`` tokens (the length it was built, and presumably trained, for): when the
        cache is full, it restarts from the last ``max_len // 2`` tokens (positions counted
        afresh, as in training), so generation can run past ``max_len``.

        Args:
            idx: (B, T) prompt token ids (all prompts of one length); only the last
                ``max_len`` are read.
            max_new_tokens: tokens to add.
            temperature: ``0`` picks the most likely token (greedy); otherwise the logits are
                divided by it and a token is sampled.
            top_k: sample only among the ``top_k`` most likely tokens.
            generator: a ``torch.Generator`` for reproducible sampling.
            use_cache: False recomputes the (last ``max_len`` tokens of the) sequence at every
                step (slow; for checking). Within ``max_len`` both give the same tokens.

        Returns:
            (B, T + max_new_tokens) token ids.
        """
        b, t = _check_tokens(idx, self.vocab_size)
        max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, minimum=0)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, numbers.Real)
            or temperature < 0
        ):
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None:
            top_k = checks.integer("top_k", top_k)
        limit = self.max_len
        was_training = self.training
        self.eval()
        try:
            caches = self.make_caches(b, min(limit, t + max_new_tokens)) if use_cache else None
            out = idx
            if max_new_tokens:
                logits = self(idx[:, -limit:], caches=caches)[:, -1]  # (B, V), prefill
            for step in range(max_new_tokens):
                nxt = self._pick(logits, float(temperature), top_k, generator)  # (B, 1)
                out = torch.cat([out, nxt], dim=1)
                if step + 1 == max_new_tokens:
                    break
                if not use_cache:
                    logits = self(out[:, -limit:])[:, -1]
                elif len(caches[0]) < limit:
                    logits = self(nxt, caches=caches)[:, -1]
                else:  # context full: restart from the most recent half
                    for cache in caches:
                        cache.reset()
                    logits = self(out[:, -(limit // 2 or 1) :], caches=caches)[:, -1]
        finally:
            self.train(was_training)
        return out

    @staticmethod
    def _pick(
        logits: torch.Tensor,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """(B, V) logits -> (B, 1) next tokens."""
        logits = logits.float()
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)


class EncoderOutput(NamedTuple):
    """What :class:`Encoder` returns."""

    hidden: torch.Tensor  # (B, N, E) final token states
    pooled: torch.Tensor  # (B, E) one vector per sequence
    logits: torch.Tensor | None  # (B, num_classes) when the encoder has a classifier head
    attentions: list[torch.Tensor] | None  # per layer (B, H, N, N), when asked for


class Encoder(nn.Module):
    """A BERT-like bidirectional encoder: token + learned position embeddings, pre-norm blocks.

    Args:
        vocab_size: V.
        max_len: longest sequence (learned position table).
        embed_dim, num_layers, num_heads: E, L, Hq.
        num_classes: add a linear classifier on the pooled vector.
        pooling: ``"cls"`` (BERT's pooler: ``tanh(W h_0 + b)`` on the first token) or
            ``"mean"`` (mean over real tokens).
        num_kv_heads, norm, mlp, mlp_hidden, qk_norm, bias, backend, device, dtype: as in
            :class:`selfattn.TransformerBlock`.
        dropout: embedding and residual dropout while training.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 512,
        embed_dim: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        *,
        num_classes: int | None = None,
        pooling: str = "cls",
        num_kv_heads: int | None = None,
        norm: str = "layernorm",
        mlp: str = "gelu",
        mlp_hidden: int | None = None,
        qk_norm: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = checks.integer("vocab_size", vocab_size)
        self.max_len = checks.integer("max_len", max_len)
        self.num_layers = checks.integer("num_layers", num_layers)
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.pooling = pooling
        factory = {"device": device, "dtype": dtype}
        self.tok = nn.Embedding(self.vocab_size, embed_dim, **factory)
        self.pos = nn.Embedding(self.max_len, embed_dim, **factory)
        self.drop = nn.Dropout(checks.probability("dropout", dropout))
        self.blocks, self.norm = _stack(
            self.num_layers,
            embed_dim,
            num_heads,
            norm,
            bias,
            factory,
            num_kv_heads=num_kv_heads,
            mlp_hidden=mlp_hidden,
            mlp=mlp,
            dropout=dropout,
            qk_norm=qk_norm,
            backend=backend,
        )
        self.pooler = nn.Linear(embed_dim, embed_dim, **factory) if pooling == "cls" else None
        self.classifier = None
        if num_classes is not None:
            self.classifier = nn.Linear(
                embed_dim, checks.integer("num_classes", num_classes), **factory
            )
        _init_weights(self, self.num_layers)

    def forward(
        self,
        idx: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> EncoderOutput:
        """Encode token ids.

        Args:
            idx: (B, N) token ids.
            mask: bool key-padding mask (B, N), True = real token.
            segment_ids: (B, N) packed-document ids (negative = padding), as in
                :func:`selfattn.attention`.
            need_weights: also return each layer's attention probabilities.

        Returns:
            :class:`EncoderOutput` ``(hidden, pooled, logits, attentions)``.
        """
        b, n = _check_tokens(idx, self.vocab_size)
        if n > self.max_len:
            raise ValueError(f"sequence of {n} tokens exceeds max_len={self.max_len}")
        x = self.drop(self.tok(idx) + self.pos(torch.arange(n, device=idx.device)))  # (B, N, E)
        x, attentions = _run_blocks(
            self.blocks, x, need_weights, mask=mask, segment_ids=segment_ids
        )
        hidden = self.norm(x)
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(hidden[:, 0]))  # (B, E)
        else:
            real = torch.ones(b, n, 1, dtype=hidden.dtype, device=hidden.device)
            if mask is not None:
                real = mask[:, :, None].to(hidden.dtype)  # mask validated by the first layer
            pooled = (hidden * real).sum(1) / real.sum(1).clamp(min=1.0)
        logits = self.classifier(pooled) if self.classifier is not None else None
        return EncoderOutput(hidden, pooled, logits, attentions)


class ViT(nn.Module):
    """Vision Transformer: image patches as tokens, a learned class token, pre-norm blocks.

    Args:
        image_size: H = W, or a pair (H, W); multiples of ``patch_size``.
        patch_size: P; each P x P patch becomes one token (a strided convolution).
        in_channels: C.
        num_classes: classifier outputs.
        embed_dim, num_layers, num_heads: E, L, Hq.
        norm, mlp, mlp_hidden, qk_norm, bias, backend, device, dtype: as in
            :class:`selfattn.TransformerBlock`.
        dropout: embedding and residual dropout while training.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
        embed_dim: int = 64,
        num_layers: int = 4,
        num_heads: int = 4,
        *,
        num_kv_heads: int | None = None,
        norm: str = "layernorm",
        mlp: str = "gelu",
        mlp_hidden: int | None = None,
        qk_norm: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hw = (
            (image_size, image_size)
            if isinstance(image_size, numbers.Integral)
            else tuple(image_size)
        )
        if len(hw) != 2:
            raise ValueError(f"image_size must be an int or a pair (H, W), got {image_size!r}")
        self.image_size = (
            checks.integer("image height", hw[0]),
            checks.integer("image width", hw[1]),
        )
        self.patch_size = checks.integer("patch_size", patch_size)
        if self.image_size[0] % self.patch_size or self.image_size[1] % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {patch_size}"
            )
        self.in_channels = checks.integer("in_channels", in_channels)
        self.num_layers = checks.integer("num_layers", num_layers)
        factory = {"device": device, "dtype": dtype}
        num_patches = (self.image_size[0] // self.patch_size) * (
            self.image_size[1] // self.patch_size
        )
        self.patch = nn.Conv2d(
            self.in_channels, embed_dim, self.patch_size, stride=self.patch_size, **factory
        )
        self.cls = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory))
        self.pos = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim, **factory))
        self.drop = nn.Dropout(checks.probability("dropout", dropout))
        self.blocks, self.norm = _stack(
            self.num_layers,
            embed_dim,
            num_heads,
            norm,
            bias,
            factory,
            num_kv_heads=num_kv_heads,
            mlp_hidden=mlp_hidden,
            mlp=mlp,
            dropout=dropout,
            qk_norm=qk_norm,
            backend=backend,
        )
        self.head = nn.Linear(embed_dim, checks.integer("num_classes", num_classes), **factory)
        _init_weights(self, self.num_layers)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(
        self, images: torch.Tensor, *, need_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Classify images.

        Args:
            images: (B, C, H, W) float images.
            need_weights: also return each layer's attention probabilities (B, H, 1+P, 1+P),
                token 0 being the class token.

        Returns:
            logits (B, num_classes), or ``(logits, attentions)``.
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        want = (self.in_channels, *self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"images must be (B, C, H, W) = (B, {', '.join(map(str, want))}), "
                f"got {tuple(images.shape)}"
            )
        if images.dtype != self.patch.weight.dtype:
            raise TypeError(
                f"images have dtype {images.dtype} but the model is {self.patch.weight.dtype}"
            )
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, P, E)
        cls = self.cls.expand(x.shape[0], -1, -1)  # (B, 1, E)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos)  # (B, 1 + P, E)
        x, attentions = _run_blocks(self.blocks, x, need_weights)
        logits = self.head(self.norm(x[:, 0]))  # the class token reads out the image
        return (logits, attentions) if need_weights else logits
