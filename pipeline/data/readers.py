"""Readers for DICOM+CSV, Pascal VOC, COCO JSON and YOLO txt, all producing :class:`Sample` records, and for a
folder whose subfolders are datasets in any of these formats (``mixed``).

Readers parse annotations only; pixels are decoded (and judged) once, later, by the prepare step.
Annotation problems found here are returned as :class:`Problem` records, never raised: a reader raises
:class:`DataError` only when the dataset as a whole cannot be read (no class names, no annotation file).
Every entry under the dataset folder ends up used or recorded (see :func:`scan` and :func:`inventory`): an entry that
cannot be read (a folder named like a file, a dangling link, a FIFO) is one recorded problem, never a stopped run,
and nothing outside the dataset folder is read unless :class:`Scope` allows it.

Size: four formats and the mixed folder share the hostile-input rules (encodings, accounting of every
file); one module keeps those rules identical across formats.
"""

from __future__ import annotations

import csv
import io
import math
import os
import stat
import warnings
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.data.imaging import DICOM_SUFFIXES, IMAGE_SUFFIXES, looks_like_dicom, upright_size
from pipeline.data.records import Problem, Sample
from pipeline.data.values import id_order, identifier, parse_json
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


@dataclass(frozen=True)
class Scope:
    """Where a dataset's files may come from: under ``bounds`` (the dataset folder given, links resolved), or
    anywhere when ``allow_outside`` (``data.allow_outside_root``)."""

    bounds: Path
    allow_outside: bool = False

    @classmethod
    def of(cls, root: Path, allow_outside: bool = False) -> Scope:
        return cls(Path(os.path.realpath(root if root.is_dir() else root.parent)), allow_outside)

    def outside(self, path: Path) -> bool:
        """True when ``path`` (links resolved) lies outside the dataset folder and that is not allowed."""
        if self.allow_outside:
            return False
        real = os.path.realpath(path)
        return real != str(self.bounds) and not real.startswith(str(self.bounds) + os.sep)

    def refusal(self, path: Path, where: str, boxes: int = 0, shown: str | None = None) -> Problem:
        """The record of an image that would be read from outside the dataset folder."""
        return Problem(shown or where, "outside_dataset",
                       f"{shown or where} leads to {os.path.realpath(path)}, outside the dataset folder {self.bounds}; "
                       "not read (set data.allow_outside_root: true to allow it)", "image_quarantined",
                       boxes=boxes, image=path)


@dataclass
class Scan:
    """Every entry under a folder: the regular files a reader may use, and every other entry with why it is not
    one (``unreadable_entry``: not a regular file or cannot be listed; ``outside_dataset``: a link leaving the
    dataset folder; ``hidden_file``: a hidden entry, not descended into)."""

    files: list[Path]
    odd: list[tuple[Path, str, str]]


_FILE_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES | {".xml", ".json", ".txt", ".csv", ".yaml", ".yml"}


