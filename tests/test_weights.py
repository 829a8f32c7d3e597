"""``selfattn.attention_weights`` against the specification's probabilities (API.md section 5).

The shapes span several row tiles and key blocks of the tiled engine (Nq=200 with 2 query heads
per key head, Nk=600), so the block-by-block computation is exercised at every seam.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import selfattn
from helpers import (
    assert_close,
    gen,
    make_qkv,
    plain_scores,
    ref_attention,
    ref_weights,
    to_np,
)
from selfattn.engine import BLOCK_N

B, HQ, HKV, NQ, NK, D = 2, 4, 2, 200, 600, 16
assert NK > BLOCK_N


pytestmark = pytest.mark.usefixtures("one_thread")


def rules(name: str, nq: int = NQ, nk: int = NK, b: int = B, hq: int = HQ) -> dict:
    g = gen(50)
    if name == "none":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "window":
        return {"window": (90, 4)}
    if name == "mask":
        m = torch.rand(b, hq, nq, nk, generator=g) < 0.5
        m[:, :, 3] = False  # a row with no visible key
        return {"mask": m}
    if name == "bias":
        return {"bias": torch.randn(b, 1, nq, nk, generator=g)}
    if name == "alibi":
        return {"alibi_slopes": torch.rand(b, hq, generator=g) * 0.05}
    if name == "softcap":
        return {"softcap": 1.2, "scale": 0.8}
    if name == "segments":
        ids = torch.arange(nk).div(97, rounding_mode="floor").expand(b, nk).clone()
        ids[1, -50:] = -1
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


def plain_weights(q, k, **kw) -> torch.Tensor:
    """The textbook softmax in the inputs' dtype, as float32 (the tolerance yardstick)."""
    return torch.softmax(plain_scores(q, k, **kw), -1).nan_to_num(0.0).float()


@functools.cache
def case(rule: str, dtype=torch.float32):
    q, k, v = make_qkv(B, HQ, HKV, NQ, NK, D, dtype=dtype, seed=51)
    kw = rules(rule)
    return q, k, v, kw, ref_weights(q, k, **kw), plain_weights(q, k, **kw)


def check(w, ref, plain, what):
    assert w.dtype == torch.float32
    assert w.shape == ref.shape, f"{what}: shape {tuple(w.shape)} vs {ref.shape}"
    assert_close(w, ref, plain, torch.float32, what)


@pytest.mark.parametrize("given_lse", [False, True])
@pytest.mark.parametrize("rule", RULES)
def test_weights_equal_spec_probabilities(rule, given_lse):
    q, k, v, kw, ref, plain = case(rule)
    lse = None
    if given_lse:
        _, lse = selfattn.attention(q, k, v, return_lse=True, backend="tiled", **kw)
    w = selfattn.attention_weights(q, k, lse=lse, **kw)
    check(w, ref, plain, f"{rule} lse={given_lse}")
    empty = ref.sum(-1) == 0
    assert (to_np(w)[empty] == 0).all()
    np.testing.assert_allclose(to_np(w).sum(-1)[~empty], 1.0, atol=1e-5)


SELECTIONS = {
    "heads_slice": {"heads": slice(1, 4, 2)},
    "heads_list_unordered": {"heads": [3, 0, 2]},
    "heads_int": {"heads": 3},
    "heads_negative": {"heads": [-1, -4]},
    "heads_tensor_repeat": {"heads": torch.tensor([2, 2])},
    "rows_slice": {"rows": slice(None, None, 7)},
    "rows_list_unordered": {"rows": [199, 0, 150, 150, 86]},
    "rows_range": {"rows": range(150, 200)},
    "rows_int": {"rows": 3},
    "both": {"heads": [3, 1], "rows": [130, 3, 86, 170]},
    "both_slices": {"heads": slice(2, 4), "rows": slice(80, 180)},
    "empty_rows": {"rows": []},
}


def _idx(sel, n):
    if sel is None:
        return np.arange(n)
    if isinstance(sel, slice):
        return np.arange(n)[sel]
    arr = sel.numpy() if isinstance(sel, torch.Tensor) else sel
    return np.asarray(arr, dtype=np.int64).reshape(-1) % n


WITH_LSE = ["heads_list_unordered", "rows_list_unordered", "both", "empty_rows"]
SELECTION_CASES = [(s, False) for s in SELECTIONS] + [(s, True) for s in WITH_LSE]


@pytest.mark.parametrize("sel, given_lse", SELECTION_CASES)
@pytest.mark.parametrize("rule", ["none", "combo"])
def test_heads_and_rows_selections(rule, sel, given_lse):
    q, k, v, kw, ref, plain = case(rule)
    pick = SELECTIONS[sel]
    lse = None
    if given_lse:
        _, lse = selfattn.attention(q, k, v, return_lse=True, backend="math", **kw)
    w = selfattn.attention_weights(q, k, lse=lse, **kw, **pick)
    h = _idx(pick.get("heads"), HQ)
    r = _idx(pick.get("rows"), NQ)
    want = ref[:, h][:, :, r]
    assert w.shape == (B, len(h), len(r), NK)
    check(w, want, plain[:, h][:, :, r], f"{rule} {sel}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rule", ["causal", "combo"])
