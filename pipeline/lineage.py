"""DVC lineage from the code: each stage's ``deps`` = the files its entry point imports + the files it reads.

Hand-listed deps drift: a stage imports a new module and DVC no longer reruns it when that module changes. Here
the module part of every stage's deps is computed from the source, statically (``ast``, nothing is imported):

* the entry of stage S is the ``detflow`` command named in S's ``cmd`` (``detflow infer ...`` -> the function
  registered as ``infer`` in the sub-app of the ``pipeline/cli/`` package that holds it), plus the
  ``pipeline/cli/`` helpers it calls and the module-level imports of its sub-app, of the ``pipeline/cli/``
  modules that sub-app imports and of ``pipeline/cli/__init__.py`` (they run before any command; of those, only
  what runs at import time is followed, since no stage calls their functions). The other sub-apps are imported by
  ``pipeline/cli/__init__.py`` only to register their commands, so their imports are not followed: editing the
  serve sub-app's options never reruns a stage;
* the closure follows every ``pipeline.*`` import, at module level and inside functions (lazy imports still run
  when the stage needs them), ``from pipeline.x import y`` where ``y`` is a submodule, and the ``__init__.py`` of
  every package on the way (importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py``). Imports under
  ``if TYPE_CHECKING:`` never run and are not followed. Dynamic imports (``importlib``) are not seen: don't use
  them for pipeline modules. The one exception is a convention this module knows (:data:`CONVENTIONS`):
  ``pipeline.families.backends`` imports the ``backend`` module of every family package that
  ``pipeline/families/__init__.py`` registers (the spec must not import its backend; see that module).

Decisions
---------
* ``pipeline/config.py`` is a dep of every stage: it turns params.yaml into values (defaults, validation,
  ``model: auto``), so a change there can change what a stage computes. ``pipeline/errors.py`` is in every
  closure too (error text and the summary line can end up in reports).
* ``pipeline/cli/`` is **not** a dep: its commands only parse options, whose values DVC already tracks in
  ``cmd``, call the library and print a line, and one package holds every command (serve, registry, assets,
  ...), so listing it would rerun training for an edit of an unrelated command. Keep decisions out of it.
* Data files a stage reads are declared in :data:`DATA_INPUTS` (found by reading each stage's code) and checked
  like modules. Inputs that are deliberately *not* DVC deps are listed in :data:`NOT_DEPS` with the reason.

``python -m pipeline.lineage --check`` exits 1 and lists missing/extra deps per stage; ``--write`` rewrites the
``deps:`` lists of dvc.yaml in place (text level: comments and every other key are kept, and the result is
re-parsed and compared before it replaces the file).

Size: the import analysis and the text-level rewrite of dvc.yaml (which keeps comments) belong to one
command and one test.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "pipeline"
CLI_PACKAGE = "pipeline.cli"
ENTRY_PROGRAM = "detflow"
# Files never listed as a stage dep (see "Decisions" above).
EXCLUDED_PREFIX = "pipeline/cli/"

# Files and folders each stage reads besides code and params, in the order they are written in dvc.yaml.
# Found by reading the stage's code; keep it in step when a stage starts reading something new.
DATA_INPUTS: dict[str, tuple[str, ...]] = {
    "phantom": (),
    # data.source=bccd (or another named asset) is resolved from data/raw/NAME or a mirror and verified against
    # the sha256 pinned in pipeline/assets.py, which is a dep: the bytes are fixed by the code.
    "prepare": ("data/raw/phantom",),
    # COCO weights: a named asset (sha256 pinned in pipeline/assets.py) or torchvision's (hash in the file name);
    # a `train.pretrained` path is pinned by the train.pretrained_sha256 param.
    "train": ("data/prepared",),
    "evaluate": ("models/train", "data/prepared"),
    "export": ("models/train", "data/prepared", "reports/gate.json", "reports/metrics.json",
               "reports/train/summary.json"),
    # the shift section of batch inference compares with the training embeddings export writes beside the model
    "infer": ("models/model.onnx", "models/model_card.json", "models/embedding_reference.npy",
              "models/embedding_reference_groups.npy", "data/prepared"),
    # `detflow evaluate --external`: the exported model, and the internal scores it is compared with. The sets
    # themselves are the `external` param (see NOT_DEPS).
    "external": ("models/model.onnx", "models/model_card.json", "reports/metrics.json"),
    # `detflow report`: every result it shows (the run's params come from models/train/params.yaml)
    "report": ("data/prepared", "reports/data_validation.json", "models/train", "reports/train/transfer.json",
               "reports/train/summary.json", "reports/train/results.csv", "reports/metrics.json", "reports/gate.json",
               "reports/eval/statistics.json", "reports/plots/pr", "reports/plots/confusion.json",
               "models/model.onnx", "models/model_card.json", "reports/parity.json", "reports/shift.json",
               "reports/external", "reports/generalisation.json"),
}

# Files read on purpose without being DVC deps: stage -> {path (repository-relative) -> why}.
NOT_DEPS: dict[str, dict[str, str]] = {
    "train": {".detflow/train": (
        "scratch state of an interrupted run of this same stage, continued when train.resume=auto (a param); "
        "DVC deletes the stage's outs before it runs, so resumable state has to live outside them "
        "(.dvcignore'd, DETFLOW_WORKDIR moves it).")},
    "evaluate": {"models/registry/champion.json": (
        "the gate compares against the current champion when gate.max_regression is set. The pointer is written "
        "by promotion after the pipeline (flows/training.py, `detflow registry`), outside the DVC graph, and is "
        "absent on a fresh clone; DVC refuses a missing dep, file or params file alike (`dependency ... does not "
        "exist`, `Parameters ... are missing`; measured with DVC 3.67), and a dep on it would make every "
        "promotion rerun evaluate -> export -> infer. Its path is tracked (params `gate`), the champion value "
        "that was compared is written into reports/gate.json (`champion_map50`), and a promotion is checked "
        "again by the registry, not by DVC. (The path is params gate.champion; this is its default.)")},
    "report": {
        "<the raw source of data.source>": (
            "read only for thumbnails of the samples the validation report lists as quarantined or fixed; a change of "
            "the raw data reruns prepare, whose reports/data_validation.json (a dep) then changes too."),
        "dvc.lock": "shown as provenance; it is rewritten when this stage runs, so a dep on it would be circular.",
        "bench/results/inference.json": "optional: latency shown when a benchmark was run (bench/ is not a stage)."},
    "external": {"<each external[].source in params.yaml>": (
        "the external sets are a list in params.yaml of any length, empty by default; dvc.yaml cannot list a "
        "variable number of deps in one stage, and one stage per set (`foreach`, which DVC 3.67 accepts over an "
        "empty list) could not also write the one reports/generalisation.json over all sets. Each set's name, path, "
        "format and class map are tracked (params `external`), and the content that was scored is recorded in the "
        "outputs (reports/external/<name>/data_validation.json: manifest_sha256). After changing a set's files in "
        "place, run `dvc repro -f -s external`.")},
}


class LineageError(Exception):
    """dvc.yaml or pipeline/cli/ cannot be read as this module expects (the message says where)."""


# --- import closure ------------------------------------------------------------------------------------------


def module_file(name: str, root: Path = REPO) -> Path | None:
    """``pipeline.data.imaging`` -> ``root/pipeline/data/imaging.py`` (or the package's ``__init__.py``)."""
    if name.split(".")[0] != PACKAGE:
        return None
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_runtime(nodes: Iterable[ast.AST], at_import: bool = False,
                  type_checking: bool = False) -> Iterable[ast.AST]:
    """Every node below ``nodes`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` does run; with
    ``type_checking`` those bodies too), and with ``at_import`` the bodies of functions too (what runs when the
    module is imported, not when it is used)."""
    stack = list(nodes)[::-1]
    while stack:
        node = stack.pop()
        yield node
        if at_import and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
            children: list[ast.AST] = [node.test, *node.orelse]
        else:
            children = list(ast.iter_child_nodes(node))
        stack.extend(reversed(children))


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imported_modules(nodes: Iterable[ast.AST], module: str, path: Path, root: Path = REPO,
                     at_import: bool = False, type_checking: bool = False) -> set[str]:
    """Names of the ``pipeline`` modules the statements import (submodules named in ``from x import y`` too);
    ``type_checking``: the imports under ``if TYPE_CHECKING:`` too (what a type checker, and the layer test, see)."""
    found: set[str] = set()
    for node in _walk_runtime(nodes, at_import, type_checking):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = _package_of(module, path).split(".")
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if module_file(f"{base}.{alias.name}", root) is not None)
    return {m for m in found if module_file(m, root) is not None}


