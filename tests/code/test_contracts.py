"""The contracts layer: the model card schema that export writes and the engine and the service read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.contracts.card import CardError, ModelCard, card_problems, read_card, validate_card

MINIMAL = {"family": "yolo", "classes": ["nodule"], "input": {"imgsz": 64}, "sha256": "ab" * 32}


def test_the_exported_card_is_a_valid_model_card(exported: dict[str, Path]) -> None:
    doc, card = read_card(exported["card"])
    assert card.family == doc["family"] and card.classes == doc["classes"] == ["nodule"]
    assert card.input.imgsz == doc["input"]["imgsz"] == 64 and card.input.stride == doc["input"]["stride"]
    assert card.postprocess.conf == doc["postprocess"]["conf"] and card.schema_ == "detflow-model-card/1"


def test_a_minimal_card_gets_the_engine_defaults() -> None:
    card = validate_card(MINIMAL)
    assert (card.postprocess.conf, card.postprocess.nms_iou, card.postprocess.max_det) == (0.25, 0.7, 300)
    assert card.input.stride == 0 and card.input.dtype == "float32"


@pytest.mark.parametrize(("change", "phrase"), [
    ({"family": None}, "family is not a string"),
    ({"classes": "RBC"}, "classes is not a list"),
    ({"classes": []}, "classes is empty"),
    ({"input": {}}, "input lacks imgsz"),
    ({"input": {"imgsz": True}}, "input.imgsz is not an integer"),
    ({"input": {"imgsz": 0}}, "input.imgsz: input should be greater than or equal to 1"),
    ({"postprocess": {"conf": 5}}, "postprocess.conf: conf must be a number in [0, 1], got 5"),
    ({"postprocess": {"max_det": 0}}, "postprocess.max_det: input should be greater than or equal to 1"),
    ({"colour": "blue"}, "colour is not a model card field"),
])
def test_each_problem_is_named(change: dict, phrase: str) -> None:
    doc = {**MINIMAL, **change}
    assert phrase in card_problems(doc)
    with pytest.raises(CardError, match="is malformed") as e:
        validate_card(doc, "model card x.json")
    assert phrase in str(e.value) and "\n" not in str(e.value)
    assert "lacks sha256" in card_problems({k: v for k, v in MINIMAL.items() if k != "sha256"})


def test_reading_a_card_file_fails_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "model_card.json"
    with pytest.raises(CardError, match="not found next to the model"):
        read_card(path)
    for text, expected in (("{", "is not valid JSON (line 1, column 2)"), ("[1]", "it holds a JSON list")):
        path.write_text(text)
        with pytest.raises(CardError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            read_card(path)
    path.write_text(json.dumps(MINIMAL))
    assert read_card(path)[1] == ModelCard.model_validate(MINIMAL)
