"""The ``detflow train`` stage: the family named by ``train.family`` trains through its backend.

``python -m pipeline.train.stage SPEC`` is a rank of a data-parallel run (:func:`pipeline.train.distributed.launch`
starts it under ``torchrun``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.families import FAMILIES, get_family
from pipeline.families.backends import backend_of

if TYPE_CHECKING:
    from pipeline.config import Params
    from pipeline.contracts.results import TrainResult


def _train_here(params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path, raw_dir: Path,
                mirrors: list[Path] | None, trust: bool, progress: bool) -> TrainResult:
    """This process trains (one process, or one rank of a data-parallel run)."""
    return backend_of(params.train.family).train(params, prepared, out_dir, reports_dir, workdir, raw_dir, mirrors,
                                                 trust, progress)


def train_model(params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
                raw_dir: Path = Path("data/raw"), mirrors: list[Path] | None = None, trust: bool = False,
                progress: bool = True) -> TrainResult:
    """Train the family named by ``train.family``; heavy imports happen only for that family's backend.

    ``trust`` admits pretrained weights without a pinned checksum (the CLI's ``--trust``). ``train.device`` "0,1" or
    "cpu:N" trains data-parallel: under ``torchrun`` for a family whose loop is detflow's
    (:mod:`pipeline.train.distributed`), by the family's own trainer otherwise (YOLO: Ultralytics' DDP on GPUs).
    """
    from pipeline.train import distributed

    family = get_family(params.train.family)
    plan = distributed.device_plan(params.train.device)
    if plan is not None and not distributed.in_rank():
        if family.data_parallel == "torchrun":
            return distributed.launch(plan, params, entry="pipeline.train.stage",
                                      prepared=prepared, out_dir=out_dir, reports_dir=reports_dir, workdir=workdir,
                                      raw_dir=raw_dir, mirrors=mirrors, trust=trust, progress=progress)
        if plan.kind == "cpu" or family.data_parallel != "own":
            torchrun = sorted(n for n, f in FAMILIES.items() if f.data_parallel == "torchrun")
            own = " (it trains on GPU lists such as 0,1 with its own DDP)" if family.data_parallel == "own" else ""
            where = "on the CPU" if plan.kind == "cpu" else "on several GPUs"
            raise ConfigError(f"train.device {params.train.device!r}: {family.title} does not train data-parallel "
                              f"{where}{own}; families that do: {', '.join(torchrun)}")
    return _train_here(params, prepared, out_dir, reports_dir, workdir, raw_dir, mirrors, trust, progress)


if __name__ == "__main__":
    from pipeline.train import distributed

    sys.exit(distributed.rank_main(_train_here))
