"""Ultralytics YOLO fine-tuning with our transfer-learning controls.

Ultralytics owns the training loop (data loading, augmentation, AMP, DDP, EMA, checkpoints). We add what it
lacks: COCO weights from the original YOLOv5 checkpoint, strategies with an exact freeze schedule, lower
learning rates for pretrained layers, and a transfer report. The trainer subclass reads its settings from a
JSON spec named by ``DETFLOW_TRAIN_SPEC``, so Ultralytics' DDP subprocesses rebuild it identically.

Importing this module does not import Ultralytics (whose import probes the network and writes settings): the
trainer class is built on first access, after :func:`pipeline.ultralytics_env.import_ultralytics`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline import assets
from pipeline.config import Params, TrainParams
from pipeline.errors import AssetError, ConfigError
from pipeline.fileio import atomic_write_bytes, atomic_write_json
from pipeline.train.common import (
    PretrainedSource,
    TrainResult,
    check_prepared,
    cpu_threads,
    frozen_groups_at,
    names_in_groups,
    pretrained_unavailable,
    publish_run,
    resolve_device,
    run_fingerprint,
    validate_schedule,
    yolo_group_prefixes,
)
from pipeline.train.weights_import import UnsafeCheckpointError, load_yolov5_state_dict, transfer_state_dict
from pipeline.ultralytics_env import import_ultralytics

log = logging.getLogger(__name__)
SPEC_ENV = "DETFLOW_TRAIN_SPEC"
# COCO checkpoints we know for each architecture (asset names in pipeline/assets.py).
YOLO_COCO_ASSETS = {"yolov5n": "yolov5n-coco", "yolo11n": "yolo11n-coco", "yolo11s": "yolo11s-coco"}


def load_checkpoint_state(path: Path, expected_sha256: str | None, trust: bool) -> dict[str, torch.Tensor]:
    """State dict of a YOLO checkpoint: original-YOLOv5 pickles and plain state dicts via the restricted
    unpickler; official Ultralytics checkpoints (whose classes must be imported) only after the checksum
    matched or the user trusted the file."""
    try:
        return load_yolov5_state_dict(path, expected_sha256, trust)
    except UnsafeCheckpointError as e:
        if "'ultralytics." not in str(e):
            raise
    # load_yolov5_state_dict verified the sha256 (or trust) before unpickling, so the full loader is allowed.
    import_ultralytics()  # unpickling imports Ultralytics' classes
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt.get("model")
    if model is None:
        raise AssetError(f"{path}: Ultralytics checkpoint without 'ema' or 'model'")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}


def resolve_pretrained(tp: TrainParams, raw_dir: Path, mirrors: list[Path] | None,
                       trust: bool) -> tuple[PretrainedSource, dict[str, torch.Tensor] | None]:
    mode = tp.pretrained
    if mode == "none":
        return PretrainedSource(kind="none", source="none (from scratch, as configured)"), None
    if mode in ("coco", "auto"):
        name = YOLO_COCO_ASSETS.get(tp.model)
        if name is None:
            return pretrained_unavailable(mode, tp.model, f"no COCO checkpoint is known for {tp.model} "
                                          f"(known: {', '.join(YOLO_COCO_ASSETS)})"), None
        try:
            path = assets.resolve(name, raw_dir=raw_dir, mirrors=mirrors, trust=trust)
            state = load_checkpoint_state(path, assets.ASSETS[name].sha256, trust)
        except AssetError as e:
            return pretrained_unavailable(mode, tp.model, e), None
        from pipeline.fileio import sha256_file

        return PretrainedSource(kind="coco", source=f"{name} ({assets.ASSETS[name].url})", path=str(path),
                                sha256=sha256_file(path)), state
    path = Path(mode)
    if not path.is_file():
        raise ConfigError(f"train.pretrained {mode!r} is not a file; expected one of: auto, coco, none, or a path")
    state = load_checkpoint_state(path, tp.pretrained_sha256, trust)
    from pipeline.fileio import sha256_file

    return PretrainedSource(kind="path", source=str(path), path=str(path), sha256=sha256_file(path)), state


# --------------------------------------------------------------------------------------------- trainer


def _spec() -> dict[str, Any]:
    path = os.environ.get(SPEC_ENV)
    if not path:
        raise RuntimeError(f"{SPEC_ENV} is not set; DetflowDetectionTrainer is started by pipeline.train.yolo")
    return json.loads(Path(path).read_text())


def _set_cpu_threads(trainer: Any) -> None:
    """Ultralytics' select_device sets torch to cores - 1 threads on CPU (1 of 2 here) although CPU training loads
    data in-process (workers 0); ``train.cpu_threads`` (0: every core) decides instead."""
    if trainer.device.type == "cpu":
        n = cpu_threads(int(trainer.detflow["params"]["train"].get("cpu_threads", 0)))
        torch.set_num_threads(n)
        log.info("training on CPU with %d torch threads", n)


def __getattr__(name: str) -> Any:
    """``DetflowDetectionTrainer`` subclasses an Ultralytics class, so it is built on first access."""
    if name == "DetflowDetectionTrainer":
        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trainer_class() -> type:
    """The ``DetflowDetectionTrainer`` class (importing Ultralytics, configured, on the first call)."""
    cls = globals().get("DetflowDetectionTrainer")
    if cls is None:
        cls = globals()["DetflowDetectionTrainer"] = _build_trainer_class()  # pickled by reference (DDP)
    return cls


def _build_trainer_class() -> type:
    import_ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import RANK

    class DetflowDetectionTrainer(DetectionTrainer):
        """DetectionTrainer + COCO transfer, freeze schedule, discriminative LR, exact frozen EMA, DVCLive."""

        def __init__(self, cfg: Any = None, overrides: dict | None = None, _callbacks: Any = None) -> None:
            from ultralytics.cfg import DEFAULT_CFG

            super().__init__(cfg or DEFAULT_CFG, overrides, _callbacks)
            self.detflow = _spec()
            self.run_dir = Path(self.detflow["run_dir"])
            self.prefixes: dict[str, list[str]] = self.detflow["group_prefixes"]
            self.frozen_names: list[str] = []
            self.live: Any = None
            self.add_callback("on_train_start", _set_cpu_threads)
            self.add_callback("on_train_epoch_start", _apply_freeze_schedule)
            self.add_callback("on_train_batch_end", _pin_frozen_ema)
            self.add_callback("on_fit_epoch_end", _log_epoch)
            self.add_callback("on_train_end", _close_live)
            self.bar: Any = None
            if self.detflow.get("progress") and RANK in (-1, 0):
                self.add_callback("on_train_start", _open_bar)
                self.add_callback("on_train_epoch_start", _epoch_started)
                self.add_callback("on_fit_epoch_end", _advance_bar)
                self.add_callback("on_train_end", _close_bar)

        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> Any:
            model = super().get_model(cfg, weights, verbose)
            state_path = self.detflow.get("pretrained_state")
            if weights is None and state_path:  # a fresh run; on resume `weights` is the checkpoint's EMA
                state = torch.load(state_path, map_location="cpu", weights_only=True)
                report = transfer_state_dict(model, state, self.detflow["pretrained"]["source"],
                                             self.detflow["pretrained"]["sha256"])
                atomic_write_json(self.run_dir / "transfer_report.json", report.to_dict())
                log.info("transferred %d/%d tensors from %s", report.tensors_transferred, report.tensors_total,
                         self.detflow["pretrained"]["source"])
            return model

        def build_optimizer(self, model: Any, name: str = "auto", lr: float = 0.001, momentum: float = 0.9,
                            decay: float = 1e-5, iterations: float = 1e5) -> torch.optim.Optimizer:
            """Ultralytics' optimizer with each param group split in two: pretrained layers get lr x mult."""
            optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
            mult = float(self.detflow["backbone_lr_mult"])
            pretrained = set(self.detflow.get("transferred_params") or [])
            if mult == 1.0 or not pretrained:
                return optimizer
            owner = {id(p): n for n, p in model.named_parameters()}
            groups = []
            for group in optimizer.param_groups:
                rest = {k: v for k, v in group.items() if k != "params"}
                new = [p for p in group["params"] if owner.get(id(p)) not in pretrained]
                old = [p for p in group["params"] if owner.get(id(p)) in pretrained]
                if new:
                    groups.append({**rest, "params": new})
                if old:
                    groups.append({**rest, "params": old, "lr": rest["lr"] * mult})
            return type(optimizer)(groups, **optimizer.defaults)

    DetflowDetectionTrainer.__qualname__ = "DetflowDetectionTrainer"
    return DetflowDetectionTrainer


