"""Every CLI command on bad input exits non-zero with one clear line and no traceback (issue 12).

Each case runs the real console script in a subprocess, in a scratch project with hostile inputs, and checks the
exit code (2: usage or params, 1: a bad input file or a failed stage), the message, that the output is one line
starting with ``error:`` and that no ``Traceback`` appears. Inputs and output locations are checked before any
work: the infer cases use a real (tiny, generated) ONNX model, so they fail on the input, not on the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, write_tiny_yolo_onnx

BIN = Path(sys.executable).with_name("detflow")
CLI = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "pipeline.cli"]


def _card(model: Path, **extra: object) -> dict:
    return {"family": "yolo", "classes": ["nodule"], "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
            "input": {"imgsz": 32, "stride": 0}, "postprocess": {"conf": 0.25, "nms_iou": 0.7, "max_det": 300},
            **extra}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch project: params, a stub prepared dataset and a passed gate (so that export and evaluate reach
    the model check), a real tiny model and one hostile input per case."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "somefile.txt").write_text("a file where a folder is expected\n")
    (root / "fake.onnx").write_text("not a model\n")
    (root / "corrupt.pt").write_bytes(bytes(range(256)) * 4)
    with zipfile.ZipFile(root / "full.pt", "w") as z:  # torch.save's format: a zip with archive/data.pkl
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 200)
    (root / "truncated.pt").write_bytes((root / "full.pt").read_bytes()[:300])
    (root / "notcoco.json").write_text(json.dumps({"info": {"description": "not a dataset"}}))
    (root / "badentry.json").write_text(json.dumps({"images": [{"id": 1}]}))
    (root / "list.txt").write_bytes(b"imgs/a.png\n\xff\xfe\n")
    (root / "bad.yaml").write_text(": [\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "latin1.yaml").write_bytes("train:\n  model: y\xf6lo\n".encode("latin-1"))
    (root / "imgs").mkdir()
    Image.new("RGB", (40, 30), (90, 90, 90)).save(root / "imgs" / "a.png")
    (root / "reports").mkdir()
    (root / "reports" / "gate.json").write_text(json.dumps({"passed": True}))
    coco = root / "data" / "prepared" / "coco"
    coco.mkdir(parents=True)
    (coco.parent / "prepare_info.json").write_text("{}")
    (coco / "test.json").write_text(json.dumps({"images": [], "annotations": [],
                                                "categories": [{"id": 1, "name": "nodule"}]}))
    (root / "registry").mkdir()
    tiny = root / "tiny" / "model.onnx"
    tiny.parent.mkdir()
    write_tiny_yolo_onnx(tiny)
    (tiny.parent / "model_card.json").write_text(json.dumps(_card(tiny)))
    for name, card in {"nocard": None, "badcard": "{not json", "listcard": "[1, 2]",
                       "badconf": json.dumps(_card(tiny, postprocess={"conf": 5})),
                       "notonnx": "match"}.items():
        d = root / name
        d.mkdir()
        if name == "notonnx":
            (d / "model.onnx").write_bytes(b"not an onnx graph")
            (d / "model_card.json").write_text(json.dumps(_card(d / "model.onnx")))
        else:
            shutil.copy(tiny, d / "model.onnx")
            if card is not None:
                (d / "model_card.json").write_text(card)
    return root


def detflow(ws: Path, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DETFLOW_NO_PROGRESS": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("DETFLOW_LOG", None)
    return subprocess.run([*CLI, *argv], cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)


TINY = ["--model", "tiny/model.onnx"]
# (argv, exit code, expected substring of the one error line)
CASES: list[tuple[list[str], int, str]] = [
    # usage errors: typer's own (vendored click) exceptions, exit 2
    (["prepare", "--bogus-flag"], 2, "No such option: --bogus-flag"),
    (["nosuchcmd"], 2, "No such command 'nosuchcmd'"),
    (["infer"], 2, "Missing argument 'source'"),
    (["registry", "promote"], 2, "Missing argument 'version'"),
    (["serve", "--port", "abc"], 2, "Invalid value for '--port'"),
    (["serve", "--workers", "0"], 2, "Invalid value for '--workers'"),
    (["infer", "imgs", "--workers", "-1"], 2, "Invalid value for '--workers'"),
    (["infer", "imgs", "--batch", "0"], 2, "Invalid value for '--batch'"),
    (["infer", "imgs", "--conf", "5"], 2, "conf must be a number in [0, 1], got 5.0"),
    (["infer", "imgs", "--conf", "-1"], 2, "conf must be a number in [0, 1], got -1.0"),
    (["infer", "imgs", "--conf", "nan"], 2, "conf must be a number in [0, 1], got nan"),
    # params and overrides, exit 2
    (["prepare", "--params", "missing.yaml"], 2, "params file missing.yaml does not exist"),
    (["prepare", "--params", "bad.yaml"], 2, "bad.yaml is not valid YAML (line "),
    (["prepare", "--params", "latin1.yaml"], 2, "latin1.yaml is not UTF-8 text"),
    (["prepare", "--params", "list.yaml"], 2, "list.yaml must hold a mapping of sections, got list"),
    (["prepare", "--set", "foo"], 2, "override 'foo' must look like section.key=value"),
    (["train", "--set", "train.epochs=abc"], 2, "invalid parameters"),
    (["flow", "run", "--set", "foo"], 2, "override 'foo' must look like section.key=value"),  # before Prefect starts
    # bad input files and output locations, exit 1
    (["export", "--model", "fake.onnx"], 1, "cannot read model checkpoint fake.onnx: not a PyTorch checkpoint"),
    (["export", "--model", "truncated.pt"], 1, "cannot read model checkpoint truncated.pt"),
    (["export", "--model", "missing.pt"], 1, "model checkpoint missing.pt not found"),
    (["export", "--model", "fake.onnx", "--out", "somefile.txt/models"], 1, "somefile.txt is a file"),
    (["evaluate", "--model", "corrupt.pt"], 1, "cannot read model checkpoint corrupt.pt"),
    (["evaluate", "--reports", "somefile.txt"], 1, "reports folder somefile.txt is a file"),
    (["infer", "notcoco.json", *TINY], 1, "notcoco.json is not a COCO dataset"),
    (["infer", "badentry.json", *TINY], 1, "images[0] is {\"id\": 1}"),
    (["infer", "list.txt", *TINY], 1, "list.txt is not a file list (one image path per line): not UTF-8"),
    (["infer", "nosuch", *TINY], 1, "inference source nosuch does not exist"),
    (["infer", "imgs", *TINY, "--out", "somefile.txt/sub"], 1, "cannot create output folder somefile.txt/sub: "
                                                              "somefile.txt is a file"),
    (["infer", "imgs", *TINY, "--out", "somefile.txt"], 1, "output folder somefile.txt is a file"),
    (["infer", "imgs", "--model", "missing.onnx"], 1, "model missing.onnx not found"),
    (["infer", "imgs", "--model", "nocard/model.onnx"], 1, "model card nocard/model_card.json not found"),
    (["infer", "imgs", "--model", "badcard/model.onnx"], 1, "model card badcard/model_card.json is not valid JSON"),
    (["infer", "imgs", "--model", "listcard/model.onnx"], 1, "is not a JSON object: it holds a JSON list"),
    (["infer", "imgs", "--model", "badconf/model.onnx"], 1, "conf must be a number in [0, 1], got 5"),
    (["infer", "imgs", "--model", "notonnx/model.onnx"], 1, "onnxruntime cannot load notonnx/model.onnx"),
    (["infer", "imgs", *TINY, "--providers", "bogus"], 1, "execution providers ['bogus'] are not available"),
    (["serve", "--model", "missing.onnx"], 1, "model missing.onnx not found"),
    (["prepare", "--out", "somefile.txt/x"], 1, "somefile.txt is a file"),
    (["prepare", "--report", "somefile.txt/r.json"], 1, "somefile.txt is a file"),
    (["train", "--data", "nosuchdir"], 1, "prepared dataset missing"),
    (["registry", "promote", "v999", "--root", "registry"], 1, "unknown model version v999"),
    (["assets", "fetch", "nosuch"], 1, "unknown asset 'nosuch'"),
    (["flow", "run", "--repo", "nosuchdir"], 1, "repository checkout nosuchdir is not a folder"),
    (["shift", "imgs", *TINY, "--alpha", "1.5"], 2, "alpha must be in (0, 1), got 1.5"),
    (["shift", "imgs", *TINY, "--permutations", "0"], 2, "Invalid value for '--permutations'"),
    (["shift", "nosuch", *TINY], 1, "inference source nosuch does not exist"),
    (["shift", "nocard", *TINY], 1, "no images in nocard: the shift test needs at least 8"),
    (["shift", "imgs", *TINY], 1, "has no 'embedding' output (exported before shift detection existed)"),
]


@pytest.mark.parametrize(("argv", "code", "expected"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_clear_line(ws: Path, argv: list[str], code: int, expected: str) -> None:
    r = detflow(ws, *argv)
    output = r.stdout + r.stderr
    assert "Traceback" not in output, output
    assert r.returncode == code, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: ") and expected in lines[0], output
    # one line; a params error may add indented details (one per invalid field)
    extra = lines[1:]
    if expected.endswith("invalid parameters"):
        assert len(extra) <= 6, output
    else:
        assert not extra, output


def test_help_and_a_good_run_exit_0(ws: Path) -> None:
    r = detflow(ws, "infer", "--help")
    assert r.returncode == 0 and "Usage" in r.stdout and "--conf" in r.stdout, r.stdout + r.stderr
    r = detflow(ws, "infer", "imgs", *TINY, "--out", "out", "--conf", "0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((ws / "out" / "predictions.json").read_text()) == []  # zero weights: no boxes
    assert "infer: 1 images, 0 detections, 0 skipped" in r.stdout


def test_engine_rejects_bad_thresholds(ws: Path) -> None:
    import numpy as np

    from pipeline.infer.engine import ModelLoadError, OnnxDetector

    det = OnnxDetector(ws / "tiny" / "model.onnx", providers="CPUExecutionProvider")
    assert det.conf == 0.25
    for bad in (5, -1, float("nan"), float("inf"), "0.5", None, True):
        with pytest.raises(ValueError, match=r"conf must be a number in \[0, 1\]"):
            det.conf = bad  # type: ignore[assignment]
        if bad is not None:  # predict(conf=None): the detector's own threshold
            with pytest.raises(ValueError, match=r"must be a number in \[0, 1\]"):
                det.predict([np.zeros((8, 8, 3), np.uint8)], conf=bad)  # type: ignore[arg-type]
    assert det.conf == 0.25
    det.conf = np.float32(0.5)  # numpy scalars are numbers too
    assert det.conf == 0.5 and det.predict([np.zeros((8, 8, 3), np.uint8)])[0].boxes.shape == (0, 4)
    with pytest.raises(ModelLoadError, match=r"malformed \(postprocess.conf: conf must be a number"):
        OnnxDetector(ws / "badconf" / "model.onnx", providers="CPUExecutionProvider")

# `detflow adapt` (issue 13): bad target images get one line before any model run (own list: CASES is bound above)
ADAPT_CASES: list[tuple[list[str], int, str]] = [
    (["adapt", "nosuch", *TINY, "--out", "adapted"], 1, "adapt source nosuch does not exist"),
    (["adapt", "registry", *TINY, "--out", "adapted"], 1, "no images in registry"),  # an empty folder
    (["adapt", "fake.onnx", *TINY, "--out", "adapted"], 1, "fake.onnx: 0 usable images, adapt needs at least 8; "
                                                           "1 could not be decoded"),  # all corrupt
    (["adapt", "imgs", *TINY, "--out", "adapted"], 1, "imgs: 1 usable images, adapt needs at least 8"),
    (["adapt", "imgs", *TINY, "--out", "tiny"], 1, "is the model's own folder"),
    (["adapt", "imgs", *TINY, "--out", "adapted", "--pixel-size", "-2"], 1, "--pixel-size must be a positive number"),
]


@pytest.mark.parametrize(("argv", "code", "expected"), ADAPT_CASES, ids=[" ".join(c[0]) for c in ADAPT_CASES])
def test_adapt_bad_input_is_one_clear_line(ws: Path, argv: list[str], code: int, expected: str) -> None:
    test_bad_input_is_one_clear_line(ws, argv, code, expected)
