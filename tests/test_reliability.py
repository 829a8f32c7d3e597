"""Issue 17's defects, one test per defect: window sides of any size, values the kernels cannot
hold, NaN semantics, second derivatives, exception types, empty value heads, out of memory and
the accuracy of large head dims. Each test failed before its fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import selfattn
from helpers import make_qkv, ref_attention, to_np
from selfattn import reference

M = sys.maxsize
TORCH_BACKENDS = ["math", "tiled", "native"]
BACKENDS = ["reference", *TORCH_BACKENDS]


def _np_qkv(seed=0, nq=5, nk=7, d=8):
    q, k, v = make_qkv(1, 2, 2, nq, nk, d, seed=seed)
    return q, k, v


# -- 1, 2: window sides of any size -------------------------------------------------------------


@pytest.mark.parametrize("window", [(None, M), (M, 0), (M, M), (0, M), (3, M)])
def test_window_side_near_int64_max_restricts_nothing(window):
    """A side larger than any distance restricts nothing: (None, M) is no window, (M, 0) causal."""
    left, right = ((None if w == M else w) for w in window)
    for nq, nk in [(5, 7), (7, 5)]:
        q, k, v = _np_qkv(nq=nq, nk=nk)
        same = reference.attention(q.numpy(), k.numpy(), v.numpy(), window=(left, right))
        got = reference.attention(q.numpy(), k.numpy(), v.numpy(), window=window)
        np.testing.assert_array_equal(got, same)  # the specification itself first
        for backend in TORCH_BACKENDS:
            out = selfattn.attention(q, k, v, window=window, backend=backend)
            np.testing.assert_allclose(to_np(out), same, atol=2e-6, err_msg=backend)


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_window_side_near_int64_max_gradient(backend):
    """native's gradient for window=(M, 0) was all zeros: it equals causal's."""
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8, requires_grad=True)
    grads = []
    for kwargs in ({"window": (M, 0)}, {"causal": True}):
        out = selfattn.attention(q, k, v, backend=backend, **kwargs)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert a.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(None, 2**63), (2**70, 0), (2**200, 2**64)])
def test_window_side_beyond_int64_is_honoured(backend, window):
    """Sides >= 2**63 are ints like any other: honoured (they restrict nothing), not
    OverflowError, a page of pybind signatures or zero rows."""
    q, k, v = _np_qkv()
    left, right = ((None if w is None or w >= 2**63 else w) for w in window)
    expect = reference.attention(q.numpy(), k.numpy(), v.numpy(), window=(left, right))
    out = selfattn.attention(q, k, v, window=window, backend=backend)
    np.testing.assert_allclose(to_np(out), expect, atol=2e-6)


def test_weights_window_side_near_int64_max_restricts_nothing():
    q, k, _ = _np_qkv()
    w = selfattn.attention_weights(q, k, window=(M, 0))
    torch.testing.assert_close(w, selfattn.attention_weights(q, k, causal=True))


@pytest.mark.parametrize("side", [1.0, True, "3", 2.5])
def test_window_side_not_an_int_is_a_value_error(side):
    q, k, v = _np_qkv()
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="window"):
            selfattn.attention(q, k, v, window=(side, 0), backend=backend)
    with pytest.raises(ValueError, match="window"):
        reference.attention(q.numpy(), k.numpy(), v.numpy(), window=(side, 0))


def test_native_key_bounds_saturate_near_int64_max():
    """The C++ key bounds saturate instead of wrapping (UBSan flagged pmax + right + 1)."""
    from selfattn.backends.native import build

    if build.unavailable():
        pytest.skip(build.unavailable())
    from selfattn.backends.native.call import record
    from selfattn.spec import validate

    ext = build.load()
    call = record(validate(*make_qkv(1, 1, 1, 9, 11, 8)))  # start 2, no rules
    for left, right in [(M, M), (M, -1), (-1, M), (M - 1, M - 1)]:
        # (blocks, [lo, hi, full_lo, full_hi])
        b = ext.bounds(call._replace(left=left, right=right), 9, 11, 4)
        assert b[:, 0].tolist() == [0, 0, 0] and b[:, 1].tolist() == [11, 11, 11]
        assert b[:, 2].tolist() == [0, 0, 0] and b[:, 3].tolist() == [11, 11, 11]


# -- 6: second derivatives ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tiled", "native"])
def test_second_derivative_on_fused_backward_raises_clearly(backend):
    """create_graph=True then a second derivative: a clear error naming the backend, never a
    first-order gradient that silently adds nothing to a gradient penalty."""
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8, requires_grad=True)
    out = selfattn.attention(q, k, v, causal=True, backend=backend)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    assert gq.requires_grad  # the first derivative itself is fine
    with pytest.raises(
        NotImplementedError, match=rf"backend '{backend}' does not support double backward"
    ):
        gq.square().sum().backward()


def test_second_derivative_through_custom_op_raises_clearly():
    from selfattn._compile import attention_op

    q, k, v = make_qkv(1, 2, 2, 5, 5, 8, requires_grad=True)
    out = attention_op(q, k, v, causal=True, backend="tiled")
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"double backward.*outside torch.compile"):
        gq.square().sum().backward()


def test_second_derivative_on_math_is_right():
    """math is plain torch: its gradient penalty matches float64 autograd of the same formula."""
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8, dtype=torch.float64, requires_grad=True)
    out = selfattn.attention(q, k, v, causal=True, backend="math")
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (ggq,) = torch.autograd.grad(gq.square().sum(), q)
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: selfattn.attention(q, k, v, causal=True, backend="math"), (q, k, v)
    )
    assert ggq.abs().sum() > 0


# -- 7, 8: exception types and arguments outside the contract -------------------------------------


def test_weights_int_lse_is_a_type_error():
    q, k, _ = _np_qkv()
    with pytest.raises(TypeError, match=r"lse must be a float tensor.*int64"):
        selfattn.attention_weights(q, k, lse=torch.zeros(1, 2, 5, dtype=torch.long))


@pytest.mark.parametrize("value", [10**400, 10**5000], ids=["1e400", "1e5000"])
def test_huge_int_scale_is_a_value_error(value):
    q, k, v = _np_qkv()
    for name in ("scale", "softcap"):
        with pytest.raises(ValueError, match=name):
            selfattn.attention(q, k, v, **{name: value})


def test_kv_cache_beyond_address_space_is_a_value_error():
    with pytest.raises(ValueError, match=r"max_len=4611686018427387904.*head_dim=4"):
        selfattn.KVCache(1, 2**62, 1, 4)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"dropout_p": None}, TypeError),
        ({"causal": None}, TypeError),
        ({"scale": False}, TypeError),
        ({"softcap": False}, TypeError),
        ({"mask": False}, TypeError),
        ({"bias": False}, TypeError),
        ({"alibi_slopes": False}, TypeError),
        ({"segment_ids": False}, TypeError),
        ({"dropout_p": False}, TypeError),
        ({"window": False}, ValueError),
    ],
)
def test_argument_outside_contract_is_refused(kwargs, error):
    """None where the signature has no None, and False for a rule that is not a bool."""
    q, k, v = _np_qkv(nq=7, nk=7)
    (name,) = kwargs
    with pytest.raises(error, match=name.split("_")[0]):
        selfattn.attention(q, k, v, **kwargs)


def test_weights_two_dimensional_rows_is_a_value_error():
    q, k, _ = _np_qkv()
    for rows in ([[0, 1], [2, 3]], torch.tensor([[0, 1]])):
        with pytest.raises(ValueError, match="rows must be a 1-D"):
            selfattn.attention_weights(q, k, rows=rows)
    with pytest.raises(ValueError, match="heads must be a 1-D"):
        selfattn.attention_weights(q, k, heads=[[0], [1]])


# -- 9, 10: empty value heads, out of memory ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_empty_value_head_dim_runs_everywhere(dtype):
    """Dv == 0 reached memset(nullptr, 0, 0) in native (UB); every path gives empty outputs and
    the lse of the scores."""
    q, k, v = make_qkv(2, 2, 1, 9, 40, 8, dv=0, dtype=dtype)
    _, lse_ref = ref_attention(q, k, v, causal=True)
    for backend in TORCH_BACKENDS:
        out, lse = selfattn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        assert out.shape == (2, 2, 9, 0)
        np.testing.assert_allclose(
            to_np(lse), lse_ref, atol=1e-2 if dtype == torch.float16 else 1e-5
        )
    w = selfattn.attention_weights(q, k, causal=True)
    assert torch.isfinite(w).all() and w.shape == (2, 2, 9, 40)


def test_native_out_of_memory_is_a_memory_error():
    """An engine buffer past what the machine can allocate (here from stride-0 keys of length
    2**45) raises MemoryError instead of writing through a null pointer (a segfault, hence the
    child process)."""
    code = textwrap.dedent(
        """
        import torch, selfattn
        from selfattn.backends.native import build
        if build.unavailable():
            print("SKIP", build.unavailable())
            raise SystemExit(0)
        q = torch.randn(1, 1, 32, 8)
        k = torch.zeros(1, 1, 1, 8).expand(1, 1, 2**45, 8)
        for nq in (32, 1):  # the row-tile forward and the split-K decode
            try:
                selfattn.attention(q[:, :, :nq], k, k, backend="native")
            except MemoryError:
                print("MemoryError")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if run.stdout.startswith("SKIP"):
        pytest.skip(run.stdout)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["MemoryError", "MemoryError"], run.stdout
