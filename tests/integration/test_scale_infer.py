"""Distributed batch inference (`detflow infer --cluster`) on a real Dask cluster on loopback.

A real ``dask scheduler`` and ``dask worker`` processes (tests/helpers/daskproc.py), the phantom's DICOM slices and the
tiny model of the session's ``exported`` fixture. To kill a worker *while* it holds a shard, one input is a named pipe
(a file on very slow storage): the worker that opens it blocks until the test feeds it the slice's bytes, so the
test knows which worker is in the middle of which shard without any hook in the code under test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.daskproc import LoopbackCluster

BIN = Path(sys.executable).parent
SHARD = 2  # inputs per shard: the phantom's 24 slices make 12 shards
WAIT_S = 120


class Gate:
    """A named pipe standing in for one input file on slow storage.

    While shut, the test holds the pipe open for writing without writing: a worker opening the input gets a file
    descriptor at once (so ``/proc/PID/fd`` shows which worker holds which gate) and blocks in read().
    :meth:`open` writes the slice's bytes and closes (the reader gets the file, then end-of-file), then serves
    the whole file to every later reader until :meth:`close`.
    """

    def __init__(self, path: Path, payload: bytes) -> None:
        self.path, self.payload = path, payload
        os.mkfifo(path)
        self._hold: int | None = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # a writer: readers wait in read()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def held_by(self, pids: list[int]) -> list[int]:
        """The processes (of ``pids``) that have the pipe open: blocked reading it while the gate is shut."""
        return [pid for pid in pids if _has_open(pid, self.path)]

    def _write(self, fd: int) -> None:
        os.set_blocking(fd, True)
        try:
            view = memoryview(self.payload)
            while view:
                view = view[os.write(fd, view):]
        except BrokenPipeError:  # a reader that wanted only the header (pydicom's PatientID read)
            pass
        finally:
            os.close(fd)

    def _serve(self) -> None:
        if self._hold is not None:
            fd, self._hold = self._hold, None
            self._write(fd)
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader opens the pipe
            except OSError:
                time.sleep(0.01)
                continue
            self._write(fd)

    def open(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._hold is not None:
            os.close(self._hold)
            self._hold = None


def _has_open(pid: int, path: Path) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False


def _scheduler_tasks(address: str) -> int:
    from distributed import Client

    with Client(address, timeout=30, set_as_default=False) as c:
        return int(c.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)))


def _wait(what: str, predicate: Any, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _infer(args: list[str], **kw: Any) -> subprocess.Popen:
    env = {**os.environ, "DETFLOW_NO_PROGRESS": "1"}
    return subprocess.Popen([str(BIN / "detflow"), "infer", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


def _finish(proc: subprocess.Popen, timeout_s: float = WAIT_S) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out, err


def _shard_files(out: Path) -> dict[str, Path]:
    return {p.stem: p for p in (out / "shards").glob("0*.json")}


def _stat(paths: dict[str, Path]) -> dict[str, tuple[int, int]]:
    return {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in paths.items()}


def _boxes_equal(a: list[dict], b: list[dict], names_a: list[str], names_b: list[str], tol: float = 1e-4) -> None:
    """The same detections in the same order; inputs are compared by position (a gated slice's name is its pipe)."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert (names_a.index(ra["file_name"]), ra["image_id"], ra["category_id"]) == \
            (names_b.index(rb["file_name"]), rb["image_id"], rb["category_id"])
        assert np.allclose(ra["bbox"], rb["bbox"], atol=tol) and abs(ra["score"] - rb["score"]) <= tol


def _each_input_once(out: Path, names: list[str]) -> list[dict]:
    """Every input in exactly one shard result (merged by shard id), and the merged outputs reconcile."""
    seen: list[str] = []
    docs = [json.loads(p.read_text()) for p in sorted(_shard_files(out).values())]
    for doc in docs:
        seen += [r["file"] for r in doc["results"]]
    assert seen == names  # once each, in input order
    preds = json.loads((out / "predictions.json").read_text())
    errors = json.loads((out / "infer_errors.json").read_text())
    per_doc = sum(len(r.get("predictions", [])) for d in docs for r in d["results"])
    assert len(preds) == per_doc and errors == []
    return docs


@pytest.fixture(scope="module")
def sources(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("scale")
    slices = sorted(str(p) for p in exported["phantom"].rglob("*.dcm"))
    assert len(slices) == 24
    return {"root": root, "slices": slices, "onnx": exported["onnx"], "phantom": exported["phantom"]}


def _gated_list(folder: Path, slices: list[str], gated: list[int]) -> tuple[Path, list[str], list[Gate]]:
    """A file list of the slices where the slices at ``gated`` positions are named pipes serving their bytes."""
    folder.mkdir(parents=True)
    names, gates = list(slices), []
    for i in gated:
        gate = Gate(folder / f"gate_{i}.dcm", Path(slices[i]).read_bytes())
        names[i] = str(gate.path)
        gates.append(gate)
    listing = folder / "inputs.txt"
    listing.write_text("\n".join(names) + "\n")
    return listing, names, gates


@pytest.mark.slow
def test_worker_killed_mid_shard_then_client_killed_and_resumed(sources: dict[str, Any]) -> None:
    root, onnx = sources["root"], str(sources["onnx"])
    cluster = LoopbackCluster(root / "cluster")
    try:
        address = cluster.start()
        w1, w2 = cluster.worker("w1"), cluster.worker("w2")
        cluster.wait_workers(2)

        # --- a worker dies in the middle of a shard -------------------------------------------------------------
        listing, names, (gate,) = _gated_list(root / "a", sources["slices"], [8])
        out = root / "a" / "out"
        client = _infer([str(listing), "--model", onnx, "--out", str(out), "--cluster", address, "--shard-size",
                         str(SHARD), "--quiet"])
        holder = _wait("a worker blocked on the gated input", lambda: gate.held_by([w1.pid, w2.pid]))[0]
        _wait("every other shard", lambda: len(_shard_files(out)) == 11)
        victim = w1 if holder == w1.pid else w2
        survivor = w2 if victim is w1 else w1
        cluster.kill(victim)  # SIGKILL while it holds shard 4
        gate.open()  # the scheduler hands the shard to the survivor, which can now read the input
        rc, stdout, stderr = _finish(client)
        gate.close()
        assert rc == 0, stderr
        assert "24 images, " in stdout and "0 skipped" in stdout and "12 shards, 12 computed, 0 resumed" in stdout
        docs = _each_input_once(out, names)
        n_det = int(re.search(r"24 images, (\d+) detections, 0 skipped", stdout).group(1))
        assert n_det == len(json.loads((out / "predictions.json").read_text()))  # the summary reconciles
        assert docs[4]["worker"]["pid"] == survivor.pid  # recomputed on the other worker
        loads = {d["worker"]["pid"]: d["worker"]["model_loads"] for d in docs}
        assert loads[survivor.pid] == 1 and all(d["worker"]["model_loads"] == 1 for d in docs)  # once per worker

        # the same inputs in process (2 workers x 1 thread, the engine's streaming path)
        ref = root / "a" / "ref"
        gate.open()
        rc, _, stderr = _finish(_infer([str(listing), "--model", onnx, "--out", str(ref), "--workers", "2",
                                        "--quiet"]))
        gate.close()
        assert rc == 0, stderr
        expected = json.loads((ref / "predictions.json").read_text())
        assert expected, "the tiny model should detect something on the phantom"
        _boxes_equal(json.loads((out / "predictions.json").read_text()), expected, names, names)
        ref_names = names
        shift, ref_shift = (json.loads((d / "shift.json").read_text()) for d in (out, ref))
        assert shift["statistic"] == pytest.approx(ref_shift["statistic"], abs=1e-9)
        assert shift["p_value"] == ref_shift["p_value"] and shift["n_images"] == 24

        # --- the client dies; the rerun resumes ---------------------------------------------------------------------
        w3 = cluster.worker("w3")  # the cluster heals: two workers again
        cluster.wait_workers(2)
        live = [survivor.pid, w3.pid]
        # three gated shards for two workers: when both workers are blocked, the third cannot have started
        listing, names, gates = _gated_list(root / "b", sources["slices"], [6, 8, 10])  # shards 3, 4, 5
        out = root / "b" / "out"
        client = _infer([str(listing), "--model", onnx, "--out", str(out), "--cluster", address, "--shard-size",
                         str(SHARD), "--quiet"])
        _wait("each worker blocked on a gated input",
              lambda: sorted(p for g in gates for p in g.held_by(live)) == sorted(live))
        client.send_signal(signal.SIGKILL)
        client.communicate(timeout=30)
        held = [g for g in gates if g.held_by(live)]
        for g in held:  # the killed client's running shards still finish on their workers, and are kept
            g.open()
        running = {names.index(str(g.path)) // SHARD for g in held}
        assert len(held) == 2
        _wait("the running shards to land", lambda: {int(k[:6]) for k in _shard_files(out)} >= running)
        _wait("the scheduler to forget the dead client's tasks", lambda: _scheduler_tasks(address) == 0)
        for g in gates:
            g.open()  # the rerun reads the third gated input too
        kept = _stat(_shard_files(out))
        rc, stdout, stderr = _finish(_infer([str(listing), "--model", onnx, "--out", str(out), "--cluster", address,
                                             "--shard-size", str(SHARD), "--quiet"]))
        for g in gates:
            g.close()
        assert rc == 0, stderr
        assert f"12 shards, {12 - len(kept)} computed, {len(kept)} resumed" in stdout
        assert 12 - len(kept) > 0
        after = _stat(_shard_files(out))
        assert {k: after[k] for k in kept} == kept  # not one finished shard was written again
        _each_input_once(out, names)
        _boxes_equal(json.loads((out / "predictions.json").read_text()), expected, names, ref_names)
    finally:
        cluster.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_is_one_line(sources: dict[str, Any], tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = _infer([sources["slices"][0], "--model", str(sources["onnx"]), "--out", str(tmp_path / "o"),
                   "--cluster", f"tcp://127.0.0.1:{_free_port()}", "--cluster-timeout", "2"])
    rc, stdout, stderr = _finish(proc)
    assert rc == 1 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:")
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "o" / "predictions.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--cluster", "local:0"], "number of local workers must be 1..256"),
    (["--cluster", "127.0.0.1:8786"], "expected local:N"),
    (["--cluster", "local:2", "--workers", "3"], "--workers is for in-process inference"),
])
def test_bad_cluster_options_are_usage_errors(sources: dict[str, Any], tmp_path: Path, args: list[str],
                                              message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import run

    assert run(["infer", sources["slices"][0], "--model", str(sources["onnx"]), "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_shard_computed_twice_is_merged_once(sources: dict[str, Any], tmp_path: Path) -> None:
    """A worker that dies after writing its shard file but before the scheduler hears of it: the shard runs again
    elsewhere and writes the same file again. The merge reads one file per shard id: nothing is doubled. A torn
    temporary of a killed writer and a shard file of another plan are never read."""
    from pipeline.infer.batch import collect_sources, run_batch
    from pipeline.infer.engine import OnnxDetector
    from pipeline.infer.shards import (
        merge_shards,
        plan_shards,
        prepare_out,
        read_shard,
        run_shard,
        settings_for,
        shard_file,
    )

    folder = tmp_path / "slices"
    folder.mkdir()
    for i, p in enumerate(sources["slices"][:10]):
        shutil.copy(p, folder / f"{i:02d}_{Path(p).name}")
    (folder / "broken.dcm").write_bytes(b"DICM" * 10)  # an unreadable input: an error entry, not a failure
    items = collect_sources(folder)
    settings = settings_for(sources["onnx"], batch=4)
    shards = plan_shards(items, 3, settings, folder)
    out = tmp_path / "out"
    assert prepare_out(out, shards, settings, str(folder)) == {}
    loads = [run_shard(s, settings, str(out))["worker"]["model_loads"] for s in shards]
    assert len(set(loads)) == 1  # this process loaded the model once for all shards
    again = run_shard(shards[1], settings, str(out))  # the recomputation
    assert again["n"] == 3 and read_shard(out, shards[1], settings) is not None
    torn = shard_file(out, shards[2]).with_name(f".{shards[2].id}.json.tmp.999999.deadbeef")
    torn.write_text('{"shard": "')
    other = settings_for(sources["onnx"], batch=4, conf=0.5)  # another plan: its key differs
    assert read_shard(out, shards[0], other) is None

    detector = OnnxDetector(sources["onnx"], threads=1)
    summary = merge_shards(detector, out, shards, settings, shift_source=str(folder))
    reference = run_batch(OnnxDetector(sources["onnx"], threads=1), items, tmp_path / "ref", batch=4,
                          progress=False, workers=1, shift_source=str(folder))
    assert (out / "predictions.json").read_bytes() == (tmp_path / "ref" / "predictions.json").read_bytes()
    assert json.loads((out / "infer_errors.json").read_text()) == reference.errors and len(reference.errors) == 1
    assert summary.n_images == reference.n_images == 10 and summary.n_detections == reference.n_detections
    assert json.loads((out / "shift.json").read_text())["statistic"] == \
        json.loads((tmp_path / "ref" / "shift.json").read_text())["statistic"]

    # resume: finished shards are found again, a missing one is not
    shard_file(out, shards[3]).unlink()
    done = prepare_out(out, shards, settings, str(folder))
    assert sorted(done) == sorted(s.id for s in shards if s is not shards[3])
    assert not torn.exists()  # stray temporaries are cleared when a run starts


def test_local_cluster_equals_in_process(sources: dict[str, Any], tmp_path: Path) -> None:
    """`--cluster local:2`: the same predictions.json, byte for byte, as the in-process run; a rerun resumes every
    shard without starting a cluster."""
    from pipeline.cli import run

    args = [str(sources["phantom"]), "--model", str(sources["onnx"]), "--quiet"]
    assert run(["infer", *args, "--out", str(tmp_path / "ref"), "--workers", "2"]) == 0
    assert run(["infer", *args, "--out", str(tmp_path / "c"), "--cluster", "local:2", "--shard-size", "5"]) == 0
    assert (tmp_path / "c" / "predictions.json").read_bytes() == (tmp_path / "ref" / "predictions.json").read_bytes()
    before = _stat(_shard_files(tmp_path / "c"))
    assert run(["infer", *args, "--out", str(tmp_path / "c"), "--cluster", "local:2", "--shard-size", "5"]) == 0
    assert _stat(_shard_files(tmp_path / "c")) == before
