"""Prefect flow for the training pipeline: every DVC stage is its own task run; DVC still owns caching and dvc.lock.

What one run does, in order (``training_pipeline``)::

    validate overrides -> params.yaml (temporarily) -> [dvc pull] -> fetch assets
      -> dvc repro -s STAGE for every stage of dvc.yaml, in DAG order   (one task each)
      -> [dvc push] -> markdown report artifact -> register + promote in models/registry

The flow lists nothing itself: the stages and the paths of the files it reads come from the checkout's dvc.yaml
(:func:`pipeline.lineage.stage_order`, :func:`artifacts`), and the assets a run needs from its params
(:func:`pipeline.config.named_assets`).

Decisions
---------
* **Stages run through DVC**, ``dvc repro --single-item STAGE`` in DAG order, so a stage whose deps, params and outs
  are unchanged is skipped by DVC ("didn't change, skipping") and dvc.lock stays the record of what produced what.
  A re-run with nothing changed therefore only pays DVC's checks. Each task reports whether DVC ran or skipped the
  stage (from DVC's own output) and how long it took.
* **Overrides** (``{"train.epochs": 3}`` or ``["train.epochs=3"]``) are validated with ``pipeline.config.load_params``
  *before* anything is touched, then written into ``params.yaml`` for the duration of the run (atomically, with a
  backup in ``.detflow/``) and restored in a ``finally`` block. DVC records the overridden values in dvc.lock, so
  the same overrides again skip every stage. A run killed before the ``finally`` leaves the backup; the next run
  restores it first. One flow run per checkout at a time (DVC's repo lock enforces it for the stages).
* **Retries only for I/O**: asset resolution (mirror copy / download), ``dvc pull`` and ``dvc push`` retry 3 times
  with 2, 5, 15 s back-off. Stage tasks never retry: a failed stage is a real failure (bad data, failed gate).
* **Gate**: when the evaluate stage fails and ``reports/gate.json`` (written by that attempt) says ``passed: false``
  the flow fails with ``GateFailed`` and the gate table; nothing is exported, registered or promoted. The external
  stage (the exported model on params ``external``) checks ``gate.min_external_map50`` the same way through
  ``reports/generalisation.json``: a failing set stops the run before registration.
* **Promotion**: on success a markdown artifact (metrics, gate, parity, model card) is published and the exported
  model is registered as ``v<N>`` and promoted (``pipeline.registry.publish``); a model identical (sha256) to the
  champion is not promoted again, and the run says so.

Local server
------------
Without ``PREFECT_API_URL`` Prefect starts a temporary server on loopback. Its first start on a machine creates and
migrates a new SQLite database; Prefect waits only 20 s by default, which a cold start on 2 busy cores exceeded
once. :func:`start_local_server` (called by ``detflow flow run`` before the flow) waits ``COLD_START_TIMEOUT_S``
unless ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` is set, retries once with a fresh server process, turns
off the server's telemetry (no network from an air-gapped site) unless the user set it, and otherwise fails with
one line (:class:`PrefectServerError`).

Across machines (GPU work pool)
-------------------------------
A GPU worker runs this same flow in its own checkout (see ``prefect.yaml``): the deployment's pull step and the
``dvc-pull`` task fetch every output recorded in dvc.lock from the DVC remote, so stages that are already done
elsewhere (phantom, prepare) are skipped; the train stage runs on the GPU; ``push=True`` then uploads the new
outputs (``dvc push``) so a CPU machine can ``dvc pull`` the trained model instead of training it. The remote is
the ``remote`` flow parameter, else ``$DETFLOW_DVC_REMOTE`` (a URL such as ``s3://bucket/detflow`` or a local/NFS
folder; it is added to ``.dvc/config.local`` as remote ``detflow``), else the repository's default DVC remote. With
none of these, pull/push are skipped (``push=True`` without a remote is an error). Tests use a local folder.

Size: Prefect wants tasks at module level; the flow, its tasks and the cold-start handling of the local
server are one unit of orchestration (no domain logic).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from pipeline import assets, lineage, registry
from pipeline.config import Params, load_params, named_assets, parse_override
from pipeline.errors import AssetError, ConfigError, DetflowError
from pipeline.evaluate.gate import GateFailed, gate_table
from pipeline.fileio import atomic_write_bytes, atomic_write_text

# What the flow reads, as (stage, file name) among that stage's outputs in dvc.yaml; the paths come from dvc.yaml.
ARTIFACT_FILES = {"onnx": ("export", "model.onnx"), "card": ("export", "model_card.json"),
                  "metrics": ("evaluate", "metrics.json"), "gate": ("evaluate", "gate.json"),
                  "parity": ("export", "parity.json"),
                  "generalisation": ("external", "generalisation.json"),  # the external stage's table (optional)
                  "report": ("report", "report.html")}  # `detflow report`: the one page a reviewer reads
IO_RETRIES = 3
IO_RETRY_DELAYS = [2, 5, 15]  # seconds before retry 1, 2, 3
ENV_REMOTE = "DETFLOW_DVC_REMOTE"
REMOTE_NAME = "detflow"
PARAMS_BACKUP = ".detflow/params.yaml.flow-backup"
REPORT_KEY = "detflow-training-report"


COLD_START_TIMEOUT_S = 90  # first start measured 7-9 s on 2 shared cores; Prefect's own default (20 s) failed once


class StageFailed(DetflowError):
    """A ``dvc repro`` stage exited non-zero; the message carries the tail of its output."""


class PrefectServerError(DetflowError):
    """Prefect's temporary local server did not start (the message says what to do)."""


