"""The trainer's tasks room: :class:`GptTask` (next character of Python's help texts) and
:class:`VitTask` (8x8 digits), each with its data, model, loss, evaluation and picture input."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data import char_ids, load_corpus, load_digits, random_windows, shift_images, unigram_loss

__all__ = ["GptTask", "VitTask", "make_task"]


class GptTask:
    """Next-character prediction on :func:`load_corpus`; the last 10% held out.

    Attributes:
        chars: the vocabulary (sorted characters); ``encode``/``decode`` map to and from ids.
        train_data, val_data: the two parts of the text as ids (T,).
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.text = load_corpus()
        data, self.chars = char_ids(self.text)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.split = int(0.9 * len(data))
        self.train_data, self.val_data = data[: self.split], data[self.split :]
        self.cfg = cfg
        self.seq_len = cfg.model["seq_len"]
        self.tokens_per_step = cfg.batch_size * self.seq_len
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same held-out batches every time
        self.val_batches = [self._windows(self.val_data, gen) for _ in range(cfg.eval_batches)]

    def encode(self, text: str) -> torch.Tensor:
        """Characters -> ids (T,) int64 on the CPU."""
        return torch.tensor([self._ids[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Ids (T,) -> characters."""
        return "".join(self.chars[i] for i in torch.as_tensor(ids).tolist())

    def unigram_loss(self) -> float:
        """The held-out text's loss under the training text's character frequencies."""
        return unigram_loss(self.text[: self.split], self.text[self.split :])

    def build(self) -> nn.Module:
        from ..models import GPT

        m = dict(self.cfg.model)
        seq_len = m.pop("seq_len")
        return GPT(len(self.chars), max_len=seq_len, positions="rope", device=self.cfg.device, **m)

    def _windows(self, data: torch.Tensor, gen: torch.Generator):
        x, y = random_windows(data, self.cfg.batch_size, self.seq_len, gen)
        return x.to(self.cfg.device), y.to(self.cfg.device)

    def loss(self, model: nn.Module, gen: torch.Generator) -> torch.Tensor:
        x, y = self._windows(self.train_data, gen)
        return model(x, y)[1]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        losses = [model(x, y)[1].item() for x, y in self.val_batches]
        return {"val_loss": sum(losses) / len(losses)}

    def picture_input(self) -> tuple[dict[str, Any], list[str]]:
        """A held-out snippet of 32 characters and its character labels."""
        ids = self.val_data[:32]
        labels = [{" ": "␣", "\n": "⏎", "\t": "⇥"}.get(self.chars[i], self.chars[i]) for i in ids]
        return {"idx": ids[None].to(self.cfg.device)}, labels


class VitTask:
    """Classify :func:`load_digits` (stratified 80/20 split) in 2x2 patches, with
    :func:`shift_images` augmentation and label smoothing."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.x_train, self.y_train, x_test, y_test = load_digits(cfg.seed)
        self.x_test, self.y_test = x_test.to(cfg.device), y_test.to(cfg.device)
        self.cfg = cfg
        self.tokens_per_step = cfg.batch_size * (1 + 16)  # class token + 16 patches per image

    def build(self) -> nn.Module:
        from ..models import ViT

        sizes = dict(image_size=8, patch_size=2, in_channels=1, num_classes=10, mlp="swiglu")
        return ViT(**sizes, device=self.cfg.device, **self.cfg.model)

    def loss(self, model: nn.Module, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(self.y_train), (self.cfg.batch_size,), generator=gen)
        logits = model(shift_images(self.x_train[idx], gen).to(self.cfg.device))
        return F.cross_entropy(logits, self.y_train[idx].to(self.cfg.device), label_smoothing=0.1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        logits = model(self.x_test)
        acc = (logits.argmax(-1) == self.y_test).float().mean().item()
        return {"test_accuracy": acc, "test_loss": F.cross_entropy(logits, self.y_test).item()}

    def picture_input(self) -> tuple[dict[str, Any], list[str]]:
        """The first test image; tokens are the class token and the 4 x 4 grid of patches."""
        labels = ["[CLS]"] + [f"r{r}c{c}" for r in range(4) for c in range(4)]
        return {"images": self.x_test[:1]}, labels


def make_task(cfg: TrainConfig) -> GptTask | VitTask:
    """The task of a resolved :class:`TrainConfig` (its data loaded)."""
    return GptTask(cfg) if cfg.task == "gpt" else VitTask(cfg)
