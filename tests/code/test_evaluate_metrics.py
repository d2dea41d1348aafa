"""Metrics on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import GateParams
from pipeline.evaluate.gate import evaluate_gate, gate_table
from pipeline.evaluate.metrics import (
    ImageDets,
    _coco_style_matches,
    bootstrap_ci,
    coco_metrics,
    froc,
    map50_from_matches,
    operating_point,
    to_coco_results,
)


def _im(i: int, patient: str, gt: list, dets: list) -> ImageDets:
    """gt: [(box, cls)], dets: [(box, score, cls)]."""
    return ImageDets(
        image_id=i, patient=patient,
        gt_boxes=np.array([g[0] for g in gt], dtype=float).reshape(-1, 4),
        gt_labels=np.array([g[1] for g in gt], dtype=np.int64),
        boxes=np.array([d[0] for d in dets], dtype=float).reshape(-1, 4),
        scores=np.array([d[1] for d in dets], dtype=float),
        labels=np.array([d[2] for d in dets], dtype=np.int64))


def _gt_doc(images: list[ImageDets], classes: list[str]) -> dict:
    anns = []
    for im in images:
        for b, c in zip(im.gt_boxes, im.gt_labels, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": im.image_id, "category_id": int(c) + 1,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1]),
                         "iscrowd": 0})
    return {"images": [{"id": im.image_id, "width": 100, "height": 100, "file_name": f"{im.image_id}.png"}
                       for im in images], "annotations": anns,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(classes)]}


def test_froc_hand_computed() -> None:
    lesion1, lesion2 = [10, 10, 20, 20], [50, 50, 60, 60]
    a = _im(1, "p1", [(lesion1, 0), (lesion2, 0)], [
        (lesion1, 0.9, 0),               # TP
        ([80, 80, 90, 90], 0.8, 0),      # FP
        ([52, 52, 70, 70], 0.7, 0),      # IoU(lesion2) = 64/(100+324-64) = 0.178 >= 0.1: TP
        ([11, 11, 21, 21], 0.6, 0),      # second hit on lesion1: ignored (LUNA16)
    ])
    b = _im(2, "p2", [], [([30, 30, 40, 40], 0.85, 0)])  # lesion-free image: FP
    curve = froc([a, b], iou_thr=0.1)
    # pooled by score: .9 TP, .85 FP, .8 FP, .7 TP -> (FP/img, sens): (0, .5) (.5, .5) (1, .5) (1, 1)
    assert curve.points == {0.125: 0.5, 0.25: 0.5, 0.5: 0.5, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    assert curve.cpm == pytest.approx(5.5 / 7)
    strict = froc([a, b], iou_thr=0.2)  # the 0.178 overlap no longer hits
    assert strict.points[8.0] == 0.5


def test_froc_counts_lesion_free_images_as_fp_denominator() -> None:
    hit = _im(1, "p1", [([0, 0, 10, 10], 0)], [([0, 0, 10, 10], 0.9, 0), ([50, 50, 60, 60], 0.8, 0)])
    empty = [_im(i, f"e{i}", [], []) for i in range(2, 5)]
    curve = froc([hit, *empty])
    assert curve.points[0.25] == 1.0 and curve.points[0.125] == 1.0  # 1 FP over 4 images = 0.25 FP/img
    assert froc([hit]).points[0.5] == 1.0 and froc([hit]).points[0.25] == 1.0


def _random_case(seed: int, n_images: int = 12, n_classes: int = 2) -> list[ImageDets]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n_images):
        gt, dets = [], []
        for _ in range(rng.integers(0, 5)):
            x, y, s = rng.uniform(0, 70), rng.uniform(0, 70), rng.uniform(5, 25)
            c = int(rng.integers(0, n_classes))
            gt.append(([x, y, x + s, y + s], c))
            if rng.random() < 0.8:  # a jittered detection, sometimes of the wrong class
                j = rng.normal(0, s * 0.15, 4)
                dets.append(([x + j[0], y + j[1], x + s + j[2], y + s + j[3]], float(rng.random()),
                             c if rng.random() < 0.9 else 1 - c))
        for _ in range(rng.integers(0, 4)):  # false positives
            x, y = rng.uniform(0, 80), rng.uniform(0, 80)
            dets.append(([x, y, x + 10, y + 10], float(rng.random() * 0.7), int(rng.integers(0, n_classes))))
        images.append(_im(i + 1, f"p{i // 3}", gt, dets))
    return images


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_bootstrap_ap_engine_equals_pycocotools(seed: int) -> None:
    images = _random_case(seed)
    classes = ["a", "b"]
    ref = coco_metrics(_gt_doc(images, classes), to_coco_results(images), classes)
    ours = map50_from_matches([_coco_style_matches(im, 2) for im in images], 2)
    assert ours == pytest.approx(ref["map50"], abs=2e-3)  # results are rounded to 3 decimals for COCO
    assert ref["map50"] == pytest.approx(np.nanmean([ref["per_class"][c]["ap50"] for c in classes]))


def test_coco_metrics_perfect_and_empty() -> None:
    images = [_im(1, "p", [([10, 10, 30, 30], 0)], [([10, 10, 30, 30], 0.9, 0)])]
    m = coco_metrics(_gt_doc(images, ["x"]), to_coco_results(images), ["x"])
    assert m["map50"] == pytest.approx(1.0) and m["map50_95"] == pytest.approx(1.0)
    none = [_im(1, "p", [([10, 10, 30, 30], 0)], [])]
    assert coco_metrics(_gt_doc(none, ["x"]), [], ["x"])["map50"] == 0.0


def test_bootstrap_resamples_patients_not_images() -> None:
    good = [_im(i, "good", [([10, 10, 30, 30], 0)], [([10, 10, 30, 30], 0.9, 0)]) for i in range(1, 6)]
    bad = [_im(i, "bad", [([10, 10, 30, 30], 0)], [([60, 60, 80, 80], 0.9, 0)]) for i in range(6, 11)]
    ci = bootstrap_ci(good + bad, 1, froc_iou=0.1, n_resamples=400, seed=0)
    # Two patients: a quarter of resamples hold only the bad one (mAP 0, CPM 0), a quarter only the good one.
    # Resampling the ten images independently would almost never (0.5**10) produce those extremes.
    assert ci["map50"][0] == 0.0 and ci["map50"][1] == 1.0
    assert ci["cpm"][0] == 0.0 and ci["cpm"][1] == 1.0
    assert ci["unit"] == "patient"


def test_operating_point_and_confusion() -> None:
    images = [_im(1, "p", [([0, 0, 10, 10], 0), ([20, 20, 30, 30], 1)],
                  [([0, 0, 10, 10], 0.9, 0), ([20, 20, 30, 30], 0.8, 0), ([50, 50, 60, 60], 0.1, 1)])]
    op = operating_point(images, 2, conf=0.25)
    assert (op["tp"], op["fp"], op["fn"]) == (1, 1, 1)
    assert op["precision"] == 0.5 and op["recall"] == 0.5 and op["f1"] == 0.5
    assert op["_confusion"].tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]  # class-1 box predicted as class 0


def test_gate_checks_and_regression() -> None:
    metrics = {"map50": 0.6, "froc": {"fp_per_image": [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
                                      "sensitivity": [0.1, 0.2, 0.3, 0.45, 0.6, 0.7, 0.8], "cpm": 0.45}}
    gate = GateParams(min_map50=0.5, min_sensitivity_at_1fp=0.5, min_cpm=0.4, max_regression=0.05)
    result = evaluate_gate(metrics, gate, {"map50": 0.7})
    by_name = {c["name"]: c for c in result["checks"]}
    assert result["passed"] is False
    assert by_name["min_map50"]["passed"] and by_name["min_cpm"]["passed"]
    assert not by_name["min_sensitivity_at_1fp"]["passed"] and by_name["min_sensitivity_at_1fp"]["value"] == 0.45
    assert not by_name["max_regression"]["passed"] and by_name["max_regression"]["value"] == pytest.approx(0.1)
    table = gate_table(result, only_failed=True)
    assert "min_sensitivity_at_1fp" in table and "max_regression" in table and "min_cpm" not in table
    assert evaluate_gate(metrics, gate.model_copy(update={"min_sensitivity_at_1fp": 0.45}), None)["passed"]


def test_patient_bootstrap_gives_per_class_intervals_and_the_froc_band_from_the_same_draws() -> None:
    from pipeline.evaluate.metrics import patient_bootstrap

    good = [_im(i, "good", [([10, 10, 30, 30], 0), ([40, 40, 60, 60], 1)],
                [([10, 10, 30, 30], 0.9, 0), ([40, 40, 60, 60], 0.8, 1)]) for i in range(1, 6)]
    bad = [_im(i, "bad", [([10, 10, 30, 30], 0)], [([60, 60, 80, 80], 0.9, 0)]) for i in range(6, 11)]
    boot = patient_bootstrap(good + bad, 2, froc_iou=0.1, n_resamples=400, seed=0)
    assert {k: boot[k] for k in ("map50", "cpm")} == {k: v for k, v in bootstrap_ci(
        good + bad, 2, froc_iou=0.1, n_resamples=400, seed=0).items() if k in ("map50", "cpm")}
    (lo0, hi0), (lo1, hi1) = boot["per_class_ap50"]
    assert (lo0, hi0) == (0.0, 1.0) and (lo1, hi1) == (1.0, 1.0)  # class 1 only on the good patient: always found
    assert len(boot["froc_low"]) == len(boot["fp_per_image"]) and boot["froc_low"][0] == 0.0
    assert boot["froc_high"][-1] == 1.0 and boot["unit"] == "patient"


def test_worst_cases_are_the_lowest_scored_misses_and_the_most_confident_false_positives() -> None:
    from pipeline.evaluate.metrics import worst_cases

    images = [_im(1, "p", [([0, 0, 10, 10], 0), ([50, 50, 60, 60], 0)],
                  [([0, 0, 10, 10], 0.9, 0), ([20, 20, 30, 30], 0.7, 0), ([51, 51, 61, 61], 0.1, 0)]),
              _im(2, "q", [([0, 0, 10, 10], 0)], [([70, 70, 80, 80], 0.95, 0)])]
    cases = worst_cases(images, conf=0.25)
    assert [(c["image_id"], c["score"]) for c in cases["fn"]] == [(2, 0.0), (1, 0.1)]  # 0.1: the overlapping box
    assert [(c["image_id"], c["score"]) for c in cases["fp"]] == [(2, 0.95), (1, 0.7)]
    assert cases["fp"][1]["detections"] == [{"box": [0.0, 0.0, 10.0, 10.0], "label": 0, "score": 0.9},
                                            {"box": [20.0, 20.0, 30.0, 30.0], "label": 0, "score": 0.7}]
    assert cases["fn"][1]["gt_boxes"] == [[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]
