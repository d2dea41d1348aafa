"""Decode images and DICOM into 8-bit RGB arrays, the one representation training and inference see.

:func:`decode_bytes` / :func:`decode_path` are the single entry used by the data stage, the inference engine, batch
inference and the HTTP service: the type is sniffed from the content (never the file name), the pixel limit is
checked from the headers before any pixel is decoded, EXIF orientation is applied, and every problem with the input
is an :class:`ImageLoadError` with a ``kind``. Torch-free on purpose: the serving image imports this module too.

Size: the one decoder on purpose (JPEG/PNG/DICOM by content, EXIF, windowing, pixel limits, spacing), so
that prepare, the engine and the service cannot drift apart.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
EXIF_ORIENTATION = 0x0112
DEFAULT_MAX_PIXELS = 40_000_000
"""Largest image (width x height, x frames for DICOM) decoded unless the caller says otherwise: the default of the
service's ``max_pixels`` setting, of batch inference and of the data stage. Above full-field mammography (about
4k x 5k = 20 MP); refuses decompression bombs long before memory runs out (40 MP of RGB is 120 MB)."""

log = logging.getLogger(__name__)


class ImageLoadError(Exception):
    """An image cannot be used; ``kind`` is one of the data-validation problem kinds."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class LoadedImage:
    """An 8-bit RGB image plus what had to be done to get it there."""

    rgb: np.ndarray  # (H, W, 3) uint8
    conversions: list[tuple[str, str]]  # (problem kind, detail) for every conversion applied
    encoded: bytes | None = None  # original bytes when they can be kept as they are (RGB JPEG/PNG)
    suffix: str = ".png"
    window: tuple[float, float] | None = None  # DICOM window (center, width) actually applied
    orientation: int = 1  # EXIF Orientation applied to reach upright pixels (1: none); see :func:`orient_boxes`
    pixel_spacing: float | None = None  # DICOM PixelSpacing in mm per pixel (None: not stated); see SpacedImage
    modality: str | None = None  # DICOM Modality (CT, MR, ...), None for other files: the card's trained modality

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


class SpacedImage(np.ndarray):
    """An RGB array that carries the pixel spacing (mm per pixel) its DICOM file stated.

    The spacing travels with the pixels through every path that passes decoded arrays on (batch inference, the
    service's micro-batcher, ``OnnxDetector.predict``) without changing their signatures, so the one
    pre-processing (:func:`pipeline.infer.processing.preprocess`) can bring the image to the training spacing.
    Slices keep it (a crop has the same spacing); a resized copy made with OpenCV is a plain array again.
    """

    pixel_spacing: float | None

    def __array_finalize__(self, obj: object) -> None:
        self.pixel_spacing = getattr(obj, "pixel_spacing", None)


def with_spacing(rgb: np.ndarray, spacing: float | None) -> np.ndarray:
    """``rgb`` as a :class:`SpacedImage` when ``spacing`` is known, else unchanged."""
    if spacing is None:
        return rgb
    out = rgb.view(SpacedImage)
    out.pixel_spacing = float(spacing)
    return out


def pixel_spacing_of(rgb: np.ndarray) -> float | None:
    """The spacing (mm per pixel) a decoded image carries, None when its file stated none."""
    return getattr(rgb, "pixel_spacing", None)


SPACING_RANGE = (1e-6, 1e6)
"""Plausible pixel spacings in mm (1 nm to 1 km per pixel): anything else in a header is a broken value, not a
scanner, and would reach the letterbox as 0 or infinity."""


