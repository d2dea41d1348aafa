"""The GPU pool's shared cache: a DVC S3 remote (dvc-s3) on a real S3 endpoint on loopback (moto_server, the S3
server DVC's own tests use), in a subprocess stopped by its PID.

Clone A (say, the GPU worker) runs the pipeline up to ``train`` with tiny params and pushes; clone B (a CPU machine)
clones A's commit, pulls, and ``dvc repro train`` there runs nothing: the model comes from the S3 cache.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.clones import TINY, copy_repo
from helpers.clones import git as _git

BIN = Path(sys.executable).parent
BUCKET = "detflow-cache"


@pytest.fixture()
def s3(tmp_path: Path) -> Any:
    """``moto_server`` on a free loopback port (it binds port 0 and prints the one it got), with a bucket."""
    if shutil.which("moto_server", path=str(BIN)) is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    log = tmp_path / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", "0"], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline, url = time.monotonic() + 60, None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"Running on (http://127\.0\.0\.1:\d+)", log.read_text())
            url = m.group(1) if m else None
            time.sleep(0.1)
        assert url, f"moto_server did not start: {log.read_text()[-2000:]}"
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        import boto3

        client = boto3.client("s3", endpoint_url=url, **{k.lower(): v for k, v in env.items()
                                                       if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"url": url, "env": env, "client": client}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _dvc(repo: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                               "DVC_NO_ANALYTICS": "1", "DETFLOW_NO_PROGRESS": "1"}, timeout=1200)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_one_clone_trains_and_pushes_to_s3_the_other_pulls_and_reruns_nothing(s3: dict[str, Any],
                                                                              tmp_path: Path) -> None:
    from pipeline.fileio import sha256_file

    a = copy_repo(tmp_path / "clone-a")
    params = yaml.safe_load((a / "params.yaml").read_text())
    for key, value in TINY.items():
        section, *rest = key.split(".")
        node = params[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = s3["env"]
    _dvc(a, env, "remote", "add", "-d", "gpu-pool", f"s3://{BUCKET}/detflow")
    _dvc(a, env, "remote", "modify", "gpu-pool", "endpointurl", s3["url"])  # MinIO, Ceph, moto: any S3 endpoint
    _git(a, "add", "-A")
    _git(a, "commit", "-qm", "tiny params, S3 remote")

    out = _dvc(a, env, "repro", "train")
    assert "Running stage 'train'" in out
    _dvc(a, env, "push")
    objects = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="detflow/").get("KeyCount", 0)
    assert objects > 0
    _git(a, "add", "dvc.lock")
    _git(a, "commit", "-qm", "pipeline outputs up to train")

    b = tmp_path / "clone-b"
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True)
    assert not (b / "models" / "train" / "best.pt").exists()
    _dvc(b, env, "pull", "--with-deps", "train")  # the stage and everything upstream of it
    out = _dvc(b, env, "repro", "train")
    assert "Running stage" not in out, out  # everything came from the S3 cache
    assert sha256_file(b / "models" / "train" / "best.pt") == sha256_file(a / "models" / "train" / "best.pt")
    status = _dvc(b, env, "status", "train")
    assert "up to date" in status
