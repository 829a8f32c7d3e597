"""Train a small character-level GPT on Python's own help texts (``pydoc_data.topics``).

Every Python installation carries these ~465k characters of reference documentation, so the
example needs no download. The last 10% of the text is held out for validation; the baseline to
beat is the unigram model (each character predicted from its training frequency alone).

    python examples/train_gpt.py --steps 1000 --threads 1 --out-dir examples/results

``train()`` is importable (the ``selfattn train gpt`` command calls it) and returns the results
it also writes to ``<out_dir>/gpt_results.json`` and ``<out_dir>/gpt_loss.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selfattn.models import GPT

__all__ = ["load_corpus", "train", "unigram_loss"]


def load_corpus() -> str:
    """All ``pydoc_data.topics`` help texts, in sorted topic order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def unigram_loss(train_text: str, val_text: str) -> float:
    """Cross-entropy (nats/char) of ``val_text`` under the character frequencies of
    ``train_text`` (add-one smoothed over the characters of both)."""
    counts = Counter(train_text)
    alphabet = set(train_text) | set(val_text)
    total = len(train_text) + len(alphabet)
    val_counts = Counter(val_text)
    nll = -sum(c * math.log((counts[ch] + 1) / total) for ch, c in val_counts.items())
    return nll / len(val_text)


def _batch(
    data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
    x = torch.stack([data[s : s + seq_len] for s in starts.tolist()])  # (B, N)
    y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts.tolist()])  # next characters
    return x, y


@torch.no_grad()
def _evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    losses = [model(x, y)[1].item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


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
        threads: torch CPU threads for the run (restored afterwards); torch's default when
            None. On a busy machine 1 thread is often the fastest.
        sample_chars: length of each generated sample.
        log: called with one progress line per evaluation (e.g. ``print``).

    Returns:
        dict with ``val_loss`` (final, nats/char), ``unigram_loss``, ``train_curve`` and
        ``val_curve`` ([step, loss] pairs), ``samples``, ``wall_time_s``, ``params``, ``config``.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(
            steps,
            out_dir,
            batch_size=batch_size,
            seq_len=seq_len,
            embed_dim=embed_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            lr=lr,
            eval_every=eval_every,
            eval_batches=eval_batches,
            seed=seed,
            device=device,
            sample_chars=sample_chars,
            log=log,
        )
    finally:
        torch.set_num_threads(previous)


def _train(
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
    sample_chars: int = 300,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    text = load_corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    baseline = unigram_loss(text[:split], text[split:])

    model = GPT(
        len(chars), max_len=seq_len, embed_dim=embed_dim, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, positions="rope", device=device,
    )  # fmt: skip
    # weight decay on matrices only (not on norms, biases)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )  # fmt: skip
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(seed)
    val_gen = torch.Generator().manual_seed(seed + 1)
    val_batches = [
        tuple(t.to(device) for t in _batch(val_data, batch_size, seq_len, val_gen))
        for _ in range(eval_batches)
    ]
    train_curve: list[list[float]] = []
    val_curve: list[list[float]] = []
    running = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = (t.to(device) for t in _batch(train_data, batch_size, seq_len, gen))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        train_curve.append([step + 1, loss.item()])
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = _evaluate(model, val_batches)
            val_curve.append([step + 1, val])
            if log is not None:
                log(
                    f"step {step + 1:5d}/{steps}  train {running:.3f}  val {val:.3f}  "
                    f"(unigram {baseline:.3f})  {time.perf_counter() - t0:.0f}s"
                )
    train_time = time.perf_counter() - t0

    results = {
        "task": "character-level GPT on pydoc_data.topics (last 10% held out)",
        "val_loss": val_curve[-1][1] if val_curve else float("nan"),
        "unigram_loss": baseline,
        "train_curve": train_curve,
        "val_curve": val_curve,
        "samples": [],
        "wall_time_s": round(train_time, 1),
        "train_time_s": round(train_time, 1),
        "params": model.num_params(),
        "config": {
            "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
            "embed_dim": embed_dim, "num_layers": num_layers, "num_heads": num_heads,
            "num_kv_heads": num_kv_heads, "lr": lr, "seed": seed, "device": device,
            "vocab_size": len(chars), "train_chars": split, "val_chars": len(data) - split,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
        },
    }  # fmt: skip
    if out_dir is not None:
        save(results, out_dir)  # the curves are kept even if sampling fails

    sample_gen = torch.Generator(device=device).manual_seed(seed)
    for prompt in ("The ", "A class ", "    def "):
        idx = torch.tensor([[stoi[c] for c in prompt]], device=device)
        out = model.generate(idx, sample_chars, temperature=0.8, top_k=20, generator=sample_gen)
        results["samples"].append("".join(chars[i] for i in out[0].tolist()))
    results["wall_time_s"] = round(time.perf_counter() - t0, 1)
    if out_dir is not None:
        save(results, out_dir)
    return results


def save(results: dict[str, Any], out_dir: str | Path) -> None:
    """Write ``gpt_results.json`` and (with matplotlib) the loss curve ``gpt_loss.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpt_results.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional; the JSON has every number
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*results["train_curve"])
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="train (per step)")
    if results["val_curve"]:
        vs, vl = zip(*results["val_curve"])
        ax.plot(vs, vl, "o-", ms=3, label="validation")
    ax.axhline(results["unigram_loss"], color="gray", ls="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / character)")
    ax.set_title(f"GPT on pydoc_data.topics: val {results['val_loss']:.3f} nats/char")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gpt_loss.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out-dir", default="examples/results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    res = train(
        args.steps,
        args.out_dir,
        device=args.device,
        seed=args.seed,
        threads=args.threads,
        log=print,
    )
    print(f"validation loss {res['val_loss']:.3f} vs unigram {res['unigram_loss']:.3f} nats/char")
    for s in res["samples"]:
        print("---\n" + s)


if __name__ == "__main__":
    main()
