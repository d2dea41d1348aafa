"""Uploaded bytes -> RGB uint8, by content (magic bytes), never by file name or content type.

Two layers. The first (:func:`sniff`, :func:`check_dicom_size`) is imaging, not HTTP: it is meant to move into
``pipeline.data.imaging`` as one ``decode_bytes`` used by prepare, engine, batch inference and the service.
The second (:func:`decode_upload`, :func:`input_error`) maps every problem with the input to an HTTP 4xx.
The pixel decoding itself is ``pipeline.data.imaging``'s (``load_raster``, ``load_dicom``).
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np

from pipeline.data.imaging import ImageLoadError, is_dicom_bytes, load_dicom, load_raster
from pipeline.serve.errors import ApiError

log = logging.getLogger("pipeline.serve")

# ImageLoadError kinds -> (HTTP status, public message or None to use the decoder's detail)
INPUT_ERRORS: dict[str, tuple[int, str | None]] = {
    "not_an_image": (415, "content is not a JPEG, PNG or DICOM image"),
    "image_too_large": (413, None),
    "corrupt_image": (422, None),
    "corrupt_dicom": (422, "the DICOM file cannot be parsed or its pixel data cannot be read"),
    "dicom_no_pixel_data": (422, "the DICOM file has no Pixel Data element"),
    "dicom_multiframe": (422, None),
    "dicom_unsupported_compression": (422, None),
}


# ---------------------------------------------------------------------------------------------- imaging


def sniff(data: bytes) -> str | None:
    """The file type from its first bytes: 'jpeg', 'png', 'dicom' (Part 10 preamble) or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if is_dicom_bytes(data[:132]):
        return "dicom"
    return None


def check_dicom_size(data: bytes, max_pixels: int) -> None:
    """Rows x Columns x frames from the header, before any pixel decoding (compressed data can expand a lot)."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - any parse failure of untrusted bytes is the client's corrupt file
        raise ImageLoadError("corrupt_dicom", "cannot parse the DICOM header") from None
    if rows * cols * max(frames, 1) > max_pixels:
        raise ImageLoadError("image_too_large", f"{cols}x{rows}x{frames} exceeds the limit of {max_pixels} pixels")


# ---------------------------------------------------------------------------------------------- HTTP mapping


def input_error(e: ImageLoadError) -> ApiError:
    """The 4xx for a decoder problem: the kind is the code; status and public message from INPUT_ERRORS."""
    status, message = INPUT_ERRORS.get(e.kind, (422, None))
    return ApiError(status, e.kind, message or e.detail)


def decode_upload(data: bytes, max_pixels: int, dicom_window: tuple[float, float] | None) -> np.ndarray:
    """Bytes -> RGB uint8, by content. Raises ApiError (4xx) for anything wrong with the input."""
    if not data:
        raise ApiError(400, "empty_file", "the uploaded file is empty")
    kind = sniff(data)
    if kind is None:
        raise ApiError(415, "unsupported_media_type",
                       "content is not a JPEG, PNG or DICOM (Part 10) file; the type is detected from the bytes, "
                       "not from the file name or content type")
    try:
        if kind == "dicom":
            check_dicom_size(data, max_pixels)
            return load_dicom(data, dicom_window).rgb
        return load_raster(data, keep_encoded=False, max_pixels=max_pixels).rgb
    except ImageLoadError as e:
        raise input_error(e) from None
    except Exception as e:  # noqa: BLE001 - decoders may raise anything on hostile bytes: still the input's fault
        log.warning("decoder raised %s on a %s upload", type(e).__name__, kind)
        raise ApiError(422, "corrupt_dicom" if kind == "dicom" else "corrupt_image",
                       f"the {kind.upper()} file cannot be decoded") from None
