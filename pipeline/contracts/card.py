"""The model card (``model_card.json`` next to ``model.onnx``) as one typed schema.

Export builds the card and validates it here before writing it; the ONNX engine and the service read a card only
through :func:`read_card`, so "what a card is" is written once. The schema is the MONAI-bundle-style contract a
model ships with: input shape, dtype, value range, classes, post-processing defaults, training data, metrics.

Required (a card without them is not a model card): ``family``, ``classes``, ``input.imgsz`` and ``sha256``; every
other field is optional so that cards written by older exports stay readable. Blocks that another stage owns
(``output``: the family; ``metrics``, ``gate``, ``parity``: evaluation and export; ``adaptation``: ``detflow
adapt``) are typed as objects here and checked by their owner. An unknown top-level key is an error: a new card
field is added to :class:`ModelCard` first, then written.

Whether ``family`` names a registered family is not checked here (the contracts know no registry); the engine
checks it.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator

from pipeline.errors import DetflowError

SCHEMA = "detflow-model-card/1"
CARD_FILE = "model_card.json"


class CardError(DetflowError):
    """A model card that is missing, unreadable or not a model card; the message is one line."""


def check_threshold(value: Any, name: str = "conf") -> float:
    """A score or IoU threshold: a finite number in [0, 1] (5, -1 or nan would silently keep all or no boxes)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CardInput(_Block):
    """What the graph takes and how an image becomes that input (see ``pipeline/infer/processing.py``)."""

    imgsz: StrictInt = Field(ge=1)
    name: StrictStr = "images"
    shape: list[StrictInt | StrictStr] | None = None
    stride: StrictInt = Field(0, ge=0)  # > 0: minimal (rect) letterbox padding to this multiple; 0: square input
    dtype: StrictStr = "float32"
    layout: StrictStr | None = None
    channel_order: StrictStr | None = None
    value_range: list[float] | None = None
    normalisation: StrictStr | None = None
    resize: StrictStr | None = None
    dicom_window: dict[str, Any] | None = None  # training window from params (mode, window) or the files' tags
    pixel_spacing: dict[str, Any] | None = None  # training pixel spacing (value, unit, source, rule)


class CardPostprocess(_Block):
    """Defaults of the engine's post-processing (the evaluation settings the model was gated at)."""

    conf: float = 0.25
    nms_iou: float = 0.7
    max_det: StrictInt = Field(300, ge=1)

    @field_validator("conf", "nms_iou", mode="before")
    @classmethod
    def _in_unit(cls, v: Any, info: Any) -> float:
        return check_threshold(v, info.field_name)


class ModelCard(_Block):
    """The machine-readable contract that ships next to ``model.onnx``."""

    family: StrictStr
    classes: list[StrictStr] = Field(min_length=1)
    # class -> {scheme, value, meaning}: the coded finding type DICOM SRs use (pipeline/dicom/codes.py)
    class_codes: dict[str, dict[str, Any]] | None = None
    input: CardInput
    sha256: StrictStr
    schema_: StrictStr | None = Field(None, alias="schema")
    model: StrictStr | None = None
    output: dict[str, Any] | None = None  # the family's graph outputs and how to decode them
    postprocess: CardPostprocess = Field(default_factory=CardPostprocess)
    opset: StrictInt | None = None
    size_bytes: StrictInt | None = None
    version: StrictStr | None = None
    created: StrictStr | None = None
    training_data: dict[str, Any] | None = None
    pretrained: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None
    embedding: dict[str, Any] | None = None  # the embedding output and its reference sample (shift detection)
    adaptation: dict[str, Any] | None = None  # written by `detflow adapt`
    checkpoint: dict[str, Any] | None = None  # the checkpoint it was exported from (path or file, sha256): few-shot
    source_model_metrics: dict[str, Any] | None = None  # few-shot adapted: the metrics of the model it came from

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


_WORDS = {"list_type": "a list", "string_type": "a string", "int_type": "an integer", "model_type": "an object",
          "dict_type": "an object", "float_type": "a number", "bool_type": "a boolean", "too_short": "empty"}


def _phrase(err: Any) -> str:
    """One pydantic error as a short phrase: ``input lacks imgsz``, ``classes is not a list``."""
    loc = [str(p) for p in err["loc"] if p != "schema_"]
    where = ".".join(loc)
    kind = err["type"]
    if kind == "missing":
        return f"{'.'.join(loc[:-1]) + ' ' if len(loc) > 1 else ''}lacks {loc[-1]}"
    if kind == "extra_forbidden":
        return f"{where} is not a model card field"
    if kind in _WORDS:
        return f"{where} is {'' if kind == 'too_short' else 'not '}{_WORDS[kind]}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg[:1].lower()}{msg[1:]}"


def card_problems(doc: Any) -> list[str]:
    """What keeps ``doc`` (a parsed JSON value) from being a model card; empty when it is one."""
    if not isinstance(doc, dict):
        return [f"a JSON {type(doc).__name__}, not an object"]
    try:
        ModelCard.model_validate(doc)
    except ValidationError as e:
        return [_phrase(err) for err in e.errors()]
    return []


def validate_card(doc: Any, where: str = "model card") -> ModelCard:
    """``doc`` as a :class:`ModelCard`; :class:`CardError` (one line) naming every problem otherwise."""
    problems = card_problems(doc)
    if problems:
        raise CardError(f"{where} is malformed ({'; '.join(problems)}); re-export the model")
    return ModelCard.model_validate(doc)


def parse_card(data: bytes, where: str = "model card") -> tuple[dict[str, Any], ModelCard]:
    """Card bytes as the JSON object and as the typed card; :class:`CardError` with one line when they are not JSON
    or not a model card."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        at = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise CardError(f"{where} is not valid JSON{at}; re-export the model") from None
    if not isinstance(doc, dict):
        raise CardError(f"{where} is not a JSON object: it holds a JSON {type(doc).__name__}; re-export the model")
    return doc, validate_card(doc, where)


def read_card(path: Path) -> tuple[dict[str, Any], ModelCard]:
    """The card file as its JSON object and as the typed card; :class:`CardError` with one line when it cannot be
    read, is not JSON, or is not a model card. Permission and I/O errors are the caller's (``OSError``)."""
    where = f"model card {path}"
    if not path.is_file():
        raise CardError(f"{where} not found next to the model; export writes both")
    return parse_card(path.read_bytes(), where)
