"""The service closes connections whose request headers do not arrive within ``header_timeout_s`` (issue 20: idle
connections). Real sockets against the service's own uvicorn configuration (and one real `detflow serve`
process): half a request line, half the headers, headers dripped byte by byte, a kept-alive connection's second
request cut short, nothing at all, and many such connections at once; a request that completes in time is served.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

TIMEOUT_S = 1.0
GET = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"
PARTIALS = {
    "nothing": b"",
    "one-byte": b"G",
    "half-request-line": b"GET /health/li",
    "request-line": b"GET /health/live HTTP/1.1\r\n",
    "half-headers": b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Ag",
    "headers-without-blank-line": GET[:-2],
    "post-half-headers": b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=ab",
}


@contextmanager
def serving(exported: dict[str, Path], timeout_s: float = TIMEOUT_S) -> Iterator[int]:
    """The app under the service's uvicorn configuration, on a pre-bound loopback socket, in a thread."""
    import uvicorn

    from pipeline.infer.engine import OnnxDetector
    from pipeline.serve import ServeSettings, create_app
    from pipeline.serve.server import uvicorn_config

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = ServeSettings(model_path=exported["onnx"], providers="CPUExecutionProvider", workers=2,
                             header_timeout_s=timeout_s, port=port, log_level="warning")
    app = create_app(settings, detector=OnnxDetector(exported["onnx"], providers="CPUExecutionProvider"))
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def _until_closed(conn: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes ``conn`` (or ``limit``), and what it sent meanwhile."""
    start, got = time.monotonic(), b""
    conn.settimeout(0.1)
    while time.monotonic() - start < limit:
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return time.monotonic() - start, got


def _ok(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(GET)
        return c.recv(64).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("name", sorted(PARTIALS))
def test_connection_without_complete_headers_is_closed_at_the_deadline(exported: dict[str, Path], name: str) -> None:
    with serving(exported) as port:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(PARTIALS[name])
        sent = time.monotonic()
        waited, got = _until_closed(conn, limit=6 * TIMEOUT_S)
        conn.close()
        assert waited < 3 * TIMEOUT_S, f"{name}: still open after {waited:.1f} s"
        assert time.monotonic() - sent >= 0.8 * TIMEOUT_S  # not before the deadline
        assert got.startswith(b"HTTP/1.1 408") == bool(PARTIALS[name]), got[:80]
        assert _ok(port)  # the service itself carries on


def test_dripping_headers_cannot_extend_the_deadline(exported: dict[str, Path]) -> None:
    """One header byte every 0.1 s, never finishing: each byte is activity, yet the connection is closed at the
    deadline counted from the first byte."""
    with serving(exported) as port:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.settimeout(0.1)
        start, closed_at = time.monotonic(), None
        for byte in (GET[:-2] * 4)[:80]:
            try:
                conn.sendall(bytes([byte]))
                if conn.recv(4096) == b"":
                    closed_at = time.monotonic()
                    break
            except TimeoutError:
                continue  # nothing from the server yet: the next byte
            except OSError:
                closed_at = time.monotonic()
                break
        conn.close()
        assert closed_at is not None and closed_at - start < 3 * TIMEOUT_S, "the dripping client kept its connection"


def test_headers_that_arrive_in_time_are_served(exported: dict[str, Path]) -> None:
    """Slow but within the deadline (0.6 of it, in chunks): answered normally, on a kept-alive connection twice."""
    with serving(exported) as port:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        for _ in range(2):
            for i in range(0, len(GET), 10):
                conn.sendall(GET[i:i + 10])
                time.sleep(0.6 * TIMEOUT_S / (len(GET) / 10))
            head = b""
            while b'{"status":"alive"}' not in head:
                chunk = conn.recv(4096)
                assert chunk, head
                head += chunk
            assert head.startswith(b"HTTP/1.1 200"), head[:80]
            time.sleep(0.3 * TIMEOUT_S)
        conn.close()


def test_a_kept_alive_connections_next_request_has_the_deadline_too(exported: dict[str, Path]) -> None:
    with serving(exported) as port:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(GET)
        first = b""
        while b'{"status":"alive"}' not in first:  # the whole first response, body included
            chunk = conn.recv(4096)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200")
        conn.sendall(GET[:30])
        waited, got = _until_closed(conn, limit=6 * TIMEOUT_S)
        conn.close()
        assert waited < 3 * TIMEOUT_S and got.startswith(b"HTTP/1.1 408")


def test_many_stalled_connections_are_all_closed(exported: dict[str, Path]) -> None:
    """100 connections that each send half their headers: all closed by the deadline, none left holding a file
    descriptor, and normal requests answered meanwhile."""
    with serving(exported) as port:
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
        for c in conns:
            c.sendall(PARTIALS["half-headers"])
        assert _ok(port)
        time.sleep(2.5 * TIMEOUT_S)
        still_open = 0
        for c in conns:
            waited, _ = _until_closed(c, limit=0.3)
            still_open += waited >= 0.3
            c.close()
        assert still_open == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_detflow_serve_applies_the_setting(exported: dict[str, Path]) -> None:
    """A real `detflow serve` process with DETFLOW_SERVE_HEADER_TIMEOUT_S=1: half the headers, closed with 408."""
    port = _free_port()
    env: dict[str, Any] = {**os.environ, "DETFLOW_SERVE_HEADER_TIMEOUT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model", str(exported["onnx"]),
                             "--port", str(port), "--providers", "CPUExecutionProvider"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:] if proc.stdout else ""
            try:
                if _ok(port):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(PARTIALS["half-headers"])
        waited, got = _until_closed(conn, limit=6.0)
        conn.close()
        assert waited < 3.0 and got.startswith(b"HTTP/1.1 408"), (waited, got[:80])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
