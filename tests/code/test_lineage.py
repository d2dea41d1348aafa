"""DVC lineage: dvc.yaml's deps equal each stage's import closure plus its declared data inputs.

A module a stage imports but dvc.yaml does not list means DVC skips the stage after that module changed; these
tests fail then, and `python -m pipeline.lineage --write` fixes dvc.yaml.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from pipeline import lineage

DVC_YAML = REPO / "dvc.yaml"
STAGES = ("phantom", "prepare", "train", "evaluate", "export", "infer", "external", "report")
COMMAND = {"external": "evaluate"}  # stage -> its detflow command where the two names differ


def _deps(path: Path) -> dict[str, list[str]]:
    return {name: list(spec.get("deps") or []) for name, spec in yaml.safe_load(path.read_text())["stages"].items()}


def test_dvc_yaml_deps_equal_import_closure_plus_data_inputs() -> None:
    declared = _deps(DVC_YAML)
    assert set(declared) == set(STAGES)
    for stage in STAGES:
        command = lineage.stage_command(yaml.safe_load(DVC_YAML.read_text())["stages"][stage]["cmd"])
        assert command == COMMAND.get(stage, stage)
        want = set(lineage.DATA_INPUTS[stage]) | set(lineage.module_deps(command))
        assert set(declared[stage]) == want, f"{stage}: run `python -m pipeline.lineage --write`"
    assert lineage.check(DVC_YAML) == []


def test_closure_holds_the_modules_the_issue_found_missing() -> None:
    """The concrete drift reported: infer decodes with imaging.py, export runs the trainers and evaluator."""
    assert "pipeline/data/imaging.py" in lineage.module_deps("infer")
    export = lineage.module_deps("export")
    assert {"pipeline/evaluate/stage.py", "pipeline/evaluate/predict.py", "pipeline/families/yolo/export.py",
            "pipeline/families/torchvision/export.py"} <= set(export)
    assert "pipeline/families/torchvision/inference.py" in lineage.module_deps("evaluate")
    assert "reports/train/summary.json" in lineage.DATA_INPUTS["export"]
    for stage in STAGES:  # params turn into values: every stage that reads them; the CLI file: none
        command = COMMAND.get(stage, stage)
        deps = lineage.module_deps(command)
        assert ("pipeline/params.py" in deps) == (stage != "infer")  # infer: the card only
        # the family registry's checks: the stages that touch a model; phantom and prepare do not
        assert ("pipeline/config.py" in deps) == (stage not in ("infer", "phantom", "prepare"))
        assert not [d for d in lineage.module_deps(command) if d.startswith("pipeline/cli/")]


def test_check_catches_a_missing_module_and_a_missing_data_file(tmp_path: Path) -> None:
    text = DVC_YAML.read_text()
    broken = tmp_path / "dvc.yaml"
    head, export = text.split("\n  export:\n")  # drop one module (first stage listing it) and export's summary.json
    broken.write_text(head.replace("      - pipeline/data/imaging.py\n", "", 1) + "\n  export:\n"
                      + export.replace("      - reports/train/summary.json\n", "", 1))
    diffs = {d.stage: d for d in lineage.check(broken)}
    first_with_imaging = next(s for s in STAGES if "pipeline/data/imaging.py" in lineage.module_deps(s))
    assert diffs[first_with_imaging].missing == ["pipeline/data/imaging.py"]
    assert diffs["export"].missing == ["reports/train/summary.json"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.lineage", "--check", "--dvc-yaml", str(broken)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"{first_with_imaging}: missing dep pipeline/data/imaging.py" in proc.stderr
    assert "export: missing dep reports/train/summary.json" in proc.stderr
    # --write repairs it: same document as the original apart from the order of deps, comments kept
    assert subprocess.run([sys.executable, "-m", "pipeline.lineage", "--write", "--dvc-yaml", str(broken)],
                          cwd=REPO, capture_output=True).returncode == 0
    assert lineage.check(broken) == []
    assert [ln for ln in broken.read_text().splitlines() if ln.lstrip().startswith("#")] == \
        [ln for ln in text.splitlines() if ln.lstrip().startswith("#")]
    fixed, original = yaml.safe_load(broken.read_text()), yaml.safe_load(text)
    for spec in (*fixed["stages"].values(), *original["stages"].values()):
        spec["deps"] = sorted(spec["deps"])
    assert fixed == original


def test_check_catches_an_extra_dep(tmp_path: Path) -> None:
    broken = tmp_path / "dvc.yaml"
    head, infer = DVC_YAML.read_text().split("\n  infer:\n")
    extra = "    deps:\n      - pipeline/cli/data.py\n"
    broken.write_text(head + "\n  infer:\n" + infer.replace("    deps:\n", extra, 1))
    assert [(d.stage, d.missing, d.extra) for d in lineage.check(broken)] == [("infer", [], ["pipeline/cli/data.py"])]


def test_closure_follows_lazy_relative_and_submodule_imports_but_not_type_checking(tmp_path: Path) -> None:
    """A toy package: every import form the pipeline uses, and the ones that must not count."""
    files = {
        "pipeline/__init__.py": "",
        "pipeline/cli/__init__.py": """
            import typer
            from pipeline.cli import group, stages
            from pipeline.errors import E
            app = typer.Typer()
            app.add_typer(stages.app)
            app.add_typer(group.app, name="group")
        """,
        "pipeline/cli/common.py": """
            def helper():
                from pipeline import helped
        """,
        "pipeline/cli/stages.py": """
            import typer
            from pipeline.cli.common import helper
            app = typer.Typer()
            @app.command()
            def stage():
                helper()
                from pipeline.pkg import sub
            @app.command("other-name")
            def other():
                import pipeline.never
        """,
        "pipeline/cli/group.py": """
            import typer
            import pipeline.sibling_only  # runs at start, only to register this group's commands
            app = typer.Typer()
            @app.command("grouped")
            def grouped():
                import pipeline.never
        """,
        "pipeline/sibling_only.py": "",
        "pipeline/errors.py": "class E(Exception): ...",
        "pipeline/helped.py": "",
        "pipeline/pkg/__init__.py": "",
        "pipeline/pkg/sub.py": """
            from typing import TYPE_CHECKING
            from . import rel
            if TYPE_CHECKING:
                from pipeline import typing_only
            else:
                from pipeline import runtime_else
            def f():
                from .deep.leaf import x
        """,
        "pipeline/pkg/rel.py": "import os",
        "pipeline/pkg/deep/__init__.py": "",
        "pipeline/pkg/deep/leaf.py": "x = 1",
        "pipeline/typing_only.py": "",
        "pipeline/runtime_else.py": "",
        "pipeline/never.py": "",
    }
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(body))
    assert lineage.module_deps("stage", tmp_path) == [
        "pipeline/__init__.py", "pipeline/errors.py", "pipeline/helped.py", "pipeline/pkg/__init__.py",
        "pipeline/pkg/deep/__init__.py", "pipeline/pkg/deep/leaf.py", "pipeline/pkg/rel.py", "pipeline/pkg/sub.py",
        "pipeline/runtime_else.py"]
    assert "pipeline/never.py" in lineage.module_deps("other-name", tmp_path)
    with pytest.raises(lineage.LineageError, match="no `detflow grouped` command"):  # a group's, not a stage's
        lineage.module_deps("grouped", tmp_path)
    with pytest.raises(lineage.LineageError, match="no `detflow nosuch` command"):
        lineage.module_deps("nosuch", tmp_path)


def test_write_adds_a_deps_block_to_a_stage_without_one(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        # header comment
        stages:
          phantom:
            cmd: detflow phantom --out data/raw/phantom
            params:
              - phantom   # trailing comment
            outs:
              - data/raw/phantom

          infer:
            # a comment inside the stage
            cmd: detflow infer x
            deps:
              - stale/path.py
            outs:
              - reports/predictions.json
        """)
    out = lineage.rewrite_deps(text, {"phantom": ["a.py", "b.py"], "infer": ["c.py"]})
    doc = yaml.safe_load(out)
    assert doc["stages"]["phantom"]["deps"] == ["a.py", "b.py"]
    assert doc["stages"]["infer"]["deps"] == ["c.py"]
    assert doc["stages"]["phantom"]["params"] == ["phantom"]
    assert "# trailing comment" in out and "# a comment inside the stage" in out and "stale/path.py" not in out
    assert out.index("cmd: detflow phantom") < out.index("- a.py") < out.index("params:")


