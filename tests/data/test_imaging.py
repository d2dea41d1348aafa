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


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_both_decode_paths_apply_exif_orientation(orientation: int, fmt: str) -> None:
    """Images are upright everywhere (prepare stores them upright; infer/serve decode them upright), as viewers,
    OpenCV and Ultralytics show them: both paths equal Pillow's ``ImageOps.exif_transpose``. (Before: the
    decoders ignored EXIF, so a phone photo was detected on sideways pixels.)"""
    from PIL import ImageOps

    arr = _photo(40, 90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(arr, fmt, exif=exif.tobytes(), **({"quality": 90} if fmt == "JPEG" else {}))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    fast, strict = load_raster(data, keep_encoded=False), load_raster(data, keep_encoded=True)
    assert fast.rgb.shape == upright.shape == ((90, 40, 3) if orientation >= 5 else (40, 90, 3))
    np.testing.assert_array_equal(fast.rgb, upright)
    np.testing.assert_array_equal(strict.rgb, upright)
    assert fast.orientation == strict.orientation == orientation
    # the data stage re-encodes a turned image (it must not keep bytes whose stored frame differs)
    assert (strict.encoded is None) == (orientation != 1)
    assert [k for k, _ in strict.conversions] == ([] if orientation == 1 else ["exif_orientation"])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_boxes_follows_the_pixels(orientation: int) -> None:
    """A box drawn around a bright block on the stored pixels lands on the block in the upright pixels."""
    from pipeline.data.imaging import apply_orientation, orient_boxes

    stored = np.zeros((40, 90, 3), np.uint8)
    stored[5:15, 20:50] = 255
    up = apply_orientation(stored, orientation)
    ys, xs = np.nonzero(up[:, :, 0])
    box = orient_boxes(np.array([[20, 5, 50, 15]]), orientation, 90, 40)[0]
    assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


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
