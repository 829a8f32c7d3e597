"""The training loop of selfattn's small models, behind ``selfattn train`` and the examples
(``examples/train_gpt.py``, ``examples/train_vit.py``): the two tasks' data, one loop with
safetensors checkpoints and exact resume, a loss curve and the trained model's attention pictures.

:func:`fit` is the loop (it returns the trained model); :func:`train` is what the command runs:
:func:`fit` with a checkpoint at every evaluation, then ``results.json``, ``loss.png`` and the
pictures. The optimiser state and the batch generator are saved with the weights, so ``resume``
continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TASKS",
    "GptTask",
    "Run",
    "TrainConfig",
    "VitTask",
    "attention_maps",
    "char_ids",
    "fit",
    "load_corpus",
    "load_digits",
    "plot_loss",
    "random_windows",
    "shift_images",
    "torch_threads",
    "train",
    "unigram_loss",
]

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
            lr=self.lr or lr, eval_every=self.eval_every, eval_batches=self.eval_batches,
            seed=self.seed, device=self.device, model={**sizes, **self.model},
        )  # fmt: skip


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``threads`` inside the block (left alone when None), and
    restored after it. On a busy machine 1 thread is often the fastest."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# -- the data -----------------------------------------------------------------------------------


def load_corpus() -> str:
    """Every ``pydoc_data.topics`` help text (about 465k characters that ship with Python, so
    nothing is downloaded), in sorted topic order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def unigram_loss(train_text: str, val_text: str) -> float:
    """Cross-entropy (nats/char) of ``val_text`` under the character frequencies of
    ``train_text`` (add-one smoothed over the characters of both): the baseline a character
    model has to beat."""
    counts = Counter(train_text)
    alphabet = set(train_text) | set(val_text)
    total = len(train_text) + len(alphabet)
    nll = -sum(c * math.log((counts[ch] + 1) / total) for ch, c in Counter(val_text).items())
    return nll / len(val_text)


def char_ids(text: str) -> tuple[torch.Tensor, list[str]]:
    """A character-level vocabulary: ``text`` as ids (T,) int64, and the sorted characters
    (id i stands for ``chars[i]``)."""
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return torch.tensor([lookup[c] for c in text], dtype=torch.long), chars


def random_windows(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows of ``seq_len`` ids at random places of ``data`` (T,), and the ids
    one place later (the next-token targets): two (B, N) tensors."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s : s + seq_len] for s in starts.tolist()])  # (B, N)
    y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts.tolist()])  # (B, N)
    return x, y


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 bundled 8x8 digits, split 80/20 (stratified, ``random_state=seed``).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float images (N, 1, 8, 8) in [0, 1] and int64
        labels (N,).
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(list(range(len(y))), test_size=0.2, random_state=seed,
                              stratify=digits.target)  # fmt: skip
    return x[tr], y[tr], x[te], y[te]


def shift_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augmentation: each image (B, C, H, W) moved by up to one pixel each way (zero fill)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))  # (B, C, H + 2, W + 2)
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=generator).tolist()
    return torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx))])


# -- the two tasks ------------------------------------------------------------------------------


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
        from .models import GPT

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
        from .models import ViT

        return ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10, mlp="swiglu",
                   device=self.cfg.device, **self.cfg.model)  # fmt: skip

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


def _task(cfg: TrainConfig) -> GptTask | VitTask:
    return GptTask(cfg) if cfg.task == "gpt" else VitTask(cfg)


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
        return {"config": asdict(self.config), "step": self.step,
                "train_curve": self.train_curve, "eval_curve": self.eval_curve}  # fmt: skip


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
    task = _task(cfg)
    model = task.build()
    # weight decay on matrices only (not on norms, biases)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed)
    run = Run(cfg, task, model, 0, [], [], 0.0, torch.get_num_threads())
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
        run.start_step, run.train_curve, run.eval_curve = (
            state["step"], state["train_curve"], state["eval_curve"]
        )  # fmt: skip
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
                _save(out, model, opt, gen, {**run.state(), "step": step + 1})
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
    from .viz import write_pictures

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
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                  for i in range(len(losses))]  # fmt: skip
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
