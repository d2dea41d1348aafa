"""SIGKILL `detflow export` at points spread over its run: models/ always holds a complete model/card pair (the
previous or the new one), the next run starts by recovering, and no temporaries are left once a run completes.

Runs on the session's tiny exported model (conftest ``exported``), copied into a scratch project.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY_EXPORT

from pipeline.fileio import recover_outputs, sha256_file

BIN = Path(sys.executable).with_name("detflow")
CLI = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "pipeline.cli"]
ARGS = ["export", "--model", "best.pt", "--data", "prepared", "--reports", "reports", "--out", "models",
        "--params", str(REPO / "params.yaml"), *[a for s in TINY_EXPORT for a in ("--set", s)]]
JOURNAL = ".model.onnx.commit.json"
# what a killed export may leave: its scratch folder, staged files, atomic-write temporaries, a commit journal,
# and the tempfile folders of earlier versions
LEFTOVER = re.compile(r"^\.(export\b.*|.+\.(staging|tmp|old)\.\d+\.[0-9a-f]{8}|.+\.commit\.json)$")
OWN = re.compile(r"\.(staging|tmp|old)\.(?P<pid>\d+)\.[0-9a-f]{8}$")


def _start(root: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "DETFLOW_NO_PROGRESS": "1"}
    return subprocess.Popen([*CLI, *ARGS], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, umask=0o022)


def _leftovers(root: Path) -> list[Path]:
    return sorted(p for d in (root, root / "models", root / "reports") for p in d.iterdir() if LEFTOVER.match(p.name))


def _pair(models: Path) -> tuple[str, dict]:
    """(sha256 of model.onnx, card) after asserting the card describes this very file and this very embedding
    reference (the group model.onnx + model_card.json + embedding_reference.npy) and the engine loads them."""
    from pipeline.infer.engine import OnnxDetector

    card = json.loads((models / "model_card.json").read_text())
    sha = sha256_file(models / "model.onnx")
    assert card["sha256"] == sha, "model.onnx and model_card.json are from different exports"
    ref = card["embedding"]["reference"]
    assert ref["sha256"] == sha256_file(models / ref["file"]), "the embedding reference is from another export"
    det = OnnxDetector(models / "model.onnx", providers="CPUExecutionProvider")  # verifies checksum and graph again
    det.embedding_reference()  # and the reference against the card
    return sha, card


def _state_after_kill(root: Path, tmp: Path) -> str:
    """Check what a reader finds after a kill; a commit journal means the kill hit the publish step, then the
    pair that recovery rolls forward to (checked on a copy, the next run recovers the original) must be whole."""
    models = root / "models"
    if not (models / JOURNAL).exists():
        _pair(models)
        return "pair"
    copy = tmp / "recovered"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(models, copy, symlinks=True)
    recover_outputs(copy / "model.onnx", copy / "model_card.json", copy / "embedding_reference.npy")
    _pair(copy)
    assert not (copy / JOURNAL).exists()
    return "journal"


@pytest.fixture(scope="module")
def project(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export_crash")
    shutil.copytree(exported["prepared"], root / "prepared")
    shutil.copytree(exported["reports"], root / "reports")
    (root / "models").mkdir()
    for f in (exported["onnx"], exported["card"], exported["onnx"].with_name("embedding_reference.npy")):
        shutil.copy(f, root / "models" / f.name)
    shutil.copy(exported["best"], root / "best.pt")
    return root


def test_sigkill_leaves_a_whole_pair_and_the_next_run_recovers(project: Path, tmp_path: Path) -> None:
    root, models = project, project / "models"
    # an earlier detflow's scratch folder (tempfile, never removed after a kill), for the next run to clean
    (root / ".export-ab12cd34").mkdir()
    (root / ".export-ab12cd34" / "best.pt").write_bytes(b"x")

    # a full run: how long an export takes here, and permissions that follow the umask
    start = time.monotonic()
    p = _start(root)
    out, _ = p.communicate(timeout=600)
    runtime = time.monotonic() - start
    assert p.returncode == 0, out
    sha, _ = _pair(models)
    assert not _leftovers(root), _leftovers(root)
    for f in ("model.onnx", "model_card.json", "embedding_reference.npy"):
        assert (models / f).stat().st_mode & 0o777 == 0o644, f  # umask 022; was 0600 (tempfile)
    assert (root / "reports" / "parity.json").stat().st_mode & 0o777 == 0o644

    # kills at fixed fractions of the runtime, then at the publish step (staged model seen, journal seen)
    points: list[float | str] = [0.15, 0.35, 0.55, 0.75, 0.9, ".model.onnx.staging.", JOURNAL]
    seen = []
    shas = {sha}
    for point in points:
        p = _start(root)
        if isinstance(point, float):
            time.sleep(point * runtime)
        else:
            deadline = time.monotonic() + 3 * runtime
            while p.poll() is None and time.monotonic() < deadline \
                    and not any(f.name.startswith(point) for f in models.iterdir()):
                time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        state = _state_after_kill(root, tmp_path)
        if state == "pair":
            shas.add(sha256_file(models / "model.onnx"))
        # a run that got as far as its own temporaries had recovered first: no dead run's temporaries remain
        own = [f for f in _leftovers(root) if (m := OWN.search(f.name)) and int(m["pid"]) == p.pid]
        others = [f for f in _leftovers(root) if f not in own and f.name != JOURNAL]
        if own:
            assert not others, (point, others)
        seen.append((point, p.returncode, state, len(own)))

    # the next run recovers whatever the last kill left and completes
    p = _start(root)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    new_sha, card = _pair(models)
    assert new_sha not in shas and card["version"] == new_sha[:12]  # a fresh export (exports differ run to run)
    assert not _leftovers(root), _leftovers(root)
    assert not (root / ".export-ab12cd34").exists()
    for f in ("model.onnx", "model_card.json", "embedding_reference.npy"):
        assert (models / f).stat().st_mode & 0o777 == 0o644
    print(f"export runtime {runtime:.1f} s; kills (point, rc, state, own temporaries): {seen}")
