"""native's fused forward-mode kernel (``csrc/jvp.h``): out, lse and both tangents in one pass.

Against ``math``'s JVP (torch's forward-mode AD of the dense formula) in float64 within 1e-10 on
odd shapes and head dims, every rule with GQA, rows that see nothing; float32 and 16-bit inputs
within the FlashAttention tolerance rule against the float64 oracle, under every compiled ISA;
and that the fused pass is the one that runs (``tangents.fused_pass`` gives a result), or
declines cleanly to the torch-op tangent pass where it must.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

import selfattn
from helpers import ERR_FLOOR, gen, jvp_memory_growth, make_qkv, max_err, packed_ids, torch_threads
from selfattn.backends import native
from selfattn.backends.native import backend as native_backend

WHY = native.unavailable()
if WHY is not None:
    pytest.skip(f"native extension unavailable: {WHY}", allow_module_level=True)
EXT = native.load()
ISAS = []
for _isa in ("avx512", "avx2", "neon", "generic"):
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SELFATTN_NATIVE_ISA", _isa)
            EXT.isa()
        ISAS.append(_isa)
    except RuntimeError:
        pass


@pytest.fixture
def fused(monkeypatch):
    """The results of each ``fused_pass`` the backend ran: True where the kernel took the call
    (the real pass runs; this only records what it returned)."""
    seen: list[bool] = []
    real = native_backend.fused_pass

    def recording(*args):
        got = real(*args)
        seen.append(got is not None)
        return got

    monkeypatch.setattr(native_backend, "fused_pass", recording)
    return seen


def _rules(name: str, b: int, n: int, hq: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """(constant keywords, differentiable keywords) of one rule."""
    if name == "plain":
        return {}, {}
    if name == "causal":
        return {"causal": True}, {}
    if name == "window":
        return {"window": (7, 2)}, {}
    if name == "mask":
        mask = torch.rand(b, hq, n, n, generator=gen(3)) > 0.3
        mask[0, 1, n // 2] = False  # a row that sees nothing: 0 and 0 tangents, never NaN
        return {"mask": mask}, {}
    if name == "bias":
        return {}, {"bias": torch.randn(b, 1, n, n, generator=gen(4), dtype=dtype)}
    if name == "alibi":
        return {"causal": True}, {"alibi_slopes": torch.rand(hq, generator=gen(5), dtype=dtype)}
    if name == "softcap":
        return {"softcap": 0.8}, {}
    if name == "segment_ids":
        return {"segment_ids": packed_ids(b, n, 6)}, {}
    if name == "sinks":
        return {"causal": True}, {"sinks": torch.randn(hq, generator=gen(7), dtype=dtype)}
    if name == "everything":
        extra = {
            "bias": torch.randn(n, n, generator=gen(8), dtype=dtype),
            "alibi_slopes": torch.rand(b, hq, generator=gen(9), dtype=dtype) * 0.3,
            "sinks": torch.randn(hq, generator=gen(10), dtype=dtype),
        }
        return {"causal": True, "window": (40, None), "softcap": 1.5, "scale": 0.6}, extra
    raise AssertionError(name)


RULES = ["plain", "causal", "window", "mask", "bias", "alibi", "softcap", "segment_ids"]
RULES += ["sinks", "everything"]


def _jvp(backend, primals, tangents, names, kw):
    def f(q, k, v, *more):
        return selfattn.attention(
            q, k, v, backend=backend, return_lse=True, **kw, **dict(zip(names, more))
        )

    return torch.func.jvp(f, primals, tangents)


def _tangents(primals, dtype=None):
    return tuple(
        torch.randn(t.shape, generator=gen(20 + i), dtype=torch.float64).to(dtype or t.dtype)
        for i, t in enumerate(primals)
    )


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n, d", [(1, 40), (97, 64), (257, 80)])
def test_fused_jvp_matches_math_float64(fused, rule, n, d):
    q, k, v = make_qkv(2, 4, 2, n, n, d, dtype=torch.float64, seed=1)
    kw, extra = _rules(rule, 2, n, 4, torch.float64)
    primals = (q, k, v, *extra.values())
    tangents = _tangents(primals)
    (out, lse), (tout, tlse) = _jvp("native", primals, tangents, list(extra), kw)
    (out_m, lse_m), (tout_m, tlse_m) = _jvp("math", primals, tangents, list(extra), kw)
    assert fused == [True]
    assert torch.isfinite(tout).all() and torch.isfinite(tlse).all()
    assert (out - out_m).abs().max().item() < 1e-10
    assert (tout - tout_m).abs().max().item() < 1e-10
    # the lse and its tangent are float32 by contract (docs/api.md)
    seen = torch.isfinite(lse_m)
    assert torch.equal(seen, torch.isfinite(lse))
    assert (lse - lse_m)[seen].abs().max().item() < 1e-5 * (1 + lse_m[seen].abs().max().item())
    assert (tlse - tlse_m).abs().max().item() < 1e-5 * (1 + tlse_m.abs().max().item())
    if rule == "mask":  # the row that sees nothing
        assert tout[0, 1, n // 2].abs().max() == 0 and tlse[0, 1, n // 2] == 0
        assert out[0, 1, n // 2].abs().max() == 0


def _within_rule(got, want, plain, dtype, what):
    """The FlashAttention tolerance rule against the float64 oracle, scaled by the result's size."""
    base = max_err(plain, want.numpy())
    err = max_err(got, want.numpy())
    scale = max(1.0, float(want.abs().max()))
    assert err <= 3 * base + ERR_FLOOR[dtype] * scale, f"{what}: {err} vs plain {base}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rule", ["plain", "causal", "bias", "softcap", "everything"])
