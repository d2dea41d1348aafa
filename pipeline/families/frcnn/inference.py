"""Load a Faster R-CNN checkpoint for inference: rebuild the model from the header, load the weights. Needs no
training code and no pickled classes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import DetflowError
from pipeline.families.base import CheckpointMeta
from pipeline.families.frcnn.model import build_frcnn

#: torchvision's default is 0.05; evaluators need the low-confidence detections too (mAP), as in validation.
SCORE_THRESH = 0.001


@dataclass
class LoadedFrcnn:
    model: nn.Module
    stride: int = 0  # fixed square input
    device: str = "cpu"

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> list[list[np.ndarray]]:
        """``[boxes, labels, scores]`` per image, the outputs of the one-image ONNX graph (run batched here)."""
        outs = self.model(list(torch.from_numpy(batch).to(self.device)))
        return [[o["boxes"].cpu().numpy(), o["labels"].cpu().numpy(), o["scores"].cpu().numpy()] for o in outs]


def load_model(ckpt: Any, meta: CheckpointMeta, device: str | torch.device = "cpu",
               score_thresh: float = SCORE_THRESH) -> nn.Module:
    """The eval-mode model of a loaded checkpoint dict (``ckpt["model"]`` is its state dict)."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise DetflowError("a Faster R-CNN checkpoint holds its weights under 'model' (a state dict)")
    model = build_frcnn(meta.model, len(meta.classes) + 1, meta.imgsz)
    model.load_state_dict(ckpt["model"])
    model.roi_heads.score_thresh = score_thresh  # type: ignore[union-attr]
    return model.to(device).eval()


def load_frcnn(ckpt: Any, meta: CheckpointMeta, path: Path, device: str = "cpu") -> LoadedFrcnn:
    try:
        return LoadedFrcnn(load_model(ckpt, meta, device), 0, device)
    except (DetflowError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DetflowError(f"model checkpoint {path} is a damaged detflow Faster R-CNN checkpoint "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def load_frcnn_checkpoint(path: str | os.PathLike[str],
                          device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """Model (eval mode) and header of a saved frcnn checkpoint, read with torch's safe loader."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = CheckpointMeta.read(ckpt, path)
    return load_model(ckpt, meta, device), meta
