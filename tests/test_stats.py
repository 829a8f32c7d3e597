"""``selfattn.attention_stats`` and ``attention_with_stats`` (API.md section 5).

Every statistic is held to the float64 specification (``selfattn.testing.ref_stats``) and to the
same reduction of ``attention_weights``, on every backend with a ``stats`` hook, for every rule,
GQA, selected heads and rows, rows that see nothing, top-k ties and odd lengths. The shapes span
several row tiles and key blocks of the tiled engine (Nk=600 > BLOCK_N).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import selfattn
from helpers import gen, make_qkv, ref_stats, ref_weights, to_np
from selfattn.engine import BLOCK_N

B, HQ, HKV, NQ, NK, D = 2, 4, 2, 70, 600, 16
assert NK > BLOCK_N
ALL = {"col_sum": True, "col_max": True, "entropy": True, "topk": 5}
STATS_BACKENDS = [
    name for name in ("tiled", "native") if getattr(selfattn.backends.BACKENDS[name], "stats", None)
]
if "native" in STATS_BACKENDS and selfattn.backends.BACKENDS["native"].unavailable():
    STATS_BACKENDS.remove("native")

pytestmark = pytest.mark.usefixtures("one_thread")


def rules(name: str, nq: int = NQ, nk: int = NK, b: int = B, hq: int = HQ) -> dict:
    g = gen(60)
    if name == "none":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "window":
        return {"window": (90, 4)}
    if name == "mask":
        m = torch.rand(b, hq, nq, nk, generator=g) < 0.5
        m[:, :, min(3, nq - 1)] = False  # a row with no visible key
        return {"mask": m}
    if name == "bias":
        return {"bias": torch.randn(b, 1, nq, nk, generator=g)}
    if name == "alibi":
        return {"alibi_slopes": torch.rand(b, hq, generator=g) * 0.05}
    if name == "softcap":
        return {"softcap": 1.2, "scale": 0.8}
    if name == "segments":
        ids = torch.arange(nk).div(97, rounding_mode="floor").expand(b, nk).clone()
        ids[1, -30:] = -1  # padding rows and keys
        return {"segment_ids": (ids[:, nk - nq :], ids)}
    if name == "combo":
        return {
            **rules("segments", nq, nk, b, hq),
            **rules("bias", nq, nk, b, hq),
            **rules("alibi", nq, nk, b, hq),
            "causal": True,
            "window": (200, None),
            "mask": torch.rand(nq, nk, generator=g) < 0.8,
            "softcap": 3.0,
        }
    raise KeyError(name)


RULES = ["none", "causal", "window", "mask", "bias", "alibi", "softcap", "segments", "combo"]


@functools.cache
def case(rule: str):
    q, k, v = make_qkv(B, HQ, HKV, NQ, NK, D, seed=61)
    return q, k, v, rules(rule)


def from_weights(w: torch.Tensor, topk: int) -> dict[str, np.ndarray]:
    """The statistics as reductions of ``attention_weights``' probabilities (B, H, Nq, Nk)."""
    p = to_np(w)
    got = {"col_sum": p.sum(2), "col_max": p.max(2, initial=0.0)}
    with np.errstate(divide="ignore", invalid="ignore"):
        got["entropy"] = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    got["topk_p"] = -np.sort(-p, -1)[..., :topk]
    return got


def check(st: dict, want: dict, what: str, p: np.ndarray | None = None) -> None:
    """``st`` equals ``want`` (float32 to rounding). Top-k indices are compared exactly, or, with
    the float64 probabilities ``p`` (B, H', Nq', Nk) given, by the probabilities they pick (float32
    rounding can tie keys that float64 tells apart, e.g. under a saturated softcap)."""
    assert set(st) == set(want), f"{what}: keys {sorted(st)} vs {sorted(want)}"
    for key, ref in want.items():
        got = st[key]
        assert got.shape == ref.shape, f"{what} {key}: shape {tuple(got.shape)} vs {ref.shape}"
        if key == "topk_index":
            assert got.dtype == torch.int64
            if p is None:
                np.testing.assert_array_equal(got.numpy(), ref, err_msg=f"{what} {key}")
            else:
                idx = got.numpy()
                np.testing.assert_array_equal(idx < 0, ref < 0, err_msg=f"{what} {key} pads")
                picked = np.take_along_axis(p, np.maximum(idx, 0), -1) * (idx >= 0)
                np.testing.assert_allclose(picked, want["topk_p"], rtol=2e-5, atol=2e-6)
            continue
        assert got.dtype == torch.float32, f"{what} {key}: {got.dtype}"
        np.testing.assert_allclose(to_np(got), ref, rtol=2e-5, atol=2e-6, err_msg=f"{what} {key}")


