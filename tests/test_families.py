"""The model-family contract: every registered family trains, loads for inference, exports with parity and serves
through the ONNX engine the same way; nothing outside ``pipeline/families/`` branches on a family's name."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO

from pipeline.config import load_params
from pipeline.errors import ConfigError, DetflowError
from pipeline.families import FAMILIES, get_family

# One tiny epoch at 64 px from scratch; gates at 0 and a loose parity limit so every family reaches export.
TINY = ["train.imgsz=64", "train.batch=8", "train.nominal_batch=8", "train.workers=0", "train.augment.mosaic=false",
        "train.epochs=1", "train.pretrained=none", "train.device=cpu", "evaluate.bootstrap=0", "gate.min_map50=0",
        "gate.min_cpm=0", "gate.min_sensitivity_at_1fp=0", "evaluate.conf=0.01", "evaluate.preview_images=0"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, small_phantom: Path) -> Path:
    from pipeline.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("families")
    prepare_dataset(load_params(None, TINY), root / "prepared", root / "data_validation.json",
                    phantom_dir=small_phantom, progress=False)
    return root / "prepared"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_contract(name: str, prepared: Path, tmp_path: Path) -> None:
    """train one epoch -> load for inference -> export -> parity -> engine prediction, for every family."""
    from PIL import Image

    from pipeline.evaluate import evaluate_model
    from pipeline.evaluate.predict import TorchDetector
    from pipeline.export import export_model
    from pipeline.infer import OnnxDetector
    from pipeline.train import train_model

    family = FAMILIES[name]
    params = load_params(None, [*TINY, f"train.family={name}", f"export.{name}.max_map_delta=1.0"])
    assert params.train.model == family.default_model
    torch.set_num_threads(2)
    result = train_model(params, prepared, tmp_path / "models" / "train", tmp_path / "reports" / "train",
                         tmp_path / "work", mirrors=[], progress=False)
    assert result.family == name and result.epochs_run == 1 and result.best.is_file()

    detector = TorchDetector.load(result.best)  # the one checkpoint format: header with what inference needs
    assert detector.family is family and detector.meta.family == name and detector.imgsz == 64
    assert detector.classes == ["nodule"] and detector.meta.model == family.default_model

    evaluate_model(params, result.best, prepared, tmp_path / "reports", progress=False)
    exported = export_model(params, result.best, prepared, tmp_path / "reports", tmp_path / "models")
    card = exported.card
    assert card["family"] == name and card["opset"] == params.export.of(name).opset
    assert card["output"] == family.card_output(["nodule"])
    parity = json.loads((tmp_path / "reports" / "parity.json").read_text())
    assert parity["passed"] and parity["max_map_delta"] == 1.0 and parity["delta"] <= 0.02
    assert parity["n_images"] > 0

    engine = OnnxDetector(exported.model, providers="CPUExecutionProvider")
    assert engine.model_family is family and engine.classes == ["nodule"]
    test = json.loads((prepared / "coco" / "test.json").read_text())["images"][:3]
    rgbs = [np.asarray(Image.open(prepared / e["file_name"]).convert("RGB")) for e in test]
    onnx_dets, torch_dets = engine.predict(rgbs, conf=0.01), detector.predict(rgbs, conf=0.01)
    assert len(onnx_dets) == len(torch_dets) == len(rgbs)
    for o, t in zip(onnx_dets, torch_dets, strict=True):
        assert o.boxes.shape == (len(o), 4) and o.labels.dtype == np.int64
        assert set(o.labels.tolist()) <= {0}
        if len(o) and len(t):  # the top box agrees to a pixel
            assert np.abs(o.boxes[0] - t.boxes[0]).max() < 1.0 and abs(o.scores[0] - t.scores[0]) < 1e-3


def test_no_family_name_comparisons_outside_the_family_modules() -> None:
    """A third family must not fall through an `else` written for another one."""
    pattern = re.compile(r"""(==|!=)\s*["'](yolo|frcnn)["']|["'](yolo|frcnn)["']\s*(==|!=)"""
                         r"""|\bin\s*[\(\[\{][^)\]\}]*["'](yolo|frcnn)["']""")
    offenders = []
    for path in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "flows").rglob("*.py")]:
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("pipeline/families/"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []
    assert pattern.search('if family == "yolo":') and pattern.search('family in ("yolo", "frcnn")')


def test_config_validates_family_and_model_against_the_registry() -> None:
    with pytest.raises(ConfigError, match=r"unknown model family 'yolo5'; expected one of: frcnn, yolo"):
        load_params(None, ["train.family=yolo5"])
    with pytest.raises(ConfigError, match=r"unknown model 'yolov5n' for family 'frcnn'; expected one of: fasterrcnn"):
        load_params(None, ["train.family=frcnn", "train.model=yolov5n"])
    with pytest.raises(ConfigError, match=r"export.opset_frcnn: unknown key"):
        load_params(None, ["export.opset_frcnn=17"])
    p = load_params(None, ["train.family=frcnn", "export.frcnn.opset=16"])
    assert p.train.model == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert p.export.of("frcnn").opset == 16 and p.export.of("yolo").opset == 18
    with pytest.raises(ConfigError, match="expected one of: frcnn, yolo"):
        get_family("retinanet")


def test_registry_entries_are_complete() -> None:
    from pipeline import assets

    for name, family in FAMILIES.items():
        assert family.name == name and family.default_model in family.models
        for model, asset in family.coco_assets.items():
            assert model in family.models and asset in assets.ASSETS, (name, model)
        defaults = family.export_params()
        assert 11 <= defaults.opset <= 23 and 0 <= defaults.max_map_delta <= 1


def test_frcnn_coco_assets_match_torchvision() -> None:
    from pipeline import assets
    from pipeline.families.frcnn.model import coco_weights_url

    for model, name in FAMILIES["frcnn"].coco_assets.items():
        a = assets.ASSETS[name]
        assert a.url == coco_weights_url(model)  # the URL of torchvision's COCO_V1 enum
        assert a.sha256_prefix and Path(a.url).name.split("-")[-1].startswith(a.sha256_prefix)
        assert a.verifiable and not a.pinned and a.mirror_path == f"weights/{Path(a.url).name}"


def test_assets_list_shows_the_faster_rcnn_weights(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "assets", "list", "--raw-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("fasterrcnn_mobilenet_v3_large_fpn-coco", "fasterrcnn_mobilenet_v3_large_320_fpn-coco",
                 "fasterrcnn_resnet50_fpn_v2-coco"):
        assert name in proc.stdout
    assert "https://download.pytorch.org/models/fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth" in proc.stdout


def _save(path: Path, obj: Any) -> Path:
    torch.save(obj, path)
    return path


def test_checkpoint_without_header_fields_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """No silent defaults: a checkpoint that does not record its input size is refused, by name."""
    from pipeline.evaluate.predict import TorchDetector

    no_size = _save(tmp_path / "no_size.pt", {"detflow": {"family": "yolo", "model": "yolov5n", "classes": ["a"]},
                                              "model": {}})
    with pytest.raises(DetflowError, match=f"model checkpoint {re.escape(str(no_size))}: .*lacks imgsz"):
        TorchDetector.load(no_size)
    bare = _save(tmp_path / "bare.pt", {"model": {}, "train_args": {}})
    with pytest.raises(DetflowError, match=f"model checkpoint {re.escape(str(bare))} has no detflow header"):
        TorchDetector.load(bare)
    alien = _save(tmp_path / "alien.pt", {"detflow": {"family": "retinanet", "model": "r", "classes": ["a"],
                                                      "imgsz": 64}})
    with pytest.raises(DetflowError, match="family 'retinanet'; this detflow knows: frcnn, yolo"):
        TorchDetector.load(alien)


def test_the_registry_and_inference_loading_import_no_training_code(tmp_path: Path) -> None:
    """The serving side imports only torch-free family parts; loading a model for scoring imports no trainer."""
    code = ("import sys, pipeline.families, pipeline.infer.engine; "
            "bad = [m for m in ('torch', 'ultralytics', 'pipeline.config', 'pipeline.train') if m in sys.modules]; "
            "print(bad)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr

    from pipeline.families.base import CheckpointMeta
    from pipeline.families.frcnn.model import build_frcnn

    model = build_frcnn("fasterrcnn_mobilenet_v3_large_320_fpn", 2, 64)
    meta = CheckpointMeta("frcnn", "fasterrcnn_mobilenet_v3_large_320_fpn", ["nodule"], 64)
    ckpt = _save(tmp_path / "m.pt", {"detflow": meta.to_dict(), "model": model.state_dict()})
    code = ("import sys; from pipeline.evaluate.predict import TorchDetector; "
            f"d = TorchDetector.load({str(ckpt)!r}); "
            "print(d.family.name, [m for m in sys.modules if m.startswith(('pipeline.train', "
            "'pipeline.families.frcnn.train', 'pipeline.families.frcnn.loop', 'pipeline.families.frcnn.data'))])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "frcnn []", proc.stdout + proc.stderr
