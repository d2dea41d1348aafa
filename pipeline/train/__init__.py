"""Training: one entry point for every model family (``pipeline/families/``), sharing ``common.py``'s strategies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.families import get_family

if TYPE_CHECKING:
    from pipeline.config import Params
    from pipeline.train.common import TrainResult


def train_model(params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
                raw_dir: Path = Path("data/raw"), mirrors: list[Path] | None = None, trust: bool = False,
                progress: bool = True) -> TrainResult:
    """Train the family named by ``train.family``; heavy imports happen only for that family.

    ``trust`` admits pretrained weights without a pinned checksum (the CLI's ``--trust``).
    """
    return get_family(params.train.family).train(params, prepared, out_dir, reports_dir, workdir, raw_dir, mirrors,
                                                 trust, progress)
