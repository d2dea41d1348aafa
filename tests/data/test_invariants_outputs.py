"""No command writes, moves or deletes anything it did not create (issue 20): an output that is, contains or lies
inside an input, outputs that overlap each other, and folders someone else filled are refused before any work,
for every command with an output path. Generated over commands x relations (same path, inside, around, through a
link, through ``..``, a foreign folder); each variant checks the exit code, the one ``error:`` line, and that every
input tree is byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import REPO, TINY_EXPORT
from test_hostile_data import _image

from pipeline.cli import run as detflow


def _tree(root: Path) -> dict[str, str]:
    """path -> sha256 (or 'dir' / 'link:target') of everything under root."""
    if not root.exists() and not root.is_symlink():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = f"link:{os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else \
            hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Project:
    """A scratch project: a source dataset, a prepared dataset, a checkpoint, an exported model, evaluation
    reports and a folder of someone else's files."""

    def __init__(self, tmp: Path, exported: dict[str, Path]) -> None:
        self.root = tmp
        self.src = tmp / "src"
        for i in range(8):
            _image(self.src / "images" / f"s{i}.png", seed=i, size=(32, 24))
        (self.src / "coco.json").write_text(json.dumps({
            "images": [{"id": i + 1, "file_name": f"s{i}.png", "patient_id": f"P{i}"} for i in range(8)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 8, 8]}
                            for i in range(8)],
            "categories": [{"id": 1, "name": "nodule"}]}))
        self.prep = tmp / "data" / "prepared"
        shutil.copytree(exported["prepared"], self.prep)
        self.ckpt = tmp / "models" / "train" / "best.pt"
        self.ckpt.parent.mkdir(parents=True)
        shutil.copy(exported["best"], self.ckpt)
        self.models = tmp / "models"
        for f in exported["onnx"].parent.iterdir():  # the exported model folder as it is (links and all)
            if f.name != "train":
                dst = self.models / f.name
                if f.is_symlink():
                    dst.symlink_to(os.readlink(f))
                elif f.is_dir():
                    shutil.copytree(f, dst, symlinks=True)
                else:
                    shutil.copy(f, dst)
        self.model = self.models / "model.onnx"
        self.reports = tmp / "reports"
        shutil.copytree(exported["reports"], self.reports)
        self.foreign = tmp / "someone"
        (self.foreign / "figures").mkdir(parents=True)
        (self.foreign / "figures" / "holiday.png").write_bytes(b"\x89PNG not ours")
        (self.foreign / "current").mkdir()
        (self.foreign / "current" / "notes.txt").write_text("mine\n")
        (self.foreign / "thesis.tex").write_text("\\documentclass{article}\n")
        (tmp / "alias").symlink_to(self.src)
        (tmp / "params.yaml").write_text((REPO / "params.yaml").read_text())

    def inputs(self) -> dict[str, dict[str, str]]:
        return {name: _tree(p) for name, p in (("src", self.src), ("prep", self.prep), ("models", self.models),
                                              ("reports", self.reports), ("foreign", self.foreign))}


TINY_TRAIN = [a for s in TINY_EXPORT if s.startswith("train.") for a in ("--set", s)] + ["--set", "train.device=cpu"]

