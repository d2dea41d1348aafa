"""Run the service with uvicorn: one process, the thread pool (``workers``) provides the concurrency.

uvicorn bounds the idle time *between* requests on a kept-alive connection (``timeout_keep_alive``) but nothing
bounds how long a request's headers may take to arrive: a client that sends half of its headers and waits (or
drips them) holds its connection, and its file descriptor, forever (checked in uvicorn 0.54's h11 protocol: no timer
runs between ``connection_made`` / the first byte and the ``Request`` event). :class:`HeaderDeadlineProtocol`
closes such a connection once ``header_timeout_s`` has passed since the connection opened or the request's first
byte arrived, answering ``408`` when some bytes came. The body has its own deadline (``pipeline.serve.intake``).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.serve.settings import ServeSettings

log = logging.getLogger("pipeline.serve")


def header_deadline_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol with a header deadline of ``timeout_s`` seconds (see the module docstring); pass it as
    ``uvicorn.Config(http=...)``. Whatever uvicorn would pick itself, the service always runs this one."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        header_timeout_s = timeout_s

        def connection_made(self, transport: Any) -> None:  # noqa: ANN401 - asyncio's transport
            super().connection_made(transport)
            self._header_timer: Any = None
            self._got_bytes = False
            self._arm()  # a connection that never sends a byte is bounded too

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _awaiting_headers(self) -> bool:
            return self.conn.their_state is h11.IDLE

        def data_received(self, data: bytes) -> None:
            if self._awaiting_headers():
                self._got_bytes = self._got_bytes or bool(data)
                self._arm()  # from the first byte of a request (a kept-alive connection's next one included)
            super().data_received(data)
            if not self._awaiting_headers():
                self._disarm()  # the headers arrived: the body deadline and the app take over
                self._got_bytes = False

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._awaiting_headers():
                return
            log.info("closing a connection whose request headers did not arrive within %.3g s", self.header_timeout_s)
            if self._got_bytes:
                self.transport.write(_HEADER_TIMEOUT_RESPONSE)
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


_HEADER_TIMEOUT_BODY = b'{"error": {"code": "header_timeout", "message": "the request headers arrived too late"}}'
_HEADER_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                            b"content-length: %d\r\n\r\n%s" % (len(_HEADER_TIMEOUT_BODY), _HEADER_TIMEOUT_BODY))


def uvicorn_config(app: Any, settings: ServeSettings, **overrides: Any) -> Any:
    """The one uvicorn configuration of the service (``run`` and tests use it)."""
    import uvicorn

    # access_log off: uvicorn's access line has the raw path and client address; ours has id/size/status/latency.
    options: dict[str, Any] = dict(host=settings.host, port=settings.port, workers=1, log_level=settings.log_level,
                                   access_log=False, server_header=False, proxy_headers=False, timeout_keep_alive=5,
                                   timeout_graceful_shutdown=10,
                                   http=header_deadline_protocol(settings.header_timeout_s))
    return uvicorn.Config(app, **{**options, **overrides})


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
    uvicorn.Server(uvicorn_config(app, settings)).run()


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
