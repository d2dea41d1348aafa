"""One decoder for every input path: the same bytes give the same pixels, or the same error kind, through the
inference engine (a file path or bytes, as batch inference and the CLI decode) and through the HTTP service's
upload decoding; by content, never by file name, under the same pixel limit."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.imaging import DEFAULT_MAX_PIXELS, ImageLoadError, decode_bytes, decode_path, sniff

WINDOW = (40.0, 400.0)  # the card's params window: both paths must apply it to DICOM


def _png(rgb: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", **save)  # type: ignore[arg-type]
    return buf.getvalue()


def _jpeg(height: int = 24, width: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    """A 6x10 picture stored turned (EXIF Orientation 6): decoded upright it is 10 wide, 6 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _png(np.ascontiguousarray(np.rot90(_RGB, k=1)), exif=exif.tobytes())


def _png_claiming(width: int, height: int) -> bytes:
    """A real 4x4 PNG whose IHDR says width x height (CRC fixed): a decompression bomb's header."""
    data = bytearray(_png(np.zeros((4, 4, 3), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _dicom() -> bytes:
    """pydicom's bundled 128x128 CT slice as Part 10 bytes."""
    from pydicom import examples

    buf = io.BytesIO()
    examples.ct.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


_RGB = np.random.default_rng(3).integers(0, 255, (6, 10, 3), dtype=np.uint8)

# name -> (file name, bytes, max_pixels or None for the default limit, expected error kind or None)
CASES: dict[str, tuple[str, Callable[[], bytes], int | None, str | None]] = {
    "jpeg": ("photo.jpg", _jpeg, None, None),
    "png": ("scan.png", lambda: _png(_RGB), None, None),
    "exif_rotated": ("turned.png", _exif_rotated, None, None),
    "dicom_dcm": ("slice.dcm", _dicom, None, None),
    "dicom_no_suffix": ("slice", _dicom, None, None),
    "dicom_named_png": ("slice.png", _dicom, None, None),
    "jpeg_named_dcm": ("photo.dcm", _jpeg, None, None),  # content decides: this is a JPEG
    "garbage": ("notes.jpg", lambda: b"patient notes, not an image\n" * 10, None, "not_an_image"),
    "truncated_jpeg": ("cut.jpg", lambda: _jpeg()[:300], None, "corrupt_image"),
    "truncated_dicom": ("cut.dcm", lambda: _dicom()[:-5000], None, "corrupt_dicom"),
    "jpeg_over_limit": ("big.jpg", _jpeg, 24 * 40 - 1, "image_too_large"),
    "dicom_over_limit": ("big.dcm", _dicom, 128 * 128 - 1, "image_too_large"),
    "png_over_default_limit": ("bomb.png", lambda: _png_claiming(8000, 8000), None, "image_too_large"),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A real OnnxDetector on a tiny graph whose card asks for a params DICOM window."""
    from helpers import write_tiny_yolo_onnx

    from pipeline.infer.engine import OnnxDetector

    root = tmp_path_factory.mktemp("model")
    write_tiny_yolo_onnx(root / "model.onnx")
    card = {"family": "yolo", "classes": ["nodule"],
            "sha256": hashlib.sha256((root / "model.onnx").read_bytes()).hexdigest(),
            "input": {"imgsz": 32, "stride": 0, "dicom_window": {"mode": "params", "window": list(WINDOW)}}}
    (root / "model_card.json").write_text(json.dumps(card))
    det = OnnxDetector(root / "model.onnx", providers="CPUExecutionProvider")
    assert det.dicom_window() == WINDOW
    return det


def _service(data: bytes, max_pixels: int, window: tuple[float, float] | None) -> np.ndarray:
    from pipeline.serve.app import decode_upload

    return decode_upload(data, max_pixels, window)


@pytest.mark.parametrize("case", list(CASES))
def test_engine_and_service_decode_alike(case: str, engine: object, tmp_path: Path) -> None:
    from pipeline.serve.decoding import INPUT_ERRORS
    from pipeline.serve.errors import ApiError

    name, make, limit, error = CASES[case]
    data = make()
    path = tmp_path / name
    path.write_bytes(data)
    service_limit = DEFAULT_MAX_PIXELS if limit is None else limit
    if error is None:
        by_path = engine.decode(path, max_pixels=limit).rgb  # type: ignore[attr-defined]
        by_bytes = engine.decode(data, max_pixels=limit).rgb  # type: ignore[attr-defined]
        served = _service(data, service_limit, WINDOW)
        assert by_path.dtype == np.uint8 and by_path.ndim == 3 and by_path.shape[2] == 3
        np.testing.assert_array_equal(by_path, by_bytes)
        np.testing.assert_array_equal(by_path, served)
        return
    for source in (path, data):
        with pytest.raises(ImageLoadError) as e:
            engine.decode(source, max_pixels=limit)  # type: ignore[attr-defined]
        assert e.value.kind == error, e.value.detail
    with pytest.raises(ApiError) as api:
        _service(data, service_limit, WINDOW)
    assert api.value.status == INPUT_ERRORS[error][0]  # the engine's kind maps to the service's status
    # the service refuses content that is none of JPEG, PNG or DICOM by policy, before any decoder runs
    assert api.value.code == ("unsupported_media_type" if error == "not_an_image" else error)


def test_known_pixels_through_both_paths(engine: object) -> None:
    """Not only equal to each other: right. Lossless PNG exact, EXIF turned upright, DICOM windowed by the card."""
    from pydicom import examples
    from pydicom.pixels import apply_modality_lut

    from pipeline.data.imaging import window_to_uint8

    np.testing.assert_array_equal(engine.decode(_png(_RGB)).rgb, _RGB)  # type: ignore[attr-defined]
    upright = engine.decode(_exif_rotated()).rgb  # type: ignore[attr-defined]
    np.testing.assert_array_equal(upright, _RGB)
    ct = examples.ct
    expected = window_to_uint8(apply_modality_lut(ct.pixel_array, ct), *WINDOW)
    np.testing.assert_array_equal(engine.decode(_dicom()).rgb[..., 0], expected)  # type: ignore[attr-defined]


def test_one_default_pixel_limit() -> None:
    """Batch inference used to have no limit (it read ``card['max_pixels']``, which export never writes)."""
    from pipeline.serve.settings import ServeSettings

    assert ServeSettings.model_fields["max_pixels"].default == DEFAULT_MAX_PIXELS == 40_000_000
    bomb = _png_claiming(8000, 8000)  # 64 MP: under Pillow's own bomb threshold (89 MP), over ours
    with pytest.raises(ImageLoadError, match="exceeds the limit of 40000000 pixels") as e:
        decode_bytes(bomb)
    assert e.value.kind == "image_too_large"
    assert decode_bytes(_jpeg(), max_pixels=24 * 40).rgb.shape == (24, 40, 3)  # the limit itself is allowed


def test_sniff_and_path_errors(tmp_path: Path) -> None:
    assert [sniff(_jpeg()), sniff(_png(_RGB)), sniff(_dicom()), sniff(b""), sniff(b"GIF89a" + b"\0" * 200)] == \
        ["jpeg", "png", "dicom", None, None]
    with pytest.raises(ImageLoadError) as e:
        decode_path(tmp_path / "absent.png")
    assert e.value.kind == "missing_image"
    with pytest.raises(ImageLoadError) as e:
        decode_path(tmp_path)  # a folder
    assert e.value.kind == "corrupt_image"
    with pytest.raises(ImageLoadError) as e:
        decode_bytes(b"")
    assert e.value.kind == "not_an_image"


def test_hostile_decoder_exceptions_become_load_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder raising something unexpected on hostile bytes is the input's fault: an ImageLoadError (which
    batch inference reports and skips), never an exception that stops the whole stream."""
    import pipeline.data.imaging as imaging

    def explode(*args: object, **kwargs: object) -> None:
        raise IndexError("list index out of range")

    monkeypatch.setattr(imaging, "load_dicom", explode)
    monkeypatch.setattr(imaging, "load_raster", explode)
    for data, kind in ((_dicom(), "corrupt_dicom"), (_jpeg(), "corrupt_image")):
        with pytest.raises(ImageLoadError) as e:
            decode_bytes(data)
        assert e.value.kind == kind and "index" not in e.value.detail
