"""Batch inference over an image, a folder, a DICOM series, a file list or a COCO split; streaming, never
aborted by a bad file (each one is reported and skipped). Also the shift test of a set of images against the
model's training embeddings (:func:`run_shift`, and a ``shift.json`` beside batch predictions)."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.data.imaging import DICOM_SUFFIXES, IMAGE_SUFFIXES, looks_like_dicom
from pipeline.data.values import identifier, parse_json
from pipeline.errors import DetflowError
from pipeline.fileio import atomic_write_json
from pipeline.infer.engine import EmbeddingsUnavailable, OnnxDetector
from pipeline.infer.processing import Detections
from pipeline.shift import DEFAULT_ALPHA, DEFAULT_PERMUTATIONS, MIN_SAMPLES, ShiftError, ShiftResult, mmd_test

#: Most target embeddings one shift test uses: the test's memory grows with (reference + target)², so a larger set is
#: subsampled (seeded); 512 images already detect shifts far smaller than a change of site.
MAX_TARGET = 512
SHIFT_FILE = "shift.json"


@dataclass
class BatchSummary:
    n_images: int = 0
    n_detections: int = 0
    errors: list[dict] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)
    shift: dict[str, Any] | None = None  # the shift.json document, when the test ran
    shift_note: str | None = None  # why it did not run


@dataclass
class ShiftRun:
    """What :func:`run_shift` did: the test's result and document, the images read and skipped, the picture."""

    result: ShiftResult
    document: dict[str, Any]
    n_images: int
    errors: list[dict]
    reference: np.ndarray
    target: np.ndarray


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


def source_folders(source: Path) -> list[Path]:
    """The folders a source reads its images from (a folder itself; a COCO file's dataset folder), which a run must
    not write into; a single image or a file list names files only."""
    if source.is_dir():
        return [source]
    if source.suffix == ".json":
        return [source.parent.parent if source.parent.name == "coco" else source.parent]
    return []


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


def source_groups(source: Path | None, items: list[Source]) -> list[str | None]:
    """Each input's patient, for the shift test's patient-level permutation (None: the image is its own unit).

    A COCO split gives its images' ``patient`` / ``patient_id`` (prepare writes pseudonyms there); a DICOM file its
    PatientID, hashed at once (it never leaves the process; shift.json reports only counts); any other image
    has no patient. A header that cannot be read leaves the image on its own (decoding reports the file)."""
    coco = coco_patients(source)
    return [item_group(name, path, coco) for name, _, path in items]


def coco_patients(source: Path | None) -> dict[str, str]:
    """``file_name -> patient`` of a COCO split's images (``patient`` / ``patient_id``); empty for other sources."""
    if source is None or not (source.is_file() and source.suffix == ".json"):
        return {}
    images = parse_json(_read_text(source, "COCO dataset")).get("images") or []
    return {img["file_name"]: pid for img in images if (pid := _patient(img)) is not None}


def item_group(name: str, path: Path, coco: dict[str, str]) -> str | None:
    """One input's patient (see :func:`source_groups`): the COCO entry's, else a DICOM file's hashed PatientID."""
    if name in coco:
        return coco[name]
    if path.suffix.lower() in DICOM_SUFFIXES or (path.suffix.lower() not in IMAGE_SUFFIXES and looks_like_dicom(path)):
        patient = _dicom_patient(path)
        return "dicom:" + hashlib.sha256(patient.encode()).hexdigest()[:16] if patient else None
    return None


def _patient(img: dict[str, Any]) -> str | None:
    """A COCO image's patient by value (``patient`` as prepare writes it, else ``patient_id``): ``0`` is a patient,
    a blank or a value that is no identifier is none (the image is its own unit)."""
    for key in ("patient", "patient_id"):
        try:
            pid = identifier(img.get(key))
        except ValueError:
            return None
        if pid is not None:
            return pid
    return None


