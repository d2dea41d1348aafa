"""Shared helpers for the DICOM SR and PACS tests: a detector whose boxes follow the image, and crafted DICOM
objects (copies of phantom series with new UIDs, another modality, an air-only series, a corrupt instance, a
document-only study). Real files: Orthanc, dciodvfy and the engine read them as they would a scanner's."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from helpers import write_tiny_yolo_onnx

SECRET_NAME = "SECRET^PATIENT-4711"
SECRET_ID = "SECRETID-4711"


def pixel_model(folder: Path, base_card: dict[str, Any]) -> Path:
    """A YOLO-shaped graph (``helpers.write_tiny_yolo_onnx``) whose boxes follow the pixels, under the card of a
    real export (its input contract, classes, class codes, training modality and spacing), checksum updated.

    Why: the tiny export of ``TINY_EXPORT`` (2 epochs from scratch at 64 px) boxes every slice as the whole image
    at one score, so a geometry check against it would compare integers. Here each input pixel of value v (0..1,
    grey) proposes a 14 x 14 box centred at (12 + 40 v, 52 - 40 v) in model pixels, scored v - 0.5: bright structures
    (bone, nodules, soft tissue) give a few boxes at fractional source coordinates, an air-only image none.
    """
    folder.mkdir(parents=True, exist_ok=True)
    w = np.zeros((5, 3, 1, 1), np.float32)
    w[0, 0], w[1, 1], w[4, 2] = 40.0, -40.0, 1.0
    path = folder / "model.onnx"
    write_tiny_yolo_onnx(path, w, [12.0, 52.0, 14.0, 14.0, -0.5])
    card = {k: v for k, v in base_card.items() if k != "embedding"}  # no embedding output: no shift reference
    card["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    card["version"] = card["sha256"][:12]
    card["model"] = "pixel-following test graph"
    card["postprocess"] = {**(card.get("postprocess") or {}), "conf": 0.01}
    (folder / "model_card.json").write_text(json.dumps(card, indent=2))
    return path


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=list(parts))


def copy_series(files: list[Path], out: Path, tag: str, *, modality: str | None = None,
                sop_class: str | None = None, pixels: Callable[[np.ndarray], np.ndarray] | None = None,
                patient: tuple[str, str] | None = None) -> list[Path]:
    """The files of one series as a new study and series (UIDs derived from ``tag``), optionally with another
    modality / SOP class, changed stored pixel values, or another patient (name, id)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, f in enumerate(sorted(files)):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = _uid(tag, "study")
        ds.SeriesInstanceUID = _uid(tag, "series")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(tag, "sop", str(i))
        ds.FrameOfReferenceUID = _uid(tag, "frame")
        if modality:
            ds.Modality = modality
        if sop_class:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        if pixels is not None:
            ds.PixelData = np.ascontiguousarray(pixels(ds.pixel_array)).astype(ds.pixel_array.dtype).tobytes()
        if patient:
            ds.PatientName, ds.PatientID = patient
        path = out / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def air(stored: np.ndarray) -> np.ndarray:
    """Every pixel -1000 HU (stored value 24 with the phantom's intercept -1024): nothing a detector can find."""
    return np.full_like(stored, 24)


def corrupt_copy(src: Path, out: Path, tag: str) -> Path:
    """``src`` as one more instance of its series (new SOP Instance UID) whose pixel data is cut to half: the header
    parses, Orthanc stores it, the pixels cannot be read."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(tag, "corrupt")
    ds.InstanceNumber = 99
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def pdf_study(out: Path, tag: str) -> Path:
    """A study holding one Encapsulated PDF document (Modality DOC): no image at all."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage
    meta.MediaStorageSOPInstanceUID = _uid(tag, "pdf")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(tag, "pdf-study"), _uid(tag, "pdf-series")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doc^Only", "DOC-1", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = \
        "20240101", "120000", "1", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DOC", 1, 1
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20240101", "120000", "20240101120000"
    ds.ConversionType, ds.BurnedInAnnotation = "WSD", "YES"
    ds.DocumentTitle, ds.MIMETypeOfEncapsulatedDocument = "referral letter", "application/pdf"
    ds.ConceptNameCodeSequence = []
    pdf = b"%PDF-1.1\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out
