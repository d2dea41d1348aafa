"""Promotion gate: declarative thresholds from params.yaml decide whether a model may be exported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import GateParams
from pipeline.errors import DetflowError


class GateFailed(DetflowError):
    """At least one gate check failed; the message is the table of failed checks."""


def champion_metrics(pointer: Path) -> dict[str, Any] | None:
    """Metrics of the current champion, if one has been promoted (``champion.json`` written by the registry)."""
    if not pointer.is_file():
        return None
    doc = json.loads(pointer.read_text())
    if "metrics" in doc and isinstance(doc["metrics"], dict):
        return doc["metrics"]
    for key in ("metrics_path", "dir"):
        if key in doc:
            path = Path(doc[key])
            path = path / "metrics.json" if path.is_dir() else path
            if not path.is_absolute():
                path = pointer.parent / path if (pointer.parent / path).exists() else path
            if path.is_file():
                return json.loads(path.read_text())
    return None


def evaluate_gate(metrics: dict[str, Any], gate: GateParams, champion: dict[str, Any] | None) -> dict[str, Any]:
    """``{passed, checks: [{name, value, threshold, passed}]}``; a check passes at equality."""
    sens_1fp = dict(zip(metrics["froc"]["fp_per_image"], metrics["froc"]["sensitivity"], strict=True)).get(1.0)
    checks = [
        {"name": "min_map50", "value": metrics["map50"], "threshold": gate.min_map50},
        {"name": "min_sensitivity_at_1fp", "value": sens_1fp, "threshold": gate.min_sensitivity_at_1fp},
        {"name": "min_cpm", "value": metrics["froc"]["cpm"], "threshold": gate.min_cpm},
    ]
    for c in checks:
        c["passed"] = c["value"] is not None and c["value"] >= c["threshold"]
    if gate.max_regression is not None and champion and "map50" in champion:
        drop = float(champion["map50"]) - float(metrics["map50"])
        checks.append({"name": "max_regression", "value": round(drop, 6), "threshold": gate.max_regression,
                       "passed": drop <= gate.max_regression, "champion_map50": champion["map50"]})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def gate_table(result: dict[str, Any], only_failed: bool = False) -> str:
    rows = [c for c in result["checks"] if not (only_failed and c["passed"])]
    lines = [f"  {'check':<24} {'value':>8} {'threshold':>10}  result"]
    for c in rows:
        op = "<=" if c["name"] == "max_regression" else ">="
        value = "n/a" if c["value"] is None else f"{c['value']:.4f}"
        lines.append(f"  {c['name']:<24} {value:>8} {op} {c['threshold']:<7.4f}  {'PASS' if c['passed'] else 'FAIL'}")
    return "\n".join(lines)
