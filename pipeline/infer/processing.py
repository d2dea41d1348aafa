"""The one pre-processing implementation and the post-processing helpers (NMS, un-letterbox), shared by evaluation,
batch inference and the service; each family decodes its own graph output with them
(``pipeline/families/*/postprocess.py``).

numpy + OpenCV only (no torch), so the serving image can import it. The letterbox reproduces Ultralytics'
``LetterBox`` (centre padding with grey 114, ``cv2.INTER_LINEAR``), the transform YOLO models are trained with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.contracts.detections import Detections, LetterboxMeta
from pipeline.data.imaging import pixel_spacing_of

__all__ = ["Detections", "InputScaling", "LetterboxMeta", "letterbox", "nms", "preprocess", "rect_shape", "to_tensor",
           "unletterbox"]

PAD_VALUE = 114
MIN_FACTOR, MAX_FACTOR = 0.25, 4.0
"""Bounds of the letterbox size factor (x imgsz) that site adaptation may ask for: below, objects vanish; above,
one image costs 16x the compute of the training size."""
SPACING_TOLERANCE = 0.01
"""A physical factor within 1 % of 1 is 1: the same site, letterboxed exactly as in training."""


def rect_shape(h: int, w: int, size: int, stride: int) -> tuple[int, int]:
    """The smallest stride-multiple (H, W) holding the image scaled so its long side is ``size``.

    Ultralytics' ``LetterBox(auto=True)`` (what its predictor uses for dynamic-shape models): a 640x480 image at
    416 becomes 416x320 instead of 416x416, 23 % fewer pixels for the same boxes. A ``size`` that is not a stride
    multiple (an adapted card's ``imgsz x factor``) is padded up to the next multiple.
    """
    new_h, new_w = _resized(h, w, size)
    cap = -(-size // stride) * stride
    return (min(cap, -(-new_h // stride) * stride), min(cap, -(-new_w // stride) * stride))


def _resized(h: int, w: int, size: int) -> tuple[int, int]:
    """(H, W) of an image scaled so its long side is ``size``; never 0 (a 1 x 5000 image keeps its one row: rounding
    it away crashed the letterbox for every thin image that prepare accepts)."""
    scale = min(size / h, size / w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def letterbox(rgb: np.ndarray, size: int, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, LetterboxMeta]:
    """Resize so the image fits ``size`` x ``size`` keeping the aspect ratio, then pad (centred, grey 114) to
    ``shape`` = (H, W), by default ``size`` x ``size``. Returns HWC uint8 and the mapping back."""
    h, w = rgb.shape[:2]
    out_h, out_w = shape or (size, size)
    scale = min(size / h, size / w)
    new_h, new_w = _resized(h, w, size)
    if new_w > out_w or new_h > out_h:
        raise ValueError(f"letterbox target {out_h}x{out_w} is smaller than the resized image {new_h}x{new_w}")
    if (new_w, new_h) != (w, h):
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    out = cv2.copyMakeBorder(rgb, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return out, LetterboxMeta(scale=scale, pad_x=float(left), pad_y=float(top), orig_w=w, orig_h=h)


def to_tensor(batch_hwc: list[np.ndarray], dtype: type = np.float32,
              buffers: dict[tuple, np.ndarray] | None = None) -> np.ndarray:
    """HWC uint8 RGB images of one size -> NCHW in [0, 1] (the YOLO input contract).

    ``buffers``: a per-thread cache of output arrays by shape, for callers that consume the tensor before the next
    call (the engine); reusing the memory saves the page faults of a fresh multi-megabyte array per image.
    """
    h, w = batch_hwc[0].shape[:2]
    key = (len(batch_hwc), h, w, np.dtype(dtype).str)
    out = buffers.get(key) if buffers is not None else None
    if out is None:
        out = np.empty((len(batch_hwc), 3, h, w), dtype=dtype)
        if buffers is not None:
            if len(buffers) >= 8:
                buffers.clear()
            buffers[key] = out
    for i, im in enumerate(batch_hwc):  # cv2.split + plane copies: 3x faster than stack/transpose/astype here
        for c, plane in enumerate(cv2.split(im)):
            out[i, c] = plane
    out *= dtype(1.0 / 255.0)
    return out


def _positive(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class InputScaling:
    """How large an image is letterboxed: ``imgsz x factor`` instead of ``imgsz`` (site adaptation, see
    ``pipeline/adapt.py``). Resizing a whole image changes nothing the model sees (the letterbox brings every image
    to one size); what changes object sizes in model pixels is the letterbox target, so that is the one knob.

    ``factor = scale x physical``. ``scale``: object-scale calibration (``detflow adapt``). ``physical``: the
    image's field of view over the training one, ``(spacing x long side) / (train_spacing x train_long_side)``, so
    an object of a given size in mm (or um) covers as many model pixels as in training; the spacing is the image's
    own (DICOM ``PixelSpacing``, carried by :class:`pipeline.data.imaging.SpacedImage`), else ``pixel_size`` (the
    adapted card's, for microscopy with a known pixel size); 1 when either side's spacing is unknown. Boxes map back
    to the original pixels through :class:`LetterboxMeta` as always.
    """

    scale: float = 1.0
    train_spacing: float | None = None
    train_long_side: float | None = None
    pixel_size: float | None = None

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> InputScaling:
        """The scaling a model card asks for; ValueError on a malformed value. A card without an ``adaptation``
        block and without a training spacing gives the identity (every existing card)."""
        inp = card.get("input") or {}
        spacing = inp.get("pixel_spacing") or {}
        adaptation = card.get("adaptation") or {}
        if not isinstance(spacing, dict) or not isinstance(adaptation, dict):
            raise ValueError("input.pixel_spacing and adaptation must be objects")
        train_spacing = _positive(adaptation.get("train_pixel_size") or spacing.get("value"), "training pixel spacing")
        long_side = _positive((card.get("training_data") or {}).get("image_long_side_px"), "image_long_side_px")
        scale = _positive(adaptation.get("input_scale", 1.0), "adaptation.input_scale")
        out = cls(scale=scale or 1.0, train_spacing=train_spacing, train_long_side=long_side,
                  pixel_size=_positive(adaptation.get("pixel_size"), "adaptation.pixel_size"))
        if not MIN_FACTOR <= out.scale <= MAX_FACTOR:
            raise ValueError(f"adaptation.input_scale {out.scale} is outside [{MIN_FACTOR}, {MAX_FACTOR}]")
        return out

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and (self.train_spacing is None or self.train_long_side is None)

    def physical(self, h: int, w: int, spacing: float | None = None) -> float:
        """The field-of-view factor for one image (1 when a spacing is unknown or within 1 % of training)."""
        spacing = spacing if spacing is not None else self.pixel_size
        if spacing is None or self.train_spacing is None or self.train_long_side is None:
            return 1.0
        f = (spacing * max(h, w)) / (self.train_spacing * self.train_long_side)
        return 1.0 if abs(f - 1.0) <= SPACING_TOLERANCE else f

    def factor(self, h: int, w: int, spacing: float | None = None) -> float:
        """``imgsz`` multiplier for one image, clipped to [MIN_FACTOR, MAX_FACTOR]."""
        return min(max(self.scale * self.physical(h, w, spacing), MIN_FACTOR), MAX_FACTOR)


def target_size(im: np.ndarray, size: int, scaling: InputScaling | None, fixed: bool, stride: int = 0) -> int:
    """The letterbox target (long side, model pixels) of one image: ``size`` x its factor.

    ``stride`` > 0 (a dynamic-shape model): the target is the nearest multiple of the stride (at least one), so the
    long side fills the canvas exactly, as it does at ``imgsz`` (a stride multiple) in training. A target between
    two multiples would pad the long side with a grey border the model never saw beside an image in training, and
    a grey border changes what it finds at the image's edge: on another lab's blood smears, cells cut by the image
    edge were found 74 % of the time with the image edge at the canvas edge and 24-30 % with a 16-32 px grey border
    beside it, at the same object scale; the pad's value does not matter, only that the border is not image
    content (``bench/letterbox_border.py``). The short side of a non-square image is padded to its stride
    multiple, as the training letterbox pads it.

    ``fixed`` (a square graph input of ``size``, Faster R-CNN): the image is letterboxed smaller and padded back to
    ``size``, so factors above 1 are capped at 1 (magnifying would need tiling, which detflow does not do).
    """
    spacing = pixel_spacing_of(im)
    if scaling is None or scaling.identity and spacing is None:
        return size
    f = scaling.factor(im.shape[0], im.shape[1], spacing)
    if stride:
        return max(int(math.floor(size * f / stride + 0.5)), 1) * stride
    out = max(int(round(size * f)), 8)
    return min(out, size) if fixed else out


def shape_groups(images: list[np.ndarray], size: int, stride: int, scaling: InputScaling | None = None
                 ) -> list[list[int]]:
    """Indices of ``images`` grouped by their own letterbox canvas (first appearance first), for a dynamic-shape
    model (``stride`` > 0): each group is one model call, so no image is padded beyond its own canvas to match a
    larger batch-mate (that border would change what the model finds at its edges, see :func:`target_size`, and
    an image's detections would depend on what it was batched with). One group for fixed-shape models."""
    if not stride:
        return [list(range(len(images)))]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        shape = rect_shape(im.shape[0], im.shape[1], target_size(im, size, scaling, fixed=False, stride=stride),
                           stride)
        groups.setdefault(shape, []).append(i)
    return list(groups.values())


def preprocess(images: list[np.ndarray], size: int, dtype: type = np.float32, stride: int = 0,
               buffers: dict[tuple, np.ndarray] | None = None,
               scaling: InputScaling | None = None) -> tuple[np.ndarray, list[LetterboxMeta]]:
    """Letterbox a batch into one NCHW tensor.

    ``stride`` 0: every image padded to ``size`` x ``size`` (fixed-shape models: Faster R-CNN). ``stride`` > 0
    (dynamic-shape YOLO): minimal padding, to the smallest stride multiple that holds every image of the batch.
    ``buffers``: see :func:`to_tensor` (the returned tensor is then overwritten by the next call). ``scaling``: the
    card's site adaptation (:class:`InputScaling`); each image is letterboxed to its own target inside that shape.
    """
    targets = [target_size(im, size, scaling, fixed=not stride, stride=stride) for im in images]
    shape = (size, size)
    if stride:
        shapes = [rect_shape(im.shape[0], im.shape[1], t, stride) for im, t in zip(images, targets, strict=True)]
        shape = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    boxed = [letterbox(im, t, shape) for im, t in zip(images, targets, strict=True)]
    return to_tensor([b for b, _ in boxed], dtype, buffers), [m for _, m in boxed]


def unletterbox(boxes: np.ndarray, meta: LetterboxMeta) -> np.ndarray:
    """Model-input xyxy -> original-image xyxy, clipped to the image."""
    out = boxes.astype(np.float64, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] - meta.pad_x) / meta.scale
    out[:, [1, 3]] = (out[:, [1, 3]] - meta.pad_y) / meta.scale
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, meta.orig_w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, meta.orig_h)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS, vectorised per step; returns kept indices in descending score order.

    Hand-written because the serving image has neither torch nor torchvision; matches torchvision.ops.nms.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        rest = order[1:]
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)
