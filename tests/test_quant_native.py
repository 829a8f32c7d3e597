"""``native`` reads a ``QuantizedKV``'s codes in place (csrc/quant.h), in decode and in prefill.

Attention on the codes must equal attention on ``dequantize()`` (an fp64 oracle on the same
values) within float32 rounding for every rule, 8 and 4 bits, rotated or not, GQA, odd shapes,
k quantized with v plain and the reverse; 16-bit q is compared with float32 values (native
dequantizes to float32, ``dequantize()`` rounds to 16 bits). No dequantized copy of the cache is
made (the profiler sees no allocation of its size), and a layout the kernels cannot read is a
ValueError before any work.
"""

from __future__ import annotations

import pytest
import torch

import selfattn
from helpers import gen
from selfattn import KVCache, QuantizedKV, quantize_kv
from selfattn.backends.native import build
from selfattn.backends.native.call import STORAGE_FIELDS, record
from selfattn.quant import standin
from selfattn.spec import validate

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = [(8, False), (8, True), (4, False), (4, True)]
TOL = {"atol": 5e-6, "rtol": 5e-5}  # float32 rounding of O(1) outputs


def _qkv(b, hq, hkv, nq, nk, d, seed=0, dtype=torch.float32):
    g = gen(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    k[..., 1] *= 8.0  # an outlier channel, as real keys have
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _dense64(x):
    """The values a QuantizedKV stands for, in float64 (codes * float32 scales, rotated back)."""
    if not isinstance(x, QuantizedKV):
        return x.double()
    if x.dtype == torch.float64:  # dequantized (and rotated back) in float64
        return x.dequantize()
    f32 = QuantizedKV(
        x.codes, x.scales, bits=x.bits, group_size=x.group_size, rotate=x.rotate,
        dtype=torch.float32,
    )  # fmt: skip
    return f32.dequantize().double()


def _oracle(q, k, v, **rules):
    return selfattn.attention(
        q.double(), _dense64(k), _dense64(v), backend="reference", return_lse=True, **rules
    )


def _rules(name, b, hq, nq, nk):
    g = gen(5)
    return {
        "none": {},
        "causal": {"causal": True},
        "window": {"window": (13, 2)},
        "mask": {"mask": torch.rand(b, hq, nq, nk, generator=g) < 0.7},
        "bias": {"bias": torch.randn(b, hq, nq, nk, generator=g)},
        "alibi": {"alibi_slopes": torch.rand(hq, generator=g) * 0.3},
        "softcap": {"softcap": 3.0},
        "segments": {
            "segment_ids": (
                torch.randint(0, 2, (b, nq), generator=g),
                torch.randint(-1, 2, (b, nk), generator=g),
            )
        },
        "scale": {"scale": 0.2},
        "sinks": {"sinks": torch.randn(hq, generator=g)},
        "all": {
            "causal": True,
            "window": (40, 0),
            "bias": torch.randn(b, hq, nq, nk, generator=g),
            "alibi_slopes": torch.rand(hq, generator=g) * 0.3,
            "softcap": 3.0,
            "sinks": torch.randn(hq, generator=g),
        },
    }[name]


RULES = ["none", "causal", "window", "mask", "bias", "alibi", "softcap", "segments", "scale"]
RULES += ["sinks", "all"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bits,rotate", FORMATS)
@pytest.mark.parametrize("nq", [3, 97], ids=["decode", "prefill"])
def test_every_rule_on_codes_equals_the_dequantized_values(rule, bits, rotate, nq):
    b, hq, hkv, nk, d = 2, 6, 2, 97, 64
    q, k, v = _qkv(b, hq, hkv, nq, nk, d, seed=bits + rotate)
    kq, vq = quantize_kv(k, bits=bits, rotate=rotate), quantize_kv(v, bits=bits, rotate=rotate)
    rules = _rules(rule, b, hq, nq, nk)
    got, lse = selfattn.attention(q, kq, vq, backend="native", return_lse=True, **rules)
    want, want_lse = _oracle(q, kq, vq, **rules)
    torch.testing.assert_close(got.double(), want, **TOL)
    torch.testing.assert_close(lse.double(), want_lse.double(), **TOL)
    # and native on the dequantized tensors (the float path) agrees to the same rounding
    plain = selfattn.attention(q, kq.dequantize(), vq.dequantize(), backend="native", **rules)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-4)  # two float32 roundings


@pytest.mark.parametrize("d", [40, 64, 80, 128])
@pytest.mark.parametrize("nk", [1, 97, 257, 1025])
@pytest.mark.parametrize("bits,rotate", FORMATS)
def test_odd_shapes_decode_and_prefill(d, nk, bits, rotate):
    """Decode (Nq 1..4, several chunks past 1024 keys) and prefill (Nq = Nk), GQA 3:1."""
    q, k, v = _qkv(1, 3, 1, nk, nk, d, seed=nk + d)
    kq, vq = quantize_kv(k, bits=bits, rotate=rotate), quantize_kv(v, bits=bits, rotate=rotate)
    for nq in (1, 2, 3, 4, nk):
        if nq > nk or (nq == nk and nk > 257 and d != 64):  # the fp64 oracle is slow
            continue
        qs = q[:, :, nk - nq :]
        got = selfattn.attention(qs, kq, vq, causal=True, backend="native")
        want, _ = _oracle(qs, kq, vq, causal=True)
        torch.testing.assert_close(got.double(), want, **TOL, msg=f"nq={nq}")


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("bits,rotate", FORMATS)
@pytest.mark.parametrize("nq", [2, 40])
def test_one_operand_quantized_the_other_plain(which, bits, rotate, nq):
    q, k, v = _qkv(2, 4, 2, nq, 70, 32, seed=9)
    if which == "k":
        k = quantize_kv(k, bits=bits, rotate=rotate)
    else:
        v = quantize_kv(v, bits=bits, rotate=rotate)
    got, lse = selfattn.attention(q, k, v, causal=True, backend="native", return_lse=True)
    want, want_lse = _oracle(q, k, v, causal=True)
    torch.testing.assert_close(got.double(), want, **TOL)
    torch.testing.assert_close(lse.double(), want_lse.double(), **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("nq", [1, 33])
def test_other_dtypes_of_q(dtype, nq):
    """16-bit q: codes dequantized to float32 inside (never rounded to 16 bits), so the result is
    the float32 values' to the output's rounding; float64: the float64 engine, to fp64 rounding."""
    q, k, v = _qkv(1, 4, 2, nq, 130, 64, seed=2, dtype=dtype)
    kq, vq = quantize_kv(k, bits=4, rotate=True), quantize_kv(v, bits=8, rotate=True)
    got = selfattn.attention(q, kq, vq, causal=True, backend="native")
    assert got.dtype == dtype
    want, _ = _oracle(q, kq, vq, causal=True)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_dropout_draws_the_same_mask_as_on_dequantized_values():
    q, k, v = _qkv(1, 4, 2, 3, 300, 64, seed=4)
    kq, vq = quantize_kv(k, bits=8), quantize_kv(v, bits=4, rotate=True)
    torch.manual_seed(3)
    got = selfattn.attention(q, kq, vq, dropout_p=0.3, backend="native")
    torch.manual_seed(3)
    want = selfattn.attention(q, kq.dequantize(), vq.dequantize(), dropout_p=0.3, backend="native")
    torch.testing.assert_close(got, want, **TOL)


def test_strided_views_of_a_cache_are_read_in_place():
    """KVCache(bits) hands out narrowed views (token stride of the whole buffer)."""
    cache = KVCache(2, 300, 2, 64, dtype=torch.float32, device="cpu", bits=4, rotate=True)
    q, k, v = _qkv(2, 6, 2, 1, 200, 64, seed=8)
    for j0, j1 in ((0, 150), (150, 199), (199, 200)):
        kc, vc = cache.append(k[:, :, j0:j1], v[:, :, j0:j1])
    assert isinstance(kc, QuantizedKV) and not kc.codes.is_contiguous()
    got = selfattn.attention(q, kc, vc, backend="native")
    want, _ = _oracle(q, kc, vc)
    torch.testing.assert_close(got.double(), want, **TOL)


def test_auto_runs_native_on_codes():
    q, k, v = _qkv(1, 4, 2, 1, 64, 64)
    kq, vq = quantize_kv(k), quantize_kv(v, bits=4, rotate=True)
    why = selfattn.explain(q, kq, vq, causal=True)
    assert "quantized k int8, v int4+rotation" in why
    assert "picks: native" in why  # never handed to SDPA by the small-call rule
    got = selfattn.attention(q, kq, vq)
    torch.testing.assert_close(got, selfattn.attention(q, kq, vq, backend="native"), atol=0, rtol=0)


def _largest_allocation(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:  # fmt: skip
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("nq", [1, 64])
def test_no_dequantized_copy_of_the_cache_is_made(nq):
    q, k, v = _qkv(1, 4, 2, nq, 4096, 64, seed=1)
    kq, vq = quantize_kv(k), quantize_kv(v, bits=4, rotate=True)
    dense = 2 * 4096 * 64 * 4  # one (B, Hkv, Nk, D) float32 tensor
    biggest = _largest_allocation(lambda: selfattn.attention(q, kq, vq, backend="native"))
    assert biggest < dense / 8, biggest
    # the same measure sees the copy that dequantizing makes (so the check can fail)
    assert _largest_allocation(lambda: selfattn.attention(q, kq, vq, backend="tiled")) >= dense


def test_gradients_of_q_go_through_the_dequantized_values():
    q, k, v = _qkv(1, 4, 2, 5, 40, 32, seed=6)
    kq, vq = quantize_kv(k, bits=8, rotate=True), quantize_kv(v, bits=4)
    q1 = q.clone().requires_grad_(True)
    selfattn.attention(q1, kq, vq, causal=True, backend="native").sum().backward()
    q2 = q.clone().requires_grad_(True)
    selfattn.attention(q2, kq.dequantize(), vq.dequantize(), causal=True).sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad, **TOL)


# -- the typed boundary ---------------------------------------------------------------------------


def _call(q, k, v):
    spec = validate(q, standin(k), standin(v))
    return record(spec, None, k, v)


def test_record_carries_the_storage_of_k_and_v():
    q, k, v = _qkv(1, 2, 1, 1, 20, 32)
    kq, vq = quantize_kv(k, bits=4, rotate=True), quantize_kv(v)
    call = _call(q, kq, vq)
    assert call.k_codes is kq.codes and call.k_scales is kq.scales
    assert (call.k_bits, call.k_group, call.k_rotate) == (4, 32, True)
    assert (call.v_bits, call.v_group, call.v_rotate) == (8, 32, False)
    plain = record(validate(q, k, v))
    assert [getattr(plain, f) for f in STORAGE_FIELDS] == [None, None, 0, 0, False] * 2


def _bad_layouts(kq):
    c, s = kq.codes, kq.scales
    yield {"k_bits": 5}, "k_bits must be 8 or 4"
    yield {"k_bits": 4}, "codes of 4 bits must be uint8"
    yield {"k_codes": c[:, :, :-1]}, "do not fit"
    yield {"k_scales": s.double()}, "scales must be float32"
    yield {"k_scales": s[:, :, 1:]}, "do not fit"
    yield {"k_group": 24}, "k_group=24"
    yield {"k_group": 0}, "k_group=0"
    yield {"k_scales": None}, "k_codes without k_scales"


def test_bad_layouts_are_value_errors_before_work():
    q, k, v = _qkv(1, 2, 1, 1, 20, 32)
    kq = quantize_kv(k)
    ext = build.load()
    for change, match in _bad_layouts(kq):
        call = _call(q, kq, v)._replace(**change)
        with pytest.raises(ValueError, match=match):
            ext.forward(q, standin(kq), v, call, True, False)
    # the backward never reads codes: a clear refusal, not a gradient of the wrong values
    call = _call(q, kq, v)
    out, lse = ext.forward(q, standin(kq), v, call, True, False)
    with pytest.raises(ValueError, match="no backward through quantized"):
        ext.backward(out, q, standin(kq), v, out, lse, torch.empty(0), call, False, False)


@pytest.mark.parametrize("nq", [1, 40])
def test_a_non_finite_scale_poisons_what_the_dequantized_values_would(nq):
    """A scale of inf (a quantized inf) makes its row non-finite: its key turns the scores of the
    rows that see it NaN, its value row the output columns it reaches, as on dequantize()."""
    q, k, v = _qkv(1, 2, 1, nq, 90, 64, seed=12)
    kq, vq = quantize_kv(k), quantize_kv(v, bits=4)
    kq.scales[0, 0, 30] = float("inf")
    vq.scales[0, 0, 60, 1] = float("inf")
    got = selfattn.attention(q, kq, vq, causal=True, backend="native")
    want = selfattn.attention(q, kq.dequantize(), vq.dequantize(), causal=True, backend="native")
    assert torch.equal(got.isnan(), want.isnan()) and bool(got.isnan().any())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), **TOL)
