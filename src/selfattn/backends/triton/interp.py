"""Running the kernels under ``TRITON_INTERPRET=1``: interpreted twins of the ``@triton.jit``
functions for the length of a launch, and the interpreter's fixed tiles (no autotuning there)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from . import interpreting, kernels

__all__ = ["INTERPRET_BLOCKS", "interpretable", "ready", "tiles"]

F = TypeVar("F", bound=Callable[..., Any])

# Tiles used under the interpreter; tests change them to cover more paths.
INTERPRET_BLOCKS: dict[str, Any] = {
    "fwd": (32, 32),  # BLOCK_M, BLOCK_N
    "dkdv": (32, 32),
    "dq": (32, 32),
    "decode_n": 32,  # BLOCK_N of the decode kernel
    "decode_splits": None,  # None: the host's choice; an int forces that many splits
    "probs": (32, 32),
}


def tiles(kind: str) -> dict[str, int]:
    """The interpreter's tiles for a kind of kernel ("fwd", "dkdv", "dq" or "decode")."""
    if kind == "decode":
        return {"BLOCK_N": INTERPRET_BLOCKS["decode_n"]}
    bm, bn = INTERPRET_BLOCKS[kind]
    return {"BLOCK_M": bm, "BLOCK_N": bn}


# Why twins. ``triton.jit`` decides when it decorates: with TRITON_INTERPRET=1 set it returns an
# InterpretedFunction, otherwise a compile-only JITFunction whose ``__call__`` raises "Cannot
# call @triton.jit'd outside of the scope of a kernel". Both our kernels (decorated when
# ``kernels.py`` is imported) and Triton's own ``@jit`` library (``tl.max``, ``tl.min``,
# ``tl.sum``, ``tl.zeros``: decorated when triton is imported) are therefore compile-only when
# the variable is set later, as the tests do per test and as a GPU machine running both kinds of
# test in one process must. Triton 3.6 and 3.9 behave alike here; the interpreter patches only
# the builtins of ``triton.language``, not its ``@jit`` functions. So for one launch every
# JITFunction of these modules is swapped for an interpreted twin of the same Python function
# and put back afterwards; the compiled objects are never touched otherwise. When the variable
# was set before the imports there is nothing to swap. The twins are keyed by the Python
# function: hashing a JITFunction computes its cache key from the globals it reads, which may be
# half swapped at that moment.
_TWINS: dict[Callable[..., Any], InterpretedFunction] = {}


def _jit_modules() -> tuple[Any, ...]:
    return (kernels, tl, tl.core, tl.standard, tl.math, tl.random)


@contextlib.contextmanager
def ready() -> Iterator[None]:
    """Make every ``@triton.jit`` function the kernels call interpretable, for one launch (a
    no-op when compiling). Numpy's warnings about ``log2(0)`` (rows that see nothing) are
    silenced: -inf is the intended result."""
    if not interpreting():
        yield
        return
    swaps = []
    for mod in _jit_modules():
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction):
                twin = _TWINS.get(obj.fn)
                if twin is None:
                    twin = _TWINS[obj.fn] = InterpretedFunction(obj.fn)
                swaps.append((mod, name, obj))
                setattr(mod, name, twin)
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            yield
    finally:
        for mod, name, obj in swaps:
            setattr(mod, name, obj)


def interpretable(fn: F) -> F:
    """Run ``fn`` inside :func:`ready` (a no-op when compiling)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with ready():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
