"""Decoding of a torchvision graph's output (numpy only: the serving image imports it)."""

from __future__ import annotations

import numpy as np

from pipeline.contracts.detections import Detections, LetterboxMeta
from pipeline.infer.processing import nms, unletterbox


def torchvision_postprocess(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, meta: LetterboxMeta,
                            conf: float = 0.001, max_det: int = 300, nms_iou: float | None = None) -> Detections:
    """A torchvision detector's output (labels 1..K with 0 = background) -> Detections with 0-based labels.

    ``nms_iou`` None: the graph applied the model's own NMS (its ``nms: graph`` row), so the boxes are only
    thresholded and sorted. A number: the graph stops before NMS (``nms: detflow``), and class-aware NMS at that IoU
    follows here, as :func:`pipeline.families.yolo.postprocess.yolo_postprocess` does it (boxes offset per class).
    """
    keep = (scores > conf) & (labels > 0)  # label 0 is the background: RetinaNet's head can score it, it is no box
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if nms_iou is not None and len(scores):
        offset = labels[:, None].astype(np.float64) * (float(np.abs(boxes).max()) + 1.0)
        order = nms(boxes.astype(np.float64) + offset, scores, nms_iou)
    else:
        order = np.argsort(-scores, kind="stable")
    order = order[:max_det]
    return Detections(unletterbox(boxes[order], meta), scores[order].astype(np.float32),
                      (labels[order] - 1).astype(np.int64))
