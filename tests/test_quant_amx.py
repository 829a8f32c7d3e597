"""int8 keys scored on AMX tiles (csrc/amx.h) where the CPU has AMX-INT8: a decode step's q rows
as four base-256 digits times the codes, exact in int32, combined in float32.

Each test holds attention on the codes to an fp64 oracle on ``dequantize()`` within float32
rounding, on whichever path this machine takes, and compares the default run with
``SELFATTN_NATIVE_AMX=0`` (the AVX-512 vector kernels) in a separate process: on a CPU without
AMX both are the vector kernels and agree exactly. The shapes are those the AMX path takes (int8
keys of 64 channels, one scale per row, R = G * Nq <= 4 rows, whole tiles of 32 keys, the last
partial tile on the vector kernel) and the rows it hands back to the vector kernels (q rows
outside [2^-60, 2^60], not finite).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfattn
from helpers import gen
from selfattn import quantize_kv

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"atol": 5e-6, "rtol": 5e-5}  # float32 rounding of O(1) outputs


def _case(hq, hkv, nq, nk, seed=0, qscale=1.0):
    g = gen(seed)
    q = torch.randn(1, hq, nq, 64, generator=g) * qscale
    k = torch.randn(1, hkv, nk, 64, generator=g)
    k[..., 3] *= 6.0  # an outlier channel
    v = torch.randn(1, hkv, nk, 64, generator=g)
    return q, quantize_kv(k, bits=8), quantize_kv(v, bits=8)


def _oracle(q, kq, vq, **rules):
    return selfattn.attention(
        q.double(), kq.dequantize().double(), vq.dequantize().double(), backend="reference", **rules
    )


@pytest.mark.parametrize(
    ("hq", "hkv", "nq", "nk"),
    [
        (9, 3, 1, 8192),
        (3, 3, 1, 100),
        (12, 3, 1, 1025),
        (6, 3, 2, 300),
        (2, 2, 1, 32),
        (4, 1, 1, 64),
    ],
)
def test_amx_scores_equal_the_dequantized_values(hq, hkv, nq, nk):
    q, kq, vq = _case(hq, hkv, nq, nk)
    got = selfattn.attention(q, kq, vq, backend="native", causal=nq > 1)
    torch.testing.assert_close(got.double(), _oracle(q, kq, vq, causal=nq > 1), **TOL)


def test_q_rows_of_every_magnitude_and_mixed_channels():
    """Rows the digits take (1e-12 .. 1e5, one row with channels 1e6 apart) and a row below
    2^-60 that goes to the vector kernels; then the rows scaled to O(1) scores."""
    q, kq, vq = _case(4, 1, 1, 640, seed=3)
    q[0, 0] *= 1e-12
    q[0, 1] *= 1e5
    q[0, 2, 0, ::2] *= 1e-6  # half the channels a millionth of the others
    q[0, 3] *= 1e-25  # below 2^-60: the vector kernels
    scaled = q * torch.tensor([1e12, 1e-5, 1.0, 1e25]).view(1, 4, 1, 1)
    for rows in (q, scaled):
        got = selfattn.attention(rows, kq, vq, backend="native")
        torch.testing.assert_close(got.double(), _oracle(rows, kq, vq), **TOL)


def test_a_zero_row_and_non_finite_rows_as_the_dequantized_values():
    q, kq, vq = _case(4, 1, 1, 256, seed=4)
    q[0, 0] = 0.0
    q[0, 1, 0, 5] = float("nan")
    q[0, 2, 0, 7] = float("inf")
    got = selfattn.attention(q, kq, vq, backend="native")
    want = selfattn.attention(q, kq.dequantize(), vq.dequantize(), backend="native")
    torch.testing.assert_close(got, want, equal_nan=True, **TOL)
    assert torch.isnan(got[0, 1]).all() and torch.isnan(got[0, 2]).all()
    assert torch.isfinite(got[0, 0]).all() and torch.isfinite(got[0, 3]).all()


SCRIPT = """
import sys, torch, selfattn
from selfattn import quantize_kv
torch.set_num_threads(1)
g = torch.Generator().manual_seed(7)
q = torch.randn(1, 9, 1, 64, generator=g)
k = quantize_kv(torch.randn(1, 3, 4097, 64, generator=g), bits=8)
v = quantize_kv(torch.randn(1, 3, 4097, 64, generator=g), bits=8)
torch.save(selfattn.attention(q, k, v, backend="native"), sys.argv[1])
"""


def test_amx_off_switch_gives_the_vector_kernels_result(tmp_path: Path):
    """SELFATTN_NATIVE_AMX=0 runs the vector kernels: both results within float32 rounding."""
    outs = []
    for flag in ("1", "0"):
        env = {**os.environ, "SELFATTN_NATIVE_AMX": flag}
        out = tmp_path / f"out{flag}.pt"
        subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, check=True, timeout=600)
        outs.append(torch.load(out))
    torch.testing.assert_close(outs[0], outs[1], **TOL)
