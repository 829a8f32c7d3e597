"""Needle retrieval with a cache bounded to a token budget: does the model still find one planted
sentence after the policy evicted most of the context? (issue 18: the best policy >= 90% of the
full cache's accuracy; SmolLM2 at context 2k with budget 512, Gemma-3-270M at 4k with 1024).

A needle "The special magic number for <city> is <n>." is planted at a depth of 0-100% into the
first tokens of CPython's ``pydoc_data/topics.py`` (at the next line start), and the prompt ends
with "What is the special magic number for <city> mentioned in the text above? The special magic
number for <city> is". The prompt (``--context`` tokens in all) is prefilled in one call into the
cache (``--prefill-chunk`` to feed it in parts), which then holds at most the budget; the answer
is decoded greedily (up to 8 tokens) and counts when its first number is ``<n>``. The full cache
(``make_cache()``, every token kept) is scored the same way: small models may miss needles even
then, and the accuracy of each policy is also given relative to it. Writes
benchmarks/results/kv_needles_<model>.json.

    python benchmarks/kv_needles.py --model smollm2 --context 2048 --budget 512
    python benchmarks/kv_needles.py --model gemma3 --context 4096 --budget 1024
    python benchmarks/kv_needles.py --model smollm2 --context 512 --budget 128 --depths 3 --needles 1
    python benchmarks/kv_needles.py --model gemma3 --depths 3 --needles 1 --policies window sink --keep

``--keep`` runs only the policies named and keeps the results file's other rows (its full cache
among them), refusing a file whose model, context, budget, depths, needles or prefill differ.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# kv_common.py sits beside this file (appended: the folder's names must shadow nothing)
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
from kv_common import (
    POLICIES,
    RUNS,
    add_runs_argument,
    budget_cache,
    held_tokens,
    load_model,
    pydoc_text,
    run_label,
    run_meta,
    write_results,
)

from selfattn.testing import torch_threads

RESULTS = Path(__file__).parent / "results"
#: the needles' cities and numbers (fixed: every run asks the same questions)
NEEDLES = (("Paris", 7341), ("Lima", 52918), ("Oslo", 816), ("Nairobi", 60457), ("Quito", 2093))
CONTEXTS = {"smollm2": (2048, 512), "gemma3": (4096, 1024)}  # issue 18's settings
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M"}
NEW_TOKENS = 8


def question(city: str) -> str:
    return (
        f"\n\nWhat is the special magic number for {city} mentioned in the text above? "
        f"The special magic number for {city} is"
    )


def prompts(
    tok: Any, context: int, depths: list[float], needles: list[tuple[str, int]]
) -> list[dict[str, Any]]:
    """``context``-token prompts (as lists of ids), one per (depth, needle)."""
    lead = tok("a", add_special_tokens=True)["input_ids"]
    bos = [lead[0]] if tok.bos_token_id is not None and lead[0] == tok.bos_token_id else []
    hay = tok(pydoc_text(), add_special_tokens=False)["input_ids"][: context + 64]
    line_starts = [i + 1 for i, t in enumerate(hay) if "\n" in tok.decode([t])]
    out = []
    for city, number in needles:
        needle = tok(
            f"The special magic number for {city} is {number}.\n", add_special_tokens=False
        )
        ask = tok(question(city), add_special_tokens=False)["input_ids"]
        body = context - len(bos) - len(needle["input_ids"]) - len(ask)
        if body < 1:
            raise ValueError(f"context {context} is too short for a needle and a question")
        for depth in depths:
            want = round(depth * body)
            # the first line start at or after the depth (the end of the haystack when none)
            pos = next((p for p in line_starts if want <= p <= body), body)
            ids = bos + hay[:pos] + needle["input_ids"] + hay[pos:body] + ask
            out.append({"city": city, "number": number, "depth": depth, "ids": ids, "at": pos})
    return out


def tok_has_digit(ids: list[int], tokenizer: Any) -> bool:
    return any(c.isdigit() for c in tokenizer.decode(ids))


def answer(
    model: Any, tokenizer: Any, ids: list[int], cache: Any, prefill_chunk: int | None
) -> tuple[list[int], int]:
    """Greedy decoding of up to :data:`NEW_TOKENS` tokens after prefilling ``ids``, stopping once
    a number was followed by something else; returns the new ids and the most tokens a layer
    held after the prefill."""
    x = torch.tensor([ids])
    step = prefill_chunk or x.shape[1]
    for start in range(0, x.shape[1], step):
        logits = model(input_ids=x[:, start : start + step], cache=cache, use_cache=True).logits
    held = held_tokens(cache)
    new: list[int] = []
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for _ in range(NEW_TOKENS):
        token = int(logits[0, -1].argmax())
        if token in eos:
            break
        new.append(token)
        if not tok_has_digit(new[-1:], tokenizer) and first_number(tokenizer.decode(new)):
            break  # the number is complete: the rest of the sentence is not scored
        logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits
    return new, held


def first_number(text: str) -> str | None:
    """The first number of ``text`` without its thousands separators ("52,918." -> "52918")."""
    m = re.search(r"\d[\d, ]*", text)
    return None if m is None else re.sub(r"[, ]", "", m.group(0))


def measure(
    model: Any,
    tok: Any,
    cases: list[dict[str, Any]],
    budget: int,
    policies: list[str],
    prefill_chunk: int | None,
    save: Callable[[list[dict[str, Any]], dict[str, str]], None] | None = None,
    keep: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One row per policy (and the full cache, ``"full"`` in ``policies`` or not): accuracy over
    ``cases`` and each case's answer; ``save(rows, skipped)`` runs after each row (a long run
    keeps what it finished). ``keep``: rows of an earlier run of the same cases; the full cache
    then does not run again, and the kept rows of policies not run stay (in :data:`RUNS`
    order)."""
    rows, skipped = [], {}
    run_full = keep is None
    keep = keep or []
    for policy in [None] * run_full + [p for p in policies if p != "full"]:
        name = policy or "full"
        found, t0, most = [], time.perf_counter(), 0
        try:
            for case in cases:
                cache = budget_cache(model, None if policy is None else budget, policy)
                new, held = answer(model, tok, case["ids"], cache, prefill_chunk)
                most = max(most, held)
                text = tok.decode(new)
                found.append(
                    [case["depth"], case["city"], text, first_number(text) == str(case["number"])]
                )
                print(f"{name:>6}  depth {case['depth']:.0%} {case['city']}: {text!r}", flush=True)
        except NotImplementedError as exc:
            skipped[name] = str(exc)
            print(f"{name:>6}  skipped: {exc}", flush=True)
            continue
        if policy is not None and most > budget:
            raise RuntimeError(f"{policy}: a layer held {most} tokens, over the budget {budget}")
        hits = sum(f[3] for f in found)
        rows.append(
            {
                "policy": name,
                "budget": None if policy is None else budget,
                "correct": hits,
                "cases": len(found),
                "accuracy": round(hits / len(found), 4),
                "max_held": most,
                "seconds": round(time.perf_counter() - t0, 1),
                "answers": found,  # [depth, city, decoded answer, correct]
            }
        )
        print(f"{name:>6}  {hits}/{len(found)} found  (held <= {most})", flush=True)
        if save is not None:
            save(merged(keep, rows), skipped)
    rows = merged(keep, rows)
    full = next((r for r in rows if r["policy"] == "full"), None)
    for r in rows:
        if full is not None and full["accuracy"] > 0:
            r["vs_full"] = round(r["accuracy"] / full["accuracy"], 4)
    return rows, skipped


