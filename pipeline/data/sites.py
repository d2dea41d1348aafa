"""Shifted copies of a prepared dataset: the same images as another site would have taken them.

For tests and benchmarks of cross-site generalisation (shift detection, adaptation, robust training). Two site
changes, each applied to every image and its boxes:

- :class:`Magnification` ``factor``: the microscope (or zoom) shows objects ``factor`` times larger. Resizing a whole
  image would change nothing a detector sees (the letterbox brings every image to one input size), so a
  magnification change is a change of *field of view* at a fixed image size: ``factor > 1`` keeps the central
  ``1/factor`` of the field and enlarges it to the original size; ``factor < 1`` shrinks the image by ``factor`` and
  pads it back to the original size. Padding is a constant colour, the per-channel median of the image's outer
  pixel ring (the slide or air background); tiling or mirroring would add copies of objects without boxes. Both are
  one resampling (Pillow, bicubic, antialiased when shrinking) of the exact map ``x' = (x - W/2) * factor + W/2``,
  so boxes move exactly; they are clipped to the image, and a box left with a side under :data:`MIN_SIDE_PX`,
  outside the field, or with less than :data:`MIN_VISIBLE` of its area inside it, is dropped and counted. The last
  rule is the usual one for truncated objects (albumentations' ``min_visibility``, VOC's ``truncated``): a cell cut
  to a sliver by the new field of view is not an object a site would label, and keeping it would score every
  detector, adapted or not, on slivers (at x1.6 on BCCD, 72 % of the kept boxes touch the edge without the rule).
- :class:`Stain`: a different stain batch and camera: the optical densities of the haematoxylin, eosin and DAB
  stains (Ruifrok & Johnston's colour deconvolution) are scaled and shifted by amounts drawn once from the seed, so
  the whole copy is one consistent "site"; then brightness and gamma. Boxes are unchanged.

:func:`write_shifted_copy` writes a complete prepared dataset (the layout of ``detflow prepare``: images, YOLO
labels, COCO, manifest with the new bytes' sha256, dataset.yaml, prepare_info.json with a ``shift`` block) in one
atomic step. Images are written as PNG (lossless), whatever their format in the source.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from pipeline.augment import draw_stain, hed_adjust
from pipeline.data.prepare import PreparedImage, _manifest, _write_dataset
from pipeline.data.split import SPLITS
from pipeline.errors import ConfigError, DataError
from pipeline.fileio import atomic_directory
from pipeline.matching import edge_cuts

MIN_SIDE_PX = 2.0
MIN_VISIBLE = 0.5
"""A shifted box is kept only when at least this fraction of its area lies inside the new field of view."""

@dataclass(frozen=True)
class Magnification:
    """Objects ``factor`` times larger in a field of view ``1/factor`` as wide (see the module docstring)."""

    factor: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.factor) and 0.1 <= self.factor <= 10.0):
            raise ConfigError(f"magnification factor must be in [0.1, 10], got {self.factor}")

    def describe(self, seed: int) -> dict[str, Any]:
        return {"kind": "magnification", "factor": self.factor,
                "pad": "per-channel median of the outer pixel ring" if self.factor < 1 else None}

    def apply(self, rgb: np.ndarray, boxes: np.ndarray, rng: np.random.Generator | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Image (H, W, 3) uint8 and boxes (n, 4) xyxy px -> the magnified image and the mapped (unclipped) boxes."""
        h, w = rgb.shape[:2]
        f = self.factor
        im = Image.fromarray(rgb)
        margin_x = margin_y = 0
        if f < 1:  # pad the source so the crop box below lies inside it
            margin_x, margin_y = math.ceil(w * (1 / f - 1) / 2) + 2, math.ceil(h * (1 / f - 1) / 2) + 2
            fill = tuple(int(v) for v in np.median(_outer_ring(rgb), axis=0))
            canvas = Image.new("RGB", (w + 2 * margin_x, h + 2 * margin_y), fill)
            canvas.paste(im, (margin_x, margin_y))
            im = canvas
        cx, cy = margin_x + w / 2, margin_y + h / 2
        box = (cx - w / (2 * f), cy - h / (2 * f), cx + w / (2 * f), cy + h / (2 * f))
        out = np.asarray(im.resize((w, h), Image.Resampling.BICUBIC, box=box))
        mapped = boxes.astype(np.float64).copy()
        if len(mapped):
            mapped[:, [0, 2]] = (mapped[:, [0, 2]] - w / 2) * f + w / 2
            mapped[:, [1, 3]] = (mapped[:, [1, 3]] - h / 2) * f + h / 2
        return out, mapped


