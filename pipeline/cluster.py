"""Which Dask cluster to run on, and a client for it: ``local:N`` (a ``LocalCluster`` of N worker processes on this
machine, one thread each) or ``tcp://HOST:PORT`` (a running scheduler: ``dask scheduler``, dask-jobqueue on Slurm,
dask-kubernetes). One parser for ``detflow infer --cluster``, the flows' task runners (``flows/cluster.py``) and
the benchmark, so the same string means the same cluster everywhere.

Importing this module does not import dask; :func:`connect` does.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, DetflowError

if TYPE_CHECKING:
    from distributed import Client

CLUSTER_FORMS = "local:N (N worker processes on this machine) or tcp://HOST:PORT (a running dask scheduler)"
_ADDRESS = re.compile(r"^(?P<proto>tcp|tls)://(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
MAX_LOCAL_WORKERS = 256
DEFAULT_TIMEOUT_S = 10.0


class ClusterError(DetflowError):
    """The scheduler cannot be reached, has no workers, or was lost during the run."""


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value: ``workers`` local processes, or the ``address`` of a running scheduler."""

    workers: int = 0
    address: str | None = None

    @property
    def local(self) -> bool:
        return self.address is None

    def __str__(self) -> str:
        return f"local:{self.workers}" if self.local else str(self.address)


def parse_cluster(value: str) -> ClusterSpec:
    """``local:N`` or ``tcp://HOST:PORT`` (``tls://`` too); anything else is a :class:`ConfigError` naming the
    allowed forms."""
    text = str(value).strip()
    if text.startswith("local:"):
        n = text.removeprefix("local:")
        if not n.isdigit() or not 1 <= int(n) <= MAX_LOCAL_WORKERS:
            raise ConfigError(f"--cluster {value!r}: the number of local workers must be 1..{MAX_LOCAL_WORKERS}")
        return ClusterSpec(workers=int(n))
    m = _ADDRESS.match(text)
    if m is None:
        raise ConfigError(f"--cluster {value!r} is not a cluster; expected {CLUSTER_FORMS}")
    if not 1 <= int(m["port"]) <= 65535:
        raise ConfigError(f"--cluster {value!r}: port must be 1..65535")
    return ClusterSpec(address=text)


def local_cluster_kwargs(workers: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``distributed.LocalCluster`` settings for ``local:N``: N processes x 1 thread on loopback, quiet logs. The
    scheduler's HTTP server (dashboard, /health) gets a free loopback port: ``dashboard_address=None`` would still
    bind 8787, another user's port on a shared machine. ``env`` is set in every worker process (the flows pass the
    Prefect API URL, so tasks report to the flow's server instead of each starting a temporary one)."""
    kwargs: dict[str, Any] = {"n_workers": workers, "threads_per_worker": 1, "processes": True,
                              "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "silence_logs": logging.ERROR}
    if env:
        kwargs["env"] = dict(env)
    return kwargs


def quiet_distributed_logs() -> None:
    """distributed sets its loggers to INFO when imported; detflow's commands print warnings only (set
    DETFLOW_LOG=INFO or DEBUG to see the scheduler's own log)."""
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        logging.getLogger("distributed").setLevel(logging.WARNING)


def _reason(e: BaseException) -> str:
    text = (str(e).splitlines() or [""])[0].strip()
    return text or type(e).__name__


@contextlib.contextmanager
def connect(spec: ClusterSpec, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Client]:
    """A ``distributed.Client`` for ``spec``; a local cluster is started here and stopped on exit.

    A scheduler that does not answer within ``timeout_s``, or that has no worker within ``timeout_s`` after
    connecting, raises :class:`ClusterError` with one line (tasks would otherwise wait forever).
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ClusterError("a Dask cluster needs dask's `distributed` package (in detflow's `train` extra: pip "
                           "install -e '.[train]'); the serving image has none") from None

    quiet_distributed_logs()
    with contextlib.ExitStack() as stack:
        if spec.local:
            cluster = stack.enter_context(LocalCluster(**local_cluster_kwargs(spec.workers)))
            client = stack.enter_context(Client(cluster, set_as_default=False))
        else:
            try:
                client = Client(spec.address, timeout=timeout_s, set_as_default=False)
            except (OSError, TimeoutError) as e:
                raise ClusterError(f"cannot reach the Dask scheduler at {spec.address} within {timeout_s:g} s "
                                   f"({_reason(e)}); start one (`dask scheduler`) or check the address") from None
            stack.enter_context(client)
            try:
                client.wait_for_workers(1, timeout=timeout_s)
            except (OSError, TimeoutError):
                raise ClusterError(f"the Dask scheduler at {spec.address} has no worker (waited {timeout_s:g} s); "
                                   f"start some: `dask worker {spec.address} --nthreads 1`") from None
        yield client


def worker_resources(client: Client) -> dict[str, dict[str, float]]:
    """Each connected worker's resources (``dask worker --resources GPU=1``), by address."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return {addr: dict(info.get("resources") or {}) for addr, info in workers.items()}
