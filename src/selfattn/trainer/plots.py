"""The trainer's pictures room: the loss curve of a run and the attention maps of a trained
``selfattn.models`` model (drawn by :func:`selfattn.viz.write_pictures`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import index_list

__all__ = ["attention_maps", "plot_loss"]


@torch.no_grad()
def attention_maps(
    model: nn.Module,
    inputs: dict[str, Any],
    tokens: list[str],
    *,
    layers: list[int] | None = None,
    heads: Any = None,
    rows: Any = None,
):
    """Attention probabilities of a ``selfattn.models`` model (GPT, Encoder, ViT) on one input.

    Each chosen block's attention layer is run a second time with ``need_weights=True`` (its own
    code path: RoPE, masks, :func:`selfattn.attention_weights`), from a forward hook.

    Returns:
        :class:`selfattn.viz.AttentionMaps`.
    """
    from ..viz import AttentionMaps

    blocks = model.blocks
    chosen = list(range(len(blocks))) if layers is None else [x % len(blocks) for x in layers]
    captured: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(module, args, kwargs, output):
            if not kwargs.get("need_weights"):
                captured[i] = module(*args, **{**kwargs, "need_weights": True})[1][0]  # (H, N, Nk)

        return hook

    handles = [blocks[i].attn.register_forward_hook(hook_for(i), with_kwargs=True) for i in chosen]
    was_training = model.training
    model.eval()
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n_heads, n_rows = captured[chosen[0]].shape[:2]
    head_list = list(range(n_heads)) if heads is None else index_list(heads, n_heads, "heads")
    row_list = list(range(n_rows)) if rows is None else index_list(rows, n_rows, "rows")
    w = torch.stack([captured[i][head_list][:, row_list] for i in chosen])  # (L, H, R, Nk)
    return AttentionMaps(w.float().cpu().numpy(), tokens, chosen, head_list, row_list)


def plot_loss(
    path: str | Path,
    train_curve: list[list[float]],
    eval_curve: list[list[Any]],
    *,
    title: str,
    baseline: tuple[str, float] | None = None,
) -> Path:
    """Draw a run's curves into a 770 x 440 PNG (needs matplotlib).

    Args:
        path: the PNG.
        train_curve: ``[step, loss]`` pairs (drawn with a running mean when there are many).
        eval_curve: ``[step, metrics]`` pairs; ``val_loss``/``test_loss`` are drawn with the
            training loss, ``test_accuracy`` on a second axis at the right.
        title: the plot's title.
        baseline: ``(label, loss)`` drawn as a dashed line (e.g. the unigram baseline).

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    steps, losses = zip(*train_curve) if train_curve else ((), ())
    ax.plot(steps, losses, lw=0.7, alpha=0.6, label="train loss (per step)")
    if len(losses) >= 20:  # a running mean reads better than the noisy per-step loss
        k = max(5, len(losses) // 30)
        windows = [losses[max(0, i - k + 1) : i + 1] for i in range(len(losses))]
        smooth = [sum(w) / len(w) for w in windows]
        ax.plot(steps, smooth, lw=1.5, label=f"train loss (mean of {k})")
    for key in ("val_loss", "test_loss"):
        pts = [(s, m[key]) for s, m in eval_curve if key in m]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, label=key.replace("_", " "))
    if baseline is not None:
        ax.axhline(baseline[1], color="gray", ls="--", label=baseline[0])
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend = ax
    acc = [(s, m["test_accuracy"]) for s, m in eval_curve if "test_accuracy" in m]
    if acc:
        legend = ax.twinx()  # one legend, drawn above both axes' lines
        legend.plot(*zip(*acc), "s-", ms=2, color="tab:olive", label="test accuracy")
        legend.set_ylabel("test accuracy")
        legend.set_ylim(0.0, 1.0)
    handles = [h for a in dict.fromkeys([ax, legend]) for h in a.get_legend_handles_labels()[0]]
    legend.legend(handles=handles, loc="center right" if acc else "best")
    fig.savefig(path, dpi=110)
    return Path(path)
