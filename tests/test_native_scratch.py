"""The native engine's per-thread scratch cache (csrc/util.h ``ScratchCache``) and the fast
paths of a short decode call.

Scratch blocks are reused across calls of a thread, so a call must never read what an earlier
call left in them: every call here is compared bit for bit with the same call made first, after calls of other shapes, rules and non-finite inputs have been through
the same blocks, from one and several Python threads at once.
"""

from __future__ import annotations

import threading

import pytest
import torch

from helpers import make_qkv, torch_threads
from selfattn import attention
from selfattn.backends import native
from selfattn.backends.native.call import record
from selfattn.spec import validate

pytestmark = pytest.mark.usefixtures("one_thread")

WHY = native.unavailable()
if WHY is not None:
    pytest.skip(f"native extension unavailable: {WHY}", allow_module_level=True)
EXT = native.load()


def _call(q, k, v, **rules):
    spec = validate(q, k, v, **rules)
    return EXT.forward(q, k, v, record(spec), True, False)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN where NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _cases() -> list[tuple[tuple[torch.Tensor, ...], dict]]:
    """Decode and prefill calls of several sizes, with masks, NaN keys and inf values (the
    careful decode path uses the bad-row buffers), so that blocks change hands between them."""
    out = []
    for i, (hq, hkv, nq, nk) in enumerate(
        [(9, 3, 1, 40), (9, 3, 1, 64), (8, 2, 2, 1000), (4, 4, 33, 70), (9, 3, 1, 3000)]
    ):
        q, k, v = make_qkv(1, hq, hkv, nq, nk, 64, seed=40 + i)
        out.append(((q, k, v), {"causal": True}))
        kb, vb = k.clone(), v.clone()
        kb[0, 0, nk // 3] = float("nan")
        vb[0, hkv - 1, nk // 2, 5] = float("inf")
        mask = torch.rand(1, hq, nq, nk, generator=torch.Generator().manual_seed(i)) > 0.3
        out.append(((q, kb, vb), {"mask": mask}))
    return out


def test_scratch_reused_across_calls_gives_bitwise_same_results():
    cases = _cases()
    want = [_call(*t, **kw) for t, kw in cases]
    # the same calls again, in another order and each twice: every block now holds what
    # another call wrote (NaN-poisoned scores, partial sums of a larger call)
    order = list(range(len(cases)))[::-1] * 2
    for j in order:
        (q, k, v), kw = cases[j]
        out, lse = _call(q, k, v, **kw)
        assert _same(out, want[j][0]) and _same(lse, want[j][1]), j


def test_scratch_per_thread_with_python_threads_at_once():
    cases = _cases()
    want = [_call(*t, **kw) for t, kw in cases]
    errors: list[str] = []

    def work(i: int) -> None:
        with torch_threads(1 + i % 2):
            for rep in range(6):
                j = (i + rep) % len(cases)
                (q, k, v), kw = cases[j]
                out, lse = _call(q, k, v, **kw)
                if not (_same(out, want[j][0]) and _same(lse, want[j][1])):
                    errors.append(f"thread {i} case {j}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_short_decode_same_at_one_and_two_threads():
    # the decode rows of issue 16 (B1 Hq9 Hkv3 Nq1, 40 and 64 keys) through auto
    for nk in (40, 64):
        q, k, v = make_qkv(1, 9, 3, 1, nk, 64, seed=nk)
        with torch_threads(1):
            a = attention(q, k, v, causal=True, return_lse=True)
        with torch_threads(2):
            b = attention(q, k, v, causal=True, return_lse=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_exp2_of_masked_scores_is_exact_zero():
    # decode over 40 keys (a partial 64-key tile): the masked tail and keys far below the row
    # maximum contribute exactly 0, whichever way exp2 reaches 0 (AVX-512 skips the underflowing
    # scalef by a mask; the result must be that of the float64 spec)
    q, k, v = make_qkv(1, 9, 3, 1, 40, 64, seed=3)
    k = k.clone()
    k[0, :, 7] = q[0, 0, 0] * 40.0  # one key far above the others for head 0's rows
    out, lse = _call(q, k, v, causal=True)
    ref = attention(q.double(), k.double(), v.double(), causal=True, backend="math")
    torch.testing.assert_close(out, ref.float(), rtol=2e-5, atol=2e-6)
    assert torch.isfinite(lse).all()
