"""`OnnxDetector`: the onnxruntime inference engine used by batch inference and the HTTP service.

It never imports torch. It loads ``model.onnx`` with its ``model_card.json``, verifies the checksum and the
card against the graph, chooses execution providers and reports the ones actually active (onnxruntime-gpu
silently falls back to CPU when CUDA libraries are missing), and runs the shared pre/post-processing.

The model, its card and the files the card names beside it are read at once, through one open handle of the
folder that holds the model (links resolved: ``models/model.onnx`` leads to the published ``models/current/``),
so a concurrent ``detflow export`` can never pair a new model with an old card (:func:`pipeline.fileio.read_release`).
onnxruntime is imported only through :func:`import_onnxruntime`, which turns its telemetry off first.

Size: one class, the whole inference path (session and providers, decoding, batching, post-processing,
streaming workers, embeddings); split, the path a request takes would be spread over files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, overload

import numpy as np

from pipeline.contracts.card import CardError, ModelCard, check_threshold, parse_card
from pipeline.contracts.embedding import EMBEDDING_OUTPUT
from pipeline.errors import DetflowError
from pipeline.families import FAMILIES, FamilySpec, artifact_family
from pipeline.infer.processing import Detections, InputScaling, preprocess, shape_groups

log = logging.getLogger(__name__)


class ModelLoadError(DetflowError):
    """The model or its card is missing, corrupt, or inconsistent."""


class ProviderError(DetflowError):
    """A required execution provider is not active."""


class EmbeddingsUnavailable(DetflowError):
    """The model has no embedding output or no usable reference sample (exported before shift detection)."""


def import_onnxruntime() -> Any:
    """``import onnxruntime`` with its telemetry off. onnxruntime >= 1.29 on Linux writes a device id and an event
    database under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime`` when it is first imported, unless
    ``ORT_DISABLE_TELEMETRY=1`` is set before (measured with 1.31.1: ``disable_telemetry_events()`` after the import
    is too late for those files). A value the user set wins. The one place detflow imports onnxruntime."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    ort.disable_telemetry_events()  # and no runtime events either
    return ort


@dataclass
class ImageInput:
    """A decoded request image: RGB uint8 plus where it came from (for error reports)."""

    rgb: np.ndarray
    name: str


S = TypeVar("S")


@dataclass
class StreamResult(Generic[S]):
    """One input of :meth:`OnnxDetector.predict_stream`: its detections, or the error that stopped it."""

    source: S
    rgb: np.ndarray | None = None
    detections: Detections | None = None
    error: Exception | None = None
    embedding: np.ndarray | None = None  # (D,) float32, when the stream was asked for embeddings


