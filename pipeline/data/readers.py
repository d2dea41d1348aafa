"""Readers for DICOM+CSV, Pascal VOC, COCO JSON and YOLO txt, all producing :class:`Sample` records.

Readers parse annotations only; pixels are decoded (and judged) once, later, by the prepare step.
Annotation problems found here are returned as :class:`Problem` records, never raised.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.data.imaging import DICOM_SUFFIXES, IMAGE_SUFFIXES, looks_like_dicom
from pipeline.data.records import Problem, Sample
from pipeline.errors import DataError

FORMATS = ("dicom_csv", "voc", "coco", "yolo")
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class ReadResult:
    samples: list[Sample]
    problems: list[Problem] = field(default_factory=list)
    classes: list[str] | None = None  # class order the dataset itself declares, if any
    sensitive: set[str] = field(default_factory=set)  # raw patient identifiers to redact from every output


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def detect_format(root: Path) -> str:
    """Guess a dataset's format from its layout; fail with the allowed values when unsure."""
    if root.is_file():
        if root.suffix.lower() == ".json":
            return "coco"
        raise DataError(f"cannot tell the format of file {root}; set data.format to one of: {', '.join(FORMATS)}")
    if (root / "Annotations").is_dir():
        return "voc"
    if (root / "labels").is_dir():
        return "yolo"
    if list(root.glob("*.csv")):
        return "dicom_csv"
    if list(root.glob("*.json")) or list(root.glob("annotations/*.json")):
        return "coco"
    raise DataError(
        f"cannot tell the format of {root}: expected Annotations/ (voc), labels/ (yolo), a .csv next to DICOM "
        f"files (dicom_csv) or a .json (coco); set data.format to one of: {', '.join(FORMATS)}"
    )


def _parse_float(text: str | None) -> float:
    if text is None:
        raise ValueError("missing value")
    value = float(str(text).strip())
    if not math.isfinite(value):
        raise ValueError(f"non-finite value {text!r}")
    return value


# ---------------------------------------------------------------------------------------------- DICOM + CSV

BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max", "label")


def read_dicom_csv(root: Path, csv_path: Path | None = None) -> ReadResult:
    """DICOM files anywhere under ``root`` plus one CSV of boxes keyed by ``file`` or ``sop_instance_uid``.

    The patient is the file's PatientID; a file whose header cannot be read keeps ``patient=None`` and is
    judged (and quarantined) when its pixels are decoded.
    """
    import pydicom

    if csv_path is None:
        csvs = sorted(root.glob("*.csv"))
        if len(csvs) != 1:
            raise DataError(f"expected exactly one box CSV in {root}, found {len(csvs)}: {[c.name for c in csvs]}")
        csv_path = csvs[0]
    problems: list[Problem] = []
    sensitive: set[str] = set()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() != ".csv"
                   and (p.suffix.lower() in DICOM_SUFFIXES or looks_like_dicom(p)))
    samples: dict[Path, Sample] = {}
    by_uid: dict[str, Path] = {}
    for path in files:
        patient = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["PatientID", "PatientName", "SOPInstanceUID"])
            patient = str(ds.get("PatientID", "") or "") or None
            uid = str(ds.get("SOPInstanceUID", "") or "")
            if uid:
                by_uid[uid] = path
            for tag in ("PatientID", "PatientName"):
                value = str(ds.get(tag, "") or "")
                if value:
                    sensitive.add(value)
        except Exception:  # judged when decoding pixels; the header alone decides nothing here
            pass
        samples[path] = Sample(image=path, source="dicom_csv", patient=patient)
    boxes: dict[Path, list[tuple[list[float], str]]] = defaultdict(list)
    missing: dict[str, int] = defaultdict(int)
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        lacking = [c for c in BOX_COLUMNS if c not in cols]
        if lacking or not ({"file", "sop_instance_uid"} & cols):
            raise DataError(
                f"{csv_path.name}: needs columns file or sop_instance_uid, and {', '.join(BOX_COLUMNS)}; "
                f"missing {lacking or ['file/sop_instance_uid']}"
            )
        for lineno, row in enumerate(reader, start=2):
            where = f"{csv_path.name}:{lineno}"
            target: Path | None = None
            ref = (row.get("file") or "").strip()
            uid = (row.get("sop_instance_uid") or "").strip()
            if ref:
                target = (root / ref) if not Path(ref).is_absolute() else Path(ref)
                if target not in samples:
                    missing[ref] += 1
                    problems.append(Problem(where, "missing_image", f"row refers to {ref}, which does not exist",
                                            "box_dropped"))
                    continue
            elif uid:
                target = by_uid.get(uid)
                if target is None:
                    problems.append(Problem(where, "missing_image",
                                            f"no DICOM file with SOPInstanceUID {uid}", "box_dropped"))
                    continue
            else:
                problems.append(Problem(where, "malformed_annotation", "row has neither file nor sop_instance_uid",
                                        "box_dropped"))
                continue
            try:
                xyxy = [_parse_float(row.get(c)) for c in BOX_COLUMNS[:4]]
            except ValueError as e:
                problems.append(Problem(where, "malformed_annotation", f"bad coordinate: {e}", "box_dropped"))
                continue
            label = (row.get("label") or "").strip()
            if not label:
                problems.append(Problem(where, "malformed_annotation", "empty label", "box_dropped"))
                continue
            boxes[target].append((xyxy, label))
    out = []
    for path, sample in samples.items():
        pairs = boxes.get(path, [])
        sample.boxes = [b for b, _ in pairs]  # type: ignore[assignment]
        sample.labels = [lab for _, lab in pairs]
        sample.__post_init__()
        out.append(sample)
    return ReadResult(samples=out, problems=problems, sensitive=sensitive)


