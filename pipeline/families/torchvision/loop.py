"""The torchvision training loop, in the style of the torchvision detection references: freezing by group,
optimizer, schedule, one epoch of training, COCO validation (pycocotools) and the fitness that picks best.pt.

What differs between models (layer groups, loss keys, where the score threshold lives) comes from the model's row
in ``models.py``; the loop itself is the same for every row."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.errors import DetflowError
from pipeline.families.torchvision.build import set_score_threshold
from pipeline.train.strategies import names_in_groups

if TYPE_CHECKING:
    from pipeline.config import TrainParams

#: Ultralytics' fitness: mostly mAP50-95, a little mAP50. best.pt is the epoch that maximises it.
FITNESS_WEIGHTS = (0.1, 0.9)
CLIP_GRAD_NORM = 10.0
WARMUP_MAX_ITERS = 1000  # at most one epoch, at most this many iterations
FINAL_LR_FACTOR = 0.01  # cosine schedule ends at lr * this
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4  # torchvision detection references


class TrainingDivergedError(DetflowError):
    """The loss became NaN/inf: continuing would only write garbage checkpoints."""


def group_param_counts(model: nn.Module, prefixes: dict[str, list[str]]) -> dict[str, int]:
    named = dict(model.named_parameters())
    return {g: sum(named[n].numel() for n in names_in_groups(named, prefixes, [g])) for g in prefixes}


def apply_freeze(model: nn.Module, prefixes: dict[str, list[str]], groups: Sequence[str]) -> list[str]:
    """``requires_grad`` False exactly for parameters of the frozen ``groups``; returns their names."""
    frozen = set(names_in_groups([n for n, _ in model.named_parameters()], prefixes, groups))
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    return sorted(frozen)


def set_train_mode(model: nn.Module, prefixes: dict[str, list[str]], frozen_groups: Sequence[str]) -> None:
    """``model.train()``, except BatchNorm inside frozen groups stays in eval mode: its running statistics
    are pretrained parameters too and must not drift while the group is frozen."""
    model.train()
    frozen = tuple(p for g in frozen_groups for p in prefixes[g])
    if not frozen:
        return
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (name + ".").startswith(frozen):
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


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader,
                    device: torch.device, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: torch.amp.GradScaler | None, desc: str, progress: bool,
                    loss_keys: Sequence[str]) -> dict[str, float]:
    """One pass over ``loader``; the caller has set train mode and requires_grad. Returns mean losses (the total
    and each of ``loss_keys``, the row's)."""
    from tqdm import tqdm

    sums = dict.fromkeys(("loss", *loss_keys), 0.0)
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
        for k in loss_keys:
            if k in losses:
                sums[k] += float(losses[k].item())
        bar.set_postfix(loss=f"{sums['loss'] / n:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return {k: v / max(n, 1) for k, v in sums.items()}


@contextlib.contextmanager
def _score_threshold(model: nn.Module, model_name: str, thr: float) -> Any:
    old = set_score_threshold(model, model_name, thr)
    try:
        yield
    finally:
        set_score_threshold(model, model_name, old)


def evaluate_coco(model: nn.Module, model_name: str, loader: torch.utils.data.DataLoader, coco_doc: dict[str, Any],
                  device: torch.device, progress: bool = False) -> tuple[float, float]:
    """(mAP50, mAP50-95) of ``model`` on a COCO split, by pycocotools; 0 where nothing can be matched."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from tqdm import tqdm

    model.eval()
    results: list[dict[str, Any]] = []
    with torch.inference_mode(), _score_threshold(model, model_name, 0.001):
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
