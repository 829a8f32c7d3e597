"""Whisper's greedy decoding, with or without timestamp tokens, one 30-s window at a time: the
token rules of Whisper's decoder, each step's log-probability and the no-speech probability."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "EOT",
    "NO_SPEECH",
    "NO_TIMESTAMPS",
    "SOT",
    "TIMESTAMP_BEGIN",
    "TRANSCRIBE",
    "TRANSLATE",
    "Decoded",
    "apply_rules",
    "greedy",
    "segments",
]

# Whisper's multilingual special tokens (the 51865-token vocabulary); ids from TIMESTAMP_BEGIN up
# are <|0.00|>, <|0.02|>, ... <|30.00|>, one per encoder position (20 ms)
EOT, SOT, TRANSLATE, TRANSCRIBE = 50257, 50258, 50358, 50359
NO_SPEECH, NO_TIMESTAMPS, TIMESTAMP_BEGIN = 50362, 50363, 50364
TIME_STEP = 0.02
MAX_INITIAL_TIMESTAMP = 50  # the first timestamp is at most <|1.00|>, as openai-whisper


@dataclass
class Decoded:
    """One window's greedy decoding: the generated ``tokens`` (timestamps included, EOT not),
    the log-probability of each (after the token rules), and the probability of
    ``<|nocaptions|>`` (Whisper's no-speech token) at the start-of-transcript position."""

    tokens: list[int]
    logprobs: list[float]
    no_speech_prob: float

    @property
    def avg_logprob(self) -> float:
        """Mean log-probability of the tokens and of the EOT that ended them (openai-whisper's
        ``avg_logprob``); 0 for an empty decoding."""
        return float(np.mean(self.logprobs)) if self.logprobs else 0.0


def apply_rules(logits: Any, seq: list[int], timestamps: bool, suppress: Any, first: bool) -> None:
    """Whisper's token rules, in place on one step's ``logits`` (vocab,) for the generated
    ``seq``: never a special token but EOT and the timestamps; nothing blank nor EOT first;
    timestamps in pairs (a segment's end is followed by the next one's start), never going back,
    the first at most 1 s; a timestamp whenever the timestamps together are more likely than the
    best text token."""
    import torch

    neg = -float("inf")
    logits[suppress] = neg
    logits[SOT:TIMESTAMP_BEGIN] = neg  # <|startoftranscript|> ... <|notimestamps|>
    if first:
        logits[[220, EOT]] = neg  # Whisper's begin-suppress tokens: " " and EOT
    if not timestamps:
        logits[TIMESTAMP_BEGIN:] = neg
        return
    if first:
        logits[:TIMESTAMP_BEGIN] = neg  # a segment starts with its time
        logits[TIMESTAMP_BEGIN + MAX_INITIAL_TIMESTAMP + 1 :] = neg
        return
    last_ts = seq[-1] >= TIMESTAMP_BEGIN
    before_ts = len(seq) < 2 or seq[-2] >= TIMESTAMP_BEGIN
    if last_ts:
        if before_ts:  # a pair (end, next start) or the opening time: text must follow
            logits[TIMESTAMP_BEGIN:] = neg
        else:  # a segment's text just ended: its end time, or EOT
            logits[:EOT] = neg
    times = [t for t in seq if t >= TIMESTAMP_BEGIN]
    if times:  # never back in time; a start may equal the previous segment's end
        floor = times[-1] if last_ts and not before_ts else times[-1] + 1
        logits[TIMESTAMP_BEGIN:floor] = neg
    logp = torch.log_softmax(logits.double(), dim=-1)
    if torch.logsumexp(logp[TIMESTAMP_BEGIN:], 0) > logp[:TIMESTAMP_BEGIN].max():
        logits[:TIMESTAMP_BEGIN] = neg


def greedy(
    model: Any,
    encoder_outputs: Any,
    prompt: list[int],
    *,
    timestamps: bool = True,
    max_new_tokens: int = 224,
) -> Decoded:
    """Greedy decoding of one window from ``prompt`` ([SOT, language, task], plus
    ``NO_TIMESTAMPS`` when ``timestamps`` is False) with the decoder's key-value cache.

    Args:
        model: a ``WhisperForConditionalGeneration``.
        encoder_outputs: the encoder's output for the window, (1, 1500, d_model).
        prompt: the start-of-transcript tokens.
        timestamps: generate ``<|t|>`` tokens around each segment (Whisper's timestamp mode).
        max_new_tokens: stop after this many tokens (a loop guard).
    """
    import torch

    suppress = torch.tensor(list(model.generation_config.suppress_tokens or []), dtype=torch.long)
    ids = torch.tensor([prompt], device=model.device)
    seq: list[int] = []
    logprobs: list[float] = []
    past, no_speech = None, 0.0
    with torch.inference_mode():
        for step in range(max_new_tokens + 1):
            out = model(
                encoder_outputs=encoder_outputs,
                decoder_input_ids=ids,
                cache=past,
                use_cache=True,
            )
            past = out.cache
            if step == 0:  # the SOT position's prediction: a language token or <|nocaptions|>
                no_speech = float(torch.softmax(out.logits[0, 0].double(), -1)[NO_SPEECH])
            logits = out.logits[0, -1].float().clone()  # (vocab,)
            apply_rules(logits, seq, timestamps, suppress, first=step == 0)
            token = int(torch.argmax(logits))
            logprobs.append(float(torch.log_softmax(logits.double(), -1)[token]))
            if token == EOT or step == max_new_tokens:
                break
            seq.append(token)
            ids = torch.tensor([[token]], device=model.device)
    return Decoded(seq, logprobs, no_speech)


def segments(tokens: list[int], duration: float) -> list[tuple[float, float, list[int]]]:
    """Split a timestamped decoding into ``(start, end, text tokens)`` (seconds from the
    window's start): a segment opens at a timestamp and closes at the next; one left open at
    the end closes at ``duration``; times are clipped to ``duration``; segments without text
    are dropped. Tokens decoded without timestamps are one segment over the whole window."""
    out: list[tuple[float, float, list[int]]] = []
    start: float | None = None
    text: list[int] = []
    for t in tokens:
        if t < TIMESTAMP_BEGIN:
            text.append(t)
            continue
        time = min((t - TIMESTAMP_BEGIN) * TIME_STEP, duration)
        if text:  # the end of the open segment
            out.append((start if start is not None else 0.0, time, text))
            text, start = [], None
        else:  # the start of the next (a second time without text in between replaces it)
            start = time
    if text:
        out.append((start if start is not None else 0.0, duration, text))
    return out
