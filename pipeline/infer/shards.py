"""Batch inference on a Dask cluster: the source cut into shards, one task per shard, the results merged.

``detflow infer SOURCE --cluster local:N | tcp://HOST:PORT`` (:func:`run_on_cluster`, a ``distributed.Client``
straight from the command line) and the ``batch-inference`` flow with a cluster (one Prefect task per shard on a
``DaskTaskRunner``, ``flows/inference.py``) share everything here: the plan, the task body and the merge.

* **Plan.** The client lists the source once (:func:`~pipeline.infer.batch.collect_sources`) and cuts it, in
  input order, into shards of ``shard_size`` inputs (:func:`plan_shards`). A shard's id is its position plus a
  digest of its inputs and of the *run key* (model and card sha256, score threshold, batch, pixel limit,
  embeddings on/off): a shard file can only ever stand for one computation.
* **Task.** :func:`run_shard` runs on a worker. The worker process loads the model once, on its first shard
  (:func:`worker_detector`, a per-process cache keyed by the model's path and checksums), and runs each shard
  with one onnxruntime thread: a worker started with ``--nthreads N`` runs N shards at once, one core each,
  sharing one loaded model. The task writes ``OUT/shards/<id>.json`` atomically (temporary file + rename) and
  returns a small summary.
* **Exactly once.** A worker killed in the middle of a shard leaves no shard file (at most a dot-temporary that
  nothing reads); the scheduler runs the shard again on another worker. A shard computed twice (its first
  worker died after writing the file but before the scheduler heard of it) writes the same file again,
  atomically. The merge reads exactly one file per shard id of the plan, so every input appears once.
* **Merge.** :func:`merge_shards` walks the plan in order: ``predictions.json`` (streamed, the same document the
  in-process path writes), ``infer_errors.json``, and the shift test on the embeddings, subsampled exactly as in
  process (:func:`~pipeline.infer.batch.write_shift`).
* **Resume.** A shard whose file is complete and matches the plan (id, run key, inputs) is not submitted again:
  a rerun after a killed client or a failed shard computes only what is missing.

Every worker must see SOURCE's files, the model folder and OUT at the same paths (a shared file system: NFS or
Lustre on Slurm, a ReadWriteMany volume on Kubernetes; trivially so for ``local:N``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import DetflowError
from pipeline.fileio import atomic_outputs, atomic_write_json, sha256_file
from pipeline.infer.batch import (
    BatchSummary,
    Source,
    coco_patients,
    error_entry,
    item_group,
    prediction_rows,
    write_shift,
)
from pipeline.infer.engine import ModelLoadError, OnnxDetector

if TYPE_CHECKING:
    from pipeline.cluster import ClusterSpec

SHARD_DIR = "shards"
PLAN_FILE = "plan.json"
FORMAT = 1
#: Default inputs per shard of `detflow infer --cluster`, sized by bench/scale_out.py so the per-task cost stays
#: under 2 % of a shard's time: a Dask task cost 5-12 ms on the busy 2-core machine, a shard of 64 BCCD images
#: (yolov5n, 416 px, ~28 ms per image on one core) ~1.8 s, so < 1 %.
DEFAULT_SHARD_SIZE = 64
#: Default of the batch-inference flow, whose shards are Prefect tasks: each costs far more (state reports to the
#: Prefect API: ~0.5 s measured on the same busy machine), so shards must be ~1000 images for the 2 % budget.
FLOW_SHARD_SIZE = 1024


class ShardsFailed(DetflowError):
    """Some shards could not be computed; the finished ones are kept for a rerun."""


@dataclass(frozen=True)
class InferSettings:
    """What every shard task needs to reproduce the in-process run (picklable; sent with each task)."""

    model: str
    model_sha256: str
    card_sha256: str
    conf: float | None = None
    batch: int = 8
    max_pixels: int | None = None
    embeddings: bool = True
    render: bool = False
    providers: str = "auto"
    require_gpu: bool = False
    threads: int = 1  # onnxruntime intra-op threads per shard task

    def key(self) -> str:
        """The run key: what changes the results (not where or how fast they are computed)."""
        blob = json.dumps({"format": FORMAT, "model": self.model_sha256, "card": self.card_sha256, "conf": self.conf,
                           "batch": self.batch, "max_pixels": self.max_pixels, "embeddings": self.embeddings},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Shard:
    """A run of consecutive inputs: ``items`` are ``[name, image_id, path, coco_patient or None]``."""

    id: str
    index: int
    items: tuple[tuple[str, int, str, str | None], ...]

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class ClusterRun:
    """What :func:`run_on_cluster` / the flow did: the merged summary, and how the shards were obtained."""

    summary: BatchSummary
    n_shards: int
    resumed: int
    computed: int
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)  # "host:pid" -> shards, model_loads


# --- plan --------------------------------------------------------------------------------------------------------


def settings_for(model: Path, *, conf: float | None = None, batch: int = 8, max_pixels: int | None = None,
                 embeddings: bool = True, render: bool = False, providers: str = "auto",
                 require_gpu: bool = False) -> InferSettings:
    """:class:`InferSettings` for ``model`` (its card beside it), checksums computed here on the client."""
    model = Path(model).resolve()
    card = model.with_name("model_card.json")
    if not model.is_file():
        raise ModelLoadError(f"model {model} not found; run `detflow export` (or `dvc repro`)")
    if not card.is_file():
        raise ModelLoadError(f"model card {card} not found next to the model; export writes both")
    return InferSettings(model=str(model), model_sha256=sha256_file(model), card_sha256=sha256_file(card), conf=conf,
                         batch=batch, max_pixels=max_pixels, embeddings=embeddings, render=render,
                         providers=providers, require_gpu=require_gpu)


def plan_shards(items: list[Source], shard_size: int, settings: InferSettings,
                source: Path | None = None) -> list[Shard]:
    """Consecutive runs of ``shard_size`` inputs, in input order. ``source``: the SOURCE the items came from (a
    COCO split names each image's patient, for the shift test)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    coco = coco_patients(source) if settings.embeddings else {}
    key = settings.key()
    shards = []
    for index, start in enumerate(range(0, len(items), shard_size)):
        chunk = tuple((name, int(image_id), os.path.abspath(path), coco.get(name))  # no syscall per input
                      for name, image_id, path in items[start:start + shard_size])
        digest = hashlib.sha256(json.dumps([key, chunk]).encode()).hexdigest()[:12]
        shards.append(Shard(id=f"{index:06d}-{digest}", index=index, items=chunk))
    return shards


def shard_file(out: Path, shard: Shard) -> Path:
    return Path(out) / SHARD_DIR / f"{shard.id}.json"


def read_shard(out: Path, shard: Shard, settings: InferSettings) -> dict[str, Any] | None:
    """The shard's result document when its file is complete and belongs to this plan, else None."""
    path = shard_file(out, shard)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and doc.get("shard") == shard.id and doc.get("key") == settings.key() \
        and [r.get("file") for r in doc.get("results") or []] == [it[0] for it in shard.items]
    return doc if ok else None


def prepare_out(out: Path, shards: list[Shard], settings: InferSettings, source: str) -> dict[str, dict]:
    """Create ``OUT/shards/``, write the plan, drop files of other plans; return the finished shards' documents."""
    folder = Path(out) / SHARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"{s.id}.json" for s in shards} | {PLAN_FILE}
    for entry in folder.iterdir():
        if entry.name not in wanted and entry.is_file():  # another plan's shards, temporaries of dead writers
            entry.unlink(missing_ok=True)
    atomic_write_json(folder / PLAN_FILE, {
        "format": FORMAT, "source": source, "key": settings.key(), "settings": asdict(settings),
        "n_inputs": sum(len(s) for s in shards), "shards": [{"id": s.id, "n": len(s)} for s in shards]})
    done = {}
    for s in shards:
        doc = read_shard(out, s, settings)
        if doc is not None:
            done[s.id] = doc
    return done


