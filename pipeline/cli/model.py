"""`detflow train`, `detflow evaluate`, `detflow export`: the model stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import (
    MirrorOpt,
    ParamsOpt,
    PreparedOpt,
    QuietOpt,
    RawDirOpt,
    SetOpt,
    model_params,
    progress_on,
)

app = typer.Typer()


@app.command()
def train(
    data: PreparedOpt = Path("data/prepared"),
    out: Annotated[Path, typer.Option(help="weights folder (best.pt, last.pt, params.yaml)")] = Path("models/train"),
    reports: Annotated[Path, typer.Option(help="training reports folder")] = Path("reports/train"),
    raw_dir: RawDirOpt = Path("data/raw"),
    mirror: MirrorOpt = None,
    trust: Annotated[bool, typer.Option(help="load a pretrained pickle whose sha256 is not pinned")] = False,
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, quiet: QuietOpt = False,
) -> None:
    """Fine-tune a detector (a YOLO or torchvision model) from COCO weights with the configured strategy."""
    from pipeline.train.runs import default_workdir
    from pipeline.train.stage import train_model

    p = model_params(params, set_, folders={out: "weights folder", reports: "reports folder"})
    result = train_model(p, data, out, reports, default_workdir(), raw_dir=raw_dir, mirrors=mirror, trust=trust,
                         progress=progress_on(quiet))
    t = result.transfer
    # a scratch fallback's WARNING was logged by the family's trainer already (stderr): not repeated here
    resumed = f", resumed at epoch {result.start_epoch}" if result.resumed else ""
    typer.echo(f"train: {result.family}/{result.model} {result.epochs_run} epochs{resumed}; pretrained "
               f"{t['source']} ({t.get('tensors_transferred', 0)} tensors transferred); "
               f"{', '.join(f'{k} {v:.4f}' for k, v in result.metrics.items() if isinstance(v, float))} -> {out}")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="trained checkpoint (.pt), or an exported model (.onnx, its "
                                        "model_card.json beside it)")] = Path("models/train/best.pt"),
    data: Annotated[Path, typer.Option(help="prepared dataset folder (scores evaluate.split, applies the gate), or "
                                       "any labelled dataset (scored whole as an external set)")] = Path(
        "data/prepared"),
    format_: Annotated[str, typer.Option("--format", help="external dataset format: auto, voc, coco, yolo, "
                                         "dicom_csv")] = "auto",
    class_map: Annotated[str | None, typer.Option(help="external label -> model class, e.g. rbc=RBC,wbc=WBC; "
                                                  "other labels that are not model classes are dropped")] = None,
    name: Annotated[str | None, typer.Option(help="external set name: results in REPORTS/external/NAME "
                                             "(default: the dataset folder's name)")] = None,
    external: Annotated[bool, typer.Option("--external", help="score every set of params `external`: "
                                           "REPORTS/external/<name>/ and REPORTS/generalisation.json")] = False,
    reports: Annotated[Path, typer.Option(help="reports folder")] = Path("reports"),
    raw_dir: Annotated[Path, typer.Option(help="DVC-tracked raw assets (external source bccd)")] = Path("data/raw"),
    mirror: MirrorOpt = None,
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, quiet: QuietOpt = False,
) -> None:
    """Score the model (COCO mAP, per-class AP, FROC, bootstrap CIs) and apply the promotion gate; or score it on
    external sets (another site's labelled data) next to the internal test split."""
    from pipeline.evaluate.external import GeneralisationResult, run_evaluate
    from pipeline.evaluate.gate import gate_table

    p = model_params(params, set_, folders={reports: "reports folder"})
    result = run_evaluate(p, model, data, reports, external=external, fmt=format_, class_map=class_map, name=name,
                          raw_dir=raw_dir, mirrors=mirror, progress=progress_on(quiet))
    if isinstance(result, GeneralisationResult):
        for set_name, m in result.externals.items():
            row = result.table["sets"][set_name]
            internal = "" if row["internal_map50_same_classes"] is None else \
                f" (internal {row['internal_map50_same_classes']:.4f} on the same classes, drop {row['drop']:.4f})"
            typer.echo(f"external {set_name} ({m['n_images']} images, {m['n_patients']} patients): mAP50 "
                       f"{m['map50']:.4f} {m['ci95']['map50']}{internal} -> {reports / 'external' / set_name}")
            if m["note"]:
                typer.echo(f"  {m['note']}")
        if external:
            typer.echo(f"generalisation: {len(result.externals)} external sets -> {reports / 'generalisation.json'}")
        if result.gate["checks"]:
            typer.echo("external gate passed:\n" + gate_table(result.gate))
        return
    m = result.metrics
    typer.echo(f"evaluate ({m['split']}, {m['n_images']} images, {m['n_patients']} patients, "
               f"{result.seconds:.1f} s): mAP50 {m['map50']:.4f} {m['ci95']['map50']}, mAP50-95 "
               f"{m['map50_95']:.4f}, CPM {m['froc']['cpm']:.4f} {m['ci95']['cpm']}")
    typer.echo("gate passed:\n" + gate_table(result.gate))


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="trained checkpoint")] = Path("models/train/best.pt"),
    data: PreparedOpt = Path("data/prepared"),
    reports: Annotated[Path, typer.Option(help="reports folder (gate.json in, parity.json out)")] = Path("reports"),
    out: Annotated[Path, typer.Option(help="folder for model.onnx and model_card.json")] = Path("models"),
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
) -> None:
    """Export to ONNX after a passed gate; measure PyTorch/ONNX parity; write the model card."""
    from pipeline.export import export_model

    p = model_params(params, set_, folders={out: "model folder", reports: "reports folder"})
    result = export_model(p, model, data, reports, out)
    q = result.parity
    typer.echo(f"export: {result.model} (sha256 {result.card['sha256'][:12]}, opset {result.card['opset']}); parity "
               f"on {q['n_images']} images: matched {q['matched_fraction']:.4f}, max box diff "
               f"{q['max_abs_box_diff_px']:.3f} px, max score diff {q['max_abs_score_diff']:.4f}, mAP50-95 "
               f"{q['map50_95_torch']:.4f} -> {q['map50_95_onnx']:.4f} (delta {q['delta']:.4f})")
