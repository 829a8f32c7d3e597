"""selfattn.distributed on real gloo process groups (W = 2, 3, 4) on this machine.

Each world size starts ONE group of W processes that runs every named check below in turn and
writes what happened per rank; the parametrised tests then read those results, so the checks stay
separate in the report while the processes are started only once. Every check does all of its
collective work before it compares anything, so a failing comparison cannot desynchronise the
ranks. Two more groups test that a dead or stuck peer makes the others fail instead of wait.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import selfattn
from helpers import assert_close, plain_attention, ref_attention, to_np
from selfattn import distributed as sd

WORLDS = (2, 3, 4)
GROUP_TIMEOUT_S = 30  # a desynchronised check fails after this instead of hanging
CHECKS: dict[str, tuple[Callable[[int, int], None], tuple[int, ...]]] = {}


def check(*worlds: int):
    """Register a check that every rank of a group runs (for the given world sizes)."""

    def wrap(fn):
        CHECKS[fn.__name__] = (fn, worlds or WORLDS)
        return fn

    return wrap


# -- the launcher ----------------------------------------------------------------------------------


def _init(rank: int, world: int, init_file: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip


def _group_worker(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    _init(rank, world, init_file, GROUP_TIMEOUT_S)
    results = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            CHECKS[name][0](rank, world)
            results[name] = {"ok": True, "s": time.perf_counter() - t0}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _launch(target, world: int, args: tuple, deadline_s: float) -> tuple[str, list[int | None]]:
    """Start ``world`` spawned processes running ``target(rank, world, init_file, out_dir, *args)``
    and wait for them; returns the output folder and the exit codes (None: killed at deadline)."""
    out_dir = tempfile.mkdtemp(prefix="selfattn-dist-")
    init_file = os.path.join(out_dir, "init")
    # a fork server that has imported torch once (and run nothing) hands out fresh children
    # quickly; it never used a thread pool, so forking it is safe
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "selfattn", __name__])
    procs = [
        ctx.Process(target=target, args=(r, world, init_file, out_dir, *args), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():  # only our own children, by their handle
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return out_dir, codes


_RESULTS: dict[int, list[dict]] = {}


def _results(world: int) -> list[dict]:
    if world not in _RESULTS:
        names = [n for n, (_, ws) in CHECKS.items() if world in ws]
        out_dir, codes = _launch(_group_worker, world, (names,), deadline_s=240)
        per_rank = []
        for r in range(world):
            path = Path(out_dir, f"rank{r}.json")
            if not path.exists():
                raise RuntimeError(f"W={world}: rank {r} wrote no results (exit codes {codes})")
            per_rank.append(json.loads(path.read_text()))
        _RESULTS[world] = per_rank
    return _RESULTS[world]


# -- shared helpers for the checks -----------------------------------------------------------------


def _qkv(world, hq, hkv, dtype, seed, b=2, chunk=3, d=8):
    """Whole-sequence q, k, v (identical on every rank: same seed), N = 2*W*chunk."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * world * chunk
    q = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _segments(b, n, seed, pad=True):
    """Packed documents: ids 0, 1, 2 ... in runs of random lengths, a few -1 (padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cumsum((torch.rand(b, n, generator=g) < 0.25).long(), 1)
    if pad:
        ids[:, -2:] = -1  # trailing padding: those rows see nothing
        ids[0, 3] = -1
    return ids


def _finite(lse):
    return lse.masked_fill(~torch.isfinite(lse), 0.0)


def _single(q, k, v, do, dl, **kw):
    """Single-process attention: out, lse and the gradients of <out, do> + <lse, dl>."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = selfattn.attention(q, k, v, return_lse=True, **kw)
    ((out * do).sum() + (_finite(lse) * dl).sum()).backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _ringed(q, k, v, do, dl, layout, seg=None, **kw):
    """The same through ring_attention, gathered back to whole-sequence tensors."""
    parts = [sd.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
    if seg is not None:
        kw["segment_ids"] = (
            tuple(sd.shard(s, dim=1, layout=layout) for s in seg)
            if isinstance(seg, tuple)
            else sd.shard(seg, dim=1, layout=layout)
        )
    out, lse = sd.ring_attention(*parts, layout=layout, return_lse=True, **kw)
    dos, dls = sd.shard(do, layout=layout), sd.shard(dl, dim=2, layout=layout)
    ((out * dos).sum() + (_finite(lse) * dls).sum()).backward()
    full = [out.detach(), lse.detach(), *(p.grad for p in parts)]
    return [sd.unshard(t, layout=layout) for t in full]


def _assert_equal64(got, want, what, tol=1e-9):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, f"{what} {name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert not torch.isnan(a).any(), f"{what} {name}: NaN"
        same_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
        err = torch.where(same_inf, 0.0, (a.double() - b.double()).abs()).max().item()
        # the lse is returned in float32 by both, so it may differ by float32 rounding
        bound = (
            4e-6 * (1 + b.abs().masked_fill(torch.isinf(b), 0).max().item())
            if name == "lse"
            else tol
        )
        assert err <= bound, f"{what} {name}: max error {err:.3g} > {bound:.3g}"


# The rule combinations every layout and world size is checked with (float64, exact).
RULES = {
    "none_gqa": dict(hq=4, hkv=2, kw={}),
    "causal": dict(hq=2, hkv=2, kw={"causal": True}),
    "window_gqa": dict(hq=4, hkv=2, kw={"window": (5, 3), "scale": 0.3}),
    "causal_window_mqa": dict(hq=3, hkv=1, kw={"causal": True, "window": (4, 0)}),
    "right_window": dict(hq=2, hkv=1, kw={"window": (None, 2)}),
    "segments_causal": dict(hq=4, hkv=2, kw={"causal": True}, seg="one"),
    "segment_pair_window": dict(hq=2, hkv=2, kw={"window": (6, 6)}, seg="pair"),
}


def _exact_case(world, layout, rule, seed):
    case = RULES[rule]
    q, k, v = _qkv(world, case["hq"], case["hkv"], torch.float64, seed)
    b, n = q.shape[0], q.shape[2]
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    dl = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)
    kw = dict(case["kw"])
    seg = None
    if case.get("seg") == "one":
        seg = _segments(b, n, seed)
    elif case.get("seg") == "pair":
        seg = (_segments(b, n, seed), _segments(b, n, seed + 7, pad=False))
    got = _ringed(q, k, v, do, dl, layout, seg=seg, **kw)
    want = _single(q, k, v, do, dl, segment_ids=seg, **kw)
    _assert_equal64(got, want, f"W={world} {layout} {rule}")