@pytest.mark.parametrize("given_lse", [False, True])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_stats_equal_spec_and_weights(backend, rule, given_lse):
    q, k, v, kw = case(rule)
    lse = None
    if given_lse:
        _, lse = selfattn.attention(q, k, v, return_lse=True, backend="tiled", **kw)
    st = selfattn.attention_stats(q, k, lse=lse, backend=backend, **kw, **ALL)
    p = ref_weights(q, k, **kw)
    check(st, ref_stats(q, k, **kw, **ALL), f"{backend} {rule} lse={given_lse}", p)
    w = selfattn.attention_weights(q, k, lse=lse, **kw)
    mine = {key: st[key] for key in ("col_sum", "col_max", "entropy", "topk_p")}
    check(mine, from_weights(w, ALL["topk"]), f"{backend} {rule} vs attention_weights")


@pytest.mark.parametrize("rule", ["none", "mask", "combo"])
@pytest.mark.parametrize("backend", ["auto", *STATS_BACKENDS])
def test_sinks(backend, rule):
    """With sinks a row's probabilities sum to less than 1; the statistics are theirs."""
    q, k, v, kw = case(rule)
    kw = {**kw, "sinks": torch.linspace(-1.0, 2.0, HQ)}
    try:
        st = selfattn.attention_stats(q, k, backend=backend, **kw, **ALL)
    except selfattn.UnsupportedInputs as exc:
        pytest.skip(f"{backend} declines sinks: {exc.reasons.get(backend)}")
    p = ref_weights(q, k, **kw)
    check(st, ref_stats(q, k, **kw, **ALL), f"{backend} sinks {rule}", p)
    _, lse = selfattn.attention(q, k, v, return_lse=True, **kw)
    given = selfattn.attention_stats(q, k, lse=lse, backend=backend, **kw, **ALL)
    check(given, ref_stats(q, k, **kw, **ALL), f"{backend} sinks given lse {rule}", p)
    assert (st["col_sum"].sum(-1) < NQ).all()  # the sinks took their share
    out, st2 = selfattn.attention_with_stats(q, k, v, **kw, **ALL)
    torch.testing.assert_close(out, selfattn.attention(q, k, v, **kw))
    check(st2, ref_stats(q, k, **kw, **ALL), f"with_stats sinks {rule}", p)


SELECTIONS = {
    "heads_list_unordered": {"heads": [3, 0, 2]},
    "heads_int": {"heads": 1},
    "rows_slice": {"rows": slice(None, None, 7)},
    "rows_list_unordered": {"rows": [69, 0, 50, 50, 16]},
    "both": {"heads": [3, 1], "rows": [60, 3, 26, 40]},
    "empty_rows": {"rows": []},
}


def _idx(sel, n):
    if sel is None:
        return None
    if isinstance(sel, slice):
        return list(range(n))[sel]
    return [sel] if isinstance(sel, int) else list(sel)


