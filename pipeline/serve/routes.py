"""The endpoints. Each handler finds its app's :class:`ServiceState` in ``request.app.state.detflow``; decoding and
inference run in the state's thread pool (or micro-batcher), never on the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile

from pipeline.serve.decoding import decode_upload
from pipeline.serve.errors import ApiError
from pipeline.serve.intake import BATCH, DETECT, admitted, read_upload
from pipeline.serve.schemas import (
    ERROR_RESPONSES,
    BatchItem,
    BatchResult,
    DetectResult,
    ErrorDetail,
    ImageSize,
    multipart_doc,
)
from pipeline.serve.settings import ServeSettings
from pipeline.serve.sr import DICOM_MEDIA_TYPE, require_dicom, sr_response, wants_sr
from pipeline.serve.state import ServiceState

log = logging.getLogger("pipeline.serve")


def _state(request: Request) -> ServiceState:
    return request.app.state.detflow


# ---------------------------------------------------------------------------------------------- steps


async def decode(state: ServiceState, upload: UploadFile) -> np.ndarray:
    """One file part -> RGB, in the pool (size limit, then content sniffing and decoding)."""
    return await decode_data(state, await read_upload(upload, state.settings.max_upload_bytes))


async def decode_data(state: ServiceState, data: bytes) -> np.ndarray:
    """Received bytes -> RGB, in the pool."""
    window = state.detector.dicom_window() if hasattr(state.detector, "dicom_window") else None
    return await asyncio.get_running_loop().run_in_executor(
        state.pool, decode_upload, data, state.settings.max_pixels, window)


async def infer(state: ServiceState, request: Request, images: list[np.ndarray]) -> list[tuple[Any, float]]:
    """(detections, model milliseconds) per image, or (ApiError, 0) for an image whose model call failed (a counted
    JSON 500 for that image only: see :meth:`ServiceState.predict_each`)."""
    rid = getattr(request.state, "request_id", "-")

    def failed(e: BaseException) -> tuple[ApiError, float]:
        state.metrics.inference_errors.inc()
        log.error("request_id=%s inference failed: %s", rid, type(e).__name__, exc_info=e)
        return ApiError(500, "inference_error", f"inference failed (request id {rid})"), 0.0

    try:
        if state.batcher is not None:
            out = await asyncio.gather(*(state.batcher.submit(im) for im in images), return_exceptions=True)
            return [failed(r) if isinstance(r, BaseException) and not isinstance(r, ApiError) else
                    (r, 0.0) if isinstance(r, ApiError) else r for r in out]
        dets, ms = await asyncio.get_running_loop().run_in_executor(state.pool, state.predict_each, images)
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - the model call itself failed: JSON 500, counted
        return [failed(e) for _ in images]
    return [failed(d) if isinstance(d, Exception) else (d, ms) for d in dets]


def result(state: ServiceState, det: Any, rgb: np.ndarray, ms: float) -> DetectResult:
    """Detections in the response's terms: class names next to ids, plain floats, the image size."""
    labels = [int(x) for x in np.asarray(det.labels).tolist()]
    classes = state.detector.classes
    return DetectResult(
        boxes=np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4).tolist(),
        labels=[classes[i] if 0 <= i < len(classes) else str(i) for i in labels], label_ids=labels,
        scores=[float(s) for s in np.asarray(det.scores).tolist()], model_version=state.model_version,
        inference_ms=round(ms, 3), image=ImageSize(width=int(rgb.shape[1]), height=int(rgb.shape[0])))


def _admitted(state: ServiceState, request: Request, field: str, max_files: int) -> Any:
    state.require_ready()
    return admitted(request, field, max_files, state.receiving, state.processing)


# ---------------------------------------------------------------------------------------------- endpoints


async def detect(request: Request) -> DetectResult | Response:
    """Detect objects in one JPEG, PNG or DICOM file (multipart field `file`; type read from the content).
    JSON by default; `Accept: application/dicom` on a DICOM upload returns a DICOM Structured Report (TID 1500)."""
    state = _state(request)
    sr = wants_sr(request)  # hook (#23): pipeline/serve/sr.py
    async with _admitted(state, request, "file", 1) as (upload,):
        data = await read_upload(upload, state.settings.max_upload_bytes)
        if sr:
            require_dicom(data)
        rgb = await decode_data(state, data)
        ((det, ms),) = await infer(state, request, [rgb])
        if isinstance(det, ApiError):
            raise det
        if sr:
            return await sr_response(state, data, det)
        return result(state, det, rgb, ms)


