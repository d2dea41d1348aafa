"""Photometric jitter (train.augment.stain / window / gamma): the maths, and that both families' TRAIN data (only)
go through it, with the defaults leaving every pipeline unchanged."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
from copy import copy
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import torch
import yaml
from PIL import Image

from pipeline.augment import PhotometricJitter, draw_stain, hed_adjust, intensity_lut
from pipeline.config import AugmentParams, Params, TrainParams, load_params
from pipeline.errors import ConfigError

# Typical stained pixels: haematoxylin (nuclei, purple-blue), eosin (cytoplasm, pink), DAB (brown).
HEMATOXYLIN, EOSIN, DAB = (90, 60, 150), (230, 150, 190), (150, 100, 50)


def _tissue(seed: int = 0) -> np.ndarray:
    """A 32x32 'slide': white background with blocks of the three stains plus noise."""
    rng = np.random.default_rng(seed)
    img = np.full((32, 32, 3), 255, np.uint8)
    for k, colour in enumerate((HEMATOXYLIN, EOSIN, DAB)):
        img[4 + 9 * k:11 + 9 * k, 4:28] = colour
    noise = rng.integers(-6, 7, size=img.shape)
    return np.clip(img.astype(int) + noise * (img < 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the maths


def test_all_zero_is_the_identity_and_draws_nothing() -> None:
    img = _tissue()
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    assert PhotometricJitter()(img, rng) is img
    assert rng.bit_generator.state == before  # the default pipeline's random streams are untouched
    assert not PhotometricJitter().active and PhotometricJitter(gamma=0.1).active
    grid = np.stack(np.meshgrid(np.arange(1, 256), np.arange(1, 256), indexing="ij"), -1)[::7, ::7]
    rgb = np.concatenate([grid, grid[..., :1][::-1]], -1).astype(np.uint8)  # 37x37 spread of colours
    assert np.abs(hed_adjust(rgb, np.ones(3), np.zeros(3)).astype(int) - rgb).max() <= 1
    assert np.array_equal(intensity_lut(0.0, 1.0, 1.0), np.arange(256))


def test_hed_adjust_is_exactly_the_site_copies_stain_maths() -> None:
    """``pipeline.data.sites.Stain.apply`` can call :func:`hed_adjust` and write the same bytes."""
    from pipeline.data.sites import Stain

    img = np.random.default_rng(1).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    for stain in (Stain(0.3), Stain(0.5, brightness=1.1, gamma=0.8), Stain(0.9, brightness=0.7)):
        params = stain.draw(11)
        expected, _ = stain.apply(img, np.zeros((0, 4)), params)
        assert np.array_equal(hed_adjust(img, *params, brightness=stain.brightness, gamma=stain.gamma), expected)
        scale, shift = draw_stain(stain.strength, np.random.default_rng(11))
        assert np.array_equal(scale, params[0]) and np.array_equal(shift, params[1])


def test_stain_jitter_keeps_background_white_and_moves_stained_pixels() -> None:
    img = _tissue()
    jitter = PhotometricJitter(stain=0.3)
    white = img[0, 0]
    assert tuple(white) == (255, 255, 255)
    moved = []
    for seed in range(40):
        out = jitter(img, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8
        assert out[0, 0].min() >= 225  # shift <= 0.06 OD per stain: at most ~10% darker
        moved.append(np.abs(out[4:31, 4:28].astype(int) - img[4:31, 4:28]).mean())
    assert np.mean(moved) > 8 and min(moved) > 0.5, moved
    # the drawn factors lie in the documented ranges
    scale, shift = draw_stain(0.3, np.random.default_rng(0))
    assert np.all((scale >= 0.7) & (scale <= 1.3)) and np.all(np.abs(shift) <= 0.06)
    # more haematoxylin darkens the nuclei more than the eosin block
    darker = hed_adjust(img, np.array([1.5, 1.0, 1.0]), np.zeros(3))
    nuclei, cytoplasm = slice(4, 11), slice(13, 20)
    loss = (img.astype(int) - darker).sum(-1)
    assert loss[nuclei, 4:28].mean() > 3 * max(loss[cytoplasm, 4:28].mean(), 1)


def test_window_lut_values_and_monotonicity() -> None:
    lut = intensity_lut(25.5, 1.0, 1.0)  # level up by 10% of the range: everything 25.5 darker
    assert lut[0] == 0 and lut[100] == 74 and lut[255] == 230  # rint(74.5) = 74 (half to even)
    lut = intensity_lut(0.0, 2.0, 1.0)  # twice the width: half the contrast around mid-grey
    assert (lut[0], lut[128], lut[255]) == (64, 128, 191)
    lut = intensity_lut(0.0, 0.5, 1.0)  # half the width: twice the contrast, clipped
    assert (lut[0], lut[64], lut[100], lut[192], lut[255]) == (0, 0, 72, 255, 255)  # 72.5 -> 72
    rng = np.random.default_rng(0)
    for _ in range(200):
        lvl, width, g = rng.uniform(-127, 127), rng.uniform(0.05, 1.95), math.exp(rng.uniform(-1, 1))
        lut = intensity_lut(lvl, width, g).astype(int)
        assert lut.min() >= 0 and lut.max() <= 255 and np.all(np.diff(lut) >= 0)


def test_window_and_gamma_jitter_ranges() -> None:
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # 1x256 grey ramp
    mid = 128
    window = PhotometricJitter(window=0.2)
    lo_w, hi_w = (mid - 127.5 - 0.2 * 255) / 0.8 + 127.5, (mid - 127.5 + 0.2 * 255) / 0.8 + 127.5
    seen = []
    for seed in range(200):
        out = window(ramp, np.random.default_rng(seed))[0, :, 0].astype(int)
        assert np.all(np.diff(out) >= 0) and np.array_equal(out, window(ramp, np.random.default_rng(seed))[0, :, 0])
        assert lo_w - 1 <= out[mid] <= hi_w + 1
        seen.append(out[mid])
    assert min(seen) < mid - 25 and max(seen) > mid + 25  # both directions, most of the range
    gamma = PhotometricJitter(gamma=0.5)
    lo_g, hi_g = 255 * (mid / 255) ** 1.5, 255 * (mid / 255) ** (1 / 1.5)
    seen = []
    for seed in range(200):
        out = gamma(ramp, np.random.default_rng(seed))[0, :, 0].astype(int)
        assert np.all(np.diff(out) >= 0) and out[0] == 0 and out[255] == 255
        assert lo_g - 1 <= out[mid] <= hi_g + 1
        seen.append(out[mid])
    assert min(seen) < mid - 25 and max(seen) > mid + 25
    # grey stays grey: the intensity jitters act on every channel alike
    out = PhotometricJitter(window=0.3, gamma=0.3)(ramp, np.random.default_rng(3))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_determinism_for_a_seed_and_bad_strengths() -> None:
    img = _tissue()
    jitter = PhotometricJitter(stain=0.4, window=0.2, gamma=0.3)
    a, b = jitter(img, np.random.default_rng(9)), jitter(img, np.random.default_rng(9))
    assert np.array_equal(a, b) and not np.array_equal(a, jitter(img, np.random.default_rng(10)))
    # the stain draw does not depend on whether window / gamma are on
    only_stain = PhotometricJitter(stain=0.4)(img, np.random.default_rng(9))
    assert np.array_equal(PhotometricJitter(stain=0.4, window=0.0, gamma=0.0)(img, np.random.default_rng(9)),
                          only_stain)
    for bad in (dict(stain=1.0), dict(window=-0.1), dict(gamma=float("nan"))):
        with pytest.raises(ConfigError, match="must be in"):
            PhotometricJitter(**bad)
        with pytest.raises(pydantic.ValidationError):
            AugmentParams(**bad)
    with pytest.raises(ValueError, match="uint8"):
        PhotometricJitter(stain=0.1)(img.astype(np.float32), np.random.default_rng(0))
    assert PhotometricJitter.from_params(AugmentParams(stain=0.2, gamma=0.1)) == PhotometricJitter(0.2, 0.0, 0.1)
    assert PhotometricJitter.from_params({"stain": 0.2}) == PhotometricJitter(0.2)


# ---------------------------------------------------------------- Faster R-CNN


def _torchvision_sample() -> tuple[Any, dict[str, Any]]:
    from torchvision import tv_tensors

    img = torch.from_numpy(_tissue()).permute(2, 0, 1).contiguous()
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[4.0, 4.0, 28.0, 11.0]]), format="XYXY", canvas_size=(32, 32))
    return tv_tensors.Image(img), {"boxes": boxes, "labels": torch.tensor([1])}


def _torchvision_tp(**augment: Any) -> TrainParams:
    base = dict(fliplr=0.0, flipud=0.0, hsv=False, scale=0.0, mosaic=False)
    return TrainParams(family="torchvision", imgsz=32, augment=AugmentParams(**{**base, **augment}))


def test_torchvision_train_transforms_apply_the_jitter_and_val_does_not() -> None:
    from torchvision.transforms.v2.functional import to_dtype

    from pipeline.families.torchvision.data import Photometric, build_transforms

    image, target = _torchvision_sample()
    plain = to_dtype(image, torch.float32, scale=True)
    off_img, off_target = build_transforms(_torchvision_tp(), train=True)(image, target)
    assert torch.equal(off_img, plain) and torch.equal(off_target["boxes"], target["boxes"])
    assert not any(isinstance(t, Photometric) for t in build_transforms(TrainParams(), train=True).transforms)

    train = build_transforms(_torchvision_tp(stain=0.3, window=0.1, gamma=0.2), train=True)
    assert sum(isinstance(t, Photometric) for t in train.transforms) == 1
    torch.manual_seed(0)
    on_img, on_target = train(image, target)
    assert on_img.shape == plain.shape and (on_img - plain).abs().mean() > 0.02
    assert torch.equal(on_target["boxes"], target["boxes"]) and torch.equal(on_target["labels"], target["labels"])
    # the same as the numpy jitter under the seed torch hands it; and reproducible under torch's seed
    torch.manual_seed(0)
    seed = int(torch.randint(0, 2**63 - 1, (1,)).item())
    expected = PhotometricJitter(0.3, 0.1, 0.2)(_tissue(), np.random.default_rng(seed))
    assert torch.equal(on_img, to_dtype(torch.from_numpy(expected).permute(2, 0, 1), torch.float32, scale=True))
    torch.manual_seed(0)
    assert torch.equal(train(image, target)[0], on_img)
    assert not torch.equal(train(image, target)[0], on_img)  # a new draw per image

    val = build_transforms(_torchvision_tp(stain=0.3, window=0.1, gamma=0.2), train=False)
    assert torch.equal(val(image, target)[0], plain)


# ---------------------------------------------------------------- YOLO (Ultralytics)


class _FakeDataset:
    def __init__(self, img: np.ndarray) -> None:
        self.img = img

    def get_image_and_label(self, index: int) -> dict[str, Any]:
        return {"img": self.img.copy(), "cls": np.zeros((1, 1))}


def test_yolo_jitter_works_in_rgb_on_bgr_images_and_is_seeded_by_numpy() -> None:
    from pipeline.families.yolo.trainer import JitteredImages, jitter_train_dataset

    rgb = _tissue()
    ds = _FakeDataset(np.ascontiguousarray(rgb[..., ::-1]))  # Ultralytics holds BGR
    assert jitter_train_dataset(ds, AugmentParams().model_dump()) is ds and "get_image_and_label" not in vars(ds)
    jitter_train_dataset(ds, {"stain": 0.3, "gamma": 0.2})
    assert isinstance(ds.get_image_and_label, JitteredImages)
    np.random.seed(4)
    out = ds.get_image_and_label(0)["img"]
    np.random.seed(4)
    expected = PhotometricJitter(0.3, 0.0, 0.2)(rgb, np.random.default_rng(np.random.randint(0, 2**63 - 1,
                                                                                            dtype=np.int64)))
    assert out.flags.c_contiguous and np.array_equal(out, expected[..., ::-1])
    assert not np.array_equal(ds.get_image_and_label(0)["img"], out)  # a new draw per load
    clone = pickle.loads(pickle.dumps(ds))  # spawn-started workers get a pickled copy
    np.random.seed(4)
    assert np.array_equal(clone.get_image_and_label(0)["img"], out)


def _yolo_data(root: Path) -> Path:
    """A YOLO-format set of grey images (a light square on a dark field): any colour in them is the jitter's."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(4):
            img = np.full((64, 64, 3), 40 + 10 * i, np.uint8)
            img[10:40, 12:44] = 200
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("0 0.4375 0.390625 0.5 0.46875\n")
    (root / "dataset.yaml").write_text(yaml.safe_dump({"path": str(root), "train": "images/train",
                                                       "val": "images/val", "nc": 1, "names": {0: "x"}}))
    return root


