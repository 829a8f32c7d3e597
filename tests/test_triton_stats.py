"""``selfattn.attention_stats`` on ``triton``: the probabilities kernel reduces each tile of
``exp(s - lse)`` into column sums, column maxima and row entropies (top-k comes from
``tiled``), held to the float64 specification (``ref_stats``) for every rule, GQA, selected
heads and rows, a given lse or a recomputed one.

Under Triton's interpreter (``TRITON_INTERPRET=1``) and, where there is one, on a CUDA GPU.
37 rows over 67 keys in 32 x 32 tiles: several row tiles add into the same keys.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import selfattn
import test_triton
from helpers import make_qkv, ref_stats, to_np
from test_triton import rules, to

ALL = {"col_sum": True, "col_max": True, "entropy": True, "topk": 3}
dev = test_triton.dev  # the fixture: the interpreter on CPU tensors, or the GPU


def check(dev, shape, rule, heads=None, rows=None, given_lse=False, want=ALL):
    b, hq, hkv, nq, nk, d = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=21)
    kw = rules(rule, b, hq, nq, nk, torch.float32)
    lse = None
    if given_lse:
        _, lse = selfattn.attention(
            q.to(dev), k.to(dev), v.to(dev), backend="triton", return_lse=True, **to(kw, dev)
        )
    got = selfattn.attention_stats(
        q.to(dev), k.to(dev), backend="triton", lse=lse, heads=heads, rows=rows,
        **to(kw, dev), **want,
    )  # fmt: skip
    ref = ref_stats(q, k, heads=heads, rows=rows, **kw, **want)
    assert set(got) == set(ref)
    for name, r in ref.items():
        g = to_np(got[name])
        assert g.shape == r.shape, name
        if name == "topk_index":
            continue  # near-ties may order differently in float32; topk_p is checked
        scale = max(1.0, float(np.abs(r).max(initial=0.0)))
        tol = 1e-5 * (nk if name == "entropy" else nq if name == "col_sum" else 1)
        assert np.abs(g - r).max(initial=0.0) <= tol * scale, f"{rule} {name}"
        assert got[name].dtype == torch.float32


SHAPE = (2, 4, 2, 37, 67, 40)  # GQA 4 -> 2, padded head dim


@pytest.mark.parametrize("rule", ["none", "causal", "mask", "softcap", "segments", "combo"])
def test_stats_match_spec(dev, rule):
    check(dev, SHAPE, rule)


@pytest.mark.parametrize("given_lse", [False, True], ids=["recomputed_lse", "given_lse"])
def test_stats_selected_heads_and_rows(dev, given_lse):
    check(dev, SHAPE, "causal", heads=[3, 0], rows=[36, 1, 2, 20, 33], given_lse=given_lse)
    check(dev, SHAPE, "combo2", heads=[1], rows=list(range(5, 37)), given_lse=given_lse)


def test_stats_only_what_is_asked(dev):
    check(dev, SHAPE, "mask", want={"col_sum": False, "col_max": True, "entropy": False, "topk": 0})
    check(
        dev, SHAPE, "window", want={"col_sum": True, "col_max": False, "entropy": True, "topk": 0}
    )


def test_stats_decode_rows_over_long_keys(dev):
    """A decode step's statistics (H2O's column sums): few rows, many key tiles."""
    check(dev, (1, 6, 2, 2, 300, 64), "window_causal")


def test_stats_rows_that_see_nothing_are_zero(dev):
    q, k, _ = make_qkv(1, 2, 2, 5, 9, 32, seed=22)
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[2] = False
    got = selfattn.attention_stats(
        q.to(dev), k.to(dev), mask=mask.to(dev), backend="triton", col_max=True, entropy=True
    )
    assert torch.isfinite(got["entropy"]).all() and (got["entropy"][:, :, 2] == 0).all()
    assert torch.isfinite(got["col_sum"]).all()


@pytest.mark.parametrize("given_lse", [False, True], ids=["recomputed_lse", "given_lse"])
def test_stats_with_sinks(dev, given_lse):
    """With sinks the probabilities are the keys' share only; a recomputed lse takes the sink
    in (the probabilities kernel folds it after its lse pass)."""
    q, k, v = make_qkv(1, 4, 2, 37, 67, 32, seed=23)
    sinks = torch.tensor([0.5, 3.0, -2.0, float("-inf")])
    lse = None
    if given_lse:
        _, lse = selfattn.attention(
            q.to(dev), k.to(dev), v.to(dev), sinks=sinks.to(dev), causal=True,
            return_lse=True, backend="triton",
        )  # fmt: skip
    want = {"col_sum": True, "col_max": True, "entropy": True, "topk": 2}
    got = selfattn.attention_stats(
        q.to(dev), k.to(dev), sinks=sinks.to(dev), causal=True, lse=lse, backend="triton", **want
    )
    ref = ref_stats(q, k, sinks=sinks, causal=True, **want)
    for name in ("col_sum", "col_max", "entropy", "topk_p"):
        r = ref[name]
        err = np.abs(to_np(got[name]) - r).max()
        assert err <= 1e-5 * max(1.0, float(np.abs(r).max())) * (67 if name != "col_max" else 1)
