"""``selfattn::attention`` as a ``torch.library`` custom op: ``torch.compile`` sees one opaque node.

Dynamo cannot trace into the backends (they branch on tensor contents to skip empty blocks, call
numpy, launch Triton), so while compiling, :func:`selfattn.attention` calls :func:`attention_op`:
a custom op with a fake (shape-only) implementation and an autograd formula whose backward is a
second custom op. Both schemas, the packing of a call into the op's arguments and back, and
which inputs get gradients are derived from the table of rules (``spec.RULES``). Both ops pick
their backend through the registry: the forward runs the backend's ``run``, the backward its
``backward`` hook (a backend without one, e.g. ``reference``, gets its gradients from the first
``auto`` candidate that has one). The op always returns the lse (its backward needs it), so
``sdpa``, which computes none, never runs under ``torch.compile``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _rng
from .backends import select
from .first_order import first_order
from .sinks import sink_grad
from .spec import RULES, UnsupportedInputs, validate

__all__ = ["attention_op", "op_arguments"]

_RULE_ARGS = ", ".join(part for rule in RULES for part in rule.schema)
_GRAD_RULES = [rule for rule in RULES if rule.grad]
_FWD_SCHEMA = (
    f"(Tensor q, Tensor k, Tensor v, {_RULE_ARGS}, Tensor? seed, str backend) -> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    f"{_RULE_ARGS}, Tensor? seed, str backend, "
    + ", ".join(f"bool need_{rule.keyword}" for rule in _GRAD_RULES)
    + ") -> ("
    + ", ".join(["Tensor"] * (3 + len(_GRAD_RULES)))
    + ")"
)
# where each rule's arguments sit among the op's inputs (after q, k, v)
_SLOTS: list[tuple[int, int]] = []
for _rule in RULES:
    _first = 3 + sum(b - a for a, b in _SLOTS)
    _SLOTS.append((_first, _first + len(_rule.schema)))
_N_RULE_ARGS = _SLOTS[-1][1] - 3
_TENSOR_ARGS = [
    3 + i
    for i, part in enumerate(p for rule in RULES for p in rule.schema)
    if part.startswith("Tensor")
]
_GRAD_SLOTS = [_SLOTS[RULES.index(rule)][0] for rule in _GRAD_RULES]  # their one tensor each
# which of them the backends' backward hooks compute (the others: the sinks, from out and lse)
_FROM_HOOK = [rule.hook_grad for rule in _GRAD_RULES]
if [r.keyword for r in _GRAD_RULES if not r.hook_grad] != ["sinks"]:
    raise RuntimeError("_compile computes sink_grad for the one rule without a hook gradient")


def op_arguments(**rules: Any) -> list[Any]:
    """Keyword arguments of ``attention`` -> the op's rule arguments (between v and seed)."""
    args = []
    for rule in RULES:
        value = rules.get(rule.keyword)
        args.extend(rule.pack(rule.empty[0] if value is None else value))
    return args


def _unpack(args: tuple) -> dict[str, Any]:
    """The op's rule arguments (``args`` counts from q) -> keyword arguments of ``attention``."""
    return {rule.keyword: rule.unpack(*args[a:b]) for rule, (a, b) in zip(RULES, _SLOTS)}


def _seed(seed: torch.Tensor | None) -> tuple[int, int] | None:
    if seed is None:
        return None
    words = seed.tolist()
    return int(words[0]), int(words[1])


@torch.library.custom_op("selfattn::attention", mutates_args=(), schema=_FWD_SCHEMA)
def _forward_op(*args):
    q, k, v = args[:3]
    seed, backend = args[3 + _N_RULE_ARGS :]
    with torch.no_grad():  # autograd is the op's own (below); the backend need not record
        spec = validate(q, k, v, return_lse=True, **_unpack(args))
        out, lse = select(spec, backend).run(spec, q, k, v, _seed(seed))
    # the fake implementation promises contiguous results; keep that promise whatever the backend
    return out.contiguous(), lse.float().contiguous()


@_forward_op.register_fake
def _(*args):
    # Validation needs only shapes, dtypes and devices, so bad input fails while tracing.
    q, k, v = args[:3]
    spec = validate(q, k, v, return_lse=True, **_unpack(args))
    out = q.new_empty(spec.B, spec.Hq, spec.Nq, spec.Dv)  # (B, Hq, Nq, Dv)
    lse = q.new_empty(spec.B, spec.Hq, spec.Nq, dtype=torch.float32)  # (B, Hq, Nq)
    return out, lse


def _backward_backend(spec, backend: str):
    try:
        return select(spec, backend, need=("backward",))
    except UnsupportedInputs:
        if backend == "auto":
            raise
        return select(spec, "auto", need=("backward",))


