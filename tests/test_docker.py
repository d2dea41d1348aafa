"""The Docker images and compose file, checked as text (no Docker daemon needed), plus a slow check that a fresh
venv with only the `serve` extra has no torch and serves the model."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def args_of(inst: list[tuple[str, str]], name: str) -> list[str]:
    return [a for k, a in inst if k == name]


def pip_extras(commands: list[str]) -> list[str]:
    """The extras of every `pip install ... .[X]` (editable or not) in shell commands."""
    found = []
    for cmd in commands:
        for part in re.split(r"&&|;", cmd):
            if re.search(r"\bpip install\b", part):
                found += re.findall(r"""["']?-?e?\s*\.\[([^\]]*)\]["']?""", part)
    return found


def makefile_extras() -> str:
    text = (REPO / "Makefile").read_text()
    extras = re.findall(r"""pip install[^\n]*?-e\s+["']?\.\[([^\]]*)\]""", text)
    assert len(extras) == 1, extras
    return extras[0]


def exec_form(arg: str) -> list[str]:
    return json.loads(arg) if arg.startswith("[") else shlex.split(arg)


def test_serve_image_installs_only_the_serve_extra_and_runs_as_non_root() -> None:
    inst = instructions(DOCKER / "serve.Dockerfile")
    (base,) = args_of(inst, "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    runs = args_of(inst, "RUN")
    assert pip_extras(runs) == ["serve"]
    assert not any(re.search(r"pip install[^&;]*-e\b", r) for r in runs), "the serving image is not editable"
    text = " ".join(runs).lower()
    for heavy in ("torch", "ultralytics", "train", "dev]"):
        assert not re.search(rf"pip install[^&;]*{re.escape(heavy)}", text), heavy
    # copies only the package sources
    copied = {src for a in args_of(inst, "COPY") for src in a.split()[:-1] if not src.startswith("--")}
    assert copied <= {"pipeline", "pyproject.toml", "README.md"} and "pipeline" in copied, copied
    users = args_of(inst, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    # the last USER comes before the entrypoint and after every RUN (nothing runs as root at run time)
    last_user = max(i for i, (k, _) in enumerate(inst) if k == "USER")
    assert all(i < last_user for i, (k, _) in enumerate(inst) if k == "RUN")
    (health,) = args_of(inst, "HEALTHCHECK")
    assert "/health/ready" in health and "urllib" in health and "curl" not in health
    assert args_of(inst, "EXPOSE") == ["8000"]
    entry = exec_form(args_of(inst, "ENTRYPOINT")[-1])
    assert entry[:2] == ["detflow", "serve"]
    assert entry[entry.index("--host") + 1] == "0.0.0.0" and entry[entry.index("--port") + 1] == "8000"
    assert entry[entry.index("--model") + 1] == "/models/model.onnx"


def test_train_image_installs_like_make_setup() -> None:
    inst = instructions(DOCKER / "train.Dockerfile")
    (base,) = args_of(inst, "FROM")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d", base), base
    runs = args_of(inst, "RUN")
    assert pip_extras(runs) == [makefile_extras()] == ["train,serve,dev"]
    assert any(re.search(r"""pip install[^&;]*-e\s+["']\.\[train,serve,dev\]["']""", r) for r in runs)
    pip_pin = re.search(r'pip install[^\n]*"pip==([\d.]+)"', (REPO / "Makefile").read_text())
    assert pip_pin and f'"pip=={pip_pin.group(1)}"' in " ".join(runs)
    joined = " ".join(runs)
    assert "python3.11" in joined and re.search(r"apt-get install[^&]*\bgit\b", joined)
    assert "dvc --version" in joined
    assert args_of(inst, "WORKDIR")[-1] == "/workspace"
    assert exec_form(args_of(inst, "CMD")[-1]) == ["dvc", "repro"]
    assert "ln -s /workspace /opt/detflow" in joined  # where prefect.yaml's docker pool runs the flows
    users = args_of(inst, "USER")
    assert users and users[-1] not in ("root", "0")


def test_compose_file() -> None:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"prefect-server", "worker", "serve"}
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    prefect_pin = next(p.split("==")[1].split()[0] for p in pins if p.startswith("prefect=="))
    server = services["prefect-server"]
    assert server["image"] == f"prefecthq/prefect:{prefect_pin}-python3.11"
    assert server["command"][:3] == ["prefect", "server", "start"] and "0.0.0.0" in server["command"]

    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "docker/train.Dockerfile"
    assert (DOCKER / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve().is_file()
    assert worker["command"][:3] == ["prefect", "worker", "start"] and "--pool" in worker["command"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["image"] == "detflow-train:latest"
    assert any(v.endswith(":/workspace") for v in worker["volumes"])
    assert "prefect-server" in worker["depends_on"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in devices

    serve = services["serve"]
    assert serve["build"]["dockerfile"] == "docker/serve.Dockerfile"
    assert (DOCKER / serve["build"]["context"] / serve["build"]["dockerfile"]).resolve().is_file()
    assert "8000:8000" in serve["ports"]
    assert any(v.endswith(":/models:ro") for v in serve["volumes"])
    assert "/health/ready" in " ".join(serve["healthcheck"]["test"])
    assert "deploy" not in serve  # no GPU needed to serve


def test_dockerignore_keeps_outputs_and_environments_out() -> None:
    lines = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    assert {".venv", "models", "reports", "data/prepared", "data/raw", ".dvc/cache", ".dvc/config.local"} <= lines
    assert ".git" not in lines  # the train image needs the git repository for DVC


# ------------------------------------------------------------------------------------------ a real serve-only venv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _multipart(field: str, name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"




@pytest.mark.slow
def test_serve_extra_alone_has_no_torch_and_serves(tmp_path: Path, exported: dict[str, Path]) -> None:
    """What the serving image does, in a venv: install `.[serve]` from a copy of pipeline/ + pyproject + README
    (so no build output lands in the checkout), check the environment, serve the model, detect."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    install = subprocess.run([str(py), "-m", "pip", "install", "--quiet", f"{src}[serve]"], env=env,
                             capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], env=env, capture_output=True, text=True,
                            check=True).stdout
    names = {re.sub(r"[-_.]+", "-", p["name"]).lower() for p in json.loads(listed)}
    assert {"onnxruntime-gpu", "fastapi", "uvicorn", "prometheus-client", "detflow"} <= names
    assert not names & {"torch", "torchvision", "ultralytics", "ultralytics-opencv-headless", "dvc", "prefect"}

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(py.parent / "detflow"), "serve", "--model", str(exported["onnx"]), "--host",
                             "127.0.0.1", "--port", str(port), "--providers", "CPUExecutionProvider", "--workers", "2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "/health/ready", timeout=2) as r:
                    status = r.status
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        assert status == 200, f"not ready; rc={proc.poll()}"
        image = sorted((exported["prepared"] / "images" / "test").iterdir())[0]
        body, ctype = _multipart("file", image.name, image.read_bytes())
        req = urllib.request.Request(url + "/v1/detect", data=body, headers={"Content-Type": ctype}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            result = json.loads(r.read())
        assert {"boxes", "labels", "scores", "model_version", "image"} <= set(result)
        body, ctype = _multipart("file", "notes.txt", b"not an image")
        req = urllib.request.Request(url + "/v1/detect", data=body, headers={"Content-Type": ctype}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 415 and json.loads(err.value.read())["error"]["code"] == "unsupported_media_type"
        with urllib.request.urlopen(url + "/v1/model", timeout=5) as r:
            assert json.loads(r.read())["providers"] == ["CPUExecutionProvider"]
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "Traceback" not in out, out[-3000:]
