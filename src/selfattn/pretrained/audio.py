"""The audio room: a sound file as 16 kHz mono float32 samples (WAV through the standard library,
other formats through soundfile or sox when present), mixed down and resampled."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

__all__ = ["AudioError", "loudest_db", "read_audio", "resample", "to_mono", "windows"]


class AudioError(ValueError):
    """A file that is not audio this module can read (the message names the file)."""


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,) float32: the mean of the channels."""
    x = np.asarray(samples, dtype=np.float32)
    return x if x.ndim == 1 else x.mean(axis=1, dtype=np.float32)


def resample(samples: np.ndarray, rate: int, new_rate: int, *, zeros: int = 6) -> np.ndarray:
    """Band-limited resampling of mono ``samples`` from ``rate`` to ``new_rate`` Hz.

    Polyphase windowed-sinc interpolation: with ``p / q`` the reduced ratio ``new_rate / rate``,
    each of the ``p`` output phases is one FIR filter (a sinc cut at 99% of the lower Nyquist
    frequency, ``zeros`` zero crossings each side, a Hann window) run with stride ``q``.
    """
    x = np.asarray(samples, dtype=np.float32)
    if rate == new_rate or x.size == 0:
        return x
    if rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {rate} -> {new_rate}")
    import torch

    g = math.gcd(rate, new_rate)
    q, p = rate // g, new_rate // g  # q input samples -> p output samples
    cutoff = min(p, q) * 0.99  # in units where one input sample is 1/q
    width = math.ceil(zeros * q / cutoff)
    taps = torch.arange(-width, width + q, dtype=torch.float64) / q  # input times, in q-samples
    phase = -torch.arange(p, dtype=torch.float64)[:, None] / p  # output time of each phase
    t = ((phase + taps[None]) * cutoff).clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / (2 * zeros)) ** 2
    kernel = torch.special.sinc(t) * window * (cutoff / q)
    xt = torch.from_numpy(x).to(torch.float64)[None, None]
    xt = torch.nn.functional.pad(xt, (width, width + q))
    y = torch.nn.functional.conv1d(xt, kernel[:, None], stride=q)  # (1, p, blocks)
    n_out = math.ceil(p * x.size / q)
    return y[0].t().reshape(-1)[:n_out].to(torch.float32).numpy()


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    elif width in (2, 4):
        ints = np.frombuffer(raw, f"<i{width}")
        x = (ints / float(1 << (8 * width - 1))).astype(np.float32)
    else:
        raise AudioError(f"{path}: {8 * width}-bit WAV samples are not supported")
    return x.reshape(-1, channels), rate


def _read_soundfile(path: Path) -> tuple[np.ndarray, int] | None:
    try:
        import soundfile
    except ImportError:
        return None
    try:
        x, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception:  # soundfile raises its own LibsndfileError (a RuntimeError) on non-audio
        return None
    return x, int(rate)


def _read_sox(path: Path) -> tuple[np.ndarray, int] | None:
    """Decode with sox at the file's own rate and channels (resampling and mixing down stay
    here, so every format goes through the same filter)."""
    sox = shutil.which("sox")
    if sox is None:
        return None

    def run(*args: str) -> bytes | None:
        try:
            done = subprocess.run([sox, *args], capture_output=True, check=False, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    rate_text, channels_text = run("--i", "-r", str(path)), run("--i", "-c", str(path))
    try:
        rate, channels = int(float(rate_text or b"")), int(channels_text or b"")
    except ValueError:
        return None
    raw = run("-V1", str(path), "-t", "raw", "-e", "floating-point", "-b", "32", "-L", "-")
    if raw is None or rate <= 0 or channels <= 0:
        return None
    samples = np.frombuffer(raw, "<f4")
    return samples[: samples.size // channels * channels].reshape(-1, channels), rate


def read_audio(path: str | os.PathLike, rate: int = 16_000) -> np.ndarray:
    """The samples of a sound file as mono float32 at ``rate`` Hz, in [-1, 1].

    PCM WAV (8/16/24/32-bit) is read with the standard library's ``wave``; anything else (float
    WAV, FLAC, MP3, ...) with ``soundfile`` or ``sox`` when installed. Stereo is mixed down
    (the mean of the channels); other rates are resampled with :func:`resample`.

    Raises:
        AudioError: the file is missing, not audio, or holds no samples.
    """
    p = Path(path)
    if not p.is_file():
        raise AudioError(f"{p}: no such file")
    try:
        got: tuple[np.ndarray, int] | None = _read_wav(p)
    except (wave.Error, EOFError, ValueError) as exc:
        if isinstance(exc, AudioError):
            raise
        got = _read_soundfile(p) or _read_sox(p)
        if got is None:
            what = f"not a WAV file ({exc})" if isinstance(exc, wave.Error) else "a broken WAV"
            raise AudioError(
                f"{p}: not audio this can read: {what}, and neither soundfile nor sox could "
                "decode it"
            ) from None
    samples, file_rate = got
    if samples.size == 0:
        raise AudioError(f"{p}: the file holds no audio samples")
    return resample(to_mono(samples), file_rate, rate)


def windows(samples: np.ndarray, rate: int, seconds: float = 30) -> list[tuple[int, int]]:
    """``(start, end)`` sample ranges of at most ``seconds`` covering ``samples``; each one that
    is cut ends at the quietest 0.1 s of its last third (so that a cut falls between words)."""
    size, hop, tail, out, start = int(seconds * rate), rate // 10, int(seconds * rate) // 3, [], 0
    while len(samples) - start > size:
        end = start + size - tail
        seg = np.asarray(samples[end : end + tail // hop * hop], np.float32)
        end += int(np.argmin(np.square(seg).reshape(-1, hop).mean(axis=1))) * hop + hop // 2
        out.append((start, end))
        start = end
    out.append((start, len(samples)))
    return out


def loudest_db(samples: np.ndarray, rate: int = 16_000, frame_seconds: float = 0.02) -> float:
    """The level of the loudest ``frame_seconds`` of ``samples`` (1-D, full scale 1.0): the
    root mean square of each frame in dB relative to full scale (a full-scale square wave is
    0 dB, a full-scale sine -3 dB, 16-bit digital silence -inf)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"samples must be a non-empty 1-D array, got shape {x.shape}")
    hop = max(1, int(rate * frame_seconds))
    x = np.pad(x, (0, -x.size % hop))
    power = np.square(x).reshape(-1, hop).mean(axis=1).max()
    return float(10 * np.log10(power)) if power > 0 else float("-inf")
