"""Prefect flow for the transfer-learning study: one deployment runs every arm (``detflow study run``: DVC's queue,
done arms skipped), compares them (``detflow study report``), refreshes the run report page, and publishes a
markdown artifact with the recommendation, the arms and a link to the study page.

``study``: overrides of params.yaml's ``study`` section, e.g. ``{"fractions": [0.5, 1.0], "init": ["coco"]}``;
validated (types and :func:`pipeline.study.plan.check_study`) before any task starts. No domain logic here: each task
is one ``detflow`` command, as the training flow's are ``dvc repro`` stages.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.training import StageFailed, _logger, run_logged
from pipeline.config import load_params

STUDY_REPORT_KEY = "detflow-study-report"
STUDY_DIR = "reports/study"


def study_sets(study: dict[str, Any] | None) -> list[str]:
    """``{"fractions": [0.5, 1]}`` -> ``["study.fractions=[0.5, 1]"]`` (values as JSON, a YAML subset)."""
    return [f"study.{k}={json.dumps(v)}" for k, v in (study or {}).items()]


def _detflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


@task(name="study-run", cache_policy=NO_CACHE)
def study_run(repo: str, sets: list[str], jobs: int) -> str:
    """Every arm not done yet, through DVC's queue; the command's summary lines."""
    code, out = run_logged(_detflow("study", "run", "--quiet", "--jobs", str(jobs),
                                    *[x for s in sets for x in ("--set", s)]), Path(repo))
    if code != 0:
        raise StageFailed(f"detflow study run failed (exit {code}):\n{out.strip()[-3000:]}")
    return out


@task(name="study-report", cache_policy=NO_CACHE)
def study_report(repo: str, sets: list[str]) -> dict[str, Any]:
    """results.json and the study page; then the run report page, which shows the study as a section."""
    root = Path(repo)
    code, out = run_logged(_detflow("study", "report", "--quiet", *[x for s in sets for x in ("--set", s)]), root)
    if code != 0:
        raise StageFailed(f"detflow study report failed (exit {code}):\n{out.strip()[-3000:]}")
    code, out = run_logged(_detflow("report", "--out", "reports/report.html"), root)
    if code != 0:  # the run report needs no finished pipeline; a failure here is logged, the study stands
        _logger().warning("the run report could not be refreshed: %s", out.strip()[-300:])
    return json.loads((root / STUDY_DIR / "results.json").read_text())


def study_markdown(results: dict[str, Any], page: Path) -> str:
    """The artifact: the recommendation, every arm with its interval, and links to the pages."""
    def ci(v: Any) -> str:
        return f"[{v[0]:.3f}, {v[1]:.3f}]" if v and v[0] == v[0] else "n/a"

    vs_best = {c["arm"]: c for c in results["comparisons"]["vs_best"]}
    lines = ["# Transfer-learning study", "", f"**{results['recommendation']['text']}**", "",
             f"Budget: {results['budget']['text']}. Intervals: paired patient bootstrap "
             f"({results['bootstrap']['resamples']} resamples of {results['bootstrap']['n_patients']} test patients).",
             "", "| arm | train images | test mAP50 [95% CI] | Δ vs best [paired 95% CI] | train s |",
             "|---|---|---|---|---|"]
    for a in sorted((a for a in results["arms"] if a.get("map50") is not None), key=lambda a: -a["map50"]):
        d = vs_best.get(a["name"])
        diff = "best" if d is None else f"{d['difference']:+.3f} {ci(d['ci95'])}"
        seconds = "n/a" if a.get("train_seconds") is None else f"{a['train_seconds']:.0f}"
        lines.append(f"| {a['label']} | {a['train_images']} | {a['map50']:.3f} {ci(a['ci95']['map50'])} | {diff} | "
                     f"{seconds} |")
    for m in results["missing"]:
        lines.append(f"| {m['label']} | | {m['state']} | | |")
    lines += ["", f"The study on one page: [{page.name}]({page.resolve().as_uri()})"]
    return "\n".join(lines) + "\n"


@flow(name="transfer-study", description="recipe x data fraction x initialisation as DVC experiments; paired "
      "comparisons, a recommendation and its page")
def study_pipeline(study: dict[str, Any] | None = None, jobs: int = 1, repo: str = ".") -> dict[str, Any]:
    """Run and report the study of checkout ``repo`` with ``study`` overrides; returns the recommendation."""
    from pipeline.study.plan import check_study

    root, t0 = Path(repo).resolve(), time.perf_counter()
    sets = study_sets(study)
    check_study(load_params(root / "params.yaml", sets))  # bad study params fail before any task
    summary = study_run(str(root), sets, jobs)
    results = study_report(str(root), sets)
    page = root / STUDY_DIR / "report.html"
    create_markdown_artifact(markdown=study_markdown(results, page), key=STUDY_REPORT_KEY,
                             description="detflow transfer-learning study: recommendation and arms")
    return {"recommendation": results["recommendation"], "arms": len(results["arms"]),
            "done": sum(1 for a in results["arms"] if a.get("map50") is not None), "page": str(page),
            "run": summary.strip().splitlines()[-1] if summary.strip() else "",
            "seconds": round(time.perf_counter() - t0, 2)}
