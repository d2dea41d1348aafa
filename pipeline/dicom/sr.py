"""DICOM Structured Reports of detections: one TID 1500 Measurement Report per source series, built with highdicom.

What a report holds (a Comprehensive SR, so a PACS files it with the study and a viewer can draw it):

* patient and study modules copied from the source images, a new series (``Modality`` SR);
* the observer is a device: detflow with the model (TID 1004, for every content item), and the series summary
  group carries the algorithm identification (TID 4019: name ``detflow <family>/<model>``, version = the card's
  version, parameters = the model's sha256, the score threshold and the detflow version). It is not repeated in
  each detection's group: six more content items per detection, and highdicom's cost grows with the item count;
* one **series summary** group (TID 1501) over every analysed image, with each class coded
  (:mod:`pipeline.dicom.codes`) and evaluated Present / Absent (SNOMED CT, DICOM CID 240): an empty result is a
  result, and says so;
* one **planar ROI** group (TID 1410) per detection: a closed POLYLINE rectangle (5 points, the first repeated) in
  the source image's pixel coordinates (DICOM PS3.3 C.18.6.1.1: 0\\0 is the top left corner of the top left pixel,
  Columns\\Rows the bottom right corner of the last one; the engine's boxes are in exactly that frame, see
  :func:`rectangle`), selected from the source SOP instance; the finding type is the class's code and the score a
  NUM "Certainty of Finding" (DCM 111012) in percent (UCUM %, the engine score x 100, 4 decimals, as DICOM CAD
  reports state certainty);
* ``CompletionFlag`` COMPLETE, ``PreliminaryFlag`` PRELIMINARY, ``VerificationFlag`` UNVERIFIED: nobody accountable
  has read it yet.

UIDs are deterministic (:func:`sr_uids`): the same model, threshold and instances give the same SR SOP Instance UID,
so a rerun (or a second writer after a crash) files the same object again instead of a second one.

Nothing here logs patient data; errors name instances by a short hash (:func:`pseudonym`), never by UID or name.
"""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from pipeline.dicom.codes import (
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_NAME,
    PRIVATE_SCHEME_ORGANIZATION,
    ClassCode,
    card_class_codes,
)
from pipeline.errors import DetflowError

#: The namespace of every UID detflow derives (ISO/IEC 9834-8 UUIDs under the 2.25 root: no registered root needed).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/detflow/detflow#dicom-sr")
SR_SERIES_NUMBER = 9901  # a high number keeps the SR series after the source series in viewers' series lists
SERIES_DESCRIPTION = "detflow AI detections (unverified)"

# Codes used by every report (from DICOM PS3.16; pydicom's dictionary has them, tests check the values)
_CERTAINTY = ("111012", "DCM", "Certainty of Finding")
_PERCENT = ("%", "UCUM", "Percent")  # as DICOM's CAD reports give certainty; viewers show "87.5 %"
_PRESENT = ("52101004", "SCT", "Present")
_ABSENT = ("272519000", "SCT", "Absent")
_PROCEDURES = {  # source Modality -> procedure reported (CID 100)
    "CT": ("25045-6", "LN", "CT unspecified body region"),
    "MR": ("25056-3", "LN", "MRI unspecified body region"),
    "CR": ("43468-8", "LN", "XR unspecified body region"),
    "DX": ("43468-8", "LN", "XR unspecified body region"),
    "NM": ("49118-3", "LN", "NM unspecified body region"),
    "PT": ("44136-0", "LN", "PET unspecified body region"),
}
_IMAGING_PROCEDURE = ("363679005", "SCT", "Imaging procedure")
# Type 2 attributes highdicom reads from the first source image; absent in some files, empty is their legal value
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns")


class SrError(DetflowError):
    """A Structured Report cannot be made from these inputs (not DICOM, no series, an attribute missing)."""


