"""Train a small Vision Transformer on scikit-learn's bundled 8x8 handwritten digits.

1797 images ship inside scikit-learn, so nothing is downloaded. Each 8x8 image becomes 16 patches
of 2x2 pixels plus a class token; 20% of the images (stratified) are held out for testing.

    python examples/train_vit.py --epochs 60 --threads 1 --out-dir examples/results

The data, the augmentation and the loop are :mod:`selfattn.trainer`'s (``selfattn train vit``
runs the same loop with checkpoints and attention pictures); this script picks the model, counts
the steps in epochs and writes ``<out_dir>/vit_results.json`` and ``<out_dir>/vit_loss.png``.
``train()`` returns the results it writes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selfattn.trainer import TrainConfig, fit, load_digits, plot_loss, torch_threads


def train(
    epochs: int = 60,
    out_dir: str | Path | None = "examples/results",
    *,
    batch_size: int = 64,
    embed_dim: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the ViT and return (and save, when ``out_dir`` is set) the results.

    Args:
        epochs: the run's length in passes' worth of the 1437 training images (each step draws
            ``batch_size`` of them at random); the test split is evaluated once per epoch.
        out_dir: where ``vit_results.json`` and ``vit_loss.png`` go; None saves nothing.
        batch_size: images per step.
        embed_dim, num_layers, num_heads: the model (patch 2 -> 16 patches + class token).
        lr: peak AdamW learning rate (linear warm-up, cosine decay to 10%).
        seed: seeds the split, the model and the batches.
        device: "cpu" or "cuda".
        threads: torch CPU threads for the run (restored afterwards); torch's default when None.
        log: called with one progress line per epoch (e.g. ``print``).

    Returns:
        dict with ``test_accuracy``, ``train_curve`` ([step, loss]), ``test_curve``
        ([epoch, accuracy, loss]), ``wall_time_s``, ``params``, ``config``.
    """
    t0 = time.perf_counter()
    per_epoch = math.ceil(len(load_digits(seed)[1]) / batch_size)  # steps
    sizes = {"embed_dim": embed_dim, "num_layers": num_layers, "num_heads": num_heads}
    cfg = TrainConfig(task="vit", steps=epochs * per_epoch, batch_size=batch_size, lr=lr,
                      eval_every=per_epoch, seed=seed, device=device, model=sizes)  # fmt: skip

    def report(step: int, metrics: dict[str, float]) -> None:
        if log is not None:
            log(f"epoch {step // per_epoch:3d}/{epochs}  test acc {metrics['test_accuracy']:.4f}"
                f"  {time.perf_counter() - t0:.0f}s")  # fmt: skip

    with torch_threads(threads):
        run = fit(cfg, on_eval=report)
    test_curve = [[s // per_epoch, m["test_accuracy"], m["test_loss"]] for s, m in run.eval_curve]
    results = {
        "task": "ViT on scikit-learn 8x8 digits (stratified 80/20 split)",
        "test_accuracy": run.final.get("test_accuracy", float("nan")),
        "test_images": len(run.task.y_test),
        "train_curve": run.train_curve,
        "test_curve": test_curve,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "params": sum(p.numel() for p in run.model.parameters()),
        "config": {
            "epochs": epochs, "steps": cfg.steps, "batch_size": batch_size, **sizes, "lr": lr,
            "seed": seed, "device": device, "patch_size": 2, "mlp": "swiglu",
            "torch": torch.__version__, "threads": run.threads,
        },
    }  # fmt: skip
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vit_results.json").write_text(json.dumps(results, indent=1) + "\n")
        title = f"ViT on 8x8 digits: {results['test_accuracy']:.2%} test accuracy"
        plot_loss(out / "vit_loss.png", run.train_curve, run.eval_curve, title=title)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out-dir", default="examples/results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    res = train(args.epochs, args.out_dir, device=args.device, seed=args.seed,
                threads=args.threads, log=print)  # fmt: skip
    print(f"test accuracy {res['test_accuracy']:.2%} on {res['test_images']} images")


if __name__ == "__main__":
    main()