def family_backends(root: Path = REPO) -> set[str]:
    """``pipeline.families.<name>.backend`` of every family package ``pipeline/families/__init__.py`` imports."""
    registry = root / "pipeline" / "families" / "__init__.py"
    if not registry.is_file():
        return set()
    tree = ast.parse(registry.read_text(), filename=str(registry))
    packages = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module
                and node.module.startswith("pipeline.families.")
                and (root.joinpath(*node.module.split(".")) / "__init__.py").is_file()}
    return {f"{p}.backend" for p in packages if module_file(f"{p}.backend", root) is not None}


#: Imports made by name that the static analysis cannot see, by module: what it imports (see the docstring).
CONVENTIONS = {"pipeline.families.backends": family_backends}


def module_imports(name: str, root: Path = REPO, at_import: bool = False) -> set[str]:
    """The ``pipeline`` modules module ``name`` imports (:func:`imported_modules` of its file, plus
    :data:`CONVENTIONS`); with ``at_import`` only those that run when it is imported."""
    path = module_file(name, root)
    if path is None:
        return set()
    tree = ast.parse(path.read_text(), filename=str(path))
    found = imported_modules(tree.body, name, path, root, at_import)
    if name in CONVENTIONS and not at_import:
        found |= CONVENTIONS[name](root)
    return found


