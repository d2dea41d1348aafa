"""What a model family must provide: the :class:`ModelFamily` interface, its export settings and checkpoint header.

A family (``yolo``, ``frcnn``) is one folder under ``pipeline/families/`` plus one line in
:data:`pipeline.families.FAMILIES`. Everything outside the family folders reaches family code through this
interface only, so a new family never falls through a branch written for another one.

Two layers, because the serving image has no torch:

* torch-free (imported by the ONNX engine and the service): names and defaults, export settings, card fields,
  the graph's I/O check and the post-processing of raw graph outputs;
* torch (imported lazily, inside the methods, by training, evaluation and export): pretrained resolution, training,
  loading a checkpoint for inference and ONNX export.

This module imports neither torch nor :mod:`pipeline.config` (which imports the registry to validate params).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.errors import DetflowError

if TYPE_CHECKING:
    from pipeline.config import Params, TrainParams
    from pipeline.infer.processing import Detections, LetterboxMeta
    from pipeline.train.common import PretrainedSource, TrainResult

#: Key of the header every detflow checkpoint carries (both families, whatever else the file holds).
HEADER_KEY = "detflow"
HEADER_FORMAT = 1

#: The graph output every export adds next to the detections: one pooled feature vector per image, float32 (N, D),
#: what shift detection compares (``pipeline.shift``). Graphs exported before it existed lack it; the engine says so.
EMBEDDING_OUTPUT = "embedding"
#: ONNX metadata key under which an export records what its embedding is (JSON: ``meaning``, ``dim``); the card
#: copies it.
EMBEDDING_META_KEY = "detflow_embedding"


def add_pooled_embedding(model: Any, features: Sequence[str], meaning: str) -> Any:
    """Append :data:`EMBEDDING_OUTPUT` to an ONNX ``ModelProto``: the global average of each named NCHW feature map,
    concatenated in the given order and cast to float32 (N, sum of channels). Also records ``meaning`` and the size
    in the model's metadata. Cheap next to the convolutions: one reduction per map, no new weights.

    Editing the exported graph (rather than the network) keeps the detection outputs bit-identical to the export
    without it. Needs ``onnx``, imported here because the serving path never calls this.
    """
    import onnx
    from onnx import TensorProto, helper, shape_inference

    if not features:
        raise DetflowError("no feature maps to pool into an embedding")
    graph = model.graph
    if any(o.name == EMBEDDING_OUTPUT for o in graph.output):
        raise DetflowError(f"the graph already has an output named {EMBEDDING_OUTPUT!r}")
    inferred = shape_inference.infer_shapes(model)
    channels: dict[str, Any] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            channels[vi.name] = dims[1].dim_value
    pooled = []
    for i, name in enumerate(features):
        gap, flat = f"/detflow_embedding/gap{i}", f"/detflow_embedding/flat{i}"
        graph.node.extend([helper.make_node("GlobalAveragePool", [name], [gap + "_out"], name=gap),
                           helper.make_node("Flatten", [gap + "_out"], [flat + "_out"], name=flat, axis=1)])
        pooled.append(flat + "_out")
    graph.node.extend([helper.make_node("Concat", pooled, ["/detflow_embedding/concat_out"],
                                        name="/detflow_embedding/concat", axis=1),
                       helper.make_node("Cast", ["/detflow_embedding/concat_out"], [EMBEDDING_OUTPUT],
                                        name="/detflow_embedding/cast", to=TensorProto.FLOAT)])
    dim: int | str = sum(channels[f] for f in features) if all(f in channels for f in features) else "D"
    graph.output.append(helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, ["N", dim]))
    tag_embedding(model, meaning, dim if isinstance(dim, int) else None)
    onnx.checker.check_model(model)
    return model


def tag_embedding(model: Any, meaning: str, dim: int | None) -> None:
    """Record what the embedding output is in the ONNX metadata (read back by :func:`embedding_tag`)."""
    import json

    kept = [p for p in model.metadata_props if p.key != EMBEDDING_META_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = EMBEDDING_META_KEY, json.dumps({"meaning": meaning, "dim": dim})


def embedding_tag(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """What an export recorded about its embedding (``meaning``, ``dim``), from ONNX metadata as a mapping
    (``onnxruntime``'s ``get_modelmeta().custom_metadata_map`` or the proto's ``metadata_props``); None if absent."""
    import json

    raw = metadata.get(EMBEDDING_META_KEY)
    try:
        doc = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def embedding_card(onnx_path: Path, reference: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The card's ``embedding`` entry for an exported graph: output name, shape, meaning and the reference sample
    (file, sha256, rows); None when the graph has no embedding output."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    out = next((o for o in model.graph.output if o.name == EMBEDDING_OUTPUT), None)
    if out is None:
        return None
    tag = embedding_tag({p.key: p.value for p in model.metadata_props}) or {}
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in out.type.tensor_type.shape.dim]
    return {"name": EMBEDDING_OUTPUT, "shape": dims, "dtype": "float32",
            "meaning": tag.get("meaning", "pooled network features, one vector per image"),
            "use": "shift detection: `detflow shift`, batch `detflow infer` (shift.json) and the service's "
                   "GET /v1/shift compare these vectors with the reference sample (MMD permutation test)",
            "reference": dict(reference) if reference is not None else None}


class ExportSettings(BaseModel):
    """``export.<family>`` params. Every family exports ONNX at some opset and checks parity against PyTorch."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    opset: int
    max_map_delta: float


