"""The torchvision family's torch side: pretrained weights, training, loading and export of every table row."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.families.backend import FamilyBackend, LoadedModel
from pipeline.families.spec import ExportSettings
from pipeline.families.torchvision import TORCHVISION

if TYPE_CHECKING:
    from pipeline.config import Params, TrainParams
    from pipeline.contracts.checkpoint import CheckpointMeta
    from pipeline.contracts.results import PretrainedSource, TrainResult


class TorchvisionBackend(FamilyBackend):
    spec = TORCHVISION

    def resolve_pretrained(self, tp: TrainParams, raw_dir: Path, mirrors: Sequence[Path] | None, trust: bool,
                           progress: bool) -> tuple[PretrainedSource, Any]:
        from pipeline.families.torchvision.pretrained import resolve_torchvision_pretrained

        return resolve_torchvision_pretrained(tp, raw_dir, mirrors, trust, progress)

    def train(self, params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
              raw_dir: Path, mirrors: list[Path] | None, trust: bool, progress: bool) -> TrainResult:
        from pipeline.families.torchvision.train import train_torchvision

        return train_torchvision(params, prepared, out_dir, reports_dir, workdir, raw_dir, mirrors, trust, progress)

    def load(self, ckpt: Any, meta: CheckpointMeta, path: Path, device: str) -> LoadedModel:
        from pipeline.families.torchvision.inference import load_torchvision

        return load_torchvision(ckpt, meta, path, device)

    def export_onnx(self, checkpoint: Path, loaded: LoadedModel, work: Path, imgsz: int,
                    settings: ExportSettings) -> Path:
        from pipeline.families.torchvision.export import export_torchvision
        from pipeline.families.torchvision.inference import load_checkpoint

        model, _ = load_checkpoint(checkpoint)  # a fresh copy: tracing never touches the parity model
        return export_torchvision(model, work, imgsz, settings)

    def build(self, model: str, num_classes: int, imgsz: int) -> Any:
        from pipeline.families.torchvision.build import build_model

        return build_model(model, num_classes, imgsz)

    def layer_groups(self, model: str) -> dict[str, list[str]]:
        from pipeline.families.torchvision.build import layer_groups

        return layer_groups(model)


BACKEND = TorchvisionBackend()
