"""`detflow` command line: one thin entry per stage. Read params, call the library, write outputs atomically.

Library code raises; only this module turns errors into messages and exit codes.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import ConfigError, DetflowError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="detflow: transfer-learning detection pipeline for medical imaging.")
assets_app = typer.Typer(no_args_is_help=True, help="List and fetch named assets (datasets, weights).")
app.add_typer(assets_app, name="assets")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file (YAML)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set train.epochs=3 (repeatable)")]
MirrorOpt = Annotated[list[Path] | None, typer.Option("--mirror", help="asset mirror folder (repeatable); "
                                                      "default: $DETFLOW_ASSETS")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]


def _params(path: Path, overrides: list[str] | None):  # noqa: ANN202 - Params, imported lazily
    from pipeline.config import load_params

    return load_params(path, overrides or [])


def _progress(quiet: bool) -> bool:
    return not quiet and os.environ.get("DETFLOW_NO_PROGRESS", "") in ("", "0")


@app.command()
def phantom(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("data/raw/phantom"),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write the synthetic chest-CT phantom (DICOM + box CSV), deterministic for its params."""
    from pipeline.data.phantom import generate_phantom

    p = _params(params, set_)
    summary = generate_phantom(p.phantom, out, progress=_progress(quiet))
    typer.echo(f"phantom: {summary.n_patients} patients, {summary.n_slices} slices "
               f"({summary.n_empty_slices} without nodules), {summary.n_boxes} boxes -> {out}")


@app.command()
def prepare(
    out: Annotated[Path, typer.Option(help="prepared dataset folder")] = Path("data/prepared"),
    report: Annotated[Path, typer.Option(help="validation report")] = Path("reports/data_validation.json"),
    raw_dir: Annotated[Path, typer.Option(help="DVC-tracked raw assets")] = Path("data/raw"),
    phantom_dir: Annotated[Path, typer.Option(help="phantom folder")] = Path("data/raw/phantom"),
    mirror: MirrorOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Validate, split by patient and write the canonical dataset (YOLO layout, COCO JSON, manifest)."""
    from pipeline.data.prepare import prepare_dataset

    p = _params(params, set_)
    result = prepare_dataset(p, out, report, raw_dir=raw_dir, phantom_dir=phantom_dir, mirrors=mirror,
                             progress=_progress(quiet))
    s = result.report["summary"]
    splits = ", ".join(f"{k} {result.split_counts.get(k, 0)}" for k in ("train", "val", "test"))
    typer.echo(f"prepare: {result.n_images} images ({splits}), {result.n_boxes} boxes; "
               f"{s['images_quarantined']} quarantined, {s['boxes_dropped']} boxes dropped, {s['fixed']} fixed "
               f"-> {out} (report {report})")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="prepared dataset folder")] = Path("data/prepared"),
    out: Annotated[Path, typer.Option(help="weights folder (best.pt, last.pt, params.yaml)")] = Path("models/train"),
    reports: Annotated[Path, typer.Option(help="training reports folder")] = Path("reports/train"),
    raw_dir: Annotated[Path, typer.Option(help="DVC-tracked raw assets")] = Path("data/raw"),
    mirror: MirrorOpt = None,
    trust: Annotated[bool, typer.Option(help="load a pretrained pickle whose sha256 is not pinned")] = False,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a detector (YOLO or Faster R-CNN) from COCO weights with the configured strategy."""
    from pipeline.train import train_model
    from pipeline.train.common import default_workdir

    p = _params(params, set_)
    result = train_model(p, data, out, reports, default_workdir(), raw_dir=raw_dir, mirrors=mirror, trust=trust,
                         progress=_progress(quiet))
    t = result.transfer
    if t.get("WARNING"):
        typer.secho(f"WARNING: {t['WARNING']}", err=True, fg="yellow")
    resumed = f", resumed at epoch {result.start_epoch}" if result.resumed else ""
    typer.echo(f"train: {result.family}/{result.model} {result.epochs_run} epochs{resumed}; pretrained "
               f"{t['source']} ({t.get('tensors_transferred', 0)} tensors transferred); "
               f"{', '.join(f'{k} {v:.4f}' for k, v in result.metrics.items() if isinstance(v, float))} -> {out}")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="trained checkpoint")] = Path("models/train/best.pt"),
    data: Annotated[Path, typer.Option(help="prepared dataset folder")] = Path("data/prepared"),
    reports: Annotated[Path, typer.Option(help="reports folder")] = Path("reports"),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score the model (COCO mAP, per-class AP, FROC, bootstrap CIs) and apply the promotion gate."""
    from pipeline.evaluate import evaluate_model
    from pipeline.evaluate.gate import gate_table

    p = _params(params, set_)
    result = evaluate_model(p, model, data, reports, progress=_progress(quiet))
    m = result.metrics
    typer.echo(f"evaluate ({m['split']}, {m['n_images']} images, {m['n_patients']} patients, "
               f"{result.seconds:.1f} s): mAP50 {m['map50']:.4f} {m['ci95']['map50']}, mAP50-95 "
               f"{m['map50_95']:.4f}, CPM {m['froc']['cpm']:.4f} {m['ci95']['cpm']}")
    typer.echo("gate passed:\n" + gate_table(result.gate))


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="trained checkpoint")] = Path("models/train/best.pt"),
    data: Annotated[Path, typer.Option(help="prepared dataset folder")] = Path("data/prepared"),
    reports: Annotated[Path, typer.Option(help="reports folder (gate.json in, parity.json out)")] = Path("reports"),
    out: Annotated[Path, typer.Option(help="folder for model.onnx and model_card.json")] = Path("models"),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Export to ONNX after a passed gate; measure PyTorch/ONNX parity; write the model card."""
    from pipeline.export import export_model

    p = _params(params, set_)
    result = export_model(p, model, data, reports, out)
    q = result.parity
    typer.echo(f"export: {result.model} (sha256 {result.card['sha256'][:12]}, opset {result.card['opset']}); parity "
               f"on {q['n_images']} images: matched {q['matched_fraction']:.4f}, max box diff "
               f"{q['max_abs_box_diff_px']:.3f} px, max score diff {q['max_abs_score_diff']:.4f}, mAP50-95 "
               f"{q['map50_95_torch']:.4f} -> {q['map50_95_onnx']:.4f} (delta {q['delta']:.4f})")