def startup_timeout() -> int:
    """Seconds to wait for the temporary server: the user's setting when made, else :data:`COLD_START_TIMEOUT_S`."""
    from prefect.settings import get_current_settings

    ephemeral = get_current_settings().server.ephemeral
    return ephemeral.startup_timeout_seconds if "startup_timeout_seconds" in ephemeral.model_fields_set \
        else COLD_START_TIMEOUT_S


def start_local_server(timeout_s: int | None = None, attempts: int = 2) -> str | None:
    """Start Prefect's temporary local server now, patiently, so the flow call that follows finds it running.

    Returns its API URL, or None when ``PREFECT_API_URL`` names a server (nothing to start) or the temporary server
    is disabled. ``timeout_s``: seconds per try; default: the user's
    ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` if set, else :data:`COLD_START_TIMEOUT_S`. A try that
    times out is stopped (its process killed) and the next one starts afresh on another port.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings, temporary_settings

    settings = get_current_settings()
    ephemeral = settings.server.ephemeral
    if settings.api.url or not ephemeral.enabled:
        return None
    timeout_s = startup_timeout() if timeout_s is None else timeout_s
    quiet = {} if "analytics_enabled" in settings.server.model_fields_set else {"server.analytics_enabled": False}
    error = ""
    for _ in range(max(1, attempts)):
        server = SubprocessASGIServer()
        if server.running:
            return server.api_url
        try:
            with temporary_settings(updates=quiet):  # the server process inherits the set settings
                server.start(timeout=timeout_s)
            return server.api_url
        except Exception as e:  # noqa: BLE001 - Prefect raises RuntimeError (timeout) or httpx errors
            error = (str(e).splitlines() or [type(e).__name__])[0]
            server.stop()
    raise PrefectServerError(
        f"the temporary Prefect server did not start ({attempts} tries, {timeout_s} s each: {error}); raise "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run `prefect server start` elsewhere and set "
        "PREFECT_API_URL=http://127.0.0.1:4200/api")


# --- helpers (no Prefect state; called by tasks and the flow) --------------------------------------------------


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow/task run, a plain module logger outside one (unit tests, scripts)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def override_list(overrides: dict[str, Any] | list[str] | None) -> list[str]:
    """``{"train.epochs": 3}`` or ``["train.epochs=3"]`` -> ``["train.epochs=3"]`` (values as JSON, a YAML subset)."""
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return [str(item) for item in overrides]


def _set_key(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def recover_params(repo: Path) -> bool:
    """Restore params.yaml from the backup a killed flow run left behind; True if there was one."""
    backup = repo / PARAMS_BACKUP
    if not backup.is_file():
        return False
    atomic_write_bytes(repo / "params.yaml", backup.read_bytes())
    backup.unlink()
    return True


@contextlib.contextmanager
def temporary_params(repo: Path, overrides: list[str]) -> Iterator[Params]:
    """Validate ``overrides`` against params.yaml, write them into it for the block, restore it afterwards.

    Nothing is written when validation fails (a :class:`ConfigError` naming the bad key) or there are no overrides.
    """
    path = repo / "params.yaml"
    if recover_params(repo):
        _logger().warning("restored params.yaml from %s (left by an interrupted flow run)", PARAMS_BACKUP)
    params = load_params(path, overrides)  # raises before anything is touched
    if not overrides:
        yield params
        return
    original = path.read_bytes()
    tree = yaml.safe_load(original) or {}
    for item in overrides:
        _set_key(tree, *parse_override(item))
    atomic_write_bytes(repo / PARAMS_BACKUP, original)
    atomic_write_text(path, "# TEMPORARY: params.yaml with the flow run's overrides; the original is restored when "
                            "the run ends\n" + yaml.safe_dump(tree, sort_keys=False))
    try:
        yield params
    finally:
        atomic_write_bytes(path, original)
        (repo / PARAMS_BACKUP).unlink(missing_ok=True)


def stages(repo: Path) -> list[str]:
    """The stages of the checkout's dvc.yaml, in the order the flow runs them (DAG order)."""
    return lineage.stage_order(repo / "dvc.yaml")


