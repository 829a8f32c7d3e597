"""Real pretrained models on selfattn against transformers' own ``sdpa``: the speed rows of the
models issue (SmolLM2 decode, prefill and a whole request; Whisper-base transcription; Gemma-3
long prefills with peak memory).

Both implementations run the same weights in the same process, interleaved round by round, and
every figure is a median over the rounds (ratios: sdpa's time over selfattn's, so > 1 means
selfattn is faster). For decode the time spent inside the attention function is measured too
(the function transformers calls is wrapped with a timer), so the table says what a step's time
is made of. Writes benchmarks/results/models.json and prints the README's table.

    python benchmarks/models.py             # every row (about 15 minutes on 2 cores)
    python benchmarks/models.py --quick     # short prompts, a smoke run
    python benchmarks/models.py --only smollm2 whisper gemma3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from selfattn.bench import peak_rss_bytes, reset_peak, rss_bytes
from selfattn.bench.machine import cpu_info
from selfattn.testing import torch_threads

RESULTS = Path(__file__).parent / "results" / "models.json"
IMPLS = ("selfattn", "sdpa")


@contextlib.contextmanager
def timed_attention(name: str) -> Iterator[list[float]]:
    """Wrap the attention function transformers calls for ``name``; yields the list the wrapper
    appends each call's seconds to."""
    from transformers import AttentionInterface

    mapping = AttentionInterface._global_mapping
    real = mapping[name]
    spent: list[float] = []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return out

    mapping[name] = timed
    try:
        yield spent
    finally:
        mapping[name] = real


