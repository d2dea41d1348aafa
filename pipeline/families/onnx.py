"""ONNX graph edits every family's exporter shares: the pooled embedding output and its metadata tag, and the
card entry that describes it. Needs ``onnx`` (export side only; the serving path never imports this)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.contracts.embedding import EMBEDDING_META_KEY, EMBEDDING_OUTPUT, embedding_tag
from pipeline.errors import DetflowError


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
    kept = [p for p in model.metadata_props if p.key != EMBEDDING_META_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = EMBEDDING_META_KEY, json.dumps({"meaning": meaning, "dim": dim})


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
