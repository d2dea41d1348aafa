"""Load a yolo checkpoint for inference (torch): the EMA weights, fused, in eval mode. No training code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import DetflowError


@dataclass
class LoadedYolo:
    model: torch.nn.Module
    stride: int
    device: str = "cpu"

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> list[list[np.ndarray]]:
        """One call for the whole batch, like the dynamic-batch ONNX graph: ``[[(B, 4 + nc, A)]]``."""
        out = self.model(torch.from_numpy(batch).to(self.device))
        out = out[0] if isinstance(out, list | tuple) else out
        return [[out.float().cpu().numpy()]]


def load_yolo(ckpt: Any, path: Path, device: str = "cpu") -> LoadedYolo:
    """The model of an Ultralytics checkpoint (read by the caller with ``torch.load(weights_only=False)``)."""
    ema = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(ema, torch.nn.Module) or not hasattr(ema, "names"):
        raise DetflowError(f"model checkpoint {path} says family 'yolo' but holds no Ultralytics model "
                           "('ema' or 'model'); retrain with `detflow train`")
    model = ema.float().eval()
    if hasattr(model, "fuse"):
        model = model.fuse(verbose=False)
    stride = int(max(model.stride.tolist())) if hasattr(model, "stride") else 32
    return LoadedYolo(model.to(device), stride, device)
