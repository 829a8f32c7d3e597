"""Forward mode (JVP) on ``tiled`` and ``native``: ``torch.func.jvp`` and ``forward_ad``.

Tangents of the output against ``math`` (torch's own forward-mode AD of the dense formula) in
float64 within 1e-10, for every rule, GQA and tangents of the bias, slopes and sinks; the
lse's tangent within float32 (the lse is float32 by contract). Backends without a JVP rule
decline such calls so that ``auto`` picks one with it; the layers and models work through it,
and torch.func.vmap runs the nodes once per slice.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

import selfattn
from helpers import gen, jvp_memory_growth, make_qkv, packed_ids, tiled_split, torch_threads
from selfattn import engine
from selfattn.backends.native import build

BACKENDS = ["tiled", "native"]


def _skip_native(backend: str) -> None:
    if backend == "native" and build.unavailable():
        pytest.skip(build.unavailable())


def _rules(name: str, n: int, hq: int) -> tuple[dict, dict]:
    """(constant keywords, differentiable keywords) of one rule, float64."""
    f64 = torch.float64
    if name == "plain":
        return {}, {}
    if name == "causal":
        return {"causal": True}, {}
    if name == "window":
        return {"window": (3, 1)}, {}
    if name == "mask":
        mask = torch.rand(2, hq, n, n, generator=gen(3)) > 0.3
        mask[0, 0, 2] = False  # a row that sees nothing: zero tangent, never NaN
        return {"mask": mask}, {}
    if name == "bias":
        return {}, {"bias": torch.randn(2, 1, n, n, generator=gen(4), dtype=f64)}
    if name == "alibi":
        return {"causal": True}, {"alibi_slopes": torch.rand(hq, generator=gen(5), dtype=f64)}
    if name == "softcap":
        return {"softcap": 0.8}, {}
    if name == "segment_ids":
        return {"segment_ids": packed_ids(2, n, 6)}, {}
    if name == "sinks":
        return {"causal": True}, {"sinks": torch.randn(hq, generator=gen(7), dtype=f64)}
    if name == "everything":
        extra = {
            "bias": torch.randn(n, n, generator=gen(8), dtype=f64),
            "alibi_slopes": torch.rand(2, hq, generator=gen(9), dtype=f64) * 0.3,
        }
        return {"causal": True, "window": (4, None), "softcap": 1.5, "scale": 0.6}, extra
    raise AssertionError(name)


RULES = [
    "plain",
    "causal",
    "window",
    "mask",
    "bias",
    "alibi",
    "softcap",
    "segment_ids",
    "sinks",
    "everything",
]


def _jvp(backend, primals, tangents, names, kw):
    def f(q, k, v, *more):
        return selfattn.attention(
            q, k, v, backend=backend, return_lse=True, **kw, **dict(zip(names, more))
        )

    return torch.func.jvp(f, primals, tangents)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_jvp_matches_math_float64(backend, rule, heads):
    _skip_native(backend)
    hq, hkv = heads
    n = 37
    q, k, v = make_qkv(2, hq, hkv, n, n, 8, 6, torch.float64, seed=1)
    kw, extra = _rules(rule, n, hq)
    primals = (q, k, v, *extra.values())
    tangents = tuple(
        torch.randn(t.shape, generator=gen(20 + i), dtype=t.dtype) for i, t in enumerate(primals)
    )
    try:
        (out, _), (tout, tlse) = _jvp(backend, primals, tangents, list(extra), kw)
    except selfattn.UnsupportedInputs as exc:
        pytest.skip(str(exc).splitlines()[-1])
    (out_m, _), (tout_m, tlse_m) = _jvp("math", primals, tangents, list(extra), kw)
    assert torch.isfinite(tout).all()
    assert (out - out_m).abs().max().item() < 1e-10
    assert (tout - tout_m).abs().max().item() < 1e-10
    assert (tlse - tlse_m).abs().max().item() < 1e-5 * (1 + tlse_m.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_over_several_key_chunks_float32(backend):
    """Long enough for several row blocks and key chunks; float32 against math in float64."""
    _skip_native(backend)
    q, k, v = make_qkv(1, 4, 2, 1100, 1100, 32, seed=2)
    tq, tk, tv = make_qkv(1, 4, 2, 1100, 1100, 32, seed=3)

    def f(name):
        return lambda q, k, v: selfattn.attention(q, k, v, causal=True, backend=name)

    _, got = torch.func.jvp(f(backend), (q, k, v), (tq, tk, tv))
    d = [t.double() for t in (q, k, v, tq, tk, tv)]
    _, want = torch.func.jvp(f("math"), tuple(d[:3]), tuple(d[3:]))
    assert (got.double() - want).abs().max().item() < 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ad_api(backend):
    """torch.autograd.forward_ad (dual tensors) gives the same tangent as torch.func.jvp."""
    _skip_native(backend)
    q, k, v = make_qkv(1, 2, 1, 9, 9, 4, dtype=torch.float64, seed=4)
    tq, tk, tv = make_qkv(1, 2, 1, 9, 9, 4, dtype=torch.float64, seed=5)
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, t) for p, t in ((q, tq), (k, tk), (v, tv))]
        out = selfattn.attention(*duals, causal=True, backend=backend)
        got = forward_ad.unpack_dual(out).tangent
    _, want = torch.func.jvp(
        lambda q, k, v: selfattn.attention(q, k, v, causal=True, backend="math"),
        (q, k, v),
        (tq, tk, tv),
    )
    assert got is not None
    assert (got - want).abs().max().item() < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_under_dropout_matches_math(backend):
    """Every backend but sdpa draws the same dropout mask from the same seed."""
    _skip_native(backend)
    q, k, v = make_qkv(1, 2, 2, 11, 11, 4, dtype=torch.float64, seed=6)
    tq, tk, tv = make_qkv(1, 2, 2, 11, 11, 4, dtype=torch.float64, seed=7)

    def run(name):
        torch.manual_seed(0)
        return torch.func.jvp(
            lambda q, k, v: selfattn.attention(q, k, v, dropout_p=0.3, backend=name),
            (q, k, v),
            (tq, tk, tv),
        )[1]

    assert (run(backend) - run("math")).abs().max().item() < 1e-10


def test_backends_without_forward_mode_decline_and_auto_picks_one_with_it():
    """sdpa (and reference) have no JVP rule: they decline, naming why; auto still gives the
    right tangent on a small plain call that it would otherwise hand to sdpa."""
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, seed=8)
    tq, tk, tv = make_qkv(1, 2, 2, 8, 8, 4, seed=9)
    for name in ("sdpa", "reference"):
        with pytest.raises(selfattn.UnsupportedInputs, match="forward-mode"):
            torch.func.jvp(
                lambda q, k, v, name=name: selfattn.attention(q, k, v, backend=name),
                (q, k, v),
                (tq, tk, tv),
            )
    _, got = torch.func.jvp(lambda q, k, v: selfattn.attention(q, k, v), (q, k, v), (tq, tk, tv))
    _, want = torch.func.jvp(
        lambda q, k, v: selfattn.attention(q, k, v, backend="math"), (q, k, v), (tq, tk, tv)
    )
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_jvp_is_jacfwd(backend):
    """torch.func.jacfwd (vmap over jvp) through the node's vmap rule equals math's."""
    _skip_native(backend)
    q, k, v = make_qkv(1, 2, 1, 5, 5, 3, dtype=torch.float64, seed=10)

    def f(name):
        return lambda q: selfattn.attention(q, k, v, causal=True, backend=name)

    got = torch.func.jacfwd(f(backend))(q)
    want = torch.func.jacfwd(f("math"))(q)
    assert (got - want).abs().max().item() < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_a_batch_of_calls(backend):
    _skip_native(backend)
    q, k, v = make_qkv(3, 2, 2, 6, 6, 4, dtype=torch.float64, seed=11)

    def f(q, k, v):
        return selfattn.attention(q[None], k[None], v[None], causal=True, backend=backend)[0]

    got = torch.func.vmap(f)(q, k, v)
    want = selfattn.attention(q, k, v, causal=True, backend="math")
    assert (got - want).abs().max().item() < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_through_the_layer_and_a_small_gpt(backend):
    """torch.func.jvp through MultiHeadSelfAttention and selfattn.models.GPT (functional_call
    over the parameters) equals the same model on math."""
    _skip_native(backend)
    torch.manual_seed(0)
    layer = selfattn.MultiHeadSelfAttention(16, 4, num_kv_heads=2, causal=True, backend=backend)
    layer = layer.double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    tx = torch.randn_like(x)
    _, got = torch.func.jvp(layer, (x,), (tx,))
    layer.backend = "math"
    _, want = torch.func.jvp(layer, (x,), (tx,))
    assert (got - want).abs().max().item() < 1e-10

    from selfattn.models import GPT

    model = GPT(50, 16, 16, 2, 2, backend=backend).double()
    ids = torch.randint(0, 50, (2, 12))
    params = dict(model.named_parameters())
    tangents = {n: torch.randn_like(p) for n, p in params.items()}

    def logits(p):
        return torch.func.functional_call(model, p, (ids,))

    _, got = torch.func.jvp(logits, (params,), (tangents,))
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "math"
    _, want = torch.func.jvp(logits, (params,), (tangents,))
    assert (got - want).abs().max().item() < 1e-8 * (1 + want.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_mode_through_a_tangent_declines_clearly(backend):
    """The tangent pass is not recorded by autograd: a gradient through the tangent raises
    instead of silently lacking every term; the primal output stays differentiable."""
    _skip_native(backend)
    q, k, v = make_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float64, seed=12, requires_grad=True)
    tq = torch.randn_like(q)
    out, tout = torch.func.jvp(
        lambda q: selfattn.attention(q, k, v, causal=True, backend=backend), (q,), (tq,)
    )
    (gq,) = torch.autograd.grad(out.sum(), q, retain_graph=True)
    assert torch.isfinite(gq).all()
    with pytest.raises(NotImplementedError, match=f"backend '{backend}'.*not differentiable"):
        tout.sum().backward()
    with forward_ad.dual_level():
        out = selfattn.attention(forward_ad.make_dual(q, tq), k, v, causal=True, backend=backend)
        tout = forward_ad.unpack_dual(out).tangent
    with pytest.raises(NotImplementedError, match=f"backend '{backend}'.*not differentiable"):
        tout.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tangents_out_added_a_zero_over_the_whole_tangent_when_nothing_could_record(backend):
    """With grad mode on but nothing requiring grad, reverse mode cannot reach the tangent: it
    is returned as the pass wrote it (no in-place add of the refusing zero, which cost a pass
    over the output's tangent), and a tensor that requires grad still brings the refusal."""
    _skip_native(backend)
    q, k, v = make_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float64, seed=12)
    t = torch.randn_like(q)
    (got,) = engine.tangents_out(backend, (q, k, v, t), (t,))
    assert got is t and t._version == 0 and t.grad_fn is None
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(q, t)
        (got,) = engine.tangents_out(backend, (dual, k, v, t), (t,))
    assert t._version == 0 and got.grad_fn is None
    (got,) = engine.tangents_out(backend, (q, k.requires_grad_(), v, t), (t.clone(),))
    assert got.grad_fn is not None
    _, tout = torch.func.jvp(
        lambda q: selfattn.attention(q, k.detach(), v, backend=backend), (q,), (t,)
    )
    assert tout.grad_fn is None and not tout.requires_grad
    if backend == "native":  # the fused pass's own tensor, as its kernel wrote it
        assert tout._version == 0


