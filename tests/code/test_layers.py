"""The layers of ARCHITECTURE.md hold: every module of pipeline/ is in one layer, no import points to a higher layer
and no import cycle exists, counting module-level, lazy and TYPE_CHECKING imports, the package __init__ files an
import runs and the by-name import of family backends (pipeline.lineage.CONVENTIONS)."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

from helpers import REPO

from pipeline import lineage

ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|([^|]+)\|")


def layers(text: str) -> list[tuple[int, str, list[str]]]:
    """(rank, name, module patterns) of each row of the layer table in ARCHITECTURE.md."""
    table = text.split("<!-- layers:", 1)[1].split("\n\n", 1)[0]
    rows = [(int(m[1]), m[2], re.findall(r"`([^`]+)`", m[3])) for line in table.splitlines() if (m := ROW.match(line))]
    assert rows and [r for r, _, _ in rows] == list(range(len(rows))), "layer ranks must be 0, 1, 2, ... in order"
    return rows


def layer_of(path: str, rows: list[tuple[int, str, list[str]]]) -> int | None:
    """The rank of the longest pattern that matches ``path`` (None: no layer)."""
    hits = [(len(p), rank) for rank, _, patterns in rows for p in patterns if fnmatch.fnmatchcase(path, p)]
    return max(hits)[1] if hits else None


def module_name(path: str) -> str:
    return path[: -len(".py")].replace("/", ".").removesuffix(".__init__")


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the pipeline modules it imports, every kind of import counted (see the module docstring)."""
    files = {module_name(p.relative_to(root).as_posix()): p for p in (root / "pipeline").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        found = lineage.imported_modules(tree.body, name, path, root, type_checking=True)
        found |= lineage.CONVENTIONS[name](root) if name in lineage.CONVENTIONS else set()
        # a module's own packages are loaded before it: `from pipeline.report import charts` in pipeline.report.collect
        # depends on charts, not back on pipeline/report/__init__.py
        graph[name] = {m for m in found if m in files and m != name and not name.startswith(m + ".")}
    return graph


def with_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each import also runs the ``__init__`` of every package above the imported module (not the importer's own
    packages, which are loaded already)."""
    out = {}
    for name, deps in graph.items():
        parents = {".".join(d.split(".")[:i]) for d in deps for i in range(1, d.count(".") + 1)}
        out[name] = deps | {p for p in parents if p in graph and not name.startswith(p + ".") and p != name}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[str, set[str]], rows: list[tuple[int, str, list[str]]], root: Path) -> list[str]:
    def rank(module: str) -> int:
        path = lineage.module_file(module, root)
        return layer_of(path.relative_to(root).as_posix(), rows)  # type: ignore[union-attr,return-value]

    names = {r: n for r, n, _ in rows}
    return sorted(f"{m} ({names[rank(m)]}) imports {d} ({names[rank(d)]})" for m, deps in graph.items()
                  for d in deps if rank(d) > rank(m))


def test_every_module_is_in_one_layer_of_architecture_md() -> None:
    rows = layers((REPO / "ARCHITECTURE.md").read_text())
    assert [n for _, n, _ in rows][:2] == ["foundation", "contracts"] and rows[-1][1] == "entry points"
    unplaced = [p.relative_to(REPO).as_posix() for p in (REPO / "pipeline").rglob("*.py")
                if layer_of(p.relative_to(REPO).as_posix(), rows) is None]
    assert unplaced == []
    dead = [p for _, _, patterns in rows for p in patterns if not list(REPO.glob(p))]
    assert dead == [], "patterns in the layer table that match no file"


def test_no_import_points_up_and_no_cycle() -> None:
    rows = layers((REPO / "ARCHITECTURE.md").read_text())
    graph = import_graph(REPO)
    assert graph["pipeline.families.backends"] >= {"pipeline.families.yolo.backend",
                                                   "pipeline.families.torchvision.backend"}  # the convention
    assert "pipeline.config" in graph["pipeline.families.backend"]  # a TYPE_CHECKING import, counted
    assert cycles(graph) == []
    assert upward(with_packages(graph), rows, REPO) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The same checks on a toy package where a contract imports config lazily and two modules import each other
    under TYPE_CHECKING, and where a low module's import runs a high package __init__."""
    files = {"pipeline/__init__.py": "", "pipeline/config.py": "import pipeline.contracts.card\n",
             "pipeline/contracts/__init__.py": "",
             "pipeline/contracts/card.py": "def f():\n    import pipeline.config\n",
             "pipeline/low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pipeline.other\n"
                                "import pipeline.pkg.leaf\n",
             "pipeline/other.py": "import pipeline.low\n", "pipeline/pkg/__init__.py": "import pipeline.config\n",
             "pipeline/pkg/leaf.py": ""}
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    rows = layers("<!-- layers: toy -->\n| 0 | low | `pipeline/__init__.py`, `pipeline/contracts/*`, "
                  "`pipeline/low.py`, `pipeline/other.py`, `pipeline/pkg/leaf.py` | |\n"
                  "| 1 | high | `pipeline/config.py`, `pipeline/pkg/__init__.py` | |\n\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["pipeline.config", "pipeline.contracts.card"], ["pipeline.low", "pipeline.other"]]
    assert upward(graph, rows, tmp_path) == ["pipeline.contracts.card (low) imports pipeline.config (high)"]
    assert "pipeline.low (low) imports pipeline.pkg (high)" in upward(with_packages(graph), rows, tmp_path)
