"""`detflow adapt` (issue 13): pixel-spacing-aware pre-processing, object-scale calibration, the adapted card."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.adapt import (
    COARSE_GRID,
    FINE_STEP,
    AdaptError,
    choose_scale,
    distribution,
    predicted_sizes,
    training_object_sizes,
)
from pipeline.infer.processing import InputScaling, preprocess, target_size
from pipeline.matching import off_edge

BIN = Path(sys.executable).with_name("detflow")
CLI = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "pipeline.cli"]

# ------------------------------------------------------------------------------------------ selection logic


class SizeSelectiveDetector:
    """A detector model for the selection logic: a site's objects have true sizes (image pixels); at input scale
    ``s`` they cover ``size x s x imgsz / long side`` model pixels, and, like a network trained at one scale, the
    detector finds only objects within [0.5, 2] x its training median there (so a wrong scale both shifts the sizes
    and thins the detections, the selection bias the guards are for)."""

    def __init__(self, true_sizes: np.ndarray, ratio: float, train_median: float) -> None:
        self.true_sizes, self.ratio, self.train_median = true_sizes, ratio, train_median
        self.calls: list[float] = []

    def __call__(self, s: float) -> dict[str, np.ndarray]:
        self.calls.append(s)
        model_px = self.true_sizes * s * self.ratio
        keep = (model_px > 0.5 * self.train_median) & (model_px < 2.0 * self.train_median)
        return {"cell": model_px[keep], "other": np.array([])}


def _reference(seed: int = 0, median: float = 20.0) -> tuple[dict, np.ndarray]:
    train = np.random.default_rng(seed).lognormal(math.log(median), 0.15, 400)
    return distribution({"cell": train, "other": np.array([])}), train


@pytest.mark.parametrize(("magnification", "expected"), [(1.0, 1.0), (1.6, 1 / 1.6), (0.6, 1 / 0.6)])
def test_choose_scale_undoes_a_magnification(magnification: float, expected: float) -> None:
    reference, _ = _reference()
    ratio = 64 / 512  # model pixels per image pixel at scale 1
    # the new site: the same objects (a fresh draw), magnification x larger in image pixels
    true = np.random.default_rng(1).lognormal(math.log(20.0 / ratio), 0.15, 300) * magnification
    det = SizeSelectiveDetector(true, ratio, 20.0)
    choice = choose_scale(det, reference)
    assert abs(math.log(choice.scale / expected)) <= math.log(FINE_STEP) + 1e-9, choice
    if magnification == 1.0:
        assert choice.scale == 1.0 and choice.scores[1.0]["distance"] < 0.05
    assert set(COARSE_GRID) <= set(choice.scores) and len(choice.scores) <= len(COARSE_GRID) + 4


def test_choose_scale_keeps_one_within_the_margin_and_respects_fixed_inputs() -> None:
    reference, _ = _reference()
    ratio = 64 / 512
    true = np.random.default_rng(2).lognormal(math.log(20.0 / ratio), 0.15, 300) * 1.04  # 4 %: not a site change
    assert choose_scale(SizeSelectiveDetector(true, ratio, 20.0), reference).scale == 1.0
    small = np.random.default_rng(3).lognormal(math.log(20.0 / ratio), 0.15, 300) * 0.6
    fixed = choose_scale(SizeSelectiveDetector(small, ratio, 20.0), reference, max_scale=1.0)
    assert fixed.scale == 1.0 and max(fixed.scores) == 1.0  # a fixed-shape model cannot be magnified


def test_choose_scale_without_detections_is_one_clear_error() -> None:
    reference, _ = _reference()
    with pytest.raises(AdaptError, match="fewer than 5 confident detections of every class at every input scale"):
        choose_scale(lambda s: {"cell": np.array([10.0, 11.0])}, reference)


# ------------------------------------------------------------------------------------------ pre-processing


def test_objects_cut_by_the_frame_are_left_out_of_both_size_distributions(tmp_path: Path) -> None:
    # a box touching the edge shows the frame, not its object's size: 72 % of the x1.6 BCCD copy's boxes did
    assert off_edge(np.array([[0, 10, 20, 30], [5, 5, 20, 20], [5, 5, 100, 20], [2, 2, 98, 98.0]]), 100, 100
                    ).tolist() == [False, True, False, True]
    (tmp_path / "coco").mkdir()
    doc = {"images": [{"id": 1, "width": 200, "height": 100}],
           "annotations": [{"image_id": 1, "category_id": 1, "bbox": [50, 20, 20, 20]},   # inside: 20 px -> 10
                           {"image_id": 1, "category_id": 1, "bbox": [0, 20, 8, 20]},     # cut by the left edge
                           {"image_id": 1, "category_id": 1, "bbox": [150, 60, 50, 40]}]}  # touches two edges
    (tmp_path / "coco" / "train.json").write_text(json.dumps(doc))
    rec = training_object_sizes(tmp_path, ["cell"], imgsz=100)
    assert rec["per_class"]["cell"]["n"] == 1 and rec["per_class"]["cell"]["median_px"] == pytest.approx(10.0)

    class Dets:
        boxes = np.array([[50, 20, 70, 40], [0, 20, 8, 40], [150, 60, 200, 100.0]])
        labels = np.array([0, 0, 0])

    class Detector:
        classes, imgsz, scaling, stride = ["cell"], 100, None, 32

        def predict(self, images: list, conf: float) -> list:
            return [Dets() for _ in images]

    sizes = predicted_sizes(Detector(), [np.zeros((100, 200, 3), np.uint8)] * 2, conf=0.25)
    assert sizes["cell"].tolist() == pytest.approx([10.0, 10.0])


def test_scaling_sets_the_letterbox_target() -> None:
    im = np.full((480, 640, 3), 100, np.uint8)
    batch, (meta,) = preprocess([im], 416, stride=32)
    assert batch.shape == (1, 3, 320, 416) and meta.scale == pytest.approx(416 / 640)
    half = InputScaling(scale=0.5)
    batch, (meta,) = preprocess([im], 416, stride=32, scaling=half)
    # 208 is rounded to the stride (224), so the long side fills the canvas: no grey border beside it
    assert batch.shape == (1, 3, 192, 224) and meta.scale == pytest.approx(224 / 640) and meta.pad_x == 0
    batch, (meta,) = preprocess([im], 416, stride=32, scaling=InputScaling(scale=1.5))
    assert batch.shape == (1, 3, 480, 640) and meta.scale == pytest.approx(640 / 640)  # 624 -> 640
    sq = np.full((256, 256, 3), 100, np.uint8)
    for s in (0.69, 0.728, 0.75, 0.769):  # the bordered scales: every one fills its canvas now
        batch, (meta,) = preprocess([sq], 416, stride=32, scaling=InputScaling(scale=s))
        assert batch.shape[2] == batch.shape[3] == round(416 * s / 32) * 32 and meta.pad_x == meta.pad_y == 0
    # a fixed square input (Faster R-CNN): smaller inside the same input; magnification capped at 1
    batch, (meta,) = preprocess([im], 256, stride=0, scaling=half)
    assert batch.shape == (1, 3, 256, 256) and meta.scale == pytest.approx(128 / 640)
    assert target_size(im, 256, InputScaling(scale=1.5), fixed=True) == 256


def test_physical_factor_from_the_image_spacing() -> None:
    from pipeline.data.imaging import with_spacing

    card = {"input": {"pixel_spacing": {"value": 0.7, "unit": "mm"}}, "training_data": {"image_long_side_px": 512}}
    scaling = InputScaling.from_card(card)
    plain = np.zeros((512, 512, 3), np.uint8)
    assert target_size(plain, 64, scaling, fixed=False) == 64  # no spacing stated: letterboxed as in training
    assert target_size(with_spacing(plain, 0.7), 64, scaling, fixed=False) == 64
    assert target_size(with_spacing(plain, 0.704), 64, scaling, fixed=False) == 64  # within 1 %
    site_b = with_spacing(plain, 0.5)
    assert target_size(site_b, 64, scaling, fixed=False) == round(64 * 0.5 / 0.7)
    assert target_size(site_b[:256], 64, scaling, fixed=False) == round(64 * 0.5 / 0.7)  # a crop keeps its spacing
    wide = with_spacing(np.zeros((512, 1024, 3), np.uint8), 0.7)  # twice the field of view at the same spacing
    assert target_size(wide, 64, scaling, fixed=False) == 128
    adapted = InputScaling.from_card({**card, "adaptation": {"input_scale": 0.8, "pixel_size": 0.35}})
    assert target_size(plain, 64, adapted, fixed=False) == round(64 * 0.8 * 0.5)  # --pixel-size for unstated
    assert target_size(site_b, 64, adapted, fixed=False) == round(64 * 0.8 * 0.5 / 0.7)  # the file's own first
    for bad in ({"adaptation": {"input_scale": 0}}, {"adaptation": {"input_scale": 9.0}},
                {"adaptation": {"pixel_size": "x"}}, {"adaptation": [1]}):
        with pytest.raises(ValueError):
            InputScaling.from_card(bad)
    assert InputScaling.from_card({}).identity


# ------------------------------------------------------------------------------------------ card and command


def _adapt(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env_extra = {"DETFLOW_NO_PROGRESS": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    import os

    return subprocess.run([*CLI, "adapt", *map(str, argv)], cwd=cwd, env={**os.environ, **env_extra},
                          capture_output=True, text=True, timeout=300)


def test_card_records_training_sizes_and_spacing(exported: dict[str, Path]) -> None:
    card = json.loads(exported["card"].read_text())
    info = json.loads((exported["prepared"] / "prepare_info.json").read_text())
    assert info["pixel_spacing"]["median"] == pytest.approx(0.7) and info["pixel_spacing"]["n_without"] == 0
    assert card["input"]["pixel_spacing"]["value"] == pytest.approx(0.7)
    assert card["input"]["pixel_spacing"]["unit"] == "mm"
    coco = json.loads((exported["prepared"] / "coco" / "train.json").read_text())
    long_side = max(coco["images"][0]["width"], coco["images"][0]["height"])
    assert card["training_data"]["image_long_side_px"] == long_side
    sizes = [math.sqrt(a["bbox"][2] * a["bbox"][3]) * 64 / long_side for a in coco["annotations"]]
    nodule = card["training_data"]["object_sizes"]["per_class"]["nodule"]
    assert nodule["n"] == len(sizes) > 0
    assert nodule["median_px"] == pytest.approx(float(np.median(sizes)), abs=1e-3)
    assert nodule["quantiles_px"][0] == pytest.approx(float(np.quantile(sizes, 0.05)), abs=1e-3)


def test_adapt_site_b_dicom_uses_the_pixel_spacing(exported: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.config import PhantomParams
    from pipeline.data.imaging import decode_path
    from pipeline.data.phantom import generate_phantom
    from pipeline.infer.batch import run_batch
    from pipeline.infer.engine import OnnxDetector

    site_b = tmp_path / "site_b"
    generate_phantom(PhantomParams(patients=2, slices=4, seed=11, pixel_spacing=0.5), site_b, progress=False)
    r = _adapt(site_b, "--model", exported["onnx"], "--out", tmp_path / "adapted", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "adapt: pixel_spacing, input scale 1 on 8 images (0 skipped)" in r.stdout
    card = json.loads((tmp_path / "adapted" / "model_card.json").read_text())
    a = card["adaptation"]
    assert a["method"] == "pixel_spacing" and a["input_scale"] == 1.0 and a["n_images"] == 8
    assert len(a["target_fingerprint"]) == 64 and a["base_model"]["sha256"] == card["sha256"]
    assert (tmp_path / "adapted" / "model.onnx").read_bytes() == exported["onnx"].read_bytes()
    engine = OnnxDetector(tmp_path / "adapted" / "model.onnx", providers="CPUExecutionProvider")
    dcm = sorted(site_b.rglob("*.dcm"))[0]
    rgb = engine.decode(dcm).rgb
    assert decode_path(dcm).pixel_spacing == pytest.approx(0.5)
    long_side = card["training_data"]["image_long_side_px"]
    assert target_size(rgb, 64, engine.scaling, fixed=False, stride=engine.stride) == \
        max(1, round(64 * 0.5 * max(rgb.shape[:2]) / (0.7 * long_side) / 32)) * 32  # to the stride
    train_dcm = sorted(exported["phantom"].rglob("*.dcm"))[0]  # site A: exactly as in training
    assert target_size(engine.decode(train_dcm).rgb, 64, engine.scaling, fixed=False, stride=engine.stride) == 64
    summary = run_batch(engine, site_b, tmp_path / "pred", batch=4, progress=False)  # batch infer reads the card
    assert summary.n_images == 8 and not summary.errors
    # adapting the adapted model adapts the base again (no adaptation stacked on another)
    r = _adapt(site_b, "--model", tmp_path / "adapted" / "model.onnx", "--out", tmp_path / "again", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    again = json.loads((tmp_path / "again" / "model_card.json").read_text())["adaptation"]
    assert again["target_fingerprint"] == a["target_fingerprint"]


def test_adapt_pixel_size_for_images_without_tags(exported: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.infer.engine import OnnxDetector

    images = exported["prepared"] / "images"
    r = _adapt(images, "--model", exported["onnx"], "--out", tmp_path / "a", "--pixel-size", "0.35", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    a = json.loads((tmp_path / "a" / "model_card.json").read_text())["adaptation"]
    assert a["method"] == "pixel_size" and a["pixel_size"] == 0.35
    assert a["parameters"]["train_pixel_size"] == pytest.approx(0.7)
    engine = OnnxDetector(tmp_path / "a" / "model.onnx", providers="CPUExecutionProvider")
    png = engine.decode(sorted(images.rglob("*.png"))[0]).rgb
    assert target_size(png, 64, engine.scaling, fixed=False, stride=engine.stride) == 32  # half the field of view
    # the adapted folder is a whole model: the shift test's reference (and its patients) come with it
    ref = engine.embedding_reference()
    assert ref.shape == OnnxDetector(exported["onnx"], providers="CPUExecutionProvider").embedding_reference().shape
    groups = engine.embedding_reference_groups(len(ref))
    assert groups is not None and len(groups) == len(ref)


def test_adapt_leaves_an_unshifted_site_unchanged_and_says_so(exported: dict[str, Path], tmp_path: Path) -> None:
    """The training site's own images: the shift test finds no shift, so no scale is searched, the adapted folder
    is the base model at input scale 1, and both the output and the card say why."""
    from pipeline.infer.engine import OnnxDetector

    images = exported["prepared"] / "images"
    r = _adapt(images, "--model", exported["onnx"], "--out", tmp_path / "a", "--conf", "0.01", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    a = json.loads((tmp_path / "a" / "model_card.json").read_text())["adaptation"]
    assert a["method"] == "object_scale" and a["changed"] is False and a["input_scale"] == 1.0
    assert a["shift"]["tested"] and not a["shift"]["shifted"] and a["shift"]["p_value"] >= 0.05
    assert a["scores"] is None and a["criterion"] is None  # nothing searched
    assert a["reason"].startswith("the shift test finds no shift from the training images (p = ")
    assert r.stdout.startswith("adapt: object_scale: model unchanged (input scale 1) on 24 images (0 skipped): "
                               "the shift test finds no shift")
    assert (tmp_path / "a" / "model.onnx").read_bytes() == exported["onnx"].read_bytes()
    adapted = OnnxDetector(tmp_path / "a" / "model.onnx", providers="CPUExecutionProvider").scaling
    assert adapted == OnnxDetector(exported["onnx"], providers="CPUExecutionProvider").scaling  # the base's


def test_stride_grid_holds_every_canvas_once() -> None:
    from pipeline.adapt import stride_grid

    grid = stride_grid(416, 32)
    assert grid[0] == round(7 * 32 / 416, 4) and grid[-1] == 2.0 and 1.0 in grid and len(grid) == 20
    sq = np.zeros((256, 256, 3), np.uint8)
    targets = [target_size(sq, 416, InputScaling(scale=s), fixed=False, stride=32) for s in grid]
    assert targets == [32 * k for k in range(7, 27)]  # each stride multiple once, none skipped
    assert stride_grid(64, 32) == (0.5, 1.0, 1.5, 2.0)


def test_guard_keeps_one_unless_shifted_and_decisive() -> None:
    from pipeline.adapt import ScaleChoice, guarded_scale

    shifted = {"tested": True, "shifted": True, "p_value": 0.001, "alpha": 0.05}
    calm = {"tested": True, "shifted": False, "p_value": 0.4, "alpha": 0.05}
    untested = {"tested": False, "reason": "no embeddings"}
    pick = ScaleChoice(scale=0.7, scores={})
    assert guarded_scale(shifted, pick, {"decisive": True, "share_closer": 1.0}) == (0.7, None)
    assert guarded_scale(untested, pick, {"decisive": True, "share_closer": 0.99}) == (0.7, None)
    scale, why = guarded_scale(calm, None, None)
    assert scale == 1.0 and why.startswith("the shift test finds no shift from the training images (p = 0.4")
    scale, why = guarded_scale(shifted, pick, {"decisive": False, "share_closer": 0.81})
    assert scale == 1.0 and why == ("the size criterion cannot tell input scale 0.7 from 1: it is closer to the "
                                    "training sizes in 81% of bootstrap resamples of the images (needs 95%); the "
                                    "model is left unchanged")
    scale, why = guarded_scale(shifted, ScaleChoice(scale=1.0, scores={}), None)
    assert scale == 1.0 and why.startswith("the site is shifted, but no input scale matches")


def test_criterion_confidence_tells_a_real_size_change_from_noise() -> None:
    from pipeline.adapt import criterion_confidence

    reference, _ = _reference(median=20.0)
    rng = np.random.default_rng(1)

    def images(median: float, n: int = 32) -> list[dict[str, np.ndarray]]:
        return [{"cell": rng.lognormal(math.log(median), 0.15, 12), "other": np.array([])} for _ in range(n)]

    clear = criterion_confidence(images(28.0), images(20.0), reference)  # 1.0 is 40 % off, the choice on target
    assert clear["decisive"] and clear["share_closer"] == 1.0 and clear["improvement_lower"] > 0.2
    noise = criterion_confidence(images(20.5), images(20.2), reference)  # both as close as sampling allows
    assert not noise["decisive"] and noise["share_closer"] < 0.95
    few = criterion_confidence(images(28.0, n=1)[:1] * 0, images(20.0, n=1)[:1] * 0, reference)
    assert not few["decisive"]  # nothing to measure: cannot tell
    groups = ["p1"] * 16 + ["p2"] * 16  # two patients: the bootstrap resamples 2 units, not 32 images
    assert criterion_confidence(images(28.0), images(20.0), reference, groups)["units"] == 2


def test_adapt_card_without_sizes_is_one_clear_line(exported: dict[str, Path], tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(exported["onnx"], old / "model.onnx")
    card = json.loads(exported["card"].read_text())
    del card["training_data"]["object_sizes"]
    (old / "model_card.json").write_text(json.dumps(card))
    r = _adapt(exported["prepared"] / "images", "--model", old / "model.onnx", "--out", tmp_path / "a", cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"error: model card {old / 'model_card.json'} records no training object sizes (exported before "
        "`detflow adapt` existed, or no training boxes); re-export the model"]
    assert not (tmp_path / "a").exists()
