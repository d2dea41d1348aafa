"""A throwaway Orthanc PACS on loopback, for tests, benchmarks and trying ``detflow pacs`` out.

Debian's ``orthanc`` + ``orthanc-dicomweb`` run as an ordinary process: a config file with its own HTTP and DICOM
ports (free ones, picked at start), its own storage folder, ``RemoteAccessAllowed: false`` (it answers 127.0.0.1
only) and the DICOMweb plugin under ``/dicom-web/``. :class:`LocalOrthanc` is started and stopped by its PID
(never by name: other Orthancs may run beside it). ``users`` turns on HTTP basic authentication
(``AuthenticationEnabled`` + ``RegisteredUsers``), for the 401 path.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import DetflowError

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def missing_tools() -> list[str]:
    """What is not installed of Orthanc and its DICOMweb plugin (empty when a LocalOrthanc can start)."""
    out = [] if shutil.which(ORTHANC) else ["orthanc (Orthanc binary)"]
    return out + ([] if DICOMWEB_PLUGIN.is_file() else [f"orthanc-dicomweb ({DICOMWEB_PLUGIN})"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalOrthanc:
    """``with LocalOrthanc(folder) as pacs: pacs.dicomweb`` -> ``http://127.0.0.1:PORT/dicom-web``."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None, startup_timeout_s: float = 60.0) -> None:
        self.folder = Path(folder)
        self.users = dict(users or {})
        self.startup_timeout_s = startup_timeout_s
        self.http_port = 0
        self.dicom_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> LocalOrthanc:
        if missing := missing_tools():
            raise DetflowError(f"cannot start Orthanc: not installed: {', '.join(missing)} "
                               "(apt-get install orthanc orthanc-dicomweb)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        config = {
            "Name": "detflow-local", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users, "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpCompressionEnabled": False,  # loopback: compressing pixels costs CPU and saves nothing
            "KeepAlive": True, "KeepAliveTimeout": 60,
        }
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process.poll() is not None:
                tail = (self.folder / "orthanc.log").read_text(errors="replace")[-2000:]
                raise DetflowError(f"Orthanc exited at start (code {self.process.returncode}):\n{tail}")
            try:
                self.get("/system")
                return self
            except urllib.error.HTTPError:
                return self  # it answers (401 without credentials is an answer)
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise DetflowError(f"Orthanc did not answer on port {self.http_port} within "
                                       f"{self.startup_timeout_s:.0f} s") from None
                time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM (Orthanc flushes its index), SIGKILL after 20 s; by PID only."""
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ Orthanc's own REST API (test helpers)

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
        if content_type:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance (Orthanc id)."""
        req = urllib.request.Request(f"{self.url}/instances/{instance_id}/file")
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=30) as r:
            return bytes(r.read())

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def upload(self, files: Iterable[Path]) -> int:
        """POST each file to ``/instances`` (Orthanc's REST store); returns how many it accepted."""
        n = 0
        for f in files:
            self._request("POST", "/instances", Path(f).read_bytes(), "application/dicom")
            n += 1
        return n

    def instances(self, modality: str | None = None) -> list[dict[str, Any]]:
        """Every stored instance (its main tags), optionally of one modality (series level)."""
        query = {"Level": "Instance", "Query": {"Modality": modality} if modality else {}, "Expand": True}
        return self._request("POST", "/tools/find", json.dumps(query).encode(), "application/json")

    def delete_all(self) -> None:
        for study in self.get("/studies"):
            self._request("DELETE", f"/studies/{study}")

