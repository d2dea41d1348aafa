"""Detections in original-image pixels, and how an original image maps into the model input (the letterbox)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LetterboxMeta:
    """How an original image maps into the model input: ``model = orig * scale + (pad_x, pad_y)``."""

    scale: float
    pad_x: float
    pad_y: float
    orig_w: int
    orig_h: int


@dataclass
class Detections:
    """Detections for one image in original-image pixels; ``labels`` are 0-based class indices."""

    boxes: np.ndarray  # (N, 4) xyxy float
    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,) int

    def __len__(self) -> int:
        return len(self.scores)
