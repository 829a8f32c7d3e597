"""Tests of the numpy specification ``selfattn.reference``: the lesson, and every rule by hand.

Each rule is checked alone on a case small enough to work out on paper. Most use ``q = 0`` (all
scores equal, so the weights are uniform over the visible keys) and ``v = I`` (so the output row
*is* the row of weights), which turns "which keys are visible" into a matrix one can read.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from selfattn import reference

# The lesson's example: three tokens of three features, random projections.
LESSON_X = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=np.float64)


def lesson_weights(seed: int = 0, size: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((3, size)), rng.random((3, size)), rng.random((3, size))


def lesson_code(x: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray) -> np.ndarray:
    """The lesson's snippet, line for line (unscaled scores, unguarded exp)."""
    q = np.dot(x, wq)
    k = np.dot(x, wk)
    v = np.dot(x, wv)
    scores = np.dot(q, k.T)
    with np.errstate(over="ignore", invalid="ignore"):
        weights = np.exp(scores) / np.sum(np.exp(scores), axis=1, keepdims=True)
    return np.dot(weights, v)


def uniform_rows(vis: np.ndarray) -> np.ndarray:
    """Weights that are uniform over the visible keys of each row, 0 for empty rows."""
    vis = np.asarray(vis, dtype=np.float64)
    n = vis.sum(-1, keepdims=True)
    return np.where(n > 0, vis / np.maximum(n, 1), 0.0)


