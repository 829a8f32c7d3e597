"""Word timing and subtitles without a model: dynamic time warping on synthetic costs, the median
filter, the alignment matrix, tokens grouped into words, moving a word in to its sound, Whisper's
timestamp-token rules and segments, SubRip / WebVTT text, the loudness of audio."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from selfattn.pretrained import timing
from selfattn.pretrained import whisper_decode as wd
from selfattn.pretrained.audio import loudest_db
from selfattn.pretrained.transcript import Segment, Word, by_words, srt, timestamp, vtt


def _plain_dtw_cost(cost: np.ndarray) -> float:
    """The cheapest monotonic path's cost by the textbook O(N M) double loop."""
    n, m = cost.shape
    acc = np.full((n, m), np.inf)
    for i, j in itertools.product(range(n), range(m)):
        before = 0.0 if i == j == 0 else np.inf
        if i and j:
            before = min(before, acc[i - 1, j - 1])
        if i:
            before = min(before, acc[i - 1, j])
        if j:
            before = min(before, acc[i, j - 1])
        acc[i, j] = cost[i, j] + before
    return float(acc[-1, -1])


def test_dtw_finds_the_planted_path():
    """A cost of 0 on a known monotonic staircase and 1 elsewhere: DTW returns that path."""
    starts = [0, 3, 4, 9, 15, 16]  # token i occupies frames starts[i] .. starts[i+1]-1
    frames = 20
    cost = np.ones((len(starts), frames))
    path = []
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else frames
        for j in range(s, end):
            cost[i, j] = 0.0
            path.append((i, j))
    rows, cols = timing.dtw(cost)
    assert list(zip(rows.tolist(), cols.tolist())) == path
    assert timing.token_starts(-cost).tolist() == starts


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (5, 5), (6, 40), (40, 6)])
def test_dtw_cost_is_the_minimum_and_the_path_is_monotonic(shape):
    rng = np.random.default_rng(sum(shape))
    cost = rng.random(shape)
    rows, cols = timing.dtw(cost)
    assert (rows[0], cols[0]) == (0, 0) and (rows[-1], cols[-1]) == (shape[0] - 1, shape[1] - 1)
    steps = np.stack([np.diff(rows), np.diff(cols)], axis=1)
    assert {tuple(s) for s in steps.tolist()} <= {(1, 0), (0, 1), (1, 1)}
    assert cost[rows, cols].sum() == pytest.approx(_plain_dtw_cost(cost), abs=1e-12)


def test_dtw_rejects_bad_costs():
    with pytest.raises(ValueError, match="non-empty 2-D"):
        timing.dtw(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="non-empty 2-D"):
        timing.dtw(np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        timing.dtw(np.array([[0.0, np.nan]]))


def test_median_filter_matches_a_direct_median():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 30))
    got = timing.median_filter(x, 7)
    padded = np.pad(x, [(0, 0), (3, 3)], mode="reflect")
    want = np.stack([[np.median(r[j : j + 7]) for j in range(30)] for r in padded])
    np.testing.assert_allclose(got, want)
    spike = np.zeros(20)
    spike[10] = 5.0  # one frame of noise is removed, a plateau of 4 stays
    assert timing.median_filter(spike).max() == 0
    spike[8:12] = 5.0
    assert timing.median_filter(spike)[9] == 5.0
    with pytest.raises(ValueError, match="odd"):
        timing.median_filter(x, 4)


def test_alignment_matrix_follows_a_noisy_diagonal():
    """Three heads whose attention walks along the audio (with noise): token i's start is found
    within a frame of where it was planted."""
    rng = np.random.default_rng(1)
    starts = np.array([0, 12, 20, 41, 55, 70])
    frames = 90
    w = rng.random((3, len(starts), frames)) * 0.3
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else frames
        w[:, i, s:end] += 1.0
    w /= w.sum(axis=2, keepdims=True)  # each row a probability over frames, as softmax gives
    m = timing.alignment_matrix(w)
    assert m.shape == (len(starts), frames)
    assert np.abs(timing.token_starts(m) - starts).max() <= 1


def _decode(table):
    return lambda ids: "".join(table[i] for i in ids)


def test_words_group_tokens_with_punctuation_and_partial_characters():
    table = {1: " Hello", 2: ",", 3: " wor", 4: "ld", 5: " (", 6: "yes", 7: ")", 8: ".", 9: " ¿"}
    table |= {10: "Qué", 11: "?"}
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    groups = timing.words(tokens, _decode(table), "en")
    assert [[tokens[k] for k in g] for g in groups] == [[1, 2], [3, 4], [5, 6, 7, 8], [9, 10, 11]]
    # a character split over two tokens: the first alone decodes to U+FFFD, so it waits
    halves = {1: " caf", 2: "\ufffd", 3: "é", 4: " bon"}

    def decode(ids):
        text = "".join(halves[i] for i in ids)
        return text.replace("\ufffdé", "é")

    assert timing.words([1, 2, 3, 4], decode, "fr") == [[0, 1, 2], [3]]
    cjk = {1: "我", 2: "爱", 3: "你", 4: "。"}
    assert timing.words([1, 2, 3, 4], _decode(cjk), "zh") == [[0], [1], [2, 3]]


