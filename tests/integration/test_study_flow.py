"""The study as one Prefect flow (flows/study.py): bad study params fail before any task; a run trains the arms
through DVC's queue, writes the study page, and publishes an artifact with the recommendation and its link."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from helpers.study import make_checkout


@pytest.fixture(scope="module")
def prefect_server() -> Any:
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=180):
        yield


def _task_names(flow_run_id: Any) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(r.name for r in runs)


def test_bad_study_params_fail_the_flow_before_any_task(tmp_path: Path, prefect_server: Any) -> None:
    import shutil

    from helpers import REPO

    from flows.study import study_pipeline

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    state = study_pipeline(study={"fractions": [0, 1.0]}, repo=str(tmp_path), return_state=True)
    assert state.is_failed() and "study.fractions: 0 is not in (0, 1]" in state.message
    assert _task_names(state.state_details.flow_run_id) == []


@pytest.mark.slow
def test_study_flow_runs_reports_and_links_the_page(tmp_path: Path, prefect_server: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client

    from flows.study import STUDY_REPORT_KEY, study_pipeline

    root = make_checkout(tmp_path / "repo", lambda p: None)
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(key, "detflow-test")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, "test@detflow.invalid")
    state = study_pipeline(study={"fractions": [1.0]}, repo=str(root), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["arms"] == summary["done"] == 1
    assert Path(summary["page"]).is_file() and summary["page"].endswith("reports/study/report.html")
    assert 'id="study-arms"' in (root / "reports" / "report.html").read_text()  # the run report has the section
    assert [n.rsplit("-", 1)[0] for n in _task_names(state.state_details.flow_run_id)] == ["study-report",
                                                                                              "study-run"]
    with get_client(sync_client=True) as client:
        (artifact,) = [a for a in client.read_artifacts() if a.key == STUDY_REPORT_KEY]
    assert summary["recommendation"]["text"] in artifact.data
    assert "(file://" in artifact.data and "report.html" in artifact.data