def pseudonym(uid: str) -> str:
    """A short, stable stand-in for a UID in messages and logs (UIDs can identify a patient's study)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


def derived_uid(*parts: str) -> str:
    """A UID under 2.25 from a name-based UUID (uuid5) of ``parts``: the same parts, the same UID, always."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


@dataclass(frozen=True)
class SrUids:
    series: str  # the SR series: one per (model, source series)
    instance: str  # the SR document: one per (model, threshold, source series, the exact instances analysed)
    device: str  # the observer device: one per model


def sr_uids(model_sha256: str, conf: float, source_series_uid: str, source_instance_uids: Iterable[str]) -> SrUids:
    """Deterministic UIDs of the SR about one source series (see the module docstring)."""
    instances = hashlib.sha256("\n".join(sorted(source_instance_uids)).encode()).hexdigest()
    return SrUids(series=derived_uid("sr-series", model_sha256, source_series_uid),
                  instance=derived_uid("sr", model_sha256, f"{conf:.6g}", source_series_uid, instances),
                  device=derived_uid("device", model_sha256))


@dataclass
class SourceImage:
    """One analysed source instance: its header (no pixel data) and the detections in its pixel coordinates."""

    header: Dataset
    boxes: np.ndarray  # (N, 4) xyxy, source pixels
    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,) class indices

    @classmethod
    def of(cls, header: Dataset, detections: Any) -> SourceImage:
        """From a header and an engine result (:class:`pipeline.infer.processing.Detections`)."""
        return cls(header, np.asarray(detections.boxes, np.float64).reshape(-1, 4),
                   np.asarray(detections.scores, np.float64).reshape(-1),
                   np.asarray(detections.labels, np.int64).reshape(-1))


@dataclass(frozen=True)
class ModelIdentity:
    """What the report says about the algorithm, from the model card."""

    family: str
    model: str
    version: str
    sha256: str
    classes: tuple[str, ...]
    codes: Mapping[str, ClassCode]
    conf: float
    detflow_version: str = "unknown"

    @classmethod
    def from_card(cls, card: Mapping[str, Any], conf: float) -> ModelIdentity:
        try:
            codes = card_class_codes(card)
        except ValueError as e:
            raise SrError(str(e)) from None
        sha = str(card.get("sha256") or "")
        return cls(family=str(card.get("family") or "?"), model=str(card.get("model") or "?"),
                   version=str(card.get("version") or sha[:12] or "unknown"), sha256=sha,
                   classes=tuple(card.get("classes") or ()), codes=codes, conf=float(conf),
                   detflow_version=str((card.get("versions") or {}).get("detflow") or _detflow_version()))

    @property
    def name(self) -> str:
        return f"detflow {self.family}/{self.model}"


def _detflow_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("detflow")
    except md.PackageNotFoundError:
        return "unknown"


def header_of(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without pixel data, with the attributes a report needs checked (SrError otherwise)."""
    missing = [k for k in _REQUIRED if k not in ds]
    if missing:
        raise SrError(f"the DICOM instance lacks {', '.join(missing)}: no report can reference it")
    header = Dataset()
    for elem in ds:
        if elem.tag.group != 0x7FE0 and elem.keyword not in ("FloatPixelData", "DoubleFloatPixelData"):
            header.add(elem)
    header.file_meta = getattr(ds, "file_meta", Dataset())
    for kw in _TYPE2:
        if kw not in header:
            setattr(header, kw, "")
    return header


def read_header(data: bytes | Path) -> Dataset:
    """The header of a DICOM file or bytes (pixel data not read). SrError when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data) if isinstance(data, bytes) else data, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise SrError(f"not a readable DICOM file ({type(e).__name__})") from None
    return header_of(ds)


def rectangle(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    """A closed POLYLINE rectangle: (column, row) corners clockwise from the top left, the first point repeated.

    The engine's boxes are continuous pixel coordinates with the top left corner of the top left pixel at 0, 0 and
    the image spanning [0, Columns] x [0, Rows] (the letterbox maps pixel edges to pixel edges, boxes are clipped to
    that range), which is DICOM's SCOORD convention: no half-pixel shift is needed. DICOM stores no EXIF
    orientation, so for DICOM inputs the engine's frame *is* the stored pixel matrix.
    """
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float64)