def test_audible_span_takes_the_pause_out():
    rate = 16000
    x = np.zeros(rate)  # 1 s: quiet, then a tone from 0.40 s to 0.70 s, quiet again
    t = np.arange(rate) / rate
    x[int(0.4 * rate) : int(0.7 * rate)] = 0.3 * np.sin(2 * np.pi * 200 * t[: int(0.3 * rate)])
    x[int(0.1 * rate) : int(0.12 * rate)] = 0.2  # a click of the word before, 20 ms
    start, end = timing.audible_span(x, 0.0, 1.0, rate)
    assert start == pytest.approx(0.40, abs=0.02) and end == pytest.approx(0.70, abs=0.02)
    assert timing.audible_span(np.zeros(rate), 0.2, 0.6, rate) == (0.2, 0.6)
    assert timing.audible_span(x, 0.5, 0.51, rate) == (0.5, 0.51)


def _rules(seq, first=False, logits=None):
    out = torch.zeros(51865) if logits is None else logits.clone()
    wd.apply_rules(out, seq, True, torch.tensor([], dtype=torch.long), first=first)
    return out


def test_timestamp_rules():
    ts = wd.TIMESTAMP_BEGIN
    first = _rules([], first=True)  # a timestamp of at most 1 s, and nothing else
    allowed = torch.isfinite(first).nonzero().flatten().tolist()
    assert allowed == list(range(ts, ts + wd.MAX_INITIAL_TIMESTAMP + 1))
    after_open = _rules([ts + 5])  # text (or EOT) must follow the opening time
    assert torch.isinf(after_open[ts:]).all() and torch.isfinite(after_open[:100]).all()
    eot_likely = torch.zeros(51865)
    eot_likely[wd.EOT] = 20.0  # else the timestamps' total would outweigh it, and time is forced
    after_text = _rules([ts + 5, 100, 200, ts + 30], logits=eot_likely)  # a start or EOT next
    assert torch.isinf(after_text[: wd.EOT]).all() and torch.isfinite(after_text[wd.EOT])
    assert torch.isinf(after_text[ts : ts + 30]).all() and torch.isfinite(after_text[ts + 30])
    in_text = _rules([ts + 5, 100])  # never back in time: the next time is after 0.10 s
    assert torch.isinf(in_text[ts : ts + 6]).all() and torch.isfinite(in_text[ts + 6])
    assert torch.isinf(in_text[wd.SOT : ts]).all()  # never a special token
    likely = torch.zeros(51865)
    likely[ts + 10 :] = 5.0  # the timestamps together outweigh any text token: time is forced
    forced = _rules([ts, 100], logits=likely)
    assert torch.isinf(forced[:ts]).all()


def test_segments_from_timestamp_tokens():
    ts = wd.TIMESTAMP_BEGIN
    toks = [ts, 1, 2, ts + 120, ts + 120, 3, ts + 250, ts + 260, 4, 5]
    assert wd.segments(toks, 7.0) == [(0.0, 2.4, [1, 2]), (2.4, 5.0, [3]), (5.2, 7.0, [4, 5])]
    assert wd.segments([1, 2, 3], 3.5) == [(0.0, 3.5, [1, 2, 3])]  # decoded without timestamps
    assert wd.segments([ts + 10, 7, ts + 900], 4.0) == [(0.2, 4.0, [7])]  # clipped to the audio
    assert wd.segments([ts, ts + 50], 2.0) == []


def test_subtitles_srt_and_vtt():
    assert timestamp(3725.0456) == "01:02:05.046" and timestamp(0.9996, ",") == "00:00:01,000"
    with pytest.raises(ValueError, match=">= 0"):
        timestamp(-1)
    words = [Word(1.0, 1.4, " Hello", 0.9), Word(1.5, 2.0, " world.", 0.8)]
    segs = [
        Segment(1.0, 2.0, " Hello world.", [1, 2], -0.2, 0.01, words),
        Segment(3.25, 4.5, " a --> b", [3], -0.3, 0.01),
    ]
    assert srt(segs) == (
        "1\n00:00:01,000 --> 00:00:02,000\nHello world.\n\n"
        "2\n00:00:03,250 --> 00:00:04,500\na -> b\n"
    )
    assert vtt(segs) == (
        "WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nHello <00:00:01.500>world.\n\n"
        "00:00:03.250 --> 00:00:04.500\na -> b\n"
    )
    assert srt([]) == "" and vtt([]) == "WEBVTT\n"


def test_cues_of_at_most_n_words():
    words = [Word(float(i), i + 0.5, f" w{i}", 0.9) for i in range(5)]
    segs = [Segment(0.0, 5.0, " w0 w1 w2 w3 w4", [1], -0.1, 0.0, words)]
    segs.append(Segment(6.0, 7.0, " untimed", [2], -0.1, 0.0))
    cues = by_words(segs, 2)
    assert [(c.start, c.end, c.text) for c in cues] == [
        (0.0, 1.5, " w0 w1"),
        (2.0, 3.5, " w2 w3"),
        (4.0, 4.5, " w4"),
        (6.0, 7.0, " untimed"),
    ]
    assert srt(cues).count("-->") == 4
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            by_words(segs, bad)


def test_loudest_db():
    rate = 16000
    x = np.zeros(rate)
    assert loudest_db(x, rate) == -np.inf
    x[8000:8320] = 0.5  # one 20-ms frame of a square wave at half scale: -6 dB
    assert loudest_db(x, rate) == pytest.approx(20 * np.log10(0.5), abs=1e-9)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        loudest_db(np.zeros((2, 2)), rate)
