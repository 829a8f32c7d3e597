"""The loop behind ``selfattn train``: the small GPT (Python's help texts) and ViT (8x8 digits) of
``examples/train_gpt.py`` and ``examples/train_vit.py``, with safetensors checkpoints, exact resume,
a per-step callback for progress bars, a loss curve and the trained model's attention pictures.

The data and settings follow the examples (which stay the short scripts a user copies); this
module adds what a command needs: the optimiser state and the batch generator are saved with the
weights, so ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TASKS", "TrainConfig", "attention_maps", "train"]

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
        seed: seeds the model, the batches and the split.
        device: "cpu" or "cuda".
        model: model sizes (defaults per task, as in the examples).
    """

    task: str = "gpt"
    steps: int = 300
    batch_size: int = 0  # 0: the task's default
    lr: float = 0.0  # 0: the task's default
    eval_every: int = 50
    seed: int = 0
    device: str = "cpu"
    model: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with the task's defaults filled in; raises ValueError on a bad setting."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name in ("steps", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.batch_size < 0 or self.lr < 0:
            raise ValueError(f"batch_size and lr must be >= 0, got {self.batch_size}, {self.lr}")
        if self.task == "gpt":
            sizes = {"seq_len": 128, "embed_dim": 128, "num_layers": 4, "num_heads": 4,
                     "num_kv_heads": 2}  # fmt: skip
            batch, lr = 32, 3e-3
        else:
            sizes = {"embed_dim": 64, "num_layers": 4, "num_heads": 4}
            batch, lr = 64, 2e-3
        unknown = set(self.model) - set(sizes)
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)} for {self.task}")
        return TrainConfig(
            task=self.task, steps=self.steps, batch_size=self.batch_size or batch,
            lr=self.lr or lr, eval_every=self.eval_every, seed=self.seed, device=self.device,
            model={**sizes, **self.model},
        )  # fmt: skip


# -- the two tasks ------------------------------------------------------------------------------


class _GptTask:
    """Next-character prediction on every ``pydoc_data.topics`` text; the last 10% held out."""

    def __init__(self, cfg: TrainConfig) -> None:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[name] for name in sorted(topics))
        self.chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        split = int(0.9 * len(data))
        self.train_data, self.val_data = data[:split], data[split:]
        self.cfg = cfg
        self.seq_len = cfg.model["seq_len"]
        self.tokens_per_step = cfg.batch_size * self.seq_len
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.val_batches = [self._windows(self.val_data, gen) for _ in range(8)]

    def build(self) -> nn.Module:
        from .models import GPT

        m = dict(self.cfg.model)
        seq_len = m.pop("seq_len")
        return GPT(len(self.chars), max_len=seq_len, positions="rope", device=self.cfg.device, **m)

    def _windows(self, data: torch.Tensor, gen: torch.Generator):
        starts = torch.randint(
            0, len(data) - self.seq_len - 1, (self.cfg.batch_size,), generator=gen
        )
        x = torch.stack([data[s : s + self.seq_len] for s in starts.tolist()])  # (B, N)
        y = torch.stack([data[s + 1 : s + self.seq_len + 1] for s in starts.tolist()])
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


class _VitTask:
    """Classify sklearn's 8x8 handwritten digits (stratified 80/20 split), 2x2 patches."""

    def __init__(self, cfg: TrainConfig) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        y = torch.tensor(digits.target, dtype=torch.long)
        tr, te = train_test_split(list(range(len(y))), test_size=0.2, random_state=cfg.seed,
                                  stratify=digits.target)  # fmt: skip
        self.x_train, self.y_train = x[tr], y[tr]
        self.x_test, self.y_test = x[te].to(cfg.device), y[te].to(cfg.device)
        self.cfg = cfg
        self.tokens_per_step = cfg.batch_size * (1 + 16)  # class token + 16 patches per image

    def build(self) -> nn.Module:
        from .models import ViT

        return ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10, mlp="swiglu",
                   device=self.cfg.device, **self.cfg.model)  # fmt: skip

    def loss(self, model: nn.Module, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(self.y_train), (self.cfg.batch_size,), generator=gen)
        x = F.pad(self.x_train[idx], (1, 1, 1, 1))  # shift each image by up to one pixel
        dy, dx = torch.randint(0, 3, (2, len(idx)), generator=gen).tolist()
        x = torch.stack([x[i, :, a : a + 8, b : b + 8] for i, (a, b) in enumerate(zip(dy, dx))])
        logits = model(x.to(self.cfg.device))
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


def _task(cfg: TrainConfig):
    return _GptTask(cfg) if cfg.task == "gpt" else _VitTask(cfg)


# -- attention pictures of our own models -------------------------------------------------------


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
    from .viz import AttentionMaps, _int_list

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
    head_list = _int_list(heads, n_heads, "heads")
    row_list = _int_list(rows, n_rows, "rows")
    w = torch.stack([captured[i][head_list][:, row_list] for i in chosen])  # (L, H, R, Nk)
    return AttentionMaps(w.float().cpu().numpy(), tokens, chosen, head_list, row_list)


# -- checkpoints --------------------------------------------------------------------------------


