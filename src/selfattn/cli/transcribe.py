"""``selfattn transcribe``: speech to text (or to English) with Whisper-base on selfattn, and the
cross-attention alignment drawn: each output token against audio time."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from selfattn.pretrained.whisper import SILENCE_DB

from .console import UsageError, out_dir

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["add_parser", "alignment_figure", "cmd_transcribe", "render"]


def add_parser(sub: Any) -> None:
    """Add ``transcribe`` to the subcommands ``sub``."""
    s = sub.add_parser(
        "transcribe",
        help="speech to text (or to English) with Whisper-base on selfattn",
        description="Transcribe a sound file with Whisper-base (the packaged CTranslate2 weights, "
        "converted once into a transformers folder) running attn_implementation='selfattn'. The "
        "audio is mixed down to mono and resampled to 16 kHz; longer than 30 s, it is cut into "
        "windows at quiet points. Only the result goes to standard output (the text, or --json, "
        "--srt, --vtt); progress and timing go to standard error, so 'selfattn transcribe a.wav "
        "> a.txt' keeps just the text. Silence (a window quieter than --silence-db, or one "
        "Whisper itself calls no speech) gives no text. --word-timestamps times each word from "
        "the cross-attention of Whisper's alignment heads by dynamic time warping. --show draws "
        "that alignment: which audio each output token was read from.",
    )
    s.add_argument("audio", metavar="AUDIO", help="a sound file (WAV; others through sox)")
    tasks = ["transcribe", "translate"]
    s.add_argument("--task", choices=tasks, default="transcribe", help="default: transcribe")
    lang = "spoken language, a code or name (default: detected from the first window with speech)"
    s.add_argument("--language", metavar="L", help=lang)
    attn = "attention implementation (default: selfattn)"
    s.add_argument("--attn", choices=["selfattn", "sdpa", "eager"], default="selfattn", help=attn)
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the result as JSON")
    fmt.add_argument("--srt", action="store_true", help="print SubRip subtitles (.srt)")
    fmt.add_argument("--vtt", action="store_true", help="print WebVTT subtitles (.vtt)")
    output = "write the text / JSON / subtitles to FILE instead of standard output"
    s.add_argument("-o", "--output", metavar="FILE", help=output)
    words = (
        "time each word (in --json; the cue times of --srt/--vtt, and a <time> before each "
        "word in --vtt)"
    )
    s.add_argument("--word-timestamps", action="store_true", help=words)
    per_cue = "with --word-timestamps and --srt/--vtt: at most N words per subtitle cue"
    s.add_argument("--max-words", type=int, metavar="N", help=per_cue)
    quiet = (
        "a 30-s window whose loudest 20 ms is below DB (dB full scale) is silence, not decoded "
        f"(default {SILENCE_DB:g})"
    )
    s.add_argument("--silence-db", type=float, default=SILENCE_DB, metavar="DB", help=quiet)
    s.add_argument("--show", metavar="DIR", help="write the alignment picture (PNG) into DIR")
    threads = "torch CPU threads (default: torch's; 1 is steadier if busy)"
    s.add_argument("--threads", type=int, metavar="T", help=threads)
    s.set_defaults(func=cmd_transcribe)


def alignment_figure(transcript: Any, title: str | None = None) -> Figure:
    """Tokens down, audio time across: the mean cross-attention of Whisper's alignment heads
    when each token was chosen, each row scaled to its maximum; a dot marks the peak."""
    from matplotlib.figure import Figure

    rows = [
        (w, p, t0)
        for w, p, (t0, _) in zip(transcript.alignment, transcript.pieces, transcript.windows)
    ]
    pieces = [p for _, ps, _ in rows for p in ps]
    frames = round(transcript.seconds / 0.02)
    grid = np.zeros((max(len(pieces), 1), max(frames, 1)), np.float32)
    r = 0
    for w, ps, t0 in rows:
        f0 = round(t0 / 0.02)
        n = min(w.shape[1], grid.shape[1] - f0)
        grid[r : r + len(ps), f0 : f0 + n] = w[:, :n]
        r += len(ps)
    grid /= np.maximum(grid.max(axis=1, keepdims=True), 1e-12)
    height = min(max(2.5, 0.22 * len(pieces) + 1.4), 30.0)
    fig = Figure(figsize=(min(max(6.0, 0.6 * transcript.seconds + 2.0), 24.0), height))
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot()
    extent = (0.0, grid.shape[1] * 0.02, grid.shape[0] - 0.5, -0.5)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", extent=extent, interpolation="nearest")
    if pieces:
        peaks = (np.argmax(grid, axis=1) + 0.5) * 0.02
        ax.plot(peaks, np.arange(len(pieces)), "o", color="white", ms=3, mec="black", mew=0.4)
        ax.set_yticks(range(len(pieces)), [repr(p)[1:-1] for p in pieces], fontsize=7)
    for t0, _ in transcript.windows[1:]:
        ax.axvline(t0, color="red", lw=0.8, ls="--")
    ax.set_xlabel("audio time (s)", fontsize=8)
    ax.set_ylabel("output token", fontsize=8)
    ax.set_title(title or "cross-attention alignment", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="attention / row max")
    return fig


def render(result: Any, info: dict[str, Any], args: argparse.Namespace) -> str:
    """What goes to standard output (or ``--output``): subtitles, JSON or the text (nothing at
    all for silence)."""
    from selfattn.pretrained.transcript import by_words, srt, vtt

    cues = by_words(result.segments, args.max_words) if args.max_words else result.segments
    if args.srt:
        return srt(cues)
    if args.vtt:
        return vtt(cues)
    if args.json:
        return json.dumps(info, ensure_ascii=False, indent=2) + "\n"
    return f"{result.text}\n" if result.text else ""


def cmd_transcribe(args: argparse.Namespace, con) -> int:
    """Transcribe (or translate) AUDIO; write the text, JSON or subtitles to standard output (or
    ``--output``) and the status lines to standard error; draw the alignment."""
    import torch
    from rich.console import Console

    from selfattn.pretrained import whisper
    from selfattn.pretrained.audio import read_audio

    from .explain import quiet_transformers

    err = Console(stderr=True, highlight=False)  # status and timing, never mixed with the text
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not -200 <= args.silence_db <= 0:
        raise UsageError(f"--silence-db must be in [-200, 0] dB full scale, got {args.silence_db}")
    if args.max_words is not None:
        if args.max_words < 1:
            raise UsageError(f"--max-words must be a positive integer, got {args.max_words}")
        if not (args.word_timestamps and (args.srt or args.vtt)):
            raise UsageError("--max-words needs --word-timestamps and --srt or --vtt")
    if args.language:
        whisper.language_code(args.language)  # a bad name fails before the model loads
    output = Path(args.output) if args.output else None
    if output is not None and (output.is_dir() or not output.parent.is_dir()):
        raise UsageError(f"--output {args.output!r}: not a file in an existing folder")
    show = out_dir(args.show) if args.show else None
    audio = read_audio(args.audio, whisper.SAMPLE_RATE)  # a one-line AudioError: exit 2
    quiet_transformers()
    t0 = time.perf_counter()
    with err.status(f"loading Whisper-base with attn_implementation={args.attn!r}"):
        model, processor = whisper.load(args.attn)
    loaded = time.perf_counter() - t0
    with err.status(f"{args.task} {audio.size / whisper.SAMPLE_RATE:.1f} s of audio"):
        result = whisper.transcribe(
            model,
            processor,
            audio,
            task=args.task,
            language=args.language,
            alignment=bool(show),
            word_timestamps=args.word_timestamps,
            silence_db=args.silence_db,
        )
    info = {**result.as_dict(), "attn": args.attn, "load_seconds": round(loaded, 3)}
    if show is not None:
        path = show / f"{Path(args.audio).stem}_alignment.png"
        title = f"{Path(args.audio).name}: {args.task}, {result.language}, attn={args.attn}"
        alignment_figure(result, title).savefig(path, dpi=120)
        info["alignment"] = str(path)
    text = render(result, info, args)
    if output is not None:
        output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if result.no_speech:
        err.print(f"no speech in {args.audio}", markup=False, soft_wrap=True)
    err.print(
        f"[dim]{result.language or '-'} · {args.task} · {result.seconds:.1f} s of audio in "
        f"{result.elapsed:.2f} s ({result.realtime_factor:.2f}x real time) · attn {args.attn} · "
        f"model loaded in {loaded:.1f} s[/]",
        soft_wrap=True,
    )
    if output is not None:
        err.print(f"written: {output}", markup=False, soft_wrap=True)
    if show is not None:
        err.print(f"alignment: {info['alignment']}", markup=False, soft_wrap=True)
    return 0
