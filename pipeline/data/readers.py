"""Readers for DICOM+CSV, Pascal VOC, COCO JSON and YOLO txt, all producing :class:`Sample` records, and for a
folder whose subfolders are datasets in any of these formats (``mixed``).

Readers parse annotations only; pixels are decoded (and judged) once, later, by the prepare step.
Annotation problems found here are returned as :class:`Problem` records, never raised: a reader raises
:class:`DataError` only when the dataset as a whole cannot be read (no class names, no annotation file).
Every file under the dataset folder ends up used or recorded (see :func:`inventory`).

Size: four formats and the mixed folder share the hostile-input rules (encodings, accounting of every
file); one module keeps those rules identical across formats.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.data.imaging import DICOM_SUFFIXES, IMAGE_SUFFIXES, exif_orientation, looks_like_dicom
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
    seen: set[Path] = field(default_factory=set)  # files this reader used or recorded (annotations, images)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def read_text(path: Path, root: Path, problems: list[Problem]) -> str:
    """A text file as UTF-8 (a BOM is dropped); otherwise Windows-1252 (what spreadsheet exports on Windows write;
    Latin-1 for its five undefined bytes), recorded as ``non_utf8_text``. Never raises on content."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        problems.append(Problem(_rel(path, root), "non_utf8_text",
                                f"not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); decoded as Windows-1252",
                                "fixed"))
        return text


def _format_of(root: Path) -> str | None:
    if root.is_file():
        return "coco" if root.suffix.lower() == ".json" else None
    if (root / "Annotations").is_dir():
        return "voc"
    if (root / "labels").is_dir():
        return "yolo"
    if list(root.glob("*.csv")):
        return "dicom_csv"
    if list(root.glob("*.json")) or list(root.glob("annotations/*.json")):
        return "coco"
    return None


def _subdatasets(root: Path) -> list[tuple[Path, str]]:
    return [(d, f) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and (f := _format_of(d)) is not None]


def detect_format(root: Path) -> str:
    """Guess a dataset's format from its layout; a folder of datasets is ``mixed``; fail when unsure."""
    fmt = _format_of(root)
    if fmt is not None:
        return fmt
    if root.is_file():
        raise DataError(f"cannot tell the format of file {root}; set data.format to one of: {', '.join(FORMATS)}")
    if _subdatasets(root):
        return "mixed"
    raise DataError(
        f"cannot tell the format of {root}: expected Annotations/ (voc), labels/ (yolo), a .csv next to DICOM "
        f"files (dicom_csv), a .json (coco), or subfolders that are such datasets; set data.format to one of: "
        f"{', '.join(FORMATS)}"
    )


def _parse_float(text: object) -> float:
    if text is None:
        raise ValueError("missing value")
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError(f"not a number: {text!r}")
    value = float(str(text).strip())
    if not math.isfinite(value):
        raise ValueError(f"non-finite value {text!r}")
    return value


