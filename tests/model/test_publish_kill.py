"""A kill at *every* rename of `detflow export` and `detflow prepare` (injected: SIGKILL just before rename N, for
each N of a complete run), while readers run concurrently (issue 20, acceptance 3): `detflow infer` in a loop and
a tight loop of engine loads never fail for lack of a model or a matching card, nor for lack of the dataset; after
each kill the state a reader finds is whole, and the next run recovers and completes.

The renames are counted by the same hook (``DETFLOW_FAULT_RENAME_LOG``) on a complete run first, so a run that
gains a rename is covered without editing this file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY_EXPORT

BIN = Path(sys.executable).with_name("detflow")
CLI = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "pipeline.cli"]
SETS = [a for s in TINY_EXPORT for a in ("--set", s)]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, env={**os.environ, "DETFLOW_NO_PROGRESS": "1", **env},
                          capture_output=True, text=True, timeout=900)


def _renames(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


class Readers:
    """Concurrent readers of a model (and of a dataset): `detflow infer` subprocesses one after another, and a
    thread loading the engine in a tight loop (it reaches the short windows between renames far more often)."""

    def __init__(self, cwd: Path, infer_args: list[str], model: Path) -> None:
        self.cwd, self.infer_args, self.model = cwd, infer_args, model
        self.failures: list[str] = []
        self.loads = self.infers = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._infer_loop, daemon=True),
                        threading.Thread(target=self._load_loop, daemon=True)]

    def _infer_loop(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            out = self.cwd / f".reader_out_{n % 2}"
            r = subprocess.run([*CLI, "infer", *self.infer_args, "--out", str(out), "--quiet"], cwd=self.cwd,
                               capture_output=True, text=True, env={**os.environ, "DETFLOW_NO_PROGRESS": "1"},
                               timeout=300)
            self.infers += 1
            if r.returncode != 0:
                self.failures.append(f"infer exit {r.returncode}: {r.stderr.strip()[-300:]}")

    def _load_loop(self) -> None:
        from pipeline.infer.engine import OnnxDetector

        while not self.stop.is_set():
            try:
                det = OnnxDetector(self.model, providers="CPUExecutionProvider")
                det.embedding_reference()
                self.loads += 1
            except Exception as e:  # noqa: BLE001 - any failure is what the test counts
                self.failures.append(f"load: {type(e).__name__}: {e}")

    def __enter__(self) -> Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(300)


def _whole_model(models: Path) -> str:
    """The published model as a reader finds it: loads, card matches model and reference. Returns its sha."""
    from pipeline.infer.engine import OnnxDetector

    det = OnnxDetector(models / "model.onnx", providers="CPUExecutionProvider")
    det.embedding_reference()
    return det.card["sha256"]


@pytest.fixture(scope="module")
def export_project(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kill_export")
    shutil.copytree(exported["prepared"], root / "prepared")
    shutil.copytree(exported["reports"], root / "reports")
    shutil.copy(exported["best"], root / "best.pt")
    return root


EXPORT = ["export", "--model", "best.pt", "--data", "prepared", "--reports", "reports", "--out", "models",
          "--params", str(REPO / "params.yaml"), *SETS]


@pytest.mark.slow
def test_a_kill_at_every_rename_of_export_never_leaves_readers_without_a_model(export_project: Path) -> None:
    root, models = export_project, export_project / "models"
    first = _run(EXPORT, root)  # a published model to start from (the first export has no reader to protect)
    assert first.returncode == 0, first.stderr
    log = root / "renames.log"
    steady = _run(EXPORT, root, DETFLOW_FAULT_RENAME_LOG=str(log))
    assert steady.returncode == 0, steady.stderr
    n_renames = len(_renames(log))
    assert n_renames >= 3, _renames(log)  # parity.json, the journal, the folder exchange at least
    image = next((root / "prepared" / "images" / "test").iterdir())
    outcomes = []
    with Readers(root, [str(image), "--model", "models/model.onnx"], models / "model.onnx") as readers:
        for n in range(1, n_renames + 1):
            killed = _run(EXPORT, root, DETFLOW_FAULT_KILL_AT_RENAME=str(n))
            assert killed.returncode == -signal.SIGKILL, (n, killed.returncode, killed.stderr[-500:])
            outcomes.append((n, _whole_model(models)[:8]))  # the frozen state is a whole model
        done = _run(EXPORT, root)  # recovers what the last kill left, then completes
        assert done.returncode == 0, done.stderr
        outcomes.append(("final", _whole_model(models)[:8]))
        time.sleep(2)  # the readers see the final state too
    assert readers.failures == [], readers.failures[:5]
    assert readers.loads > 20 and readers.infers >= 2, (readers.loads, readers.infers)
    assert not [p.name for p in models.iterdir() if p.name.startswith(".")], "leftovers after the final run"
    print(f"export: {n_renames} renames, kills at each: {outcomes}; {readers.loads} engine loads and "
          f"{readers.infers} infer runs meanwhile, 0 failures")


@pytest.fixture(scope="module")
def prepare_project(tmp_path_factory: pytest.TempPathFactory, small_phantom: Path, exported: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("kill_prepare")
    (root / "models").mkdir()
    from pipeline.export import publish_model

    card = json.loads(exported["card"].read_text())
    ref = card["embedding"]["reference"]
    publish_model(root / "models", {"model.onnx": exported["onnx"], "model_card.json": exported["card"],
                                    ref["file"]: exported["onnx"].with_name(ref["file"]),
                                    ref["groups"]["file"]: exported["onnx"].with_name(ref["groups"]["file"])})
    return root


def _prepare(seed: int, phantom: Path) -> list[str]:
    return ["prepare", "--params", str(REPO / "params.yaml"), "--out", "data/prepared", "--report",
            "reports/data_validation.json", "--phantom-dir", str(phantom), "--quiet", "--set", f"prepare.seed={seed}"]


def _pair(root: Path) -> str:
    """After recovery (what the next start does) the dataset and its report agree; their manifest hash."""
    from pipeline.fileio import recover_outputs

    prepared, report = root / "data" / "prepared", root / "reports" / "data_validation.json"
    recover_outputs(prepared, report)
    info = json.loads((prepared / "prepare_info.json").read_text())
    assert json.loads(report.read_text())["manifest_sha256"] == info["manifest_sha256"]
    return info["manifest_sha256"]


@pytest.mark.slow
def test_a_kill_at_every_rename_of_prepare_never_leaves_readers_without_a_dataset(prepare_project: Path,
                                                                                  small_phantom: Path) -> None:
    root = prepare_project
    assert _run(_prepare(0, small_phantom), root).returncode == 0
    log = root / "renames.log"
    assert _run(_prepare(1, small_phantom), root, DETFLOW_FAULT_RENAME_LOG=str(log)).returncode == 0
    n_renames = len(_renames(log))
    assert n_renames >= 3, _renames(log)  # the journal, the dataset folder exchange, the report
    hashes = []
    with Readers(root, ["data/prepared/coco/train.json", "--model", "models/model.onnx"],
                 root / "models" / "model.onnx") as readers:
        for n in range(1, n_renames + 1):
            killed = _run(_prepare(n + 1, small_phantom), root, DETFLOW_FAULT_KILL_AT_RENAME=str(n))
            assert killed.returncode == -signal.SIGKILL, (n, killed.returncode, killed.stderr[-500:])
            assert (root / "data" / "prepared" / "coco" / "train.json").is_file()  # never without a dataset
            hashes.append(_pair(root)[:8])
        done = _run(_prepare(99, small_phantom), root)
        assert done.returncode == 0, done.stderr
        hashes.append(_pair(root)[:8])
    assert readers.failures == [], readers.failures[:5]
    assert readers.infers >= 2
    leftovers = [p.name for d in (root / "data", root / "reports") for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    print(f"prepare: {n_renames} renames, kills at each -> manifests {hashes}; {readers.infers} infer runs, "
          "0 failures")


def test_readers_never_pair_files_of_two_publications(tmp_path: Path) -> None:
    """A writer republishes a folder of two files that must agree (a "model" and a "card" holding its hash), as
    fast as it can; readers that go through the published name with read_release never see a missing folder nor a
    mismatched pair. The same reads done path by path (a "naive" reader opening model then card) do see torn pairs,
    which shows the race is real here."""
    import hashlib

    from pipeline.fileio import TornRelease, atomic_directory, link_into_place, read_release

    models = tmp_path / "models"
    models.mkdir()

    def publish(i: int) -> None:
        with atomic_directory(models / "current") as stage:
            blob = os.urandom(64) + str(i).encode()
            (stage / "model.onnx").write_bytes(blob)
            (stage / "model_card.json").write_text(json.dumps({"sha256": hashlib.sha256(blob).hexdigest()}))

    publish(0)
    link_into_place(models / "model.onnx", "current/model.onnx")
    link_into_place(models / "model_card.json", "current/model_card.json")
    stop = threading.Event()
    counts = {"pinned": 0, "pinned_bad": 0, "naive": 0, "naive_torn": 0, "published": 0}

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            publish(i)
            counts["published"] += 1

    def check(files: dict[str, bytes | None]) -> None:
        if json.loads(files["model_card.json"] or b"{}").get("sha256") != hashlib.sha256(
                files["model.onnx"] or b"").hexdigest():
            raise TornRelease("torn")

    def pinned_reader() -> None:
        while not stop.is_set():
            try:
                _, f = read_release(models / "model.onnx", ["model.onnx", "model_card.json"], check=check)
                check(f)
                counts["pinned"] += 1
            except Exception:  # noqa: BLE001 - counted
                counts["pinned_bad"] += 1

    def naive_reader() -> None:
        while not stop.is_set():
            try:
                blob = (models / "model.onnx").read_bytes()
                card = json.loads((models / "model_card.json").read_text())
                counts["naive"] += 1
                counts["naive_torn"] += card["sha256"] != hashlib.sha256(blob).hexdigest()
            except (OSError, ValueError):
                counts["naive_torn"] += 1

    threads = [threading.Thread(target=f, daemon=True) for f in (writer, pinned_reader, pinned_reader, naive_reader)]
    for t in threads:
        t.start()
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join(30)
    assert counts["published"] > 20 and counts["pinned"] > 100, counts  # each publication fsyncs: tens per second
    assert counts["pinned_bad"] == 0, counts
    assert counts["naive_torn"] > 0, counts  # the race the pinned reader is immune to
    print(counts)
