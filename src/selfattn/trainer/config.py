"""The trainer's settings room: :class:`TrainConfig`, one training run of ``selfattn train``, and
the defaults of its two tasks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..checks import integer, real

__all__ = ["TASKS", "TrainConfig"]

TASKS = ("gpt", "vit")


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        task: "gpt" (character-level on ``pydoc_data.topics``) or "vit" (sklearn's digits).
        steps: total optimiser steps (a resumed run continues up to this number).
        batch_size: sequences (gpt) or images (vit) per step.
        lr: peak AdamW learning rate: linear warm-up over 5% of ``steps``, cosine decay to 10%.
        eval_every: steps between evaluations (and the last step).
        eval_batches: held-out batches of ``batch_size`` windows per evaluation (gpt; the vit
            task evaluates on the whole test split).
        seed: seeds the model, the batches and the split.
        device: "cpu" or "cuda".
        model: model sizes (defaults per task; the examples' models).
    """

    task: str = "gpt"
    steps: int = 300
    batch_size: int = 0  # 0: the task's default
    lr: float = 0.0  # 0: the task's default
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    device: str = "cpu"
    model: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with the task's defaults filled in; raises ValueError on a bad setting."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name in ("steps", "eval_every", "eval_batches"):
            value = getattr(self, name)
            try:
                integer(name, value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a positive int, got {value!r}") from None
        try:  # ValueError for every bad setting: the command prints it as one line
            integer("batch_size", self.batch_size, minimum=0)
            if real("lr", self.lr) < 0:
                raise ValueError(f"lr must be >= 0, got {self.lr}")
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        if self.task == "gpt":
            sizes = dict(seq_len=128, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2)
            batch, lr = 32, 3e-3
        else:
            sizes = dict(embed_dim=64, num_layers=4, num_heads=4)
            batch, lr = 64, 2e-3
        unknown = set(self.model) - set(sizes)
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)} for {self.task}")
        model = {**sizes, **self.model}
        return replace(self, batch_size=self.batch_size or batch, lr=self.lr or lr, model=model)