@app.command()
def infer(
    source: Annotated[Path, typer.Argument(help="image, folder, DICOM series, file list (.txt) or COCO split (.json)")],
    model: Annotated[Path, typer.Option(help="ONNX model (model_card.json next to it)")] = Path("models/model.onnx"),
    out: Annotated[Path, typer.Option(help="output folder: predictions.json, infer_errors.json")] = Path("predictions"),
    batch: Annotated[int, typer.Option(min=1, help="images per session.run")] = 8,
    render: Annotated[bool, typer.Option(help="also write images with boxes drawn")] = False,
    providers: Annotated[str, typer.Option(help="auto, or a comma list such as CPUExecutionProvider")] = "auto",
    require_gpu: Annotated[bool, typer.Option(help="fail unless the CUDA provider is active")] = False,
    conf: Annotated[float | None, typer.Option(help="score threshold (default: the card's)")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Batch inference with the ONNX engine; bad files are reported and skipped, never abort the batch."""
    from pipeline.infer.batch import run_batch
    from pipeline.infer.engine import OnnxDetector

    detector = OnnxDetector(model, providers=providers, require_gpu=require_gpu)
    if conf is not None:
        detector.conf = conf
    s = run_batch(detector, source, out, batch=batch, render=render, progress=_progress(quiet))
    typer.echo(f"infer: {s.n_images} images, {s.n_detections} detections, {len(s.errors)} skipped "
               f"(providers: {', '.join(s.providers)}) -> {out / 'predictions.json'}")
    for e in s.errors[:10]:
        typer.secho(f"  skipped {e['file']}: {e['kind']}: {e['detail']}", err=True, fg="yellow")


@assets_app.command("list")
def assets_list(
    raw_dir: Annotated[Path, typer.Option(help="DVC-tracked raw assets")] = Path("data/raw"),
    mirror: MirrorOpt = None,
    verify: Annotated[bool, typer.Option(help="verify checksums (slower)")] = False,
) -> None:
    """Show every named asset, its license and where it is available."""
    from pipeline import assets

    for row in assets.list_assets(raw_dir=raw_dir, mirrors=mirror, verify=verify):
        typer.echo(f"{row['name']:<14} {row['kind']:<4} {row['license']:<10} "
                   f"{'available' if row['available'] else 'NOT AVAILABLE'}  {row['url']}")
        for loc in row["locations"]:
            typer.echo(f"{'':<16}{loc['where']:<7} {loc['status']:<8} {loc['path']}")


@assets_app.command("fetch")
def assets_fetch(
    name: str,
    raw_dir: Annotated[Path, typer.Option(help="DVC-tracked raw assets")] = Path("data/raw"),
    mirror: MirrorOpt = None,
    trust: Annotated[bool, typer.Option(help="accept an asset without a pinned checksum")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Materialise an asset under data/raw/NAME (verified), ready for `dvc add`."""
    from pipeline import assets

    path = assets.fetch(name, raw_dir=raw_dir, mirrors=mirror, trust=trust, progress=_progress(quiet))
    typer.echo(f"{name}: {path}")


def main() -> None:
    """Console entry: user errors become one clear message and exit 2 (bad params) or 1, never a traceback."""
    logging.basicConfig(level=os.environ.get("DETFLOW_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except ConfigError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)
    except DetflowError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True, fg="red")
        sys.exit(130)
    except Exception as e:  # click's own usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit | click.exceptions.Abort):
            sys.exit(getattr(e, "exit_code", 1))
        raise


if __name__ == "__main__":
    main()
