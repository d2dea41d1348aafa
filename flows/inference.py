"""Prefect flow for batch inference with a registered model (the champion by default).

Without ``cluster`` the whole source is one task in the flow's process (the in-process engine, as ``detflow infer``).
With ``cluster`` (``local:N`` or ``tcp://HOST:PORT``, :func:`flows.cluster.task_runner_for`) the source is cut into
shards and each shard is one Prefect task on prefect-dask's ``DaskTaskRunner`` (subflow ``batch-inference-shards``):
the plan, the task body, the exactly-once shard files, the merge and the resume are ``pipeline/infer/shards.py``,
shared with ``detflow infer --cluster``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.cluster import task_runner_for
from pipeline import registry
from pipeline.infer.shards import FLOW_SHARD_SIZE, InferSettings, Shard


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


@task(name="infer-shard", task_run_name="shard-{shard.id}", cache_policy=NO_CACHE)
def infer_shard(shard: Shard, settings: InferSettings, out: str) -> dict[str, Any]:
    """One shard on a Dask worker: its predictions written to ``out/shards/<id>.json`` (see pipeline/infer/shards.py).
    No retries here: a worker that dies is replaced by Dask itself, which runs the shard again elsewhere."""
    from pipeline.infer.shards import run_shard

    return run_shard(shard, settings, out)


@flow(name="batch-inference-shards", description="Batch inference cut into shards, one task per shard on the flow's "
      "task runner (a Dask cluster)")
def sharded_inference(model_path: str, source: str, out: str, shard_size: int = FLOW_SHARD_SIZE) -> dict[str, Any]:
    """Plan the shards, run the unfinished ones as tasks, merge: the same outputs as in process, resumable."""
    from pipeline.infer.batch import collect_sources
    from pipeline.infer.engine import OnnxDetector
    from pipeline.infer.shards import ShardsFailed, merge_shards, plan_shards, prepare_out, settings_for

    items = collect_sources(Path(source))
    settings = settings_for(Path(model_path))
    detector = OnnxDetector(model_path, providers="CPUExecutionProvider", threads=1)
    shards = plan_shards(items, shard_size, settings, Path(source))
    done = prepare_out(Path(out), shards, settings, source)
    todo = [s for s in shards if s.id not in done]
    futures = [infer_shard.submit(s, settings, str(Path(out).resolve())) for s in todo]
    failed = []
    for s, fut in zip(todo, futures, strict=True):
        fut.wait()
        if not fut.state.is_completed():  # the other shards still finish: their files are kept for a rerun
            error = fut.result(raise_on_failure=False)
            failed.append(f"{s.id}: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}")
    if failed:
        raise ShardsFailed(f"{len(failed)} of {len(shards)} shards failed (first: {failed[0]}); the finished ones are "
                           f"kept in {Path(out) / 'shards'}: rerun to compute only the rest")
    summary = merge_shards(detector, Path(out), shards, settings, shift_source=source)
    return {**asdict(summary), "n_shards": len(shards), "resumed": len(done), "computed": len(todo)}


@flow(name="batch-inference", description="Detect with the champion (or a named registry version) over a folder, "
      "DICOM series, file list or COCO split; in process, or in shards on a Dask cluster")
def batch_inference(source: str, model: str = "champion", out: str = "predictions",
                    registry_root: str = str(registry.DEFAULT_ROOT), cluster: str | None = None,
                    shard_size: int = FLOW_SHARD_SIZE) -> dict[str, Any]:
    """Predictions for ``source`` written to ``out/predictions.json``; returns the batch summary and the model.

    ``cluster``: ``local:N`` or ``tcp://HOST:PORT`` runs the shards (``shard_size`` inputs each; large, because a
    Prefect task costs far more than a Dask task: see FLOW_SHARD_SIZE) as tasks on a ``DaskTaskRunner`` there; None
    (default) runs in this process as before.
    """
    model_path = resolve_model(model, registry_root)
    if cluster is None:
        summary = infer(model_path, source, out)
    else:
        runner = task_runner_for(cluster)
        summary = sharded_inference.with_options(task_runner=runner)(model_path, source, out, shard_size)
    return {**summary, "model": model_path, "predictions": str(Path(out) / "predictions.json")}


if __name__ == "__main__":
    import sys

    from flows.training import start_local_server

    start_local_server()
    print(json.dumps(batch_inference(*sys.argv[1:2]), indent=2))