@pytest.mark.parametrize("given_lse", [False, True])
@pytest.mark.parametrize("sel", list(SELECTIONS))
@pytest.mark.parametrize("rule", ["causal", "combo"])
@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_selected_heads_and_rows(backend, rule, sel, given_lse):
    q, k, v, kw = case(rule)
    pick = SELECTIONS[sel]
    lse = None
    if given_lse:
        _, lse = selfattn.attention(q, k, v, return_lse=True, backend="tiled", **kw)
    st = selfattn.attention_stats(q, k, lse=lse, backend=backend, **kw, **pick, **ALL)
    heads, rows = _idx(pick.get("heads"), HQ), _idx(pick.get("rows"), NQ)
    p = ref_weights(q, k, **kw)
    p = p[:, heads] if heads is not None else p
    p = p[:, :, rows] if rows is not None else p
    want = ref_stats(q, k, heads=heads, rows=rows, **kw, **ALL)
    check(st, want, f"{backend} {rule} {sel}", p)


@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_only_the_keys_asked_for(backend):
    q, k, _, kw = case("causal")
    assert set(selfattn.attention_stats(q, k, backend=backend, **kw)) == {"col_sum"}
    st = selfattn.attention_stats(q, k, col_sum=False, entropy=True, backend=backend, **kw)
    assert set(st) == {"entropy"}
    st = selfattn.attention_stats(q, k, col_sum=False, topk=2, backend=backend, **kw)
    assert set(st) == {"topk_index", "topk_p"}


@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_rows_with_no_visible_key(backend):
    """Entropy 0, top-k index -1 and p 0, nothing added to any column."""
    q, k, _ = make_qkv(1, 2, 1, 5, 9, 8, seed=62)
    mask = torch.ones(1, 2, 5, 9, dtype=torch.bool)
    mask[0, 1, 2] = False  # head 1, row 2 sees nothing
    st = selfattn.attention_stats(q, k, mask=mask, backend=backend, **ALL)
    assert st["entropy"][0, 1, 2] == 0
    assert (st["topk_index"][0, 1, 2] == -1).all() and (st["topk_p"][0, 1, 2] == 0).all()
    alone = selfattn.attention_stats(q, k, mask=mask, rows=[2], heads=[1], backend=backend)
    assert (alone["col_sum"] == 0).all()
    check(st, ref_stats(q, k, mask=mask, **ALL), f"{backend} empty row")


@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_topk_ties_go_to_the_lower_index(backend):
    """Keys 1, 4, 6 and 9 are equal (so are their probabilities): they rank in index order."""
    q, k, _ = make_qkv(1, 1, 1, 3, 12, 8, seed=63)
    for j in (4, 6, 9):
        k[0, 0, j] = k[0, 0, 1]
    k[0, 0, 1:] *= 1.0  # same bits
    st = selfattn.attention_stats(q, k, col_sum=False, topk=12, backend=backend)
    idx = st["topk_index"][0, 0]
    for row in idx.tolist():
        tied = [j for j in row if j in (1, 4, 6, 9)]
        assert tied == [1, 4, 6, 9], row
    check(st, ref_stats(q, k, col_sum=False, topk=12), f"{backend} ties")


@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_topk_beyond_the_visible_keys_pads(backend):
    """Causal, Nq = Nk = 4: row 0 sees one key, so topk=6 pads with -1 / 0."""
    q, k, _ = make_qkv(1, 2, 2, 4, 4, 8, seed=64)
    st = selfattn.attention_stats(q, k, causal=True, col_sum=False, topk=6, backend=backend)
    assert st["topk_index"][0, 0, 0].tolist() == [0, -1, -1, -1, -1, -1]
    assert st["topk_p"][0, 0, 0].tolist() == pytest.approx([1.0, 0, 0, 0, 0, 0], abs=1e-6)
    assert (st["topk_p"][0, 0, 0, 1:] == 0).all()
    check(st, ref_stats(q, k, causal=True, col_sum=False, topk=6), f"{backend} pad")