def _make_exact(layout, rule, idx):
    def fn(rank, world):
        _exact_case(world, layout, rule, seed=100 + idx)

    fn.__name__ = f"float64_{layout}_{rule}"
    return fn


for _i, (_layout, _rule) in enumerate((lay, r) for lay in sd.LAYOUTS for r in RULES):
    check()(_make_exact(_layout, _rule, _i))


def _float32_case(world, layout, hq, hkv, kw, seg_kind, seed):
    q, k, v = _qkv(world, hq, hkv, torch.float32, seed, chunk=4, d=16)
    b, n = q.shape[0], q.shape[2]
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(q.shape, generator=g)
    # no padding here: a row that sees nothing makes the plain yardstick's gradient NaN
    seg = _segments(b, n, seed, pad=False) if seg_kind else None
    got = _ringed(q, k, v, do, torch.zeros(q.shape[:3]), layout, seg=seg, **kw)
    ref_kw = dict(kw, segment_ids=seg) if seg is not None else dict(kw)
    ref_out, ref_lse = ref_attention(q, k, v, **ref_kw)
    plain = plain_attention(q, k, v, **ref_kw)
    assert_close(got[0], ref_out, plain, torch.float32, "out")
    assert_close(got[1], ref_lse, None, torch.float32, "lse")
    # gradients: float64 single-process ones are the reference, plain float32 autograd the yardstick
    want = _single(
        q.double(),
        k.double(),
        v.double(),
        do.double(),
        torch.zeros(q.shape[:3]).double(),
        segment_ids=seg,
        **kw,
    )
    pq, pk, pv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    (plain_attention(pq, pk, pv, **ref_kw) * do).sum().backward()
    for name, a, ref, p in zip(("dq", "dk", "dv"), got[2:], want[2:], (pq.grad, pk.grad, pv.grad)):
        assert_close(a, to_np(ref), p, torch.float32, name)