@torch.library.custom_op("selfattn::attention_backward", mutates_args=(), schema=_BWD_SCHEMA)
def _backward_op(dout, dlse, *args):
    q, k, v, out, lse = args[:5]
    op_args = (q, k, v, *args[5 : 5 + _N_RULE_ARGS])  # numbered like the forward's inputs
    seed, backend, *needs = args[5 + _N_RULE_ARGS :]
    with torch.no_grad():
        spec = validate(q, k, v, return_lse=True, **_unpack(op_args))
        chosen = _backward_backend(spec, backend)
        out, lse = _exact(chosen, spec, q, k, v, out, lse, _seed(seed), any(needs))
        hook_needs = [need for need, hook in zip(needs, _FROM_HOOK) if hook]
        dq, dk, dv, *hook_extra = chosen.backward(
            spec, q, k, v, out, lse, dout, dlse, _seed(seed), *hook_needs
        )
        from_hook = iter(hook_extra)
        extra = [
            next(from_hook)
            if hook
            else (sink_grad(spec.sinks, out, lse, dout, dlse) if need else None)
            for need, hook in zip(needs, _FROM_HOOK)
        ]
    grads = [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)]
    for slot, need, g in zip(_GRAD_SLOTS, needs, extra):
        given = op_args[slot]
        # contiguous results, as the fake implementation promises
        grads.append(g.reshape(given.shape).to(given.dtype) if need else q.new_empty(0))
    return tuple(g.contiguous() for g in grads)


def _exact(chosen, spec, q, k, v, out, lse, seed, bias_grads: bool):
    """The op returns a float32 lse and an output in q's dtype. For float64 inputs that lse, and
    for 16-bit inputs with bias/ALiBi gradients that rounded output (D = rowsum(dO * O) would
    cost those gradients three digits), are recomputed at the accumulation dtype by the
    backend's forward hook, where it has one."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rounded = out.dtype != acc and bias_grads
    if getattr(chosen, "forward", None) is None or not (lse.dtype != acc or rounded):
        return out, lse
    exact, exact_lse = chosen.forward(spec, q, k, v, seed)
    return (exact if rounded and exact.dtype == acc else out), exact_lse.to(acc)


@_backward_op.register_fake
def _(dout, dlse, *args):
    q, k, v = args[:3]
    op_args = (q, k, v, *args[5 : 5 + _N_RULE_ARGS])
    needs = args[5 + _N_RULE_ARGS + 2 :]
    # contiguous, like the real results (empty_like would copy the strides of a transposed view)
    grads = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]
    for slot, need in zip(_GRAD_SLOTS, needs):
        given = op_args[slot]
        grads.append(given.new_empty(given.shape) if need else q.new_empty(0))
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    rule_range = range(3, 3 + _N_RULE_ARGS)
    ctx.others = [inputs[i] for i in rule_range if i not in _TENSOR_ARGS] + [inputs[-1]]
    tensors = [inputs[i] for i in _TENSOR_ARGS]
    ctx.save_for_backward(*inputs[:3], *output, *tensors, inputs[3 + _N_RULE_ARGS])


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *saved = ctx.saved_tensors
    *tensors, seed = saved
    tensors, others = iter(tensors), iter(ctx.others)
    rule_args = [
        next(tensors) if i in _TENSOR_ARGS else next(others) for i in range(3, 3 + _N_RULE_ARGS)
    ]
    backend = next(others)
    needs = [rule_args[slot - 3] is not None and ctx.needs_input_grad[slot] for slot in _GRAD_SLOTS]
    if dout is None:
        dout = torch.zeros_like(out)
    with torch.no_grad():  # create_graph=True: first-order gradients, refused below
        dq, dk, dv, *extra = torch.ops.selfattn.attention_backward(
            dout, dlse, q, k, v, out, lse, *rule_args, seed, backend, *needs
        )
    grads: list[torch.Tensor | None] = [None] * (3 + _N_RULE_ARGS + 2)
    grads[0], grads[1], grads[2] = dq, dk, dv
    for slot, need, g in zip(_GRAD_SLOTS, needs, extra):
        grads[slot] = g if need else None
    anchors = [q, k, v, *(rule_args[slot - 3] for slot in _GRAD_SLOTS)]
    advice = "call attention outside torch.compile with backend='math' for second derivatives"
    return first_order(f"{backend} (the selfattn::attention custom op)", anchors, grads, advice)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    return_lse: bool = False,
    backend: str = "auto",
    **rules: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`selfattn.attention` through the ``selfattn::attention`` custom op (same arguments).

    Works in eager mode too (this is how the op is tested); the dropout seed is drawn here from
    torch's RNG as a tensor, so the op itself is a pure function of its inputs.
    """
    seed = None
    dropout_p = rules.get("dropout_p")
    if isinstance(dropout_p, (int, float)) and dropout_p > 0:
        seed = _rng.seed_tensor()
    out, lse = torch.ops.selfattn.attention(q, k, v, *op_arguments(**rules), seed, backend)
    return (out, lse) if return_lse else out
