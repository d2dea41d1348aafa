"""torchvision Faster R-CNN fine-tuning with our transfer-learning controls (the ``frcnn`` family).

Unlike the YOLO family, torchvision gives us models but no trainer, so the loop lives here, in the style of the
torchvision detection references: ``train_one_epoch`` and ``evaluate_coco`` are plain functions and
``train_frcnn`` only wires them together. It follows the YOLO family's contract: the same strategies (from
``common.py``), the same run fingerprint and resume rule, and the same outputs (``best.pt``, ``last.pt``,
``params.yaml``, ``transfer.json``, ``results.csv`` with Ultralytics' metric column names, DVCLive metrics,
``summary.json``).

Input size: the model is built with ``min_size=max_size=imgsz``, so its internal ``GeneralizedRCNNTransform``
resizes every image to a longer side of ``imgsz`` (aspect ratio kept, padded to a multiple of 32 in a batch) and
maps detections back to the original image coordinates. Export later fixes the input size.

A checkpoint is one dict (see :func:`_checkpoint`), loadable with ``torch.load(weights_only=True)``: no pickled
classes, so :func:`load_frcnn_checkpoint` rebuilds the model from ``model_name``, ``classes`` and ``imgsz``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Params, TrainParams
from pipeline.errors import AssetError, ConfigError, DataError, DetflowError
from pipeline.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from pipeline.train.common import (
    FRCNN_GROUPS,
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
)
from pipeline.train.weights_import import transfer_state_dict

log = logging.getLogger(__name__)

__all__ = [
    "EpochEnd",
    "TrainingDivergedError",
    "build_frcnn",
    "coco_weights_file_name",
    "evaluate_coco",
    "load_frcnn_checkpoint",
    "predict_frcnn",
    "resolve_frcnn_pretrained",
    "train_frcnn",
    "train_one_epoch",
]

#: Ultralytics' fitness: mostly mAP50-95, a little mAP50. best.pt is the epoch that maximises it.
FITNESS_WEIGHTS = (0.1, 0.9)
CLIP_GRAD_NORM = 10.0
WARMUP_MAX_ITERS = 1000  # at most one epoch, at most this many iterations
FINAL_LR_FACTOR = 0.01  # cosine schedule ends at lr * this
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4  # torchvision detection references
LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
MAP50_COL, MAP_COL = "metrics/mAP50(B)", "metrics/mAP50-95(B)"  # Ultralytics' results.csv names


class TrainingDivergedError(DetflowError):
    """The loss became NaN/inf: continuing would only write garbage checkpoints."""


# --------------------------------------------------------------------------------------------- model


def _builders() -> dict[str, tuple[Callable[..., nn.Module], Any]]:
    from torchvision.models import detection as d

    return {
        "fasterrcnn_mobilenet_v3_large_fpn": (d.fasterrcnn_mobilenet_v3_large_fpn,
                                              d.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1),
        "fasterrcnn_mobilenet_v3_large_320_fpn": (d.fasterrcnn_mobilenet_v3_large_320_fpn,
                                                  d.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1),
        "fasterrcnn_resnet50_fpn_v2": (d.fasterrcnn_resnet50_fpn_v2, d.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
    }


def _builder(model_name: str) -> tuple[Callable[..., nn.Module], Any]:
    builders = _builders()
    if model_name not in builders:
        raise ConfigError(f"unknown Faster R-CNN model {model_name!r}; expected one of: {', '.join(builders)}")
    return builders[model_name]


def build_frcnn(model_name: str, num_classes: int, imgsz: int) -> nn.Module:
    """An untrained torchvision Faster R-CNN with ``num_classes`` outputs (K classes + background).

    No weights are fetched here (``weights=None, weights_backbone=None``): pretrained tensors are transferred by
    name afterwards, so that a predictor of another class count is simply left new. Without pretrained backbone
    weights torchvision uses ordinary (trainable) BatchNorm and makes every backbone layer trainable; freezing is
    our strategies' job. ``min_size=max_size=imgsz``: the model resizes inputs to a longer side of ``imgsz``.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes must count the background too (K + 1 >= 2), got {num_classes}")
    builder, _ = _builder(model_name)
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, min_size=imgsz, max_size=imgsz)