# ---------------------------------------------------------------------------------------------- Pascal VOC


def _official_splits(root: Path) -> dict[str, str]:
    """stem -> split from ``ImageSets/Main/{train,val,test}.txt`` when present."""
    split_of: dict[str, str] = {}
    main = root / "ImageSets" / "Main"
    for name in SPLIT_NAMES:
        listing = main / f"{name}.txt"
        if listing.is_file():
            for line in listing.read_text().split():
                split_of.setdefault(line.strip(), name)
    return split_of


def _find_image(folder: Path, stem: str, filename: str | None) -> Path | None:
    if filename:
        candidate = folder / Path(filename).name
        if candidate.is_file():
            return candidate
    for suffix in IMAGE_SUFFIXES | {s.upper() for s in IMAGE_SUFFIXES}:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_voc(root: Path) -> ReadResult:
    """``Annotations/*.xml`` + ``JPEGImages/``; tolerant to layout variants (nested objects, float coords)."""
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    if not ann_dir.is_dir():
        raise DataError(f"{root} has no Annotations/ folder; not a Pascal VOC dataset")
    if not img_dir.is_dir():
        img_dir = root / "images" if (root / "images").is_dir() else root
    split_of = _official_splits(root)
    samples: list[Sample] = []
    problems: list[Problem] = []
    seen_images: set[Path] = set()
    for xml_path in sorted(ann_dir.glob("*.xml")):
        rel = _rel(xml_path, root)
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            problems.append(Problem(rel, "malformed_annotation", f"XML cannot be parsed: {e}", "image_quarantined"))
            continue
        filename = (tree.findtext("filename") or "").strip() or None
        image = _find_image(img_dir, xml_path.stem, filename)
        objects = tree.iter("object")
        boxes, labels = [], []
        for i, obj in enumerate(objects):
            name = (obj.findtext("name") or "").strip()
            bnd = obj.find("bndbox")
            if bnd is None:
                problems.append(Problem(rel, "malformed_annotation", f"object {i} ({name or 'no name'}) has no "
                                        "<bndbox>", "box_dropped"))
                continue
            try:
                xyxy = [_parse_float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            except ValueError as e:
                problems.append(Problem(rel, "malformed_annotation", f"object {i} ({name}): {e}", "box_dropped"))
                continue
            if not name:
                problems.append(Problem(rel, "malformed_annotation", f"object {i} has no <name>", "box_dropped"))
                continue
            boxes.append(xyxy)
            labels.append(name)
        if image is None:
            problems.append(Problem(rel, "missing_image", f"image {filename or xml_path.stem} not found in "
                                    f"{_rel(img_dir, root)}/; {len(boxes)} boxes dropped", "box_dropped"))
            continue
        size_hint = None
        size = tree.find("size")
        if size is not None:
            try:
                size_hint = (int(_parse_float(size.findtext("width"))), int(_parse_float(size.findtext("height"))))
            except ValueError:
                size_hint = None
        seen_images.add(image)
        samples.append(Sample(image=image, source="voc", patient=None, boxes=boxes, labels=labels,
                              official_split=split_of.get(xml_path.stem), size_hint=size_hint))
    for image in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if image not in seen_images:
            problems.append(Problem(_rel(image, root), "missing_annotation", "no XML in Annotations/",
                                    "image_quarantined"))
    return ReadResult(samples=samples, problems=problems)


# ---------------------------------------------------------------------------------------------- COCO JSON


def read_coco(path: Path) -> ReadResult:
    """A COCO detection JSON; images resolved next to it or under ``images/``. ``patient_id`` is honoured."""
    json_path = path
    if path.is_dir():
        found = sorted(path.glob("*.json")) or sorted(path.glob("annotations/*.json"))
        if len(found) != 1:
            raise DataError(f"expected one COCO .json in {path}, found {len(found)}")
        json_path = found[0]
    base = json_path.parent if json_path.parent.name != "annotations" else json_path.parent.parent
    try:
        doc = json.loads(json_path.read_text())
        images, anns, cats = doc["images"], doc.get("annotations", []), doc["categories"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{json_path.name} is not a COCO detection file: {e}") from None
    cat_name = {c["id"]: str(c["name"]) for c in cats}
    classes = [cat_name[k] for k in sorted(cat_name)]
    problems: list[Problem] = []
    by_image: dict[object, list[dict]] = defaultdict(list)
    for ann in anns:
        by_image[ann.get("image_id")].append(ann)
    samples = []
    known_ids = set()
    for img in images:
        known_ids.add(img.get("id"))
        name = str(img.get("file_name", ""))
        candidates = [base / name, base / "images" / name, base / "images" / Path(name).name]
        image = next((c for c in candidates if c.is_file()), None)
        boxes, labels = [], []
        for ann in by_image.get(img.get("id"), []):
            where = f"{json_path.name}#annotation {ann.get('id')}"
            try:
                x, y, w, h = (_parse_float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError) as e:
                problems.append(Problem(where, "malformed_annotation", f"bad bbox: {e}", "box_dropped"))
                continue
            cid = ann.get("category_id")
            if cid not in cat_name:
                problems.append(Problem(where, "unknown_class", f"category_id {cid} is not in categories",
                                        "box_dropped"))
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(cat_name[cid])
        if image is None:
            problems.append(Problem(name or str(img.get("id")), "missing_image",
                                    f"image file not found next to {json_path.name}; {len(boxes)} boxes dropped",
                                    "box_dropped"))
            continue
        patient = img.get("patient_id") or img.get("patient")
        size_hint = (int(img["width"]), int(img["height"])) if "width" in img and "height" in img else None
        samples.append(Sample(image=image, source="coco", patient=str(patient) if patient else None, boxes=boxes,
                              labels=labels, official_split=img.get("split"), size_hint=size_hint))
    for image_id, group in by_image.items():
        if image_id not in known_ids:
            problems.append(Problem(f"{json_path.name}#image {image_id}", "missing_image",
                                    f"{len(group)} annotations refer to an image id not in images", "box_dropped"))
    return ReadResult(samples=samples, problems=problems, classes=classes,
                      sensitive={s.patient for s in samples if s.patient})


# ---------------------------------------------------------------------------------------------- YOLO txt


def _yolo_names(root: Path) -> list[str] | None:
    for name in ("data.yaml", "dataset.yaml"):
        f = root / name
        if f.is_file():
            names = (yaml.safe_load(f.read_text()) or {}).get("names")
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names)]
            if isinstance(names, list):
                return [str(n) for n in names]
    if (root / "classes.txt").is_file():
        return [line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip()]
    return None


