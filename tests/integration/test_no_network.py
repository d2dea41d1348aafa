"""Air-gapped sites: importing detflow and running its stages touches neither the network nor the user's home.

Each check runs in a fresh interpreter whose ``sitecustomize`` makes every network call (DNS lookups included)
fail and records it, with ``HOME`` pointed at an empty folder and none of the variables that would move the
third-party caches (``YOLO_CONFIG_DIR``, ``MPLCONFIGDIR``, ``XDG_*``...) set: what the Makefile exports must not be
what keeps a Prefect worker or an activated venv offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO

# Loaded by `site` at interpreter start (also in any subprocess, through PYTHONPATH): every name lookup and every
# IP connection raises and is appended to $DETFLOW_TEST_NET_LOG.
SITECUSTOMIZE = '''
import json, os, socket

_LOG = os.environ["DETFLOW_TEST_NET_LOG"]


def _refuse(what, *args):
    with open(_LOG, "a") as f:
        f.write(json.dumps({"call": what, "args": repr(args)[:200], "pid": os.getpid()}) + "\\n")
    raise OSError(f"network blocked by test_no_network: {what}{args!r:.80}")


def _connect(self, address, *rest):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("socket.connect", address)
    return _real_connect(self, address, *rest)


def _connect_ex(self, address, *rest):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("socket.connect_ex", address)
    return _real_connect_ex(self, address, *rest)


_real_connect, _real_connect_ex = socket.socket.connect, socket.socket.connect_ex
socket.socket.connect, socket.socket.connect_ex = _connect, _connect_ex
socket.getaddrinfo = lambda *a, **k: _refuse("socket.getaddrinfo", *a)
socket.gethostbyname = lambda *a, **k: _refuse("socket.gethostbyname", *a)
socket.gethostbyname_ex = lambda *a, **k: _refuse("socket.gethostbyname_ex", *a)
socket.create_connection = lambda *a, **k: _refuse("socket.create_connection", *a)
'''

# Variables that would move a library's writes away from HOME (or switch its network use off) on their own.
UNSET = ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "YOLO_CONFIG_DIR", "YOLO_OFFLINE",
         "YOLO_VERBOSE", "YOLO_AUTOINSTALL", "MPLCONFIGDIR", "TORCH_HOME", "DVC_NO_ANALYTICS", "DETFLOW_WORKDIR",
         "DETFLOW_ASSETS", "PREFECT_HOME", "PYTHONSTARTUP")

IMPORT_ALL = """
import importlib, pkgutil, pipeline
names = [m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def _sandbox(tmp_path: Path) -> tuple[dict[str, str], Path, Path, Path]:
    home, work, site = tmp_path / "home", tmp_path / "project", tmp_path / "site"
    for d in (home, work, site):
        d.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = tmp_path / "network_attempts.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(HOME=str(home), DETFLOW_TEST_NET_LOG=str(net_log), DETFLOW_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    return env, home, work, net_log


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, timeout=600)
    # Decoded by hand: text=True would turn the carriage returns of a progress bar into newlines.
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _written_under(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


def _attempts(net_log: Path) -> list[dict]:
    return [json.loads(line) for line in net_log.read_text().splitlines()] if net_log.exists() else []


def test_sitecustomize_blocks_and_records(tmp_path: Path) -> None:
    """The guard itself works: a DNS lookup from the sandboxed interpreter is refused and recorded."""
    env, _, work, net_log = _sandbox(tmp_path)
    code = "import socket\ntry:\n    socket.getaddrinfo('example.org', 80)\nexcept OSError as e:\n    print(e)"
    out = _run(["-c", code], env, work).stdout
    assert "network blocked" in out
    assert [a["call"] for a in _attempts(net_log)] == ["socket.getaddrinfo"]


def _tiny_pipeline(env: dict[str, str], work: Path, epochs: int, quiet: bool) -> subprocess.CompletedProcess[str]:
    """phantom -> prepare -> a tiny from-scratch train in ``work``; returns the train process."""
    params, cli = str(REPO / "params.yaml"), ["-m", "pipeline.cli"]
    _run([*cli, "phantom", "--params", params, "--set", "phantom.patients=4", "--set", "phantom.slices=3",
          "--set", "phantom.size=128", "--quiet"], env, work)
    _run([*cli, "prepare", "--params", params, "--quiet"], env, work)
    tiny = [f"train.epochs={epochs}", "train.imgsz=64", "train.batch=8", "train.nominal_batch=8", "train.workers=0",
            "train.augment.mosaic=false", "train.pretrained=none", "train.device=cpu"]
    return _run([*cli, "train", "--params", params, *[a for s in tiny for a in ("--set", s)],
                 *(["--quiet"] if quiet else [])], env, work)


def test_imports_and_stages_stay_offline_and_out_of_home(tmp_path: Path) -> None:
    env, home, work, net_log = _sandbox(tmp_path)
    params = str(REPO / "params.yaml")
    start = time.perf_counter()
    n_modules = int(_run(["-c", IMPORT_ALL], env, work).stdout.split()[-1])
    assert n_modules >= 20
    cli = ["-m", "pipeline.cli"]
    train = _tiny_pipeline(env, work, epochs=1, quiet=True)
    _run([*cli, "evaluate", "--params", params, "--set", "evaluate.bootstrap=0", "--set", "gate.min_map50=0",
          "--set", "gate.min_cpm=0", "--set", "gate.min_sensitivity_at_1fp=0", "--quiet"], env, work)
    seconds = time.perf_counter() - start

    assert (work / "models" / "train" / "best.pt").is_file() and (work / "reports" / "metrics.json").is_file()
    assert _attempts(net_log) == [], "network calls were attempted"
    assert _written_under(home) == [], "files were written under HOME"
    # The third-party state went to the project's work folder instead.
    assert (work / ".detflow" / "ultralytics" / "Ultralytics" / "settings.json").is_file()
    settings = json.loads((work / ".detflow" / "ultralytics" / "Ultralytics" / "settings.json").read_text())
    assert settings["sync"] is False and settings["dvc"] is False
    # A quiet stage prints its one summary line.
    assert train.stdout.strip().splitlines()[-1].startswith("train: yolo/yolov5n 1 epochs")
    assert len(train.stdout.strip().splitlines()) == 1, train.stdout
    print(f"{n_modules} modules imported, 4 stages in {seconds:.1f} s")


def test_train_progress_is_one_bar(tmp_path: Path) -> None:
    """Without `--quiet`: one progress bar over the epochs (stderr, val mAP in its postfix) and the summary line;
    none of Ultralytics' argument dump, layer table or per-batch bars (`--quiet` is checked above)."""
    env, _, work, _ = _sandbox(tmp_path)
    env.pop("DETFLOW_NO_PROGRESS")
    proc = _tiny_pipeline(env, work, epochs=2, quiet=False)
    out = proc.stdout.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("train: yolo/yolov5n 2 epochs"), proc.stdout
    assert proc.stderr.count("\n") == 1, proc.stderr  # tqdm redraws one line with \r, then ends it
    states = [s.strip() for s in proc.stderr.split("\r") if s.strip()]
    assert states and all(s.startswith("train:") for s in states), proc.stderr
    assert "2/2" in states[-1] and "best mAP50=" in states[-1], states[-1]