def scan(root: Path, scope: Scope) -> Scan:
    """All regular files under ``root`` in name order, following links that stay inside the scope (each folder
    once), never opening anything; whatever else is there is listed in ``odd`` with its reason."""
    files: list[Path] = []
    odd: list[tuple[Path, str, str]] = []
    try:
        top = os.stat(root)
    except OSError as e:
        return Scan([], [(root, "unreadable_entry", f"cannot be read: {e.strerror or e}")])
    visited = {(top.st_dev, top.st_ino)}

    def visit(folder: Path) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            odd.append((folder, "unreadable_entry", f"folder cannot be listed: {e.strerror or e}"))
            return
        for entry in entries:
            path = folder / entry.name
            if entry.name.startswith("."):
                odd.append((path, "hidden_file", "hidden entry, skipped (Ultralytics and most tools skip them too)"))
                continue
            try:
                if entry.is_symlink():
                    target = os.path.realpath(path)
                    if not os.path.exists(target):
                        odd.append((path, "unreadable_entry", "a link that leads nowhere (dangling or a loop)"))
                        continue
                    if scope.outside(path):
                        odd.append((path, "outside_dataset", f"a link to {target}, outside the dataset folder "
                                    f"{scope.bounds}; not read (data.allow_outside_root: true allows it)"))
                        continue
                st = os.stat(path)
            except OSError as e:
                odd.append((path, "unreadable_entry", f"cannot be read: {e.strerror or e}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                if Path(entry.name).suffix.lower() in _FILE_SUFFIXES:
                    odd.append((path, "unreadable_entry", "a folder named like a file (not read as one; what it "
                                "holds is listed on its own)"))
                if (st.st_dev, st.st_ino) not in visited:
                    visited.add((st.st_dev, st.st_ino))
                    visit(path)
            elif stat.S_ISREG(st.st_mode):
                files.append(path)
            else:
                odd.append((path, "unreadable_entry", "not a regular file (a FIFO, socket or device); not opened"))

    visit(root)
    return Scan(files, odd)


def _regular_files(folder: Path, suffixes: set[str], nonempty: bool = False) -> list[Path]:
    """Regular files directly in ``folder`` with one of ``suffixes`` (not folders or FIFOs named like them)."""
    out = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in suffixes:
            continue
        try:
            st = os.stat(folder / entry.name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_size > 0 or not nonempty):
            out.append(folder / entry.name)
    return out


def read_text(path: Path, root: Path, problems: list[Problem]) -> str:
    """A text file as UTF-8 (a BOM is dropped); otherwise Windows-1252 (what spreadsheet exports on Windows write;
    Latin-1 for its five undefined bytes), recorded as ``non_utf8_text``. Never raises on content (an
    ``OSError`` when the file itself cannot be read: see :func:`read_text_or_record`)."""
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


def read_text_or_record(path: Path, root: Path, problems: list[Problem], action: str = "ignored",
                        boxes: int = -1) -> str | None:
    """:func:`read_text`, or None with an ``unreadable_entry`` record when the file cannot be read at all."""
    try:
        return read_text(path, root, problems)
    except OSError as e:
        problems.append(Problem(_rel(path, root), "unreadable_entry", f"cannot be read: {e.strerror or e}",
                                action, boxes=boxes))  # type: ignore[arg-type]
        return None


def _format_of(root: Path) -> str | None:
    if root.is_file():
        return "coco" if root.suffix.lower() == ".json" else None
    if (root / "Annotations").is_dir():
        return "voc"
    if (root / "labels").is_dir():
        return "yolo"
    if _regular_files(root, {".csv"}):
        return "dicom_csv"
    if _regular_files(root, {".json"}) or _regular_files(root / "annotations", {".json"}):
        return "coco"
    return None


def _subdatasets(root: Path, scope: Scope | None = None) -> list[tuple[Path, str]]:
    scope = scope or Scope.of(root)
    return [(d, f) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and not scope.outside(d) and (f := _format_of(d)) is not None]


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
        raise ValueError(f"non-finite value {_shown(text)}")
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
        patient = identifier(str(ds.get("PatientID", "") or ""))  # one declared type, as every other id
        uid = str(ds.get("SOPInstanceUID", "") or "")
        sensitive = {v for tag in ("PatientID", "PatientName") if (v := str(ds.get(tag, "") or ""))}
        size = _size(ds.get("Columns"), ds.get("Rows"))
        return patient, uid, sensitive, size
    except Exception:  # noqa: BLE001 - judged when decoding pixels; the header alone decides nothing here
        return None, "", set(), None


BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max", "label")


def read_dicom_csv(root: Path, csv_path: Path | None = None, scope: Scope | None = None) -> ReadResult:
    """DICOM files anywhere under ``root`` plus one CSV of boxes keyed by ``file`` or ``sop_instance_uid``.

    The patient is the file's PatientID; a file whose header cannot be read keeps ``patient=None`` and is
    judged (and quarantined) when its pixels are decoded. A ``file`` that leads outside the dataset folder is
    refused (recorded) unless the scope allows it.
    """
    scope = scope or Scope.of(root)
    if csv_path is None:
        csvs = _regular_files(root, {".csv"}, nonempty=True)
        if len(csvs) != 1:
            raise DataError(f"expected exactly one box CSV in {root}, found {len(csvs)}: {[c.name for c in csvs]}")
        csv_path = csvs[0]
    problems: list[Problem] = []
    sensitive: set[str] = set()
    files = [p for p in scan(root, scope).files if p.suffix.lower() != ".csv"
             and (p.suffix.lower() in DICOM_SUFFIXES or looks_like_dicom(p))]
    samples: dict[Path, Sample] = {}
    by_uid: dict[str, Path] = {}

    def add(path: Path) -> Sample:
        patient, uid, ids, _ = _dicom_header(path)
        if uid:
            by_uid.setdefault(uid, path)
        sensitive.update(ids)
        samples[path] = Sample(image=path, source="dicom_csv", patient=patient,
                               annotation=f"{_rel(csv_path, root)} rows of {_rel(path, root)}")
        return samples[path]

    for path in files:
        add(path)
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
    refused: dict[Path, Problem] = {}
    for lineno, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): v if isinstance(v, str) else "" for k, v in raw.items()}
        where = f"{csv_path.name}:{lineno}"
        target: Path | None = None
        ref = (row.get("file") or "").strip()
        uid = (row.get("sop_instance_uid") or "").strip()
        if ref:
            target = Path(os.path.normpath(root / ref))
            if scope.outside(target):
                if target.is_file() or target.is_symlink():
                    old = refused.get(target)
                    refused[target] = scope.refusal(target, ref, boxes=(old.boxes if old else 0) + 1)
                else:
                    problems.append(Problem(where, "missing_image", f"row refers to {ref}, which does not exist",
                                            "box_dropped"))
                continue
            if target not in samples:
                if scope.allow_outside and target.is_file() and looks_like_dicom(target):
                    add(target)
                else:
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
    problems += refused.values()
    out = []
    for path, sample in samples.items():
        pairs = boxes.get(path, [])
        sample.boxes = [b for b, _ in pairs]  # type: ignore[assignment]
        sample.labels = [lab for _, lab in pairs]
        sample.__post_init__()
        out.append(sample)
    return ReadResult(samples=out, problems=problems, sensitive=sensitive, seen={csv_path, *samples, *refused})


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
            text = read_text_or_record(listing, root, problems)
            for line in (text or "").split():
                split_of.setdefault(line.strip(), name)
    return split_of


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _find_image(folder: Path, stem: str, filename: str | None) -> Path | None:
    if filename:
        candidate = folder / Path(filename).name
        if _is_regular(candidate):
            return candidate
    for suffix in sorted(IMAGE_SUFFIXES | {s.upper() for s in IMAGE_SUFFIXES}):
        candidate = folder / f"{stem}{suffix}"
        if _is_regular(candidate):
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


