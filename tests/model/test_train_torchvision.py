"""torchvision family, Faster R-CNN row: tiny real training runs on CPU (64 px images, the 320 MobileNet model,
1-3 epochs)."""

from __future__ import annotations

import csv
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import assets
from pipeline.config import AugmentParams, Params, TrainParams
from pipeline.errors import AssetError
from pipeline.evaluate.predict import TorchDetector
from pipeline.families.torchvision import train as torchvision_train
from pipeline.families.torchvision.build import build_model
from pipeline.families.torchvision.inference import load_checkpoint
from pipeline.families.torchvision.pretrained import resolve_torchvision_pretrained
from pipeline.families.torchvision.train import EpochEnd, train_torchvision

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
IMGSZ = 64


def _image(rng: np.random.Generator, boxes: list[list[int]]) -> np.ndarray:
    img = rng.integers(0, 40, size=(64, 64, 3), dtype=np.uint8)
    for x, y, w, h in boxes:
        img[y:y + h, x:x + w] = 230
    return img


def _split(root: Path, split: str, n: int, n_negative: int, rng: np.random.Generator) -> None:
    doc: dict[str, Any] = {"info": {}, "licenses": [], "images": [], "annotations": [],
                           "categories": [{"id": 1, "name": "nodule", "supercategory": "lesion"}]}
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for i in range(n):
        boxes = [] if i < n_negative else [[int(rng.integers(2, 30)), int(rng.integers(2, 30)),
                                            int(rng.integers(14, 30)), int(rng.integers(14, 30))]]
        name = f"images/{split}/{split}_{i}.png"
        Image.fromarray(_image(rng, boxes)).save(root / name)
        doc["images"].append({"id": i + 1, "file_name": name, "width": 64, "height": 64})
        for x, y, w, h in boxes:
            doc["annotations"].append({"id": ann_id, "image_id": i + 1, "category_id": 1,
                                       "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            ann_id += 1
    (root / "coco").mkdir(exist_ok=True)
    (root / "coco" / f"{split}.json").write_text(json.dumps(doc))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """One intra-op thread: on a small shared CPU, OpenMP threads fighting another process's make a step ~30x
    slower; these models are tiny anyway."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 train (1 negative) / 3 val (1 negative) / 2 test images, 64x64, one class: bright squares."""
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    _split(root, "train", 6, 1, rng)
    _split(root, "val", 3, 1, rng)
    _split(root, "test", 2, 0, rng)
    (root / "dataset.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val",
                                                       "test": "images/test", "nc": 1, "names": {0: "nodule"}}))
    (root / "prepare_info.json").write_text(json.dumps({"manifest_sha256": "ab" * 32, "classes": ["nodule"]}))
    return root


def _params(**train: Any) -> Params:
    base: dict[str, Any] = dict(family="torchvision", model=MODEL, pretrained="none", imgsz=IMGSZ, batch=2, epochs=1,
                                device="cpu", workers=0, lr=0.01, seed=0,
                                augment=AugmentParams(fliplr=0.5, flipud=0.0, hsv=True, scale=0.3, mosaic=True))
    base.update(train)
    return Params(train=TrainParams(**base))


def _run(tmp: Path, prepared: Path, params: Params, **kw: Any) -> Any:
    return train_torchvision(params, prepared, tmp / "models", tmp / "reports", tmp / "work", raw_dir=tmp / "raw",
                       mirrors=[], progress=False, **kw)


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dict of another model: 2 classes (so the box predictor mismatches), non-trivial BN statistics."""
    torch.manual_seed(123)
    model = build_model(MODEL, 3, IMGSZ)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("pretrained") / "other.pt"
    torch.save(model.state_dict(), path)
    return path


def _blocked_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline, whatever the machine: name resolution fails; an empty torch hub cache."""
    def no_dns(*a: Any, **k: Any) -> Any:
        raise socket.gaierror(-2, "Name or service not known (blocked by test)")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("DETFLOW_ASSETS", raising=False)


# --------------------------------------------------------------------------------------------------------------


