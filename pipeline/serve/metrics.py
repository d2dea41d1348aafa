"""Prometheus metrics of one app: traffic, latency, model calls, rejected inputs, readiness and the model served.

One registry per app, so several apps (tests) never collide in prometheus_client's global registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest


class Metrics:
    """The service's collectors plus the few operations the other units record through."""

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
        self.shift_available = Gauge("detflow_serve_shift_available", "1 when request embeddings are tested for "
                                     "shift (model with embedding output and reference sample)", registry=r)
        self.shift_statistic = Gauge("detflow_serve_shift_statistic", "MMD² of the rolling window against the "
                                     "training reference (NaN until the window holds enough images)", registry=r)
        self.shift_p_value = Gauge("detflow_serve_shift_p_value", "permutation p-value of the latest shift test "
                                   "(NaN until computed)", registry=r)
        self.shift_shifted = Gauge("detflow_serve_shift_flag", "1 when the latest shift test has p < alpha",
                                   registry=r)
        self.shift_window_fill = Gauge("detflow_serve_shift_window_fill", "images in the shift window", registry=r)
        for g in (self.shift_statistic, self.shift_p_value):
            g.set(float("nan"))

    def count_input_error(self, code: str) -> None:
        self.input_errors.labels(code=code).inc()

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, method=method, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_predict(self, images: int, seconds: float) -> None:
        self.inference.observe(seconds)
        self.batch_size.observe(images)
        self.images.inc(images)

    def describe_model(self, version: str, card: Mapping[str, Any], classes: Sequence[str],
                       providers: Sequence[str]) -> None:
        for p in providers:
            self.provider.labels(provider=p).set(1)
        self.model.info({"version": version, "sha256": str(card.get("sha256", "")),
                         "family": str(card.get("family", "")), "classes": ",".join(classes),
                         "providers": ",".join(providers)})

    def observe_shift(self, status: Mapping[str, Any]) -> None:
        """Gauges from a shift status (``ServiceState.shift_status``)."""
        self.shift_available.set(1 if status.get("available") else 0)
        self.shift_window_fill.set(status.get("n_window") or 0)
        result = status.get("result")
        self.shift_statistic.set(result["statistic"] if result else float("nan"))
        self.shift_p_value.set(result["p_value"] if result else float("nan"))
        self.shift_shifted.set(1 if result and result["shifted"] else 0)

    def render(self) -> tuple[bytes, str]:
        """(Prometheus text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