def coco_weights_file_name(model_name: str) -> str:
    """torchvision's file name of the COCO checkpoint, e.g. ``fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth``."""
    _, weights = _builder(model_name)
    return os.path.basename(weights.url)


def _hash_prefix(file_name: str) -> str | None:
    """The sha256 prefix torchvision embeds in a file name (torch.hub's ``-<hex>.`` convention)."""
    import re

    m = re.search(r"-([a-f0-9]+)\.", file_name)
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------------- pretrained


def _state_from_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file via torch's safe loader (no code can run): a state dict or ``{'model': ...}``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a full-module pickle, a corrupt/truncated file, not a torch file at all
        raise AssetError(f"could not read weights {path} with torch.load(weights_only=True): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Expected a state dict "
                         "or a dict with a 'model' state dict (full pickled modules are refused).") from e
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise AssetError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise AssetError(f"{path}: no tensors found")
    return state


def _local_coco_candidates(file_name: str, raw_dir: Path, mirrors: Sequence[Path] | None) -> list[Path]:
    from pipeline.assets import mirror_dirs

    return [Path(raw_dir) / file_name] + [m / "weights" / file_name for m in mirror_dirs(mirrors)]


def resolve_frcnn_pretrained(tp: TrainParams, raw_dir: Path = Path("data/raw"), mirrors: Sequence[Path] | None = None,
                             progress: bool = False) -> tuple[PretrainedSource, dict[str, torch.Tensor] | None]:
    """Initial weights per ``train.pretrained``.

    ``none``: scratch. ``coco``/``auto``: torchvision's COCO file from ``<raw_dir>/<file>`` or
    ``<mirror>/weights/<file>`` (its sha256 must start with the prefix torchvision puts in the name), else
    torchvision's own loader (torch hub cache, download when online). Neither: ``coco`` raises, ``auto`` trains
    from scratch with a loud note. A path: loaded with the safe loader; ``pretrained_sha256`` must match when set.
    """
    mode = tp.pretrained
    if mode == "none":
        return PretrainedSource(kind="none", source="none (from scratch, as configured)"), None
    if mode in ("coco", "auto"):
        _, weights = _builder(tp.model)
        name = os.path.basename(weights.url)
        prefix = _hash_prefix(name)
        reasons: list[str] = []
        for cand in _local_coco_candidates(name, raw_dir, mirrors):
            if not cand.is_file():
                continue
            sha = sha256_file(cand)
            if prefix and not sha.startswith(prefix):
                reasons.append(f"{cand}: sha256 {sha} does not start with {prefix} (corrupt or a different file)")
                log.warning("skipping %s", reasons[-1])
                continue
            try:
                state = _state_from_file(cand)
            except AssetError as e:
                reasons.append(str(e))
                continue
            return PretrainedSource(kind="coco", source=f"{name} (local copy; {weights.url})", path=str(cand),
                                    sha256=sha), state
        try:  # the real torchvision path: torch hub cache, or a download when online (offline: fails in seconds)
            state = dict(weights.get_state_dict(progress=progress, check_hash=True))
        except Exception as e:
            where = ", ".join(str(p) for p in _local_coco_candidates(name, raw_dir, mirrors))
            reasons.append(f"no verified local copy at {where}; torchvision download of {weights.url} failed: "
                           f"{type(e).__name__}: {e}")
            return pretrained_unavailable(mode, tp.model, "; ".join(reasons)), None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / name
        sha = sha256_file(cached) if cached.is_file() else None
        if sha is not None and prefix and not sha.startswith(prefix):
            return pretrained_unavailable(mode, tp.model, f"{cached}: sha256 {sha} does not start with {prefix}; "
                                          "delete the corrupt cached file"), None
        return PretrainedSource(kind="coco", source=f"{name} (torchvision; {weights.url})",
                                path=str(cached) if sha else None, sha256=sha), state
    path = Path(mode)
    if not path.is_file():
        raise ConfigError(f"train.pretrained {mode!r} is not a file; expected one of: auto, coco, none, or a path")
    sha = sha256_file(path)
    expected = tp.pretrained_sha256.strip().lower() if tp.pretrained_sha256 else None
    if expected is not None and expected != sha:
        raise AssetError(f"refusing to use {path}: sha256 mismatch - train.pretrained_sha256 is {expected}, "
                         f"the file's is {sha}. Fetch the right file or fix the pinned checksum.")
    return PretrainedSource(kind="path", source=str(path), path=str(path), sha256=sha), _state_from_file(path)


