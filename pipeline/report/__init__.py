"""The run report: one self-contained HTML page (CSS, charts and images inline, no request to any other host) that
a reviewer reads top to bottom: verdict, data, transfer, evaluation, generalisation, deployment, provenance.

Why one file: it opens at an air-gapped site and can be archived with the model. Charts are matplotlib SVG, images
small JPEG data URIs; the page comes from Jinja2 templates (autoescaped) kept next to this module."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.fileio import atomic_write_text
from pipeline.report.collect import ReportInputs, collect

__all__ = ["ReportInputs", "ReportResult", "render_report", "write_report"]


@dataclass
class ReportResult:
    path: Path
    size_bytes: int
    passed: bool | None  # the gate's verdict; None when no gate ran
    failed_checks: list[str]
    missing: list[str]  # every input a section could not show


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


def render_report(sections: dict[str, Any]) -> str:
    """The page from the collected sections."""
    return render_page("report.html.j2", r=sections)


def write_report(inputs: ReportInputs, params: Any, out: Path, copies: list[Path] | None = None) -> ReportResult:
    """Collect, render and write ``out`` atomically (plus each of ``copies``, e.g. next to the model so the service
    can serve it). Never fails on a missing input: that section says what is missing."""
    sections = collect(inputs, params)
    html = render_report(sections)
    for path in [out, *(copies or [])]:
        atomic_write_text(path, html)
    v = sections["verdict"]
    missing = [m for s in sections.values() for m in s.get("missing", [])]
    return ReportResult(out, len(html.encode("utf-8")), v["passed"], v["failed"], missing)
