"""The yolo family's torch side: pretrained weights, training (Ultralytics), loading and export."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import DetflowError
from pipeline.families.backend import FamilyBackend, LoadedModel
from pipeline.families.spec import ExportSettings
from pipeline.families.yolo import YOLO

if TYPE_CHECKING:
    from pipeline.config import Params, TrainParams
    from pipeline.contracts.checkpoint import CheckpointMeta
    from pipeline.contracts.results import PretrainedSource, TrainResult


class YoloBackend(FamilyBackend):
    spec = YOLO

    def resolve_pretrained(self, tp: TrainParams, raw_dir: Path, mirrors: Sequence[Path] | None, trust: bool,
                           progress: bool) -> tuple[PretrainedSource, Any]:
        from pipeline.families.yolo.pretrained import resolve_pretrained

        return resolve_pretrained(tp, raw_dir, list(mirrors) if mirrors is not None else None, trust)

    def train(self, params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
              raw_dir: Path, mirrors: list[Path] | None, trust: bool, progress: bool) -> TrainResult:
        from pipeline.families.yolo.train import train_yolo

        return train_yolo(params, prepared, out_dir, reports_dir, workdir, raw_dir, mirrors, trust, progress)

    def train_few_shot(self, params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
                       progress: bool, plain_last_epochs: int = 0) -> TrainResult:
        from pipeline.families.yolo.train import train_yolo

        return train_yolo(params, prepared, out_dir, reports_dir, workdir, progress=progress,
                          ultralytics_args={"warmup_epochs": 0, "val": False, "close_mosaic": plain_last_epochs,
                                            "plots": False})

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

            if not torch.cuda.is_available():
                raise DetflowError("export.yolo.half needs a CUDA GPU at export time (Ultralytics exports FP16 on "
                                   "GPU only); set export.yolo.half: false")

    def build(self, model: str, num_classes: int, imgsz: int) -> Any:
        from pipeline.ultralytics_env import import_ultralytics

        import_ultralytics()
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel(f"{model}.yaml", nc=num_classes, verbose=False)

    def layer_groups(self, model: str) -> dict[str, list[str]]:
        from pipeline.families.yolo.train import yolo_group_prefixes

        return yolo_group_prefixes(model)


BACKEND = YoloBackend()