def run_identity(nq: int, nk: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(out, lse) for q = 0 (all scores 0 before bias/ALiBi), v = I: the output is the weights."""
    q = np.zeros((nq, 2))
    k = np.random.default_rng(1).standard_normal((nk, 2))
    return reference.attention(q, k, np.eye(nk), return_lse=True, **kwargs)


# -- the lesson -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesson_example_matches_lesson_code(seed):
    wq, wk, wv = lesson_weights(seed)
    ours = reference.self_attention(LESSON_X, wq, wk, wv, scale=1.0)
    np.testing.assert_allclose(ours, lesson_code(LESSON_X, wq, wk, wv), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(
        ours, reference.lesson_self_attention(LESSON_X, wq, wk, wv), rtol=1e-13, atol=1e-13
    )


def test_default_scale_is_one_over_sqrt_dk():
    wq, wk, wv = lesson_weights(3, size=4)  # d_k = 4: scale 1/2
    ours = reference.self_attention(LESSON_X, wq, wk, wv)
    doubled = lesson_code(LESSON_X, wq / 2.0, wk, wv)  # halving Q halves the scores
    np.testing.assert_allclose(ours, doubled, rtol=1e-13, atol=1e-13)


def test_large_scores_stay_finite_where_the_lesson_overflows():
    """Scores above ~709 overflow np.exp: the lesson's code gives NaN, the spec must not."""
    wq, wk, wv = lesson_weights(0)
    x = LESSON_X * 30.0  # scores ~ 900 * O(1) -> well above 709
    q, k = x @ wq, x @ wk
    s = q @ k.T
    assert s.max() > 709
    assert np.isnan(lesson_code(x, wq, wk, wv)).any()
    assert np.isnan(reference.lesson_self_attention(x, wq, wk, wv)).any()
    ours = reference.self_attention(x, wq, wk, wv, scale=1.0)
    assert np.isfinite(ours).all()
    # The softmax is shift-invariant: subtracting the row maximum by hand gives the exact weights.
    e = np.exp(s - s.max(1, keepdims=True))
    want = (e / e.sum(1, keepdims=True)) @ (x @ wv)
    np.testing.assert_allclose(ours, want, rtol=1e-12, atol=1e-12)


def test_huge_scores_hand_checked():
    """Scores 1000, 1001, 1002: the weights are softmax([0, 1, 2]) exactly."""
    q = np.array([[1.0]])
    k = np.array([[1000.0], [1001.0], [1002.0]])
    out, lse = reference.attention(q, k, np.eye(3), scale=1.0, return_lse=True)
    e = np.exp([0.0, 1.0, 2.0])
    np.testing.assert_allclose(out[0], e / e.sum(), rtol=1e-14)
    np.testing.assert_allclose(lse[0], 1000.0 + math.log(e.sum()), rtol=1e-15)
    big = reference.attention(q, k * 1e6, np.eye(3), scale=1.0)  # one-hot on the last key
    np.testing.assert_array_equal(big[0], [0.0, 0.0, 1.0])


def test_return_steps_shows_every_intermediate():
    wq, wk, wv = lesson_weights(4)
    st = reference.self_attention(LESSON_X, wq, wk, wv, scale=1.0, return_steps=True)
    assert isinstance(st, reference.Steps)
    np.testing.assert_array_equal(st.x, LESSON_X)
    np.testing.assert_allclose(st.q, LESSON_X @ wq)
    np.testing.assert_allclose(st.k, LESSON_X @ wk)
    np.testing.assert_allclose(st.v, LESSON_X @ wv)
    np.testing.assert_allclose(st.scores, st.q @ st.k.T)
    np.testing.assert_allclose(st.weights.sum(-1), 1.0)
    np.testing.assert_allclose(st.output, st.weights @ st.v)
    np.testing.assert_allclose(st.output, lesson_code(LESSON_X, wq, wk, wv), rtol=1e-13)


def test_return_steps_with_rules_marks_invisible_scores():
    wq, wk, wv = lesson_weights(5)
    st = reference.self_attention(LESSON_X, wq, wk, wv, causal=True, return_steps=True)
    assert np.isneginf(st.scores[np.triu_indices(3, 1)]).all()
    np.testing.assert_array_equal(st.weights[np.triu_indices(3, 1)], 0.0)
    full = reference.self_attention(LESSON_X, wq, wk, wv, causal=True)
    np.testing.assert_allclose(st.output, full, rtol=1e-14)


@pytest.mark.parametrize("bad", [{"dropout_p": 0.1, "dropout_seed": (1, 2)}, {"return_lse": True}])
def test_return_steps_refuses_dropout_and_lse(bad):
    wq, wk, wv = lesson_weights(0)
    with pytest.raises(ValueError, match="return_steps"):
        reference.self_attention(LESSON_X, wq, wk, wv, return_steps=True, **bad)


def test_self_attention_forwards_rules_and_lse():
    wq, wk, wv = lesson_weights(6)
    out, lse = reference.self_attention(LESSON_X, wq, wk, wv, causal=True, return_lse=True)
    q, k, v = LESSON_X @ wq, LESSON_X @ wk, LESSON_X @ wv
    out2, lse2 = reference.attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(lse, lse2)


# -- leading batch shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (2, 1, 3)])
def test_leading_batch_shapes_match_a_loop(lead):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((*lead, 5, 4))
    k = rng.standard_normal((*lead, 6, 4))
    v = rng.standard_normal((*lead, 6, 3))
    out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (*lead, 5, 3) and lse.shape == (*lead, 5)
    for idx in np.ndindex(*lead):
        o1, l1 = reference.attention(q[idx], k[idx], v[idx], causal=True, return_lse=True)
        np.testing.assert_allclose(out[idx], o1, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(lse[idx], l1, rtol=1e-14)


def test_gqa_groups_heads_like_repeat_interleave():
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 6, 5, 4))
    k = rng.standard_normal((2, 2, 7, 4))
    v = rng.standard_normal((2, 2, 7, 3))
    out = reference.attention(q, k, v)
    for h in range(6):
        o1 = reference.attention(q[:, h], k[:, h // 3], v[:, h // 3])
        np.testing.assert_allclose(out[:, h], o1, rtol=1e-14, atol=1e-15)


# -- each rule alone, by hand ----------------------------------------------------------------------


def test_no_rule_is_uniform_with_equal_scores():
    out, lse = run_identity(2, 4)
    np.testing.assert_allclose(out, np.full((2, 4), 0.25), rtol=1e-15)
    np.testing.assert_allclose(lse, math.log(4.0) * np.ones(2), rtol=1e-15)


def test_causal_bottom_right_nq_less_than_nk():
    # Nq=2, Nk=4: query 0 sits at i'=2 (keys 0..2), query 1 at i'=3 (keys 0..3).
    out, lse = run_identity(2, 4, causal=True)
    vis = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(out, uniform_rows(vis), rtol=1e-15)
    np.testing.assert_allclose(lse, np.log([3.0, 4.0]), rtol=1e-15)


def test_causal_bottom_right_nq_greater_than_nk():
    # Nq=4, Nk=2: queries sit at i' = -2, -1, 0, 1: the first two see nothing.
    out, lse = run_identity(4, 2, causal=True)
    vis = np.array([[0, 0], [0, 0], [1, 0], [1, 1]])
    np.testing.assert_array_equal(out, uniform_rows(vis))
    assert np.isneginf(lse[:2]).all()
    np.testing.assert_allclose(lse[2:], np.log([1.0, 2.0]), rtol=1e-15)


def test_causal_square_is_lower_triangular():
    out, _ = run_identity(4, 4, causal=True)
    np.testing.assert_allclose(out, uniform_rows(np.tril(np.ones((4, 4)))), rtol=1e-15)


@pytest.mark.parametrize(
    "window, vis",
    [
        ((1, 0), [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]),
        ((0, 1), [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1]]),
        ((1, 1), [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]),
        ((None, 0), np.tril(np.ones((4, 4)))),
        ((2, None), [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]),
        ((0, 0), np.eye(4)),
    ],
)
def test_window(window, vis):
    out, _ = run_identity(4, 4, window=window)
    np.testing.assert_allclose(out, uniform_rows(np.array(vis)), rtol=1e-15)


def test_window_bottom_right_with_nq_less_than_nk():
    # Nq=2, Nk=5: queries at i' = 3, 4; window (1, 0) sees keys {2, 3} and {3, 4}.
    out, _ = run_identity(2, 5, window=(1, 0))
    vis = np.array([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    np.testing.assert_allclose(out, uniform_rows(vis), rtol=1e-15)


def test_window_can_leave_rows_empty():
    # Nq=3, Nk=1: queries at i' = -2, -1, 0; window (0, 0) only lets query 2 see key 0.
    out, lse = run_identity(3, 1, window=(0, 0))
    np.testing.assert_array_equal(out, [[0.0], [0.0], [1.0]])
    assert np.isneginf(lse[:2]).all() and lse[2] == 0.0


def test_bool_mask_true_is_visible():
    mask = np.array([[True, False, True, False], [False, False, False, False]])
    out, lse = run_identity(2, 4, mask=mask)
    np.testing.assert_allclose(out, uniform_rows(mask), rtol=1e-15)
    assert lse[0] == pytest.approx(math.log(2.0)) and np.isneginf(lse[1])


def test_mask_broadcasts_over_rows():
    out, _ = run_identity(3, 4, mask=np.array([True, True, False, True]))
    np.testing.assert_allclose(out, uniform_rows(np.tile([1, 1, 0, 1], (3, 1))), rtol=1e-15)


def test_bias_is_added_to_the_scores():
    bias = np.log(np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    out, lse = run_identity(2, 4, bias=bias)
    np.testing.assert_allclose(out, [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], rtol=1e-14)
    np.testing.assert_allclose(lse, np.log([10.0, 10.0]), rtol=1e-14)


def test_bias_minus_inf_hides_a_key_like_a_mask():
    bias = np.array([[0.0, -np.inf, 0.0]])
    out, _ = run_identity(1, 3, bias=bias)
    np.testing.assert_allclose(out, [[0.5, 0.0, 0.5]], rtol=1e-15)


def test_alibi_subtracts_slope_times_distance():
    # One head, slope ln 2: weight of key j is proportional to 2**-|i' - j|.
    q = np.zeros((1, 1, 2, 2))
    k = np.zeros((1, 1, 4, 2))
    out = reference.attention(q, k, np.eye(4)[None, None], alibi_slopes=np.array([math.log(2)]))
    # queries at i' = 2, 3
    w0 = np.array([0.25, 0.5, 1.0, 0.5])
    w1 = np.array([0.125, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(out[0, 0], [w0 / w0.sum(), w1 / w1.sum()], rtol=1e-14)


def test_alibi_per_batch_and_head():
    q = np.zeros((2, 2, 1, 2))
    k = np.zeros((2, 2, 3, 2))
    slopes = np.array([[0.0, math.log(2)], [math.log(3), math.log(4)]])  # (B, Hq)
    out = reference.attention(q, k, np.broadcast_to(np.eye(3), (2, 2, 3, 3)), alibi_slopes=slopes)
    for b in range(2):
        for h in range(2):
            base = math.exp(slopes[b, h])
            w = base ** -np.array([2.0, 1.0, 0.0])  # query at i' = 2
            np.testing.assert_allclose(out[b, h, 0], w / w.sum(), rtol=1e-14)


def test_softcap_applies_tanh_before_bias():
    q = np.array([[1.0]])
    k = np.array([[3.0], [-1.0], [0.5]])
    bias = np.array([[0.0, 1.0, -2.0]])
    cap = 2.0
    out, lse = reference.attention(
        q, k, np.eye(3), scale=1.0, softcap=cap, bias=bias, return_lse=True
    )
    s = cap * np.tanh(np.array([3.0, -1.0, 0.5]) / cap) + bias[0]
    np.testing.assert_allclose(out[0], np.exp(s) / np.exp(s).sum(), rtol=1e-14)
    np.testing.assert_allclose(lse[0], np.log(np.exp(s).sum()), rtol=1e-14)


def test_scale_multiplies_the_scores():
    q = np.array([[1.0]])
    k = np.array([[0.0], [1.0]])
    out = reference.attention(q, k, np.eye(2), scale=math.log(3.0))
    np.testing.assert_allclose(out[0], [0.25, 0.75], rtol=1e-14)


def test_segment_ids_single_tensor_with_padding():
    ids = np.array([[0, 0, 1, -1]])  # (B=1, N=4); the last token is padding
    q = np.zeros((1, 1, 4, 2))
    k = np.zeros((1, 1, 4, 2))
    out, lse = reference.attention(q, k, np.eye(4)[None, None], segment_ids=ids, return_lse=True)
    vis = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(out[0, 0], uniform_rows(vis), rtol=1e-15)
    assert np.isneginf(lse[0, 0, 3])


def test_segment_ids_negative_ids_never_match_each_other():
    ids = np.array([[-1, -1, -2, 5]])
    out, _ = reference.attention(
        np.zeros((1, 1, 4, 2)), np.zeros((1, 1, 4, 2)), np.eye(4)[None, None],
        segment_ids=ids, return_lse=True,
    )  # fmt: skip
    np.testing.assert_array_equal(out[0, 0, :3], 0.0)
    np.testing.assert_array_equal(out[0, 0, 3], [0, 0, 0, 1.0])


def test_segment_id_pair_with_nq_not_nk():
    q_ids = np.array([[1, 2], [7, -1]])  # (B=2, Nq=2)
    kv_ids = np.array([[1, 1, 2, 2, -1], [7, 3, 7, 7, 7]])  # (B=2, Nk=5)
    q = np.zeros((2, 1, 2, 2))
    k = np.zeros((2, 1, 5, 2))
    v = np.broadcast_to(np.eye(5), (2, 1, 5, 5))
    out = reference.attention(q, k, v, segment_ids=(q_ids, kv_ids))
    np.testing.assert_allclose(
        out[0, 0], uniform_rows([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]), rtol=1e-15
    )
    np.testing.assert_allclose(
        out[1, 0], uniform_rows([[1, 0, 1, 1, 1], [0, 0, 0, 0, 0]]), rtol=1e-15
    )


def test_segment_ids_broadcast_over_heads():
    ids = np.array([[0, 1, 1]])
    q = np.zeros((1, 3, 3, 2))
    k = np.zeros((1, 3, 3, 2))
    out = reference.attention(q, k, np.broadcast_to(np.eye(3), (1, 3, 3, 3)), segment_ids=ids)
    for h in range(3):
        np.testing.assert_allclose(out[0, h], uniform_rows([[1, 0, 0], [0, 1, 1], [0, 1, 1]]))


def test_rules_combine_as_logical_and():
    # causal AND window (1, None) AND mask: Nq=Nk=4.
    mask = np.array([True, False, True, True])
    out, _ = run_identity(4, 4, causal=True, window=(1, None), mask=mask)
    vis = np.tril(np.ones((4, 4))) * np.triu(np.ones((4, 4)), -1) * mask
    np.testing.assert_allclose(out, uniform_rows(vis), rtol=1e-15)


def test_lse_is_log_of_the_visible_exponential_sum():
    rng = np.random.default_rng(9)
    q, k, v = rng.standard_normal((5, 3)), rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    _, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    s = q @ k.T / math.sqrt(3)
    for i in range(5):
        j = i + 2  # i' = i + Nk - Nq
        assert lse[i] == pytest.approx(math.log(np.exp(s[i, : j + 1]).sum()), rel=1e-14)


def test_fully_masked_rows_are_zero_not_nan():
    rng = np.random.default_rng(10)
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    mask = np.ones((3, 5), dtype=bool)
    mask[1] = False
    out, lse = reference.attention(q, k, v, mask=mask, return_lse=True)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.isneginf(lse[1]) and np.isfinite(out).all()


def test_nan_in_a_hidden_value_stays_out():
    rng = np.random.default_rng(11)
    q, k, v = rng.standard_normal((4, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    k[3] = np.nan
    v[3] = np.nan
    out = reference.attention(q, k, v, causal=True)
    assert np.isfinite(out[:3]).all() and np.isnan(out[3]).all()
    clean = reference.attention(q[:3], k[:3], v[:3], causal=True)
    np.testing.assert_allclose(out[:3], clean, rtol=1e-14)


def test_dropout_needs_a_seed():
    with pytest.raises(ValueError, match="dropout_seed"):
        reference.attention(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)), dropout_p=0.5)


def test_dropout_keep_rate_and_scaling():
    rng = np.random.default_rng(12)
    q, k = rng.standard_normal((64, 4)), rng.standard_normal((256, 4))
    p = 0.25
    out = reference.attention(q, k, np.eye(256), dropout_p=p, dropout_seed=(123, 456))
    full = reference.attention(q, k, np.eye(256))
    kept = out != 0
    assert abs(kept.mean() - (1 - p)) < 0.01  # 16384 entries: sd ~ 0.0034
    np.testing.assert_allclose(out[kept], full[kept] / (1 - p), rtol=1e-14)
    keep = reference.dropout_keep((123, 456), np.arange(64)[:, None], np.arange(256), p)
    np.testing.assert_array_equal(kept, keep)
