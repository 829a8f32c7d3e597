"""``selfattn transcribe`` through the real command (a subprocess): only the result on standard
output, status on standard error; SubRip and WebVTT subtitles with word timestamps; silence
reported as silence; word-timestamp accuracy on espeak-ng words joined after known pauses."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from selfattn.pretrained import audio as sa_audio

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "Speech recognition turns spoken words into written text."


def _needs_whisper():
    pytest.importorskip("transformers")
    from selfattn.pretrained import whisper

    try:
        whisper.package_folder()
    except ValueError as exc:  # names the pip command
        pytest.skip(str(exc))
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make speech)")


def transcribe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "selfattn", "transcribe", *args, "--threads", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    _needs_whisper()
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-s", "160", "-w", str(path), SENTENCE], check=True)
    return path


def test_stdout_holds_only_the_text(speech):
    """``selfattn transcribe a.wav > a.txt`` keeps just the transcript: the model-loaded and
    speed lines go to standard error (they went to standard output before)."""
    res = transcribe(str(speech))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1 and res.stdout.endswith("\n")
    assert "model loaded" not in res.stdout and "real time" not in res.stdout
    assert "recognition" in res.stdout.lower() and "written text" in res.stdout.lower()
    assert "model loaded in" in res.stderr and "x real time" in res.stderr


def test_srt_to_a_file_and_vtt_with_word_times(speech, tmp_path):
    out = tmp_path / "speech.srt"
    res = transcribe(str(speech), "--srt", "--word-timestamps", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and f"written: {out}" in res.stderr
    cues = out.read_text().strip().split("\n\n")
    assert cues and all(c.split("\n")[0] == str(i) for i, c in enumerate(cues, 1))
    span = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})$")
    for cue in cues:
        h0, m0, s0, ms0, h1, m1, s1, ms1 = map(int, span.match(cue.split("\n")[1]).groups())
        start, end = h0 * 3600 + m0 * 60 + s0 + ms0 / 1000, h1 * 3600 + m1 * 60 + s1 + ms1 / 1000
        assert 0 <= start < end <= 3.9
    res = transcribe(str(speech), "--vtt", "--word-timestamps")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("WEBVTT\n\n")
    inline = re.findall(r"<(\d\d:\d\d:\d\d\.\d{3})>", res.stdout)
    assert len(inline) >= 5 and inline == sorted(inline)  # a time before each word but the first
    res = transcribe(str(speech), "--srt", "--word-timestamps", "--max-words", "3")
    assert res.returncode == 0, res.stderr
    cues = res.stdout.strip().split("\n\n")
    assert len(cues) >= 3 and all(len(c.split("\n")[2].split()) <= 3 for c in cues)


def test_json_words_and_segments(speech):
    res = transcribe(str(speech), "--json", "--word-timestamps")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["no_speech"] is False and info["language"] == "en"
    words = [w for s in info["segments"] for w in s["words"]]
    assert len(words) >= 7
    starts = [w["start"] for w in words]
    assert starts == sorted(starts) and all(w["start"] <= w["end"] for w in words)
    assert 0 < words[-1]["end"] <= info["audio_seconds"]
    assert all(0 <= w["probability"] <= 1 for w in words)
    joined = "".join(w["word"] for w in words).strip()
    assert joined == " ".join(s["text"].strip() for s in info["segments"])


@pytest.mark.parametrize("noise", [0.0, 3e-4], ids=["silent", "near-silent-noise"])
def test_silence_is_no_speech_not_you(tmp_path, noise):
    """A silent WAV (and one of noise at -70 dB full scale) gives no text at all, "no speech" on
    standard error and ``no_speech: true`` in --json; Whisper-base says " you" to both."""
    _needs_whisper()
    rng = np.random.default_rng(0)
    path = _write_wav(tmp_path / "quiet.wav", noise * rng.standard_normal(3 * 16000))
    res = transcribe(str(path))
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and "no speech" in res.stderr
    res = transcribe(str(path), "--json")
    info = json.loads(res.stdout)
    assert info["text"] == "" and info["no_speech"] is True and info["segments"] == []
    res = transcribe(str(path), "--srt")
    assert res.returncode == 0 and res.stdout == ""


def test_whisper_no_speech_rule_drops_loud_noise():
    """Noise well above the energy gate (-26 dB): Whisper's own no-speech probability and the
    low log-probability of what it would write mark it as silence."""
    _needs_whisper()
    from selfattn.pretrained import whisper
    from selfattn.testing import torch_threads

    noise = (0.05 * np.random.default_rng(0).standard_normal(3 * 16000)).astype(np.float32)
    assert sa_audio.loudest_db(noise) > whisper.SILENCE_DB
    with torch_threads(1):
        model, proc = whisper.load()
        got = whisper.transcribe(model, proc, noise)
        zeros = whisper.transcribe(model, proc, np.zeros(16000, np.float32), silence_db=None)
    assert got.text == "" and got.no_speech and got.segments == []
    assert zeros.tokens[0], "digital silence without the energy gate: Whisper writes something"


def test_bad_output_and_silence_options_are_one_line(tmp_path):
    pytest.importorskip("transformers")
    wav = _write_wav(tmp_path / "a.wav", np.zeros(1600))
    res = transcribe(str(wav), "-o", str(tmp_path / "missing" / "a.srt"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--output" in res.stderr
    res = transcribe(str(wav), "--silence-db", "3")
    assert res.returncode == 2 and "--silence-db" in res.stderr
    res = transcribe(str(wav), "--srt", "--vtt")
    assert res.returncode == 2 and "not allowed with" in res.stderr
    res = transcribe(str(wav), "--srt", "--max-words", "3")
    assert res.returncode == 2 and "--max-words needs --word-timestamps" in res.stderr


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "wt_bench", ROOT / "benchmarks/word_timestamps.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_word_start_error_on_known_pauses(tmp_path):
    """Words spoken one by one and joined after known pauses: the median error of the word
    starts that ``--word-timestamps`` gives is below 100 ms (measured ~6 ms; DTW alone ~470)."""
    _needs_whisper()
    bench = _benchmark()
    path = tmp_path / "known.wav"
    truth = bench.build(["please", "call", "me", "when", "you", "arrive"], path, seed=3)
    res = transcribe(str(path), "--json", "--word-timestamps", "--language", "en")
    assert res.returncode == 0, res.stderr
    heard = [w for s in json.loads(res.stdout)["segments"] for w in s["words"]]
    matched = bench.errors(truth, heard)
    assert len(matched) >= 4, (truth, heard)
    errors = [m["start_error_ms"] for m in matched]
    print(f"\nword start errors (ms): {errors}")
    assert np.median(errors) < 100 and max(errors) < 400


@pytest.mark.slow
def test_language_detected_in_noise_is_not_kept(tmp_path):
    """22 s of loud noise (silence by Whisper's no-speech rule), then German: the language is
    detected again on the speech, not kept from the noise (which Whisper-base called 'nn')."""
    _needs_whisper()
    from selfattn.pretrained import whisper
    from selfattn.testing import torch_threads

    path = tmp_path / "de.wav"
    text = "Ich habe einen Hund und eine Katze. Das Haus ist groß."
    subprocess.run(["espeak-ng", "-v", "de", "-s", "150", "-w", str(path), text], check=True)
    speech = sa_audio.read_audio(path)
    noise = 0.05 * np.random.default_rng(0).standard_normal(22 * 16000)
    samples = np.concatenate([noise, np.zeros(5 * 16000), speech]).astype(np.float32)  # > 30 s
    with torch_threads(1):
        got = whisper.transcribe(*whisper.load(), samples)
    assert len(got.windows) == 2 and not got.tokens[0] and got.tokens[1]
    assert got.language == "de", (got.language, got.text)
    assert "katze" in got.text.lower()
