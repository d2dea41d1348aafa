"""The table of torchvision detection models the ``torchvision`` family trains: one row per ``train.model`` value.

Everything that differs between torchvision's detectors is a field of its row, so the family's one data / loop /
checkpoint / export / post-processing implementation serves every row (as ``--model`` does in torchvision's own
``references/detection``). Adding a model: one :class:`TorchvisionModel` row below and one COCO weights entry in
``pipeline/assets.py`` (``_torchvision_coco``); the family contract test (tests/) then trains, exports and serves it.

Plain data, no torch: the config layer validates ``train.model`` against this table and the ONNX engine reads the
post-processing rule from it; the torch side (``build.py``) looks the builder up by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ConfigError

#: Layer groups, from the input side to the output side; the freezing strategies (``pipeline/train/strategies.py``)
#: freeze backbone and neck, the head is always trained.
GROUPS = ("backbone", "neck", "head")


@dataclass(frozen=True)
class TorchvisionModel:
    """One torchvision detector as detflow trains, exports and serves it.

    ``name``: the builder in ``torchvision.models.detection`` (and the ``train.model`` value). ``weights``: its COCO
    weights enum member (``<Enum>.<member>``), whose URL ``asset`` in ``pipeline/assets.py`` names. ``groups``: the
    parameter-name prefixes of backbone, neck and head (every parameter in exactly one). ``loss_keys``: the loss
    dict the model returns in training. ``size``: the input size rule: ``longest_side`` builds the model with
    ``min_size=max_size=imgsz`` (it resizes every image to a longer side of ``imgsz``, as the letterbox does);
    ``fixed`` keeps the builder's own square input (``fixed_size`` px, the model resizes to it) and training
    letterboxes to a square first, as inference does. ``score_thresh``: the attribute path of the model's score
    threshold (lowered to 0.001 for scoring). ``nms``: ``graph`` when the exported ONNX graph applies the model's
    own NMS, ``detflow`` when it stops before NMS and ``postprocess.py`` applies class-aware NMS.
    """

    name: str
    weights: str
    asset: str
    groups: dict[str, tuple[str, ...]]
    loss_keys: tuple[str, ...]
    size: Literal["longest_side", "fixed"] = "longest_side"
    fixed_size: int | None = None
    score_thresh: str = "score_thresh"
    nms: Literal["graph", "detflow"] = "graph"


_FASTER_RCNN_GROUPS = {"backbone": ("backbone.body.",), "neck": ("backbone.fpn.", "rpn."), "head": ("roi_heads.",)}
_FASTER_RCNN_LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")

MODELS: dict[str, TorchvisionModel] = {m.name: m for m in (
    TorchvisionModel("fasterrcnn_mobilenet_v3_large_fpn", "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
                     "fasterrcnn_mobilenet_v3_large_fpn-coco", _FASTER_RCNN_GROUPS, _FASTER_RCNN_LOSSES,
                     score_thresh="roi_heads.score_thresh"),
    TorchvisionModel("fasterrcnn_mobilenet_v3_large_320_fpn", "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1",
                     "fasterrcnn_mobilenet_v3_large_320_fpn-coco", _FASTER_RCNN_GROUPS, _FASTER_RCNN_LOSSES,
                     score_thresh="roi_heads.score_thresh"),
    TorchvisionModel("fasterrcnn_resnet50_fpn_v2", "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
                     "fasterrcnn_resnet50_fpn_v2-coco", _FASTER_RCNN_GROUPS, _FASTER_RCNN_LOSSES,
                     score_thresh="roi_heads.score_thresh"),
    TorchvisionModel("retinanet_resnet50_fpn_v2", "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1",
                     "retinanet_resnet50_fpn_v2-coco",
                     {"backbone": ("backbone.body.",), "neck": ("backbone.fpn.",), "head": ("head.",)},
                     ("classification", "bbox_regression")),
    TorchvisionModel("ssdlite320_mobilenet_v3_large", "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1",
                     "ssdlite320_mobilenet_v3_large-coco",
                     {"backbone": ("backbone.features.",), "neck": ("backbone.extra.",), "head": ("head.",)},
                     ("bbox_regression", "classification"), size="fixed", fixed_size=320),
)}


def model_row(name: str) -> TorchvisionModel:
    """The row of ``train.model`` (or a card's / checkpoint's ``model``); anything else lists the allowed values."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown torchvision model {name!r}; expected one of: {', '.join(MODELS)}") from None
