"""Keep Ultralytics and the libraries it drives offline and inside the project's work folder.

``import ultralytics`` decides at import time whether it is online (DNS lookups of one.one.one.one and dns.google)
and writes ``settings.json`` under ``~/.config/Ultralytics``; Matplotlib, used by its plots and ours, writes a font
cache under ``~/.cache/matplotlib``. Both read their environment once, when first imported, so it must be set
before: :func:`import_ultralytics` is the only way detflow imports Ultralytics, and :func:`configure_environment`
runs before anything that may import it indirectly (unpickling an Ultralytics checkpoint) or imports Matplotlib.

Where things go (``ROOT`` is ``$DETFLOW_WORKDIR``, default ``.detflow`` in the working directory, the project root
under ``dvc repro``):

- ``ROOT/ultralytics/Ultralytics/``: Ultralytics' settings (``YOLO_CONFIG_DIR``), its default datasets / weights /
  runs folders and the label font it would otherwise download from GitHub (matplotlib's DejaVu Sans, under the
  names ``Arial.ttf`` / ``Arial.Unicode.ttf`` Ultralytics looks for);
- ``ROOT/matplotlib/``: Matplotlib's config and font cache (``MPLCONFIGDIR``).

``YOLO_OFFLINE=1`` (no DNS probe, so no telemetry or crash reports either), ``YOLO_AUTOINSTALL=0`` (no pip installs
at run time), ``YOLO_VERBOSE=0`` (Ultralytics logs warnings only: detflow draws its own progress),
``DVC_NO_ANALYTICS=1``, ``ORT_DISABLE_TELEMETRY=1`` (onnxruntime, which Ultralytics' exporter and onnxslim may import
before detflow's engine does, writes a device id and a database under ``~/.cache`` otherwise) and
``PREFECT_HOME=ROOT/prefect`` (Prefect's settings, database and logs, ``~/.prefect`` otherwise) complete the set.
Integrations that would write elsewhere or sync (DVC, MLflow, Comet, ...)
are switched off in the settings. A variable already set by the user wins; torch's hub cache (``TORCH_HOME``) is
left alone, since it is a documented source of Faster R-CNN's COCO weights and is written only by a download.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType

WORKDIR_ENV = "DETFLOW_WORKDIR"
# Ultralytics integrations and telemetry; detflow logs with DVCLive itself. Keys absent from a version are skipped.
INTEGRATIONS_OFF = ("sync", "hub", "dvc", "mlflow", "comet", "clearml", "wandb", "neptune", "raytune", "tensorboard")
# Fonts Ultralytics' label drawing asks for (checks.check_font), downloaded from GitHub when missing.
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")

_log = logging.getLogger(__name__)
_configured = False  # configure_environment ran in this process
_imported = False  # import_ultralytics finished in this process


def state_root() -> Path:
    """The project's work folder for run state and third-party caches (kept out of DVC outputs and git)."""
    return Path(os.environ.get(WORKDIR_ENV, ".detflow"))


def configure_environment(root: Path | None = None) -> dict[str, str]:
    """Set the variables above (where unset) and return the ones in effect; call before importing the libraries."""
    base = (root or state_root()).resolve()
    wanted = {
        "YOLO_CONFIG_DIR": str(base / "ultralytics"),
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "0",
        "YOLO_VERBOSE": "0",
        "MPLCONFIGDIR": str(base / "matplotlib"),
        "DVC_NO_ANALYTICS": "1",
        "ORT_DISABLE_TELEMETRY": "1",
        "PREFECT_HOME": str(base / "prefect"),
    }
    global _configured
    if "ultralytics" in sys.modules and not _configured:
        _log.warning("Ultralytics was imported before detflow configured it: it may have probed the network and "
                     "written its settings outside %s", base)
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    _configured = True
    return {key: os.environ[key] for key in wanted}


def import_ultralytics(root: Path | None = None) -> ModuleType:
    """``import ultralytics`` after :func:`configure_environment`; the first call also applies the settings, the
    label fonts and the log level. Returns the ``ultralytics`` package."""
    global _imported
    env = configure_environment(root)
    import ultralytics
    from ultralytics.utils import LOGGER, SETTINGS, USER_CONFIG_DIR

    if _imported:
        return ultralytics
    base = Path(env["YOLO_CONFIG_DIR"]).expanduser()
    wanted: dict[str, object] = {k: False for k in INTEGRATIONS_OFF if k in SETTINGS}
    wanted.update({f"{k}_dir": str(base / k) for k in ("datasets", "weights", "runs") if f"{k}_dir" in SETTINGS})
    changed = {k: v for k, v in wanted.items() if SETTINGS.get(k) != v}
    if changed:
        SETTINGS.update(changed)  # rewrites settings.json, inside the project
    _provide_fonts(Path(USER_CONFIG_DIR))
    level = logging.INFO if env["YOLO_VERBOSE"].strip().lower() in ("1", "true", "yes", "on", "y", "t") \
        else logging.WARNING
    LOGGER.setLevel(level)
    for handler in LOGGER.handlers:  # Ultralytics' own stdout handler carries the level too
        handler.setLevel(level)
    _imported = True
    return ultralytics


def _provide_fonts(config_dir: Path) -> None:
    """Ultralytics downloads Arial.ttf from GitHub for label text unless its config folder has it; give it
    matplotlib's DejaVu Sans (a dependency, free to redistribute) under that name instead."""
    spec = find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return
    source = Path(spec.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not source.is_file():
        return
    for name in FONT_NAMES:
        target = config_dir / name
        if not target.exists():
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(source, tmp)
            tmp.replace(target)
