"""`detflow phantom` and `detflow prepare`: the data stages (no model code: their params load without the family
registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import (
    MirrorOpt,
    ParamsOpt,
    PhantomDirOpt,
    PreparedOpt,
    QuietOpt,
    RawDirOpt,
    SetOpt,
    data_params,
    progress_on,
)

app = typer.Typer()


@app.command()
def phantom(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("data/raw/phantom"),
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, quiet: QuietOpt = False,
) -> None:
    """Write the synthetic chest-CT phantom (DICOM + box CSV), deterministic for its params."""
    from pipeline.data.phantom import generate_phantom

    p = data_params(params, set_, folders={out: "output folder"})
    summary = generate_phantom(p.phantom, out, progress=progress_on(quiet))
    typer.echo(f"phantom: {summary.n_patients} patients, {summary.n_slices} slices "
               f"({summary.n_empty_slices} without nodules), {summary.n_boxes} boxes -> {out}")


@app.command()
def prepare(
    out: PreparedOpt = Path("data/prepared"),
    report: Annotated[Path, typer.Option(help="validation report")] = Path("reports/data_validation.json"),
    raw_dir: RawDirOpt = Path("data/raw"),
    phantom_dir: PhantomDirOpt = Path("data/raw/phantom"),
    mirror: MirrorOpt = None,
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, quiet: QuietOpt = False,
) -> None:
    """Validate, split by patient and write the canonical dataset (YOLO layout, COCO JSON, manifest)."""
    from pipeline.data.prepare import prepare_dataset

    p = data_params(params, set_, folders={out: "prepared dataset folder"}, files={report: "validation report"})
    result = prepare_dataset(p, out, report, raw_dir=raw_dir, phantom_dir=phantom_dir, mirrors=mirror,
                             progress=progress_on(quiet))
    s = result.report["summary"]
    splits = ", ".join(f"{k} {result.split_counts.get(k, 0)}" for k in ("train", "val", "test"))
    typer.echo(f"prepare: {result.n_images} images ({splits}), {result.n_boxes} boxes; "
               f"{s['images_quarantined']} quarantined, {s['boxes_dropped']} boxes dropped, {s['fixed']} fixed "
               f"-> {out} (report {report})")
