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
from pipeline.serve.entry import typer_command as serve_command

log = logging.getLogger("detflow")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="detflow: transfer-learning detection pipeline for medical imaging.")
assets_app = typer.Typer(no_args_is_help=True, help="List and fetch named assets (datasets, weights).")
app.add_typer(assets_app, name="assets")
registry_app = typer.Typer(no_args_is_help=True, help="List, promote and roll back registered model versions.")
app.add_typer(registry_app, name="registry")
flow_app = typer.Typer(no_args_is_help=True, help="Run the Prefect flows locally (PREFECT_API_URL: a server to report "
                       "to; unset: a temporary local one).")
app.add_typer(flow_app, name="flow")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file (YAML)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set train.epochs=3 (repeatable)")]
MirrorOpt = Annotated[list[Path] | None, typer.Option("--mirror", help="asset mirror folder (repeatable); "
                                                      "default: $DETFLOW_ASSETS")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
RawDirOpt = Annotated[Path, typer.Option(help="DVC-tracked raw assets")]
PreparedOpt = Annotated[Path, typer.Option(help="prepared dataset folder")]
ProvidersOpt = Annotated[str, typer.Option(help="auto, or a comma list such as CPUExecutionProvider")]
PhantomDirOpt = Annotated[Path, typer.Option(help="phantom folder")]
OnnxModelOpt = Annotated[Path, typer.Option(help="ONNX model (model_card.json next to it)")]


def _params(path: Path, overrides: list[str] | None):  # noqa: ANN202 - Params, imported lazily
    from pipeline.config import load_params

    return load_params(path, overrides or [])


def _progress(quiet: bool) -> bool:
    return not quiet and os.environ.get("DETFLOW_NO_PROGRESS", "") in ("", "0")


def _writable(path: Path, what: str, folder: bool = True) -> None:
    """Fail before any work when an output cannot be created there (a file in the way, no permission), instead of
    a traceback from the final write after minutes of work. Creates nothing."""
    if path.exists():
        if folder != path.is_dir():
            raise DetflowError(f"{what} {path} is a {'folder' if path.is_dir() else 'file'}; expected a "
                               f"{'folder' if folder else 'file'} path")
        parent = path if folder else path.parent
    else:
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise DetflowError(f"cannot create {what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DetflowError(f"cannot write {what} {path}: no write permission on {parent}")


def _threshold(value: float | None) -> float | None:
    """--conf: a score threshold, checked while parsing (before any model loads)."""
    from pipeline.infer.engine import check_threshold

    if value is not None:
        try:
            check_threshold(value, "conf")
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return value


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
    _writable(out, "output folder")
    summary = generate_phantom(p.phantom, out, progress=_progress(quiet))
    typer.echo(f"phantom: {summary.n_patients} patients, {summary.n_slices} slices "
               f"({summary.n_empty_slices} without nodules), {summary.n_boxes} boxes -> {out}")


@app.command()
def prepare(
    out: PreparedOpt = Path("data/prepared"),
    report: Annotated[Path, typer.Option(help="validation report")] = Path("reports/data_validation.json"),
    raw_dir: RawDirOpt = Path("data/raw"),
    phantom_dir: PhantomDirOpt = Path("data/raw/phantom"),
    mirror: MirrorOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Validate, split by patient and write the canonical dataset (YOLO layout, COCO JSON, manifest)."""
    from pipeline.data.prepare import prepare_dataset

    p = _params(params, set_)
    _writable(out, "prepared dataset folder")
    _writable(report, "validation report", folder=False)
    result = prepare_dataset(p, out, report, raw_dir=raw_dir, phantom_dir=phantom_dir, mirrors=mirror,
                             progress=_progress(quiet))
    s = result.report["summary"]
    splits = ", ".join(f"{k} {result.split_counts.get(k, 0)}" for k in ("train", "val", "test"))
    typer.echo(f"prepare: {result.n_images} images ({splits}), {result.n_boxes} boxes; "
               f"{s['images_quarantined']} quarantined, {s['boxes_dropped']} boxes dropped, {s['fixed']} fixed "
               f"-> {out} (report {report})")


@app.command()
def train(
    data: PreparedOpt = Path("data/prepared"),
    out: Annotated[Path, typer.Option(help="weights folder (best.pt, last.pt, params.yaml)")] = Path("models/train"),
    reports: Annotated[Path, typer.Option(help="training reports folder")] = Path("reports/train"),
    raw_dir: RawDirOpt = Path("data/raw"),
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
    _writable(out, "weights folder")
    _writable(reports, "reports folder")
    result = train_model(p, data, out, reports, default_workdir(), raw_dir=raw_dir, mirrors=mirror, trust=trust,
                         progress=_progress(quiet))
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
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score the model (COCO mAP, per-class AP, FROC, bootstrap CIs) and apply the promotion gate; or score it on
    external sets (another site's labelled data) next to the internal test split."""
    from pipeline.evaluate import evaluate_model, is_prepared
    from pipeline.evaluate.external import (
        default_set_name,
        evaluate_dataset,
        evaluate_external_sets,
        external_set,
    )
    from pipeline.evaluate.gate import gate_table

    p = _params(params, set_)
    _writable(reports, "reports folder")
    if external or format_ != "auto" or class_map is not None or name is not None \
            or (data.exists() and not is_prepared(data, p.evaluate.split)):
        if external:
            gen = evaluate_external_sets(p, model, reports, raw_dir=raw_dir, mirrors=mirror, progress=_progress(quiet))
        else:
            ext = external_set(name or default_set_name(data), str(data), format_, class_map)
            gen = evaluate_dataset(p, model, ext, reports, raw_dir=raw_dir, mirrors=mirror, progress=_progress(quiet))
        for set_name, m in gen.externals.items():
            row = gen.table["sets"][set_name]
            internal = "" if row["internal_map50_same_classes"] is None else \
                f" (internal {row['internal_map50_same_classes']:.4f} on the same classes, drop {row['drop']:.4f})"
            typer.echo(f"external {set_name} ({m['n_images']} images, {m['n_patients']} patients): mAP50 "
                       f"{m['map50']:.4f} {m['ci95']['map50']}{internal} -> {reports / 'external' / set_name}")
            if m["note"]:
                typer.echo(f"  {m['note']}")
        if external:
            typer.echo(f"generalisation: {len(gen.externals)} external sets -> {reports / 'generalisation.json'}")
        if gen.gate["checks"]:
            typer.echo("external gate passed:\n" + gate_table(gen.gate))
        return
    result = evaluate_model(p, model, data, reports, progress=_progress(quiet))
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
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Export to ONNX after a passed gate; measure PyTorch/ONNX parity; write the model card."""
    from pipeline.export import export_model

    p = _params(params, set_)
    _writable(out, "model folder")
    _writable(reports, "reports folder")
    result = export_model(p, model, data, reports, out)
    q = result.parity
    typer.echo(f"export: {result.model} (sha256 {result.card['sha256'][:12]}, opset {result.card['opset']}); parity "
               f"on {q['n_images']} images: matched {q['matched_fraction']:.4f}, max box diff "
               f"{q['max_abs_box_diff_px']:.3f} px, max score diff {q['max_abs_score_diff']:.4f}, mAP50-95 "
               f"{q['map50_95_torch']:.4f} -> {q['map50_95_onnx']:.4f} (delta {q['delta']:.4f})")


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
    conf: Annotated[float | None, typer.Option(callback=_threshold, help="score threshold of the detections whose "
                                               "sizes are compared (default: the card's)")] = None,
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
    _writable(out, "adapted model folder")
    if few_shot:
        from pipeline.config import parse_class_map
        from pipeline.fewshot import FEW_SHOT_STEPS, few_shot_adapt

        assert labels is not None and shots is not None
        try:
            mapping = parse_class_map(class_map)  # as `detflow evaluate --class-map` parses it
        except ValueError as e:
            raise ConfigError(f"--class-map: {e}") from None
        p = _params(params, set_)
        result = few_shot_adapt(model, source, labels, shots, out, p, checkpoint=checkpoint, class_map=mapping,
                                fmt=format_, with_scale=with_scale, steps=FEW_SHOT_STEPS if steps is None else steps,
                                seed=seed, progress=_progress(quiet))
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
    conf: Annotated[float | None, typer.Option(callback=_threshold,
                                               help="score threshold in [0, 1] (default: the card's)")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Batch inference with the ONNX engine; bad files are reported and skipped, never abort the batch."""
    from pipeline.infer.batch import collect_sources, run_batch
    from pipeline.infer.engine import OnnxDetector, plan_workers

    items = collect_sources(source)  # a bad source or output folder fails here, before the model loads
    _writable(out, "output folder")
    workers, threads = plan_workers(workers)
    detector = OnnxDetector(model, providers=providers, require_gpu=require_gpu, threads=threads)
    if conf is not None:
        detector.conf = conf
    s = run_batch(detector, items, out, batch=batch, render=render, progress=_progress(quiet), workers=workers,
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
    _writable(out, "output folder")
    workers, threads = plan_workers(0)
    detector = OnnxDetector(model, providers=providers, threads=threads)
    run = run_shift(detector, items, out, source=str(source), alpha=alpha, n_permutations=permutations,
                    workers=workers, progress=_progress(quiet), source_path=source)
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


@assets_app.command("list")
def assets_list(
    raw_dir: RawDirOpt = Path("data/raw"),
    mirror: MirrorOpt = None,
    verify: Annotated[bool, typer.Option(help="verify checksums (slower)")] = False,
) -> None:
    """Show every named asset, its license and where it is available."""
    from pipeline import assets

    for row in assets.list_assets(raw_dir=raw_dir, mirrors=mirror, verify=verify):
        pin = (f"sha256 {row['sha256']}" if row["sha256"] else f"sha256 prefix {row['sha256_prefix']} (full "
               "sha256 not published)" if row["sha256_prefix"] else "sha256 not pinned (--trust)")
        typer.echo(f"{row['name']:<14} {row['kind']:<4} {row['license']:<10} "
                   f"{'available' if row['available'] else 'NOT AVAILABLE'}  {row['url']}  {pin}")
        for loc in row["locations"]:
            typer.echo(f"{'':<16}{loc['where']:<7} {loc['status']:<8} {loc['path']}")


@assets_app.command("fetch")
def assets_fetch(
    name: str,
    raw_dir: RawDirOpt = Path("data/raw"),
    mirror: MirrorOpt = None,
    trust: Annotated[bool, typer.Option(help="accept an asset without a pinned checksum")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Materialise an asset under data/raw/NAME (verified), ready for `dvc add`."""
    from pipeline import assets

    path = assets.fetch(name, raw_dir=raw_dir, mirrors=mirror, trust=trust, progress=_progress(quiet))
    typer.echo(f"{name}: {path}")


app.command("serve")(serve_command())  # options shared with `python -m pipeline.serve`: pipeline/serve/entry.py


RegistryRootOpt = Annotated[Path | None, typer.Option("--root", help="registry folder; default: the folder of "
                                                      "gate.champion in params.yaml (models/registry)")]


def _registry_root(root: Path | None, params: Path = Path("params.yaml")) -> Path:
    return root if root is not None else Path(_params(params, None).gate.champion).parent


@registry_app.command("list")
def registry_list(root: RegistryRootOpt = None) -> None:
    """Show every registered model version, oldest first; * marks the champion."""
    from pipeline import registry

    root = _registry_root(root)
    versions = registry.list_versions(root)
    if not versions:
        typer.echo(f"no model versions in {root} (run `detflow flow run`)")
        return
    for v in versions:
        commit = (v.get("git_commit") or "-")[:10] + ("+dirty" if v.get("git_dirty") else "")
        map50 = "n/a" if v.get("map50") is None else f"{v['map50']:.4f}"
        typer.echo(f"{'*' if v['champion'] else ' '} {v['version']:<5} {v['created_at']}  sha256 {v['sha256'][:12]}  "
                   f"mAP50 {map50}  {v.get('family')}/{v.get('model')}  git {commit}")


@registry_app.command("promote")
def registry_promote(
    version: Annotated[str, typer.Argument(help="version to make champion, e.g. v3")],
    root: RegistryRootOpt = None,
) -> None:
    """Make VERSION the champion (atomic switch of champion.json; the old champion is kept for rollback)."""
    from pipeline import registry

    root = _registry_root(root)
    before = registry.champion(root)
    pointer = registry.promote(version, root, reason="detflow registry promote")
    if before is not None and before["version"] == pointer["version"]:
        typer.echo(f"{pointer['version']} is already the champion")
        return
    typer.echo(f"champion: {pointer['version']} (sha256 {pointer['sha256'][:12]}); "
               f"previous: {pointer['previous'] or 'none'}")


@registry_app.command("rollback")
def registry_rollback(root: RegistryRootOpt = None) -> None:
    """Make the previous champion current again (repeatable down the promotion history)."""
    from pipeline import registry

    root = _registry_root(root)
    before = registry.champion(root)
    pointer = registry.rollback(root, reason="detflow registry rollback")
    typer.echo(f"rolled back {before['version'] if before else '?'} -> champion: {pointer['version']} "
               f"(sha256 {pointer['sha256'][:12]}); previous: {pointer['previous'] or 'none'}")


@flow_app.command("run")
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
    _params(repo / "params.yaml", set_)  # bad params or overrides fail here, before a Prefect server starts
    from flows.training import start_local_server, training_pipeline

    start_local_server()  # patient on a cold first start (new database); one clear line if it cannot start
    summary = training_pipeline(overrides=set_ or [], push=push, repo=str(repo), remote=remote)
    for stage, s in summary["stages"].items():
        typer.echo(f"  {stage:<9} {s['status']:<8} {s['seconds']:>7.1f} s")
    typer.echo(f"{summary['message']}; champion {summary['champion']} ({summary['seconds']:.1f} s)")


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
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Write the run report: one HTML page (verdict, data, transfer, evaluation, generalisation, deployment,
    provenance) that opens offline. Renders after a failed gate too; missing inputs are named in the page."""
    from pipeline.report import ReportInputs, write_report
    from pipeline.report.collect import default_source

    p = _params(params, set_)
    _writable(out, "report", folder=False)
    if model_copy is not None:
        _writable(model_copy, "report copy", folder=False)
    inputs = ReportInputs(reports=reports, data=data, models=models, lock=lock, bench=bench, params=params,
                          overrides=tuple(set_ or ()),
                          source=source if source is not None else default_source(p, raw_dir, phantom_dir))
    result = write_report(inputs, p, out, [model_copy] if model_copy is not None else None)
    verdict = "no gate result" if result.passed is None else "gate PASS" if result.passed else \
        f"gate FAIL ({', '.join(result.failed_checks)})"
    typer.echo(f"report: {verdict}; {result.size_bytes / 1e6:.2f} MB, {len(result.missing)} inputs missing -> {out}")


def _fail(message: str, code: int) -> int:
    log.debug("the error's traceback", exc_info=True)  # DETFLOW_LOG=DEBUG shows it
    typer.secho(f"error: {message}", err=True, fg="red")
    return code


def _usage_error(e: typer.TyperException) -> int:
    """Typer's usage errors (its vendored click: UsageError, NoSuchOption, BadParameter, ...) as one line plus
    where help is, exit 2 as click does."""
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError":  # a bare `detflow` / `detflow registry`: show the help (as typer)
        e.show()  # type: ignore[attr-defined]
        return e.exit_code
    hint = f" (see '{ctx.command_path} {ctx.help_option_names[0]}')" if ctx is not None else ""
    return _fail(f"{e.format_message().rstrip('.')}{hint}", e.exit_code)


def run(args: list[str] | None = None) -> int:
    """Run the CLI; return the exit code: 0 ok, 1 a failed stage or a bad input file, 2 a usage or params error.

    User errors print one line (``error: ...``), never a traceback. ``standalone_mode=False`` hands every error to
    us: typer >= 0.25 raises its own vendored click exceptions, which click's handlers would not recognise.
    """
    try:
        rc = app(args=args, standalone_mode=False)  # --help and typer.Exit return their code
        return rc if isinstance(rc, int) else 0
    except ConfigError as e:
        return _fail(str(e), 2)
    except DetflowError as e:
        return _fail(str(e), 1)
    except typer.TyperException as e:
        return _usage_error(e)
    except typer.Abort:
        return _fail("aborted", 1)
    except OSError as e:  # a file system problem that no check foresaw: disk full, a permission changed meanwhile
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def main() -> None:
    """Console entry: user errors become one clear message and exit 2 (usage, bad params) or 1, never a traceback."""
    logging.basicConfig(level=os.environ.get("DETFLOW_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run())


if __name__ == "__main__":
    main()
