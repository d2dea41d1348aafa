"""The serving image, really built and run: `docker/images.py build serve` (what `make images` does: Docker when an
engine answers, else buildah with a debootstrap base, offline from the wheelhouse), then the container is started
as the image's non-root user with the tiny test model mounted read-only and probed over loopback.

Layers are cached by content (the wheelhouse lock and the project wheel's sha256), so after `make images` with the
same inputs the build step is a cache hit; a fresh clone (CI) builds from scratch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from helpers import REPO

pytestmark = [pytest.mark.container, pytest.mark.slow]


def _images_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("detflow_images", REPO / "docker" / "images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


images = _images_module()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, field: str, name: str, data: bytes) -> tuple[int, dict[str, Any]]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (host /proc: buildah's chroot isolation keeps the host's pid namespace)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == pid]
        found += kids
        frontier += kids
    return found


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # real uid
    raise AssertionError(f"no Uid line for pid {pid}")


class Container:
    """One container of the serving image, run the way the engine runs it: the image's entrypoint and user."""

    def __init__(self, tool: str, image: str) -> None:
        self.tool, self.image, self.name = tool, image, f"detflow-test-{uuid.uuid4().hex[:12]}"
        self.proc: subprocess.Popen[str] | None = None
        self.cli = [tool] if tool == "docker" else [tool, *images.storage_args()]

    def config(self) -> dict[str, Any]:
        if self.tool == "docker":
            out = subprocess.run([*self.cli, "image", "inspect", "--format", "{{json .Config}}", self.image],
                                 capture_output=True, text=True, check=True).stdout
            return json.loads(out)
        out = subprocess.run([*self.cli, "inspect", "--type", "image", self.image], capture_output=True, text=True,
                             check=True).stdout
        return json.loads(out)["Docker"]["config"]

    def start(self, models: Path, args: list[str], log: Path) -> None:
        out = log.open("w")
        if self.tool == "docker":
            cmd = [*self.cli, "run", "--rm", "--name", self.name, "--network", "host", "--read-only",
                   "--tmpfs", "/tmp", "-v", f"{models}:/models:ro", self.image, *args]
        else:
            subprocess.run([*self.cli, "from", "--name", self.name, self.image], check=True, capture_output=True)
            entry = self.config()["Entrypoint"]
            # chroot isolation shares the host network: args bind loopback and a free port
            cmd = [*self.cli, "run", "--isolation", "chroot", "-v", f"{models}:/models:ro", self.name, "--",
                   *entry, *args]
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def server_pids(self) -> list[int]:
        assert self.proc is not None
        if self.tool == "docker":
            pid = subprocess.run([*self.cli, "inspect", "--format", "{{.State.Pid}}", self.name], capture_output=True,
                                 text=True, check=True).stdout.strip()
            return [int(pid), *_descendants(int(pid))]
        # the container's processes are those chrooted into its root file system (buildah's own helpers are not)
        inside = []
        for pid in _descendants(self.proc.pid):
            try:
                if os.readlink(f"/proc/{pid}/root") != "/":
                    inside.append(pid)
            except OSError:
                continue
        return inside

    def exec(self, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        """A second process in the same container (same user, same mounts)."""
        if self.tool == "docker":
            full = [*self.cli, "exec", self.name, *cmd]
        else:
            full = [*self.cli, "run", "--isolation", "chroot", "-v", f"{self.models}:/models:ro", self.name, "--", *cmd]
        return subprocess.run(full, capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            pids = _descendants(self.proc.pid)
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            for pid in pids:  # anything of ours that left the process group
                if Path(f"/proc/{pid}").exists():
                    os.kill(pid, signal.SIGKILL)
        if self.tool == "buildah":
            subprocess.run([*self.cli, "rm", self.name], capture_output=True)

    models: Path


@pytest.fixture(scope="module")
def serve_image() -> tuple[str, str]:
    """(engine, image): the serving image built as `make images` builds it (layer cache: a no-op when unchanged)."""
    tool, why = images.engine()
    if tool is None:
        pytest.skip(f"neither Docker nor buildah can run here: {why}")
    if not (images.WHEELHOUSE / "serve" / "requirements.txt").is_file():
        made = subprocess.run([sys.executable, str(REPO / "docker" / "images.py"), "wheelhouse", "serve"],
                              capture_output=True, text=True, timeout=1800)
        assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    start = time.monotonic()
    built = subprocess.run([sys.executable, str(REPO / "docker" / "images.py"), "build", "serve"],
                           capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-3000:]
    print(f"serve image build step: {time.monotonic() - start:.0f} s")
    return tool, images.image_ref(tool, "serve")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, exported: dict[str, Path]) -> Path:
    """The tiny model as an operator ships it: a folder readable by the image's user (uid 10001), not writable."""
    out = tmp_path_factory.mktemp("container-models")
    for f in (exported["onnx"], exported["card"]):
        shutil.copy(f, out / f.name)
        (out / f.name).chmod(0o644)  # export may write 0600 (owner only); the service runs as another user
    out.chmod(0o755)
    return out


@pytest.fixture(scope="module")
def container(serve_image: tuple[str, str], model_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Container, str]]:
    tool, image = serve_image
    c = Container(tool, image)
    c.models = model_dir
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("container-log") / "serve.log"
    c.start(model_dir, ["--host", "127.0.0.1", "--port", str(port)], log)
    try:
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline and c.proc is not None and c.proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "/health/ready", timeout=2) as r:
                    status = r.status
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        rc = c.proc.poll() if c.proc else None
        assert status == 200, f"container not ready (rc={rc}):\n{log.read_text()[-3000:]}"
        yield c, url
    finally:
        c.stop()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_image_config_non_root_user_port_and_healthcheck(serve_image: tuple[str, str]) -> None:
    config = Container(*serve_image).config()
    assert config["User"].split(":")[0] not in ("", "root", "0"), config["User"]
    assert "8000/tcp" in config["ExposedPorts"]
    entry = config["Entrypoint"]
    assert entry[:2] == ["detflow", "serve"] and entry[entry.index("--port") + 1] == "8000"
    assert entry[entry.index("--model") + 1].startswith("/models/")
    assert "/health/ready" in " ".join(config["Healthcheck"]["Test"])