def prompt_ids(tok, n: int) -> torch.Tensor:
    """``n`` tokens of real English text (Python's help texts, shipped with Python)."""
    from selfattn.trainer import load_corpus

    ids = tok(load_corpus()[: 20 * n], return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise RuntimeError(f"the corpus gave only {ids.shape[1]} tokens")
    return ids


def decode_step_ms(model, ids: torch.Tensor, steps: int, impl: str) -> tuple[float, float]:
    """Prefill ``ids``, then ``steps`` greedy decode steps with the KV cache: the median ms per
    step, and the median ms of it spent in the attention function."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        step_s, attn_s = [], []
        with timed_attention(impl) as spent:
            for _ in range(steps):
                spent.clear()
                t0 = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                step_s.append(time.perf_counter() - t0)
                attn_s.append(sum(spent))
    return statistics.median(step_s) * 1e3, statistics.median(attn_s) * 1e3


def bench_smollm2(quick: bool, rounds: int) -> list[dict]:
    from selfattn.pretrained import smollm2

    models = {impl: smollm2.load(attn_implementation=impl) for impl in IMPLS}
    tok = models["selfattn"][1]
    rows = []
    prompts = (32, 256) if quick else (32, 2048)
    steps = 8 if quick else 32
    for threads in (1, 2):
        for n in prompts:
            ids = prompt_ids(tok, n)
            got: dict[str, list] = {impl: [] for impl in IMPLS}
            with torch_threads(threads):
                for _ in range(rounds):
                    for impl in IMPLS:
                        got[impl].append(decode_step_ms(models[impl][0], ids, steps, impl))
            row = {"case": f"SmolLM2 decode after {n} tokens, {threads} thread(s)", "unit": "ms"}
            for impl in IMPLS:
                row[impl] = statistics.median(s for s, _ in got[impl])
                row[f"{impl}_attention"] = statistics.median(a for _, a in got[impl])
            row["ratio"] = row["sdpa"] / row["selfattn"]
            rows.append(row)
    n = 256 if quick else 2048
    ids = prompt_ids(tok, n)
    with torch_threads(1), torch.inference_mode():
        t = {impl: [] for impl in IMPLS}
        for _ in range(rounds):
            for impl in IMPLS:
                t0 = time.perf_counter()
                models[impl][0](input_ids=ids, use_cache=True)
                t[impl].append(time.perf_counter() - t0)
    row = {"case": f"SmolLM2 prefill of {n} tokens, 1 thread", "unit": "s"}
    row.update({impl: statistics.median(t[impl]) for impl in IMPLS})
    row["ratio"] = row["sdpa"] / row["selfattn"]
    rows.append(row)
    new = 16 if quick else 128
    with torch_threads(1), torch.inference_mode():
        t = {impl: [] for impl in IMPLS}
        tokens = {}
        for _ in range(max(1, rounds - 1)):
            for impl in IMPLS:
                model = models[impl][0]
                t0 = time.perf_counter()
                out = model.generate(
                    ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1
                )
                t[impl].append(time.perf_counter() - t0)
                tokens[impl] = out[0, n:].tolist()
    row = {"case": f"SmolLM2 request: {n}-token prompt + {new} new tokens, 1 thread", "unit": "s"}
    row.update({impl: statistics.median(t[impl]) for impl in IMPLS})
    row["ratio"] = row["sdpa"] / row["selfattn"]
    row["same_tokens"] = tokens["selfattn"] == tokens["sdpa"]
    rows.append(row)
    return rows


def bench_whisper(quick: bool, rounds: int) -> list[dict]:
    from selfattn.pretrained import audio, whisper

    text = (
        "Self attention lets every word of a sentence look at every other word. The model "
        "computes queries, keys and values, compares each query with every key, turns the "
        "scores into weights with a softmax, and mixes the values with those weights. Speech "
        "recognition models use the same idea to listen to a recording and write down the words."
    )
    if quick:
        text = text.split(". ")[0]
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp, "speech.wav")
        subprocess.run(["espeak-ng", "-v", "en", "-w", str(wav), text], check=True)
        samples = audio.read_audio(wav)
    seconds = samples.size / 16000
    models = {impl: whisper.load(attn_implementation=impl) for impl in IMPLS}
    t = {impl: [] for impl in IMPLS}
    texts = {}
    with torch_threads(1):
        for _ in range(rounds):
            for impl in IMPLS:
                got = whisper.transcribe(*models[impl], samples, language="en")
                t[impl].append(got.elapsed)
                texts[impl] = got.text
    row = {"case": f"Whisper-base transcription of {seconds:.0f} s of speech, 1 thread"}
    row["unit"] = "x real time"
    row.update({impl: seconds / statistics.median(t[impl]) for impl in IMPLS})
    row["ratio"] = row["selfattn"] / row["sdpa"]
    row["same_text"] = texts["selfattn"] == texts["sdpa"]
    return [row]


def bench_gemma3(quick: bool, rounds: int) -> list[dict]:
    from selfattn.pretrained import gemma3

    models = {impl: gemma3.load(attn_implementation=impl) for impl in IMPLS}
    tok = models["selfattn"][1]
    rows = []
    for n in (1024, 2048) if quick else (4096, 8192):
        ids = prompt_ids(tok, n)
        t = {impl: [] for impl in IMPLS}
        peak = {impl: [] for impl in IMPLS}
        with torch.inference_mode():
            for _ in range(rounds):
                for impl in IMPLS:
                    base = rss_bytes()
                    reset_peak()
                    t0 = time.perf_counter()
                    models[impl][0](input_ids=ids, use_cache=False, logits_to_keep=1)
                    t[impl].append(time.perf_counter() - t0)
                    peak[impl].append(peak_rss_bytes() - base)
        row = {"case": f"Gemma-3-270M prefill of {n} tokens, {torch.get_num_threads()} threads"}
        row["unit"] = "s"
        row.update({impl: statistics.median(t[impl]) for impl in IMPLS})
        row.update({f"{impl}_peak_mib": min(peak[impl]) / 2**20 for impl in IMPLS})
        row["ratio"] = row["sdpa"] / row["selfattn"]
        rows.append(row)
    return rows


TARGETS = {
    "SmolLM2 decode": ">= 1.0x",
    "SmolLM2 prefill": ">= 1.05x",
    "SmolLM2 request": ">= 1.0x",
    "Whisper-base": ">= 1.0x",
    "Gemma-3-270M prefill of 4096": ">= 1.3x, less memory",
    "Gemma-3-270M prefill of 8192": ">= 1.5x, less memory",
    "Gemma-3-270M prefill": "",
}


def _target(case: str) -> str:
    return next((t for k, t in TARGETS.items() if case.startswith(k)), "")


def table(rows: list[dict]) -> str:
    out = [
        "| case | selfattn | sdpa | selfattn vs sdpa | of which attention (selfattn / sdpa) "
        "| target |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        u = r["unit"]

        def fmt(x: float, u: str = u) -> str:
            return f"{x:.1f} ms" if u == "ms" else f"{x:.2f} {u}"

        extra = ""
        if "selfattn_attention" in r:
            extra = f"{r['selfattn_attention']:.1f} / {r['sdpa_attention']:.1f} ms"
        if "selfattn_peak_mib" in r:
            extra = f"peak {r['selfattn_peak_mib']:.0f} / {r['sdpa_peak_mib']:.0f} MiB"
        out.append(
            f"| {r['case']} | {fmt(r['selfattn'])} | {fmt(r['sdpa'])} | {r['ratio']:.2f}x | "
            f"{extra} | {_target(r['case'])} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short prompts (a smoke run)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row")
    ap.add_argument("--only", nargs="+", choices=["smollm2", "whisper", "gemma3"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    benches = {"smollm2": bench_smollm2, "whisper": bench_whisper, "gemma3": bench_gemma3}
    rows = []
    for name, fn in benches.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        got = fn(args.quick, rounds)
        rows.extend(got)
        print(f"{name} ({time.perf_counter() - t0:.0f} s):\n{table(got)}\n", flush=True)
    print(table(rows))
    if not args.quick:
        from selfattn.backends import BACKENDS

        meta = {
            "machine": platform.processor() or platform.machine(),
            "cpu": cpu_info(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "native": BACKENDS["native"].detail()
            if BACKENDS["native"].unavailable() is None
            else BACKENDS["native"].unavailable(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(args.out.read_text())["rows"] if args.out.exists() and args.only else []
        keep = [r for r in old if not any(r["case"] == n["case"] for n in rows)]
        args.out.write_text(json.dumps({"meta": meta, "rows": keep + rows}, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
