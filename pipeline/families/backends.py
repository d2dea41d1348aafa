"""From a family's spec to its backend: the one place the stages (train, evaluate, export) cross from the torch-free
spec to the torch side.

Found by convention, not by a second registry: the spec registered in :data:`pipeline.families.FAMILIES` is
defined in the family package's ``__init__.py`` and its backend is that package's ``backend.py`` (``BACKEND``), so
adding a family stays one folder plus one registry line. The import is by name (``importlib``) because the spec
must not import its backend (the backend imports the spec); ``pipeline/lineage.py`` and the import-graph test
know this convention (:func:`backend_module`) and count the edge as an import of every registered backend.
"""

from __future__ import annotations

import importlib

from pipeline.errors import DetflowError
from pipeline.families import FAMILIES, FamilySpec, get_family
from pipeline.families.backend import FamilyBackend

BACKEND_MODULE = "backend"  # <family package>.backend
BACKEND_NAME = "BACKEND"


def backend_module(spec: FamilySpec) -> str:
    """The dotted name of ``spec``'s backend module: ``pipeline.families.<package>.backend``."""
    return f"{type(spec).__module__}.{BACKEND_MODULE}"


def backend_of(family: str | FamilySpec) -> FamilyBackend:
    """The backend of a family (by name, as ``train.family`` or a checkpoint header says, or its spec)."""
    spec = family if isinstance(family, FamilySpec) else get_family(family)
    module = importlib.import_module(backend_module(spec))
    backend = getattr(module, BACKEND_NAME, None)
    if not isinstance(backend, FamilyBackend) or backend.spec is not spec:
        raise DetflowError(f"{module.__name__}.{BACKEND_NAME} is not the backend of family {spec.name!r}")
    return backend


__all__ = ["FAMILIES", "backend_module", "backend_of"]
