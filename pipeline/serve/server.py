"""Run the service with uvicorn: one process, the thread pool (``workers``) provides the concurrency."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.serve.settings import ServeSettings

log = logging.getLogger("pipeline.serve")


def run(settings: ServeSettings) -> None:
    """Check the address, load the model (fail fast: ConfigError, ModelLoadError/ProviderError, all DetflowError,
    each one line), then serve until stopped.

    The port opens at once; /health/ready turns 200 after the background warm-up inference.
    """
    import uvicorn

    from pipeline.serve.app import create_app
    from pipeline.serve.loading import load_detector

    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline.serve").setLevel(settings.log_level.upper())
    check_listen(settings.host, settings.port)
    detector = load_detector(settings)
    log.info("model %s loaded on %s; serving on %s:%d with %d worker thread(s) x %d onnxruntime thread(s)%s%s",
             settings.model_path.name, ", ".join(detector.providers), settings.host, settings.port, settings.workers,
             settings.ort_threads, ", micro-batching" if settings.microbatch else "",
             ", bearer auth" if settings.token else "")
    app = create_app(settings, detector=detector)
    # access_log off: uvicorn's access line has the raw path and client address; ours has id/size/status/latency.
    uvicorn.run(app, host=settings.host, port=settings.port, workers=1, log_level=settings.log_level,
                access_log=False, server_header=False, proxy_headers=False, timeout_keep_alive=5,
                timeout_graceful_shutdown=10)


def check_listen(host: str, port: int) -> None:
    """ConfigError now, rather than a uvicorn exit after the model loaded, when host:port cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"cannot listen on {host}:{port}: the host does not resolve ({e})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server binds it
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(model: str | os.PathLike[str] | None = None, host: str | None = None, port: int | None = None, *,
          card: str | os.PathLike[str] | None = None, providers: str | None = None, require_gpu: bool | None = None,
          workers: int | None = None, microbatch: bool | None = None, token: str | None = None,
          log_level: str | None = None, **settings: Any) -> None:
    """``detflow serve``: settings from DETFLOW_SERVE_* variables, overridden by every argument that is not None."""
    s = ServeSettings.from_env(model_path=Path(model) if model is not None else None,
                               card_path=Path(card) if card is not None else None, host=host, port=port,
                               providers=providers, require_gpu=require_gpu, workers=workers, microbatch=microbatch,
                               token=token, log_level=log_level, **settings)
    run(s)
