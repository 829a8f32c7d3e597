"""``selfattn::attention`` as a ``torch.library`` custom op: ``torch.compile`` sees one opaque node.

Dynamo cannot trace into the backends (they branch on tensor contents to skip empty blocks, call
numpy, launch Triton), so under compilation the call goes through a custom op with a fake
(shape-only) implementation and a registered autograd formula whose backward is a second custom
op. Outside compilation :func:`attention` is exactly :func:`selfattn.attention`.
"""

import torch

from . import api
from .backends import select
from .backends.tiled import backward as tiled_backward
from .backends.tiled import forward as tiled_forward
from .backends.tiled import problem_from_spec
from .spec import validate

__all__ = ["attention", "attention_op"]

_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? bias, Tensor? alibi_slopes, "
    "Tensor? q_ids, Tensor? kv_ids, Tensor? seed, bool causal, int? window_left, "
    "int? window_right, float? softcap, float? scale, float dropout_p, str backend) "
    "-> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? mask, Tensor? bias, Tensor? alibi_slopes, Tensor? q_ids, Tensor? kv_ids, "
    "Tensor? seed, bool causal, int? window_left, int? window_right, float? softcap, "
    "float? scale, float dropout_p, str backend, bool need_dbias, bool need_dalibi) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _spec(q, k, v, mask, bias, alibi, q_ids, kv_ids, causal, wl, wr, softcap, scale, dropout_p):
    """Validate one call (the op's arguments are the unpacked keywords of ``attention``)."""
    window = None if wl is None and wr is None else (wl, wr)
    segments = None if q_ids is None else (q_ids, kv_ids)
    return validate(
        q, k, v, causal=causal, window=window, mask=mask, bias=bias, alibi_slopes=alibi,
        softcap=softcap, segment_ids=segments, scale=scale, dropout_p=dropout_p, return_lse=True,
    )  # fmt: skip


def _seed(seed: torch.Tensor | None) -> tuple[int, int] | None:
    if seed is None:
        return None
    words = seed.tolist()
    return int(words[0]), int(words[1])


@torch.library.custom_op("selfattn::attention", mutates_args=(), schema=_FWD_SCHEMA)
def _attention_fwd(
    q, k, v, mask, bias, alibi_slopes, q_ids, kv_ids, seed,
    causal, window_left, window_right, softcap, scale, dropout_p, backend,
):  # fmt: skip
    with torch.no_grad():  # autograd is the op's own (below); the backend need not record
        spec = _spec(
            q, k, v, mask, bias, alibi_slopes, q_ids, kv_ids,
            causal, window_left, window_right, softcap, scale, dropout_p,
        )  # fmt: skip
        out, lse = select(spec, backend).run(spec, q, k, v, _seed(seed))
    # the fake implementation promises contiguous results; keep that promise whatever the backend
    return out.contiguous(), lse.float().contiguous()


@_attention_fwd.register_fake
def _(
    q, k, v, mask, bias, alibi_slopes, q_ids, kv_ids, seed,
    causal, window_left, window_right, softcap, scale, dropout_p, backend,
):  # fmt: skip
    # Validation needs only shapes, dtypes and devices, so bad input fails while tracing.
    spec = _spec(
        q, k, v, mask, bias, alibi_slopes, q_ids, kv_ids,
        causal, window_left, window_right, softcap, scale, dropout_p,
    )  # fmt: skip
    out = q.new_empty(spec.B, spec.Hq, spec.Nq, spec.Dv)  # (B, Hq, Nq, Dv)
    lse = q.new_empty(spec.B, spec.Hq, spec.Nq, dtype=torch.float32)  # (B, Hq, Nq)
    return out, lse