def _apply_freeze_schedule(trainer: Any) -> None:
    """Set requires_grad for this epoch; Ultralytics puts BatchNorm of frozen layers in eval mode for us."""
    spec = trainer.detflow
    groups = frozen_groups_at(spec["strategy"], spec["unfreeze_at"], trainer.epoch)
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    names = [n for n, _ in model.named_parameters()]
    frozen = set(names_in_groups(names, trainer.prefixes, groups))
    for n, p in model.named_parameters():
        if ".dfl" in n:
            continue  # Ultralytics keeps the DFL projection fixed
        p.requires_grad_(n not in frozen)
    trainer.frozen_names = sorted(frozen)
    trainer.freeze_layer_names = [p for g in groups for p in trainer.prefixes[g]] + [".dfl"]
    log_path = trainer.run_dir / "frozen_by_epoch.json"
    history = json.loads(log_path.read_text()) if log_path.exists() else {}
    history[str(trainer.epoch)] = groups
    atomic_write_json(log_path, history)


def _pin_frozen_ema(trainer: Any) -> None:
    """Keep frozen tensors bit-identical in the EMA (its update d*v + (1-d)*v rounds in the last bit)."""
    if not trainer.frozen_names or trainer.ema is None:
        return
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    prefixes = tuple(p for g in frozen_groups_at(trainer.detflow["strategy"], trainer.detflow["unfreeze_at"],
                                                 trainer.epoch) for p in trainer.prefixes[g])
    msd = model.state_dict()
    with torch.no_grad():
        for k, v in trainer.ema.ema.state_dict().items():
            if k.startswith(prefixes) and v.dtype.is_floating_point:
                v.copy_(msd[k])


