"""A training run's identity and place: the prepared dataset it needs, its fingerprint (what a resume must match)
and the work folder its resumable state lives in."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.config import TrainParams


def check_prepared(prepared: Path) -> dict[str, Any]:
    """The prepared dataset must exist before training; return its prepare_info.json."""
    needed = [prepared / "dataset.yaml", prepared / "prepare_info.json", prepared / "coco" / "train.json",
              prepared / "coco" / "val.json"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise DataError(f"prepared dataset missing ({', '.join(missing)}); run `detflow prepare` (or `dvc repro`)")
    info = json.loads((prepared / "prepare_info.json").read_text())
    n_train = len(json.loads((prepared / "coco" / "train.json").read_text())["images"])
    if n_train == 0:
        raise DataError(f"the train split of {prepared} is empty")
    return info


def run_fingerprint(params: TrainParams, data_fingerprint: str, pretrained_sha: str | None) -> str:
    """Identity of a training run: a checkpoint is resumed only by a run with the same fingerprint."""
    blob = json.dumps({"train": params.model_dump(mode="json", exclude={"resume", "workers"}),
                       "data": data_fingerprint, "pretrained": pretrained_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_workdir() -> Path:
    """Resumable run state lives outside DVC outputs (which DVC deletes before a stage runs)."""
    from pipeline.ultralytics_env import state_root

    return state_root() / "train"