def read_voc(root: Path, scope: Scope | None = None) -> ReadResult:
    """``Annotations/*.xml`` + ``JPEGImages/``; tolerant to layout variants (nested objects, float coords)."""
    scope = scope or Scope.of(root)
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
    for xml_path in _regular_files(ann_dir, {".xml"}):
        seen.add(xml_path)
        rel = _rel(xml_path, root)
        try:
            tree = _parse_xml(xml_path, root, problems)
        except OSError as e:
            problems.append(Problem(rel, "unreadable_entry", f"cannot be read: {e.strerror or e}", "ignored"))
            continue
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
        if scope.outside(image):
            if image not in seen_images:
                problems.append(scope.refusal(image, _rel(image, root), boxes=len(boxes)))
            seen_images.add(image)
            continue
        size = tree.find("size")
        size_hint = _size(size.findtext("width"), size.findtext("height")) if size is not None else None
        seen_images.add(image)
        samples.append(Sample(image=image, source="voc", patient=None, boxes=boxes, labels=labels,
                              official_split=split_of.get(xml_path.stem), size_hint=size_hint, annotation=rel))
    for image in _regular_files(img_dir, IMAGE_SUFFIXES):
        if image not in seen_images and not scope.outside(image):
            problems.append(Problem(_rel(image, root), "missing_annotation", "no XML in Annotations/",
                                    "image_quarantined", image=image))
            seen_images.add(image)
    return ReadResult(samples=samples, problems=problems, seen=seen | seen_images)


