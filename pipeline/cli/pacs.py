"""`detflow pacs run`: DICOM in, DICOM out over DICOMweb (pipeline/pacs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import OnnxModelOpt, ProvidersOpt, QuietOpt, progress_on, threshold_option, writable
from pipeline.errors import DetflowError

app = typer.Typer(no_args_is_help=True, help="DICOM in, DICOM out: detect in a PACS's series over DICOMweb and "
                  "store a DICOM Structured Report per series back.")


@app.command("run")
def pacs_run(
    url: Annotated[str, typer.Option(help="DICOMweb base URL, e.g. https://pacs.example.org/dicom-web (credentials: "
                                     "$DETFLOW_PACS_TOKEN, or $DETFLOW_PACS_USER + $DETFLOW_PACS_PASSWORD)")],
    model: OnnxModelOpt = Path("models/model.onnx"),
    study: Annotated[str | None, typer.Option(help="only this Study Instance UID")] = None,
    since: Annotated[str | None, typer.Option(help="only studies from this date on (YYYY-MM-DD)")] = None,
    modality: Annotated[str | None, typer.Option(help="only series of this modality, e.g. CT")] = None,
    force: Annotated[bool, typer.Option(help="also run series of modalities the model was not trained on")] = False,
    work: Annotated[Path | None, typer.Option(help="work folder of the ledger (default: $DETFLOW_WORKDIR/pacs, "
                                              ".detflow/pacs)")] = None,
    conf: Annotated[float | None, typer.Option(callback=threshold_option,
                                               help="score threshold in [0, 1] (default: the card's)")] = None,
    workers: Annotated[int, typer.Option(min=0, help="instances retrieved and detected at once; 0: auto")] = 0,
    ca_bundle: Annotated[Path | None, typer.Option(help="CA certificates for the PACS's TLS certificate (default: "
                                                   "$DETFLOW_PACS_CA_BUNDLE, else the system's)")] = None,
    insecure: Annotated[bool, typer.Option(help="do not verify the PACS's TLS certificate (warned about)")] = False,
    retries: Annotated[int, typer.Option(min=0, max=10, help="retries of a request that could not connect")] = 3,
    providers: ProvidersOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """QIDO-RS the studies, WADO-RS each instance, detect, STOW-RS one DICOM SR per series. The ledger in the work
    folder skips finished series and resumes a killed run; a series the model cannot read is skipped with a reason."""
    from pipeline.infer.engine import OnnxDetector, plan_workers
    from pipeline.pacs.client import Pacs, PacsError
    from pipeline.pacs.ledger import Ledger
    from pipeline.pacs.run import PacsRunner, iter_lines, parse_since
    from pipeline.ultralytics_env import state_root

    if study and since:
        raise typer.BadParameter("give --study or --since, not both")
    try:
        since_date = parse_since(since) if since else None
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if ca_bundle is not None and not ca_bundle.is_file():
        raise DetflowError(f"CA bundle {ca_bundle} not found")
    work = work if work is not None else state_root() / "pacs"
    writable(work, "work folder")
    pacs = Pacs(url, verify=not insecure, ca_bundle=str(ca_bundle) if ca_bundle else None, retries=retries)
    workers, threads = plan_workers(workers)
    detector = OnnxDetector(model, providers=providers, threads=threads)
    if conf is not None:
        detector.conf = conf
    pacs.check()  # unreachable or refused: one line, before any work
    with Ledger(work) as ledger:
        runner = PacsRunner(pacs, detector, ledger, force=force, workers=workers, progress=progress_on(quiet))
        refs, n_studies = runner.find_series(study=study, since=since_date, modality=modality)
        summary = runner.run(refs, n_studies)
    typer.echo(summary.line())
    for line in iter_lines(summary):
        typer.secho(f"  {line}", err=True, fg="yellow")
    if summary.of("failed"):
        raise PacsError(f"{len(summary.of('failed'))} series failed (listed above; the instances in "
                        f"{ledger.path}): nothing was stored for them, the next run retries them")
    if summary.nothing_to_do():
        raise DetflowError("nothing to analyse: every selected series was skipped (listed above)")