def _log_epoch(trainer: Any) -> None:
    from dvclive import Live

    if trainer.live is None:
        trainer.live = Live(dir=str(trainer.run_dir / "live"), save_dvc_exp=False, dvcyaml=False,
                            resume=trainer.start_epoch > 0)
    live = trainer.live
    losses = trainer.label_loss_items(trainer.tloss, prefix="train")
    values = {**losses, **trainer.metrics, **trainer.lr}
    for key, value in values.items():
        clean = key.replace("(B)", "").replace("metrics/", "val/").replace("lr/pg", "lr/group")
        live.log_metric(clean, float(value))
    live.step = trainer.epoch
    live.next_step()


def _close_live(trainer: Any) -> None:
    if trainer.live is not None:
        trainer.live.end()


def _open_bar(trainer: Any) -> None:
    """One bar over the epochs (Ultralytics' own per-batch bars and tables are off: its log level is WARNING)."""
    from tqdm import tqdm

    trainer.bar = tqdm(total=trainer.epochs, initial=trainer.start_epoch, desc="train", unit="epoch",
                       dynamic_ncols=True)


def _epoch_started(trainer: Any) -> None:
    trainer.bar_epoch_open = True


def _advance_bar(trainer: Any) -> None:
    """After each epoch's validation: one step, val mAP in the postfix. Ultralytics fires the same event once more
    after validating best.pt at the end; that only relabels the bar with the best model's scores."""
    if trainer.bar is None:
        return
    m = trainer.metrics or {}
    final = not getattr(trainer, "bar_epoch_open", False)
    trainer.bar.set_postfix({"best mAP50" if final else "mAP50": f"{m.get('metrics/mAP50(B)', float('nan')):.3f}",
                             "mAP50-95": f"{m.get('metrics/mAP50-95(B)', float('nan')):.3f}"}, refresh=final)
    if not final:
        trainer.bar_epoch_open = False
        trainer.bar.update(1)


