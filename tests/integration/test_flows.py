"""Prefect flows: the training pipeline (per-stage DVC tasks, skip on re-run, gate, retries, promotion), batch
inference, DVC remote across clones, and a prefect.yaml deployment served by a process worker.

Flow runs happen in a temporary copy of the repository (git init + the working tree's files), with tiny params, so
the real workspace is never touched. Prefect runs against a temporary server (``prefect_test_harness``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO

from pipeline.errors import AssetError, ConfigError

BIN = Path(sys.executable).parent

# 6 patients x 4 slices at 128 px, 1 epoch at 64 px from scratch, 20 bootstrap resamples, gates at 0.
TINY: dict[str, Any] = {
    "phantom.patients": 6, "phantom.slices": 4, "phantom.size": 128,
    "train.imgsz": 64, "train.batch": 8, "train.nominal_batch": 8, "train.workers": 0, "train.epochs": 1,
    "train.augment.mosaic": False, "train.pretrained": "none", "train.device": "cpu",
    "evaluate.bootstrap": 20, "evaluate.conf": 0.01, "evaluate.preview_images": 2,
    "gate.min_map50": 0, "gate.min_cpm": 0, "gate.min_sensitivity_at_1fp": 0, "gate.max_regression": None,
}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=detflow-test", "-c", "user.email=test@detflow.invalid", *args],
                          cwd=repo, check=True, capture_output=True, text=True).stdout


def copy_repo(dest: Path) -> Path:
    """The working tree's tracked and untracked-but-not-ignored files, in a fresh git repository (one commit)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         check=True, capture_output=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = REPO / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-qm", "test copy")
    return dest


def _sha(path: Path) -> str:
    from pipeline.fileio import sha256_file

    return sha256_file(path)


def _task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)


# --- fast unit tests of the flow's helpers ---------------------------------------------------------------------


def test_override_list_and_needed_assets() -> None:
    from flows.training import override_list
    from pipeline.config import load_params
    from pipeline.config import named_assets as needed_assets

    items = override_list({"train.epochs": 3, "train.pretrained": "none", "data.classes": ["a", "b"],
                           "gate.max_regression": None, "train.augment.mosaic": False})
    p = load_params(REPO / "params.yaml", items)
    assert p.train.epochs == 3 and p.train.pretrained == "none" and p.data.classes == ["a", "b"]
    assert p.gate.max_regression is None and p.train.augment.mosaic is False
    assert override_list(["train.epochs=2"]) == ["train.epochs=2"] and override_list(None) == []

    assert needed_assets(load_params(REPO / "params.yaml", ["train.pretrained=none"])) == []
    assert needed_assets(load_params(REPO / "params.yaml", ["data.source=bccd", "train.pretrained=coco"])) == [
        ("bccd", True), ("yolov5n-coco", True)]
    assert needed_assets(load_params(REPO / "params.yaml", ["train.pretrained=auto"])) == [("yolov5n-coco", False)]
    # unpinned checkpoints (yolo11n, torchvision's: only a published sha256 prefix) are left to the train stage
    assert needed_assets(load_params(REPO / "params.yaml", ["train.model=yolo11n", "train.pretrained=coco"])) == []
    assert needed_assets(load_params(REPO / "params.yaml", ["train.family=torchvision"])) == []


def test_stage_status_from_dvc_output() -> None:
    from flows.training import stage_status

    assert stage_status("train", "Running stage 'train':\n> detflow train ...\nUpdating lock file 'dvc.lock'") == "ran"
    assert stage_status("train", "Stage 'train' didn't change, skipping\nData and pipelines are up to date.") == \
        "skipped"
    assert stage_status("train", "Stage 'train' is cached - skipping run, checking out outputs") == "restored"


