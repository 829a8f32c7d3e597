"""Property-based differential test: every CPU backend against the float64 specification.

Hypothesis draws whole attention problems (shapes, GQA/MQA grouping, dtypes, every rule and
their combinations, broadcast mask/bias shapes, non-contiguous and expanded inputs, rows that
see nothing, NaN/inf padding garbage at keys no query sees) and each backend that accepts the
call must agree with

- ``selfattn.reference`` (the numpy float64 specification) on the forward output and lse, by
  the FlashAttention tolerance rule of ``tests/helpers.py``;
- the ``math`` backend run on float64 copies of the inputs (torch autograd over the plain
  formula, itself verified by ``test_autograd.py``) on the gradients of q, k, v, bias and
  ALiBi slopes.

Only public names are used (``selfattn.attention``, ``selfattn.available_backends``,
``selfattn.UnsupportedInputs``, ``selfattn.reference`` and the test helpers), so this file is a
safety net that does not move when the library's modules do. The examples are derandomized: the
same fixed set runs every time, in well under a minute on a 2-core machine.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import selfattn
from helpers import (
    ERR_FLOOR,
    ERR_MULTIPLE,
    assert_close,
    grads,
    max_err,
    plain_attention,
    plain_lse,
    plain_scores,
    ref_attention,
    ref_visibility,
    to_np,
)

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TRITON = importlib.util.find_spec("triton") is not None

HEAD_DIMS = [8, 16, 24, 40]
# Small lengths, odd and even, 1 included; drawn independently for Nq and Nk.
LENGTHS = [1, 2, 3, 5, 7, 16, 17, 31, 33, 63, 64, 65, 70]
# Now and then more keys than one key chunk of a blocked engine holds (so that chunks are
# skipped, and the running maximum carries over from one chunk to the next).
LONG_KEYS = [513, 600]
FORWARD_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
GRAD_DTYPES = [torch.float32, torch.float64]

# How a (B, H, N, D) tensor is laid out in memory: every backend must accept any strides.
LAYOUTS = [
    "contiguous",
    "transposed",  # (B, N, H, D) storage, as a projection followed by .view().transpose(1, 2)
    "d_strided",  # the head dim is not the innermost stride
    "sliced_d",  # a slice of a wider tensor: NaN right after each row's last element
    "strided_n",  # every second row of a longer tensor: NaN rows in between
    "expand_b",  # batch element 0 expanded (stride 0 over the batch)
    "expand_h",  # head 0 expanded (stride 0 over the heads)
]
EXPANDED = {"expand_b", "expand_h"}

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` (B, H, N, D) in memory layout ``kind``: a differentiable view of ``x`` with the same
    values (``expand_*``: the values of batch element / head 0 everywhere)."""
    if kind == "contiguous":
        return x
    if kind == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "d_strided":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "sliced_d":
        return torch.cat([x, torch.full_like(x[..., :3], math.nan)], -1)[..., : x.shape[-1]]
    if kind == "strided_n":
        return torch.stack([x, torch.full_like(x, math.nan)], 3).flatten(2, 3)[:, :, ::2]
    if kind == "expand_b":
        return x[:1].expand(x.shape)
    if kind == "expand_h":
        return x[:, :1].expand(x.shape)
    raise KeyError(kind)


def garbage_slots(shape: tuple[int, ...], kind: str, hidden: torch.Tensor) -> torch.Tensor:
    """(B, H, N) bool over the *source* tensor: the rows that may hold garbage, i.e. every row
    that the ``kind`` view either never reads or reads only at positions in ``hidden``."""
    b, h, n = shape[:3]
    idx = torch.arange(b * h * n, dtype=torch.float64).reshape(b, h, n, 1)
    src = layout(idx, kind)[..., 0].long()  # which source row each view row reads
    used = torch.zeros(b * h * n, dtype=torch.bool)
    used[src[~hidden]] = True
    return ~used.reshape(b, h, n)


