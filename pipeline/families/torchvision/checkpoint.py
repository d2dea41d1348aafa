"""torchvision training checkpoints: what a resumed run needs to continue exactly, written atomically.

A checkpoint is one dict loadable with ``torch.load(weights_only=True)`` (no pickled classes) and carries the detflow
header (:class:`~pipeline.contracts.checkpoint.CheckpointMeta`) that inference reads (see ``inference.py``).
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.contracts.checkpoint import HEADER_KEY, CheckpointMeta
from pipeline.families.torchvision import TORCHVISION
from pipeline.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from pipeline.config import Params
    from pipeline.contracts.results import PretrainedSource

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Everything besides the tensors that a resumed run needs to continue exactly."""

    best_fitness: float = float("-inf")
    best_epoch: int = -1
    epochs_no_improve: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    frozen_by_epoch: dict[int, list[str]] = field(default_factory=dict)
    transferred_params: list[str] = field(default_factory=list)
    transfer_report: dict[str, Any] | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> RunState:
        return cls(best_fitness=float(ckpt["best_fitness"]), best_epoch=int(ckpt.get("best_epoch", -1)),
                   epochs_no_improve=int(ckpt.get("epochs_no_improve", 0)),
                   history=list(ckpt["history"])[: int(ckpt["epoch"]) + 1],
                   frozen_by_epoch={int(k): list(v) for k, v in ckpt["frozen_by_epoch"].items()},
                   transferred_params=list(ckpt["transferred_params"]),
                   transfer_report=ckpt.get("transfer_report"))


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def make_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any, scaler: Any,
                    epoch: int, st: RunState, params: Params, fingerprint: str, classes: list[str],
                    pretrained: PretrainedSource, finished: bool) -> dict[str, Any]:
    return {
        HEADER_KEY: CheckpointMeta(family=TORCHVISION.name, model=params.train.model, classes=list(classes),
                                   imgsz=params.train.imgsz).to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "best_fitness": float(st.best_fitness),
        "best_epoch": st.best_epoch,
        "epochs_no_improve": st.epochs_no_improve,
        "history": st.history,
        "frozen_by_epoch": st.frozen_by_epoch,
        "transferred_params": st.transferred_params,
        "transfer_report": st.transfer_report,
        "finished": finished,
        "params": params.model_dump(mode="json"),
        "fingerprint": fingerprint,
        "pretrained": asdict(pretrained),
    }


def load_resumable(last: Path, fingerprint: str, epochs: int) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None: absent, unreadable, another run, or a finished run."""
    if not last.is_file():
        return None
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as e:  # torn by a kill during a non-atomic copy, or disk trouble: start over, and say so
        log.warning("ignoring unreadable checkpoint %s (%s); training starts from epoch 0", last, e)
        return None
    header = ckpt.get(HEADER_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(header, dict) or header.get("family") != TORCHVISION.name \
            or ckpt.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s: not from this run configuration", last)
        return None
    if ckpt.get("finished") or ckpt.get("optimizer") is None or int(ckpt.get("epoch", -1)) >= epochs - 1:
        log.info("previous run in %s finished; training again from epoch 0", last.parent)
        return None
    return ckpt
