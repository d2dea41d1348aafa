"""``detflow infer SOURCE --sr DIR``: one Structured Report per DICOM series among a batch's inputs.

Batch inference hands every input's outcome to :meth:`SeriesReports.add` (its detections, or None when the file
could not be read); :meth:`SeriesReports.write` then files one report per series in DIR. Rules:

* a non-DICOM input gets no report and is counted (``non_dicom``);
* a series with an input that could not be read gets **no** report (``incomplete``): a report that says "absent"
  about images nobody analysed would be a false negative, so the series is named in the summary instead;
* files are named ``SR_<series pseudonym>.dcm`` (no UID or patient data in file names) and written atomically.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.imaging import looks_like_dicom
from pipeline.dicom.sr import ModelIdentity, SourceImage, SrError, build_series_report, pseudonym, read_header
from pipeline.fileio import atomic_write_bytes


@dataclass
class SrSummary:
    """What ``--sr`` wrote: reports, and the inputs that got none and why."""

    files: list[Path] = field(default_factory=list)
    n_with_findings: int = 0
    n_without_findings: int = 0
    non_dicom: int = 0
    incomplete: list[str] = field(default_factory=list)  # series pseudonyms
    not_reportable: int = 0  # DICOM files whose header lacks what a report must reference

    def line(self, out_dir: Path) -> str:
        skipped = []
        if self.non_dicom:
            skipped.append(f"{self.non_dicom} non-DICOM input(s) get none")
        if self.incomplete:
            skipped.append(f"{len(self.incomplete)} series not reported (an instance could not be read: "
                           f"{', '.join(self.incomplete[:5])})")
        if self.not_reportable:
            skipped.append(f"{self.not_reportable} DICOM file(s) lack the UIDs a report references")
        return (f"sr: {len(self.files)} report(s) ({self.n_with_findings} with findings, {self.n_without_findings} "
                f"without) -> {out_dir}" + (f"; {'; '.join(skipped)}" if skipped else ""))


class SeriesReports:
    """Collects a batch's DICOM results by series (thread-safe: batch inference may call from its workers)."""

    def __init__(self, card: dict[str, Any], conf: float) -> None:
        self.model = ModelIdentity.from_card(card, conf)  # a malformed card fails before any image is read
        self._images: dict[str, list[SourceImage]] = defaultdict(list)
        self._broken: set[str] = set()
        self._lock = threading.Lock()
        self.summary = SrSummary()

    def add(self, path: Path, detections: Any | None) -> None:
        """One input's outcome: ``detections`` from the engine, or None when it could not be decoded."""
        if not looks_like_dicom(path):
            with self._lock:
                self.summary.non_dicom += 1
            return
        try:
            header = read_header(path)
        except SrError:
            with self._lock:
                self.summary.not_reportable += 1 if detections is not None else 0
                if detections is None:
                    self.summary.non_dicom += 1  # unreadable and not even a DICOM header: nothing to report on
            return
        series = str(header.SeriesInstanceUID)
        with self._lock:
            if detections is None:
                self._broken.add(series)
            else:
                self._images[series].append(SourceImage.of(header, detections))

    def write(self, out_dir: Path) -> SrSummary:
        """One report per complete series into ``out_dir``; returns the summary."""
        s = self.summary
        for series in sorted(self._images, key=pseudonym):
            if series in self._broken:
                s.incomplete.append(pseudonym(series))
                continue
            report = build_series_report(self._images[series], self.model)
            path = atomic_write_bytes(out_dir / f"SR_{pseudonym(series)}.dcm", report.to_bytes())
            s.files.append(path)
            if report.n_detections:
                s.n_with_findings += 1
            else:
                s.n_without_findings += 1
        s.incomplete += [pseudonym(x) for x in sorted(self._broken - set(self._images), key=pseudonym)]
        return s
