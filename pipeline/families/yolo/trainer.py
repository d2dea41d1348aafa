"""The Ultralytics trainer subclass: COCO transfer, freeze schedule, discriminative LR, exact frozen EMA, DVCLive.

Ultralytics owns the loop; this class reads its settings from a JSON spec named by ``DETFLOW_TRAIN_SPEC``, so
Ultralytics' DDP subprocesses rebuild it identically. It subclasses an Ultralytics class, so it is built on first
access (:func:`trainer_class`), after :func:`pipeline.ultralytics_env.import_ultralytics`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.augment import PhotometricJitter
from pipeline.fileio import atomic_write_json
from pipeline.train.devices import cpu_threads
from pipeline.train.runs import add_budget
from pipeline.train.strategies import frozen_groups_at, names_in_groups
from pipeline.train.weights_import import transfer_state_dict
from pipeline.ultralytics_env import import_ultralytics

log = logging.getLogger(__name__)
SPEC_ENV = "DETFLOW_TRAIN_SPEC"


def _spec() -> dict[str, Any]:
    path = os.environ.get(SPEC_ENV)
    if not path:
        raise RuntimeError(f"{SPEC_ENV} is not set; DetflowDetectionTrainer is started by pipeline.families.yolo.train")
    return json.loads(Path(path).read_text())


def _set_cpu_threads(trainer: Any) -> None:
    """Ultralytics' select_device sets torch to cores - 1 threads on CPU (1 of 2 here) although CPU training loads
    data in-process (workers 0); ``train.cpu_threads`` (0: every core) decides instead."""
    if trainer.device.type == "cpu":
        n = cpu_threads(int(trainer.detflow["params"]["train"].get("cpu_threads", 0)))
        torch.set_num_threads(n)
        log.info("training on CPU with %d torch threads", n)


class JitteredImages:
    """Stands in for a train dataset's ``get_image_and_label``: each source image is jittered
    (:class:`~pipeline.augment.PhotometricJitter`, ``train.augment.stain/window/gamma``) as it is loaded.

    Why there and not in ``dataset.transforms``: Ultralytics' Mosaic / MixUp fetch their extra images through
    ``dataset.get_image_and_label``, so every tile gets its own draw, and the jitter runs before letterbox /
    affine padding, so the grey fill stays the 114 that inference pads with. As an instance attribute it survives
    ``close_mosaic`` (which rebuilds only ``dataset.transforms``) and is copied into forked DataLoader workers. Each
    image's generator is seeded from numpy's global RNG, which Ultralytics seeds (``init_seeds``, ``seed_worker``),
    so deterministic runs stay reproducible. Ultralytics images are BGR; the jitter works in RGB.
    """

    def __init__(self, dataset: Any, jitter: PhotometricJitter) -> None:
        self.dataset = dataset
        self.jitter = jitter

    def __call__(self, index: int) -> dict[str, Any]:
        label = type(self.dataset).get_image_and_label(self.dataset, index)
        rng = np.random.default_rng(np.random.randint(0, 2**63 - 1, dtype=np.int64))
        rgb = self.jitter(label["img"][..., ::-1], rng)
        label["img"] = np.ascontiguousarray(rgb[..., ::-1])
        return label


def jitter_train_dataset(dataset: Any, augment: dict[str, Any]) -> Any:
    """Install :class:`JitteredImages` on a train dataset when ``train.augment`` enables a photometric jitter."""
    jitter = PhotometricJitter.from_params(augment)
    if jitter.active:
        dataset.get_image_and_label = JitteredImages(dataset, jitter)
    return dataset


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
            # Under DDP, Ultralytics pickles the launching trainer's callbacks (ours included) and builds each rank's
            # trainer with them (ultralytics/utils/dist.py): drop that copy of ours and add them once, for this rank.
            for event, fns in self.callbacks.items():
                self.callbacks[event] = [f for f in fns if getattr(f, "__module__", None) != __name__]
            main = RANK in (-1, 0)
            self.budget_steps, self.budget_mark = 0, 0.0
            self.add_callback("on_train_start", _set_cpu_threads)
            if main:  # the run's cost (optimizer steps, seconds) is recorded beside rank 0's checkpoints only
                self.add_callback("on_train_start", _start_budget)
                self.add_callback("on_model_save", _record_budget)
            self.add_callback("on_train_epoch_start", _apply_freeze_schedule)  # every rank: requires_grad
            self.add_callback("on_train_batch_end", _pin_frozen_ema)
            if main:  # DVCLive metrics from rank 0 only (Ultralytics runs on_fit_epoch_end on every rank)
                self.add_callback("on_fit_epoch_end", _log_epoch)
                self.add_callback("on_train_end", _close_live)
            self.bar: Any = None
            if self.detflow.get("progress") and main:
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

        def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> Any:
            """Ultralytics' dataset; the train one also gets the photometric jitter (val stays as is)."""
            dataset = super().build_dataset(img_path, mode, batch)
            if mode == "train":
                jitter_train_dataset(dataset, self.detflow["params"]["train"].get("augment", {}))
            return dataset

        def optimizer_step(self) -> None:
            """Ultralytics' step, counted (``train.fraction`` studies compare arms at equal optimizer steps)."""
            super().optimizer_step()
            self.budget_steps += 1

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
            # the defaults the constructor takes: torch's AdamW lists `decoupled_weight_decay` in its defaults (it
            # is an Adam with that flag set) but does not accept it, so passing them all failed for AdamW
            import inspect

            accepted = inspect.signature(type(optimizer).__init__).parameters
            return type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})

    DetflowDetectionTrainer.__qualname__ = "DetflowDetectionTrainer"
    return DetflowDetectionTrainer


def _start_budget(trainer: Any) -> None:
    import time

    trainer.budget_steps, trainer.budget_mark = 0, time.perf_counter()


def _record_budget(trainer: Any) -> None:
    """After each epoch's checkpoint: add its optimizer steps and seconds (validation included) to budget.json, so
    the record holds exactly the epochs last.pt holds, across resumes."""
    import time

    now = time.perf_counter()
    add_budget(trainer.run_dir, trainer.budget_steps, now - trainer.budget_mark)
    trainer.budget_steps, trainer.budget_mark = 0, now


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
    from ultralytics.utils import RANK

    if RANK not in (-1, 0):  # DDP: rank 0 records the schedule
        return
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
