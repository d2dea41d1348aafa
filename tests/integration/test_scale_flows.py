"""The flows on a Dask cluster through prefect-dask's DaskTaskRunner: the batch-inference flow in shards, and
training arms (one task per arm, a GPU arm routed to the worker that offers the GPU resource).

A real ``dask scheduler`` and two ``dask worker`` processes on loopback (tests/helpers/daskproc.py), started after a
temporary Prefect server (``prefect_test_harness``) so the workers report their task runs to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from helpers.daskproc import LoopbackCluster

from pipeline.errors import ConfigError

TINY_ARM = {"train.imgsz": 64, "train.batch": 8, "train.nominal_batch": 8, "train.workers": 0, "train.epochs": 1,
            "train.augment.mosaic": False, "train.pretrained": "none", "train.device": "cpu",
            "evaluate.bootstrap": 20, "evaluate.conf": 0.01, "evaluate.preview_images": 0,
            "gate.min_map50": 0, "gate.min_cpm": 0, "gate.min_sensitivity_at_1fp": 0, "gate.max_regression": None}


@pytest.fixture(scope="module")
def prefect_api() -> Any:
    from prefect.testing.utilities import prefect_test_harness

    from flows.cluster import prefect_api_url

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=180):
        yield prefect_api_url()


@pytest.fixture(scope="module")
def cluster(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A scheduler, a CPU worker and a worker offering one GPU resource (a label: this machine has no GPU)."""
    c = LoopbackCluster(tmp_path_factory.mktemp("flows-cluster"), env={"PREFECT_API_URL": prefect_api,
                                                                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    try:
        c.start()
        c.worker("cpu")
        c.worker("gpu", resources="GPU=1")
        workers = c.wait_workers(2)
        c.gpu_address = next(a for a, w in workers.items() if w.get("resources", {}).get("GPU"))
        yield c
    finally:
        c.stop()


def _task_runs(flow_run_id: Any) -> list[Any]:
    """The task runs of a flow run and of its subflow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(c.id for c in children)]
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200)


@pytest.mark.slow
def test_batch_inference_flow_in_shards_on_the_cluster(exported: dict[str, Path], cluster: LoopbackCluster,
                                                       tmp_path: Path) -> None:
    from flows.inference import batch_inference
    from pipeline.cli import run

    source, model = str(exported["phantom"]), str(exported["onnx"])
    assert run(["infer", source, "--model", model, "--out", str(tmp_path / "ref"), "--workers", "2", "--quiet"]) == 0
    state = batch_inference(source, model=model, out=str(tmp_path / "out"), cluster=cluster.address, shard_size=5,
                            return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["n_images"] == 24 and summary["n_shards"] == 5 and summary["computed"] == 5
    assert (tmp_path / "out" / "predictions.json").read_bytes() == (tmp_path / "ref" / "predictions.json").read_bytes()
    shards = [r for r in _task_runs(state.state_details.flow_run_id) if r.name.startswith("shard-")]
    assert len(shards) == 5 and all(r.state.is_completed() for r in shards)  # one Prefect task per shard
    docs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "shards").glob("0*.json")]
    assert {d["worker"]["address"] for d in docs} <= set(cluster.wait_workers(2))  # ran on the cluster's workers

    again = batch_inference(source, model=model, out=str(tmp_path / "out"), cluster=cluster.address, shard_size=5)
    assert again["computed"] == 0 and again["resumed"] == 5


def test_batch_inference_flow_with_an_unreachable_cluster(exported: dict[str, Path], prefect_api: str,
                                                          tmp_path: Path) -> None:
    from flows.inference import batch_inference

    state = batch_inference(str(exported["phantom"]), model=str(exported["onnx"]), out=str(tmp_path / "o"),
                            cluster="tcp://127.0.0.1:9", return_state=True)
    assert state.is_failed() and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in state.message


@pytest.mark.slow
def test_training_arms_run_as_tasks_and_the_gpu_arm_on_the_gpu_worker(exported: dict[str, Path],
                                                                       cluster: LoopbackCluster,
                                                                       tmp_path: Path) -> None:
    from flows.arms import Arm, run_arms
    from pipeline.fileio import sha256_file

    arms = [Arm("seed0", str(tmp_path / "seed0"), {**TINY_ARM, "train.seed": 0}),
            # no GPU on this machine: the arm asks for the GPU worker but trains on its CPU
            Arm("seed1", str(tmp_path / "seed1"), {**TINY_ARM, "train.seed": 1}, gpu=True)]
    summary = run_arms(arms, cluster.address, data=str(exported["prepared"]), params=None)
    assert summary["failed"] == [], summary["failed"]
    by_name = {a["arm"]: a for a in summary["arms"]}
    assert set(by_name) == {"seed0", "seed1"} and all(a["status"] == "completed" for a in by_name.values())
    assert by_name["seed1"]["dask_worker"] == cluster.gpu_address
    for name, seed in (("seed0", 0), ("seed1", 1)):
        work = tmp_path / name
        assert (work / "models" / "train" / "best.pt").is_file() and (work / "reports" / "metrics.json").is_file()
        assert json.loads((work / "reports" / "metrics.json").read_text())["map50"] == by_name[name]["metrics"]["map50"]
        assert f"seed: {seed}" in (work / "params.yaml").read_text()
        assert list((work / ".detflow" / "train").glob("yolo-*"))  # the arm's own resumable run state
    assert sha256_file(tmp_path / "seed0" / "models/train/best.pt") != sha256_file(tmp_path / "seed1" /
                                                                                   "models/train/best.pt")


def test_gpu_arms_without_gpu_workers_and_bad_arms_fail_before_any_work(exported: dict[str, Path], prefect_api: str,
                                                                         tmp_path: Path) -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.arms import Arm, run_arms

    with pytest.raises(ConfigError, match="ask for a GPU, which needs a Dask task runner"):
        run_arms([Arm("g", str(tmp_path / "g"), gpu=True)], ThreadPoolTaskRunner(max_workers=1),
                 data=str(exported["prepared"]), params=None)
    with pytest.raises(ConfigError, match="train.epochs"):
        run_arms([Arm("ok", str(tmp_path / "a")), Arm("bad", str(tmp_path / "b"), {"train.epochs": "many"})],
                 ThreadPoolTaskRunner(max_workers=1), data=str(exported["prepared"]), params=None)
    with pytest.raises(ConfigError, match="distinct workdirs"):
        run_arms([Arm("a", str(tmp_path / "x")), Arm("b", str(tmp_path / "x"))], None,
                 data=str(exported["prepared"]), params=None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "g").exists()
