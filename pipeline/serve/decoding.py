"""Uploaded bytes -> RGB uint8 through the one decoder (:func:`pipeline.data.imaging.decode_bytes`: by content,
pixel limit from the headers, EXIF), and every problem with the input -> an HTTP 4xx.

What is HTTP lives here: the service accepts JPEG, PNG and DICOM only (told apart by their bytes, never by the file
name or content type), and each decoder problem kind has its status and public message.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.imaging import ImageLoadError, check_dicom_size, decode_bytes, sniff
from pipeline.serve.errors import ApiError

__all__ = ["INPUT_ERRORS", "check_dicom_size", "decode_upload", "input_error", "sniff"]

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


def input_error(e: ImageLoadError) -> ApiError:
    """The 4xx for a decoder problem: the kind is the code; status and public message from INPUT_ERRORS."""
    status, message = INPUT_ERRORS.get(e.kind, (422, None))
    return ApiError(status, e.kind, message or e.detail)


def decode_upload(data: bytes, max_pixels: int, dicom_window: tuple[float, float] | None) -> np.ndarray:
    """Bytes -> RGB uint8, by content. Raises ApiError (4xx) for anything wrong with the input."""
    if not data:
        raise ApiError(400, "empty_file", "the uploaded file is empty")
    if sniff(data) is None:
        raise ApiError(415, "unsupported_media_type",
                       "content is not a JPEG, PNG or DICOM (Part 10) file; the type is detected from the bytes, "
                       "not from the file name or content type")
    try:
        return decode_bytes(data, max_pixels=max_pixels, window=dicom_window).rgb
    except ImageLoadError as e:
        raise input_error(e) from None
