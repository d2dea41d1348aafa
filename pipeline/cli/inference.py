"""`detflow adapt`, `detflow infer`, `detflow shift`: the ONNX engine on new images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import OnnxModelOpt, ProvidersOpt, QuietOpt, progress_on, threshold_option, writable
from pipeline.errors import DetflowError

app = typer.Typer()


@app.command()
def adapt(
    source: Annotated[Path, typer.Argument(help="unlabelled images of the new site: folder, image, .txt list or "
                                           "COCO .json")],
    model: OnnxModelOpt = Path("models/model.onnx"),
    out: Annotated[Path, typer.Option(help="adapted model folder (model.onnx + model_card.json)")] = Path(
        "models/adapted"),
    pixel_size: Annotated[float | None, typer.Option(help="the new site's pixel size (e.g. um per pixel); the "
                                                     "engine brings each image to the training field of view")] = None,
    train_pixel_size: Annotated[float | None, typer.Option(help="the training images' pixel size in the unit of "
                                                           "--pixel-size, when the card records none (not DICOM)")
                                ] = None,
    conf: Annotated[float | None, typer.Option(callback=threshold_option, help="score threshold of the detections "
                                               "whose sizes are compared (default: the card's)")] = None,
    max_images: Annotated[int, typer.Option(help="target images used (in name order)")] = 64,
) -> None:
    """Adapt a model to a new site without labels: known pixel size first, else the input scale whose predicted
    object sizes match the training objects'. Writes a model folder that infer, serve and evaluate use as is."""
    from pipeline.adapt import adapt_model

    if not source.exists():
        raise DetflowError(f"adapt source {source} does not exist")
    writable(out, "adapted model folder")
    result = adapt_model(model, source, out, pixel_size=pixel_size, train_pixel_size=train_pixel_size, conf=conf,
                         max_images=max_images)
    a = result.adaptation
    b, c = a["before"], a["after"]
    typer.echo(f"adapt: {a['method']}, input scale {a['input_scale']:.4g} on {a['n_images']} images "
               f"({a['n_skipped']} skipped); confident detections {b['detections']} -> {c['detections']} "
               f"-> {out / 'model_card.json'}")


@app.command()
def infer(
    source: Annotated[Path, typer.Argument(help="image, folder, DICOM series, file list (.txt) or COCO split (.json)")],
    model: OnnxModelOpt = Path("models/model.onnx"),
    out: Annotated[Path, typer.Option(help="output folder: predictions.json, infer_errors.json")] = Path("predictions"),
    batch: Annotated[int, typer.Option(min=1, help="images per session.run")] = 8,
    workers: Annotated[int, typer.Option(min=0, help="model calls at once, each with cores / workers threads; "
                                         "0: auto (cores + 1, at most 8)")] = 0,
    render: Annotated[bool, typer.Option(help="also write images with boxes drawn")] = False,
    providers: ProvidersOpt = "auto",
    require_gpu: Annotated[bool, typer.Option(help="fail unless the CUDA provider is active")] = False,
    conf: Annotated[float | None, typer.Option(callback=threshold_option,
                                               help="score threshold in [0, 1] (default: the card's)")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Batch inference with the ONNX engine; bad files are reported and skipped, never abort the batch."""
    from pipeline.infer.batch import collect_sources, run_batch
    from pipeline.infer.engine import OnnxDetector, plan_workers

    items = collect_sources(source)  # a bad source or output folder fails here, before the model loads
    writable(out, "output folder")
    workers, threads = plan_workers(workers)
    detector = OnnxDetector(model, providers=providers, require_gpu=require_gpu, threads=threads)
    if conf is not None:
        detector.conf = conf
    s = run_batch(detector, items, out, batch=batch, render=render, progress=progress_on(quiet), workers=workers,
                  shift_source=str(source))
    typer.echo(f"infer: {s.n_images} images, {s.n_detections} detections, {len(s.errors)} skipped "
               f"(providers: {', '.join(s.providers)}; {workers} workers x {threads} threads) "
               f"-> {out / 'predictions.json'}")
    if s.shift is not None:
        typer.echo(f"shift: MMD² {s.shift['statistic']:.4g}, p = {s.shift['p_value']:.3g} "
                   f"({'SHIFTED' if s.shift['shifted'] else 'no shift'} at alpha {s.shift['alpha']}) "
                   f"-> {out / 'shift.json'}")
    else:
        typer.echo(f"shift: not tested: {s.shift_note}")
    for e in s.errors[:10]:
        typer.secho(f"  skipped {e['file']}: {e['kind']}: {e['detail']}", err=True, fg="yellow")


def _alpha(value: float) -> float:
    """--alpha: a significance level strictly between 0 and 1, checked while parsing."""
    if not 0.0 < value < 1.0:
        raise typer.BadParameter(f"alpha must be in (0, 1), got {value}")
    return value


@app.command()
def shift(
    source: Annotated[Path, typer.Argument(help="image folder, DICOM series, file list (.txt) or COCO split (.json) "
                                           "from the site to test")],
    model: Annotated[Path, typer.Option(help="ONNX model (model_card.json and embedding_reference.npy next to "
                                        "it)")] = Path("models/model.onnx"),
    out: Annotated[Path, typer.Option(help="output folder: shift.json, shift_projection.png")] = Path("shift"),
    alpha: Annotated[float, typer.Option(callback=_alpha, help="significance level of the test")] = 0.05,
    permutations: Annotated[int, typer.Option(min=1, help="permutations for the p-value")] = 1000,
    providers: ProvidersOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Do SOURCE's images come from another site than the training data? MMD permutation test of the model's
    embeddings against the training reference; writes shift.json and a 2-D picture of both samples."""
    from pipeline.infer.batch import collect_sources, run_shift
    from pipeline.infer.engine import OnnxDetector, plan_workers
    from pipeline.shift import ShiftError, plot_projection

    items = collect_sources(source)  # a bad source fails here, before the model loads
    if not items:
        raise DetflowError(f"no images in {source}: the shift test needs at least 8 (64 recommended)")
    writable(out, "output folder")
    workers, threads = plan_workers(0)
    detector = OnnxDetector(model, providers=providers, threads=threads)
    run = run_shift(detector, items, out, source=str(source), alpha=alpha, n_permutations=permutations,
                    workers=workers, progress=progress_on(quiet), source_path=source)
    r = run.result
    units = f" ({r.n_target_groups} vs {r.n_reference_groups} patients)" if r.permutation_unit == "patient" else ""
    typer.echo(f"shift: {run.n_images} images vs {r.n_reference} reference{units}, MMD² {r.statistic:.4g}, p = "
               f"{r.p_value:.3g}: {'SHIFTED' if r.shifted else 'no shift detected'} at alpha {r.alpha} "
               f"-> {out / 'shift.json'}")
    try:
        plot_projection(run.reference, run.target, out / "shift_projection.png", result=r,
                        labels=("reference (training)", source.name or str(source)))
    except ShiftError as e:  # no matplotlib (the serving image): the test stands, the picture is left out
        typer.secho(f"  no picture: {e}", err=True, fg="yellow")
    for e in run.errors[:10]:
        typer.secho(f"  skipped {e['file']}: {e['kind']}: {e['detail']}", err=True, fg="yellow")
