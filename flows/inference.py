"""Prefect flow for batch inference with a registered model (the champion by default)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline import registry


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model(model: str, registry_root: str) -> str:
    """``"champion"`` / ``"v<N>"`` -> that registered version's model.onnx; a path to an .onnx file as is."""
    if model.endswith(".onnx"):
        return model
    return str(registry.model_path(model, registry_root))


@task(name="batch-infer", cache_policy=NO_CACHE)
def infer(model_path: str, source: str, out: str) -> dict[str, Any]:
    """Run the ONNX engine over ``source``; bad inputs are listed in infer_errors.json, never abort the batch."""
    from pipeline.infer.batch import run_batch
    from pipeline.infer.engine import OnnxDetector, plan_workers

    workers, threads = plan_workers()
    summary = run_batch(OnnxDetector(model_path, threads=threads), Path(source), Path(out), progress=False,
                        workers=workers)
    return asdict(summary)


@flow(name="batch-inference", description="Detect with the champion (or a named registry version) over a folder, "
      "DICOM series, file list or COCO split")
def batch_inference(source: str, model: str = "champion", out: str = "predictions",
                    registry_root: str = str(registry.DEFAULT_ROOT)) -> dict[str, Any]:
    """Predictions for ``source`` written to ``out/predictions.json``; returns the batch summary and the model."""
    model_path = resolve_model(model, registry_root)
    summary = infer(model_path, source, out)
    return {**summary, "model": model_path, "predictions": str(Path(out) / "predictions.json")}


if __name__ == "__main__":
    import sys

    from flows.training import start_local_server

    start_local_server()
    print(json.dumps(batch_inference(*sys.argv[1:2]), indent=2))