def _dicom_patient(path: Path) -> str | None:
    """The PatientID of a DICOM file's header, None when absent or unreadable."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        return str(ds.get("PatientID", "") or "") or None
    except Exception:  # noqa: BLE001 - the pixels' decoder reports an unreadable file; here it is just ungrouped
        return None


def collect_sources(source: Path) -> list[Source]:
    """Every input of ``source``, listed up front so that a bad source fails before a model loads or work starts."""
    return [(name, image_id if image_id is not None else index + 1, path)
            for index, (name, image_id, path) in enumerate(iter_sources(source))]


def run_batch(detector: OnnxDetector, source: Path | list[Source], out_dir: Path, batch: int = 8,
              render: bool = False, progress: bool = True, predictions_name: str = "predictions.json",
              workers: int = 1, max_pixels: int | None = None, shift: bool = True,
              shift_source: str | None = None,
              on_result: Callable[[Path, Detections | None], None] | None = None) -> BatchSummary:
    """Stream inputs through the engine, ``batch`` images per model call and ``workers`` calls at once (see
    :meth:`OnnxDetector.predict_stream`); write COCO-results JSON, an error list and optional renders.

    ``source``: a path (see :func:`iter_sources`) or the list :func:`collect_sources` made of one. Files are decoded
    by content with the service's rules (:meth:`OnnxDetector.decode`); one over ``max_pixels`` (None: the default
    limit, :data:`pipeline.data.imaging.DEFAULT_MAX_PIXELS`) is reported as ``image_too_large`` and skipped.

    ``shift``: when the model has the embedding output, also test the images against its training embeddings
    (:func:`shift_test`) and write ``shift.json`` beside the predictions; ``summary.shift_note`` says why not
    otherwise (an older model, fewer than :data:`~pipeline.shift.MIN_SAMPLES` images, no reference sample).

    ``on_result``: called with each input's path and its detections (None when it could not be decoded), in input
    order; ``detflow infer --sr`` collects DICOM results by series with it (:mod:`pipeline.dicom.files`).
    """
    summary = BatchSummary(providers=detector.providers)
    items = source if isinstance(source, list) else collect_sources(source)
    results: list[dict] = []
    embed = shift and detector.has_embeddings
    vectors: list[np.ndarray] = []
    vector_groups: list[str | None] = []
    group_of = dict(zip((it[0] for it in items), source_groups(source if isinstance(source, Path) else None, items),
                        strict=True)) if embed else {}
    with tqdm(total=len(items), desc="inference", unit="img", disable=not progress) as bar:
        stream = detector.predict_stream(items, batch=batch, workers=workers, embeddings=embed,
                                         decode=lambda item: detector.decode(item[2], item[0], max_pixels).rgb)
        for r in stream:
            name, image_id, _ = r.source
            bar.update(1)
            if on_result is not None:  # hook (#23, DICOM SR): every outcome, in input order
                on_result(r.source[2], r.detections if r.error is None else None)
            if r.error is not None:
                summary.errors.append(error_entry(name, r.error))
                continue
            d = r.detections
            assert d is not None and r.rgb is not None
            summary.n_images += 1
            summary.n_detections += len(d)
            if r.embedding is not None:
                vectors.append(r.embedding)
                vector_groups.append(group_of.get(name))
            results += prediction_rows(name, image_id, d, detector.classes)
            if render:
                _render(r.rgb, d, detector.classes, out_dir / "rendered" / f"{Path(name).stem}.png")
    atomic_write_json(out_dir / predictions_name, results)
    atomic_write_json(out_dir / "infer_errors.json", summary.errors)
    if shift:
        source_name = shift_source if shift_source is not None else str(source) if isinstance(source, Path) else None
        summary.shift, summary.shift_note = write_shift(detector, out_dir, vectors, vector_groups,
                                                        n_skipped=len(summary.errors), source=source_name)
    return summary


def prediction_rows(name: str, image_id: int, d: Detections, classes: list[str]) -> list[dict]:
    """One image's detections as COCO results rows (``predictions.json``): xywh boxes in original pixels."""
    return [{"image_id": image_id, "file_name": name, "category_id": int(c) + 1, "category": classes[int(c)],
             "bbox": [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2), round(float(y2 - y1), 2)],
             "score": round(float(s), 5)}
            for (x1, y1, x2, y2), s, c in zip(d.boxes, d.scores, d.labels, strict=True)]


def error_entry(name: str, error: BaseException) -> dict:
    """An ``infer_errors.json`` entry for an input that could not be read."""
    return {"file": name, "kind": getattr(error, "kind", "unreadable"),
            "detail": getattr(error, "detail", None) or str(error)}


def write_shift(detector: OnnxDetector, out_dir: Path, vectors: list[np.ndarray] | np.ndarray,
                groups: list[str | None], *, n_skipped: int, source: str | None,
                n_images: int | None = None) -> tuple[dict | None, str | None]:
    """Batch inference's ``shift.json``: the test of ``vectors`` against the model's reference, or, when it cannot
    run (no embedding output, too few images), a document saying why. Returns (document or None, reason or None).
    ``n_images``: how many images were read, when ``vectors`` is already a subsample of theirs."""
    try:
        detector.require_embeddings()
        _, doc, _, _ = shift_test(detector, vectors, source=source, groups=groups, n_skipped=n_skipped)
        if n_images is not None:
            doc["n_images"] = n_images
    except (ShiftError, EmbeddingsUnavailable) as e:
        # written all the same: a stale result of an earlier run must not stand beside these predictions
        atomic_write_json(out_dir / SHIFT_FILE, {"tested": False, "reason": str(e), "source": source})
        return None, str(e)
    atomic_write_json(out_dir / SHIFT_FILE, doc)
    return doc, None


