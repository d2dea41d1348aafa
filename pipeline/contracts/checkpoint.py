"""The header every detflow checkpoint carries, whatever the family: what inference needs to rebuild the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DetflowError

#: Key of the header every detflow checkpoint carries (every family, whatever else the file holds).
HEADER_KEY = "detflow"
HEADER_FORMAT = 1


@dataclass(frozen=True)
class CheckpointMeta:
    """What inference needs from a checkpoint, stored under ``ckpt["detflow"]``: no field has a default."""

    family: str
    model: str
    classes: list[str]
    imgsz: int
    format: int = HEADER_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, ckpt: Any, path: Path) -> CheckpointMeta:
        """The header of a loaded checkpoint; a missing header or field is an error naming ``path``."""
        header = ckpt.get(HEADER_KEY) if isinstance(ckpt, Mapping) else None
        if not isinstance(header, Mapping):
            raise DetflowError(f"model checkpoint {path} has no detflow header (family, model, classes, imgsz); "
                               "expected a checkpoint written by `detflow train` (e.g. models/train/best.pt)")
        missing = [k for k in ("family", "model", "classes", "imgsz") if k not in header]
        if missing:
            raise DetflowError(f"model checkpoint {path}: the detflow header lacks {', '.join(missing)}; "
                               "retrain with `detflow train`")
        classes, imgsz = header["classes"], header["imgsz"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise DetflowError(f"model checkpoint {path}: header classes {classes!r} is not a list of names")
        if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 1:
            raise DetflowError(f"model checkpoint {path}: header imgsz {imgsz!r} is not a positive integer")
        return cls(family=str(header["family"]), model=str(header["model"]), classes=list(classes), imgsz=imgsz,
                   format=int(header.get("format", HEADER_FORMAT)))
