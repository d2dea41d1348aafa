"""The FastAPI application: detection endpoints, health, model card and metrics over one `OnnxDetector`.

Design (see ``pipeline/serve/__init__.py`` for the full contract):

* Decoding and inference run in a ``ThreadPoolExecutor`` sized by ``settings.workers`` (onnxruntime, OpenCV and
  PIL release the GIL), never on the event loop. Optional micro-batching collects concurrent requests into one
  ``predict`` call.
* Every error is JSON ``{"error": {"code", "message"}}``; bad input is always a 4xx, an unexpected failure is a
  JSON 500 counted in ``detflow_serve_inference_errors_total`` and leaves the service ready.
* The image type comes from the content (magic bytes), never from the file name or the part's content type.
* Logs carry a request id, endpoint, body size, status and latency only: no file names, no image bytes, no DICOM
  attributes. Nothing from the DICOM header besides the pixel size is ever returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import os
import re
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pipeline.data.imaging import ImageLoadError, is_dicom_bytes, load_dicom, load_raster
from pipeline.serve.intake import BodyTimeout, Stage, body_deadline
from pipeline.serve.settings import ServeSettings

log = logging.getLogger("pipeline.serve")

MULTIPART_SLACK = 64 * 1024  # multipart boundaries and part headers on top of the file itself
DETECT, BATCH = "/v1/detect", "/v1/detect/batch"
ENDPOINTS = {DETECT, BATCH, "/v1/model", "/health/live", "/health/ready", "/metrics", "/docs", "/openapi.json",
             "/docs/oauth2-redirect", "/redoc"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# ImageLoadError kinds -> (HTTP status, public message or None to use the decoder's detail)
_INPUT_ERRORS: dict[str, tuple[int, str | None]] = {
    "not_an_image": (415, "content is not a JPEG, PNG or DICOM image"),
    "image_too_large": (413, None),
    "corrupt_image": (422, None),
    "corrupt_dicom": (422, "the DICOM file cannot be parsed or its pixel data cannot be read"),
    "dicom_no_pixel_data": (422, "the DICOM file has no Pixel Data element"),
    "dicom_multiframe": (422, None),
    "dicom_unsupported_compression": (422, None),
}


# ---------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")


def _overloaded(what: str) -> ApiError:
    return ApiError(503, "overloaded", f"too many {what} in progress; retry shortly", headers={"Retry-After": "1"})


def input_error(e: ImageLoadError) -> ApiError:
    status, message = _INPUT_ERRORS.get(e.kind, (422, None))
    return ApiError(status, e.kind, message or e.detail)


def _json_error(status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
                ) -> tuple[dict[str, Any], bytes]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (headers or [])
    return {"type": "http.response.start", "status": status, "headers": hdrs}, body


# ---------------------------------------------------------------------------------------------- response models


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


def _multipart_doc(field: str, many: bool) -> dict[str, Any]:
    binary: dict[str, Any] = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": binary} if many else binary
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": [field], "properties": {field: prop}}}}}}


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d} for s, d in (
        (400, "empty body or file, malformed multipart"), (401, "missing or wrong bearer token"),
        (408, "the request body did not arrive within body_timeout_s"),
        (413, "upload larger than max_upload_bytes, or image larger than max_pixels"),
        (415, "not multipart/form-data, or the file is not JPEG/PNG/DICOM (by content)"),
        (422, "missing field, corrupt image, DICOM without pixel data, ..."), (500, "unexpected server error"),
        (503, "model not loaded/warmed up yet, or overloaded"))}


# ---------------------------------------------------------------------------------------------- metrics


class Metrics:
    """One registry per app, so several apps (tests) never collide in the global registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("detflow_serve_requests_total", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("detflow_serve_request_duration_seconds", "request latency by endpoint",
                                 ["endpoint"], registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10,
                                                                    30))
        self.inference = Histogram("detflow_serve_inference_duration_seconds", "model call time per predict call",
                                   registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.batch_size = Histogram("detflow_serve_predict_batch_size", "images per predict call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.images = Counter("detflow_serve_images_total", "images run through the model", registry=r)
        self.inference_errors = Counter("detflow_serve_inference_errors_total",
                                        "unexpected server-side failures (JSON 500s)", registry=r)
        self.input_errors = Counter("detflow_serve_input_errors_total", "rejected inputs by error code",
                                    ["code"], registry=r)
        self.inflight = Gauge("detflow_serve_inflight_requests", "detection requests being processed", registry=r)
        self.body_reads = Gauge("detflow_serve_body_reads_in_progress", "detection requests whose body is still "
                                "arriving (they hold no processing slot)", registry=r)
        self.ready = Gauge("detflow_serve_ready", "1 when the model is loaded and warmed up", registry=r)
        self.provider = Gauge("detflow_serve_provider_active", "1 for each onnxruntime provider in use",
                              ["provider"], registry=r)
        self.model = Info("detflow_serve_model", "the served model", registry=r)


# ---------------------------------------------------------------------------------------------- decoding


def sniff(data: bytes) -> str | None:
    """The file type from its first bytes: 'jpeg', 'png', 'dicom' (Part 10 preamble) or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if is_dicom_bytes(data[:132]):
        return "dicom"
    return None


def _check_dicom_size(data: bytes, max_pixels: int) -> None:
    """Rows x Columns x frames from the header, before any pixel decoding (compressed data can expand a lot)."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - any parse failure of untrusted bytes is the client's corrupt file
        raise ImageLoadError("corrupt_dicom", "cannot parse the DICOM header") from None
    if rows * cols * max(frames, 1) > max_pixels:
        raise ImageLoadError("image_too_large", f"{cols}x{rows}x{frames} exceeds the limit of {max_pixels} pixels")


def decode_upload(data: bytes, max_pixels: int, dicom_window: tuple[float, float] | None) -> np.ndarray:
    """Bytes -> RGB uint8, by content. Raises ApiError (4xx) for anything wrong with the input."""
    if not data:
        raise ApiError(400, "empty_file", "the uploaded file is empty")
    kind = sniff(data)
    if kind is None:
        raise ApiError(415, "unsupported_media_type",
                       "content is not a JPEG, PNG or DICOM (Part 10) file; the type is detected from the bytes, "
                       "not from the file name or content type")
    try:
        if kind == "dicom":
            _check_dicom_size(data, max_pixels)
            return load_dicom(data, dicom_window).rgb
        return load_raster(data, keep_encoded=False, max_pixels=max_pixels).rgb
    except ImageLoadError as e:
        raise input_error(e) from None
    except Exception as e:  # noqa: BLE001 - decoders may raise anything on hostile bytes: still the input's fault
        log.warning("decoder raised %s on a %s upload", type(e).__name__, kind)
        raise ApiError(422, "corrupt_dicom" if kind == "dicom" else "corrupt_image",
                       f"the {kind.upper()} file cannot be decoded") from None


# ---------------------------------------------------------------------------------------------- micro-batching


class MicroBatcher:
    """Collect single-image requests for up to ``max_wait_s`` or ``max_size`` images, then one ``predict`` call.

    At most ``max_inflight`` batches run at once (the pool size); results come back through per-request futures.
    """

    def __init__(self, predict: Callable[[list[np.ndarray]], tuple[list[Any], float]], pool: ThreadPoolExecutor,
                 max_size: int, max_wait_s: float, max_inflight: int) -> None:
        self.predict, self.pool = predict, pool
        self.max_size, self.max_wait_s = max_size, max_wait_s
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[Any]]] = asyncio.Queue()
        self.slots = asyncio.Semaphore(max_inflight)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.loop_task: asyncio.Task[Any] | None = None

    def start(self) -> None:
        self.loop_task = asyncio.create_task(self._collect())

    async def submit(self, rgb: np.ndarray) -> tuple[Any, float]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.queue.put((rgb, fut))
        return await fut

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(items) < self.max_size:
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        items.append(self.queue.get_nowait())
                    else:
                        items.append(await asyncio.wait_for(self.queue.get(), remaining))
                except (asyncio.QueueEmpty, TimeoutError):
                    break
            items = [(rgb, fut) for rgb, fut in items if not fut.done()]  # clients that went away
            if not items:
                continue
            await self.slots.acquire()
            task = asyncio.create_task(self._run(items))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, items: list[tuple[np.ndarray, asyncio.Future[Any]]]) -> None:
        try:
            dets, ms = await asyncio.get_running_loop().run_in_executor(
                self.pool, self.predict, [rgb for rgb, _ in items])
            for (_, fut), det in zip(items, dets, strict=True):
                if not fut.done():
                    fut.set_result((det, ms))
        except Exception as e:  # noqa: BLE001 - handed to every waiting request
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(e)
        finally:
            self.slots.release()

    async def stop(self) -> None:
        for task in [self.loop_task, *self.tasks]:
            if task is not None:
                task.cancel()
        while not self.queue.empty():
            _, fut = self.queue.get_nowait()
            if not fut.done():
                fut.set_exception(ApiError(503, "shutting_down", "the service is shutting down"))