def _with_parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_closure(start: set[str], root: Path = REPO, at_import: bool = False) -> set[str]:
    """``start`` plus every ``pipeline`` module they import, transitively, with the packages' ``__init__``;
    with ``at_import`` only the imports that run when a module is imported (not those inside its functions)."""
    seen: set[str] = set()
    todo = [p for m in start for p in _with_parents(m)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if module_file(name, root) is None:
            continue
        seen.add(name)
        for imported in module_imports(name, root, at_import):
            todo.extend(_with_parents(imported) - seen)
    return seen


# --- stage entry points in pipeline/cli/ ----------------------------------------------------------------------


def _command_name(func: ast.FunctionDef) -> str | None:
    """The typer command name a function is registered under with ``@app.command(...)``, else None."""
    for deco in func.decorator_list:
        if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "command"
                and isinstance(deco.func.value, ast.Name) and deco.func.value.id == "app"):
            continue
        for arg in deco.args[:1]:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                return arg.value
        for kw in deco.keywords:
            if kw.arg == "name" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                return kw.value.value
        return func.name.replace("_", "-")
    return None


@dataclass
class _Cli:
    """The ``pipeline/cli/`` package as the lineage needs it."""

    trees: dict[str, ast.Module]  # module -> parsed source
    paths: dict[str, Path]
    top_level: list[str]  # sub-apps added without a name: their commands are `detflow COMMAND`


def _cli(root: Path) -> _Cli:
    folder = root / "pipeline" / "cli"
    if not (folder / "__init__.py").is_file():
        raise LineageError(f"no {folder}/__init__.py: the `{ENTRY_PROGRAM}` commands live in the pipeline/cli package")
    paths = {CLI_PACKAGE if p.name == "__init__.py" else f"{CLI_PACKAGE}.{p.stem}": p
             for p in sorted(folder.glob("*.py")) if p.name != "__main__.py"}
    trees = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in paths.items()}
    top_level = []
    for node in ast.walk(trees[CLI_PACKAGE]):  # app.add_typer(<module>.app) without name=...
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_typer" \
                and not any(kw.arg == "name" for kw in node.keywords) and node.args \
                and isinstance(node.args[0], ast.Attribute) and isinstance(node.args[0].value, ast.Name):
            top_level.append(f"{CLI_PACKAGE}.{node.args[0].value.id}")
    return _Cli(trees, paths, top_level)


