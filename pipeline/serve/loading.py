"""Loading the model for the service: readable files and a well-formed card first, then the ONNX engine.

Every failure is a ``ModelLoadError`` (a ``DetflowError``) with one line, never a traceback: at start-up it ends
the process with exit 1, in the background load it becomes the ``/health/ready`` reason.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.contracts.card import CardError, read_card
from pipeline.serve.settings import ServeSettings


def load_detector(settings: ServeSettings) -> Any:
    """The `OnnxDetector` the settings describe (raises ModelLoadError / ProviderError, both DetflowError)."""
    from pipeline.infer.engine import ModelLoadError, OnnxDetector

    check_model_files(settings)
    try:
        return OnnxDetector(settings.model_path, settings.card_path, providers=settings.providers,
                            require_gpu=settings.require_gpu, threads=settings.ort_threads,
                            verify_checksum=settings.verify_checksum)
    except OSError as e:  # e.g. the mounted folder changed under us: still one line, never a traceback
        raise ModelLoadError(f"cannot read the model: {e.strerror or e} ({e.filename or settings.model_path})"
                             ) from None


def check_model_files(settings: ServeSettings) -> None:
    """Fail with one clear line when the model or its card cannot be read or the card is not a model card.

    The serving image runs as a non-root user over a mounted model folder, so permissions are the usual problem;
    the engine would otherwise surface them (and a card that is not a JSON object) as tracebacks.
    """
    from pipeline.infer.engine import ModelLoadError

    model = settings.model_path
    card = settings.card_path or model.with_name("model_card.json")
    for what, path in (("model", model), ("model card", card)):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except FileNotFoundError:
            hint = "run `detflow export` (or `dvc repro`)" if what == "model" else "export writes it next to the model"
            raise ModelLoadError(f"{what} {path} not found; {hint}") from None
        except PermissionError:
            raise ModelLoadError(f"{what} {path}: permission denied for uid {os.getuid()}; make the model folder "
                                 "and its files readable by the user the service runs as") from None
        except OSError as e:  # a folder, an I/O error on the mount, ...
            raise ModelLoadError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        read_card(card)  # the one card schema the engine reads too
    except CardError as e:
        raise ModelLoadError(str(e)) from None
