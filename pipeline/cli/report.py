"""`detflow report`: the run report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import ParamsOpt, PhantomDirOpt, PreparedOpt, RawDirOpt, SetOpt, model_params

app = typer.Typer()


@app.command()
def report(
    reports: Annotated[Path, typer.Option(help="reports folder (metrics, gate, plots, train, external)")] = Path(
        "reports"),
    data: PreparedOpt = Path("data/prepared"),
    models: Annotated[Path, typer.Option(help="folder of model.onnx, model_card.json and train/")] = Path("models"),
    out: Annotated[Path, typer.Option(help="the report (one self-contained HTML file)")] = Path(
        "reports/report.html"),
    model_copy: Annotated[Path | None, typer.Option(help="also write it here, e.g. models/report.html (served at "
                                                    "GET /v1/model/report)")] = None,
    lock: Annotated[Path, typer.Option(help="DVC lock file (output hashes)")] = Path("dvc.lock"),
    bench: Annotated[Path, typer.Option(help="inference benchmark result, when one exists")] = Path(
        "bench/results/inference.json"),
    source: Annotated[Path | None, typer.Option(help="raw dataset folder, for thumbnails of quarantined and fixed "
                                                "samples (default: data.source resolved as prepare does)")] = None,
    raw_dir: RawDirOpt = Path("data/raw"),
    phantom_dir: PhantomDirOpt = Path("data/raw/phantom"),
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
) -> None:
    """Write the run report: one HTML page (verdict, data, transfer, evaluation, generalisation, deployment,
    provenance) that opens offline. Renders after a failed gate too; missing inputs are named in the page."""
    from pipeline.report import ReportInputs, write_report
    from pipeline.report.collect import default_source

    p = model_params(params, set_, files={out: "report", **({model_copy: "report copy"} if model_copy else {})})
    inputs = ReportInputs(reports=reports, data=data, models=models, lock=lock, bench=bench, params=params,
                          overrides=tuple(set_ or ()),
                          source=source if source is not None else default_source(p, raw_dir, phantom_dir))
    result = write_report(inputs, p, out, [model_copy] if model_copy is not None else None)
    verdict = "no gate result" if result.passed is None else "gate PASS" if result.passed else \
        f"gate FAIL ({', '.join(result.failed_checks)})"
    typer.echo(f"report: {verdict}; {result.size_bytes / 1e6:.2f} MB, {len(result.missing)} inputs missing -> {out}")
