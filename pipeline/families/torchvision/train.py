"""``detflow train`` for the torchvision family: wires the row's model, data, loop and checkpoints together, epoch by
epoch, and publishes the run. Resumable: an interrupted run with the same fingerprint continues from its last.pt exactly
(per-epoch seeds, restored optimizer and schedule)."""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.contracts.results import PretrainedSource, TrainResult
from pipeline.errors import ConfigError, DataError
from pipeline.families.torchvision import TORCHVISION
from pipeline.families.torchvision.build import build_model, layer_groups
from pipeline.families.torchvision.checkpoint import RunState, load_resumable, make_checkpoint, save_atomic
from pipeline.families.torchvision.data import CocoDetection, build_transforms, make_loader
from pipeline.families.torchvision.loop import (
    apply_freeze,
    build_optimizer,
    build_scheduler,
    evaluate_coco,
    fitness,
    group_param_counts,
    set_train_mode,
    train_one_epoch,
)
from pipeline.families.torchvision.models import model_row
from pipeline.families.torchvision.pretrained import resolve_torchvision_pretrained, transferable_params
from pipeline.fileio import atomic_write_json, atomic_write_text
from pipeline.train.devices import cpu_threads, resolve_device
from pipeline.train.publish import publish_run
from pipeline.train.runs import check_prepared, run_fingerprint
from pipeline.train.strategies import frozen_groups_at, validate_schedule
from pipeline.train.weights_import import transfer_state_dict

if TYPE_CHECKING:
    from pipeline.config import Params

log = logging.getLogger(__name__)

MAP50_COL, MAP_COL = "metrics/mAP50(B)", "metrics/mAP50-95(B)"  # Ultralytics' results.csv names


@dataclass
class EpochEnd:
    """What a per-epoch callback sees, after the epoch's checkpoint is on disk."""

    epoch: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    frozen_groups: list[str]
    row: dict[str, float]
    run_dir: Path
    improved: bool