def dicom_pixel_spacing(ds: object, notes: list[tuple[str, str]] | None = None) -> float | None:
    """One spacing in mm per pixel from ``PixelSpacing`` (else ``ImagerPixelSpacing``): the geometric mean of the
    row and column spacing (the area-preserving value; the letterbox keeps the aspect ratio, so an anisotropic
    pixel cannot be corrected by it). None when absent or not two positive numbers.

    Checked after the arithmetic: ``sqrt(1e200 x 1e200)`` overflows to infinity and ``sqrt(1e-200 x 1e-200)`` to
    0, so the product is never formed and the result must lie in :data:`SPACING_RANGE`; a value that does not is
    ignored and, with ``notes``, recorded (``implausible_value``)."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, tag, None)
        try:
            rows, cols = (float(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            continue
        if not (rows > 0 and cols > 0):  # NaN fails this too
            if notes is not None:
                notes.append(("implausible_value", f"{tag} {rows:g} x {cols:g} is not two positive numbers; ignored"))
            continue
        spacing = float(np.sqrt(rows) * np.sqrt(cols))
        if np.isfinite(spacing) and SPACING_RANGE[0] <= spacing <= SPACING_RANGE[1]:
            return spacing
        if notes is not None:
            notes.append(("implausible_value", f"{tag} {rows:g} x {cols:g} gives a spacing of {spacing:g} mm, outside "
                          f"[{SPACING_RANGE[0]:g}, {SPACING_RANGE[1]:g}]; ignored (the image is kept without one)"))
    return None


def is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return is_dicom_bytes(f.read(132))
    except OSError:
        return False


def _first(value: object) -> float:
    """WindowCenter/Width may be multi-valued; the first pair is the primary one by the standard."""
    if isinstance(value, list | tuple) or (hasattr(value, "__len__") and not isinstance(value, str | bytes)):
        value = list(value)[0]  # type: ignore[arg-type]
    return float(value)  # type: ignore[arg-type]


def window_to_uint8(values: np.ndarray, center: float, width: float, invert: bool = False) -> np.ndarray:
    """Linear window (DICOM PS3.3 C.11.2.1.2 without the -0.5 offsets) to 0..255."""
    lo = center - width / 2.0
    with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow saturates to 0 / 255, as it should
        scaled = (values.astype(np.float32) - lo) * (255.0 / max(width, 1e-6))
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return 255 - out if invert else out


def _usable_window(center: float, width: float) -> bool:
    """A window the arithmetic can use: finite centre, finite positive width, finite edges."""
    return bool(np.isfinite([center, width, center - width / 2.0, center + width / 2.0]).all() and width > 0)


def dicom_to_rgb(ds: object, window: tuple[float, float] | None,
                 notes: list[tuple[str, str]] | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Apply rescale (modality LUT), a window (given, else the file's, else min-max) and MONOCHROME1 inversion.

    Every number is checked after the arithmetic it feeds: rescaled values must be finite (a RescaleSlope of 1e308
    overflows; such a file is corrupt), a window from the file's tags that is not finite and positive is ignored
    (min-max instead, recorded in ``notes``)."""
    from pydicom.pixels import apply_modality_lut

    arr = ds.pixel_array  # type: ignore[attr-defined]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    if samples == 3:
        if arr.ndim != 3:
            raise ImageLoadError("corrupt_dicom", f"colour DICOM with unexpected pixel shape {arr.shape}")
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        rgb = arr if arr.dtype == np.uint8 else window_to_uint8(arr, float(arr.max()) / 2, float(arr.max()))
        return np.ascontiguousarray(rgb), (127.5, 255.0)
    if arr.ndim != 2:
        raise ImageLoadError("dicom_multiframe", f"multi-frame DICOM ({arr.shape[0]} frames) is not supported; "
                             "export single frames")
    with np.errstate(over="ignore", invalid="ignore"):
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if not np.isfinite(values).all():
        slope, intercept = getattr(ds, "RescaleSlope", 1), getattr(ds, "RescaleIntercept", 0)
        raise ImageLoadError("corrupt_dicom", "RescaleSlope/RescaleIntercept give pixel values that are not finite "
                             f"(slope {slope}, intercept {intercept})")
    if window is None:
        wc, ww = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
        try:
            tags = (_first(wc), _first(ww)) if wc is not None and ww is not None else None
        except (TypeError, ValueError, IndexError):
            tags = None
        if tags is not None and _usable_window(*tags):
            window = tags
        else:
            if tags is not None and notes is not None and not (np.isfinite(tags).all() and tags[1] <= 0):
                notes.append(("implausible_value", f"WindowCenter/WindowWidth {tags[0]:g}/{tags[1]:g} cannot be "
                              "used; the pixel range (min-max) is the window instead"))
            lo, hi = float(np.min(values)), float(np.max(values))
            window = ((lo + hi) / 2.0, max(hi - lo, 1.0))
            if not _usable_window(*window):
                raise ImageLoadError("corrupt_dicom", f"the pixel values span {lo:g}..{hi:g}: no finite window")
    gray = window_to_uint8(values, window[0], window[1], invert=photometric == "MONOCHROME1")
    return np.repeat(gray[:, :, None], 3, axis=2), (float(window[0]), float(window[1]))


def load_dicom(source: Path | bytes, window: tuple[float, float] | None = None) -> LoadedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fp)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise ImageLoadError("corrupt_dicom", f"cannot parse DICOM: {e}") from None
    return decode_dataset(ds, window)