def test_weights_for_each_dtype_are_float32(rule, dtype):
    q, k, _, kw, ref, _ = case(rule, dtype)
    w = selfattn.attention_weights(q, k, rows=slice(0, NQ, 3), **kw)
    # Exact inputs in any dtype, float32 (float64) arithmetic: float32-level error.
    check(w, ref[:, :, ::3], None, f"{rule} {dtype}")


@pytest.mark.parametrize("hkv", [1, 3])
def test_gqa_and_mqa_heads(hkv):
    q, k, _ = make_qkv(1, 6, hkv, 40, 90, 16, seed=52)
    kw = {"causal": True, "alibi_slopes": torch.linspace(0.1, 0.6, 6)}
    ref = ref_weights(q, k, **kw)
    w = selfattn.attention_weights(q, k, heads=[5, 2, 3], **kw)
    check(w, ref[:, [5, 2, 3]], None, f"Hkv={hkv}")


@pytest.mark.parametrize(
    "name, shape",
    [
        ("bias_no_heads", (2, 1, 40, 90)),
        ("bias_2d", (40, 90)),
        ("bias_keys_only", (1, 1, 1, 90)),
        ("mask_no_heads", (2, 1, 40, 90)),
        ("mask_keys_only", (2, 1, 1, 90)),
    ],
)
@pytest.mark.parametrize("pick", [{"heads": [3, 1]}, {"rows": [7, 2, 39]}, {"heads": 0, "rows": 5}])
def test_selection_keeps_broadcast_bias_and_mask(name, shape, pick):
    """Regression: ``Rules.select`` (now ``AttentionSpec.select``) dropped a bias or mask whose head (or row) dim was 1.

    ``attention_weights(..., heads=...)`` with a bias of shape (B, 1, Nq, Nk) or (Nq, Nk), or
    ``rows=...`` with a (1, 1, 1, Nk) bias or key-padding mask, silently ignored that rule.
    """
    q, k, _ = make_qkv(2, 4, 2, 40, 90, 16, seed=56)
    g = gen(57)
    if name.startswith("bias"):
        kw = {"bias": torch.randn(shape, generator=g) * 3}
    else:
        kw = {"mask": torch.rand(shape, generator=g) < 0.5}
    ref = ref_weights(q, k, **kw)
    w = selfattn.attention_weights(q, k, **kw, **pick)
    h, r = _idx(pick.get("heads"), 4), _idx(pick.get("rows"), 40)
    check(w, ref[:, h][:, :, r], None, f"{name} {pick}")


def test_rows_with_no_visible_key_are_zero():
    q, k, _ = make_qkv(2, 2, 2, 60, 20, 16, seed=53)
    w = selfattn.attention_weights(q, k, causal=True)  # rows 0..39 sit before key 0
    assert (w[:, :, :40] == 0).all()
    np.testing.assert_allclose(to_np(w[:, :, 40:].sum(-1)), 1.0, atol=1e-6)
    check(w, ref_weights(q, k, causal=True), None, "causal Nq > Nk")


def test_weights_times_values_is_the_attention_output():
    q, k, v, kw, _, _ = case("combo")
    w = selfattn.attention_weights(q, k, heads=[0, 3], **kw)
    out_ref, _ = ref_attention(q, k, v, **kw)
    v_h = v.repeat_interleave(HQ // HKV, dim=1)[:, [0, 3]]
    np.testing.assert_allclose(to_np(w @ v_h), out_ref[:, [0, 3]], atol=2e-5)


def test_nan_in_hidden_keys_stays_out_of_the_weights():
    q, k, _ = make_qkv(1, 2, 2, 30, 600, 16, seed=54)
    ids = torch.zeros(1, 600, dtype=torch.int64)
    ids[:, 550:] = -1
    k[:, :, 550:] = float("nan")
    kw = {"segment_ids": (ids[:, -30:].clone().zero_(), ids)}
    w = selfattn.attention_weights(q, k, **kw)
    assert torch.isfinite(w).all()
    assert (w[..., 550:] == 0).all()
    clean = k.clone()
    clean[:, :, 550:] = 0
    check(w, ref_weights(q, clean, **kw), None, "NaN padding")


def test_given_lse_is_used():
    """A wrong lse gives proportionally wrong weights: the given one is read, not recomputed."""
    q, k, v, _, ref, _ = case("none")
    _, lse = selfattn.attention(q, k, v, return_lse=True, backend="tiled")
    w = selfattn.attention_weights(q, k, lse=lse - 1.0, heads=[0], rows=[0, 1])
    np.testing.assert_allclose(to_np(w), np.e * ref[:, :1, :2], rtol=1e-5)


def test_weights_need_no_grad_and_leave_inputs_alone():
    q, k, _ = make_qkv(1, 2, 2, 9, 11, 8, seed=55, requires_grad=True)
    q0, k0 = q.detach().clone(), k.detach().clone()
    w = selfattn.attention_weights(q, k, causal=True)
    assert not w.requires_grad
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0)
