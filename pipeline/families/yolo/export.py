"""ONNX export of a yolo checkpoint with Ultralytics' exporter (dynamic batch and size; optional onnxslim), plus the
embedding output: the global average of each feature map the Detect head reads (P3, P4, P5), concatenated."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import DetflowError
from pipeline.families.onnx import add_pooled_embedding
from pipeline.families.yolo import YoloExport
from pipeline.ultralytics_env import import_ultralytics

EMBEDDING_MEANING = ("global average pool of each feature map the Detect head reads (P3, P4, P5 after the neck, "
                     "strides 8, 16, 32), concatenated in that order; letterbox padding included")
_LAYER = re.compile(r"^/model\.(\d+)/")


def export_yolo(best: Path, work: Path, imgsz: int, settings: YoloExport) -> Path:
    """Ultralytics' exporter on a copy of the checkpoint (it writes next to its input, a DVC output), then the
    embedding output added to the graph."""
    import onnx

    import_ultralytics()
    from ultralytics import YOLO

    copy = work / "best.pt"
    shutil.copy(best, copy)
    out = Path(YOLO(str(copy)).export(format="onnx", dynamic=True, simplify=settings.simplify, opset=settings.opset,
                                      imgsz=imgsz, quantize="fp16" if settings.half else None,
                                      device="0" if settings.half else "cpu", verbose=False))
    model = onnx.load(str(out))
    add_pooled_embedding(model, head_inputs(model), EMBEDDING_MEANING)
    onnx.save(model, str(out))
    return out


def head_inputs(model: Any) -> list[str]:
    """The tensors the Detect head (the last ``/model.<i>/`` layer of the graph) reads from earlier layers, in
    layer order: the same maps, in the same order, as the head's input list in PyTorch (``Detect.f``)."""
    layer_of: dict[str, int] = {}
    last = -1
    for node in model.graph.node:
        m = _LAYER.match(node.name)
        if m:
            last = max(last, int(m.group(1)))
            for o in node.output:
                layer_of[o] = int(m.group(1))
    found: dict[str, int] = {}
    for node in model.graph.node:
        m = _LAYER.match(node.name)
        if m and int(m.group(1)) == last:
            for i in node.input:
                if i in layer_of and layer_of[i] < last:
                    found.setdefault(i, layer_of[i])
    if not found:
        raise DetflowError("cannot find the Detect head's input feature maps in the exported graph (node names "
                           "/model.<i>/...); the embedding output needs them")
    return sorted(found, key=lambda t: found[t])


def torch_embeddings(model: Any, batch: Any) -> Any:
    """The same embedding computed in PyTorch (a check of the graph edit): a pre-hook on the Detect head pools
    its inputs. ``model``: the loaded Ultralytics ``DetectionModel``; ``batch``: an NCHW float tensor."""
    import torch

    head = model.model[-1]
    seen: list[Any] = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            model(batch)
    finally:
        handle.remove()
    return torch.cat([x.float().mean(dim=(2, 3)) for x in seen[0]], dim=1)
