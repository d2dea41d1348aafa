"""Decoding of the YOLO graph's output (numpy + OpenCV only: the serving image imports it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.contracts.detections import Detections, LetterboxMeta
from pipeline.infer.processing import nms, unletterbox


def yolo_postprocess(raw: np.ndarray, metas: Sequence[LetterboxMeta], conf: float = 0.001, iou: float = 0.7,
                     max_det: int = 300, max_nms: int = 30000) -> list[Detections]:
    """Decode Ultralytics' Detect output ``(B, 4 + nc, A)`` (xywh in input pixels, class scores) per image.

    Class-aware NMS by offsetting boxes per class, like Ultralytics' ``non_max_suppression`` (multi_label off).
    """
    raw = raw.astype(np.float32, copy=False)  # an FP16 graph's output
    out = []
    nc = raw.shape[1] - 4
    for b, meta in enumerate(metas):
        pred = raw[b].T  # (A, 4 + nc)
        cls_scores = pred[:, 4:]
        labels = cls_scores.argmax(1)
        scores = cls_scores[np.arange(len(labels)), labels]
        keep = scores > conf
        if not keep.any():
            out.append(Detections(np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0, np.int64)))
            continue
        xywh, scores, labels = pred[keep, :4], scores[keep], labels[keep]
        if len(scores) > max_nms:
            top = np.argsort(-scores, kind="stable")[:max_nms]
            xywh, scores, labels = xywh[top], scores[top], labels[top]
        xyxy = np.empty_like(xywh)
        xyxy[:, :2] = xywh[:, :2] - xywh[:, 2:] / 2
        xyxy[:, 2:] = xywh[:, :2] + xywh[:, 2:] / 2
        offset = labels[:, None].astype(xyxy.dtype) * 7680.0 if nc > 1 else 0.0
        kept = nms(xyxy + offset, scores, iou)[:max_det]
        out.append(Detections(unletterbox(xyxy[kept], meta), scores[kept].astype(np.float32),
                              labels[kept].astype(np.int64)))
    return out
