"""Initial weights, the same rule for every family: ``train.pretrained`` none, coco, auto or a path, resolved through
``pipeline/assets.py`` and verified; each family supplies only its loader."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.contracts.results import PretrainedSource
from pipeline.errors import ConfigError


def pretrained_unavailable(mode: str, model: str, reason: str | Exception) -> PretrainedSource:
    """``coco`` is strict; ``auto`` falls back to training from scratch and says so loudly (on one line: an
    ``AssetError``'s summary, else the reason's first line)."""
    from pipeline.errors import AssetError

    if mode == "coco":
        raise AssetError(f"train.pretrained is 'coco' but COCO weights for {model} cannot be resolved: {reason}\n"
                         "Use pretrained: auto to fall back to training from scratch, or pretrained: none.")
    why = reason.summary if isinstance(reason, AssetError) else str(reason).splitlines()[0]
    note = (f"COCO weights for {model} could not be resolved ({why}); TRAINING FROM SCRATCH - expect much lower "
            "accuracy on small datasets. For COCO weights offline, point DETFLOW_ASSETS at an asset mirror.")
    return PretrainedSource(kind="none", source="scratch (auto fallback)", note=note)


def resolve_initial_weights(tp: Any, coco_assets: dict[str, str], load_state: Any, raw_dir: Path,
                            mirrors: Sequence[Path] | None, trust: bool,
                            progress: bool = False) -> tuple[PretrainedSource, Any]:
    """Initial weights per ``train.pretrained``, the same rule for every family: ``none`` (scratch); ``coco`` /
    ``auto``: the model's COCO asset through :func:`pipeline.assets.resolve` (raw folder, mirror, download;
    verified there), unavailable → ``coco`` raises, ``auto`` trains from scratch with a loud note; a path, checked
    against ``train.pretrained_sha256``. ``load_state(path, expected_sha256)`` is the family's loader."""
    from pipeline import assets
    from pipeline.errors import AssetError
    from pipeline.fileio import sha256_file

    mode = tp.pretrained
    if mode == "none":
        return PretrainedSource(kind="none", source="none (from scratch, as configured)"), None
    if mode in ("coco", "auto"):
        name = coco_assets.get(tp.model)
        if name is None:
            return pretrained_unavailable(mode, tp.model, f"no COCO checkpoint is known for {tp.model} "
                                          f"(known: {', '.join(coco_assets) or 'none'})"), None
        try:
            path = assets.resolve(name, raw_dir=raw_dir, mirrors=list(mirrors) if mirrors is not None else None,
                                  trust=trust, progress=progress)
            state = load_state(path, assets.ASSETS[name].sha256)
        except AssetError as e:
            return pretrained_unavailable(mode, tp.model, e), None
        return PretrainedSource(kind="coco", source=f"{name} ({assets.ASSETS[name].url})", path=str(path),
                                sha256=sha256_file(path)), state
    path = Path(mode)
    if not path.is_file():
        raise ConfigError(f"train.pretrained {mode!r} is not a file; expected one of: auto, coco, none, or a path")
    state = load_state(path, tp.pretrained_sha256)
    return PretrainedSource(kind="path", source=str(path), path=str(path), sha256=sha256_file(path)), state
