"""Promotion gate: declarative thresholds from params.yaml decide whether a model may be exported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import DetflowError
from pipeline.params import GateParams


class GateFailed(DetflowError):
    """At least one gate check failed; the message is the table of failed checks."""


def champion_metrics(pointer: Path) -> dict[str, Any] | None:
    """Metrics of the current champion, None if nothing has been promoted. The registry copies them into
    ``champion.json`` at every promotion (:func:`pipeline.registry.promote`), so the pointer alone answers."""
    if not pointer.is_file():
        return None
    try:
        doc = json.loads(pointer.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DetflowError(f"champion pointer {pointer} is not valid JSON ({e}); restore it with `detflow registry "
                           "promote VERSION` or set gate.max_regression: null") from None
    metrics = doc.get("metrics") if isinstance(doc, dict) else None
    return metrics if isinstance(metrics, dict) else None


def evaluate_gate(metrics: dict[str, Any], gate: GateParams, champion: dict[str, Any] | None) -> dict[str, Any]:
    """``{passed, checks: [{name, value, threshold, passed}]}``; a check passes at equality."""
    froc = metrics["froc"]
    sens_1fp = froc["sensitivity"][froc["fp_per_image"].index(1.0)]  # 1.0 is one of FROC_FP_RATES
    checks = [
        {"name": "min_map50", "value": metrics["map50"], "threshold": gate.min_map50},
        {"name": "min_sensitivity_at_1fp", "value": sens_1fp, "threshold": gate.min_sensitivity_at_1fp},
        {"name": "min_cpm", "value": froc["cpm"], "threshold": gate.min_cpm},
    ]
    for c in checks:
        c["passed"] = c["value"] >= c["threshold"]
    if gate.max_regression is not None and champion and "map50" in champion:
        drop = float(champion["map50"]) - float(metrics["map50"])
        checks.append({"name": "max_regression", "value": round(drop, 6), "threshold": gate.max_regression,
                       "passed": drop <= gate.max_regression, "champion_map50": champion["map50"]})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def external_checks(externals: dict[str, dict[str, Any]], gate: GateParams) -> list[dict[str, Any]]:
    """One ``min_external_map50`` check per external set (none when the threshold is null); a set whose mAP50 is
    undefined (no box of a model class in it) fails: nothing was measured."""
    if gate.min_external_map50 is None:
        return []
    checks = []
    for name, m in externals.items():
        value = float(m["map50"])
        checks.append({"name": f"min_external_map50[{name}]", "value": round(value, 6),
                       "threshold": gate.min_external_map50, "set": name,
                       "passed": value == value and value >= gate.min_external_map50})
    return checks


def gate_table(result: dict[str, Any], only_failed: bool = False) -> str:
    rows = [c for c in result["checks"] if not (only_failed and c["passed"])]
    width = max([24, *(len(c["name"]) for c in rows)])  # external checks carry the set's name
    lines = [f"  {'check':<{width}} {'value':>8} {'threshold':>10}  result"]
    for c in rows:
        op = "<=" if c["name"] == "max_regression" else ">="
        lines.append(f"  {c['name']:<{width}} {c['value']:>8.4f} {op} {c['threshold']:<7.4f}  "
                     f"{'PASS' if c['passed'] else 'FAIL'}")
    return "\n".join(lines)