@pytest.mark.parametrize("nk", [1, 97, 257, 1025])
@pytest.mark.parametrize("nq", [1, 7])
@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_odd_lengths(backend, nq, nk):
    q, k, _ = make_qkv(1, 3, 1, nq, nk, 24, seed=65)
    kw = {"causal": True} if nq <= nk else {}
    st = selfattn.attention_stats(q, k, backend=backend, **kw, **ALL)
    check(st, ref_stats(q, k, **kw, **ALL), f"{backend} Nq={nq} Nk={nk}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_each_dtype_gives_float32(backend, dtype):
    q, k, _ = make_qkv(1, 2, 1, 9, 40, 16, dtype=dtype, seed=66)
    st = selfattn.attention_stats(q, k, causal=True, backend=backend, **ALL)
    assert {t.dtype for t in st.values()} == {torch.float32, torch.int64}
    ref = ref_stats(q, k, causal=True, **ALL)
    tol = {torch.float64: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-3}[dtype]
    for key in ("col_sum", "col_max", "entropy", "topk_p"):
        np.testing.assert_allclose(to_np(st[key]), ref[key], rtol=tol, atol=tol, err_msg=key)


def test_quantized_keys_read_as_their_dequantize():
    q, k, _ = make_qkv(1, 2, 1, 6, 50, 32, seed=67)
    qk = selfattn.quantize_kv(k, bits=8)
    st = selfattn.attention_stats(q, qk, causal=True, **ALL)
    check(st, ref_stats(q, qk.dequantize(), causal=True, **ALL), "quantized keys")


def test_auto_skips_backends_without_the_hook_and_a_named_one_declines():
    q, k, _ = make_qkv(1, 2, 1, 6, 50, 16, seed=68)
    with pytest.raises(selfattn.UnsupportedInputs, match="stats"):
        selfattn.attention_stats(q, k, backend="sdpa")
    st = selfattn.attention_stats(q, k, backend="auto")
    check(st, ref_stats(q, k), "auto")


BAD = [
    ({"topk": -1}, ValueError, "topk must be >= 0"),
    ({"topk": 2.0}, TypeError, "topk must be an int"),
    ({"topk": True}, TypeError, "topk must be an int"),
    ({"col_sum": 1}, TypeError, "col_sum must be a bool"),
    ({"entropy": None}, TypeError, "entropy must be a bool"),
    ({"heads": [4]}, ValueError, "heads"),
    ({"heads": [0.5]}, TypeError, "heads"),
    ({"rows": [-8]}, ValueError, "rows"),
    ({"lse": torch.zeros(1, 2, 5)}, ValueError, "lse must have shape"),
    ({"backend": "nope"}, ValueError, "unknown backend"),
    ({"causal": True, "window": (-1, 0)}, ValueError, "window"),
]


@pytest.mark.parametrize("kwargs, exc, msg", BAD)
def test_bad_input_raises_before_work(monkeypatch, kwargs, exc, msg):
    q, k, _ = make_qkv(1, 4, 2, 7, 30, 8, seed=69)
    for backend in selfattn.backends.BACKENDS.values():  # no hook may be reached
        if getattr(backend, "stats", None):
            monkeypatch.setattr(backend, "stats", None, raising=False)
    with pytest.raises(exc, match=msg):
        selfattn.attention_stats(q, k, **kwargs)


@pytest.mark.parametrize("rule", ["causal", "combo"])
def test_attention_with_stats_equals_the_two_calls(rule):
    q, k, v, kw = case(rule)
    out, lse, st = selfattn.attention_with_stats(q, k, v, return_lse=True, **kw, **ALL)
    want_out, want_lse = selfattn.attention(q, k, v, return_lse=True, **kw)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    check(st, ref_stats(q, k, **kw, **ALL), f"with_stats {rule}", ref_weights(q, k, **kw))
    out2, st2 = selfattn.attention_with_stats(q, k, v, heads=[1], rows=[0, 5], **kw)
    torch.testing.assert_close(out2, want_out)
    check(st2, ref_stats(q, k, heads=[1], rows=[0, 5], **kw), f"with_stats selection {rule}")


def test_attention_with_stats_keeps_autograd_and_dropout():
    q, k, v = make_qkv(1, 2, 1, 5, 20, 8, seed=70, requires_grad=True)
    torch.manual_seed(3)
    out, st = selfattn.attention_with_stats(q, k, v, dropout_p=0.3, causal=True)
    torch.manual_seed(3)
    want = selfattn.attention(q, k, v, dropout_p=0.3, causal=True)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert q.grad is not None and not st["col_sum"].requires_grad
    check(st, ref_stats(q, k, causal=True), "stats before dropout")


# --- the fused pass: attention_with_stats on native (a decode step's own kernel pass) ---------

DEC_B, DEC_HQ, DEC_HKV, DEC_NK = 2, 9, 3, 2500  # several split-K chunks per kv head
needs_native = pytest.mark.skipif("native" not in STATS_BACKENDS, reason="native unavailable")


def spy_forward_stats(monkeypatch) -> list:
    """Count the calls of native's forward_stats hook (the real one runs)."""
    native = selfattn.backends.BACKENDS["native"]
    real, calls = native.forward_stats, []

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "forward_stats", counted)
    return calls


