"""A consistency-style training step: MeanFlow (Geng et al., 2025) on a small selfattn
transformer, with ``torch.func.jvp`` through the whole network every step.

The data are sequences of 16 points in the plane, evenly spaced around a circle of radius 0.5
or 1 with a random phase: a token alone says little, the set of tokens says everything, so
the network must attend. MeanFlow learns the average velocity ``u(z, r, t)`` of the flow from
noise to data between times ``r`` and ``t``; its target needs the total derivative of ``u``
along the flow, ``du/dt = v . d_z u + d_t u``, which is one JVP of the network with tangents
``(v, 0, 1)``:

    u, dudt = torch.func.jvp(model, (z, r, t), (v, 0, 1))
    loss    = || u - stopgrad(v - (t - r) dudt) ||^2

Attention runs on ``auto`` (``native`` on an x86 CPU): its forward-mode rule gives ``dudt`` in
one streamed pass over the tiles. One step from noise (``x = e - u(e, 0, 1)``) then samples.

    python examples/train_meanflow.py --steps 300 --threads 1 --out-dir examples/results

Writes ``<out_dir>/meanflow_results.json`` (the loss curve, the one-step sample's ring error
before and after training) and ``<out_dir>/meanflow_loss.png``. ``train()`` returns the results.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import selfattn
from selfattn.trainer import torch_threads

TOKENS = 16
RADII = (0.5, 1.0)


def rings(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 16, 2) sequences: points evenly spaced on a circle of radius 0.5 or 1."""
    phase = torch.rand(batch, 1, generator=generator) * 2 * math.pi
    radius = torch.tensor(RADII)[torch.randint(0, 2, (batch, 1), generator=generator)]
    angle = phase + torch.arange(TOKENS) * (2 * math.pi / TOKENS)  # (batch, 16)
    return torch.stack([angle.cos(), angle.sin()], -1) * radius[..., None]


def ring_error(x: torch.Tensor) -> float:
    """How far samples (batch, 16, 2) are from the data: each point's distance to the nearer
    radius, plus the spread of the radii within a sequence, averaged."""
    norms = x.norm(dim=-1)  # (batch, 16)
    off = torch.stack([(norms - r).abs() for r in RADII]).amin(0).mean()
    return float(off + norms.std(-1).mean())


class MeanFlowNet(nn.Module):
    """u(z, r, t): tokens (B, 16, 2) and times (B,), (B,) -> average velocities (B, 16, 2)."""

    def __init__(self, embed_dim: int = 64, num_layers: int = 2, num_heads: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(2, embed_dim)
        self.pos = nn.Parameter(torch.randn(TOKENS, embed_dim) * 0.02)
        self.time = nn.Sequential(
            nn.Linear(2, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )
        self.blocks = nn.ModuleList(
            selfattn.TransformerBlock(embed_dim, num_heads) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.out = nn.Linear(embed_dim, 2)

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        times = torch.stack([t, t - r], -1)  # (B, 2): the interval's end and length
        h = self.inp(z) + self.pos + self.time(times)[:, None]  # (B, 16, E)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h))


def sample_times(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t) with r <= t, logit-normal; r = t (plain flow matching) for 75% of them."""
    a, b = (torch.randn(2, batch, generator=generator) * 1.0 - 0.4).sigmoid()
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = torch.rand(batch, generator=generator) < 0.75
    return torch.where(same, t, r), t


def plot_curve(path: Path, curve: list[list[float]]) -> Path:
    """The loss per step and its running mean of 10 into a PNG (needs matplotlib)."""
    from matplotlib.figure import Figure

    steps, losses = zip(*curve)
    smooth = [
        sum(losses[max(0, i - 9) : i + 1]) / len(losses[max(0, i - 9) : i + 1])
        for i in range(len(losses))
    ]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, losses, lw=0.7, alpha=0.6, label="loss (per step)")
    ax.plot(steps, smooth, lw=1.6, label="running mean of 10")
    ax.set_xlabel("step")
    ax.set_ylabel("MeanFlow loss (squared error to the JVP target)")
    ax.set_title(
        f"MeanFlow on rings: torch.func.jvp through a selfattn transformer ({len(curve)} steps)"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    return path


def train(
    steps: int = 300,
    out_dir: str | Path | None = "examples/results",
    *,
    batch_size: int = 64,
    embed_dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train MeanFlow for ``steps`` steps on CPU; returns (and writes) the results."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MeanFlowNet(embed_dim, num_layers, num_heads)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    noise = torch.randn(512, TOKENS, 2, generator=torch.Generator().manual_seed(seed + 1))

    def one_step_error() -> float:
        with torch.no_grad():
            ones = torch.ones(len(noise))
            return ring_error(noise - model(noise, torch.zeros_like(ones), ones))

    before = one_step_error()
    curve: list[list[float]] = []
    t0 = time.perf_counter()
    with torch_threads(threads):
        for step in range(1, steps + 1):
            x = rings(batch_size, gen)
            e = torch.randn(x.shape, generator=gen)
            r, t = sample_times(batch_size, gen)
            z = (1 - t)[:, None, None] * x + t[:, None, None] * e
            v = e - x  # the flow's instantaneous velocity
            u, dudt = torch.func.jvp(model, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
            target = (v - (t - r)[:, None, None] * dudt).detach()
            loss = (u - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append([step, loss.item()])
    seconds = time.perf_counter() - t0
    after = one_step_error()
    first = sum(x for _, x in curve[:20]) / len(curve[:20])
    last = sum(x for _, x in curve[-20:]) / len(curve[-20:])
    results = {
        "steps": steps,
        "batch_size": batch_size,
        "model": {"embed_dim": embed_dim, "num_layers": num_layers, "num_heads": num_heads},
        "attention_backend": "auto (native on an x86 CPU: its jvp rule under torch.func.jvp)",
        "loss_first20": first,
        "loss_last20": last,
        "one_step_ring_error_before": before,
        "one_step_ring_error_after": after,
        "seconds": seconds,
        "train_curve": curve,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "meanflow_results.json").write_text(json.dumps(results, indent=1) + "\n")
        plot_curve(out / "meanflow_loss.png", curve)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out-dir", default="examples/results")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    res = train(
        args.steps, args.out_dir, batch_size=args.batch_size, threads=args.threads, seed=args.seed
    )
    print(
        f"loss {res['loss_first20']:.4f} -> {res['loss_last20']:.4f}; one-step ring error "
        f"{res['one_step_ring_error_before']:.3f} -> {res['one_step_ring_error_after']:.3f} "
        f"({res['seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