def test_temporary_params_validates_writes_and_restores(tmp_path: Path) -> None:
    from flows.training import PARAMS_BACKUP, temporary_params

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    original = (tmp_path / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match="train.epochz: unknown key"):
        with temporary_params(tmp_path, ["train.epochz=3"]):
            pass
    assert (tmp_path / "params.yaml").read_bytes() == original and not (tmp_path / PARAMS_BACKUP).exists()

    with pytest.raises(RuntimeError, match="stage blew up"):
        with temporary_params(tmp_path, ["train.epochs=3", "phantom.patients=5"]) as params:
            assert params.train.epochs == 3
            written = yaml.safe_load((tmp_path / "params.yaml").read_text())
            assert written["train"]["epochs"] == 3 and written["phantom"]["patients"] == 5
            assert written["train"]["imgsz"] == yaml.safe_load(original)["train"]["imgsz"]  # the rest unchanged
            assert (tmp_path / PARAMS_BACKUP).read_bytes() == original
            raise RuntimeError("stage blew up")
    assert (tmp_path / "params.yaml").read_bytes() == original and not (tmp_path / PARAMS_BACKUP).exists()

    # a run killed inside the block leaves the backup; the next run restores params.yaml from it first
    (tmp_path / PARAMS_BACKUP).write_bytes(original)
    (tmp_path / "params.yaml").write_text("train: {epochs: 99}\n")
    with temporary_params(tmp_path, []) as params:
        assert params.train.epochs == yaml.safe_load(original)["train"]["epochs"]
    assert (tmp_path / "params.yaml").read_bytes() == original and not (tmp_path / PARAMS_BACKUP).exists()


# --- flows on a temporary Prefect server -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_server() -> Any:
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_invalid_override_fails_before_any_work(tmp_path: Path, prefect_server: Any) -> None:
    from flows.training import training_pipeline

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_bytes()
    state = training_pipeline(overrides={"train.epochs": "many"}, repo=str(tmp_path), return_state=True)
    assert state.is_failed() and "train.epochs" in state.message
    assert (tmp_path / "params.yaml").read_bytes() == before
    assert _task_runs(state.state_details.flow_run_id) == []  # not a single task started


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prefect_server: Any) -> dict[str, Any]:
    """One full training flow run in a fresh copy of the repository."""
    from flows.training import training_pipeline

    repo = copy_repo(tmp_path_factory.mktemp("flowrepo"))
    params_before = (repo / "params.yaml").read_bytes()
    t0 = time.perf_counter()
    state = training_pipeline(overrides=TINY, repo=str(repo), return_state=True)
    seconds = time.perf_counter() - t0
    assert state.is_completed(), state.message
    return {"repo": repo, "state": state, "summary": state.result(), "seconds": seconds,
            "params_before": params_before}


@pytest.mark.slow
def test_training_flow_runs_every_stage_as_a_task_and_promotes(trained: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.training import PARAMS_BACKUP, REPORT_KEY
    from pipeline.lineage import stage_order

    STAGES = stage_order(REPO / "dvc.yaml")
    from pipeline import registry

    repo, summary = trained["repo"], trained["summary"]
    print(f"first run: {trained['seconds']:.1f} s; " + ", ".join(
        f"{s} {v['status']} {v['seconds']} s" for s, v in summary["stages"].items()))
    assert {s: v["status"] for s, v in summary["stages"].items()} == dict.fromkeys(STAGES, "ran")
    runs = _task_runs(trained["state"].state_details.flow_run_id)
    stage_runs = [r for r in runs if r.name.startswith("stage-")]
    assert [r.name for r in stage_runs] == [f"stage-{s}" for s in STAGES]  # one task run each, in DAG order
    assert all(r.state.is_completed() for r in runs)
    assert [r.name.rsplit("-", 1)[0] for r in runs[-2:]] == ["report", "register-promote"]
    # promoted: champion.json points at v1, whose model is the exported one
    champ = registry.champion(repo / "models" / "registry")
    assert summary["champion"] == champ["version"] == "v1" and summary["promoted"] is True
    assert champ["sha256"] == _sha(repo / "models" / "model.onnx") == _sha(repo / "models/registry/v1/model.onnx")
    assert champ["metrics"]["map50"] == json.loads((repo / "reports" / "metrics.json").read_text())["map50"]
    manifest = registry.get_version("v1", repo / "models" / "registry")
    assert manifest["git_commit"] == _git(repo, "rev-parse", "HEAD").strip()
    # the markdown report artifact
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[REPORT_KEY])))
    assert arts and arts[0].type == "markdown"
    assert "## Gate" in arts[0].data and "## PyTorch / ONNX parity" in arts[0].data
    # params.yaml restored byte for byte; the overrides are what dvc.lock recorded
    assert (repo / "params.yaml").read_bytes() == trained["params_before"] and not (repo / PARAMS_BACKUP).exists()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == TINY["train.epochs"]


