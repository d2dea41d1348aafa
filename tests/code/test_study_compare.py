"""The study's statistics on constructed cases: the paired bootstrap against a hand-computed case, and the
recommendation rule (clear winner, tie -> cheapest, every interval wide -> "cannot tell")."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.study import arm_images as _arm
from helpers.study import lesion_image as _im

from pipeline.evaluate.metrics import (
    bootstrap_ci,
    bootstrap_draws,
    paired_bootstrap,
)
from pipeline.study.results import compare


def test_paired_bootstrap_hand_computed() -> None:
    """Two patients, one image each. A finds both lesions, B only patient 1's. Resampling two patients gives
    {1,1} (p 1/4): both AP 1, B - A = 0; {2,2} (1/4): B 0, A 1, -1; {1,2} (1/2): B finds 1 of 2 lesions at precision
    1, COCO's 101-point AP = 51/101, so -50/101. The 95 % interval is [-1, 0]; the full-set difference -50/101."""
    a = [_im(1, "p1", True), _im(2, "p2", True)]
    b = [_im(1, "p1", True), _im(2, "p2", False)]
    r = paired_bootstrap(b, a, n_classes=1, froc_iou=0.1, n_resamples=4000, seed=0)
    assert r["map50"]["a"] == pytest.approx(51 / 101, abs=1e-4) and r["map50"]["b"] == 1.0
    assert r["map50"]["difference"] == pytest.approx(-50 / 101, abs=1e-4)
    assert r["map50"]["ci95"] == [-1.0, 0.0]
    assert r["cpm"]["difference"] == -0.5 and r["cpm"]["ci95"] == [-1.0, 0.0]  # sensitivity 1/2 at every FP rate
    boot = bootstrap_draws({"a": a, "b": b}, 1, 0.1, 4000, 0)
    d = np.round(boot.draws["b"]["map50"] - boot.draws["a"]["map50"], 4)
    values, counts = np.unique(d, return_counts=True)
    assert list(values) == [-1.0, round(-50 / 101, 4), 0.0]
    # multinomial frequencies 1/4, 1/2, 1/4 (4 standard errors)
    assert np.allclose(counts / 4000, [0.25, 0.5, 0.25], atol=4 * np.sqrt(0.25 * 0.75 / 4000))


def test_paired_intervals_pair_the_patients() -> None:
    """Two identical models: each arm's own interval is wide (patients differ), their paired difference is exactly
    0 in every resample. Resampling the arms independently would give a wide difference too."""
    arm = [_im(i, f"p{i // 2}", i % 3 != 0) for i in range(12)]
    r = paired_bootstrap(arm, list(arm), 1, 0.1, 500, seed=3)
    assert r["map50"]["ci95"] == [0.0, 0.0] and r["map50_95"]["ci95"] == [0.0, 0.0]
    own = bootstrap_ci(arm, 1, 0.1, 500, seed=3)["map50"]
    assert own[1] - own[0] > 0.2


def test_draws_are_the_evaluate_stage_resamples_and_map50_95_counts_iou() -> None:
    rng = np.random.default_rng(0)
    arm = [_im(i, f"p{i // 3}", bool(rng.random() < 0.7), score=float(rng.random())) for i in range(30)]
    boot = bootstrap_draws({"x": arm}, 1, 0.1, 300, 7)
    ci = bootstrap_ci(arm, 1, 0.1, 300, 7)  # metrics.json's intervals: the same resamples for the same seed
    from pipeline.evaluate.metrics import percentile_interval

    assert percentile_interval(boot.draws["x"]["map50"]) == ci["map50"]
    assert percentile_interval(boot.draws["x"]["cpm"]) == ci["cpm"]
    # IoU 2/3 (a 20 x 20 lesion, the box 4 px to the right): a hit at IoU 0.5 ... 0.65, a miss from 0.7 on: 4/10
    shifted = [_im(1, "p", True, box=[14.0, 10.0, 34.0, 30.0])]
    point = bootstrap_draws({"s": shifted}, 1, 0.1, 10, 0).point["s"]
    assert point["map50"] == 1.0 and point["map50_95"] == pytest.approx(0.4)
    from pipeline.evaluate.metrics import coco_metrics, to_coco_results

    gt = {"images": [{"id": 1, "width": 64, "height": 64, "file_name": "1.png"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                           "iscrowd": 0}], "categories": [{"id": 1, "name": "x"}]}
    assert coco_metrics(gt, to_coco_results(shifted), ["x"])["map50_95"] == pytest.approx(0.4)  # pycocotools agrees


def _row(name: str, recipe: str, init: str, fraction: float, map50: float, seconds: float,
         trainable: int = 1000) -> dict:
    return {"name": name, "label": f"{recipe}/{init}/{fraction}", "recipe": recipe, "init": init,
            "fraction": fraction, "seed": 0, "map50": map50, "train_seconds": seconds,
            "trainable_params": trainable, "train_images": int(100 * fraction)}