def artifacts(repo: Path) -> dict[str, Path]:
    """``{key: path}`` of the files the flow reads (:data:`ARTIFACT_FILES`), as the checkout's dvc.yaml writes
    them; a file dvc.yaml does not write is a :class:`ConfigError` naming it."""
    outs = lineage.stage_outputs(repo / "dvc.yaml")
    found = {}
    for key, (stage, name) in ARTIFACT_FILES.items():
        path = next((o for o in outs.get(stage, []) if Path(o).name == name), None)
        if path is None:
            raise ConfigError(f"{repo / 'dvc.yaml'}: stage {stage!r} writes no {name}, which the flow reads")
        found[key] = repo / path
    return found


def _env(repo: Path) -> dict[str, str]:
    """Subprocess environment: this interpreter's bin first (``dvc``, ``detflow``), the checkout's code first."""
    env = os.environ.copy()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("DETFLOW_NO_PROGRESS", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run_logged(args: list[str], repo: Path, log_lines: bool = True) -> tuple[int, str]:
    """Run a command in ``repo``, streaming each output line to the Prefect log; return (exit code, output)."""
    log = _logger() if log_lines else None
    proc = subprocess.Popen(args, cwd=repo, env=_env(repo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if log is not None and line.strip():
            log.info(line.rstrip())
    return proc.wait(), "".join(lines)


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def stage_status(stage: str, output: str) -> str:
    """What DVC did, from its output: ``ran``, ``skipped`` (unchanged) or ``restored`` (from DVC's run cache)."""
    if f"Stage '{stage}' is cached - skipping run" in output:
        return "restored"
    if f"Running stage '{stage}'" in output:
        return "ran"
    return "skipped"


def stage_failure(stage: str, repo: Path, started: float, code: int, output: str) -> DetflowError:
    """The error for a failed stage: :class:`GateFailed` with the gate table when the evaluate gate said no."""
    files = artifacts(repo)
    gate_path = files["gate"]
    if stage == ARTIFACT_FILES["gate"][0] and gate_path.is_file() and gate_path.stat().st_mtime >= started - 1:
        gate = json.loads(gate_path.read_text())
        if gate.get("passed") is False:
            return GateFailed("evaluation gate failed; the model was not exported, registered or promoted:\n"
                              + gate_table(gate))
    gen_path = files["generalisation"]
    if stage == ARTIFACT_FILES["generalisation"][0] and gen_path.is_file() and gen_path.stat().st_mtime >= started - 1:
        gate = json.loads(gen_path.read_text()).get("gate") or {}
        if gate.get("passed") is False:
            return GateFailed("external evaluation gate failed; the model was not registered or promoted:\n"
                              + gate_table(gate))
    tail = "\n".join(output.rstrip().splitlines()[-40:])
    return StageFailed(f"stage {stage!r} failed (dvc repro exit code {code}); last output:\n{tail}")


def configure_remote(repo: Path, remote: str | None, push: bool) -> str | None:
    """Name of the DVC remote to pull from / push to, or None. A URL/path (parameter or $DETFLOW_DVC_REMOTE) is
    registered in ``.dvc/config.local`` as remote ``detflow``; otherwise the repository's default remote is used."""
    url = remote or os.environ.get(ENV_REMOTE, "")
    if url:
        if "://" not in url and not url.startswith(("/", "~")):  # relative local folder: make it absolute
            url = str(Path(url).resolve())
        code, out = run_logged(dvc("remote", "add", "--local", "--force", REMOTE_NAME, url), repo, log_lines=False)
        if code != 0:
            raise ConfigError(f"cannot configure DVC remote {url!r}: {out.strip()}")
        return REMOTE_NAME
    code, out = run_logged(dvc("config", "core.remote"), repo, log_lines=False)
    name = out.strip() if code == 0 else ""
    if not name and push:
        raise ConfigError(f"push=True but no DVC remote is configured: pass remote=URL, set ${ENV_REMOTE}, or "
                          "`dvc remote add -d NAME URL`")
    return name or None


def read_artifacts(repo: Path) -> dict[str, Any]:
    """The JSON files the run report shows (metrics, gate, parity, card)."""
    return {key: json.loads(path.read_text()) for key, path in artifacts(repo).items()
            if key in ("card", "metrics", "gate", "parity")}


def _cell(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def external_markdown(path: Path) -> str:
    """The external sets' section of the run report: mAP50 and per-class AP50, internal vs external, and the drop."""
    if not path.is_file():
        return "\n\n## External evaluation\n\nnot run (no reports/generalisation.json)\n"
    table = json.loads(path.read_text())
    sets = table.get("sets") or {}
    if not sets:
        return "\n\n## External evaluation\n\nno external sets configured (params `external`)\n"
    lines = ["", "", "## External evaluation", "",
             f"internal ({(table.get('internal') or {}).get('split')}) mAP50 "
             f"{_cell((table.get('internal') or {}).get('map50'))}", "",
             "| set | class | internal AP50 | external AP50 | drop |", "|---|---|---|---|---|"]
    for name, s in sets.items():
        lines.append(f"| {name} | **mAP50** (95% CI {s.get('ci95_map50')}) | "
                     f"{_cell(s.get('internal_map50_same_classes'))} | {_cell(s.get('map50'))} | "
                     f"{_cell(s.get('drop'))} |")
        for cls, row in (s.get("per_class") or {}).items():
            lines.append(f"| {name} | {cls} | {_cell(row.get('internal'))} | {_cell(row.get('external'))} | "
                         f"{_cell(row.get('drop'))} |")
        if s.get("classes_left_out"):
            lines.append(f"| {name} | left out of the mean (not in this set): {', '.join(s['classes_left_out'])} "
                         "| | | |")
    for c in (table.get("gate") or {}).get("checks") or []:
        lines.append(f"\n{c['name']}: {_cell(c['value'])} >= {c['threshold']} {'PASS' if c['passed'] else 'FAIL'}")
    return "\n".join(lines) + "\n"


# --- tasks -----------------------------------------------------------------------------------------------------


@task(name="asset-fetch", task_run_name="asset-fetch-{name}", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS,
      cache_policy=NO_CACHE)
def asset_fetch(name: str, repo: str, required: bool = True) -> str | None:
    """Verified path of a named asset (raw copy, mirror, or download), see :func:`pipeline.assets.resolve`. An
    optional asset that cannot be had is None (one warning line, no retries, no traceback): the train stage
    resolves it again and falls back as configured."""
    try:
        return str(assets.resolve(name, raw_dir=Path(repo) / "data" / "raw", progress=False))
    except AssetError as e:
        if required:
            raise  # retried (a download may come back), then the flow fails
        _logger().warning("optional asset %s is unavailable (%s); the train stage falls back as configured "
                          "(pretrained=auto -> from scratch)", name, e.summary)
        return None


@task(name="dvc-pull", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, cache_policy=NO_CACHE)
def dvc_pull(repo: str, remote: str) -> None:
    """Fetch every output recorded in dvc.lock from the remote (missing ones are fine: they will be built)."""
    code, out = run_logged(dvc("pull", "--allow-missing", "-r", remote), Path(repo))
    if code != 0:
        raise StageFailed(f"dvc pull -r {remote} failed (exit {code}):\n{out[-3000:]}")


@task(name="dvc-push", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, cache_policy=NO_CACHE)
def dvc_push(repo: str, remote: str) -> None:
    """Upload the cached outputs of every stage to the remote, so other machines can `dvc pull` them."""
    code, out = run_logged(dvc("push", "-r", remote), Path(repo))
    if code != 0:
        raise StageFailed(f"dvc push -r {remote} failed (exit {code}):\n{out[-3000:]}")


@task(name="dvc-stage", task_run_name="stage-{stage}", cache_policy=NO_CACHE)
def dvc_stage(stage: str, repo: str) -> dict[str, Any]:
    """``dvc repro --single-item STAGE``; ``{"stage", "status": ran|skipped|restored, "seconds"}``. No retries."""
    root, started, t0 = Path(repo), time.time(), time.perf_counter()
    code, out = run_logged(dvc("repro", "--single-item", stage), root)
    if code != 0:
        raise stage_failure(stage, root, started, code, out)
    return {"stage": stage, "status": stage_status(stage, out), "seconds": round(time.perf_counter() - t0, 2)}


@task(name="report", cache_policy=NO_CACHE)
def publish_report(repo: str) -> str:
    """Markdown artifact with metrics, gate checks, parity and the model card summary."""
    root = Path(repo)
    docs, files = read_artifacts(root), artifacts(root)
    markdown = registry.summary_markdown(docs["metrics"], docs["gate"], docs["parity"], docs["card"])
    markdown += external_markdown(files["generalisation"])
    page = files["report"]
    if page.is_file():
        markdown += f"\n\nThe whole run on one page: [{page.relative_to(root)}]({page.resolve().as_uri()})\n"
    create_markdown_artifact(markdown=markdown, key=REPORT_KEY, description="detflow training run: metrics, gate, "
                             "parity, model card")
    return markdown


@task(name="failed-gate-report", cache_policy=NO_CACHE)
def failed_gate_report(repo: str) -> str | None:
    """After a failed gate DVC stops before the report stage: write the page anyway (verdict FAIL, failed checks)."""
    root = Path(repo)
    page = artifacts(root)["report"]
    code, out = run_logged([sys.executable, "-m", "pipeline.cli", "report", "--out", str(page.relative_to(root))],
                           root)
    if code != 0:
        _logger().warning("the run report could not be written after the failed gate: %s", out.strip()[-300:])
        return None
    create_markdown_artifact(markdown=f"Gate FAILED. The whole run on one page: [{page.relative_to(root)}]"
                             f"({page.resolve().as_uri()})", key=REPORT_KEY,
                             description="detflow training run: failed gate")
    return str(page)


@task(name="register-promote", cache_policy=NO_CACHE)
def register_and_promote(repo: str, registry_root: str) -> dict[str, Any]:
    """Register the exported model as v<N> and promote it (skipped when it is already the champion)."""
    root = Path(repo)
    files = artifacts(root)
    result = registry.publish(*(files[k] for k in ("onnx", "card", "metrics", "gate", "parity")),
                              root=registry_root, source=root, reason=f"training flow run {_flow_run_id()}")
    _logger().info(result.message)
    return {"version": result.version, "registered": result.registered, "promoted": result.promoted,
            "message": result.message}


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


def fetch_assets(params: Params, repo: Path) -> dict[str, str]:
    """Resolve the assets the params need; an optional one (pretrained=auto) that fails is logged, not fatal."""
    out: dict[str, str] = {}
    for name, required in named_assets(params):
        path = asset_fetch(name, str(repo), required)  # a required one that fails raises: the flow fails here
        out[name] = path if path is not None else "unavailable"
    return out


def registry_root(params: Params, repo: Path) -> Path:
    pointer = Path(params.gate.champion)
    if pointer.name != registry.CHAMPION:
        raise ConfigError(f"gate.champion must name a file called {registry.CHAMPION} (the registry writes it), "
                          f"got {params.gate.champion!r}")
    return pointer.parent if pointer.is_absolute() else repo / pointer.parent


# --- the flow ----------------------------------------------------------------------------------------------------


@flow(name="training-pipeline", description="phantom -> prepare -> train -> evaluate -> export -> infer -> external "
      "through DVC; report, register and promote the model")
def training_pipeline(overrides: dict[str, Any] | list[str] | None = None, push: bool = False, repo: str = ".",
                      remote: str | None = None) -> dict[str, Any]:
    """Run the DVC pipeline stage by stage in checkout ``repo``, then report, register and promote the model.

    ``overrides``: params overrides for this run, e.g. ``{"train.epochs": 3}``. ``push``: upload outputs to the
    DVC remote afterwards. ``remote``: DVC remote URL/folder (default ``$DETFLOW_DVC_REMOTE`` or the repo's
    default remote). Returns ``{"stages": {stage: {"status", "seconds"}}, "champion", ...}``. Fails (state Failed)
    on invalid overrides, a failed stage or a failed gate (message: the gate table).
    """
    root, t0 = Path(repo).resolve(), time.perf_counter()
    with temporary_params(root, override_list(overrides)) as params:
        models = registry_root(params, root)
        remote_name = configure_remote(root, remote, push)
        if remote_name:
            dvc_pull(str(root), remote_name)
        fetched = fetch_assets(params, root)
        try:
            ran = {stage: dvc_stage(stage, str(root)) for stage in stages(root)}
        except GateFailed:
            failed_gate_report(str(root))
            raise
        if push and remote_name:
            dvc_push(str(root), remote_name)
    publish_report(str(root))
    promoted = register_and_promote(str(root), str(models))
    champion = registry.champion(models) or {}
    return {"stages": ran, "assets": fetched, "champion": champion.get("version"), **promoted,
            "remote": remote_name, "pushed": bool(push and remote_name), "seconds": round(time.perf_counter() - t0, 2)}


if __name__ == "__main__":
    start_local_server()
    print(json.dumps(training_pipeline(), indent=2))
