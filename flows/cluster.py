"""The task runner a flow uses, chosen as ``detflow infer --cluster`` chooses its cluster (``pipeline/cluster.py``).

``None``: Prefect's default thread pool in the flow's own process. ``local:N``: prefect-dask's ``DaskTaskRunner``
with a ``LocalCluster`` of N worker processes x 1 thread, started with the flow and stopped after it.
``tcp://HOST:PORT``: a ``DaskTaskRunner`` on a running scheduler (``dask scheduler``, dask-jobqueue on Slurm,
dask-kubernetes), checked for reachability first so a wrong address fails with one line.

Prefect tasks on a Dask worker report their states to a Prefect API themselves. Local workers get the flow's API
URL (:func:`prefect_api_url`) in their environment; remote workers need ``PREFECT_API_URL`` set where they start
(a worker without it starts a temporary Prefect server of its own for every process, and its task runs do not
appear in the flow's server: :func:`check_workers` warns).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from pipeline.cluster import ClusterSpec, connect, local_cluster_kwargs, parse_cluster, quiet_distributed_logs

log = logging.getLogger(__name__)
CHECK_TIMEOUT_S = 10.0


def prefect_api_url() -> str | None:
    """The API URL this process reports to (the temporary local server's too), None when it cannot be told."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return str(client.api_url).rstrip("/")
    except Exception:  # noqa: BLE001 - no server configured and none can start: the workers will say so
        return None


def task_runner_for(cluster: str | ClusterSpec | None, *, threads: int | None = None) -> TaskRunner:
    """A task runner for ``cluster`` (see the module doc); ``threads`` sizes the default thread pool."""
    if cluster is None:
        return ThreadPoolTaskRunner(max_workers=threads)
    from prefect_dask import DaskTaskRunner

    quiet_distributed_logs()
    spec = cluster if isinstance(cluster, ClusterSpec) else parse_cluster(cluster)
    if spec.local:
        url = prefect_api_url()
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs=local_cluster_kwargs(spec.workers, env={"PREFECT_API_URL": url}
                                                                  if url else None))
    with connect(spec, CHECK_TIMEOUT_S) as client:  # one clear line when unreachable or without workers
        check_workers(client)
    return DaskTaskRunner(address=spec.address)


def check_workers(client: Any) -> dict[str, str | None]:
    """Each worker's ``PREFECT_API_URL``; a warning for those without one (see the module doc)."""
    urls: dict[str, str | None] = client.run(os.environ.get, "PREFECT_API_URL")
    missing = sorted(addr for addr, url in urls.items() if not url)
    if missing:
        log.warning("%d Dask worker(s) have no PREFECT_API_URL (%s): each will start a temporary Prefect server and "
                    "its task runs will not show in this flow's server; start workers with PREFECT_API_URL=%s",
                    len(missing), ", ".join(missing[:3]), prefect_api_url() or "<your server>/api")
    return urls
