"""Micro-batching: concurrent single-image requests collected into one ``predict`` call.

Why: fewer, larger model calls under concurrent load; the queue wait (``microbatch_max_wait_ms``) is the price,
so it is off by default (``microbatch``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.serve.errors import ApiError


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
                if not fut.done():  # predict_each puts an image's own exception in its place: only it fails
                    if isinstance(det, Exception):
                        fut.set_exception(det)
                    else:
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
