"""Coded concepts for a model's classes: what a DICOM Structured Report says each detection *is*.

A PACS and a viewer cannot read "class 0"; the SR's finding type is a coded concept (coding scheme, code value, code
meaning). Each class gets one, in this order of preference:

1. ``export.class_codes`` in params.yaml (``{class: "SCHEME:VALUE:MEANING"}``), for a site's own terminology;
2. the table below, by the class's name (case and punctuation ignored): SNOMED CT where a concept fits;
3. the private coding scheme :data:`PRIVATE_SCHEME` (``99DETFLOW``), value = the class name upper-cased (at most 16
   characters, DICOM's SH), meaning = the class name. Private designators start with ``99`` (DICOM PS3.16 section
   8.2); every SR that uses it identifies the scheme in its Coding Scheme Identification Sequence.

The resolved mapping is written into the model card (``class_codes``) at export, so the SR writer, the run report
and anyone reading the card see the same codes. Torch-free: the service imports it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PRIVATE_SCHEME = "99DETFLOW"
PRIVATE_SCHEME_NAME = "detflow model classes"
PRIVATE_SCHEME_ORGANIZATION = "detflow (this model's card: class_codes)"

#: The SNOMED CT concepts detflow knows by class name. "DICOM PS3.16": the concept is in DICOM's content mapping
#: resource (pydicom's concept dictionary; tests/integration/test_sr.py checks value and meaning against it);
#: "SNOMED CT": a SNOMED CT concept that no DICOM context group lists (the blood cells: the cell hierarchy, "(cell)").
_KNOWN: dict[str, tuple[str, str, str]] = {
    # class name (normalised) -> (code value, code meaning, where the code comes from)
    "nodule": ("27925004", "Nodule", "DICOM PS3.16"),
    "mass": ("4147007", "Mass", "DICOM PS3.16"),
    "lesion": ("52988006", "Lesion", "DICOM PS3.16"),
    "cyst": ("367643001", "Cyst", "DICOM PS3.16"),
    "neoplasm": ("108369006", "Neoplasm", "DICOM PS3.16"),
    "tumor": ("108369006", "Neoplasm", "DICOM PS3.16"),
    "tumour": ("108369006", "Neoplasm", "DICOM PS3.16"),
    "pneumothorax": ("36118008", "Pneumothorax", "DICOM PS3.16"),
    "effusion": ("41699000", "Effusion", "DICOM PS3.16"),
    "rbc": ("41898006", "Erythrocyte", "SNOMED CT"),
    "redbloodcell": ("41898006", "Erythrocyte", "SNOMED CT"),
    "erythrocyte": ("41898006", "Erythrocyte", "SNOMED CT"),
    "wbc": ("52501007", "Leukocyte", "SNOMED CT"),
    "whitebloodcell": ("52501007", "Leukocyte", "SNOMED CT"),
    "leukocyte": ("52501007", "Leukocyte", "SNOMED CT"),
    "leucocyte": ("52501007", "Leukocyte", "SNOMED CT"),
    "platelet": ("16378004", "Platelet", "SNOMED CT"),
    "platelets": ("16378004", "Platelet", "SNOMED CT"),
    "thrombocyte": ("16378004", "Platelet", "SNOMED CT"),
}
#: Findings that are morphologically abnormal structures (the SR's finding category, SCT 49755003).
_MORPHOLOGIC = {"27925004", "4147007", "52988006", "367643001", "108369006"}
MORPHOLOGIC_CATEGORY = ("49755003", "SCT", "Morphologically Abnormal Structure")

_CODE_VALUE_MAX = 16  # DICOM Code Value is SH: 16 characters
_MEANING_MAX = 64  # Code Meaning is LO


@dataclass(frozen=True)
class ClassCode:
    """One class's coded concept, as the card stores it."""

    scheme: str
    value: str
    meaning: str
    source: str  # where it came from: "DICOM PS3.16", "SNOMED CT", "params export.class_codes", "private scheme"

    @property
    def private(self) -> bool:
        return self.scheme == PRIVATE_SCHEME

    @property
    def category(self) -> tuple[str, str, str] | None:
        """(value, scheme, meaning) of the finding category, when the code is a morphologic abnormality."""
        return MORPHOLOGIC_CATEGORY if self.scheme == "SCT" and self.value in _MORPHOLOGIC else None

    def to_card(self) -> dict[str, str]:
        return {"scheme": self.scheme, "value": self.value, "meaning": self.meaning, "source": self.source}


