"""Training: one entry point, two model families sharing one definition of each transfer strategy."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params
from pipeline.train.common import TrainResult


def train_model(params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
                raw_dir: Path = Path("data/raw"), mirrors: list[Path] | None = None, trust: bool = False,
                progress: bool = True) -> TrainResult:
    """Dispatch on ``train.family``; heavy imports happen only for the family in use."""
    if params.train.family == "yolo":
        from pipeline.train.yolo import train_yolo

        return train_yolo(params, prepared, out_dir, reports_dir, workdir, raw_dir, mirrors, trust, progress)
    from pipeline.train.frcnn import train_frcnn

    return train_frcnn(params, prepared, out_dir, reports_dir, workdir, raw_dir, mirrors, trust, progress)
