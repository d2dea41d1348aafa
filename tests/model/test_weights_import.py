"""Tests for pipeline.train.weights_import: restricted unpickling, checksum gate, transfer by name+shape."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import AssetError
from pipeline.fileio import sha256_file
from pipeline.train import weights_import as wi
from pipeline.train.weights_import import (
    TransferReport,
    UnsafeCheckpointError,
    load_yolov5_state_dict,
    transfer_state_dict,
)

YOLOV5N_SHA256 = "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3"
WRONG_SHA256 = "0" * 64


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _mirror_yolov5n() -> Path:
    root = os.environ.get("DETFLOW_ASSETS")
    if not root:
        pytest.skip("DETFLOW_ASSETS is not set (asset mirror root)")
    path = Path(root) / "weights" / "yolov5n.pt"
    if not path.is_file():
        pytest.skip(f"{path} not found in the asset mirror")
    return path


@pytest.fixture(scope="module")
def yolov5n_path() -> Path:
    return _mirror_yolov5n()


@pytest.fixture(scope="module")
def yolov5n_sd(yolov5n_path: Path) -> dict[str, torch.Tensor]:
    return load_yolov5_state_dict(yolov5n_path, YOLOV5N_SHA256)


class _Spy:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise AssertionError("the checkpoint must not be unpickled")


def _spy_on_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[_Spy]:
    spies = [_Spy(), _Spy(), _Spy()]
    monkeypatch.setattr(wi, "restricted_torch_load", spies[0])
    monkeypatch.setattr(torch, "load", spies[1])
    monkeypatch.setattr(wi.RestrictedUnpickler, "load", spies[2])
    return spies


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


@pytest.fixture
def fake_yolov5_module(monkeypatch: pytest.MonkeyPatch) -> type[nn.Module]:
    """A class living in a fake ``models.fakeyolo`` module, like the YOLOv5 repository's classes."""
    pkg = types.ModuleType("models")
    pkg.__path__ = []  # type: ignore[attr-defined]
    mod = types.ModuleType("models.fakeyolo")
    net_cls = type("Net", (_TinyNet,), {"__module__": "models.fakeyolo"})
    net_cls.__qualname__ = "Net"
    mod.Net = net_cls  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "models", pkg)
    monkeypatch.setitem(sys.modules, "models.fakeyolo", mod)
    return net_cls


