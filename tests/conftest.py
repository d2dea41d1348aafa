"""Shared fixtures. Tests shrink real runs; nothing downloads (a download attempt fails fast offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def mirror_root() -> Path | None:
    value = os.environ.get("DETFLOW_ASSETS", "")
    for part in value.split(os.pathsep):
        if part and Path(part).is_dir():
            return Path(part)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_mirror = pytest.mark.skip(reason="needs the asset mirror: set DETFLOW_ASSETS (CI sets ../shared)")
    cuda = None
    for item in items:
        if "realdata" in item.keywords and mirror_root() is None:
            item.add_marker(no_mirror)
        if "gpu" in item.keywords:
            if cuda is None:
                try:
                    import torch

                    cuda = torch.cuda.is_available()
                except ImportError:
                    cuda = False
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def mirror() -> Path:
    root = mirror_root()
    if root is None:
        pytest.skip("needs the asset mirror: set DETFLOW_ASSETS")
    return root


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-patient x 4-slice phantom, generated once per session."""
    from pipeline.config import PhantomParams
    from pipeline.data.phantom import generate_phantom

    out = tmp_path_factory.mktemp("phantom") / "phantom"
    generate_phantom(PhantomParams(patients=6, slices=4, seed=3), out, progress=False)
    return out
