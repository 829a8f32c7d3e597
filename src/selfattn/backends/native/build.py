"""Build and load the native CPU attention extension (``python -m selfattn.backends.native.build``).

The kernels are compiled on this machine: ``bindings.cpp`` (the only file that sees torch) with
``torch.utils.cpp_extension.load`` and ninja, and one object per instruction set of the machine's
architecture, each with its own ``-m`` flags, linked into the same module: on x86-64 portable,
AVX2+FMA and AVX-512, on aarch64 portable and NEON, elsewhere portable alone. The bindings pick
one at run time from the CPU's features (``SELFATTN_NATIVE_ISA=avx2|avx512|neon|generic``
overrides). The build lives in ``${SELFATTN_CACHE:-~/.cache/selfattn}/native-<hash>``, the hash
covering every file in ``csrc/``, the flags, torch's version, the Python ABI and the compiler's
identity, so an unchanged build is imported directly (no ninja run) and a changed one is never
reused. The sources are read once: the bytes hashed are the bytes compiled, from a copy in the
build folder (``src/``), so a checkout that changes during a build (a ``git rebase``) cannot put
old objects under a new hash. What a build folder records (finished, failed, last use, lock) is ``cache``'s business.

:func:`load` returns the module, building it if needed: the first build says so in one line on
stderr. A failed compile is recorded in the folder and every later process reports the record
instead of compiling again, until something the hash covers changes or a rebuild is asked for
(``load(rebuild=True)``, ``SELFATTN_NATIVE_REBUILD=1``, ``selfattn info --build``, ``--rebuild``
here). :func:`unavailable` says in one line why the module cannot be had and :func:`status`
where the build lives and its state without building; importing this file never raises.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from ... import quant
from . import cache

__all__ = ["BuildError", "build_dir", "load", "main", "sources", "status", "unavailable"]

NAME = "selfattn_native"
CSRC = Path(__file__).resolve().parent / "csrc"
# the kinds of file in csrc/ the build reads: all are hashed, and pyproject.toml's package-data
# ships them (tests/test_native_build.py checks the wheel against this)
SOURCES = (".cpp", ".h", ".hpp", ".inc")
BINDINGS = "bindings.cpp"
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fno-plt"]
# extra flags for every compile, e.g. "-DSELFATTN_POISON" (scratch starts as NaN) or sanitizers;
# they are part of the build's hash
EXTRA_ENV = "SELFATTN_NATIVE_CXXFLAGS"
# the ISA objects of this machine's architecture: (source, flags), linked in this order; the
# bindings declare the same set per architecture (see bindings.cpp). NEON is part of aarch64's
# base ISA, so its object needs no -m flag. The Makefile's check-native / check-sanitize / check-arm
# build the torch-free test driver from the same objects and flags.
_X86_OBJECTS = [
    ("kernels_generic.cpp", []),
    ("kernels_avx2.cpp", ["-mavx2", "-mfma", "-mf16c"]),
    (
        "kernels_avx512.cpp",
        ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c"],
    ),
]
# -fno-schedule-insns: see simd_neon.h (clang ignores it)
_ARM_OBJECTS = [("kernels_generic.cpp", []), ("kernels_neon.cpp", ["-fno-schedule-insns"])]


def objects_for(machine: str) -> list[tuple[str, list[str]]]:
    """The ISA objects compiled on a machine whose ``platform.machine()`` is ``machine``."""
    m = machine.lower()
    if m in ("x86_64", "amd64", "i386", "i686"):
        return _X86_OBJECTS
    if m in ("aarch64", "arm64"):
        return _ARM_OBJECTS
    return [("kernels_generic.cpp", [])]


OBJECTS = objects_for(platform.machine())
BINDINGS_FLAGS = ["-O3", "-std=c++17"]
# set (not "0") to try again a build whose failure is recorded
REBUILD_ENV = "SELFATTN_NATIVE_REBUILD"
# compiler output that means the machine, not the sources, failed: such a failure is not recorded
TRANSIENT = (
    "Killed signal",
    "signal terminated program",
    "No space left on device",
    "Cannot allocate memory",
    "virtual memory exhausted",
)
BUILDING = (
    "selfattn: building the native CPU engine for this machine (once, a minute or two) in {} ..."
)
WAITING = "selfattn: waiting for another process building the native CPU engine in {} ..."

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


class BuildError(RuntimeError):
    """Why the extension cannot be built or loaded (one line)."""


class CompileError(BuildError):
    """A compile or link that failed on the sources themselves: recorded, not retried.

    Attributes:
        log: the compiler's full output.
    """

    def __init__(self, reason: str, log: str) -> None:
        super().__init__(reason)
        self.log = log


def _compile_failure(reason: str, log: str) -> BuildError:
    """A :class:`CompileError`, or a plain :class:`BuildError` (not recorded) when the log says
    the machine ran out of something or killed the compiler."""
    if any(mark in log for mark in TRANSIENT):
        return BuildError(f"{reason} (the compiler was killed or ran out of memory or disk)")
    return CompileError(reason, log)


def _compiler() -> tuple[str, str]:
    """The C++ compiler torch's build will use (``$CXX`` or ``c++``) and its identity line."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise BuildError(
            f"no C++ compiler found ({cxx!r} is not an executable; install g++: apt-get install g++)"
        )
    try:
        proc = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        raise BuildError(f"C++ compiler {cxx!r} does not run: {exc}") from exc
    if proc.returncode != 0:
        raise BuildError(f"C++ compiler {cxx!r} does not run: {_first_line(proc.stderr)}")
    return path, (proc.stdout.splitlines() or ["?"])[0]


