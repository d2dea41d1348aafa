"""torchvision training data: a prepared COCO split as a torch Dataset, the train/val transforms, the loader."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.augment import PhotometricJitter
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.config import TrainParams


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


class Photometric:
    """``(image, target)`` -> the image jittered by :class:`~pipeline.augment.PhotometricJitter` (stain, window,
    gamma), target unchanged. Each image's generator is seeded from torch's RNG, like torchvision's own random
    transforms, so the per-epoch and per-worker seeds of the training loop fix it."""

    def __init__(self, jitter: PhotometricJitter) -> None:
        self.jitter = jitter

    def __call__(self, image: Any, target: Any) -> tuple[Any, Any]:
        from torchvision import tv_tensors

        rng = np.random.default_rng(int(torch.randint(0, 2**63 - 1, (1,)).item()))
        rgb = self.jitter(image.as_subclass(torch.Tensor).permute(1, 2, 0).numpy(), rng)
        return tv_tensors.wrap(torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), like=image), target


class PadToSquare:
    """``(image, target)`` centred on a ``size`` x ``size`` canvas of grey 114, boxes moved with it: the letterbox
    inference applies (``pipeline/infer/processing.py``), for models whose input is a fixed square (the table's
    ``size: fixed``) that would otherwise stretch a non-square image to it."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Any, target: Any) -> tuple[Any, Any]:
        from torchvision.transforms.v2 import functional as F

        h, w = int(image.shape[-2]), int(image.shape[-1])
        dw, dh = max(self.size - w, 0), max(self.size - h, 0)
        padding = [dw // 2, dh // 2, dw - dw // 2, dh - dh // 2]  # left, top, right, bottom
        if not any(padding):
            return image, target
        return F.pad(image, padding, fill=114), {**target, "boxes": F.pad(target["boxes"], padding)}


def build_transforms(tp: TrainParams, train: bool, square: bool = False) -> Callable[..., Any]:
    """Train: resize to ``imgsz`` (what the model would do anyway, done first so the rest is cheap), padded to a
    square when ``square`` (a fixed-size row), stain / window / gamma jitter (before the affine's grey fill, as for
    YOLO), flips, scale/translate jitter, colour jitter; boxes are clamped and degenerate ones dropped. Val: none
    (the model resizes and maps detections back to original coordinates). ``augment.mosaic`` does not apply.
    """
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    ops: list[Any] = []
    if train:
        aug = tp.augment
        ops.append(v2.Resize(size=None, max_size=tp.imgsz, antialias=True))
        if square:
            ops.append(PadToSquare(tp.imgsz))
        jitter = PhotometricJitter.from_params(aug)
        if jitter.active:
            ops.append(Photometric(jitter))
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


def make_loader(ds: CocoDetection, tp: TrainParams, shuffle: bool, workers: int, pin: bool,
            generator: torch.Generator | None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=tp.batch, shuffle=shuffle, num_workers=workers,
                                       collate_fn=_collate, pin_memory=pin, generator=generator,
                                       worker_init_fn=_worker_init if workers else None, drop_last=False)
