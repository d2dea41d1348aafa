"""The ``frcnn`` family: torchvision Faster R-CNN detectors, fine-tuned by our own loop.

torchvision gives models but no trainer, so the loop lives here, in the style of the torchvision detection
references, and follows the yolo family's contract: the same strategies (``pipeline/train/common.py``), run
fingerprint and resume rule, and the same outputs (``best.pt``, ``last.pt``, ``params.yaml``, ``transfer.json``,
``results.csv`` with Ultralytics' metric column names, DVCLive metrics, ``summary.json``).

Parts: ``model.py`` (builders, layer groups, freezing), ``pretrained.py`` (COCO weights through pipeline/assets.py),
``data.py`` (dataset, transforms, loader), ``loop.py`` (optimizer, schedule, one epoch, COCO validation),
``checkpoint.py`` (resumable checkpoints), ``train.py`` (the stage entry and its reports), ``inference.py`` (load a
checkpoint for inference), ``export.py`` (torch.onnx), ``postprocess.py`` (torch-free decoding). Importing this
module does not import torch.
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

OUTPUT_NAMES = ["boxes", "labels", "scores"]


class FrcnnExport(ExportSettings):
    opset: int = Field(17, ge=11, le=23)
    max_map_delta: float = Field(0.01, ge=0.0, le=1.0)


class FrcnnFamily(ModelFamily):
    name = "frcnn"
    title = "Faster R-CNN"
    models = ("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn",
              "fasterrcnn_resnet50_fpn_v2")
    default_model = "fasterrcnn_mobilenet_v3_large_320_fpn"
    coco_assets = {m: f"{m}-coco" for m in models}  # torchvision's COCO_V1 weights (pipeline/assets.py)
    export_params = FrcnnExport
    dynamic_batch = False  # the graph is exported for one image at a time
    data_parallel = "torchrun"  # train.device "0,1" / "cpu:N": pipeline/train/distributed.py

    def resolve_pretrained(self, tp: TrainParams, raw_dir: Path, mirrors: Sequence[Path] | None, trust: bool,
                           progress: bool) -> tuple[PretrainedSource, Any]:
        from pipeline.families.frcnn.pretrained import resolve_frcnn_pretrained

        return resolve_frcnn_pretrained(tp, raw_dir, mirrors, trust, progress)

    def train(self, params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
              raw_dir: Path, mirrors: list[Path] | None, trust: bool, progress: bool) -> TrainResult:
        from pipeline.families.frcnn.train import train_frcnn

        return train_frcnn(params, prepared, out_dir, reports_dir, workdir, raw_dir, mirrors, trust, progress)

    def load(self, ckpt: Any, meta: CheckpointMeta, path: Path, device: str) -> LoadedModel:
        from pipeline.families.frcnn.inference import load_frcnn

        return load_frcnn(ckpt, meta, path, device)

    def export_onnx(self, checkpoint: Path, loaded: LoadedModel, work: Path, imgsz: int,
                    settings: ExportSettings) -> Path:
        from pipeline.families.frcnn.export import export_frcnn
        from pipeline.families.frcnn.inference import load_frcnn_checkpoint

        model, _ = load_frcnn_checkpoint(checkpoint)  # a fresh copy: tracing never touches the parity model
        return export_frcnn(model, work, imgsz, settings)

    def card_output(self, classes: list[str]) -> dict[str, Any]:
        return {"names": OUTPUT_NAMES,
                "meaning": "after the graph's own NMS: xyxy boxes in input pixels, labels 1..K (0 = background), "
                           "scores"}

    def check_graph(self, inputs: Sequence[Any], outputs: Sequence[Any], card: Mapping[str, Any]) -> list[str]:
        names = [o.name for o in outputs]
        if names != OUTPUT_NAMES:
            return [f"Faster R-CNN graph outputs {names}, expected boxes, labels, scores"]
        return []

    def postprocess(self, outputs: Sequence[np.ndarray], metas: Sequence[LetterboxMeta], conf: float, iou: float,
                    max_det: int) -> list[Detections]:
        from pipeline.families.frcnn.postprocess import frcnn_postprocess

        boxes, labels, scores = outputs
        (meta,) = metas
        return [frcnn_postprocess(boxes, scores, labels, meta, conf=conf, max_det=max_det)]


FRCNN = FrcnnFamily()