@needs_native
@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("rule", RULES)
def test_decode_pass_stats_equal_spec(monkeypatch, rule, nq):
    q, k, v = make_qkv(DEC_B, DEC_HQ, DEC_HKV, nq, DEC_NK, 32, seed=71)
    kw = rules(rule, nq=nq, nk=DEC_NK, b=DEC_B, hq=DEC_HQ)
    calls = spy_forward_stats(monkeypatch)
    out, lse, st = selfattn.attention_with_stats(
        q, k, v, return_lse=True, backend="native", **kw, **ALL
    )
    assert len(calls) == 1
    want_out, want_lse = selfattn.attention(q, k, v, return_lse=True, backend="native", **kw)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    check(st, ref_stats(q, k, **kw, **ALL), f"decode {rule} Nq={nq}", ref_weights(q, k, **kw))


@needs_native
def test_decode_pass_keeps_padding_garbage_out(monkeypatch):
    """NaN in hidden keys and values (the careful retry of a chunk) stays out of the stats."""
    q, k, v = make_qkv(1, 4, 2, 1, 1500, 32, seed=72)
    mask = torch.ones(1, 4, 1, 1500, dtype=torch.bool)
    mask[..., 1200:1300] = False
    k[:, :, 1200:1300] = float("nan")
    v[:, :, 1250] = float("inf")
    calls = spy_forward_stats(monkeypatch)
    out, st = selfattn.attention_with_stats(q, k, v, mask=mask, backend="native", **ALL)
    assert len(calls) == 1 and torch.isfinite(out).all()
    ref = ref_stats(q, torch.where(mask[0, :2, 0, :, None], k, 0.0), mask=mask, **ALL)
    check(st, ref, "padding garbage")


@needs_native
def test_decode_pass_rows_that_see_nothing(monkeypatch):
    q, k, v = make_qkv(1, 4, 1, 2, 600, 16, seed=73)
    ids = (torch.tensor([[-1, 0]]), torch.zeros(1, 600, dtype=torch.long))  # row 0 is padding
    calls = spy_forward_stats(monkeypatch)
    out, st = selfattn.attention_with_stats(q, k, v, segment_ids=ids, backend="native", **ALL)
    assert len(calls) == 1 and (out[:, :, 0] == 0).all()
    assert (st["entropy"][:, :, 0] == 0).all() and (st["topk_index"][:, :, 0] == -1).all()
    check(st, ref_stats(q, k, segment_ids=ids, **ALL), "decode padding row")


