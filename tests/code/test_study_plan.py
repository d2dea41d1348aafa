"""The study's arms from its params (no DVC): budget rules, overrides both YAML and Hydra read back, stable names,
and the checks' one-line messages."""

from __future__ import annotations

import math

import pytest
import yaml

from pipeline.config import load_params
from pipeline.errors import ConfigError
from pipeline.study.plan import check_study, recipe_overrides, stage_targets, steps_per_epoch, study_arms, value_text

SIZES = {(0.25, 0): 51, (0.5, 0): 103, (1.0, 0): 205}  # BCCD's train split at seed 0


def test_default_study_has_24_arms_at_equal_epochs() -> None:
    params = load_params(None, [])
    check_study(params)
    arms = study_arms(params, SIZES)
    assert len(arms) == 4 * 3 * 2 and len({a.name for a in arms}) == 24
    assert {a.epochs for a in arms} == {20} and {a.budget_rule for a in arms} == {"epochs"}
    quarter = next(a for a in arms if a.recipe == "fine_tune_low_lr" and a.init == "coco" and a.fraction == 0.25)
    assert quarter.planned_steps == 20 * 4  # 51 images, batch 16 = nominal: 4 steps an epoch
    assert {"train.strategy=fine_tune", "train.backbone_lr_mult=0.1", "train.pretrained=coco", "train.fraction=0.25",
            "train.seed=0", "train.epochs=20", "train.patience=0", "gate.min_map50=0"} <= set(quarter.overrides)
    scratch = next(a for a in arms if a.init == "scratch")
    assert "train.pretrained=none" in scratch.overrides
    assert study_arms(params, SIZES) == arms  # deterministic names and overrides
    assert stage_targets(params) == ["evaluate"]


def test_steps_rule_gives_every_arm_the_same_optimizer_steps() -> None:
    params = load_params(None, ["study.epochs=null", "study.steps=100"])
    arms = study_arms(params, SIZES)
    by_fraction = {a.fraction: a for a in arms if a.recipe == "fine_tune" and a.init == "coco"}
    assert {f: a.epochs for f, a in by_fraction.items()} == {0.25: 25, 0.5: 15, 1.0: 8}
    assert all(100 <= a.planned_steps < 100 + steps_per_epoch("yolo", a.train_images, 16, 16) for a in arms)
    # another budget is another set of experiments: no name is shared with the epochs rule
    assert not {a.name for a in arms} & {a.name for a in study_arms(load_params(None, []), SIZES)}
    # gradient accumulation: nominal batch 64 at batch 16 is one optimizer step every 4 batches
    assert steps_per_epoch("yolo", 205, 16, 64) == math.ceil(13 / 4)
    assert steps_per_epoch("torchvision", 205, 16, 64) == 13


def test_overrides_read_back_the_same_in_yaml_and_hydra() -> None:
    for value in (None, True, 0.1, 3, [2, 4], "fine_tune", "a b", "1e3", "null"):
        assert yaml.safe_load(value_text(value)) == value, value
    assert recipe_overrides({"strategy": "progressive", "augment": {"stain": 0.3}}) == [
        "train.augment.stain=0.3", "train.strategy=progressive"]
    params = load_params(None, ["study.recipes={jit: {strategy: fine_tune, augment: {stain: 0.3}}}"])
    arm = study_arms(params, SIZES)[0]
    assert load_params(None, list(arm.overrides)).train.augment.stain == 0.3


@pytest.mark.parametrize(("override", "message"), [
    ("study.fractions=[0.5, 0]", "study.fractions: 0 is not in (0, 1]"),
    ("study.fractions=[1.5]", "study.fractions: 1.5 is not in (0, 1]"),
    ("study.fractions=[0.5, 0.5]", "study.fractions lists 0.5 more than once"),
    ("study.fractions=[]", "study.fractions is empty"),
    ("study.recipes={ft: {strateg: fine_tune}}", "study.recipes.ft: unknown train key 'strateg'; expected one of: "),
    ("study.recipes={ft: {fraction: 0.5}}", "study.recipes.ft: 'fraction' is set by the study itself"),
    ("study.recipes={ft: {backbone_lr_mult: 2}}", "study.recipes.ft: backbone_lr_mult: Input should be less than"),
    ("study.recipes={'bad name': {strategy: fine_tune}}", "recipe name 'bad name' must be 1-40 letters"),
    ("study.recipes={}", "study.recipes is empty"),
    ("study.init=[coco, coco]", "study.init lists coco more than once"),
    ("study.init=[imagenet]", "study.init: unknown initialisation 'imagenet'; expected one of: coco, scratch"),
    ("study.epochs=null", "study: set exactly one budget rule"),
    ("study.steps=5", "study: set exactly one budget rule"),
    ("study.wide_ci=0", "study.wide_ci must be in (0, 1]"),
])
def test_bad_study_params_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_study(load_params(None, [override]))
    text = str(err.value)
    assert message in text and "\n" not in text, text
