"""`detflow study` end to end in a scratch git + DVC checkout of this repository: every arm a DVC experiment that
`dvc exp show --json` lists with its params and metrics, a study killed mid-arm resumes without retraining the done
arms, and bad study input stops with one `error:` line before anything is queued or trained."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.study import BIN, make_checkout
from helpers.study import study_env as _env


def detflow(root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 900
            ) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "detflow"), *args], cwd=root, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def exp_show(root: Path) -> dict[str, dict[str, Any]]:
    out = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=root, env=_env(), capture_output=True,
                         text=True, check=True).stdout
    found = {}
    for base in json.loads(out):
        for exp in base.get("experiments") or []:
            found[exp["name"]] = exp
    return found


def _pid_alive(pid: int | None) -> bool:
    """A running process (a zombie, killed but not yet reaped by its parent, is not alive)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _gone(pid: int | None, within_s: float = 10.0) -> bool:
    """``pid`` has stopped running within ``within_s`` seconds (SIGKILL is delivered asynchronously)."""
    end = time.monotonic() + within_s
    while _pid_alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def _state(exp: dict[str, Any]) -> str:
    return (exp.get("executor") or {}).get("state") or "success"


@pytest.mark.slow
def test_arms_are_dvc_experiments_and_a_killed_study_resumes(tmp_path: Path) -> None:
    from pipeline.study.queue import experiments

    root = make_checkout(tmp_path / "repo", lambda p: None)
    plan = detflow(root, "study", "run", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    names = [line.split()[0] for line in plan.stdout.splitlines() if line.startswith("fine_tune-scratch-")]
    assert len(names) == 2 and names[0].startswith("fine_tune-scratch-f50-s0-"), plan.stdout
    assert names[1].startswith("fine_tune-scratch-f100-s0-")

    # the 100 % arm alone first (an arm's name does not depend on the other arms: the same experiment later)
    first = detflow(root, "study", "run", "--quiet", "--set", "study.fractions=[1.0]")
    assert first.returncode == 0 and "0 already done, 1 queued" in first.stdout, first.stdout + first.stderr
    first_rev = experiments(root)[1][names[1]].rev

    # the whole study; kill everything (the command, DVC's worker and the arm it trains) while the 50 % arm runs
    study = subprocess.Popen([str(BIN / "detflow"), "study", "run", "--quiet"], cwd=root, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.monotonic() + 900, False
    while time.monotonic() < deadline and not killed and study.poll() is None:
        time.sleep(1)
        st = experiments(root)[1].get(names[0])
        if st is not None and st.state == "running" and st.pid:
            os.killpg(os.getpgid(st.pid), signal.SIGKILL)  # the worker's process group: worker, exp run, stages
            study.kill()
            killed = True
    study.wait(timeout=60)
    assert killed, f"never saw the 50 % arm running: {study.stdout.read() if study.stdout else ''}"
    st = experiments(root)[1][names[0]]
    assert st.state == "running" and _gone(st.pid)  # DVC still lists it as running; its process is gone

    again = detflow(root, "study", "run", "--quiet")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 already done, 0 queued, 1 queued again (failed or interrupted)" in again.stdout, again.stdout
    exps = exp_show(root)
    assert {n: _state(exps[n]) for n in names} == {n: "success" for n in names}
    assert exps[names[1]]["revs"][0]["rev"] == first_rev  # the finished arm was not trained again
    for name, fraction in zip(names, (0.5, 1.0), strict=True):
        data = exps[name]["revs"][0]["data"]
        assert data["params"]["params.yaml"]["data"]["train"]["fraction"] == fraction
        assert data["params"]["params.yaml"]["data"]["gate"]["min_map50"] == 0
        assert "map50" in data["metrics"]["reports/metrics.json"]["data"]
        assert data["metrics"]["reports/train/metrics.json"]["data"]["optimizer_steps"] >= 1

    # one test split for every arm: every experiment's dvc.lock records the checkout's prepared dataset
    def prepared_hash(rev: str) -> str:
        lock = subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=root, capture_output=True, text=True,
                              check=True).stdout
        (out,) = [o for o in yaml.safe_load(lock)["stages"]["prepare"]["outs"] if o["path"] == "data/prepared"]
        return out["md5"]

    workspace = [o for o in yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
                 if o["path"] == "data/prepared"][0]["md5"]
    assert {prepared_hash(exps[n]["revs"][0]["rev"]) for n in names} == {workspace}
    # `dvc plots diff` compares arms (the evaluate stage's FROC curve, the training curves)
    diff = subprocess.run([str(BIN / "dvc"), "plots", "diff", *names, "--json"], cwd=root, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert diff.returncode == 0, diff.stderr
    plots = json.loads(diff.stdout)["data"]
    assert set(plots["reports/plots/froc.json"][0]["revisions"]) == set(names)

    # nothing left to do: the same command is a no-op
    third = detflow(root, "study", "run", "--quiet")
    assert third.returncode == 0 and "2 already done, 0 queued" in third.stdout, third.stdout + third.stderr
    # a smaller study in the same checkout counts its own arms only (the others are experiments here too)
    sub = detflow(root, "study", "run", "--quiet", "--set", "study.fractions=[1.0]")
    assert sub.returncode == 0 and "study: 1/1 arms done" in sub.stdout, sub.stdout + sub.stderr

    report = detflow(root, "study", "report", "--quiet")
    assert report.returncode == 0, report.stdout + report.stderr
    results = json.loads((root / "reports" / "study" / "results.json").read_text())
    assert [a["name"] for a in results["arms"]] == names and results["missing"] == []
    by_name = {a["name"]: a for a in results["arms"]}
    for name in names:
        metrics = exps[name]["revs"][0]["data"]["metrics"]["reports/metrics.json"]["data"]
        assert by_name[name]["map50"] == metrics["map50"]
        assert by_name[name]["train_images"] < 100 and by_name[name]["optimizer_steps"] >= 1
    assert by_name[names[0]]["train_images"] < by_name[names[1]]["train_images"]
    assert results["recommendation"]["text"] and (root / "reports" / "study" / "report.html").is_file()
    # the run report picks the study up
    page = detflow(root, "report", "--out", "reports/report.html")
    assert page.returncode == 0, page.stderr
    assert 'id="study-arms"' in (root / "reports" / "report.html").read_text()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkout(tmp_path_factory.mktemp("bad") / "repo", lambda p: None)


def _nothing_queued(root: Path) -> None:
    assert not (root / "models").exists()  # nothing trained
    out = subprocess.run([str(BIN / "dvc"), "queue", "status"], cwd=root, env=_env(), capture_output=True, text=True)
    assert "Queued" not in out.stdout and "Running" not in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("sets", "code", "expected"), [
    (["study.fractions=[0]"], 2, "study.fractions: 0 is not in (0, 1]"),
    (["study.fractions=[1.5]"], 2, "study.fractions: 1.5 is not in (0, 1]"),
    (["study.recipes={ft: {strateg: fine_tune}}"], 2, "study.recipes.ft: unknown train key 'strateg'; expected one "
                                                      "of: "),
    (["study.recipes={ft: {strategy: freeze_all}}"], 2, "study.recipes.ft: strategy: Input should be"),
    (["study.recipes={ft: {epochs: 3}}"], 2, "study.recipes.ft: 'epochs' is set by the study itself"),
    (["study.steps=100"], 2, "study: set exactly one budget rule"),
    (["study.init=[coco, imagenet]"], 2, "study.init: unknown initialisation 'imagenet'"),
    (["train.epochs=3"], 2, "`detflow study` takes study.* overrides only"),
])
def test_bad_study_input_is_one_line_before_any_training(checkout: Path, sets: list[str], code: int,
                                                         expected: str) -> None:
    args = [x for s in sets for x in ("--set", s)]
    r = detflow(checkout, "study", "run", *args)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == code, r.stdout + r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    _nothing_queued(checkout)


@pytest.mark.slow
def test_no_coco_weights_with_init_coco_is_one_line(checkout: Path, tmp_path: Path) -> None:
    r = detflow(checkout, "study", "run", "--set", "study.init=[coco]", env=_env(DETFLOW_ASSETS=str(tmp_path)))
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: study.init includes coco but the COCO weights for yolov5n (yolov5n-coco) "
                               "cannot be resolved"), lines
    _nothing_queued(checkout)


