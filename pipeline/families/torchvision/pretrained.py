"""torchvision initial weights: torchvision's COCO_V1 checkpoints as named assets (pipeline/assets.py: the same
resolver, mirror and checks as YOLO's), or a user file. Both are read with torch's safe loader, which cannot run
code: a state dict, or a dict with a ``model`` state dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.contracts.results import PretrainedSource
from pipeline.errors import AssetError
from pipeline.families.torchvision import TORCHVISION
from pipeline.fileio import sha256_file
from pipeline.train.pretrained import resolve_initial_weights

if TYPE_CHECKING:
    from pipeline.config import TrainParams


def _state_from_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file via torch's safe loader (no code can run): a state dict or ``{'model': ...}``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a full-module pickle, a corrupt/truncated file, not a torch file at all
        raise AssetError(f"could not read weights {path} with torch.load(weights_only=True): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Expected a state dict "
                         "or a dict with a 'model' state dict (full pickled modules are refused).") from e
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise AssetError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise AssetError(f"{path}: no tensors found")
    return state


def resolve_torchvision_pretrained(tp: TrainParams, raw_dir: Path = Path("data/raw"),
                                   mirrors: Sequence[Path] | None = None, trust: bool = False, progress: bool = False
                                   ) -> tuple[PretrainedSource, dict[str, torch.Tensor] | None]:
    """Initial weights per ``train.pretrained``.

    ``none``: scratch. ``coco``/``auto``: the model's COCO asset through :func:`pipeline.assets.resolve` (raw folder,
    mirror ``weights/<file>``, download), verified there; unavailable: ``coco`` raises, ``auto`` trains from scratch
    with a loud note. A path: loaded with the safe loader; ``pretrained_sha256`` must match when set.
    """
    def load(path: Path, expected: str | None) -> dict[str, torch.Tensor]:
        if expected is not None and (sha := sha256_file(path)) != expected.strip().lower():
            raise AssetError(f"refusing to use {path}: sha256 mismatch - train.pretrained_sha256 is {expected}, "
                             f"the file's is {sha}. Fetch the right file or fix the pinned checksum.")
        return _state_from_file(path)

    return resolve_initial_weights(tp, TORCHVISION.coco_assets, load, raw_dir, mirrors, trust, progress)


def transferable_params(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Learnable parameters that will receive pretrained values (same name and shape)."""
    return [n for n, p in model.named_parameters() if n in state and tuple(state[n].shape) == tuple(p.shape)]
