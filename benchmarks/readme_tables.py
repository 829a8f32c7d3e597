"""Write the README's and docs' benchmark figures from the committed results files.

Every benchmark figure in README.md and docs/*.md lives between two markers and is written by
this script, never by hand:

    <!-- table from benchmarks/results/cpu.json -->
    (a line naming the CPU, then the table, both generated)
    <!-- /table -->

    <!-- summary from benchmarks/results/cpu.json -->(one generated sentence)<!-- /summary -->

The tables are printed by the benchmark's own formatter (``table()`` in benchmarks/cpu.py and
benchmarks/models.py, :func:`sweep_table` for ``selfattn bench``'s docs/bench.json), so a table
rounds exactly as the benchmark prints it; benchmarks/results/ring.md is ring.py's ``table()`` of
ring.json as a whole file. Each results file records the CPU it was taken on (a ``cpu`` record
with at least ``model``: see :func:`selfattn.bench.machine.cpu_info`), and each generated block
starts by naming it.

    python benchmarks/readme_tables.py            # rewrite the blocks from the results files
    python benchmarks/readme_tables.py --check    # exit 1 and show what differs (the test's job)

After re-running a benchmark, run this script and commit the results file with the docs.
tests/test_docs.py fails when running it would change anything.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
#: the Markdown files whose blocks this script writes
DOCS = ("README.md", "docs/api.md", "docs/architecture.md", "docs/models.md")
#: every results file whose figures the docs may show (each must record its CPU)
RESULTS = (
    "benchmarks/results/cpu.json",
    "benchmarks/results/cpu-avx2.json",
    "benchmarks/results/models.json",
    "benchmarks/results/ring.json",
    "benchmarks/results/train_gpt_ring.json",
    "benchmarks/results/train_gpt_ring_float64.json",
    "docs/bench.json",
    "benchmarks/results/kv_perplexity.json",
    "benchmarks/results/kv_streaming.json",
    "benchmarks/results/kv_streaming_tokens.json",
    "benchmarks/results/kv_needles_smollm2.json",
    "benchmarks/results/kv_needles_gemma3.json",
    "benchmarks/results/kv_cache.json",
)
#: the KV-cache benchmarks (issue 18): results file stem -> the script whose ``table()`` prints it
KV_TABLES = {
    "kv_cache": "kv_cache",
    "kv_perplexity": "kv_perplexity",
    "kv_streaming": "kv_streaming",
    "kv_streaming_tokens": "kv_streaming",
    "kv_needles_smollm2": "kv_needles",
    "kv_needles_gemma3": "kv_needles",
}
BLOCK = re.compile(
    r"(<!-- (?P<kind>table|summary) from (?P<src>[\w./-]+) -->)(?P<body>.*?)(<!-- /(?P=kind) -->)",
    re.S,
)


def _bench_module(name: str) -> ModuleType:
    """benchmarks/<name>.py, imported by path (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(src: str, root: Path = ROOT) -> dict[str, Any]:
    """A results file, by its path relative to ``root`` (the checkout)."""
    return json.loads((root / src).read_text())


def find_cpu(result: dict[str, Any]) -> dict[str, Any] | None:
    """The ``cpu`` record of a results file: at the top or in its meta/config/machine record."""
    places = [result, *(result.get(k) for k in ("meta", "config", "machine"))]
    for place in places:
        if isinstance(place, dict) and isinstance(place.get("cpu"), dict):
            cpu = place["cpu"]
            if str(cpu.get("model", "")).strip():
                return cpu
    return None


def cpu_line(src: str, result: dict[str, Any]) -> str:
    """The sentence that opens every generated block: which CPU, which software, when."""
    from selfattn.bench.machine import cpu_label

    cpu = find_cpu(result)
    if cpu is None:
        raise ValueError(f"{src} does not record its CPU (a 'cpu' record with a 'model')")
    meta = result.get("meta") or result.get("config") or {}
    torch = f" with torch {meta['torch']}" if meta.get("torch") else ""
    date = f" on {meta['date']}" if meta.get("date") else ""
    setting = ""
    if src == "docs/bench.json":  # what selfattn bench ran: its settings vary (--quick, ...)
        c = result["config"]
        setting = (
            f"; {c['dtype']}, {'causal' if c['causal'] else 'not causal'}, (B, H, D) = "
            f"({c['batch']}, {c['heads']}, {c['head_dim']}), median of {c['repeats']} calls, "
            f"{c['threads']} threads, `selfattn` = the `{c['engine']}` engine"
        )
    return f"Measured on {cpu_label(cpu)}{torch}{date}{setting}; results: `{src}`."


def sweep_table(result: dict[str, Any]) -> str:
    """docs/bench.json (``selfattn bench --json``): one row per N, time and peak memory of each
    method (times in ms: whole from 10 ms, 0.1 from 1 ms, 0.01 below; memory in MiB to 0.1)."""
    methods = list(result["config"]["methods"])
    by = {(r["method"], r["n"]): r for r in result["rows"]}
    lengths = sorted({r["n"] for r in result["rows"]})
    head = ["N", *(f"{m} ms" for m in methods), *(f"{m} MiB" for m in methods)]
    rows = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]

    def ms(r: dict | None) -> str:
        if r is None:
            return ""
        t = r["median_s"] * 1e3
        return f"{t:,.0f}" if t >= 10 else f"{t:.1f}" if t >= 1 else f"{t:.2f}"

    def mib(r: dict | None) -> str:
        mem = None if r is None else r.get("memory_bytes")
        return "" if mem is None else f"{mem / 2**20:,.1f}"

    for n in lengths:
        cells = [str(n), *(ms(by.get((m, n))) for m in methods)]
        cells += [mib(by.get((m, n))) for m in methods]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _ratio_range(values: list[float]) -> str:
    lo, hi = min(values), max(values)

    def fmt(x: float) -> str:  # two significant digits, whole numbers from 10 on
        return f"{x:.0f}" if x >= 10 else f"{x:.2g}"

    return f"{fmt(lo)}x" if fmt(lo) == fmt(hi) else f"{fmt(lo)}-{fmt(hi)}x"