@dataclass
class Problem:
    """One drawn attention call. Tensors are stored in ``dtype`` and contiguous; ``leaves()``
    copies them (with padding garbage written when asked) and ``inputs()`` lays the copies out
    in memory as drawn and builds the keyword arguments."""

    b: int
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    dv: int
    dtype: torch.dtype
    seed: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layouts: dict[str, str]
    kw: dict[str, Any]
    trainable: list[str] = field(default_factory=list)  # rule tensors that get a gradient
    garbage: bool = False
    desc: str = ""

    def __repr__(self) -> str:
        return (
            f"Problem(B={self.b}, Hq={self.hq}, Hkv={self.hkv}, Nq={self.nq}, Nk={self.nk}, "
            f"D={self.d}, Dv={self.dv}, {str(self.dtype)[6:]}, seed={self.seed}, "
            f"layouts={self.layouts}, garbage={self.garbage}, {self.desc})"
        )

    def _repr_pretty_(self, printer, cycle) -> None:  # how hypothesis prints a failing example
        printer.text(repr(self))

    def visible(self) -> np.ndarray:
        """The specification's visibility, (B, Hq, Nq, Nk)."""
        vis = ref_visibility(self.nq, self.nk, **self.kw)
        return np.broadcast_to(vis, (self.b, self.hq, self.nq, self.nk))

    def hidden_keys(self) -> torch.Tensor:
        """(B, Hkv, Nk): keys that no query of any head reading them can see."""
        seen = self.visible().any(axis=2).reshape(self.b, self.hkv, -1, self.nk).any(axis=2)
        return torch.from_numpy(~seen)

    def leaves(self, dtype=None, *, requires_grad=False, dirty=False) -> dict[str, torch.Tensor]:
        """Fresh copies of q, k, v (and the trainable rule tensors) in ``dtype``; ``dirty``
        writes NaN/inf into every key/value row that no query reads."""
        dtype = dtype or self.dtype
        out = {"q": self.q.to(dtype).clone(), "k": self.k.to(dtype).clone()}
        out["v"] = self.v.to(dtype).clone()
        if dirty and self.garbage:
            hidden = self.hidden_keys()
            for name, fill in (("k", math.nan), ("v", math.inf)):
                slots = garbage_slots(out[name].shape, self.layouts[name], hidden)
                out[name][slots] = fill
                if name == "v":
                    out[name][..., 0][slots] = math.nan
        for name in self.trainable if requires_grad else []:
            out[name] = self.kw[name].to(dtype).clone()
        if requires_grad:
            for t in out.values():
                t.requires_grad_(True)
        return out

    def inputs(self, leaves: dict[str, torch.Tensor], *, contiguous=False):
        """``(q, k, v, kwargs)`` for ``selfattn.attention`` built from ``leaves``."""
        qkv = [layout(leaves[n], self.layouts[n]) for n in "qkv"]
        if contiguous:
            qkv = [t.contiguous() for t in qkv]
        kw = dict(self.kw)
        for name in ("bias", "alibi_slopes"):
            if name in leaves:
                kw[name] = leaves[name]
            elif name in kw:
                kw[name] = kw[name].to(leaves["q"].dtype)
        return (*qkv, kw)


def _side():
    return st.one_of(st.none(), st.integers(0, 20))


def _sometimes(draw, p_in_4: int = 1) -> bool:
    """True with probability about ``p_in_4 / 4`` (shrinks towards False)."""
    return draw(st.integers(0, 3)) >= 4 - p_in_4


