"""The prepare stage: raw dataset -> validated, patient-split canonical dataset (YOLO + COCO + manifest)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from pipeline.config import Params
from pipeline.data.imaging import ImageLoadError, encode_png, load_any
from pipeline.data.readers import ReadResult, read_dataset
from pipeline.data.records import PROBLEM_KINDS, Problem, Sample
from pipeline.data.split import SPLITS, assert_no_leakage, pseudonymise, split_by_patient
from pipeline.data.validate import validate_boxes
from pipeline.errors import DataError
from pipeline.fileio import atomic_directory, atomic_write_json

# Known sources: where they come from, their format and their class order (the model's class indices).
BUILTIN_SOURCES = {
    "phantom": {"format": "dicom_csv", "classes": ["nodule"]},
    "bccd": {"format": "voc", "classes": ["RBC", "WBC", "Platelets"]},
}
MANIFEST_COLUMNS = ("image", "split", "patient", "sha256", "width", "height", "n_boxes")


@dataclass
class PreparedImage:
    name: str
    split: str
    patient: str
    data: bytes
    suffix: str
    width: int
    height: int
    boxes: np.ndarray
    classes: np.ndarray


@dataclass
class PrepareResult:
    out_dir: Path
    report: dict
    n_images: int
    n_boxes: int
    split_counts: dict[str, int]


def resolve_source(params: Params, raw_dir: Path, mirrors: list[Path] | None, phantom_dir: Path) -> tuple[Path, str,
                                                                                                           dict]:
    """Map ``data.source`` to a folder, a format and provenance facts."""
    source = params.data.source
    if source == "phantom":
        if not phantom_dir.exists():
            raise DataError(f"phantom dataset not found at {phantom_dir}; run `detflow phantom` (or `dvc repro`)")
        return phantom_dir, "dicom_csv", {"source": "phantom"}
    if source == "bccd":
        from pipeline import assets

        root = assets.resolve("bccd", raw_dir=raw_dir, mirrors=mirrors)
        return root, "voc", {"source": "bccd", "asset_sha256": assets.ASSETS["bccd"].sha256}
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"data.source {source!r} is neither a known dataset (phantom, bccd) nor an existing path"
        )
    return path, params.data.format, {"source": str(path)}


def _unique_name(base: str, taken: set[str], key: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base) or "image"
    name = base
    if name in taken:
        name = f"{base}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    taken.add(name)
    return name


class _Redactor:
    """Replaces raw patient identifiers with their pseudonyms in every string that leaves the stage."""

    def __init__(self, sensitive: set[str], salt: str) -> None:
        items = sorted((s for s in sensitive if len(s) >= 3), key=len, reverse=True)
        self.mapping = {s: pseudonymise(s, salt) for s in items}
        self.pattern = re.compile("|".join(re.escape(s) for s in items)) if items else None

    def __call__(self, text: str) -> str:
        return self.pattern.sub(lambda m: self.mapping[m.group(0)], text) if self.pattern else text


def _class_list(params: Params, read: ReadResult, builtin: dict | None) -> list[str]:
    if params.data.classes:
        return list(params.data.classes)
    if read.classes:
        return list(read.classes)
    if builtin:
        return list(builtin["classes"])
    return sorted({label for s in read.samples for label in s.labels})


def _load_and_validate(sample: Sample, rel: str, params: Params, classes: list[str],
                       problems: list[Problem]) -> tuple | None:
    window = tuple(params.data.window) if isinstance(params.data.window, tuple | list) else None
    try:
        loaded = load_any(sample.image, window)  # type: ignore[arg-type]
    except ImageLoadError as e:
        problems.append(Problem(rel, e.kind, e.detail, "image_quarantined"))
        return None
    for kind, detail in loaded.conversions:
        problems.append(Problem(rel, kind, detail, "fixed"))
    if sample.size_hint and sample.size_hint != (loaded.width, loaded.height) and sample.size_hint != (0, 0):
        problems.append(Problem(rel, "size_mismatch", f"annotation says {sample.size_hint[0]}x{sample.size_hint[1]}, "
                                f"file is {loaded.width}x{loaded.height}; the file's size is used", "fixed"))
    boxes, cls, box_problems = validate_boxes(rel, sample.boxes, sample.labels, loaded.width, loaded.height, classes,
                                              params.prepare.clip_tolerance_px, params.prepare.duplicate_iou,
                                              params.prepare.near_duplicate_iou)
    problems.extend(box_problems)
    return loaded, boxes, cls


def prepare_dataset(
    params: Params,
    out_dir: Path,
    report_path: Path,
    raw_dir: Path = Path("data/raw"),
    phantom_dir: Path = Path("data/raw/phantom"),
    mirrors: list[Path] | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Read, validate, split and write the canonical dataset; the report is written even when the stage fails."""
    root, fmt, provenance = resolve_source(params, raw_dir, mirrors, phantom_dir)
    builtin = BUILTIN_SOURCES.get(params.data.source)
    read, fmt = read_dataset(root, fmt)
    classes = _class_list(params, read, builtin)
    salt = params.prepare.pseudonym_salt
    redact = _Redactor(read.sensitive, salt)
    problems: list[Problem] = list(read.problems)
    candidates = len(read.samples) + sum(p.action == "image_quarantined" for p in read.problems)

    split_mode = params.prepare.split
    has_official = any(s.official_split for s in read.samples)
    if split_mode == "auto":
        split_mode = "official" if has_official else "patient"
    if split_mode == "official" and not has_official:
        raise DataError(f"prepare.split is 'official' but {params.data.source} has no official split files; "
                        "expected one of: auto, patient, official")

    kept: list[tuple[Sample, str, object, np.ndarray, np.ndarray]] = []
    for sample in tqdm(read.samples, desc="validating", unit="img", disable=not progress):
        rel = sample.image.relative_to(root).as_posix() if sample.image.is_relative_to(root) else sample.image.name
        if split_mode == "official" and not sample.official_split:
            problems.append(Problem(rel, "not_in_official_split", "listed in no ImageSets split file",
                                    "image_quarantined"))
            continue
        result = _load_and_validate(sample, rel, params, classes, problems)
        if result is not None:
            loaded, boxes, cls = result
            kept.append((sample, rel, loaded, boxes, cls))

    if not kept:
        raise DataError(f"no usable images in {params.data.source}: {len(problems)} problems, see {report_path}")
    patient_of = {rel: pseudonymise(s.patient if s.patient else f"image:{rel}", salt) for s, rel, *_ in kept}
    if split_mode == "official":
        split_of_rel = {rel: s.official_split for s, rel, *_ in kept}
    else:
        positive: dict[str, bool] = defaultdict(bool)
        for _, rel, _, boxes, _ in kept:
            positive[patient_of[rel]] |= len(boxes) > 0
        by_patient = split_by_patient(positive, params.prepare.val_fraction, params.prepare.test_fraction,
                                      params.prepare.seed)
        split_of_rel = {rel: by_patient[patient_of[rel]] for rel in patient_of}
    assert_no_leakage((patient_of[rel], split_of_rel[rel]) for rel in patient_of)

    taken: set[str] = set()
    images: list[PreparedImage] = []
    for sample, rel, loaded, boxes, cls in kept:
        base = Path(rel).stem
        if sample.source == "dicom_csv":  # DICOM file names often carry patient IDs; lead with the pseudonym
            base = f"{patient_of[rel]}_{Path(redact(rel)).stem}"
        name = _unique_name(redact(base), taken, rel)
        data = loaded.encoded if loaded.encoded is not None else encode_png(loaded.rgb)
        images.append(PreparedImage(name, split_of_rel[rel], patient_of[rel], data, loaded.suffix if loaded.encoded
                                    else ".png", loaded.width, loaded.height, boxes, cls))

    problems = [Problem(redact(p.file), p.kind, redact(p.detail), p.action) for p in problems]
    n_bad = sum(p.action == "image_quarantined" for p in problems)
    bad_fraction = n_bad / max(candidates, 1)
    windows = sorted({tuple(round(v, 3) for v in k[2].window) for k in kept if k[2].window})
    report = _report(params, provenance, fmt, classes, split_mode, images, problems, candidates, bad_fraction)
    atomic_write_json(report_path, report)
    if bad_fraction > params.prepare.max_bad_fraction:
        raise DataError(
            f"{n_bad} of {candidates} images quarantined ({bad_fraction:.1%}) exceeds prepare.max_bad_fraction "
            f"({params.prepare.max_bad_fraction:.1%}); see {report_path}"
        )
    info = {**provenance, "format": fmt, "classes": classes, "split_mode": split_mode,
            "dicom_window": ("params" if isinstance(params.data.window, tuple | list) else "file tags")
            if windows else None, "dicom_windows_used": [list(w) for w in windows]}
    _write_dataset(out_dir, images, classes, info)
    return PrepareResult(out_dir=out_dir, report=report, n_images=len(images),
                         n_boxes=int(sum(len(i.boxes) for i in images)),
                         split_counts=dict(Counter(i.split for i in images)))


