"""Build and load the native CPU attention extension (``python -m selfattn.backends.native.build``).

The kernels are compiled on this machine: ``bindings.cpp`` (the only file that sees torch) with
``torch.utils.cpp_extension.load`` and ninja, and one object per instruction set (portable,
AVX2+FMA, AVX-512), each with its own ``-m`` flags, linked into the same module; the bindings
pick one at run time from the CPU's features (``SELFATTN_NATIVE_ISA=avx2|avx512|generic``
overrides). The build lives in ``${SELFATTN_CACHE:-~/.cache/selfattn}/native-<hash>``, the hash
covering the sources, the flags, torch's version, the Python ABI and the compiler's identity, so
an unchanged build is imported directly (no ninja run) and a changed one is never reused.

:func:`load` returns the module (building it if needed) and :func:`unavailable` says in one line
why it cannot be had (no compiler, no ninja, a compile error); importing this file never raises.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

__all__ = ["build_dir", "load", "unavailable"]

NAME = "selfattn_native"
CSRC = Path(__file__).resolve().parent / "csrc"
HEADERS = [
    "common.h",
    "util.h",
    "simd_avx512.h",
    "simd_avx2.h",
    "simd_generic.h",
    "microkernel.h",
    "plan.h",
    "pack.h",
    "forward.h",
    "decode.h",
    "backward.h",
    "probs.h",
    "engine.h",
]
BINDINGS = "bindings.cpp"
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fno-plt"]
# extra flags for every compile, e.g. "-DSELFATTN_POISON" (scratch starts as NaN) or sanitizers;
# they are part of the build's hash
EXTRA_ENV = "SELFATTN_NATIVE_CXXFLAGS"
# the ISA objects: (source, flags); the bindings link them in this order (see common.h)
OBJECTS = [
    ("kernels_generic.cpp", []),
    ("kernels_avx2.cpp", ["-mavx2", "-mfma", "-mf16c"]),
    (
        "kernels_avx512.cpp",
        ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c"],
    ),
]
BINDINGS_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


class BuildError(RuntimeError):
    """Why the extension cannot be built or loaded (one line)."""


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


def _key(compiler_id: str) -> str:
    import torch

    h = hashlib.sha256()
    for name in [*HEADERS, BINDINGS, *(src for src, _ in OBJECTS)]:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    flags = [CXXFLAGS, BINDINGS_FLAGS, OBJECTS, _extra_flags()]
    for part in (repr(flags), torch.__version__, compiler_id, sys.version, platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_dir(compiler_id: str | None = None) -> Path:
    """Where this build of the extension lives (or will)."""
    if compiler_id is None:
        compiler_id = _compiler()[1]
    root = Path(os.environ.get("SELFATTN_CACHE") or Path.home() / ".cache" / "selfattn")
    return root / f"native-{_key(compiler_id)}"


def _import(so: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, so)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import {so}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compile_objects(cxx: str, out: Path) -> list[Path]:
    """Compile the ISA objects in parallel (each written under a temporary name, then renamed)."""
    procs = []
    objs = []
    for src, flags in OBJECTS:
        obj = out / (Path(src).stem + ".o")
        objs.append(obj)
        if obj.exists():
            continue
        tmp = out / f"{obj.name}.{os.getpid()}.tmp"
        cmd = [cxx, *CXXFLAGS, *flags, *_extra_flags(), "-I", str(CSRC), "-c", str(CSRC / src)]
        cmd += ["-o", str(tmp)]
        procs.append((obj, tmp, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
    failure = None
    for obj, tmp, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            failure = failure or f"C++ build failed: {_first_line(err)}"
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, obj)
    if failure:
        raise BuildError(failure)
    return objs


def _build(cxx: str, out: Path) -> ModuleType:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja not found (pip install ninja)")
    out.mkdir(parents=True, exist_ok=True)
    objs = _compile_objects(cxx, out)
    try:
        return cpp_extension.load(
            name=NAME,
            sources=[str(CSRC / BINDINGS)],
            extra_cflags=[*BINDINGS_FLAGS, *_extra_flags()],
            extra_include_paths=[str(CSRC)],
            extra_ldflags=[*map(str, objs), "-fopenmp", *_extra_flags()],
            build_directory=str(out),
            verbose=False,
        )
    except Exception as exc:  # cpp_extension raises RuntimeError with the build log
        raise BuildError(f"C++ build failed: {_first_line(str(exc))}") from exc


def _load() -> ModuleType:
    cxx, compiler_id = _compiler()
    out = build_dir(compiler_id)
    so = out / f"{NAME}.so"
    if so.exists():
        try:
            return _import(so)
        except ImportError:
            pass  # a stale or partial build: rebuild below
    return _build(cxx, out)


def load() -> ModuleType:
    """The extension module, built on first use; raises :class:`BuildError` with the reason."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _error is None:
            try:
                _module = _load()
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


def main() -> int:
    t0 = time.perf_counter()
    why = unavailable()
    if why is not None:
        print(f"selfattn native: unavailable: {why}", file=sys.stderr)
        return 1
    mod = load()
    print(
        f"selfattn native: {build_dir()} ({time.perf_counter() - t0:.2f} s), "
        f"isa {mod.isa('float32')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
