"""`detflow adapt`, `detflow infer`, `detflow shift`: the ONNX engine on new images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import (
    OnnxModelOpt,
    ParamsOpt,
    ProvidersOpt,
    QuietOpt,
    SetOpt,
    check_io,
    model_params,
    progress_on,
    threshold_option,
    writable,
)
from pipeline.errors import ConfigError, DetflowError

app = typer.Typer()


@app.command()
def adapt(
    source: Annotated[Path, typer.Argument(help="images of the new site: folder, image, .txt list or COCO .json")],
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
    labels: Annotated[Path | None, typer.Option(help="few-shot: labels of some SOURCE images (COCO .json, VOC, "
                                                "YOLO or DICOM+CSV); fine-tunes the model on --shots of them")] = None,
    shots: Annotated[int | None, typer.Option(help="few-shot: K, the number of labelled images to fine-tune on "
                                              "(chosen deterministically; nested: the 5 are inside the 10)")] = None,
    class_map: Annotated[str | None, typer.Option(help="few-shot: label -> model class, e.g. rbc=RBC,wbc=WBC "
                                                  "(every label must map to a model class)")] = None,
    format_: Annotated[str, typer.Option("--format", help="few-shot: labels format: auto, voc, coco, yolo, "
                                         "dicom_csv")] = "auto",
    checkpoint: Annotated[Path | None, typer.Option(help="few-shot: the checkpoint the model was exported from "
                                                    "(default: the one its card names)")] = None,
    with_scale: Annotated[bool, typer.Option("--with-scale", help="few-shot: first choose the label-free input "
                                             "scale on SOURCE, then fine-tune and run at it")] = False,
    steps: Annotated[int | None, typer.Option(help="few-shot: optimizer steps (default 100)")] = None,
    seed: Annotated[int, typer.Option(help="few-shot: seed of the K-image order")] = 0,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Adapt a model to a new site. Without labels: known pixel size first, else the input scale whose predicted
    object sizes match the training objects' (only when the shift test finds the site shifted and the criterion
    can tell). With --labels/--shots: fine-tune on K labelled images of the site (train.strategy,
    train.backbone_lr_mult from params). Writes a model folder that infer, serve and evaluate use as is."""
    from pipeline.adapt import adapt_model
    from pipeline.fileio import Write

    if not source.exists():
        raise DetflowError(f"adapt source {source} does not exist")
    few_shot = labels is not None or shots is not None
    if few_shot:
        if labels is None or shots is None:
            raise DetflowError("few-shot adaptation needs both --labels (the annotations) and --shots (K)")
        if pixel_size is not None or train_pixel_size is not None:
            raise DetflowError("--pixel-size applies to label-free adaptation; with --labels, use --with-scale")
    elif class_map is not None or checkpoint is not None or with_scale or steps is not None or format_ != "auto":
        raise DetflowError("--class-map, --checkpoint, --with-scale, --steps and --format are few-shot options: "
                           "give --labels and --shots too")
    check_io([("source", source), ("model", model), ("model card", model.with_name("model_card.json")),
              *([("labels", labels)] if labels is not None else []),
              *([("checkpoint", checkpoint)] if checkpoint is not None else [])],
             [Write("adapted model folder", out, "tree", ours="model_card.json")])
    if few_shot:
        from pipeline.fewshot import FEW_SHOT_STEPS, few_shot_adapt
        from pipeline.params import parse_class_map

        assert labels is not None and shots is not None
        try:
            mapping = parse_class_map(class_map)  # as `detflow evaluate --class-map` parses it
        except ValueError as e:
            raise ConfigError(f"--class-map: {e}") from None
        p = model_params(params, set_, folders={out: "adapted model folder"})
        result = few_shot_adapt(model, source, labels, shots, out, p, checkpoint=checkpoint, class_map=mapping,
                                fmt=format_, with_scale=with_scale, steps=FEW_SHOT_STEPS if steps is None else steps,
                                seed=seed, progress=progress_on(quiet))
        a = result.adaptation
        t = a["training"]
        scale = a["label_free_scale"]
        typer.echo(f"adapt: few_shot, {a['n_images']} of {a['selection']['n_labelled_images']} labelled images "
                   f"(K={a['shots']}, fingerprint {a['images_fingerprint'][:12]}), strategy {a['strategy']}, "
                   f"backbone lr x{a['backbone_lr_mult']}, {t['steps']} steps ({t['epochs']} epochs x "
                   f"{t['steps_per_epoch']}) at {t['imgsz']} px"
                   + (f" (label-free input scale {scale['input_scale']:.4g})" if scale else "")
                   + f" in {t['seconds']:.0f} s -> {out / 'model_card.json'}")
        return
    writable(out, "adapted model folder")
    result = adapt_model(model, source, out, pixel_size=pixel_size, train_pixel_size=train_pixel_size, conf=conf,
                         max_images=max_images)
    a = result.adaptation
    b, c = a["before"], a["after"]
    shift = a.get("shift") or {}
    tested = f"; shift p = {shift['p_value']:.3g}" if shift.get("tested") else ""
    if a["changed"] or a["method"] != "object_scale":
        typer.echo(f"adapt: {a['method']}, input scale {a['input_scale']:.4g} on {a['n_images']} images "
                   f"({a['n_skipped']} skipped{tested}); confident detections {b['detections']} -> "
                   f"{c['detections']} -> {out / 'model_card.json'}")
    else:
        typer.echo(f"adapt: {a['method']}: model unchanged (input scale {a['input_scale']:.4g}) on {a['n_images']} "
                   f"images ({a['n_skipped']} skipped): {a['reason']} -> {out / 'model_card.json'}")


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