@pytest.mark.slow
def test_second_run_skips_every_stage_quickly(trained: dict[str, Any]) -> None:
    from flows.training import stages, training_pipeline

    repo = trained["repo"]
    champion_before = (repo / "models/registry/champion.json").read_bytes()
    lock_before = (repo / "dvc.lock").read_bytes()
    t0 = time.perf_counter()
    summary = training_pipeline(overrides=TINY, repo=str(repo))
    seconds = time.perf_counter() - t0
    print(f"second run: {seconds:.1f} s; " + ", ".join(f"{s} {v['seconds']} s" for s, v in summary["stages"].items()))
    assert {s: v["status"] for s, v in summary["stages"].items()} == dict.fromkeys(stages(repo), "skipped")
    # A bound load cannot break: the rerun does the first run's checks without its work (the timing itself is a
    # ratio in bench/flow_rerun.py).
    assert seconds < trained["seconds"]
    assert summary["promoted"] is False and "identical to the champion v1" in summary["message"]
    assert (repo / "models/registry/champion.json").read_bytes() == champion_before
    assert (repo / "dvc.lock").read_bytes() == lock_before


def _code_changed(repo: Path) -> dict[str, set[str]]:
    """``dvc status``: per stage, the pipeline/ files among its deps whose content differs from dvc.lock."""
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, capture_output=True,
                         text=True, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"}).stdout
    changed: dict[str, set[str]] = {}
    for stage, entries in (json.loads(out or "{}") or {}).items():
        for entry in entries:
            if isinstance(entry, dict):
                changed.setdefault(stage, set()).update(
                    d for d in entry.get("changed deps", {}) if d.startswith("pipeline/"))
    return {stage: files for stage, files in changed.items() if files}


@pytest.mark.slow
def test_editing_a_yolo_trainer_file_changes_only_train_and_the_stages_after_it(trained: dict[str, Any]) -> None:
    """Lineage, end to end: in the flow's scratch clone (dvc.lock written by the run), an edit of the Ultralytics
    trainer subclass is a changed dep of train and of stages after it, never of phantom or prepare."""
    from pipeline.lineage import stage_order

    repo = trained["repo"]
    trainer = repo / "pipeline" / "families" / "yolo" / "trainer.py"
    original = trainer.read_bytes()
    assert _code_changed(repo) == {}  # the run's dvc.lock matches the code
    try:
        trainer.write_bytes(original + b"\n# an edit of the YOLO trainer\n")
        changed = _code_changed(repo)
    finally:
        trainer.write_bytes(original)
    order = stage_order(repo / "dvc.yaml")
    after_train = order[order.index("train"):]
    assert "train" in changed and set(changed) <= set(after_train), changed
    assert all(files == {"pipeline/families/yolo/trainer.py"} for files in changed.values()), changed
    assert _code_changed(repo) == {}


