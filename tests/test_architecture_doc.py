"""docs/architecture.md says how the house is laid out as it is: every module of ``selfattn`` lies
in a room of its table, each room imports only what its "may import" column says, the library
never imports a leaf, and every C++ file of the native engine is described."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "selfattn"
DOC = ROOT / "docs" / "architecture.md"
CSRC = SRC / "backends" / "native" / "csrc"


def _table() -> list[tuple[list[str], str]]:
    """(room keys, "may import" cell) per row of the rooms table; a key is a path under
    src/selfattn ("api.py", "backends/", "backends/native/")."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) != 3:
            continue
        keys = [k for k in re.findall(r"`([\w/.]+)`", cells[0]) if (SRC / k).exists()]
        if keys:
            rows.append((keys, cells[2]))
    return rows


ROWS = _table()
ROOMS = [k for keys, _ in ROWS for k in keys]


def room_of(rel: str) -> str | None:
    """The room of a file (path under src/selfattn): its own row, else the deepest folder row."""
    if rel in ROOMS:
        return rel
    folders = [r for r in ROOMS if r.endswith("/") and rel.startswith(r)]
    return max(folders, key=len) if folders else None


def _leaves() -> set[str]:
    m = re.search(r"never imports a leaf\s*\(([^)]*)\)", DOC.read_text())
    assert m, "docs/architecture.md no longer says which rooms are leaves"
    names = re.findall(r"`(\w+)`", m.group(1))
    rows = [
        keys for keys, _ in ROWS if any(k.rstrip("/").removesuffix(".py") in names for k in keys)
    ]
    return {k for keys in rows for k in keys}  # a row is one room, whatever its keys


LEAVES = _leaves()
LIBRARY = set(ROOMS) - LEAVES


def _allowed(room: str, cell: str) -> set[str]:
    """The rooms ``room`` may import, read from its "may import" cell (and the other keys of its
    row, and the rooms inside it)."""
    row = next((keys for keys, _ in ROWS if room in keys), [room])
    allowed = set(row) | {r for r in ROOMS if r.startswith(room) and room.endswith("/")}
    if "everything" in cell:
        return set(ROOMS)
    if "the library" in cell:
        allowed |= LIBRARY
    for name in re.findall(r"`(\w+)`", cell):
        allowed |= {r for r in ROOMS if r.rstrip("/").removesuffix(".py") == name}
    return allowed


def _module_file(parts: list[str]) -> Path | None:
    for i in range(len(parts), -1, -1):
        base = SRC.joinpath(*parts[:i])
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    """The files under src/selfattn that ``path`` imports (at module level or inside functions)."""
    rel = path.relative_to(SRC)
    package = list(rel.parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[list[str]] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif (node.module or "").split(".")[0] == "selfattn":
                base = []
            else:
                continue
            mod = (node.module or "").split(".") if node.module else []
            if not node.level:
                mod = mod[1:]
            targets = [[*base, *mod, alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.startswith("selfattn")]
        for t in targets:
            f = _module_file(t)
            if f is not None:
                found.add(f.relative_to(SRC).as_posix())
    return found


FILES = sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("rel", FILES)
def test_every_module_lies_in_a_room_of_the_table(rel):
    assert room_of(rel), f"src/selfattn/{rel} is in no room of docs/architecture.md's table"


def test_each_room_imports_only_what_the_table_allows():
    wrong = []
    for keys, cell in ROWS:
        for room in keys:
            allowed = _allowed(room, cell)
            for rel in FILES:
                if room_of(rel) != room:
                    continue
                for target in _imports(SRC / rel):
                    got = room_of(target)
                    if got and got not in allowed:
                        wrong.append(
                            f"{rel} imports {target} (room {got}); {room} may import: {cell}"
                        )
    assert not wrong, "docs/architecture.md's 'may import' column is wrong:\n" + "\n".join(wrong)


def test_the_library_never_imports_a_leaf():
    wrong = [
        f"{rel} imports {t}"
        for rel in FILES
        if room_of(rel) in LIBRARY
        for t in _imports(SRC / rel)
        if room_of(t) in LEAVES
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_import():
    """The import reader is not blind: viz imports api (attention_weights), which only a correct
    'may import' cell allows."""
    assert "api.py" in {t for rel in FILES if rel.startswith("viz/") for t in _imports(SRC / rel)}
    assert "api.py" not in _allowed("viz/", "`checks`, `reference`")


@pytest.mark.parametrize("name", sorted(p.name for p in CSRC.iterdir() if p.is_file()))
def test_every_native_source_file_is_described(name):
    assert f"`{name}`" in DOC.read_text(), (
        f"src/selfattn/backends/native/csrc/{name} is not described in docs/architecture.md "
        "(section 'The native engine's C++')"
    )
