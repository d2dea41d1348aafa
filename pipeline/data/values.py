"""Values as they enter from files, params and the environment: identifiers of one declared type, numbers checked
after the arithmetic they feed.

Why one module: an identifier compared by truthiness (``patient_id: 0`` read as "no patient") or by JSON type
(``"1"`` vs ``1``) silently changed which images belong together; a number checked before its arithmetic
(``sqrt(1e200 * 1e200)``) still became ``Infinity`` in the dataset. Every reader goes through these functions.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# json.loads turns an integer literal into a Python int, which raises past 4300 digits (CPython's int-to-str guard):
# longer literals are kept as their text, so an identifier keeps its value and a coordinate becomes non-finite.
MAX_INT_DIGITS = 4000
_INTEGER = re.compile(r"^[+-]?\d+$")


def _parse_int(text: str) -> int | str:
    return int(text) if len(text) <= MAX_INT_DIGITS else text


def parse_json(text: str) -> Any:
    """``json.loads`` that never raises on a number: huge integers stay text (see above), ``NaN`` / ``Infinity``
    become floats that :func:`finite` and :func:`identifier` refuse where they are used."""
    return json.loads(text, parse_int=_parse_int)


def identifier(value: object) -> str | None:
    """An identifier (patient, image or category id) as its one declared type, a string, so equal ids compare equal
    however a file typed them: an integer or an integral float is its decimal integer (``0``, ``0.0``, ``"0"`` and
    ``" 0 "`` are one id), a string is trimmed; ``"007"`` stays ``"007"``.

    ``None`` means "not stated" (absent, null, blank). ``ValueError`` for values that are no identifier at all
    (booleans, lists, objects, NaN, infinities): the caller records them.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean, not an identifier")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip() or None
    raise ValueError(f"a {type(value).__name__} ({json.dumps(value, default=str)[:40]}) is not an identifier")


def id_order(ident: str) -> tuple[int, int | float, str]:
    """Sort key of identifiers: integers by value first (pycocotools' category order), then the others as text."""
    if _INTEGER.match(ident) and len(ident) <= MAX_INT_DIGITS:
        return (0, int(ident), ident)
    return (1, 0, ident)


def finite(value: float, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``value`` after the arithmetic that produced it: a finite float in [lo, hi], else ``ValueError``."""
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} is {v} (not finite)")
    if not lo <= v <= hi:
        raise ValueError(f"{what} {v:g} is outside [{lo:g}, {hi:g}]")
    return v