@check()
def float32_zigzag_causal_segments(rank, world):
    _float32_case(world, "zigzag", 4, 2, {"causal": True}, True, seed=7)


@check()
def float32_contiguous_window_gqa(rank, world):
    _float32_case(world, "contiguous", 4, 1, {"window": (7, 2)}, False, seed=8)


@check()
def float32_zigzag_full(rank, world):
    _float32_case(world, "zigzag", 2, 2, {}, False, seed=9)


@check(2)
def half_precision(rank, world):
    """float16 and bfloat16 shards: float32 accumulation and merging, the FlashAttention rule."""
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = _qkv(world, 4, 2, dtype, seed=12, chunk=8, d=16)
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        for layout in sd.LAYOUTS:
            parts = [sd.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
            out = sd.ring_attention(*parts, layout=layout, causal=True)
            out.backward(sd.shard(do, layout=layout))
            got = [sd.unshard(t, layout=layout) for t in (out.detach(), *(p.grad for p in parts))]
            ref_out, _ = ref_attention(q, k, v, causal=True)
            assert_close(got[0], ref_out, plain_attention(q, k, v, causal=True), dtype, "out")
            z = torch.zeros(q.shape[:3], dtype=torch.float64)
            want = _single(q.double(), k.double(), v.double(), do.double(), z, causal=True)
            pq, pk, pv = (t.detach().clone().requires_grad_() for t in (q, k, v))
            (plain_attention(pq, pk, pv, causal=True) * do).sum().backward()
            for name, a, ref, p in zip(
                ("dq", "dk", "dv"), got[1:], want[2:], (pq.grad, pk.grad, pv.grad)
            ):
                assert_close(a, to_np(ref), p, dtype, f"{dtype} {layout} {name}")


@check()
def lse_hundreds_apart(rank, world):
    """Blocks whose lse differ by hundreds merge without overflow (float32 and float64)."""
    for dtype in (torch.float32, torch.float64):
        q, k, v = _qkv(world, 2, 2, torch.float64, seed=3, chunk=4, d=16)
        q = q * 6.0
        k[:, :, :4] *= 40.0  # the first chunk's keys give scores in the hundreds
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        for layout in sd.LAYOUTS:
            out, lse = sd.ring_attention(
                *(sd.shard(t, layout=layout) for t in (q, k, v)), layout=layout, return_lse=True,
                causal=True,
            )  # fmt: skip
            out, lse = sd.unshard(out, layout=layout), sd.unshard(lse, layout=layout)
            ref_out, ref_lse = ref_attention(q, k, v, causal=True)
            spread = float(ref_lse.max() - ref_lse.min())
            assert spread > 200, f"the test needs lse values far apart, got a spread of {spread}"
            assert torch.isfinite(out).all() and torch.isfinite(lse).all()
            plain = plain_attention(q, k, v, causal=True)
            assert_close(out, ref_out, plain, dtype, f"{dtype} {layout} out")
            if dtype == torch.float64:
                assert float(abs(to_np(lse) - ref_lse).max()) < 1e-4 * spread


@check()
def fully_masked_rows_and_padding_garbage(rank, world):
    """Rows that see no key give 0, lse -inf and zero gradients; NaN in hidden keys stays hidden."""
    q, k, v = _qkv(world, 2, 1, torch.float64, seed=5)
    b, n = q.shape[0], q.shape[2]
    ids = _segments(b, n, seed=5)
    pad = ids < 0
    k = k.masked_fill(pad[:, None, :, None], math.nan)
    v = v.masked_fill(pad[:, None, :, None], math.inf)
    do = torch.ones(q.shape, dtype=torch.float64)
    for layout in sd.LAYOUTS:
        got = _ringed(q, k, v, do, torch.zeros(q.shape[:3], dtype=torch.float64), layout, seg=ids)
        out, lse, dq, dk, dv = got
        for name, t in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv)):
            assert not torch.isnan(t).any(), f"{layout}: NaN in {name}"
        rows = pad[:, None, :].expand(lse.shape)
        assert (out[rows] == 0).all() and torch.isneginf(lse[rows]).all()
        assert (dq[rows] == 0).all()
        want = _single(q, k, v, do, torch.zeros(q.shape[:3], dtype=torch.float64), segment_ids=ids)
        _assert_equal64(got, want, f"{layout} padding")