@needs_native
@pytest.mark.parametrize("nq", [1, 40])
@pytest.mark.parametrize("bits, rotate", [(8, False), (4, True)])
def test_fused_pass_reads_quantized_keys_and_values(monkeypatch, bits, rotate, nq):
    """A QuantizedKV cache goes to native's forward_stats as codes: the statistics are those of
    its dequantize(), the output that of attention on it."""
    q, k, v = make_qkv(1, 6, 2, nq, 1500, 64, seed=77)
    qk = selfattn.quantize_kv(k, bits=bits, rotate=rotate)
    qv = selfattn.quantize_kv(v, bits=bits, rotate=rotate)
    calls = spy_forward_stats(monkeypatch)
    out, st = selfattn.attention_with_stats(q, qk, qv, causal=True, backend="native", **ALL)
    assert len(calls) == 1
    torch.testing.assert_close(out, selfattn.attention(q, qk, qv, causal=True, backend="native"))
    kd = qk.dequantize()
    check(st, ref_stats(q, kd, causal=True, **ALL), f"bits={bits}", ref_weights(q, kd, causal=True))
    native = selfattn.backends.BACKENDS["native"]
    real, got_k = native.stats, []

    def spy(spec, q, k, *args, **kwargs):
        got_k.append(type(k))
        return real(spec, q, k, *args, **kwargs)

    monkeypatch.setattr(native, "stats", spy)
    p = ref_weights(q, kd, causal=True)
    for lse in (None, selfattn.attention(q, qk, qv, causal=True, return_lse=True)[1]):
        alone = selfattn.attention_stats(q, qk, lse=lse, causal=True, backend="native", **ALL)
        check(alone, ref_stats(q, kd, causal=True, **ALL), "stats from the codes", p)
    picked = selfattn.attention_stats(q, qk, heads=[5, 0], causal=True, backend="native", **ALL)
    want = ref_stats(q, kd, heads=[5, 0], causal=True, **ALL)
    check(picked, want, "heads: dequantized", p[:, [5, 0]])
    assert got_k == [selfattn.QuantizedKV, selfattn.QuantizedKV, torch.Tensor]


@needs_native
def test_fused_selected_heads_and_the_fallbacks(monkeypatch):
    """heads are picked after the fused pass; rows, gradients and dropout take the two calls."""
    q, k, v = make_qkv(1, 6, 2, 2, 700, 16, seed=74)
    calls = spy_forward_stats(monkeypatch)
    _, st = selfattn.attention_with_stats(q, k, v, heads=[4, 1], causal=True, backend="native")
    assert len(calls) == 1
    check(st, ref_stats(q, k, heads=[4, 1], causal=True), "fused heads")
    _, st = selfattn.attention_with_stats(q, k, v, rows=[1], causal=True, backend="native")
    q.requires_grad_(True)
    _, st2 = selfattn.attention_with_stats(q, k, v, causal=True, backend="native")
    assert len(calls) == 1
    check(st, ref_stats(q, k, rows=[1], causal=True), "rows fallback")
    check(st2, ref_stats(q, k, causal=True), "grad fallback")


@needs_native
@pytest.mark.parametrize("nq", [1, 40])
def test_native_stats_are_the_same_for_any_thread_count(nq):
    """Key parts depend on the shape alone and combine in order: bitwise the same results."""
    from selfattn.testing import torch_threads

    q, k, v = make_qkv(1, 4, 2, nq, 3000, 32, seed=75)
    got = []
    for threads in (1, 2):
        with torch_threads(threads):
            st = selfattn.attention_stats(q, k, causal=True, backend="native", **ALL)
            _, fused = selfattn.attention_with_stats(q, k, v, causal=True, backend="native", **ALL)
        got.append((st, fused))
    for key in got[0][0]:
        assert torch.equal(got[0][0][key], got[1][0][key]), key
        assert torch.equal(got[0][1][key], got[1][1][key]), key


def _isas() -> list[str]:
    """The compiled instruction sets this CPU runs (SELFATTN_NATIVE_ISA), native permitting."""
    if "native" not in STATS_BACKENDS:
        return []
    import os

    ext, found = selfattn.backends.native.load(), []
    old = os.environ.get("SELFATTN_NATIVE_ISA")
    for isa in ("avx512", "avx2", "neon", "generic"):
        os.environ["SELFATTN_NATIVE_ISA"] = isa
        try:
            ext.isa()
            found.append(isa)
        except RuntimeError:
            pass
    if old is None:
        os.environ.pop("SELFATTN_NATIVE_ISA", None)
    else:
        os.environ["SELFATTN_NATIVE_ISA"] = old
    return found


