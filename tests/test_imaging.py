"""The inference decode path (OpenCV for complete RGB JPEG/PNG) gives Pillow's pixels and Pillow's errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.imaging import ImageLoadError, load_raster


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(h: int = 61, w: int = 83, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise, so JPEG coefficients are non-trivial and rounding differences would show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=2)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _pillow_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("fmt,kw", [("JPEG", {"quality": 90}), ("JPEG", {"quality": 75, "progressive": True}),
                                    ("JPEG", {"quality": 95, "subsampling": 0}), ("PNG", {})])
def test_fast_decode_equals_pillow(fmt: str, kw: dict) -> None:
    data = _encode(_photo(), fmt, **kw)
    fast = load_raster(data, keep_encoded=False)
    strict = load_raster(data, keep_encoded=True)
    assert fast.rgb.dtype == np.uint8 and fast.rgb.shape == (61, 83, 3) and fast.rgb.flags.c_contiguous
    np.testing.assert_array_equal(fast.rgb, strict.rgb)
    np.testing.assert_array_equal(fast.rgb, _pillow_pixels(data))
    assert fast.conversions == [] and fast.encoded is None


def test_fast_decode_ignores_exif_orientation_like_pillow() -> None:
    """OpenCV rotates by EXIF Orientation unless told not to; boxes are in stored-pixel coordinates, so it must not."""
    arr = _photo(40, 90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _encode(arr, "JPEG", quality=90, exif=exif.tobytes())
    fast = load_raster(data, keep_encoded=False)
    assert fast.rgb.shape == (40, 90, 3)
    np.testing.assert_array_equal(fast.rgb, _pillow_pixels(data))


def test_non_rgb_and_16_bit_files_keep_pillows_conversions() -> None:
    grey = _encode(_photo()[:, :, 0], "PNG")
    loaded = load_raster(grey, keep_encoded=False)
    assert [k for k, _ in loaded.conversions] == ["grayscale_converted"]
    np.testing.assert_array_equal(loaded.rgb, load_raster(grey, keep_encoded=True).rgb)
    rgba = _encode(np.dstack([_photo(), np.full((61, 83), 128, np.uint8)]), "PNG")
    loaded = load_raster(rgba, keep_encoded=False)
    assert [k for k, _ in loaded.conversions] == ["rgba_converted"] and loaded.rgb.shape == (61, 83, 3)


@pytest.mark.parametrize("fmt,cut", [("JPEG", 400), ("JPEG", -2), ("PNG", 300), ("PNG", -200)])
def test_truncated_files_still_fail_on_the_fast_path(fmt: str, cut: int) -> None:
    """A cut-short file is not handed to OpenCV (which would fill the rest with grey): Pillow reports it."""
    data = _encode(_photo(120, 160), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    short = data[:cut]  # the first `cut` bytes, or all but the last -cut (a JPEG without its EOI marker)
    with pytest.raises(ImageLoadError) as err:
        load_raster(short, keep_encoded=False)
    assert err.value.kind == "corrupt_image"


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = _encode(_photo(), "JPEG", quality=90)
    with pytest.raises(ImageLoadError) as err:
        load_raster(data, keep_encoded=False, max_pixels=61 * 83 - 1)
    assert err.value.kind == "image_too_large"
