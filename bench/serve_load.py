"""Load test of the HTTP service on loopback, against the in-process engine with the same thread budget.

N client threads (keep-alive connections) post images to /v1/detect for T seconds (or until --max-requests);
every --garbage-every-th request is malformed (text, truncated image, PNG bomb header, empty file, not multipart),
so the numbers include the cost of rejecting bad input. Reports valid images/s, p50/p99 latency of valid requests,
responses by status and error code, then runs the engine in-process (decode + predict, `workers` threads x
`ort_threads` onnxruntime threads, as the service) on the same images for the ratio. The clients share the
machine with the server: on a small machine the ratio includes their CPU.

    python bench/serve_load.py --model models/model.onnx --images data/prepared/images/test --seconds 30
    python bench/serve_load.py --url http://127.0.0.1:8000 --images ...        # a running loopback server

Only loopback: a --url whose host is not a loopback address is refused. Prints and writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import ipaddress
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".dcm"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def multipart(field: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="upload"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def png_bomb_header(width: int = 30000, height: int = 30000) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def garbage_corpus(valid: bytes) -> list[tuple[str, bytes, str]]:
    """(kind, body, content type) of malformed requests."""
    corpus = [("text", *multipart("file", b"not an image, just notes\n" * 20)),
              ("truncated", *multipart("file", valid[: max(len(valid) // 3, 64)])),
              ("png_bomb", *multipart("file", png_bomb_header())),
              ("empty_file", *multipart("file", b"")),
              ("missing_field", *multipart("image", valid[:256]))]
    corpus.append(("not_multipart", b"\xff\xd8\xff" + b"\0" * 64, "image/jpeg"))
    return corpus


class Client(threading.Thread):
    def __init__(self, idx: int, host: str, port: int, payloads: list[tuple[bytes, str]],
                 garbage: list[tuple[str, bytes, str]], every: int, headers: dict[str, str], stop_at: float,
                 budget: list[int], lock: threading.Lock) -> None:
        super().__init__(daemon=True)
        self.idx, self.host, self.port = idx, host, port
        self.payloads, self.garbage, self.every, self.headers = payloads, garbage, every, headers
        self.stop_at, self.budget, self.lock = stop_at, budget, lock
        self.records: list[tuple[str, int, float, str]] = []  # (kind, status, seconds, error code)
        self.conn: http.client.HTTPConnection | None = None

    def _take(self) -> int | None:
        with self.lock:
            if self.budget[0] <= 0:
                return None
            self.budget[0] -= 1
            return self.budget[0]

    def _post(self, body: bytes, ctype: str) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            try:
                self.conn.request("POST", "/v1/detect", body=body, headers={**self.headers, "Content-Type": ctype})
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, data
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def run(self) -> None:
        n = self.idx
        while time.monotonic() < self.stop_at and self._take() is not None:
            n += 1
            if self.every and n % self.every == 0:
                kind, body, ctype = self.garbage[(n // self.every) % len(self.garbage)]
                kind = "garbage:" + kind
            else:
                kind = "valid"
                body, ctype = self.payloads[n % len(self.payloads)]
            t = time.perf_counter()
            try:
                status, data = self._post(body, ctype)
                code = ""
                if status != 200:
                    try:
                        code = json.loads(data)["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        code = "non_json_body"
            except Exception as e:  # noqa: BLE001 - a transport failure is a result too
                status, code = 0, type(e).__name__
            self.records.append((kind, status, time.perf_counter() - t, code))
        if self.conn is not None:
            self.conn.close()


def wait_ready(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def engine_throughput(model: Path, files: list[bytes], workers: int, ort_threads: int, seconds: float,
                      providers: str) -> dict[str, Any]:
    """decode + predict, one image per call, `workers` threads: what the service does minus HTTP."""
    from pipeline.infer.engine import OnnxDetector

    det = OnnxDetector(model, providers=providers, threads=ort_threads)
    det.predict([det.decode(files[0]).rgb])  # warm-up
    stop_at = time.monotonic() + seconds
    counts = [0] * workers
    lat: list[list[float]] = [[] for _ in range(workers)]

    def loop(i: int) -> None:
        n = i
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            det.predict([det.decode(files[n % len(files)]).rgb])
            lat[i].append(time.perf_counter() - t)
            counts[i] += 1
            n += workers

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(loop, range(workers)))
    elapsed = time.perf_counter() - t0
    all_lat = [x for v in lat for x in v]
    return {"images": sum(counts), "seconds": round(elapsed, 3), "images_per_s": round(sum(counts) / elapsed, 2),
            "p50_ms": round(1000 * statistics.median(all_lat), 2), "providers": det.providers}


def fetch_metrics(url: str, headers: dict[str, str]) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name in ("detflow_serve_inference_errors_total", "detflow_serve_images_total",
                 "detflow_serve_predict_batch_size_count"):
        out[name] = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + " "))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    ap.add_argument("--images", type=Path, default=Path("data/prepared/images/test"))
    ap.add_argument("--limit", type=int, default=32, help="use at most this many images")
    ap.add_argument("--url", help="a running server on loopback (default: start one on a free port)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests in all")
    ap.add_argument("--garbage-every", type=int, default=5, help="every Nth request is malformed (0: none)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="server pool size (started server)")
    ap.add_argument("--ort-threads", type=int, default=0, help="onnxruntime threads per run (0: cpu // workers)")
    ap.add_argument("--microbatch", action="store_true", help="start the server with micro-batching")
    ap.add_argument("--providers", default="CPUExecutionProvider")
    ap.add_argument("--engine-seconds", type=float, default=0.0, help="in-process arm length (0: min(10, seconds))")
    ap.add_argument("--token", default=os.environ.get("DETFLOW_SERVE_TOKEN", ""), help="bearer token for --url")
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.seconds > 3600 or args.max_requests < 1:
        ap.error("--clients >= 1, 0 < --seconds <= 3600, --max-requests >= 1")

    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.limit]
    if not files:
        ap.error(f"no images in {args.images}")
    blobs = [p.read_bytes() for p in files]
    payloads = [multipart("file", b) for b in blobs]
    garbage = garbage_corpus(blobs[0])
    ort_threads = args.ort_threads or max(1, (os.cpu_count() or 1) // args.workers)

    proc = None
    headers: dict[str, str] = {}
    if args.url:
        parts = urllib.parse.urlsplit(args.url)
        if parts.scheme != "http" or not parts.hostname or not is_loopback(parts.hostname):
            ap.error(f"refusing {args.url}: only http:// on a loopback address (127.0.0.0/8, ::1, localhost)")
        host, port, url = parts.hostname, parts.port or 80, args.url.rstrip("/")
        if args.token:
            headers["Authorization"] = f"Bearer {args.token}"
    else:
        host, port = "127.0.0.1", free_port()
        url = f"http://{host}:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DETFLOW_SERVE_")}
        env["DETFLOW_SERVE_INTRA_OP_THREADS"] = str(ort_threads)
        cmd = [sys.executable, "-m", "pipeline.serve", "--model", str(args.model), "--host", host, "--port",
               str(port), "--workers", str(args.workers), "--providers", args.providers, "--log-level", "warning"]
        if args.microbatch:
            cmd.append("--microbatch")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(url, 120, proc)
        before = fetch_metrics(url, headers)
        lock, budget = threading.Lock(), [args.max_requests]
        stop_at = time.monotonic() + args.seconds
        clients = [Client(i, host, port, payloads, garbage, args.garbage_every, headers, stop_at, budget, lock)
                   for i in range(args.clients)]
        t0 = time.perf_counter()
        for c in clients:
            c.start()
        for c in clients:
            c.join(args.seconds + 120)
        elapsed = time.perf_counter() - t0
        after = fetch_metrics(url, headers)
        wait_ready(url, 5)  # still ready after the garbage
    finally:
        if proc is not None:
            proc.terminate()
            try:
                _, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if b"Traceback" in (err or b""):
                print(err.decode(errors="replace")[-2000:], file=sys.stderr)

    records = [r for c in clients for r in c.records]
    valid = [r for r in records if r[0] == "valid"]
    valid_ok = [r for r in valid if r[1] == 200]
    bad = [r for r in records if r[0] != "valid"]
    lat = [r[2] for r in valid_ok]
    unexpected = [r for r in valid if r[1] != 200] + [r for r in bad if not 400 <= r[1] < 500]
    service = {
        "requests": len(records), "seconds": round(elapsed, 3), "valid_requests": len(valid),
        "valid_ok": len(valid_ok), "valid_images_per_s": round(len(valid_ok) / elapsed, 2),
        "requests_per_s": round(len(records) / elapsed, 2),
        "p50_ms": round(1000 * statistics.median(lat), 2) if lat else None,
        "p99_ms": round(1000 * percentile(lat, 99), 2) if lat else None,
        "by_status": dict(sorted(Counter(str(r[1]) for r in records).items())),
        "garbage_by_kind": {k: dict(v) for k, v in sorted(
            {kind: Counter(f"{s} {code}" for kk, s, _, code in bad if kk == kind)
             for kind in {r[0] for r in bad}}.items())},
        "unexpected": len(unexpected),
        "unexpected_examples": [list(r) for r in unexpected[:5]],
        "server_inference_errors": after["detflow_serve_inference_errors_total"]
        - before["detflow_serve_inference_errors_total"],
        "predict_calls": after["detflow_serve_predict_batch_size_count"]
        - before["detflow_serve_predict_batch_size_count"],
    }
    engine_seconds = args.engine_seconds or min(10.0, args.seconds)
    engine = None
    if proc is not None or args.model.is_file():
        engine = engine_throughput(args.model, blobs, args.workers, ort_threads, engine_seconds, args.providers)
    result = {
        "config": {"clients": args.clients, "seconds": args.seconds, "garbage_every": args.garbage_every,
                   "workers": args.workers, "ort_threads": ort_threads, "microbatch": args.microbatch,
                   "images": len(files), "started_server": proc is not None, "url_host": host},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "service": service,
        "engine_in_process": engine,
        "ratio_service_to_engine": round(service["valid_images_per_s"] / engine["images_per_s"], 3)
        if engine and engine["images_per_s"] else None,
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"service: {service['valid_images_per_s']} valid images/s (p50 {service['p50_ms']} ms, p99 "
          f"{service['p99_ms']} ms), {len(bad)} malformed requests all 4xx: {not unexpected}; engine in-process: "
          f"{engine['images_per_s'] if engine else '-'} images/s; ratio {result['ratio_service_to_engine']} "
          f"-> {args.out}")
    return 1 if unexpected or service["server_inference_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
