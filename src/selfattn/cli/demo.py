"""``selfattn demo``: the lesson's example through the five steps, its unscaled code against the
stable softmax, every backend against the float64 specification, the visibility rules in ASCII,
then MiniLM's attention drawn."""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np

from .console import matrix, out_dir
from .explain import default_model, model_pictures

__all__ = ["DEFAULT_TEXT", "LESSON_X", "agreement_cases", "cmd_demo"]

DEFAULT_TEXT = "The cat sat on the mat because it was tired."
# The lesson's example: three tokens with three-dimensional embeddings (shared/lesson).
LESSON_X = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=np.float64)
TOKENS = ["token 0", "token 1", "token 2"]
DIMS = ["d0", "d1", "d2"]


def _weights(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lesson's random Wq, Wk, Wv (its ``np.random.rand(3, 3)``), seeded."""
    rng = np.random.default_rng(seed)
    wq, wk, wv = (rng.random((3, 3)) for _ in range(3))
    return wq, wk, wv


def _side_by_side(named: dict[str, np.ndarray], rows: list[str]):
    from rich.columns import Columns

    return Columns([matrix(title, m, rows, DIMS) for title, m in named.items()])


def _lesson(con, seed: int) -> bool:
    """The lesson's five steps, then its unscaled code against the stable one on large scores."""
    from selfattn import reference

    wq, wk, wv = _weights(seed)
    con.rule("[bold]1. The lesson's example, step by step")
    con.print(
        "X = [[1,0,1],[0,1,0],[1,1,1]] and random Wq, Wk, Wv (seed "
        f"{seed}), unscaled scores as in the lesson (scale=1; selfattn's default is 1/sqrt(d_k))."
    )
    st = reference.self_attention(LESSON_X, wq, wk, wv, scale=1.0, return_steps=True)
    con.print(matrix("Step 1: input embeddings X", st.x, TOKENS, DIMS))
    con.print(_side_by_side({"Wq": wq, "Wk": wk, "Wv": wv}, DIMS))
    con.print("Step 2: Q = X Wq, K = X Wk, V = X Wv")
    con.print(_side_by_side({"Q": st.q, "K": st.k, "V": st.v}, TOKENS))
    con.print(matrix("Step 3: scores Q K^T", st.scores, TOKENS, TOKENS))
    con.print(matrix("Step 4: softmax of each row", st.weights, TOKENS, TOKENS))
    con.print(matrix("Step 5: output = weights V", st.output, TOKENS, DIMS))
    lesson_out = reference.lesson_self_attention(LESSON_X, wq, wk, wv)
    diff = float(np.max(np.abs(lesson_out - st.output)))
    ok = diff < 1e-12
    mark = "[green]agree[/]" if ok else "[red]DISAGREE[/]"
    con.print(f"The lesson's own code gives the same output: max |diff| = {diff:.1e} -> {mark}")

    con.rule("[bold]2. Large scores: the lesson's code against the stable softmax")
    base = float(np.max(st.scores))
    factor = math.ceil(math.sqrt(1000.0 / max(base, 1e-3)))  # scores grow with factor^2
    xb = LESSON_X * factor
    big = reference.self_attention(xb, wq, wk, wv, scale=1.0, return_steps=True)
    lesson_big = reference.lesson_self_attention(xb, wq, wk, wv)
    con.print(
        f"X scaled by {factor}: the largest score is {np.max(big.scores):.0f}; np.exp overflows "
        "past ~709, so exp(s) / sum(exp(s)) becomes inf / inf = NaN. Subtracting each row's "
        "maximum first (what selfattn does) gives the same maths with no overflow."
    )
    both = {"lesson: exp(s) / sum(exp(s))": lesson_big, "stable: exp(s - max) / sum": big.output}
    con.print(_side_by_side(both, TOKENS))
    stable_ok = bool(np.isfinite(big.output).all())
    con.print(
        f"lesson's output has {int(np.isnan(lesson_big).sum())} NaN entries; stable output "
        + ("[green]finite[/]" if stable_ok else "[red]NOT finite[/]")
    )
    return ok and stable_ok


def agreement_cases(seed: int) -> dict[str, tuple[Any, Any, Any, dict[str, Any]]]:
    """The demo's float32 cases, name -> ``(q, k, v, rules)``: the lesson's example, then
    (1, 4, 37, 16) queries over 2 key/value heads, plain and under each rule."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lq, lk, lv = (torch.from_numpy(LESSON_X @ w).float()[None, None] for w in _weights(seed))

    def qkv(n, hq=4, hkv=2, d=16):
        return tuple(torch.randn(1, h, n, d, generator=g) for h in (hq, hkv, hkv))

    mask = torch.rand(1, 1, 37, 37, generator=g) > 0.3
    mask[..., 5, :] = False  # a row that sees nothing must give 0, never NaN
    seg = torch.tensor([[0] * 15 + [1] * 12 + [2] * 10])
    return {
        "lesson": (lq, lk, lv, {"scale": 1.0}),
        "plain": (*qkv(37), {}),
        "causal GQA": (*qkv(37), {"causal": True}),
        "window": (*qkv(37), {"window": (8, 0)}),
        "segments": (*qkv(37), {"segment_ids": seg, "causal": True}),
        "mask": (*qkv(37), {"mask": mask}),
    }


def _backends(con, seed: int) -> bool:
    """Every backend on the same cases against the float64 specification."""
    import torch
    from rich.table import Table

    import selfattn
    from selfattn.backends import BACKENDS
    from selfattn.testing import ERR_FLOOR, ERR_MULTIPLE, agreement, plain_attention, ref_attention

    con.rule("[bold]3. Every backend against the specification")
    floor = f"{ERR_FLOOR[torch.float32]:g}".replace("e-0", "e-")
    con.print(
        "float32 inputs; error = max |out - float64 spec|; a backend passes when its error is at "
        f"most {ERR_MULTIPLE:g}x that of the plain float32 formula + {floor} (FlashAttention's "
        "test rule)."
    )
    cases = agreement_cases(seed)
    refs = {name: ref_attention(q, k, v, **rules)[0] for name, (q, k, v, rules) in cases.items()}
    plains = {name: plain_attention(q, k, v, **rules) for name, (q, k, v, rules) in cases.items()}
    t = Table(show_edge=False)
    t.add_column("backend")
    for c in cases:
        t.add_column(c, justify="right")
    all_ok = True
    notes: dict[str, str] = {}
    for name, b in BACKENDS.items():
        why = b.unavailable()
        if why:
            t.add_row(name, "[dim]unavailable[/]", *[""] * (len(cases) - 1))
            notes[name] = f"unavailable: {why}"
            continue
        dev = "cuda" if name == "triton" else "cpu"
        cells = []
        for case, (q, k, v, rules) in cases.items():
            conv = {n: (x.to(dev) if isinstance(x, torch.Tensor) else x) for n, x in rules.items()}
            try:
                out = selfattn.attention(q.to(dev), k.to(dev), v.to(dev), backend=name, **conv)
            except selfattn.UnsupportedInputs as exc:
                reason = exc.args[0].splitlines()[-1].split(": ", 1)[-1]
                cells.append("[dim]declines[/]")
                notes.setdefault(name, f"declines some cases: {reason}")
                continue
            a = agreement(out, refs[case], plains[case])
            all_ok &= a.ok
            cells.append(f"[green]ok[/] {a.err:.0e}" if a.ok else f"[red]FAIL[/] {a.err:.0e}")
        t.add_row(name, *cells)
    con.print(t)
    for name, note in notes.items():
        con.print(f"  {name}: {note}", markup=False)
    return all_ok


def _pictures(con) -> None:
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.text import Text

    from selfattn.viz import mask_ascii

    con.rule("[bold]4. Visibility rules, as the engines see them")
    pics = [
        mask_ascii(6, causal=True),
        mask_ascii(6, window=(2, 0)),
        mask_ascii(6, segment_ids=[0, 0, 0, 1, 1, -1]),
        mask_ascii(3, 6, causal=True),
    ]
    panels = []
    for p in pics:
        lines = p.splitlines()
        # Drop the header's line of legend: the panel title carries the rule.
        title = Text(lines[0].split(", query row")[0])
        panels.append(Panel(Text("\n".join(lines[2:])), expand=False, title=title))
    con.print(Columns(panels))
    con.print("x = visible, . = hidden; query row i sits at key position i + Nk - Nq")


def cmd_demo(args: argparse.Namespace, con) -> int:
    """The lesson walked through, the backends checked, then a real model's attention drawn."""
    out = out_dir(args.out)
    ok = _lesson(con, args.seed)
    ok &= _backends(con, args.seed)
    _pictures(con)
    if not args.no_model:
        con.rule("[bold]5. A real model: MiniLM on selfattn")
        model = args.model or default_model()
        model_pictures(con, model, args.text, out, title="all-MiniLM-L6-v2")
        con.print(
            f"open {out / 'head_view.html'} in a browser: pick a layer and heads, hover a token"
        )
    con.rule()
    con.print("[green]demo finished[/]" if ok else "[red]demo found a disagreement (see above)[/]")
    return 0 if ok else 1
