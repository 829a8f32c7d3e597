"""Several processes: ring attention and Ulysses attention over ``torch.distributed``.

Ring attention (Liu, Zaharia and Abbeel, 2023) keeps each rank's queries in place and passes the
key/value blocks around the ring, merging the partial results through their log-sum-exp; the
zigzag layout (as in Llama 3's context parallelism) balances the causal work. Ulysses attention
(Jacobs et al., 2023, DeepSpeed-Ulysses) swaps sequence shards for head shards with one
all-to-all, runs plain :func:`selfattn.attention` on whole sequences, and swaps back.

Rooms: ``group`` (ranks, point-to-point messages), ``meta`` (what every rank checks before any
data moves), ``layout`` (contiguous and zigzag shards, ``shard``/``unshard``), ``ring``,
``ulysses``.
"""

from .group import EXCHANGES
from .layout import shard, unshard
from .meta import LAYOUTS
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["EXCHANGES", "LAYOUTS", "ring_attention", "shard", "ulysses_attention", "unshard"]