# ---------------------------------------------------------------------------------------------- COCO JSON


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_coco(path: Path, scope: Scope | None = None) -> ReadResult:
    """A COCO detection JSON; images resolved next to it or under ``images/``. ``patient_id`` is honoured.

    Every entry is checked for shape: an entry that is not an object, a category without ``id``/``name``, an
    annotation with a bad ``bbox`` is recorded and skipped; sizes given as strings are read, null ones ignored.
    Ids (image, category, patient) are compared as values of one type (:func:`pipeline.data.values.identifier`),
    and a ``file_name`` that leads outside the dataset folder is refused unless the scope allows it.
    """
    json_path = path
    root = path if path.is_dir() else path.parent
    scope = scope or Scope.of(path)
    if path.is_dir():
        found = _regular_files(path, {".json"}, nonempty=True) or _regular_files(path / "annotations", {".json"},
                                                                                 nonempty=True)
        if len(found) != 1:
            raise DataError(f"expected one COCO .json in {path}, found {len(found)}")
        json_path = found[0]
    base = json_path.parent if json_path.parent.name != "annotations" else json_path.parent.parent
    problems: list[Problem] = []
    try:
        doc = parse_json(read_text(json_path, root, problems))
    except ValueError as e:  # JSONDecodeError is a ValueError
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
    for i, c in enumerate(cats):
        try:
            cid = identifier(c.get("id")) if isinstance(c, dict) else None
        except ValueError:
            cid = None
        if cid is None or not str(c.get("name", "")).strip():
            problems.append(Problem(f"{name}#categories[{i}]", "malformed_annotation",
                                    f"category {str(c)[:80]} needs an id and a name; its boxes become unknown_class",
                                    "ignored"))
            continue
        if cid in cat_name:
            problems.append(Problem(f"{name}#categories[{i}]", "malformed_annotation",
                                    f"category id {_shown(c['id'])} listed twice; the first ({cat_name[cid]}) is used",
                                    "ignored"))
            continue
        cat_name[cid] = str(c["name"]).strip()
    classes = list(dict.fromkeys(cat_name[cid] for cid in sorted(cat_name, key=id_order)))
    by_image: dict[str, list[tuple[str, list[float] | None, str | None]]] = defaultdict(list)
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            problems.append(Problem(f"{name}#annotations[{i}]", "malformed_annotation",
                                    f"annotation is a {type(ann).__name__}, not an object", "box_dropped"))
            continue
        where = f"{name}#annotation {_shown(ann.get('id', f'[{i}]'))}"
        try:
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"bbox {str(bbox)[:60]} is not [x, y, width, height]")
            x, y, w, h = (_parse_float(v) for v in bbox)
            image_ref = identifier(ann.get("image_id"))
        except ValueError as e:
            problems.append(Problem(where, "malformed_annotation", f"bad bbox or image_id: {e}", "box_dropped"))
            continue
        try:
            cid = identifier(ann.get("category_id"))
        except ValueError:
            cid = None  # no category has it: unknown_class below
        if cid not in cat_name:
            problems.append(Problem(where, "unknown_class", f"category_id {_shown(ann.get('category_id'))} is not "
                                    "in categories", "box_dropped"))
            continue
        if image_ref is None:
            problems.append(Problem(where, "malformed_annotation", "annotation has no image_id", "box_dropped"))
            continue
        by_image[image_ref].append((where, [x, y, x + w, y + h], cat_name[cid]))
    samples, seen = [], {json_path}
    known_ids = set()
    for i, img in enumerate(images):
        file_name = img.get("file_name") if isinstance(img, dict) else None
        if not isinstance(file_name, str) or not file_name.strip():
            problems.append(Problem(f"{name}#images[{i}]", "malformed_annotation",
                                    f"image entry {str(img)[:80]} has no file_name", "ignored"))
            continue
        try:
            image_id = identifier(img.get("id"))
        except ValueError as e:
            problems.append(Problem(f"{name}#images[{i}]", "malformed_annotation",
                                    f"image {file_name}: id {e}; no annotation can refer to it", "fixed"))
            image_id = None
        if image_id is not None:
            known_ids.add(image_id)
        entries = by_image.get(image_id, []) if image_id is not None else []
        boxes = [b for _, b, _ in entries]
        labels = [lab for *_, lab in entries]
        candidates = [base / file_name, base / "images" / file_name, base / "images" / Path(file_name).name]
        image = next((Path(os.path.normpath(c)) for c in candidates if _is_regular(c)), None)
        if image is None:
            problems.append(Problem(file_name, "missing_image", f"image file not found next to {name}; "
                                    f"{len(boxes)} boxes dropped", "box_dropped", boxes=len(boxes)))
            continue
        if scope.outside(image):
            problems.append(scope.refusal(image, file_name, boxes=len(boxes)))
            seen.add(image)
            continue
        patient = None
        for key in ("patient_id", "patient"):  # the first one stated
            try:
                patient = identifier(img.get(key))
            except ValueError as e:
                problems.append(Problem(_rel(image, root), "malformed_annotation",
                                        f"{name}#image {_shown(img.get('id'))}: {key} {e}; the image is its own "
                                        "patient", "fixed"))
                break
            if patient is not None:
                break
        split = img.get("split") if isinstance(img.get("split"), str) and img.get("split") in SPLIT_NAMES else None
        seen.add(image)
        samples.append(Sample(image=image, source="coco", patient=patient, boxes=boxes,
                              labels=labels, official_split=split, size_hint=_size(img.get("width"),
                                                                                   img.get("height")),
                              annotation=f"{name}#image {_shown(img.get('id'))}"))
    for image_id, group in by_image.items():
        if image_id not in known_ids:
            problems.append(Problem(f"{name}#image {_shown(image_id)}", "missing_image",
                                    f"{len(group)} annotations refer to an image id not in images", "box_dropped",
                                    boxes=len(group)))
    return ReadResult(samples=samples, problems=problems, classes=classes,
                      sensitive={s.patient for s in samples if s.patient}, seen=seen)


