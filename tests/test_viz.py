"""selfattn.viz: heatmaps, rollout, ASCII visibility, the head view's file, the bench plot.

Probabilities drawn are checked against the numpy specification; pictures are checked to be
non-empty PNGs of the size asked for. The head view's behaviour in a browser is test_browser.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from selfattn import reference
from selfattn.viz import (
    AttentionMaps,
    attention_rollout,
    head_view,
    heatmap,
    heatmap_grid,
    maps_from_qk,
    mask_ascii,
    plot_bench,
)

TOKENS = ["the", "cat", "sat", "on", "the", "mat", "."]


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _assert_picture(path, size: tuple[int, int]) -> None:
    """A PNG of exactly ``size`` (width, height) pixels with something drawn on it."""
    img = _png(path)
    # within a pixel: the saved size is inches x dpi, truncated
    assert abs(img.shape[1] - size[0]) <= 1 and abs(img.shape[0] - size[1]) <= 1, img.shape
    assert img.std() > 10, "picture is blank"


def _size(fig, dpi: int) -> tuple[int, int]:
    """Pixel size of a figure saved at ``dpi``."""
    w, h = fig.get_size_inches()
    return round(float(w) * dpi), round(float(h) * dpi)


def _qk(n=7, hq=4, hkv=2, d=8, layers=3, seed=0, **rules):
    g = torch.Generator().manual_seed(seed)
    qk = {}
    for layer in range(layers):
        q = torch.randn(1, hq, n, d, generator=g) * 1.5
        k = torch.randn(1, hkv, n, d, generator=g) * 1.5
        qk[layer] = (q, k, dict(rules))
    return qk


def _spec_probs(q, k, **rules) -> np.ndarray:
    """Softmax probabilities of the float64 specification, (B, Hq, Nq, Nk)."""
    qn = q.double().numpy()
    kn = np.repeat(k.double().numpy(), q.shape[1] // k.shape[1], axis=1)
    s = reference.scores(qn, kn, scale=rules.get("scale"))
    causal, window = rules.get("causal", False), rules.get("window")
    vis = reference.visibility(q.shape[2], k.shape[2], causal=causal, window=window, q_ndim=4)
    p, _ = reference.softmax(s, np.broadcast_to(vis, s.shape))
    return p


# -- maps_from_qk ---------------------------------------------------------------------------------


def test_maps_from_qk_equals_spec_for_chosen_layers_heads_rows():
    qk = _qk(causal=True)
    maps = maps_from_qk(qk, TOKENS, layers=[2, 0], heads=[3, 1], rows=[6, 0, 3])
    assert maps.weights.shape == (2, 2, 3, len(TOKENS)) and maps.weights.dtype == np.float32
    assert maps.layers == [2, 0] and maps.heads == [3, 1] and maps.rows == [6, 0, 3]
    for li, layer in enumerate([2, 0]):
        q, k, rules = qk[layer]
        p = _spec_probs(q, k, **rules)[0]  # (Hq, N, N)
        np.testing.assert_allclose(maps.weights[li], p[[3, 1]][:, [6, 0, 3]], atol=2e-6)
    # causal: row 0 sees only key 0
    np.testing.assert_allclose(maps.weights[:, :, 1, 0], 1.0, atol=1e-6)
    assert (maps.weights[:, :, 1, 1:] == 0).all()


def test_maps_from_qk_bottom_right_rows_and_query_tokens():
    """Nq < Nk (new tokens after a cache): query row i sits at key position i + Nk - Nq."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3, 8, generator=g)
    k = torch.randn(1, 2, 7, 8, generator=g)
    maps = maps_from_qk([(q, k, {"causal": True})], TOKENS, query_tokens=TOKENS[4:])
    p = _spec_probs(q, k, causal=True)[0]
    np.testing.assert_allclose(maps.weights[0], p, atol=2e-6)
    assert (maps.weights[0, :, 0, 5:] == 0).all()  # row 0 is at position 4
    assert maps.query_tokens == TOKENS[4:]


