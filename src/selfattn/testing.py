"""What the tests, the demo and the benchmarks share: the thread switch (and, below, the plain
same-dtype formula and the FlashAttention tolerance rule that judge every backend)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["torch_threads"]


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
