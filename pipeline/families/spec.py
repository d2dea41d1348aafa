"""What a model family declares without torch: the :class:`FamilySpec` interface and its export settings.

A family (``yolo``, ``torchvision``) is one folder under ``pipeline/families/`` plus one line in
:data:`pipeline.families.FAMILIES`. Its ``__init__.py`` defines the spec (this interface); its ``backend.py`` the
heavy side (:class:`pipeline.families.backend.FamilyBackend`: pretrained weights, training, loading, export).

The spec is what the config layer (``train.family``/``train.model``, ``export.<family>``), the ONNX engine and the
service need: names and defaults, export settings, card fields, the graph's I/O check and the post-processing of
raw graph outputs. It imports neither torch nor anything above it (config, training, the engine): the serving image
runs it, and ``pipeline/config.py`` builds the params schema from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.contracts.detections import Detections, LetterboxMeta


class ExportSettings(BaseModel):
    """``export.<family>`` params. Every family exports ONNX at some opset and checks parity against PyTorch."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    opset: int
    max_map_delta: float


class FamilySpec(ABC):
    """One detector family, torch-free: safe to use in the serving image."""

    name: ClassVar[str]  # the value of train.family and of the model card's "family"
    title: ClassVar[str]  # for messages: "YOLO", "torchvision detection"
    models: ClassVar[tuple[str, ...]]  # allowed train.model values
    default_model: ClassVar[str]  # what train.model: auto means
    coco_assets: ClassVar[Mapping[str, str]]  # model -> asset name in pipeline/assets.py (COCO weights)
    export_params: ClassVar[type[ExportSettings]]  # the export.<name> section, with its defaults
    dynamic_batch: ClassVar[bool]  # the ONNX graph takes N images per call (else one image per call)
    renamed_from: ClassVar[tuple[str, ...]] = ()  # earlier names of this family in checkpoints and model cards
    #: How ``train.device`` "0,1" / "cpu:N" trains: "torchrun" (detflow starts the ranks and the family's loop uses
    #: pipeline/train/distributed.py), "own" (the family's trainer runs its own DDP for GPU lists), "none" (refused).
    data_parallel: ClassVar[str] = "none"
    #: The trainer accumulates gradients to ``train.nominal_batch`` (one optimizer step per nominal batch), as
    #: Ultralytics does with ``nbs``; False: one step per batch.
    accumulates_to_nominal_batch: ClassVar[bool] = False

    @abstractmethod
    def card_output(self, model: str, classes: list[str]) -> dict[str, Any]:
        """The model card's ``output`` entry: graph output names/shapes and how to decode them."""

    def input_dtype(self, settings: ExportSettings) -> str:
        """The graph input's element type as exported with ``settings``."""
        return "float32"

    @abstractmethod
    def check_graph(self, inputs: Sequence[Any], outputs: Sequence[Any], card: Mapping[str, Any]) -> list[str]:
        """Problems between an onnxruntime session's inputs/outputs and the card (empty: consistent)."""

    @abstractmethod
    def postprocess(self, outputs: Sequence[np.ndarray], metas: Sequence[LetterboxMeta], conf: float, iou: float,
                    max_det: int, model: str) -> list[Detections]:
        """Detections in original-image pixels from one graph call's outputs (``metas``: that call's images;
        ``model``: the card's or checkpoint's model name)."""
