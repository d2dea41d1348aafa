"""The ``torchvision`` family: torchvision's detection models (Faster R-CNN, RetinaNet, SSDlite), fine-tuned by our
own loop, one row each in the table of ``models.py``.

torchvision gives models but no trainer, so the loop lives here, in the style of the torchvision detection
references (models chosen from a table by name), and follows the yolo family's contract: the same strategies
(``pipeline/train/strategies.py``), run fingerprint and resume rule, and the same outputs (``best.pt``,
``last.pt``, ``params.yaml``, ``transfer.json``, ``results.csv`` with Ultralytics' metric column names, DVCLive
metrics, ``summary.json``).

Torch-free (this module, the spec): ``models.py`` (the table), ``postprocess.py`` (decoding). Torch
(``backend.py``, imported only by the stages that train, score or export): ``build.py`` (builders and layer
groups from the table), ``pretrained.py`` (COCO weights through pipeline/assets.py), ``data.py`` (dataset,
transforms, loader), ``loop.py`` (freezing, optimizer, schedule, one epoch, COCO validation), ``checkpoint.py``
(resumable checkpoints), ``train.py`` (the stage entry and its reports), ``inference.py`` (load a checkpoint for
inference), ``export.py`` (torch.onnx).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.contracts.detections import Detections, LetterboxMeta
from pipeline.families.spec import ExportSettings, FamilySpec
from pipeline.families.torchvision.models import MODELS, model_row
from pipeline.families.torchvision.postprocess import torchvision_postprocess

OUTPUT_NAMES = ["boxes", "labels", "scores"]


class TorchvisionExport(ExportSettings):
    opset: int = Field(17, ge=11, le=23)
    max_map_delta: float = Field(0.01, ge=0.0, le=1.0)


class TorchvisionSpec(FamilySpec):
    name = "torchvision"
    title = "torchvision detection"
    models = tuple(MODELS)
    default_model = "fasterrcnn_mobilenet_v3_large_320_fpn"
    coco_assets = {m.name: m.asset for m in MODELS.values()}  # torchvision's COCO_V1 weights (pipeline/assets.py)
    export_params = TorchvisionExport
    dynamic_batch = False  # the graph is exported for one image at a time
    renamed_from = ("frcnn",)  # the Faster R-CNN family before RetinaNet and SSDlite joined it

    def card_output(self, model: str, classes: list[str]) -> dict[str, Any]:
        if model_row(model).nms == "graph":
            return {"names": OUTPUT_NAMES,
                    "meaning": "after the graph's own NMS: xyxy boxes in input pixels, labels 1..K (0 = background), "
                               "scores"}
        return {"names": OUTPUT_NAMES, "nms": "detflow",
                "meaning": "before NMS: candidate xyxy boxes in input pixels, labels 1..K (0 = background), scores; "
                           "class-aware NMS at postprocess.nms_iou follows (pipeline/families/torchvision/"
                           "postprocess.py)"}

    def check_graph(self, inputs: Sequence[Any], outputs: Sequence[Any], card: Mapping[str, Any]) -> list[str]:
        names = [o.name for o in outputs]
        problems = [] if names == OUTPUT_NAMES else [f"torchvision graph outputs {names}, expected boxes, labels, "
                                                      "scores"]
        if card.get("model") not in MODELS:
            problems.append(f"the card's model {card.get('model')!r} is not one of: {', '.join(MODELS)}")
        return problems

    def postprocess(self, outputs: Sequence[np.ndarray], metas: Sequence[LetterboxMeta], conf: float, iou: float,
                    max_det: int, model: str) -> list[Detections]:
        boxes, labels, scores = outputs
        (meta,) = metas
        nms_iou = iou if model_row(model).nms == "detflow" else None
        return [torchvision_postprocess(boxes, scores, labels, meta, conf=conf, max_det=max_det, nms_iou=nms_iou)]


TORCHVISION = TorchvisionSpec()