@dataclass(frozen=True)
class CheckpointMeta:
    """What inference needs from a checkpoint, stored under ``ckpt["detflow"]``: no field has a default."""

    family: str
    model: str
    classes: list[str]
    imgsz: int
    format: int = HEADER_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, ckpt: Any, path: Path) -> CheckpointMeta:
        """The header of a loaded checkpoint; a missing header or field is an error naming ``path``."""
        header = ckpt.get(HEADER_KEY) if isinstance(ckpt, Mapping) else None
        if not isinstance(header, Mapping):
            raise DetflowError(f"model checkpoint {path} has no detflow header (family, model, classes, imgsz); "
                               "expected a checkpoint written by `detflow train` (e.g. models/train/best.pt)")
        missing = [k for k in ("family", "model", "classes", "imgsz") if k not in header]
        if missing:
            raise DetflowError(f"model checkpoint {path}: the detflow header lacks {', '.join(missing)}; "
                               "retrain with `detflow train`")
        classes, imgsz = header["classes"], header["imgsz"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise DetflowError(f"model checkpoint {path}: header classes {classes!r} is not a list of names")
        if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 1:
            raise DetflowError(f"model checkpoint {path}: header imgsz {imgsz!r} is not a positive integer")
        return cls(family=str(header["family"]), model=str(header["model"]), classes=list(classes), imgsz=imgsz,
                   format=int(header.get("format", HEADER_FORMAT)))


class LoadedModel(Protocol):
    """A checkpoint loaded for inference (torch), behind the same interface as its ONNX graph."""

    model: Any  # the torch.nn.Module, in eval mode
    stride: int  # > 0: the model takes minimal (rect) letterbox padding to this multiple; 0: square input

    def forward(self, batch: np.ndarray) -> list[list[np.ndarray]]:
        """Outputs for an NCHW batch, in graph-output order: one list per graph call (see ``dynamic_batch``)."""
        ...


class ModelFamily(ABC):
    """One detector family. Class attributes and the torch-free methods are safe to use in the serving image."""

    name: ClassVar[str]  # the value of train.family and of the model card's "family"
    title: ClassVar[str]  # for messages: "YOLO", "Faster R-CNN"
    models: ClassVar[tuple[str, ...]]  # allowed train.model values
    default_model: ClassVar[str]  # what train.model: auto means
    coco_assets: ClassVar[Mapping[str, str]]  # model -> asset name in pipeline/assets.py (COCO weights)
    export_params: ClassVar[type[ExportSettings]]  # the export.<name> section, with its defaults
    dynamic_batch: ClassVar[bool]  # the ONNX graph takes N images per call (else one image per call)
    #: How ``train.device`` "0,1" / "cpu:N" trains: "torchrun" (detflow starts the ranks and the family's loop uses
    #: pipeline/train/distributed.py), "own" (the family's trainer runs its own DDP for GPU lists), "none" (refused).
    data_parallel: ClassVar[str] = "none"

    # --- torch: training, inference, export --------------------------------------------------------------------

    @abstractmethod
    def resolve_pretrained(self, tp: TrainParams, raw_dir: Path, mirrors: Sequence[Path] | None, trust: bool,
                           progress: bool) -> tuple[PretrainedSource, Any]:
        """Initial weights per ``train.pretrained`` (coco: through :func:`pipeline.assets.resolve`); ``trust``
        admits an asset or file without a pinned checksum (the CLI's ``--trust``)."""

    @abstractmethod
    def train(self, params: Params, prepared: Path, out_dir: Path, reports_dir: Path, workdir: Path,
              raw_dir: Path, mirrors: list[Path] | None, trust: bool, progress: bool) -> TrainResult:
        """Fine-tune on a prepared dataset; publish best/last checkpoints (with the header) and reports."""

    @abstractmethod
    def load(self, ckpt: Any, meta: CheckpointMeta, path: Path, device: str) -> LoadedModel:
        """A loaded checkpoint (already read by ``torch.load``) ready for inference; imports no training code."""

    @abstractmethod
    def export_onnx(self, checkpoint: Path, loaded: LoadedModel, work: Path, imgsz: int,
                    settings: ExportSettings) -> Path:
        """Write ``model.onnx`` under ``work`` (a scratch folder) and return its path."""

    def check_export(self, settings: ExportSettings) -> None:  # noqa: B027 - optional hook
        """Refuse settings this machine cannot export with, before any work (raise DetflowError)."""

    # --- torch-free: card, graph, post-processing ----------------------------------------------------------------

    @abstractmethod
    def card_output(self, classes: list[str]) -> dict[str, Any]:
        """The model card's ``output`` entry: graph output names/shapes and how to decode them."""

    def input_dtype(self, settings: ExportSettings) -> str:
        """The graph input's element type as exported with ``settings``."""
        return "float32"

    @abstractmethod
    def check_graph(self, inputs: Sequence[Any], outputs: Sequence[Any], card: Mapping[str, Any]) -> list[str]:
        """Problems between an onnxruntime session's inputs/outputs and the card (empty: consistent)."""

    @abstractmethod
    def postprocess(self, outputs: Sequence[np.ndarray], metas: Sequence[LetterboxMeta], conf: float, iou: float,
                    max_det: int) -> list[Detections]:
        """Detections in original-image pixels from one graph call's outputs (``metas``: that call's images)."""