def test_fused_jvp_float32_within_the_tolerance_rule(fused, monkeypatch, isa, rule):
    """Nq != Nk (rows at the end of the keys), several key chunks and row blocks, each ISA."""
    monkeypatch.setenv("SELFATTN_NATIVE_ISA", isa)
    nq, nk = 200, 300
    q, k, v = make_qkv(1, 6, 3, nq, nk, 64, seed=14)
    kw, extra = _rules(rule, 1, nk, 6, torch.float32)
    if "bias" in extra:
        extra["bias"] = extra["bias"][..., -nq:, :]
    primals = (q, k, v, *extra.values())
    tangents = _tangents(primals)
    (out, _), (tout, tlse) = _jvp("native", primals, tangents, list(extra), kw)
    (out_p, _), (tout_p, tlse_p) = _jvp("math", primals, tangents, list(extra), kw)
    f64 = [t.double() for t in (*primals, *tangents)]
    half = len(primals)
    (out_r, _), (tout_r, tlse_r) = _jvp(
        "math", tuple(f64[:half]), tuple(f64[half:]), list(extra), kw
    )
    assert fused == [True]
    _within_rule(out, out_r, out_p, torch.float32, f"{isa} {rule} out")
    _within_rule(tout, tout_r, tout_p, torch.float32, f"{isa} {rule} tout")
    _within_rule(tlse, tlse_r, tlse_p, torch.float32, f"{isa} {rule} tlse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_jvp_16bit_inputs_accumulate_in_float32(fused, dtype):
    q, k, v = make_qkv(1, 4, 2, 97, 130, 64, dtype=dtype, seed=16)
    primals = (q, k, v)
    tangents = _tangents(primals, dtype)
    kw = {"causal": True}
    (out, _), (tout, _) = _jvp("native", primals, tangents, [], kw)
    (_, _), (tout_p, _) = _jvp("math", primals, tangents, [], kw)
    d = [t.double() for t in (*primals, *tangents)]
    (_, _), (tout_r, _) = _jvp("math", tuple(d[:3]), tuple(d[3:]), [], kw)
    assert fused == [True]
    assert out.dtype == dtype and tout.dtype == dtype
    _within_rule(tout.float(), tout_r, tout_p.float(), dtype, f"{dtype} tout")


@pytest.mark.parametrize("which", ["q", "k", "v", "qk"])
def test_fused_jvp_with_tangents_on_some_operands(fused, which):
    """forward_ad with duals on some of q, k, v only: the kernel's dS / T products for the
    tangents present, zero for the rest."""
    q, k, v = make_qkv(1, 4, 2, 97, 97, 40, dtype=torch.float64, seed=17)
    tq, tk, tv = make_qkv(1, 4, 2, 97, 97, 40, dtype=torch.float64, seed=18)
    tangents = {"q": tq, "k": tk, "v": tv}
    with forward_ad.dual_level():
        args = [
            forward_ad.make_dual(p, tangents[name]) if name in which else p
            for name, p in zip("qkv", (q, k, v))
        ]
        out = selfattn.attention(*args, causal=True, backend="native")
        got = forward_ad.unpack_dual(out).tangent
    zero = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    chosen = tuple(tangents[n] if n in which else z for n, z in zip("qkv", zero))
    _, want = torch.func.jvp(
        lambda q, k, v: selfattn.attention(q, k, v, causal=True, backend="math"), (q, k, v), chosen
    )
    assert fused == [True]
    assert (got - want).abs().max().item() < 1e-10


def test_fused_jvp_under_dropout_matches_math(fused):
    """c (the lse's tangent) sees every key; out and T only the kept ones (docs/derivatives.md)."""
    q, k, v = make_qkv(1, 2, 2, 70, 70, 16, dtype=torch.float64, seed=6)
    tq, tk, tv = make_qkv(1, 2, 2, 70, 70, 16, dtype=torch.float64, seed=7)

    def run(name):
        torch.manual_seed(0)
        return torch.func.jvp(
            lambda q, k, v: selfattn.attention(
                q, k, v, dropout_p=0.3, backend=name, return_lse=True
            ),
            (q, k, v),
            (tq, tk, tv),
        )

    (out, _), (tout, tlse) = run("native")
    (out_m, _), (tout_m, tlse_m) = run("math")
    assert fused == [True]
    assert (out - out_m).abs().max().item() < 1e-10
    assert (tout - tout_m).abs().max().item() < 1e-10
    assert (tlse - tlse_m).abs().max().item() < 1e-5


def test_fused_jvp_threads_give_the_same_bits():
    """Work items split over (batch, head, row block): which thread runs one never matters."""
    q, k, v = make_qkv(2, 4, 2, 300, 300, 64, seed=19)
    tangents = _tangents((q, k, v))
    runs = []
    for threads in (1, 3):
        with torch_threads(threads):
            runs.append(_jvp("native", (q, k, v), tangents, [], {"causal": True}))
    (o1, l1), (t1, tl1) = runs[0]
    (o3, l3), (t3, tl3) = runs[1]
    for a, b in ((o1, o3), (l1, l3), (t1, t3), (tl1, tl3)):
        assert torch.equal(a, b)


def test_fused_jvp_declines_a_nonfinite_key_and_the_tangent_pass_runs(fused):
    """A non-finite key row: the kernel declines (the forward's rules for such rows hold), the
    node's torch-op tangent pass gives the tangent; rows that cannot see the key stay finite."""
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16, dtype=torch.float64, seed=21)
    k[0, 0, 30, 3] = float("inf")
    tangents = _tangents((q, k, v))
    (out, _), (tout, _) = _jvp("native", (q, k, v), tangents, [], {"causal": True})
    (out_t, _), (tout_t, _) = _jvp("tiled", (q, k, v), tangents, [], {"causal": True})
    assert fused == [False]
    assert torch.isfinite(tout[:, :, :30]).all()
    assert torch.equal(out.isnan(), out_t.isnan())
    assert (tout[:, :, :30] - tout_t[:, :, :30]).abs().max().item() < 1e-10


def test_jacfwd_takes_the_tangent_pass(fused):
    """Under vmap (jacfwd) the tangents are batched: no fused pass; the answer is unchanged."""
    q, k, v = make_qkv(1, 1, 1, 5, 5, 3, dtype=torch.float64, seed=22)

    def f(name):
        return lambda q: selfattn.attention(q, k, v, causal=True, backend=name)

    jac = torch.func.jacfwd(f("native"))(q)
    want = torch.func.jacfwd(f("math"))(q)
    assert not any(fused)
    assert (jac - want).abs().max().item() < 1e-10


def test_fused_jvp_memory_is_under_twice_the_forwards():
    """The issue's target: the JVP's peak growth (out, its tangent, the K panels of a wave; V
    and dV read in place) under 2x the forward's own (out and a wave of packed K and V)."""
    growth, fwd = jvp_memory_growth("native")
    assert growth < 2 * fwd, (growth, fwd)
