"""torchvision Faster R-CNN models: the builders we support and their layer groups (inference needs only these).

``min_size=max_size=imgsz``: the model's internal ``GeneralizedRCNNTransform`` resizes every image to a longer side of
``imgsz`` (aspect ratio kept, padded to a multiple of 32 in a batch) and maps detections back to the original image
coordinates. Export later fixes the input size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pipeline.errors import ConfigError

# Parameter-name prefixes of each group, from the input side to the output side (the head is always trained).
FRCNN_GROUPS = {
    "backbone": ["backbone.body."],
    "neck": ["backbone.fpn.", "rpn."],
    "head": ["roi_heads."],
}


def _builders() -> dict[str, tuple[Callable[..., nn.Module], Any]]:
    from torchvision.models import detection as d

    return {
        "fasterrcnn_mobilenet_v3_large_fpn": (d.fasterrcnn_mobilenet_v3_large_fpn,
                                              d.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1),
        "fasterrcnn_mobilenet_v3_large_320_fpn": (d.fasterrcnn_mobilenet_v3_large_320_fpn,
                                                  d.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1),
        "fasterrcnn_resnet50_fpn_v2": (d.fasterrcnn_resnet50_fpn_v2, d.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
    }


def _builder(model_name: str) -> tuple[Callable[..., nn.Module], Any]:
    builders = _builders()
    if model_name not in builders:
        raise ConfigError(f"unknown Faster R-CNN model {model_name!r}; expected one of: {', '.join(builders)}")
    return builders[model_name]


def build_frcnn(model_name: str, num_classes: int, imgsz: int) -> nn.Module:
    """An untrained torchvision Faster R-CNN with ``num_classes`` outputs (K classes + background).

    No weights are fetched here (``weights=None, weights_backbone=None``): pretrained tensors are transferred by
    name afterwards, so that a predictor of another class count is simply left new. Without pretrained backbone
    weights torchvision uses ordinary (trainable) BatchNorm and makes every backbone layer trainable; freezing is
    our strategies' job. ``min_size=max_size=imgsz``: the model resizes inputs to a longer side of ``imgsz``.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes must count the background too (K + 1 >= 2), got {num_classes}")
    builder, _ = _builder(model_name)
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, min_size=imgsz, max_size=imgsz)


def coco_weights_url(model_name: str) -> str:
    """torchvision's URL of the COCO_V1 checkpoint (what pipeline/assets.py names for this model)."""
    _, weights = _builder(model_name)
    return str(weights.url)
