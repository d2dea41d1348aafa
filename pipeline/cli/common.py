"""What every `detflow` sub-app shares: the common options, loading params, progress, output checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import DetflowError

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file (YAML)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set train.epochs=3 (repeatable)")]
MirrorOpt = Annotated[list[Path] | None, typer.Option("--mirror", help="asset mirror folder (repeatable); "
                                                      "default: $DETFLOW_ASSETS")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
RawDirOpt = Annotated[Path, typer.Option(help="DVC-tracked raw assets")]
PreparedOpt = Annotated[Path, typer.Option(help="prepared dataset folder")]
ProvidersOpt = Annotated[str, typer.Option(help="auto, or a comma list such as CPUExecutionProvider")]
PhantomDirOpt = Annotated[Path, typer.Option(help="phantom folder")]
OnnxModelOpt = Annotated[Path, typer.Option(help="ONNX model (model_card.json next to it)")]


Outputs = dict[Path, str]  # an output location -> what it is, for the messages ("weights folder")


def model_params(path: Path, overrides: list[str] | None, folders: Outputs | None = None,  # noqa: ANN201
                 files: Outputs | None = None):
    """Params with the model family checked (pipeline/config.py), for the commands that touch a model; then the
    command's output ``folders`` and ``files`` are checked (:func:`writable`), all before any work."""
    from pipeline.config import load_params

    return _outputs_checked(load_params(path, overrides or []), folders, files)


def data_params(path: Path, overrides: list[str] | None, folders: Outputs | None = None,  # noqa: ANN201
                files: Outputs | None = None):
    """Params without the family registry (pipeline/params.py), for the data stages, which touch no model; then
    the output checks, as :func:`model_params` does."""
    from pipeline.params import load_params

    return _outputs_checked(load_params(path, overrides or []), folders, files)


def _outputs_checked(params: object, folders: Outputs | None, files: Outputs | None) -> object:
    for out, what in (folders or {}).items():
        writable(out, what)
    for out, what in (files or {}).items():
        writable(out, what, folder=False)
    return params


def progress_on(quiet: bool) -> bool:
    return not quiet and os.environ.get("DETFLOW_NO_PROGRESS", "") in ("", "0")


def writable(path: Path, what: str, folder: bool = True) -> None:
    """Fail before any work when an output cannot be created there (a file in the way, no permission), instead of
    a traceback from the final write after minutes of work. Creates nothing."""
    if path.exists():
        if folder != path.is_dir():
            raise DetflowError(f"{what} {path} is a {'folder' if path.is_dir() else 'file'}; expected a "
                               f"{'folder' if folder else 'file'} path")
        parent = path if folder else path.parent
    else:
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise DetflowError(f"cannot create {what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DetflowError(f"cannot write {what} {path}: no write permission on {parent}")


def threshold_option(value: float | None) -> float | None:
    """--conf: a score threshold, checked while parsing (before any model loads)."""
    from pipeline.infer.engine import check_threshold

    if value is not None:
        try:
            check_threshold(value, "conf")
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return value
