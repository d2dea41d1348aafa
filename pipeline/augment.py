"""Photometric jitter for robust training: stain jitter (microscopy) and window / gamma jitter (radiology).

A detector trained at one site meets another scanner, microscope or stain batch. These jitters draw a new "site"
per training image so the model does not learn one site's colours or contrast:

- **stain** (``train.augment.stain``): H&E(+DAB) stain jitter in optical-density space (Ruifrok & Johnston's colour
  deconvolution; Tellez et al. 2018, "Whole-slide mitosis detection in H&E breast histology using PHH3 as a
  reference to train distilled stain-invariant convolutional networks"): each stain's optical density is scaled by
  ``U(1 - s, 1 + s)`` and shifted by ``U(-s/5, s/5)``, then mapped back to RGB. White (no stain) stays near white.
- **window** (``train.augment.window``): the image is already windowed to 8 bits; re-window it with the level
  moved by ``U(-w, w) * 255`` and the width scaled by ``U(1 - w, 1 + w)``, clipped to 0..255 (a different CT
  window preset or X-ray exposure / processing).
- **gamma** (``train.augment.gamma``): ``255 * (x / 255) ** g`` with ``g = exp(U(-log(1 + gamma), log(1 + gamma)))``
  (detector response / display LUT differences).

All take and return uint8 RGB ``(H, W, 3)`` arrays and draw from a ``numpy.random.Generator`` the caller owns (so
each training framework seeds it from its own, already-seeded RNG). Boxes are untouched: these are photometric.
One implementation serves both families (YOLO's trainer and Faster R-CNN's torchvision transforms) and the shifted
site copies of :mod:`pipeline.data.sites` (:func:`hed_adjust` is its stain maths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density RGB, as in skimage.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# Optical density of each 8-bit value (0 counts as 1: the log of 0 is undefined); a table is exact and avoids a log.
_OD = -np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)


def hed_adjust(rgb: np.ndarray, scale: np.ndarray, shift: np.ndarray, brightness: float = 1.0,
               gamma: float = 1.0) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` -> the same image with stain optical densities ``hed * scale + shift`` (per stain,
    order H, E, DAB), then ``brightness`` (a multiplier) and display ``gamma`` (``out = 255 * lin ** (1 / gamma)``).

    ``scale = 1, shift = 0, brightness = 1, gamma = 1`` returns the input up to rounding (exactly for most pixels).
    """
    od = _OD[rgb]  # optical density per channel
    hed = od.reshape(-1, 3) @ HED_FROM_RGB
    hed = hed * np.asarray(scale, dtype=np.float64) + np.asarray(shift, dtype=np.float64)
    od2 = np.maximum(hed @ RGB_FROM_HED, 0.0)
    lin = np.exp(-od2)
    if brightness != 1.0:  # skipping x * 1 and x ** 1 changes no bit and saves a third of the time
        lin *= brightness
    lin = np.clip(lin, 0.0, 1.0, out=lin)
    out = 255.0 * (lin if gamma == 1.0 else lin ** (1.0 / gamma))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(rgb.shape)


def draw_stain(strength: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-stain OD scale in ``[1 - strength, 1 + strength]`` and shift in ``[-strength / 5, strength / 5]``."""
    scale = rng.uniform(1 - strength, 1 + strength, size=3)
    shift = rng.uniform(-strength / 5, strength / 5, size=3)
    return scale, shift


def intensity_lut(level_shift: float, width_scale: float, gamma: float) -> np.ndarray:
    """A 256-entry uint8 table: re-window (level moved by ``level_shift`` grey values, width times ``width_scale``),
    then ``255 * (x / 255) ** gamma``. Monotone non-decreasing for any ``width_scale > 0`` and ``gamma > 0``."""
    x = np.arange(256, dtype=np.float64)
    windowed = np.clip((x - 127.5 - level_shift) / width_scale + 127.5, 0.0, 255.0)
    out = 255.0 * (windowed / 255.0) ** gamma
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PhotometricJitter:
    """``stain``, ``window`` and ``gamma`` strengths in ``[0, 1)`` (0: off); see the module docstring."""

    stain: float = 0.0
    window: float = 0.0
    gamma: float = 0.0

    def __post_init__(self) -> None:
        for name in ("stain", "window", "gamma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise ConfigError(f"augment {name} must be in [0, 1), got {value}")

    @classmethod
    def from_params(cls, augment: Any) -> PhotometricJitter:
        """From ``train.augment`` (the pydantic section or its JSON dict); absent keys are off."""
        get = augment.get if isinstance(augment, dict) else lambda k, d: getattr(augment, k, d)
        return cls(stain=float(get("stain", 0.0)), window=float(get("window", 0.0)), gamma=float(get("gamma", 0.0)))

    @property
    def active(self) -> bool:
        return bool(self.stain or self.window or self.gamma)

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A jittered copy of a uint8 RGB ``(H, W, 3)`` image (the input itself when all strengths are 0).

        Draw order is fixed (stain scale and shift, then level, width, gamma), and only enabled jitters draw, so a
        seed gives the same stain draw whatever ``window`` and ``gamma`` are.
        """
        if not self.active:
            return rgb
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) image, got {rgb.dtype} {rgb.shape}")
        out = hed_adjust(rgb, *draw_stain(self.stain, rng)) if self.stain else rgb
        if self.window or self.gamma:
            level = rng.uniform(-self.window, self.window) * 255.0 if self.window else 0.0
            width = rng.uniform(1 - self.window, 1 + self.window) if self.window else 1.0
            g = math.exp(rng.uniform(-math.log1p(self.gamma), math.log1p(self.gamma))) if self.gamma else 1.0
            out = intensity_lut(level, width, g)[out]
        return out
