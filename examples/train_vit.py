"""Train a small Vision Transformer on scikit-learn's bundled 8x8 handwritten digits.

1797 images ship inside scikit-learn, so nothing is downloaded. Each 8x8 image becomes 16 patches
of 2x2 pixels plus a class token; 20% of the images (stratified) are held out for testing.

    python examples/train_vit.py --epochs 60 --out-dir examples/results

``train()`` is importable (the ``selfattn train vit`` command calls it) and returns the results
it also writes to ``<out_dir>/vit_results.json`` and ``<out_dir>/vit_loss.png``.
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
import torch.nn.functional as F

from selfattn.models import ViT

__all__ = ["load_digits", "train"]


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: float images (N, 1, 8, 8) in [0, 1], int labels."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=seed, stratify=digits.target
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Augmentation: move each image by up to one pixel in each direction (zero fill)."""
    padded = F.pad(x, (1, 1, 1, 1))  # (B, 1, 10, 10)
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=gen).tolist()
    return torch.stack([padded[i, :, a : a + 8, b : b + 8] for i, (a, b) in enumerate(zip(dy, dx))])


@torch.no_grad()
def _accuracy(model: ViT, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return (logits.argmax(-1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


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
        epochs: passes over the 1437 training images.
        out_dir: where ``vit_results.json`` and ``vit_loss.png`` go; None saves nothing.
        batch_size: images per step.
        embed_dim, num_layers, num_heads: the model (patch 2 -> 16 patches + class token).
        lr: peak AdamW learning rate (linear warm-up, cosine decay).
        seed: seeds the split, the model and the batches.
        device: "cpu" or "cuda".
        threads: torch CPU threads for the run (restored afterwards); torch's default when
            None. On a busy machine 1 thread is often the fastest.
        log: called with one progress line per epoch (e.g. ``print``).

    Returns:
        dict with ``test_accuracy``, ``train_curve`` ([step, loss]), ``test_curve``
        ([epoch, accuracy, loss]), ``wall_time_s``, ``params``, ``config``.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(
            epochs,
            out_dir,
            batch_size=batch_size,
            embed_dim=embed_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            lr=lr,
            seed=seed,
            device=device,
            log=log,
        )
    finally:
        torch.set_num_threads(previous)


def _train(
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
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    x_test, y_test = x_test.to(device), y_test.to(device)
    model = ViT(
        image_size=8, patch_size=2, in_channels=1, num_classes=10, embed_dim=embed_dim,
        num_layers=num_layers, num_heads=num_heads, mlp="swiglu", device=device,
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(y_train) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    gen = torch.Generator().manual_seed(seed)
    train_curve: list[list[float]] = []
    test_curve: list[list[float]] = []
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            xb = _shift(x_train[idx], gen).to(device)
            loss = F.cross_entropy(model(xb), y_train[idx].to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            train_curve.append([step, loss.item()])
        acc, test_loss = _accuracy(model, x_test, y_test)
        test_curve.append([epoch + 1, acc, test_loss])
        if log is not None:
            log(
                f"epoch {epoch + 1:3d}/{epochs}  train loss {loss.item():.3f}  "
                f"test acc {acc:.4f}  {time.perf_counter() - t0:.0f}s"
            )
    results = {
        "task": "ViT on scikit-learn 8x8 digits (stratified 80/20 split)",
        "test_accuracy": test_curve[-1][1] if test_curve else float("nan"),
        "test_images": len(y_test),
        "train_curve": train_curve,
        "test_curve": test_curve,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "config": {
            "epochs": epochs, "batch_size": batch_size, "embed_dim": embed_dim,
            "num_layers": num_layers, "num_heads": num_heads, "lr": lr, "seed": seed,
            "device": device, "patch_size": 2, "mlp": "swiglu",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
        },
    }  # fmt: skip
    if out_dir is not None:
        save(results, out_dir)
    return results


def save(results: dict[str, Any], out_dir: str | Path) -> None:
    """Write ``vit_results.json`` and (with matplotlib) ``vit_loss.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vit_results.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional; the JSON has every number
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps, losses = zip(*results["train_curve"])
    ax1.plot(steps, losses, lw=0.6, alpha=0.6, label="train (label-smoothed)")
    per_epoch = len(steps) / max(1, len(results["test_curve"]))
    epochs, accs, test_losses = zip(*results["test_curve"])
    ax1.plot([e * per_epoch for e in epochs], test_losses, "o-", ms=2, label="test")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, accs, "o-", ms=2)
    ax2.axhline(0.95, color="gray", ls="--", label="95%")
    ax2.set_ylim(0.5, 1.0)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy")
    ax2.set_title(f"ViT on 8x8 digits: {results['test_accuracy']:.2%}")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "vit_loss.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out-dir", default="examples/results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    res = train(
        args.epochs,
        args.out_dir,
        device=args.device,
        seed=args.seed,
        threads=args.threads,
        log=print,
    )
    print(f"test accuracy {res['test_accuracy']:.2%} on {res['test_images']} images")


if __name__ == "__main__":
    main()
