"""Shared fixtures. Tests shrink real runs; nothing downloads (a download attempt fails fast offline)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def mirror_root() -> Path | None:
    value = os.environ.get("DETFLOW_ASSETS", "")
    for part in value.split(os.pathsep):
        if part and Path(part).is_dir():
            return Path(part)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_mirror = pytest.mark.skip(reason="needs the asset mirror: set DETFLOW_ASSETS (CI sets ../shared)")
    cuda = None
    for item in items:
        if "realdata" in item.keywords and mirror_root() is None:
            item.add_marker(no_mirror)
        if "gpu" in item.keywords:
            if cuda is None:
                try:
                    import torch

                    cuda = torch.cuda.is_available()
                except ImportError:
                    cuda = False
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def mirror() -> Path:
    root = mirror_root()
    if root is None:
        pytest.skip("needs the asset mirror: set DETFLOW_ASSETS")
    return root


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-patient x 4-slice phantom, generated once per session."""
    from pipeline.config import PhantomParams
    from pipeline.data.phantom import generate_phantom

    out = tmp_path_factory.mktemp("phantom") / "phantom"
    generate_phantom(PhantomParams(patients=6, slices=4, seed=3), out, progress=False)
    return out


# Params for a tiny but real model: 2 epochs at 64 px from scratch, gates at 0 so export always runs.
TINY_EXPORT = ["train.imgsz=64", "train.batch=8", "train.nominal_batch=8", "train.workers=0",
               "train.augment.mosaic=false", "train.epochs=2", "train.pretrained=none", "evaluate.bootstrap=50",
               "gate.min_map50=0", "gate.min_cpm=0", "gate.min_sensitivity_at_1fp=0", "evaluate.conf=0.01"]


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, small_phantom: Path) -> dict[str, Path]:
    """phantom -> prepare -> train -> evaluate -> export, once per session; tests copy before they modify."""
    from pipeline.config import load_params
    from pipeline.data.prepare import prepare_dataset
    from pipeline.evaluate.stage import evaluate_model
    from pipeline.export import export_model
    from pipeline.train.stage import train_model

    root = tmp_path_factory.mktemp("exported")
    params = load_params(None, TINY_EXPORT)
    prepare_dataset(params, root / "prepared", root / "reports" / "data_validation.json", phantom_dir=small_phantom,
                    progress=False)
    result = train_model(params, root / "prepared", root / "models" / "train", root / "reports" / "train",
                         root / "work", mirrors=[], progress=False)
    evaluate_model(params, result.best, root / "prepared", root / "reports", progress=False)
    export_model(params, result.best, root / "prepared", root / "reports", root / "models")
    return {"root": root, "prepared": root / "prepared", "reports": root / "reports", "best": result.best,
            "onnx": root / "models" / "model.onnx", "card": root / "models" / "model_card.json",
            "phantom": small_phantom}


def write_tiny_yolo_onnx(path: Path, weight: Any = None, bias: Any = None) -> None:
    """A real YOLO-shaped ONNX graph (1x1 conv to 4 box + 1 class channels): with zero weights (the default) no
    detections, but it loads and runs like an export, so infer cases fail on their input and not on the model;
    ``weight`` (5, 3, 1, 1) and ``bias`` (5,) make its boxes follow the pixels."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.zeros((5, 3, 1, 1), np.float32) if weight is None else np.asarray(weight, np.float32)
    bias = np.zeros(5, np.float32) if bias is None else np.asarray(bias, np.float32)

    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w", "b"], ["feat"]),
         helper.make_node("Reshape", ["feat", "shape"], ["output0"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 5, "A"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
         numpy_helper.from_array(np.array([0, 5, -1], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
