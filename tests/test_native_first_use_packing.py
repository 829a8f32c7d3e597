"""Packing on first use in the native forward and backward (csrc/pack.h ``Packed::ensure``).

Each (batch, kv head) unit is packed by the first item that needs it, in that item's thread, with
no join between packing and compute; the backward's last item of a unit sums its dQ partials.
A unit read before its packing is published, packed twice, or summed before its last item
would show up as a result that differs between one thread and two, or from one run to the
next. Every call here is compared bit for bit (NaN where NaN) with the same call on one thread,
over many units (so parts of the call's schedule start inside a unit), with a non-finite key
row and value row in some units (the flags ``ensure`` publishes with the packing).
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_qkv, torch_threads
from selfattn.backends import native
from selfattn.backends.native.call import record
from selfattn.spec import validate

WHY = native.unavailable()
if WHY is not None:
    pytest.skip(f"native extension unavailable: {WHY}", allow_module_level=True)
EXT = native.load()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN where NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _case(bad: bool) -> tuple[torch.Tensor, ...]:
    # B3 Hq6 Hkv3: 9 units of 2 query heads; 301 rows, so blocks and tiles end short
    q, k, v = make_qkv(3, 6, 3, 301, 301, 64, seed=31)
    if bad:
        k[1, 2, 40] = float("nan")  # a key row of unit 5
        v[2, 0, 7, 3] = float("inf")  # a value entry of unit 6
    return q, k, v


def _forward_backward(q, k, v, threads: int, **rules) -> tuple[torch.Tensor, ...]:
    call = record(validate(q, k, v, **rules))
    g = torch.Generator().manual_seed(3)
    with torch_threads(threads):
        out, lse = EXT.forward(q, k, v, call, True, False)
        dout = torch.randn(out.shape, generator=g)
        grads = EXT.backward(dout, q, k, v, out, lse, torch.empty(0), call, False, False)
    return out, lse, *grads[:3]


# the rules, and the rows that see key 40 under them
RULES = [
    ({"causal": True}, slice(40, None)),
    ({"window": (40, 0)}, slice(40, 81)),
    ({}, slice(None)),
]


@pytest.mark.parametrize("bad", [False, True])
@pytest.mark.parametrize("rules,seen", RULES)
def test_units_packed_on_first_use_match_one_thread(bad, rules, seen):
    q, k, v = _case(bad)
    want = _forward_backward(q, k, v, 1, **rules)
    for _ in range(3):
        got = _forward_backward(q, k, v, 2, **rules)
        for a, w in zip(got, want):
            assert _same(a, w)
    if bad:  # the flags reached the rows that see the bad key: NaN there, finite elsewhere
        out = want[0]
        assert out[1, 4:6, seen].isnan().all()
        assert torch.isfinite(out[0]).all()