# ---------------------------------------------------------------------------------------------- YOLO txt


def _yolo_names(root: Path, problems: list[Problem], seen: set[Path]) -> dict[int, str] | None:
    """Class id -> name, as the dataset declares them: data.yaml ``names`` as a list (ids 0, 1, ...) or a mapping
    (Ultralytics' own format: integer keys, in any order, gaps allowed), else ``classes.txt`` (one per line).

    data.yaml is read with YAML's base loader, so every scalar keeps the exact text written (``yes`` stays ``yes``,
    ``1.0`` stays ``1.0``; a YAML 1.1 loader would turn them into True and 1.0), and mapping keys are class ids
    by value (``10`` and ``'10'``), never sorted as text."""
    for name in ("data.yaml", "dataset.yaml"):
        f = root / name
        if _is_regular(f):
            seen.add(f)
            try:
                doc = yaml.load(read_text(f, root, problems), Loader=yaml.BaseLoader)  # noqa: S506 - no tags
            except yaml.YAMLError as e:
                where = getattr(e, "problem_mark", None)
                at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
                raise DataError(f"{_rel(f, root)} is not valid YAML{at}: "
                                f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
            names = doc.get("names") if isinstance(doc, dict) else None
            if isinstance(names, dict):
                out: dict[int, str] = {}
                for key, value in names.items():
                    try:
                        k = int(str(key).strip())
                    except ValueError:
                        raise DataError(f"{_rel(f, root)}: names key {key!r} is not a class index") from None
                    if k < 0 or k in out or not isinstance(value, str):
                        raise DataError(f"{_rel(f, root)}: names has a negative, repeated or non-text entry "
                                        f"{key!r}: {value!r}")
                    out[k] = value
                return dict(sorted(out.items()))
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                return dict(enumerate(names))
            raise DataError(f"{_rel(f, root)} has no names: list (or index: name mapping) of class names")
    if _is_regular(root / "classes.txt"):
        seen.add(root / "classes.txt")
        text = read_text(root / "classes.txt", root, problems)
        return dict(enumerate(line.strip() for line in text.splitlines() if line.strip()))
    return None


def _class_id(text: str) -> int:
    """A label line's class field: an integer by value (``1``, ``1.0``, ``01``, ``+1``; Ultralytics reads it as a
    float), else ValueError."""
    value = float(text)
    if not math.isfinite(value) or not value.is_integer():
        raise ValueError(f"class {text!r} is not an integer class id")
    return int(value)


def _upright_size(image: Path) -> tuple[int, int]:
    """(width, height) of the upright image (EXIF applied), the frame YOLO labels are normalised to; 0x0 when the
    file cannot be opened (it is quarantined when decoded)."""
    if image.suffix.lower() in DICOM_SUFFIXES or looks_like_dicom(image):
        return _dicom_header(image)[3] or (0, 0)
    from PIL import Image

    try:
        data = image.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            return upright_size(im, data)
    except Exception:  # noqa: BLE001 - decoding judges this image later; boxes cannot be scaled
        return 0, 0


def read_yolo(root: Path, scope: Scope | None = None) -> ReadResult:
    """``images/[split/]*`` + ``labels/[split/]*.txt`` (normalised ``cls cx cy w h``), names from data.yaml.

    Images may be JPEG/PNG/... or DICOM. Labels are normalised to the upright image (EXIF applied), as Ultralytics
    reads them. Two images with one stem (``a.png``, ``a.jpg``) share one label file: see pipeline.data.dedupe.
    """
    scope = scope or Scope.of(root)
    problems: list[Problem] = []
    seen: set[Path] = set()
    names = _yolo_names(root, problems, seen)
    if names is None:
        raise DataError(f"{root}: YOLO datasets need class names in data.yaml (names:) or classes.txt")
    img_root, lbl_root = root / "images", root / "labels"
    samples: list[Sample] = []
    sensitive: set[str] = set()
    images = [p for p in scan(img_root, scope).files
              if p.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES] if img_root.is_dir() else []
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
        text = read_text_or_record(label_file, root, problems) if _is_regular(label_file) else None
        if text is not None:
            seen.add(label_file)
            width, height = _upright_size(image)
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    if len(parts) != 5:
                        raise ValueError(f"expected 5 fields, got {len(parts)}")
                    cls = _class_id(parts[0])
                    cx, cy, w, h = (_parse_float(v) for v in parts[1:])
                except ValueError as e:
                    problems.append(Problem(f"{rel}:{lineno}", "malformed_annotation", str(e), "box_dropped"))
                    continue
                if cls not in names:
                    problems.append(Problem(f"{rel}:{lineno}", "unknown_class",
                                            f"class index {cls} is not one of the dataset's class ids "
                                            f"{sorted(names)[:20]}", "box_dropped"))
                    continue
                boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                              (cy + h / 2) * height])
                labels.append(names[cls])
        seen.add(image)
        samples.append(Sample(image=image, source="yolo", patient=patient, boxes=boxes, labels=labels,
                              official_split=split, annotation=rel, label_frame="upright"))
    if lbl_root.is_dir():
        stems = {(img_root / p.relative_to(img_root)).with_suffix("") for p in images}
        for label_file in scan(lbl_root, scope).files:
            if label_file.suffix.lower() != ".txt":
                continue
            if (img_root / label_file.relative_to(lbl_root)).with_suffix("") not in stems:
                seen.add(label_file)
                text = read_text_or_record(label_file, root, problems)
                n = sum(1 for line in (text or "").splitlines() if line.strip())
                problems.append(Problem(_rel(label_file, root), "missing_image",
                                        f"label file without an image; {n} boxes dropped", "box_dropped", boxes=n))
    return ReadResult(samples=samples, problems=problems, classes=list(dict.fromkeys(names.values())),
                      sensitive=sensitive, seen=seen)


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


