"""The one IoU matcher (pipeline.matching) on hand-computed cases: overlap values, score order, ties, classes,
one match per target, empty inputs; and the export parity report built on it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.matching import greedy_match, pairwise_iou


def _b(*boxes: list[float]) -> np.ndarray:
    return np.array(boxes, dtype=float).reshape(-1, 4)


def test_pairwise_iou_known_values() -> None:
    a = _b([0, 0, 10, 10], [0, 0, 0, 0])
    b = _b([0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10], [0, 0, 10, 20], [100, 100, 110, 110])
    # identical 1; half-shifted 50/150; touching edge 0; nested 100/200; disjoint 0; a zero-area box 0 everywhere
    np.testing.assert_allclose(pairwise_iou(a, b), [[1.0, 1 / 3, 0.0, 0.5, 0.0], [0.0] * 5])
    assert pairwise_iou(_b(), b).shape == (0, 5) and pairwise_iou(a, _b()).shape == (2, 0)


def test_higher_score_takes_the_target_first() -> None:
    target = _b([0, 0, 10, 10])
    dets = _b([0, 0, 10, 10], [1, 0, 11, 10])  # IoU 1.0 (score .5) and 90/110 = .818 (score .9)
    m = greedy_match(dets, np.array([0.5, 0.9]), target, iou_thr=0.5)
    assert m.target.tolist() == [-1, 0] and m.rehit.tolist() == [True, False] and m.matched.tolist() == [False, True]


def test_a_query_takes_the_best_free_target() -> None:
    targets = _b([0, 0, 10, 10], [2, 0, 12, 10])
    dets = _b([0, 0, 10, 10], [1, 0, 11, 10])  # second: IoU .818 with both; the first is taken
    m = greedy_match(dets, np.array([0.9, 0.8]), targets, iou_thr=0.5)
    assert m.target.tolist() == [0, 1] and not m.rehit.any()


def test_greedy_not_optimal_assignment() -> None:
    """Like COCOeval: the top query takes its best target even when that leaves the next one without any."""
    targets = _b([0, 0, 10, 10], [2, 0, 12, 10])
    dets = _b([2, 0, 12, 10], [4, 0, 14, 10])  # det 0: IoU 80/120 with t0, 1.0 with t1; det 1: 60/140, 80/120
    m = greedy_match(dets, np.array([0.9, 0.8]), targets, iou_thr=0.5)
    assert m.target.tolist() == [1, -1] and m.rehit.tolist() == [False, True]  # an optimal assignment would pair both


def test_threshold_is_inclusive() -> None:
    target, det = _b([0, 0, 10, 20]), _b([0, 0, 10, 10])  # IoU exactly 0.5
    assert greedy_match(det, np.array([1.0]), target, iou_thr=0.5).target.tolist() == [0]
    below = greedy_match(det, np.array([1.0]), target, iou_thr=0.5 + 1e-9)
    assert below.target.tolist() == [-1] and below.rehit.tolist() == [False]  # no overlap reached: not a re-hit


def test_equal_scores_keep_input_order_and_equal_ious_the_lowest_target() -> None:
    n = 40  # long enough that an unstable sort (numpy's default quicksort/SIMD sort) would reorder ties
    dets = np.repeat(_b([0, 0, 10, 10]), n, axis=0)
    m = greedy_match(dets, np.full(n, 0.7), _b([0, 0, 10, 10]), iou_thr=0.5)
    assert m.target.tolist() == [0] + [-1] * (n - 1) and m.rehit.tolist() == [False] + [True] * (n - 1)
    two = greedy_match(_b([0, 0, 10, 10]), np.array([0.7]), _b([0, 0, 10, 10], [0, 0, 10, 10]), iou_thr=0.5)
    assert two.target.tolist() == [0]


def test_each_target_is_matched_once() -> None:
    targets = _b([0, 0, 10, 10], [50, 50, 60, 60])
    dets = _b([0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10])
    m = greedy_match(dets, np.array([0.9, 0.8, 0.7, 0.6]), targets, iou_thr=0.5)
    assert m.target.tolist() == [0, -1, 1, -1] and m.rehit.tolist() == [False, True, False, True]


def test_class_aware_matching() -> None:
    box = _b([0, 0, 10, 10])
    aware = greedy_match(box, np.array([0.9]), box, iou_thr=0.5, labels=np.array([1]), target_labels=np.array([0]))
    assert aware.target.tolist() == [-1] and aware.rehit.tolist() == [False]  # another class is not a re-hit
    assert greedy_match(box, np.array([0.9]), box, iou_thr=0.5).target.tolist() == [0]  # class-agnostic
    same = greedy_match(_b([0, 0, 10, 10], [0, 0, 10, 10]), np.array([0.9, 0.8]), _b([0, 0, 10, 10], [0, 0, 10, 10]),
                        iou_thr=0.5, labels=np.array([1, 0]), target_labels=np.array([0, 1]))
    assert same.target.tolist() == [1, 0]
    with pytest.raises(ValueError, match="both labels and target_labels"):
        greedy_match(box, np.array([0.9]), box, iou_thr=0.5, labels=np.array([0]))


def test_empty_inputs() -> None:
    none = greedy_match(_b(), np.zeros(0), _b([0, 0, 1, 1]), iou_thr=0.5)
    assert none.target.shape == (0,) and none.rehit.shape == (0,) and none.target.dtype == np.int64
    no_targets = greedy_match(_b([0, 0, 1, 1], [2, 2, 3, 3]), np.array([0.5, 0.4]), _b(), iou_thr=0.5,
                              labels=np.array([0, 0]), target_labels=np.zeros(0, np.int64))
    assert no_targets.target.tolist() == [-1, -1] and no_targets.rehit.tolist() == [False, False]


def test_export_parity_report_uses_the_matcher() -> None:
    from pipeline.export import _match_parity

    def dets(boxes: np.ndarray, scores: list[float], labels: list[int]) -> SimpleNamespace:
        return SimpleNamespace(boxes=boxes, scores=np.array(scores), labels=np.array(labels))

    torch_side = [dets(_b([0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 5, 5]), [0.9, 0.8, 0.1], [0, 1, 0]),
                  dets(_b(), [], [])]
    onnx_side = [dets(_b([0, 0, 10, 11], [50, 50, 60, 60]), [0.88, 0.8], [0, 0]),  # 2nd: same box, other class
                 dets(_b([1, 1, 2, 2]), [0.5], [0])]
    report = _match_parity(torch_side, onnx_side, conf=0.25, iou_thr=0.9)
    # image 1: 2 vs 2 boxes above conf, one same-class match (IoU 100/110 = .909), box diff 1 px, score diff .02;
    # image 2: 0 vs 1 box, nothing matched
    assert report == {"boxes_compared": 3, "boxes_matched": 1, "matched_fraction": round(1 / 3, 6),
                      "max_abs_box_diff_px": 1.0, "max_abs_score_diff": 0.02}
