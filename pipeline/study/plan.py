"""The study's arms: recipe x fraction x init x seed, each a list of train overrides at one budget.

Checks come first and say one line each (:func:`check_study`, :func:`check_data`, :func:`check_coco_weights`): a
study that cannot run stops before any arm is queued. :func:`study_arms` is what a runner needs: every arm's name
and overrides (DVC's queue here; a cluster runner can map the same list).

Budget rules (``study.epochs`` xor ``study.steps``), the same for every arm:

- ``epochs``: every arm trains ``epochs`` epochs, so a quarter of the data also gets a quarter of the optimizer
  steps (what "20 epochs" means in most papers);
- ``steps``: every arm gets at least ``steps`` optimizer steps, rounded up to whole epochs:
  ``epochs = ceil(steps / steps_per_epoch)``, ``steps_per_epoch = ceil(ceil(images / batch) / accumulate)`` with
  ``accumulate = max(round(nominal_batch / batch), 1)`` for yolo (Ultralytics' gradient accumulation) and 1 for
  torchvision. Each arm's actual steps are counted by the trainer (``reports/train/metrics.json`` ``optimizer_steps``).

Every arm sets ``train.patience=0`` (no early stop: the budget is the budget) and zeroes the promotion gate (an
arm measures; it is not a promotion candidate).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, DataError

#: train keys the study sets itself; a recipe may not set them
STUDY_OWNED = ("pretrained", "pretrained_sha256", "fraction", "seed", "imgsz", "epochs", "patience")
INITS = {"coco": "coco", "scratch": "none"}  # study.init -> train.pretrained
#: an arm measures; it does not promote (every check off)
GATE_OFF = ("gate.min_map50=0", "gate.min_sensitivity_at_1fp=0", "gate.min_cpm=0", "gate.max_regression=null",
            "gate.min_external_map50=null")
_RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,39}")
_PLAIN = re.compile(r"[A-Za-z0-9_./+-]*")


@dataclass(frozen=True)
class Arm:
    """One arm: a DVC experiment named ``name`` with ``overrides`` (``key=value`` items, for ``-S`` or ``--set``)."""

    name: str
    recipe: str
    init: str
    fraction: float
    seed: int
    epochs: int
    planned_steps: int
    train_images: int
    budget_rule: str
    overrides: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = list(self.overrides)
        return d

    @property
    def label(self) -> str:
        return f"{self.recipe} / {self.init} / {pct(self.fraction)}" + (f" / seed {self.seed}" if self.seed else "")


def pct(fraction: float) -> str:
    """0.25 -> '25 %'."""
    return f"{fraction * 100:.4g} %"


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def value_text(value: Any) -> str:
    """A value as override text that both YAML (``--set``) and Hydra (``dvc exp run -S``) read back as ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    text = str(value)
    if _PLAIN.fullmatch(text) and text not in ("null", "true", "false", "") and not _is_number(text):
        return text
    return "'" + text.replace("'", "\\'") + "'"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def recipe_overrides(recipe: dict[str, Any]) -> list[str]:
    """``{strategy: fine_tune, augment: {stain: 0.3}}`` -> ``[train.augment.stain=0.3, train.strategy=fine_tune]``."""
    return [f"train.{k}={value_text(v)}" for k, v in sorted(_flat(recipe).items())]


# ------------------------------------------------------------------------------------------------ checks


