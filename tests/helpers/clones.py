"""A scratch clone of the working tree for tests that run DVC stages or flows (tests/integration): tiny params,
git with a test identity, the tracked and untracked-but-not-ignored files copied into a fresh repository."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from helpers import REPO

# 6 patients x 4 slices at 128 px, 1 epoch at 64 px from scratch, 20 bootstrap resamples, gates at 0.
TINY: dict[str, Any] = {
    "phantom.patients": 6, "phantom.slices": 4, "phantom.size": 128,
    "train.imgsz": 64, "train.batch": 8, "train.nominal_batch": 8, "train.workers": 0, "train.epochs": 1,
    "train.augment.mosaic": False, "train.pretrained": "none", "train.device": "cpu",
    "evaluate.bootstrap": 20, "evaluate.conf": 0.01, "evaluate.preview_images": 2,
    "gate.min_map50": 0, "gate.min_cpm": 0, "gate.min_sensitivity_at_1fp": 0, "gate.max_regression": None,
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=detflow-test", "-c", "user.email=test@detflow.invalid", *args],
                          cwd=repo, check=True, capture_output=True, text=True).stdout


def copy_repo(dest: Path) -> Path:
    """The working tree's tracked and untracked-but-not-ignored files, in a fresh git repository (one commit)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         check=True, capture_output=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = REPO / rel
        if src.is_symlink():  # tracked links (models/model.onnx -> current/model.onnx) stay links
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dest / rel)
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "test copy")
    return dest
