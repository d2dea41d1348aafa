"""``POST /v1/detect`` with ``Accept: application/dicom``: the detections as a DICOM Structured Report.

Content negotiation only: JSON stays the default (no Accept, ``*/*``, ``application/json``); the SR is returned when
``application/dicom`` is the client's most preferred type. An SR can only describe a DICOM upload (it references the
source SOP instance and copies its patient and study); any other upload asking for one gets ``406 sr_needs_dicom``
before it is decoded. The report is the one :mod:`pipeline.dicom.sr` writes for a series, made of this one
instance, so its UIDs are deterministic (the same upload, model and threshold give the same SR).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from pipeline.data.imaging import sniff
from pipeline.serve.errors import ApiError

DICOM_MEDIA_TYPE = "application/dicom"
_JSON_TYPES = ("application/json", "application/*", "*/*")


def _accepted(header: str) -> list[tuple[str, float]]:
    out = []
    for part in header.split(","):
        fields = [f.strip() for f in part.split(";")]
        if not fields[0]:
            continue
        q = 1.0
        for f in fields[1:]:
            if f.lower().startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        out.append((fields[0].lower(), q))
    return out


def wants_sr(request: Request) -> bool:
    """True when ``application/dicom`` is acceptable and preferred at least as much as any JSON type."""
    accepted = _accepted(request.headers.get("accept", ""))
    dicom = max((q for t, q in accepted if t == DICOM_MEDIA_TYPE), default=0.0)
    json_q = max((q for t, q in accepted if t in _JSON_TYPES), default=0.0)
    return dicom > 0.0 and dicom >= json_q


def require_dicom(data: bytes) -> None:
    """406 for an SR asked of a non-DICOM upload (an empty one is left to the decoder's 400)."""
    if data and sniff(data) != "dicom":
        kind = sniff(data)
        raise ApiError(406, "sr_needs_dicom",
                       f"a DICOM Structured Report (Accept: {DICOM_MEDIA_TYPE}) can only describe a DICOM upload; "
                       f"this one is {kind.upper() if kind else 'not a DICOM file'}: ask for JSON instead")


def _build(card: dict[str, Any], conf: float, data: bytes, detections: Any) -> tuple[bytes, str]:
    from pipeline.dicom.sr import ModelIdentity, SourceImage, SrError, build_series_report, pseudonym, read_header

    try:
        header = read_header(data)
        report = build_series_report([SourceImage.of(header, detections)], ModelIdentity.from_card(card, conf))
    except SrError as e:
        raise ApiError(422, "sr_not_reportable", f"no Structured Report can be made for this upload: {e}") from None
    return report.to_bytes(), pseudonym(str(header.SeriesInstanceUID))


async def sr_response(state: Any, data: bytes, detections: Any) -> Response:
    """The SR of one decoded DICOM upload (built in the pool: highdicom takes milliseconds)."""
    body, name = await asyncio.get_running_loop().run_in_executor(
        state.pool, _build, state.detector.card, state.detector.conf, data, detections)
    return Response(body, media_type=DICOM_MEDIA_TYPE,
                    headers={"Content-Disposition": f'attachment; filename="SR_{name}.dcm"'})
