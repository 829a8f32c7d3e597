"""Accuracy of ``selfattn transcribe --word-timestamps`` on speech whose word starts are known.

Each word is spoken on its own by espeak-ng into its own WAV; its audible part is found by energy
(the first and last 5 ms whose level is within 30 dB of the word's loudest 5 ms) and cut out with
sox ``trim``; sox ``pad`` puts a known pause (200-600 ms, seeded) before it; sox joins the words.
So the true start of each word is the sum of the pauses and word lengths before it, and its true
end that plus its length. Whisper-base then transcribes the file with word timestamps (on
selfattn, one thread); its words are matched to the spoken ones (same letters, in order, by
difflib), and the absolute errors of the starts and ends are reported: median and worst, in ms.
Both the times ``--word-timestamps`` gives (DTW, then each word moved in to its sound) and
DTW's alone are measured. Writes benchmarks/results/word_timestamps.json (the CPU it ran on inside:
``selfattn.bench.machine.cpu_info``).

    python benchmarks/word_timestamps.py             # the 5 sentences (~40 words), ~2-3 min
    python benchmarks/word_timestamps.py --quick     # the first sentence only
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "word_timestamps.json"
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "please call me when you arrive at the station",
    "seven green apples fell from the tall tree",
    "she sells fresh bread every morning",
    "we should read one more chapter tonight",
]
PAUSES = (0.2, 0.6)  # seconds of silence before each word, drawn uniformly (seeded)
ONSET_DB = -30.0  # the audible part of a word: frames within 30 dB of its loudest frame


def _wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        rate, raw, width = w.getframerate(), w.readframes(w.getnframes()), w.getsampwidth()
    if width != 2 or rate <= 0:
        raise ValueError(f"{path}: expected 16-bit PCM, got {8 * width}-bit at {rate} Hz")
    return np.frombuffer(raw, "<i2").astype(np.float64) / 32768.0, rate


def audible(samples: np.ndarray, rate: int, frame: float = 0.005) -> tuple[int, int]:
    """``(first, end)`` samples of the audible part: from the first to the last 5-ms frame whose
    level is within :data:`ONSET_DB` of the loudest one."""
    hop = max(1, int(rate * frame))
    x = np.pad(samples, (0, -samples.size % hop))
    power = np.square(x).reshape(-1, hop).mean(axis=1)
    if power.max() <= 0:
        raise ValueError("a word without sound")
    loud = np.flatnonzero(power >= power.max() * 10 ** (ONSET_DB / 10))
    return int(loud[0] * hop), int(min((loud[-1] + 1) * hop, samples.size))


def build(words: list[str], out: Path, seed: int = 0, voice: str = "en", wpm: int = 160):
    """Speak ``words`` one by one into ``out`` (WAV) with known pauses; returns a list of
    ``(word, start, end)`` in seconds, the truth."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (make speech)")
    rng = np.random.default_rng(seed)
    truth, parts, t = [], [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, word in enumerate(words):
            raw, cut = Path(tmp, f"w{i}.wav"), Path(tmp, f"c{i}.wav")
            cmd = ["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(raw), word]
            subprocess.run(cmd, check=True)
            samples, rate = _wav(raw)
            first, end = audible(samples, rate)
            pause = round(float(rng.uniform(*PAUSES)) * rate)
            trim = ["trim", f"{first}s", f"{end - first}s", "pad", f"{pause}s", "0"]
            subprocess.run(["sox", str(raw), str(cut), *trim], check=True)
            t += pause / rate
            truth.append((word, t, t + (end - first) / rate))
            t += (end - first) / rate
            parts.append(str(cut))
        tail = Path(tmp, "tail.wav")  # half a second of silence after the last word
        subprocess.run(
            ["sox", "-n", "-r", str(rate), "-b", "16", "-c", "1", str(tail), "trim", "0", "0.5"],
            check=True,
        )
        subprocess.run(["sox", *parts, str(tail), str(out)], check=True)
    return truth


def _norm(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def errors(truth: list[tuple[str, float, float]], heard: list[dict]) -> list[dict]:
    """The heard words matched to the spoken ones (same letters, in order): for each match the
    word, the true and heard start and end, and the errors in ms."""
    a, b = [_norm(w) for w, _, _ in truth], [_norm(h["word"]) for h in heard]
    out = []
    for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            (word, s, e), h = truth[block.a + k], heard[block.b + k]
            out.append(
                {
                    "word": word,
                    "start": round(s, 3),
                    "heard_start": h["start"],
                    "start_error_ms": round(abs(h["start"] - s) * 1000, 1),
                    "end": round(e, 3),
                    "heard_end": h["end"],
                    "end_error_ms": round(abs(h["end"] - e) * 1000, 1),
                }
            )
    return out


def transcribe_words(model, processor, path: Path, audible: bool) -> dict:
    """Whisper-base on selfattn with word timestamps (English): the ``--json`` dict of
    ``selfattn transcribe --word-timestamps``; ``audible`` False keeps the raw DTW times."""
    from selfattn.pretrained import whisper
    from selfattn.pretrained.audio import read_audio

    got = whisper.transcribe(
        model,
        processor,
        read_audio(path),
        language="en",
        word_timestamps=True,
        audible_words=audible,
    )
    return got.as_dict()


def summary(matched: list[dict], spoken: int) -> dict:
    """Median and worst start / end errors over the matched words."""
    starts = [m["start_error_ms"] for m in matched]
    ends = [m["end_error_ms"] for m in matched]
    return {
        "words_spoken": spoken,
        "words_matched": len(matched),
        "start_error_ms_median": round(float(np.median(starts)), 1) if starts else None,
        "start_error_ms_worst": round(float(np.max(starts)), 1) if starts else None,
        "end_error_ms_median": round(float(np.median(ends)), 1) if ends else None,
        "end_error_ms_worst": round(float(np.max(ends)), 1) if ends else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the first sentence only")
    p.add_argument("--out", type=Path, default=RESULTS, help="the results JSON")
    args = p.parse_args()
    sentences = SENTENCES[:1] if args.quick else SENTENCES
    from selfattn.bench.machine import cpu_info
    from selfattn.pretrained import whisper
    from selfattn.testing import torch_threads

    model, processor = whisper.load("selfattn")
    rows, every = [], {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp, torch_threads(1):
        for i, sentence in enumerate(sentences):
            path = Path(tmp, f"sentence{i}.wav")
            truth = build(sentence.split(), path, seed=i)
            row = {"sentence": sentence}
            for audible in (True, False):
                got = transcribe_words(model, processor, path, audible)
                heard = [w for s in got["segments"] for w in s.get("words", [])]
                matched = errors(truth, heard)
                every[audible] += matched
                key = "audible" if audible else "dtw_only"
                row[key] = {"heard": got["text"], **summary(matched, len(truth))}
                row[key]["words"] = matched
                print(
                    f"{sentence!r} ({key}): heard {got['text']!r}; {summary(matched, len(truth))}"
                )
            rows.append(row)
    spoken = sum(len(s.split()) for s in sentences)
    result = {
        "what": "word-timestamp error of Whisper-base on selfattn (greedy, one thread) with "
        "word_timestamps=True on espeak-ng words joined by sox after known pauses; 'audible': "
        "as selfattn transcribe --word-timestamps gives them (DTW, then each word moved in to its "
        "sound), 'dtw_only': the alignment heads' DTW alone, as Whisper's own",
        "cpu": cpu_info(threads=1),
        "pauses_s": list(PAUSES),
        "onset_db": ONSET_DB,
        "audible": summary(every[True], spoken),
        "dtw_only": summary(every[False], spoken),
        "sentences": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "sentences"}, indent=2))


if __name__ == "__main__":
    main()