# --- the task (runs on a worker) ----------------------------------------------------------------------------------

_DETECTORS: dict[tuple[Any, ...], OnnxDetector] = {}
_LOCK = threading.Lock()
_LOADS = 0  # models loaded by this process (the per-worker "once" is checked on it)


def tune_allocator() -> bool:
    """Keep image-sized buffers on the heap in a Dask worker started by a nanny; True when changed.

    The nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand freed memory back to the OS), which also
    pins glibc's mmap threshold at 128 KiB: every decoded image, letterbox buffer and float copy above that is then
    a fresh ``mmap`` whose pages fault in again, image after image. Measured on the same shard, interleaved: 0.36 s
    per shard in such a worker, 0.145 s after this, 0.144 s in a plain process. An inference worker reuses the same
    few buffer sizes, so: mmap threshold 64 MiB, trim threshold 256 MiB (``mallopt``, glibc only, this process only).
    """
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") is None:
        return False  # glibc's own dynamic thresholds are in effect
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 << 20) and libc.mallopt(-1, 256 << 20))  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def worker_detector(settings: InferSettings) -> tuple[OnnxDetector, int]:
    """This process's detector for ``settings`` (loaded on the first call, then shared by every shard task of the
    process, across threads) and how many models the process has loaded so far. The model this worker sees must be
    the one the client planned with: a different file at the same path (no shared file system, or a republish in
    the middle of the run) fails the shard."""
    global _LOADS
    key = (settings.model, settings.model_sha256, settings.card_sha256, settings.conf, settings.providers,
           settings.require_gpu, settings.threads)
    with _LOCK:
        detector = _DETECTORS.get(key)
        if detector is None:
            if _LOADS == 0:
                tune_allocator()
            card = Path(settings.model).with_name("model_card.json")
            if not card.is_file() or sha256_file(card) != settings.card_sha256:
                raise ModelLoadError(f"worker {socket.gethostname()} sees another model card at {card} than the "
                                     "client planned with: every worker must read the same model folder")
            detector = OnnxDetector(settings.model, providers=settings.providers, require_gpu=settings.require_gpu,
                                    threads=settings.threads)
            if detector.card["sha256"] != settings.model_sha256:
                raise ModelLoadError(f"worker {socket.gethostname()} sees another model at {settings.model}")
            if settings.conf is not None:
                detector.conf = settings.conf
            _DETECTORS.clear()  # one model per process: a new run's model replaces the last one
            _DETECTORS[key] = detector
            _LOADS += 1
        return detector, _LOADS


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


