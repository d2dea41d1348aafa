"""``detflow study run`` and ``detflow study report``: checks, then DVC's queue, then the comparison.

Order of ``run`` (everything that can be wrong is found before an arm is queued):
params (:func:`~pipeline.study.plan.check_study`) -> git + DVC repository -> COCO weights when ``init`` has coco ->
``dvc repro prepare`` in the checkout (the arms share that prepared dataset; their own ``prepare`` is then up to
date) -> every fraction and seed on that data (:func:`~pipeline.study.plan.check_data`) -> arms -> queue -> start the
workers -> wait (a progress bar over the arms).

The arms are experiments of the checkout's ``params.yaml`` (their baseline), so ``--set`` takes ``study.*`` keys only:
other params go into params.yaml, where DVC records them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.study import plan, queue

PREPARED = Path("data/prepared")  # dvc.yaml's layout
STUDY_DIR = Path("reports/study")


def study_overrides(overrides: list[str] | None) -> list[str]:
    """``--set`` items of a study command: study keys only (see the module docstring)."""
    items = list(overrides or [])
    for item in items:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("study."):
            raise ConfigError(f"--set {item}: `detflow study` takes study.* overrides only; every arm is a DVC "
                              "experiment of the checkout's params.yaml, so set other params there")
    return items


@dataclass
class Prepared:
    """A checked study: its arms and the stages each runs."""

    params: Any
    arms: list[plan.Arm]
    targets: list[str]
    baseline: str
    coco_weights: str | None


def plan_study(repo: Path, params_path: Path, overrides: list[str] | None, raw_dir: Path,
               mirrors: list[Path] | None, prepare: bool = True) -> Prepared:
    """Every check, ``dvc repro prepare`` (unless ``prepare`` is False), and the arms."""
    from pipeline.config import load_params

    params = load_params(params_path, study_overrides(overrides))
    plan.check_study(params)
    baseline = queue.check_repo(repo)
    weights = plan.check_coco_weights(params, repo / raw_dir if not raw_dir.is_absolute() else raw_dir, mirrors)
    if prepare:
        queue.dvc(repo, "repro", "prepare")
    prepared = repo / PREPARED
    if not (prepared / "coco" / "train.json").is_file():
        raise ConfigError(f"{prepared} has no prepared dataset; run `dvc repro prepare` first")
    sizes = plan.check_data(params, prepared)
    arms = plan.study_arms(params, sizes, params_path=params_path)
    return Prepared(params, arms, plan.stage_targets(params), baseline, weights)


@dataclass
class RunSummary:
    arms: list[plan.Arm]
    queue: queue.QueuePlan
    states: dict[str, queue.ExpState] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.states.items() if s.state == "failed"]


def run_study(repo: Path, params_path: Path, overrides: list[str] | None, jobs: int, raw_dir: Path,
              mirrors: list[Path] | None, progress: bool = True, wait: bool = True) -> RunSummary:
    """Queue every arm that is not done, start DVC's workers, and (``wait``) follow them to the end."""
    study = plan_study(repo, params_path, overrides, raw_dir, mirrors)
    todo = queue.enqueue(repo, study.arms, study.targets)
    summary = RunSummary(study.arms, todo)
    if len(todo.done) == len(study.arms):
        names = {a.name for a in study.arms}  # only this study's arms: the checkout may hold other studies' too
        summary.states = {n: s for n, s in queue.experiments(repo)[1].items() if n in names}
        return summary
    queue.start_workers(repo, jobs)
    if wait:
        summary.states = queue.wait(repo, study.arms, jobs, study.targets, progress=progress)
    return summary


def report_study(repo: Path, params_path: Path, overrides: list[str] | None, out_dir: Path, raw_dir: Path,
                 mirrors: list[Path] | None, progress: bool = True) -> dict[str, Any]:
    """results.json, learning_curves.svg and report.html under ``out_dir`` (each written atomically)."""
    from pipeline.fileio import atomic_write_json, atomic_write_text
    from pipeline.report.study import learning_curve_svg, render_study_page
    from pipeline.study.results import build_results

    study = plan_study(repo, params_path, overrides, raw_dir, mirrors, prepare=False)
    baseline, states = queue.experiments(repo)
    results = build_results(study.params, repo, study.arms, states, baseline, repo / PREPARED, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    svg = learning_curve_svg(results)
    if svg is not None:
        atomic_write_text(out_dir / "learning_curves.svg", svg)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "report.html", render_study_page(json.loads(json.dumps(results)),
                                                                 out_dir / "results.json"))
    return results
