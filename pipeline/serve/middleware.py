"""The outermost layer, pure ASGI: request ids, body limits, the body deadline, the JSON 500 backstop, request
metrics and one privacy-safe log line per request (id, endpoint, size, status, latency: never names or pixels)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect

from pipeline.serve.errors import ApiError, BodyTooLarge
from pipeline.serve.intake import BATCH, DETECT, BodyTimeout, Receive, body_deadline, body_limit
from pipeline.serve.metrics import Metrics
from pipeline.serve.settings import ServeSettings

log = logging.getLogger("pipeline.serve")

# paths that get their own metric label; anything else is "other" (unbounded label values otherwise)
ENDPOINTS = {DETECT, BATCH, "/v1/model", "/health/live", "/health/ready", "/metrics", "/docs", "/openapi.json",
             "/docs/oauth2-redirect", "/redoc"}
QUIET = ("/health/live", "/health/ready", "/metrics")  # probes and scrapes: counted, not logged
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

Send = Callable[[dict[str, Any]], Awaitable[None]]


def request_id(given: str) -> str:
    """The client's X-Request-ID when it is short and plain, else a fresh one (it goes into logs and headers)."""
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]


class ServiceMiddleware:
    """Body limits: Content-Length first (before a byte is read), then a counted read; the body deadline gives
    408 and closes the connection; any unexpected exception becomes a counted JSON 500, never a crash."""

    def __init__(self, app: Any, settings: ServeSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = request_id(headers.get("x-request-id", ""))
        scope.setdefault("state", {})["request_id"] = rid
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = {"code": 500, "started": False}
        received = {"bytes": 0}
        limit = body_limit(self.settings, scope["method"], scope["path"])
        # the whole body must arrive within body_timeout_s of the headers, however it is read (see intake.py)
        receive_body = body_deadline(receive, self.settings.body_timeout_s) if limit is not None else receive

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
            for message in err.asgi_messages():
                await send_wrapper(message)

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
            self.metrics.count_input_error("body_timeout")
            # close the connection: the rest of a half-sent body must not be read as the next request
            await send_error(ApiError(408, "body_timeout", str(e), headers={"Connection": "close"}))
        except ApiError as e:
            if status["started"]:
                raise
            self.metrics.count_input_error(e.code)
            await send_error(e)
        except Exception as e:  # noqa: BLE001 - the backstop: never a bare 500 page, never a crashed service
            self.metrics.inference_errors.inc()
            log.error("request_id=%s endpoint=%s unexpected %s", rid, endpoint, type(e).__name__, exc_info=True)
            if status["started"]:
                return
            await send_error(ApiError(500, "internal_error", f"unexpected server error (request id {rid})"))
        finally:
            dt = time.perf_counter() - t0
            self.metrics.observe_request(endpoint, scope["method"], int(status["code"]), dt)
            if endpoint not in QUIET:
                log.info("request_id=%s method=%s endpoint=%s bytes=%s status=%s ms=%.1f", rid, scope["method"],
                         endpoint, headers.get("content-length", received["bytes"]), status["code"], dt * 1000)