def _first_line(text: str) -> str:
    """The first line of compiler output that says what went wrong."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower():
            return ln
    return lines[0] if lines else "(no output)"


def _extra_flags() -> list[str]:
    return os.environ.get(EXTRA_ENV, "").split()


def sources() -> list[Path]:
    """Every source file of the engine (``csrc/`` and below), sorted."""
    return sorted(p for p in CSRC.rglob("*") if p.is_file() and p.suffix in SOURCES)


def _snapshot() -> dict[str, bytes]:
    """Every source file's bytes by its path relative to ``csrc/``, read once: the build hashes
    and compiles this, never the files again."""
    return {p.relative_to(CSRC).as_posix(): p.read_bytes() for p in sources()}


def _write_snapshot(snap: dict[str, bytes], out: Path) -> Path:
    """The snapshot's files under ``out/src`` (rewritten whole), where the compiles read them."""
    src = out / "src"
    shutil.rmtree(src, ignore_errors=True)
    for rel, data in snap.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return src


def openmp_flags(compiler_id: str) -> list[str]:
    """``-fopenmp`` for the bindings where it is needed and the compiler has it, else nothing.

    torch's OpenMP builds (``AT_PARALLEL_OPENMP`` in ATen/Config.h: the Linux wheels) inline
    ``at::parallel_for``'s ``#pragma omp parallel`` body from ATen/ParallelOpenMP.h into
    bindings.cpp; compiled without ``-fopenmp`` it runs every range in the calling thread. A torch
    with its native pool needs no flag, and the engine objects never do (they only call back
    through the bindings' pool). Apple's clang has no ``-fopenmp``, so the flag is given for GCC
    on Linux only: elsewhere the engine builds and is correct, and runs in the calling thread
    when torch's pool is OpenMP (the bindings then report one thread).
    """
    if not sys.platform.startswith("linux") or "clang" in compiler_id.lower():
        return []
    import torch

    config = Path(torch.__file__).resolve().parent / "include" / "ATen" / "Config.h"
    try:
        text = config.read_text()
    except OSError:
        return []
    return ["-fopenmp"] if "#define AT_PARALLEL_OPENMP 1" in text else []