def _encode(vectors: list[np.ndarray]) -> dict[str, Any] | None:
    if not vectors:
        return None
    arr = np.ascontiguousarray(np.stack(vectors), dtype=np.float32)
    return {"dtype": "float32", "shape": list(arr.shape), "base64": base64.b64encode(arr.tobytes()).decode("ascii")}


def _decode(entry: dict[str, Any] | None) -> np.ndarray:
    if not entry:
        return np.empty((0, 0), np.float32)
    return np.frombuffer(base64.b64decode(entry["base64"]), dtype=np.float32).reshape(entry["shape"])


def run_shard(shard: Shard, settings: InferSettings, out: str) -> dict[str, Any]:
    """Predict one shard on this worker and write ``OUT/shards/<id>.json`` atomically; return its summary.

    Inputs stream through :meth:`OnnxDetector.predict_stream` exactly as in process (``batch`` per model call);
    an unreadable file is an error entry of the shard, never a failure of it.
    """
    from pipeline.infer.batch import _render

    t0 = time.perf_counter()
    detector, loads = worker_detector(settings)
    embed = settings.embeddings and detector.has_embeddings
    sources: list[tuple[str, int, Path, str | None]] = [(n, i, Path(p), g) for n, i, p, g in shard.items]
    results: list[dict[str, Any]] = []
    vectors: list[np.ndarray] = []
    groups: list[str | None] = []
    n_det = 0
    stream = detector.predict_stream(sources, batch=settings.batch, workers=1, embeddings=embed,
                                     decode=lambda it: detector.decode(it[2], it[0], settings.max_pixels).rgb)
    for r in stream:
        name, image_id, path, coco_group = r.source
        if r.error is not None:
            results.append({"file": name, "error": error_entry(name, r.error)})
            continue
        assert r.detections is not None
        rows = prediction_rows(name, image_id, r.detections, detector.classes)
        n_det += len(rows)
        results.append({"file": name, "predictions": rows})
        if r.embedding is not None:
            vectors.append(r.embedding)
            groups.append(coco_group if coco_group is not None else item_group(name, path, {}))
        if settings.render and r.rgb is not None:
            _render(r.rgb, r.detections, detector.classes, Path(out) / "rendered" / f"{Path(name).stem}.png")
    worker = {"host": socket.gethostname(), "pid": os.getpid(), "address": _worker_address(), "model_loads": loads,
              "providers": detector.providers}
    seconds = round(time.perf_counter() - t0, 4)
    doc = {"format": FORMAT, "shard": shard.id, "index": shard.index, "key": settings.key(), "results": results,
           "embeddings": _encode(vectors), "groups": groups, "worker": worker, "seconds": seconds}
    # atomic (never torn, so never half-read), not fsynced: a file lost at a power cut is recomputed (read_shard)
    atomic_write_json(shard_file(Path(out), shard), doc, durable=False)
    return {"shard": shard.id, "n": len(shard), "n_errors": sum("error" in r for r in results), "n_detections": n_det,
            "worker": worker, "seconds": seconds}


