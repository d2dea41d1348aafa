"""Box validation: every dropped or changed box produces a :class:`Problem`."""

from __future__ import annotations

import numpy as np

from pipeline.data.records import Problem
from pipeline.matching import pairwise_iou


def _fmt(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def validate_boxes(
    file: str,
    boxes: np.ndarray,
    labels: list[str],
    width: int,
    height: int,
    classes: list[str],
    clip_tolerance_px: float,
    duplicate_iou: float,
    near_duplicate_iou: float | None = None,
) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
    """Return kept boxes (float xyxy), their class indices, and a problem for each change.

    Order of checks: finite coordinates (after the reader's arithmetic: ``x + w`` of two huge numbers is inf),
    class, degenerate extent, image bounds (clip within tolerance, else drop), duplicates.
    Same-class pairs with IoU >= ``duplicate_iou`` are duplicates; pairs in
    ``[near_duplicate_iou, duplicate_iou)`` are near-duplicates (the same object annotated twice with a small
    shift, as in BCCD). Both drop the later box: keeping it would teach the model to emit duplicates and count
    a false negative against every correct detection.
    """
    problems: list[Problem] = []
    index = {c: i for i, c in enumerate(classes)}
    kept_boxes: list[np.ndarray] = []
    kept_cls: list[int] = []
    for box, label in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels, strict=True):
        if not np.isfinite(box).all():
            problems.append(Problem(file, "malformed_annotation", f"{label} box {_fmt(box)} has a coordinate that is "
                                    "not a finite number", "box_dropped"))
            continue
        if label not in index:
            problems.append(Problem(file, "unknown_class",
                                    f"label {label!r} not in classes {classes}; box {_fmt(box)}", "box_dropped"))
            continue
        x1, y1, x2, y2 = box
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            problems.append(Problem(file, "degenerate_box",
                                    f"{label} box {_fmt(box)} has width {x2 - x1:g} and height {y2 - y1:g}",
                                    "box_dropped"))
            continue
        excess = max(-x1, -y1, x2 - width, y2 - height)
        if excess > 0:
            clipped = np.array([max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)])
            if excess <= clip_tolerance_px and clipped[2] > clipped[0] and clipped[3] > clipped[1]:
                problems.append(Problem(file, "box_outside_image",
                                        f"{label} box {_fmt(box)} exceeds the {width}x{height} image by {excess:g} "
                                        f"px; clipped to {_fmt(clipped)}", "fixed"))
                box = clipped
            else:
                problems.append(Problem(file, "box_outside_image",
                                        f"{label} box {_fmt(box)} exceeds the {width}x{height} image by {excess:g} "
                                        f"px (tolerance {clip_tolerance_px:g})", "box_dropped"))
                continue
        kept_boxes.append(box)
        kept_cls.append(index[label])
    out_boxes = np.array(kept_boxes, dtype=np.float64).reshape(-1, 4)
    out_cls = np.array(kept_cls, dtype=np.int64)
    if len(out_boxes) > 1:
        iou = pairwise_iou(out_boxes, out_boxes)
        same = out_cls[:, None] == out_cls[None, :]
        threshold = min(duplicate_iou, near_duplicate_iou or duplicate_iou)
        dup = np.triu((iou >= threshold) & same, k=1)  # j duplicates an earlier i
        drop = np.zeros(len(out_boxes), dtype=bool)
        for i, j in zip(*np.nonzero(dup), strict=True):
            if drop[i] or drop[j]:
                continue
            drop[j] = True
            exact = iou[i, j] >= duplicate_iou
            problems.append(Problem(file, "duplicate_box" if exact else "near_duplicate_box",
                                    f"{classes[out_cls[j]]} box {_fmt(out_boxes[j])} duplicates {_fmt(out_boxes[i])} "
                                    f"(IoU {iou[i, j]:.3f} >= {duplicate_iou if exact else threshold:g})",
                                    "box_dropped"))
        out_boxes, out_cls = out_boxes[~drop], out_cls[~drop]
    return out_boxes, out_cls, problems