def _key(compiler_id: str, snap: dict[str, bytes]) -> str:
    import torch

    h = hashlib.sha256()
    for rel, data in sorted(snap.items()):
        h.update(rel.encode())
        h.update(data)
    flags = [CXXFLAGS, BINDINGS_FLAGS, OBJECTS, openmp_flags(compiler_id), _extra_flags()]
    for part in (repr(flags), torch.__version__, compiler_id, sys.version, platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_dir(compiler_id: str | None = None, snap: dict[str, bytes] | None = None) -> Path:
    """Where this build of the extension lives (or will); ``snap``: the sources as read."""
    if compiler_id is None:
        compiler_id = _compiler()[1]
    return cache.root() / f"native-{_key(compiler_id, _snapshot() if snap is None else snap)}"


def _import(so: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, so)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import {so}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compile_objects(cxx: str, out: Path, src_dir: Path) -> list[Path]:
    """Compile the ISA objects from ``src_dir`` in parallel (each written under a temporary name,
    then renamed)."""
    procs = []
    objs = []
    for src, flags in OBJECTS:
        obj = out / (Path(src).stem + ".o")
        objs.append(obj)
        if obj.exists():
            continue
        tmp = out / f"{obj.name}.{os.getpid()}.tmp"
        cmd = [
            cxx,
            *CXXFLAGS,
            *flags,
            *_extra_flags(),
            "-I",
            str(src_dir),
            "-c",
            str(src_dir / src),
        ]
        cmd += ["-o", str(tmp)]
        procs.append((obj, tmp, cmd, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
    failure = None
    logs = []
    for obj, tmp, cmd, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            failure = failure or f"C++ build failed: {_first_line(err)}"
            logs.append(f"$ {' '.join(cmd)}\n{err}exit status {proc.returncode}\n")
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, obj)
    if failure and any(proc.returncode < 0 for *_, proc in procs):
        raise BuildError(f"{failure} (a compiler process was killed by a signal)")
    if failure:
        raise _compile_failure(failure, "\n".join(logs))
    return objs


@contextlib.contextmanager
def _ninja() -> Iterator[None]:
    """ninja reachable for the build: torch runs ``ninja`` from PATH, and a venv used without
    being activated has the ninja package's binary off PATH, so add it there for the build only."""
    from torch.utils import cpp_extension

    if cpp_extension.is_ninja_available():
        yield
        return
    try:
        import ninja

        bin_dir = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        raise BuildError("ninja not found (pip install ninja)") from None
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = bin_dir + os.pathsep + old
    try:
        if not cpp_extension.is_ninja_available():
            raise BuildError(f"ninja not found (not on PATH, nor runnable in {bin_dir})")
        yield
    finally:
        os.environ["PATH"] = old


def _build(cxx: str, out: Path, omp: list[str], snap: dict[str, bytes]) -> ModuleType:
    from torch.utils import cpp_extension

    src_dir = _write_snapshot(snap, out)
    objs = _compile_objects(cxx, out, src_dir)
    try:
        return cpp_extension.load(
            name=NAME,
            sources=[str(src_dir / BINDINGS)],
            extra_cflags=[*BINDINGS_FLAGS, *omp, *_extra_flags()],
            extra_include_paths=[str(src_dir)],
            extra_ldflags=[*map(str, objs), *omp, *_extra_flags()],
            build_directory=str(out),
            verbose=False,
        )
    except Exception as exc:  # cpp_extension raises RuntimeError with the build log
        text = str(exc)
        raise _compile_failure(f"C++ build failed: {_first_line(text)}", text) from exc


def _recorded(out: Path) -> str | None:
    """The recorded failure of the build in ``out`` as one line, or None (stamps its use)."""
    rec = cache.failure(out)
    if rec is None:
        return None
    cache.touch(out)
    return (
        f"{rec['reason']} (recorded {rec.get('when', '?')}; rebuild with `selfattn info --build` "
        f"or {REBUILD_ENV}=1)"
    )


def _found(so: Path, remove_broken: bool) -> ModuleType | None:
    """The module in ``so`` if it imports; a broken one is removed when ``remove_broken`` (only
    under the build lock), so that it is rebuilt."""
    if not so.exists():
        return None
    try:
        return _import(so)
    except ImportError:
        if remove_broken:
            (so.parent / cache.BUILT).unlink(missing_ok=True)
            so.unlink(missing_ok=True)
        return None


def _load(rebuild: bool) -> ModuleType:
    import torch

    cxx, compiler_id = _compiler()
    snap = _snapshot()
    out = build_dir(compiler_id, snap)
    so = out / f"{NAME}.so"
    if cache.finished(out) is not None and (mod := _found(so, remove_broken=False)) is not None:
        cache.touch(out)
        return mod
    rebuild = rebuild or os.environ.get(REBUILD_ENV, "") not in ("", "0")
    if not rebuild and (why := _recorded(out)) is not None:
        raise BuildError(why)
    out.mkdir(parents=True, exist_ok=True)
    with cache.lock(out, on_wait=WAITING.format(out)):
        # under the lock: another process may have built it (or recorded its failure) meanwhile;
        # a .so without built.json comes from a selfattn that did not write one
        if (mod := _found(so, remove_broken=True)) is not None:
            if cache.finished(out) is None:
                cache.mark_finished(out, None, compiler_id, torch.__version__)
            cache.touch(out)
            return mod
        if not rebuild and (why := _recorded(out)) is not None:
            raise BuildError(why)
        t0 = time.perf_counter()
        try:
            with _ninja():
                cache.say(BUILDING.format(out))
                mod = _build(cxx, out, openmp_flags(compiler_id), snap)
        except CompileError as exc:  # recorded, and said the way later processes will say it
            cache.record_failure(out, str(exc), exc.log, compiler_id, torch.__version__)
            raise BuildError(_recorded(out) or str(exc)) from exc
        cache.clear_failure(out)
        cache.mark_finished(out, time.perf_counter() - t0, compiler_id, torch.__version__)
        cache.touch(out)
    cache.clean_stale(keep=out)
    return mod


def load(rebuild: bool = False) -> ModuleType:
    """The extension module, built on first use; raises :class:`BuildError` with the reason.

    Args:
        rebuild: compile again even where a failure is recorded (for this build, or earlier in
            this process). A finished build is current by its hash and is imported as it is.
    """
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if rebuild:
            _error = None
        if _module is None and _error is None:
            try:
                _module = _load(rebuild)
                # quantize_kv takes the engine's quantizer for a few tokens from now on (quant
                # sits below the backends and never loads the engine itself)
                quant.NATIVE_QUANTIZE = _module.quantize
            except BuildError as exc:
                _error = str(exc)
            except Exception as exc:  # never let an unexpected failure escape as a crash
                _error = f"native extension failed to load: {type(exc).__name__}: {exc}"
    if _module is None:
        raise BuildError(_error)
    return _module


def unavailable() -> str | None:
    """None when the extension builds and loads; otherwise a one-line reason."""
    try:
        load()
    except BuildError as exc:
        return str(exc)
    return None


def status() -> dict[str, Any]:
    """Where the build lives and its state, without building anything.

    Returns:
        ``{"dir": str | None, "state": str, "reason": str, "built": dict | None, "log": str |
        None}``; ``state`` is ``"built"``, ``"building"`` (another process holds the lock),
        ``"not built"`` (the first native call, or ``load()``, builds it), ``"failed"`` (``reason``
        is the recorded line, ``log`` the full compiler output) or ``"unavailable"`` (no
        compiler: ``dir`` is None). ``built`` holds when, in how many seconds and with which
        compiler and torch it was built.
    """
    try:
        _, compiler_id = _compiler()
    except BuildError as exc:
        return {"dir": None, "state": "unavailable", "reason": str(exc), "built": None, "log": None}
    out = build_dir(compiler_id)
    res: dict[str, Any] = {"dir": str(out), "reason": "", "built": cache.finished(out), "log": None}
    rec = cache.failure(out)
    if _module is not None or (res["built"] is not None and (out / f"{NAME}.so").exists()):
        res["state"] = "built"
    elif cache.is_locked(out):
        res["state"] = "building"
    elif rec is not None:
        res.update(state="failed", reason=_recorded(out), log=rec.get("log"))
    elif _error is not None:
        res.update(state="failed", reason=_error)
    elif (out / f"{NAME}.so").exists():
        res["state"] = "built"  # by a selfattn that did not write built.json
    else:
        res["state"] = "not built"
    return res


def main(argv: list[str] | None = None) -> int:
    """Build (or load) the extension and say where it lives; 1 with the reason if it cannot."""
    p = argparse.ArgumentParser(
        prog="python -m selfattn.backends.native.build", description=main.__doc__
    )
    p.add_argument(
        "--rebuild", action="store_true", help="compile again even where a failure is recorded"
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        mod = load(rebuild=args.rebuild)
    except BuildError as exc:
        print(f"selfattn native: unavailable: {exc}", file=sys.stderr)
        return 1
    print(
        f"selfattn native: {build_dir()} ({time.perf_counter() - t0:.2f} s), "
        f"isa {mod.isa('float32')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
