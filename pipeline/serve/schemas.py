"""Response models and OpenAPI documentation of the endpoints (what clients see; no logic)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. corrupt_image")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ImageSize(BaseModel):
    width: int
    height: int


class DetectResult(BaseModel):
    boxes: list[list[float]] = Field(description="[x1, y1, x2, y2] in original-image pixels")
    labels: list[str] = Field(description="class names")
    label_ids: list[int] = Field(description="0-based class indices")
    scores: list[float]
    model_version: str
    inference_ms: float = Field(description="time of the model call (pre-processing, run, post-processing)")
    image: ImageSize


class BatchItem(BaseModel):
    index: int = Field(description="position of the file in the request")
    status: int = Field(description="HTTP-style status of this item: 200, or the 4xx/5xx /v1/detect would give")
    result: DetectResult | None = None
    error: ErrorDetail | None = None


class BatchResult(BaseModel):
    model_version: str
    n_ok: int
    n_failed: int
    results: list[BatchItem]


def multipart_doc(field: str, many: bool) -> dict[str, Any]:
    """``openapi_extra`` for an endpoint that parses its multipart body itself (FastAPI cannot see the field)."""
    binary: dict[str, Any] = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": binary} if many else binary
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": [field], "properties": {field: prop}}}}}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d} for s, d in (
        (400, "empty body or file, malformed multipart"), (401, "missing or wrong bearer token"),
        (408, "the request body did not arrive within body_timeout_s"),
        (413, "upload larger than max_upload_bytes, or image larger than max_pixels"),
        (415, "not multipart/form-data, or the file is not JPEG/PNG/DICOM (by content)"),
        (422, "missing field, corrupt image, DICOM without pixel data, ..."), (500, "unexpected server error"),
        (503, "model not loaded/warmed up yet, or overloaded"))}
