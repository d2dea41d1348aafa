"""Training: one entry point for every model family (``pipeline/families/``), sharing ``common.py``'s strategies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.families import FAMILIES, get_family

if TYPE_CHECKING:
    from pipeline.config import Params
    from pipeline.train.common import TrainResult


def train_model(params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
                raw_dir: Path = Path("data/raw"), mirrors: list[Path] | None = None, trust: bool = False,
                progress: bool = True) -> TrainResult:
    """Train the family named by ``train.family``; heavy imports happen only for that family.

    ``trust`` admits pretrained weights without a pinned checksum (the CLI's ``--trust``). ``train.device`` "0,1" or
    "cpu:N" trains data-parallel: under ``torchrun`` for a family whose loop is detflow's
    (:mod:`pipeline.train.distributed`), by the family's own trainer otherwise (YOLO: Ultralytics' DDP on GPUs).
    """
    from pipeline.train import distributed

    family = get_family(params.train.family)
    plan = distributed.device_plan(params.train.device)
    if plan is not None and not distributed.in_rank():
        if family.data_parallel == "torchrun":
            return distributed.launch(plan, params, prepared=prepared, out_dir=out_dir, reports_dir=reports_dir,
                                      workdir=workdir, raw_dir=raw_dir, mirrors=mirrors, trust=trust, progress=progress)
        if plan.kind == "cpu" or family.data_parallel != "own":
            torchrun = sorted(n for n, f in FAMILIES.items() if f.data_parallel == "torchrun")
            own = " (it trains on GPU lists such as 0,1 with its own DDP)" if family.data_parallel == "own" else ""
            where = "on the CPU" if plan.kind == "cpu" else "on several GPUs"
            raise ConfigError(f"train.device {params.train.device!r}: {family.title} does not train data-parallel "
                              f"{where}{own}; families that do: {', '.join(torchrun)}")
    return family.train(params, prepared, out_dir, reports_dir, workdir, raw_dir, mirrors, trust, progress)
