"""YOLO initial weights: COCO checkpoints through pipeline/assets.py, user files through the restricted loader."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.contracts.results import PretrainedSource
from pipeline.errors import AssetError
from pipeline.families.yolo import YOLO
from pipeline.train.pretrained import resolve_initial_weights
from pipeline.train.weights_import import UnsafeCheckpointError, load_yolov5_state_dict
from pipeline.ultralytics_env import import_ultralytics

if TYPE_CHECKING:
    from pipeline.config import TrainParams


def load_checkpoint_state(path: Path, expected_sha256: str | None, trust: bool) -> dict[str, torch.Tensor]:
    """State dict of a YOLO checkpoint: original-YOLOv5 pickles and plain state dicts via the restricted
    unpickler; official Ultralytics checkpoints (whose classes must be imported) only after the checksum
    matched or the user trusted the file."""
    try:
        return load_yolov5_state_dict(path, expected_sha256, trust)
    except UnsafeCheckpointError as e:
        if "'ultralytics." not in str(e):
            raise
    # load_yolov5_state_dict verified the sha256 (or trust) before unpickling, so the full loader is allowed.
    import_ultralytics()  # unpickling imports Ultralytics' classes
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt.get("model")
    if model is None:
        raise AssetError(f"{path}: Ultralytics checkpoint without 'ema' or 'model'")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}


def resolve_pretrained(tp: TrainParams, raw_dir: Path, mirrors: list[Path] | None,
                       trust: bool) -> tuple[PretrainedSource, dict[str, torch.Tensor] | None]:
    """Initial weights: none, the model's COCO checkpoint (a named asset, resolved and verified by
    :func:`pipeline.assets.resolve`), or a path (checked against ``train.pretrained_sha256``)."""
    return resolve_initial_weights(tp, YOLO.coco_assets,
                                   lambda path, expected: load_checkpoint_state(path, expected, trust),
                                   raw_dir, mirrors, trust)
