"""The prepare stage: raw dataset -> validated, patient-split canonical dataset (YOLO + COCO + manifest).

Size: the stage itself: read, decode and validate, de-duplicate, split, count (totals), publish
atomically; each step is a function, kept beside the others so the order of the rules is visible.
"""

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

from pipeline.data.dedupe import canonicalise
from pipeline.data.imaging import ImageLoadError, LoadedImage, encode_png, load_any, orient_boxes
from pipeline.data.readers import ReadResult, read_dataset
from pipeline.data.records import PROBLEM_KINDS, Problem, Sample
from pipeline.data.split import SPLITS, assert_no_leakage, pseudonymise, split_by_patient
from pipeline.data.validate import validate_boxes
from pipeline.errors import DataError
from pipeline.fileio import atomic_outputs, atomic_write_json, recover_outputs
from pipeline.params import BaseParams as Params

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
    pixel_spacing: float | None = None  # DICOM PixelSpacing, mm per pixel (None: not stated); in the COCO entry


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


def _decode(path: Path, samples: list[Sample], rel: str, params: Params,
            problems: list[Problem]) -> tuple[LoadedImage, bytes] | None:
    """Decode one image file (once, however many records name it) and the bytes prepare would write for it."""
    window = tuple(params.data.window) if isinstance(params.data.window, tuple | list) else None
    try:
        loaded = load_any(path, window)  # type: ignore[arg-type]
    except ImageLoadError as e:
        problems.append(Problem(rel, e.kind, e.detail, "image_quarantined", boxes=sum(len(s.boxes) for s in samples),
                                image=path))
        return None
    return loaded, loaded.encoded if loaded.encoded is not None else encode_png(loaded.rgb)


def _validate(sample: Sample, loaded: LoadedImage, rel: str, params: Params, classes: list[str],
              problems: list[Problem]) -> tuple[np.ndarray, np.ndarray]:
    boxes = sample.boxes
    upright = (loaded.width, loaded.height)
    stored = (loaded.height, loaded.width) if loaded.orientation >= 5 else upright
    for kind, detail in loaded.conversions:
        if kind == "exif_orientation":
            boxes, how = _orient_labels(sample, loaded.orientation, stored, upright)
            detail = f"{detail}; {how}"
        problems.append(Problem(rel, kind, detail, "fixed"))
    if sample.size_hint and sample.size_hint not in (upright, stored):
        problems.append(Problem(rel, "size_mismatch", f"annotation says {sample.size_hint[0]}x{sample.size_hint[1]}, "
                                f"file is {loaded.width}x{loaded.height}; the file's size is used", "fixed"))
    boxes, cls, box_problems = validate_boxes(rel, boxes, sample.labels, loaded.width, loaded.height, classes,
                                              params.prepare.clip_tolerance_px, params.prepare.duplicate_iou,
                                              params.prepare.near_duplicate_iou)
    problems.extend(box_problems)
    return boxes, cls