def inventory(root: Path, read: ReadResult, scope: Scope | None = None) -> None:
    """Record every entry under ``root`` the reader neither used nor recorded, so nothing vanishes unseen.

    Images (by name or content) are quarantined as ``unlisted_image`` (counted among the images found); other
    files are ``unsupported_file`` / ignored. Entries :func:`scan` could not use are recorded with its reason:
    ``unreadable_entry`` (a FIFO, a dangling link, a folder that cannot be listed), ``outside_dataset`` (a link
    leaving the dataset folder: an image there is quarantined), ``hidden_file`` (``.DS_Store``, ``.git``: ignored,
    not descended into).
    """
    if not root.is_dir():
        return
    scope = scope or Scope.of(root)
    accounted = read.seen | {s.image for s in read.samples} | {p.image for p in read.problems if p.image}
    found = scan(root, scope)
    for path in found.files:
        if path in accounted:
            continue
        rel = path.relative_to(root)
        if is_image_file(path):
            read.problems.append(Problem(rel.as_posix(), "unlisted_image", "image file that no annotation of the "
                                         "dataset lists (or of a type the format does not read)",
                                         "image_quarantined", image=path))
        else:
            read.problems.append(Problem(rel.as_posix(), "unsupported_file",
                                         "not an image or an annotation file this dataset's format uses", "ignored"))
        read.seen.add(path)
    for path, kind, detail in found.odd:
        if path in accounted:
            continue
        image = kind == "outside_dataset" and path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES
        read.problems.append(Problem(path.relative_to(root).as_posix(), kind, detail,
                                     "image_quarantined" if image else "ignored", image=path if image else None))
        read.seen.add(path)


