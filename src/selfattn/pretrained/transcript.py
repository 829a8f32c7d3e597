"""What a speech model heard: the transcript with its timed segments and words, as JSON and as
subtitles (SubRip ``.srt`` and WebVTT ``.vtt``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Segment", "Transcript", "Word", "by_words", "srt", "timestamp", "vtt"]


@dataclass
class Word:
    """One word: seconds from the start of the audio, its text (with its leading space, as
    decoded) and the mean probability of its tokens."""

    start: float
    end: float
    word: str
    probability: float

    def as_dict(self) -> dict[str, Any]:
        """The word in ``--json``."""
        return {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "word": self.word,
            "probability": round(self.probability, 4),
        }


@dataclass
class Segment:
    """A stretch of speech between two of Whisper's timestamp tokens (seconds from the start of
    the audio); with word timestamps its start and end are its first word's start and its last
    word's end. ``avg_logprob`` and ``no_speech_prob`` are those of its 30-s window."""

    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    words: list[Word] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The segment in ``--json`` (``words`` only when word timestamps were asked for)."""
        d: dict[str, Any] = {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "text": self.text,
            "avg_logprob": round(self.avg_logprob, 4),
            "no_speech_prob": round(self.no_speech_prob, 4),
        }
        if self.words is not None:
            d["words"] = [w.as_dict() for w in self.words]
        return d


@dataclass
class Transcript:
    """What :func:`selfattn.pretrained.whisper.transcribe` heard: the text and its segments,
    per 30-s window its text tokens (timestamps left out), their pieces and (with
    ``alignment=True``) the mean cross-attention of Whisper's alignment heads, (tokens, frames).
    ``no_speech`` is True when no window held speech."""

    text: str
    language: str
    task: str
    seconds: float
    elapsed: float
    windows: list[tuple[float, float]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    pieces: list[list[str]] = field(default_factory=list)
    alignment: list[np.ndarray] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    no_speech: bool = False

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio per second taken (above 1: faster than real time)."""
        return self.seconds / self.elapsed if self.elapsed > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        """The JSON of ``selfattn transcribe --json``."""
        return {
            "text": self.text,
            "language": self.language or None,
            "task": self.task,
            "no_speech": self.no_speech,
            "audio_seconds": round(self.seconds, 3),
            "seconds": round(self.elapsed, 3),
            "realtime_factor": round(self.realtime_factor, 3),
            "windows": [[round(a, 3), round(b, 3)] for a, b in self.windows],
            "segments": [s.as_dict() for s in self.segments],
        }


def by_words(segments: list[Segment], n: int) -> list[Segment]:
    """Segments cut into cues of at most ``n`` words each (openai-whisper's
    ``--max_words_per_line``), each from its first word's start to its last word's end; a
    segment without word times stays whole."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"words per cue must be a positive integer, got {n!r}")
    out = []
    for s in segments:
        if not s.words:
            out.append(s)
            continue
        for k in range(0, len(s.words), n):
            ws = s.words[k : k + n]
            text = "".join(w.word for w in ws)
            out.append(
                Segment(ws[0].start, ws[-1].end, text, [], s.avg_logprob, s.no_speech_prob, ws)
            )
    return out


def timestamp(seconds: float, decimal: str = ".") -> str:
    """``HH:MM:SS.mmm`` (``,`` before the milliseconds for SubRip), rounded to the millisecond."""
    if not seconds >= 0:
        raise ValueError(f"a subtitle time must be >= 0 seconds, got {seconds}")
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def _cue_text(segment: Segment, inline_times: bool) -> str:
    if not (inline_times and segment.words):
        return segment.text.strip().replace("-->", "->")
    parts = [segment.words[0].word.strip()]
    for w in segment.words[1:]:  # WebVTT cue timestamps: each word shows from its start
        parts.append(f"<{timestamp(w.start)}>{w.word.strip()}")
    return " ".join(parts).replace("-->", "->")


def srt(segments: list[Segment]) -> str:
    """SubRip subtitles: one numbered cue per segment (``HH:MM:SS,mmm --> HH:MM:SS,mmm``);
    an empty string when there are none."""
    cues = []
    for i, s in enumerate(segments, 1):
        span = f"{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}"
        cues.append(f"{i}\n{span}\n{_cue_text(s, False)}\n")
    return "\n".join(cues)


def vtt(segments: list[Segment]) -> str:
    """WebVTT subtitles: the ``WEBVTT`` header, then one cue per segment; with word timestamps
    each word after the first carries its start as a cue timestamp (``<00:00:01.240>word``),
    which players use to show the words as they are spoken."""
    cues = ["WEBVTT\n"]
    for s in segments:
        span = f"{timestamp(s.start)} --> {timestamp(s.end)}"
        cues.append(f"{span}\n{_cue_text(s, True)}\n")
    return "\n".join(cues)
