"""The argument checks every room shares: ints, probabilities, reals, windows, index selections.

``integer``, ``real`` and ``index_list`` raise ``TypeError`` for a wrong type and ``ValueError``
for a wrong value; ``probability`` and ``window`` raise ``ValueError`` for both (the messages
docs/api.md quotes for ``window``). Each names the argument and what arrived. No torch import,
so the numpy-only rooms (``viz``) can use them.
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["WINDOW_MAX", "float32", "index_list", "integer", "probability", "real", "window"]

# Window sides are clamped to this: it exceeds the distance between any two positions a tensor
# can index (a dimension of 2**62 elements is beyond any machine), so a larger side restricts
# nothing either, and position arithmetic (``i' + right + 1``, ``i' - left``) stays in int64.
WINDOW_MAX = 2**62


def integer(name: str, x: Any, minimum: int | None = 1) -> int:
    """``x`` as an int, at least ``minimum`` (None: no lower bound)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {x!r} ({type(x).__name__})")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def real(name: str, x: Any) -> float:
    """``x`` as a float (bools refused)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {x!r} ({type(x).__name__})")
    try:
        return float(x)
    except OverflowError:  # an int such as 10**400
        shown = repr(x) if x.bit_length() < 4096 else f"an int of {x.bit_length()} bits"
        raise ValueError(f"{name} must be a finite float, got {shown}") from None


# Reals that round to a finite float32 have |x| below F32_HIGH (FLT_MAX plus half an ulp: ties
# round to inf); positive ones that stay > 0 lie above F32_LOW (half the smallest subnormal).
F32_LOW = 2.0**-150
F32_HIGH = 2.0**128 - 2.0**103


def float32(name: str, x: Any, positive: bool) -> float:
    """``x`` as a float that float32 holds finitely (and > 0 when ``positive``): the kernels
    compute in float32, so a softcap or scale beyond it cannot be honoured."""
    v = x if type(x) is float else real(name, x)
    if positive and not F32_LOW < v < F32_HIGH:  # NaN fails too
        raise ValueError(
            f"{name} must be a finite float > 0 that float32 can hold (about 1.4e-45 to 3.4e38), "
            f"got {name}={x!r}"
        )
    if not abs(v) < F32_HIGH:
        raise ValueError(
            f"{name} must be a finite float that float32 can hold (|{name}| < about 3.4e38), "
            f"got {name}={x!r}"
        )
    return v


def probability(name: str, p: Any) -> float:
    """A dropout-style probability in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")
    return float(p)


def window(win: Any) -> tuple[int | None, int | None] | None:
    """A ``(left, right)`` window of ints >= 0 or None per side; ``(None, None)`` becomes None.

    A side of any size is honoured: one larger than any distance between positions restricts
    nothing, so sides are clamped to ``WINDOW_MAX`` (which keeps position arithmetic in int64).
    """
    if win is None:
        return None
    if not isinstance(win, (tuple, list)) or len(win) != 2:
        raise ValueError(
            f"window must be a pair (left, right) of non-negative ints or None, got {win!r}"
        )
    sides = []
    for side, w in zip(("left", "right"), win):
        if w is None:
            sides.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise ValueError(
                f"window {side} must be an int >= 0 or None, got {w!r} in window={win!r}"
            )
        if w < 0:
            raise ValueError(
                f"window {side} must be >= 0 (use None for unbounded), got {w} in window={win!r}"
            )
        sides.append(min(int(w), WINDOW_MAX))
    if sides[0] is None and sides[1] is None:
        return None  # (None, None) restricts nothing
    return (sides[0], sides[1])


def index_list(sel: Any, n: int, what: str) -> list[int]:
    """``sel`` (int, slice, sequence, numpy array or tensor of ints) as indices in ``range(n)``.

    Negative indices count from the end, as in Python. ``what`` names the argument in errors.

    Raises:
        TypeError: not an int, a slice or a sequence of ints (floats and bools included).
        ValueError: an index outside ``[-n, n)``.
    """
    if isinstance(sel, slice):
        return list(range(n))[sel]
    if hasattr(sel, "tolist") and not isinstance(sel, (list, tuple)):
        dtype = str(getattr(sel, "dtype", ""))
        if "float" in dtype or "bool" in dtype or "complex" in dtype:
            raise TypeError(f"{what} must hold integer indices, got {dtype}")
        sel = sel.tolist()
    if isinstance(sel, numbers.Integral) and not isinstance(sel, bool):
        sel = [sel]
    try:
        items = list(_flat(sel))
    except TypeError as exc:
        raise TypeError(
            f"{what} must be an int, a slice or a sequence of integers, got {sel!r}"
        ) from exc
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in items):
        raise TypeError(f"{what} must be an int, a slice or a sequence of integers, got {sel!r}")
    bad = [int(i) for i in items if not -n <= i < n]
    if bad:
        raise ValueError(f"{what} {bad} out of range for {n} {what}")
    return [int(i) % n for i in items]


def _flat(sel: Any):
    for item in sel:
        if isinstance(item, (list, tuple)):
            yield from _flat(item)
        else:
            yield item