def decode_dataset(ds: object, window: tuple[float, float] | None = None,
                   max_pixels: int | None = None) -> LoadedImage:
    """An already parsed DICOM dataset (a DICOMweb retrieval, :mod:`pipeline.pacs`) -> :class:`LoadedImage`, by
    the same rules as a file: pixel limit from the header (``max_pixels``, None: none of ours), then
    :func:`dicom_to_rgb`; every problem an :class:`ImageLoadError`."""
    if max_pixels is not None:
        try:
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)  # type: ignore[attr-defined]
            frames = int(ds.get("NumberOfFrames", 1) or 1)  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            raise ImageLoadError("corrupt_dicom", "Rows, Columns or NumberOfFrames is not a number") from None
        if rows * cols * max(frames, 1) > max_pixels:
            raise ImageLoadError("image_too_large", f"{cols}x{rows}x{frames} exceeds the limit of {max_pixels} "
                                 "pixels")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:  # type: ignore
        raise ImageLoadError("dicom_no_pixel_data", "the file has no Pixel Data element")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    compressed = bool(tsyntax is not None and tsyntax.is_compressed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            notes: list[tuple[str, str]] = []
            rgb, used = dicom_to_rgb(ds, window, notes)
    except ImageLoadError:
        raise
    except Exception as e:  # pydicom raises several types for missing decoders and short pixel data
        if compressed and ("plugin" in str(e).lower() or "decod" in str(e).lower()):
            raise ImageLoadError(
                "dicom_unsupported_compression",
                f"transfer syntax {tsyntax.name} needs a decoder that is not installed "
                f"(e.g. pylibjpeg or gdcm): {str(e).splitlines()[0]}",
            ) from None
        raise ImageLoadError("corrupt_dicom", f"pixel data cannot be read: {str(e).splitlines()[0]}") from None
    spacing = dicom_pixel_spacing(ds, notes)
    modality = str(getattr(ds, "Modality", "") or "").strip().upper() or None
    return LoadedImage(rgb=with_spacing(rgb, spacing), conversions=notes, window=used, pixel_spacing=spacing,
                       modality=modality)


def _complete_stream(data: bytes, fmt: str | None) -> bool:
    """True when a JPEG ends with its EOI marker or a PNG with its IEND chunk (not cut short)."""
    if fmt == "JPEG":
        return data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"
    return fmt == "PNG" and data[-12:-4] == b"\x00\x00\x00\x00IEND"


OPENCV_MAX_SIDE = 1_000_000
"""OpenCV's libpng refuses wider images ("Image width exceeds user limit", printed on stderr): those go to Pillow."""


def _fast_rgb(data: bytes, im: Image.Image) -> np.ndarray | None:
    """OpenCV decode of a complete 8-bit RGB JPEG/PNG straight into a numpy array, else None.

    Same pixels as Pillow (both libjpeg-turbo / libpng), without Pillow's extra copy into numpy: 0.73 vs 1.16 ms
    for a 640x480 BCCD JPEG on the 2-core machine. OpenCV is told to ignore EXIF orientation; the caller applies
    it with :func:`apply_orientation`, the same code as the Pillow path, so both paths give identical upright
    pixels. Only for files that end properly, so a truncated upload still goes through Pillow and gets its error.
    """
    if im.mode != "RGB" or not _complete_stream(data, im.format) or max(im.size) > OPENCV_MAX_SIDE:
        return None
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.shape[:2] != (im.height, im.width):
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def exif_orientation(im: Image.Image) -> int:
    """The EXIF Orientation (1..8) of an opened image, 1 when absent or invalid.

    Read through Pillow's ``getexif``, the one reader that knows every container an orientation can live in (and
    what ``ImageOps.exif_transpose`` and Ultralytics use): JPEG APP1, PNG ``eXIf`` before *or after* the image data
    (the latter only after the pixels are read, so a PNG without an early EXIF block is decoded here), ImageMagick's
    "Raw profile type exif" text chunk, TIFF tags, WebP EXIF, and XMP ``tiff:Orientation``.
    """
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block means "no orientation", as in every viewer
        return 1
    return value if 1 <= value <= 8 else 1


def _png_late_metadata(data: bytes) -> bool:
    """True when a PNG carries an EXIF or text chunk after its image data, where Pillow finds it only once the
    pixels are read (an ``eXIf`` after ``IDAT`` is legal, and some writers put it there). Walks the chunk headers
    only."""
    pos, seen_idat = 8, False
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            seen_idat = True
        elif seen_idat and kind in (b"eXIf", b"zTXt", b"tEXt", b"iTXt"):
            return True
        elif kind == b"IEND":
            return False
        pos += 12 + length
    return False


def file_orientation(im: Image.Image, data: bytes | None = None) -> int:
    """The orientation the file asks for (turns its stored pixels upright), from any container: see
    :func:`exif_orientation`. A PNG whose EXIF may come after the image data is read (``data``: its bytes) first."""
    if im.format == "PNG" and data is not None and "exif" not in im.info and _png_late_metadata(data):
        im.load()
    return exif_orientation(im)


def decoder_turns(im: Image.Image) -> bool:
    """True when Pillow's own decoder already returns this image upright (its TIFF reader applies the Orientation
    tag and reports the upright size at open), so the orientation must not be applied a second time."""
    return im.format == "TIFF"


def upright_size(im: Image.Image, data: bytes | None = None) -> tuple[int, int]:
    """(width, height) of the image upright, without decoding it where the container allows."""
    width, height = im.size
    if decoder_turns(im):
        return width, height
    return (height, width) if file_orientation(im, data) >= 5 else (width, height)


def apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Pixels as stored -> pixels upright, for an EXIF Orientation (what viewers, OpenCV and Ultralytics show)."""
    ops = {
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1],  # mirrored top-bottom
        5: lambda a: a.transpose(1, 0, 2),  # transposed
        6: lambda a: np.rot90(a, k=-1),  # stored rotated 90 CCW: turn 90 CW
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transverse
        8: lambda a: np.rot90(a, k=1),  # stored rotated 90 CW: turn 90 CCW
    }
    op = ops.get(orientation)
    return rgb if op is None else np.ascontiguousarray(op(rgb))


def orient_boxes(boxes: np.ndarray, orientation: int, stored_width: int, stored_height: int) -> np.ndarray:
    """xyxy boxes drawn on the stored pixels -> the same boxes on the upright pixels of :func:`apply_orientation`."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if orientation == 1 or not len(b):
        return b.copy()
    w, h = float(stored_width), float(stored_height)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    maps = {  # each: the upright (x, y) of a stored corner (x, y)
        2: lambda x, y: (w - x, y),
        3: lambda x, y: (w - x, h - y),
        4: lambda x, y: (x, h - y),
        5: lambda x, y: (y, x),
        6: lambda x, y: (h - y, x),
        7: lambda x, y: (h - y, w - x),
        8: lambda x, y: (y, w - x),
    }
    f = maps[orientation]
    ax, ay = f(x1, y1)
    bx, by = f(x2, y2)
    return np.stack([np.minimum(ax, bx), np.minimum(ay, by), np.maximum(ax, bx), np.maximum(ay, by)], axis=1)


def load_raster(source: Path | bytes, keep_encoded: bool = True, max_pixels: int | None = None) -> LoadedImage:
    """Decode JPEG/PNG/...; RGBA and grayscale become RGB and the conversion is reported; EXIF orientation is
    applied, so the pixels are upright (as viewers, OpenCV and Ultralytics show them) on every path.

    ``keep_encoded=False`` (inference: only the pixels matter) decodes complete RGB JPEG/PNG files with OpenCV,
    the faster path; the data stage keeps Pillow's stricter decoder for its validation. A file that needed
    turning is never kept encoded: the data stage stores it re-encoded upright (PNG, lossless).
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    fmt = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageLoadError(
                    "image_too_large", f"{im.width}x{im.height} exceeds the limit of {max_pixels} pixels"
                )
            orientation = file_orientation(im, data)  # what turns the stored pixels upright
            if not keep_encoded and im.format in ("JPEG", "PNG") and (rgb := _fast_rgb(data, im)) is not None:
                return LoadedImage(rgb=apply_orientation(rgb, orientation), conversions=[], encoded=None,
                                   suffix=".png", orientation=orientation)
            im.load()
            pending = 1 if decoder_turns(im) else orientation  # what is left for us to apply
    except ImageLoadError:
        raise
    except (UnidentifiedImageError, ImportError):
        # ImportError: Ultralytics patches PIL.Image.open to pull in a HEIF plugin on unidentified files
        raise ImageLoadError("not_an_image", "content is not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError("image_too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError("corrupt_image", f"cannot decode {fmt or 'image'}: {e}") from None
    conversions: list[tuple[str, str]] = []
    mode = im.mode
    if mode == "RGB":
        rgb = np.asarray(im)
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        conversions.append(("rgba_converted", f"{mode} converted to RGB (alpha dropped)"))
        rgb = np.asarray(im.convert("RGBA").convert("RGB"))
    elif mode in ("L", "1", "I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = np.clip((arr - lo) * (255.0 / max(hi - lo, 1e-9)), 0, 255).round().astype(np.uint8)
        conversions.append(("grayscale_converted", f"{mode} converted to RGB"))
        rgb = np.repeat(arr[:, :, None], 3, axis=2)
    else:
        conversions.append(("grayscale_converted" if mode.startswith("L") else "rgba_converted",
                            f"{mode} converted to RGB"))
        rgb = np.asarray(im.convert("RGB"))
    if orientation != 1:
        stored_w, stored_h = int(rgb.shape[1]), int(rgb.shape[0])
        if pending == 1 and orientation >= 5:  # turned by the decoder: the stored frame is the transposed one
            stored_w, stored_h = stored_h, stored_w
        rgb = apply_orientation(rgb, pending)
        conversions.append(("exif_orientation", f"EXIF Orientation={orientation}: {stored_w}x{stored_h} stored pixels "
                            f"turned upright ({rgb.shape[1]}x{rgb.shape[0]}) and re-encoded without the tag"))
    keep = keep_encoded and not conversions and fmt in ("JPEG", "PNG")
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    return LoadedImage(
        rgb=np.ascontiguousarray(rgb), conversions=conversions, encoded=data if keep else None,
        suffix=suffix if keep else ".png", orientation=orientation,
    )


def sniff(data: bytes) -> str | None:
    """The file type from its first bytes: 'jpeg', 'png', 'dicom' (Part 10 preamble) or None (anything else)."""
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
    except Exception:  # noqa: BLE001 - any parse failure of untrusted bytes is a corrupt file
        raise ImageLoadError("corrupt_dicom", "cannot parse the DICOM header") from None
    if rows * cols * max(frames, 1) > max_pixels:
        raise ImageLoadError("image_too_large", f"{cols}x{rows}x{frames} exceeds the limit of {max_pixels} pixels")


def decode_bytes(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 window: tuple[float, float] | None = None, keep_encoded: bool = False,
                 kind: str | None = None) -> LoadedImage:
    """Bytes -> :class:`LoadedImage`, by content: DICOM (Part 10 preamble) or any raster Pillow reads.

    ``max_pixels`` (None: no limit of ours) is checked from the headers before decoding. ``window``: the DICOM
    window, None for the file's own. ``keep_encoded``: see :func:`load_raster`. ``kind='dicom'`` parses the bytes
    as DICOM whatever they start with (the data stage's rule for files named .dcm). Whatever a decoder raises on
    hostile bytes becomes an :class:`ImageLoadError`, so one bad input never stops a batch.
    """
    kind = kind or sniff(data)
    try:
        if kind == "dicom":
            if max_pixels is not None:
                check_dicom_size(data, max_pixels)
            return load_dicom(data, window)
        return load_raster(data, keep_encoded=keep_encoded, max_pixels=max_pixels)
    except ImageLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders may raise anything on hostile bytes: still the input's fault
        log.warning("decoder raised %s on %s data", type(e).__name__, kind or "image")
        raise ImageLoadError("corrupt_dicom" if kind == "dicom" else "corrupt_image",
                             f"the {kind.upper() if kind else 'image'} file cannot be decoded") from None


def decode_path(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                window: tuple[float, float] | None = None, keep_encoded: bool = False,
                kind: str | None = None) -> LoadedImage:
    """A file -> :class:`LoadedImage`: :func:`decode_bytes` of its content; its name plays no part."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageLoadError("missing_image", "file does not exist") from None
    except OSError as e:
        raise ImageLoadError("corrupt_image", f"cannot read file: {e}") from None
    return decode_bytes(data, max_pixels=max_pixels, window=window, keep_encoded=keep_encoded, kind=kind)


def load_any(path: Path, window: tuple[float, float] | None = None) -> LoadedImage:
    """The data stage's decode: :func:`decode_path` keeping JPEG/PNG bytes as they are, plus one dataset rule:
    a file named .dcm/.dicom/.ima must be DICOM (a JPEG there is a mislabelled file, quarantined as corrupt_dicom)."""
    kind = "dicom" if Path(path).suffix.lower() in DICOM_SUFFIXES else None
    return decode_path(path, window=window, keep_encoded=True, kind=kind)


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