def _transferable_params(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Learnable parameters that will receive pretrained values (same name and shape)."""
    return [n for n, p in model.named_parameters() if n in state and tuple(state[n].shape) == tuple(p.shape)]


# --------------------------------------------------------------------------------------------- data


def _worker_init(worker_id: int) -> None:
    """Seed Python/numpy in each worker from torch's per-worker seed (which the loader's generator fixes)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class CocoDetection(torch.utils.data.Dataset):
    """A prepared split: ``(float image CxHxW in [0,1], target)`` with XYXY boxes and labels 1..K.

    Images without annotations are negatives: ``boxes`` has shape (0, 4).
    """

    def __init__(self, root: Path, coco_json: Path, transforms: Callable[..., Any] | None) -> None:
        self.root = Path(root)
        doc = json.loads(Path(coco_json).read_text())
        self.images: list[dict[str, Any]] = list(doc["images"])
        self.anns: dict[int, list[dict[str, Any]]] = {}
        for a in doc.get("annotations", []):
            self.anns.setdefault(int(a["image_id"]), []).append(a)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from torchvision import tv_tensors
        from torchvision.io import ImageReadMode, decode_image

        info = self.images[i]
        path = self.root / info["file_name"]
        try:
            img = decode_image(str(path), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError) as e:
            raise DataError(f"cannot read image {path}: {e}") from e
        anns = [a for a in self.anns.get(int(info["id"]), []) if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        h, w = int(img.shape[-2]), int(img.shape[-1])
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64),
            "image_id": int(info["id"]),
        }
        image: Any = tv_tensors.Image(img)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor).reshape(-1, 4)
        return image.as_subclass(torch.Tensor), target


def build_transforms(tp: TrainParams, train: bool) -> Callable[..., Any]:
    """Train: resize to ``imgsz`` (what the model would do anyway, done first so the rest is cheap), flips,
    scale/translate jitter, colour jitter; boxes are clamped and degenerate ones dropped. Val: none (the model
    resizes and maps detections back to original coordinates). ``augment.mosaic`` does not apply to Faster R-CNN.
    """
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    ops: list[Any] = []
    if train:
        aug = tp.augment
        ops.append(v2.Resize(size=None, max_size=tp.imgsz, antialias=True))
        if aug.fliplr > 0:
            ops.append(v2.RandomHorizontalFlip(p=aug.fliplr))
        if aug.flipud > 0:
            ops.append(v2.RandomVerticalFlip(p=aug.flipud))
        if aug.scale > 0:  # Ultralytics-like: scale gain 1 +- scale, translate +- 10 %, grey fill
            ops.append(v2.RandomAffine(degrees=0.0, translate=(0.1, 0.1), scale=(1 - aug.scale, 1 + aug.scale),
                                       fill={tv_tensors.Image: 114, "others": 0}))
        if aug.hsv:  # Ultralytics' hsv_v / hsv_s / hsv_h gains
            ops.append(v2.ColorJitter(brightness=0.4, saturation=0.7, hue=0.015))
        ops += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)


def _collate(batch: list[Any]) -> tuple[Any, ...]:
    return tuple(zip(*batch, strict=True))


def _loader(ds: CocoDetection, tp: TrainParams, shuffle: bool, workers: int, pin: bool,
            generator: torch.Generator | None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=tp.batch, shuffle=shuffle, num_workers=workers,
                                       collate_fn=_collate, pin_memory=pin, generator=generator,
                                       worker_init_fn=_worker_init if workers else None, drop_last=False)


