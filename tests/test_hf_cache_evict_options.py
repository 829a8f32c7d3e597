"""The scored eviction policies' options: ``decay`` (A2SF's forgetting factor), ``recent`` (the
newest tokens always kept), SnapKV's ``window_size`` and ``kernel_size``.

Each option is shown to change what a layer keeps the way it claims (scores handed to the layer
directly, or from selfattn's attention against an fp64 oracle), and a one-layer model with every
option stepped through a prompt, decode steps and a second turn gives the logits of
``DynamicCache`` masked to exactly the tokens kept, never holding more than the budget.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")


import selfattn.integrations.transformers as sa_hf
from helpers import replay_two_turns_against_masked_reference, tiny_llama
from selfattn.integrations.cache import BudgetLayer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def _registered():
    sa_hf.register()


def _kv(n, h=1, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, h, n, d, generator=g), torch.randn(1, h, n, d, generator=g)


def _kept(layer):
    return sorted(layer.positions[0, 0, : layer.end].tolist())


def _give(layer, n, by_position, seed=0):
    """One call of ``n`` new tokens whose attention hands back ``by_position[p]`` as the score of
    the token at position ``p`` (1 key head)."""
    keys, _ = layer.update(*_kv(n, seed=seed))
    table = torch.tensor(by_position, dtype=torch.float32)
    layer.receive(table[layer.positions[:, :, : keys.shape[2]]])


@pytest.mark.parametrize("policy", ["tova", "snapkv"])
def test_decay_keeps_a_token_that_scored_high_before_and_its_own_rule_drops(policy):
    """Position 0 scores 0.9 at the first call and 0 at the second: the policy's own rule (the new
    scores replace the old) evicts it; with ``decay=0.5`` its score is 0.45, above every other."""
    first = [0.9, 0.04, 0.05, 0.03, 0.0, 0.0, 0.0]  # by position; the first call has 0-4
    second = [0.0, 0.3, 0.3, 0.2, 0.25, 0.2, 0.2]
    kept = {}
    for decay in (None, 0.5):
        snap = {"window_size": 1, "kernel_size": 1} if policy == "snapkv" else {}
        layer = BudgetLayer(4, policy, sink_tokens=0, decay=decay, **snap)
        _give(layer, 5, first)
        assert 0 in _kept(layer) and layer.end == 4
        n = 2 if policy == "snapkv" else 1  # snapkv scores prefills (more than one token)
        _give(layer, n, second, seed=1)
        kept[decay] = _kept(layer)
        if decay:
            got = layer.scores[0, 0, : layer.end]
            want = 0.5 * torch.tensor(first)[layer.positions[0, 0, :4]]
            want += torch.tensor(second)[layer.positions[0, 0, :4]]
            torch.testing.assert_close(got, want)
    assert 0 not in kept[None] and 0 in kept[0.5]


def test_h2o_decay_one_is_the_plain_sum_and_below_one_forgets():
    """h2o's own rule is ``decay=1`` (the sum, as before); ``decay=0.25`` weighs the old calls
    down: the kept tokens' scores are the decayed sums."""
    calls = ([0.5, 0.1, 0.2, 0.0], [0.1, 0.4, 0.3, 0.2], [0.0, 0.2, 0.1, 0.4])
    for decay, factor in ((None, 1.0), (1.0, 1.0), (0.25, 0.25)):
        layer = BudgetLayer(8, "h2o", sink_tokens=0, decay=decay)
        _give(layer, 4, calls[0])
        for c in calls[1:]:  # more queries' column sums over the same 4 keys
            layer.receive(torch.tensor(c)[None, None])
        want = torch.zeros(4)
        for c in calls:
            want = factor * want + torch.tensor(c)
        torch.testing.assert_close(layer.scores[0, 0, :4], want)


@pytest.mark.parametrize("policy", ["h2o", "tova", "snapkv"])
def test_recent_keeps_the_newest_tokens_whatever_their_scores(policy):
    """The two newest tokens score 0 at every call: with ``recent=2`` they are kept, without it
    (h2o with ``recent=0``, which replaces its own ``budget // 2``) they go."""
    score = [1.0] * 10 + [0.0] * 2  # positions 10 and 11 score nothing
    for recent, want_newest in ((0 if policy == "h2o" else None, False), (2, True)):
        # snapkv: an observation window of 1 query (position 11), no pooling
        snap = {"window_size": 1, "kernel_size": 1} if policy == "snapkv" else {}
        layer = BudgetLayer(6, policy, sink_tokens=0, recent=recent, **snap)
        _give(layer, 12, score)
        kept = _kept(layer)
        assert len(kept) == 6
        assert ({10, 11} <= set(kept)) == want_newest, (recent, kept)