def merged(keep: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` and the rows of ``keep`` whose policy ``rows`` lacks: the full cache first, then
    the policies in :data:`RUNS` order."""
    ran = {r["policy"] for r in rows}
    out = rows + [r for r in keep if r["policy"] not in ran]
    order = ("full", *RUNS)
    return sorted(out, key=lambda r: order.index(r["policy"]))


def kept_rows(path: Path, meta: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The rows of the results file ``path`` for ``--keep``, checked to be of the same cases,
    and the date of that file's run.

    Raises:
        ValueError: no such file, or one whose cases differ (named).
    """
    if not path.exists():
        raise ValueError(f"--keep: {path} does not exist")
    old = json.loads(path.read_text())
    same = ("model_name", "context", "budget", "depths", "needles", "prefill_chunk")
    differ = [k for k in same if old["meta"].get(k) != meta[k]]
    if differ:
        raise ValueError(f"--keep: {path} holds other cases ({', '.join(differ)} differ)")
    return [{k: v for k, v in r.items() if k != "vs_full"} for r in old["rows"]], old["meta"][
        "date"
    ]


def table(result: dict[str, Any]) -> str:
    """The README's table: accuracy of each policy and of the full cache, by depth."""
    meta, rows = result["meta"], result["rows"]
    depths = sorted({a[0] for a in rows[0]["answers"]})
    how = "one call" if meta["prefill_chunk"] is None else f"chunks of {meta['prefill_chunk']}"
    lines = [
        f"{meta['model_name']}, context {meta['context']} tokens (prefilled in {how}), budget "
        f"{meta['budget']}, needles: {len(meta['needles'])} x depths: {len(depths)}, greedy answer"
        + (
            f"; policies run: {', '.join(meta['policies'])}."
            if not set(POLICIES) <= set(meta.get("policies", POLICIES))
            else "."
        )
        + (
            f" Rows kept from an earlier run ({meta['kept']['date']}): "
            + ", ".join("full cache" if p == "full" else f"`{p}`" for p in meta["kept"]["rows"])
            + "."
            if meta.get("kept")
            else ""
        ),
        "",
        "| cache | found | accuracy | vs full cache | by depth (0% .. 100%) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        name = (
            "full cache" if r["policy"] == "full" else f"{run_label(r['policy'])} @ {r['budget']}"
        )
        per = [sum(a[3] for a in r["answers"] if a[0] == d) for d in depths]
        vs = f"{100 * r['vs_full']:.0f}%" if "vs_full" in r else ""
        lines.append(
            f"| {name} | {r['correct']}/{r['cases']} | {100 * r['accuracy']:.0f}% | {vs} | "
            + " ".join(str(p) for p in per)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONTEXTS), default="smollm2")
    parser.add_argument("--context", type=int, help="prompt tokens (default: issue 18's)")
    parser.add_argument("--budget", type=int, help="tokens kept (default: issue 18's)")
    parser.add_argument("--depths", type=int, default=11, help="evenly spaced over 0-100%%")
    parser.add_argument("--needles", type=int, default=3, help=f"at most {len(NEEDLES)}")
    add_runs_argument(parser)
    parser.add_argument("--prefill-chunk", type=int, help="feed the prompt in parts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", default="selfattn", help="attn_implementation")
    parser.add_argument("--out", type=Path, help="default: results/kv_needles_<model>.json")
    parser.add_argument(
        "--keep", action="store_true", help="keep the results file's rows of other policies"
    )
    args = parser.parse_args(argv)
    context, budget = CONTEXTS[args.model]
    args.context, args.budget = args.context or context, args.budget or budget
    if not 1 <= args.needles <= len(NEEDLES) or args.depths < 2 or args.threads < 1:
        parser.error(f"--needles must be 1..{len(NEEDLES)}, --depths >= 2, --threads >= 1")
    if not 1 <= args.budget < args.context or (args.prefill_chunk or 1) < 1:
        parser.error("--budget must be in 1 .. context - 1, --prefill-chunk >= 1")
    out = args.out or RESULTS / f"kv_needles_{args.model}.json"
    depths = [round(i / (args.depths - 1), 4) for i in range(args.depths)]
    needles = list(NEEDLES[: args.needles])
    meta = run_meta(
        f"{MODEL_NAMES[args.model]} (fp32) needle retrieval in pydoc_data/topics.py with "
        "make_cache(budget=, policy=)",
        args.threads,
        Path(__file__).name,
        argv,
        model_name=MODEL_NAMES[args.model],
        context=args.context,
        budget=args.budget,
        depths=depths,
        needles=[f"The special magic number for {c} is {n}." for c, n in needles],
        prefill_chunk=args.prefill_chunk,
        policies=args.policies,
        attention=args.attention,
    )
    keep = None
    if args.keep:  # checked before the model loads
        keep, date = kept_rows(out, meta)
        had = {r["policy"] for r in keep}
        meta["policies"] = [p for p in RUNS if p in args.policies or p in had]
        meta["command"] += "  (rows of other policies kept from an earlier run)"
        kept = [r["policy"] for r in keep if r["policy"] not in args.policies]
        meta["kept"] = {"date": date, "rows": kept}
    model, tok = load_model(args.model, args.attention)
    cases = prompts(tok, args.context, depths, needles)

    def save(rows: list[dict[str, Any]], skipped: dict[str, str]) -> None:
        write_results(out, rows, {**meta, "skipped": skipped})

    with torch_threads(args.threads), torch.inference_mode():
        rows, skipped = measure(
            model, tok, cases, args.budget, args.policies, args.prefill_chunk, save, keep
        )
    save(rows, skipped)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