# --------------------------------------------------------------------------------------------- strategies


def group_param_counts(model: nn.Module) -> dict[str, int]:
    named = dict(model.named_parameters())
    return {g: sum(named[n].numel() for n in names_in_groups(named, FRCNN_GROUPS, [g])) for g in FRCNN_GROUPS}


def apply_freeze(model: nn.Module, groups: Sequence[str]) -> list[str]:
    """``requires_grad`` False exactly for parameters of the frozen ``groups``; returns their names."""
    frozen = set(names_in_groups([n for n, _ in model.named_parameters()], FRCNN_GROUPS, groups))
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    return sorted(frozen)


def set_train_mode(model: nn.Module, frozen_groups: Sequence[str]) -> None:
    """``model.train()``, except BatchNorm inside frozen groups stays in eval mode: its running statistics
    are pretrained parameters too and must not drift while the group is frozen."""
    model.train()
    prefixes = tuple(p for g in frozen_groups for p in FRCNN_GROUPS[g])
    if not prefixes:
        return
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (name + ".").startswith(prefixes):
            mod.eval()


def build_optimizer(model: nn.Module, tp: TrainParams, pretrained_names: set[str]) -> torch.optim.Optimizer:
    """All parameters from the start (frozen ones just get no gradient, so unfreezing needs no new optimizer);
    pretrained ones in their own group at ``lr * backbone_lr_mult``. ``auto`` is SGD with momentum 0.9 and
    weight decay 1e-4, what the torchvision detection references train Faster R-CNN with."""
    named = list(model.named_parameters())
    new = [p for n, p in named if n not in pretrained_names]
    old = [p for n, p in named if n in pretrained_names]
    groups: list[dict[str, Any]] = []
    if new:
        groups.append({"params": new, "lr": tp.lr, "name": "new"})
    if old:
        groups.append({"params": old, "lr": tp.lr * tp.backbone_lr_mult, "name": "pretrained"})
    name = "SGD" if tp.optimizer == "auto" else tp.optimizer
    if name == "SGD":
        return torch.optim.SGD(groups, lr=tp.lr, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=tp.lr, weight_decay=0.05)
    return torch.optim.Adam(groups, lr=tp.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, iters_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration: linear warmup over at most the first epoch, then cosine down to ``FINAL_LR_FACTOR``.
    A multiplicative factor, so the pretrained group keeps its ``backbone_lr_mult`` ratio throughout."""
    total = max(1, iters_per_epoch * epochs)
    warmup = max(1, min(WARMUP_MAX_ITERS, iters_per_epoch, total - 1))

    def factor(it: int) -> float:
        if it < warmup:
            return 0.001 + (1 - 0.001) * it / warmup
        t = min(1.0, (it - warmup) / max(1, total - warmup))
        return FINAL_LR_FACTOR + (1 - FINAL_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------- loops


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader,
                    device: torch.device, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: torch.amp.GradScaler | None, desc: str, progress: bool) -> dict[str, float]:
    """One pass over ``loader``; the caller has set train mode and requires_grad. Returns mean losses."""
    from tqdm import tqdm

    sums = dict.fromkeys(("loss", *LOSS_KEYS), 0.0)
    n = 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for images, targets in bar:
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        with torch.autocast(device.type, enabled=scaler is not None):
            losses = model(images, targets)
            loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"{desc}: loss is {loss.item()} ({ {k: v.item() for k, v in losses.items()} });"
                                        " lower train.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, CLIP_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, CLIP_GRAD_NORM)
            optimizer.step()
        scheduler.step()
        n += 1
        sums["loss"] += float(loss.item())
        for k in LOSS_KEYS:
            if k in losses:
                sums[k] += float(losses[k].item())
        bar.set_postfix(loss=f"{sums['loss'] / n:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return {k: v / max(n, 1) for k, v in sums.items()}


@contextlib.contextmanager
def _score_threshold(model: nn.Module, thr: float) -> Any:
    roi = model.roi_heads  # type: ignore[union-attr]
    old = roi.score_thresh
    roi.score_thresh = thr
    try:
        yield
    finally:
        roi.score_thresh = old


def evaluate_coco(model: nn.Module, loader: torch.utils.data.DataLoader, coco_doc: dict[str, Any],
                  device: torch.device, progress: bool = False) -> tuple[float, float]:
    """(mAP50, mAP50-95) of ``model`` on a COCO split, by pycocotools; 0 where nothing can be matched."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from tqdm import tqdm

    model.eval()
    results: list[dict[str, Any]] = []
    with torch.inference_mode(), _score_threshold(model, 0.001):
        for images, targets in tqdm(loader, desc="val", disable=not progress, leave=False, dynamic_ncols=True):
            outputs = model([im.to(device) for im in images])
            for out, t in zip(outputs, targets, strict=True):
                boxes = out["boxes"].float().cpu().numpy()
                for (x1, y1, x2, y2), s, c in zip(boxes, out["scores"].float().cpu().numpy(),
                                                  out["labels"].cpu().numpy(), strict=True):
                    results.append({"image_id": int(t["image_id"]), "category_id": int(c),
                                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                                    "score": float(s)})
    if not results or not coco_doc.get("annotations"):
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_doc
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    map5095, map50 = (max(0.0, float(v)) for v in ev.stats[:2])  # -1 means "no ground truth": count as 0
    return map50, map5095


def fitness(map50: float, map5095: float) -> float:
    return FITNESS_WEIGHTS[0] * map50 + FITNESS_WEIGHTS[1] * map5095


# --------------------------------------------------------------------------------------------- checkpoints


@dataclass
class EpochEnd:
    """What a per-epoch callback sees, after the epoch's checkpoint is on disk."""

    epoch: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    frozen_groups: list[str]
    row: dict[str, float]
    run_dir: Path
    improved: bool


@dataclass
class _RunState:
    """Everything besides the tensors that a resumed run needs to continue exactly."""

    best_fitness: float = float("-inf")
    best_epoch: int = -1
    epochs_no_improve: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    frozen_by_epoch: dict[int, list[str]] = field(default_factory=dict)
    transferred_params: list[str] = field(default_factory=list)
    transfer_report: dict[str, Any] | None = None


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any, scaler: Any,
                epoch: int, st: _RunState, params: Params, fingerprint: str, classes: list[str],
                pretrained: PretrainedSource, finished: bool) -> dict[str, Any]:
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "best_fitness": float(st.best_fitness),
        "best_epoch": st.best_epoch,
        "epochs_no_improve": st.epochs_no_improve,
        "history": st.history,
        "frozen_by_epoch": st.frozen_by_epoch,
        "transferred_params": st.transferred_params,
        "transfer_report": st.transfer_report,
        "finished": finished,
        "params": params.model_dump(mode="json"),
        "fingerprint": fingerprint,
        "model_name": params.train.model,
        "classes": list(classes),
        "imgsz": params.train.imgsz,
        "family": "frcnn",
        "pretrained": asdict(pretrained),
    }


