"""Typed pipeline parameters that need no model family: every section's schema, and the loader (``params.yaml``,
``--set section.key=value`` overrides, validation).

Unknown keys and bad values fail loudly, naming the allowed values, before any work starts.

Two tiers, so that the stages that never touch a model (``phantom``, ``prepare``) do not depend on the family
registry (their DVC deps, computed from imports, stay free of model code): here ``train.family`` and
``train.model`` are names and ``export.<family>`` is a mapping per family; :mod:`pipeline.config` checks them
against the family registry (``model: auto`` resolved, ``export.<family>`` typed with its defaults). The
model stages and the flow load params through :func:`pipeline.config.load_params`; ``phantom`` and ``prepare``
through :func:`load_params` here, which leaves the family-specific keys to the stages that read them.

One source of defaults: every field default below equals the value in the shipped ``params.yaml``
(tests/code/test_defaults.py compares every key), so a run without ``params.yaml`` computes what a fresh clone's
``params.yaml`` would; such a run says so on stderr.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
log = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _not_blank(value: str, name: str, expected: str) -> str:
    """``value`` unless it is empty or only spaces (a YAML key left without a value)."""
    if not value.strip():
        raise ValueError(f"{name} is empty; expected {expected}")
    return value


class PhantomParams(_Section):
    patients: int = Field(24, ge=1, le=10_000)
    slices: int = Field(8, ge=1, le=512)
    size: int = Field(256, ge=64, le=2048)
    seed: int = 0
    max_nodules: int = Field(3, ge=0, le=20)
    min_radius: int = Field(3, ge=1)
    max_radius: int = Field(15, ge=1)
    empty_fraction: float = Field(0.3, ge=0.0, le=1.0)
    vessels: float = Field(8.0, ge=0.0, le=100.0)
    ground_glass_fraction: float = Field(0.25, ge=0.0, le=1.0)
    # The scanner ("site"): the defaults are site A, today's phantom byte for byte; see pipeline/data/phantom.py.
    pixel_spacing: float = Field(0.7, ge=0.1, le=5.0)  # mm per pixel; the patient stays the same physical size
    noise_hu: float = Field(10.0, ge=0.0, le=500.0)  # sigma of the image noise, HU
    sharpness: float = Field(0.0, ge=-5.0, le=5.0)  # reconstruction kernel: > 0 sharpen, < 0 smooth, 0 none
    hu_offset: float = Field(0.0, ge=-500.0, le=500.0)  # HU calibration error added to every pixel

    @model_validator(mode="after")
    def _radii(self) -> PhantomParams:
        if self.min_radius > self.max_radius:
            raise ValueError(f"min_radius ({self.min_radius}) must be <= max_radius ({self.max_radius})")
        return self


class DataParams(_Section):
    source: str = "phantom"
    format: Literal["auto", "dicom_csv", "voc", "coco", "yolo"] = "auto"
    classes: list[str] | None = None
    window: Literal["auto"] | tuple[float, float] = "auto"

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _not_blank(v, "data.source", "one of: phantom, bccd, or a path to a dataset folder")

    @field_validator("window")
    @classmethod
    def _window(cls, v: Any) -> Any:
        if isinstance(v, tuple) and v[1] <= 0:
            raise ValueError(f"window width must be > 0, got {v[1]}")
        return v


class PrepareParams(_Section):
    split: Literal["auto", "patient", "official"] = "auto"
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0)
    clip_tolerance_px: float = Field(4.0, ge=0.0)
    duplicate_iou: float = Field(0.95, gt=0.0, le=1.0)
    near_duplicate_iou: float | None = Field(0.9, gt=0.0, le=1.0)
    pseudonym_salt: str = "detflow"

    @model_validator(mode="after")
    def _fractions(self) -> PrepareParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1 so the train split is not empty")
        return self


class AugmentParams(_Section):
    fliplr: float = Field(0.0, ge=0.0, le=1.0)
    flipud: float = Field(0.0, ge=0.0, le=1.0)
    hsv: bool = True
    scale: float = Field(0.5, ge=0.0, lt=1.0)
    mosaic: bool = True
    stain: float = Field(0.0, ge=0.0, lt=1.0)  # pipeline.augment: H&E(+DAB) optical-density jitter (microscopy)
    window: float = Field(0.0, ge=0.0, lt=1.0)  # pipeline.augment: intensity window jitter (radiology)
    gamma: float = Field(0.0, ge=0.0, lt=1.0)  # pipeline.augment: gamma jitter


class BaseTrainParams(_Section):
    """``train``; ``family`` and ``model`` are checked against the family registry by :mod:`pipeline.config`."""

    family: str = "yolo"
    model: str = "auto"
    pretrained: str = "auto"
    pretrained_sha256: str | None = None
    strategy: Literal["feature_extraction", "fine_tune", "progressive"] = "fine_tune"
    unfreeze_at: list[int] = Field(default_factory=lambda: [2, 4])
    backbone_lr_mult: float = Field(1.0, gt=0.0, le=1.0)
    epochs: int = Field(20, ge=1, le=10_000)
    imgsz: int = Field(256, ge=32, le=4096)
    batch: int = Field(16, ge=1, le=1024)
    nominal_batch: int = Field(16, ge=1, le=4096)
    optimizer: Literal["SGD", "AdamW", "Adam", "auto"] = "auto"
    lr: float = Field(0.01, gt=0.0, le=1.0)
    patience: int = Field(50, ge=0)
    seed: int = 0
    workers: int = Field(2, ge=0, le=64)
    cpu_threads: int = Field(0, ge=0, le=256)
    device: str = "auto"
    resume: Literal["auto", "never"] = "auto"
    augment: AugmentParams = Field(default_factory=AugmentParams)

    @field_validator("family", "model")
    @classmethod
    def _named(cls, v: str, info: Any) -> str:
        return _not_blank(v, info.field_name, "a name")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = str(v).strip()
        ok = v in ("auto", "cpu", "cuda") or all(p.strip().isdigit() for p in v.split(","))
        if not ok:
            raise ValueError(f"unknown device {v!r}; expected one of: auto, cpu, cuda, or GPU indices like 0 or 0,1")
        return v

    @field_validator("pretrained_sha256", mode="before")
    @classmethod
    def _sha(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, str):
            raise ValueError("must be a quoted string of 64 hex digits (YAML read it as a number)")
        if len(v) != 64 or any(c not in "0123456789abcdefABCDEF" for c in v):
            raise ValueError(f"must be 64 hex digits, got {v!r}")
        return v.lower()

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, v: str) -> str:
        return _not_blank(v, "pretrained", "one of: auto, coco, none, or a path to weights")


class EvaluateParams(_Section):
    split: Literal["train", "val", "test"] = "test"
    conf: float = Field(0.25, gt=0.0, lt=1.0)
    nms_iou: float = Field(0.7, gt=0.0, le=1.0)
    froc_iou: float = Field(0.1, gt=0.0, le=1.0)
    bootstrap: int = Field(1000, ge=0, le=100_000)
    seed: int = 0
    batch: int = Field(8, ge=1, le=256)
    preview_images: int = Field(16, ge=0, le=64)


class GateParams(_Section):
    min_map50: float = Field(0.5, ge=0.0, le=1.0)
    min_sensitivity_at_1fp: float = Field(0.5, ge=0.0, le=1.0)
    min_cpm: float = Field(0.4, ge=0.0, le=1.0)
    max_regression: float | None = Field(0.05, ge=0.0, le=1.0)
    champion: str = "models/registry/champion.json"
    min_external_map50: float | None = Field(None, ge=0.0, le=1.0)  # per external set; None: no check


_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def parse_class_map(value: Any) -> dict[str, str]:
    """``"rbc=RBC,wbc=WBC"`` or a mapping -> ``{external label: model class}``; a bad entry is one ValueError line."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        pairs: list[tuple[Any, Any]] = []
        for item in (part.strip() for part in value.split(",")):
            if item.count("=") != 1:
                raise ValueError(f"class map entry {item!r} must look like external=MODEL_CLASS "
                                 "(e.g. rbc=RBC,wbc=WBC)")
            key, _, target = item.partition("=")
            pairs.append((key.strip(), target.strip()))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ValueError(f"class map must be a mapping or a string like rbc=RBC,wbc=WBC, got {type(value).__name__}")
    out: dict[str, str] = {}
    for key, target in pairs:
        if not isinstance(key, str) or not isinstance(target, str) or not key or not target:
            raise ValueError(f"class map entry {key!r}: {target!r} must map a label to a class name (both non-empty "
                             "text)")
        if key in out:
            raise ValueError(f"class map names external label {key!r} twice")
        out[key] = target
    return out