def _one_line(err: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        return f"{loc}: {msg}"
    return str(err).splitlines()[0]


def check_study(params: Any) -> None:
    """The ``study`` section is runnable: raise :class:`ConfigError` with one line naming the first problem."""
    from pydantic import ValidationError

    from pipeline.config import TrainParams

    st = params.study
    if not st.recipes:
        raise ConfigError("study.recipes is empty; name at least one recipe, e.g. fine_tune: {strategy: fine_tune}")
    train_keys = sorted(TrainParams.model_fields)
    base = params.train.model_dump(mode="json")
    for name, recipe in st.recipes.items():
        if not _RECIPE_NAME.fullmatch(str(name)):
            raise ConfigError(f"study.recipes: recipe name {name!r} must be 1-40 letters, digits or '_' (it names "
                              "DVC experiments)")
        if not isinstance(recipe, dict):
            raise ConfigError(f"study.recipes.{name} must be a mapping of train overrides, got {recipe!r}")
        for key in recipe:
            if key not in TrainParams.model_fields:
                raise ConfigError(f"study.recipes.{name}: unknown train key {key!r}; expected one of: "
                                  f"{', '.join(k for k in train_keys if k not in STUDY_OWNED)}")
            if key in STUDY_OWNED:
                raise ConfigError(f"study.recipes.{name}: {key!r} is set by the study itself (study.init, "
                                  "study.fractions, study.seeds, study.imgsz and the budget), not by a recipe")
        try:
            TrainParams.model_validate(_merge(base, recipe))
        except ValidationError as e:
            raise ConfigError(f"study.recipes.{name}: {_one_line(e)}") from None
    if not st.fractions:
        raise ConfigError("study.fractions is empty; give at least one train.fraction in (0, 1], e.g. [0.25, 0.5, 1.0]")
    for f in st.fractions:
        if not math.isfinite(f) or not 0 < f <= 1:
            raise ConfigError(f"study.fractions: {f:g} is not in (0, 1]; a fraction is the share of the train split's "
                              "images an arm trains on, e.g. 0.25")
    _unique("study.fractions", st.fractions)
    if not st.init:
        raise ConfigError("study.init is empty; expected a list of: coco, scratch")
    for init in st.init:
        if init not in INITS:
            raise ConfigError(f"study.init: unknown initialisation {init!r}; expected one of: coco, scratch")
    _unique("study.init", st.init)
    if not st.seeds:
        raise ConfigError("study.seeds is empty; give at least one train.seed, e.g. [0]")
    _unique("study.seeds", st.seeds)
    if not 32 <= st.imgsz <= 4096:
        raise ConfigError(f"study.imgsz must be in [32, 4096], got {st.imgsz}")
    if (st.epochs is None) == (st.steps is None):
        raise ConfigError("study: set exactly one budget rule, epochs (every arm trains that many epochs) or steps "
                          f"(every arm gets that many optimizer steps), and the other to null; got epochs "
                          f"{st.epochs}, steps {st.steps}")
    for key in ("epochs", "steps"):
        value = getattr(st, key)
        if value is not None and not 1 <= value <= 1_000_000:
            raise ConfigError(f"study.{key} must be a positive whole number, got {value}")
    if not 0 < st.wide_ci <= 1:
        raise ConfigError(f"study.wide_ci must be in (0, 1] (a width of a mAP50 interval), got {st.wide_ci}")


def _unique(key: str, values: list[Any]) -> None:
    if dup := sorted({str(v) for v in values if values.count(v) > 1}):
        raise ConfigError(f"{key} lists {', '.join(dup)} more than once")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_data(params: Any, prepared: Path) -> dict[tuple[float, int], int]:
    """Every fraction and seed gives a usable subsample of the prepared train split (a non-empty val split, every
    class present); returns the number of train images of each (fraction, seed). One-line :class:`DataError`."""
    from pipeline.train.subset import load_train_subset

    sizes = {}
    for seed in params.study.seeds:
        for fraction in sorted(params.study.fractions):
            try:
                sizes[(fraction, seed)] = len(load_train_subset(prepared, fraction, seed).images)
            except DataError as e:
                raise DataError(f"study.fractions: {e}") from None
    return sizes


def check_coco_weights(params: Any, raw_dir: Path, mirrors: list[Path] | None) -> str | None:
    """With ``coco`` in ``study.init`` the family's COCO weights must resolve (raw folder or mirror, verified): their
    path, or None without coco arms. One-line :class:`ConfigError` otherwise."""
    if "coco" not in params.study.init:
        return None
    from pipeline import assets
    from pipeline.errors import AssetError
    from pipeline.families import get_family

    model = params.train.model
    name = get_family(params.train.family).coco_assets.get(model)
    if name is None:
        raise ConfigError(f"study.init includes coco but no COCO checkpoint is known for {model}; use study.init: "
                          "[scratch] or another train.model")
    try:
        return str(assets.resolve(name, raw_dir=raw_dir, mirrors=mirrors, progress=False))
    except AssetError as e:
        raise ConfigError(f"study.init includes coco but the COCO weights for {model} ({name}) cannot be resolved: "
                          f"{e.summary}; point DETFLOW_ASSETS at an asset mirror, or use study.init: [scratch]") \
            from None


# ------------------------------------------------------------------------------------------------ arms


def steps_per_epoch(family: str, images: int, batch: int, nominal_batch: int) -> int:
    """Optimizer steps of one epoch over ``images`` images (see the module docstring)."""
    batches = math.ceil(images / batch)
    from pipeline.families import get_family

    accumulate = max(round(nominal_batch / batch), 1) if get_family(family).accumulates_to_nominal_batch else 1
    return max(1, math.ceil(batches / accumulate))


def arm_name(recipe: str, init: str, fraction: float, seed: int, full_params: dict[str, Any]) -> str:
    """``fine_tune-coco-f25-s0-1a2b3c``: readable, and unique for the arm's whole params (a changed budget or
    dataset gives new names, so DVC never mixes two studies' arms)."""
    digest = hashlib.sha256(json.dumps(full_params, sort_keys=True).encode()).hexdigest()[:6]
    frac = f"{fraction * 100:.4g}".replace(".", "p")
    return f"{recipe}-{init}-f{frac}-s{seed}-{digest}"


def study_arms(params: Any, sizes: dict[tuple[float, int], int], base_overrides: list[str] | None = None,
               params_path: Path | None = None) -> list[Arm]:
    """Every arm of the study, in a stable order (recipe, init, fraction, seed as listed in params).

    ``sizes``: train images per (fraction, seed), from :func:`check_data`. ``base_overrides``: the user's ``--set``
    items for other sections (e.g. ``data.source=bccd``), applied to every arm and part of its identity.
    """
    from pipeline.config import load_params

    st = params.study
    base = [o for o in (base_overrides or []) if not o.split("=", 1)[0].strip().startswith("study.")]
    tp = params.train
    arms = []
    for recipe, over in st.recipes.items():
        for init in st.init:
            for fraction in st.fractions:
                for seed in st.seeds:
                    images = sizes[(fraction, seed)]
                    per_epoch = steps_per_epoch(tp.family, images, tp.batch, tp.nominal_batch)
                    if st.steps is not None:
                        epochs, rule = math.ceil(st.steps / per_epoch), "steps"
                    else:
                        epochs, rule = int(st.epochs), "epochs"
                    overrides = (*base, *recipe_overrides(over), f"train.pretrained={INITS[init]}",
                                 f"train.fraction={value_text(float(fraction))}", f"train.seed={seed}",
                                 f"train.imgsz={st.imgsz}", f"train.epochs={epochs}", "train.patience=0", *GATE_OFF)
                    full = load_params(params_path, list(overrides)).model_dump(mode="json")
                    full.pop("study", None)  # the study section is no arm's param
                    arms.append(Arm(arm_name(recipe, init, fraction, seed, full), recipe, init, float(fraction),
                                    int(seed), epochs, epochs * per_epoch, images, rule, tuple(overrides)))
    return arms


def stage_targets(params: Any) -> list[str]:
    """The DVC stages each arm runs: up to ``evaluate``, and ``external`` (after export) when sets are listed."""
    return ["evaluate", "external"] if params.external else ["evaluate"]
