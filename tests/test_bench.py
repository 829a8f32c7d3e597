"""The benchmark room's record of the machine a figure was taken on."""

from __future__ import annotations

import os

import torch

from selfattn.bench.machine import cpu_info, cpu_label


def test_results_meta_names_the_isas_torch_and_mkl_run():
    # an AVX2 run on an AVX-512 machine must say that torch and MKL were limited too
    cpu = cpu_info()
    assert cpu["torch_isa"] == torch.backends.cpu.get_cpu_capability()
    assert cpu["mkl"] == os.environ.get("MKL_ENABLE_INSTRUCTIONS", "default")
    label = cpu_label(cpu)
    assert f"torch {cpu['torch_isa']}" in label and f"MKL {cpu['mkl']}" in label
    assert cpu_label({"model": "X", "arch": "x86_64"}) == "X (x86_64)"  # old files: no torch_isa