# --- merge --------------------------------------------------------------------------------------------------------


def _json_list_stream(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write a JSON list atomically, row by row, as ``atomic_write_json`` would write the whole list (same bytes)."""
    with atomic_outputs(path) as (staged,), open(staged, "w", encoding="utf-8") as f:
        first = True
        for row in rows:
            f.write("[\n" if first else ",\n")
            f.write("\n".join("  " + line for line in json.dumps(row, indent=2).splitlines()))
            first = False
        f.write("[]\n" if first else "\n]\n")


def merge_shards(detector: OnnxDetector, out: Path, shards: list[Shard], settings: InferSettings, *,
                 shift: bool = True, shift_source: str | None = None) -> BatchSummary:
    """``predictions.json``, ``infer_errors.json`` and ``shift.json`` from every shard's file, in input order.

    Memory stays bounded: predictions are streamed, and only the embeddings the shift test keeps (the same seeded
    subsample of at most :data:`~pipeline.infer.batch.MAX_TARGET` as in process) are held at once.
    """
    from pipeline.infer.batch import MAX_TARGET

    def docs() -> Iterator[dict[str, Any]]:
        for s in shards:
            doc = read_shard(out, s, settings)
            if doc is None:
                raise ShardsFailed(f"shard {s.id} has no complete result in {shard_file(out, s)}; rerun to compute it")
            yield doc

    summary = BatchSummary()
    providers: list[str] = []
    counts: list[int] = []

    def rows() -> Iterator[dict[str, Any]]:
        for doc in docs():
            n_ok = 0
            for r in doc["results"]:
                if "error" in r:
                    summary.errors.append(r["error"])
                    continue
                n_ok += 1
                summary.n_images += 1
                summary.n_detections += len(r["predictions"])
                yield from r["predictions"]
            counts.append(len(doc.get("groups") or []))
            for p in doc["worker"].get("providers") or []:
                if p not in providers:
                    providers.append(p)

    _json_list_stream(Path(out) / "predictions.json", rows())
    atomic_write_json(Path(out) / "infer_errors.json", summary.errors)
    summary.providers = providers or detector.providers
    if shift:
        n = sum(counts)
        keep = set(range(n)) if n <= MAX_TARGET else \
            set(np.sort(np.random.default_rng(0).choice(n, MAX_TARGET, replace=False)).tolist())
        vectors: list[np.ndarray] = []
        groups: list[str | None] = []
        offset = 0
        if settings.embeddings and detector.has_embeddings and n:
            for doc in docs():
                emb, doc_groups = _decode(doc.get("embeddings")), list(doc.get("groups") or [])
                for j in range(len(doc_groups)):
                    if offset + j in keep:
                        vectors.append(emb[j])
                        groups.append(doc_groups[j])
                offset += len(doc_groups)
        # the in-process path subsamples n > MAX_TARGET vectors with the same seeded choice; here the choice was
        # made first (only the kept vectors are read), so the test's own subsampling must not run again
        summary.shift, summary.shift_note = write_shift(detector, Path(out), vectors, groups,
                                                        n_skipped=len(summary.errors), source=shift_source,
                                                        n_images=n)
    return summary


# --- the command line's driver: a distributed Client --------------------------------------------------------------


def run_on_cluster(detector: OnnxDetector, items: list[Source], out: Path, settings: InferSettings,
                   spec: ClusterSpec, *,
                   shard_size: int = DEFAULT_SHARD_SIZE, timeout_s: float = 10.0, progress: bool = True,
                   source: Path | None = None, shift_source: str | None = None,
                   on_shard: Callable[[dict[str, Any]], None] | None = None, client: Any = None) -> ClusterRun:
    """``detflow infer --cluster``: plan, submit the unfinished shards to the cluster, wait, merge.

    ``detector``: the model opened on the client (card, classes and the shift reference for the merge; the
    workers open their own).

    Shards that fail (a task error, or a shard whose workers kept dying: Dask's ``KilledWorker``) do not stop the
    others; afterwards :class:`ShardsFailed` names them, and the finished shards stay on disk for a rerun.
    A lost scheduler raises :class:`~pipeline.cluster.ClusterError` the same way. ``client``: a connected
    ``distributed.Client`` to use instead of connecting to ``spec`` (bench/scale_out.py keeps its clusters up).
    """
    from tqdm import tqdm

    from pipeline.cluster import ClusterError, connect

    shards = plan_shards(items, shard_size, settings, source)
    done = prepare_out(out, shards, settings, shift_source or "")
    todo = [s for s in shards if s.id not in done]
    workers: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    finished = len(done)
    with tqdm(total=len(items), initial=sum(len(s) for s in shards if s.id in done), desc="inference", unit="img",
              disable=not progress) as bar:
        if todo:
            with contextlib.nullcontext(client) if client is not None else connect(spec, timeout_s) as client:
                from distributed import as_completed

                futures = {client.submit(run_shard, s, settings, str(Path(out).resolve()), key=f"detflow-shard-{s.id}",
                                         pure=False): s for s in todo}
                for fut in as_completed(futures, loop=client.loop):
                    s = futures[fut]
                    try:
                        result = fut.result()
                    except Exception as e:  # noqa: BLE001 - a task's own error, KilledWorker, a cancelled future
                        if client.status not in ("running", "connecting"):
                            raise ClusterError(f"lost the Dask scheduler at {spec} during the run "
                                               f"({finished} of {len(shards)} shards kept in "
                                               f"{Path(out) / SHARD_DIR}); rerun to resume") from None
                        failed.append(f"{s.id}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
                        continue
                    w = result["worker"]
                    slot = workers.setdefault(f"{w['host']}:{w['pid']}", {"address": w["address"], "shards": 0})
                    slot["shards"] += 1
                    slot["model_loads"] = w["model_loads"]
                    finished += 1
                    bar.update(result["n"])
                    if on_shard is not None:
                        on_shard(result)
    if failed:
        raise ShardsFailed(f"{len(failed)} of {len(shards)} shards failed (first: {failed[0]}); the "
                           f"{len(shards) - len(failed)} finished ones are kept in {Path(out) / SHARD_DIR}: "
                           "rerun to compute only the rest")
    summary = merge_shards(detector, out, shards, settings, shift=True, shift_source=shift_source)
    return ClusterRun(summary=summary, n_shards=len(shards), resumed=len(done), computed=len(todo), workers=workers)
