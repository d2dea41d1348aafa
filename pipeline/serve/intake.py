"""Request intake: a deadline on receiving the body, and the two bounded stages a detection request passes through.

Why: a slot that is taken before the body has arrived can be held by a client that sends headers and then
nothing (slow loris). So a detection request first *receives* its whole body (bounded in time by the body
deadline, and in number by ``max_body_reads``), and only then takes one of the ``max_inflight`` processing
slots; stalled uploads never hold a processing slot, and they are cut at the deadline with a 408.

The deadline is for the whole body, counted from the moment the request headers arrived: a client that drips
one byte at a time cannot extend it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

Receive = Callable[[], Awaitable[dict[str, Any]]]


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