def test_a_tangent_on_the_sinks_alone_reaches_the_output():
    """forward_ad with only the sinks dual (q, k, v plain, no grad): the call must still go
    through the node's JVP rule, not the no-autograd path that would drop the tangent."""
    q, k, v = make_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float64, seed=13)
    sinks, ts = torch.randn(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)

    def tangent(name):
        with forward_ad.dual_level():
            s = forward_ad.make_dual(sinks, ts)
            out = selfattn.attention(q, k, v, causal=True, sinks=s, backend=name)
            return forward_ad.unpack_dual(out).tangent

    want = tangent("math")
    assert want.abs().max().item() > 0.01
    assert (tangent("tiled") - want).abs().max().item() < 1e-10


def test_meanflow_example_runs(tmp_path):
    """examples/train_meanflow.py: a JVP of the whole transformer each step (tiny budget; the
    committed curve comes from the full run)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "train_meanflow.py"
    spec = importlib.util.spec_from_file_location("_example_meanflow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    res = module.train(3, tmp_path, batch_size=8, embed_dim=16, num_layers=1, num_heads=2)
    assert len(res["train_curve"]) == 3
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in res["train_curve"])
    assert (tmp_path / "meanflow_results.json").exists()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [(8, 4), (2, 1)], ids=["head_split", "row_split"])
@pytest.mark.parametrize("api", ["func", "forward_ad"])
def test_jvp_on_the_worker_threads_matches_math(backend, heads, api):
    """The tangent pass split across the engine's threads (by heads, or by row bands that share
    key/value heads), with the bias and slopes' tangents cut per part like the primal ones."""
    _skip_native(backend)
    hq, hkv = heads
    n = 300
    q, k, v = make_qkv(2, hq, hkv, n, n, 8, dtype=torch.float64, seed=14)
    bias = torch.randn(2, 1, n, n, generator=gen(15), dtype=torch.float64)
    slopes = torch.rand(2, hq, generator=gen(16), dtype=torch.float64)
    primals = (q, k, v, bias, slopes)
    tangents = tuple(
        torch.randn(t.shape, generator=gen(30 + i), dtype=t.dtype) for i, t in enumerate(primals)
    )

    def f(name):
        def call(q, k, v, bias, slopes):
            return selfattn.attention(
                q, k, v, causal=True, bias=bias, alibi_slopes=slopes, backend=name
            )

        return call

    with torch_threads(2), tiled_split():
        if api == "func":
            _, got = torch.func.jvp(f(backend), primals, tangents)
        else:
            with forward_ad.dual_level():
                duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
                got = forward_ad.unpack_dual(f(backend)(*duals)).tangent
    _, want = torch.func.jvp(f("math"), primals, tangents)
    assert (got - want).abs().max().item() < 1e-10


def test_jvp_memory_was_ten_times_the_forwards():
    """The tangent pass held each part's row blocks in a list, concatenated them, then copied
    the part into the result, with out-of-place temporaries per tile: 11x the forward's own
    peak growth at N=4096 H8 D64 (162 MB against 14 MB). Now each row block lands in the
    preallocated tangent and the tiles are updated in place: about 1.5x on ``tiled``, whose JVP
    is that pass (native's fused kernel has its own check in test_native_jvp.py)."""
    growth, fwd = jvp_memory_growth("tiled")
    assert growth < 4 * fwd, (growth, fwd)
