"""A full-attention cache layer that keeps at most ``budget`` tokens, evicting by a policy.

:class:`BudgetLayer` stores keys and values in place (float or quantized, as every
:class:`~selfattn.integrations.kv_layers.InPlaceLayer`) in slots ``[0, held)``. A call appends its
new tokens after the kept ones and attention reads all of them; right after the attention call
(or, where no score arrives, at the start of the next ``update``) the layer drops the
``held - budget`` tokens of lowest *priority*, per batch row and key head, and moves the kept
tokens from beyond the budget into the freed slots (a copy of the evicted count, never of the
whole cache). Slots are therefore not in position order; ``positions`` (B, Hkv, capacity) records
each slot's original position (the index among all tokens this layer has seen).

Priorities (higher is kept; among equal priorities the older token goes first), per policy:

- ``window``: the position (the most recent are kept).
- ``sink``: the position, the first ``sink_tokens`` positions always kept (StreamingLLM).
- ``h2o``: the attention mass the key received from every query since it arrived, summed over
  the query heads of its group (Heavy-Hitter Oracle: the plain sum, ``normalize=False``, the
  default); ``normalize=True`` divides it by the number of those queries (a plain sum favours
  old tokens, which more queries have seen); the most recent ``budget // 2`` tokens always
  kept.
- ``tova``: the probability the newest query gives the key, averaged over all the layer's query
  heads (TOVA's rule, as kvpress's ``TOVAPress``).
- ``snapkv``: at each prefill chunk (more than one new token), the mass from the chunk's last
  ``SNAP_WINDOW`` queries, max-pooled over ``SNAP_KERNEL`` neighbouring positions, the
  observation window itself always kept (its last ``budget // 2`` tokens at most); tokens added
  one at a time afterwards (generation) behave like ``window``: the newest
  ``max(1, budget // 8)`` of them are kept, older ones go first, then the lowest-scored prompt
  tokens.

Options of the scored policies (None: the policy's own rule, as above):

- ``decay`` (0 to 1): each call's scores are added to ``decay`` times the previous ones, a
  forgetting factor (A2SF, Jo and Shin 2024, arXiv:2407.20485, applies it to H2O's sum). The
  policies' own: 1 for ``h2o`` (the plain sum), 0 for ``tova`` and ``snapkv`` (each new score
  replaces the old). With ``decay > 0``, ``tova`` asks for the newest row's scores at every call
  (not only over the budget) and ``snapkv`` keeps, fed in chunks, what earlier observation
  windows saw too.
- ``recent`` (tokens, 0 to the budget): the newest ``recent`` positions are always kept, whatever
  their scores, as H2O's local window and StreamingLLM's window do (for ``h2o`` it replaces the
  ``budget // 2``; for ``snapkv`` the ``budget // 8`` of generated tokens, and it holds for prompt
  tokens too; ``tova`` keeps none of its own).
- ``window_size``, ``kernel_size``: SnapKV's observation window (the last prompt queries that
  score) and max-pooling width (odd), ``SNAP_WINDOW`` and ``SNAP_KERNEL`` by default (SnapKV, Li
  et al. 2024, arXiv:2404.14469, varies both).

The scored policies (``h2o``, ``tova``, ``snapkv``) also always keep the first ``sink_tokens``
positions (StreamingLLM's attention sinks, as kvpress keeps them): a softmax needs somewhere to
put the mass no key wants, and a stream fed one token at a time would otherwise lose them.

``heads`` says who ranks: ``"kv"``, each key head its own tokens (by the scores of its group of
query heads: H2O's and SnapKV's rule, the default for them); ``"layer"``, one ranking for the
whole layer, the scores summed over all its heads, so every key head keeps the same tokens
(TOVA's rule, its default). Eviction, storage and masks work per key head either way.

Keys were rotated (RoPE) before caching, so a kept key keeps its original position. The layer
reports every token seen as its sequence length (``get_seq_length``: generate's next position)
and sizes the mask over what it holds: all kept keys precede every new query, so the decode
step sees all of them and a prefill chunk sees them all plus its own tokens causally — exactly
what transformers' causal mask gives for ``kv_length = kept + n`` keys at offset
``seen - kept``. Padding is not tracked per slot: a padded batch (positions that do not count up
by one, as ``generate`` gives left-padded rows) is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from . import kv_store, scoring
from .kv_layers import CHUNK, InPlaceLayer

__all__ = [
    "HEADS",
    "POLICIES",
    "SCORED",
    "SLACK",
    "SNAP_KERNEL",
    "SNAP_WINDOW",
    "BudgetLayer",
    "check_options",
    "default_heads",
]

#: the eviction policies ``make_cache(budget=...)`` takes
POLICIES = ("window", "sink", "h2o", "tova", "snapkv")
#: the policies that need attention scores (from selfattn's attention function)
SCORED = ("h2o", "tova", "snapkv")
#: who ranks the tokens of a scored policy: each key head (``"kv"``) or the whole layer
HEADS = ("kv", "layer")
#: SnapKV: the last prompt queries that score the keys, and the max-pooling width
SNAP_WINDOW = 32
SNAP_KERNEL = 7
#: free slots an evicting layer keeps after its budget (decode steps and small chunks fit)
SLACK = 64
_BIG = 1e30  # priorities above every score: kept; below: evicted first


def default_heads(policy: str) -> str:
    """The ranking a policy's paper uses: one for the whole layer for ``tova``, one per key head
    otherwise."""
    return "layer" if policy == "tova" else "kv"


class BudgetLayer(InPlaceLayer):
    """A full-attention layer that holds at most ``budget`` tokens between calls.

    Args:
        budget: tokens kept (>= 1).
        policy: one of :data:`POLICIES` (see the module docstring).
        sink_tokens: the first tokens ``"sink"`` and the scored policies always keep.
        heads: ``"kv"`` (each key head ranks its own tokens) or ``"layer"`` (one ranking for
            every key head); None: the policy's own (:func:`default_heads`).
        normalize: ``h2o``: rank by the total mass (False, the default: the paper's sum, which
            favours old tokens) or by the mass per query that has seen the token (True).
        decay: a scored policy's forgetting factor in [0, 1] (None: 1 for ``h2o``, 0 otherwise).
        recent: the newest tokens a scored policy always keeps, 0 to ``budget`` (None: the
            policy's own).
        window_size, kernel_size: ``snapkv``'s observation window (>= 1) and pooling width (odd,
            >= 1); None: :data:`SNAP_WINDOW`, :data:`SNAP_KERNEL`.
        chunk: tokens the storage grows by at least.
        bits, rotate: quantized storage, as :class:`InPlaceLayer`.
    """

    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        budget: int,
        policy: str = "h2o",
        *,
        sink_tokens: int = 4,
        heads: str | None = None,
        normalize: bool = False,
        decay: float | None = None,
        recent: int | None = None,
        window_size: int | None = None,
        kernel_size: int | None = None,
        chunk: int = CHUNK,
        bits: int | tuple[int | None, int | None] | None = None,
        rotate: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(chunk=chunk, bits=bits, rotate=rotate)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive int (tokens), got {budget!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
        if heads is not None and heads not in HEADS:
            raise ValueError(f"heads must be None or one of {', '.join(HEADS)}; got {heads!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        check_options(budget, policy, decay, recent, window_size, kernel_size)
        self.budget = budget
        self.policy = policy
        self.sink_tokens = sink_tokens
        self.heads = default_heads(policy) if heads is None else heads
        self.normalize = normalize
        self.recent = budget // 2 if policy == "h2o" else max(1, budget // 8)
        self.keep_recent = recent  # None: the policy's own protection only
        if recent is not None:
            self.recent = recent
        self.decay = float(decay if decay is not None else (1 if policy == "h2o" else 0))
        self.snap_window = SNAP_WINDOW if window_size is None else window_size
        self.snap_kernel = SNAP_KERNEL if kernel_size is None else kernel_size
        self.seen = 0  # tokens this layer has been given (the next position)
        self.snap_end = 0  # snapkv: tokens before this position were scored by a prefill
        self.snap_kept = 0  # snapkv: the last tokens of that prefill always kept
        self.positions: torch.Tensor | None = None  # (B, Hkv, capacity) int64
        self.scores: torch.Tensor | None = None  # (B, Hkv, capacity) float32
        self.waiting = False  # scores were asked for and have not arrived
        self.pending_n = 0  # new tokens of the call whose scores are awaited

    def __repr__(self) -> str:
        return (
            f"BudgetLayer(tokens={self.end}, seen={self.seen}, budget={self.budget}, "
            f"policy={self.policy!r}, heads={self.heads!r}, capacity={self.capacity})"
        )

    @property
    def usual_capacity(self) -> int:
        """The storage between prefills: the budget and ``min(chunk, SLACK)`` free slots (a
        call with more new tokens grows it for that call; the kept tokens move back after)."""
        return self.budget + min(self.chunk, SLACK)

    @property
    def nbytes(self) -> int:
        extra = sum(
            t.numel() * t.element_size() for t in (self.positions, self.scores) if t is not None
        )
        return super().nbytes + extra

    def _new_capacity(self, needed: int) -> int:
        return max(self.usual_capacity, needed)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.positions = torch.zeros((b, h, 0), dtype=torch.long, device=key_states.device)
        self.scores = torch.zeros((b, h, 0), dtype=torch.float32, device=key_states.device)
        self.seen = self.snap_end = self.snap_kept = 0
        self.waiting = False

    # -- the storage of positions and scores follows the tokens' ------------------------------

    def _move(self, capacity: int, index: torch.Tensor | None = None) -> None:
        pos, sc = self.positions[:, :, : self.end], self.scores[:, :, : self.end]
        if index is not None:
            pos, sc = pos.index_select(0, index), sc.index_select(0, index)
        super()._move(capacity, index)
        self.positions = pos.new_zeros((*pos.shape[:2], capacity))
        self.scores = sc.new_zeros((*sc.shape[:2], capacity))
        self.positions[:, :, : self.end] = pos
        self.scores[:, :, : self.end] = sc

    def _select_rows(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.positions.device)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.long().flatten()
        if index.numel() == self.positions.shape[0]:
            self.positions = self.positions.index_select(0, index)
            self.scores = self.scores.index_select(0, index)
        super()._select_rows(index)  # another batch size moves positions and scores too

    # -- the transformers layer interface ----------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        """Append keys (B, Hkv, n, D) and values (B, Hkv, n, Dv) after the kept tokens; return
        views over the kept tokens and the new ones ((B, Hkv, kept + n, D), or
        :class:`selfattn.QuantizedKV`).

        Raises:
            ValueError: keys or values that do not fit, or positions of a padded batch.
            RuntimeError: a scored policy whose scores from the previous call never arrived
                (the model's attention is not selfattn's).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check(key_states, value_states)
        _refuse_padding(kwargs)
        if self.waiting and self.policy in SCORED:
            raise RuntimeError(
                f"make_cache(policy={self.policy!r}) evicts by attention scores, which only "
                "selfattn's attention hands over: load the model with "
                'attn_implementation="selfattn" (after selfattn.integrations.transformers.'
                "register()), or use policy='window' or 'sink'"
            )
        self.evict()  # a previous call whose attention handed nothing back
        n = key_states.shape[2]
        self._make_room(n)
        at = self.end
        self._write(key_states, value_states)
        self.positions[:, :, at : self.end] = torch.arange(
            self.seen, self.seen + n, device=self.positions.device
        )
        self.scores[:, :, at : self.end] = 0
        self.seen += n
        self._refresh()
        self.waiting = True
        self.pending_n = n
        scoring.offer(self.keys, self.request(n))
        return self.keys, self.values

    def request(self, n: int) -> scoring.ScoreRequest:
        """What this call's attention must hand back for ``n`` new tokens: the column sums the
        policy needs (all rows for ``h2o``; the newest row for ``tova`` when over the budget;
        SnapKV's observation rows on a prefill), or none."""
        rows: Any = False
        if self.policy == "h2o":
            rows = None
        elif self.policy == "tova" and (self.end > self.budget or self.decay > 0):
            rows = [n - 1]
        elif self.policy == "snapkv" and n > 1:
            rows = slice(n - min(self.snap_window, n), n)
        return scoring.ScoreRequest(rows, self.receive)

    def receive(self, mass: torch.Tensor | None) -> None:
        """Called by selfattn's attention right after it read this layer's keys, with the
        column sums asked for ((B, Hkv, held) float32, summed over each group's query heads):
        record the policy's scores, then evict down to the budget."""
        held = self.end
        if mass is not None:
            if mass.shape[-1] != held:
                raise RuntimeError(f"scores for {mass.shape[-1]} keys, but the layer holds {held}")
            if self.heads == "layer":
                # summed over every key head's group, i.e. over all the layer's query heads (the
                # order of a mean over heads); every head's slots hold the same positions then
                mass = mass.sum(1, keepdim=True).expand_as(mass)
            if self.policy == "snapkv":  # on a prefill
                mass = self._pooled(mass)
                self.snap_end, self.snap_kept = (
                    self.seen,
                    min(self.pending_n, self.snap_window, self.budget // 2),
                )
            old = self.scores[:, :, :held]
            if self.decay == 0:  # tova's and snapkv's own rule: the new scores replace the old
                old.copy_(mass)
            else:  # h2o's sum (decay 1), or A2SF's forgetting factor
                old.mul_(self.decay).add_(mass)
        self.waiting = False
        self.evict()

    def _pooled(self, mass: torch.Tensor) -> torch.Tensor:
        """SnapKV's max-pooling of (B, Hkv, held) scores over neighbouring *positions*."""
        order = self.positions[:, :, : self.end].argsort(dim=-1)
        by_pos = mass.gather(-1, order)
        b, h, m = by_pos.shape
        pad = self.snap_kernel // 2
        pooled = torch.nn.functional.max_pool1d(
            by_pos.reshape(b * h, 1, m), self.snap_kernel, stride=1, padding=pad
        ).reshape(b, h, m)
        return torch.empty_like(pooled).scatter_(-1, order, pooled)

    def priority(self) -> torch.Tensor:
        """(B, Hkv, held) float64: the policy's priority of each held token (higher is kept)."""
        pos = self.positions[:, :, : self.end]
        p = pos.double()
        if self.policy == "window":
            return p
        if self.policy == "sink":
            return torch.where(pos < self.sink_tokens, _BIG, p)
        sc = self.scores[:, :, : self.end].double()
        if self.policy == "h2o":
            if self.normalize:  # every query from the token's own position on has seen it
                sc = sc / (self.seen - pos).clamp(min=1).double()
            sc = torch.where(pos >= self.seen - self.recent, _BIG, sc)
        elif self.policy == "snapkv":
            # the observation window of the last prefill kept; generated tokens as window
            obs = pos >= self.snap_end - self.snap_kept
            fresh = pos >= self.snap_end
            sc = torch.where(obs & ~fresh, _BIG, sc)
            newest = pos >= max(self.snap_end, self.seen - self.recent)
            sc = torch.where(fresh, torch.where(newest, _BIG, -_BIG + p), sc)
        if self.keep_recent is not None:  # the option: the newest positions, prompt or not
            sc = torch.where(pos >= self.seen - self.keep_recent, _BIG, sc)
        return torch.where(pos < self.sink_tokens, 2 * _BIG, sc)  # the sinks, for every scorer

    def evict(self) -> None:
        """Drop the ``held - budget`` lowest-priority tokens of every (batch row, key head), if
        over the budget, and give back storage grown past the usual size by a long prefill."""
        held, budget = self.end, self.budget
        if held <= budget:
            return
        # the lowest priorities go; among equal ones (SnapKV's pooling makes many) the oldest
        oldest_first = self.positions[:, :, :held].argsort(dim=-1)
        by_age = self.priority().gather(-1, oldest_first)
        lowest = by_age.argsort(dim=-1, stable=True)[..., : held - budget]
        gone = oldest_first.gather(-1, lowest)
        evicted = torch.zeros(
            self.positions[:, :, :held].shape, dtype=torch.bool, device=gone.device
        )
        evicted.scatter_(-1, gone, True)
        if self.capacity > self.usual_capacity:
            # after a long prefill: the kept tokens, in slot order, into storage of the usual size
            keep = evicted.to(torch.int8).argsort(dim=-1, stable=True)[..., :budget]
            self._compact_into(keep)
        else:
            self._fill_holes(evicted)
        self._refresh()

    def _compact_into(self, keep: torch.Tensor) -> None:
        """New storage of the usual capacity holding the slots ``keep`` (B, Hkv, budget)."""
        cap = self.usual_capacity
        for name in ("kparts", "vparts"):
            kept = kv_store.gather(getattr(self, name), keep)
            new = kv_store.empty_like(kept, cap)
            kv_store.write(new, kept, 0)
            setattr(self, name, new)
        for name in ("positions", "scores"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], cap))
            new[:, :, : keep.shape[-1]] = old.gather(-1, keep)
            setattr(self, name, new)
        self.end = keep.shape[-1]

    def _fill_holes(self, evicted: torch.Tensor) -> None:
        """Move the kept tokens of slots ``[budget, held)`` into the evicted slots below
        ``budget`` (in place; a copy of at most ``held - budget`` tokens per row and head)."""
        budget, held = self.budget, self.end
        holes = evicted[..., :budget]
        movers = ~evicted[..., budget:]  # as many per (row, head) as holes
        m = int(holes.sum(-1).max())
        if m:
            hole_at = (~holes).to(torch.int8).argsort(dim=-1, stable=True)[..., :m]
            mover_at = (~movers).to(torch.int8).argsort(dim=-1, stable=True)[..., :m] + budget
            real = holes.gather(-1, hole_at)
            # rows with fewer holes: pairs (held - 1 -> held - 1), a slot dropped anyway
            spare = torch.full_like(hole_at, held - 1)
            hole_at = torch.where(real, hole_at, spare)
            mover_at = torch.where(real, mover_at, spare)
            for parts in (self.kparts, self.vparts):
                kv_store.scatter(parts, hole_at, kv_store.gather(parts, mover_at))
            for t in (self.positions, self.scores):
                t.scatter_(-1, hole_at, t.gather(-1, mover_at))
        self.end = budget

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the next call's mask: the kept tokens (at most the
        budget) and the new ones, placed at the positions just before the queries."""
        kept = min(self.end, self.budget) if self.is_initialized else 0
        return kept + query_length, self.seen - kept

    def get_seq_length(self) -> int:
        """Every token seen (not only those kept): the position of the next one."""
        return self.seen if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Refused: an evicting layer cannot take back tokens (what they displaced is gone).

        Raises:
            RuntimeError: always (assisted and prompt-lookup decoding need a cache without
                ``budget``).
        """
        raise RuntimeError(
            "make_cache(budget=...) evicts tokens and cannot crop the cache back "
            "(assisted or prompt-lookup decoding): use a cache without budget for them"
        )

    def reset(self) -> None:
        super().reset()
        self.positions = self.scores = None
        self.seen = self.snap_end = self.snap_kept = 0
        self.waiting = False


