"""``selfattn chat``'s KV-cache options: ``--kv-bits``, ``--kv-rotate``, ``--kv-residual``,
``--kv-budget``, ``--kv-policy``, ``--kv-sinks``, turned into the keyword arguments of
:func:`selfattn.integrations.transformers.make_cache` (checked before the model loads)."""

from __future__ import annotations

import argparse
from typing import Any

from .console import UsageError

__all__ = ["POLICIES", "SCORED", "Session", "add_arguments", "describe", "options"]

#: ``make_cache``'s policies (selfattn.integrations.evict.POLICIES; kept here so that the parser
#: does not import transformers), and those that need selfattn's attention for their scores
POLICIES = ("window", "sink", "h2o", "tova", "snapkv")
SCORED = ("h2o", "tova", "snapkv")


def _count(text: str, least: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {n}")
    return n


def _bits(text: str) -> int | tuple[int, int]:
    """``--kv-bits``: ``8`` or ``4`` (keys and values), or ``K,V`` such as ``8,4`` (apart)."""
    sides = text.split(",")
    if len(sides) in (1, 2) and all(x.strip() in ("8", "4") for x in sides):
        bits = tuple(int(x) for x in sides)
        return bits[0] if len(bits) == 1 else (bits[0], bits[1])
    raise argparse.ArgumentTypeError(
        f"expected 8, 4 or KEY_BITS,VALUE_BITS such as 8,4; got {text!r}"
    )


def add_arguments(s: argparse.ArgumentParser) -> None:
    """Add the KV-cache options to the ``chat`` parser ``s``."""
    g = s.add_argument_group("KV cache (selfattn's in-place cache; its size is printed per reply)")
    bits = (
        "store keys and values quantized, 8 or 4 bits, or K,V bits apart such as 8,4 "
        "(int8 keys, 4-bit values) (needs --attn selfattn)"
    )
    g.add_argument("--kv-bits", type=_bits, metavar="8|4|K,V", help=bits)
    rotate = "Walsh-Hadamard rotation before quantizing (with --kv-bits; advised at 4 bits)"
    g.add_argument("--kv-rotate", action="store_true", help=rotate)
    residual = (
        "with --kv-bits: the newest N tokens of each layer stay float until newer ones push "
        "them out (default 128, as transformers' QuantizedCache; 0: quantize every token at once)"
    )
    g.add_argument("--kv-residual", type=lambda t: _count(t, 0), metavar="N", help=residual)
    budget = "keep at most N tokens in each full-attention layer, evicting by --kv-policy"
    g.add_argument("--kv-budget", type=lambda t: _count(t, 1), metavar="N", help=budget)
    policy = (
        f"what --kv-budget evicts: {', '.join(POLICIES)} (default h2o; "
        f"{', '.join(SCORED)} need --attn selfattn)"
    )
    g.add_argument("--kv-policy", choices=POLICIES, metavar="P", help=policy)
    sinks = "tokens the sink policy always keeps (default 4)"
    g.add_argument("--kv-sinks", type=lambda t: _count(t, 0), metavar="S", help=sinks)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """``make_cache``'s keyword arguments from the parsed options.

    Raises:
        UsageError: options that need another (``--kv-rotate`` or ``--kv-residual`` without
            ``--kv-bits``,
            ``--kv-policy`` or ``--kv-sinks`` without ``--kv-budget``, ``--kv-sinks`` with
            another policy), or ``--kv-bits`` / a scored policy with ``--attn`` other than
            selfattn.
    """
    if args.kv_rotate and args.kv_bits is None:
        raise UsageError("--kv-rotate rotates quantized keys and values: it needs --kv-bits")
    residual = getattr(args, "kv_residual", None)
    if residual is not None and args.kv_bits is None:
        raise UsageError("--kv-residual delays quantizing the newest tokens: it needs --kv-bits")
    if args.kv_budget is None:
        for name, value in (("--kv-policy", args.kv_policy), ("--kv-sinks", args.kv_sinks)):
            if value is not None:
                raise UsageError(f"{name} says what --kv-budget evicts: it needs --kv-budget N")
    policy = args.kv_policy or "h2o"
    if args.kv_sinks is not None and policy != "sink":
        raise UsageError(f"--kv-sinks is for --kv-policy sink, not {policy}")
    attn = getattr(args, "attn", "selfattn")
    if args.kv_bits is not None and attn != "selfattn":
        raise UsageError(f"--kv-bits needs --attn selfattn (the {attn} attention cannot read it)")
    if args.kv_budget is not None and policy in SCORED and attn != "selfattn":
        raise UsageError(
            f"--kv-policy {policy} scores tokens with selfattn's kernels: it needs --attn "
            f"selfattn (window and sink work with {attn})"
        )
    out: dict[str, Any] = {}
    if args.kv_bits is not None:
        out.update(bits=args.kv_bits, rotate=bool(args.kv_rotate))
        if residual is not None:
            out["residual"] = residual
    if args.kv_budget is not None:
        out.update(budget=args.kv_budget, policy=policy)
        if args.kv_sinks is not None:
            out["sink_tokens"] = args.kv_sinks
    return out


def describe(opts: dict[str, Any]) -> str:
    """A few words for the status line: ``"int8+rotation, budget 1024 h2o"`` or ``"float"``."""
    parts = []
    if "bits" in opts:
        b = opts["bits"]
        kind = f"int{b}" if isinstance(b, int) else f"int{b[0]} keys, int{b[1]} values"
        parts.append(kind + ("+rotation" if opts.get("rotate") else ""))
        if "residual" in opts:  # given: make_cache's default (128) is not spelled out
            parts.append(f"residual {opts['residual']}")
    else:
        parts.append("float")
    if "budget" in opts:
        parts.append(f"budget {opts['budget']} {opts['policy']}")
    return ", ".join(parts)


class Session:
    """One conversation's KV cache, reused from turn to turn.

    A turn's prompt is the whole conversation (the chat template over every message); when it
    begins with exactly the tokens the cache already holds (the previous prompt and reply, as
    generated), the cache is reused and ``generate`` prefills only the new turn, which is how a
    budget cache runs a chat past its budget. Otherwise (the reply re-tokenizes differently, or
    the conversation was reset) a fresh ``make_cache`` is made.
    """

    def __init__(self, model: Any, cache_options: dict[str, Any]) -> None:
        self.model, self.options = model, dict(cache_options)
        self.cache: Any = None
        self.tokens: Any = None  # (T,) every token of the previous turn's output

    def cache_for(self, ids: Any) -> Any:
        """The cache for prompt ``ids`` (1, N): the conversation's, or a fresh one."""
        import torch

        from selfattn.integrations.transformers import make_cache

        if self.cache is not None and self.tokens is not None:
            held = self.cache.get_seq_length()
            if 0 < held < ids.shape[1] and torch.equal(ids[0, :held], self.tokens[:held]):
                return self.cache
        self.cache, self.tokens = make_cache(self.model, **self.options), None
        return self.cache

    def remember(self, out: Any) -> None:
        """The output (1, T) of the turn that used the cache."""
        self.tokens = out[0]

    def reset(self) -> None:
        """Forget the conversation (the next turn starts a fresh cache)."""
        self.cache = self.tokens = None