def test_recommendation_clear_winner() -> None:
    n = 60
    strong = _arm(n, [True] * n)
    weak = _arm(n, [i % 2 == 0 for i in range(n)])  # misses half the lesions
    rows = [_row("strong", "fine_tune", "coco", 1.0, 1.0, 500.0), _row("weak", "fine_tune", "scratch", 1.0, 0.5, 50)]
    out = compare(rows, {"strong": strong, "weak": weak}, 1, 0.1, 500, 0, 0.1, ["fine_tune"])
    rec = out["recommendation"]
    diff = out["comparisons"]["vs_best"][0]
    assert out["best"] == "strong" and diff["ci95"][1] < 0 and not diff["includes_zero"]  # worse, however wide
    assert rec["arm"] == "strong" and rec["as_good_as_best"] == ["strong"] and not rec["cannot_tell"]
    assert "fine_tune from COCO weights on 100 % of the training data" in rec["text"]
    assert "the best arm; every other arm is worse" in rec["text"] and "500 s of training" in rec["text"]
    cs = out["comparisons"]["coco_vs_scratch"][0]
    # half the lesions found at precision 1: COCO's 101-point AP is 51/101, so the difference 50/101
    assert (cs["coco"], cs["scratch"]) == ("strong", "weak") and cs["difference"] == pytest.approx(50 / 101, abs=1e-4)
    assert cs["ci95"][0] > 0 and not cs["includes_zero"]


def test_recommendation_tie_goes_to_the_cheapest() -> None:
    n = 60
    hits = [i % 5 != 0 for i in range(n)]
    same = _arm(n, hits)
    # the metrics files' mAP50 may differ in the third decimal (pycocotools); the paired difference is the engine's
    rows = [_row("full", "fine_tune", "coco", 1.0, 0.801, 900.0, 2_000_000),
            _row("frozen", "feature_extraction", "coco", 1.0, 0.8, 600.0, 400_000),
            _row("quarter", "fine_tune", "coco", 0.25, 0.8, 300.0, 2_000_000),
            _row("bad", "fine_tune", "scratch", 0.25, 0.2, 100.0)]
    images = {"full": same, "frozen": same, "quarter": same, "bad": _arm(n, [i % 5 == 0 for i in range(n)])}
    out = compare(rows, images, 1, 0.1, 400, 0, 0.1, ["fine_tune", "feature_extraction"])
    rec = out["recommendation"]
    assert set(rec["as_good_as_best"]) == {"full", "frozen", "quarter"}  # "bad" is not, though it is cheaper
    assert rec["arm"] == "quarter" and not rec["cannot_tell"]
    assert "fine_tune from COCO weights on 25 % of the training data (25 images)" in rec["text"]
    assert "+0.000 [+0.000, +0.000] against the best arm (fine_tune/coco/1.0, 0.801)" in rec["text"]
    assert "cheapest of the 3 arms as good as the best (300 s of training" in rec["text"]
    ref = {c["arm"]: c for c in out["comparisons"]["vs_reference"]}
    assert ref["frozen"]["reference_arm"] == "full" and ref["frozen"]["ci95"] == [0.0, 0.0]


def test_recommendation_cannot_tell_when_every_interval_is_wide() -> None:
    # 4 patients: every resample swings the difference a lot
    a = _arm(4, [True, True, False, True])
    b = _arm(4, [True, False, True, True])
    rows = [_row("a", "fine_tune", "coco", 1.0, 0.75, 100.0), _row("b", "progressive", "coco", 1.0, 0.75, 10.0)]
    out = compare(rows, {"a": a, "b": b}, 1, 0.1, 400, 0, 0.1, ["fine_tune", "progressive"])
    rec = out["recommendation"]
    diff = out["comparisons"]["vs_best"][0]
    assert diff["wide"] and diff["width"] > 0.1
    assert rec["cannot_tell"] and rec["arm"] is None
    assert rec["text"].startswith("The study cannot tell the arms apart: 1 of the 1 other arms") and \
        "wider than 0.1" in rec["text"]
    # a looser definition of wide lets it recommend (the cheaper, both as good as the best)
    looser = compare(rows, {"a": a, "b": b}, 1, 0.1, 400, 0, 2.0, ["fine_tune", "progressive"])["recommendation"]
    assert not looser["cannot_tell"] and looser["arm"] == "b"


def test_recommendation_says_so_when_no_arm_found_anything() -> None:
    """Arms that detect nothing tie at mAP50 0 with intervals [0, 0] (not wide): the cheapest must not be
    recommended as if it were as good as a useful model."""
    n = 20
    blind = _arm(n, [False] * n)
    rows = [_row("a", "fine_tune", "coco", 1.0, 0.0, 50.0), _row("b", "fine_tune", "scratch", 0.25, 0.0, 10.0)]
    out = compare(rows, {"a": blind, "b": list(blind)}, 1, 0.1, 200, 0, 0.1, ["fine_tune"])
    rec = out["recommendation"]
    assert rec["cannot_tell"] and rec["arm"] is None
    assert rec["text"].startswith("No arm found anything on the test set") and "nothing to recommend" in rec["text"]