@st.composite
def problems(draw, dtypes, *, max_len=70, max_kv_heads=3, max_group=3, long_keys=True, rule_odds=1):
    """A random valid attention call: shapes, dtype, rules (each with probability
    ``rule_odds / 4``), layouts, empty rows, garbage."""
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, max_kv_heads))
    group = draw(st.integers(1, max_group))
    hq = hkv * group
    lengths = st.one_of(
        st.sampled_from([n for n in LENGTHS if n <= max_len]), st.integers(1, max_len)
    )
    nq = draw(lengths)
    nk = draw(st.sampled_from(LONG_KEYS)) if long_keys and _sometimes(draw, 1) else draw(lengths)
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.sampled_from(HEAD_DIMS))
    dtype = draw(st.sampled_from(dtypes))
    amp = draw(st.sampled_from([1.0, 0.3, 3.0]))  # 3.0: peaked softmax rows
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    q = (randn(b, hq, nq, d) * amp).to(dtype)
    k = (randn(b, hkv, nk, d) * amp).to(dtype)
    v = randn(b, hkv, nk, dv).to(dtype)
    kw: dict[str, Any] = {}
    desc: list[str] = []
    trainable: list[str] = []

    if _sometimes(draw, rule_odds):
        kw["causal"] = True
    if _sometimes(draw, rule_odds):
        kw["window"] = (draw(_side()), draw(_side()))
    if _sometimes(draw, rule_odds):
        mask_shape = draw(
            st.sampled_from([(nq, nk), (b, 1, nq, nk), (1, hq, 1, nk), (b, hq, nq, nk), (nk,)])
        )
        density = draw(st.sampled_from([0.5, 0.8, 0.97]))
        kw["mask"] = torch.rand(mask_shape, generator=g) < density
    if _sometimes(draw, rule_odds):  # rows that see no key at all, made by the mask
        m = kw.get("mask", torch.ones(nq, nk, dtype=torch.bool))
        if m.dim() >= 2 and m.shape[-2] == nq:
            rows = draw(st.lists(st.integers(0, nq - 1), min_size=1, max_size=3, unique=True))
            m[..., rows, :] = False
            desc.append(f"empty_rows={rows}")
        elif m.dim() == 4:
            m[:, draw(st.integers(0, hq - 1))] = False
            desc.append("empty_head")
        kw["mask"] = m
    if _sometimes(draw, rule_odds):
        shape = draw(
            st.sampled_from(
                [(b, hq, nq, nk), (nq, nk), (1, hq, 1, nk), (b, 1, nq, 1), (nk,), (hq, nq, 1)]
            )
        )
        kw["bias"] = (randn(*shape) * draw(st.sampled_from([0.5, 2.0]))).to(dtype)
        if draw(st.booleans()):
            trainable.append("bias")
    if _sometimes(draw, rule_odds):
        shape = draw(st.sampled_from([(hq,), (b, hq)]))
        kw["alibi_slopes"] = (torch.rand(shape, generator=g, dtype=torch.float64) * 0.3 + 0.01).to(
            dtype
        )
        if draw(st.booleans()):
            trainable.append("alibi_slopes")
    if _sometimes(draw, rule_odds):
        kw["softcap"] = draw(st.sampled_from([0.5, 2.0, 10.0]))
    if _sometimes(draw, rule_odds):
        kw["segment_ids"] = draw(segment_ids(g, b, nq, nk))
    if _sometimes(draw, rule_odds):
        kw["scale"] = draw(st.sampled_from([0.05, 0.5, 1.0, -0.25]))

    layouts = {name: draw(st.sampled_from(LAYOUTS)) for name in "qkv"}
    garbage = draw(st.booleans())
    if garbage and draw(st.booleans()):  # padding keys: masked for every query
        if "mask" not in kw:
            kw["mask"] = torch.ones(draw(st.sampled_from([(nk,), (b, 1, 1, nk)])), dtype=bool)
        m = kw["mask"]
        cols = draw(st.lists(st.integers(0, nk - 1), min_size=1, max_size=8, unique=True))
        m[..., cols] = False
    for name, val in kw.items():
        if isinstance(val, torch.Tensor):
            desc.append(f"{name}{tuple(val.shape)}")
        elif isinstance(val, tuple) and isinstance(val[0], torch.Tensor):
            desc.append(f"{name}=pair{tuple(val[0].shape)},{tuple(val[1].shape)}")
        else:
            desc.append(f"{name}={val}")
    desc.append(f"amp={amp}")
    if trainable:
        desc.append(f"trainable={trainable}")
    return Problem(
        b, hq, hkv, nq, nk, d, dv, dtype, seed, q, k, v, layouts, kw, trainable, garbage,
        ", ".join(desc),
    )  # fmt: skip


