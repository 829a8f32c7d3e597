"""Attention scores for evicting caches, handed from selfattn's attention to the cache layer.

An evicting cache layer (:class:`selfattn.integrations.evict.BudgetLayer`) needs, after each
call, how much attention its keys received. transformers calls the layer's ``update`` and then
the attention function with exactly the keys ``update`` returned, and passes the cache no
further. So the layer *offers* a :class:`ScoreRequest` together with those keys (:func:`offer`),
and selfattn's attention function for transformers, seeing the same key object, *claims* it
(:func:`claim`), computes the output and the requested column sums in one call
(:func:`selfattn.attention_with_stats`: for a decode step on ``native`` the statistics come out
of the decode kernel's own pass) and delivers them: the scores come from selfattn's kernels,
never from eager attention. A call whose keys were not offered claims nothing. One offer is
pending at a time per thread (attention follows its layer's ``update`` at once).

This module imports no transformers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ScoreRequest", "claim", "group_sum", "offer"]

_local = threading.local()


@dataclass(frozen=True)
class ScoreRequest:
    """What a cache layer asks of the attention call that reads its keys.

    Attributes:
        rows: the query rows whose column sums it needs (None: all rows; a slice or an index
            list), or False for none (it only needs to know that attention is done).
        deliver: called after the output is computed with the column sums summed over the query
            heads of each key head, float32 (B, Hkv, Nk), or None when ``rows`` is False.
    """

    rows: Any
    deliver: Callable[[torch.Tensor | None], None]


def offer(keys: Any, request: ScoreRequest) -> None:
    """Ask the attention call that reads ``keys`` (this very object) to serve ``request``."""
    _local.pending = (keys, request)


def claim(keys: Any) -> ScoreRequest | None:
    """The request offered with ``keys`` (the same object), removed from the slot; else None."""
    pending = getattr(_local, "pending", None)
    if pending is None or pending[0] is not keys:
        return None
    _local.pending = None
    return pending[1]


def group_sum(col_sum: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Column sums (B, Hq, Nk) of the query heads summed per key head: (B, Hkv, Nk)."""
    b, hq, nk = col_sum.shape
    return col_sum.reshape(b, kv_heads, hq // kv_heads, nk).sum(2)
