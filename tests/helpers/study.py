"""Builders of the study's tests (``from helpers.study import ...``): a scratch git + DVC checkout of this repository
with tiny study params, the environment its commands run in, and constructed test-set detections."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import REPO

BIN = Path(sys.executable).parent
GIT_ID = {"GIT_AUTHOR_NAME": "detflow-test", "GIT_AUTHOR_EMAIL": "test@detflow.invalid",
          "GIT_COMMITTER_NAME": "detflow-test", "GIT_COMMITTER_EMAIL": "test@detflow.invalid"}
BOX = [10.0, 10.0, 30.0, 30.0]


def study_env(**extra: str) -> dict[str, str]:
    """The environment of a study command in a scratch checkout: this venv's programs first, a git identity, no
    progress bars, no DVC analytics."""
    env = {k: v for k, v in os.environ.items() if k not in ("DETFLOW_WORKDIR", "PYTHONPATH")}
    env.update(GIT_ID)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", DETFLOW_NO_PROGRESS="1", **extra)
    return env


def make_checkout(root: Path, edit: Any) -> Path:
    """This repository's files (tracked and untracked, not ignored) in a new git repository with tiny phantom,
    training and study params (one recipe, fractions 0.5 and 1, scratch, 1 epoch at 64 px), then ``edit(params)``."""
    import yaml

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith((".venv", "bench/results")):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    (root / "dvc.lock").unlink(missing_ok=True)  # this checkout's lock describes its own outputs
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["phantom"].update(patients=8, slices=2, size=64)
    params["train"].update(imgsz=64, batch=8, nominal_batch=8, workers=0)
    params["train"]["augment"]["mosaic"] = False
    params["evaluate"].update(bootstrap=50, preview_images=2)
    params["study"].update(recipes={"fine_tune": {"strategy": "fine_tune"}}, fractions=[0.5, 1.0], init=["scratch"],
                           imgsz=64, epochs=1)
    edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "baseline"]):
        subprocess.run(["git", *args], cwd=root, env=study_env(), check=True, capture_output=True)
    return root


def lesion_image(i: int, patient: str, found: bool, box: list[float] = BOX, score: float = 0.9) -> Any:
    """One test image with one lesion of class 0 at :data:`BOX`; ``found``: one detection at ``box`` (else none)."""
    import numpy as np

    from pipeline.evaluate.metrics import ImageDets

    dets = [box] if found else []
    return ImageDets(image_id=i, patient=patient, gt_boxes=np.array([BOX]), gt_labels=np.array([0]),
                     boxes=np.array(dets, dtype=float).reshape(-1, 4), scores=np.array([score] * len(dets)),
                     labels=np.zeros(len(dets), dtype=np.int64))


def arm_images(n_patients: int, hits: list[bool], per_patient: int = 1) -> list[Any]:
    """One arm's test set: ``per_patient`` one-lesion images per patient, image ``i`` found when ``hits[i]``."""
    return [lesion_image(i, f"p{i // per_patient}", hits[i]) for i in range(n_patients * per_patient)]
