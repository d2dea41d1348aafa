"""`detflow study run` / `detflow study report`: thin commands over :mod:`pipeline.study.runner`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import MirrorOpt, QuietOpt, RawDirOpt, progress_on
from pipeline.errors import DetflowError

app = typer.Typer(no_args_is_help=True, help="Transfer-learning study: recipe x data fraction x initialisation as "
                  "DVC experiments, compared with paired patient-bootstrap intervals.")

RepoOpt = Annotated[Path, typer.Option(help="the detflow checkout (git + DVC) whose experiments the arms are")]
ParamsOpt = Annotated[Path, typer.Option("--params", help="params file (YAML), relative to --repo")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="study override, e.g. --set study.fractions=[0.5,1] "
                                                  "(repeatable; study.* keys only)")]


def _repo(repo: Path) -> Path:
    if not repo.is_dir():
        raise DetflowError(f"repository checkout {repo} is not a folder")
    return repo.resolve()


@app.command("run")
def run(
    jobs: Annotated[int, typer.Option(min=1, max=64, help="arms trained at once (DVC queue workers); each uses "
                                      "train.cpu_threads")] = 1,
    wait: Annotated[bool, typer.Option(help="follow the queue until every arm finished (--no-wait: queue, start "
                                       "the workers and return)")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check everything and list the arms; queue nothing")
                       ] = False,
    repo: RepoOpt = Path("."),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    raw_dir: RawDirOpt = Path("data/raw"),
    mirror: MirrorOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run every arm not done yet as a DVC experiment (dvc exp run --queue, dvc queue start); resumes a killed
    study."""
    from pipeline.study import queue, runner

    root = _repo(repo)
    if dry_run:
        study = runner.plan_study(root, root / params, set_, raw_dir, mirror)
        _, states = queue.experiments(root)
        for arm in study.arms:
            typer.echo(f"{arm.name:<44} {states[arm.name].state if arm.name in states else 'not run':<8} "
                       f"{arm.train_images:>5} images {arm.epochs:>4} epochs ~{arm.planned_steps} steps  "
                       f"{' '.join(arm.overrides)}")
        typer.echo(f"study: {len(study.arms)} arms, stages {', '.join(study.targets)} (dry run: nothing queued)")
        return
    summary = runner.run_study(root, root / params, set_, jobs, raw_dir, mirror, progress=progress_on(quiet),
                               wait=wait)
    q = summary.queue
    typer.echo(f"study: {len(summary.arms)} arms: {len(q.done)} already done, {len(q.queued)} queued, "
               f"{len(q.requeued)} queued again (failed or interrupted), {len(q.waiting)} were waiting")
    if not wait:
        typer.echo("the queue runs in the background: `dvc queue status`; `detflow study run` follows it")
        return
    ok = sum(1 for s in summary.states.values() if s.state == "success")
    typer.echo(f"study: {ok}/{len(summary.arms)} arms done -> `detflow study report`")
    if summary.failed:
        logs = "; ".join(f"{n}: {summary.states[n].log or 'dvc queue logs ' + n}" for n in summary.failed[:3])
        raise DetflowError(f"{len(summary.failed)} arm(s) failed ({logs}); fix the cause and run `detflow study "
                           "run` again: done arms are kept")


@app.command("report")
def report(
    out: Annotated[Path, typer.Option(help="folder for results.json, learning_curves.svg and report.html")] = Path(
        "reports/study"),
    repo: RepoOpt = Path("."),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    raw_dir: RawDirOpt = Path("data/raw"),
    mirror: MirrorOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Compare the finished arms (paired patient bootstrap), recommend one, and write the study page."""
    from pipeline.study import runner

    root = _repo(repo)
    out = out if out.is_absolute() else root / out
    results = runner.report_study(root, root / params, set_, out, raw_dir, mirror, progress=progress_on(quiet))
    done = sum(1 for a in results["arms"] if a.get("map50") is not None)
    typer.echo(f"study report: {done}/{len(results['arms'])} arms compared -> {out / 'results.json'}, "
               f"{out / 'report.html'}")
    typer.echo(results["recommendation"]["text"])