def test_run_writes_outputs_and_checkpoint_predicts(tmp_path: Path, prepared: Path) -> None:
    res = _run(tmp_path, prepared, _params(epochs=2))
    assert res.family == "torchvision" and res.model == MODEL and res.epochs_run == 2 and not res.resumed
    for f in ("best.pt", "last.pt", "params.yaml"):
        assert (tmp_path / "models" / f).is_file()
    rep = tmp_path / "reports"
    transfer = json.loads((rep / "transfer.json").read_text())
    assert transfer["from_scratch"] and transfer["frozen_by_epoch"] == {"0": [], "1": []}
    assert set(transfer["group_parameters"]) == {"backbone", "neck", "head"}
    assert all(v > 0 for v in transfer["group_parameters"].values())
    assert any("mosaic" in n for n in transfer["notes"])
    assert (rep / "figures" / "training_curves.png").is_file()
    assert json.loads((rep / "metrics.json").read_text())["epochs"] == 2
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["family"] == "torchvision" and summary["epochs_run"] == 2
    assert {"val_map50", "val_map50_95", "best_val_map50"} <= set(summary["metrics"])
    rows = list(csv.DictReader(open(rep / "results.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train/loss", "metrics/mAP50(B)", "metrics/mAP50-95(B)", "lr"} <= set(rows[0])
    assert all(np.isfinite(float(r["train/loss"])) for r in rows)
    metrics_dir = rep / "live" / "plots" / "metrics"
    for name in ("train/loss.tsv", "val/mAP50.tsv", "val/mAP50-95.tsv", "lr.tsv"):
        lines = (metrics_dir / name).read_text().splitlines()
        assert len(lines) == 3, name  # header + one row per epoch

    model, meta = load_checkpoint(tmp_path / "models" / "best.pt")
    assert meta.classes == ["nodule"] and meta.model == MODEL and meta.imgsz == IMGSZ
    assert meta.family == "torchvision"
    assert torch.load(tmp_path / "models" / "best.pt", weights_only=True)["fingerprint"]
    img = np.asarray(Image.open(prepared / "images" / "val" / "val_2.png").convert("RGB"))
    (det,) = TorchDetector.load(tmp_path / "models" / "best.pt").predict([img], conf=0.0)  # the inference path
    assert det.boxes.shape[1:] == (4,) and len(det.scores) == len(det.labels) == len(det.boxes)
    assert (det.labels == 0).all()  # one class, 0-based
    if len(det.boxes):
        assert det.boxes.min() >= 0 and det.boxes.max() <= 64


def test_feature_extraction_keeps_backbone_bit_identical(tmp_path: Path, prepared: Path,
                                                         pretrained_file: Path) -> None:
    res = _run(tmp_path, prepared, _params(strategy="feature_extraction", pretrained=str(pretrained_file),
                                           epochs=2))
    src = torch.load(pretrained_file, weights_only=True)
    ckpt = torch.load(res.best, weights_only=True)
    body = [k for k in ckpt["model"] if k.startswith("backbone.body.")]
    assert any("running_mean" in k for k in body) and any(k.endswith(".weight") for k in body)
    for k in body:  # parameters and BN running statistics alike
        assert torch.equal(ckpt["model"][k], src[k]), k
    # the rest did train: the RPN head moved away from the pretrained values
    assert not torch.equal(ckpt["model"]["rpn.head.conv.0.0.weight"], src["rpn.head.conv.0.0.weight"])
    t = json.loads((tmp_path / "reports" / "transfer.json").read_text())
    assert t["tensors_transferred"] > 0 and not t["from_scratch"] and t["sha256"]
    mismatched = {s["key"] for s in t["skipped"] if s["reason"] == "shape_mismatch"}
    assert "roi_heads.box_predictor.cls_score.weight" in mismatched
    assert t["frozen_by_epoch"] == {"0": ["backbone"], "1": ["backbone"]}


def test_progressive_unfreezes_on_schedule(tmp_path: Path, prepared: Path, pretrained_file: Path) -> None:
    src = torch.load(pretrained_file, weights_only=True)
    seen: dict[int, dict[str, Any]] = {}

    def hook(e: EpochEnd) -> None:
        grads = {g: {p.requires_grad for n, p in e.model.named_parameters() if n.startswith(pfx)}
                 for g, pfx in (("backbone", "backbone.body."), ("neck", "rpn."), ("head", "roi_heads."))}
        sd = e.model.state_dict()
        seen[e.epoch] = {
            "frozen": e.frozen_groups, "grads": grads,
            "backbone_same": all(torch.equal(sd[k], src[k]) for k in sd if k.startswith("backbone.body.")),
            "neck_same": all(torch.equal(sd[k], src[k]) for k in sd if k.startswith(("backbone.fpn.", "rpn."))),
        }

    _run(tmp_path, prepared, _params(strategy="progressive", unfreeze_at=[1, 2], epochs=3,
                                     pretrained=str(pretrained_file)), on_epoch_end=hook)
    assert {e: s["frozen"] for e, s in seen.items()} == {0: ["backbone", "neck"], 1: ["backbone"], 2: []}
    assert seen[0]["grads"] == {"backbone": {False}, "neck": {False}, "head": {True}}
    assert seen[1]["grads"] == {"backbone": {False}, "neck": {True}, "head": {True}}
    assert seen[2]["grads"] == {"backbone": {True}, "neck": {True}, "head": {True}}
    assert seen[0]["backbone_same"] and seen[0]["neck_same"]
    assert seen[1]["backbone_same"] and not seen[1]["neck_same"]
    assert not seen[2]["backbone_same"]
    t = json.loads((tmp_path / "reports" / "transfer.json").read_text())
    assert t["frozen_by_epoch"] == {"0": ["backbone", "neck"], "1": ["backbone"], "2": []}


def test_backbone_lr_mult_sets_group_ratio(tmp_path: Path, prepared: Path, pretrained_file: Path) -> None:
    res = _run(tmp_path, prepared, _params(backbone_lr_mult=0.1, pretrained=str(pretrained_file)))
    groups = {g["name"]: g for g in torch.load(res.last, weights_only=True)["optimizer"]["param_groups"]}
    assert set(groups) == {"new", "pretrained"}
    assert groups["pretrained"]["initial_lr"] == pytest.approx(0.1 * groups["new"]["initial_lr"])
    assert groups["pretrained"]["lr"] == pytest.approx(0.1 * groups["new"]["lr"])
    model = build_model(MODEL, 2, IMGSZ)
    names = [n for n, _ in model.named_parameters()]
    # the mismatched box predictor is the only new part; everything else came from the file
    assert len(groups["new"]["params"]) == sum(n.startswith("roi_heads.box_predictor.") for n in names)
    assert len(groups["new"]["params"]) + len(groups["pretrained"]["params"]) == len(names)
    rows = list(csv.DictReader(open(tmp_path / "reports" / "results.csv")))
    assert float(rows[0]["lr_pretrained"]) == pytest.approx(0.1 * float(rows[0]["lr"]))


class _Interrupt(Exception):
    pass


def test_resume_continues_after_interruption(tmp_path: Path, prepared: Path, caplog: pytest.LogCaptureFixture,
                                             pretrained_file: Path) -> None:
    params = _params(epochs=3, strategy="progressive", unfreeze_at=[1, 2], pretrained=str(pretrained_file))

    def crash_after_epoch_1(e: EpochEnd) -> None:
        if e.epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        _run(tmp_path / "a", prepared, params, on_epoch_end=crash_after_epoch_1)
    assert not (tmp_path / "a" / "models").exists()
    epochs: list[int] = []
    with caplog.at_level(logging.WARNING, logger="pipeline.families.torchvision"):
        res = _run(tmp_path / "a", prepared, params, on_epoch_end=lambda e: epochs.append(e.epoch))
    assert epochs == [2]
    assert res.resumed and res.start_epoch == 2 and res.epochs_run == 3
    assert any("resuming" in r.getMessage() and "from epoch 2" in r.getMessage() for r in caplog.records)
    rows = list(csv.DictReader(open(tmp_path / "a" / "reports" / "results.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    lines = (tmp_path / "a" / "reports" / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().split()
    assert len([ln for ln in lines[1:] if ln]) > 0
    t = json.loads((tmp_path / "a" / "reports" / "transfer.json").read_text())
    assert t["frozen_by_epoch"] == {"0": ["backbone", "neck"], "1": ["backbone"], "2": []}
    assert t["tensors_transferred"] > 0

    # an uninterrupted run ends with the very same weights (per-epoch seeds, restored optimizer and schedule)
    ref = _run(tmp_path / "b", prepared, params)
    a = torch.load(res.last, weights_only=True)["model"]
    b = torch.load(ref.last, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a finished run is not resumed: the same params train again from epoch 0
    again = _run(tmp_path / "a", prepared, params, on_epoch_end=lambda e: None)
    assert not again.resumed and again.start_epoch == 0


def test_unreadable_last_checkpoint_starts_fresh(tmp_path: Path, prepared: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    params = _params(epochs=2)

    def crash(e: EpochEnd) -> None:
        raise _Interrupt

    with pytest.raises(_Interrupt):
        _run(tmp_path, prepared, params, on_epoch_end=crash)
    (last,) = (tmp_path / "work").glob("torchvision-*/last.pt")
    last.write_bytes(b"torn checkpoint")
    with caplog.at_level(logging.WARNING, logger="pipeline.families.torchvision"):
        res = _run(tmp_path, prepared, params)
    assert not res.resumed and res.start_epoch == 0 and res.epochs_run == 2
    assert any("unreadable checkpoint" in r.getMessage() for r in caplog.records)


def test_resume_never_starts_fresh(tmp_path: Path, prepared: Path) -> None:
    params = _params(epochs=2, resume="never")

    def crash(e: EpochEnd) -> None:
        raise _Interrupt

    with pytest.raises(_Interrupt):
        _run(tmp_path, prepared, params, on_epoch_end=crash)
    seen: list[int] = []
    res = _run(tmp_path, prepared, params, on_epoch_end=lambda e: seen.append(e.epoch))
    assert seen == [0, 1] and not res.resumed


def test_early_stopping(tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision_train, "evaluate_coco", lambda *a, **k: (0.0, 0.0))  # never improves after epoch 0
    res = _run(tmp_path, prepared, _params(epochs=5, patience=1))
    assert res.epochs_run == 2
    ckpt = torch.load(res.last, weights_only=True)
    assert ckpt["finished"] and ckpt["epoch"] == 1 and ckpt["best_epoch"] == 0


def test_coco_offline_without_mirror_fails_fast(tmp_path: Path, prepared: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _blocked_network(monkeypatch, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(AssetError,
                       match="(?s)pretrained is 'coco'.*fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"):
        _run(tmp_path, prepared, _params(pretrained="coco"))
    assert time.monotonic() - t0 < 15
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").glob("torchvision-*"))


def test_auto_offline_falls_back_to_scratch_loudly(tmp_path: Path, prepared: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _blocked_network(monkeypatch, tmp_path)
    res = _run(tmp_path, prepared, _params(pretrained="auto"))
    t = json.loads((tmp_path / "reports" / "transfer.json").read_text())
    assert t["from_scratch"] and "TRAINING FROM SCRATCH" in t["WARNING"]
    assert res.transfer["WARNING"] == t["WARNING"] and t["tensors_transferred"] == 0


def test_coco_mirror_file_is_verified_by_name_prefix(tmp_path: Path, pretrained_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """train.pretrained=coco goes through pipeline/assets.py (the resolver and mirror YOLO uses): a mirror copy is used
    only if its sha256 starts with the hex digits in torchvision's file name."""
    _blocked_network(monkeypatch, tmp_path)
    from pipeline.fileio import sha256_file

    real = assets.ASSETS[f"{MODEL}-coco"]
    name = f"{MODEL}-{sha256_file(pretrained_file)[:8]}.pth"  # a fake torchvision file whose hash we control
    fake = assets.Asset(real.name, "file", f"https://example.invalid/models/{name}", None, real.license,
                        f"weights/{name}", "test double", sha256_prefix=sha256_file(pretrained_file)[:8])
    monkeypatch.setitem(assets.ASSETS, real.name, fake)
    mirror = tmp_path / "mirror"
    (mirror / "weights").mkdir(parents=True)
    tp = _params(pretrained="coco").train

    (mirror / "weights" / name).write_bytes(b"not the checkpoint")
    with pytest.raises(AssetError, match="checksum mismatch: expected a sha256 starting with"):
        resolve_torchvision_pretrained(tp, tmp_path / "raw", [mirror])

    (mirror / "weights" / name).write_bytes(pretrained_file.read_bytes())
    src, state = resolve_torchvision_pretrained(tp, tmp_path / "raw", [mirror])
    assert src.kind == "coco" and src.path == str(mirror / "weights" / name)
    assert src.sha256 == sha256_file(pretrained_file) and state is not None and len(state) > 100
    listed = {row["name"]: row for row in assets.list_assets(tmp_path / "raw", [mirror])}[real.name]
    assert listed["available"] and listed["sha256_prefix"] == sha256_file(pretrained_file)[:8]


def test_wrong_pretrained_sha256_is_refused(tmp_path: Path, prepared: Path, pretrained_file: Path) -> None:
    with pytest.raises(AssetError, match="sha256 mismatch"):
        _run(tmp_path, prepared, _params(pretrained=str(pretrained_file), pretrained_sha256="0" * 64))
    from pipeline.fileio import sha256_file

    tp = _params(pretrained=str(pretrained_file), pretrained_sha256=sha256_file(pretrained_file).upper()).train
    src, state = resolve_torchvision_pretrained(tp, tmp_path, [])
    assert src.kind == "path" and state is not None
