"""Scale-out of batch inference: the same shards on 1 and 2 Dask workers, and in process, in one run.

Arms (images/s; each pass a fresh output folder, so nothing is resumed; whole passes in turn, median of --repeats):
  cluster_1x1    `detflow infer --cluster` code path (pipeline/infer/shards.py) on a LocalCluster of 1 worker x 1
                 thread: plan, submit every shard, wait, merge predictions.json / infer_errors.json / shift.json
  cluster_2x1    the same shards on 2 workers x 1 thread
  inprocess_2x1  in-process `detflow infer` with the same 2 onnxruntime threads (2 stream workers x 1 thread)
  inprocess_auto in-process with detflow's default plan (cores + 1 workers x 1 thread), for reference
Both clusters are started before timing and stay up (a production cluster is long-lived); every worker has loaded
the model in the warm-up pass.

Overheads, measured here too:
  dask_task_ms      the scheduler's cost per task: M empty tasks on the 2-worker cluster, wall time x workers / M
  prefect_task_ms   the same through Prefect tasks on a DaskTaskRunner (what the batch-inference flow runs; needs
                    the temporary Prefect server, --no-prefect skips it)
  shard_s           one shard's compute time on one worker (median, from the shard files)
From these the smallest shard size that keeps each overhead under 2 % of a shard's time, and a projection for 100
workers (shard count, scheduler load) for --archive images.

    python bench/scale_out.py --model models/model.onnx --images data/prepared/images/test --copies 8
Smoke run (tiny): python bench/scale_out.py --model M --images DIR --copies 1 --shard-size 8 --repeats 1 --tasks 50
Writes bench/results/scale_out.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved, write_result  # noqa: E402 - bench/timing.py: interleaved passes, atomic result

GOAL_2V1 = 1.8
GOAL_VS_INPROCESS = 0.9
OVERHEAD_BUDGET = 0.02


def _noop(i: int) -> int:
    return i


def _dask_task_ms(client: Any, n_workers: int, tasks: int) -> float:
    """Worker-time per empty task: wall time of ``tasks`` tasks on ``n_workers`` workers x workers / tasks."""
    client.gather(client.map(_noop, range(max(1, tasks // 10)), pure=False))  # warm-up
    t = time.perf_counter()
    client.gather(client.map(_noop, range(tasks), pure=False))
    return (time.perf_counter() - t) * n_workers / tasks * 1000


def _prefect_task_ms(n_workers: int, tasks: int) -> float | None:
    """The same through Prefect tasks on a DaskTaskRunner with a LocalCluster (the flow's path)."""
    from prefect import flow, task

    from flows.cluster import task_runner_for
    from flows.training import start_local_server

    start_local_server()

    @task(name="bench-noop")
    def noop(i: int) -> int:
        return i

    @flow(name="bench-noop-tasks")
    def many(n: int) -> float:
        [f.wait() for f in noop.map(range(max(1, n // 10)))]  # warm-up: every worker has run a task
        t = time.perf_counter()
        [f.wait() for f in noop.map(range(n))]
        return time.perf_counter() - t

    seconds = many.with_options(task_runner=task_runner_for(f"local:{n_workers}"))(tasks)
    return seconds * n_workers / tasks * 1000


def _listing(images: Path, copies: int, folder: Path) -> Path:
    from pipeline.infer.batch import collect_sources

    items = collect_sources(images)
    if not items:
        raise SystemExit(f"no images in {images}")
    lines = [str(Path(p).resolve()) for _ in range(copies) for _, _, p in items]
    path = folder / "inputs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    ap.add_argument("--images", type=Path, default=Path("data/prepared/images/test"))
    ap.add_argument("--copies", type=int, default=8, help="list every image this many times (more shards)")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=500, help="empty tasks for the scheduler's cost per task")
    ap.add_argument("--no-prefect", action="store_true", help="skip the Prefect-task overhead arm")
    ap.add_argument("--archive", type=int, default=1_000_000, help="images of the 100-worker projection")
    ap.add_argument("--out", type=Path, default=Path("bench/results/scale_out.json"))
    args = ap.parse_args(argv)

    from distributed import Client, LocalCluster

    from pipeline.cluster import ClusterSpec, local_cluster_kwargs, quiet_distributed_logs
    from pipeline.infer.batch import collect_sources, run_batch
    from pipeline.infer.engine import OnnxDetector, plan_workers
    from pipeline.infer.shards import plan_shards, run_on_cluster, settings_for

    quiet_distributed_logs()
    scratch = Path(tempfile.mkdtemp(prefix="detflow-scale-out-"))
    try:
        listing = _listing(args.images, args.copies, scratch)
        items = collect_sources(listing)
        settings = settings_for(args.model, batch=args.batch)
        shards = plan_shards(items, args.shard_size, settings, listing)
        client_side = OnnxDetector(args.model, providers="CPUExecutionProvider", threads=1)
        inproc_2 = OnnxDetector(args.model, providers="CPUExecutionProvider", threads=1)
        auto_workers, auto_threads = plan_workers(0)
        inproc_auto = OnnxDetector(args.model, providers="CPUExecutionProvider", threads=auto_threads)
        counter = iter(range(10**9))
        shard_seconds: list[float] = []

        def out() -> Path:
            return scratch / f"pass-{next(counter)}"

        clusters = {n: LocalCluster(**local_cluster_kwargs(n)) for n in (1, 2)}
        clients = {n: Client(c, set_as_default=False) for n, c in clusters.items()}
        try:
            def on_cluster(n: int) -> Callable[[], Any]:
                def run() -> Any:
                    folder = out()
                    r = run_on_cluster(client_side, items, folder, settings, ClusterSpec(workers=n),
                                       shard_size=args.shard_size, progress=False, source=listing,
                                       client=clients[n])
                    if n == 1:
                        shard_seconds.extend(json.loads(p.read_text())["seconds"]
                                             for p in (folder / "shards").glob("0*.json"))
                    shutil.rmtree(folder, ignore_errors=True)
                    return r
                return run

            def in_process(detector: Any, workers: int) -> Callable[[], Any]:
                def run() -> Any:
                    folder = out()
                    r = run_batch(detector, items, folder, batch=args.batch, progress=False, workers=workers,
                                  shift_source=str(listing))
                    shutil.rmtree(folder, ignore_errors=True)
                    return r
                return run

            arms = {"cluster_1x1": on_cluster(1), "cluster_2x1": on_cluster(2),
                    "inprocess_2x1": in_process(inproc_2, 2), "inprocess_auto": in_process(inproc_auto, auto_workers)}
            seconds = interleaved(arms, args.repeats)  # warm-up pass, then whole passes in turn
            dask_ms = _dask_task_ms(clients[2], 2, args.tasks)
        finally:
            for c in clients.values():
                c.close()
            for c in clusters.values():
                c.close()
        prefect_ms = None if args.no_prefect else _prefect_task_ms(2, max(20, args.tasks // 10))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    n = len(items)
    ips = {k: n / v for k, v in seconds.items()}
    shard_s = statistics.median(shard_seconds) if shard_seconds else float("nan")
    per_image_s = shard_s / args.shard_size
    ratios = {"cluster_2x1_over_1x1": seconds["cluster_1x1"] / seconds["cluster_2x1"],
              "cluster_2x1_over_inprocess_2x1": seconds["inprocess_2x1"] / seconds["cluster_2x1"],
              "cluster_2x1_over_inprocess_auto": seconds["inprocess_auto"] / seconds["cluster_2x1"]}
    overhead = {"dask_task_ms": dask_ms, "prefect_task_ms": prefect_ms, "shard_s": shard_s,
                "per_image_ms": per_image_s * 1000,
                "dask_fraction_of_shard": dask_ms / 1000 / shard_s,
                "prefect_fraction_of_shard": prefect_ms / 1000 / shard_s if prefect_ms is not None else None,
                "min_shard_size_dask": _min_shard(dask_ms, per_image_s),
                "min_shard_size_prefect": _min_shard(prefect_ms, per_image_s) if prefect_ms is not None else None}
    projection = _project(args.archive, 100, per_image_s, args.shard_size, dask_ms, prefect_ms)
    print(f"{n} images ({args.copies} x {n // max(1, args.copies)}), {len(shards)} shards of {args.shard_size}, "
          f"batch {args.batch}, median of {args.repeats} passes:")
    for k, v in ips.items():
        print(f"  {k:<15} {v:8.1f} images/s  ({seconds[k]:.2f} s)")
    print(f"  2 workers / 1 worker: {ratios['cluster_2x1_over_1x1']:.2f} (goal >= {GOAL_2V1})")
    print(f"  2-worker cluster / in-process 2 threads: {ratios['cluster_2x1_over_inprocess_2x1']:.2f} "
          f"(goal >= {GOAL_VS_INPROCESS}); / in-process default plan ({auto_workers} x {auto_threads}): "
          f"{ratios['cluster_2x1_over_inprocess_auto']:.2f}")
    prefect_text = f"{prefect_ms:.1f} ms (Prefect task on a DaskTaskRunner)" if prefect_ms is not None \
        else "Prefect: skipped"
    print(f"  scheduler cost per task: {dask_ms:.2f} ms (Dask), {prefect_text}"
          + f"; a shard of {args.shard_size} takes {shard_s:.3f} s on one worker ({per_image_s * 1000:.1f} ms/image)")
    print(f"  overhead / shard time: Dask {overhead['dask_fraction_of_shard']:.2%}"
          + (f", Prefect {overhead['prefect_fraction_of_shard']:.2%}" if prefect_ms is not None else "")
          + f"; smallest shard under {OVERHEAD_BUDGET:.0%}: Dask {overhead['min_shard_size_dask']} images"
          + (f", Prefect {overhead['min_shard_size_prefect']} images" if prefect_ms is not None else ""))
    print(f"  100 workers, {args.archive:,} images: {json.dumps(projection, indent=None)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"images": n, "copies": args.copies, "shard_size": args.shard_size, "shards": len(shards),
           "batch": args.batch, "repeats": args.repeats, "seconds": seconds, "images_per_s": ips,
           "ratios": {k: round(v, 3) for k, v in ratios.items()}, "goals": {"cluster_2x1_over_1x1": GOAL_2V1,
                                                                           "cluster_2x1_over_inprocess_2x1":
                                                                               GOAL_VS_INPROCESS},
           "overhead": overhead, "projection_100_workers": projection, "model": str(args.model),
           "inprocess_auto_plan": [auto_workers, auto_threads], "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0]}
    write_result(args.out, doc)
    return 0


def _min_shard(task_ms: float, per_image_s: float) -> int:
    """Smallest shard whose compute time makes ``task_ms`` at most OVERHEAD_BUDGET of it."""
    return max(1, int(-(-task_ms / 1000 // (OVERHEAD_BUDGET * per_image_s))))


def _project(images: int, workers: int, per_image_s: float, shard_size: int, dask_ms: float,
             prefect_ms: float | None) -> dict[str, Any]:
    """On paper: ``workers`` workers over ``images``, for the command line (Dask tasks) and the flow (Prefect tasks).

    Shard size: at least this run's, at least what keeps the per-task cost under the 2 % budget, at most what still
    gives every worker 10 shards (so the last wave of stragglers costs under ~10 % of the run). The scheduler's load
    is the rate at which the workers finish shards; its busy fraction uses the measured Dask cost per task (an upper
    bound: that cost also counts the worker's and the client's side).
    """
    out: dict[str, Any] = {}
    for path, ms in (("cli_dask", dask_ms), ("flow_prefect", prefect_ms)):
        if ms is None:
            continue
        size = max(shard_size, _min_shard(ms, per_image_s))
        size = max(1, min(size, images // (10 * workers)))
        shard_s = size * per_image_s
        rate = workers / shard_s
        out[path] = {"shard_size": size, "shards": -(-images // size),
                     "shards_per_worker": round(images / size / workers, 1), "shard_seconds": round(shard_s, 2),
                     "task_overhead_fraction": round(ms / 1000 / shard_s, 4), "tasks_per_s": round(rate, 1),
                     "scheduler_busy_fraction": round(rate * dask_ms / 1000, 4),
                     "run_hours": round(images * per_image_s / workers / 3600, 2)}
    return out


if __name__ == "__main__":
    sys.exit(main())
