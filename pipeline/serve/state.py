"""One app's runtime state: the detector and its readiness, the thread pool, the admission stages, the metrics,
and the lifespan that loads and warms up the model in the background (the port opens at once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.serve.batching import MicroBatcher
from pipeline.serve.errors import ApiError, overloaded
from pipeline.serve.intake import Stage
from pipeline.serve.loading import load_detector
from pipeline.serve.metrics import Metrics
from pipeline.serve.settings import ServeSettings
from pipeline.shift import ShiftMonitor

log = logging.getLogger("pipeline.serve")


class ServiceState:
    """The detector, its readiness, the pool and the metrics of one app.

    ``detector`` (an already loaded `OnnxDetector`, or anything with its interface) skips the background load;
    ``loader`` is how the model is loaded otherwise (settings -> detector).
    """

    def __init__(self, settings: ServeSettings, metrics: Metrics, detector: Any = None,
                 loader: Callable[[ServeSettings], Any] = load_detector) -> None:
        self.settings, self.metrics, self.loader = settings, metrics, loader
        self.given_detector = detector
        self.detector: Any = None
        self.load_error: str | None = None
        self.warmed = False
        self.shift: ShiftMonitor | None = None  # the rolling window of request embeddings, when available
        self.shift_reason: str | None = "the model is not loaded yet"  # why not, otherwise
        self.pool: ThreadPoolExecutor | None = None
        self.batcher: MicroBatcher | None = None
        self.background: list[asyncio.Task[Any]] = []
        # a request first receives its whole body, then takes a processing slot (see pipeline.serve.intake)
        self.receiving = Stage(settings.max_body_reads, lambda: overloaded("uploads"), metrics.body_reads.set)
        self.processing = Stage(settings.max_inflight, lambda: overloaded("requests"), metrics.inflight.set)

    # ------------------------------------------------------------------ readiness

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

    # ------------------------------------------------------------------ the model

    def set_detector(self, detector: Any) -> None:
        self.detector = detector
        self.metrics.describe_model(self.model_version, detector.card, detector.classes, detector.providers)
        self.shift, self.shift_reason = self._shift_monitor(detector)
        self.metrics.observe_shift(self.shift_status(compute=False))

    def _shift_monitor(self, detector: Any) -> tuple[ShiftMonitor | None, str | None]:
        """The monitor over the model's reference sample, or why there is none (the service serves either way)."""
        from pipeline.errors import DetflowError

        s = self.settings
        if not s.shift:
            return None, "shift detection is off (DETFLOW_SERVE_SHIFT=0)"
        if not getattr(detector, "has_embeddings", False):
            reason = getattr(detector, "embeddings_unavailable", lambda: None)()
            return None, reason or "the model has no embedding output; re-export it with `detflow export`"
        try:
            reference = detector.embedding_reference()
            monitor = ShiftMonitor(reference, window=s.shift_window, every=s.shift_every, alpha=s.shift_alpha,
                                   n_permutations=s.shift_permutations,
                                   reference_groups=detector.embedding_reference_groups(len(reference)))
        except DetflowError as e:
            log.warning("shift detection unavailable: %s", e)
            return None, str(e)
        return monitor, None

    def predict(self, images: list[np.ndarray], track: bool = True) -> tuple[list[Any], float]:
        """Runs in the pool: one model call, timed and counted; (detections, milliseconds). With a shift monitor
        (and ``track``) the same call also returns the images' embeddings, added to the rolling window."""
        t0 = time.perf_counter()
        monitor = self.shift if track else None
        if monitor is not None:
            dets, embeddings = self.detector.predict(images, return_embeddings=True)
        else:
            dets = self.detector.predict(images)
        dt = time.perf_counter() - t0
        self.metrics.observe_predict(len(images), dt)
        if monitor is not None:
            monitor.add(embeddings)
        return dets, dt * 1000.0

    def predict_each(self, images: list[np.ndarray], track: bool = True) -> tuple[list[Any], float]:
        """:meth:`predict`, but one image that the model call cannot take fails only itself: when a call over
        several images raises, each image is run alone and the ones that still fail get their exception in place of
        their detections (the caller turns it into that image's error). One image alone raises as before."""
        try:
            return self.predict(images, track)
        except Exception:  # noqa: BLE001 - retried image by image below; a single image re-raises
            if len(images) == 1:
                raise
        out: list[Any] = []
        total = 0.0
        for im in images:
            try:
                dets, ms = self.predict([im], track)
                out.append(dets[0])
                total += ms
            except Exception as e:  # noqa: BLE001 - this image's own error entry
                log.error("inference failed for one image of a batch: %s: %s", type(e).__name__, e)
                out.append(e)
        return out, total

    def shift_status(self, compute: bool = True) -> dict[str, Any]:
        """What GET /v1/shift answers (and /metrics shows): availability, window fill and the latest test result
        (recomputed here when due: at most once per ``shift_every`` new images; call it from the pool)."""
        s = self.settings
        out: dict[str, Any] = {"available": self.shift is not None, "reason": self.shift_reason,
                               "alpha": s.shift_alpha, "n_permutations": s.shift_permutations,
                               "window": s.shift_window, "every": s.shift_every, "n_window": 0, "n_seen": 0,
                               "result": None}
        if self.shift is not None:
            if compute:
                out.update(self.shift.status())
            else:
                out.update(n_window=len(self.shift.window_embeddings()))
        self.metrics.observe_shift(out)
        return out

    def warm_up(self) -> None:
        size = int(getattr(self.detector, "imgsz", 64) or 64)
        self.predict([np.full((size, size, 3), 114, np.uint8)], track=False)  # not a request: not in the window
        self.mark_warm()

    def mark_warm(self) -> None:
        self.warmed = True
        self.metrics.ready.set(1)

    # ------------------------------------------------------------------ lifecycle

    async def bring_up(self) -> None:
        """Load (unless given) and warm up in the pool; a failure is the readiness reason, the process stays up."""
        loop = asyncio.get_running_loop()
        try:
            if self.detector is None:
                self.set_detector(await loop.run_in_executor(self.pool, self.loader, self.settings))
            if self.settings.warmup:
                await loop.run_in_executor(self.pool, self.warm_up)
            else:
                self.mark_warm()
            log.info("ready: model %s on %s", self.model_version, ", ".join(self.detector.providers))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported by /health/ready, the process stays up for diagnosis
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("model load/warm-up failed: %s", self.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """The app's lifespan: pool (and micro-batcher) up, background bring-up, everything stopped at the end."""
        s = self.settings
        self.pool = ThreadPoolExecutor(max_workers=s.workers, thread_name_prefix="detflow-serve")
        if self.given_detector is not None:
            self.set_detector(self.given_detector)
        if s.microbatch:
            self.batcher = MicroBatcher(self.predict_each, self.pool, s.microbatch_max_size,
                                        s.microbatch_max_wait_ms / 1000.0, s.workers)
            self.batcher.start()
        self.background.append(asyncio.create_task(self.bring_up()))
        try:
            yield
        finally:
            for task in self.background:
                task.cancel()
            if self.batcher is not None:
                await self.batcher.stop()
            self.pool.shutdown(wait=False, cancel_futures=True)
