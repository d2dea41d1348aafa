"""The ``yolo`` family: Ultralytics YOLOv5/v8/11 detectors (Ultralytics owns the training loop).

Parts: ``pretrained.py`` (COCO weights through pipeline/assets.py, the restricted YOLOv5 loader), ``trainer.py``
(the Ultralytics trainer subclass: freeze schedule, LR groups, DVCLive, progress bar), ``train.py`` (the stage entry,
checkpoint header, publishing), ``inference.py`` (load a checkpoint for inference), ``export.py`` (Ultralytics'
ONNX exporter), ``postprocess.py`` (torch-free decoding). Importing this module imports neither torch nor
Ultralytics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from pipeline.families.base import CheckpointMeta, ExportSettings, LoadedModel, ModelFamily

if TYPE_CHECKING:
    from pipeline.config import Params, TrainParams
    from pipeline.infer.processing import Detections, LetterboxMeta
    from pipeline.train.common import PretrainedSource, TrainResult


class YoloExport(ExportSettings):
    opset: int = Field(18, ge=11, le=23)
    simplify: bool = True
    half: bool = False
    max_map_delta: float = Field(0.005, ge=0.0, le=1.0)


class YoloFamily(ModelFamily):
    name = "yolo"
    title = "YOLO"
    models = ("yolov5n", "yolov5s", "yolov8n", "yolov8s", "yolo11n", "yolo11s")
    default_model = "yolov5n"
    # COCO checkpoints we know for each architecture (asset names in pipeline/assets.py).
    coco_assets = {"yolov5n": "yolov5n-coco", "yolo11n": "yolo11n-coco", "yolo11s": "yolo11s-coco"}
    export_params = YoloExport
    dynamic_batch = True
    data_parallel = "own"  # train.device "0,1": Ultralytics' own DDP (device=[0,1]); no CPU data parallelism

    def resolve_pretrained(self, tp: TrainParams, raw_dir: Path, mirrors: Sequence[Path] | None, trust: bool,
                           progress: bool) -> tuple[PretrainedSource, Any]:
        from pipeline.families.yolo.pretrained import resolve_pretrained

        return resolve_pretrained(tp, raw_dir, list(mirrors) if mirrors is not None else None, trust)

    def train(self, params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
              raw_dir: Path, mirrors: list[Path] | None, trust: bool, progress: bool) -> TrainResult:
        from pipeline.families.yolo.train import train_yolo

        return train_yolo(params, prepared, out_dir, reports_dir, workdir, raw_dir, mirrors, trust, progress)

    def load(self, ckpt: Any, meta: CheckpointMeta, path: Path, device: str) -> LoadedModel:
        from pipeline.families.yolo.inference import load_yolo

        return load_yolo(ckpt, path, device)

    def export_onnx(self, checkpoint: Path, loaded: LoadedModel, work: Path, imgsz: int,
                    settings: ExportSettings) -> Path:
        from pipeline.families.yolo.export import export_yolo

        return export_yolo(checkpoint, work, imgsz, settings)  # type: ignore[arg-type]

    def check_export(self, settings: ExportSettings) -> None:
        if getattr(settings, "half", False):
            import torch

            from pipeline.errors import DetflowError

            if not torch.cuda.is_available():
                raise DetflowError("export.yolo.half needs a CUDA GPU at export time (Ultralytics exports FP16 on "
                                   "GPU only); set export.yolo.half: false")

    def card_output(self, classes: list[str]) -> dict[str, Any]:
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
                    max_det: int) -> list[Detections]:
        from pipeline.families.yolo.postprocess import yolo_postprocess

        return yolo_postprocess(outputs[0], metas, conf=conf, iou=iou, max_det=max_det)


YOLO = YoloFamily()
