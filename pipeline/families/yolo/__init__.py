"""The ``yolo`` family: Ultralytics YOLOv5/v8/11 detectors (Ultralytics owns the training loop).

Torch-free (this module, the spec): ``postprocess.py`` (decoding). Torch (``backend.py``, imported only by the stages
that train, score or export): ``pretrained.py`` (COCO weights through pipeline/assets.py, the restricted YOLOv5
loader), ``trainer.py`` (the Ultralytics trainer subclass: freeze schedule, LR groups, DVCLive, progress bar),
``train.py`` (the stage entry, layer groups, checkpoint header, publishing), ``inference.py`` (load a checkpoint for
inference), ``export.py`` (Ultralytics' ONNX exporter). Importing this module imports neither torch nor Ultralytics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.contracts.detections import Detections, LetterboxMeta
from pipeline.families.spec import ExportSettings, FamilySpec
from pipeline.families.yolo.postprocess import yolo_postprocess


class YoloExport(ExportSettings):
    opset: int = Field(18, ge=11, le=23)
    simplify: bool = True
    half: bool = False
    max_map_delta: float = Field(0.005, ge=0.0, le=1.0)


class YoloSpec(FamilySpec):
    name = "yolo"
    title = "YOLO"
    models = ("yolov5n", "yolov5s", "yolov8n", "yolov8s", "yolo11n", "yolo11s")
    default_model = "yolov5n"
    # COCO checkpoints we know for each architecture (asset names in pipeline/assets.py).
    coco_assets = {"yolov5n": "yolov5n-coco", "yolo11n": "yolo11n-coco", "yolo11s": "yolo11s-coco"}
    export_params = YoloExport
    dynamic_batch = True
    accumulates_to_nominal_batch = True  # Ultralytics' nbs: one optimizer step per nominal batch
    data_parallel = "own"  # train.device "0,1": Ultralytics' own DDP (device=[0,1]); no CPU data parallelism

    def card_output(self, model: str, classes: list[str]) -> dict[str, Any]:
        return {"name": "output0", "shape": ["N", 4 + len(classes), "anchors"],
                "meaning": "per anchor: box centre x, centre y, width, height in input pixels, then one score per "
                           "class (sigmoid); decode with pipeline.families.yolo.postprocess.yolo_postprocess"}

    def input_dtype(self, settings: ExportSettings) -> str:
        return "float16" if getattr(settings, "half", False) else "float32"

    def check_graph(self, inputs: Sequence[Any], outputs: Sequence[Any], card: Mapping[str, Any]) -> list[str]:
        nc = outputs[0].shape[1] if len(outputs[0].shape) == 3 else None
        if isinstance(nc, int) and nc - 4 != len(card["classes"]):
            return [f"graph predicts {nc - 4} classes, the card lists {len(card['classes'])}"]
        return []

    def postprocess(self, outputs: Sequence[np.ndarray], metas: Sequence[LetterboxMeta], conf: float, iou: float,
                    max_det: int, model: str) -> list[Detections]:
        return yolo_postprocess(outputs[0], metas, conf=conf, iou=iou, max_det=max_det)


YOLO = YoloSpec()
