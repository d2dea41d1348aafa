"""Service settings: plain pydantic, read from ``DETFLOW_SERVE_*`` environment variables.

No ``pydantic-settings`` dependency: :meth:`ServeSettings.from_env` maps each field to ``DETFLOW_SERVE_<FIELD>``
(upper case) and lets pydantic validate and coerce the strings, so a bad value fails loudly at start-up.
Explicit keyword overrides (the CLI's options) win over the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pipeline.data.imaging import DEFAULT_MAX_PIXELS
from pipeline.errors import ConfigError

ENV_PREFIX = "DETFLOW_SERVE_"
MB = 1024 * 1024


class ServeSettings(BaseModel):
    """Everything the HTTP service can be configured with. See the module docstring of ``pipeline.serve``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # no NaN / inf

    # model
    model_path: Path = Field(Path("models/model.onnx"), description="exported ONNX model")
    card_path: Path | None = Field(None, description="model card (default: model_card.json next to the model)")
    providers: str = Field("auto", description="'auto' or a comma list such as CPUExecutionProvider")
    require_gpu: bool = Field(False, description="refuse to start unless the CUDA provider is active")
    verify_checksum: bool = Field(True, description="check the model's sha256 against its card at load")

    # network (used by run(); create_app ignores them)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"

    # input limits
    max_upload_bytes: int = Field(20 * MB, gt=0, description="largest accepted file (and /v1/detect request body)")
    max_batch_bytes: int = Field(64 * MB, gt=0, description="largest /v1/detect/batch request body")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0,
                            description="largest image (width x height), checked from headers")
    max_batch_files: int = Field(16, ge=1, description="most files in one /v1/detect/batch request")

    # concurrency
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1,
                         description="thread pool size for decoding and inference (one process)")
    intra_op_threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads per run; default "
                                         "max(1, cpu_count // workers) so that workers x threads ~ cores")
    microbatch: bool = Field(False, description="collect concurrent requests into one predict call")
    microbatch_max_wait_ms: float = Field(5.0, ge=0, le=1000)
    microbatch_max_size: int = Field(8, ge=1, le=256)
    warmup: bool = Field(True, description="run one inference before reporting ready")
    max_inflight: int = Field(64, ge=1, description="detection requests being processed at once (decode + "
                              "inference; taken only after the body arrived); more get 503")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="the whole request body must arrive within this "
                                  "many seconds of the headers, else 408 body_timeout (a client that drips bytes "
                                  "cannot extend it); 30 s passes a 20 MB upload at about 6 Mbit/s")
    header_timeout_s: float = Field(5.0, gt=0, le=600, description="a connection whose request headers have not "
                                    "all arrived this many seconds after it opened (or after the request's first "
                                    "byte) is closed, with 408 when some bytes came: a client that sends half its "
                                    "headers and waits cannot hold a connection (and a file descriptor) forever")
    max_body_reads: int = Field(256, ge=1, description="detection requests receiving their body at once; more get "
                                "503. Bounds memory and temporary files; stalled uploads leave at body_timeout_s")

    # shift detection (needs a model exported with the embedding output and its reference sample)
    shift: bool = Field(True, description="keep a rolling window of request embeddings and test it against the "
                        "training reference (GET /v1/shift, /metrics); off or unavailable: no embeddings fetched")
    shift_window: int = Field(64, ge=8, description="embeddings in the rolling window (the latest requests' images)")
    shift_every: int = Field(16, ge=1, description="recompute the test after this many new images, at most")
    shift_alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the shift flag")
    shift_permutations: int = Field(200, ge=1, le=100_000, description="permutations for the p-value")

    # security
    token: SecretStr | None = Field(None, description="bearer token required on /v1/* when set")
    metrics_auth: bool = Field(False, description="also require the token on /metrics (it shows the model's sha256, "
                               "classes and traffic); the scraper then sends 'Authorization: Bearer <token>'")
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins; empty = CORS off")

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        v = v.lower()
        if v not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError("log_level must be one of critical, error, warning, info, debug")
        return v

    @model_validator(mode="after")
    def _limits(self) -> ServeSettings:
        if self.max_batch_bytes < self.max_upload_bytes:
            raise ValueError("max_batch_bytes must be >= max_upload_bytes")
        if self.metrics_auth and self.token is None:
            raise ValueError("metrics_auth needs a token (DETFLOW_SERVE_TOKEN) to protect /metrics with")
        return self

    @property
    def ort_threads(self) -> int:
        """onnxruntime intra-op threads for the session."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, (os.cpu_count() or 1) // self.workers)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Settings from ``DETFLOW_SERVE_*`` variables, then ``overrides`` (``None`` values are ignored)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        unknown = sorted(k for k in env if k.startswith(ENV_PREFIX)
                         and k[len(ENV_PREFIX):].lower() not in cls.model_fields)
        if unknown:
            raise ConfigError(f"unknown serve setting(s) {', '.join(unknown)}; known: "
                              + ", ".join(ENV_PREFIX + n.upper() for n in cls.model_fields))
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as e:
            raise ConfigError(f"invalid serve settings: {_problems(e)}") from None

    def public(self) -> dict[str, Any]:
        """Settings safe to show (the token is never included, only whether auth is on)."""
        d = self.model_dump(mode="json", exclude={"token"})
        d["auth"] = self.token is not None
        return d


def _problems(e: ValidationError) -> str:
    """One line: each bad field with its variable name, pydantic's reason and the value given (never the token's)."""
    out = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"])
        name = f"{field} ({ENV_PREFIX}{field.upper()})" if field in ServeSettings.model_fields else "settings"
        msg = str(err["msg"]).removeprefix("Value error, ")
        given = "" if field == "token" or not field or isinstance(err.get("input"), dict) else f", got {err['input']!r}"
        out.append(f"{name}: {msg}{given}")
    return "; ".join(out)
