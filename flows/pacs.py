"""Prefect flow ``pacs-inference``: ``detflow pacs run`` on a schedule (deployment ``pacs-inference`` in
prefect.yaml).

The flow body is a list of calls into :mod:`pipeline.pacs.run`, the code ``detflow pacs run`` runs: resolve the
model (the registry's champion by default), find the series (QIDO-RS), process each series as its own task (WADO-RS,
detect, SR, STOW-RS, ledger), publish a markdown artifact listing the series processed, skipped and failed.

Retries on network I/O only: a task is retried (2, 5, 15 s) when it failed with
:class:`~pipeline.pacs.client.PacsUnavailable` (the PACS unreachable, timing out or failing with 5xx); a refused
credential, a corrupt instance or a bad model fails at once. A rerun of a series is safe: the ledger and the
deterministic SR UIDs make it skip what is done, and never file a second report.

The PACS URL comes from the ``url`` parameter or ``$DETFLOW_PACS_URL``, credentials from the worker's environment
(``DETFLOW_PACS_TOKEN``, or ``DETFLOW_PACS_USER`` + ``DETFLOW_PACS_PASSWORD``), never from flow parameters (they
are stored by the Prefect server).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.inference import resolve_model
from pipeline import registry
from pipeline.errors import DetflowError
from pipeline.pacs.client import PacsUnavailable
from pipeline.pacs.run import PacsRunner, RunSummary, SeriesOutcome, SeriesRef

URL_ENV = "DETFLOW_PACS_URL"
RETRY_DELAYS = [2, 5, 15]

_RUNNERS: dict[str, PacsRunner] = {}  # one runner (detector, session, ledger) per flow run, by key
_LOCK = threading.Lock()


def network_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the task failed because the PACS could not be reached."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable state is not a network failure
        return False
    return isinstance(exc, PacsUnavailable)


def _runner(key: str) -> PacsRunner:
    with _LOCK:
        return _RUNNERS[key]


def open_runner(key: str, url: str, model_path: str, work: str, *, force: bool, conf: float | None) -> PacsRunner:
    """The runner of one flow run, built once (the model loads once, not once per task)."""
    from pipeline.infer.engine import OnnxDetector, plan_workers
    from pipeline.pacs.client import Pacs
    from pipeline.pacs.ledger import Ledger

    workers, threads = plan_workers()
    detector = OnnxDetector(model_path, threads=threads)
    if conf is not None:
        detector.conf = conf
    runner = PacsRunner(Pacs(url), detector, Ledger(Path(work)), force=force, workers=workers)
    with _LOCK:
        _RUNNERS[key] = runner
    return runner


@task(name="pacs-find-series", cache_policy=NO_CACHE, retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=network_only)
def find_series(key: str, study: str | None, since: str | None, modality: str | None) -> tuple[list[SeriesRef], int]:
    """QIDO-RS: the series of the selected studies."""
    runner = _runner(key)
    runner.pacs.check()
    return runner.find_series(study=study, since=since, modality=modality)


@task(name="pacs-process-series", cache_policy=NO_CACHE, retries=len(RETRY_DELAYS),
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=network_only)
def process_series(key: str, ref: SeriesRef) -> SeriesOutcome:
    """WADO-RS + detect + SR + STOW-RS + ledger for one series (or the reason it is skipped or failed)."""
    return _runner(key).process_series(ref)


def artifact_markdown(summary: RunSummary, url_server: str) -> str:
    """The run as markdown: totals, then one table row per series (pseudonyms, never UIDs)."""
    c = summary.counts()
    rows = ["| status | study | series | modality | images | detections | reason / detail |",
            "|---|---|---|---|---:|---:|---|"]
    listed = summary.to_dict()["series"]
    for status in ("processed", "failed", "skipped"):
        for o, d in zip(summary.outcomes, listed, strict=True):
            if o.status != status:
                continue
            rows.append(f"| {status} | `{d['study']}` | `{d['series']}` | {o.ref.modality or '?'} | {o.n_images} | "
                        f"{o.n_detections} | {o.reason}{': ' + o.detail if o.detail else ''} |")
    return "\n".join([
        f"# PACS inference on {url_server}", "",
        f"Model version `{summary.model_version}`; {c['studies']} studies ({c['studies_without_images']} without "
        f"images); **{c['series_processed']} series processed** ({c['images']} images, {c['detections']} "
        f"detections), skipped: {c['series_skipped'] or 'none'}, failed: {c['series_failed'] or 'none'}.", "",
        *rows])


@flow(name="pacs-inference", description="Detect in a PACS's new series over DICOMweb and store a DICOM SR per "
      "series back (QIDO-RS, WADO-RS, STOW-RS); a ledger skips finished series")
def pacs_inference(url: str | None = None, model: str = "champion", work: str | None = None,
                   study: str | None = None, since: str | None = None, modality: str | None = None,
                   force: bool = False, conf: float | None = None,
                   registry_root: str = str(registry.DEFAULT_ROOT)) -> dict[str, Any]:
    """Returns the run's counts and the per-series outcomes (pseudonymised); fails when a series failed, after the
    artifact is published."""
    from pipeline.pacs.client import server_name
    from pipeline.pacs.run import parse_since
    from pipeline.ultralytics_env import state_root

    logger = get_run_logger()
    url = url or os.environ.get(URL_ENV)
    if not url:
        raise DetflowError(f"no PACS URL: pass url= or set {URL_ENV} in the worker's environment")
    since = parse_since(since) if since else None
    model_path = resolve_model(model, registry_root)
    key = f"{os.getpid()}-{time.monotonic_ns()}"
    runner = open_runner(key, url, model_path, work or str(state_root() / "pacs"), force=force, conf=conf)
    try:
        refs, n_studies = find_series(key, study, since, modality)
        summary = RunSummary(n_studies=n_studies, model_version=runner.model.version)
        start = time.perf_counter()
        for ref in refs:
            summary.outcomes.append(process_series(key, ref))
        summary.seconds = time.perf_counter() - start
        runner.ledger.finish_run(runner.run_id, "partial" if summary.of("failed") else "ok",
                                 json.dumps(summary.counts()))
        create_markdown_artifact(key="pacs-inference", markdown=artifact_markdown(summary, server_name(url)),
                                 description="Series processed, skipped and failed by this run")
        logger.info(summary.line())
    finally:
        with _LOCK:
            _RUNNERS.pop(key, None)
        runner.ledger.close()
    if summary.of("failed"):
        raise DetflowError(f"{len(summary.of('failed'))} series failed; see the flow's artifact")
    return summary.to_dict()


if __name__ == "__main__":
    import sys

    from flows.training import start_local_server

    start_local_server()
    print(json.dumps(pacs_inference(*sys.argv[1:2]), indent=2))
