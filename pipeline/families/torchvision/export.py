"""ONNX export of a torchvision detector: torch.onnx (TorchScript exporter) at a fixed 1x3xSxS input; letterboxing
happens outside the graph, NMS inside it (the row's ``nms: graph``) or after it in ``postprocess.py`` (``nms:
detflow``: the model's NMS is switched off for the export). A fourth output, ``embedding``, pools the backbone's
feature maps for shift detection."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.contracts.embedding import EMBEDDING_OUTPUT
from pipeline.families.onnx import tag_embedding
from pipeline.families.spec import ExportSettings

EMBEDDING_MEANING = ("global average pool of each feature map the backbone hands to the heads (in the backbone's "
                     "level order; Faster R-CNN: the FPN levels, 'pool' last), concatenated; computed on the network's "
                     "own resized, normalised input")


def pooled_fpn(features: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(N, sum of channels): the spatial mean of every feature map, in the backbone's order."""
    return torch.cat([f.float().mean(dim=(2, 3)) for f in features.values()], dim=1)


class SingleImage(torch.nn.Module):
    """The model with a tensor interface: (1, 3, S, S) in, (boxes, labels, scores, embedding) out. The embedding
    comes from a hook on the backbone during the same forward pass, so it costs one reduction per FPN level."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        handle = self.inner.backbone.register_forward_hook(lambda _m, _a, out: seen.append(pooled_fpn(out)))
        try:
            out = self.inner([images[0]])[0]
        finally:
            handle.remove()
        return out["boxes"], out["labels"], out["scores"], seen[0]


def torch_embeddings(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The embedding of each image of an NCHW batch, as the graph computes it (one image per call)."""
    wrapper = SingleImage(model.eval())
    with torch.inference_mode():
        return torch.cat([wrapper(images[i:i + 1])[3] for i in range(len(images))])


def export_torchvision(model: torch.nn.Module, work: Path, imgsz: int, settings: ExportSettings) -> Path:
    import onnx

    out = work / "model.onnx"
    dummy = torch.rand(1, 3, imgsz, imgsz)
    wrapper = SingleImage(model.eval())
    with torch.inference_mode():
        dim = int(wrapper(dummy)[3].shape[1])
    torch.onnx.export(wrapper, (dummy,), str(out), opset_version=settings.opset,
                      input_names=["images"], output_names=["boxes", "labels", "scores", EMBEDDING_OUTPUT],
                      dynamo=False)
    graph: Any = onnx.load(str(out))
    tag_embedding(graph, EMBEDDING_MEANING, dim)
    onnx.save(graph, str(out))
    return out
