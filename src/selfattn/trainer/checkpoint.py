"""The trainer's checkpoint room: weights, optimiser state and the batch generator in two
safetensors files, so that a resumed run continues exactly where it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["has_checkpoint", "load_checkpoint", "save_checkpoint"]

FILES = ("model.safetensors", "optimizer.safetensors")


def has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds both files of a checkpoint."""
    return all((out / name).is_file() for name in FILES)


def save_checkpoint(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, state: Any
) -> None:
    """Write ``model.safetensors`` (the weights, ``state`` as JSON in its metadata) and
    ``optimizer.safetensors`` (the AdamW state and the batch generator) into ``out``."""
    from safetensors.torch import save_file, save_model

    meta = {"selfattn_train": json.dumps(state)}
    save_model(model, str(out / "model.safetensors"), metadata=meta)  # handles tied weights
    tensors = {"generator": gen.get_state()}
    params = list(model.parameters())
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"{i}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    save_file(tensors, str(out / "optimizer.safetensors"), metadata=meta)


def load_checkpoint(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``opt`` and ``gen``; returns
    the saved state."""
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
