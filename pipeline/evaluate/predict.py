"""Run a trained PyTorch checkpoint (any family) with the shared pre/post-processing.

The ONNX engine uses the same ``pipeline.infer.processing`` letterbox and the same family post-processing, so
PyTorch/ONNX parity measures the network alone, never a second resize or NMS. Loading goes through the family's
inference loader: scoring a model imports no training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.contracts.checkpoint import CheckpointMeta
from pipeline.contracts.detections import Detections
from pipeline.errors import DetflowError
from pipeline.families import FAMILIES, FamilySpec, artifact_family
from pipeline.families.backend import FamilyBackend, LoadedModel
from pipeline.families.backends import backend_of
from pipeline.infer.processing import preprocess, shape_groups
from pipeline.ultralytics_env import configure_environment

EXPECTED = "expected a PyTorch checkpoint written by `detflow train` (e.g. models/train/best.pt)"


@dataclass
class TorchDetector:
    """A trained model ready for inference on RGB uint8 images."""

    family: FamilySpec
    backend: FamilyBackend
    loaded: LoadedModel
    meta: CheckpointMeta

    @property
    def imgsz(self) -> int:
        return self.meta.imgsz

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def stride(self) -> int:
        """> 0: minimal (rect) letterbox padding to this multiple; 0: square (fixed-shape models)."""
        return self.loaded.stride

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> TorchDetector:
        """A detflow checkpoint of a registered family; any other, damaged or truncated file fails with one line
        naming it and what was expected."""
        path = Path(path)
        if not path.is_file():
            raise DetflowError(f"model checkpoint {path} not found; run `detflow train` (or `dvc repro`)")
        configure_environment()  # unpickling a YOLO checkpoint imports Ultralytics: keep it offline and in the project
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # what the unpickler raises depends on the damage (UnpicklingError, EOFError, ...)
            reason = (str(e).splitlines() or [""])[0][:160] or type(e).__name__
            raise DetflowError(f"cannot read model checkpoint {path}: not a PyTorch checkpoint, or truncated "
                               f"({reason}); {EXPECTED}") from None
        meta = CheckpointMeta.read(ckpt, path)
        family = artifact_family(meta.family)
        if family is None:
            raise DetflowError(f"model checkpoint {path} is of family {meta.family!r}; this detflow knows: "
                               f"{', '.join(sorted(FAMILIES))}")
        backend = backend_of(family)
        return cls(family, backend, backend.load(ckpt, meta, path, device), meta)

    def predict(self, images: list[np.ndarray], conf: float = 0.001, iou: float = 0.7,
                max_det: int = 300) -> list[Detections]:
        groups = shape_groups(images, self.imgsz, self.stride)
        if len(groups) > 1:  # one call per canvas shape, as the engine (no padding to a larger batch-mate)
            out: list[Detections | None] = [None] * len(images)
            for idx in groups:
                for i, d in zip(idx, self.predict([images[i] for i in idx], conf, iou, max_det), strict=True):
                    out[i] = d
            return [d for d in out if d is not None]
        batch, metas = preprocess(images, self.imgsz, stride=self.stride)
        calls = self.loaded.forward(batch)
        groups = [metas] if self.family.dynamic_batch else [[m] for m in metas]
        return [d for outputs, ms in zip(calls, groups, strict=True)
                for d in self.family.postprocess(outputs, ms, conf=conf, iou=iou, max_det=max_det,
                                                 model=self.meta.model)]