def _load_resumable(last: Path, fingerprint: str, epochs: int) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None: absent, unreadable, another run, or a finished run."""
    if not last.is_file():
        return None
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as e:  # torn by a kill during a non-atomic copy, or disk trouble: start over, and say so
        log.warning("ignoring unreadable checkpoint %s (%s); training starts from epoch 0", last, e)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("family") != "frcnn" or ckpt.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s: not from this run configuration", last)
        return None
    if ckpt.get("finished") or ckpt.get("optimizer") is None or int(ckpt.get("epoch", -1)) >= epochs - 1:
        log.info("previous run in %s finished; training again from epoch 0", last.parent)
        return None
    return ckpt


def load_frcnn_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                          score_thresh: float = 0.001) -> tuple[nn.Module, dict[str, Any]]:
    """Model (eval mode) and metadata of a saved frcnn checkpoint; needs no training code or pickled classes.

    ``score_thresh`` replaces torchvision's default of 0.05 inside the model so that evaluators see the same
    low-confidence detections as the training-time validation (mAP needs them); filter by score downstream.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AssetError(f"cannot read Faster R-CNN checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("family") != "frcnn" or "model" not in ckpt:
        raise AssetError(f"{path} is not a detflow Faster R-CNN checkpoint (family {ckpt.get('family')!r})"
                         if isinstance(ckpt, dict) else f"{path} is not a detflow checkpoint")
    model = build_frcnn(ckpt["model_name"], len(ckpt["classes"]) + 1, int(ckpt["imgsz"]))
    model.load_state_dict(ckpt["model"])
    model.roi_heads.score_thresh = score_thresh  # type: ignore[union-attr]
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "scaler")}
    return model, meta