def _size(width: object, height: object) -> tuple[int, int] | None:
    """A stated (width, height), or None when absent or not two positive numbers (then the file's size rules)."""
    try:
        w, h = int(_parse_float(width)), int(_parse_float(height))
    except (ValueError, OverflowError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def _dicom_header(path: Path) -> tuple[str | None, str, set[str], tuple[int, int] | None]:
    """(PatientID, SOPInstanceUID, identifying values, (Columns, Rows)) from a DICOM header; blanks when unreadable."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["PatientID", "PatientName", "SOPInstanceUID", "Rows", "Columns"])
        patient = str(ds.get("PatientID", "") or "") or None
        uid = str(ds.get("SOPInstanceUID", "") or "")
        sensitive = {v for tag in ("PatientID", "PatientName") if (v := str(ds.get(tag, "") or ""))}
        size = _size(ds.get("Columns"), ds.get("Rows"))
        return patient, uid, sensitive, size
    except Exception:  # noqa: BLE001 - judged when decoding pixels; the header alone decides nothing here
        return None, "", set(), None


BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max", "label")


def read_dicom_csv(root: Path, csv_path: Path | None = None) -> ReadResult:
    """DICOM files anywhere under ``root`` plus one CSV of boxes keyed by ``file`` or ``sop_instance_uid``.

    The patient is the file's PatientID; a file whose header cannot be read keeps ``patient=None`` and is
    judged (and quarantined) when its pixels are decoded.
    """
    if csv_path is None:
        csvs = sorted(root.glob("*.csv"))
        if len(csvs) != 1:
            raise DataError(f"expected exactly one box CSV in {root}, found {len(csvs)}: {[c.name for c in csvs]}")
        csv_path = csvs[0]
    problems: list[Problem] = []
    sensitive: set[str] = set()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() != ".csv"
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and (p.suffix.lower() in DICOM_SUFFIXES or looks_like_dicom(p)))
    samples: dict[Path, Sample] = {}
    by_uid: dict[str, Path] = {}
    for path in files:
        patient, uid, ids, _ = _dicom_header(path)
        if uid:
            by_uid[uid] = path
        sensitive |= ids
        samples[path] = Sample(image=path, source="dicom_csv", patient=patient,
                               annotation=f"{_rel(csv_path, root)} rows of {_rel(path, root)}")
    boxes: dict[Path, list[tuple[list[float], str]]] = defaultdict(list)
    text = read_text(csv_path, root, problems)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = {c.strip() for c in reader.fieldnames or [] if c}
    lacking = [c for c in BOX_COLUMNS if c not in cols]
    if lacking or not ({"file", "sop_instance_uid"} & cols):
        raise DataError(
            f"{csv_path.name}: needs columns file or sop_instance_uid, and {', '.join(BOX_COLUMNS)}; "
            f"missing {lacking or ['file/sop_instance_uid']}"
        )
    try:
        rows = list(reader)
    except csv.Error as e:
        raise DataError(f"{csv_path.name} is not a readable CSV: {e}") from None
    for lineno, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): v if isinstance(v, str) else "" for k, v in raw.items()}
        where = f"{csv_path.name}:{lineno}"
        target: Path | None = None
        ref = (row.get("file") or "").strip()
        uid = (row.get("sop_instance_uid") or "").strip()
        if ref:
            target = (root / ref) if not Path(ref).is_absolute() else Path(ref)
            if target not in samples:
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
    return ReadResult(samples=out, problems=problems, sensitive=sensitive, seen={csv_path, *samples})


# ---------------------------------------------------------------------------------------------- Pascal VOC


def _official_splits(root: Path, problems: list[Problem], seen: set[Path]) -> dict[str, str]:
    """stem -> split from ``ImageSets/Main/{train,val,test}.txt`` when present."""
    split_of: dict[str, str] = {}
    main = root / "ImageSets" / "Main"
    if (root / "ImageSets").is_dir():  # part of the format, whichever listings the dataset ships
        seen.update(p for p in (root / "ImageSets").rglob("*.txt") if p.is_file())
    for name in SPLIT_NAMES:
        listing = main / f"{name}.txt"
        if listing.is_file():
            seen.add(listing)
            for line in read_text(listing, root, problems).split():
                split_of.setdefault(line.strip(), name)
    return split_of


def _find_image(folder: Path, stem: str, filename: str | None) -> Path | None:
    if filename:
        candidate = folder / Path(filename).name
        if candidate.is_file():
            return candidate
    for suffix in sorted(IMAGE_SUFFIXES | {s.upper() for s in IMAGE_SUFFIXES}):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _parse_xml(path: Path, root: Path, problems: list[Problem]) -> ET.Element:
    """Parse by the XML's own encoding declaration; an undeclared non-UTF-8 file is read as Windows-1252."""
    try:
        return ET.parse(path).getroot()
    except ET.ParseError:
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            text = read_text(path, root, problems)
            return ET.fromstring(text.split("?>", 1)[1] if text.lstrip().startswith("<?xml") else text)
        raise


def read_voc(root: Path) -> ReadResult:
    """``Annotations/*.xml`` + ``JPEGImages/``; tolerant to layout variants (nested objects, float coords)."""
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    if not ann_dir.is_dir():
        raise DataError(f"{root} has no Annotations/ folder; not a Pascal VOC dataset")
    if not img_dir.is_dir():
        img_dir = root / "images" if (root / "images").is_dir() else root
    samples: list[Sample] = []
    problems: list[Problem] = []
    seen: set[Path] = set()
    split_of = _official_splits(root, problems, seen)
    seen_images: set[Path] = set()
    for xml_path in sorted(ann_dir.glob("*.xml")):
        seen.add(xml_path)
        rel = _rel(xml_path, root)
        try:
            tree = _parse_xml(xml_path, root, problems)
        except ET.ParseError as e:
            # One record for the image this XML would describe (by stem), so it is not also "missing_annotation".
            image = _find_image(img_dir, xml_path.stem, None)
            if image is not None and image not in seen_images:
                seen_images.add(image)
                problems.append(Problem(_rel(image, root), "malformed_annotation", f"{rel} cannot be parsed: {e}",
                                        "image_quarantined", image=image))
            else:
                problems.append(Problem(rel, "malformed_annotation", f"XML cannot be parsed: {e}", "ignored"))
            continue
        filename = (tree.findtext("filename") or "").strip() or None
        image = _find_image(img_dir, xml_path.stem, filename)
        boxes, labels = [], []
        for i, obj in enumerate(tree.iter("object")):
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
                                    f"{_rel(img_dir, root)}/; {len(boxes)} boxes dropped", "box_dropped",
                                    boxes=len(boxes)))
            continue
        size = tree.find("size")
        size_hint = _size(size.findtext("width"), size.findtext("height")) if size is not None else None
        seen_images.add(image)
        samples.append(Sample(image=image, source="voc", patient=None, boxes=boxes, labels=labels,
                              official_split=split_of.get(xml_path.stem), size_hint=size_hint, annotation=rel))
    for image in sorted(p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        if image not in seen_images:
            problems.append(Problem(_rel(image, root), "missing_annotation", "no XML in Annotations/",
                                    "image_quarantined", image=image))
            seen_images.add(image)
    return ReadResult(samples=samples, problems=problems, seen=seen | seen_images)


# ---------------------------------------------------------------------------------------------- COCO JSON


def _key(value: object) -> str:
    """A hashable, printable form of a COCO id, whatever JSON type it has (ids 5 and "5" stay distinct)."""
    return json.dumps(value, sort_keys=True)


def read_coco(path: Path) -> ReadResult:
    """A COCO detection JSON; images resolved next to it or under ``images/``. ``patient_id`` is honoured.

    Every entry is checked for shape: an entry that is not an object, a category without ``id``/``name``, an
    annotation with a bad ``bbox`` is recorded and skipped; sizes given as strings are read, null ones ignored.
    """
    json_path = path
    root = path if path.is_dir() else path.parent
    if path.is_dir():
        found = sorted(path.glob("*.json")) or sorted(path.glob("annotations/*.json"))
        if len(found) != 1:
            raise DataError(f"expected one COCO .json in {path}, found {len(found)}")
        json_path = found[0]
    base = json_path.parent if json_path.parent.name != "annotations" else json_path.parent.parent
    problems: list[Problem] = []
    try:
        doc = json.loads(read_text(json_path, root, problems))
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path.name} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{json_path.name} is not a COCO detection file: top level is a {type(doc).__name__}, "
                        "expected an object with images, annotations, categories")
    images, anns, cats = doc.get("images"), doc.get("annotations", []), doc.get("categories")
    for key, value in (("images", images), ("annotations", anns), ("categories", cats)):
        if not isinstance(value, list):
            raise DataError(f"{json_path.name} is not a COCO detection file: {key!r} is "
                            f"{'missing' if value is None else 'a ' + type(value).__name__}, expected a list")
    name = json_path.name
    cat_name: dict[str, str] = {}
    order: list[tuple[float, str, str]] = []
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or "id" not in c or not str(c.get("name", "")).strip():
            problems.append(Problem(f"{name}#categories[{i}]", "malformed_annotation",
                                    f"category {str(c)[:80]} needs an id and a name; its boxes become unknown_class",
                                    "ignored"))
            continue
        cid = _key(c["id"])
        if cid in cat_name:
            problems.append(Problem(f"{name}#categories[{i}]", "malformed_annotation",
                                    f"category id {c['id']} listed twice; the first ({cat_name[cid]}) is used",
                                    "ignored"))
            continue
        cat_name[cid] = str(c["name"]).strip()
        sort_key = float(c["id"]) if isinstance(c["id"], int | float) and not isinstance(c["id"], bool) else math.inf
        order.append((sort_key, cid, cat_name[cid]))
    classes = list(dict.fromkeys(n for *_, n in sorted(order)))
    by_image: dict[str, list[tuple[str, list[float] | None, str | None]]] = defaultdict(list)
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            problems.append(Problem(f"{name}#annotations[{i}]", "malformed_annotation",
                                    f"annotation is a {type(ann).__name__}, not an object", "box_dropped"))
            continue
        where = f"{name}#annotation {ann.get('id', f'[{i}]')}"
        try:
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"bbox {str(bbox)[:60]} is not [x, y, width, height]")
            x, y, w, h = (_parse_float(v) for v in bbox)
        except ValueError as e:
            problems.append(Problem(where, "malformed_annotation", f"bad bbox: {e}", "box_dropped"))
            continue
        cid = _key(ann.get("category_id"))
        if cid not in cat_name:
            problems.append(Problem(where, "unknown_class", f"category_id {ann.get('category_id')} is not in "
                                    "categories", "box_dropped"))
            continue
        by_image[_key(ann.get("image_id"))].append((where, [x, y, x + w, y + h], cat_name[cid]))
    samples, seen = [], {json_path}
    known_ids = set()
    for i, img in enumerate(images):
        file_name = img.get("file_name") if isinstance(img, dict) else None
        if not isinstance(file_name, str) or not file_name.strip():
            problems.append(Problem(f"{name}#images[{i}]", "malformed_annotation",
                                    f"image entry {str(img)[:80]} has no file_name", "ignored"))
            continue
        image_id = _key(img.get("id"))
        known_ids.add(image_id)
        entries = by_image.get(image_id, [])
        boxes = [b for _, b, _ in entries]
        labels = [lab for *_, lab in entries]
        candidates = [base / file_name, base / "images" / file_name, base / "images" / Path(file_name).name]
        image = next((c for c in candidates if c.is_file()), None)
        if image is None:
            problems.append(Problem(file_name, "missing_image", f"image file not found next to {name}; "
                                    f"{len(boxes)} boxes dropped", "box_dropped", boxes=len(boxes)))
            continue
        patient = img.get("patient_id") or img.get("patient")
        split = img.get("split") if img.get("split") in SPLIT_NAMES else None
        seen.add(image)
        samples.append(Sample(image=image, source="coco", patient=str(patient) if patient else None, boxes=boxes,
                              labels=labels, official_split=split, size_hint=_size(img.get("width"),
                                                                                   img.get("height")),
                              annotation=f"{name}#image {img.get('id')}"))
    for image_id, group in by_image.items():
        if image_id not in known_ids:
            problems.append(Problem(f"{name}#image {image_id}", "missing_image",
                                    f"{len(group)} annotations refer to an image id not in images", "box_dropped",
                                    boxes=len(group)))
    return ReadResult(samples=samples, problems=problems, classes=classes,
                      sensitive={s.patient for s in samples if s.patient}, seen=seen)


