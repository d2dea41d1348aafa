"""Plot data for `dvc plots` (PR per class, FROC, confusion) and the predictions preview image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.evaluate.metrics import FrocCurve, ImageDets
from pipeline.fileio import atomic_write_json

GT_COLOUR, PRED_COLOUR = (40, 220, 60), (255, 60, 40)


def write_plot_data(out: Path, precision: np.ndarray, class_names: Sequence[str], froc: FrocCurve,
                    confusion: np.ndarray) -> None:
    """``pr/<class>.json`` (recall, precision at IoU 0.5), ``froc.json``, ``confusion.json`` (actual, predicted)."""
    rec = np.linspace(0, 1, 101)
    for k, name in enumerate(class_names):
        p = precision[0, :, k, 0, -1] if k < precision.shape[2] else np.full(101, -1.0)
        rows = [{"recall": round(float(r), 3), "precision": round(float(max(v, 0.0)), 4)} for r, v in zip(rec, p,
                                                                                                    strict=True)]
        atomic_write_json(out / "pr" / f"{name}.json", rows)
    atomic_write_json(out / "froc.json", [{"fp_per_image": round(float(f), 4), "sensitivity": round(float(s), 4)}
                                          for f, s in zip(froc.fp_per_image, froc.sensitivity, strict=True)
                                          if f <= 16])
    labels = [*class_names, "background"]
    rows = [{"actual": labels[i], "predicted": labels[j]}
            for i in range(confusion.shape[0]) for j in range(confusion.shape[1]) for _ in range(confusion[i, j])]
    atomic_write_json(out / "confusion.json", rows)


def preview_grid(images: Sequence[tuple[np.ndarray, ImageDets]], class_names: Sequence[str], conf: float,
                 out: Path, tile: int = 256, columns: int = 4) -> None:
    """Ground truth (green) and predictions at the operating threshold (red, with class and score)."""
    if not images:
        return
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * tile, rows * tile), (0, 0, 0))
    for i, (rgb, im) in enumerate(images):
        scale = tile / max(rgb.shape[:2])
        pic = Image.fromarray(rgb).resize((max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))))
        draw = ImageDraw.Draw(pic)
        for b in im.gt_boxes:
            draw.rectangle([float(v) * scale for v in b], outline=GT_COLOUR, width=2)
        for b, s, c in zip(im.boxes, im.scores, im.labels, strict=True):
            if s >= conf:
                xy = [float(v) * scale for v in b]
                draw.rectangle(xy, outline=PRED_COLOUR, width=1)
                draw.text((xy[0] + 1, max(0, xy[1] - 10)), f"{class_names[c]} {s:.2f}", fill=PRED_COLOUR)
        canvas.paste(pic, ((i % columns) * tile, (i // columns) * tile))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    canvas.save(tmp)
    tmp.replace(out)
