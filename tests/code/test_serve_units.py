"""The service's units one at a time (pipeline/serve/*): error shape, token check, intake (deadline, limits,
multipart, admission), decoding by content, metrics, micro-batching, state, middleware, routes and the one entry
point. A fake detector stands in for the model; the real tiny export is used only to load a model."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

# starlette 1.x asks for httpx2 in its TestClient; httpx is what this environment has
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


# ------------------------------------------------------------------------------------------- helpers


def png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(height: int = 24, width: int = 40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A real 4x4 PNG whose IHDR says width x height (CRC fixed): the decompression-bomb shape."""
    data = bytearray(png(np.zeros((4, 4, 3), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def dicom(**changes: Any) -> bytes:
    """pydicom's bundled 128x128 CT slice as Part 10 bytes; ``changes`` set (or, with None, delete) elements."""
    from pydicom import examples

    ds = examples.ct
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` with these labels, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def settings(**kw: Any) -> Any:
    from pipeline.serve.settings import ServeSettings

    return ServeSettings(**{"model_path": Path("unused.onnx"), "workers": 1, **kw})


class FakeDetector:
    """The interface the service uses of `OnnxDetector`; one box per image, label 0 for even heights, 7 else."""

    providers = ["CPUExecutionProvider"]
    classes = ["RBC", "WBC"]
    imgsz = 32

    def __init__(self) -> None:
        self.card = {"version": "v-test", "sha256": "ab" * 32, "family": "yolo", "classes": self.classes,
                     "input": {"imgsz": 32}}
        self.calls: list[int] = []

    def predict(self, images: list[np.ndarray]) -> list[Any]:
        self.calls.append(len(images))
        return [SimpleNamespace(boxes=np.array([[1.0, 2.0, 3.5, 4.0]]), scores=np.array([0.75], np.float32),
                                labels=np.array([0 if im.shape[0] % 2 == 0 else 7])) for im in images]


def multipart(*parts: tuple[str, bytes], boundary: str = "unitb") -> tuple[bytes, str]:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f"\r\n\r\n'.encode()
                    + data + b"\r\n" for name, data in parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def request(body: bytes, content_type: str, path: str = "/v1/detect") -> Any:
    from starlette.requests import Request

    sent = []

    async def receive() -> dict[str, Any]:
        sent.append(1)
        return {"type": "http.request", "body": body if len(sent) == 1 else b"", "more_body": False}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    # "app" in the scope: starlette then reports a malformed body as an HTTPException, as inside the service
    return Request({"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b"",
                    "app": None}, receive)


# ------------------------------------------------------------------------------------------- errors


def test_api_error_shape_as_response_and_as_asgi_messages() -> None:
    from pipeline.serve.errors import ApiError, BodyTooLarge, overloaded

    e = ApiError(418, "teapot", "short and stout", headers={"Retry-After": "3"})
    r = e.response()
    assert r.status_code == 418 and json.loads(r.body) == {"error": {"code": "teapot", "message": "short and stout"}}
    assert r.headers["retry-after"] == "3"
    start, body = e.asgi_messages()
    assert start["status"] == 418 and json.loads(body["body"]) == e.body()
    assert dict(start["headers"]) == {b"content-type": b"application/json",
                                      b"content-length": str(len(body["body"])).encode(), b"retry-after": b"3"}
    assert BodyTooLarge(10).body()["error"] == {"code": "payload_too_large",
                                                "message": "request body exceeds the limit of 10 bytes"}
    busy = overloaded("uploads")
    assert (busy.status, busy.code, busy.headers) == (503, "overloaded", {"Retry-After": "1"})


def test_framework_errors_map_to_the_shape_and_4xx_are_counted() -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from pipeline.serve.errors import ApiError, exception_handlers, from_http, from_validation

    assert (from_http(HTTPException(404)).code, from_http(HTTPException(405)).code) == ("not_found",
                                                                                       "method_not_allowed")
    assert from_http(HTTPException(429, "slow down")).body() == {"error": {"code": "http_429",
                                                                           "message": "slow down"}}
    v = from_validation(RequestValidationError([{"loc": ("query", "n"), "msg": "not an int"}]))
    assert (v.status, v.code, v.message) == (422, "validation_error", "query.n: not an int")
    counted: list[str] = []
    handlers = exception_handlers(counted.append)
    r400 = asyncio.run(handlers[ApiError](None, ApiError(400, "empty_file", "x")))
    r500 = asyncio.run(handlers[ApiError](None, ApiError(500, "inference_error", "y")))
    assert (r400.status_code, r500.status_code) == (400, 500) and counted == ["empty_file"]


# ------------------------------------------------------------------------------------------- auth


def test_token_check() -> None:
    from fastapi.security import HTTPAuthorizationCredentials
    from pydantic import SecretStr

    from pipeline.serve.auth import check_token, token_guard
    from pipeline.serve.errors import ApiError

    def creds(token: str) -> HTTPAuthorizationCredentials:
        return HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)

    check_token(None, None)  # no token configured: open
    check_token(SecretStr("s3cret"), creds("s3cret"))
    for given, message in ((None, "needs an 'Authorization: Bearer <token>' header"),
                           (creds("wrong"), "missing or invalid bearer token"), (creds("s3cret "), "invalid")):
        with pytest.raises(ApiError) as e:
            check_token(SecretStr("s3cret"), given)
        assert (e.value.status, e.value.code, e.value.headers) == (401, "unauthorized", {"WWW-Authenticate": "Bearer"})
        assert message in e.value.message and "s3cret" not in e.value.message
    guard = token_guard(SecretStr("t"))
    guard(creds("t"))
    with pytest.raises(ApiError):
        guard(None)


# ------------------------------------------------------------------------------------------- intake


def test_stage_counts_and_refuses_when_full() -> None:
    from pipeline.serve.errors import overloaded
    from pipeline.serve.intake import Stage

    seen: list[int] = []
    stage = Stage(2, lambda: overloaded("requests"), seen.append)
    with stage.enter(), stage.enter():
        assert stage.count == 2
        with pytest.raises(Exception, match="too many requests") as e, stage.enter():
            pass
        assert e.value.status == 503  # type: ignore[attr-defined]
    with pytest.raises(ZeroDivisionError), stage.enter():
        1 / 0  # noqa: B018 - a failure inside still gives the place back
    assert stage.count == 0 and seen == [1, 2, 1, 0, 1, 0]


def test_body_deadline_covers_the_whole_body_and_only_the_body() -> None:
    from pipeline.serve.intake import BodyTimeout, body_deadline

    async def dripping() -> dict[str, Any]:
        await asyncio.sleep(0.03)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def cut() -> int:
        receive, n = body_deadline(dripping, 0.2), 0
        with pytest.raises(BodyTimeout, match="within 0.2 s"):
            while True:
                await receive()
                n += 1
        return n

    assert 3 <= asyncio.run(cut()) <= 7  # each piece came in time, the body as a whole did not

    messages = [{"type": "http.request", "body": b"all", "more_body": False}, {"type": "http.disconnect"}]

    async def then_disconnect() -> dict[str, Any]:
        if len(messages) == 1:
            await asyncio.sleep(0.15)  # waiting for the client to go away is not a body read
        return messages.pop(0)

    async def after() -> list[str]:
        receive = body_deadline(then_disconnect, 0.1)
        return [(await receive())["type"], (await receive())["type"]]

    assert asyncio.run(after()) == ["http.request", "http.disconnect"]


def test_body_limits() -> None:
    from pipeline.serve.intake import MULTIPART_SLACK, body_limit

    s = settings(max_upload_bytes=1000, max_batch_bytes=5000)
    assert body_limit(s, "POST", "/v1/detect") == (1000 + MULTIPART_SLACK, 1000)
    assert body_limit(s, "POST", "/v1/detect/batch") == (5000 + MULTIPART_SLACK, 5000)
    assert body_limit(s, "PUT", "/elsewhere") == (MULTIPART_SLACK, MULTIPART_SLACK)
    assert body_limit(s, "GET", "/v1/detect") is None


@pytest.mark.parametrize(("body", "ctype", "field", "max_files", "status", "code", "message"), [
    (b"", "multipart/form-data; boundary=x", "file", 1, 400, "empty_body", "the request has no body"),
    (b"\xff\xd8\xff", "image/jpeg", "file", 1, 415, "unsupported_request_type", "(got image/jpeg)"),
    (b"--x\r\nnonsense", "multipart/form-data; boundary=zz", "file", 1, 400, "bad_multipart", "malformed"),
    (*multipart(("image", b"1")), "file", 1, 422, "missing_file", "(got file field(s) ['image'])"),
    (*multipart(("file", b"1"), ("file", b"2")), "file", 1, 422, "too_many_files", "at most 1 file(s)"),
    (*multipart(("files", b"1"), ("other", b"2")), "files", 1, 422, "too_many_files", "at most 1 file(s)"),
])
def test_read_files_refuses_bad_requests(body: bytes, ctype: str, field: str, max_files: int, status: int, code: str,
                                         message: str) -> None:
    from pipeline.serve.errors import ApiError
    from pipeline.serve.intake import read_files

    with pytest.raises(ApiError) as e:
        asyncio.run(read_files(request(body, ctype), field, max_files))
    assert (e.value.status, e.value.code) == (status, code) and message in e.value.message, e.value.message


def test_read_files_and_the_per_file_limit() -> None:
    from pipeline.serve.errors import ApiError
    from pipeline.serve.intake import read_files, read_upload

    async def run() -> tuple[list[bytes], list[int]]:
        files, form = await read_files(request(*multipart(("files", b"a" * 10), ("files", b"b" * 11))), "files", 2)
        try:
            data = [await read_upload(files[0], 10)]
            statuses = []
            try:
                await read_upload(files[1], 10)
            except ApiError as e:
                statuses.append(e.status)
            return data, statuses
        finally:
            await form.close()

    assert asyncio.run(run()) == ([b"a" * 10], [413])


def test_admission_takes_a_slot_only_after_the_body() -> None:
    from pipeline.serve.errors import ApiError, overloaded
    from pipeline.serve.intake import Stage, admitted

    receiving, processing = Stage(4, lambda: overloaded("uploads")), Stage(1, lambda: overloaded("requests"))
    body, ctype = multipart(("file", b"img"))

    async def run() -> tuple[list[int], str]:
        counts = []
        async with admitted(request(body, ctype), "file", 1, receiving, processing) as (upload,):
            counts += [receiving.count, processing.count]
            data = await upload.read()
            with pytest.raises(ApiError, match="too many requests"):  # the only slot is ours
                async with admitted(request(body, ctype), "file", 1, receiving, processing):
                    pass
            counts += [receiving.count, processing.count]  # the refused one gave its upload place back
        return counts + [receiving.count, processing.count], data.decode()

    assert asyncio.run(run()) == ([0, 1, 0, 1, 0, 0], "img")


# ------------------------------------------------------------------------------------------- decoding


def test_sniff_by_content() -> None:
    from pipeline.serve.decoding import sniff

    assert [sniff(jpeg()), sniff(png(np.zeros((2, 2, 3), np.uint8))), sniff(dicom())] == ["jpeg", "png", "dicom"]
    assert [sniff(b""), sniff(b"GIF89a" + b"\0" * 200), sniff(b"\0" * 128 + b"DIC")] == [None, None, None]


def test_decode_upload_rasters_and_dicom() -> None:
    from pipeline.serve.decoding import decode_upload

    rgb = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_upload(png(rgb), 100, None), rgb)  # lossless, exact
    out = decode_upload(jpeg(24, 40), 10_000, None)
    assert out.shape == (24, 40, 3) and out.dtype == np.uint8 and abs(int(out[..., 0].mean()) - 200) <= 3
    ct = decode_upload(dicom(), 128 * 128, None)
    assert ct.shape == (128, 128, 3) and (ct[..., 0] == ct[..., 2]).all() and ct.min() == 0 and ct.max() == 255
    narrow = decode_upload(dicom(), 128 * 128, (0.0, 1.0))  # a 1-wide window at 0 is nearly black/white
    assert set(np.unique(narrow).tolist()) <= {0, 128, 255} and not np.array_equal(narrow, ct)


@pytest.mark.parametrize(("data", "max_pixels", "status", "code"), [
    (b"", 100, 400, "empty_file"),
    (b"patient notes, not an image\n" * 10, 100, 415, "unsupported_media_type"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 100, 415, "not_an_image"),  # the magic alone: the decoder's verdict
    (jpeg()[:300], 10_000, 422, "corrupt_image"),
    (png_header_claiming(30000, 30000), 10**8, 413, "image_too_large"),
    (jpeg(24, 40), 24 * 40 - 1, 413, "image_too_large"),
    (dicom(), 128 * 128 - 1, 413, "image_too_large"),
    (dicom(Rows=20000, Columns=20000), 10**8, 413, "image_too_large"),
    (dicom(PixelData=None), 10**8, 422, "dicom_no_pixel_data"),
    (dicom(Rows=200), 10**8, 422, "corrupt_dicom"),  # less pixel data than Rows x Columns
    (dicom()[:-5000], 10**8, 422, "corrupt_dicom"),
])
def test_decode_upload_refuses_bad_bytes(data: bytes, max_pixels: int, status: int, code: str) -> None:
    from pipeline.serve.decoding import decode_upload
    from pipeline.serve.errors import ApiError

    with pytest.raises(ApiError) as e:
        decode_upload(data, max_pixels, None)
    assert (e.value.status, e.value.code) == (status, code), e.value.message
    assert "CompressedSamples" not in e.value.message  # DICOM header values never come back


def test_decoder_problems_map_to_statuses() -> None:
    from pipeline.data.imaging import ImageLoadError
    from pipeline.serve.decoding import check_dicom_size, input_error

    assert (input_error(ImageLoadError("image_too_large", "9x9")).status, input_error(ImageLoadError(
        "image_too_large", "9x9")).message) == (413, "9x9")
    e = input_error(ImageLoadError("dicom_no_pixel_data", "internal detail"))
    assert (e.status, e.message) == (422, "the DICOM file has no Pixel Data element")
    assert input_error(ImageLoadError("something_new", "d")).status == 422
    check_dicom_size(dicom(), 128 * 128)
    with pytest.raises(ImageLoadError, match="128x128x1 exceeds the limit of 100 pixels"):
        check_dicom_size(dicom(), 100)


# ------------------------------------------------------------------------------------------- metrics


def test_metrics_render_what_was_recorded_per_app() -> None:
    from pipeline.serve.metrics import Metrics

    m, other = Metrics(), Metrics()
    m.observe_request("/v1/detect", "POST", 413, 0.02)
    m.observe_request("/v1/detect", "POST", 413, 0.03)
    m.count_input_error("image_too_large")
    m.observe_predict(4, 0.01)
    m.describe_model("v7", {"sha256": "cafe", "family": "yolo"}, ["RBC", "WBC"], ["CPUExecutionProvider"])
    text, ctype = m.render()
    text = text.decode()
    assert ctype.startswith("text/plain")
    assert metric(text, "detflow_serve_requests_total", endpoint="/v1/detect", status="413") == 2
    assert metric(text, "detflow_serve_request_duration_seconds_count", endpoint="/v1/detect") == 2
    assert metric(text, "detflow_serve_input_errors_total", code="image_too_large") == 1
    assert metric(text, "detflow_serve_images_total") == 4 and metric(text, "detflow_serve_predict_batch_size_sum") == 4
    assert metric(text, "detflow_serve_provider_active", provider="CPUExecutionProvider") == 1
    assert metric(text, "detflow_serve_model_info", version="v7", sha256="cafe", classes="RBC,WBC") == 1
    assert metric(other.render()[0].decode(), "detflow_serve_requests_total") == 0  # separate registries


# ------------------------------------------------------------------------------------------- micro-batching


def test_microbatcher_groups_concurrent_requests() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.serve.batching import MicroBatcher

    sizes: list[int] = []

    def predict(images: list[np.ndarray]) -> tuple[list[Any], float]:
        sizes.append(len(images))
        if any(im[0, 0, 0] == 99 for im in images):
            raise RuntimeError("boom")
        return [int(im[0, 0, 0]) for im in images], 1.5

    async def run() -> tuple[list[Any], list[str]]:
        with ThreadPoolExecutor(2) as pool:
            b = MicroBatcher(predict, pool, max_size=4, max_wait_s=0.05, max_inflight=2)
            b.start()
            ok = await asyncio.gather(*(b.submit(np.full((1, 1, 3), i, np.uint8)) for i in range(6)))
            bad = await asyncio.gather(*(b.submit(np.full((1, 1, 3), v, np.uint8)) for v in (99, 5)),
                                       return_exceptions=True)
            await b.stop()
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            b.queue.put_nowait((np.zeros((1, 1, 3), np.uint8), fut))
            await b.stop()  # what is still queued at shutdown gets a 503
            return ok, [str(x) for x in bad] + [fut.exception().code]  # type: ignore[union-attr]

    ok, errors = asyncio.run(run())
    assert ok == [(i, 1.5) for i in range(6)] and sizes[:2] == [4, 2] and sizes[2] == 2
    assert errors == ["boom", "boom", "shutting_down"]


# ------------------------------------------------------------------------------------------- state and loading


def test_state_readiness_and_model_call() -> None:
    from pipeline.serve.errors import ApiError
    from pipeline.serve.metrics import Metrics
    from pipeline.serve.state import ServiceState

    m = Metrics()
    state = ServiceState(settings(), m)
    assert state.readiness() == (503, {"status": "loading", "reason": "the model is not loaded yet"})
    with pytest.raises(ApiError) as e:
        state.require_ready()
    assert (e.value.status, e.value.code, e.value.headers) == (503, "not_ready", {"Retry-After": "1"})
    det = FakeDetector()
    state.set_detector(det)
    assert state.readiness()[1]["status"] == "warming_up" and state.model_version == "v-test"
    state.warm_up()
    assert det.calls == [1] and state.readiness() == (200, {"status": "ready", "model_version": "v-test",
                                                            "providers": ["CPUExecutionProvider"]})
    dets, ms = state.predict([np.zeros((4, 4, 3), np.uint8)] * 3)
    assert len(dets) == 3 and ms >= 0
    text = m.render()[0].decode()
    assert metric(text, "detflow_serve_images_total") == 4 and metric(text, "detflow_serve_ready") == 1
    del det.card["version"]
    assert state.model_version == "ab" * 6  # no version: the sha256 prefix


def test_bring_up_reports_a_failed_load_and_stays_up() -> None:
    from pipeline.errors import DetflowError
    from pipeline.serve.metrics import Metrics
    from pipeline.serve.state import ServiceState

    def broken(_: Any) -> Any:
        raise DetflowError("model m.onnx not found")

    state = ServiceState(settings(), Metrics(), loader=broken)
    asyncio.run(state.bring_up())
    assert state.readiness() == (503, {"status": "failed", "reason": "DetflowError: model m.onnx not found"})
    good = ServiceState(settings(warmup=False), Metrics(), loader=lambda _: FakeDetector())
    asyncio.run(good.bring_up())
    assert good.ready and good.detector.calls == []  # no warm-up asked for


def test_model_files_are_checked_before_loading(tmp_path: Path) -> None:
    from pipeline.infer.engine import ModelLoadError
    from pipeline.serve.loading import check_model_files

    model = tmp_path / "model.onnx"
    s = settings(model_path=model)
    cases = [(None, "model.onnx not found; run `detflow export`"),
             ("{", "is not valid JSON (line 1, column 2)"), ("[]", "is not a JSON object"),
             ('{"classes": "RBC", "input": {}}',
              "malformed (lacks family; classes is not a list; input lacks imgsz; lacks sha256)")]
    for card, expected in cases:
        if card is not None:
            model.write_bytes(b"onnx")
            (tmp_path / "model_card.json").write_text(card)
        with pytest.raises(ModelLoadError) as e:
            check_model_files(s)
        assert expected in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "model_card.json").write_text('{"family": "yolo", "classes": ["a"], "input": {"imgsz": 64}, '
                                              '"sha256": "00"}')
    check_model_files(s)  # the card schema (pipeline/contracts/card.py) holds; the checksum is the engine's check


def test_the_real_tiny_model_loads_and_warms_up(exported: dict[str, Path]) -> None:
    """The one place the units need a real model: the default loader and the warm-up on the exported ONNX."""
    from pipeline.serve.metrics import Metrics
    from pipeline.serve.state import ServiceState

    m = Metrics()
    state = ServiceState(settings(model_path=exported["onnx"], providers="CPUExecutionProvider"), m)

    async def run() -> None:
        async with asyncio.timeout(60), state.lifespan(None):
            while not state.ready and not state.load_error:
                await asyncio.sleep(0.02)

    asyncio.run(run())
    assert state.ready and state.load_error is None
    assert state.model_version == json.loads(exported["card"].read_text())["version"]
    assert metric(m.render()[0].decode(), "detflow_serve_predict_batch_size_count") == 1  # the warm-up


# ------------------------------------------------------------------------------------------- middleware


def run_middleware(app: Any, headers: dict[str, str], chunks: list[bytes], path: str = "/v1/detect",
                   **kw: Any) -> tuple[list[dict[str, Any]], Any]:
    from pipeline.serve.metrics import Metrics
    from pipeline.serve.middleware import ServiceMiddleware

    metrics, sent, pending = Metrics(), [], list(chunks)

    async def receive() -> dict[str, Any]:
        if not pending:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(ServiceMiddleware(app, settings(**kw), metrics)(scope, receive, send))
    return sent, metrics


async def reads_body_then_200(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["state"]["request_id"].encode()})


def test_middleware_limits_ids_and_backstop() -> None:
    from starlette.requests import ClientDisconnect

    sent, _ = run_middleware(reads_body_then_200, {"x-request-id": "abc-1.2"}, [b"x"])
    assert sent[0]["status"] == 200 and (b"x-request-id", b"abc-1.2") in sent[0]["headers"]
    sent, _ = run_middleware(reads_body_then_200, {"x-request-id": "no spaces!"}, [b"x"])
    rid = dict(sent[0]["headers"])[b"x-request-id"]
    assert len(rid) == 16 and sent[1]["body"] == rid  # replaced, and the app sees the same id

    called: list[int] = []

    async def must_not_run(scope: dict[str, Any], receive: Any, send: Any) -> None:
        called.append(1)

    sent, m = run_middleware(must_not_run, {"content-length": "200000"}, [b""], max_upload_bytes=1000)
    assert sent[0]["status"] == 413 and called == []  # refused before a byte of the body was read
    assert metric(m.render()[0].decode(), "detflow_serve_requests_total", status="413") == 1
    sent, _ = run_middleware(must_not_run, {"content-length": "12x"}, [b""])
    assert json.loads(sent[1]["body"])["error"]["code"] == "bad_request"
    # no Content-Length: the counted read stops a body over 1000 bytes + the multipart slack
    sent, m = run_middleware(reads_body_then_200, {}, [b"\0" * 40_000] * 3, max_upload_bytes=1000)
    assert sent[0]["status"] == 413
    assert metric(m.render()[0].decode(), "detflow_serve_input_errors_total", code="payload_too_large") == 1

    async def crashes(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise KeyError("internal detail")

    sent, m = run_middleware(crashes, {}, [b""])
    body = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 500 and body["code"] == "internal_error" and "internal detail" not in body["message"]
    assert metric(m.render()[0].decode(), "detflow_serve_inference_errors_total") == 1

    async def client_left(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise ClientDisconnect()

    sent, m = run_middleware(client_left, {}, [b""])
    assert sent == [] and metric(m.render()[0].decode(), "detflow_serve_requests_total", status="499") == 1


# ------------------------------------------------------------------------------------------- routes (wired)


@pytest.fixture
def client() -> Any:
    from fastapi.testclient import TestClient

    from pipeline.serve.app import create_app

    det = FakeDetector()
    with TestClient(create_app(settings(token="tok"), detector=det), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = "Bearer tok"
        deadline = time.monotonic() + 30
        while c.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, c.get("/health/ready").json()
        c.detector = det  # type: ignore[attr-defined]
        yield c


def test_routes_answer_from_the_detector(client: Any) -> None:
    r = client.post("/v1/detect", files={"file": ("x.dcm", png(np.zeros((6, 9, 3), np.uint8)), "application/dicom")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["boxes"] == [[1.0, 2.0, 3.5, 4.0]] and body["scores"] == [0.75] and body["label_ids"] == [0]
    assert body["labels"] == ["RBC"] and body["model_version"] == "v-test"
    assert body["image"] == {"width": 9, "height": 6}
    r = client.post("/v1/detect/batch", files=[("files", ("a", png(np.zeros((5, 5, 3), np.uint8)))),
                                               ("files", ("b", b"junk"))])
    items = r.json()["results"]
    assert r.json()["n_ok"] == 1 and items[0]["result"]["labels"] == ["7"]  # unknown class id: the number
    assert items[1] == {"index": 1, "status": 415, "result": None,
                        "error": {"code": "unsupported_media_type", "message": items[1]["error"]["message"]}}
    assert client.detector.calls == [1, 1, 1]  # warm-up, detect, the batch's one good file
    model = client.get("/v1/model").json()
    assert model["classes"] == ["RBC", "WBC"] and model["service"]["auth"] is True and model["family"] == "yolo"
    assert client.get("/v1/model", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/health/live").json() == {"status": "alive"}
    text = client.get("/metrics").text
    assert metric(text, "detflow_serve_input_errors_total", code="unsupported_media_type") == 1


def test_create_app_only_wires() -> None:
    from pipeline.serve.app import create_app

    assert len(inspect.getsourcelines(create_app)[0]) <= 60


# ------------------------------------------------------------------------------------------- entry point


def test_one_option_set_for_both_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer
    from typer.testing import CliRunner

    from pipeline.serve import entry, server

    assert [o.name for o in entry.OPTIONS] == [p for p in inspect.signature(server.serve).parameters
                                               if p not in ("token", "settings")]
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(entry, "start", lambda **kw: calls.append(kw))
    argv = ["--model", "m.onnx", "--port", "9001", "--no-microbatch", "--require-gpu", "--workers", "3"]
    assert entry.main(argv) == 0
    app = typer.Typer()
    app.command("serve")(entry.typer_command())
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["serve", *argv])
    assert result.exit_code == 0, result.output
    assert calls[0] == calls[1] == {"model": Path("m.onnx"), "host": None, "port": 9001, "card": None,
                                    "providers": None, "require_gpu": True, "workers": 3, "microbatch": False,
                                    "log_level": None}
    assert CliRunner().invoke(app, ["serve", "--workers", "0"]).exit_code == 2
    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"NO_COLOR": "1", "COLUMNS": "200"}).output
    assert all(o.flag in help_text for o in entry.OPTIONS)


def test_python_m_errors_are_one_line_with_exit_codes(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.errors import ConfigError, DetflowError
    from pipeline.serve import entry

    for error, code in ((ConfigError("bad setting"), 2), (DetflowError("bad model"), 1), (KeyboardInterrupt(), 130)):
        def fail(error: BaseException = error, **_: Any) -> None:
            raise error

        monkeypatch.setattr(entry, "start", fail)
        assert entry.main([]) == code
    assert capsys.readouterr().err.splitlines() == ["error: bad setting", "error: bad model"]
    with pytest.raises(SystemExit) as e:
        entry.main(["--port", "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: argument --port: invalid int value: 'x' (see python -m pipeline.serve " \
                                      "--help)\n"


def test_model_report_route_serves_the_page_next_to_the_model(tmp_path: Path) -> None:
    """GET /v1/model/report: the model folder's report.html (behind the token), else a 404 in the error shape."""
    from fastapi.testclient import TestClient

    from pipeline.serve.app import create_app

    app = create_app(settings(model_path=tmp_path / "model.onnx", token="tok"), detector=FakeDetector())
    with TestClient(app, raise_server_exceptions=False) as c:
        auth = {"Authorization": "Bearer tok"}
        r = c.get("/v1/model/report", headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert str(tmp_path) in r.json()["error"]["message"]
        page = "<!DOCTYPE html><html><body><div id=\"gate-verdict\">PASS</div></body></html>"
        (tmp_path / "report.html").write_text(page, encoding="utf-8")
        assert c.get("/v1/model/report").status_code == 401
        r = c.get("/v1/model/report", headers=auth)
        assert r.status_code == 200 and r.text == page and r.headers["content-type"].startswith("text/html")
