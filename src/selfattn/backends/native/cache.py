"""The native engine's build folders: where they live, what they record, their lock, their cleanup.

Each build lives in ``${SELFATTN_CACHE:-~/.cache/selfattn}/native-<hash>`` (``build.build_dir``;
the hash covers everything the build reads, so a folder is never shared by two different builds).
Besides the compiler's outputs a folder holds:

- ``built.json``: written last, after the module imported; its presence is what makes the
  folder a finished build (a ``.so`` alone may be half-written by a build in progress).
- ``failed.json`` and ``failed.log``: a compile that failed, its one-line reason and full log.
  Later processes read the reason instead of compiling again; the record goes when a rebuild is
  asked for and succeeds. A change of sources, flags, torch or compiler gives a new hash, hence
  a new folder and a new attempt.
- ``last-use``: its modification time is touched at every load (or read record), so
  :func:`clean_stale` can tell folders nobody uses any more.
- ``.lock``: an exclusive ``fcntl.flock`` held while building, so two processes never compile
  into the same folder at once (the second waits, then finds the build or the record).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no build lock (the engine is built for Linux and macOS)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FOLDER",
    "STALE_DAYS",
    "clean_stale",
    "clear_failure",
    "failure",
    "finished",
    "is_locked",
    "lock",
    "mark_finished",
    "record_failure",
    "root",
    "say",
    "touch",
]

#: what a build folder's name looks like (``native-`` and 16 hex digits of the build's hash)
FOLDER = re.compile(r"native-[0-9a-f]{16}")
#: folders of other builds unused for this long are removed after a successful build. Two venvs
#: (say two torch versions) sharing one cache each touch their own folder whenever they load
#: it, so only a folder no process has loaded for a month goes; if its venv comes back it
#: builds again (a minute).
STALE_DAYS = 30.0

BUILT = "built.json"
FAILED = "failed.json"
FAILED_LOG = "failed.log"
LAST_USE = "last-use"
LOCK = ".lock"


def root() -> Path:
    """``$SELFATTN_CACHE``, or ``~/.cache/selfattn`` when it is unset or empty (not created)."""
    env = os.environ.get("SELFATTN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfattn"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` under a temporary name, then rename: a reader sees all of it or nothing."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def finished(folder: Path) -> dict[str, Any] | None:
    """The finished build's record (``when``, ``seconds``, ``compiler``, ``torch``), or None."""
    return _read_json(folder / BUILT)


def mark_finished(folder: Path, seconds: float | None, compiler: str, torch_version: str) -> None:
    """Record ``folder`` as a finished build (``seconds``: None when it was found already built)."""
    info = {"when": _now(), "seconds": seconds, "compiler": compiler, "torch": torch_version}
    _write_json(folder / BUILT, info)


def failure(folder: Path) -> dict[str, Any] | None:
    """The recorded failure (``reason``, ``when``, ``compiler``, ``torch``, ``log``), or None."""
    rec = _read_json(folder / FAILED)
    return rec if rec is not None and isinstance(rec.get("reason"), str) else None


def record_failure(folder: Path, reason: str, log: str, compiler: str, torch_version: str) -> None:
    """Record a failed compile: the one-line ``reason`` and the full ``log`` beside it."""
    (folder / FAILED_LOG).write_text(log)
    rec = {
        "reason": reason,
        "when": _now(),
        "compiler": compiler,
        "torch": torch_version,
        "log": str(folder / FAILED_LOG),
    }
    _write_json(folder / FAILED, rec)


def clear_failure(folder: Path) -> None:
    """Forget a recorded failure (after a build that succeeded)."""
    for name in (FAILED, FAILED_LOG):
        (folder / name).unlink(missing_ok=True)


def touch(folder: Path) -> None:
    """Stamp ``folder`` as used now (best effort: a read-only cache is left as it is)."""
    stamp = folder / LAST_USE
    with contextlib.suppress(OSError):
        stamp.touch()
        os.utime(stamp)


def _try_lock(fh) -> bool | None:
    """Take the exclusive lock on ``fh`` without waiting: True taken, False held elsewhere,
    None when the file system has no locks (some network mounts)."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


@contextlib.contextmanager
def lock(folder: Path, on_wait: str | None = None) -> Iterator[None]:
    """Hold ``folder``'s build lock (``folder`` must exist); without lock support, go on unlocked.

    Args:
        folder: the build folder.
        on_wait: a line for stderr when another process holds the lock (we then wait for it).
    """
    if fcntl is None:
        yield
        return
    with open(folder / LOCK, "a") as fh:
        held = _try_lock(fh)
        if held is False:
            if on_wait:
                say(on_wait)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if held is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def say(line: str) -> None:
    """Write one line on stderr, now.

    The library otherwise never prints. This is for the notes before a step that blocks the
    caller for a minute (building the engine, waiting for another process building it), which
    the user should see once and unfiltered: a warning would carry a file:line prefix, be hidden
    by warning filters and become an exception under ``-W error``.
    """
    print(line, file=sys.stderr, flush=True)


def is_locked(folder: Path) -> bool:
    """Whether some process holds ``folder``'s build lock now (a build in progress)."""
    if fcntl is None or not (folder / LOCK).exists():
        return False
    try:
        with open(folder / LOCK, "a") as fh:
            held = _try_lock(fh)
            if held:
                fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return False
    return held is False


def _last_use(folder: Path) -> float:
    """When ``folder`` was last loaded (folders from before ``last-use``: their own mtime)."""
    stamp = folder / LAST_USE
    return (stamp if stamp.exists() else folder).stat().st_mtime


def clean_stale(keep: Path, max_age_days: float = STALE_DAYS) -> list[Path]:
    """Remove the build folders beside ``keep`` that nobody has used for ``max_age_days``.

    Only folders named like ours (``native-`` + 16 hex digits) are candidates, never ``keep``,
    and never one whose lock another process holds (a build in progress). A process that loaded
    a removed folder's module long ago keeps running: the module stays mapped. Best effort: what
    cannot be removed stays.

    Returns:
        The folders removed.
    """
    removed = []
    cutoff = time.time() - max_age_days * 86400.0
    try:
        folders = sorted(keep.parent.iterdir())
    except OSError:
        return removed
    for folder in folders:
        if folder.name == keep.name or not FOLDER.fullmatch(folder.name) or not folder.is_dir():
            continue
        try:
            if _last_use(folder) > cutoff:
                continue
            if fcntl is None:
                shutil.rmtree(folder)
            else:
                with open(folder / LOCK, "a") as fh:
                    if not _try_lock(fh):
                        continue  # being built (or no locks here): leave it
                    shutil.rmtree(folder)  # the lock is held (on the unlinked file) meanwhile
        except OSError:
            continue
        removed.append(folder)
    return removed