@dataclass(frozen=True)
class Stain:
    """Stain and camera change: per-stain optical-density scale in ``[1 - strength, 1 + strength]`` and shift in
    ``[-strength / 5, strength / 5]`` (drawn once from the seed), then ``brightness`` (multiplier) and ``gamma``."""

    strength: float = 0.3
    brightness: float = 1.0
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength < 1.0:
            raise ConfigError(f"stain strength must be in [0, 1), got {self.strength}")
        if not (self.brightness > 0 and self.gamma > 0):
            raise ConfigError(f"stain brightness and gamma must be > 0, got {self.brightness}, {self.gamma}")

    def draw(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return draw_stain(self.strength, np.random.default_rng(seed))

    def describe(self, seed: int) -> dict[str, Any]:
        scale, shift = self.draw(seed)
        return {"kind": "stain", **asdict(self), "hed_scale": [round(float(v), 6) for v in scale],
                "hed_shift": [round(float(v), 6) for v in shift]}

    def apply(self, rgb: np.ndarray, boxes: np.ndarray, params: tuple[np.ndarray, np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray]:
        scale, shift = params
        return hed_adjust(rgb, scale, shift, self.brightness, self.gamma), boxes.astype(np.float64)


Transform = Magnification | Stain


@dataclass(frozen=True)
class ShiftedCopySummary:
    out_dir: Path
    n_images: int
    boxes_in: int
    boxes_out: int
    boxes_clipped: int
    dropped_outside: int
    dropped_small: int
    dropped_truncated: int
    transform: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out_dir": str(self.out_dir)}


def _outer_ring(rgb: np.ndarray) -> np.ndarray:
    return np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]]).reshape(-1, 3)


def labelled_visibility(prepared: str | Path, split: str = "train", quantile: float = 0.05,
                        min_boxes: int = 20) -> float | None:
    """The source's own convention for objects cut by the image edge: the ``quantile`` of the visible fraction of
    its boxes cut on one side only, estimated as cut side / uncut side (objects about as wide as tall), capped at 1.
    A shifted copy that keeps boxes below it labels slivers the source's annotators never labelled (BCCD: 0.56, so
    a cell less than about 56 % in view was not labelled). None with fewer than ``min_boxes`` such boxes."""
    path = Path(prepared) / "coco" / f"{split}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    frame = {im["id"]: (float(im["width"]), float(im["height"])) for im in doc.get("images", [])}
    ratios = []
    for a in doc.get("annotations", []):
        if a.get("image_id") not in frame:
            continue
        (x, y, w, h), (fw, fh) = a["bbox"], frame[a["image_id"]]
        if w <= 0 or h <= 0:
            continue
        cut_x, cut_y = (bool(c[0]) for c in edge_cuts(np.array([[x, y, x + w, y + h]]), fw, fh))
        if cut_x != cut_y:
            ratios.append(min(1.0, w / h if cut_x else h / w))
    return round(float(np.quantile(ratios, quantile)), 3) if len(ratios) >= min_boxes else None