def _report(params: Params, provenance: dict, fmt: str, classes: list[str], split_mode: str,
            images: list[PreparedImage], problems: list[Problem], candidates: int, bad_fraction: float) -> dict:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for p in problems:
        by_kind[p.kind][p.action] += 1
    splits = {}
    for split in SPLITS:
        members = [i for i in images if i.split == split]
        pats = {i.patient for i in members}
        splits[split] = {
            "images": len(members),
            "patients": len(pats),
            "positive_patients": len({i.patient for i in members if len(i.boxes)}),
            "boxes": int(sum(len(i.boxes) for i in members)),
            "boxes_per_class": {c: int(sum((i.classes == k).sum() for i in members)) for k, c in enumerate(classes)},
        }
    return {
        **provenance,
        "format": fmt,
        "classes": classes,
        "split_mode": split_mode,
        "summary": {
            "images_in": candidates,
            "images_out": len(images),
            "images_quarantined": sum(p.action == "image_quarantined" for p in problems),
            "boxes_out": int(sum(len(i.boxes) for i in images)),
            "boxes_dropped": sum(p.action == "box_dropped" for p in problems),
            "fixed": sum(p.action == "fixed" for p in problems),
            "bad_fraction": round(bad_fraction, 6),
            "max_bad_fraction": params.prepare.max_bad_fraction,
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        },
        "splits": splits,
        "kinds": {k: PROBLEM_KINDS.get(k, "") for k in sorted(by_kind)},
        "problems": [p.to_dict() for p in problems],
    }