def shift_test(detector: OnnxDetector, vectors: list[np.ndarray] | np.ndarray, *, source: str | None = None,
               alpha: float = DEFAULT_ALPHA, n_permutations: int = DEFAULT_PERMUTATIONS, n_skipped: int = 0,
               max_target: int = MAX_TARGET, groups: list[str | None] | None = None,
               ) -> tuple[ShiftResult, dict[str, Any], np.ndarray, np.ndarray]:
    """MMD test of ``vectors`` (embeddings of the images under test) against the model's reference sample.

    ``groups``: each vector's patient (None: unknown, the image is its own unit); with the reference's patients
    (written by export) the test permutes patients (see :mod:`pipeline.shift`). Returns (result, the ``shift.json``
    document, reference, target used). More than ``max_target`` vectors are subsampled with a seeded generator (the
    document says how many were used of how many). Raises :class:`~pipeline.shift.ShiftError` (too few, bad
    values) or :class:`EmbeddingsUnavailable`.
    """
    reference = detector.embedding_reference()
    ref_groups = detector.embedding_reference_groups(len(reference))
    n = len(vectors)
    if n < MIN_SAMPLES:
        raise ShiftError(f"{n} image(s) read; the shift test needs at least {MIN_SAMPLES} (64 recommended)")
    target = np.asarray(np.stack(list(vectors)) if isinstance(vectors, list) else vectors, dtype=np.float64)
    tgt_groups = list(groups) if groups is not None else [None] * n
    if n > max_target:
        keep = np.sort(np.random.default_rng(0).choice(n, max_target, replace=False))
        target, tgt_groups = target[keep], [tgt_groups[i] for i in keep]
    result = mmd_test(reference, target, alpha=alpha, n_permutations=n_permutations, reference_groups=ref_groups,
                      target_groups=tgt_groups)
    ref_entry = (detector.card.get("embedding") or {}).get("reference") or {}
    doc = {**result.to_dict(), "source": source, "model": str(detector.model_path),
           "model_sha256": detector.card.get("sha256"), "model_version": detector.card.get("version"),
           "reference": {"file": ref_entry.get("file"), "sha256": ref_entry.get("sha256")},
           "n_images": n, "n_skipped": n_skipped,
           "embedding": "the model's 'embedding' output (see the card), one vector per image"}
    return result, doc, reference, target


def run_shift(detector: OnnxDetector, items: list[Source], out_dir: Path, *, source: str, alpha: float = DEFAULT_ALPHA,
              n_permutations: int = DEFAULT_PERMUTATIONS, workers: int = 1, progress: bool = True,
              max_pixels: int | None = None, source_path: Path | None = None) -> ShiftRun:
    """`detflow shift`: embed every input (one image per model call, as the reference was made), test against the
    reference and write ``shift.json``. ``source_path``: the SOURCE the items came from (a COCO split names each
    image's patient; DICOM files carry their own), for the patient-level test. Unreadable files are skipped and
    listed; an unusable input set (none readable, fewer than the test needs) or a model without embeddings raises
    one clear error."""
    detector.require_embeddings()
    detector.embedding_reference()  # a missing or damaged reference fails before the images are read
    vectors: list[np.ndarray] = []
    vector_groups: list[str | None] = []
    errors: list[dict] = []
    group_of = dict(zip((it[0] for it in items), source_groups(source_path, items), strict=True))
    with tqdm(total=len(items), desc="embeddings", unit="img", disable=not progress) as bar:
        stream = detector.predict_stream(items, batch=1, workers=workers, embeddings=True,
                                         decode=lambda item: detector.decode(item[2], item[0], max_pixels).rgb)
        for r in stream:
            bar.update(1)
            if r.error is not None:
                errors.append({"file": r.source[0], "kind": getattr(r.error, "kind", "unreadable"),
                               "detail": getattr(r.error, "detail", None) or str(r.error)})
            elif r.embedding is not None:
                vectors.append(r.embedding)
                vector_groups.append(group_of.get(r.source[0]))
    if not vectors:
        first = f" (first: {errors[0]['file']}: {errors[0]['kind']}: {errors[0]['detail']})" if errors else ""
        raise DetflowError(f"none of the {len(items)} input(s) in {source} could be read{first}")
    if len(vectors) < MIN_SAMPLES:
        raise ShiftError(f"{source}: {len(vectors)} readable image(s) of {len(items)}; the shift test needs at "
                         f"least {MIN_SAMPLES} (64 recommended)")
    result, doc, reference, target = shift_test(detector, vectors, source=source, alpha=alpha,
                                                n_permutations=n_permutations, n_skipped=len(errors),
                                                groups=vector_groups)
    atomic_write_json(out_dir / SHIFT_FILE, doc)
    return ShiftRun(result, doc, len(vectors), errors, reference, target)


def _render(rgb: object, dets: object, classes: list[str], out: Path) -> None:
    from PIL import Image, ImageDraw

    pic = Image.fromarray(rgb)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(pic)
    for b, s, c in zip(dets.boxes, dets.scores, dets.labels, strict=True):  # type: ignore[attr-defined]
        draw.rectangle([float(v) for v in b], outline=(255, 60, 40), width=2)
        draw.text((float(b[0]) + 2, max(0.0, float(b[1]) - 11)), f"{classes[int(c)]} {s:.2f}", fill=(255, 60, 40))
    out.parent.mkdir(parents=True, exist_ok=True)
    pic.save(out)
