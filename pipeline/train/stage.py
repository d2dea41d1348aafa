"""The ``detflow train`` stage: the family named by ``train.family`` trains through its backend."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.families.backends import backend_of

if TYPE_CHECKING:
    from pipeline.config import Params
    from pipeline.contracts.results import TrainResult


def train_model(params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
                raw_dir: Path = Path("data/raw"), mirrors: list[Path] | None = None, trust: bool = False,
                progress: bool = True) -> TrainResult:
    """Train the family named by ``train.family``; heavy imports happen only for that family's backend.

    ``trust`` admits pretrained weights without a pinned checksum (the CLI's ``--trust``).
    """
    return backend_of(params.train.family).train(params, prepared, out_dir, reports_dir, workdir, raw_dir, mirrors,
                                                 trust, progress)