def test_maps_from_qk_rejects_bad_requests():
    qk = _qk()
    with pytest.raises(ValueError, match=r"layers \[7\] were not captured"):
        maps_from_qk(qk, TOKENS, layers=[7])
    with pytest.raises(ValueError, match="heads"):
        maps_from_qk(qk, TOKENS, heads=[4])
    with pytest.raises(ValueError, match="rows"):
        maps_from_qk(qk, TOKENS, rows=[0, 99])
    with pytest.raises(ValueError, match="no layer"):
        maps_from_qk({}, TOKENS)
    q, k, r = qk[0]
    with pytest.raises(ValueError, match="q must have batch 1"):
        maps_from_qk([(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), r)], TOKENS)
    with pytest.raises(ValueError, match="tokens has 3 entries"):
        maps_from_qk(qk, TOKENS[:3])


def test_attention_maps_validates_shapes():
    w = np.full((1, 2, 3, 4), 0.25)
    toks = list("abcd")
    with pytest.raises(ValueError, match="4-D"):
        AttentionMaps(np.zeros((2, 3, 4)), toks, [0], [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="heads has 1 entries"):
        AttentionMaps(w, toks, [0], [0], [0, 1, 2])
    with pytest.raises(ValueError, match=r"rows \[9\] out of range"):
        AttentionMaps(w, toks, [0], [0, 1], [0, 1, 9])
    with pytest.raises(TypeError, match="array or tensor of numbers"):
        AttentionMaps(object(), toks, [0], [0, 1], [0, 1, 2])


# -- heatmaps -------------------------------------------------------------------------------------


def test_heatmap_one_head_png(tmp_path):
    maps = maps_from_qk(_qk(causal=True), TOKENS)
    fig = heatmap(maps.weights[0, 0], TOKENS, title="layer 0 head 0", path=tmp_path / "a" / "h.png")
    _assert_picture(tmp_path / "a" / "h.png", _size(fig, 120))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == TOKENS
    assert [t.get_text() for t in ax.get_yticklabels()] == TOKENS
    np.testing.assert_allclose(ax.images[0].get_array(), maps.weights[0, 0])


def test_heatmap_query_tokens_default_to_bottom_right():
    fig = heatmap(np.full((2, 7), 1 / 7), TOKENS)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == TOKENS[5:]


def test_heatmap_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(Nq, Nk\)"):
        heatmap(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="3 tokens for 7 keys"):
        heatmap(np.zeros((7, 7)), TOKENS[:3])
    with pytest.raises(ValueError, match="2 query tokens for 7 query rows"):
        heatmap(np.zeros((7, 7)), TOKENS, query_tokens=["a", "b"])


def test_heatmap_grid_layers_by_heads(tmp_path):
    maps = maps_from_qk(_qk(), TOKENS, layers=[0, 2], heads=[0, 1, 2])
    fig = heatmap_grid(maps, title="grid", path=tmp_path / "grid.png", dpi=80)
    _assert_picture(tmp_path / "grid.png", _size(fig, 80))
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6
    assert [ax.get_title() for ax in panels[:3]] == ["head 0", "head 1", "head 2"]
    assert panels[0].get_ylabel() == "layer 0" and panels[3].get_ylabel() == "layer 2"
    # tokens on the outer axes only
    first_col = panels[3]
    assert [t.get_text() for t in first_col.get_yticklabels()] == TOKENS
    assert [t.get_text() for t in panels[4].get_yticklabels()] == []  # inner panel: bare
    np.testing.assert_allclose(panels[5].images[0].get_array(), maps.weights[1, 2])


def test_long_axes_are_labelled_with_tokens_not_positions():
    """Was: past 48 keys (``chat --show``: a prompt and reply of ~80 tokens) the axes showed
    positions 0-79. Now tokens: all of them where they fit, else every k-th."""
    toks = [f"w{j}" for j in range(80)]
    rows = np.random.default_rng(0).random((20, 80))
    fig = heatmap(rows / rows.sum(-1, keepdims=True), toks, query_tokens=toks[60:])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == toks  # 80 fit across 14 inches
    assert [t.get_text() for t in ax.get_yticklabels()] == toks[60:]
    fig = heatmap_grid(np.full((2, 3, 80, 80), 1 / 80), toks)  # 1.6-inch panels
    bottom_left = [a for a in fig.axes if a.images][3]
    shown = [t.get_text() for t in bottom_left.get_xticklabels()]
    step = toks.index(shown[1])
    assert step > 1 and shown == toks[::step]  # every k-th token, still tokens


def test_heatmap_grid_from_array():
    fig = heatmap_grid(np.full((2, 1, 3, 3), 1 / 3), ["a", "b", "c"], layers=[4, 5])
    assert [ax.get_ylabel() for ax in fig.axes if ax.images] == ["layer 4", "layer 5"]
    with pytest.raises(ValueError, match=r"\(L, H, Nq, Nk\)"):
        heatmap_grid(np.zeros((3, 3)))


# -- rollout --------------------------------------------------------------------------------------


def test_rollout_by_hand():
    a1 = np.array([[[1.0, 0.0], [0.5, 0.5]]])  # (H=1, 2, 2)
    a2 = np.array([[[0.2, 0.8], [0.0, 1.0]]])
    eye = np.eye(2)
    r1 = 0.5 * eye + 0.5 * a1[0]
    r2 = 0.5 * eye + 0.5 * a2[0]
    np.testing.assert_allclose(attention_rollout(np.stack([a1, a2])), r2 @ r1)
    np.testing.assert_allclose(attention_rollout(np.stack([a1, a2]), residual=0.0), a2[0] @ a1[0])
    np.testing.assert_allclose(attention_rollout(np.stack([a1, a2]), residual=1.0), eye)


def test_rollout_fuses_heads_and_keeps_rows_stochastic():
    maps = maps_from_qk(_qk(causal=True), TOKENS)
    r = attention_rollout(maps)
    assert r.shape == (7, 7)
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(r, 1), 0.0)  # causal layers cannot roll the future in
    one = attention_rollout(maps.weights[:1], residual=0.0, head_fusion="max")
    fused = maps.weights[0].max(axis=0)
    np.testing.assert_allclose(one, fused / fused.sum(-1, keepdims=True), atol=1e-6)