def entry_modules(command: str, root: Path = REPO) -> tuple[set[str], set[str]]:
    """Modules the ``detflow COMMAND`` entry imports directly: (what runs when it loads: the module-level imports
    of the package ``__init__``, of the sub-app defining the command and of the cli modules it imports; what its
    body and the cli helpers it calls import). Of the first only what runs at import counts: the serve sub-app
    imports e.g. ``pipeline.serve.entry``, whose functions no stage calls."""
    cli = _cli(root)
    commands = {_command_name(f): (m, f) for m in cli.top_level if m in cli.trees
                for f in cli.trees[m].body if isinstance(f, ast.FunctionDef) and _command_name(f)}
    if command not in commands:
        raise LineageError(f"no `{ENTRY_PROGRAM} {command}` command in {root / 'pipeline' / 'cli'} "
                           f"(commands: {', '.join(sorted(commands))})")
    home, entry = commands[command]

    def module_level(m: str) -> set[str]:
        nodes = [n for n in cli.trees[m].body if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef
                                                                   | ast.ClassDef)]
        return imported_modules(nodes, m, cli.paths[m], root)

    loaded, todo = set(), [home]  # the sub-app and the cli modules it imports (not its siblings)
    while todo:
        m = todo.pop()
        if m not in loaded:
            loaded.add(m)
            todo += [i for i in module_level(m) if i in cli.trees and i != CLI_PACKAGE]
    at_load = {i for m in {CLI_PACKAGE, *loaded} for i in module_level(m) if i not in cli.trees}
    funcs = {f.name: (m, f) for m in loaded for f in cli.trees[m].body if isinstance(f, ast.FunctionDef)}
    found: set[str] = set()
    stack, done = [(home, entry)], set()
    while stack:
        m, func = stack.pop()
        if func.name in done:
            continue
        done.add(func.name)
        found |= {i for i in imported_modules(func.body, m, cli.paths[m], root) if i not in cli.trees}
        called = {n.func.id for n in ast.walk(func) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        stack += [funcs[name] for name in called if name in funcs and name not in done]
    return at_load, found


def stage_command(cmd: Any) -> str | None:
    """``"detflow infer SRC --out x"`` -> ``"infer"``; None for a cmd that is not a single detflow command."""
    if not isinstance(cmd, str):
        return None
    words = cmd.split()
    if len(words) < 2 or Path(words[0]).name != ENTRY_PROGRAM:
        return None
    return words[1]


def module_deps(command: str, root: Path = REPO) -> list[str]:
    """Source files (repository-relative, sorted) a ``detflow COMMAND`` run can execute, ``pipeline/cli/`` left
    out (see the module docstring)."""
    at_load, called = entry_modules(command, root)
    modules = import_closure(at_load, root, at_import=True) | import_closure(called, root)
    files = {module_file(m, root).relative_to(root).as_posix() for m in modules}
    return sorted(f for f in files if not f.startswith(EXCLUDED_PREFIX))


def expected_deps(stage: str, command: str, root: Path = REPO) -> list[str]:
    """What dvc.yaml's ``deps`` of ``stage`` must be: its data inputs, then its source files."""
    if stage not in DATA_INPUTS:
        raise LineageError(f"stage {stage!r} has no entry in DATA_INPUTS (pipeline/lineage.py): list the files it "
                           "reads there (an empty tuple if none)")
    return [*DATA_INPUTS[stage], *module_deps(command, root)]


# --- dvc.yaml ----------------------------------------------------------------------------------------------------


@dataclass
class StageDiff:
    stage: str
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra)


def _stages(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, dict):
        raise LineageError("dvc.yaml has no `stages:` mapping")
    return stages


def _dep_path(dep: Any) -> str:
    return next(iter(dep)) if isinstance(dep, dict) else str(dep)


def _out_paths(spec: dict[str, Any]) -> list[str]:
    """Every path a stage writes: ``outs``, ``metrics`` and ``plots`` entries (a string or a one-key mapping)."""
    return [_dep_path(o) for key in ("outs", "metrics", "plots") for o in (spec or {}).get(key) or []]


def stage_outputs(dvc_yaml: Path = REPO / "dvc.yaml") -> dict[str, list[str]]:
    """``{stage: the paths it writes}``, in dvc.yaml's order."""
    return {stage: _out_paths(spec) for stage, spec in _stages(yaml.safe_load(dvc_yaml.read_text())).items()}


