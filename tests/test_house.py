"""The layout of the house (docs/architecture.md): no private name crosses a module, the import
graph of ``selfattn`` has no circle, no file is a warehouse, and every file the docs name exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "selfattn"
MAX_LINES = 600
LONG_OK = {"backends/triton/kernels.py"}  # @triton.jit kernels: one file, read top to bottom


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, top_level_only: bool):
    """(imported module, imported name or None) for every import of ``module``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node)
            for alias in node.names:
                yield source, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif top_level_only and isinstance(node, ast.If):  # TYPE_CHECKING blocks
            continue


def test_no_private_name_is_imported_across_modules():
    """Another module's ``_name`` is its own business (private modules such as ``_rng`` are
    rooms of their own and may be imported)."""
    found = []
    for module, path in MODULES.items():
        for source, name in _imports(module, path, top_level_only=False):
            if not source.startswith("selfattn") or name is None or not name.startswith("_"):
                continue
            if f"{source}.{name}" in MODULES or name == "__version__":
                continue  # a private module, not a private name
            found.append(f"{module} imports {name} from {source}")
    assert not found, "\n".join(found)


def test_the_import_graph_has_no_circle():
    """Module-level imports between selfattn's modules form no cycle (packages count as their
    ``__init__``; imports inside functions, which break cycles on purpose, are not counted)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for source, name in _imports(module, path, top_level_only=True):
            if not source.startswith("selfattn"):
                continue
            target = f"{source}.{name}" if f"{source}.{name}" in MODULES else source
            if target in MODULES and target != module:
                graph[module].add(target)
    # a package's __init__ importing its own submodules is how packages are built, and a
    # submodule importing its parent package's name would be the circle: keep both kinds
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_file_is_a_warehouse(module):
    path = MODULES[module]
    rel = path.relative_to(SRC).as_posix()
    lines = len(path.read_text().splitlines())
    if rel not in LONG_OK:
        assert lines <= MAX_LINES, f"{rel} has {lines} lines (at most {MAX_LINES}: split it)"


def test_every_file_the_docs_and_code_name_exists():
    """Paths written in README.md, docs/*.md and the source's docstrings point at real files."""
    pattern = re.compile(
        r"(?<![\w/.-])((?:docs|benchmarks|examples|src|tests)/[\w./-]+\.(?:md|py|json|png|html|sh))"
    )
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *MODULES.values()]
    missing = []
    for text in texts:
        for ref in pattern.findall(text.read_text()):
            if not (ROOT / ref).exists():
                missing.append(f"{text.relative_to(ROOT)}: {ref}")
    assert not missing, "\n".join(missing)
    for text in texts:
        assert "API.md" not in text.read_text(), f"{text.relative_to(ROOT)} cites API.md"
