"""A killed `detflow prepare` leaves the previous (dataset, report) pair or the new one, never a mix, and the next
start clears every leftover."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from pipeline import fileio
from pipeline.config import load_params
from pipeline.data.prepare import prepare_dataset
from pipeline.fileio import recover_outputs

DETFLOW = str(Path(sys.executable).parent / "detflow")
LEFTOVER = re.compile(r"^\..+\.(staging|old|tmp)\.\d+\.[0-9a-f]{8}$|\.commit\.json$")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crash") / "phantom"
    subprocess.run([DETFLOW, "phantom", "--params", str(REPO / "params.yaml"), "--out", str(out), "--quiet",
                    "--set", "phantom.patients=6", "--set", "phantom.slices=4", "--set", "phantom.seed=3"],
                   check=True, capture_output=True, timeout=300)
    return out


def _cmd(work: Path, phantom: Path, seed: int) -> list[str]:
    return [DETFLOW, "prepare", "--params", str(REPO / "params.yaml"), "--out", str(work / "data" / "prepared"),
            "--report", str(work / "reports" / "data_validation.json"), "--phantom-dir", str(phantom), "--quiet",
            "--set", f"prepare.seed={seed}"]


def _pair(work: Path) -> str:
    """The manifest hash the (dataset, report) pair agrees on; fails when they describe different datasets."""
    prepared, report = work / "data" / "prepared", work / "reports" / "data_validation.json"
    info = json.loads((prepared / "prepare_info.json").read_text())
    rep = json.loads(report.read_text())
    actual = hashlib.sha256((prepared / "manifest.csv").read_bytes()).hexdigest()
    assert rep["status"] == "ok" and rep["manifest_sha256"] == info["manifest_sha256"] == actual
    return actual


def _leftovers(work: Path) -> list[str]:
    return sorted(p.name for d in (work / "data", work / "reports") if d.is_dir() for p in d.iterdir()
                  if LEFTOVER.search(p.name))


def _expected_hash(phantom: Path, seed: int, scratch: Path) -> str:
    params = load_params(REPO / "params.yaml", [f"prepare.seed={seed}"])
    prepare_dataset(params, scratch / "p", scratch / "r.json", phantom_dir=phantom, progress=False)
    return hashlib.sha256((scratch / "p" / "manifest.csv").read_bytes()).hexdigest()


def test_sigkill_at_random_points_leaves_a_whole_pair(tmp_path: Path, phantom: Path) -> None:
    work = tmp_path / "work"
    env = {**os.environ, "DETFLOW_NO_PROGRESS": "1"}
    start = time.perf_counter()
    subprocess.run(_cmd(work, phantom, 0), check=True, capture_output=True, env=env, cwd=tmp_path, timeout=300)
    runtime = time.perf_counter() - start
    previous = _pair(work)
    rng = np.random.default_rng(12)
    outcomes = []
    for i, frac in enumerate([0.25, 0.5, 0.75, 0.9, 0.98]):  # the writing happens in the last ~20%
        seed = i + 1
        new = _expected_hash(phantom, seed, tmp_path / f"scratch{seed}")
        assert new != previous
        proc = subprocess.Popen(_cmd(work, phantom, seed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, cwd=tmp_path)
        time.sleep(runtime * (frac + rng.uniform(-0.05, 0.05)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recover_outputs(work / "data" / "prepared", work / "reports" / "data_validation.json")  # the next start
        now = _pair(work)
        assert now in (previous, new)
        assert _leftovers(work) == []
        outcomes.append("new" if now == new else "previous")
        previous = now
    done = subprocess.run(_cmd(work, phantom, 9), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr and done.stdout.startswith("prepare: 24 images")
    assert _pair(work) == _expected_hash(phantom, 9, tmp_path / "scratch9")
    assert _leftovers(work) == []
    print(f"prepare runtime {runtime:.2f} s; kills left: {outcomes}")


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (no cleanup handler catches a BaseException subclass here)."""


@pytest.mark.parametrize("kill_at", range(1, 4))
def test_kill_between_the_commit_renames_rolls_forward(tmp_path: Path, small_phantom: Path,
                                                       monkeypatch: pytest.MonkeyPatch, kill_at: int) -> None:
    """Kill at each rename of the commit (the journal, the dataset folder exchanged, the report): after recovery
    the pair is the new one, with no leftovers, and the dataset folder never stopped existing. Random SIGKILLs
    rarely land in this window; this hits every step (a real SIGKILL at every rename:
    tests/model/test_publish_kill.py)."""
    out, report = tmp_path / "data" / "prepared", tmp_path / "reports" / "dv.json"
    prepare_dataset(load_params(None, []), out, report, phantom_dir=small_phantom, progress=False)
    new = _expected_hash(small_phantom, 4, tmp_path / "scratch")
    real_rename, calls = fileio._rename, []

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], exchange: bool = False) -> None:
        calls.append(dst)
        if len(calls) == kill_at:
            raise Killed
        real_rename(src, dst, exchange)
        assert out.is_dir()  # a reader never finds no dataset

    monkeypatch.setattr(fileio, "_rename", rename)
    with pytest.raises(Killed):
        prepare_dataset(load_params(None, ["prepare.seed=4"]), out, report, phantom_dir=small_phantom,
                        progress=False)
    monkeypatch.setattr(fileio, "_rename", real_rename)
    monkeypatch.setattr(fileio, "_pid_alive", lambda pid: False)  # the "killed" writer is gone
    recover_outputs(out, report)
    # rename 1 writes the journal (the commit point): killed there, the previous pair stays; after it, the new one.
    info = json.loads((out / "prepare_info.json").read_text())
    assert json.loads(report.read_text())["manifest_sha256"] == info["manifest_sha256"]
    assert (info["manifest_sha256"] == new) == (kill_at > 1)
    assert sorted(p.name for d in (out.parent, report.parent) for p in d.iterdir()
                  if LEFTOVER.search(p.name)) == []
