"""ONNX inference: the engine and the shared pre/post-processing. Importing this package never imports torch."""

from pipeline.infer.engine import ModelLoadError, OnnxDetector, ProviderError, StreamResult, plan_workers
from pipeline.infer.processing import Detections

__all__ = ["Detections", "ModelLoadError", "OnnxDetector", "ProviderError", "StreamResult", "plan_workers"]
