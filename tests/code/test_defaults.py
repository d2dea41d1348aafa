"""One source of defaults: the code's parameter defaults equal the shipped params.yaml, key by key, and a run
without params.yaml says on stderr which defaults it used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from helpers import REPO
from pydantic import BaseModel

from pipeline.config import Params, load_params


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _raw_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Field defaults as written in the code, before validators (``model: auto`` stays ``auto``)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        value = info.get_default(call_default_factory=True)
        out[name] = _raw_defaults(type(value)) if isinstance(value, BaseModel) else value
    return out


def test_every_code_default_equals_params_yaml() -> None:
    shipped = _leaves(yaml.safe_load((REPO / "params.yaml").read_text()))
    code = _leaves(_raw_defaults(Params))
    assert set(code) == set(shipped), "params.yaml must list every parameter, and only those"
    differ = {k: (code[k], shipped[k]) for k in code if code[k] != shipped[k]
              and not (isinstance(code[k], tuple) and list(code[k]) == shipped[k])}
    assert differ == {}, "code default != params.yaml (code, yaml)"
    # the two: 10 vs 20 epochs, nominal batch 64 vs 16
    assert Params().train.epochs == 20 and Params().train.nominal_batch == 16
    assert Params().model_dump(mode="json") == load_params(REPO / "params.yaml").model_dump(mode="json")


def test_a_stage_without_params_yaml_says_which_defaults_it_used(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "pipeline.cli", "phantom", "--out", "ph", "--quiet",
            "--set", "phantom.patients=1", "--set", "phantom.slices=1", "--set", "phantom.size=64"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "defaults" in ln]
    assert len(lines) == 1 and "no params.yaml" in lines[0] and "built-in defaults" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "ph" / "boxes.csv").is_file()
    # with params.yaml present: silent
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "defaults" not in proc.stderr, proc.stderr