# ---------------------------------------------------------------------------------------------- YOLO txt


def _yolo_names(root: Path, problems: list[Problem], seen: set[Path]) -> list[str] | None:
    for name in ("data.yaml", "dataset.yaml"):
        f = root / name
        if f.is_file():
            seen.add(f)
            try:
                doc = yaml.safe_load(read_text(f, root, problems))
            except yaml.YAMLError as e:
                where = getattr(e, "problem_mark", None)
                at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
                raise DataError(f"{_rel(f, root)} is not valid YAML{at}: "
                                f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
            names = doc.get("names") if isinstance(doc, dict) else None
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names, key=str)]
            if isinstance(names, list):
                return [str(n) for n in names]
            raise DataError(f"{_rel(f, root)} has no names: list (or index: name mapping) of class names")
    if (root / "classes.txt").is_file():
        seen.add(root / "classes.txt")
        text = read_text(root / "classes.txt", root, problems)
        return [line.strip() for line in text.splitlines() if line.strip()]
    return None


def _upright_size(image: Path) -> tuple[int, int]:
    """(width, height) of the upright image (EXIF applied), the frame YOLO labels are normalised to; 0x0 when the
    file cannot be opened (it is quarantined when decoded)."""
    if image.suffix.lower() in DICOM_SUFFIXES or looks_like_dicom(image):
        return _dicom_header(image)[3] or (0, 0)
    from PIL import Image

    try:
        with Image.open(image) as im:
            width, height = im.size
            return (height, width) if exif_orientation(im) >= 5 else (width, height)
    except Exception:  # noqa: BLE001 - decoding judges this image later; boxes cannot be scaled
        return 0, 0