def test_rollout_rejects_bad_input():
    maps = maps_from_qk(_qk(), TOKENS, rows=[0, 1])
    with pytest.raises(ValueError, match="every query row"):
        attention_rollout(maps)
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(np.ones((1, 1, 2, 2)) / 2, head_fusion="sum")
    with pytest.raises(ValueError, match="residual"):
        attention_rollout(np.ones((1, 1, 2, 2)) / 2, residual=2.0)
    with pytest.raises(ValueError, match=r"\(layers, heads, N, N\)"):
        attention_rollout(np.ones((1, 2, 3)))


# -- the ASCII picture -----------------------------------------------------------------------------


def _cells(picture: str) -> list[str]:
    return [
        re.sub(r"^.*\)\s+(?:seg\s+-?\d+\s+)?", "", ln).replace(" ", "")
        for ln in picture.splitlines()
        if ln.startswith("query")
    ]


def test_mask_ascii_causal_square_and_bottom_right():
    assert _cells(mask_ascii(4, causal=True)) == ["x...", "xx..", "xxx.", "xxxx"]
    pic = mask_ascii(2, 5, causal=True)
    assert _cells(pic) == ["xxxx.", "xxxxx"]
    assert "query 0 (pos 3)" in pic and "i+3" in pic


def test_mask_ascii_window_and_segments():
    assert _cells(mask_ascii(5, window=(1, 0))) == ["x....", "xx...", ".xx..", "..xx.", "...xx"]
    assert _cells(mask_ascii(5, window=(None, 1)))[0] == "xx..."
    pic = mask_ascii(5, segment_ids=[0, 0, 1, 1, -1])
    assert _cells(pic) == ["xx...", "xx...", "..xx.", "..xx.", "....."]
    assert "seg" in pic
    pic = mask_ascii(2, 4, segment_ids=([1, 2], [1, 1, 2, 2]), visible="#", hidden="-")
    assert _cells(pic) == ["##--", "--##"]


