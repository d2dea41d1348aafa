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
from pipeline.ultralytics_env import configure_environment


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
        """A detflow Faster R-CNN or Ultralytics YOLO checkpoint; any other, damaged or truncated file fails with
        one line naming it and what was expected."""
        path = Path(path)
        expected = "expected a PyTorch checkpoint written by `detflow train` (e.g. models/train/best.pt)"
        if not path.is_file():
            raise DetflowError(f"model checkpoint {path} not found; run `detflow train` (or `dvc repro`)")
        configure_environment()  # unpickling a YOLO checkpoint imports Ultralytics: keep it offline and in the project
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # what the unpickler raises depends on the damage (UnpicklingError, EOFError, ...)
            reason = (str(e).splitlines() or [""])[0][:160] or type(e).__name__
            raise DetflowError(f"cannot read model checkpoint {path}: not a PyTorch checkpoint, or truncated "
                               f"({reason}); {expected}") from None
        if isinstance(ckpt, dict) and ckpt.get("family") == "frcnn":
            from pipeline.train.frcnn import load_frcnn_checkpoint

            try:
                model, meta = load_frcnn_checkpoint(path)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise DetflowError(f"model checkpoint {path} is a damaged detflow Faster R-CNN checkpoint "
                                   f"({type(e).__name__}: {e}); {expected}") from None
            return cls("frcnn", model.to(device).eval(), int(meta["imgsz"]), list(meta["classes"]), device)
        ema = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
        if not isinstance(ema, torch.nn.Module) or not hasattr(ema, "names"):
            raise DetflowError(f"model checkpoint {path} is neither a detflow Faster R-CNN nor an Ultralytics YOLO "
                               f"checkpoint; {expected}")
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