def read_yolo(root: Path) -> ReadResult:
    """``images/[split/]*`` + ``labels/[split/]*.txt`` (normalised ``cls cx cy w h``), names from data.yaml.

    Images may be JPEG/PNG/... or DICOM. Labels are normalised to the upright image (EXIF applied), as Ultralytics
    reads them. Two images with one stem (``a.png``, ``a.jpg``) share one label file: see pipeline.data.dedupe.
    """
    problems: list[Problem] = []
    seen: set[Path] = set()
    classes = _yolo_names(root, problems, seen)
    if classes is None:
        raise DataError(f"{root}: YOLO datasets need class names in data.yaml (names:) or classes.txt")
    img_root, lbl_root = root / "images", root / "labels"
    samples: list[Sample] = []
    sensitive: set[str] = set()
    images = sorted(p for p in img_root.rglob("*") if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES) if img_root.is_dir() else []
    for image in images:
        rel_img = image.relative_to(img_root)
        split = rel_img.parts[0] if len(rel_img.parts) > 1 and rel_img.parts[0] in SPLIT_NAMES else None
        label_file = (lbl_root / rel_img).with_suffix(".txt")
        rel = _rel(label_file, root)
        patient = None
        if image.suffix.lower() in DICOM_SUFFIXES:
            patient, _, ids, _ = _dicom_header(image)
            sensitive |= ids
        boxes, labels = [], []
        if label_file.is_file():
            seen.add(label_file)
            width, height = _upright_size(image)
            for lineno, line in enumerate(read_text(label_file, root, problems).splitlines(), start=1):
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
        seen.add(image)
        samples.append(Sample(image=image, source="yolo", patient=patient, boxes=boxes, labels=labels,
                              official_split=split, annotation=rel, label_frame="upright"))
    if lbl_root.is_dir():
        stems = {(img_root / p.relative_to(img_root)).with_suffix("") for p in images}
        for label_file in sorted(lbl_root.rglob("*.txt")):
            if (img_root / label_file.relative_to(lbl_root)).with_suffix("") not in stems:
                seen.add(label_file)
                n = sum(1 for line in read_text(label_file, root, problems).splitlines() if line.strip())
                problems.append(Problem(_rel(label_file, root), "missing_image",
                                        f"label file without an image; {n} boxes dropped", "box_dropped", boxes=n))
    return ReadResult(samples=samples, problems=problems, classes=classes, sensitive=sensitive, seen=seen)


