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
    from flows.training import start_local_server, training_pipeline

    start_local_server()  # patient on a cold first start (new database); one clear line if it cannot start
    summary = training_pipeline(overrides=set_ or [], push=push, repo=str(repo), remote=remote)
    for stage, s in summary["stages"].items():
        typer.echo(f"  {stage:<9} {s['status']:<8} {s['seconds']:>7.1f} s")
    typer.echo(f"{summary['message']}; champion {summary['champion']} ({summary['seconds']:.1f} s)")