def _concept(code: tuple[str, str, str]) -> Any:
    from highdicom.sr import CodedConcept

    value, scheme, meaning = code
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _class_concept(code: ClassCode) -> Any:
    return _concept((code.value, code.scheme, code.meaning))


@dataclass
class SeriesReport:
    """A built SR and what it says, for summaries."""

    dataset: Dataset
    uids: SrUids
    n_images: int
    n_detections: int
    per_class: dict[str, int] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.dataset.save_as(buf, enforce_file_format=True)
        return buf.getvalue()


def build_series_report(images: Sequence[SourceImage], model: ModelIdentity) -> SeriesReport:
    """The TID 1500 report of one source series (every image of it that was analysed).

    Raises SrError when ``images`` is empty, spans several series, or an image lacks what a reference needs.
    """
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.sr.codedict import codes

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs the source UIDs at INFO and DEBUG
    if not images:
        raise SrError("no analysed image: a report needs at least one")
    series = {str(im.header.SeriesInstanceUID) for im in images}
    if len(series) != 1:
        raise SrError(f"a report covers one source series; these images belong to {len(series)}")
    series_uid = series.pop()
    images = sorted(images, key=lambda im: (int(im.header.get("InstanceNumber") or 0) if
                                             str(im.header.get("InstanceNumber") or "").strip().lstrip("-").isdigit()
                                             else 0, str(im.header.SOPInstanceUID)))
    uids = sr_uids(model.sha256, model.conf, series_uid, (str(im.header.SOPInstanceUID) for im in images))
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, manufacturer="detflow",
        parameters=[f"model sha256 {model.sha256}", f"score threshold {model.conf:g}",
                    f"detflow {model.detflow_version}"])
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device, name=model.name[:64], manufacturer_name="detflow", model_name=model.model[:64])))
    groups: list[Any] = []
    per_class = {name: 0 for name in model.classes}
    n = 0
    for im in images:
        order = np.argsort(-im.scores, kind="stable")
        for i in order:
            label = int(im.labels[i])
            if not 0 <= label < len(model.classes):
                raise SrError(f"detection class index {label} is outside the model's {len(model.classes)} classes")
            name = model.classes[label]
            code = model.codes[name]
            per_class[name] += 1
            n += 1
            x1, y1, x2, y2 = (float(v) for v in im.boxes[i])
            region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                                       graphic_data=rectangle(x1, y1, x2, y2),
                                       source_image=hd.sr.SourceImageForRegion.from_source_image(im.header))
            category = code.category
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("finding", uids.instance, str(n)),
                                                             identifier=f"{name} {per_class[name]}"[:64]),
                referenced_region=region, finding_type=_class_concept(code),
                finding_category=_concept(category) if category else None,
                measurements=[hd.sr.Measurement(name=_concept(_CERTAINTY),
                                                value=round(100.0 * float(im.scores[i]), 4),
                                                unit=_concept(_PERCENT))]))
    summary = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("summary", uids.instance),
                                                     identifier="series summary"),
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(im.header) for im in images],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=_class_concept(model.codes[name]), value=_concept(_PRESENT if per_class[name] else _ABSENT))
            for name in model.classes])
    modality = str(images[0].header.get("Modality") or "").upper()
    report = hd.sr.MeasurementReport(observation_context=observer,
                                     procedure_reported=_concept(_PROCEDURES.get(modality, _IMAGING_PROCEDURE)),
                                     imaging_measurements=[summary, *groups])
    private = [CodingSchemeIdentificationItem(designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME,
                                                 responsible_organization=PRIVATE_SCHEME_ORGANIZATION)] \
        if any(c.private for c in model.codes.values()) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom's notes on optional attributes are not the user's business
        sr = hd.sr.ComprehensiveSR(
            evidence=[im.header for im in images], content=report[0], series_instance_uid=uids.series,
            series_number=SR_SERIES_NUMBER, sop_instance_uid=uids.instance, instance_number=1,
            manufacturer="detflow", manufacturer_model_name=model.name[:64],
            software_versions=f"detflow {model.detflow_version}"[:64], series_description=SERIES_DESCRIPTION,
            is_complete=True, is_final=False, is_verified=False, coding_schemes=private)
    _complete_deidentification(sr)
    return SeriesReport(sr, uids, len(images), n, per_class)


