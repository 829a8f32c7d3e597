"""Train a small character-level GPT on Python's own help texts (``pydoc_data.topics``).

Every Python installation carries these ~465k characters of reference documentation, so the
example needs no download. The last 10% of the text is held out for validation; the baseline to
beat is the unigram model (each character predicted from its training frequency alone).

    python examples/train_gpt.py --steps 1000 --threads 1 --out-dir examples/results

The data, the loop and the baseline are :mod:`selfattn.trainer`'s (``selfattn train gpt`` runs
the same loop with checkpoints and attention pictures); this script picks the model, samples
from it and writes ``<out_dir>/gpt_results.json`` and ``<out_dir>/gpt_loss.png``. ``train()``
returns the results it writes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selfattn.trainer import Run, TrainConfig, fit, plot_loss, torch_threads


def train(
    steps: int = 1000,
    out_dir: str | Path | None = "examples/results",
    *,
    batch_size: int = 16,
    seq_len: int = 128,
    embed_dim: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = 2,
    lr: float = 3e-3,
    eval_every: int = 100,
    eval_batches: int = 16,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    sample_chars: int = 300,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the GPT and return (and save, when ``out_dir`` is set) the results.

    Args:
        steps: optimisation steps.
        out_dir: where ``gpt_results.json`` and ``gpt_loss.png`` go; None saves nothing.
        batch_size, seq_len: each step sees ``batch_size`` windows of ``seq_len`` characters.
        embed_dim, num_layers, num_heads, num_kv_heads: the model (GQA with 2 key/value heads).
        lr: peak AdamW learning rate (linear warm-up, cosine decay to 10%).
        eval_every, eval_batches: validation schedule (fixed held-out batches).
        seed: seeds the model, the batches and the samples.
        device: "cpu" or "cuda".
        threads: torch CPU threads for the run (restored afterwards); torch's default when None.
        sample_chars: length of each generated sample.
        log: called with one progress line per evaluation (e.g. ``print``).

    Returns:
        dict with ``val_loss`` (final, nats/char), ``unigram_loss``, ``train_curve`` and
        ``val_curve`` ([step, loss] pairs), ``samples``, ``wall_time_s``, ``params``, ``config``.
    """
    t0 = time.perf_counter()
    sizes = {"seq_len": seq_len, "embed_dim": embed_dim, "num_layers": num_layers,
             "num_heads": num_heads, "num_kv_heads": num_kv_heads}  # fmt: skip
    cfg = TrainConfig(task="gpt", steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                      eval_every=eval_every, eval_batches=eval_batches, device=device,
                      model=sizes)  # fmt: skip

    def report(step: int, metrics: dict[str, float]) -> None:
        if log is not None:
            elapsed = time.perf_counter() - t0
            log(f"step {step:5d}/{steps}  val {metrics['val_loss']:.3f}  {elapsed:.0f}s")

    with torch_threads(threads):
        run = fit(cfg, on_eval=report)
        task, train_time = run.task, round(time.perf_counter() - t0, 1)
        results = {
            "task": "character-level GPT on pydoc_data.topics (last 10% held out)",
            "val_loss": run.final.get("val_loss", float("nan")),
            "unigram_loss": task.unigram_loss(),
            "train_curve": run.train_curve,
            "val_curve": [[s, m["val_loss"]] for s, m in run.eval_curve],
            "samples": [],
            "wall_time_s": train_time,
            "train_time_s": train_time,
            "params": run.model.num_params(),
            "config": {
                "steps": steps, "batch_size": batch_size, **sizes, "lr": lr, "seed": seed,
                "device": device, "vocab_size": len(task.chars),
                "train_chars": len(task.train_data), "val_chars": len(task.val_data),
                "torch": torch.__version__, "threads": run.threads,
            },
        }  # fmt: skip
        if out_dir is not None:
            save(results, run, out_dir)  # the curves are kept even if sampling fails

        gen = torch.Generator(device=device).manual_seed(seed)
        for prompt in ("The ", "A class ", "    def "):
            idx = task.encode(prompt)[None].to(device)  # (1, T)
            out = run.model.generate(idx, sample_chars, temperature=0.8, top_k=20, generator=gen)
            results["samples"].append(task.decode(out[0]))
    results["wall_time_s"] = round(time.perf_counter() - t0, 1)
    if out_dir is not None:
        save(results, run, out_dir)
    return results


def save(results: dict[str, Any], run: Run, out_dir: str | Path) -> None:
    """Write ``gpt_results.json`` and the loss curve ``gpt_loss.png`` (needs matplotlib)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpt_results.json").write_text(json.dumps(results, indent=1) + "\n")
    title = f"GPT on pydoc_data.topics: val {results['val_loss']:.3f} nats/char"
    plot_loss(out / "gpt_loss.png", run.train_curve, run.eval_curve, title=title,
              baseline=("unigram baseline", results["unigram_loss"]))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out-dir", default="examples/results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    res = train(args.steps, args.out_dir, device=args.device, seed=args.seed,
                threads=args.threads, log=print)  # fmt: skip
    print(f"validation loss {res['val_loss']:.3f} vs unigram {res['unigram_loss']:.3f} nats/char")
    for s in res["samples"]:
        print("---\n" + s)


if __name__ == "__main__":
    main()