# ---------------------------------------------------------------------------------------------- all together

READERS = {"dicom_csv": read_dicom_csv, "voc": read_voc, "coco": read_coco, "yolo": read_yolo}


def is_image_file(path: Path) -> bool:
    """An image by name or by content (DICOM preamble, or anything Pillow can identify)."""
    if path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES or looks_like_dicom(path):
        return True
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path):
                return True
    except Exception:  # noqa: BLE001 - not an image
        return False


def inventory(root: Path, read: ReadResult) -> None:
    """Record every file under ``root`` the reader neither used nor recorded, so nothing vanishes unseen.

    Images (by name or content) are quarantined as ``unlisted_image`` (counted among the images found); other
    files are ``unsupported_file`` / ignored. Hidden files and folders (``.DS_Store``, ``.git``) are skipped.
    """
    if not root.is_dir():
        return
    accounted = read.seen | {s.image for s in read.samples} | {p.image for p in read.problems if p.image}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or path in accounted or any(part.startswith(".") for part in rel.parts):
            continue
        if is_image_file(path):
            read.problems.append(Problem(rel.as_posix(), "unlisted_image", "image file that no annotation of the "
                                         "dataset lists (or of a type the format does not read)",
                                         "image_quarantined", image=path))
        else:
            read.problems.append(Problem(rel.as_posix(), "unsupported_file",
                                         "not an image or an annotation file this dataset's format uses", "ignored"))


def read_mixed(root: Path) -> ReadResult:
    """Each subfolder that is a dataset (format detected per subfolder) is read and merged; a subfolder that
    cannot be read at all is recorded (its images quarantined as ``unreadable_dataset``), not fatal."""
    merged = ReadResult(samples=[], classes=[])
    labels: list[str] = []
    for sub, fmt in _subdatasets(root):
        prefix = sub.name + "/"
        try:
            part = READERS[fmt](sub)
        except DataError as e:
            merged.seen.add(sub)
            for path in sorted(sub.rglob("*")):
                if path.is_file() and is_image_file(path):
                    merged.problems.append(Problem(_rel(path, root), "unreadable_dataset",
                                                   f"{fmt} dataset {prefix} cannot be read: {e}",
                                                   "image_quarantined", image=path))
                merged.seen.add(path)
            continue
        inventory(sub, part)
        merged.samples += part.samples
        merged.problems += [p.with_text(prefix + p.file, p.detail) for p in part.problems]
        merged.sensitive |= part.sensitive
        merged.seen |= part.seen | {sub / p.file for p in part.problems}
        assert merged.classes is not None
        merged.classes += [c for c in part.classes or [] if c not in merged.classes]
        labels += [lab for s in part.samples for lab in s.labels]
    assert merged.classes is not None
    merged.classes += sorted(set(labels) - set(merged.classes))
    return merged


def read_dataset(root: Path, fmt: str = "auto") -> tuple[ReadResult, str]:
    """Read a dataset in one format, or ``mixed`` (subfolders in any formats); every file is used or recorded."""
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist")
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "mixed":
        read = read_mixed(root)
    elif fmt in READERS:
        read = READERS[fmt](root)
    else:
        raise DataError(f"unknown data.format {fmt!r}; expected one of: auto, {', '.join(FORMATS)}")
    inventory(root, read)
    return read, fmt
