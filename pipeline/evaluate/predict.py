"""Run a trained PyTorch checkpoint (either family) with the shared pre/post-processing.

The ONNX engine uses the same ``pipeline.infer.processing`` functions, so PyTorch/ONNX parity measures the
network alone, never a second resize or NMS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import DetflowError
from pipeline.infer.processing import Detections, frcnn_postprocess, preprocess, yolo_postprocess


@dataclass
class TorchDetector:
    """A trained model ready for inference on RGB uint8 images."""

    family: str
    model: torch.nn.Module
    imgsz: int
    classes: list[str]
    device: str = "cpu"
    stride: int = 0  # > 0: minimal (rect) letterbox padding to this multiple; 0: square (fixed-shape models)

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> TorchDetector:
        if not Path(path).is_file():
            raise DetflowError(f"model checkpoint {path} not found; run `detflow train` (or `dvc repro`)")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(ckpt, dict) and ckpt.get("family") == "frcnn":
            from pipeline.train.frcnn import load_frcnn_checkpoint

            model, meta = load_frcnn_checkpoint(Path(path))
            return cls("frcnn", model.to(device).eval(), int(meta["imgsz"]), list(meta["classes"]), device)
        ema = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
        if ema is None:
            raise DetflowError(f"{path} is neither a detflow Faster R-CNN nor an Ultralytics YOLO checkpoint")
        model = ema.float().eval()
        if hasattr(model, "fuse"):
            model = model.fuse(verbose=False)
        names = model.names if isinstance(model.names, list) else [model.names[k] for k in sorted(model.names)]
        imgsz = int(ckpt.get("train_args", {}).get("imgsz", 640))
        stride = int(max(model.stride.tolist())) if hasattr(model, "stride") else 32
        return cls("yolo", model.to(device), imgsz, list(names), device, stride)

    @torch.inference_mode()
    def raw(self, batch: np.ndarray) -> Any:
        x = torch.from_numpy(batch).to(self.device)
        if self.family == "yolo":
            out = self.model(x)
            out = out[0] if isinstance(out, list | tuple) else out
            return out.float().cpu().numpy()
        outs = self.model(list(x))
        return [{k: v.cpu().numpy() for k, v in o.items()} for o in outs]

    def predict(self, images: list[np.ndarray], conf: float = 0.001, iou: float = 0.7,
                max_det: int = 300) -> list[Detections]:
        batch, metas = preprocess(images, self.imgsz, stride=self.stride)
        raw = self.raw(batch)
        if self.family == "yolo":
            return yolo_postprocess(raw, metas, conf=conf, iou=iou, max_det=max_det)
        return [frcnn_postprocess(o["boxes"], o["scores"], o["labels"], m, conf=conf, max_det=max_det)
                for o, m in zip(raw, metas, strict=True)]
