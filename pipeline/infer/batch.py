"""Batch inference over an image, a folder, a DICOM series, a file list or a COCO split; streaming, never
aborted by a bad file (each one is reported and skipped)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.data.imaging import DICOM_SUFFIXES, IMAGE_SUFFIXES, looks_like_dicom
from pipeline.errors import DetflowError
from pipeline.fileio import atomic_write_json
from pipeline.infer.engine import OnnxDetector


@dataclass
class BatchSummary:
    n_images: int = 0
    n_detections: int = 0
    errors: list[dict] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)


Source = tuple[str, int, Path]  # display name, image id (the COCO id, else the input's position), path


def _read_text(source: Path, what: str) -> str:
    try:
        return source.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DetflowError(f"{source} is not a {what}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _coco_sources(source: Path) -> Iterator[tuple[str, int | None, Path]]:
    """The images of a COCO file, checked whole before any is yielded: a file that is not a COCO dataset fails
    with one line naming what is wrong."""
    what = "COCO dataset (expected an object with an \"images\" list of {\"id\", \"file_name\"})"
    try:
        doc = json.loads(_read_text(source, what))
    except json.JSONDecodeError as e:
        raise DetflowError(f"{source} is not a {what}: invalid JSON ({e})") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise DetflowError(f"{source} is not a {what}: no \"images\" list")
    for i, img in enumerate(images):
        ok = isinstance(img, dict) and isinstance(img.get("file_name"), str) and img["file_name"] \
            and isinstance(img.get("id"), int) and not isinstance(img["id"], bool)
        if not ok:
            raise DetflowError(f"{source} is not a {what}: images[{i}] is {json.dumps(img)[:80]}")
    base = source.parent.parent if source.parent.name == "coco" else source.parent
    for img in images:
        yield img["file_name"], img["id"], base / img["file_name"]


def iter_sources(source: Path) -> Iterator[tuple[str, int | None, Path]]:
    """(display name, COCO image id or None, path) for every input the source names."""
    if not source.exists():
        raise DetflowError(f"inference source {source} does not exist")
    if source.is_file() and source.suffix == ".json":
        yield from _coco_sources(source)
    elif source.is_file() and source.suffix == ".txt":
        for line in _read_text(source, "file list (one image path per line)").splitlines():
            if line.strip() and not line.startswith("#"):
                p = Path(line.strip())
                p = p if p.is_absolute() else source.parent / p
                yield line.strip(), None, p
    elif source.is_file():
        yield source.name, None, source
    else:
        for p in sorted(source.rglob("*")):
            if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES or looks_like_dicom(p)):
                yield p.relative_to(source).as_posix(), None, p


def collect_sources(source: Path) -> list[Source]:
    """Every input of ``source``, listed up front so that a bad source fails before a model loads or work starts."""
    return [(name, image_id if image_id is not None else index + 1, path)
            for index, (name, image_id, path) in enumerate(iter_sources(source))]


def run_batch(detector: OnnxDetector, source: Path | list[Source], out_dir: Path, batch: int = 8,
              render: bool = False, progress: bool = True, predictions_name: str = "predictions.json",
              workers: int = 1, max_pixels: int | None = None) -> BatchSummary:
    """Stream inputs through the engine, ``batch`` images per model call and ``workers`` calls at once (see
    :meth:`OnnxDetector.predict_stream`); write COCO-results JSON, an error list and optional renders.

    ``source``: a path (see :func:`iter_sources`) or the list :func:`collect_sources` made of one. Files are decoded
    by content with the service's rules (:meth:`OnnxDetector.decode`); one over ``max_pixels`` (None: the default
    limit, :data:`pipeline.data.imaging.DEFAULT_MAX_PIXELS`) is reported as ``image_too_large`` and skipped.
    """
    summary = BatchSummary(providers=detector.providers)
    items = source if isinstance(source, list) else collect_sources(source)
    results: list[dict] = []
    with tqdm(total=len(items), desc="inference", unit="img", disable=not progress) as bar:
        stream = detector.predict_stream(items, batch=batch, workers=workers,
                                         decode=lambda item: detector.decode(item[2], item[0], max_pixels).rgb)
        for r in stream:
            name, image_id, _ = r.source
            bar.update(1)
            if r.error is not None:
                kind = getattr(r.error, "kind", "unreadable")
                detail = getattr(r.error, "detail", None) or str(r.error)
                summary.errors.append({"file": name, "kind": kind, "detail": detail})
                continue
            d = r.detections
            assert d is not None and r.rgb is not None
            summary.n_images += 1
            summary.n_detections += len(d)
            for (x1, y1, x2, y2), s, c in zip(d.boxes, d.scores, d.labels, strict=True):
                results.append({"image_id": image_id, "file_name": name, "category_id": int(c) + 1,
                                "category": detector.classes[int(c)],
                                "bbox": [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2),
                                         round(float(y2 - y1), 2)], "score": round(float(s), 5)})
            if render:
                _render(r.rgb, d, detector.classes, out_dir / "rendered" / f"{Path(name).stem}.png")
    atomic_write_json(out_dir / predictions_name, results)
    atomic_write_json(out_dir / "infer_errors.json", summary.errors)
    return summary


def _render(rgb: object, dets: object, classes: list[str], out: Path) -> None:
    from PIL import Image, ImageDraw

    pic = Image.fromarray(rgb)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(pic)
    for b, s, c in zip(dets.boxes, dets.scores, dets.labels, strict=True):  # type: ignore[attr-defined]
        draw.rectangle([float(v) for v in b], outline=(255, 60, 40), width=2)
        draw.text((float(b[0]) + 2, max(0.0, float(b[1]) - 11)), f"{classes[int(c)]} {s:.2f}", fill=(255, 60, 40))
    out.parent.mkdir(parents=True, exist_ok=True)
    pic.save(out)