def stage_order(dvc_yaml: Path = REPO / "dvc.yaml") -> list[str]:
    """The stages of dvc.yaml in an order DVC can run them: a stage after every stage whose output it depends on
    (a dep equal to, inside or above an output), ties in the order dvc.yaml writes them. What the Prefect flow
    runs, one task per stage; a cycle is a :class:`LineageError`."""
    from graphlib import CycleError, TopologicalSorter

    stages = _stages(yaml.safe_load(dvc_yaml.read_text()))
    outs = {stage: _out_paths(spec) for stage, spec in stages.items()}

    def feeds(out: str, dep: str) -> bool:
        return out == dep or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep.rstrip("/") + "/")

    graph = {stage: {other for other in stages if other != stage for dep in (spec or {}).get("deps") or []
                     if any(feeds(o, _dep_path(dep)) for o in outs[other])} for stage, spec in stages.items()}
    sorter = TopologicalSorter(graph)
    try:
        sorter.prepare()
    except CycleError as e:
        raise LineageError(f"dvc.yaml's stages form a cycle: {' -> '.join(e.args[1])}") from None
    order, position = [], {stage: i for i, stage in enumerate(stages)}
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=position.__getitem__)
        order += ready
        sorter.done(*ready)
    return order


def expected_all(dvc_yaml: Path, root: Path = REPO) -> dict[str, list[str]]:
    """``{stage: expected deps}`` for every stage of ``dvc_yaml`` whose cmd is a ``detflow`` command."""
    doc = yaml.safe_load(dvc_yaml.read_text())
    out: dict[str, list[str]] = {}
    for stage, spec in _stages(doc).items():
        command = stage_command((spec or {}).get("cmd"))
        if command is not None:
            out[stage] = expected_deps(stage, command, root)
    return out


def check(dvc_yaml: Path, root: Path = REPO) -> list[StageDiff]:
    """The stages whose ``deps`` differ from the computed ones (empty list: dvc.yaml is exact)."""
    stages = _stages(yaml.safe_load(dvc_yaml.read_text()))
    diffs = []
    for stage, want in expected_all(dvc_yaml, root).items():
        have = [_dep_path(d) for d in stages[stage].get("deps") or []]
        diff = StageDiff(stage, [d for d in want if d not in have], [d for d in have if d not in want])
        if diff:
            diffs.append(diff)
    return diffs


