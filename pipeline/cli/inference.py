"""`detflow adapt`, `detflow infer`, `detflow shift`: the ONNX engine on new images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import (
    OnnxModelOpt,
    ProvidersOpt,
    QuietOpt,
    check_io,
    progress_on,
    threshold_option,
    writable,
)
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
    from pipeline.fileio import Write

    if not source.exists():
        raise DetflowError(f"adapt source {source} does not exist")
    writable(out, "adapted model folder")
    check_io([("source", source), ("model", model), ("model card", model.with_name("model_card.json"))],
             [Write("adapted model folder", out, "tree", ours="model_card.json")])
    result = adapt_model(model, source, out, pixel_size=pixel_size, train_pixel_size=train_pixel_size, conf=conf,
                         max_images=max_images)
    a = result.adaptation
    b, c = a["before"], a["after"]
    typer.echo(f"adapt: {a['method']}, input scale {a['input_scale']:.4g} on {a['n_images']} images "
               f"({a['n_skipped']} skipped); confident detections {b['detections']} -> {c['detections']} "
               f"-> {out / 'model_card.json'}")


def _cluster(value: str | None) -> str | None:
    """--cluster: local:N or tcp://HOST:PORT, checked while parsing (before anything is listed or loaded)."""
    from pipeline.cluster import parse_cluster
    from pipeline.errors import ConfigError

    if value is not None:
        try:
            parse_cluster(value)
        except ConfigError as e:
            raise typer.BadParameter(str(e).removeprefix(f"--cluster {value!r}: ")) from None
    return value


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
    sr: Annotated[Path | None, typer.Option(help="also write one DICOM Structured Report per DICOM series here "
                                            "(non-DICOM inputs get none)")] = None,
    cluster: Annotated[str | None, typer.Option(callback=_cluster, help="run on a Dask cluster: local:N (N worker "
                                                "processes here) or tcp://HOST:PORT (a running dask scheduler); "
                                                "shards in OUT/shards/, a rerun resumes")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="inputs per cluster task (--cluster)")] = 64,
    cluster_timeout: Annotated[float, typer.Option(min=0.1, help="seconds to wait for the scheduler and a first "
                                                   "worker (--cluster)")] = 10.0,
    quiet: QuietOpt = False,
) -> None:
    """Batch inference with the ONNX engine; bad files are reported and skipped, never abort the batch."""
    from pipeline.fileio import Write
    from pipeline.infer.batch import collect_sources, run_batch, source_folders
    from pipeline.infer.engine import OnnxDetector, plan_workers

    if cluster is not None and workers:
        raise typer.BadParameter("--workers is for in-process inference; with --cluster each dask worker's "
                                 "--nthreads sets how many shards it runs at once", param_hint="'--workers'")
    items = collect_sources(source)  # a bad source or output folder fails here, before the model loads
    writable(out, "output folder")
    check_io([("source", source), ("model", model), *(("dataset folder", f) for f in source_folders(source)),
              *((f"input {name}", path) for name, _, path in items)],
             [*(Write("output", out / n) for n in ("predictions.json", "infer_errors.json", "shift.json")),
              *([Write("rendered images folder", out / "rendered", "into")] if render else []),
              *([Write("shards folder", out / "shards", "into")] if cluster is not None else [])])
    reports = None
    if sr is not None:
        if cluster is not None:
            raise typer.BadParameter("--sr runs in process; leave out --cluster (or run `detflow pacs run`)",
                                     param_hint="'--sr'")
        writable(sr, "SR folder")
    if cluster is not None:
        from pipeline.cluster import parse_cluster
        from pipeline.infer.shards import run_on_cluster, settings_for

        settings = settings_for(model, conf=conf, batch=batch, render=render, providers=providers,
                                require_gpu=require_gpu)
        client_side = OnnxDetector(model, providers="CPUExecutionProvider", threads=1)  # checked before any work
        run = run_on_cluster(client_side, items, out, settings, parse_cluster(cluster), shard_size=shard_size,
                             timeout_s=cluster_timeout, progress=progress_on(quiet), source=source,
                             shift_source=str(source))
        s = run.summary
        how = (f"cluster {cluster}: {run.n_shards} shards, {run.computed} computed, {run.resumed} resumed, "
               f"{len(run.workers)} worker processes")
    else:
        workers, threads = plan_workers(workers)
        detector = OnnxDetector(model, providers=providers, require_gpu=require_gpu, threads=threads)
        if conf is not None:
            detector.conf = conf
        if sr is not None:  # DICOM Structured Reports, pipeline/dicom/files.py
            from pipeline.dicom.files import SeriesReports

            reports = SeriesReports(detector.card, detector.conf)
        s = run_batch(detector, items, out, batch=batch, render=render, progress=progress_on(quiet),
                      workers=workers, shift_source=str(source),
                      on_result=reports.add if reports is not None else None)
        how = f"{workers} workers x {threads} threads"
    typer.echo(f"infer: {s.n_images} images, {s.n_detections} detections, {len(s.errors)} skipped "
               f"(providers: {', '.join(s.providers)}; {how}) -> {out / 'predictions.json'}")
    if s.shift is not None:
        typer.echo(f"shift: MMD² {s.shift['statistic']:.4g}, p = {s.shift['p_value']:.3g} "
                   f"({'SHIFTED' if s.shift['shifted'] else 'no shift'} at alpha {s.shift['alpha']}) "
                   f"-> {out / 'shift.json'}")
    else:
        typer.echo(f"shift: not tested: {s.shift_note}")
    if reports is not None and sr is not None:
        typer.echo(reports.write(sr).line(sr))
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
    from pipeline.fileio import Write
    from pipeline.infer.batch import collect_sources, run_shift, source_folders
    from pipeline.infer.engine import OnnxDetector, plan_workers
    from pipeline.shift import ShiftError, plot_projection

    items = collect_sources(source)  # a bad source fails here, before the model loads
    if not items:
        raise DetflowError(f"no images in {source}: the shift test needs at least 8 (64 recommended)")
    writable(out, "output folder")
    check_io([("source", source), ("model", model), *(("dataset folder", f) for f in source_folders(source)),
              *((f"input {name}", path) for name, _, path in items)],
             [Write("output", out / "shift.json"), Write("output", out / "shift_projection.png")])
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
