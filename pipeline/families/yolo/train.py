"""``detflow train`` for the yolo family: resolve weights, run the Ultralytics trainer, write the checkpoint header,
publish the run. Resumable: an interrupted run with the same fingerprint continues from its last.pt."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.contracts.checkpoint import HEADER_KEY, CheckpointMeta
from pipeline.contracts.results import PretrainedSource, TrainResult
from pipeline.errors import ConfigError
from pipeline.families.yolo import YOLO
from pipeline.families.yolo.pretrained import resolve_pretrained
from pipeline.families.yolo.trainer import SPEC_ENV, trainer_class
from pipeline.fileio import atomic_write_bytes, atomic_write_json
from pipeline.train.devices import resolve_device
from pipeline.train.publish import publish_run
from pipeline.train.runs import check_prepared, run_fingerprint
from pipeline.train.strategies import frozen_groups_at, validate_schedule
from pipeline.train.subset import TrainSubset, load_train_subset, write_subset_view
from pipeline.ultralytics_env import import_ultralytics

if TYPE_CHECKING:
    from pipeline.config import Params

log = logging.getLogger(__name__)

# Module indices of each group, from the input side to the output side. The last group is the head, which is always
# trained; progressive unfreezing walks the others from the head backwards (ULMFiT order).
YOLO_GROUPS = {
    # YOLOv5/v8/11 layouts: 0-9 backbone (yolo11: 0-10), then neck, then the Detect head (last index).
    "yolov5": {"backbone": range(0, 10), "neck": range(10, 24), "head": range(24, 25)},
    "yolov8": {"backbone": range(0, 10), "neck": range(10, 22), "head": range(22, 23)},
    "yolo11": {"backbone": range(0, 11), "neck": range(11, 23), "head": range(23, 24)},
}


def yolo_group_prefixes(model_name: str) -> dict[str, list[str]]:
    for arch, groups in YOLO_GROUPS.items():
        if model_name.startswith(arch):
            return {g: [f"model.{i}." for i in idx] for g, idx in groups.items()}
    raise ConfigError(f"no layer groups known for {model_name!r}; expected a yolov5*, yolov8* or yolo11* model")


def _resumable(last: Path) -> int | None:
    """Epoch of a resumable checkpoint (optimizer present, i.e. the run did not finish), else None."""
    if not last.is_file():
        return None
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
    except Exception as e:  # a checkpoint torn by a kill during write: start over, and say so
        log.warning("ignoring unreadable checkpoint %s (%s); training starts from epoch 0", last, e)
        return None
    if ckpt.get("optimizer") is None or int(ckpt.get("epoch", -1)) < 0:
        return None
    return int(ckpt["epoch"])


def train_yolo(params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
               raw_dir: Path = Path("data/raw"), mirrors: list[Path] | None = None, trust: bool = False,
               progress: bool = True, ultralytics_args: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune an Ultralytics YOLO model on the prepared dataset; write best/last weights and reports.

    ``ultralytics_args``: trainer arguments that override detflow's (few-shot fine-tuning: no warm-up, no
    per-epoch validation; see :mod:`pipeline.fewshot`); they are part of the run's fingerprint."""
    tp = params.train
    validate_schedule(tp)
    device = resolve_device(tp.device)
    info = check_prepared(prepared)
    subset = load_train_subset(prepared, tp.fraction, tp.seed)  # train.fraction; fails before any training
    prefixes = yolo_group_prefixes(tp.model)
    import_ultralytics()
    from ultralytics import YOLO

    pretrained, state = resolve_pretrained(tp, raw_dir, mirrors, trust)
    if pretrained.note:
        log.warning(pretrained.note)
    extra = dict(ultralytics_args or {})
    fingerprint = run_fingerprint(tp, info["manifest_sha256"] + (json.dumps(extra, sort_keys=True) if extra else ""),
                                  pretrained.sha256)
    run_dir = (workdir / f"yolo-{fingerprint}").resolve()
    last = run_dir / "weights" / "last.pt"
    resume_epoch = _resumable(last) if tp.resume == "auto" else None
    if resume_epoch is None and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset_yaml = (prepared / "dataset.yaml").resolve()
    if not subset.whole:
        dataset_yaml, _ = write_subset_view(prepared, subset, run_dir)

    state_path = None
    transferred: list[str] = []
    if state is not None:
        state_path = run_dir / "pretrained_state.pt"
        if resume_epoch is None:
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(state_path, buf.getvalue())
        probe = YOLO(f"{tp.model}.yaml").model  # to learn which names will actually transfer
        target = probe.state_dict()
        # backbone_lr_mult is for the pretrained layers below the head: a source whose head transfers too (a
        # detflow checkpoint with the same classes, few-shot) keeps the full learning rate on its head
        head = tuple(prefixes["head"])
        transferred = [k for k, v in state.items()
                       if k in target and target[k].shape == v.shape and not k.startswith(head)]
    spec = {
        "run_dir": str(run_dir), "strategy": tp.strategy, "unfreeze_at": list(tp.unfreeze_at),
        "backbone_lr_mult": tp.backbone_lr_mult, "group_prefixes": prefixes,
        "pretrained": {"source": pretrained.source, "sha256": pretrained.sha256},
        "pretrained_state": str(state_path) if state_path else None,
        "transferred_params": transferred,
        "params": params.model_dump(mode="json"),
        "progress": progress,
    }
    spec_path = run_dir / "spec.json"
    atomic_write_json(spec_path, spec)
    os.environ[SPEC_ENV] = str(spec_path)

    aug = tp.augment
    initial_frozen = frozen_groups_at(tp.strategy, tp.unfreeze_at, 0)
    args: dict[str, Any] = dict(
        data=str(dataset_yaml), epochs=tp.epochs, imgsz=tp.imgsz, batch=tp.batch,
        device=device, workers=tp.workers, seed=tp.seed, deterministic=True, patience=tp.patience or tp.epochs,
        optimizer=tp.optimizer, lr0=tp.lr, project=str(run_dir.parent), name=run_dir.name, exist_ok=True,
        fliplr=aug.fliplr, flipud=aug.flipud, scale=aug.scale, mosaic=1.0 if aug.mosaic else 0.0,
        hsv_h=0.015 if aug.hsv else 0.0, hsv_s=0.7 if aug.hsv else 0.0, hsv_v=0.4 if aug.hsv else 0.0,
        amp=device != "cpu", plots=True, verbose=False, nbs=tp.nominal_batch,
        freeze=[int(p.split(".")[1]) for g in initial_frozen for p in prefixes[g]] or None,
    )
    args.update(extra)
    if resume_epoch is not None:
        log.warning("resuming interrupted training from %s (epoch %d done)", last, resume_epoch + 1)
        model = YOLO(str(last))
        model.train(resume=True, trainer=trainer_class(), workers=tp.workers, device=device)
    else:
        model = YOLO(f"{tp.model}.yaml")
        model.train(trainer=trainer_class(), **args)
    return _finish(params, pretrained, run_dir, out_dir, reports_dir, resume_epoch, subset)


