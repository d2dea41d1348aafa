"""The transfer-learning strategies every family follows: which layer groups are frozen at which epoch.

One definition for every family (the groups themselves are the family's: a backend's ``layer_groups``), so
``feature_extraction``, ``fine_tune`` and ``progressive`` mean the same for YOLO and torchvision models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import TrainParams

STRATEGIES = ("feature_extraction", "fine_tune", "progressive")


def frozen_groups_at(strategy: str, unfreeze_at: Sequence[int], epoch: int) -> list[str]:
    """Groups frozen during ``epoch`` (0-based).

    feature_extraction: the backbone, always. fine_tune: nothing. progressive: backbone and neck at first;
    at epoch ``unfreeze_at[0]`` the neck is released, at ``unfreeze_at[1]`` the backbone.
    """
    if strategy == "fine_tune":
        return []
    if strategy == "feature_extraction":
        return ["backbone"]
    if strategy == "progressive":
        order = ["neck", "backbone"]  # released in this order
        released = sum(1 for e in unfreeze_at[: len(order)] if epoch >= e)
        return [g for g in ("backbone", "neck") if g not in order[:released]]
    raise ConfigError(f"unknown strategy {strategy!r}; expected one of: feature_extraction, fine_tune, progressive")


def validate_schedule(params: TrainParams) -> None:
    if params.strategy == "progressive":
        ua = list(params.unfreeze_at)
        if not ua or any(e < 1 for e in ua) or ua != sorted(set(ua)):
            raise ConfigError(f"train.unfreeze_at must be strictly increasing epochs >= 1, got {ua}")
        if len(ua) > 2:
            raise ConfigError(f"train.unfreeze_at has {len(ua)} entries; there are 2 groups to release "
                              "(neck, then backbone)")


def names_in_groups(names: Iterable[str], prefixes: dict[str, list[str]], groups: Iterable[str]) -> list[str]:
    wanted = [p for g in groups for p in prefixes[g]]
    return [n for n in names if any(n.startswith(p) for p in wanted)]
