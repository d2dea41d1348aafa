"""Rendering this package's Jinja2 templates (the run report and the study page) with the report's filters and CSS:
a module of its own so the study page renders without importing the run report's package (no import cycle)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _undefined(value: Any) -> bool:
    from jinja2 import Undefined

    return isinstance(value, Undefined)


def _num(value: Any, digits: int = 3) -> str:
    if _undefined(value):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> str:
    """A value from a JSON block as short text (lists joined, None as n/a)."""
    if value is None or _undefined(value):
        return "n/a"
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value) if all(not isinstance(v, list | dict) for v in value) \
            else str(value)
    return str(value)


def _mib(value: Any) -> str:
    return f"{value / 2**20:.2f} MiB ({value:,} bytes)" if isinstance(value, int) else "n/a"


def render_page(template: str, **context: Any) -> str:
    """One of this package's templates (autoescaped; only our own SVG is marked safe), with the report's CSS."""
    from jinja2 import ChainableUndefined, Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("pipeline.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default_for_string=True, default=True),
                      undefined=ChainableUndefined,  # a key a newer input lacks prints as n/a
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, plain=_plain, mib=_mib)
    css = (Path(__file__).parent / "templates" / "style.css").read_text(encoding="utf-8")
    return env.get_template(template).render(css=css, **context)