def clip_boxes(boxes: np.ndarray, width: int, height: int, min_visible: float = MIN_VISIBLE
               ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Clip xyxy boxes to the image; returns (kept boxes, kept mask, counts): ``boxes_clipped`` (kept, changed),
    ``dropped_outside``, ``dropped_small`` (a side under :data:`MIN_SIDE_PX`), ``dropped_truncated`` (less than
    ``min_visible`` of the area inside)."""
    counts = {"boxes_clipped": 0, "dropped_outside": 0, "dropped_small": 0, "dropped_truncated": 0}
    if not len(boxes):
        return boxes.reshape(0, 4), np.zeros(0, dtype=bool), counts
    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0.0, float(width))
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0.0, float(height))
    sides = np.minimum(clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1])
    outside = sides <= 0
    small = ~outside & (sides < MIN_SIDE_PX)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]).clip(0) * (clipped[:, 3] - clipped[:, 1]).clip(0)
    truncated = ~outside & ~small & (inside < min_visible * area)
    keep = ~outside & ~small & ~truncated
    changed = keep & np.any(np.abs(clipped - boxes) > 0.01, axis=1)  # not the labels' 6-decimal rounding
    counts.update(boxes_clipped=int(changed.sum()), dropped_outside=int(outside.sum()),
                  dropped_small=int(small.sum()), dropped_truncated=int(truncated.sum()))
    return clipped[keep], keep, counts


def _read_labels(path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not rows:
        return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
    arr = np.array([[float(v) for v in r[1:5]] for r in rows])
    cls = np.array([int(r[0]) for r in rows], dtype=np.int64)
    cx, cy, bw, bh = arr[:, 0] * width, arr[:, 1] * height, arr[:, 2] * width, arr[:, 3] * height
    return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1), cls


def _image_spacings(src: Path) -> dict[str, float]:
    """Image path (as in the manifest) -> the DICOM pixel spacing its COCO entry records (DICOM sources only)."""
    out: dict[str, float] = {}
    for split in SPLITS:
        path = src / "coco" / f"{split}.json"
        if path.is_file():
            for im in json.loads(path.read_text()).get("images", []):
                if isinstance(im.get("pixel_spacing"), int | float):
                    out[str(im["file_name"])] = float(im["pixel_spacing"])
    return out


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write_shifted_copy(src: str | Path, dst: str | Path, transform: Transform, seed: int = 0,
                       min_visible: float = MIN_VISIBLE) -> ShiftedCopySummary:
    """Write ``dst``: the prepared dataset ``src`` with ``transform`` applied to every image and its boxes.

    Same splits, patients, image names and classes; labels, COCO and manifest rebuilt from the transformed boxes
    by the prepare stage's own writers, so they agree with each other. Deterministic for a seed (the seed only
    matters for :class:`Stain`). ``dst`` is replaced whole, atomically. Raises :class:`DataError` when ``src`` is not
    a prepared dataset. ``min_visible``: see :func:`clip_boxes` (0 keeps every clipped box).
    """
    src, dst = Path(src), Path(dst)
    if not 0.0 <= min_visible <= 1.0:
        raise ConfigError(f"min_visible must be in [0, 1], got {min_visible}")
    if not (src / "manifest.csv").is_file() or not (src / "dataset.yaml").is_file():
        raise DataError(f"{src} is not a prepared dataset (no manifest.csv / dataset.yaml); run `detflow prepare`")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise DataError(f"the shifted copy {dst} must be outside the source dataset {src}")
    info = json.loads((src / "prepare_info.json").read_text()) if (src / "prepare_info.json").is_file() else {}
    names = yaml.safe_load((src / "dataset.yaml").read_text()).get("names", {})
    classes = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    stain_params = transform.draw(seed) if isinstance(transform, Stain) else None
    with open(src / "manifest.csv", newline="") as f:
        entries = list(csv.DictReader(f))
    spacing_of = _image_spacings(src)
    per_pixel = 1.0 / transform.factor if isinstance(transform, Magnification) else 1.0
    images: list[PreparedImage] = []
    totals = {"boxes_in": 0, "boxes_out": 0, "boxes_clipped": 0, "dropped_outside": 0, "dropped_small": 0,
              "dropped_truncated": 0}
    for row in entries:
        rel = Path(row["image"])
        split, stem = row["split"], rel.stem
        if split not in SPLITS:
            raise DataError(f"{src}/manifest.csv: unknown split {split!r} for {rel}")
        try:
            with Image.open(src / rel) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataError(f"{src / rel}: cannot read the prepared image ({e})") from None
        h, w = rgb.shape[:2]
        boxes, cls = _read_labels(src / "labels" / split / f"{stem}.txt", w, h)
        if isinstance(transform, Stain):
            out, mapped = transform.apply(rgb, boxes, stain_params)
        else:
            out, mapped = transform.apply(rgb, boxes)
        kept, keep, counts = clip_boxes(mapped, w, h, min_visible)
        totals["boxes_in"] += len(boxes)
        totals["boxes_out"] += len(kept)
        for k, v in counts.items():
            totals[k] += v
        spacing = spacing_of.get(rel.as_posix())
        images.append(PreparedImage(name=stem, split=split, patient=row["patient"], data=_png(out), suffix=".png",
                                    width=w, height=h, boxes=kept, classes=cls[keep],
                                    pixel_spacing=None if spacing is None else spacing * per_pixel))
    described = transform.describe(seed)
    manifest = _manifest(images)
    digest = hashlib.sha256(manifest.encode()).hexdigest()
    shift_block = {**described, "seed": seed, "min_visible": min_visible, "source": str(src),
                   "source_manifest_sha256": info.get("manifest_sha256"), **totals}
    new_info = {**info, "manifest_sha256": digest, "shift": shift_block}
    spacing = info.get("pixel_spacing")
    if isinstance(transform, Magnification) and isinstance(spacing, dict):
        # objects xf in pixels: each pixel now covers 1/f of what it did (a change of field of view)
        new_info["pixel_spacing"] = {k: (round(v / transform.factor, 6) if k in ("median", "min", "max")
                                         and isinstance(v, int | float) else v) for k, v in spacing.items()}
    with atomic_directory(dst) as stage:
        _write_dataset(stage, images, classes, new_info, manifest)
    return ShiftedCopySummary(out_dir=dst, n_images=len(images), transform=described, **totals)