def _channel_spread(img: torch.Tensor) -> float:
    """Mean |R - G| + |G - B| of a CHW image: 0 for a grey image."""
    f = img.float()
    return float(((f[0] - f[1]).abs() + (f[1] - f[2]).abs()).mean())


def test_yolo_trainer_jitters_the_train_dataset_only_through_close_mosaic_and_workers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ultralytics.nn.tasks import DetectionModel

    from pipeline.families.yolo.trainer import SPEC_ENV, JitteredImages, trainer_class

    root = _yolo_data(tmp_path / "data")
    params = load_params(None, ["train.augment.stain=0.5", "train.augment.hsv=false", "train.augment.scale=0"])
    spec = {"run_dir": str(tmp_path / "run"), "group_prefixes": {}, "params": params.model_dump(mode="json"),
            "strategy": "fine_tune", "unfreeze_at": [], "backbone_lr_mult": 1.0,
            "pretrained": {"source": None, "sha256": None}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    monkeypatch.setenv(SPEC_ENV, str(tmp_path / "spec.json"))
    trainer = trainer_class()(overrides=dict(
        model="yolov5n.yaml", data=str(root / "dataset.yaml"), imgsz=64, batch=2, workers=0, device="cpu",
        project=str(tmp_path / "runs"), name="r", exist_ok=True, mosaic=1.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0,
        scale=0.0, fliplr=0.0, plots=False, verbose=False, seed=0, deterministic=True))
    trainer.model = DetectionModel("yolov5n.yaml", nc=1, verbose=False)  # build_dataset reads the stride
    train = trainer.build_dataset(str(root / "images" / "train"), "train", 2)
    val = trainer.build_dataset(str(root / "images" / "val"), "val", 2)
    assert isinstance(train.get_image_and_label, JitteredImages)
    assert "get_image_and_label" not in vars(val)
    assert _channel_spread(val[0]["img"]) == 0.0
    assert _channel_spread(train[0]["img"]) > 5.0  # mosaic on: all four tiles come through the jitter

    def draw(seed: int) -> torch.Tensor:
        random.seed(seed)
        np.random.seed(seed)
        return train[1]["img"]

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))  # seeded by Ultralytics' RNGs

    train.close_mosaic(hyp=copy(trainer.args))  # what Ultralytics does for the last close_mosaic epochs
    assert isinstance(train.get_image_and_label, JitteredImages)
    assert _channel_spread(train[0]["img"]) > 5.0

    loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=1, collate_fn=train.collate_fn,
                                         multiprocessing_context="fork" if os.name == "posix" else None)
    batch = next(iter(loader))
    assert all(_channel_spread(im) > 5.0 for im in batch["img"])


def test_defaults_leave_the_yolo_train_dataset_alone() -> None:
    """Params() (the shipped params.yaml) turns every jitter off."""
    aug = Params().train.augment
    assert (aug.stain, aug.window, aug.gamma) == (0.0, 0.0, 0.0)
    assert not PhotometricJitter.from_params(aug).active
