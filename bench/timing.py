"""What every benchmark here shares: arms timed in turn (median of whole passes) and the result written atomically.

Imported by the scripts beside it (``python bench/<script>.py`` puts this folder on the import path).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def interleaved(arms: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, float]:
    """Median wall time per arm; arms run round-robin so load drift on the machine hits all of them alike.

    Whole passes, not item by item: onnxruntime's worker threads spin for a while after each run, so switching
    sessions every image makes two arms' thread pools fight over the 2 cores (measured: engine batch 1 fell
    from about 55 to 28 images/s), which no deployment does.
    """
    if warmup:
        for fn in arms.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def write_result(path: Path, doc: dict[str, Any]) -> None:
    """``doc`` as JSON at ``path`` (temporary sibling + rename: a killed run leaves the previous result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
