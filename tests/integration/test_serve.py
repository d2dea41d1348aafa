"""The HTTP inference service on a tiny real YOLO model exported in the fixture (same recipe as test_export_infer)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SECRET_PATIENT = "SECRET^PATIENT-4711"
# starlette 1.x asks for httpx2 in its TestClient; httpx is what this environment has
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")




@pytest.fixture(scope="module")
def engine(exported: dict[str, Path]) -> Any:
    from pipeline.infer.engine import OnnxDetector

    return OnnxDetector(exported["onnx"], providers="CPUExecutionProvider")


@pytest.fixture(scope="module")
def images(exported: dict[str, Path]) -> list[Path]:
    return sorted((exported["prepared"] / "images" / "test").iterdir())[:6]


@pytest.fixture(scope="module")
def dicom_file(exported: dict[str, Path]) -> Path:
    return sorted((exported["phantom"] / "dicom").rglob("*.dcm"))[0]


def _settings(exported: dict[str, Path], **kw: Any) -> Any:
    from pipeline.serve import ServeSettings

    base: dict[str, Any] = {"model_path": exported["onnx"], "providers": "CPUExecutionProvider", "workers": 2}
    return ServeSettings(**{**base, **kw})


def _wait_ready(client: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout} s: {client.get('/health/ready').json()}")


@pytest.fixture
def make_client(exported: dict[str, Path]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from pipeline.serve import create_app

    opened: list[Any] = []

    def make(detector: Any = None, wait: bool = True, **kw: Any) -> Any:
        client = TestClient(create_app(_settings(exported, **kw), detector=detector), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        if wait:
            _wait_ready(client)
        return client

    yield make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(exported: dict[str, Path]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from pipeline.serve import create_app

    with TestClient(create_app(_settings(exported, max_upload_bytes=2_000_000, max_batch_bytes=4_000_000)),
                    raise_server_exceptions=False) as c:
        _wait_ready(c)
        yield c


# ------------------------------------------------------------------------------------------- helpers


def png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims width x height (CRC fixed): a decompression-bomb header."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 0).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def jpeg_bytes(truncate: int | None = None, size: tuple[int, int] = (96, 128)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[:truncate] if truncate else data


def make_dicom(pixels: bool = True, shape: tuple[int, int] = (32, 48), claimed: tuple[int, int] | None = None
               ) -> bytes:
    """A small CT DICOM (Part 10, with the patient's identifiers); ``claimed`` overrides Rows/Columns."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.Modality = SECRET_PATIENT, SECRET_PATIENT, "CT"
    if pixels:
        ds.Rows, ds.Columns = claimed or shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = np.arange(shape[0] * shape[1], dtype=np.int16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_with_patient(path: Path) -> bytes:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PatientID, ds.PatientName = SECRET_PATIENT, SECRET_PATIENT
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_error(r: Any, status: int, code: str | None = None) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    if code:
        assert body["error"]["code"] == code, body


# ------------------------------------------------------------------------------------------- tests


def test_importing_the_service_does_not_import_torch() -> None:
    code = ("import sys, pipeline.serve, pipeline.serve.app, pipeline.serve.server, pipeline.serve.__main__; "
            "print('torch' in sys.modules, 'torchvision' in sys.modules, 'ultralytics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "False"]


def test_settings_from_env() -> None:
    from pipeline.errors import ConfigError
    from pipeline.serve import ServeSettings

    s = ServeSettings.from_env({"DETFLOW_SERVE_TOKEN": "t0k", "DETFLOW_SERVE_MAX_PIXELS": "1000",
                                "DETFLOW_SERVE_MICROBATCH": "true", "DETFLOW_SERVE_CORS_ORIGINS": "a.org, b.org"},
                               port=9000, workers=None)
    assert s.token is not None and s.token.get_secret_value() == "t0k" and "t0k" not in repr(s)
    assert s.max_pixels == 1000 and s.microbatch is True and s.cors_origins == ["a.org", "b.org"] and s.port == 9000
    assert s.max_upload_bytes == 20 * 1024 * 1024 and s.max_batch_files == 16 and s.workers >= 1
    assert "token" not in s.public() and s.public()["auth"] is True
    assert ServeSettings.from_env({"DETFLOW_SERVE_TOKEN": ""}).token is None
    with pytest.raises(ConfigError, match="DETFLOW_SERVE_MAX_UPLOAD"):
        ServeSettings.from_env({"DETFLOW_SERVE_MAX_UPLOAD": "5"})
    with pytest.raises(ConfigError, match="max_pixels"):
        ServeSettings.from_env({"DETFLOW_SERVE_MAX_PIXELS": "many"})


def test_predictions_match_the_engine(client: Any, engine: Any, images: list[Path], dicom_file: Path) -> None:
    rgbs = [engine.decode(f).rgb for f in images]
    expected = engine.predict(rgbs)
    assert sum(len(d) for d in expected) > 0, "the tiny model should produce some boxes at the card's conf"
    version = json.loads(engine.card_path.read_text())["version"]
    for f, rgb, exp in zip(images, rgbs, expected, strict=True):
        # a misleading name and content type: the type comes from the bytes
        r = client.post("/v1/detect", files={"file": ("scan.dcm", f.read_bytes(), "application/dicom")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["image"] == {"width": rgb.shape[1], "height": rgb.shape[0]}
        assert body["model_version"] == version and body["inference_ms"] > 0
        assert len(body["boxes"]) == len(exp) == len(body["scores"]) == len(body["labels"])
        if len(exp):
            assert np.abs(np.asarray(body["boxes"]) - exp.boxes).max() < 1e-3
            assert np.abs(np.asarray(body["scores"]) - exp.scores).max() < 1e-4
            assert body["label_ids"] == exp.labels.tolist()
            assert body["labels"] == [engine.classes[i] for i in exp.labels]
    # DICOM, by content; the patient's identifiers never come back
    data = dicom_with_patient(dicom_file)
    exp = engine.predict([engine.decode(data).rgb])[0]
    r = client.post("/v1/detect", files={"file": ("image.png", data, "image/png")})
    assert r.status_code == 200 and SECRET_PATIENT.split("^")[0] not in r.text
    if len(exp):
        assert np.abs(np.asarray(r.json()["boxes"]) - exp.boxes).max() < 1e-3
    # batch: same numbers, in order
    r = client.post("/v1/detect/batch", files=[("files", (f.name, f.read_bytes())) for f in images])
    assert r.status_code == 200
    body = r.json()
    assert body["n_ok"] == len(images) and body["n_failed"] == 0
    for item, exp in zip(body["results"], expected, strict=True):
        assert item["status"] == 200 and item["error"] is None
        if len(exp):
            assert np.abs(np.asarray(item["result"]["boxes"]) - exp.boxes).max() < 1e-3


BAD_INPUTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("empty body", {"content": b""}, 400, "empty_body"),
    ("not multipart", {"content": b"\xff\xd8\xff garbage", "headers": {"content-type": "image/jpeg"}}, 415,
     "unsupported_request_type"),
    ("malformed multipart", {"content": b"--x\r\nnonsense", "headers": {"content-type":
                                                                        "multipart/form-data; boundary=zz"}},
     400, "bad_multipart"),
    ("missing field", {"files": {"image": ("a.png", b"\x89PNG\r\n\x1a\n")}}, 422, "missing_file"),
    ("field is not a file", {"data": {"file": "hello"}, "files": {"x": ("n", b"1")}}, 422, "missing_file"),
    ("urlencoded form", {"data": {"file": "hello"}}, 415, "unsupported_request_type"),
    ("empty file", {"files": {"file": ("a.png", b"", "image/png")}}, 400, "empty_file"),
    ("text file", {"files": {"file": ("a.jpg", b"patient notes, not an image\n" * 10, "image/jpeg")}}, 415,
     "unsupported_media_type"),
    ("gif", {"files": {"file": ("a.png", b"GIF89a" + b"\0" * 64, "image/png")}}, 415, "unsupported_media_type"),
    ("truncated jpeg", {"files": {"file": ("a.jpg", jpeg_bytes(truncate=600), "image/jpeg")}}, 422,
     "corrupt_image"),
    ("png bomb 30000x30000", {"files": {"file": ("a.png", png_claiming(30000, 30000), "image/png")}}, 413,
     "image_too_large"),
    ("dicom without pixel data", {"files": {"file": ("a.dcm", make_dicom(pixels=False))}}, 422,
     "dicom_no_pixel_data"),
    ("truncated dicom", {"files": {"file": ("a.dcm", make_dicom()[:-1000])}}, 422, "corrupt_dicom"),
    ("dicom with a wrong size", {"files": {"file": ("a.dcm", make_dicom(claimed=(64, 64)))}}, 422, "corrupt_dicom"),
    ("dicom bomb 20000x20000", {"files": {"file": ("a.dcm", make_dicom(claimed=(20000, 20000)))}}, 413,
     "image_too_large"),
    ("two files", {"files": [("file", ("a.jpg", jpeg_bytes())), ("file", ("b.jpg", jpeg_bytes()))]}, 422,
     "too_many_files"),
    ("oversized upload", {"files": {"file": ("a.jpg", b"\xff\xd8\xff" + b"\0" * 2_100_000)}}, 413,
     "payload_too_large"),
]


def test_bad_inputs_get_json_4xx_and_the_service_stays_ready(client: Any, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    before = client.get("/metrics").text
    caplog.set_level(logging.INFO, logger="pipeline.serve")
    for name, kwargs, status, code in BAD_INPUTS:
        r = client.post("/v1/detect", **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert_error(r, status, code)
        assert r.headers["x-request-id"]
        assert client.get("/health/ready").status_code == 200, name
    after = client.get("/metrics").text
    for status in {s for _, _, s, _ in BAD_INPUTS}:
        n = sum(1 for _, _, s, _ in BAD_INPUTS if s == status)
        delta = (metric(after, "detflow_serve_requests_total", endpoint="/v1/detect", status=str(status))
                 - metric(before, "detflow_serve_requests_total", endpoint="/v1/detect", status=str(status)))
        assert delta == n, (status, delta, n)
    errors = "detflow_serve_inference_errors_total"
    assert metric(after, errors) == metric(before, errors)
    assert metric(after, "detflow_serve_input_errors_total", code="image_too_large") >= 1
    # logs: request id, size, status, latency; never the patient, never a file name
    assert SECRET_PATIENT.split("^")[0] not in caplog.text and "a.jpg" not in caplog.text
    assert re.search(r"request_id=\w+ method=POST endpoint=/v1/detect bytes=\d+ status=413 ms=", caplog.text)


def test_unknown_routes_and_methods_are_json(client: Any) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/v1/detect"), 405, "method_not_allowed")


def test_oversized_uploads_are_refused_early(make_client: Any) -> None:
    c = make_client(max_upload_bytes=10_000, max_batch_bytes=20_000)
    big = b"\xff\xd8\xff" + b"\0" * 200_000
    # Content-Length present: refused before the body is read
    assert_error(c.post("/v1/detect", files={"file": ("a.jpg", big)}), 413, "payload_too_large")

    # no Content-Length (chunked): the counted read stops it, and stops reading
    body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n" + big + b"\r\n--b--\r\n"
    chunks = [body[i:i + 8192] for i in range(0, len(body), 8192)]
    r = c.post("/v1/detect", content=iter(chunks), headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(r, 413, "payload_too_large")
    consumed, sent = [], []

    async def receive() -> dict[str, Any]:
        consumed.append(1)
        return {"type": "http.request", "body": chunks[len(consumed) - 1], "more_body": len(consumed) < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/detect", "raw_path": b"/v1/detect", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"host", b"test")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(c.app(scope, receive, send))
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["code"] == "payload_too_large"
    assert len(consumed) < len(chunks) / 2  # ~ (10 kB + 64 kB multipart slack) / 8 kB, not all 25 chunks
    # a client that goes away mid-upload is neither an error nor a crash
    consumed.clear()
    sent.clear()

    async def receive_then_disconnect() -> dict[str, Any]:
        consumed.append(1)
        if len(consumed) == 1:
            return {"type": "http.request", "body": chunks[0][:100], "more_body": True}
        return {"type": "http.disconnect"}

    errors = metric(c.get("/metrics").text, "detflow_serve_inference_errors_total")
    asyncio.run(c.app(scope, receive_then_disconnect, send))
    assert sent == []
    text = c.get("/metrics").text
    assert metric(text, "detflow_serve_inference_errors_total") == errors
    assert metric(text, "detflow_serve_requests_total", endpoint="/v1/detect", status="499") == 1
    # a file inside the batch limit but over the per-file limit fails alone
    r = c.post("/v1/detect/batch", files=[("files", ("a.jpg", b"\xff\xd8\xff" + b"\0" * 12_000)),
                                          ("files", ("b.jpg", jpeg_bytes(size=(24, 32))))])
    assert r.status_code == 200
    items = r.json()["results"]
    assert items[0]["status"] == 413 and items[0]["error"]["code"] == "payload_too_large"
    assert items[1]["status"] == 200
    assert c.get("/health/ready").status_code == 200


def test_batch_with_bad_files(client: Any, images: list[Path]) -> None:
    files = [("files", ("a.png", images[0].read_bytes())), ("files", ("notes.txt", b"hello")),
             ("files", ("t.jpg", jpeg_bytes(truncate=500))), ("files", ("b.png", images[1].read_bytes())),
             ("files", ("bomb.png", png_claiming(30000, 30000)))]
    r = client.post("/v1/detect/batch", files=files)
    assert r.status_code == 200
    body = r.json()
    assert [it["status"] for it in body["results"]] == [200, 415, 422, 200, 413]
    assert [it["index"] for it in body["results"]] == [0, 1, 2, 3, 4]
    assert body["n_ok"] == 2 and body["n_failed"] == 3
    assert body["results"][1]["error"]["code"] == "unsupported_media_type" and body["results"][1]["result"] is None
    # all bad: still 200 with per-item errors (a well-formed request)
    r = client.post("/v1/detect/batch", files=[("files", ("x", b"junk")), ("files", ("y", b""))])
    assert r.status_code == 200 and r.json()["n_ok"] == 0
    assert [it["error"]["code"] for it in r.json()["results"]] == ["unsupported_media_type", "empty_file"]
    # request-level problems
    assert_error(client.post("/v1/detect/batch", files=[("files", ("x", b"junk"))] * 17), 422, "too_many_files")
    assert_error(client.post("/v1/detect/batch", files={"file": ("x", b"junk")}), 422, "missing_file")
    assert client.get("/health/ready").status_code == 200


def test_auth(make_client: Any, images: list[Path]) -> None:
    c = make_client(token="s3cret-token")
    files = {"file": ("a.png", images[0].read_bytes())}
    assert_error(c.post("/v1/detect", files=files), 401, "unauthorized")
    r = c.post("/v1/detect", files=files, headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(c.post("/v1/detect", files=files, headers={"Authorization": "Basic czNjcmV0LXRva2Vu"}), 401)
    assert_error(c.get("/v1/model"), 401)
    assert_error(c.post("/v1/detect/batch", files=[("files", ("a.png", images[0].read_bytes()))]), 401)
    ok = {"Authorization": "Bearer s3cret-token"}
    assert c.post("/v1/detect", files=files, headers=ok).status_code == 200
    assert c.get("/v1/model", headers=ok).status_code == 200
    for path in ("/health/live", "/health/ready", "/metrics", "/openapi.json"):
        assert c.get(path).status_code == 200, path
    text = c.get("/metrics").text
    assert metric(text, "detflow_serve_requests_total", endpoint="/v1/detect", status="401") == 3
    assert "s3cret" not in text and "s3cret" not in json.dumps(c.get("/v1/model", headers=ok).json())


def test_model_endpoint_and_metrics(client: Any, exported: dict[str, Path]) -> None:
    r = client.get("/v1/model")
    assert r.status_code == 200
    body = r.json()
    card = json.loads(exported["card"].read_text())
    assert body["card"] == card and body["providers"] == ["CPUExecutionProvider"]
    assert body["model_version"] == card["version"] and body["classes"] == card["classes"]
    assert body["limits"]["max_pixels"] == 40_000_000 and body["ready"] is True
    text = client.get("/metrics").text
    assert 'detflow_serve_provider_active{provider="CPUExecutionProvider"} 1.0' in text
    assert f'version="{card["version"]}"' in text and "detflow_serve_model_info" in text
    assert "detflow_serve_request_duration_seconds_bucket" in text and "detflow_serve_ready 1.0" in text
    assert "detflow_serve_inference_errors_total" in text
    docs = client.get("/openapi.json").json()
    assert {"/v1/detect", "/v1/detect/batch", "/v1/model", "/health/ready"} <= set(docs["paths"])
    assert "multipart/form-data" in docs["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


class _GatedDetector:
    """The real engine, but the first predict (the warm-up) waits for a gate; 'boom' images raise."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.gate, self.calls = engine, threading.Event(), 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def predict(self, images: list[np.ndarray], **kw: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            assert self.gate.wait(30)
        if any(im.shape[:2] == (13, 17) for im in images):
            raise RuntimeError("simulated onnxruntime failure")
        return self.engine.predict(images, **kw)


def test_ready_only_after_warmup(make_client: Any, engine: Any, images: list[Path]) -> None:
    det = _GatedDetector(engine)
    c = make_client(detector=det, wait=False)
    r = c.get("/health/ready")
    assert r.status_code == 503 and r.json()["status"] == "warming_up"
    assert c.get("/health/live").status_code == 200
    assert_error(c.post("/v1/detect", files={"file": ("a.png", images[0].read_bytes())}), 503, "not_ready")
    assert "detflow_serve_ready 0.0" in c.get("/metrics").text
    det.gate.set()
    _wait_ready(c)
    assert c.post("/v1/detect", files={"file": ("a.png", images[0].read_bytes())}).status_code == 200


def test_model_that_fails_to_load_is_not_ready(make_client: Any, tmp_path: Path) -> None:
    c = make_client(wait=False, model_path=tmp_path / "missing.onnx")
    deadline = time.monotonic() + 10
    while c.get("/health/ready").json()["status"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.02)
    r = c.get("/health/ready")
    assert r.status_code == 503 and r.json()["status"] == "failed" and "not found" in r.json()["reason"]
    assert c.get("/health/live").status_code == 200
    assert_error(c.post("/v1/detect", files={"file": ("a.jpg", jpeg_bytes())}), 503, "not_ready")


def test_unexpected_errors_are_json_500_and_counted(make_client: Any, engine: Any) -> None:
    from PIL import Image

    det = _GatedDetector(engine)
    det.gate.set()
    c = make_client(detector=det)
    buf = io.BytesIO()
    Image.new("RGB", (17, 13)).save(buf, format="PNG")
    r = c.post("/v1/detect", files={"file": ("a.png", buf.getvalue())})
    assert_error(r, 500, "inference_error")
    assert "simulated" not in r.text  # internals are logged, not returned
    assert metric(c.get("/metrics").text, "detflow_serve_inference_errors_total") == 1
    assert c.get("/health/ready").status_code == 200
    assert c.post("/v1/detect", files={"file": ("a.jpg", jpeg_bytes())}).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=[False, True], ids=["pool", "microbatch"])
def live_url(request: pytest.FixtureRequest, exported: dict[str, Path]) -> Iterator[str]:
    """A real uvicorn server on loopback, in a thread."""
    import uvicorn

    from pipeline.serve import create_app

    port = _free_port()
    app = create_app(_settings(exported, workers=4, microbatch=request.param, microbatch_max_wait_ms=20,
                               max_upload_bytes=100_000))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(10)


def test_concurrent_requests_all_succeed(live_url: str, engine: Any, images: list[Path],
                                         request: pytest.FixtureRequest) -> None:
    import httpx

    payloads = [images[i % len(images)].read_bytes() for i in range(16)]
    expected = engine.predict([engine.decode(p).rgb for p in payloads])
    barrier = threading.Barrier(16)

    def one(data: bytes) -> httpx.Response:
        barrier.wait(10)
        return httpx.post(live_url + "/v1/detect", files={"file": ("a.png", data)}, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, payloads))
    assert [r.status_code for r in responses] == [200] * 16
    for r, exp in zip(responses, expected, strict=True):
        assert len(r.json()["boxes"]) == len(exp)
        if len(exp):
            assert np.abs(np.asarray(r.json()["boxes"]) - exp.boxes).max() < 1e-3
    text = httpx.get(live_url + "/metrics").text
    assert metric(text, "detflow_serve_images_total") >= 16
    calls = metric(text, "detflow_serve_predict_batch_size_count")
    print(f"predict calls for 16 requests (+1 warm-up): {calls:.0f}")
    if "microbatch" in request.node.callspec.id:
        assert calls < 16  # at least two requests shared one predict call
    else:
        assert calls == 17
    # over the real socket: an oversized Content-Length is refused without reading the body
    r = httpx.post(live_url + "/v1/detect", files={"file": ("a.jpg", b"\xff\xd8\xff" + b"\0" * 300_000)})
    assert_error(r, 413, "payload_too_large")
    assert httpx.get(live_url + "/health/ready").status_code == 200