# name -> argv builder; every one must be refused before any work
CASES: dict[str, Callable[[Project], list[str]]] = {
    # prepare: its source dataset, its report, a foreign folder
    "prepare-out-is-source": lambda p: ["prepare", "--out", str(p.src), "--set", f"data.source={p.src}"],
    "prepare-out-inside-source": lambda p: ["prepare", "--out", str(p.src / "prepared"), "--set",
                                            f"data.source={p.src}"],
    "prepare-out-contains-source": lambda p: ["prepare", "--out", str(p.root), "--set", f"data.source={p.src}"],
    "prepare-out-via-link": lambda p: ["prepare", "--out", str(p.root / "alias" / "prepared"), "--set",
                                       f"data.source={p.src}"],
    "prepare-out-via-dotdot": lambda p: ["prepare", "--out", str(p.src / "images" / ".."), "--set",
                                         f"data.source={p.src}"],
    "prepare-source-via-link": lambda p: ["prepare", "--out", str(p.src), "--set", f"data.source={p.root / 'alias'}"],
    "prepare-report-is-source-file": lambda p: ["prepare", "--out", str(p.root / "new"), "--report",
                                                str(p.src / "coco.json"), "--set", f"data.source={p.src}"],
    "prepare-report-inside-out": lambda p: ["prepare", "--out", str(p.root / "new"), "--report",
                                            str(p.root / "new" / "r.json"), "--set", f"data.source={p.src}"],
    "prepare-out-is-foreign": lambda p: ["prepare", "--out", str(p.foreign), "--set", f"data.source={p.src}"],
    "prepare-out-is-other-dataset": lambda p: ["prepare", "--out", str(p.root / "models"), "--set",
                                               f"data.source={p.src}"],
    # phantom: a folder it did not write
    "phantom-out-is-foreign": lambda p: ["phantom", "--out", str(p.foreign), "--set", "phantom.patients=1",
                                         "--set", "phantom.slices=1"],
    "phantom-out-contains-inputs": lambda p: ["phantom", "--out", str(p.root / "data"), "--set",
                                              "phantom.patients=1", "--set", "phantom.slices=1"],
    # train: into its dataset, or over a foreign folder's figures
    "train-out-is-data": lambda p: ["train", "--data", str(p.prep), "--out", str(p.prep), *TINY_TRAIN],
    "train-out-inside-data": lambda p: ["train", "--data", str(p.prep), "--out", str(p.prep / "w"), *TINY_TRAIN],
    "train-reports-inside-data": lambda p: ["train", "--data", str(p.prep), "--out", str(p.root / "w"),
                                            "--reports", str(p.prep / "r"), *TINY_TRAIN],
    "train-reports-is-foreign": lambda p: ["train", "--data", str(p.prep), "--out", str(p.root / "w"),
                                           "--reports", str(p.foreign), *TINY_TRAIN],
    # evaluate: reports into the dataset it scores
    "evaluate-reports-is-data": lambda p: ["evaluate", "--model", str(p.ckpt), "--data", str(p.prep), "--reports",
                                           str(p.prep), "--set", "evaluate.bootstrap=0"],
    "evaluate-reports-inside-data": lambda p: ["evaluate", "--model", str(p.ckpt), "--data", str(p.prep),
                                               "--reports", str(p.prep / "r"), "--set", "evaluate.bootstrap=0"],
    "evaluate-external-reports-inside-source": lambda p: ["evaluate", "--model", str(p.model), "--data", str(p.src),
                                                          "--format", "coco", "--reports", str(p.src / "r"),
                                                          "--set", "evaluate.bootstrap=0"],
    # export: into its dataset, over a foreign folder's `current`
    "export-out-is-data": lambda p: ["export", "--model", str(p.ckpt), "--data", str(p.prep), "--reports",
                                     str(p.reports), "--out", str(p.prep), *TINY_TRAIN],
    "export-out-inside-data": lambda p: ["export", "--model", str(p.ckpt), "--data", str(p.prep), "--reports",
                                         str(p.reports), "--out", str(p.prep / "m"), *TINY_TRAIN],
    "export-out-is-foreign": lambda p: ["export", "--model", str(p.ckpt), "--data", str(p.prep), "--reports",
                                        str(p.reports), "--out", str(p.foreign), *TINY_TRAIN],
    "export-parity-is-input": lambda p: ["export", "--model", str(p.ckpt), "--data", str(p.prep), "--reports",
                                         str(p.prep / "coco"), "--out", str(p.root / "m"), *TINY_TRAIN],
    # infer: into its source, over its own input
    "infer-out-is-source": lambda p: ["infer", str(p.src / "images"), "--model", str(p.model), "--out",
                                      str(p.src / "images")],
    "infer-out-inside-source": lambda p: ["infer", str(p.src), "--model", str(p.model), "--out", str(p.src / "p")],
    "infer-out-via-link": lambda p: ["infer", str(p.src), "--model", str(p.model), "--out",
                                     str(p.root / "alias" / "p")],
    "infer-overwrites-its-coco-source": lambda p: _predictions_as_source(p),
    "infer-render-into-source": lambda p: _rendered_source(p),
    "infer-coco-images-inside-out": lambda p: ["infer", str(p.prep / "coco" / "test.json"), "--model", str(p.model),
                                               "--out", str(p.prep)],
    # shift
    "shift-out-is-source": lambda p: ["shift", str(p.src / "images"), "--model", str(p.model), "--out",
                                      str(p.src / "images")],
    "shift-out-inside-source": lambda p: ["shift", str(p.src), "--model", str(p.model), "--out", str(p.src / "s")],
    # adapt: over the model it adapts, its source, a foreign folder
    "adapt-out-is-model-folder": lambda p: ["adapt", str(p.src / "images"), "--model", str(p.model), "--out",
                                            str(p.models / "current")],
    "adapt-out-contains-model": lambda p: ["adapt", str(p.src / "images"), "--model", str(p.model), "--out",
                                           str(p.models)],
    "adapt-out-is-source": lambda p: ["adapt", str(p.src / "images"), "--model", str(p.model), "--out",
                                      str(p.src / "images")],
    "adapt-out-is-foreign": lambda p: ["adapt", str(p.src / "images"), "--model", str(p.model), "--out",
                                       str(p.foreign)],
    # report: over its inputs, both outputs at one path
    "report-out-is-metrics": lambda p: ["report", "--reports", str(p.reports), "--data", str(p.prep), "--models",
                                        str(p.models), "--out", str(p.reports / "metrics.json")],
    "report-copy-is-card": lambda p: ["report", "--reports", str(p.reports), "--data", str(p.prep), "--models",
                                      str(p.models), "--out", str(p.root / "r.html"), "--model-copy",
                                      str(p.models / "model_card.json")],
    "report-copy-is-out": lambda p: ["report", "--reports", str(p.reports), "--data", str(p.prep), "--models",
                                     str(p.models), "--out", str(p.root / "r.html"), "--model-copy",
                                     str(p.root / "r.html")],
    "report-out-inside-data": lambda p: ["report", "--reports", str(p.reports), "--data", str(p.prep), "--models",
                                         str(p.models), "--out", str(p.prep / "r.html")],
}