class _Evil:
    """Unpickling this runs a shell command - what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------------------
# synthetic tests (no asset mirror needed)
# --------------------------------------------------------------------------------------------------


def test_transfer_counts_and_skip_reasons() -> None:
    class Target(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3).double()
            self.b = nn.Linear(3, 5)
            self.c = nn.BatchNorm1d(5)

    target = Target()
    before_b = target.b.weight.detach().clone()
    src = {
        "a.weight": torch.arange(12, dtype=torch.float16).reshape(3, 4),
        "a.bias": torch.tensor([1.0, 2.0, 3.0]),
        "b.weight": torch.zeros(2, 3),  # target is (5, 3)
        "ghost.weight": torch.zeros(7),  # not in the target
    }
    report = transfer_state_dict(target, src, "synthetic", None)

    assert isinstance(report, TransferReport)
    assert report.tensors_transferred == 2
    assert report.tensors_total == 9  # a.{w,b} b.{w,b} c.{w,b,running_mean,running_var,num_batches_tracked}
    assert report.params_transferred == 12 + 3
    assert report.params_total == (12 + 3) + (15 + 5) + (5 + 5)
    assert report.new_modules == ["b", "c"]
    by_key = {s["key"]: s for s in report.skipped}
    assert set(by_key) == {"b.weight", "ghost.weight"}
    assert by_key["b.weight"]["reason"] == "shape_mismatch"
    assert by_key["b.weight"]["source_shape"] == [2, 3]
    assert by_key["b.weight"]["target_shape"] == [5, 3]
    assert by_key["ghost.weight"]["reason"] == "missing_in_target"

    # copied in place, target dtype kept, still a trainable leaf, untouched tensors unchanged
    assert target.a.weight.dtype == torch.float64
    assert torch.equal(target.a.weight, src["a.weight"].double())
    assert torch.equal(target.a.bias, src["a.bias"].double())
    assert target.a.weight.requires_grad and target.a.weight.is_leaf and target.a.weight.grad_fn is None
    assert torch.equal(target.b.weight, before_b)

    d = report.to_dict()
    assert d["source"] == "synthetic" and d["sha256"] is None and d["tensors_transferred"] == 2
    assert isinstance(d["skipped"], list) and isinstance(d["new_modules"], list)


def test_transfer_units_descend_into_containers() -> None:
    target = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    src = {"0.weight": torch.ones(2, 2), "0.bias": torch.ones(2)}
    report = transfer_state_dict(target, src, "s", None)
    assert report.new_modules == ["1.0", "1.1"]
    assert report.skipped == []


def test_load_standin_classes_fp16_and_ema_preference(
    tmp_path: Path, fake_yolov5_module: type[nn.Module]
) -> None:
    model, ema = fake_yolov5_module().half(), fake_yolov5_module().half()
    ckpt = tmp_path / "fake.pt"
    torch.save({"epoch": -1, "model": model, "ema": ema, "optimizer": None}, ckpt)
    sha = sha256_file(ckpt)

    sd = load_yolov5_state_dict(ckpt, sha)
    assert set(sd) == set(ema.state_dict())
    assert sd["conv.weight"].dtype == torch.float32
    assert sd["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(sd["conv.weight"], ema.conv.weight.float())  # 'ema' preferred when not None
    assert not torch.equal(sd["conv.weight"], model.conv.weight.float())

    torch.save({"model": model, "ema": None}, ckpt)
    sd = load_yolov5_state_dict(ckpt, sha256_file(ckpt))
    assert torch.equal(sd["conv.weight"], model.conv.weight.float())  # falls back to 'model'


def test_wrong_sha_refused_without_unpickling_synthetic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "w.pt"
    torch.save({"model": _TinyNet()}, ckpt)
    actual = sha256_file(ckpt)
    spies = _spy_on_unpickling(monkeypatch)
    with pytest.raises(AssetError) as ei:
        load_yolov5_state_dict(ckpt, WRONG_SHA256)
    msg = str(ei.value)
    assert WRONG_SHA256 in msg and actual in msg and "--trust" in msg
    assert not isinstance(ei.value, UnsafeCheckpointError)
    assert [s.calls for s in spies] == [0, 0, 0]


def test_no_pinned_sha_refused_unless_trusted(tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pt"
    torch.save({"model": _TinyNet().state_dict()}, ckpt)  # a plain state dict is accepted too
    with pytest.raises(AssetError, match="no expected sha256"):
        load_yolov5_state_dict(ckpt, None)
    assert "conv.weight" in load_yolov5_state_dict(ckpt, None, trust=True)


def test_unknown_class_outside_standin_packages_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pt"
    torch.save({"model": _TinyNet()}, ckpt)  # test_weights_import._TinyNet: neither torch nor models.*
    with pytest.raises(UnsafeCheckpointError, match="_TinyNet"):
        load_yolov5_state_dict(ckpt, sha256_file(ckpt))


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="not found"):
        load_yolov5_state_dict(tmp_path / "nope.pt", WRONG_SHA256)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(AssetError, match="could not read"):
        load_yolov5_state_dict(bad, sha256_file(bad))


@pytest.mark.parametrize("trust", [False, True])
def test_malicious_pickle_refused_even_with_trust(tmp_path: Path, trust: bool) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"model": _Evil(marker)}, ckpt)
    # the right checksum does not help: the allow-list always applies
    expected = WRONG_SHA256 if trust else sha256_file(ckpt)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system"):
        load_yolov5_state_dict(ckpt, expected, trust=trust)
    assert not marker.exists(), "the payload ran"
    assert issubclass(UnsafeCheckpointError, AssetError)
    if not trust:
        # control: the payload is live - an unrestricted load runs it (a harmless touch in tmp_path)
        torch.load(ckpt, weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        (eval, ("1+1",)),
        (getattr, (object, "__subclasses__")),
        (torch.save, ({}, "/tmp/detflow-should-not-exist.pt")),  # torch namespace is not allowed wholesale
        (torch.hub.load, ("owner/repo", "model")),
    ],
    ids=["eval", "getattr", "torch.save", "torch.hub.load"],
)
def test_other_dangerous_globals_refused(tmp_path: Path, payload: tuple) -> None:
    class Bad:
        def __reduce__(self):
            return payload

    ckpt = tmp_path / "bad.pt"
    torch.save({"model": Bad()}, ckpt)
    with pytest.raises(UnsafeCheckpointError):
        load_yolov5_state_dict(ckpt, None, trust=True)


def test_dotted_qualname_refused() -> None:
    # protocol 4 can name attributes by a dotted path, e.g. an allowed class's method
    data = pickle.dumps(nn.Conv2d.forward, protocol=4)
    with pytest.raises(UnsafeCheckpointError):
        wi.RestrictedUnpickler(io.BytesIO(data)).load()


def test_allowed_plain_objects_roundtrip() -> None:
    import collections

    obj = collections.OrderedDict(a={1, 2}, b=slice(1, 3), c=frozenset({3}), d=[1.5, "x", None])
    out = wi.RestrictedUnpickler(io.BytesIO(pickle.dumps(obj, protocol=2))).load()
    assert out == obj


def test_plain_pickled_tensor_refused() -> None:
    # pickle.dumps(tensor) (not torch.save) goes through torch.storage._load_from_bytes, a nested
    # unrestricted torch.load: it must not be on the allow-list.
    with pytest.raises(UnsafeCheckpointError, match="_load_from_bytes"):
        wi.RestrictedUnpickler(io.BytesIO(pickle.dumps(torch.ones(2)))).load()


# --------------------------------------------------------------------------------------------------
# the real YOLOv5n v6.1 checkpoint from the asset mirror
# --------------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_load_real_checkpoint(yolov5n_path: Path, yolov5n_sd: dict[str, torch.Tensor]) -> None:
    sd = yolov5n_sd
    assert len(sd) == 349
    assert "model.0.conv.weight" in sd and "model.24.anchors" in sd
    assert sd["model.0.conv.weight"].shape == (16, 3, 6, 6)
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    # the file is FP16: every value is exactly representable in half precision
    w = sd["model.23.cv3.conv.weight"]
    assert torch.equal(w.half().float(), w)
    assert sum(v.numel() for k, v in sd.items() if not k.startswith("model.24.")) == 1_766_713


@pytest.mark.realdata
def test_transfer_real_checkpoint_into_ultralytics_yolov5n(yolov5n_sd: dict[str, torch.Tensor]) -> None:
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    model = tasks.DetectionModel("yolov5n.yaml", nc=3, verbose=False)
    report = transfer_state_dict(model, yolov5n_sd, "yolov5n.pt", YOLOV5N_SHA256)

    assert report.tensors_transferred >= 300
    assert report.tensors_transferred == 342
    assert report.params_transferred == 1_757_152  # ~1.76 M learnable parameters, layers 0-23
    assert report.new_modules == ["model.24"]
    assert {s["key"] for s in report.skipped} == {k for k in yolov5n_sd if k.startswith("model.24.")}
    assert all(s["reason"] == "missing_in_target" for s in report.skipped)
    assert report.tensors_total == len(model.state_dict())
    assert report.params_total == sum(p.numel() for p in model.parameters())

    target = model.state_dict()
    transferred = [k for k in yolov5n_sd if not k.startswith("model.24.")]
    assert len(transferred) == 342
    for k in transferred:
        assert target[k].dtype == (torch.float32 if yolov5n_sd[k].is_floating_point() else torch.int64)
        assert torch.equal(target[k].to(yolov5n_sd[k].dtype), yolov5n_sd[k]), k

    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    first = out[0] if isinstance(out, (tuple, list)) else out
    assert first.shape[:2] == (1, 4 + 3)


@pytest.mark.realdata
def test_real_wrong_sha_refused_without_unpickling(
    yolov5n_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spies = _spy_on_unpickling(monkeypatch)
    with pytest.raises(AssetError) as ei:
        load_yolov5_state_dict(yolov5n_path, WRONG_SHA256)
    assert YOLOV5N_SHA256 in str(ei.value) and WRONG_SHA256 in str(ei.value)
    assert "--trust" in str(ei.value)
    assert [s.calls for s in spies] == [0, 0, 0]


@pytest.mark.realdata
def test_real_wrong_sha_loads_with_trust(yolov5n_path: Path, yolov5n_sd: dict[str, torch.Tensor]) -> None:
    sd = load_yolov5_state_dict(yolov5n_path, WRONG_SHA256, trust=True)
    assert sd.keys() == yolov5n_sd.keys()
    assert all(torch.equal(sd[k], yolov5n_sd[k]) for k in sd)