def _write_results_csv(path: Path, history: list[dict[str, float]]) -> None:
    """One row per epoch; ``epoch`` is 1-based and the metric columns are named as Ultralytics names them."""
    if not history:
        return
    cols = list(history[0])
    for row in history[1:]:
        cols += [c for c in row if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({c: row.get(c, "") for c in cols})
    atomic_write_text(path, buf.getvalue())


def _truncate_live(live_dir: Path, keep_below: int) -> None:
    """Drop DVCLive rows of epochs that are about to be redone (logged before a kill, never checkpointed)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv") if live_dir.exists() else []:
        lines = tsv.read_text().splitlines()
        if not lines:
            continue
        header = lines[0].split("\t")
        if "step" not in header:
            continue
        i = header.index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if ln and int(float(ln.split("\t")[i])) < keep_below]
        atomic_write_text(tsv, "\n".join(kept) + "\n")


def _log_live(live: Any, epoch: int, row: dict[str, float]) -> None:
    live.step = epoch
    for key, value in row.items():
        if key == "epoch":
            continue
        name = key.replace("(B)", "").replace("metrics/", "val/")
        live.log_metric(name, float(value))
    live.next_step()


def _device(resolved: str) -> torch.device:
    if resolved == "cpu":
        return torch.device("cpu")
    ids = resolved.split(",")
    if len(ids) > 1:
        log.warning("the torchvision family trains on one GPU; using cuda:%s of %s", ids[0], resolved)
    return torch.device(f"cuda:{ids[0]}")


def _classes(prepared: Path, info: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    cats = sorted(doc["categories"], key=lambda c: int(c["id"]))
    names = [str(c["name"]) for c in cats]
    if [int(c["id"]) for c in cats] != list(range(1, len(cats) + 1)):
        raise DataError(f"{prepared}/coco/train.json: category ids must be 1..K in class order")
    if info.get("classes") is not None and list(info["classes"]) != names:
        raise DataError(f"{prepared}: prepare_info.json classes {info['classes']} differ from the COCO categories "
                        f"{names}; re-run `detflow prepare`")
    if not names:
        raise DataError(f"{prepared}: no classes")
    return names


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_torchvision(params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
                      raw_dir: Path = Path("data/raw"), mirrors: list[Path] | None = None, trust: bool = False,
                      progress: bool = True, on_epoch_end: Callable[[EpochEnd], None] | None = None) -> TrainResult:
    """Fine-tune the torchvision model of ``train.model`` on the prepared dataset; write best/last weights and
    reports.

    ``trust`` admits COCO weights without a pinned checksum (see :func:`resolve_torchvision_pretrained`).
    ``on_epoch_end`` is called after each epoch's checkpoint is written (tests, tooling).
    """
    tp = params.train
    if tp.family != TORCHVISION.name:
        raise ConfigError(f"train_torchvision got train.family={tp.family!r}")
    arch, groups_of = model_row(tp.model), layer_groups(tp.model)
    validate_schedule(tp)
    device = _device(resolve_device(tp.device))
    info = check_prepared(prepared)
    train_doc = json.loads((prepared / "coco" / "train.json").read_text())
    val_doc = json.loads((prepared / "coco" / "val.json").read_text())
    classes = _classes(prepared, info, train_doc)

    pretrained, state = resolve_torchvision_pretrained(tp, raw_dir, mirrors, trust, progress)
    if pretrained.note:
        log.warning(pretrained.note)
    fingerprint = run_fingerprint(tp, info["manifest_sha256"], pretrained.sha256)
    run_dir = (workdir / f"{TORCHVISION.name}-{fingerprint}").resolve()
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    ckpt = load_resumable(last, fingerprint, tp.epochs) if tp.resume == "auto" else None
    if ckpt is None and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    _seed_all(tp.seed)
    model = build_model(tp.model, len(classes) + 1, tp.imgsz)
    st = RunState()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        st = RunState.from_checkpoint(ckpt)
    elif state is not None:
        st.transferred_params = transferable_params(model, state)
        st.transfer_report = transfer_state_dict(model, state, pretrained.source, pretrained.sha256).to_dict()
        atomic_write_json(run_dir / "transfer_report.json", st.transfer_report)
    del state
    model.to(device)

    use_cuda = device.type == "cuda"
    workers = tp.workers if use_cuda else 0
    if not use_cuda:
        torch.set_num_threads(cpu_threads(tp.cpu_threads))
    gen = torch.Generator()
    train_ds = CocoDetection(prepared, prepared / "coco" / "train.json",
                             build_transforms(tp, train=True, square=arch.size == "fixed"))
    val_ds = CocoDetection(prepared, prepared / "coco" / "val.json", build_transforms(tp, train=False))
    train_loader = make_loader(train_ds, tp, True, workers, use_cuda, gen)
    val_loader = make_loader(val_ds, tp, False, workers, use_cuda, None)

    optimizer = build_optimizer(model, tp, set(st.transferred_params))
    scheduler = build_scheduler(optimizer, len(train_loader), tp.epochs)
    scaler = torch.amp.GradScaler("cuda") if use_cuda else None
    start_epoch = 0
    live_dir = run_dir / "live"
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"]) + 1
        log.warning("resuming interrupted torchvision training from %s from epoch %d (epochs 0..%d done)",
                    last, start_epoch, start_epoch - 1)
        _truncate_live(live_dir, start_epoch)
        _write_results_csv(run_dir / "results.csv", st.history)
    del ckpt

    from dvclive import Live

    has_val = len(val_ds) > 0
    patience = tp.patience if (tp.patience > 0 and has_val) else tp.epochs
    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False, resume=start_epoch > 0)
    try:
        for epoch in range(start_epoch, tp.epochs):
            _seed_all(tp.seed + 1 + epoch)  # per-epoch streams: a resumed run draws what an uninterrupted one would
            gen.manual_seed(tp.seed + 1 + epoch)
            groups = frozen_groups_at(tp.strategy, tp.unfreeze_at, epoch)
            apply_freeze(model, groups_of, groups)
            set_train_mode(model, groups_of, groups)
            st.frozen_by_epoch[epoch] = list(groups)
            losses = train_one_epoch(model, optimizer, train_loader, device, scheduler, scaler,
                                     f"epoch {epoch + 1}/{tp.epochs}", progress, arch.loss_keys)
            map50, map5095 = evaluate_coco(model, tp.model, val_loader, val_doc, device, progress) if has_val \
                else (float("nan"), float("nan"))
            fit = fitness(map50, map5095)
            improved = has_val and fit > st.best_fitness
            if improved:
                st.best_fitness, st.best_epoch, st.epochs_no_improve = fit, epoch, 0
            else:
                st.epochs_no_improve += 1
            row: dict[str, float] = {"epoch": epoch + 1, "train/loss": losses["loss"],
                                     **{f"train/{k}": losses[k] for k in arch.loss_keys},
                                     MAP50_COL: map50, MAP_COL: map5095, "fitness": fit}
            for g in optimizer.param_groups:
                row["lr" if g.get("name") == "new" else f"lr_{g.get('name')}"] = float(g["lr"])
            st.history.append(row)
            stop = st.epochs_no_improve >= patience
            finished = stop or epoch == tp.epochs - 1
            # Metrics first, then best.pt, then last.pt: a kill between any two leaves a state that resume
            # repairs (extra metric rows are truncated; last.pt never claims a best.pt that is not on disk).
            _write_results_csv(run_dir / "results.csv", st.history)
            atomic_write_json(run_dir / "frozen_by_epoch.json", {str(k): v for k, v in st.frozen_by_epoch.items()})
            _log_live(live, epoch, row)
            if improved:
                save_atomic(make_checkpoint(model, None, None, None, epoch, st, params, fingerprint, classes,
                                         pretrained, finished), best)
            save_atomic(make_checkpoint(model, optimizer, scheduler, scaler, epoch, st, params, fingerprint, classes,
                                     pretrained, finished), last)
            log.info("epoch %d/%d: loss %.4f mAP50 %.4f mAP50-95 %.4f%s", epoch + 1, tp.epochs, losses["loss"],
                     map50, map5095, " (best)" if improved else "")
            if on_epoch_end is not None:
                on_epoch_end(EpochEnd(epoch=epoch, model=model, optimizer=optimizer, frozen_groups=list(groups),
                                      row=row, run_dir=run_dir, improved=improved))
            if stop and epoch < tp.epochs - 1:
                log.warning("early stopping after epoch %d: no val fitness improvement for %d epochs (best epoch %d)",
                            epoch + 1, patience, st.best_epoch + 1)
                break
    finally:
        live.end()
    group_params = group_param_counts(model, groups_of)
    return _finish(params, pretrained, run_dir, out_dir, reports_dir, start_epoch, st, group_params)


def _finish(params: Params, pretrained: PretrainedSource, run_dir: Path, out_dir: Path, reports_dir: Path,
            start_epoch: int, st: RunState, group_params: dict[str, int]) -> TrainResult:
    """Publish the run through the shared ``publish_run`` (as the yolo family does), with this family's notes."""
    last = run_dir / "last.pt"
    best = run_dir / "best.pt" if (run_dir / "best.pt").exists() else last
    notes = ["train.nominal_batch is ignored by the torchvision family (no gradient accumulation)"]
    if params.train.augment.mosaic:
        notes.insert(0, "augment.mosaic is ignored by the torchvision family (no mosaic augmentation)")
    return publish_run(family=TORCHVISION.name, params=params, pretrained=pretrained, run_dir=run_dir, best=best,
                       last=last, out_dir=out_dir, reports_dir=reports_dir, transfer_report=st.transfer_report,
                       frozen_by_epoch=st.frozen_by_epoch, group_params=group_params,
                       resume_epoch=start_epoch - 1 if start_epoch > 0 else None, notes=notes)
