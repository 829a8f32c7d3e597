"""Which CPU a measurement was taken on: every results file records it, so every figure in the
README can name its CPU (``benchmarks/readme_tables.py`` refuses a results file without it)."""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import Any

__all__ = ["cpu_info", "cpu_label"]

# /proc/cpuinfo keys: x86 ("model name", "cpu family", "model"), aarch64 ("CPU implementer",
# "CPU part": no marketing name there)
_KEYS = {
    "model name": "model",
    "cpu family": "family",
    "model": "model_id",
    "cpu implementer": "implementer",
    "cpu part": "part",
}


def _proc_cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo that name the CPU ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        name = _KEYS.get(key.strip().lower())
        if name and name not in out:
            out[name] = value.strip()
    return out


def cpu_info(threads: int | None = None) -> dict[str, Any]:
    """The CPU this process runs on: ``model`` (lscpu's model name), ``family``/``model_id`` (x86)
    or ``implementer``/``part`` (ARM) where the OS says, ``arch``, ``cores`` (logical CPUs),
    ``isa`` (the native engine's float32 kernels, or why there are none; ``SELFATTN_NATIVE_ISA``
    limits it), ``torch_isa`` (torch's CPU capability; ``ATEN_CPU_CAPABILITY`` limits it), ``mkl``
    (``MKL_ENABLE_INSTRUCTIONS``, "default" when unset) and ``threads`` (torch's intra-op
    threads, or ``threads`` when given)."""
    import os

    import torch

    info: dict[str, Any] = {"model": "", **_proc_cpuinfo()}
    if not info["model"]:
        info["model"] = platform.processor() or platform.machine() or "unknown"
    info["model"] = re.sub(r"\s+", " ", info["model"])
    info["arch"] = platform.machine()
    info["cores"] = os.cpu_count()
    from ..backends.native import unavailable

    why = unavailable()
    if why is None:
        from ..backends.native import load

        info["isa"] = load().isa("float32")
    else:
        info["isa"] = f"no native engine: {why}"
    info["torch_isa"] = torch.backends.cpu.get_cpu_capability()
    info["mkl"] = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "default")
    info["threads"] = torch.get_num_threads() if threads is None else threads
    return info


def cpu_label(cpu: dict[str, Any]) -> str:
    """One line naming a recorded CPU: "Intel(R) Xeon(R) Processor (x86_64, 2 cores, avx512)"."""
    bits = [str(cpu[k]) for k in ("arch",) if cpu.get(k)]
    if cpu.get("cores"):
        bits.append(f"{cpu['cores']} cores")
    isa = str(cpu.get("isa", ""))
    if isa and not isa.startswith("no native"):
        bits.append(f"native {isa}")
    if cpu.get("torch_isa"):
        bits.append(f"torch {cpu['torch_isa']}, MKL {cpu.get('mkl', 'default')}")
    model = str(cpu["model"])
    if model == "not recorded":  # an old results file: say so rather than guess
        model = "a CPU that was not recorded"
    return f"{model} ({', '.join(bits)})" if bits else model