class ExternalSetParams(_Section):
    """One labelled dataset from another site, scored by the ``external`` stage (see pipeline/evaluate/external.py)."""

    name: str
    source: str
    format: Literal["auto", "dicom_csv", "voc", "coco", "yolo"] = "auto"
    class_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SET_NAME.fullmatch(v):
            raise ValueError(f"name {v!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                             "digit (it names the folder reports/external/<name>)")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _not_blank(v, "source", "a path to a labelled dataset (or bccd)")

    @field_validator("class_map", mode="before")
    @classmethod
    def _class_map(cls, v: Any) -> dict[str, str]:
        return parse_class_map(v)


class BaseExportParams(_Section):
    """``export``: the settings of every family here; each family's own, under ``export.<family>``, are mappings
    at this tier (typed with their defaults by :mod:`pipeline.config`)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    parity_iou: float = Field(0.9, gt=0.0, le=1.0)
    max_det: int = Field(300, ge=1, le=10_000)

    @model_validator(mode="after")
    def _family_sections(self) -> BaseExportParams:
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):
                raise ValueError(f"export.{key} must be a section of one model family's settings (a mapping), "
                                 f"got {value!r}")
        return self


class BaseParams(_Section):
    """Every section; ``train`` and ``export`` as names and mappings (see the module docstring)."""

    phantom: PhantomParams = Field(default_factory=PhantomParams)
    data: DataParams = Field(default_factory=DataParams)
    prepare: PrepareParams = Field(default_factory=PrepareParams)
    train: BaseTrainParams = Field(default_factory=BaseTrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    gate: GateParams = Field(default_factory=GateParams)
    export: BaseExportParams = Field(default_factory=BaseExportParams)
    external: list[ExternalSetParams] = Field(default_factory=list)

    @field_validator("external")
    @classmethod
    def _unique_names(cls, v: list[ExternalSetParams]) -> list[ExternalSetParams]:
        names = [s.name for s in v]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"external set names must be unique; repeated: {', '.join(dup)}")
        return v


_LIST_SECTIONS = frozenset({"external"})  # top-level params that are a list, set whole by an override


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    whole_list = len(keys) == 1 and keys[0] in _LIST_SECTIONS  # e.g. external=[{name: b, source: ...}]
    if (len(keys) < 2 and not whole_list) or not all(keys):
        raise ConfigError(f"override {dotted!r} must look like section.key=value (e.g. train.epochs=3)")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``'train.epochs=3'`` -> ``('train.epochs', 3)``; values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.epochs=3)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.strip(), value


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid parameters in {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"got {e.get('input')!r}; " + msg.replace("Input should be", "expected one of:")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


P = TypeVar("P", bound=BaseModel)


def load_params(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> BaseParams:
    """Read ``params.yaml`` (missing file -> defaults), apply overrides, validate every family-free key."""
    return load_as(BaseParams, path, overrides)


def load_as(schema: type[P], path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> P:
    """Read ``params.yaml`` (missing file -> defaults), apply overrides, validate the whole tree as ``schema``."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    tree: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    elif path != DEFAULT_PARAMS:
        raise ConfigError(f"params file {path} does not exist")
    else:
        log.warning("no %s in %s: using detflow's built-in defaults (pipeline/config.py, the same values as the "
                    "shipped params.yaml)", path, Path.cwd())
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    origin = str(path) + (f" with overrides {overrides}" if overrides else "")
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None