def _orient_labels(sample: Sample, orientation: int, stored: tuple[int, int],
                   upright: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Boxes of an EXIF-rotated image in its upright frame, and how the frame they were drawn in was decided.

    The format decides when it can (YOLO: upright, as Ultralytics reads it); else a stated image size that matches
    only the stored or only the upright dimensions; else the stored frame (what annotation tools that ignore EXIF,
    and Pillow, show).
    """
    frame, why = sample.label_frame, f"the {sample.source} format draws labels on the upright image"
    if frame is None and sample.size_hint and stored != upright:
        if sample.size_hint == stored:
            frame, why = "stored", f"the annotation's size {stored[0]}x{stored[1]} is the stored frame"
        elif sample.size_hint == upright:
            frame, why = "upright", f"the annotation's size {upright[0]}x{upright[1]} is the upright frame"
    if frame is None:
        frame, why = "stored", "no stated size tells the frame apart: the stored frame is assumed"
    if frame == "upright":
        return sample.boxes, f"boxes kept as drawn ({why})"
    return orient_boxes(sample.boxes, orientation, *stored), f"boxes turned with the pixels ({why})"


def _merged_patients(patient_of: dict[str, str], groups: list[list[str]]) -> dict[str, str]:
    """patient -> the group it is split with: patients sharing a byte-identical image are one group."""
    parent = {p: p for p in patient_of.values()}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for rels in groups:
        roots = sorted({find(patient_of[r]) for r in rels if r in patient_of})
        for other in roots[1:]:
            parent[other] = roots[0]
    return {p: find(p) for p in parent}


def prepare_dataset(
    params: Params,
    out_dir: Path,
    report_path: Path,
    raw_dir: Path = Path("data/raw"),
    phantom_dir: Path = Path("data/raw/phantom"),
    mirrors: list[Path] | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Read, validate, split and write the canonical dataset and its report together (one commit).

    When the stage fails on the data (nothing usable, too many quarantined) the report is still written, with
    ``status: failed`` and no ``manifest_sha256``, and the previous dataset (if any) is left as it was.
    """
    recover_outputs(out_dir, report_path)  # finish or undo what a killed run left
    root, fmt, provenance = resolve_source(params, raw_dir, mirrors, phantom_dir)
    builtin = BUILTIN_SOURCES.get(params.data.source)
    read, fmt = read_dataset(root, fmt)
    classes = _class_list(params, read, builtin)
    salt = params.prepare.pseudonym_salt
    redact = _Redactor(read.sensitive, salt)

    def rel_of(path: Path) -> str:
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name

    records: dict[Path, list[Sample]] = defaultdict(list)
    for sample in read.samples:
        records[sample.image].append(sample)
    problems: list[Problem] = list(read.problems)
    decoded: dict[Path, tuple[LoadedImage, bytes]] = {}
    for path, recs in tqdm(records.items(), desc="decoding", unit="img", disable=not progress):
        if (result := _decode(path, recs, rel_of(path), params, problems)) is not None:
            decoded[path] = result
    usable = [s for s in read.samples if s.image in decoded]
    canon = canonicalise(usable, {p: rel_of(p) for p in decoded},
                         {p: hashlib.sha256(data).hexdigest() for p, (_, data) in decoded.items()})
    problems += canon.problems

    split_mode = params.prepare.split
    has_official = any(s.official_split for s in canon.samples)
    if split_mode == "auto":  # a mixed folder uses official splits only when every part ships them
        every = all(s.official_split for s in canon.samples)
        split_mode = "official" if has_official and (fmt != "mixed" or every) else "patient"
    if split_mode == "official" and not has_official:
        raise DataError(f"prepare.split is 'official' but {params.data.source} has no official split files; "
                        "expected one of: auto, patient, official")

    kept: list[tuple[Sample, str, LoadedImage, bytes, np.ndarray, np.ndarray]] = []
    for sample in canon.samples:
        rel = rel_of(sample.image)
        if split_mode == "official" and not sample.official_split:
            problems.append(Problem(rel, "not_in_official_split", "listed in no official split",
                                    "image_quarantined", boxes=len(sample.boxes), image=sample.image))
            continue
        loaded, data = decoded[sample.image]
        boxes, cls = _validate(sample, loaded, rel, params, classes, problems)
        kept.append((sample, rel, loaded, data, boxes, cls))

    groups = [[rel_of(f) for f in g] for g in canon.groups]
    patient_of = {rel: pseudonymise(s.patient if s.patient else f"image:{rel}", salt) for s, rel, *_ in kept}
    if split_mode == "official":
        split_of_rel = {rel: str(s.official_split) for s, rel, *_ in kept}
        for rels in groups:
            present = [r for r in rels if r in split_of_rel]
            if len({split_of_rel[r] for r in present}) > 1:
                target = min((split_of_rel[r] for r in present), key=SPLITS.index)
                for r in present:
                    if split_of_rel[r] != target:
                        problems.append(Problem(r, "duplicate_content", f"officially in {split_of_rel[r]}, moved to "
                                                f"{target} with its identical copies {present}", "fixed"))
                        split_of_rel[r] = target
    else:
        group_of = _merged_patients(patient_of, groups)
        positive: dict[str, bool] = defaultdict(bool)
        for _, rel, _, _, boxes, _ in kept:
            positive[group_of[patient_of[rel]]] |= len(boxes) > 0
        by_group = split_by_patient(positive, params.prepare.val_fraction, params.prepare.test_fraction,
                                    params.prepare.seed)
        split_of_rel = {rel: by_group[group_of[patient_of[rel]]] for rel in patient_of}
    assert_no_leakage((patient_of[rel], split_of_rel[rel]) for rel in patient_of)
    assert_no_leakage((g[0], split_of_rel[r]) for g in groups for r in g if r in split_of_rel)

    taken: set[str] = set()
    images: list[PreparedImage] = []
    for sample, rel, loaded, data, boxes, cls in kept:
        base = Path(rel).stem
        if sample.source == "dicom_csv" or loaded.window is not None:  # DICOM names often carry patient IDs
            base = f"{patient_of[rel]}_{Path(redact(rel)).stem}"
        name = _unique_name(redact(base), taken, rel)
        images.append(PreparedImage(name, split_of_rel[rel], patient_of[rel], data, loaded.suffix if loaded.encoded
                                    else ".png", loaded.width, loaded.height, boxes, cls, loaded.pixel_spacing))

    totals = _totals(read, problems, images)
    problems = [p.with_text(redact(p.file), redact(p.detail)) for p in problems]
    n_bad, candidates = totals["images"]["quarantined"], totals["images"]["found"]
    bad_fraction = n_bad / max(candidates, 1)
    windows = sorted({tuple(round(v, 3) for v in k[2].window) for k in kept if k[2].window})
    report = _report(params, provenance, fmt, classes, split_mode, images, problems, totals, bad_fraction)
    failure = None
    if not images:
        failure = f"no usable images in {params.data.source}: {len(problems)} problems, see {report_path}"
    elif bad_fraction > params.prepare.max_bad_fraction:
        failure = (f"{n_bad} of {candidates} images quarantined ({bad_fraction:.1%}) exceeds "
                   f"prepare.max_bad_fraction ({params.prepare.max_bad_fraction:.1%}); see {report_path}")
    if failure is not None:
        previous = _manifest_sha256_of(out_dir)
        report = {"status": "failed", "error": failure, "manifest_sha256": None,
                  "dataset": f"not written; {out_dir} " + (f"still holds the previous dataset (manifest sha256 "
                                                           f"{previous})" if previous else "is absent"),
                  **report}
        atomic_write_json(report_path, report)
        raise DataError(failure)
    info = {**provenance, "format": fmt, "classes": classes, "split_mode": split_mode,
            "dicom_window": ("params" if isinstance(params.data.window, tuple | list) else "file tags")
            if windows else None, "dicom_windows_used": [list(w) for w in windows],
            "pixel_spacing": _spacing_summary([k[2].pixel_spacing for k in kept])}
    manifest = _manifest(images)
    digest = hashlib.sha256(manifest.encode()).hexdigest()
    report = {"status": "ok", "manifest_sha256": digest, **report}
    with atomic_outputs(out_dir, report_path) as (stage, staged_report):
        stage.mkdir(mode=0o777)  # the umask applies: 0755 by default
        _write_dataset(stage, images, classes, {**info, "manifest_sha256": digest}, manifest)
        staged_report.write_text(json.dumps(report, indent=2) + "\n")
    return PrepareResult(out_dir=out_dir, report=report, n_images=len(images),
                         n_boxes=int(sum(len(i.boxes) for i in images)),
                         split_counts=dict(Counter(i.split for i in images)))


def _spacing_summary(spacings: list[float | None]) -> dict | None:
    """The dataset's pixel spacing from its DICOM tags (the model card's training spacing, which inference and
    `detflow adapt` bring other sites' images to); None when no image stated one (JPEG/PNG sources)."""
    known = [s for s in spacings if s is not None]
    if not known:
        return None
    return {"unit": "mm", "source": "DICOM PixelSpacing", "median": round(float(np.median(known)), 6),
            "min": round(min(known), 6), "max": round(max(known), 6), "n_images": len(known),
            "n_without": len(spacings) - len(known)}


def _manifest_sha256_of(out_dir: Path) -> str | None:
    try:
        return str(json.loads((out_dir / "prepare_info.json").read_text())["manifest_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _totals(read: ReadResult, problems: list[Problem], images: list[PreparedImage]) -> dict:
    """Reconcile images and boxes: found = written + quarantined; read = written + dropped."""
    quarantined = {p.image for p in problems if p.action == "image_quarantined" and p.image is not None}
    found = {s.image for s in read.samples} | quarantined
    boxes_read = sum(len(s.boxes) for s in read.samples) + sum(p.boxes for p in read.problems)
    dropped: Counter = Counter()
    for p in problems:
        if p.boxes:
            dropped[p.kind] += p.boxes
    written = int(sum(len(i.boxes) for i in images))
    return {
        "images": {"found": len(found), "written": len(images), "quarantined": len(quarantined),
                   "annotation_refs_missing": sum(p.kind == "missing_image" for p in problems)},
        "boxes": {"read": int(boxes_read), "written": written, "dropped": int(sum(dropped.values())),
                  "dropped_by_kind": dict(sorted(dropped.items()))},
        "reconciled": len(found) == len(images) + len(quarantined)
        and boxes_read == written + sum(dropped.values()),
    }


def _report(params: Params, provenance: dict, fmt: str, classes: list[str], split_mode: str,
            images: list[PreparedImage], problems: list[Problem], totals: dict, bad_fraction: float) -> dict:
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
            "images_in": totals["images"]["found"],
            "images_out": len(images),
            "images_quarantined": totals["images"]["quarantined"],
            "boxes_out": int(sum(len(i.boxes) for i in images)),
            "boxes_dropped": totals["boxes"]["dropped"],
            "fixed": sum(p.action == "fixed" for p in problems),
            "bad_fraction": round(bad_fraction, 6),
            "max_bad_fraction": params.prepare.max_bad_fraction,
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        },
        "totals": totals,
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
        entry = {"id": image_id, "file_name": f"images/{split}/{img.name}{img.suffix}",
                 "width": img.width, "height": img.height, "patient": img.patient}
        if img.pixel_spacing is not None:  # the PNG lost the DICOM tag; scoring restores it (pipeline.evaluate)
            entry["pixel_spacing"] = img.pixel_spacing  # exact: the engine letterboxes from this very value
        doc["images"].append(entry)
        for (x1, y1, x2, y2), c in zip(img.boxes, img.classes, strict=True):
            w, h = float(x2 - x1), float(y2 - y1)
            doc["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": int(c) + 1,
                                       "bbox": [round(float(x1), 3), round(float(y1), 3), round(w, 3), round(h, 3)],
                                       "area": round(w * h, 3), "iscrowd": 0})
            ann_id += 1
    return doc


def _manifest(images: list[PreparedImage]) -> str:
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for img in sorted(images, key=lambda i: (SPLITS.index(i.split), i.name)):
        writer.writerow([f"images/{img.split}/{img.name}{img.suffix}", img.split, img.patient,
                         hashlib.sha256(img.data).hexdigest(), img.width, img.height, len(img.boxes)])
    return manifest.getvalue()


def _write_dataset(stage: Path, images: list[PreparedImage], classes: list[str], info: dict, manifest: str) -> None:
    """Write the dataset into the (empty, staged) folder ``stage``."""
    for split in SPLITS:
        (stage / "images" / split).mkdir(parents=True)
        (stage / "labels" / split).mkdir(parents=True)
    for img in images:
        (stage / f"images/{img.split}/{img.name}{img.suffix}").write_bytes(img.data)
        (stage / "labels" / img.split / f"{img.name}.txt").write_text(_yolo_lines(img))
    (stage / "manifest.csv").write_text(manifest)
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
    (stage / "prepare_info.json").write_text(json.dumps(info, indent=2) + "\n")