def predict_frcnn(model: nn.Module, images: Sequence[np.ndarray], score_threshold: float = 0.001,
                  batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """Detections per RGB uint8 HxWx3 image: ``boxes`` (N, 4) xyxy pixels of that image, ``scores``,
    ``labels`` 0-based class indices (the model's label 0 is background)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[dict[str, np.ndarray]] = []
    try:
        with torch.inference_mode(), _score_threshold(model, score_threshold):
            for i in range(0, len(images), batch_size):
                batch = []
                for im in images[i:i + batch_size]:
                    a = np.asarray(im)
                    if a.ndim == 2:
                        a = np.repeat(a[:, :, None], 3, axis=2)
                    if a.ndim != 3 or a.shape[2] != 3:
                        raise DataError(f"predict_frcnn expects HxWx3 RGB images, got shape {a.shape}")
                    t = torch.from_numpy(np.array(a)).permute(2, 0, 1)  # a copy: inputs may be read-only
                    t = t.float() / 255.0 if a.dtype == np.uint8 else t.float()
                    batch.append(t.to(device))
                for o in model(batch):
                    out.append({"boxes": o["boxes"].float().cpu().numpy().reshape(-1, 4),
                                "scores": o["scores"].float().cpu().numpy(),
                                "labels": (o["labels"].cpu().numpy() - 1).astype(np.int64)})
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------- reports


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


# --------------------------------------------------------------------------------------------- entry


def _device(resolved: str) -> torch.device:
    if resolved == "cpu":
        return torch.device("cpu")
    ids = resolved.split(",")
    if len(ids) > 1:
        log.warning("the frcnn family trains on one GPU; using cuda:%s of %s", ids[0], resolved)
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


def train_frcnn(params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
                raw_dir: Path = Path("data/raw"), mirrors: list[Path] | None = None, trust: bool = False,
                progress: bool = True, on_epoch_end: Callable[[EpochEnd], None] | None = None) -> TrainResult:
    """Fine-tune a torchvision Faster R-CNN on the prepared dataset; write best/last weights and reports.

    ``trust`` is accepted for the common signature but not needed: weights are read with torch's safe loader,
    which cannot run code. ``on_epoch_end`` is called after each epoch's checkpoint is written (tests, tooling).
    """
    del trust
    tp = params.train
    if tp.family != "frcnn":
        raise ConfigError(f"train_frcnn got train.family={tp.family!r}")
    validate_schedule(tp)
    device = _device(resolve_device(tp.device))
    info = check_prepared(prepared)
    train_doc = json.loads((prepared / "coco" / "train.json").read_text())
    val_doc = json.loads((prepared / "coco" / "val.json").read_text())
    classes = _classes(prepared, info, train_doc)

    pretrained, state = resolve_frcnn_pretrained(tp, raw_dir, mirrors, progress)
    if pretrained.note:
        log.warning(pretrained.note)
    fingerprint = run_fingerprint(tp, info["manifest_sha256"], pretrained.sha256)
    run_dir = (workdir / f"frcnn-{fingerprint}").resolve()
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    ckpt = _load_resumable(last, fingerprint, tp.epochs) if tp.resume == "auto" else None
    if ckpt is None and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    _seed_all(tp.seed)
    model = build_frcnn(tp.model, len(classes) + 1, tp.imgsz)
    st = _RunState()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        st = _RunState(best_fitness=float(ckpt["best_fitness"]), best_epoch=int(ckpt.get("best_epoch", -1)),
                       epochs_no_improve=int(ckpt.get("epochs_no_improve", 0)),
                       history=list(ckpt["history"])[: int(ckpt["epoch"]) + 1],
                       frozen_by_epoch={int(k): list(v) for k, v in ckpt["frozen_by_epoch"].items()},
                       transferred_params=list(ckpt["transferred_params"]),
                       transfer_report=ckpt.get("transfer_report"))
    elif state is not None:
        st.transferred_params = _transferable_params(model, state)
        st.transfer_report = transfer_state_dict(model, state, pretrained.source, pretrained.sha256).to_dict()
        atomic_write_json(run_dir / "transfer_report.json", st.transfer_report)
    del state
    model.to(device)

    use_cuda = device.type == "cuda"
    workers = tp.workers if use_cuda else 0
    if not use_cuda:
        torch.set_num_threads(cpu_threads(tp.cpu_threads))
    gen = torch.Generator()
    train_ds = CocoDetection(prepared, prepared / "coco" / "train.json", build_transforms(tp, train=True))
    val_ds = CocoDetection(prepared, prepared / "coco" / "val.json", build_transforms(tp, train=False))
    train_loader = _loader(train_ds, tp, True, workers, use_cuda, gen)
    val_loader = _loader(val_ds, tp, False, workers, use_cuda, None)

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
        log.warning("resuming interrupted frcnn training from %s from epoch %d (epochs 0..%d done)",
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
            apply_freeze(model, groups)
            set_train_mode(model, groups)
            st.frozen_by_epoch[epoch] = list(groups)
            losses = train_one_epoch(model, optimizer, train_loader, device, scheduler, scaler,
                                     f"epoch {epoch + 1}/{tp.epochs}", progress)
            map50, map5095 = evaluate_coco(model, val_loader, val_doc, device, progress) if has_val \
                else (float("nan"), float("nan"))
            fit = fitness(map50, map5095)
            improved = has_val and fit > st.best_fitness
            if improved:
                st.best_fitness, st.best_epoch, st.epochs_no_improve = fit, epoch, 0
            else:
                st.epochs_no_improve += 1
            row: dict[str, float] = {"epoch": epoch + 1, "train/loss": losses["loss"],
                                     **{f"train/{k}": losses[k] for k in LOSS_KEYS},
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
                _save_atomic(_checkpoint(model, None, None, None, epoch, st, params, fingerprint, classes,
                                         pretrained, finished), best)
            _save_atomic(_checkpoint(model, optimizer, scheduler, scaler, epoch, st, params, fingerprint, classes,
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
    group_params = group_param_counts(model)
    return _finish(params, pretrained, run_dir, out_dir, reports_dir, start_epoch, st, group_params)


def _finish(params: Params, pretrained: PretrainedSource, run_dir: Path, out_dir: Path, reports_dir: Path,
            start_epoch: int, st: _RunState, group_params: dict[str, int]) -> TrainResult:
    """Publish the run through the shared ``publish_run`` (as the YOLO family does), plus frcnn-specific notes."""
    last = run_dir / "last.pt"
    best = run_dir / "best.pt" if (run_dir / "best.pt").exists() else last
    result = publish_run(family="frcnn", params=params, pretrained=pretrained, run_dir=run_dir, best=best,
                         last=last, out_dir=out_dir, reports_dir=reports_dir, transfer_report=st.transfer_report,
                         frozen_by_epoch=st.frozen_by_epoch, group_params=group_params,
                         resume_epoch=start_epoch - 1 if start_epoch > 0 else None)
    notes = ["train.nominal_batch is ignored by the frcnn family (no gradient accumulation)"]
    if params.train.augment.mosaic:
        notes.insert(0, "augment.mosaic is ignored by the frcnn family (no mosaic augmentation for Faster R-CNN)")
    result.transfer["notes"] = notes
    atomic_write_json(reports_dir / "transfer.json", result.transfer)
    atomic_write_json(reports_dir / "summary.json", result.to_dict())
    return result
