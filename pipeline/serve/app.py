"""The FastAPI application: :func:`create_app` wires the service's units together (see ``pipeline/serve/__init__.py``
for the HTTP contract).

The units, each importable and tested alone (``tests/code/test_serve_units.py``):

* ``errors``     the one error shape ``{"error": {"code", "message"}}`` and the exception handlers
* ``auth``       the bearer-token dependency (constant-time comparison)
* ``intake``     body deadline, body and file size limits, multipart parsing, two-stage admission
* ``decoding``   uploaded bytes -> RGB by content (magic bytes), decoder problems -> 4xx
* ``metrics``    the Prometheus collectors of one app and their rendering
* ``batching``   optional micro-batching of concurrent requests into one ``predict`` call
* ``loading``    model files and card checked, then the ONNX engine loaded (one-line errors)
* ``state``      readiness, the thread pool, the model call, the lifespan (background load and warm-up)
* ``middleware`` request ids, body limits, 408/413/500 outside the app, request metrics and logs
* ``routes``     the endpoints; ``schemas`` their response models

Logs carry a request id, endpoint, body size, status and latency only: no file names, no image bytes, no DICOM
attributes. Nothing from the DICOM header besides the pixel size is ever returned.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

from pipeline.serve.auth import token_guard
from pipeline.serve.batching import MicroBatcher
from pipeline.serve.decoding import decode_upload, sniff
from pipeline.serve.errors import ApiError, exception_handlers
from pipeline.serve.loading import check_model_files, load_detector
from pipeline.serve.metrics import Metrics
from pipeline.serve.middleware import ServiceMiddleware
from pipeline.serve.routes import router
from pipeline.serve.settings import ServeSettings
from pipeline.serve.state import ServiceState

# re-exported: the names other modules and tests have imported from here
__all__ = ["ApiError", "Metrics", "MicroBatcher", "ServiceState", "check_model_files", "create_app", "decode_upload",
           "load_detector", "sniff"]


def create_app(settings: ServeSettings | None = None, detector: Any = None) -> FastAPI:
    """The service. ``detector`` (an already loaded `OnnxDetector`, or anything with its interface) skips the
    background load; the warm-up inference always runs in the background after start-up."""
    settings = settings or ServeSettings.from_env()
    # pydicom's warnings quote element values (a malformed PatientName would end up in the log): errors only
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    metrics = Metrics()
    state = ServiceState(settings, metrics, detector)
    app = FastAPI(title="detflow inference service", version=_version(), lifespan=state.lifespan,
                  summary="Object detection on JPEG/PNG/DICOM images with an exported ONNX model.",
                  exception_handlers=exception_handlers(metrics.count_input_error))
    app.state.detflow = state
    app.add_middleware(ServiceMiddleware, settings=settings, metrics=metrics)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"])
    app.include_router(router(settings, token_guard(settings.token)))
    return app


def _version() -> str:
    from pipeline import __version__

    return __version__
