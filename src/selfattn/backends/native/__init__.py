"""The native CPU engine: fused C++ attention kernels built on this machine (see ``build``).

``load()`` returns the compiled extension (building it on first use) and ``unavailable()`` says
why it cannot be had, or None. Importing this package never builds or raises.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["load", "unavailable"]


def load() -> ModuleType:
    """The compiled extension; raises ``build.BuildError`` with the reason if it cannot be had."""
    from .build import load as _load

    return _load()


def unavailable() -> str | None:
    """None when the extension builds and loads, else a one-line reason."""
    from .build import unavailable as _unavailable

    return _unavailable()
