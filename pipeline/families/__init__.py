"""The model-family registry: every family detflow can train, evaluate, export and serve, by its torch-free spec.

Adding a family: a folder ``pipeline/families/<name>/`` whose ``__init__.py`` defines a
:class:`~pipeline.families.spec.FamilySpec` (torch-free at import) and whose ``backend.py`` defines ``BACKEND``
(:class:`~pipeline.families.backend.FamilyBackend`), plus one line below. ``pipeline/config.py`` validates
``train.family``/``train.model`` and builds ``export.<name>`` from this registry; the engine and the service
post-process through it; the stages that train, score or export reach the backend through
:func:`pipeline.families.backends.backend_of`.
"""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.families.spec import ExportSettings, FamilySpec
from pipeline.families.torchvision import TORCHVISION
from pipeline.families.yolo import YOLO

FAMILIES: dict[str, FamilySpec] = {f.name: f for f in (TORCHVISION, YOLO)}

#: Earlier family names that checkpoints and model cards written by older detflow versions carry.
RENAMED: dict[str, str] = {old: f.name for f in FAMILIES.values() for old in f.renamed_from}

__all__ = ["FAMILIES", "RENAMED", "ExportSettings", "FamilySpec", "artifact_family", "get_family", "renamed_hint"]


def renamed_hint(name: str) -> str:
    """`` (renamed: use torchvision)`` for a family's earlier name, else empty."""
    return f"; family {name!r} was renamed {RENAMED[name]!r}" if name in RENAMED else ""


def get_family(name: str) -> FamilySpec:
    """The registered family ``name``; anything else is an error listing the allowed values."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model family {name!r}; expected one of: {', '.join(sorted(FAMILIES))}"
                          f"{renamed_hint(name) if isinstance(name, str) else ''}") from None


def artifact_family(name: str) -> FamilySpec | None:
    """The family a checkpoint header or a model card names, earlier names included (what an older export wrote
    still loads); None when no registered family has that name."""
    return FAMILIES.get(RENAMED.get(name, name))