@torch.library.custom_op("selfattn::attention_backward", mutates_args=(), schema=_BWD_SCHEMA)
def _attention_bwd(
    dout, dlse, q, k, v, out, lse, mask, bias, alibi_slopes, q_ids, kv_ids, seed,
    causal, window_left, window_right, softcap, scale, dropout_p, backend, need_dbias, need_dalibi,
):  # fmt: skip
    args = (q, k, v, mask, bias, alibi_slopes, q_ids, kv_ids)
    rules = (causal, window_left, window_right, softcap, scale, dropout_p)
    with torch.no_grad():
        spec = _spec(*args, *rules)
        chosen = select(spec, backend)
    if chosen.name == "triton":
        dq, dk, dv, dbias, dalibi = _backward_by_recompute(
            chosen, dout, dlse, args, rules, seed, need_dbias, need_dalibi
        )
    else:
        # The tiled engine's backward works for every backend's forward: they all compute the
        # same function and draw the same dropout mask from the shared hash.
        with torch.no_grad():
            prob = problem_from_spec(spec, _seed(seed))
            if q.dtype == torch.float64:
                _, lse = tiled_forward(prob, q, k, None)  # float64 lse for float64 gradients
            dq, dk, dv, dbias, dalibi = tiled_backward(
                prob, q, k, v, out, lse, dout, dlse, need_dbias=need_dbias, need_dalibi=need_dalibi
            )
    # contiguous results, as the fake implementation promises
    dbias = q.new_empty(0) if dbias is None else dbias.reshape(bias.shape).to(bias.dtype)
    if dalibi is None:
        dalibi = q.new_empty(0)
    else:
        dalibi = dalibi.reshape(alibi_slopes.shape).to(alibi_slopes.dtype)
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, dalibi)
    return tuple(g.contiguous() for g in grads)


def _backward_by_recompute(chosen, dout, dlse, args, rules, seed, need_dbias, need_dalibi):
    """Gradients through a backend's own autograd (its fused kernels), recomputing the forward."""
    q, k, v, mask, bias, alibi, q_ids, kv_ids = args
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        b = None if bias is None else bias.detach().requires_grad_(need_dbias)
        a = None if alibi is None else alibi.detach().requires_grad_(need_dalibi)
        spec = _spec(*leaves, mask, b, a, q_ids, kv_ids, *rules)
        out, lse = chosen.run(spec, *leaves, _seed(seed))
        inputs = leaves + [t for t, need in ((b, need_dbias), (a, need_dalibi)) if need]
        outs, grads = [out], [dout]
        if dlse is not None:
            outs.append(lse)
            grads.append(dlse.to(lse.dtype))
        got = list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))
    dq, dk, dv = (torch.zeros_like(t) if g is None else g for t, g in zip(leaves, got[:3]))
    rest = got[3:]
    dbias = rest.pop(0) if need_dbias else None
    dalibi = rest.pop(0) if need_dalibi else None
    return dq, dk, dv, dbias, dalibi


@_attention_bwd.register_fake
def _(
    dout, dlse, q, k, v, out, lse, mask, bias, alibi_slopes, q_ids, kv_ids, seed,
    causal, window_left, window_right, softcap, scale, dropout_p, backend, need_dbias, need_dalibi,
):  # fmt: skip
    # contiguous, like the real results (empty_like would copy the strides of a transposed view)
    dbias = bias.new_empty(bias.shape) if need_dbias else q.new_empty(0)
    dalibi = alibi_slopes.new_empty(alibi_slopes.shape) if need_dalibi else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, dalibi


_N_INPUTS = 16  # arguments of selfattn::attention


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, alibi, q_ids, kv_ids, seed = inputs[:9]
    ctx.rules = tuple(
        inputs[9:]
    )  # causal, window_left, window_right, softcap, scale, dropout_p, backend
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, bias, alibi, q_ids, kv_ids, seed)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, bias, alibi, q_ids, kv_ids, seed = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[4]
    need_dalibi = alibi is not None and ctx.needs_input_grad[5]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dbias, dalibi = torch.ops.selfattn.attention_backward(
        dout, dlse, q, k, v, out, lse, mask, bias, alibi, q_ids, kv_ids, seed,
        *ctx.rules, need_dbias, need_dalibi,
    )  # fmt: skip
    grads = [None] * _N_INPUTS
    grads[0], grads[1], grads[2] = dq, dk, dv
    grads[4] = dbias if need_dbias else None
    grads[5] = dalibi if need_dalibi else None
    return tuple(grads)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    segment_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`selfattn.attention` through the ``selfattn::attention`` custom op (same arguments).

    Works in eager mode too (this is how the op is tested); the dropout seed is drawn here from
    torch's RNG as a tensor, so the op itself is a pure function of its inputs.
    """
    wl, wr = (None, None) if window is None else tuple(window)
    if isinstance(segment_ids, (tuple, list)):
        q_ids, kv_ids = segment_ids
    else:
        q_ids = kv_ids = segment_ids
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    out, lse = torch.ops.selfattn.attention(
        q, k, v, mask, bias, alibi_slopes, q_ids, kv_ids, seed,
        causal, wl, wr, softcap, scale, float(dropout_p), backend,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    **kwargs,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`selfattn.attention`, which itself becomes the custom op while ``torch.compile``
    traces: eager code keeps every backend (``sdpa`` included) and the exact error messages."""
    return api.attention(q, k, v, **kwargs)
