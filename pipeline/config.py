"""Typed pipeline parameters with the model family checked: what every model stage (train, evaluate, export,
infer, report) and the flow load.

:mod:`pipeline.params` holds every section's schema and the loader; this module adds what needs the family
registry (``pipeline/families/``, torch-free specs): ``train.family`` must be registered, ``train.model`` one of
its models (``auto``: the family's default), and ``export`` gets one typed section per family, with its defaults.
Unknown keys and bad values fail loudly, naming the allowed values, before any work starts.

One source of defaults: every field default equals the value in the shipped ``params.yaml`` (tests compare every
key), so a run without ``params.yaml`` computes what a fresh clone's ``params.yaml`` would; such a run says so on
stderr.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, create_model, field_validator, model_validator

from pipeline.families import FAMILIES, RENAMED, ExportSettings, get_family, renamed_hint
from pipeline.params import (
    DEFAULT_PARAMS,
    AugmentParams,
    BaseExportParams,
    BaseParams,
    BaseTrainParams,
    DataParams,
    EvaluateParams,
    ExternalSetParams,
    GateParams,
    PhantomParams,
    PrepareParams,
    load_as,
    parse_class_map,
    parse_override,
)

__all__ = ["DEFAULT_PARAMS", "AugmentParams", "DataParams", "EvaluateParams", "ExportParams", "ExternalSetParams",
           "GateParams", "Params", "PhantomParams", "PrepareParams", "TrainParams", "load_params", "named_assets",
           "parse_class_map", "parse_override"]


class TrainParams(BaseTrainParams):
    """``train``, with ``family`` and ``model`` checked against the family registry."""

    @model_validator(mode="before")
    @classmethod
    def _auto_model(cls, data: Any) -> Any:
        """``model: auto`` picks the family's default, so switching family alone is a valid experiment."""
        if isinstance(data, dict) and data.get("model", "auto") == "auto":
            family = FAMILIES.get(data.get("family", "yolo"))
            if family is not None:
                data = {**data, "model": family.default_model}
        return data

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v in RENAMED:
            new = get_family(RENAMED[v])
            raise ValueError(f"family {v!r} was renamed: use train.family: {new.name} (its models: "
                             f"{', '.join(new.models)}; export settings under export.{new.name})")
        if v not in FAMILIES:
            raise ValueError(f"unknown model family {v!r}; expected one of: {', '.join(sorted(FAMILIES))}"
                             f"{renamed_hint(v)}")
        return v

    @model_validator(mode="after")
    def _model_matches_family(self) -> TrainParams:
        allowed = get_family(self.family).models
        if self.model not in allowed:
            raise ValueError(
                f"unknown model {self.model!r} for family {self.family!r}; expected one of: {', '.join(allowed)}"
            )
        return self


class _ExportBase(BaseExportParams):
    """Settings for every family; each family's own are nested under ``export.<family>`` (see below)."""

    model_config = {"extra": "forbid"}

    @model_validator(mode="before")
    @classmethod
    def _renamed_sections(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in RENAMED.items():
                if old in data:
                    raise ValueError(f"export.{old} was renamed: put its keys under export.{new}")
        return data

    @model_validator(mode="after")
    def _family_sections(self) -> _ExportBase:  # the base's check of untyped sections does not apply
        return self

    def of(self, family: str) -> ExportSettings:
        """``export.<family>``: the opset, parity limit and exporter options of one family."""
        return getattr(self, get_family(family).name)


#: ``export`` = the shared keys + one section per registered family (its ``export_params``, with their defaults).
ExportParams = create_model(  # type: ignore[call-overload]
    "ExportParams", __base__=_ExportBase,
    **{name: (fam.export_params, Field(default_factory=fam.export_params)) for name, fam in sorted(FAMILIES.items())})


class Params(BaseParams):
    """Every section, ``train`` and ``export`` checked against the family registry."""

    train: TrainParams = Field(default_factory=TrainParams)
    export: ExportParams = Field(default_factory=ExportParams)  # type: ignore[valid-type]


def named_assets(params: Params) -> list[tuple[str, bool]]:
    """``(asset name, required)`` for the named assets (``pipeline/assets.py``) these params use; optional ones may
    fail without harm (the train stage falls back as configured).

    ``data.source=bccd`` needs the BCCD set; a model with ``pretrained`` coco (required) or auto (optional) needs
    its family's COCO asset when that asset's full sha256 is pinned. Other checkpoints are left to the train stage,
    which resolves them through the same resolver (and refuses unverifiable ones without ``--trust``).
    """
    from pipeline import assets

    out: list[tuple[str, bool]] = []
    if params.data.source == "bccd":  # the named dataset prepare resolves (pipeline/data/prepare.py)
        out.append(("bccd", True))
    tp = params.train
    name = get_family(tp.family).coco_assets.get(tp.model)
    if tp.pretrained in ("coco", "auto") and name in assets.ASSETS and assets.ASSETS[name].pinned:
        out.append((name, tp.pretrained == "coco"))
    return out


def load_params(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Params:
    """Read ``params.yaml`` (missing file -> defaults), apply overrides, validate the whole tree."""
    return load_as(Params, path, overrides)