async def detect_batch(request: Request) -> BatchResult:
    """Several files (repeated multipart field `files`, at most `max_batch_files`). A well-formed request
    answers 200 with one item per file in order; each item has its own `status` and either `result` or
    `error`, so one bad file never fails the others."""
    state = _state(request)
    async with _admitted(state, request, "files", state.settings.max_batch_files) as uploads:

        async def one(upload: UploadFile) -> np.ndarray | ApiError:
            try:
                return await decode(state, upload)
            except ApiError as e:
                state.metrics.count_input_error(e.code)
                return e

        decoded: list[Any] = list(await asyncio.gather(*(one(u) for u in uploads)))
        good = [(i, d) for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        by_index: dict[int, DetectResult] = {}
        if good:
            for (i, d), (det, t) in zip(good, await infer(state, request, [d for _, d in good]), strict=True):
                if isinstance(det, ApiError):
                    decoded[i] = det  # this image's model call failed: its own error entry, the others stand
                else:
                    by_index[i] = result(state, det, d, t)
        items = [BatchItem(index=i, status=d.status, error=ErrorDetail(code=d.code, message=d.message))
                 if isinstance(d, ApiError) else BatchItem(index=i, status=200, result=by_index[i])
                 for i, d in enumerate(decoded)]
        n_ok = sum(1 for it in items if it.status == 200)
        return BatchResult(model_version=state.model_version, n_ok=n_ok, n_failed=len(items) - n_ok, results=items)


async def model_info(request: Request) -> dict[str, Any]:
    """The model card, the execution providers actually in use, and the service limits."""
    state = _state(request)
    if state.detector is None:
        state.require_ready()
    d, s = state.detector, state.settings
    return {"model_version": state.model_version, "providers": list(d.providers),
            "requested_providers": list(getattr(d, "requested_providers", d.providers)),
            "family": getattr(d, "family", d.card.get("family")), "classes": list(d.classes),
            "ready": state.ready, "card": d.card,
            "limits": {k: s.public()[k] for k in ("max_upload_bytes", "max_batch_bytes", "max_pixels",
                                                  "max_batch_files")},
            "service": {"workers": s.workers, "ort_threads": s.ort_threads, "microbatch": s.microbatch,
                        "auth": s.token is not None}}


async def model_report(request: Request) -> FileResponse:
    """The run report (`detflow report`, one self-contained HTML page) kept next to the served model, if any."""
    path = _state(request).settings.model_path.parent / "report.html"
    if not path.is_file():
        raise ApiError(404, "not_found", f"no report.html next to the model in {path.parent} (write one with "
                       "`detflow report --model-copy`)")
    return FileResponse(path, media_type="text/html; charset=utf-8")


async def live() -> dict[str, str]:
    """200 while the process serves requests."""
    return {"status": "alive"}


async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and one warm-up inference ran; 503 before (or if loading failed)."""
    code, body = _state(request).readiness()
    return JSONResponse(body, status_code=code)


async def prometheus(request: Request) -> Response:
    """Prometheus text format (behind the bearer token when DETFLOW_SERVE_METRICS_AUTH is set)."""
    state = _state(request)
    if state.detector is not None and state.pool is not None:  # shift gauges brought up to date (test if due)
        await asyncio.get_running_loop().run_in_executor(state.pool, state.shift_status)
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


async def shift_status(request: Request) -> dict[str, Any]:
    """Shift detection: the rolling window of request embeddings tested against the model's training reference
    (MMD permutation test, recomputed at most every `shift_every` images): availability (and why not), window
    fill and the latest `result` (statistic, p_value, shifted, ...; null until the window holds 8 images)."""
    state = _state(request)
    if state.detector is None:
        state.require_ready()
    return await asyncio.get_running_loop().run_in_executor(state.pool, state.shift_status)


def router(settings: ServeSettings, guard: Callable[..., None]) -> APIRouter:
    """All endpoints; ``guard`` (see ``pipeline.serve.auth``) protects /v1/*, and /metrics with metrics_auth."""
    auth = [Depends(guard)]
    r = APIRouter()
    r.add_api_route(DETECT, detect, methods=["POST"], response_model=DetectResult,
                    responses={**ERROR_RESPONSES, 200: {"content": {DICOM_MEDIA_TYPE: {}}, "description":
                                                        "JSON detections, or with `Accept: application/dicom` on a "
                                                        "DICOM upload a DICOM Structured Report"},
                               406: {"model": ERROR_RESPONSES[401]["model"],
                                     "description": "an SR was asked for a non-DICOM upload"}},
                    tags=["detection"], openapi_extra=multipart_doc("file", many=False), dependencies=auth)
    r.add_api_route(BATCH, detect_batch, methods=["POST"], response_model=BatchResult, responses=ERROR_RESPONSES,
                    tags=["detection"], openapi_extra=multipart_doc("files", many=True), dependencies=auth)
    r.add_api_route("/v1/model", model_info, methods=["GET"], tags=["model"], dependencies=auth,
                    responses={401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]})
    r.add_api_route("/v1/model/report", model_report, methods=["GET"], tags=["model"], dependencies=auth,
                    response_class=FileResponse, responses={200: {"content": {"text/html": {}}},
                                                            401: ERROR_RESPONSES[401],
                                                            404: {"model": ERROR_RESPONSES[401]["model"],
                                                                  "description": "no report next to the model"}})
    r.add_api_route("/v1/shift", shift_status, methods=["GET"], tags=["model"], dependencies=auth,
                    responses={401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]})
    r.add_api_route("/health/live", live, methods=["GET"], tags=["health"])
    r.add_api_route("/health/ready", ready, methods=["GET"], tags=["health"],
                    responses={503: {"description": "not loaded or not warmed up"}})
    r.add_api_route("/metrics", prometheus, methods=["GET"], tags=["health"], response_class=Response,
                    dependencies=auth if settings.metrics_auth else [],
                    responses={401: ERROR_RESPONSES[401]} if settings.metrics_auth else None)
    return r