def _complete_deidentification(sr: Dataset) -> None:
    """A source that says ``PatientIdentityRemoved`` YES must say how (Type 1C); when it does not, the copied
    Patient module would be invalid. The report states the method as unknown rather than inventing one."""
    if str(sr.get("PatientIdentityRemoved", "")).upper() == "YES" and "DeidentificationMethod" not in sr \
            and "DeidentificationMethodCodeSequence" not in sr:
        sr.DeidentificationMethod = "not stated in the source images"


# ---------------------------------------------------------------------------------------------- reading back


@dataclass(frozen=True)
class ReportedRegion:
    """One detection as a report states it (read back with plain pydicom, independently of highdicom)."""

    sop_instance_uid: str
    finding: tuple[str, str, str]  # (value, scheme, meaning)
    score: float
    box: tuple[float, float, float, float]  # xyxy from the rectangle's corners


def _code_of(item: Dataset, attr: str) -> tuple[str, str, str]:
    c = getattr(item, attr)[0]
    return (str(c.CodeValue), str(c.CodingSchemeDesignator), str(c.CodeMeaning))


def _walk(items: Iterable[Dataset]) -> Iterable[Dataset]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def read_regions(sr: Dataset) -> list[ReportedRegion]:
    """Every planar ROI group of a detflow report: the finding, its score and its rectangle."""
    out = []
    for group in _walk(sr.get("ContentSequence", [])):
        if group.get("ValueType") != "CONTAINER" or _code_of(group, "ConceptNameCodeSequence")[0] != "125007":
            continue  # 125007: Measurement Group
        finding, score, scoord = None, None, None
        for item in group.get("ContentSequence", []):
            name = _code_of(item, "ConceptNameCodeSequence")[0] if "ConceptNameCodeSequence" in item else None
            if name == "121071":  # Finding
                finding = _code_of(item, "ConceptCodeSequence")
            elif name == _CERTAINTY[0]:
                measured = item.MeasuredValueSequence[0]
                unit = str(measured.MeasurementUnitsCodeSequence[0].CodeValue)
                score = float(measured.NumericValue) / (100.0 if unit == "%" else 1.0)
            elif item.get("ValueType") == "SCOORD":
                scoord = item
        if scoord is None:
            continue
        pts = np.asarray(scoord.GraphicData, np.float64).reshape(-1, 2)
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        out.append(ReportedRegion(str(ref.ReferencedSOPInstanceUID), finding or ("", "", ""),
                                  float("nan") if score is None else score,
                                  (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()),
                                   float(pts[:, 1].max()))))
    return out


def read_summary(sr: Dataset) -> dict[str, str]:
    """The series summary group: class code meaning -> "Present" / "Absent"."""
    for group in _walk(sr.get("ContentSequence", [])):
        if group.get("ValueType") == "CONTAINER" and _code_of(group, "ConceptNameCodeSequence")[0] == "125007" \
                and any(i.get("ValueType") == "TEXT" and i.get("TextValue") == "series summary"
                        for i in group.get("ContentSequence", [])):
            return {_code_of(i, "ConceptNameCodeSequence")[2]: _code_of(i, "ConceptCodeSequence")[2]
                    for i in group.ContentSequence if i.get("ValueType") == "CODE"
                    and i.get("RelationshipType") == "CONTAINS"}
    return {}