def test_container_serves_like_the_engine(container: tuple[Container, str], exported: dict[str, Path]) -> None:
    from pipeline.infer.engine import OnnxDetector

    c, url = container
    # the server runs as the image's user, never root
    pids = c.server_pids()
    assert pids, "no process of the container found"
    assert {_uid(p) for p in pids} == {10001}, [(p, _uid(p)) for p in pids]
    engine = OnnxDetector(exported["onnx"], providers="CPUExecutionProvider")
    files = sorted((exported["prepared"] / "images" / "test").iterdir())[:4]
    expected = engine.predict([engine.decode(f).rgb for f in files])
    assert sum(len(d) for d in expected) > 0, "the tiny model should produce some boxes at the card's conf"
    for f, exp in zip(files, expected, strict=True):
        status, body = _post(url + "/v1/detect", "file", f.name, f.read_bytes())
        assert status == 200, body
        assert len(body["boxes"]) == len(exp)
        if len(exp):
            assert np.abs(np.asarray(body["boxes"]) - exp.boxes).max() < 1e-3
            assert np.abs(np.asarray(body["scores"]) - exp.scores).max() < 1e-4
            assert body["label_ids"] == exp.labels.tolist()
    status, body = _post(url + "/v1/detect", "file", "notes.txt", b"not an image at all")
    assert status == 415 and body["error"]["code"] == "unsupported_media_type", (status, body)
    status, body = _post(url + "/v1/detect", "file", "scan.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    assert 400 <= status < 500, (status, body)
    with urllib.request.urlopen(url + "/v1/model", timeout=10) as r:
        assert "CPUExecutionProvider" in json.loads(r.read())["providers"]
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert r.status == 200 and "detflow_serve_provider_active" in metrics
    # the image's own HEALTHCHECK command, pointed at this container's port, passes (python + urllib inside)
    health = c.config()["Healthcheck"]["Test"]
    assert health[0] == "CMD"
    probe = c.exec([a.replace("127.0.0.1:8000", url.removeprefix("http://")) for a in health[1:]])
    assert probe.returncode == 0, probe.stderr[-2000:]


def test_container_has_no_torch_and_a_read_only_model(container: tuple[Container, str]) -> None:
    c, _ = container
    listing = c.exec(["python", "-c", "import json, os, site, sys; d = site.getsitepackages()[0]; "
                                      "print(json.dumps([sys.prefix, os.getuid(), sorted(os.listdir(d))]))"])
    assert listing.returncode == 0, listing.stderr[-2000:]
    prefix, uid, names = json.loads(listing.stdout.strip().splitlines()[-1])
    assert prefix == "/opt/venv" and uid == 10001
    lowered = [n.lower() for n in names]
    assert {"onnxruntime", "fastapi", "uvicorn", "pipeline"} <= set(lowered)
    heavy = [n for n in lowered if n.split("-")[0] in ("torch", "torchvision", "ultralytics", "dvc", "prefect")]
    assert heavy == [], heavy
    write = c.exec(["python", "-c", "open('/models/x', 'w')"])
    assert write.returncode != 0 and ("Read-only" in write.stderr or "Permission" in write.stderr), write.stderr


def test_train_image_runs_the_cli_and_one_phantom_epoch(tmp_path: Path) -> None:
    """The training image, when `make images IMAGES="serve train"` built it (about 10 GB and 10 minutes: not in
    CI): `detflow --help`, then phantom -> prepare -> one training epoch inside, as the image's user."""
    from helpers import TINY_EXPORT

    tool, why = images.engine()
    if tool is None:
        pytest.skip(f"neither Docker nor buildah can run here: {why}")
    ref = images.image_ref(tool, "train")
    if not images.image_exists(tool, ref):
        pytest.skip(f"{ref} is not built (make wheelhouse images IMAGES=\"serve train\"); CI builds only serve")
    overrides = [a for s in [*TINY_EXPORT, "train.epochs=1"] for a in ("--set", s)]
    script = ("set -e; id -u; detflow --help >/dev/null; "
              "detflow phantom --quiet --set phantom.patients=6 --set phantom.slices=4; "
              f"detflow prepare --quiet; detflow train --quiet {' '.join(overrides)}; ls models/train")
    c = Container(tool, ref)
    if tool == "docker":
        done = subprocess.run([tool, "run", "--rm", "--network", "none", ref, "sh", "-c", script],
                              capture_output=True, text=True, timeout=1800)
    else:
        subprocess.run([*c.cli, "from", "--name", c.name, ref], check=True, capture_output=True)
        try:
            done = subprocess.run([*c.cli, "run", "--isolation", "chroot", "--workingdir", "/workspace", c.name, "--",
                                   "sh", "-c", script], capture_output=True, text=True, timeout=1800)
        finally:
            subprocess.run([*c.cli, "rm", c.name], capture_output=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.split()
    assert lines[0] != "0" and {"best.pt", "last.pt"} <= set(lines), done.stdout[-2000:]
    assert "train: yolo/" in done.stdout and "1 epochs" in done.stdout
