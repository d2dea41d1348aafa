"""The run report: one self-contained HTML page (CSS, charts and images inline, no request to any other host) that
a reviewer reads top to bottom: verdict, data, transfer, evaluation, generalisation, deployment, provenance.

Why one file: it opens at an air-gapped site and can be archived with the model. Charts are matplotlib SVG, images
small JPEG data URIs; the page comes from Jinja2 templates (autoescaped) kept next to this module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.fileio import atomic_write_text
from pipeline.report.collect import ReportInputs, collect
from pipeline.report.render import render_page

__all__ = ["ReportInputs", "ReportResult", "render_report", "write_report"]


@dataclass
class ReportResult:
    path: Path
    size_bytes: int
    passed: bool | None  # the gate's verdict; None when no gate ran
    failed_checks: list[str]
    missing: list[str]  # every input a section could not show


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
