"""External evaluation of DICOM sets honours PixelSpacing (issue 13): prepare keeps each image's spacing in the
COCO entry, and the ONNX scorer gets every image with the spacing its DICOM stated, so ``detflow evaluate --data``
scores what ``detflow infer``/``serve`` see on the same files, image by image.

Tiny and fast: two 64 px phantoms (site A at the training spacing 0.7 mm, site B at 0.5 mm) and a hand-made
YOLO-shaped graph (a 1x1 convolution, not trained) whose boxes depend on the pixels it is given, so a different
letterbox gives different detections.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_tiny_yolo_onnx

from pipeline.config import ExternalSetParams, Params, PhantomParams, load_params
from pipeline.data.imaging import pixel_spacing_of
from pipeline.data.phantom import generate_phantom
from pipeline.evaluate.external import evaluate_external, spacing_handling
from pipeline.evaluate.stage import Scorer, load_scorer
from pipeline.infer.engine import OnnxDetector
from pipeline.infer.processing import Detections, InputScaling

TRAIN_SPACING, SIZE = 0.7, 64


def _write_model(folder: Path) -> Path:
    """A dynamic-shape YOLO graph (1 class): a 1x1 conv maps each input pixel to a box (cx = 24 + 16 R, cy = 40 - 16 G,
    w = h = 8) scored B, so detections follow the letterboxed pixels. Its card records the training spacing."""
    w = np.zeros((5, 3, 1, 1), np.float32)
    w[0, 0], w[1, 1], w[4, 2] = 16.0, -16.0, 1.0
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    write_tiny_yolo_onnx(path, w, [24.0, 40.0, 8.0, 8.0, 0.0])
    card = {"family": "yolo", "classes": ["nodule"], "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "input": {"imgsz": SIZE, "stride": 32, "pixel_spacing": {"value": TRAIN_SPACING, "unit": "mm"}},
            "training_data": {"image_long_side_px": SIZE}}
    (folder / "model_card.json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_model(tmp_path_factory.mktemp("spacing-model"))


@pytest.fixture(scope="module")
def params() -> Params:
    return load_params(None, ["evaluate.bootstrap=0"])


@pytest.fixture(scope="module", params=[TRAIN_SPACING, 0.5], ids=["siteA-0.7mm", "siteB-0.5mm"])
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[float, Path]:
    """A DICOM + boxes.csv phantom (2 patients x 2 slices, 64 px, a nodule in every slice) at one spacing."""
    out = tmp_path_factory.mktemp("site") / "phantom"
    generate_phantom(PhantomParams(patients=2, slices=2, size=SIZE, seed=5, min_radius=3, max_radius=6,
                                   empty_fraction=0.0, pixel_spacing=request.param), out, progress=False)
    return request.param, out


def _same(a: Detections, b: Detections) -> bool:
    return a.boxes.shape == b.boxes.shape and np.allclose(a.boxes, b.boxes, atol=1e-4) \
        and np.allclose(a.scores, b.scores, atol=1e-6) and np.array_equal(a.labels, b.labels)


def test_external_dicom_scores_like_the_engine(site: tuple[float, Path], model: Path, params: Params,
                                               tmp_path: Path) -> None:
    spacing, raw = site
    scorer = load_scorer(model, params)
    seen: dict[bytes, tuple[float | None, Detections]] = {}  # pixels -> (spacing handed over, detections)

    def recording(rgbs: list[np.ndarray]) -> list[Detections]:
        dets = scorer.predict(rgbs)
        for rgb, d in zip(rgbs, dets, strict=True):
            seen[hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).digest()] = (pixel_spacing_of(rgb), d)
        return dets

    ext = ExternalSetParams(name="site", source=str(raw), format="dicom_csv", class_map={})
    metrics = evaluate_external(params, Scorer(recording, scorer.classes, scorer.info, scorer.scaling), ext,
                                tmp_path / "external" / "site", progress=False)

    engine = OnnxDetector(model, providers="CPUExecutionProvider")
    files = sorted((raw / "dicom").rglob("*.dcm"))
    assert len(files) == 4 and metrics["n_images"] == 4 and len(seen) == 4
    n_differ = 0
    for f in files:
        rgb = engine.decode(f).rgb  # as `detflow infer` and the service decode it: the spacing travels with it
        assert pixel_spacing_of(rgb) == pytest.approx(spacing)
        aware = engine.predict([rgb], conf=0.001, iou=params.evaluate.nms_iou)[0]
        blind = engine.predict([rgb.view(np.ndarray)], conf=0.001, iou=params.evaluate.nms_iou)[0]
        handed, scored = seen[hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).digest()]
        assert handed == pytest.approx(spacing), f"{f.name}: scored without its PixelSpacing"
        assert len(aware) > 0 and _same(scored, aware), f"{f.name}: external evaluation differs from the engine"
        n_differ += not _same(aware, blind)
    if spacing == TRAIN_SPACING:
        assert n_differ == 0  # at the training spacing the letterbox is the plain one
    else:
        assert n_differ == len(files)  # at 0.5 mm each image is letterboxed to 64 x 0.5 / 0.7 = 46 px

    written = json.loads((tmp_path / "external" / "site" / "metrics.json").read_text())
    ps = written["pixel_spacing"]
    assert {k: ps[k] for k in ("source", "train", "median", "applied", "n_images", "n_without")} == {
        "source": "dicom", "train": TRAIN_SPACING, "median": spacing, "applied": True, "n_images": 4,
        "n_without": 0}


def test_spacing_record_says_when_scoring_is_spacing_blind() -> None:
    images = [{"pixel_spacing": 0.5}, {"pixel_spacing": 0.5}, {}]
    checkpoint = spacing_handling(images, Scorer(lambda r: [], ["nodule"], {}, scaling=None))
    assert checkpoint["applied"] is False and checkpoint["train"] is None and checkpoint["source"] == "dicom"
    assert (checkpoint["median"], checkpoint["n_images"], checkpoint["n_without"]) == (0.5, 2, 1)
    assert checkpoint["preprocessing"].startswith("spacing-blind: a checkpoint")
    no_train = spacing_handling(images, Scorer(lambda r: [], ["nodule"], {}, scaling=InputScaling()))
    assert no_train["applied"] is False and "card records no training pixel spacing" in no_train["preprocessing"]
    aware = InputScaling(train_spacing=0.7, train_long_side=64)
    pngs = spacing_handling([{}, {}], Scorer(lambda r: [], ["nodule"], {}, scaling=aware))
    assert (pngs["source"], pngs["applied"], pngs["median"], pngs["train"]) == (None, False, None, 0.7)