def _save(out: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
          state: dict[str, Any]) -> None:  # fmt: skip
    from safetensors.torch import save_file, save_model

    meta = {"selfattn_train": json.dumps(state)}
    save_model(model, str(out / "model.safetensors"), metadata=meta)  # handles tied weights
    tensors = {"generator": gen.get_state()}
    params = list(model.parameters())
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"{i}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    save_file(tensors, str(out / "optimizer.safetensors"), metadata=meta)


def _load(out: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator):
    from safetensors import safe_open
    from safetensors.torch import load_file, load_model

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        state = json.loads(f.metadata()["selfattn_train"])
    load_model(model, str(out / "model.safetensors"))
    tensors = load_file(str(out / "optimizer.safetensors"))
    gen.set_state(tensors.pop("generator"))
    params = list(model.parameters())
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        p = params[int(i)]
        opt.state.setdefault(p, {})[name] = v.to(p.device) if name != "step" else v
    return state


# -- the loop -----------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    on_step: Callable[[int, float, float], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train, checkpoint and draw.

    Writes into ``out_dir``: ``model.safetensors`` (weights; config and curves in its metadata),
    ``optimizer.safetensors`` (AdamW moments and the batch generator, for ``resume``), both
    rewritten at every evaluation so that an interrupted run can resume from the last one,
    ``results.json``, ``loss.png`` and the attention pictures of the trained model
    (``attention_grid.png``, ``head_L*_H*.png``, ``rollout.png``, ``head_view.html``).

    Args:
        cfg: the run (see :class:`TrainConfig`).
        out_dir: the folder.
        resume: continue from the checkpoint in ``out_dir`` up to ``cfg.steps`` (the checkpoint's
            task and model must match ``cfg``). The learning-rate schedule spans ``cfg.steps``,
            so resuming with the same ``steps`` reproduces the uninterrupted run exactly.
        on_step: called as ``on_step(step, loss, tokens_per_second)`` after each step.
        on_eval: called as ``on_eval(step, metrics)`` after each evaluation.

    Returns:
        The results (also in ``results.json``): ``config``, ``start_step``, ``train_curve``,
        ``eval_curve``, the final metrics, ``params``, ``wall_time_s`` and the files written.

    Raises:
        ValueError: bad settings, or ``resume`` with no or a mismatching checkpoint.
    """
    cfg = cfg.resolved()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    task = _task(cfg)
    model = task.build()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed)
    start, train_curve, eval_curve = 0, [], []
    if resume:
        if (
            not (out / "model.safetensors").is_file()
            or not (out / "optimizer.safetensors").is_file()
        ):
            raise ValueError(f"--resume: no checkpoint (model/optimizer.safetensors) in {out}")
        state = _load(out, model, opt, gen)
        saved = state["config"]
        if saved["task"] != cfg.task or saved["model"] != cfg.model:
            raise ValueError(
                f"--resume: the checkpoint in {out} is {saved['task']} {saved['model']}, "
                f"not {cfg.task} {cfg.model}"
            )
        start, train_curve, eval_curve = state["step"], state["train_curve"], state["eval_curve"]
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    t0 = time.perf_counter()
    model.train()
    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = task.loss(model, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        train_curve.append([step + 1, value])
        if on_step is not None:
            on_step(step + 1, value, task.tokens_per_step / (time.perf_counter() - t_step))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            metrics = task.evaluate(model)
            model.train()
            eval_curve.append([step + 1, metrics])
            # a checkpoint at every evaluation: an interrupted run resumes from the last one
            state = {"config": asdict(cfg), "step": step + 1, "train_curve": train_curve,
                     "eval_curve": eval_curve}  # fmt: skip
            _save(out, model, opt, gen, state)
            if on_eval is not None:
                on_eval(step + 1, metrics)
    wall = time.perf_counter() - t0
    state = {"config": asdict(cfg), "step": max(start, cfg.steps), "train_curve": train_curve,
             "eval_curve": eval_curve}  # fmt: skip
    files = {"model": out / "model.safetensors", "optimizer": out / "optimizer.safetensors"}
    files["loss"] = _plot_loss(state, out / "loss.png")
    from .viz import write_pictures

    inputs, tokens = task.picture_input()
    maps = attention_maps(model, inputs, tokens)
    title = f"{cfg.task} after {state['step']} steps"
    files.update(write_pictures(maps, out, title=title))
    results = {
        **state,
        "start_step": start,
        "final": eval_curve[-1][1] if eval_curve else {},
        "params": sum(p.numel() for p in model.parameters()),
        "wall_time_s": round(wall, 2),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "files": {k: str(v) for k, v in files.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _plot_loss(state: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    steps, losses = zip(*state["train_curve"]) if state["train_curve"] else ((), ())
    ax.plot(steps, losses, lw=0.7, alpha=0.6, label="train loss (per step)")
    if len(losses) >= 20:  # a running mean reads better than the noisy per-step loss
        k = max(5, len(losses) // 30)
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                  for i in range(len(losses))]  # fmt: skip
        ax.plot(steps, smooth, lw=1.5, label=f"train loss (mean of {k})")
    for key in ("val_loss", "test_loss"):
        pts = [(s, m[key]) for s, m in state["eval_curve"] if key in m]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"{state['config']['task']}: {state['step']} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    return path