@check()
def exchange_counts(rank, world):
    """Exactly W-1 key/value hops per forward (W-1 more and W gradient hops in backward);
    fewer when a window leaves the far blocks empty for every rank."""
    q, k, v = _qkv(world, 2, 2, torch.float64, seed=11, chunk=5)
    do = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(q.shape[:3], dtype=torch.float64)
    cases = [
        ("zigzag", {"causal": True}, world),
        ("contiguous", {}, world),
        ("contiguous", {"causal": True}, world),
        ("zigzag", {"window": (2, 0)}, world),  # chunk 2W-1-r needs rank r+1's chunk: W-1 hops
        ("contiguous", {"window": (2, 0)}, 2),  # only the previous rank's block is in reach
    ]
    for layout, kw, hops in cases:
        sd.EXCHANGES.clear()
        parts = [sd.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
        out = sd.ring_attention(*parts, layout=layout, **kw)
        fwd = dict(sd.EXCHANGES)
        (out * sd.shard(do, layout=layout)).sum().backward()
        total = dict(sd.EXCHANGES)
        got = [
            sd.unshard(t, layout=layout)
            for t in (out.detach(), out.detach(), *(p.grad for p in parts))
        ]
        want = _single(q, k, v, do, zero, **kw)
        got[1] = want[1]  # lse not asked for here
        _assert_equal64(got, want, f"{layout} {kw}")
        assert fwd == {"kv": hops - 1} if hops > 1 else fwd == {}, f"{layout} {kw}: forward {fwd}"
        want_total = {"kv": 2 * (hops - 1), "dkv": hops} if hops > 1 else {}
        assert total == want_total, f"{layout} {kw}: forward+backward {total} != {want_total}"


@check()
def shard_unshard(rank, world):
    n = 2 * world * 3
    x = torch.arange(2 * n).reshape(1, 2, n).float()  # (B, H, N) with dim 2 the sequence
    for layout in sd.LAYOUTS:
        mine = sd.shard(x, dim=2, layout=layout)
        assert sd.unshard(mine, dim=2, layout=layout).equal(x)
        assert sd.unshard(sd.shard(x[0], dim=1, layout=layout), dim=1, layout=layout).equal(x[0])
        assert sd.unshard(sd.shard(x, dim=-1, layout=layout), dim=-1, layout=layout).equal(x)
    ids = torch.arange(3 * n).reshape(3, n) // 5  # integer segment ids (B, N), sharded on dim 1
    for layout in sd.LAYOUTS:
        assert sd.unshard(sd.shard(ids, dim=1, layout=layout), dim=1, layout=layout).equal(ids)
    c = n // (2 * world)
    zig = sd.shard(x, dim=2, layout="zigzag")[0, 0]
    expect = [
        *range(rank * c, (rank + 1) * c),
        *range((2 * world - 1 - rank) * c, (2 * world - rank) * c),
    ]
    assert zig.tolist() == [float(p) for p in expect]
    con = sd.shard(x, dim=2, layout="contiguous")[0, 0]
    assert con.tolist() == [float(p) for p in range(rank * 2 * c, (rank + 1) * 2 * c)]
    # gradient of unshard: this rank's slice of the incoming gradient
    part = sd.shard(x, layout="zigzag").clone().requires_grad_()
    (sd.unshard(part, layout="zigzag") * x).sum().backward()
    assert part.grad.equal(sd.shard(x, layout="zigzag"))


ULYSSES = {
    "causal_gqa_lse": dict(kw={"causal": True, "return_lse": True}),
    "window_segments_softcap": dict(kw={"window": (4, 2), "softcap": 5.0}, seg=True),
    "bias_alibi_sinks_mask": dict(kw={}, bias=True),
}


def _ulysses_case(world, layout, name, seed):
    case = ULYSSES[name]
    hq, hkv = 2 * world, world
    q, k, v = _qkv(world, hq, hkv, torch.float64, seed, chunk=3)
    b, n = q.shape[0], q.shape[2]
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    kw = dict(case["kw"])
    full_kw = dict(kw)
    bias = slopes = None
    if case.get("bias"):
        bias = torch.randn(b, hq, n, n, generator=g, dtype=torch.float64)
        slopes = torch.rand(hq, generator=g, dtype=torch.float64)
        sinks = torch.randn(hq, generator=g, dtype=torch.float64)  # split by head like slopes
        mask = torch.rand(n, n, generator=g) < 0.8
        full_kw.update(mask=mask)
        kw.update(mask=mask)
    seg = _segments(b, n, seed) if case.get("seg") else None
    # single process
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    extra = {}
    if bias is not None:
        extra = {
            "bias": bias.clone().requires_grad_(),
            "alibi_slopes": slopes.clone().requires_grad_(),
            "sinks": sinks.clone().requires_grad_(),
        }
    res = selfattn.attention(*leaves, segment_ids=seg, **full_kw, **extra)
    out = res[0] if isinstance(res, tuple) else res
    (out * do).sum().backward()
    want = [out.detach(), *(t.grad for t in leaves), *(t.grad for t in extra.values())]
    # Ulysses
    parts = [sd.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
    mine = {}
    if bias is not None:
        mine = {
            "bias": bias.clone().requires_grad_(),
            "alibi_slopes": slopes.clone().requires_grad_(),
            "sinks": sinks.clone().requires_grad_(),
        }
    seg_part = None if seg is None else sd.shard(seg, dim=1, layout=layout)
    sd.EXCHANGES.clear()
    res_u = sd.ulysses_attention(*parts, layout=layout, segment_ids=seg_part, **kw, **mine)
    exchanges = sd.EXCHANGES["all_to_all"]
    out_u = res_u[0] if isinstance(res_u, tuple) else res_u
    (out_u * sd.shard(do, layout=layout)).sum().backward()
    got = [sd.unshard(t, layout=layout) for t in (out_u.detach(), *(p.grad for p in parts))]
    for t in mine.values():  # each rank holds its heads' share: sum them as for any parameter
        dist.all_reduce(t.grad)
        got.append(t.grad)
    if isinstance(res, tuple):
        got.append(sd.unshard(res_u[1].detach(), layout=layout))
        want.append(res[1].detach())
    assert len(got) == len(want)
    for i, (a, b_) in enumerate(zip(got, want)):
        same_inf = torch.isinf(a) & torch.isinf(b_)
        err = torch.where(same_inf, 0.0, (a.double() - b_.double()).abs()).max().item()
        assert err < 1e-9 or (i == len(got) - 1 and err < 1e-5), f"{name} {layout} #{i}: {err:.3g}"
    assert exchanges == (5 if "return_lse" in kw else 4)  # q, k, v in; out (and lse) back


def _make_ulysses(layout, name, idx):
    def fn(rank, world):
        _ulysses_case(world, layout, name, seed=300 + idx)

    fn.__name__ = f"ulysses_{layout}_{name}"
    return fn


for _i, (_layout, _name) in enumerate((lay, u) for lay in sd.LAYOUTS for u in ULYSSES):
    check()(_make_ulysses(_layout, _name, _i))


@check(3)
def subgroup(rank, world):
    """A ring over a subgroup (global ranks 1 and 2) and single-rank groups (W = 1, no hops)."""
    pair = dist.new_group([1, 2])
    singles = [dist.new_group([r]) for r in range(world)]
    q, k, v = _qkv(2, 2, 1, torch.float64, seed=21)
    want = selfattn.attention(q, k, v, causal=True)
    sd.EXCHANGES.clear()
    alone = sd.ring_attention(q, k, v, group=singles[rank], causal=True)
    assert dict(sd.EXCHANGES) == {} and (alone - want).abs().max() < 1e-12
    if rank in (1, 2):
        parts = [sd.shard(t, group=pair) for t in (q, k, v)]
        out = sd.unshard(sd.ring_attention(*parts, group=pair, causal=True), group=pair)
        assert (out - want).abs().max() < 1e-12
    dist.barrier()


# -- bad inputs: a ValueError on every rank, before anything is exchanged --------------------------


def _raises_everywhere(fn, fragments, exc=ValueError):
    """``fn()`` must raise ``exc`` whose message holds every fragment; then the group still works
    (no rank was left inside a collective, no message was left in flight)."""
    try:
        fn()
    except exc as e:
        msg = str(e)
        for f in fragments:
            assert f in msg, f"expected {f!r} in the message: {msg}"
    else:
        raise AssertionError(f"expected {exc.__name__} with {fragments}")
    token = torch.ones(1)
    dist.all_reduce(token)
    assert token.item() == dist.get_world_size()


def _local(world, rank, layout="zigzag", n=None, hq=4, hkv=2, dtype=torch.float64):
    q, k, v = _qkv(world, hq, hkv, dtype, seed=40)
    q, k, v = (sd.shard(t, layout=layout) for t in (q, k, v))
    if n is not None:
        q, k, v = q[:, :, :n], k[:, :, :n], v[:, :, :n]
    return q, k, v


@check()
def bad_lengths_differ(rank, world):
    q, k, v = _local(world, rank, n=2 if rank == world - 1 else None)  # the others hold 6
    _raises_everywhere(
        lambda: sd.ring_attention(q, k, v, causal=True),
        ["local sequence length", "rank 0: 6", f"rank {world - 1}: 2"],
    )
    q, k, v = _local(world, rank, n=4 if rank == 0 else None)
    _raises_everywhere(lambda: sd.ring_attention(q, k, v), ["rank 0: 4", "rank 1: 6"])


@check()
def bad_dtypes_differ(rank, world):
    q, k, v = _local(world, rank, dtype=torch.float32 if rank == 1 else torch.float64)
    _raises_everywhere(
        lambda: sd.ring_attention(q, k, v),
        ["dtype", "rank 0: torch.float64", "rank 1: torch.float32"],
    )


@check()
def bad_heads_differ(rank, world):
    q, k, v = _local(world, rank, hq=2 if rank == 0 else 4)
    _raises_everywhere(
        lambda: sd.ring_attention(q, k, v), ["query heads", "rank 0: 2", "rank 1: 4"]
    )
    q, k, v = _local(world, rank, hq=4, hkv=1 if rank == world - 1 else 2)
    _raises_everywhere(
        lambda: sd.ring_attention(q, k, v), ["key/value heads", f"rank {world - 1}: 1"]
    )


@check()
def bad_zigzag_odd(rank, world):
    q, k, v = _local(world, rank, layout="contiguous", n=5)  # equal, but odd
    _raises_everywhere(
        lambda: sd.ring_attention(q, k, v, layout="zigzag"), ["even", "rank 0 has 5"]
    )
    out = sd.ring_attention(q, k, v, layout="contiguous")  # fine as contiguous shards
    assert out.shape == q.shape


@check()
def bad_rules_differ(rank, world):
    q, k, v = _local(world, rank)
    _raises_everywhere(
        lambda: sd.ring_attention(q, k, v, causal=rank == 0),
        ["causal", "rank 0: True", "rank 1: False"],
    )
    _raises_everywhere(
        lambda: sd.ring_attention(q, k, v, layout="contiguous" if rank else "zigzag"),
        ["layout", "rank 0: 'zigzag'", "rank 1: 'contiguous'"],
    )
    _raises_everywhere(lambda: sd.ring_attention(q, k, v, window=(3, rank)), ["window right"])
    _raises_everywhere(
        lambda: sd.ring_attention(q, k, v, scale=1.0 + rank), ["scale", "rank 1: 2.0"]
    )
    g = q.clone().requires_grad_(rank == 0)
    _raises_everywhere(lambda: sd.ring_attention(g, k, v), ["gradients", "rank 0: True"])


@check()
def bad_local_input_on_one_rank(rank, world):
    q, k, v = _local(world, rank)
    bad = world - 1
    # a 3-D q on the last rank: its own ValueError there, a ValueError naming it elsewhere
    qq = q[0] if rank == bad else q
    _raises_everywhere(lambda: sd.ring_attention(qq, k, v), [f"rank {bad}", "4-D"])
    # an integer q: TypeError on that rank, ValueError (naming the rank) on the others
    qi = q.long() if rank == bad else q
    exc = TypeError if rank == bad else ValueError
    _raises_everywhere(lambda: sd.ring_attention(qi, k, v), [f"rank {bad}", "float"], exc=exc)
    # local q and k/v lengths differ
    kk, vv = (k[:, :, :4], v[:, :, :4]) if rank == bad else (k, v)
    _raises_everywhere(lambda: sd.ring_attention(q, kk, vv), [f"rank {bad}", "Nq=6, Nk=4"])
    # segment ids of the wrong length, an unknown layout everywhere
    ids = torch.zeros(q.shape[0], 5 if rank == bad else 6, dtype=torch.long)
    _raises_everywhere(
        lambda: sd.ring_attention(q, k, v, segment_ids=ids), [f"rank {bad}", "segment_ids"]
    )
    _raises_everywhere(
        lambda: sd.ring_attention(q, k, v, layout="striped"), ["layout", "'striped'"]
    )


@check(2)
def ring_backend_without_block_hooks(rank, world):
    """A backend that cannot compute ring blocks is refused on every rank before any key or
    value moves, and the group goes on working (it once hung the next call)."""
    q, k, v = (sd.shard(t) for t in _qkv(world, 2, 2, torch.float32, seed=5))
    _raises_everywhere(
        lambda: sd.ring_attention(q, k, v, causal=True, backend="sdpa"),
        ["offers no forward hook"],
        exc=selfattn.UnsupportedInputs,
    )
    out = sd.ring_attention(q, k, v, causal=True)
    assert torch.isfinite(out).all()


@check()
def bad_shard_unshard(rank, world):
    x = torch.zeros(1, 2, 2 * world + 1, 4)
    _raises_everywhere(
        lambda: sd.shard(x, layout="contiguous"), ["multiple of", str(2 * world + 1)]
    )
    y = torch.zeros(1, 2, 7 * world, 4)  # divisible by W, not by 2W
    _raises_everywhere(lambda: sd.shard(y, layout="zigzag"), ["zigzag", str(2 * world)])
    _raises_everywhere(lambda: sd.shard(x, dim=4), ["dim=4"])
    part = torch.zeros(1, 2, 6 if rank else 4, 3)
    _raises_everywhere(lambda: sd.unshard(part), ["shard length", "rank 0: 4", "rank 1: 6"])
    part = torch.zeros(1, 2 + rank, 6, 3)
    _raises_everywhere(lambda: sd.unshard(part), ["shape"])
    _raises_everywhere(lambda: sd.unshard(torch.zeros(1, 2, 5, 3)), ["even"])


@check()
def bad_ulysses(rank, world):
    # heads that do not divide over W: a ValueError on every rank
    q, k, v = _local(world, rank, hq=world + 1, hkv=1)
    _raises_everywhere(lambda: sd.ulysses_attention(q, k, v), ["multiples of", f"Hq={world + 1}"])
    q, k, v = _local(world, rank, hq=2 * world, hkv=1)
    _raises_everywhere(lambda: sd.ulysses_attention(q, k, v), ["Hkv=1"])
    q, k, v = _local(world, rank, hq=2 * world, hkv=world)
    _raises_everywhere(
        lambda: sd.ulysses_attention(q, k, v, causal=rank == 0), ["attention keywords"]
    )
    n_all = q.shape[2] * world
    bias = torch.zeros(n_all + (1 if rank == 1 else 0), n_all)  # rank 1's is the wrong size
    _raises_everywhere(lambda: sd.ulysses_attention(q, k, v, bias=bias), ["rank 1", "bias"])
    _raises_everywhere(lambda: sd.ulysses_attention(q, k, v, dropout_p=2.0), ["dropout_p"])


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _ring_on_triton(rank, world):
    """Ring blocks through the registry with backend="triton" run the Triton kernels (here under
    the CPU interpreter): forward and backward equal single-process attention."""
    from selfattn.backends import BACKENDS

    triton = BACKENDS["triton"]
    calls = {"forward": 0, "backward": 0}

    def counted(name):
        real = getattr(triton, name)

        def hook(*args):
            calls[name] += 1
            return real(*args)

        return hook

    os.environ["TRITON_INTERPRET"] = "1"  # this rank process only; read at call time
    triton.forward, triton.backward = counted("forward"), counted("backward")
    try:
        q, k, v = _qkv(world, 2, 1, torch.float32, seed=41, b=1, chunk=4, d=16)
        g = torch.Generator().manual_seed(42)
        do = torch.randn(q.shape, generator=g)
        dl = torch.zeros(q.shape[:3])
        kw = {"causal": True, "window": (5, 0)}
        got = _ringed(q, k, v, do, dl, "zigzag", backend="triton", **kw)
        want = _single(q.double(), k.double(), v.double(), do.double(), dl.double(), **kw)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            err = (a.double() - b.double()).abs().max().item()
            assert err < 1e-4, f"{name}: max error {err:.3g} against float64"
        assert calls["forward"] > 0 and calls["backward"] > 0, calls
    finally:
        del os.environ["TRITON_INTERPRET"]
        del triton.forward, triton.backward


if _HAS_TRITON:
    check(2)(_ring_on_triton)


def test_not_initialised():
    """Without a process group every entry point says what to do (and starts nothing)."""
    assert not dist.is_initialized()
    q = torch.zeros(1, 2, 4, 8)
    for fn in (
        lambda: sd.ring_attention(q, q, q),
        lambda: sd.ulysses_attention(q, q, q),
        lambda: sd.shard(q),
        lambda: sd.unshard(q),
    ):
        with pytest.raises(RuntimeError, match="init_process_group"):
            fn()


def _cases(world):
    return [
        pytest.param(world, name, id=f"W{world}-{name}")
        for name, (_, ws) in CHECKS.items()
        if world in ws
    ]


@pytest.mark.parametrize(("world", "name"), [c for w in WORLDS for c in _cases(w)])
def test_group(world, name):
    per_rank = _results(world)
    failures = [
        f"--- rank {r} ---\n{res[name]['error']}"
        for r, res in enumerate(per_rank)
        if not res.get(name, {"ok": False, "error": "not run"})["ok"]
    ]
    assert not failures, "\n".join(failures)


# -- a peer that dies or hangs: the others fail within the group's timeout -------------------------

PEER_TIMEOUT_S = 3.0


def _dying_peer_worker(rank, world, init_file, out_dir, mode):
    _init(rank, world, init_file, PEER_TIMEOUT_S)
    q, k, v = (sd.shard(t) for t in _qkv(world, 2, 2, torch.float32, seed=1, chunk=64, d=32))
    if rank == 1:
        if mode == "dies":
            # die in the middle of a stream of ring calls, wherever it happens to be
            threading.Timer(1.0, os._exit, args=(17,)).start()
            while True:
                sd.ring_attention(q, k, v, causal=True)
        while not Path(out_dir, "rank0.json").exists():  # "hangs": alive but never calls
            time.sleep(0.1)
        os._exit(0)
    t0 = time.monotonic()
    calls, error = 0, None
    try:
        while time.monotonic() - t0 < 60:
            sd.ring_attention(q, k, v, causal=True)
            calls += 1
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    Path(out_dir, "rank0.json").write_text(
        json.dumps({"error": error, "calls": calls, "s": time.monotonic() - t0})
    )
    os._exit(0)  # the group is broken: skip the teardown


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_peer_failure_raises_within_timeout(mode):
    out_dir, codes = _launch(_dying_peer_worker, 2, (mode,), deadline_s=90)
    res = json.loads(Path(out_dir, "rank0.json").read_text())
    assert res["error"] is not None, f"rank 0 kept going for {res['s']:.1f} s without an error"
    # dies: the peer exits after ~1 s; hangs: rank 0's first call waits one timeout
    bound = (1.0 if mode == "dies" else 0.0) + PEER_TIMEOUT_S + 15.0
    assert res["s"] < bound, f"rank 0 failed only after {res['s']:.1f} s ({res['error']})"
    if mode == "dies":
        assert codes[1] == 17 and res["calls"] > 0
    else:
        assert res["calls"] == 0
