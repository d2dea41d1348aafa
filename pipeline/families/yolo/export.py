"""ONNX export of a yolo checkpoint with Ultralytics' exporter (dynamic batch and size; optional onnxslim)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.families.yolo import YoloExport
from pipeline.ultralytics_env import import_ultralytics


def export_yolo(best: Path, work: Path, imgsz: int, settings: YoloExport) -> Path:
    """Ultralytics' exporter on a copy of the checkpoint (it writes next to its input, a DVC output)."""
    import_ultralytics()
    from ultralytics import YOLO

    copy = work / "best.pt"
    shutil.copy(best, copy)
    out = YOLO(str(copy)).export(format="onnx", dynamic=True, simplify=settings.simplify, opset=settings.opset,
                                 imgsz=imgsz, quantize="fp16" if settings.half else None,
                                 device="0" if settings.half else "cpu", verbose=False)
    return Path(out)