def _yolo_lines(img: PreparedImage) -> str:
    lines = []
    for (x1, y1, x2, y2), c in zip(img.boxes, img.classes, strict=True):
        cx, cy = (x1 + x2) / 2 / img.width, (y1 + y2) / 2 / img.height
        w, h = (x2 - x1) / img.width, (y2 - y1) / img.height
        lines.append(f"{int(c)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")


def _coco(images: list[PreparedImage], classes: list[str], split: str) -> dict:
    doc: dict = {"info": {"description": f"detflow prepared dataset, split {split}"}, "licenses": [],
                 "images": [], "annotations": [],
                 "categories": [{"id": k + 1, "name": c, "supercategory": "lesion"} for k, c in enumerate(classes)]}
    ann_id = 1
    for image_id, img in enumerate((i for i in images if i.split == split), start=1):
        doc["images"].append({"id": image_id, "file_name": f"images/{split}/{img.name}{img.suffix}",
                              "width": img.width, "height": img.height, "patient": img.patient})
        for (x1, y1, x2, y2), c in zip(img.boxes, img.classes, strict=True):
            w, h = float(x2 - x1), float(y2 - y1)
            doc["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": int(c) + 1,
                                       "bbox": [round(float(x1), 3), round(float(y1), 3), round(w, 3), round(h, 3)],
                                       "area": round(w * h, 3), "iscrowd": 0})
            ann_id += 1
    return doc


def _write_dataset(out_dir: Path, images: list[PreparedImage], classes: list[str], info: dict) -> None:
    with atomic_directory(out_dir) as stage:
        manifest = io.StringIO()
        writer = csv.writer(manifest, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for split in SPLITS:
            (stage / "images" / split).mkdir(parents=True)
            (stage / "labels" / split).mkdir(parents=True)
        for img in sorted(images, key=lambda i: (SPLITS.index(i.split), i.name)):
            rel = f"images/{img.split}/{img.name}{img.suffix}"
            (stage / rel).write_bytes(img.data)
            (stage / "labels" / img.split / f"{img.name}.txt").write_text(_yolo_lines(img))
            writer.writerow([rel, img.split, img.patient, hashlib.sha256(img.data).hexdigest(), img.width,
                             img.height, len(img.boxes)])
        (stage / "manifest.csv").write_text(manifest.getvalue())
        (stage / "coco").mkdir()
        for split in SPLITS:
            (stage / "coco" / f"{split}.json").write_text(json.dumps(_coco(images, classes, split)))
        dataset = {  # no `path:` key: Ultralytics then resolves splits next to this file, wherever it is
            "train": "images/train", "val": "images/val", "test": "images/test",
            "nc": len(classes), "names": dict(enumerate(classes)),
        }
        (stage / "dataset.yaml").write_text(
            "# Written by `detflow prepare`; do not edit. Pass this file's absolute path to Ultralytics.\n"
            + yaml.safe_dump(dataset, sort_keys=False))
        info = {**info, "manifest_sha256": hashlib.sha256(manifest.getvalue().encode()).hexdigest()}
        (stage / "prepare_info.json").write_text(json.dumps(info, indent=2) + "\n")