def _predictions_as_source(p: Project) -> list[str]:
    """A COCO file that happens to be called predictions.json, inferred with --out its own folder."""
    out = p.src / "images"
    (out / "predictions.json").write_text((p.src / "coco.json").read_text())
    return ["infer", str(out / "predictions.json"), "--model", str(p.model), "--out", str(out)]


def _rendered_source(p: Project) -> list[str]:
    """The images to infer on live in a folder called rendered; --render --out its parent writes renders there."""
    shutil.copytree(p.src / "images", p.src / "rendered")
    return ["infer", str(p.src / "rendered"), "--model", str(p.model), "--out", str(p.src), "--render"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_that_touch_inputs_are_refused(case: str, tmp_path: Path, exported: dict[str, Path],
                                               capfd: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    project = Project(tmp_path, exported)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DETFLOW_NO_PROGRESS", "1")
    argv = CASES[case](project)
    before = project.inputs()
    rc = detflow([*argv, "--params", str(tmp_path / "params.yaml")] if argv[0] not in ("infer", "shift", "adapt")
                 else argv)
    _, err = capfd.readouterr()
    assert project.inputs() == before, f"{case}: an input changed"
    assert rc == 1, (case, rc, err[-2000:])
    assert err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err, err[-2000:]


def test_assets_fetch_never_replaces_the_mirror_it_copies_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capfd: pytest.CaptureFixture[str]) -> None:
    """A mirror that lies inside the asset's destination folder (raw dir = the mirror's parent) is refused: the
    atomic replacement of the destination would delete the mirror's copy."""
    from pipeline import assets

    payload = b"tiny weights\n"
    asset = assets.Asset(name="tiny-w", kind="file", url="https://example.invalid/tiny.pt",
                         sha256=hashlib.sha256(payload).hexdigest(), license="MIT", mirror_path="weights/tiny.pt",
                         description="a test asset")
    monkeypatch.setitem(assets.ASSETS, "tiny-w", asset)
    raw = tmp_path / "raw"
    mirror = raw / "tiny-w"  # the mirror root is the folder fetch replaces
    (mirror / "weights").mkdir(parents=True)
    (mirror / "weights" / "tiny.pt").write_bytes(payload)
    before = _tree(mirror)
    rc = detflow(["assets", "fetch", "tiny-w", "--raw-dir", str(raw), "--mirror", str(mirror), "--quiet"])
    _, err = capfd.readouterr()
    assert _tree(mirror) == before and rc == 1 and err.strip().startswith("error:"), err
