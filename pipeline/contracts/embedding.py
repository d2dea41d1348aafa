"""The embedding output every export adds next to the detections, and how an export records what it is."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

#: The graph output every export adds next to the detections: one pooled feature vector per image, float32 (N, D),
#: what shift detection compares (``pipeline.shift``). Graphs exported before it existed lack it; the engine says so.
EMBEDDING_OUTPUT = "embedding"
#: ONNX metadata key under which an export records what its embedding is (JSON: ``meaning``, ``dim``); the card
#: copies it.
EMBEDDING_META_KEY = "detflow_embedding"


def embedding_tag(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """What an export recorded about its embedding (``meaning``, ``dim``), from ONNX metadata as a mapping
    (``onnxruntime``'s ``get_modelmeta().custom_metadata_map`` or the proto's ``metadata_props``); None if absent."""
    raw = metadata.get(EMBEDDING_META_KEY)
    try:
        doc = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None
