"""Decoding of the Faster R-CNN graph's output (numpy only: the serving image imports it)."""

from __future__ import annotations

import numpy as np

from pipeline.infer.processing import Detections, LetterboxMeta, unletterbox


def frcnn_postprocess(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, meta: LetterboxMeta,
                      conf: float = 0.001, max_det: int = 300) -> Detections:
    """torchvision Faster R-CNN output (already NMS'd, labels 1..K with 0 = background) -> Detections."""
    keep = scores > conf
    order = np.argsort(-scores[keep], kind="stable")[:max_det]
    return Detections(unletterbox(boxes[keep][order], meta), scores[keep][order].astype(np.float32),
                      (labels[keep][order] - 1).astype(np.int64))
