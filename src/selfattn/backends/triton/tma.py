"""Hopper's tensor-memory accelerator for K/V in the forward kernels: the descriptors, the
layouts they can describe, and a probe per device that must match the pointer kernel first."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ...spec import validate
from . import interpreting

try:  # host-side TMA descriptors (Triton >= 3.3); without them the kernels use pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

__all__ = [
    "MODE",
    "VERIFIED",
    "TensorDescriptor",
    "descriptor_args",
    "device_key",
    "distrust",
    "layout_ok",
    "probe",
    "set_block_shapes",
    "use_tma",
]

# SELFATTN_TRITON_TMA: auto (default: a GPU of compute capability >= 9 once the probe agreed),
# 1 (whenever the layout allows, the interpreter too: for tests) or 0 (never)
MODE = os.environ.get("SELFATTN_TRITON_TMA", "auto")
VERIFIED: dict[Any, bool] = {}  # device key -> whether TMA is trusted there

# host.forward, passed in by the launcher (the probe runs it with and without TMA)
Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def descriptor_args(k: torch.Tensor, v: torch.Tensor, tma: bool) -> dict[str, Any]:
    """DESC_K / DESC_V / USE_TMA for the forward kernels (plain tensors when TMA is off)."""
    if not tma:
        return {"DESC_K": k, "DESC_V": v, "USE_TMA": False}
    # 4-D descriptors over (B, Hkv, Nk, D): the block shape is set per configuration
    return {
        "DESC_K": TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, 16, 16]),
        "DESC_V": TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, 16, 16]),
        "USE_TMA": True,
    }


def set_block_shapes(nargs: dict) -> None:
    """The descriptors' tile shape follows the configuration's (also the autotuner's pre-hook)."""
    if nargs.get("USE_TMA"):
        nargs["DESC_K"].block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_D"]]
        nargs["DESC_V"].block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_DV"]]


def layout_ok(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, unit last stride and other strides 16-byte multiples."""
    elt = t.element_size()
    return (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(st > 0 and st * elt % 16 == 0 for st in t.stride()[:-1])
    )


def device_key(device: torch.device) -> Any:
    """The key of ``VERIFIED`` for a device (a CUDA device's index)."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.current_device() if device.index is None else device.index


def distrust(device: torch.device) -> None:
    """Use pointers on this device from now on (a TMA kernel failed to build there)."""
    VERIFIED[device_key(device)] = False


def use_tma(k: torch.Tensor, v: torch.Tensor, forward: Forward) -> bool:
    """Whether the forward kernels read keys and values through TMA descriptors.

    ``MODE`` (``SELFATTN_TRITON_TMA``): ``0`` never, ``1`` whenever the layout allows (the
    interpreter too, for tests), ``auto`` on a GPU of compute capability >= 9 once
    :func:`probe` has matched the pointer kernel on this device; any failure falls back.
    """
    if TensorDescriptor is None or MODE == "0":
        return False
    if not (layout_ok(k) and layout_ok(v)):
        return False
    if MODE == "1":
        return True
    if interpreting() or k.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    return probe(k.device, forward)


def probe(device: torch.device, forward: Forward) -> bool:
    """Run a small causal call with and without TMA; keep TMA only if they agree."""
    key = device_key(device)
    if key in VERIFIED:
        return VERIFIED[key]
    VERIFIED[key] = False  # also while probing: no recursion
    ok = False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (
            torch.randn(1, 2, 300, 64, generator=g, device=device, dtype=torch.bfloat16)
            for _ in range(3)
        )
        spec = validate(q, k, v, causal=True, return_lse=True)
        ref, ref_lse = forward(spec, q, k, v, None, tma=False, tune=False)
        got, got_lse = forward(spec, q, k, v, None, tma=True, tune=False)
        ok = bool(
            torch.isfinite(got).all()
            and (got.float() - ref.float()).abs().max() < 2e-2
            and (got_lse - ref_lse).abs().max() < 1e-3
        )
        if not ok:
            warnings.warn(
                "selfattn: the TMA forward kernel disagreed with the pointer kernel on this "
                "GPU; using pointers (set SELFATTN_TRITON_TMA=0 to skip this check)",
                RuntimeWarning,
                stacklevel=2,
            )
    except Exception as exc:  # a Triton without working TMA for this kernel: fall back
        warnings.warn(
            f"selfattn: TMA kernels unavailable ({type(exc).__name__}: {exc}); using pointers",
            RuntimeWarning,
            stacklevel=2,
        )
    VERIFIED[key] = ok
    return ok