#: (case prefix, what the summary calls it), first match wins
SUMMARY_KINDS = (
    ("decode step", "a small decode step (through auto)"),
    ("tiny", "a tiny call"),
    ("forward", "prefill and training"),
    ("decode", "decode"),
    ("window", "a sliding window"),
)


def cpu_summary(src: str, result: dict[str, Any]) -> str:
    """One sentence of SDPA's time over selfattn's from benchmarks/cpu.py's results, by kind of
    call (:data:`SUMMARY_KINDS`): ``native``'s time, or ``auto``'s where the row measured what
    ``auto`` picks; rows taken under load (a busy process) are left out."""
    from selfattn.bench.machine import cpu_label

    groups: dict[str, list[float]] = {k: [] for _, k in SUMMARY_KINDS}
    for r in result["results"]:
        t = r.get("times")
        if not t or "native" not in t or "sdpa" not in t or "busy" in r["case"]:
            continue
        kind = next((k for p, k in SUMMARY_KINDS if r["case"].startswith(p)), None)
        if kind:
            groups[kind].append(t["sdpa"] / t.get("auto", t["native"]))
    order = ("prefill and training", "decode", "a sliding window")
    keys = [*order, *(k for k in groups if k not in order)]
    parts = [f"{_ratio_range(groups[k])} on {k}" for k in keys if groups[k]]
    cpu = find_cpu(result)
    if cpu is None:
        raise ValueError(f"{src} does not record its CPU (a 'cpu' record with a 'model')")
    threads = f", {cpu['threads']} threads" if cpu.get("threads") else ""
    return f"{', '.join(parts)}; {cpu_label(cpu)}{threads}, `{src}`"


def table_of(src: str) -> Callable[[dict[str, Any]], str]:
    """The formatter of a results file's table."""
    if src == "docs/bench.json":
        return sweep_table
    if src in ("benchmarks/results/cpu.json", "benchmarks/results/cpu-avx2.json"):
        cpu = _bench_module("cpu")
        return lambda result: cpu.table(result["results"])
    if src == "benchmarks/results/models.json":
        models = _bench_module("models")
        return lambda result: models.table(result["rows"])
    stem = Path(src).stem
    if src.startswith("benchmarks/results/") and stem in KV_TABLES:
        return _bench_module(KV_TABLES[stem]).table
    raise ValueError(f"no table is known for {src}")


def render(kind: str, src: str, root: Path = ROOT) -> str:
    """The generated body of one block (what goes between its two markers)."""
    result = load(src, root)
    if kind == "summary":
        if src != "benchmarks/results/cpu.json":
            raise ValueError(f"a summary is only known for benchmarks/results/cpu.json, not {src}")
        return cpu_summary(src, result)
    return f"\n{cpu_line(src, result)}\n\n{table_of(src)(result)}\n"


def rewrite(text: str, root: Path = ROOT) -> str:
    """``text`` with every block's body generated again from the results files under ``root``."""

    def one(m: re.Match) -> str:
        return m.group(1) + render(m.group("kind"), m.group("src"), root) + m.group(5)

    return BLOCK.sub(one, text)


def whole_files(root: Path = ROOT) -> dict[str, str]:
    """Files written whole from a results file: benchmarks/results/ring.md."""
    ring = _bench_module("ring")
    return {"benchmarks/results/ring.md": ring.table(load("benchmarks/results/ring.json", root))}


def expected(root: Path = ROOT) -> dict[str, str]:
    """Every file this script writes (relative to ``root``), as it should read."""
    out = {doc: rewrite((root / doc).read_text(), root) for doc in DOCS if (root / doc).exists()}
    out.update(whole_files(root))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 on a difference")
    args = ap.parse_args(argv)
    changed = []
    for rel, new in expected().items():
        path = ROOT / rel
        old = path.read_text() if path.exists() else ""
        if old == new:
            continue
        changed.append(rel)
        if args.check:
            diff = difflib.unified_diff(
                old.splitlines(), new.splitlines(), rel, f"{rel} (from its results)", lineterm=""
            )
            print("\n".join(diff))
        else:
            path.write_text(new)
    if changed:
        verb = "differ from their results files" if args.check else "rewritten"
        print(f"{verb}: {', '.join(changed)}", file=sys.stderr)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
