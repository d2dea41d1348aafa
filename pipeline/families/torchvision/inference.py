"""Load a torchvision checkpoint for inference: rebuild the model of the header's table row, load the weights. Needs
no training code and no pickled classes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.contracts.checkpoint import CheckpointMeta
from pipeline.errors import DetflowError
from pipeline.families.torchvision.build import build_model, set_score_threshold

#: torchvision's defaults are 0.05 (Faster R-CNN, RetinaNet); evaluators need the low-confidence detections too
#: (mAP), as in validation.
SCORE_THRESH = 0.001


@dataclass
class LoadedTorchvision:
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
        raise DetflowError("a torchvision checkpoint holds its weights under 'model' (a state dict)")
    model = build_model(meta.model, len(meta.classes) + 1, meta.imgsz)
    model.load_state_dict(ckpt["model"])
    set_score_threshold(model, meta.model, score_thresh)
    return model.to(device).eval()


def load_torchvision(ckpt: Any, meta: CheckpointMeta, path: Path, device: str = "cpu") -> LoadedTorchvision:
    try:
        return LoadedTorchvision(load_model(ckpt, meta, device), 0, device)
    except (DetflowError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DetflowError(f"model checkpoint {path} is a damaged detflow torchvision checkpoint "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def load_checkpoint(path: str | os.PathLike[str],
                    device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """Model (eval mode) and header of a saved torchvision checkpoint, read with torch's safe loader."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = CheckpointMeta.read(ckpt, path)
    return load_model(ckpt, meta, device), meta
