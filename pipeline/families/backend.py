"""What a model family does with torch: the :class:`FamilyBackend` interface (pretrained weights, training,
loading a checkpoint for inference, ONNX export) and the :class:`LoadedModel` a load returns.

Each family's ``backend.py`` defines ``BACKEND``, an instance of this interface; the stages that need it (train,
evaluate, export) reach it through :func:`pipeline.families.backends.backend_of`, never through the spec, so the
config layer and the serving path never import training code. Training params (:mod:`pipeline.config`) are an
input here: a backend sits above the config layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.families.spec import ExportSettings, FamilySpec

if TYPE_CHECKING:
    from pipeline.config import Params, TrainParams
    from pipeline.contracts.checkpoint import CheckpointMeta
    from pipeline.contracts.results import PretrainedSource, TrainResult


class LoadedModel(Protocol):
    """A checkpoint loaded for inference (torch), behind the same interface as its ONNX graph."""

    model: Any  # the torch.nn.Module, in eval mode
    stride: int  # > 0: the model takes minimal (rect) letterbox padding to this multiple; 0: square input

    def forward(self, batch: np.ndarray) -> list[list[np.ndarray]]:
        """Outputs for an NCHW batch, in graph-output order: one list per graph call (see ``dynamic_batch``)."""
        ...


class FamilyBackend(ABC):
    """The torch side of one family; ``spec`` is the family it implements."""

    spec: FamilySpec

    @abstractmethod
    def resolve_pretrained(self, tp: TrainParams, raw_dir: Path, mirrors: Sequence[Path] | None, trust: bool,
                           progress: bool) -> tuple[PretrainedSource, Any]:
        """Initial weights per ``train.pretrained`` (coco: through :func:`pipeline.assets.resolve`); ``trust``
        admits an asset or file without a pinned checksum (the CLI's ``--trust``)."""

    @abstractmethod
    def train(self, params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
              raw_dir: Path, mirrors: list[Path] | None, trust: bool, progress: bool) -> TrainResult:
        """Fine-tune on a prepared dataset; publish best/last checkpoints (with the header) and reports."""

    def train_few_shot(self, params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
                       progress: bool, plain_last_epochs: int = 0) -> TrainResult:
        """A short fine-tune from ``train.pretrained`` (a checkpoint of this task) on a few labelled images
        (``detflow adapt --labels``, :mod:`pipeline.fewshot`): no warm-up, no per-epoch validation where the
        family has them, the last ``plain_last_epochs`` epochs without mosaic where it mosaics. By default the
        family's own training run."""
        return self.train(params, prepared, out_dir, reports_dir, workdir, Path("data/raw"), None, False, progress)

    @abstractmethod
    def load(self, ckpt: Any, meta: CheckpointMeta, path: Path, device: str) -> LoadedModel:
        """A loaded checkpoint (already read by ``torch.load``) ready for inference; imports no training code."""

    @abstractmethod
    def export_onnx(self, checkpoint: Path, loaded: LoadedModel, work: Path, imgsz: int,
                    settings: ExportSettings) -> Path:
        """Write ``model.onnx`` under ``work`` (a scratch folder) and return its path."""

    def check_export(self, settings: ExportSettings) -> None:  # noqa: B027 - optional hook
        """Refuse settings this machine cannot export with, before any work (raise DetflowError)."""

    @abstractmethod
    def build(self, model: str, num_classes: int, imgsz: int) -> Any:
        """An untrained ``torch.nn.Module`` of ``model`` for ``num_classes`` classes (no weights fetched)."""

    @abstractmethod
    def layer_groups(self, model: str) -> dict[str, list[str]]:
        """Parameter-name prefixes of each layer group (backbone, neck, head) of ``model``, as the freezing
        strategies use them; every trainable parameter of :meth:`build`'s module is in exactly one group."""