def _close_bar(trainer: Any) -> None:
    if trainer.bar is not None:
        trainer.bar.close()
        trainer.bar = None


# --------------------------------------------------------------------------------------------- entry


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
               progress: bool = True) -> TrainResult:
    """Fine-tune an Ultralytics YOLO model on the prepared dataset; write best/last weights and reports."""
    tp = params.train
    validate_schedule(tp)
    device = resolve_device(tp.device)
    info = check_prepared(prepared)
    prefixes = yolo_group_prefixes(tp.model)
    import_ultralytics()
    from ultralytics import YOLO

    pretrained, state = resolve_pretrained(tp, raw_dir, mirrors, trust)
    if pretrained.note:
        log.warning(pretrained.note)
    fingerprint = run_fingerprint(tp, info["manifest_sha256"], pretrained.sha256)
    run_dir = (workdir / f"yolo-{fingerprint}").resolve()
    last = run_dir / "weights" / "last.pt"
    resume_epoch = _resumable(last) if tp.resume == "auto" else None
    if resume_epoch is None and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    state_path = None
    transferred: list[str] = []
    if state is not None:
        state_path = run_dir / "pretrained_state.pt"
        if resume_epoch is None:
            import io

            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(state_path, buf.getvalue())
        probe = YOLO(f"{tp.model}.yaml").model  # to learn which names will actually transfer
        target = probe.state_dict()
        transferred = [k for k, v in state.items() if k in target and target[k].shape == v.shape]
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
        data=str((prepared / "dataset.yaml").resolve()), epochs=tp.epochs, imgsz=tp.imgsz, batch=tp.batch,
        device=device, workers=tp.workers, seed=tp.seed, deterministic=True, patience=tp.patience or tp.epochs,
        optimizer=tp.optimizer, lr0=tp.lr, project=str(run_dir.parent), name=run_dir.name, exist_ok=True,
        fliplr=aug.fliplr, flipud=aug.flipud, scale=aug.scale, mosaic=1.0 if aug.mosaic else 0.0,
        hsv_h=0.015 if aug.hsv else 0.0, hsv_s=0.7 if aug.hsv else 0.0, hsv_v=0.4 if aug.hsv else 0.0,
        amp=device != "cpu", plots=True, verbose=False, nbs=tp.nominal_batch,
        freeze=[int(p.split(".")[1]) for g in initial_frozen for p in prefixes[g]] or None,
    )
    if resume_epoch is not None:
        log.warning("resuming interrupted training from %s (epoch %d done)", last, resume_epoch + 1)
        model = YOLO(str(last))
        model.train(resume=True, trainer=trainer_class(), workers=tp.workers, device=device)
    else:
        model = YOLO(f"{tp.model}.yaml")
        model.train(trainer=trainer_class(), **args)
    return _finish(params, pretrained, run_dir, out_dir, reports_dir, resume_epoch)


def _finish(params: Params, pretrained: PretrainedSource, run_dir: Path, out_dir: Path, reports_dir: Path,
            resume_epoch: int | None) -> TrainResult:
    weights = run_dir / "weights"
    best = weights / "best.pt" if (weights / "best.pt").exists() else weights / "last.pt"
    frozen_file, report_file = run_dir / "frozen_by_epoch.json", run_dir / "transfer_report.json"
    frozen = json.loads(frozen_file.read_text()) if frozen_file.exists() else {}
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    sizes = _param_sizes(best)
    group_params = {g: sum(n for name, n in sizes.items() if name.startswith(tuple(ps)))
                    for g, ps in yolo_group_prefixes(params.train.model).items()}
    return publish_run(family="yolo", params=params, pretrained=pretrained, run_dir=run_dir, best=best,
                       last=weights / "last.pt", out_dir=out_dir, reports_dir=reports_dir, transfer_report=report,
                       frozen_by_epoch={int(k): v for k, v in frozen.items()}, group_params=group_params,
                       resume_epoch=resume_epoch,
                       extra_figures=[run_dir / n for n in ("results.png", "confusion_matrix.png", "labels.jpg")])


def _param_sizes(path: Path) -> dict[str, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt.get("model")
    return {n: p.numel() for n, p in model.named_parameters()}