def read_mixed(root: Path, scope: Scope | None = None) -> ReadResult:
    """Each subfolder that is a dataset (format detected per subfolder) is read and merged; a subfolder that
    cannot be read at all is recorded (its images quarantined as ``unreadable_dataset``), not fatal."""
    scope = scope or Scope.of(root)
    merged = ReadResult(samples=[], classes=[])
    labels: list[str] = []
    for sub, fmt in _subdatasets(root, scope):
        prefix = sub.name + "/"
        try:
            part = READERS[fmt](sub, scope=scope)
        except DataError as e:
            merged.seen.add(sub)
            for path in scan(sub, scope).files:
                if is_image_file(path):
                    merged.problems.append(Problem(_rel(path, root), "unreadable_dataset",
                                                   f"{fmt} dataset {prefix} cannot be read: {e}",
                                                   "image_quarantined", image=path))
                merged.seen.add(path)
            continue
        inventory(sub, part, scope)
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


def read_dataset(root: Path, fmt: str = "auto", allow_outside_root: bool = False) -> tuple[ReadResult, str]:
    """Read a dataset in one format, or ``mixed`` (subfolders in any formats); every file is used or recorded.
    Nothing outside ``root`` (links resolved) is read unless ``allow_outside_root``."""
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist")
    scope = Scope.of(root, allow_outside_root)
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "mixed":
        read = read_mixed(root, scope)
    elif fmt in READERS:
        read = READERS[fmt](root, scope=scope)
    else:
        raise DataError(f"unknown data.format {fmt!r}; expected one of: auto, {', '.join(FORMATS)}")
    inventory(root, read, scope)
    return read, fmt