def test_snapkv_window_size_scores_with_that_many_last_queries():
    """``window_size=3``: the keys' scores are the mass from the prompt's last 3 queries (an fp64
    oracle), max-pooled; the last ``min(3, budget // 2)`` tokens kept."""
    g = torch.Generator().manual_seed(5)
    layer = BudgetLayer(6, "snapkv", sink_tokens=0, window_size=3, kernel_size=1)
    assert layer.request(12).rows == slice(9, 12)
    q = torch.randn(1, 2, 12, 8, generator=g)
    k, v = _kv(12, seed=4)
    keys, values = layer.update(k, v)
    mask = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
    sa_hf.attention_forward(torch.nn.Module(), q, keys, values, mask)
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 8**0.5
    s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1)[0]  # (Hq, Nq, Nk)

    def top6(window):
        mass = p[:, -window:].sum((0, 1))  # the last queries, both query heads
        mass[12 - min(window, 3) :] = float("inf")  # the observation window
        return sorted(sorted(range(12), key=lambda i: (mass[i].item(), i))[-6:])

    assert _kept(layer) == top6(3)
    assert top6(3) != top6(12)  # the default window (32: all 12 queries) keeps others


def test_snapkv_kernel_size_pools_over_that_many_positions():
    """One score spike at position 5 and a smaller one at 9 (window of 1 query: position 11 kept):
    pooled over 3 positions the spike keeps 4-6 and the newest of 8-10; over 1 the spikes
    alone and the newest zeros; over 7 (the default) 2-8 tie, the newest kept."""
    score = [0.0] * 12
    score[5], score[9] = 1.0, 0.5
    for kernel, want in ((3, [4, 5, 6, 10, 11]), (1, [5, 8, 9, 10, 11]), (None, [5, 6, 7, 8, 11])):
        layer = BudgetLayer(5, "snapkv", sink_tokens=0, window_size=1, kernel_size=kernel)
        _give(layer, 12, score)
        assert _kept(layer) == want, kernel


def test_make_cache_refuses_options_of_a_wrong_value_or_policy():
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=11, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, attn_implementation="selfattn",
    )  # fmt: skip
    bad = [
        (ValueError, "decay must be in \\[0, 1\\], got 1.5", {"policy": "h2o", "decay": 1.5}),
        (TypeError, "decay must be a float", {"policy": "h2o", "decay": True}),
        (ValueError, "decay=0.5 applies to policy h2o, tova, snapkv, not 'sink'",
         {"policy": "sink", "decay": 0.5}),
        (ValueError, "recent must be in \\[0, budget=8\\]", {"policy": "tova", "recent": 9}),
        (TypeError, "recent must be an int", {"policy": "tova", "recent": 2.0}),
        (ValueError, "kernel_size must be odd", {"policy": "snapkv", "kernel_size": 4}),
        (ValueError, "window_size must be >= 1", {"policy": "snapkv", "window_size": 0}),
        (ValueError, "window_size=4 applies to policy snapkv, not 'h2o'",
         {"policy": "h2o", "window_size": 4}),
    ]  # fmt: skip
    for exc, match, kwargs in bad:
        with pytest.raises(exc, match=match):
            sa_hf.make_cache(cfg, budget=8, **kwargs)
    with pytest.raises(ValueError, match="need budget"):
        sa_hf.make_cache(cfg, decay=0.5)
    cache = sa_hf.make_cache(
        cfg, budget=8, policy="snapkv", decay=0.5, recent=2, window_size=4, kernel_size=3
    )
    layer = cache.layers[0]
    assert (layer.decay, layer.recent, layer.snap_window, layer.snap_kernel) == (0.5, 2, 4, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"policy": "h2o", "decay": 0.5, "recent": 2},
        {"policy": "tova", "decay": 0.8, "recent": 3},
        {"policy": "snapkv", "decay": 0.5, "recent": 2, "window_size": 4, "kernel_size": 3},
    ],
)
def test_options_keep_positions_and_the_budget_over_two_turns(kwargs):
    """Budget 8: a 20-token prompt, 6 decode steps, a 5-token second turn, 4 more steps; before
    each call the reference ``DynamicCache`` is masked to exactly the tokens the layer kept, so
    kept keys sit at their original positions."""
    model = tiny_llama(layers=1, kv_heads=1)
    cache = sa_hf.make_cache(model, budget=8, sink_tokens=1, **kwargs)

    def check(layer, seen, n):
        held = layer.positions[0, 0, : layer.end].tolist()
        assert set(range(seen + n - kwargs["recent"], seen + n)) <= set(held)
        assert 0 in held  # the sink

    replay_two_turns_against_masked_reference(model, cache, 8, check)
