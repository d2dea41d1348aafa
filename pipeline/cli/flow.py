"""`detflow flow`: run the Prefect flows locally."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import SetOpt, model_params
from pipeline.errors import DetflowError

app = typer.Typer(no_args_is_help=True, help="Run the Prefect flows locally (PREFECT_API_URL: a server to report "
                       "to; unset: a temporary local one).")


@app.command("run")
def flow_run(
    set_: SetOpt = None,
    push: Annotated[bool, typer.Option(help="dvc push the outputs to the DVC remote afterwards")] = False,
    remote: Annotated[str | None, typer.Option(help="DVC remote URL or folder (default: $DETFLOW_DVC_REMOTE, "
                                                    "else the repository's default remote)")] = None,
    repo: Annotated[Path, typer.Option(help="repository checkout to run in")] = Path("."),
) -> None:
    """Run the training flow locally: each DVC stage as a Prefect task, then report, register and promote."""
    if not repo.is_dir():
        raise DetflowError(f"repository checkout {repo} is not a folder")
    model_params(repo / "params.yaml", set_)  # bad params or overrides fail here, before a Prefect server starts
    from pipeline.ultralytics_env import configure_environment

    env = configure_environment()  # before Prefect is imported: its home (settings, database) in .detflow/, not ~
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect's sqlite cannot create a missing folder
    from flows.training import start_local_server, training_pipeline

    start_local_server()  # patient on a cold first start (new database); one clear line if it cannot start
    summary = training_pipeline(overrides=set_ or [], push=push, repo=str(repo), remote=remote)
    for stage, s in summary["stages"].items():
        typer.echo(f"  {stage:<9} {s['status']:<8} {s['seconds']:>7.1f} s")
    typer.echo(f"{summary['message']}; champion {summary['champion']} ({summary['seconds']:.1f} s)")


@app.command("study")
def flow_study(
    set_: SetOpt = None,
    jobs: Annotated[int, typer.Option(min=1, max=64, help="arms trained at once (DVC queue workers)")] = 1,
    repo: Annotated[Path, typer.Option(help="repository checkout to run in")] = Path("."),
) -> None:
    """Run the transfer-learning study as a Prefect flow (detflow study run, then report); its artifact links the
    study page. --set takes study.* keys, e.g. --set study.fractions=[0.5,1.0]."""
    from pipeline.config import parse_override
    from pipeline.study.runner import study_overrides

    if not repo.is_dir():
        raise DetflowError(f"repository checkout {repo} is not a folder")
    study = {k.removeprefix("study."): v for k, v in map(parse_override, study_overrides(set_))}
    model_params(repo / "params.yaml", set_)  # bad params fail here, before a Prefect server starts
    from flows.study import study_pipeline
    from flows.training import start_local_server

    start_local_server()
    summary = study_pipeline(study=study, jobs=jobs, repo=str(repo))
    typer.echo(f"study flow: {summary['done']}/{summary['arms']} arms ({summary['seconds']:.1f} s) -> "
               f"{summary['page']}")
    typer.echo(summary["recommendation"]["text"])
