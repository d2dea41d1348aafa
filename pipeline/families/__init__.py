"""The model-family registry: every family detflow can train, evaluate, export and serve.

Adding a family: a folder ``pipeline/families/<name>/`` whose ``__init__.py`` defines a
:class:`~pipeline.families.base.ModelFamily` (torch-free at import), plus one line below. ``pipeline/config.py``
validates ``train.family``/``train.model`` and builds ``export.<name>`` from this registry; the stages, the engine
and the service dispatch through it.
"""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.families.base import CheckpointMeta, ExportSettings, ModelFamily
from pipeline.families.frcnn import FRCNN
from pipeline.families.yolo import YOLO

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (FRCNN, YOLO)}

__all__ = ["FAMILIES", "CheckpointMeta", "ExportSettings", "ModelFamily", "get_family"]


def get_family(name: str) -> ModelFamily:
    """The registered family ``name``; anything else is an error listing the allowed values."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model family {name!r}; expected one of: {', '.join(sorted(FAMILIES))}") from None