def _finish(params: Params, pretrained: PretrainedSource, run_dir: Path, out_dir: Path, reports_dir: Path,
            resume_epoch: int | None, subset: TrainSubset) -> TrainResult:
    weights = run_dir / "weights"
    best = weights / "best.pt" if (weights / "best.pt").exists() else weights / "last.pt"
    for ckpt_path in {best, weights / "last.pt"}:
        write_header(ckpt_path, params.train.model, params.train.imgsz)
    frozen_file, report_file = run_dir / "frozen_by_epoch.json", run_dir / "transfer_report.json"
    frozen = json.loads(frozen_file.read_text()) if frozen_file.exists() else {}
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    sizes = _param_sizes(best)
    group_params = {g: sum(n for name, n in sizes.items() if name.startswith(tuple(ps)))
                    for g, ps in yolo_group_prefixes(params.train.model).items()}
    return publish_run(family=YOLO.name, params=params, pretrained=pretrained, run_dir=run_dir, best=best,
                       last=weights / "last.pt", out_dir=out_dir, reports_dir=reports_dir, transfer_report=report,
                       frozen_by_epoch={int(k): v for k, v in frozen.items()}, group_params=group_params,
                       resume_epoch=resume_epoch, subset=subset.summary(),
                       extra_figures=[run_dir / n for n in ("results.png", "confusion_matrix.png", "labels.jpg")])


def _param_sizes(path: Path) -> dict[str, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt.get("model")
    return {n: p.numel() for n, p in model.named_parameters()}


def write_header(path: Path, model_name: str, imgsz: int) -> None:
    """Add the detflow header (family, model, classes, imgsz) to an Ultralytics checkpoint, in place (atomically).

    Ultralytics ignores keys it does not know, so the file stays a valid Ultralytics checkpoint.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt.get("model")
    names = model.names if isinstance(model.names, list) else [model.names[k] for k in sorted(model.names)]
    ckpt[HEADER_KEY] = CheckpointMeta(family=YOLO.name, model=model_name, classes=[str(n) for n in names],
                                      imgsz=int(imgsz)).to_dict()
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())