def read_yolo(root: Path) -> ReadResult:
    """``images/[split/]*`` + ``labels/[split/]*.txt`` (normalised ``cls cx cy w h``), names from data.yaml."""
    from PIL import Image

    classes = _yolo_names(root)
    if classes is None:
        raise DataError(f"{root}: YOLO datasets need class names in data.yaml (names:) or classes.txt")
    img_root, lbl_root = root / "images", root / "labels"
    samples: list[Sample] = []
    problems: list[Problem] = []
    images = sorted(p for p in img_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for image in images:
        rel_img = image.relative_to(img_root)
        split = rel_img.parts[0] if len(rel_img.parts) > 1 and rel_img.parts[0] in SPLIT_NAMES else None
        label_file = (lbl_root / rel_img).with_suffix(".txt")
        rel = _rel(label_file, root)
        boxes, labels = [], []
        if label_file.is_file():
            try:
                with Image.open(image) as im:
                    width, height = im.size
            except Exception:
                width = height = 0  # decoding judges this image later; boxes cannot be scaled
            for lineno, line in enumerate(label_file.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    if len(parts) != 5:
                        raise ValueError(f"expected 5 fields, got {len(parts)}")
                    cls = int(parts[0])
                    cx, cy, w, h = (_parse_float(v) for v in parts[1:])
                except ValueError as e:
                    problems.append(Problem(f"{rel}:{lineno}", "malformed_annotation", str(e), "box_dropped"))
                    continue
                if not 0 <= cls < len(classes):
                    problems.append(Problem(f"{rel}:{lineno}", "unknown_class",
                                            f"class index {cls} outside 0..{len(classes) - 1}", "box_dropped"))
                    continue
                boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                              (cy + h / 2) * height])
                labels.append(classes[cls])
        samples.append(Sample(image=image, source="yolo", boxes=boxes, labels=labels, official_split=split))
    if lbl_root.is_dir():
        stems = {(img_root / p.relative_to(img_root)).with_suffix("") for p in images}
        for label_file in sorted(lbl_root.rglob("*.txt")):
            if (img_root / label_file.relative_to(lbl_root)).with_suffix("") not in stems:
                problems.append(Problem(_rel(label_file, root), "missing_image", "label file without an image",
                                        "box_dropped"))
    return ReadResult(samples=samples, problems=problems, classes=classes)


def read_dataset(root: Path, fmt: str = "auto") -> tuple[ReadResult, str]:
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist")
    if fmt == "auto":
        fmt = detect_format(root)
    readers = {"dicom_csv": read_dicom_csv, "voc": read_voc, "coco": read_coco, "yolo": read_yolo}
    if fmt not in readers:
        raise DataError(f"unknown data.format {fmt!r}; expected one of: auto, {', '.join(FORMATS)}")
    return readers[fmt](root), fmt