@st.composite
def segment_ids(draw, g, b, nq, nk):
    """Packed documents: a single (B, N) tensor when Nq == Nk (or, sometimes, a pair), else a
    pair (q_ids (B, Nq), kv_ids (B, Nk)); negative ids are padding (left, right or inside)."""
    dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    docs = draw(st.integers(1, 4))

    def ids(n):
        x = torch.randint(0, docs, (b, n), generator=g).sort(dim=1).values
        pad = draw(st.integers(0, n // 3))
        if pad:
            where = draw(st.sampled_from(["right", "left", "random"]))
            if where == "right":
                x[-1, n - pad :] = -1
            elif where == "left":
                x[0, :pad] = -1
            else:
                x[torch.rand(b, n, generator=g) < 0.2] = -1
        return x.to(dtype)

    kv = ids(nk)
    if nq == nk and draw(st.integers(0, 3)) > 0:
        return kv
    if nq <= nk and draw(st.booleans()):  # the queries are the last Nq positions (a KV cache)
        return (kv[:, nk - nq :].clone(), kv)
    return (ids(nq), kv)


def cpu_backends() -> list[str]:
    """Every backend this machine can run on CPU tensors, and the dispatcher."""
    return [name for name in selfattn.available_backends() if name != "triton"] + ["auto"]


def call(backend: str, q, k, v, kw, *, lse: bool):
    """``(out, lse or None)``; None when the backend declines (UnsupportedInputs). A backend
    that declines ``return_lse=True`` is retried without it."""
    try:
        if lse:
            try:
                return selfattn.attention(q, k, v, backend=backend, return_lse=True, **kw)
            except selfattn.UnsupportedInputs:
                pass
        return selfattn.attention(q, k, v, backend=backend, **kw), None
    except selfattn.UnsupportedInputs:
        return None


def assert_lse_close(lse, ref, plain, what):
    """lse: float32, -inf exactly on the rows that see nothing, finite elsewhere, relative error
    within 2e-6 plus ERR_MULTIPLE times the plain same-dtype logsumexp's."""
    assert lse.dtype == torch.float32, f"{what}: lse dtype {lse.dtype}"
    got = to_np(lse)
    assert np.array_equal(np.isneginf(got), np.isneginf(ref)), f"{what}: -inf rows differ"
    fin = np.isfinite(ref)
    assert np.isfinite(got[fin]).all(), f"{what}: non-finite lse on a row that sees keys"
    rel = np.abs(got[fin] - ref[fin]) / (1.0 + np.abs(ref[fin]))
    base = np.abs(to_np(plain)[fin] - ref[fin]) / (1.0 + np.abs(ref[fin]))
    base = base[np.isfinite(base)]
    tol = 2e-6 + ERR_MULTIPLE * base.max(initial=0.0)
    assert rel.max(initial=0.0) <= tol, f"{what}: lse error {rel.max():.3g} > {tol:.3g}"


def check_forward(p: Problem, backends: list[str]) -> list[str]:
    """Runs ``backends`` on ``p``'s (dirty, strided) inputs and checks out and lse against the
    specification on the clean inputs; returns the backends that ran."""
    q, k, v, kw = p.inputs(p.leaves(dirty=True))
    qc, kc, vc, kwc = p.inputs(p.leaves(), contiguous=True)
    ref, ref_lse = ref_attention(qc, kc, vc, **kwc)
    plain = plain_attention(qc, kc, vc, **kwc)
    plain_l = plain_lse(qc, kc, **kwc)
    empty = torch.from_numpy(np.isneginf(ref_lse))
    event(f"rows seeing nothing: {'some' if empty.any() else 'none'}")
    event(f"garbage written: {bool(p.garbage and p.hidden_keys().any())}")
    ran = []
    for name in backends:
        res = call(name, q, k, v, kw, lse=True)
        if res is None:
            continue
        ran.append(name)
        out, lse = res
        what = f"{name} {p!r}"
        assert out.shape == (p.b, p.hq, p.nq, p.dv), f"{what}: out shape {tuple(out.shape)}"
        assert_close(out, ref, plain, p.dtype, f"{what} out")
        assert (out[empty] == 0).all(), f"{what}: a row that sees nothing is not exactly 0"
        if lse is not None:
            assert lse.shape == (p.b, p.hq, p.nq), f"{what}: lse shape {tuple(lse.shape)}"
            assert_lse_close(lse, ref_lse, plain_l, f"{what} lse")
    return ran


@settings(max_examples=400, **SETTINGS)
@given(problems(FORWARD_DTYPES))
def test_every_cpu_backend_forward_matches_float64_spec(p):
    """Forward: for every CPU backend that accepts the call, out and lse equal the float64
    specification within the tolerance rule; rows that see nothing are exactly 0 with lse
    -inf; NaN/inf garbage at keys no query sees, and in memory the strides skip, never reaches
    the output. ``math`` and ``tiled`` must accept every call."""
    ran = check_forward(p, cpu_backends())
    assert {"math", "tiled"} <= set(ran), f"math/tiled declined: ran only {ran}"
    event(f"backends that ran: {sorted(ran)}")


def assert_grad_close(g, ref, plain, dtype, what, *, reduced, smax, gmax):
    """float64: within 1e-9 relative to the gradient's magnitude.

    float32: the FlashAttention rule against the plain float32 formula's gradient, as
    ``test_autograd.py`` judges it (a bias/ALiBi gradient sums up to B*Nq*Nk terms per entry,
    so its floor also scales with its magnitude), plus the float32 rounding that a recomputing
    backward has and the plain formula can hide: ``p = exp(s - lse)`` from float32 scores and
    lse carries a relative ``eps * |s|``, and ``dS = p * (dP - rowsum(dO * O))`` cancels, so a
    gradient that is ~0 (dk of a key that is the only one its rows see) still gets
    ``eps * |dO| * |v|`` per term. That part scales with ``smax`` (the largest |score|) and
    ``gmax`` (the largest gradient of q, k, v of the problem); torch's own fused SDPA backward
    needs about a quarter of it.
    """
    assert g.dtype == dtype, f"{what}: gradient dtype {g.dtype}, expected {dtype}"
    assert torch.isfinite(g).all(), f"{what}: non-finite gradient"
    err = max_err(g, ref)
    scale = float(np.abs(ref).max(initial=0.0))
    if dtype == torch.float64:
        tol = 1e-9 * (1.0 + scale)
        assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"
        return
    eps = torch.finfo(dtype).eps
    base = max_err(plain, ref)
    tol = ERR_MULTIPLE * base + ERR_FLOOR[dtype] + 4 * eps * (1.0 + smax) * max(scale, gmax)
    if reduced:
        tol += 16 * eps * scale
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g} (plain error {base:.3g})"


def score_magnitude(p: Problem) -> float:
    """The largest |score| among visible (query, key) pairs, after steps 1-4 (0 if none)."""
    q, k, _, kw = p.inputs(p.leaves(torch.float64), contiguous=True)
    s = plain_scores(q, k, **kw)
    s = s[torch.isfinite(s)]
    return float(s.abs().max()) if s.numel() else 0.0


@settings(max_examples=400, **SETTINGS)
@given(problems(GRAD_DTYPES))
def test_every_autograd_backend_gradients_match_float64_math(p):
    """Backward: for every CPU backend that accepts inputs requiring grad, the gradients of q,
    k, v, bias and ALiBi slopes (through strided/expanded views, with garbage in hidden keys) of
    ``sum(out * dout) + sum(lse * dlse)`` (the lse term where the backend returns an lse, on the
    rows that see a key) equal those of ``math`` on float64 copies of the clean inputs; rows
    that see nothing get exactly zero dq, hidden keys exactly zero dk and dv, invisible scores
    exactly zero dbias."""
    g = torch.Generator().manual_seed(p.seed + 1)
    dout = torch.randn(p.b, p.hq, p.nq, p.dv, generator=g, dtype=torch.float64)
    dlse = torch.randn(p.b, p.hq, p.nq, generator=g, dtype=torch.float64)
    vis = torch.from_numpy(np.array(p.visible()))
    empty_rows = ~vis.any(-1)  # (B, Hq, Nq)
    hidden = p.hidden_keys()  # (B, Hkv, Nk)

    def loss(out, lse):
        total = (out * dout.to(out.dtype)).sum()
        if lse is not None:
            total = total + (lse.where(~empty_rows, 0.0) * dlse.to(lse.dtype)).sum()
        return total

    def gradients(backend, dtype, *, dirty=True, with_lse=True, contiguous=False):
        """``(gradients by leaf name, whether the lse term was in the loss)``, or None when
        ``backend`` declines; backend None: the plain formula in ``dtype``."""
        leaves = p.leaves(dtype, requires_grad=True, dirty=dirty)
        q, k, v, kw = p.inputs(leaves, contiguous=contiguous)
        if backend is None:
            out, lse = plain_attention(q, k, v, **kw), plain_lse(q, k, **kw)
        else:
            res = call(backend, q, k, v, kw, lse=with_lse)
            if res is None:
                return None
            out, lse = res
        got = grads(loss(out, lse if with_lse else None), list(leaves.values()), torch.ones(()))
        return dict(zip(leaves, got)), lse is not None and with_lse

    oracles, plains = {}, {}

    def oracle(with_lse: bool):
        """math's float64 gradients (and the plain same-dtype formula's) for this loss."""
        if with_lse not in oracles:
            got, _ = gradients(
                "math", torch.float64, dirty=False, with_lse=with_lse, contiguous=True
            )
            oracles[with_lse] = {name: to_np(t) for name, t in got.items()}
            if p.dtype != torch.float64:
                plains[with_lse] = gradients(None, p.dtype, dirty=False, with_lse=with_lse)[0]
        return oracles[with_lse], plains.get(with_lse, {})

    smax = score_magnitude(p)
    ran = []
    for name in cpu_backends():
        res = gradients(name, p.dtype)
        if res is None:
            continue
        ran.append(name)
        got, with_lse = res
        ref, plain = oracle(with_lse)
        gmax = max(float(np.abs(ref[n]).max(initial=0.0)) for n in "qkv")
        for leaf, gr in got.items():
            what = f"{name} d{leaf} (lse term: {with_lse}) {p!r}"
            assert gr is not None, f"{what}: no gradient"
            assert gr.shape == ref[leaf].shape, f"{what}: shape {tuple(gr.shape)}"
            reduced = leaf in ("bias", "alibi_slopes")
            assert_grad_close(
                gr, ref[leaf], plain.get(leaf), p.dtype, what,
                reduced=reduced, smax=smax, gmax=gmax,
            )  # fmt: skip
        what = f"{name} {p!r}"
        if p.layouts["q"] not in EXPANDED:
            assert (got["q"][empty_rows] == 0).all(), f"{what}: dq != 0 on a row seeing nothing"
        for leaf in "kv":
            if p.layouts[leaf] not in EXPANDED:
                assert (got[leaf][hidden] == 0).all(), f"{what}: d{leaf} != 0 at a hidden key"
        if "bias" in got and got["bias"].shape == vis.shape:
            assert (got["bias"][~vis] == 0).all(), f"{what}: dbias != 0 at an invisible score"
        event(f"{name}: lse term {with_lse}")
    assert {"math", "tiled"} <= set(ran), f"math/tiled declined: ran only {ran}"
    event(f"backends that ran: {sorted(ran)}")


@pytest.mark.interpret
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@settings(max_examples=12, **SETTINGS)
@given(
    problems(
        [torch.float32, torch.float16],
        max_len=40,
        max_kv_heads=2,
        max_group=2,
        long_keys=False,
        rule_odds=2,
    )
)
def test_triton_interpreter_forward_matches_float64_spec(p):
    """The Triton kernels under ``TRITON_INTERPRET=1`` (set for this test only, as
    ``test_triton.py`` does): out and lse equal the specification on tiny drawn problems."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        assert "triton" in selfattn.available_backends()
        assert check_forward(p, ["triton"]) == ["triton"], "triton declined a valid call"
