"""What training returns: the run's outputs and metrics, and where its initial weights came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PretrainedSource:
    """Where initial weights came from; ``kind`` is coco, path or none."""

    kind: str
    source: str
    path: str | None = None
    sha256: str | None = None
    note: str = ""


@dataclass
class TrainResult:
    family: str
    model: str
    best: Path
    last: Path
    epochs_run: int
    start_epoch: int
    resumed: bool
    metrics: dict[str, float] = field(default_factory=dict)
    transfer: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["best"], d["last"] = str(self.best), str(self.last)
        return d