@pytest.mark.parametrize("nq", [2, 40])
@pytest.mark.parametrize("isa", _isas())
def test_native_stats_on_each_instruction_set(monkeypatch, isa, nq):
    monkeypatch.setenv("SELFATTN_NATIVE_ISA", isa)
    q, k, v = make_qkv(DEC_B, DEC_HQ, DEC_HKV, nq, 1100, 32, seed=76)
    kw = rules("combo", nq=nq, nk=1100, b=DEC_B, hq=DEC_HQ)
    p, want = ref_weights(q, k, **kw), ref_stats(q, k, **kw, **ALL)
    st = selfattn.attention_stats(q, k, backend="native", **kw, **ALL)
    check(st, want, f"{isa} stats Nq={nq}", p)
    _, fused = selfattn.attention_with_stats(q, k, v, backend="native", **kw, **ALL)
    check(fused, want, f"{isa} fused Nq={nq}", p)


@pytest.mark.parametrize("nq", [1, 40])
@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_a_given_lse_is_used_as_it_is(backend, nq):
    """lse + log 2 halves every probability (a decode-sized call on native reads it in the
    decode kernel's statistics pass, a larger one in the statistics kernel)."""
    q, k, v = make_qkv(1, 4, 2, nq, 900, 32, seed=78)
    _, lse = selfattn.attention(q, k, v, return_lse=True, causal=True)
    st = selfattn.attention_stats(q, k, lse=lse, causal=True, backend=backend, **ALL)
    half = selfattn.attention_stats(
        q, k, lse=lse + math.log(2.0), causal=True, backend=backend, **ALL
    )
    torch.testing.assert_close(half["col_sum"], st["col_sum"] / 2, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(half["topk_p"], st["topk_p"] / 2, rtol=2e-6, atol=1e-9)
    assert torch.equal(half["topk_index"], st["topk_index"])


@pytest.mark.parametrize("nq, nk", [(3, 0), (0, 5)])
@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_empty_rows_or_keys(backend, nq, nk):
    """No key: every row sees nothing (entropy 0, top-k -1); no row: every column sum is 0."""
    q, k, v = make_qkv(1, 2, 1, nq, nk, 8, seed=79)
    st = selfattn.attention_stats(q, k, backend=backend, **ALL)
    check(st, ref_stats(q, k, **ALL), f"{backend} Nq={nq} Nk={nk}")
    out, fused = selfattn.attention_with_stats(q, k, v, backend=backend, **ALL)
    assert out.shape == (1, 2, nq, 8) and (out == 0).all()
    check(fused, ref_stats(q, k, **ALL), f"{backend} with_stats Nq={nq} Nk={nk}")


@needs_native
def test_a_repeated_decode_shape_reuses_its_choice(monkeypatch):
    """Every decode step of a cache has the same plain shape: the second call takes the
    remembered (spec, backend, hook) and still gives the statistics of its own inputs."""
    calls = spy_forward_stats(monkeypatch)
    for seed in (80, 81):
        q, k, v = make_qkv(1, 6, 2, 1, 300, 16, seed=seed)
        out, st = selfattn.attention_with_stats(q, k, v, causal=True, **ALL)
        torch.testing.assert_close(out, selfattn.attention(q, k, v, causal=True))
        check(st, ref_stats(q, k, causal=True, **ALL), f"seed {seed}")
    assert len(calls) == 2 and calls[0] is calls[1]  # the same spec object


@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_with_stats_over_no_key_gives_the_sinks_lse(backend):
    """Nk = 0 with sinks: output 0, lse = sinks[h] (docs/api.md step 6), statistics empty."""
    q, k, v = make_qkv(1, 2, 1, 3, 0, 8, seed=82)
    sinks = torch.tensor([0.5, -1.0])
    try:
        out, lse, st = selfattn.attention_with_stats(
            q, k, v, sinks=sinks, return_lse=True, backend=backend, **ALL
        )
    except selfattn.UnsupportedInputs as exc:
        pytest.skip(f"{backend} declines sinks: {exc.reasons.get(backend)}")
    assert (out == 0).all()
    torch.testing.assert_close(lse, sinks.view(1, 2, 1).expand(1, 2, 3))
    check(st, ref_stats(q, k, sinks=sinks, **ALL), f"{backend} no key, sinks")
