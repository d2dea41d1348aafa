"""A real Dask cluster on loopback for tests: ``dask scheduler`` and ``dask worker`` as plain processes.

The scheduler binds a free port itself (``--port 0``) and publishes its address in a scheduler file, so there is
no race for the port; every process is stopped by its PID; a leaked scheduler shuts itself down after
``IDLE_TIMEOUT_S`` idle and leaked workers follow it (``--death-timeout``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO

BIN = Path(sys.executable).parent
IDLE_TIMEOUT_S = 600
START_TIMEOUT_S = 120


class LoopbackCluster:
    """Start with :meth:`start`, add workers with :meth:`worker`, end with :meth:`stop` (always, in a finally)."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = folder / "scheduler.json"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "DETFLOW_NO_PROGRESS": "1", **(env or {})}
        self.procs: list[subprocess.Popen] = []
        self.address = ""

    def _spawn(self, args: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(self.folder / log, "ab")  # noqa: SIM115 - closed with the process (stop)
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                cwd=self.folder)
        out.close()
        self.procs.append(proc)
        return proc

    def start(self) -> str:
        self._spawn([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(self.scheduler_file), "--idle-timeout", str(IDLE_TIMEOUT_S)],
                    "scheduler.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"dask scheduler exited: {(self.folder / 'scheduler.log').read_text()[-2000:]}")
            try:
                self.address = json.loads(self.scheduler_file.read_text())["address"]
                return self.address
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        raise RuntimeError("dask scheduler did not start")

    def worker(self, name: str, resources: str | None = None, env: dict[str, str] | None = None,
               nthreads: int = 1) -> subprocess.Popen:
        """A worker process without a nanny: when it is killed it stays dead (a nanny would restart it)."""
        args = [str(BIN / "dask"), "worker", "--scheduler-file", str(self.scheduler_file), "--nthreads",
                str(nthreads), "--no-nanny", "--no-dashboard", "--host", "127.0.0.1", "--name", name,
                "--death-timeout", "60"]
        if resources:
            args += ["--resources", resources]
        return self._spawn(args, f"worker-{name}.log", env)

    def wait_workers(self, n: int, timeout_s: float = START_TIMEOUT_S) -> dict[str, dict]:
        """Block until ``n`` workers are connected; their scheduler info by address."""
        from distributed import Client

        with Client(self.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(n, timeout=timeout_s)
            return client.scheduler_info(n_workers=-1)["workers"]

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def log(self, name: str) -> str:
        path = self.folder / name
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""
