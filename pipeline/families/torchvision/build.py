"""torchvision detection models built from their table row (``models.py``): builder, input size rule, layer groups.

Inference needs only this module (no training code). ``longest_side`` rows are built with ``min_size=max_size=imgsz``:
the model's internal ``GeneralizedRCNNTransform`` resizes every image to a longer side of ``imgsz`` (aspect ratio
kept) and maps detections back to the image's coordinates; export later fixes the input size. ``fixed`` rows keep
the builder's own square input, to which the model resizes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from pipeline.errors import ConfigError
from pipeline.families.torchvision.models import GROUPS, TorchvisionModel, model_row


def _builder(row: TorchvisionModel) -> tuple[Callable[..., nn.Module], Any]:
    """The torchvision builder and its COCO weights enum member named by the row."""
    from torchvision.models import detection

    enum_name, _, member = row.weights.partition(".")
    return getattr(detection, row.name), getattr(getattr(detection, enum_name), member)


def build_model(model_name: str, num_classes: int, imgsz: int) -> nn.Module:
    """An untrained torchvision detector with ``num_classes`` outputs (K classes + background).

    No weights are fetched here (``weights=None, weights_backbone=None``): pretrained tensors are transferred by
    name afterwards, so that a predictor of another class count is simply left new. Without pretrained backbone
    weights torchvision uses ordinary (trainable) BatchNorm and makes every backbone layer trainable; freezing is
    our strategies' job.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes must count the background too (K + 1 >= 2), got {num_classes}")
    row = model_row(model_name)
    builder, _ = _builder(row)
    size = {"min_size": imgsz, "max_size": imgsz} if row.size == "longest_side" else {}
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, **size)


def coco_weights_url(model_name: str) -> str:
    """torchvision's URL of the row's COCO checkpoint (what pipeline/assets.py names for this model)."""
    return str(_builder(model_row(model_name))[1].url)


def layer_groups(model_name: str) -> dict[str, list[str]]:
    """Parameter-name prefixes of backbone, neck and head, from the table."""
    return {g: list(model_row(model_name).groups[g]) for g in GROUPS}


def set_score_threshold(model: nn.Module, model_name: str, value: float) -> float:
    """Set the model's score threshold (where the row says it lives); returns the previous value."""
    *parents, attr = model_row(model_name).score_thresh.split(".")
    owner = functools.reduce(getattr, parents, model)
    old = float(getattr(owner, attr))
    setattr(owner, attr, value)
    return old
