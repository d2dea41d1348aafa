"""YOLO initial weights: COCO checkpoints through pipeline/assets.py, user files through the restricted loader."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline import assets
from pipeline.errors import AssetError, ConfigError
from pipeline.families.yolo import YoloFamily
from pipeline.fileio import sha256_file
from pipeline.train.common import PretrainedSource, pretrained_unavailable
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
    mode = tp.pretrained
    if mode == "none":
        return PretrainedSource(kind="none", source="none (from scratch, as configured)"), None
    if mode in ("coco", "auto"):
        name = YoloFamily.coco_assets.get(tp.model)
        if name is None:
            return pretrained_unavailable(mode, tp.model, f"no COCO checkpoint is known for {tp.model} "
                                          f"(known: {', '.join(YoloFamily.coco_assets)})"), None
        try:
            path = assets.resolve(name, raw_dir=raw_dir, mirrors=mirrors, trust=trust)
            state = load_checkpoint_state(path, assets.ASSETS[name].sha256, trust)
        except AssetError as e:
            return pretrained_unavailable(mode, tp.model, e), None
        return PretrainedSource(kind="coco", source=f"{name} ({assets.ASSETS[name].url})", path=str(path),
                                sha256=sha256_file(path)), state
    path = Path(mode)
    if not path.is_file():
        raise ConfigError(f"train.pretrained {mode!r} is not a file; expected one of: auto, coco, none, or a path")
    state = load_checkpoint_state(path, tp.pretrained_sha256, trust)
    return PretrainedSource(kind="path", source=str(path), path=str(path), sha256=sha256_file(path)), state
