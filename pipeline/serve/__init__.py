"""HTTP inference service over the ONNX engine (FastAPI + uvicorn). Never imports torch.

Entry points: ``detflow serve`` and ``python -m pipeline.serve --model ... --host ... --port ...`` (one option set,
``pipeline.serve.entry``), both calling ``serve(model, host, port, ...)``; ``run(settings)``;
``create_app(settings, detector=None)`` (its parts: see ``pipeline/serve/app.py``).

Settings come from ``DETFLOW_SERVE_*`` environment variables (see :class:`ServeSettings`), explicit arguments win.

Endpoints
  POST /v1/detect        multipart field ``file``: one JPEG/PNG/DICOM file (type from the bytes)
  POST /v1/detect/batch  repeated multipart field ``files`` (at most ``max_batch_files``); 200 with per-item status
  GET  /v1/model         the model card, providers in use, limits
  GET  /v1/shift         shift detection: the rolling window of request embeddings (DETFLOW_SERVE_SHIFT_WINDOW,
                         _EVERY, _ALPHA, _PERMUTATIONS) tested against the model's training reference; also in /metrics
  GET  /health/live      200 while the process runs
  GET  /health/ready     200 after the model loaded and one warm-up inference ran, else 503
  GET  /metrics          Prometheus text (model sha256, classes, traffic)
  GET  /docs             OpenAPI UI

Auth: when ``DETFLOW_SERVE_TOKEN`` is set, every ``/v1/*`` endpoint (``/v1/model`` included: the card describes
the training data) needs ``Authorization: Bearer <token>`` (compared in constant time); 401 otherwise.
``/health/*`` and the docs stay open for probes; ``/metrics`` too, unless ``DETFLOW_SERVE_METRICS_AUTH=1`` puts it
behind the same token (the scraper then sends the bearer token; without a token that setting is refused at start).

Intake (``pipeline.serve.intake``): a detection request first receives its whole body, at most
``max_body_reads`` at once, and the body must arrive within ``body_timeout_s`` of the headers (408 otherwise,
however slowly it drips); only then does it take one of the ``max_inflight`` processing slots. Stalled uploads
therefore never block other requests from being processed, and they are cut at the deadline.

Status codes (body always ``{"error": {"code", "message"}}``)
  400 empty_body, empty_file, bad_multipart        401 unauthorized
  408 body_timeout (the body did not arrive within body_timeout_s; the connection is closed)
  413 payload_too_large (bytes; from Content-Length before reading, else a counted read),
      image_too_large (width x height > max_pixels, read from the PNG/JPEG/DICOM header before decoding)
  415 unsupported_request_type (not multipart), unsupported_media_type (bytes are not JPEG/PNG/DICOM)
  422 missing_file, too_many_files, corrupt_image (e.g. truncated JPEG), corrupt_dicom, dicom_no_pixel_data,
      dicom_multiframe, dicom_unsupported_compression, validation_error
  500 inference_error / internal_error (unexpected; counted in detflow_serve_inference_errors_total)
  503 not_ready (loading or warming up), overloaded (more than max_body_reads uploads arriving, or more than
      max_inflight requests being processed)

Start-up fails with one line and a non-zero exit (never a traceback) on a bad setting or option, an address
that cannot be bound, or a model/card that is missing, unreadable (permissions: the image runs as uid 10001) or
not a model card.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pipeline.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "run", "serve"]


def __getattr__(name: str) -> Any:
    """``ServeSettings`` on first use: ``detflow`` imports ``pipeline.serve.entry`` at every start, and pydantic
    is not needed to print its help."""
    if name == "ServeSettings":
        from pipeline.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_app(settings: ServeSettings | None = None, detector: Any = None) -> FastAPI:
    from pipeline.serve.app import create_app as _create_app

    return _create_app(settings, detector)


def run(settings: ServeSettings) -> None:
    from pipeline.serve.server import run as _run

    _run(settings)


def serve(model: Any = None, host: str | None = None, port: int | None = None, **options: Any) -> None:
    from pipeline.serve.server import serve as _serve

    _serve(model, host, port, **options)
