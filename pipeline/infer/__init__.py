"""ONNX inference: the engine (``engine.py``: :class:`~pipeline.infer.engine.OnnxDetector`), the shared
pre/post-processing (``processing.py``) and batch inference (``batch.py``). Never imports torch. This package
imports none of its modules (the families' post-processing uses ``processing.py`` without loading the engine)."""