@pytest.mark.slow
def test_a_class_or_val_split_that_would_be_empty_is_one_line(tmp_path: Path) -> None:
    """A COCO dataset where class b is in 4 of 30 images: a tenth of the train split holds none of them. And with
    prepare.val_fraction 0, the val split is empty."""
    from PIL import Image

    def edit(params: dict[str, Any]) -> None:
        params["data"]["source"] = "site"
        params["prepare"].update(split="patient")

    root = tmp_path / "repo"
    site = root / "site"
    site.mkdir(parents=True)
    images, anns = [], []
    for i in range(1, 31):
        Image.new("RGB", (48, 48), (i * 7 % 255, 80, 120)).save(site / f"im{i:02d}.png")
        images.append({"id": i, "file_name": f"im{i:02d}.png", "width": 48, "height": 48})
        for c in [1] + ([2] if i % 8 == 0 else []):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [4 + 8 * c, 6, 10, 10],
                         "area": 100, "iscrowd": 0})
    (site / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    make_checkout(root, edit)
    r = detflow(root, "study", "run", "--set", "study.fractions=[0.1, 1.0]")
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, lines
    assert "no image of class b; use a larger fraction (at least" in lines[0] and lines[0].startswith("error: ")
    _nothing_queued(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"]["val_fraction"] = 0.0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = detflow(root, "study", "run")
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "the val split of" in lines[0] and "is empty" in lines[0], lines
    _nothing_queued(root)


def test_queue_start_returns_while_its_worker_runs(tmp_path: Path) -> None:
    """`dvc queue start` must not wait for its worker: DVC forks a helper per worker that holds the command's
    stdout/stderr, so a caller reading pipes returned only when the worker had run the whole queue (an empty queue's
    worker idles ~10 s; a study's runs every arm). start_workers returns while the worker it started still lives."""
    from pipeline.study.queue import start_workers

    root = tmp_path / "repo"
    root.mkdir()
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], ["git", "commit", "-qm", "dvc init"]):
        subprocess.run(cmd, cwd=root, env=_env(), check=True, capture_output=True)
    assert start_workers(root, 1) is True
    pidfile = root / ".dvc" / "tmp" / "exps" / "celery" / "dvc-exp-worker-1.pid"
    pid = int(pidfile.read_text())
    try:
        assert _pid_alive(pid), "start_workers returned only after its worker had exited"
    finally:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGTERM)  # the worker this test started, by its recorded pid