def plan_workers(workers: int = 0, cpus: int | None = None) -> tuple[int, int]:
    """(workers, onnxruntime intra-op threads per run) for streaming inference on ``cpus`` cores.

    ``workers`` 0 means auto: cores + 1, at most 8. Several single-threaded runs at once beat one run spread over
    every core (whose threads idle at each layer boundary), and the extra worker decodes while the others run.
    Measured on the 2-core machine, BCCD at 416 px, batch 1: 56.7 images/s sequential with 2 threads, 67.7 with
    2 workers x 1 thread, 72.5 with 3 x 1.
    """
    cpus = cpus or os.cpu_count() or 1
    workers = workers or min(cpus + 1, 8)
    return workers, max(1, cpus // workers)


class OnnxDetector:
    """Detections from an exported model; inputs are RGB uint8 arrays, image files or DICOM."""

    def __init__(self, model_path: str | os.PathLike[str], card_path: str | os.PathLike[str] | None = None,
                 providers: str | list[str] = "auto", require_gpu: bool = False, threads: int | None = None,
                 verify_checksum: bool = True) -> None:
        ort = import_onnxruntime()

        self.model_path = Path(model_path)
        self.card_path = Path(card_path) if card_path else self.model_path.with_name("model_card.json")
        if not self.model_path.is_file():
            raise ModelLoadError(f"model {self.model_path} not found; run `detflow export` (or `dvc repro`)")
        if not self.card_path.is_file():
            raise ModelLoadError(f"model card {self.card_path} not found next to the model; export writes both")
        model_bytes = self._load_release(card_path is None, verify_checksum)
        available = ort.get_available_providers()
        if providers == "auto":
            # onnxruntime-gpu lists CUDA even without a GPU; asking for it then costs a failed library load.
            # With require_gpu we always ask, so the failure is reported rather than assumed.
            gpu_present = require_gpu or Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()
            wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                      if p in available and (p != "CUDAExecutionProvider" or gpu_present)]
        elif isinstance(providers, str):
            wanted = [p.strip() for p in providers.split(",") if p.strip()]
        else:
            wanted = list(providers)
        unknown = [p for p in wanted if p not in available]
        if unknown:
            raise ProviderError(f"execution providers {unknown} are not available in this onnxruntime build; "
                                f"available: {', '.join(available)}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        ort.set_default_logger_severity(3)  # a CUDA provider that cannot load is reported by us, via `providers`
        try:
            self.session = ort.InferenceSession(model_bytes, sess_options=options, providers=wanted)
        except Exception as e:
            raise ModelLoadError(f"onnxruntime cannot load {self.model_path}: {str(e).splitlines()[0]}") from None
        self.providers: list[str] = self.session.get_providers()
        self.requested_providers = wanted
        if require_gpu and "CUDAExecutionProvider" not in self.providers:
            raise ProviderError(
                f"require_gpu is set but the CUDA provider is not active (active: {', '.join(self.providers)}; "
                f"requested: {', '.join(wanted)}). onnxruntime-gpu falls back to CPU when CUDA/cuDNN libraries or "
                "a GPU are missing.")
        if "CUDAExecutionProvider" in wanted and "CUDAExecutionProvider" not in self.providers:
            log.warning("CUDA provider requested but not active; running on %s", ", ".join(self.providers))
        self._check_card_against_graph()
        self.model_family: FamilySpec = artifact_family(self.model_card.family)  # type: ignore[assignment]
        self.family: str = self.model_family.name  # torch-free: graph check, postprocess
        self.model_name: str = self.model_card.model or ""
        self.classes: list[str] = list(self.model_card.classes)
        self.imgsz: int = self.model_card.input.imgsz
        self.input_name = self.session.get_inputs()[0].name
        # the detection outputs, in graph order; the embedding output (shift detection) is fetched only on request
        graph_outputs = [o.name for o in self.session.get_outputs()]
        self.output_names: list[str] = [n for n in graph_outputs if n != EMBEDDING_OUTPUT]
        self.has_embeddings: bool = EMBEDDING_OUTPUT in graph_outputs
        self.input_dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
        post = self.model_card.postprocess  # checked by the card schema
        self.conf, self.nms_iou, self.max_det = post.conf, post.nms_iou, post.max_det
        try:  # site adaptation (`detflow adapt`) and the training pixel spacing: how large each image is letterboxed
            self.scaling: InputScaling = InputScaling.from_card(self.card)
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"model card {self.card_path}: {e}; re-export or re-adapt the model") from None
        self._local = threading.local()
        # Minimal (rect) padding only where the card says the model takes it and the graph's H/W are dynamic.
        in_shape = self.session.get_inputs()[0].shape
        self.stride: int = self.model_card.input.stride \
            if all(isinstance(d, str) for d in in_shape[2:]) else 0

    @property
    def conf(self) -> float:
        """Default score threshold (the card's unless set); a finite number in [0, 1]."""
        return self._conf

    @conf.setter
    def conf(self, value: float) -> None:
        self._conf = check_threshold(value, "conf")

    def _load_release(self, pinned: bool, verify_checksum: bool) -> bytes:
        """Read the model, its card and the arrays beside it as one publication (see the module docstring); sets
        ``card`` and the companions, returns the model's bytes. ``pinned`` False: a card given on its own path."""
        from pipeline.fileio import TornRelease, read_release

        name = Path(os.path.realpath(self.model_path)).name  # the model's own name in its (published) folder

        def check(files: dict[str, bytes | None]) -> None:
            if files.get(name) is None or (pinned and files.get("model_card.json") is None):
                raise TornRelease(f"{self.model_path.parent} lacks the model or its card")
            if verify_checksum and pinned:
                card = self._parse_card(files["model_card.json"])  # type: ignore[arg-type]
                if isinstance(card.get("sha256"), str) and hashlib.sha256(
                        files[name]).hexdigest() != card["sha256"]:  # type: ignore[arg-type]
                    raise TornRelease("the model and its card are from different exports")

        names = [name, *(["model_card.json", "*.npy"] if pinned else [])]
        try:
            folder, files = read_release(self.model_path, names, check=check)
        except TornRelease:
            folder, files = read_release(self.model_path, names)  # a lasting mismatch: reported below
        except OSError as e:
            raise ModelLoadError(f"cannot read the model {self.model_path}: {e.strerror or e}") from None
        self.folder = folder
        self._companions = {n: b for n, b in files.items() if n.endswith(".npy") and b is not None}
        model = files[name]
        if model is None:
            raise ModelLoadError(f"model {self.model_path} not found; run `detflow export` (or `dvc repro`)")
        if pinned:
            card_bytes = files["model_card.json"]
            if card_bytes is None:
                raise ModelLoadError(f"model card {self.card_path} not found next to the model; export writes both")
        else:
            try:
                card_bytes = self.card_path.read_bytes()
            except OSError as e:
                raise ModelLoadError(f"cannot read the model card {self.card_path}: {e.strerror or e}") from None
        self.card = self._read_card(card_bytes)
        if verify_checksum:
            actual = hashlib.sha256(model).hexdigest()
            if actual != self.card["sha256"]:
                raise ModelLoadError(f"checksum mismatch for {self.model_path}: the card says {self.card['sha256']}, "
                                     f"the file is {actual} (truncated, replaced or a different export)")
        return model

    def _parse_card(self, data: bytes) -> dict[str, Any]:
        """The card's JSON object, or {} when it is not one (the torn-pair check only compares checksums)."""
        try:
            card = json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return card if isinstance(card, dict) else {}

    def _read_card(self, data: bytes) -> dict[str, Any]:
        """The card, validated against the one card schema (:mod:`pipeline.contracts.card`) and the family
        registry: a damaged card fails here, clearly."""
        try:
            doc, card = parse_card(data, f"model card {self.card_path}")
        except CardError as e:
            raise ModelLoadError(str(e)) from None
        if artifact_family(card.family) is None:
            raise ModelLoadError(f"model card {self.card_path} is malformed (family {card.family!r} is not one of: "
                                 f"{', '.join(sorted(FAMILIES))}); re-export the model")
        self.model_card: ModelCard = card
        return doc

    def _check_card_against_graph(self) -> None:
        inputs = self.session.get_inputs()
        outputs = [o for o in self.session.get_outputs() if o.name != EMBEDDING_OUTPUT]  # the family's own outputs
        card_in = self.card["input"]
        shape = inputs[0].shape
        problems = []
        if len(shape) != 4 or shape[1] != 3:
            problems.append(f"graph input {inputs[0].name} has shape {shape}, expected [N, 3, H, W]")
        for axis in (2, 3):
            if isinstance(shape[axis], int) and shape[axis] != int(card_in["imgsz"]):
                problems.append(f"graph input size {shape[2:]} differs from the card's imgsz {card_in['imgsz']}")
                break
        problems += artifact_family(self.model_card.family).check_graph(  # type: ignore[union-attr]
            inputs, outputs, self.card)
        if problems:
            raise ModelLoadError(f"model card {self.card_path} does not match {self.model_path}: "
                                 + "; ".join(problems))

    # ------------------------------------------------------------------------------------------ inputs

    def decode(self, source: str | os.PathLike[str] | bytes | np.ndarray, name: str = "",
               max_pixels: int | None = None) -> ImageInput:
        """Decode a file path or raw bytes (by content: :func:`pipeline.data.imaging.decode_bytes`, as the service
        does) or an RGB/grey array. ``max_pixels``: None for :data:`~pipeline.data.imaging.DEFAULT_MAX_PIXELS`."""
        from pipeline.data.imaging import DEFAULT_MAX_PIXELS, ImageLoadError, decode_bytes, decode_path

        if isinstance(source, np.ndarray):
            arr = source
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
            if arr.ndim != 3 or arr.shape[2] not in (3, 4):
                raise ImageLoadError("not_an_image", f"array of shape {source.shape} is not an HxWx3 image")
            if arr.dtype != np.uint8:
                raise ImageLoadError("not_an_image", f"array dtype {arr.dtype}; expected uint8 RGB")
            return ImageInput(np.ascontiguousarray(arr[:, :, :3]), name or "array")
        rules = {"max_pixels": DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels, "window": self.dicom_window()}
        if isinstance(source, bytes):
            return ImageInput(decode_bytes(source, **rules).rgb, name or "bytes")
        return ImageInput(decode_path(source, **rules).rgb, name or str(source))

    def dicom_window(self) -> tuple[float, float] | None:
        """The training window when it came from params; None means 'the file's own tags', as in training."""
        win = self.card["input"].get("dicom_window") or {}
        if win.get("mode") == "params" and win.get("window"):
            return (float(win["window"][0]), float(win["window"][1]))
        return None

    # ------------------------------------------------------------------------------------------ inference

    def run(self, batch: np.ndarray, embeddings: bool = False) -> Any:
        """Bare ``session.run`` on a ready NCHW tensor (the floor the benchmark compares against): the detection
        outputs, plus the embedding output last when ``embeddings``."""
        names = [*self.output_names, EMBEDDING_OUTPUT] if embeddings else self.output_names
        return self.session.run(names, {self.input_name: batch})

    @overload
    def predict(self, images: list[np.ndarray], conf: float | None = None, iou: float | None = None,
                max_det: int | None = None, *, return_embeddings: Literal[False] = False) -> list[Detections]: ...

    @overload
    def predict(self, images: list[np.ndarray], conf: float | None = None, iou: float | None = None,
                max_det: int | None = None, *,
                return_embeddings: Literal[True]) -> tuple[list[Detections], np.ndarray]: ...

    def predict(self, images: list[np.ndarray], conf: float | None = None, iou: float | None = None,
                max_det: int | None = None, *,
                return_embeddings: bool = False) -> list[Detections] | tuple[list[Detections], np.ndarray]:
        """Detections per image; with ``return_embeddings`` also each image's embedding, float32 (len(images), D),
        from the same model call (:class:`EmbeddingsUnavailable` for a model exported without the output)."""
        if not return_embeddings:
            return self._predict(images, conf, iou, max_det, embeddings=False)[0]
        self.require_embeddings()
        dets, emb = self._predict(images, conf, iou, max_det, embeddings=True)
        assert emb is not None
        return dets, emb

    def predict_with_embeddings(self, images: list[np.ndarray], conf: float | None = None, iou: float | None = None,
                                max_det: int | None = None) -> tuple[list[Detections], np.ndarray]:
        """``predict(..., return_embeddings=True)``."""
        return self.predict(images, conf, iou, max_det, return_embeddings=True)

    def _predict(self, images: list[np.ndarray], conf: float | None, iou: float | None, max_det: int | None,
                 embeddings: bool) -> tuple[list[Detections], np.ndarray | None]:
        conf = self.conf if conf is None else check_threshold(conf, "conf")
        iou = self.nms_iou if iou is None else check_threshold(iou, "iou")
        max_det = self.max_det if max_det is None else max_det
        if not images:
            return [], (np.empty((0, 0), np.float32) if embeddings else None)
        groups = shape_groups(images, self.imgsz, self.stride, self.scaling)
        if len(groups) > 1:  # one call per canvas shape: no image padded to a larger batch-mate's canvas
            dets: list[Detections | None] = [None] * len(images)
            rows: list[np.ndarray | None] = [None] * len(images)
            for idx in groups:
                d, e = self._predict([images[i] for i in idx], conf, iou, max_det, embeddings)
                for j, i in enumerate(idx):
                    dets[i] = d[j]
                    rows[i] = e[j] if e is not None else None
            emb = np.stack([r for r in rows if r is not None]) if embeddings else None
            return [d for d in dets if d is not None], emb
        local = self._local.__dict__.setdefault("buffers", {})  # per thread: the service predicts from several
        batch, metas = preprocess(images, self.imgsz, self.input_dtype, stride=self.stride, buffers=local,
                                  scaling=self.scaling)
        family = self.model_family
        n_det = len(self.output_names)
        if family.dynamic_batch:
            outs = self.run(batch, embeddings)
            dets = family.postprocess(outs[:n_det], metas, conf=conf, iou=iou, max_det=max_det, model=self.model_name)
            return dets, (np.asarray(outs[n_det], np.float32) if embeddings else None)
        out: list[Detections] = []
        pooled: list[np.ndarray] = []
        for i, meta in enumerate(metas):  # a graph exported for one image at a time
            outs = self.run(batch[i:i + 1], embeddings)
            out += family.postprocess(outs[:n_det], [meta], conf=conf, iou=iou, max_det=max_det,
                                      model=self.model_name)
            if embeddings:
                pooled.append(np.asarray(outs[n_det], np.float32).reshape(1, -1))
        return out, (np.concatenate(pooled) if embeddings else None)

    # ------------------------------------------------------------------------------------------ embeddings

    def embeddings_unavailable(self) -> str | None:
        """Why this model cannot be tested for shift (None when it can): no embedding output in the graph."""
        if not self.has_embeddings:
            return (f"model {self.model_path} has no {EMBEDDING_OUTPUT!r} output (exported before shift detection "
                    "existed); re-export it with `detflow export` to test for shift")
        return None

    def require_embeddings(self) -> None:
        reason = self.embeddings_unavailable()
        if reason:
            raise EmbeddingsUnavailable(reason)

    def _reference_file(self, entry: Any, what: str) -> np.ndarray:
        """An array export wrote next to the model (``entry``: the card's ``{file, sha256}``), checked against the
        card; :class:`EmbeddingsUnavailable` with the reason otherwise."""
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise EmbeddingsUnavailable(f"model card {self.card_path} names no {what}; re-export the model with "
                                        "`detflow export`")
        path = self.model_path.parent / entry["file"]
        # read with the model, from the same publication; else from the folder the model was read from
        data = getattr(self, "_companions", {}).get(entry["file"])
        if data is None:
            try:
                folder = getattr(self, "folder", self.model_path.parent)
                data = (folder / entry["file"]).read_bytes() if "/" not in entry["file"] else None
            except OSError:
                data = None
        if data is None:
            raise EmbeddingsUnavailable(f"{what} {path} not found (export writes it next to the model)")
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise EmbeddingsUnavailable(f"checksum mismatch for {path}: it is not the {what} the card describes; "
                                        "re-export the model")
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EmbeddingsUnavailable(f"cannot read {what} {path}: {e}") from None

    def _reference_entry(self) -> dict[str, Any]:
        emb = self.card.get("embedding")
        entry = emb.get("reference") if isinstance(emb, dict) else None
        return entry if isinstance(entry, dict) else {}

    def embedding_reference(self) -> np.ndarray:
        """The reference embeddings (held-out same-site images, see :func:`pipeline.export.reference_sample`)
        written by export next to the model (float64 (n, D)), checked against the sha256 in the card. Raises
        :class:`EmbeddingsUnavailable` with the reason otherwise."""
        self.require_embeddings()
        ref = self._reference_file(self._reference_entry() or None, "embedding reference sample")
        if ref.ndim != 2 or not np.isfinite(ref).all():
            raise EmbeddingsUnavailable(f"the embedding reference is not a finite 2-D array (shape {ref.shape})")
        return ref.astype(np.float64)

    def embedding_reference_groups(self, n_rows: int) -> np.ndarray | None:
        """The patient of each reference row (``embedding_reference_groups.npy``), or None for a model exported
        before export recorded them (its reference is then tested image by image)."""
        entry = self._reference_entry().get("groups")
        if entry is None:
            return None
        groups = self._reference_file(entry, "reference patient ids")
        if groups.shape != (n_rows,):
            raise EmbeddingsUnavailable(f"the reference patient ids have shape {groups.shape}, the reference has "
                                        f"{n_rows} rows; re-export the model")
        return groups

    def predict_stream(self, sources: Iterable[S], batch: int = 1, workers: int = 1,
                       decode: Callable[[S], np.ndarray] | None = None,
                       embeddings: bool = False) -> Iterator[StreamResult[S]]:
        """Decode and predict a stream of inputs, ``batch`` images per model call and ``workers`` calls at once;
        results come back in input order, one per input.

        An input that cannot be decoded comes back with ``error`` set (an ``ImageLoadError`` or ``OSError``); any
        other exception stops the stream. At most ``2 x workers`` batches are in flight, so memory stays bounded
        whatever the stream's length. For CPU throughput build the detector with ``threads`` from
        :func:`plan_workers` (one intra-op thread per worker). ``embeddings``: also set each result's
        ``embedding`` (see :meth:`predict_with_embeddings`; a model without the output raises at once).
        """
        from pipeline.data.imaging import ImageLoadError

        if batch < 1 or workers < 1:
            raise ValueError(f"batch and workers must be >= 1, got batch={batch}, workers={workers}")
        load = decode or (lambda src: self.decode(src).rgb)  # type: ignore[arg-type]
        if embeddings:
            self.require_embeddings()

        def work(chunk: list[S]) -> list[StreamResult[S]]:
            out: list[StreamResult[S]] = []
            for src in chunk:
                try:
                    out.append(StreamResult(src, rgb=load(src)))
                except (ImageLoadError, OSError) as e:
                    out.append(StreamResult(src, error=e))
            good = [r for r in out if r.error is None]
            dets, emb = self._predict([r.rgb for r in good], None, None, None, embeddings)  # [] in, [] out
            for i, (r, d) in enumerate(zip(good, dets, strict=True)):
                r.detections = d
                if emb is not None:
                    r.embedding = emb[i]
            return out

        def chunks() -> Iterator[list[S]]:
            chunk: list[S] = []
            for src in sources:
                chunk.append(src)
                if len(chunk) == batch:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

        if workers == 1:
            for chunk in chunks():
                yield from work(chunk)
            return
        pending: deque[Future[list[StreamResult[S]]]] = deque()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="detflow-infer") as pool:
            try:
                for chunk in chunks():
                    pending.append(pool.submit(work, chunk))
                    if len(pending) >= 2 * workers:
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def info(self) -> dict[str, Any]:
        return {"model": str(self.model_path), "family": self.family, "classes": self.classes, "imgsz": self.imgsz,
                "providers": self.providers, "requested_providers": self.requested_providers,
                "sha256": self.card["sha256"], "version": self.card.get("version")}