_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):\s*(#.*)?$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_blank_or_comment(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def _stage_spans(lines: list[str]) -> dict[str, tuple[int, int, int]]:
    """``{stage: (first body line, end line, indent of its keys)}`` found in the text of a ``stages:`` mapping."""
    top = next((i for i, line in enumerate(lines) if re.match(r"^stages:\s*(#.*)?$", line.rstrip("\r\n"))), None)
    if top is None:
        raise LineageError("dvc.yaml has no top-level `stages:` line")
    end = next((i for i in range(top + 1, len(lines))
                if not _is_blank_or_comment(lines[i]) and _indent(lines[i]) == 0), len(lines))
    body = [i for i in range(top + 1, end) if not _is_blank_or_comment(lines[i])]
    if not body:
        return {}
    stage_indent = _indent(lines[body[0]])
    headers = [(i, m["key"]) for i in body if _indent(lines[i]) == stage_indent
               and (m := _KEY.match(lines[i].rstrip("\r\n")))]
    spans = {}
    for n, (i, stage) in enumerate(headers):
        stop = headers[n + 1][0] if n + 1 < len(headers) else end
        inner = [j for j in range(i + 1, stop) if not _is_blank_or_comment(lines[j])]
        if inner:
            spans[stage] = (i + 1, inner[-1] + 1, _indent(lines[inner[0]]))
    return spans


def _key_of(line: str) -> str:
    return line.strip().split(":", 1)[0]


def rewrite_deps(text: str, deps: dict[str, list[str]]) -> str:
    """dvc.yaml text with each listed stage's ``deps:`` block replaced by ``deps`` (created after ``cmd`` if absent).

    Only the lines of those blocks change (comments inside a replaced block go with it); the result must parse to
    the same document apart from the deps, else :class:`LineageError`.
    """
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += newline
    spans = _stage_spans(lines)
    edits: list[tuple[int, int, list[str]]] = []
    for stage, wanted in deps.items():
        if stage not in spans:
            raise LineageError(f"stage {stage!r} not found in dvc.yaml's text")
        start, end, kind = spans[stage]
        keys = {_key_of(lines[j]): j for j in range(start, end)
                if _indent(lines[j]) == kind and not _is_blank_or_comment(lines[j])}
        item_indent = kind + 2
        if "deps" in keys:
            first = keys["deps"]
            last = first + 1  # the block: every following line indented deeper (or blank/comment) ...
            while last < end and (_is_blank_or_comment(lines[last]) or _indent(lines[last]) > kind):
                last += 1
            while last > first + 1 and _is_blank_or_comment(lines[last - 1]):  # ... less trailing blank lines
                last -= 1
            items = [lines[j] for j in range(first + 1, last) if lines[j].lstrip().startswith("- ")]
            item_indent = _indent(items[0]) if items else item_indent
            keep = re.match(r"^ *deps:\s*(#.*)?$", lines[first].rstrip("\r\n")) and wanted
            head = [lines[first] if keep else " " * kind + ("deps:" if wanted else "deps: []") + newline]
        else:
            if "cmd" not in keys:
                raise LineageError(f"stage {stage!r} has no `cmd:` line to put `deps:` after")
            first = keys["cmd"] + 1
            while first < end and (_is_blank_or_comment(lines[first]) or _indent(lines[first]) > kind):
                first += 1
            last = first
            head = [" " * kind + ("deps:" if wanted else "deps: []") + newline]
        edits.append((first, last, head + [" " * item_indent + f"- {d}" + newline for d in wanted]))
    for first, last, new in sorted(edits, reverse=True):
        lines[first:last] = new
    out = "".join(lines)
    _verify_rewrite(text, out, deps)
    return out


def _verify_rewrite(before: str, after: str, deps: dict[str, list[str]]) -> None:
    old, new = yaml.safe_load(before), yaml.safe_load(after)
    for stage, wanted in deps.items():
        old["stages"][stage]["deps"] = wanted
    if old != new:
        raise LineageError("rewriting dvc.yaml's deps would change other keys; fix dvc.yaml's layout by hand "
                           "(deps as a block list of paths under each stage)")


def write(dvc_yaml: Path, root: Path = REPO) -> list[StageDiff]:
    """Rewrite the deps of ``dvc_yaml`` to the computed ones (atomically); return what changed."""
    diffs = check(dvc_yaml, root)
    if diffs:
        text = rewrite_deps(dvc_yaml.read_text(), expected_all(dvc_yaml, root))
        tmp = dvc_yaml.with_name(f".{dvc_yaml.name}.lineage-tmp")
        tmp.write_text(text)
        os.replace(tmp, dvc_yaml)
    return diffs


def format_diffs(diffs: list[StageDiff], words: tuple[str, str] = ("missing dep", "extra dep")) -> str:
    lines = []
    for d in diffs:
        lines += [f"{d.stage}: {words[0]} {p}" for p in d.missing] + [f"{d.stage}: {words[1]} {p}" for p in d.extra]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.lineage", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml's deps differ (the default)")
    mode.add_argument("--write", action="store_true", help="rewrite the deps lists of dvc.yaml in place")
    mode.add_argument("--show", action="store_true", help="print the computed deps of every stage")
    parser.add_argument("--dvc-yaml", type=Path, default=REPO / "dvc.yaml")
    args = parser.parse_args(argv)
    try:
        if args.show:
            for stage, deps in expected_all(args.dvc_yaml).items():
                print(f"{stage}:\n" + "".join(f"  - {d}\n" for d in deps), end="")
            return 0
        if args.write:
            diffs = write(args.dvc_yaml)
            print(format_diffs(diffs, ("added", "removed")) or f"{args.dvc_yaml}: deps already exact", file=sys.stderr)
            if diffs:
                print(f"{args.dvc_yaml}: deps rewritten for {', '.join(d.stage for d in diffs)}", file=sys.stderr)
            return 0
        diffs = check(args.dvc_yaml)
    except (LineageError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if diffs:
        print(format_diffs(diffs) + "\nrun `python -m pipeline.lineage --write` to fix dvc.yaml", file=sys.stderr)
        return 1
    print(f"{args.dvc_yaml}: deps match each stage's imports and data inputs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