def check_options(
    budget: int,
    policy: str,
    decay: float | None,
    recent: int | None,
    window_size: int | None,
    kernel_size: int | None,
) -> None:
    """Refuse the scored policies' options of a wrong type or value, or given to a policy they
    do not apply to (named).

    Raises:
        TypeError / ValueError: as above.
    """
    given = {
        "decay": decay,
        "recent": recent,
        "window_size": window_size,
        "kernel_size": kernel_size,
    }
    for name, value in given.items():
        if value is None:
            continue
        if name == "decay":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"decay must be a float in [0, 1] or None, got {value!r}")
            if not 0 <= value <= 1:
                raise ValueError(f"decay must be in [0, 1], got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {value!r}")
        if policy not in SCORED or (name.endswith("_size") and policy != "snapkv"):
            applies = "snapkv" if name.endswith("_size") else ", ".join(SCORED)
            raise ValueError(f"{name}={value!r} applies to policy {applies}, not {policy!r}")
    if recent is not None and not 0 <= recent <= budget:
        raise ValueError(f"recent must be in [0, budget={budget}] (tokens), got {recent}")
    if window_size is not None and window_size < 1:
        raise ValueError(f"window_size must be >= 1 (queries), got {window_size}")
    if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
        raise ValueError(f"kernel_size must be odd and >= 1 (positions), got {kernel_size}")


def _refuse_padding(kwargs: dict[str, Any]) -> None:
    """Positions that do not count up by one within a row mean padding (``generate`` gives a
    left-padded row repeated positions): the layer does not track padding per slot."""
    inner = kwargs.get("kwargs")
    pos = kwargs.get("position_ids")
    if pos is None and isinstance(inner, dict):
        pos = inner.get("position_ids")
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[-1] < 2:
        return
    steps = pos[:, 1:] - pos[:, :-1]
    if not bool((steps == 1).all()):
        raise ValueError(
            "make_cache(budget=...) holds sequences without padding: a row's positions do not "
            "count up by one (a left-padded batch?); generate one sequence at a time, or "
            "batch prompts of equal length"
        )