def test_mask_ascii_agrees_with_spec_and_blocks_large():
    rng = np.random.default_rng(0)
    mask = rng.random((9, 11)) < 0.5
    pic = mask_ascii(9, 11, causal=True, window=(4, None), mask=mask)
    vis = reference.visibility(9, 11, causal=True, window=(4, None), mask=mask)
    assert _cells(pic) == ["".join("x" if v else "." for v in row) for row in vis]
    big = mask_ascii(1000, causal=True, max_cells=10)
    lines = [ln.split()[-1] for ln in big.splitlines()[2:]]
    assert len(lines) == 10 and all(len(ln) == 10 for ln in lines)
    assert lines[0] == "+........." and lines[-1] == "xxxxxxxxx+"
    assert "100 rows x 100 keys" in big


def test_mask_ascii_rejects_bad_input():
    with pytest.raises(ValueError, match="nq must be a positive int"):
        mask_ascii(0)
    with pytest.raises(ValueError, match="mask must be 2-D"):
        mask_ascii(3, mask=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="segment_ids"):
        mask_ascii(3, segment_ids=[0, 1])


# -- the head view file ---------------------------------------------------------------------------


def _page_data(path) -> dict:
    text = path.read_text()
    m = re.search(r'<script type="application/json" id="hv-data">(.*?)</script>', text, re.S)
    assert m, "data block missing"
    return json.loads(m.group(1))


def test_head_view_writes_one_file_with_the_weights(tmp_path):
    toks = [*TOKENS[:-1], "</script><b>"]
    maps = maps_from_qk(_qk(), toks, layers=[1, 2], heads=[0, 3], rows=[1, 4, 5])
    out = head_view(maps, tmp_path / "deep" / "view.html", title="<i>title</i>")
    assert out == tmp_path / "deep" / "view.html" and out.is_file()
    text = out.read_text()
    assert "&lt;i&gt;title&lt;/i&gt;" in text and "<i>title" not in text
    assert text.count("</script>") == 2  # a token cannot close the script element
    data = _page_data(out)
    assert data["tokens"] == toks and data["layers"] == [1, 2] and data["heads"] == [0, 3]
    assert data["rows"] == [1, 4, 5]
    np.testing.assert_allclose(np.array(data["weights"]), maps.weights, atol=5e-5)


def test_head_view_from_array_and_errors(tmp_path):
    w = np.full((1, 2, 3, 3), 1 / 3)
    data = _page_data(head_view(w, tmp_path / "v.html", tokens=["a", "b", "c"], digits=2))
    assert data["weights"][0][1][2] == [0.33, 0.33, 0.33]
    with pytest.raises(ValueError, match="together with tokens"):
        head_view(w, tmp_path / "v.html")
    with pytest.raises(ValueError, match="digits"):
        head_view(w, tmp_path / "v.html", tokens=["a", "b", "c"], digits=0)


def test_head_view_inlines_its_package_data_files(tmp_path):
    """The page's style and script are the package's head_view.css and head_view.js, inline."""
    from importlib import resources

    text = head_view(np.full((1, 1, 2, 2), 0.5), tmp_path / "v.html", tokens=["a", "b"]).read_text()
    for name in ("head_view.css", "head_view.js"):
        asset = resources.files("selfattn.viz").joinpath(name).read_text(encoding="utf-8")
        assert len(asset) > 500 and asset in text, name
    assert "<link" not in text and "src=" not in text  # nothing is loaded from elsewhere


# -- the benchmark plot ---------------------------------------------------------------------------


def test_plot_bench_png(tmp_path):
    rows = [
        {"method": m, "n": n, "median_s": t * (n / 256) ** 2, "memory_bytes": mem * n}
        for m, t, mem in (("selfattn", 1e-3, 4e3), ("sdpa", 5e-4, 2e4))
        for n in (256, 512, 1024)
    ]
    fig = plot_bench({"rows": rows, "config": {"device": "cpu"}}, tmp_path / "b.png", dpi=50)
    _assert_picture(tmp_path / "b.png", _size(fig, 50))
    ax_t, ax_m = fig.axes[:2]
    assert ax_t.get_xscale() == "log" and ax_t.get_yscale() == "log"
    labels = [ln.get_label() for ln in ax_t.get_lines()]
    assert "selfattn" in labels and "sdpa" in labels and any("N²" in x for x in labels)
    assert {ln.get_label() for ln in ax_m.get_lines()} >= {"selfattn", "sdpa", "∝ N", "∝ N²"}
    with pytest.raises(ValueError, match="no rows"):
        plot_bench({"rows": []})
