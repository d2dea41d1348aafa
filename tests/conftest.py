"""Shared fixtures. Tests shrink real runs; nothing downloads (a download attempt fails fast offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_EXPORT, mirror_root


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


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, small_phantom: Path) -> dict[str, Path]:
    """phantom -> prepare -> train -> evaluate -> export, once per session; tests copy before they modify."""
    from pipeline.config import load_params
    from pipeline.data.prepare import prepare_dataset
    from pipeline.evaluate.stage import evaluate_model
    from pipeline.export import export_model
    from pipeline.train.stage import train_model

    root = tmp_path_factory.mktemp("exported")
    params = load_params(None, TINY_EXPORT)
    prepare_dataset(params, root / "prepared", root / "reports" / "data_validation.json", phantom_dir=small_phantom,
                    progress=False)
    result = train_model(params, root / "prepared", root / "models" / "train", root / "reports" / "train",
                         root / "work", mirrors=[], progress=False)
    evaluate_model(params, result.best, root / "prepared", root / "reports", progress=False)
    export_model(params, result.best, root / "prepared", root / "reports", root / "models")
    return {"root": root, "prepared": root / "prepared", "reports": root / "reports", "best": result.best,
            "onnx": root / "models" / "model.onnx", "card": root / "models" / "model_card.json",
            "phantom": small_phantom}
