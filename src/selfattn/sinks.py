"""Attention sinks (docs/api.md, step 6): what a sink logit adds, shared by every torch backend.

A sink is one extra logit ``sinks[h]`` per query head in every row's softmax, with no value
(GPT-OSS). The engines fold it into their final combine (``lse = logaddexp(lse_keys, sink)``,
the output rescaled by ``exp(lse_keys - lse)``). Its gradient needs nothing from the key loop:
with ``p_sink = exp(sinks[h] - lse)`` and ``D = rowsum(dO * O) - dlse`` (the softmax
Jacobian's diagonal term, unchanged by a logit whose value is 0),

    dsinks[h] = -sum over batch b and rows i of p_sink[b, h, i] * D[b, h, i],

so every backend's backward hook stays as it is and :func:`sink_grad` supplies this one. It is
one pass over O and dO (a few percent of a backward), written in torch ops so that autograd
differentiates it again (double backward, ``create_graph=True``); a fused kernel would not.
"""

from __future__ import annotations

import torch

__all__ = ["check_sinks", "sink_grad", "sink_probability", "sink_rows"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_sinks(sinks: object, hq: int) -> torch.Tensor:
    """``sinks`` as given when it is a float tensor of shape (Hq,) (``spec.validate``'s check;
    the device is checked there): ``TypeError``/``ValueError`` naming what arrived otherwise."""
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(
            f"sinks must be a float torch.Tensor of shape (Hq,), got {type(sinks).__name__}"
        )
    if sinks.dtype not in _FLOATS:
        raise TypeError(f"sinks must have a float dtype, got {sinks.dtype}")
    if tuple(sinks.shape) != (hq,):
        raise ValueError(
            f"sinks must have shape (Hq,) = ({hq},), one logit per query head, "
            f"got {tuple(sinks.shape)}"
        )
    return sinks


def sink_rows(sinks: torch.Tensor, b: int, hkv: int, g: int, m: int, dtype) -> torch.Tensor:
    """The sink of every row of a block, as the engines lay rows out: (B*Hkv, G*m, 1).

    ``sinks`` (Hq,) with Hq = Hkv * G; row ``(b*Hkv + kh, gi*m + i)`` is query head kh*G + gi.
    """
    s = sinks.to(dtype).reshape(1, hkv, g, 1, 1)
    return s.expand(b, hkv, g, m, 1).reshape(b * hkv, g * m, 1)


def sink_probability(sinks: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(sinks[h] - lse)``: the probability the sink takes in each row, (B, Hq, Nq).

    0 where the sink is ``-inf`` (no sink), even in a row whose lse is ``-inf`` too.
    """
    sink = sinks.to(lse.dtype).reshape(1, -1, 1)  # (1, Hq, 1)
    p = torch.exp(sink - lse)
    return torch.where(torch.isneginf(sink), torch.zeros((), dtype=p.dtype), p)


def sink_grad(
    sinks: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
) -> torch.Tensor:
    """The gradient of the sinks, (Hq,) in the sinks' dtype (see the module docstring).

    Args:
        sinks: (Hq,) the call's sinks.
        out: (B, Hq, Nq, Dv) the forward's output (best in the accumulation dtype).
        lse: (B, Hq, Nq) the forward's lse (sink included).
        dout: (B, Hq, Nq, Dv) the output's gradient.
        dlse: (B, Hq, Nq) the lse's gradient, or None.
    """
    acc = torch.float64 if out.dtype == torch.float64 or sinks.dtype == torch.float64 else None
    acc = acc or torch.float32
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # (B, Hq, Nq)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    p = sink_probability(sinks, lse.to(acc))
    # where the sink takes nothing its gradient is 0, even in a row whose D is not finite
    term = torch.where(p > 0, p * delta, torch.zeros((), dtype=acc))
    return (-term.sum((0, 2))).to(sinks.dtype)
