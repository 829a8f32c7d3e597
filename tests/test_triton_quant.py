"""The ``triton`` kernels reading a :class:`selfattn.QuantizedKV` (int8, 4-bit, rotation): the
forward and split-K decode kernels dequantize the codes in registers, and the result equals
attention on ``dequantize()`` (bitwise for unrotated codes, whose operands are identical;
within float32 rounding with rotation, where q and the output are rotated instead).

Under Triton's interpreter (``TRITON_INTERPRET=1``) and, where there is one, on a CUDA GPU.
Shapes are small and odd (D = 40 pads to 64 columns; 67 keys span three 32-key tiles).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import selfattn
import test_triton
from helpers import make_qkv, max_err, to_np
from selfattn.backends.triton import TritonBackend, host, interp
from selfattn.quant import QuantizedKV, quantize_kv
from selfattn.spec import validate
from test_triton import rules, to

dev = test_triton.dev  # the fixture: the interpreter on CPU tensors, or the GPU


def on(x, dev):
    """A tensor or QuantizedKV on ``dev``."""
    if type(x) is QuantizedKV:
        return QuantizedKV(
            x.codes.to(dev), x.scales.to(dev), bits=x.bits, group_size=x.group_size,
            rotate=x.rotate, dtype=x.dtype,
        )  # fmt: skip
    return x.to(dev)


def deq(x):
    return x.dequantize() if type(x) is QuantizedKV else x


def run_quantized(q, k, v, dev, **kw):
    """The triton backend handed the QuantizedKV itself (the kernels read its codes)."""
    q, k, v = on(q, dev), on(k, dev), on(v, dev)
    kw = to(kw, dev)
    spec = validate(q, deq(k), deq(v), return_lse=True, **kw)
    return TritonBackend().run_quantized(spec, q, k, v, None)


def run_dequantized(q, k, v, dev, **kw):
    q, k, v = on(q, dev), on(deq(k), dev), on(deq(v), dev)
    return selfattn.attention(q, k, v, backend="triton", return_lse=True, **to(kw, dev))


def check(dev, shape, rule, kbits, vbits, rotate, dtype=torch.float32):
    b, hq, hkv, nq, nk, d, dv = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dv, dtype=dtype, seed=3)
    kq = quantize_kv(k, bits=kbits, rotate=rotate) if kbits else k
    vq = quantize_kv(v, bits=vbits, rotate=rotate) if vbits else v
    kw = rules(rule, b, hq, nq, nk, dtype)
    out, lse = run_quantized(q, kq, vq, dev, **kw)
    want, want_lse = run_dequantized(q, kq, vq, dev, **kw)
    assert out.dtype == dtype and out.shape == (b, hq, nq, dv)
    # Triton's interpreter truncates float32 -> bfloat16 where torch (and the GPU) round to
    # nearest: there the dequantized keys may differ from dequantize()'s in the last bit
    exact = not rotate and not (dev.type == "cpu" and dtype == torch.bfloat16)
    if exact:  # the same operands reach the same tiles: the same bits
        assert torch.equal(out, want) and torch.equal(lse, want_lse), rule
        return
    # rotation moves where float32 rounds (q and the output are rotated instead)
    tol = 2e-6 if dtype == torch.float32 else 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert max_err(out, to_np(want.float())) < tol * max(1.0, float(want.abs().max()))
    fin = torch.isfinite(want_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    lse_tol = 1e-5 if dtype == torch.float32 else tol
    assert max_err(lse[fin], to_np(want_lse[fin])) < lse_tol * max(1.0, float(want_lse.abs().max()))


SHAPE = (1, 4, 2, 37, 67, 40, 32)  # GQA 4 -> 2, D 40 (padded), Dv 32


CONFIGS = {  # (k bits, v bits, rotate); 0 bits: a float tensor
    "int8": (8, 8, False),
    "int4": (4, 4, False),
    "int4-rot": (4, 4, True),
    "k8-rot": (8, 0, True),
    "v4-rot": (0, 4, True),
    "k4v8": (4, 8, False),
}
FORWARD = [
    ("int8", "none"), ("int8", "causal"), ("int8", "mask"), ("int8", "combo"),
    ("int4", "window"), ("int4", "segments"), ("int4", "combo"),
    ("int4-rot", "causal"), ("int4-rot", "combo"), ("k8-rot", "mask"), ("v4-rot", "causal"),
]  # fmt: skip


@pytest.mark.parametrize("config, rule", FORWARD, ids=[f"{c}-{r}" for c, r in FORWARD])
def test_quantized_forward_equals_dequantized(dev, config, rule, monkeypatch):
    monkeypatch.setattr(host, "DECODE_MODE", "never")
    check(dev, SHAPE, rule, *CONFIGS[config])


DECODE = [("int8", "none"), ("int8", "combo"), ("int4-rot", "causal"), ("k4v8", "window")]


@pytest.mark.parametrize("config, rule", DECODE, ids=[f"{c}-{r}" for c, r in DECODE])
def test_quantized_decode_equals_dequantized(dev, config, rule, monkeypatch):
    """The split-K decode kernel (GQA 6 -> 2, three splits) reads the codes too."""
    monkeypatch.setattr(host, "DECODE_MODE", "always")
    monkeypatch.setitem(interp.INTERPRET_BLOCKS, "decode_splits", 3)
    check(dev, (2, 6, 2, 3, 150, 40, 32), rule, *CONFIGS[config])


@pytest.mark.parametrize(
    "bits, group", [(8, 20), (8, 8), (4, 4), (4, 10)], ids=["8g20", "8g8", "4g4", "4g10"]
)
def test_quantized_group_sizes(dev, bits, group, monkeypatch):
    """Scales per row (the defaults), per power-of-two group (broadcast) and per odd group
    (gathered per element) all dequantize as dequantize() does."""
    monkeypatch.setattr(host, "DECODE_MODE", "never")
    q, k, v = make_qkv(1, 2, 1, 37, 67, 40, seed=4)
    kq = quantize_kv(k, bits=bits, group_size=group)
    vq = quantize_kv(v, bits=bits, group_size=group)
    out, lse = run_quantized(q, kq, vq, dev, causal=True)
    want, want_lse = run_dequantized(q, kq, vq, dev, causal=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rot"])
def test_quantized_half_dtypes(dev, dtype, rotate, monkeypatch):
    """Codes are dequantized to the float dtype the QuantizedKV records, as dequantize() does."""
    monkeypatch.setattr(host, "DECODE_MODE", "never")
    check(dev, (1, 2, 1, 37, 67, 64, 64), "causal", 8, 4, rotate, dtype)


def test_quantized_view_of_a_longer_store(dev, monkeypatch):
    """A cache hands attention a narrowed view of preallocated codes: strides, not a copy."""
    monkeypatch.setattr(host, "DECODE_MODE", "always")
    _, k, v = make_qkv(1, 2, 2, 1, 200, 64, seed=5)
    q = make_qkv(1, 4, 2, 2, 120, 64, seed=6)[0]
    kq = quantize_kv(k, bits=4).narrow(0, 120)
    vq = quantize_kv(v, bits=8).narrow(0, 120)
    out, lse = run_quantized(q, kq, vq, dev, causal=True)
    want, want_lse = run_dequantized(q, kq, vq, dev, causal=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rot"])
def test_quantized_gradient_of_q(dev, rotate, monkeypatch):
    """q gets its gradient through quantized keys and values (dequantized for the backward
    kernels only); the QuantizedKV gets none."""
    monkeypatch.setattr(host, "DECODE_MODE", "never")
    q, k, v = make_qkv(1, 4, 2, 37, 67, 32, seed=8)
    kq, vq = quantize_kv(k, bits=8, rotate=rotate), quantize_kv(v, bits=4, rotate=rotate)
    dout = torch.randn(1, 4, 37, 32, generator=torch.Generator().manual_seed(9)).to(dev)
    qq = q.to(dev).requires_grad_(True)
    spec = validate(qq, deq(kq).to(dev), deq(vq).to(dev), causal=True)
    out, _ = TritonBackend().run_quantized(spec, qq, on(kq, dev), on(vq, dev), None)
    (got,) = torch.autograd.grad((out * dout).sum(), [qq])
    qm = q.to(dev).requires_grad_(True)
    ref = selfattn.attention(qm, deq(kq).to(dev), deq(vq).to(dev), causal=True, backend="math")
    (want,) = torch.autograd.grad((ref * dout).sum(), [qm])
    assert max_err(got, to_np(want)) < 1e-5 * max(1.0, float(want.abs().max()))


def test_quantized_nan_scale_poisons_only_rows_that_see_its_key(dev, monkeypatch):
    """A NaN scale (quantize_kv of a NaN value) is treated as a bad key by a kernel reading
    codes: rows that see it are NaN, rows the rules hide it from are untouched."""
    monkeypatch.setattr(host, "DECODE_MODE", "never")
    q, k, v = make_qkv(1, 2, 2, 37, 67, 32, seed=10)
    kq, vq = quantize_kv(k, bits=8), quantize_kv(v, bits=8)
    vq.scales[0, 0, 50, 0] = float("nan")  # key 50 of head 0; causal: rows 20.. see it
    kq.scales[0, 1, 60, 0] = float("nan")  # key 60 of head 1: rows 30.. see it
    out, lse = run_quantized(q, kq, vq, dev, causal=True)
    out, lse = out.cpu(), lse.cpu()
    assert torch.isfinite(out[0, 0, :20]).all() and out[0, 0, 20:].isnan().all()
    assert torch.isfinite(lse[0, 0, :20]).all() and lse[0, 0, 20:].isnan().all()  # a bad key
    assert torch.isfinite(out[0, 1, :30]).all() and out[0, 1, 30:].isnan().all()
    assert lse[0, 1, 30:].isnan().all()


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rot"])
def test_front_door_hands_triton_the_codes(dev, rotate, monkeypatch):
    """``selfattn.attention(q, QuantizedKV, QuantizedKV, backend="triton")`` never dequantizes:
    the kernels read the codes (dequantize() raises here) and give the dequantized result."""
    monkeypatch.setattr(host, "DECODE_MODE", "always")
    q, k, v = make_qkv(1, 4, 2, 3, 90, 32, seed=12)
    kq, vq = quantize_kv(k, bits=4, rotate=rotate), quantize_kv(v, bits=8, rotate=rotate)
    want = selfattn.attention(q, kq.dequantize(), vq.dequantize(), causal=True, backend="math")

    def refuse(self, *, rotated=False):
        raise AssertionError("dequantize() called on the triton path")

    monkeypatch.setattr(QuantizedKV, "dequantize", refuse)
    got = selfattn.attention(q.to(dev), on(kq, dev), on(vq, dev), causal=True, backend="triton")
    assert max_err(got, to_np(want)) < 2e-6


@pytest.mark.gpu
@pytest.mark.parametrize("bits, rotate", [(8, False), (4, True)], ids=["int8", "int4-rot"])
def test_gpu_quantized_decode_long_cache(bits, rotate):
    """A decode step over 32k quantized keys (GQA 32 -> 8, D 128, bf16) through the front door:
    the split-K kernel reads the codes; equal to the same kernels on dequantize()."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (
        torch.randn(1, 8, 32768, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(2)
    )
    kq, vq = quantize_kv(k, bits=bits, rotate=rotate), quantize_kv(v, bits=bits, rotate=rotate)
    out, lse = selfattn.attention(q, kq, vq, backend="triton", return_lse=True)
    want, want_lse = selfattn.attention(
        q, kq.dequantize(), vq.dequantize(), backend="triton", return_lse=True
    )
    # one bfloat16 step of the output (TMA vs pointer loads, rotation's other rounding basis)
    tol = 1e-2
    assert (out.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    assert (lse - want_lse).abs().max() <= 1e-3