def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def parse_code(text: str, what: str = "class code") -> tuple[str, str, str]:
    """``"SCT:27925004:Nodule"`` -> (scheme, value, meaning); ValueError naming the expected form otherwise."""
    parts = text.split(":", 2) if isinstance(text, str) else []
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ValueError(f"{what} {text!r} must look like SCHEME:VALUE:MEANING, e.g. SCT:27925004:Nodule")
    scheme, value, meaning = (p.strip() for p in parts)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,16}", scheme):
        raise ValueError(f"{what} {text!r}: coding scheme designator {scheme!r} must be 1-16 letters, digits, . _ -")
    if len(meaning) > _MEANING_MAX:
        raise ValueError(f"{what} {text!r}: code meaning is longer than {_MEANING_MAX} characters")
    return scheme, value, meaning


def _private_value(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")[:_CODE_VALUE_MAX] or "CLASS"
    value, n = base, 2
    while value in taken:  # two classes that normalise alike ("a-b", "a b") keep distinct codes
        suffix = f"_{n}"
        value, n = base[:_CODE_VALUE_MAX - len(suffix)] + suffix, n + 1
    return value


def class_codes(classes: Sequence[str], overrides: Mapping[str, str] | None = None) -> dict[str, ClassCode]:
    """The coded concept of every class, in class order (see the module docstring for the order of preference).

    ``overrides``: ``{class: "SCHEME:VALUE:MEANING"}``; a key that is not a class is a ValueError (a typo would
    otherwise silently fall back to the private scheme).
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(classes))
    if unknown:
        raise ValueError(f"class_codes names classes the model does not have: {', '.join(unknown)}; "
                         f"classes: {', '.join(classes)}")
    out: dict[str, ClassCode] = {}
    taken: set[str] = set()
    for name in classes:
        if name in overrides:
            scheme, value, meaning = parse_code(overrides[name], f"class code for {name!r}")
            out[name] = ClassCode(scheme, value, meaning, "params export.class_codes")
        elif (known := _KNOWN.get(_normalised(name))) is not None:
            out[name] = ClassCode("SCT", known[0], known[1], known[2])
        else:
            value = _private_value(name, taken)
            taken.add(value)
            out[name] = ClassCode(PRIVATE_SCHEME, value, name[:_MEANING_MAX], "private scheme")
    return out


def card_class_codes(card: Mapping[str, Any]) -> dict[str, ClassCode]:
    """The class codes a model card records (``class_codes``, written by export), else those the classes' names give
    (a model exported before the field existed). ValueError when the card's field is malformed."""
    classes = list(card.get("classes") or [])
    entry = card.get("class_codes")
    if entry is None:
        return class_codes(classes)
    if not isinstance(entry, dict) or set(entry) != set(classes):
        raise ValueError("model card class_codes must map every class to a code; re-export the model")
    out = {}
    for name in classes:
        c = entry[name]
        if not isinstance(c, dict) or not all(isinstance(c.get(k), str) and c[k] for k in ("scheme", "value",
                                                                                           "meaning")):
            raise ValueError(f"model card class_codes[{name!r}] needs scheme, value and meaning; re-export the model")
        out[name] = ClassCode(c["scheme"], c["value"], c["meaning"], str(c.get("source") or "model card"))
    return out


def describe(codes: Mapping[str, ClassCode]) -> list[str]:
    """One line per class, for summaries: ``nodule -> SCT 27925004 "Nodule" (DICOM PS3.16)``."""
    return [f"{name} -> {c.scheme} {c.value} \"{c.meaning}\" ({c.source})" for name, c in codes.items()]
