"""ONNX export of a Faster R-CNN: torch.onnx (TorchScript exporter) at a fixed 1x3xSxS input; letterboxing happens
outside the graph, NMS inside it."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.families.base import ExportSettings


class SingleImage(torch.nn.Module):
    """The model with a tensor interface: (1, 3, S, S) in, (boxes, labels, scores) out."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.inner([images[0]])[0]
        return out["boxes"], out["labels"], out["scores"]


def export_frcnn(model: torch.nn.Module, work: Path, imgsz: int, settings: ExportSettings) -> Path:
    out = work / "model.onnx"
    dummy = torch.rand(1, 3, imgsz, imgsz)
    torch.onnx.export(SingleImage(model.eval()), (dummy,), str(out), opset_version=settings.opset,
                      input_names=["images"], output_names=["boxes", "labels", "scores"], dynamo=False)
    return out