# ---------------------------------------------------------------------------------------------- state


class ServiceState:
    """The detector, its readiness, the pool and the metrics of one app."""

    def __init__(self, settings: ServeSettings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.detector: Any = None
        self.load_error: str | None = None
        self.warmed = False
        self.pool: ThreadPoolExecutor | None = None
        self.batcher: MicroBatcher | None = None
        # a request first receives its whole body, then takes a processing slot (see pipeline.serve.intake)
        self.receiving = Stage(settings.max_body_reads, lambda: _overloaded("uploads"), metrics.body_reads.set)
        self.processing = Stage(settings.max_inflight, lambda: _overloaded("requests"), metrics.inflight.set)

    @property
    def ready(self) -> bool:
        return self.detector is not None and self.warmed and self.load_error is None

    @property
    def model_version(self) -> str:
        card = self.detector.card
        return str(card.get("version") or str(card.get("sha256", ""))[:12] or "unknown")

    def readiness(self) -> tuple[int, dict[str, Any]]:
        if self.ready:
            return 200, {"status": "ready", "model_version": self.model_version,
                         "providers": list(self.detector.providers)}
        if self.load_error:
            return 503, {"status": "failed", "reason": self.load_error}
        if self.detector is None:
            return 503, {"status": "loading", "reason": "the model is not loaded yet"}
        return 503, {"status": "warming_up", "reason": "the warm-up inference has not finished"}

    def require_ready(self) -> None:
        if not self.ready:
            _, body = self.readiness()
            raise ApiError(503, "not_ready", body["reason"], headers={"Retry-After": "1"})

    def set_detector(self, detector: Any) -> None:
        self.detector = detector
        m = self.metrics
        for p in detector.providers:
            m.provider.labels(provider=p).set(1)
        card = detector.card
        m.model.info({"version": self.model_version, "sha256": str(card.get("sha256", "")),
                      "family": str(card.get("family", "")), "classes": ",".join(detector.classes),
                      "providers": ",".join(detector.providers)})

    def predict(self, images: list[np.ndarray]) -> tuple[list[Any], float]:
        """Runs in the pool: one model call, timed and counted."""
        t0 = time.perf_counter()
        dets = self.detector.predict(images)
        dt = time.perf_counter() - t0
        self.metrics.inference.observe(dt)
        self.metrics.batch_size.observe(len(images))
        self.metrics.images.inc(len(images))
        return dets, dt * 1000.0

    def warm_up(self) -> None:
        size = int(getattr(self.detector, "imgsz", 64) or 64)
        self.predict([np.full((size, size, 3), 114, np.uint8)])
        self.warmed = True
        self.metrics.ready.set(1)


def load_detector(settings: ServeSettings) -> Any:
    """The `OnnxDetector` the settings describe (raises ModelLoadError / ProviderError, both DetflowError)."""
    from pipeline.infer.engine import ModelLoadError, OnnxDetector

    check_model_files(settings)
    try:
        return OnnxDetector(settings.model_path, settings.card_path, providers=settings.providers,
                            require_gpu=settings.require_gpu, threads=settings.ort_threads,
                            verify_checksum=settings.verify_checksum)
    except OSError as e:  # e.g. the mounted folder changed under us: still one line, never a traceback
        raise ModelLoadError(f"cannot read the model: {e.strerror or e} ({e.filename or settings.model_path})"
                             ) from None


# the card fields the engine reads, with their JSON types
_CARD_FIELDS: dict[str, type] = {"family": str, "classes": list, "input": dict, "sha256": str}


def check_model_files(settings: ServeSettings) -> None:
    """Fail with one clear line when the model or its card cannot be read or the card is not a model card.

    The serving image runs as a non-root user over a mounted model folder, so permissions are the usual problem;
    the engine would otherwise surface them (and a card that is not a JSON object) as tracebacks.
    """
    from pipeline.infer.engine import ModelLoadError

    model = settings.model_path
    card = settings.card_path or model.with_name("model_card.json")
    for what, path in (("model", model), ("model card", card)):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except FileNotFoundError:
            hint = "run `detflow export` (or `dvc repro`)" if what == "model" else "export writes it next to the model"
            raise ModelLoadError(f"{what} {path} not found; {hint}") from None
        except PermissionError:
            raise ModelLoadError(f"{what} {path}: permission denied for uid {os.getuid()}; make the model folder "
                                 "and its files readable by the user the service runs as") from None
        except OSError as e:  # a folder, an I/O error on the mount, ...
            raise ModelLoadError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        data = json.loads(card.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ModelLoadError(f"model card {card} is not valid JSON{where}; re-export the model") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"model card {card} is not a JSON object; re-export the model")
    wrong = [f"{k} is not a {t.__name__}" for k, t in _CARD_FIELDS.items() if k in data and not isinstance(data[k], t)]
    if isinstance(data.get("input"), dict) and "imgsz" not in data["input"]:
        wrong.append("input lacks imgsz")
    if wrong:
        raise ModelLoadError(f"model card {card} is malformed ({'; '.join(wrong)}); re-export the model")


# ---------------------------------------------------------------------------------------------- middleware


class ServiceMiddleware:
    """Pure ASGI: request ids, body limits (Content-Length first, then a counted read), the body deadline (408),
    JSON 500 backstop, metrics and one privacy-safe log line per request."""

    def __init__(self, app: Any, state: ServiceState) -> None:
        self.app, self.state = app, state

    def _limit(self, scope: dict[str, Any]) -> tuple[int, int] | None:
        """(bytes allowed on the wire, limit named in the error) for requests with a body."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        s = self.state.settings
        if scope["path"] == DETECT:
            return s.max_upload_bytes + MULTIPART_SLACK, s.max_upload_bytes
        if scope["path"] == BATCH:
            return s.max_batch_bytes + MULTIPART_SLACK, s.max_batch_bytes
        return MULTIPART_SLACK, MULTIPART_SLACK

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = {"code": 500, "started": False}
        received = {"bytes": 0}
        limit = self._limit(scope)
        # the whole body must arrive within body_timeout_s of the headers, however it is read (see intake.py)
        receive_body = body_deadline(receive, self.state.settings.body_timeout_s) if limit is not None else receive

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        async def receive_wrapper() -> dict[str, Any]:
            message = await receive_body()
            if message["type"] == "http.request" and limit is not None:
                received["bytes"] += len(message.get("body", b""))
                if received["bytes"] > limit[0]:
                    raise BodyTooLarge(limit[1])
            return message

        async def send_error(err: ApiError) -> None:
            start, body = _json_error(err.status, err.code, err.message,
                                      [(k.lower().encode(), v.encode()) for k, v in err.headers.items()])
            await send_wrapper(start)
            await send_wrapper({"type": "http.response.body", "body": body})

        try:
            declared = headers.get("content-length")
            if limit is not None and declared is not None:
                if not declared.isdigit():
                    raise ApiError(400, "bad_request", "invalid Content-Length header")
                if int(declared) > limit[0]:  # reject before reading a single byte of the body
                    raise BodyTooLarge(limit[1])
            await self.app(scope, receive_wrapper, send_wrapper)
        except ClientDisconnect:  # the client went away mid-upload: nobody to answer, nothing went wrong here
            status["code"] = 499
        except BodyTimeout as e:
            if status["started"]:
                raise
            self.state.metrics.input_errors.labels(code="body_timeout").inc()
            # close the connection: the rest of a half-sent body must not be read as the next request
            await send_error(ApiError(408, "body_timeout", str(e), headers={"Connection": "close"}))
        except ApiError as e:
            if status["started"]:
                raise
            self.state.metrics.input_errors.labels(code=e.code).inc()
            await send_error(e)
        except Exception as e:  # noqa: BLE001 - the backstop: never a bare 500 page, never a crashed service
            self.state.metrics.inference_errors.inc()
            log.error("request_id=%s endpoint=%s unexpected %s", rid, endpoint, type(e).__name__, exc_info=True)
            if status["started"]:
                return
            await send_error(ApiError(500, "internal_error", f"unexpected server error (request id {rid})"))
        finally:
            dt = time.perf_counter() - t0
            m = self.state.metrics
            m.requests.labels(endpoint=endpoint, method=scope["method"], status=str(status["code"])).inc()
            m.latency.labels(endpoint=endpoint).observe(dt)
            if endpoint not in ("/health/live", "/health/ready", "/metrics"):
                log.info("request_id=%s method=%s endpoint=%s bytes=%s status=%s ms=%.1f", rid, scope["method"],
                         endpoint, headers.get("content-length", received["bytes"]), status["code"], dt * 1000)


# ---------------------------------------------------------------------------------------------- the app


def create_app(settings: ServeSettings | None = None, detector: Any = None) -> FastAPI:
    """The service. ``detector`` (an already loaded `OnnxDetector`, or anything with its interface) skips the
    background load; the warm-up inference always runs in the background after start-up."""
    settings = settings or ServeSettings.from_env()
    # pydicom's warnings quote element values (a malformed PatientName would end up in the log): errors only
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    metrics = Metrics()
    state = ServiceState(settings, metrics)
    background: list[asyncio.Task[Any]] = []

    async def bring_up() -> None:
        loop = asyncio.get_running_loop()
        try:
            if state.detector is None:
                state.set_detector(await loop.run_in_executor(state.pool, load_detector, settings))
            if settings.warmup:
                await loop.run_in_executor(state.pool, state.warm_up)
            else:
                state.warmed = True
                metrics.ready.set(1)
            log.info("ready: model %s on %s", state.model_version, ", ".join(state.detector.providers))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported by /health/ready, the process stays up for diagnosis
            state.load_error = f"{type(e).__name__}: {e}"
            log.error("model load/warm-up failed: %s", state.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        state.pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="detflow-serve")
        if detector is not None:
            state.set_detector(detector)
        if settings.microbatch:
            state.batcher = MicroBatcher(state.predict, state.pool, settings.microbatch_max_size,
                                         settings.microbatch_max_wait_ms / 1000.0, settings.workers)
            state.batcher.start()
        background.append(asyncio.create_task(bring_up()))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            if state.batcher is not None:
                await state.batcher.stop()
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="detflow inference service", version=_version(), lifespan=lifespan,
                  summary="Object detection on JPEG/PNG/DICOM images with an exported ONNX model.")
    app.state.detflow = state
    app.add_middleware(ServiceMiddleware, state=state)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"])

    # ------------------------------------------------------------------ error handlers

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if 400 <= exc.status < 500:
            metrics.input_errors.labels(code=exc.code).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.input_errors.labels(code="validation_error").inc()
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return ApiError(422, "validation_error", msg or "invalid request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "payload_too_large", 415: "unsupported_media_type"}
        code = codes.get(exc.status_code, f"http_{exc.status_code}")
        return ApiError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {})).response()

    # ------------------------------------------------------------------ auth

    bearer = HTTPBearer(auto_error=False, description="required on /v1/* when DETFLOW_SERVE_TOKEN is set (and on "
                        "/metrics with DETFLOW_SERVE_METRICS_AUTH=1)")

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if settings.token is None:
            return
        expected = settings.token.get_secret_value().encode()
        given = creds.credentials.encode() if creds is not None else b""
        ok = hmac.compare_digest(given, expected)
        if not ok:
            raise ApiError(401, "unauthorized", "missing or invalid bearer token" if creds else
                           "this endpoint needs an 'Authorization: Bearer <token>' header",
                           headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------ helpers

    async def read_files(request: Request, field: str, max_files: int) -> tuple[list[UploadFile], Any]:
        """The whole body, parsed (file parts spooled by starlette); (the file parts of ``field``, the form)."""
        ctype = request.headers.get("content-type", "")
        if request.headers.get("content-length") == "0":
            raise ApiError(400, "empty_body", f"the request has no body; send multipart/form-data with field "
                           f"{field!r}")
        if not ctype.lower().startswith("multipart/form-data"):
            raise ApiError(415, "unsupported_request_type",
                           f"send multipart/form-data with the image in field {field!r} (got {ctype or 'none'})")
        try:
            form = await request.form(max_files=max_files + 1, max_fields=32)
        except StarletteHTTPException as e:
            if "Too many files" in str(e.detail):
                raise ApiError(422, "too_many_files", f"at most {max_files} file(s) per request") from None
            raise ApiError(400, "bad_multipart", f"malformed multipart body: {e.detail}") from None
        files = [v for v in form.getlist(field) if isinstance(v, UploadFile)]
        others = [v for k, v in form.multi_items() if isinstance(v, UploadFile) and k != field]
        if not files:
            await form.close()
            hint = f" (got file field(s) {sorted({k for k, v in form.multi_items() if isinstance(v, UploadFile)})})" \
                if others else ""
            raise ApiError(422, "missing_file", f"no file in multipart field {field!r}{hint}")
        if len(files) + len(others) > max_files:
            await form.close()
            raise ApiError(422, "too_many_files", f"at most {max_files} file(s) per request")
        return files, form

    async def read_bytes(upload: UploadFile) -> bytes:
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise ApiError(413, "payload_too_large", f"file exceeds the limit of {settings.max_upload_bytes} bytes")
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ApiError(413, "payload_too_large", f"file exceeds the limit of {settings.max_upload_bytes} bytes")
        return data

    async def decode(data: bytes) -> np.ndarray:
        window = state.detector.dicom_window() if hasattr(state.detector, "dicom_window") else None
        return await asyncio.get_running_loop().run_in_executor(
            state.pool, decode_upload, data, settings.max_pixels, window)

    async def infer(request: Request, images: list[np.ndarray]) -> tuple[list[Any], list[float]]:
        try:
            if state.batcher is not None:
                out = await asyncio.gather(*(state.batcher.submit(im) for im in images))
                return [d for d, _ in out], [ms for _, ms in out]
            dets, ms = await asyncio.get_running_loop().run_in_executor(state.pool, state.predict, images)
            return dets, [ms] * len(dets)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - the model call itself failed: JSON 500, counted
            metrics.inference_errors.inc()
            rid = getattr(request.state, "request_id", "-")
            log.error("request_id=%s inference failed: %s", rid, type(e).__name__, exc_info=True)
            raise ApiError(500, "inference_error", f"inference failed (request id {rid})") from None

    def result(det: Any, rgb: np.ndarray, ms: float) -> DetectResult:
        labels = [int(x) for x in np.asarray(det.labels).tolist()]
        classes = state.detector.classes
        return DetectResult(
            boxes=np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4).tolist(),
            labels=[classes[i] if 0 <= i < len(classes) else str(i) for i in labels], label_ids=labels,
            scores=[float(s) for s in np.asarray(det.scores).tolist()], model_version=state.model_version,
            inference_ms=round(ms, 3), image=ImageSize(width=int(rgb.shape[1]), height=int(rgb.shape[0])))

    @contextlib.asynccontextmanager
    async def admitted(request: Request, field: str, max_files: int) -> AsyncIterator[list[UploadFile]]:
        """Receive the whole body first (at most max_body_reads at once, each within body_timeout_s), only then
        take one of the max_inflight processing slots: a stalled upload never holds a processing slot."""
        state.require_ready()
        with state.receiving.enter():
            uploads, form = await read_files(request, field, max_files)
        try:
            with state.processing.enter():
                yield uploads
        finally:
            await form.close()

    # ------------------------------------------------------------------ endpoints

    @app.post(DETECT, response_model=DetectResult, responses=_ERROR_RESPONSES, tags=["detection"],
              openapi_extra=_multipart_doc("file", many=False), dependencies=[Depends(require_token)])
    async def detect(request: Request) -> DetectResult:
        """Detect objects in one JPEG, PNG or DICOM file (multipart field `file`; type read from the content)."""
        async with admitted(request, "file", 1) as (upload,):
            rgb = await decode(await read_bytes(upload))
            dets, ms = await infer(request, [rgb])
            return result(dets[0], rgb, ms[0])

    @app.post(BATCH, response_model=BatchResult, responses=_ERROR_RESPONSES, tags=["detection"],
              openapi_extra=_multipart_doc("files", many=True), dependencies=[Depends(require_token)])
    async def detect_batch(request: Request) -> BatchResult:
        """Several files (repeated multipart field `files`, at most `max_batch_files`). A well-formed request
        answers 200 with one item per file in order; each item has its own `status` and either `result` or
        `error`, so one bad file never fails the others."""
        async with admitted(request, "files", settings.max_batch_files) as uploads:

            async def one(upload: UploadFile) -> np.ndarray | ApiError:
                try:
                    return await decode(await read_bytes(upload))
                except ApiError as e:
                    metrics.input_errors.labels(code=e.code).inc()
                    return e

            decoded = await asyncio.gather(*(one(u) for u in uploads))
            good = [(i, d) for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
            items: list[BatchItem] = []
            if good:
                dets, ms = await infer(request, [d for _, d in good])
                by_index = {i: result(det, d, t) for (i, d), det, t in zip(good, dets, ms, strict=True)}
            else:
                by_index = {}
            for i, d in enumerate(decoded):
                if isinstance(d, ApiError):
                    items.append(BatchItem(index=i, status=d.status, error=ErrorDetail(code=d.code, message=d.message)))
                else:
                    items.append(BatchItem(index=i, status=200, result=by_index[i]))
            n_ok = sum(1 for it in items if it.status == 200)
            return BatchResult(model_version=state.model_version, n_ok=n_ok, n_failed=len(items) - n_ok,
                               results=items)

    @app.get("/v1/model", tags=["model"], dependencies=[Depends(require_token)],
             responses={401: _ERROR_RESPONSES[401], 503: _ERROR_RESPONSES[503]})
    async def model_info() -> dict[str, Any]:
        """The model card, the execution providers actually in use, and the service limits."""
        if state.detector is None:
            state.require_ready()
        d = state.detector
        return {"model_version": state.model_version, "providers": list(d.providers),
                "requested_providers": list(getattr(d, "requested_providers", d.providers)),
                "family": getattr(d, "family", d.card.get("family")), "classes": list(d.classes),
                "ready": state.ready, "card": d.card,
                "limits": {k: settings.public()[k] for k in ("max_upload_bytes", "max_batch_bytes", "max_pixels",
                                                              "max_batch_files")},
                "service": {"workers": settings.workers, "ort_threads": settings.ort_threads,
                            "microbatch": settings.microbatch, "auth": settings.token is not None}}

    @app.get("/health/live", tags=["health"])
    async def live() -> dict[str, str]:
        """200 while the process serves requests."""
        return {"status": "alive"}

    @app.get("/health/ready", tags=["health"], responses={503: {"description": "not loaded or not warmed up"}})
    async def ready() -> JSONResponse:
        """200 once the model is loaded and one warm-up inference ran; 503 before (or if loading failed)."""
        code, body = state.readiness()
        return JSONResponse(body, status_code=code)

    @app.get("/metrics", tags=["health"], response_class=Response,
             dependencies=[Depends(require_token)] if settings.metrics_auth else [],
             responses={401: _ERROR_RESPONSES[401]} if settings.metrics_auth else None)
    async def prometheus() -> Response:
        """Prometheus text format (behind the bearer token when DETFLOW_SERVE_METRICS_AUTH is set)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _version() -> str:
    from pipeline import __version__

    return __version__
