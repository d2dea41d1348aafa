"""Several independent trainings ("arms": seeds, sites, a study's arms) as tasks on one task runner.

An arm is a set of params overrides and a work folder of its own::

    from flows.arms import Arm, run_arms
    arms = [Arm("seed0", "runs/seed0", {"train.seed": 0}),
            Arm("seed1", "runs/seed1", {"train.seed": 1}, gpu=True)]
    summary = run_arms(arms, "tcp://scheduler:8786")       # or "local:2", a TaskRunner, or None (one at a time)

Each arm is one Prefect task (``train-arm``, run name ``arm-<name>``) on the runner. In its work folder it writes
``params.yaml`` (the base params plus its overrides, resolved and validated), then runs the ``detflow`` commands of
its ``steps`` there (default ``train``, ``evaluate``; ``export`` may follow), reading the shared prepared dataset
``data``: ``models/train/{best,last}.pt``, ``reports/train/``, ``reports/metrics.json``, ``reports/gate.json``
(``models/model.onnx`` with ``export``). Its resumable run state lives in ``<workdir>/.detflow`` (so a killed arm
resumes when run again). A failed gate is a result (``status: gate_failed``, the metrics are there), not an error.

``gpu=True`` asks Dask for one unit of the worker resource ``GPU``: the arm runs only on a worker started with
``dask worker ADDRESS --resources GPU=1`` (one such worker per GPU, each with its own ``CUDA_VISIBLE_DEVICES``),
and ``train.device: auto`` then picks that GPU. A runner without any GPU worker fails before any arm starts.

Arms are independent: one that fails (bad data, a crash) does not stop the others; the summary lists it under
``failed``. Overrides are validated for every arm before the first one starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner

from flows.cluster import task_runner_for
from flows.training import override_list, run_logged
from pipeline.config import load_params
from pipeline.errors import ConfigError, DetflowError
from pipeline.fileio import atomic_write_text

STEPS = ("train", "evaluate", "export")
GPU_RESOURCE = "GPU"


@dataclass(frozen=True)
class Arm:
    """One training: ``overrides`` (``{"train.seed": 1}`` or ``["train.seed=1"]``) applied to the base params, run
    in ``workdir``; ``gpu`` requests one ``GPU`` worker resource; ``steps`` are detflow commands, in order."""

    name: str
    workdir: str
    overrides: Mapping[str, Any] | list[str] = field(default_factory=dict)
    gpu: bool = False
    steps: tuple[str, ...] = ("train", "evaluate")

    @classmethod
    def coerce(cls, value: Arm | Mapping[str, Any]) -> Arm:
        if isinstance(value, Arm):
            arm = value
        else:
            unknown = set(value) - {f for f in cls.__dataclass_fields__}
            if unknown:
                raise ConfigError(f"arm {value.get('name')!r}: unknown keys {sorted(unknown)}; expected name, "
                                  "workdir, overrides, gpu, steps")
            arm = cls(**{**value, "steps": tuple(value.get("steps", cls.steps))})
        bad = [s for s in arm.steps if s not in STEPS]
        if not arm.name or bad or not arm.steps or list(arm.steps) != [s for s in STEPS if s in arm.steps]:
            raise ConfigError(f"arm {arm.name!r}: steps {list(arm.steps)} must be in the order {', '.join(STEPS)} "
                              "(a prefix of them, train first)")
        if arm.steps[0] != "train":
            raise ConfigError(f"arm {arm.name!r}: the first step must be train")
        return arm


def arm_commands(arm: Arm, data: Path, raw_dir: Path) -> list[list[str]]:
    """The ``detflow`` command lines of ``arm``'s steps, every path absolute (they run in the arm's folder)."""
    w = Path(arm.workdir).resolve()
    cli = [sys.executable, "-m", "pipeline.cli"]
    params = ["--params", str(w / "params.yaml")]
    table = {
        "train": [*cli, "train", "--data", str(data), "--out", str(w / "models" / "train"), "--reports",
                  str(w / "reports" / "train"), "--raw-dir", str(raw_dir), *params, "--quiet"],
        "evaluate": [*cli, "evaluate", "--model", str(w / "models" / "train" / "best.pt"), "--data", str(data),
                     "--reports", str(w / "reports"), *params, "--quiet"],
        "export": [*cli, "export", "--model", str(w / "models" / "train" / "best.pt"), "--data", str(data),
                   "--reports", str(w / "reports"), "--out", str(w / "models"), *params],
    }
    return [table[s] for s in arm.steps]


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


@task(name="train-arm", task_run_name="arm-{arm.name}", cache_policy=NO_CACHE)
def train_arm(arm: Arm, data: str, params: str | None, raw_dir: str) -> dict[str, Any]:
    """Run one arm in its work folder (see the module doc); its summary: status, metrics, where it ran."""
    t0 = time.perf_counter()
    work = Path(arm.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    resolved = load_params(Path(params) if params else None, override_list(arm.overrides))  # type: ignore[arg-type]
    atomic_write_text(work / "params.yaml", f"# arm {arm.name}: base params + {override_list(arm.overrides)}\n"
                      + yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))
    status = "completed"
    env = {"DETFLOW_WORKDIR": str(work / ".detflow"), "DETFLOW_NO_PROGRESS": "1"}
    for step, cmd in zip(arm.steps, arm_commands(arm, Path(data), Path(raw_dir)), strict=True):
        code, out = run_logged(cmd, work, extra_env=env)
        if code == 0:
            continue
        gate = work / "reports" / "gate.json"
        if step == "evaluate" and gate.is_file() and json.loads(gate.read_text()).get("passed") is False:
            status = "gate_failed"  # a result: the metrics are written; later steps need a passed gate
            break
        tail = "\n".join(out.rstrip().splitlines()[-20:])
        raise DetflowError(f"arm {arm.name}: `detflow {step}` failed (exit {code}):\n{tail}")
    metrics_file = work / "reports" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {"arm": arm.name, "workdir": str(work), "status": status, "gpu": arm.gpu, "steps": list(arm.steps),
            "metrics": {k: metrics.get(k) for k in ("map50", "map50_95", "n_images")} if metrics else {},
            "best": str(work / "models" / "train" / "best.pt"), "host": socket.gethostname(), "pid": os.getpid(),
            "dask_worker": _worker_address(), "seconds": round(time.perf_counter() - t0, 2)}


def _check_gpu_workers(arms: list[Arm]) -> None:
    """GPU arms need a worker offering the GPU resource, or Dask would hold them forever."""
    wanting = [a.name for a in arms if a.gpu]
    ctx = FlowRunContext.get()
    runner = ctx.task_runner if ctx else None
    if not wanting:
        return
    client = getattr(runner, "client", None) if type(runner).__name__ == "DaskTaskRunner" else None
    if client is None:
        raise ConfigError(f"arms {wanting} ask for a GPU, which needs a Dask task runner with GPU workers "
                          "(run_arms(arms, 'tcp://HOST:PORT'))")
    from pipeline.cluster import worker_resources

    if not any(r.get(GPU_RESOURCE, 0) >= 1 for r in worker_resources(client).values()):
        raise ConfigError(f"arms {wanting} ask for a GPU, but no worker of the cluster offers the {GPU_RESOURCE} "
                          f"resource; start GPU workers with `dask worker ADDRESS --resources {GPU_RESOURCE}=1` "
                          "(one per GPU, each with its own CUDA_VISIBLE_DEVICES)")


@flow(name="training-arms", description="Independent trainings (seeds, sites, study arms), one task each on the "
      "flow's task runner, each in its own work folder")
def training_arms(arms: list[Arm], data: str = "data/prepared", params: str | None = "params.yaml",
                  raw_dir: str = "data/raw") -> dict[str, Any]:
    """Run every arm; ``{"arms": [summary, ...], "failed": [{"arm", "error"}, ...]}`` (see :func:`train_arm`)."""
    arms = [Arm.coerce(a) for a in arms]
    for key in ("name", "workdir"):
        values = [str(Path(getattr(a, key)).resolve()) if key == "workdir" else a.name for a in arms]
        if len(set(values)) != len(values):
            raise ConfigError(f"arms must have distinct {key}s, got {values}")
    # paths as this process sees them: the arms may run on workers with another working directory
    params = str(Path(params).resolve()) if params and Path(params).is_file() else None
    data, raw_dir = str(Path(data).resolve()), str(Path(raw_dir).resolve())
    for a in arms:  # every arm's overrides are valid before the first arm starts
        load_params(Path(params) if params else None, override_list(a.overrides))  # type: ignore[arg-type]
    arms = [Arm(a.name, str(Path(a.workdir).resolve()), a.overrides, a.gpu, a.steps) for a in arms]
    _check_gpu_workers(arms)
    import dask

    futures = []
    for a in arms:
        with dask.annotate(resources={GPU_RESOURCE: 1}) if a.gpu else contextlib.nullcontext():
            futures.append(train_arm.submit(a, data, params, raw_dir))
    done, failed = [], []
    for a, fut in zip(arms, futures, strict=True):
        fut.wait()
        if fut.state.is_completed():
            done.append(fut.result())
        else:
            error = fut.result(raise_on_failure=False)
            failed.append({"arm": a.name, "error": f"{type(error).__name__}: {error}"})
    return {"arms": done, "failed": failed}


def run_arms(arms: Iterable[Arm | Mapping[str, Any]], runner: TaskRunner | str | None = None, *,
             data: str = "data/prepared", params: str | None = "params.yaml",
             raw_dir: str = "data/raw") -> dict[str, Any]:
    """Run ``arms`` on ``runner``: a Prefect ``TaskRunner``, a cluster (``local:N``, ``tcp://HOST:PORT``: a
    ``DaskTaskRunner``, see flows/cluster.py) or None (one arm at a time in this process)."""
    if not isinstance(runner, TaskRunner):
        runner = task_runner_for(runner, threads=1)
    return training_arms.with_options(task_runner=runner)(arms=[Arm.coerce(a) for a in arms], data=data,
                                                          params=params, raw_dir=raw_dir)


def arms_from_file(path: Path) -> list[Arm]:
    """Arms from a YAML/JSON file: a list of ``{name, workdir, overrides, gpu, steps}``."""
    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, list):
        raise ConfigError(f"{path}: expected a list of arms ({{name, workdir, overrides, gpu, steps}})")
    return [Arm.coerce(a) for a in doc]


