"""Word timestamps from cross-attention, the way Whisper's own are made: the alignment heads'
attention normalised per audio frame, median-filtered along time, averaged over heads, then a
monotonic path through (tokens x 20-ms frames) by dynamic time warping; tokens grouped into words.
numpy only."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "FRAME_SECONDS",
    "alignment_matrix",
    "audible_span",
    "dtw",
    "median_filter",
    "token_starts",
    "words",
]

FRAME_SECONDS = 0.02  # one encoder position: two 10-ms mel frames after the stride-2 convolution
MEDIAN_WIDTH = 7  # as openai-whisper
# scripts written without spaces between words: each token (each complete character) is a word
NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}
# attached to the word before them (closing) or after them (opening), as subtitles show them
CLOSING = set(".,!?:;%)]}»”’…。，、！？：；」』")
OPENING = set("([{«“‘¿¡「『")


def median_filter(x: np.ndarray, width: int = MEDIAN_WIDTH) -> np.ndarray:
    """The running median of ``x`` (..., T) along its last axis over ``width`` (odd) values,
    the edges padded by reflection; ``x`` is returned unchanged when T <= width // 2."""
    if width < 1 or width % 2 == 0:
        raise ValueError(f"median filter width must be a positive odd integer, got {width}")
    x = np.asarray(x)
    half = width // 2
    if width == 1 or x.shape[-1] <= half:
        return x.copy()
    pad = [(0, 0)] * (x.ndim - 1) + [(half, half)]
    padded = np.pad(x, pad, mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)  # (..., T, width)
    return np.median(windows, axis=-1)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through ``cost`` (N, M) from (0, 0) to (N-1, M-1).

    Each step goes one row down, one column right, or both; the path's cost is the sum of the
    cells it visits. Filled one anti-diagonal at a time (every cell of a diagonal depends only
    on the two before it), then traced back; on a tie the diagonal step wins, then the step
    along the row (time goes on, same token).

    Returns:
        ``(rows, cols)``: the visited cells in order, two int arrays of equal length
        (at least max(N, M), at most N + M - 1).
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"cost must be a non-empty 2-D array, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("cost must be finite")
    n, m = c.shape
    # acc[i + 1, j + 1]: the cheapest path's cost from (0, 0) to (i, j); row and column 0: inf
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for d in range(n + m - 1):  # cells with i + j == d
        i = np.arange(max(0, d - m + 1), min(n, d + 1))
        j = d - i
        best = np.minimum(np.minimum(acc[i, j], acc[i, j + 1]), acc[i + 1, j])
        acc[i + 1, j + 1] = c[i, j] + best
    rows, cols = [n - 1], [m - 1]
    i, j = n, m  # 1-based in acc
    while i > 1 or j > 1:
        diag, up, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif left <= up:
            j -= 1
        else:
            i -= 1
        rows.append(i - 1)
        cols.append(j - 1)
    return np.array(rows[::-1]), np.array(cols[::-1])


def alignment_matrix(weights: np.ndarray, width: int = MEDIAN_WIDTH) -> np.ndarray:
    """Cross-attention of the alignment heads (heads, tokens, frames) -> (tokens, frames):
    each head's column (one audio frame over the tokens) standardised to mean 0 and standard
    deviation 1, a running median along time, then the mean over heads. Larger: the token was
    read from that frame."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 3:
        raise ValueError(f"weights must be (heads, tokens, frames), got shape {w.shape}")
    std = w.std(axis=1, keepdims=True)
    w = (w - w.mean(axis=1, keepdims=True)) / np.maximum(std, 1e-10)
    return median_filter(w, width).mean(axis=0)


def token_starts(matrix: np.ndarray) -> np.ndarray:
    """Where each token starts, in frames: the DTW path through ``-matrix`` (tokens, frames)
    enters row i at column ``starts[i]``; (tokens,) ints, non-decreasing."""
    rows, cols = dtw(-np.asarray(matrix, dtype=np.float64))
    first = np.ones(rows.size, dtype=bool)
    first[1:] = rows[1:] != rows[:-1]  # the path steps into a new row
    return cols[first]


def _is_word_start(piece: str, language: str) -> bool:
    if language in NO_SPACE_LANGUAGES:
        return True
    return piece[:1].isspace()


def words(
    tokens: Sequence[int],
    decode: Callable[[list[int]], str],
    language: str,
) -> list[list[int]]:
    """Group text tokens into words: a word starts at a token whose text begins with a space
    (each token in languages written without spaces, ``NO_SPACE_LANGUAGES``); a token that does
    not decode to whole characters joins the next; closing punctuation (".", ",", "?" ...) stays
    with the word before it and opening punctuation ("(", "¿" ...) goes to the word after it.

    Returns:
        lists of indices into ``tokens``, in order, together covering every token.
    """
    groups: list[list[int]] = []
    pending: list[int] = []  # indices of tokens that are not yet whole characters
    opening_only = False  # the last word so far is only "(" or "¿": the next token joins it
    for i in range(len(tokens)):
        pending.append(i)
        text = decode([tokens[k] for k in pending])
        if "\ufffd" in text and i + 1 < len(tokens):
            continue
        bare = text.strip()
        if not groups:
            groups.append(list(pending))
        elif (
            not _is_word_start(text, language)
            or (bare and all(ch in CLOSING for ch in bare))
            or opening_only
        ):
            groups[-1].extend(pending)
        else:
            groups.append(list(pending))
        last = decode([tokens[k] for k in groups[-1]]).strip()
        opening_only = bool(last) and all(ch in OPENING for ch in last)
        pending = []
    return groups


def audible_span(
    samples: np.ndarray,
    start: float,
    end: float,
    rate: int = 16_000,
    below_db: float = 25.0,
    pause: float = 0.1,
) -> tuple[float, float]:
    """``(start, end)`` in seconds moved in to the sound around the loudest 20-ms frame of
    ``samples[start:end]``: a frame is quiet when its level is more than ``below_db`` under that
    frame's; the span starts after the last run of at least ``pause`` seconds of quiet frames
    before the loudest frame (else at its first loud frame) and ends likewise before the first
    such run after it.

    Dynamic time warping gives the pause before a word to the word (each word's row starts where
    the previous one ends, and that may be a little before the previous word's sound ends); this
    takes the pause out again. Spans of under two frames, or silent ones, are left unchanged."""
    hop = int(rate * FRAME_SECONDS)
    a, b = round(start * rate), round(end * rate)
    x = np.asarray(samples[a:b], dtype=np.float64)
    if x.size < 2 * hop:
        return start, end
    x = x[: x.size // hop * hop]
    power = np.square(x).reshape(-1, hop).mean(axis=1)
    if power.max() <= 0:
        return start, end
    loud = power >= power.max() * 10 ** (-below_db / 10)
    peak, run = int(np.argmax(power)), max(1, round(pause / FRAME_SECONDS))
    first, quiet = int(np.flatnonzero(loud)[0]), 0
    for k in range(peak - 1, -1, -1):
        quiet = 0 if loud[k] else quiet + 1
        if quiet >= run:
            first = k + quiet
            break
    last, quiet = int(np.flatnonzero(loud)[-1]) + 1, 0
    for k in range(peak + 1, loud.size):
        quiet = 0 if loud[k] else quiet + 1
        if quiet >= run:
            last = k - quiet + 1
            break
    return start + first * FRAME_SECONDS, min(end, start + last * FRAME_SECONDS)
