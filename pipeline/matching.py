"""Box overlap and the one greedy IoU matcher: detections to ground truth (metrics), PyTorch to ONNX boxes (export
parity), boxes to each other (duplicate checks in the data stage); and which boxes the image edge cuts (site
adaptation's size record, the shifted copies' labelling convention).

Numpy only (no torch), and at the package root because the data, evaluate and export stages all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EDGE_PX = 1.0
"""A box within this many pixels of the image edge is cut by the frame: it shows the frame, not its object's size."""


def edge_cuts(boxes: np.ndarray, width: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Per xyxy box: (cut by the left or right edge, cut by the top or bottom edge), see :data:`EDGE_PX`."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return ((b[:, 0] <= EDGE_PX) | (b[:, 2] >= width - EDGE_PX),
            (b[:, 1] <= EDGE_PX) | (b[:, 3] >= height - EDGE_PX))


def off_edge(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Mask of the xyxy boxes that no image edge cuts."""
    cut_x, cut_y = edge_cuts(boxes, width, height)
    return ~(cut_x | cut_y)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between ``(N, 4)`` and ``(M, 4)`` xyxy boxes; 0 where the union is empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@dataclass(frozen=True)
class Matches:
    """Per query box: the target it took, or -1; and whether it only re-hit a target a higher-scored query took."""

    target: np.ndarray  # (N,) int64
    rehit: np.ndarray  # (N,) bool; never True where target >= 0

    @property
    def matched(self) -> np.ndarray:
        return self.target >= 0


def greedy_match(boxes: np.ndarray, scores: np.ndarray, targets: np.ndarray, *, iou_thr: float,
                 labels: np.ndarray | None = None, target_labels: np.ndarray | None = None) -> Matches:
    """Match query ``boxes`` to ``targets``, highest score first, each target at most once.

    A query takes the still-free target it overlaps most (the lowest index among equal IoUs) when that IoU is
    ``>= iou_thr``. Equal scores keep their input order (stable sort), so the result never depends on the sort
    algorithm. With ``labels`` and ``target_labels`` a query only matches targets of its own class. ``rehit``
    marks unmatched queries whose best overlap (free or taken) reaches ``iou_thr``: FROC's "second hit on a lesion
    already found", which counts as neither a true nor a false positive.
    """
    n = len(scores)
    target = np.full(n, -1, dtype=np.int64)
    rehit = np.zeros(n, dtype=bool)
    if (labels is None) != (target_labels is None):
        raise ValueError("give both labels and target_labels for class-aware matching, or neither")
    if n == 0 or len(targets) == 0:
        return Matches(target, rehit)
    iou = pairwise_iou(boxes, targets)
    if labels is not None:
        iou[np.asarray(labels)[:, None] != np.asarray(target_labels)[None, :]] = -1.0
    taken = np.zeros(iou.shape[1], dtype=bool)
    for q in np.argsort(-np.asarray(scores), kind="stable"):
        free = np.where(taken, -1.0, iou[q])
        j = int(free.argmax())
        if free[j] >= iou_thr:
            target[q] = j
            taken[j] = True
        elif iou[q].max() >= iou_thr:
            rehit[q] = True
    return Matches(target, rehit)
