"""Builders the tests share (import them: ``from helpers import REPO, write_tiny_yolo_onnx``); fixtures live in
``tests/conftest.py``. ``tests/`` is on the import path through pytest's ``pythonpath`` setting (pyproject.toml)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def mirror_root() -> Path | None:
    value = os.environ.get("DETFLOW_ASSETS", "")
    for part in value.split(os.pathsep):
        if part and Path(part).is_dir():
            return Path(part)
    return None


# Params for a tiny but real model: 2 epochs at 64 px from scratch, gates at 0 so export always runs.
TINY_EXPORT = ["train.imgsz=64", "train.batch=8", "train.nominal_batch=8", "train.workers=0",
               "train.augment.mosaic=false", "train.epochs=2", "train.pretrained=none", "evaluate.bootstrap=50",
               "gate.min_map50=0", "gate.min_cpm=0", "gate.min_sensitivity_at_1fp=0", "evaluate.conf=0.01"]


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
