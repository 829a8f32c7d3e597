"""The native CPU engine: fused C++ attention kernels built on this machine (see ``build``).

``load()`` returns the compiled extension (building it on first use) and ``unavailable()`` says
why it cannot be had, or None. Importing this package never builds or raises.

The extension's functions (all tensors on the CPU; q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv,
Nk, Dv), any strides, one float dtype; query head h reads kv head h // (Hq // Hkv)). ``call`` is
the call record, a ``call.NativeCall`` built by ``call.record(spec, seed)``: a tuple of the fields
``CALL_FIELDS`` (the extension's own list, equal to ``call.FIELDS``), read by name in one place
(``csrc/bindings.cpp``, ``read_call`` and ``fill``):

``causal, left, right, mask, bias, alibi, softcap, q_ids, kv_ids, scale, dropout_p, start, seed0,
seed1, drop_hq, drop_nq, drop_b0, drop_h0, drop_r0``
    s = scale * q.k; softcap > 0: s = softcap * tanh(s / softcap) (0: none); + bias; - alibi[b|0,
    h] * |i' - j| with i' = start + i. Visible: causal j <= i'; left >= 0: j >= i' - left; right
    >= 0: j <= i' + right (-1: unbounded; a side beyond |start| + Nq + Nk is unbounded too, so no
    position arithmetic overflows; < -1 and |start| > 2^60 are refused); mask (bool,
    broadcastable to (B, Hq, Nq, Nk)) True; q_ids (B, Nq) == kv_ids (B, Nk), both >= 0. mask /
    bias / alibi / q_ids / kv_ids may be None; bias is any float dtype broadcastable like mask,
    alibi (B|1, Hq) or (Hq,). dropout_p > 0 drops with the counter-based hash of
    ``selfattn._rng`` for seed words seed0 / seed1 and global row ((drop_b0 + b) * drop_hq +
    drop_h0 + h) * drop_nq + drop_r0 + i (drop_hq / drop_nq <= 0: Hq / Nq; the call's rows must
    lie within them). A field of the wrong type or out of range is a RuntimeError naming it.
``forward(q, k, v, call, need_out=True, out_acc=False) -> (out, lse)``
    out (B, Hq, Nq, Dv) in q's dtype (the accumulation dtype with out_acc; empty when need_out is
    False), lse (B, Hq, Nq) natural-log, float32 (float64 for float64 inputs); rows that see
    nothing: out 0, lse -inf.
``backward(dout, q, k, v, out, lse, dlse, call, need_dbias=False, need_dalibi=False) -> (dq, dk,
dv, dbias, dalibi)``
    FlashAttention-2 by recomputation from lse; ``out`` may be float32 for 16-bit inputs; dlse is
    the gradient of lse or an empty tensor. Gradients in the accumulation dtype; dbias has bias's
    shape (summed over its broadcast dims), dalibi alibi's; None unless asked for.
``probabilities(q, k, lse, call) -> (B, Hq, Nq, Nk) float32``
    exp(s - lse) under the call's rules, zero where a key is hidden (dropout fields ignored:
    the probabilities are before dropout).
``stats(q, k, lse, call, col_sum, col_max, entropy, topk) -> (col_sum, col_max, entropy,
topk_p, topk_index)``
    ``attention_stats``' reductions of exp(s - lse) (dropout ignored): col_sum / col_max float32
    (B, Hq, Nk), entropy (B, Hq, Nq), topk_p (B, Hq, Nq, topk) float32 and topk_index int64
    (-1 / 0 where a row sees fewer keys); None where not asked (topk 0: no top-k).
``forward_stats(q, k, v, call, col_sum, col_max, entropy, topk) -> (out, lse, col_sum, col_max,
entropy, topk_p, topk_index)``
    ``forward`` (out in q's dtype; no dropout) and the statistics of the same call: a decode
    step computes them in its own pass from the scores it kept, any other call in a statistics
    pass after the forward.
``bounds(call, nq, nk, block) -> int64 (ceil(nq / block), 4)``
    per block of rows under the call's start / causal / left / right: lo, hi (keys some row may
    see), full_lo, full_hi (keys every row sees), the formulas of ``rules.bounds`` /
    ``key_spans``; empty spans come back as lo == hi.
``isa(dtype="float32") -> str``: the compiled variant a call would use ("avx512", "avx2" on
    x86, "neon" on aarch64, "generic"); ``SELFATTN_NATIVE_ISA`` overrides (read on every call).

Every call gives bitwise the same result whatever ``torch.set_num_threads`` says and whichever
threads call it at the same time: work splits and reduction orders depend on the shape only.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["load", "unavailable"]


def load() -> ModuleType:
    """The compiled extension; raises ``build.BuildError`` with the reason if it cannot be had."""
    from .build import load as _load

    return _load()


def unavailable() -> str | None:
    """None when the extension builds and loads, else a one-line reason."""
    from .build import unavailable as _unavailable

    return _unavailable()
