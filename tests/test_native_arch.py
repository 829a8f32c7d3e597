"""The native build per architecture: which ISA objects, which flags, and the Makefile's driver.

The engine itself is checked on every ISA by the torch-free driver (tests/native/driver.cpp:
``make check-native``, ``make check-sanitize``, ``make check-arm``); these tests check that the
Python build and the Makefile agree on what is compiled where.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from selfattn.backends.native import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("machine", "isas"),
    [
        ("x86_64", ["generic", "avx2", "avx512"]),
        ("AMD64", ["generic", "avx2", "avx512"]),
        ("aarch64", ["generic", "neon"]),
        ("arm64", ["generic", "neon"]),
        ("riscv64", ["generic"]),
        ("ppc64le", ["generic"]),
    ],
)
def test_objects_follow_the_architecture(machine: str, isas: list[str]) -> None:
    # before: x86's -mavx2 / -mavx512f objects were compiled on every machine (ARM could not build)
    objs = build.objects_for(machine)
    assert [Path(src).stem.removeprefix("kernels_") for src, _ in objs] == isas
    for src, flags in objs:
        assert (build.CSRC / src).is_file()
        if machine.lower() not in ("x86_64", "amd64"):
            assert not any(f.startswith("-m") for f in flags), (src, flags)


def test_openmp_flag_only_for_gcc_on_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    # Apple's clang has no -fopenmp: the flag must never reach a clang build or a macOS one
    assert build.openmp_flags("Apple clang version 15.0.0 (clang-1500.3.9.4)") == []
    assert build.openmp_flags("Ubuntu clang version 18.1.3") == []
    monkeypatch.setattr(build.sys, "platform", "darwin")
    assert build.openmp_flags("g++-14 (Homebrew GCC 14.2.0) 14.2.0") == []


def test_openmp_flag_matches_torchs_pool_with_gcc_on_linux() -> None:
    if not build.sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    import torch

    openmp_pool = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert build.openmp_flags("g++ (Debian 12.2.0-14) 12.2.0") == (
        ["-fopenmp"] if openmp_pool else []
    )


def test_makefile_driver_flags_match_the_build() -> None:
    # the driver (make check-*) must test the objects the library builds, with the same -m flags
    text = (ROOT / "Makefile").read_text()
    make_flags = {
        m.group(1): m.group(2).split() for m in re.finditer(r"^ISA_(\w+)\s*:=(.*)$", text, re.M)
    }
    for machine in ("x86_64", "aarch64"):
        for src, flags in build.objects_for(machine):
            assert make_flags[Path(src).stem.removeprefix("kernels_")] == flags, src


def test_auto_prefers_sdpa_on_arm_until_neon_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 16: NEON's speed is unmeasured, so on ARM auto must not put native before SDPA
    import torch

    from selfattn import backends

    cpu = torch.device("cpu")
    for machine in ("aarch64", "arm64"):
        monkeypatch.setattr(backends.platform, "machine", lambda m=machine: m)
        order = backends.candidates(cpu)
        assert order.index("sdpa") < order.index("native") < order.index("tiled")
        assert backends.candidates(torch.device("cuda"))[0] == "triton"
    monkeypatch.setattr(backends.platform, "machine", lambda: "x86_64")
    assert backends.candidates(cpu)[0] == "native"


def test_arm_auto_sends_what_sdpa_declines_to_native(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from selfattn import backends
    from selfattn.spec import validate

    if backends.BACKENDS["native"].unavailable() is not None:
        pytest.skip("native unavailable")
    monkeypatch.setattr(backends.platform, "machine", lambda: "aarch64")
    q = torch.randn(1, 2, 8, 16)
    assert backends.select(validate(q, q, q), "auto").name == "sdpa"
    windowed = validate(q, q, q, window=(2, 0))
    assert backends.select(windowed, "auto").name == "native"
