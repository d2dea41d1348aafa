"""Atomic outputs: permissions follow the umask, groups change together, killed writers leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from pipeline.fileio import (
    atomic_directory,
    atomic_outputs,
    atomic_write_bytes,
    recover_outputs,
    remove_leftovers,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_modes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        f = atomic_write_bytes(tmp_path / "a.bin", b"x")
        with atomic_directory(tmp_path / "d") as stage:
            (stage / "inner.txt").write_text("y")
        with atomic_outputs(tmp_path / "m.onnx", tmp_path / "card.json") as (m, c):
            m.write_bytes(b"model")
            c.write_text("{}")
    finally:
        os.umask(old)
    assert _mode(f) == 0o666 & ~umask
    assert _mode(tmp_path / "d") == 0o777 & ~umask
    assert _mode(tmp_path / "d" / "inner.txt") == 0o666 & ~umask
    assert _mode(tmp_path / "m.onnx") == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "card.json", "d", "m.onnx"]


def test_group_error_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "v").write_text("1")
    (tmp_path / "report.json").write_text("1")
    with pytest.raises(RuntimeError), atomic_outputs(tmp_path / "data", tmp_path / "report.json") as (d, r):
        d.mkdir()
        (d / "v").write_text("2")
        r.write_text("2")
        raise RuntimeError("boom")
    assert (tmp_path / "data" / "v").read_text() == "1"
    assert (tmp_path / "report.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "report.json"]


def test_committed_journal_is_rolled_forward(tmp_path: Path) -> None:
    """State after a kill between the commit point and the renames: the next start finishes the swap."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "v").write_text("1")
    (tmp_path / "report.json").write_text("1")
    staged_d = tmp_path / ".data.staging.999999.0123abcd"
    staged_d.mkdir()
    (staged_d / "v").write_text("2")
    staged_r = tmp_path / ".report.json.staging.999999.4567abcd"
    staged_r.write_text("2")
    # the dataset was already swapped in, its old copy not yet removed; the report was not moved yet
    os.replace(tmp_path / "data", tmp_path / ".data.old.999999.89abcdef")
    os.replace(staged_d, tmp_path / "data")
    (tmp_path / ".data.commit.json").write_text(json.dumps({"entries": [
        {"staged": staged_d.name, "target": "data"}, {"staged": staged_r.name, "target": "report.json"}]}))
    recover_outputs(tmp_path / "data", tmp_path / "report.json")
    assert (tmp_path / "data" / "v").read_text() == "2"
    assert (tmp_path / "report.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "report.json"]


def test_leftovers_of_live_writers_are_kept(tmp_path: Path) -> None:
    live = tmp_path / f".x.staging.{os.getpid()}.0123abcd"
    dead = tmp_path / ".x.tmp.999999.0123abcd"
    legacy = tmp_path / ".x.staging.k2j4h5g6"
    other = tmp_path / ".y.tmp.999999.0123abcd"
    for p in (live, dead, legacy, other):
        p.write_text("")
    removed = remove_leftovers(tmp_path / "x")
    assert sorted(p.name for p in removed) == sorted([dead.name, legacy.name])
    assert live.exists() and other.exists()


WRITER = r"""
import sys, time
from pathlib import Path
from pipeline.fileio import atomic_outputs
root = Path(sys.argv[1])
gen = 0
while True:
    gen += 1
    with atomic_outputs(root / "data", root / "report.json") as (d, r):
        d.mkdir()
        for i in range(20):
            (d / f"f{i}").write_text(str(gen) * 1000)
        r.write_text(str(gen))
    print(gen, flush=True)
"""


def _consistent(root: Path) -> int:
    """The generation both outputs belong to; fails when they disagree or a file is partial."""
    gen = (root / "report.json").read_text()
    files = sorted((root / "data").iterdir())
    assert len(files) == 20
    assert {f.read_text() for f in files} == {gen * 1000}
    return int(gen)


@pytest.mark.parametrize("delay", [0.05, 0.13, 0.21, 0.34, 0.55])
def test_sigkill_at_random_points_leaves_one_whole_generation(tmp_path: Path, delay: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # one generation complete
    assert first.strip() == "1"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    recover_outputs(tmp_path / "data", tmp_path / "report.json")
    assert _consistent(tmp_path) >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "report.json"]
