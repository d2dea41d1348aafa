"""The study page (reports/study/report.html, and the run report's Study section) from constructed results: it
opens in headless Chromium with no console message and no network request, and every number it shows equals
results.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.study import arm_images as _arm
from test_report import needs_chromium, open_in_chromium, parse

from pipeline.config import load_params
from pipeline.report.study import render_study_page
from pipeline.study.results import assemble, compare

RECIPES = ["feature_extraction", "fine_tune", "progressive", "fine_tune_low_lr"]


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    """24 arms on 100 test patients; a model's hit rate grows with the fraction, COCO above scratch. Each image has
    one difficulty shared by every arm (a harder lesion is missed first), so arms are correlated as real ones are."""
    params = load_params(None, ["external=[{name: siteb, source: data/siteb, format: coco}]"])
    difficulty = np.random.default_rng(0).random(100)
    rows, images = [], {}
    for r, recipe in enumerate(RECIPES):
        for init in ("coco", "scratch"):
            for fraction in (0.25, 0.5, 1.0):
                name = f"{recipe}-{init}-f{int(fraction * 100)}-s0-abc123"
                rate = (0.55 if init == "coco" else 0.3) + 0.3 * fraction + 0.02 * r
                hits = list(difficulty < rate)
                images[name] = _arm(100, hits)
                rows.append({"name": name, "label": f"{recipe} / {init} / {fraction * 100:g} %", "recipe": recipe,
                             "init": init, "fraction": fraction, "seed": 0, "epochs": 20, "budget_rule": "epochs",
                             "planned_steps": int(80 / fraction), "state": "success", "rev": "0" * 40,
                             "map50": round(float(np.mean(hits)), 4), "map50_95": round(float(np.mean(hits)) * 0.6, 4),
                             "cpm": round(float(np.mean(hits)), 4), "optimizer_steps": int(80 * fraction),
                             "train_seconds": 100.0 * fraction * (0.7 if recipe == "feature_extraction" else 1) + r,
                             "trainable_params": 600_000 if recipe == "feature_extraction" else 2_500_000,
                             "train_images": int(205 * fraction),
                             "external": {"siteb": {"map50": round(rate * 0.8, 4), "ci95": [0.1, 0.9]}}})
    rows.append({"name": "progressive-coco-f10-s0-abc123", "label": "progressive / coco / 10 %",
                 "recipe": "progressive", "init": "coco", "fraction": 0.1, "seed": 0, "epochs": 20,
                 "budget_rule": "epochs", "planned_steps": 20, "state": "failed", "rev": None})
    compared = compare(rows, images, 1, 0.1, 300, 0, 0.1, RECIPES)
    return json.loads(json.dumps(assemble(params, rows, compared, "f" * 40, ["nodule"], 300)))


def _num(text: str) -> Any:
    return json.loads(text)


def _check_numbers(dom: Any, results: dict[str, Any]) -> None:
    done = [a for a in results["arms"] if a.get("map50") is not None]
    shown = {a["data-arm"]: a for a in dom.where() if "data-map50" in a}
    assert set(shown) == {a["name"] for a in done}
    vs_best = {c["arm"]: c for c in results["comparisons"]["vs_best"]}
    for arm in done:
        row = shown[arm["name"]]
        assert _num(row["data-map50"]) == arm["map50"] and _num(row["data-cpm"]) == arm["cpm"]
        assert _num(row["data-map50-95"]) == arm["map50_95"]
        assert _num(row["data-map50-ci"]) == arm["ci95"]["map50"]
        assert _num(row["data-train-seconds"]) == arm["train_seconds"]
        assert _num(row["data-trainable"]) == arm["trainable_params"]
        if arm["name"] in vs_best:
            assert _num(row["data-diff"]) == vs_best[arm["name"]]["difference"]
            assert _num(row["data-diff-ci"]) == vs_best[arm["name"]]["ci95"]
    cells = dom.where(data_external="siteb")
    assert sorted(_num(c["data-value"]) for c in cells) == sorted(a["external"]["siteb"]["map50"] for a in done)
    for c in results["comparisons"]["coco_vs_scratch"]:
        (row,) = dom.where(data_coco=c["coco"])
        assert _num(row["data-diff"]) == c["difference"] and _num(row["data-diff-ci"]) == c["ci95"]
    rec = dom.by_id("study-recommendation")
    assert rec["data-arm"] == (results["recommendation"]["arm"] or "")
    assert _num(rec["data-cannot-tell"]) is results["recommendation"]["cannot_tell"]
    (missing,) = dom.where(data_missing_arm="progressive-coco-f10-s0-abc123")
    assert missing is not None


def test_study_page_is_self_contained_and_states_the_recommendation(results: dict[str, Any], tmp_path: Path) -> None:
    html = render_study_page(results)
    page = parse(html)
    assert not {"script", "link", "iframe", "object"} & page.tags
    assert all(u.startswith(("data:", "#")) for u in page.links)
    assert "<svg" in html and page.by_id("learning-curves")
    assert results["recommendation"]["text"] in html.replace("&#39;", "'")
    assert results["recommendation"]["arm"] is not None and not results["recommendation"]["cannot_tell"]
    _check_numbers(page, results)


@needs_chromium
def test_chromium_shows_the_study_numbers_without_network(results: dict[str, Any], tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_study_page(results))
    seen = open_in_chromium(page, tmp_path, height=4000)
    assert seen["console"] == [] and seen["requests"] == []
    _check_numbers(parse(seen["dom"]), results)
    shot = Path(os.environ.get("DETFLOW_STUDY_SCREENSHOT", tmp_path / "study.png"))
    open_in_chromium(page, tmp_path, screenshot=shot, height=2600)
    assert shot.stat().st_size > 20_000


def test_the_run_report_has_the_study_section(results: dict[str, Any], tmp_path: Path) -> None:
    from pipeline.report import ReportInputs, write_report

    reports = tmp_path / "reports"
    (reports / "study").mkdir(parents=True)
    (reports / "study" / "results.json").write_text(json.dumps(results))
    out = tmp_path / "report.html"
    write_report(ReportInputs(reports=reports, data=tmp_path / "none", models=tmp_path / "none",
                              lock=tmp_path / "none.lock", bench=tmp_path / "none.json"), load_params(None, []), out)
    page = parse(out.read_text())
    assert page.by_id("study") and page.by_id("study-arms")
    _check_numbers(page, results)
    # without results the run report has no study section (and says nothing about it)
    (reports / "study" / "results.json").unlink()
    write_report(ReportInputs(reports=reports, data=tmp_path / "none", models=tmp_path / "none",
                              lock=tmp_path / "none.lock", bench=tmp_path / "none.json"), load_params(None, []), out)
    assert "study-arms" not in out.read_text()