# --- what each stage really reads ------------------------------------------------------------------------------

TINY = {"phantom.patients": 6, "phantom.slices": 4, "phantom.size": 128, "train.imgsz": 64, "train.batch": 8,
        "train.nominal_batch": 8, "train.workers": 0, "train.epochs": 1, "train.augment.mosaic": False,
        "train.pretrained": "none", "train.device": "cpu", "evaluate.bootstrap": 20, "evaluate.conf": 0.01,
        "evaluate.preview_images": 2, "gate.min_map50": 0, "gate.min_cpm": 0, "gate.min_sensitivity_at_1fp": 0,
        "gate.max_regression": 1.0}
_OPENED: list[tuple[str, str]] | None = None  # (path, mode) while a stage runs under the audit hook


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append((os.fsdecode(args[0]), str(args[1] or "r")))


@pytest.mark.slow
def test_every_file_a_stage_reads_is_a_declared_dep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the dvc.yaml commands in order (tiny params) and record every file each one opens (audit hook): a file
    that existed before the stage and is read by it must be params.yaml, under a DATA_INPUTS path or a NOT_DEPS
    path of that stage. Reads from C code (OpenCV, onnxruntime) are not seen; those read inside declared folders."""
    global _OPENED
    from pipeline.cli import app

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in TINY.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    champion = tmp_path / params["gate"]["champion"]  # a promoted champion, so the gate reads the pointer
    champion.parent.mkdir(parents=True)
    champion.write_text(json.dumps({"version": "v1", "metrics": {"map50": 0.0}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DETFLOW_NO_PROGRESS", "1")
    sys.addaudithook(_audit)  # stays installed; records only while _OPENED is a list
    undeclared: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    for stage, spec in yaml.safe_load(DVC_YAML.read_text())["stages"].items():
        before = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
        _OPENED = []
        try:
            app(shlex.split(spec["cmd"])[1:], standalone_mode=False)
        finally:
            opened, _OPENED = _OPENED, None
        reads = set()
        for path, mode in opened:
            full = Path(path) if os.path.isabs(path) else tmp_path / path
            rel = os.path.relpath(os.path.realpath(full), os.path.realpath(tmp_path))
            if rel.startswith("..") or any(c in mode for c in "wax+") or Path(rel).as_posix() not in before:
                continue
            reads.add(Path(rel).as_posix())
        allowed = ("params.yaml", *lineage.DATA_INPUTS[stage], *lineage.NOT_DEPS.get(stage, {}))
        seen[stage] = reads
        undeclared[stage] = sorted(r for r in reads if not any(r == a or r.startswith(a + "/") for a in allowed))
    assert undeclared == {stage: [] for stage in undeclared}
    # the reads the issue named are real: export reads the training summary, evaluate the champion pointer
    assert "reports/train/summary.json" in seen["export"]
    assert params["gate"]["champion"] in seen["evaluate"]
    assert any(r.startswith("data/prepared/") for r in seen["infer"])
