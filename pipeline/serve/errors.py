"""The service's one error shape, ``{"error": {"code", "message"}}``, and the handlers that give every failure it.

Why one module: the raw ASGI middleware, the endpoints and FastAPI's own errors (404, 405, request validation)
must all answer in the same shape, so the shape and the status-to-code mapping live in one place.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# codes for the errors starlette/FastAPI raise themselves (unknown route, wrong method, ...)
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 415: "unsupported_media_type"}


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def asgi_messages(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The response as the two ASGI messages (start, body), for middleware that answers without the app."""
        body = json.dumps(self.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        return ({"type": "http.response.start", "status": self.status, "headers": headers},
                {"type": "http.response.body", "body": body})


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")


def overloaded(what: str) -> ApiError:
    """503 for a full stage (see ``pipeline.serve.intake.Stage``); clients retry after a second."""
    return ApiError(503, "overloaded", f"too many {what} in progress; retry shortly", headers={"Retry-After": "1"})


def from_validation(exc: RequestValidationError) -> ApiError:
    msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
    return ApiError(422, "validation_error", msg or "invalid request")


def from_http(exc: StarletteHTTPException) -> ApiError:
    code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return ApiError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))


Handler = Callable[[Request, Any], Awaitable[JSONResponse]]


def exception_handlers(count_input_error: Callable[[str], None]) -> dict[Any, Handler]:
    """FastAPI ``exception_handlers``: every error in the one shape; rejected inputs (4xx) counted by code."""

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if 400 <= exc.status < 500:
            count_input_error(exc.code)
        return exc.response()

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        count_input_error("validation_error")
        return from_validation(exc).response()

    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return from_http(exc).response()

    return {ApiError: api_error, RequestValidationError: validation, StarletteHTTPException: http}