@pytest.mark.slow
def test_flaky_asset_fetch_is_retried_and_optional_asset_may_fail(trained: dict[str, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.training as ft
    from pipeline import assets

    calls: list[str] = []

    def flaky(name: str, **kwargs: Any) -> Path:
        calls.append(name)
        if len(calls) == 1:
            raise AssetError(f"asset {name!r}: connection reset (simulated)")
        return trained["repo"] / "data" / "raw" / name

    monkeypatch.setattr(assets, "resolve", flaky)
    monkeypatch.setattr(ft, "asset_fetch", ft.asset_fetch.with_options(retry_delay_seconds=0))
    monkeypatch.setattr(ft, "needed_assets", lambda params: [("bccd", True)])
    state = ft.training_pipeline(overrides=TINY, repo=str(trained["repo"]), return_state=True)
    assert state.is_completed(), state.message
    assert calls == ["bccd", "bccd"]
    fetch = [r for r in _task_runs(state.state_details.flow_run_id) if r.name.startswith("asset-fetch")]
    assert len(fetch) == 1 and fetch[0].run_count == 2 and fetch[0].state.is_completed()
    assert state.result()["assets"] == {"bccd": str(trained["repo"] / "data" / "raw" / "bccd")}

    # pretrained=auto: an unavailable checkpoint (after its retries) does not fail the flow
    def down(name: str, **kwargs: Any) -> Path:
        raise AssetError(f"asset {name!r} is not available (simulated)")

    monkeypatch.setattr(assets, "resolve", down)
    monkeypatch.setattr(ft, "needed_assets", lambda params: [("yolov5n-coco", False)])
    summary = ft.training_pipeline(overrides=TINY, repo=str(trained["repo"]))
    assert summary["assets"] == {"yolov5n-coco": "unavailable"}

    # a required asset that stays unavailable fails the flow after 1 + 3 attempts
    monkeypatch.setattr(ft, "needed_assets", lambda params: [("bccd", True)])
    state = ft.training_pipeline(overrides=TINY, repo=str(trained["repo"]), return_state=True)
    assert state.is_failed() and "not available (simulated)" in state.message
    fetch = [r for r in _task_runs(state.state_details.flow_run_id) if r.name.startswith("asset-fetch")]
    assert fetch[0].run_count == 4
    assert not [r for r in _task_runs(state.state_details.flow_run_id) if r.name.startswith("stage-")]


@pytest.mark.slow
def test_batch_inference_flow_with_the_champion(trained: dict[str, Any], tmp_path: Path) -> None:
    from flows.inference import batch_inference

    repo = trained["repo"]
    out = tmp_path / "pred"
    summary = batch_inference(str(repo / "data/prepared/coco/test.json"), out=str(out),
                              registry_root=str(repo / "models/registry"))
    assert summary["model"].endswith("v1/model.onnx") and summary["n_images"] > 0 and summary["errors"] == []
    preds = json.loads((out / "predictions.json").read_text())
    assert isinstance(preds, list | dict)
    state = batch_inference(str(repo / "data/prepared/coco/test.json"), model="v9", out=str(out),
                            registry_root=str(repo / "models/registry"), return_state=True)
    assert state.is_failed() and "unknown model version v9" in state.message


@pytest.mark.slow
def test_dvc_remote_moves_the_trained_model_between_clones(trained: dict[str, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Machine A (say, the GPU worker) runs the flow with push=True; machine B clones, pulls, and trains nothing."""
    from flows.training import training_pipeline

    a, b, remote = trained["repo"], tmp_path / "clone-b", tmp_path / "dvc-remote"
    summary = training_pipeline(overrides=TINY, repo=str(a), push=True, remote=str(remote))
    assert summary["pushed"] is True and summary["remote"] == "detflow" and any(remote.rglob("*"))
    _git(a, "add", "dvc.lock")
    _git(a, "commit", "-qm", "pipeline outputs")
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True)
    monkeypatch.setenv("DETFLOW_DVC_REMOTE", str(remote))
    state = training_pipeline(overrides=TINY, repo=str(b), return_state=True)
    assert state.is_completed(), state.message
    stages = {s: v["status"] for s, v in state.result()["stages"].items()}
    print("clone B:", stages)
    pulled = [r for r in _task_runs(state.state_details.flow_run_id) if r.name.startswith("dvc-pull")]
    assert len(pulled) == 1 and pulled[0].state.is_completed()
    assert stages["phantom"] == stages["prepare"] == "skipped"  # pulled from the remote, not rebuilt
    if "cache: false" in (b / "dvc.yaml").read_text():
        pytest.xfail("dvc.yaml keeps some outputs (metrics.json, gate.json, model_card.json, ...) out of the DVC "
                     "cache (`cache: false`) while git ignores them, so no remote carries them and B re-runs "
                     f"train and later stages ({stages}); see the dvc.yaml change in the report")
    assert set(stages.values()) == {"skipped"}
    assert _sha(b / "models/model.onnx") == _sha(a / "models/model.onnx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_prefect_yaml_deployment_served_by_a_process_worker(trained: dict[str, Any], tmp_path: Path) -> None:
    """`prefect deploy --all` from prefect.yaml on a temporary server; a `cpu` process worker runs train-cpu."""
    repo = trained["repo"]
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL":
           f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DETFLOW_REPO": str(repo),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PREFECT_PROFILES_PATH", None)
    prefect = [str(BIN / "prefect")]

    def cli(*args: str, timeout: float = 120, cwd: Path = repo) -> str:
        r = subprocess.run([*prefect, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    server = subprocess.Popen([*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "prefect server did not start"
                time.sleep(1)
        cli("work-pool", "create", "cpu", "--type", "process")
        cli("work-pool", "create", "gpu", "--type", "docker")  # validates the gpu deployment too; never run here
        cli("--no-prompt", "deploy", "--all")
        for name in ("training-pipeline/train-cpu", "batch-inference/batch-inference"):
            assert "'work_pool_name': 'cpu'" in cli("deployment", "inspect", name)
        gpu = cli("deployment", "inspect", "training-pipeline/train-gpu-nightly")
        assert "0 2 * * *" in gpu and "device_requests" in gpu and "detflow-train:latest" in gpu
        run = cli("deployment", "run", "training-pipeline/train-cpu", "--params", json.dumps({"overrides": TINY}))
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run).group(1)
        worker = subprocess.run([*prefect, "worker", "start", "--pool", "cpu", "--run-once"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=400)
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
        inspect = cli("flow-run", "inspect", flow_run_id)
        assert re.search(r"type=StateType.COMPLETED|'type': 'COMPLETED'|COMPLETED", inspect), inspect[-2000:]
        assert "Stage 'train' didn't change, skipping" in worker.stdout + worker.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.slow
def test_failed_gate_fails_the_flow_and_promotes_nothing(trained: dict[str, Any]) -> None:
    from flows.training import training_pipeline
    from pipeline import registry

    repo = trained["repo"]
    pointer = repo / "models/registry/champion.json"
    before, versions = pointer.read_bytes(), [v["version"] for v in registry.list_versions(repo / "models/registry")]
    params_before = (repo / "params.yaml").read_bytes()
    # a threshold above 1 is not a gate but a config error: rejected before any work
    state = training_pipeline(overrides={**TINY, "gate.min_map50": 1.01}, repo=str(repo), return_state=True)
    assert state.is_failed() and "gate.min_map50: Input should be less than or equal to 1" in state.message
    assert _task_runs(state.state_details.flow_run_id) == []

    state = training_pipeline(overrides={**TINY, "gate.min_map50": 1.0}, repo=str(repo), return_state=True)
    assert state.is_failed()
    assert "GateFailed" in state.message and "evaluation gate failed" in state.message
    assert re.search(r"min_map50 +[0-9.]+ >= 1\.0000 +FAIL", state.message), state.message
    names = {r.name: r for r in _task_runs(state.state_details.flow_run_id)}
    assert names["stage-evaluate"].state.is_failed() and "stage-export" not in names
    assert not any(n.startswith("register-promote") for n in names)
    assert pointer.read_bytes() == before
    assert [v["version"] for v in registry.list_versions(repo / "models/registry")] == versions
    assert (repo / "params.yaml").read_bytes() == params_before
