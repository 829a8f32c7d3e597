"""The trainer's loop room: :func:`fit` (AdamW, warm-up and cosine decay, a checkpoint at every
evaluation, exact resume) and :func:`train`, what ``selfattn train`` runs: fit, then the results,
the loss curve and the trained model's attention pictures."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .plots import attention_maps, plot_loss
from .tasks import GptTask, VitTask, make_task

__all__ = ["Run", "fit", "train"]


@dataclass
class Run:
    """What :func:`fit` leaves behind.

    Attributes:
        config: the resolved :class:`TrainConfig`.
        task: the task's data (a :class:`GptTask` has the vocabulary: ``encode``/``decode``).
        model: the trained model (in eval mode).
        start_step: the step the run started from (0, or the checkpoint's with ``resume``).
        train_curve: ``[step, loss]`` for every step since 0 (a resumed run's included).
        eval_curve: ``[step, metrics]`` for every evaluation.
        wall_time_s: seconds the steps of this call took.
        threads: torch's CPU threads during the steps.
    """

    config: TrainConfig
    task: GptTask | VitTask
    model: nn.Module
    start_step: int
    train_curve: list[list[float]]
    eval_curve: list[list[Any]]
    wall_time_s: float
    threads: int

    @property
    def step(self) -> int:
        """The last step trained (``config.steps``, or ``start_step`` if that was beyond it)."""
        return max(self.start_step, self.config.steps)

    @property
    def final(self) -> dict[str, float]:
        """The last evaluation's metrics ({} when no step ran)."""
        return self.eval_curve[-1][1] if self.eval_curve else {}

    def state(self) -> dict[str, Any]:
        """The JSON-able state the checkpoints carry: config, step and the curves."""
        curves = {"train_curve": self.train_curve, "eval_curve": self.eval_curve}
        return {"config": asdict(self.config), "step": self.step, **curves}


def fit(
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    on_step: Callable[[int, float, float], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> Run:
    """The training loop: AdamW (weight decay 0.1 on matrices only, betas 0.9/0.95), linear
    warm-up over 5% of the steps then cosine decay to 10% of ``cfg.lr``, gradients clipped to
    norm 1, an evaluation every ``cfg.eval_every`` steps and at the last.

    Args:
        cfg: the run (see :class:`TrainConfig`).
        out_dir: when given, ``model.safetensors`` (weights; config and curves in its metadata)
            and ``optimizer.safetensors`` (AdamW moments and the batch generator) are rewritten
            there at every evaluation, so that an interrupted run can resume from the last one.
        resume: continue from the checkpoint in ``out_dir`` up to ``cfg.steps`` (the checkpoint's
            task and model must match ``cfg``). The learning-rate schedule spans ``cfg.steps``,
            so resuming with the same ``steps`` reproduces the uninterrupted run exactly.
        on_step: called as ``on_step(step, loss, tokens_per_second)`` after each step.
        on_eval: called as ``on_eval(step, metrics)`` after each evaluation.

    Returns:
        :class:`Run`: the trained model, its task and the curves.

    Raises:
        ValueError: bad settings, or ``resume`` with no or a mismatching checkpoint.
    """
    cfg = cfg.resolved()
    out = None if out_dir is None else Path(out_dir)
    if resume and out is None:
        raise ValueError("resume needs the out_dir that holds the checkpoint")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    task = make_task(cfg)
    model = task.build()
    # weight decay on matrices only (not on norms, biases)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    run = Run(cfg, task, model, 0, [], [], 0.0, torch.get_num_threads())
    if resume:
        if not has_checkpoint(out):
            raise ValueError(f"--resume: no checkpoint (model/optimizer.safetensors) in {out}")
        state = load_checkpoint(out, model, opt, gen)
        saved = state["config"]
        if saved["task"] != cfg.task or saved["model"] != cfg.model:
            raise ValueError(
                f"--resume: the checkpoint in {out} is {saved['task']} {saved['model']}, "
                f"not {cfg.task} {cfg.model}"
            )
        run.start_step = state["step"]
        run.train_curve, run.eval_curve = state["train_curve"], state["eval_curve"]
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    t0 = time.perf_counter()
    model.train()
    for step in range(run.start_step, cfg.steps):
        t_step = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = task.loss(model, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        run.train_curve.append([step + 1, value])
        if on_step is not None:
            on_step(step + 1, value, task.tokens_per_step / (time.perf_counter() - t_step))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            metrics = task.evaluate(model)
            model.train()
            run.eval_curve.append([step + 1, metrics])
            if out is not None:  # a checkpoint at every evaluation: resume from the last one
                save_checkpoint(out, model, opt, gen, {**run.state(), "step": step + 1})
            if on_eval is not None:
                on_eval(step + 1, metrics)
    model.eval()
    run.wall_time_s = time.perf_counter() - t0
    return run


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    on_step: Callable[[int, float, float], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train with checkpoints (:func:`fit`), then write the results, the loss curve and the
    trained model's attention pictures.

    Writes into ``out_dir``: ``model.safetensors`` and ``optimizer.safetensors`` (the checkpoint
    of the last evaluation, see :func:`fit`), ``results.json``, ``loss.png`` and the attention
    pictures (``attention_grid.png``, ``head_L*_H*.png``, ``rollout.png``, ``head_view.html``).

    Args:
        cfg: the run (see :class:`TrainConfig`).
        out_dir: the folder.
        resume, on_step, on_eval: as for :func:`fit`.

    Returns:
        The results (also in ``results.json``): ``config``, ``start_step``, ``train_curve``,
        ``eval_curve``, the final metrics, ``params``, ``wall_time_s`` and the files written.

    Raises:
        ValueError: bad settings, or ``resume`` with no or a mismatching checkpoint.
    """
    from ..viz import write_pictures

    out = Path(out_dir)
    run = fit(cfg, out, resume=resume, on_step=on_step, on_eval=on_eval)
    state = run.state()
    files = {"model": out / "model.safetensors", "optimizer": out / "optimizer.safetensors"}
    title = f"{run.config.task}: {run.step} steps"
    files["loss"] = plot_loss(out / "loss.png", run.train_curve, run.eval_curve, title=title)
    inputs, tokens = run.task.picture_input()
    maps = attention_maps(run.model, inputs, tokens)
    title = f"{run.config.task} after {run.step} steps"
    files.update(write_pictures(maps, out, title=title))
    results = {
        **state,
        "start_step": run.start_step,
        "final": run.final,
        "params": sum(p.numel() for p in run.model.parameters()),
        "wall_time_s": round(run.wall_time_s, 2),
        "torch": torch.__version__,
        "threads": run.threads,
        "files": {k: str(v) for k, v in files.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results
