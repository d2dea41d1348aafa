"""Request intake: a deadline on receiving the body, and the two bounded stages a detection request passes through.

Why: a slot that is taken before the body has arrived can be held by a client that sends headers and then
nothing (slow loris). So a detection request first *receives* its whole body (bounded in time by the body
deadline, and in number by ``max_body_reads``), and only then takes one of the ``max_inflight`` processing
slots; stalled uploads never hold a processing slot, and they are cut at the deadline with a 408.

The deadline is for the whole body, counted from the moment the request headers arrived: a client that drips
one byte at a time cannot extend it.

Also here: the size limits on the body (:func:`body_limit`, enforced by the middleware) and on each file
(:func:`read_upload`), and the multipart parsing (:func:`read_files`), each error a 4xx in the service's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from pipeline.serve.errors import ApiError
from pipeline.serve.settings import ServeSettings

Receive = Callable[[], Awaitable[dict[str, Any]]]

DETECT, BATCH = "/v1/detect", "/v1/detect/batch"  # the endpoints that take uploads
MULTIPART_SLACK = 64 * 1024  # multipart boundaries and part headers on top of the file itself


class BodyTimeout(Exception):
    """The request body did not arrive in time (answered as 408 body_timeout)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout_s:g} s")
        self.timeout_s = timeout_s


def body_deadline(receive: Receive, timeout_s: float) -> Receive:
    """``receive`` that raises :class:`BodyTimeout` when the body is not complete ``timeout_s`` after this call.

    Only body reads are timed: once the last body chunk arrived, later calls (which wait for the client to
    disconnect) pass through untouched.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    pending = True

    async def receive_within_deadline() -> dict[str, Any]:
        nonlocal pending
        if not pending:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise BodyTimeout(timeout_s) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            pending = False
        return message

    return receive_within_deadline


class Stage:
    """A counter with a hard limit: entering a full stage raises ``full()`` at once (no queue, so nobody waits
    behind a stalled client). Used from the event loop only, so no lock is needed."""

    def __init__(self, limit: int, full: Callable[[], Exception], on_change: Callable[[int], None] | None = None
                 ) -> None:
        self.limit, self.full, self.on_change = limit, full, on_change
        self.count = 0

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        if self.count >= self.limit:
            raise self.full()
        self._add(1)
        try:
            yield
        finally:
            self._add(-1)

    def _add(self, n: int) -> None:
        self.count += n
        if self.on_change is not None:
            self.on_change(self.count)


def body_limit(settings: ServeSettings, method: str, path: str) -> tuple[int, int] | None:
    """(bytes allowed on the wire, limit named in the error) for a request with a body; None without one."""
    if method not in ("POST", "PUT", "PATCH"):
        return None
    if path == DETECT:
        return settings.max_upload_bytes + MULTIPART_SLACK, settings.max_upload_bytes
    if path == BATCH:
        return settings.max_batch_bytes + MULTIPART_SLACK, settings.max_batch_bytes
    return MULTIPART_SLACK, MULTIPART_SLACK


async def read_files(request: Request, field: str, max_files: int) -> tuple[list[UploadFile], FormData]:
    """The whole body, parsed (file parts spooled by starlette); (the file parts of ``field``, the form).

    The caller closes the form (its spooled files) when done; on an error it is closed here.
    """
    ctype = request.headers.get("content-type", "")
    if request.headers.get("content-length") == "0":
        raise ApiError(400, "empty_body", f"the request has no body; send multipart/form-data with field {field!r}")
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
    others = [k for k, v in form.multi_items() if isinstance(v, UploadFile) and k != field]
    if not files:
        await form.close()
        hint = f" (got file field(s) {sorted(set(others))})" if others else ""
        raise ApiError(422, "missing_file", f"no file in multipart field {field!r}{hint}")
    if len(files) + len(others) > max_files:
        await form.close()
        raise ApiError(422, "too_many_files", f"at most {max_files} file(s) per request")
    return files, form


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The bytes of one file part, refused with 413 beyond ``max_bytes`` (reads at most one byte more)."""
    if upload.size is not None and upload.size > max_bytes:
        raise ApiError(413, "payload_too_large", f"file exceeds the limit of {max_bytes} bytes")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, "payload_too_large", f"file exceeds the limit of {max_bytes} bytes")
    return data


@contextlib.asynccontextmanager
async def admitted(request: Request, field: str, max_files: int, receiving: Stage, processing: Stage
                   ) -> AsyncIterator[list[UploadFile]]:
    """Receive the whole body first (a ``receiving`` place), only then take a ``processing`` slot: a stalled
    upload never holds a processing slot. Yields the file parts of ``field``; their spooled files are closed after.
    """
    with receiving.enter():
        uploads, form = await read_files(request, field, max_files)
    try:
        with processing.enter():
            yield uploads
    finally:
        await form.close()
