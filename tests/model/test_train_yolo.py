"""YOLO training: transfer from the official COCO checkpoint, strategies, resume, and early param errors.

Runs are real but tiny: a 24-image phantom at 64 px, one to three epochs on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import load_params
from pipeline.data.prepare import prepare_dataset
from pipeline.errors import AssetError, ConfigError, DataError

TINY = ["train.imgsz=64", "train.batch=8", "train.nominal_batch=8", "train.workers=0", "train.augment.mosaic=false"]


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory, small_phantom: Path) -> Path:
    out = tmp_path_factory.mktemp("yolo-data")
    prepare_dataset(load_params(None, []), out / "prepared", out / "report.json", phantom_dir=small_phantom,
                    progress=False)
    return out / "prepared"


def _train(tmp_path: Path, prepared: Path, mirror: Path | None, *overrides: str):
    from pipeline.train.stage import train_model

    params = load_params(None, [*TINY, *overrides])
    return train_model(params, prepared, tmp_path / "models", tmp_path / "reports", tmp_path / "work",
                       mirrors=[mirror] if mirror else [], progress=False)


def _ema_state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt["model"]  # a finished run's checkpoint keeps the EMA under "model"
    return {k: v.float() for k, v in model.state_dict().items()}


@pytest.mark.realdata
def test_feature_extraction_keeps_backbone_bit_identical(tmp_path: Path, tiny_prepared: Path, mirror: Path) -> None:
    from pipeline.train.weights_import import load_yolov5_state_dict

    result = _train(tmp_path, tiny_prepared, mirror, "train.epochs=2", "train.strategy=feature_extraction",
                    "train.pretrained=coco")
    transfer = json.loads((tmp_path / "reports" / "transfer.json").read_text())
    assert transfer["tensors_transferred"] >= 300 and transfer["new_modules"] == ["model.24"]
    assert transfer["frozen_by_epoch"] == {"0": ["backbone"], "1": ["backbone"]}
    coco = load_yolov5_state_dict(mirror / "weights" / "yolov5n.pt",
                                  "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3")
    trained = _ema_state(result.best)
    backbone = [k for k in trained if k.split(".")[1].isdigit() and int(k.split(".")[1]) <= 9]
    assert len(backbone) > 100
    for k in backbone:
        assert torch.equal(trained[k], coco[k]), k
    neck = [k for k in trained if k.startswith("model.17.") and k.endswith("weight")]
    assert any(not torch.equal(trained[k], coco[k]) for k in neck), "the neck should have trained"


def test_progressive_flips_requires_grad_exactly_on_schedule(tmp_path: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel

    from pipeline.families.yolo.train import yolo_group_prefixes
    from pipeline.families.yolo.trainer import _apply_freeze_schedule

    model = DetectionModel("yolov5n.yaml", nc=1, verbose=False)
    trainer = SimpleNamespace(model=model, epoch=0, run_dir=tmp_path, prefixes=yolo_group_prefixes("yolov5n"),
                              detflow={"strategy": "progressive", "unfreeze_at": [2, 4]}, freeze_layer_names=[])

    def layer_trainable(epoch: int) -> dict[int, bool]:
        trainer.epoch = epoch
        _apply_freeze_schedule(trainer)
        out: dict[int, set[bool]] = {}
        for n, p in model.named_parameters():
            if ".dfl" not in n:
                out.setdefault(int(n.split(".")[1]), set()).add(p.requires_grad)
        assert all(len(v) == 1 for v in out.values())  # a layer is never half frozen
        return {k: v.pop() for k, v in out.items()}

    expected = {0: (False, False), 1: (False, False), 2: (False, True), 3: (False, True), 4: (True, True)}
    for epoch, (backbone, neck) in expected.items():
        flags = layer_trainable(epoch)
        assert all(flags[i] is backbone for i in range(0, 10) if i in flags), epoch
        assert all(flags[i] is neck for i in range(10, 24) if i in flags), epoch
        assert flags[24] is True
    history = json.loads((tmp_path / "frozen_by_epoch.json").read_text())
    assert history == {"0": ["backbone", "neck"], "1": ["backbone", "neck"], "2": ["backbone"], "3": ["backbone"],
                       "4": []}


@pytest.mark.realdata
def test_progressive_run_and_lr_groups(tmp_path: Path, tiny_prepared: Path, mirror: Path) -> None:
    _train(tmp_path, tiny_prepared, mirror, "train.epochs=3", "train.strategy=progressive",
           "train.unfreeze_at=[1,2]", "train.backbone_lr_mult=0.1", "train.optimizer=SGD", "train.lr=0.01")
    transfer = json.loads((tmp_path / "reports" / "transfer.json").read_text())
    assert transfer["frozen_by_epoch"] == {"0": ["backbone", "neck"], "1": ["backbone"], "2": []}
    last_pt = next((tmp_path / "work").glob("yolo-*/weights/last.pt"))
    last = torch.load(last_pt, map_location="cpu", weights_only=False)
    assert last["optimizer"] is None  # finished runs are stripped by Ultralytics: not resumable


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW", "Adam"])  # AdamW: Ultralytics' "auto" for small datasets
def test_lr_groups_split_pretrained_layers(tmp_path: Path, optimizer: str) -> None:
    from ultralytics.nn.tasks import DetectionModel

    from pipeline.families.yolo.trainer import DetflowDetectionTrainer

    model = DetectionModel("yolov5n.yaml", nc=1, verbose=False)
    pretrained = [n for n, _ in model.named_parameters() if int(n.split(".")[1]) < 24]
    trainer = DetflowDetectionTrainer.__new__(DetflowDetectionTrainer)
    trainer.detflow = {"backbone_lr_mult": 0.1, "transferred_params": pretrained}
    trainer.args = SimpleNamespace(nbs=64, batch=16)
    opt = DetflowDetectionTrainer.build_optimizer(trainer, model, name=optimizer, lr=0.01, momentum=0.9, decay=5e-4)
    assert type(opt).__name__ == optimizer
    owner = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        names = [owner[id(p)] for p in group["params"]]
        is_pre = {n in set(pretrained) for n in names}
        assert len(is_pre) == 1
        assert group["lr"] == pytest.approx(0.001 if is_pre.pop() else 0.01)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_cpu_threads_override_ultralytics_cores_minus_one() -> None:
    from pipeline.families.yolo.trainer import _set_cpu_threads

    before = torch.get_num_threads()
    try:
        for requested, expected in ((1, 1), (0, len(os.sched_getaffinity(0))), (3, 3)):
            torch.set_num_threads(7)
            trainer = SimpleNamespace(device=torch.device("cpu"),
                                      detflow={"params": {"train": {"cpu_threads": requested}}})
            _set_cpu_threads(trainer)
            assert torch.get_num_threads() == expected
        torch.set_num_threads(7)
        _set_cpu_threads(SimpleNamespace(device=torch.device("cuda", 0), detflow={}))  # GPU runs: untouched
        assert torch.get_num_threads() == 7
        with pytest.raises(Exception, match="cpu_threads"):
            load_params(None, ["train.cpu_threads=-1"])
    finally:
        torch.set_num_threads(before)


def test_wrong_sha256_refuses_before_training(tmp_path: Path, tiny_prepared: Path) -> None:
    fake = tmp_path / "weights.pt"
    torch.save({"model.0.conv.weight": torch.zeros(16, 3, 6, 6)}, fake)
    with pytest.raises(AssetError, match="sha256 mismatch"):
        _train(tmp_path, tiny_prepared, None, f"train.pretrained={fake}", "train.pretrained_sha256=" + "ab" * 32)
    assert not (tmp_path / "models").exists()


def test_pretrained_coco_strict_and_auto_fallback(tmp_path: Path, tiny_prepared: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DETFLOW_ASSETS", raising=False)
    from pipeline.families.yolo.pretrained import resolve_pretrained

    tp = load_params(None, ["train.pretrained=coco"]).train
    start = time.perf_counter()
    with pytest.raises(AssetError, match="train.pretrained is 'coco'"):
        resolve_pretrained(tp, tmp_path / "raw", [], trust=False)
    assert time.perf_counter() - start < 30
    source, state = resolve_pretrained(load_params(None, []).train, tmp_path / "raw", [], trust=False)
    assert source.kind == "none" and state is None and "TRAINING FROM SCRATCH" in source.note
    # one line that still says what was tried: the raw folder, no mirror, the download
    assert "\n" not in source.note and "Tried: " in source.note and "mirrors: none given" in source.note


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["train.family=yolo5"], "unknown model family 'yolo5'; expected one of: torchvision, yolo"),
        (["train.epochs=-1"], "train.epochs"),
        (["train.device=cuda"], "no CUDA GPU is available"),
        (["train.model=yolov9x"], "expected one of: yolov5n"),
        (["train.strategy=progressive", "train.unfreeze_at=[3,1]"], "strictly increasing"),
    ],
)
def test_bad_params_fail_before_any_work(tmp_path: Path, tiny_prepared: Path, overrides: list[str],
                                         pattern: str) -> None:
    if "train.device=cuda" in overrides and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {**os.environ, "DETFLOW_WORKDIR": str(tmp_path / "work")}
    args = [sys.executable, "-m", "pipeline.cli", "train", "--data", str(tiny_prepared), "--out",
            str(tmp_path / "m"), "--reports", str(tmp_path / "r")]
    for o in overrides:
        args += ["--set", o]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode in (1, 2), proc.stderr
    assert pattern in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "work").exists()
    assert time.perf_counter() - start < 60


def test_missing_dataset_fails_clearly(tmp_path: Path) -> None:
    from pipeline.train.stage import train_model

    with pytest.raises(DataError, match="run `detflow prepare`"):
        train_model(load_params(None, TINY), tmp_path / "nope", tmp_path / "m", tmp_path / "r", tmp_path / "w")
    with pytest.raises(ConfigError):
        load_params(None, ["train.family=torchvision", "train.model=yolov5n"])  # not a torchvision model


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path: Path, tiny_prepared: Path) -> None:
    """Kill -9 after the first epoch's checkpoint; the rerun continues from there, not from epoch 0.

    8 epochs, not 4: with every core training, 4 tiny epochs could finish between two polls (1 run in 4 failed).
    """
    env = {**os.environ, "DETFLOW_WORKDIR": str(tmp_path / "work"), "DETFLOW_NO_PROGRESS": "1"}
    args = [sys.executable, "-m", "pipeline.cli", "train", "--data", str(tiny_prepared), "--out",
            str(tmp_path / "m"), "--reports", str(tmp_path / "r"), "--quiet", "--set", "train.pretrained=none",
            "--set", "train.epochs=8"]
    for o in TINY:
        args += ["--set", o]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    last = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "work").glob("train/yolo-*/weights/last.pt"))
        if found:
            try:
                ckpt = torch.load(found[0], map_location="cpu", weights_only=False)
                if ckpt.get("epoch", -1) >= 1 and ckpt.get("optimizer") is not None:
                    last = found[0]
                    break
            except Exception:
                pass
        time.sleep(0.2)
    assert last is not None, "no checkpoint after epoch 2 within the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert not (tmp_path / "m" / "best.pt").exists()
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed at epoch {killed_at + 1}" in rerun.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["resumed"] is True and summary["start_epoch"] == killed_at + 1
    assert summary["epochs_run"] == 8  # results.csv carries the epochs before the kill too
