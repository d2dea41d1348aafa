"""Model registry: versions, atomic promotion, rollback, history, clear errors. Pure file-system tests (fast)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from pipeline import registry
from pipeline.evaluate.gate import champion_metrics
from pipeline.registry import RegistryError


def _artifacts(tmp: Path, tag: str, map50: float = 0.8, gate_passed: bool = True) -> dict[str, Path]:
    """A fake export: 'model.onnx' bytes, a card that names their sha256, metrics, gate and parity reports."""
    d = tmp / f"export-{tag}"
    d.mkdir(parents=True)
    onnx = d / "model.onnx"
    onnx.write_bytes(f"onnx-bytes-{tag}".encode() * 100)
    sha = hashlib.sha256(onnx.read_bytes()).hexdigest()
    files = {"onnx": onnx, "card": d / "model_card.json", "metrics": d / "metrics.json", "gate": d / "gate.json",
             "parity": d / "parity.json"}
    files["card"].write_text(json.dumps({"sha256": sha, "family": "yolo", "model": "yolov5n", "classes": ["nodule"]}))
    files["metrics"].write_text(json.dumps({"map50": map50, "map50_95": map50 / 2, "froc": {"cpm": 0.5}}))
    files["gate"].write_text(json.dumps({"passed": gate_passed, "checks": []}))
    files["parity"].write_text(json.dumps({"passed": True, "delta": 0.0}))
    return files


def _register(tmp: Path, root: Path, tag: str, **kw) -> str:
    a = _artifacts(tmp, tag, **kw)
    return registry.register(a["onnx"], a["card"], a["metrics"], a["gate"], a["parity"], root)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "models" / "registry"


def test_register_creates_numbered_complete_versions(tmp_path: Path, root: Path) -> None:
    assert registry.list_versions(root) == [] and registry.champion(root) is None
    v1, v2 = _register(tmp_path, root, "a"), _register(tmp_path, root, "b")
    assert (v1, v2) == ("v1", "v2")
    for v in (v1, v2):
        assert sorted(p.name for p in (root / v).iterdir()) == sorted([*registry.ARTIFACTS, registry.MANIFEST])
    m = registry.get_version("2", root)
    assert m["version"] == "v2" and m["sha256"] == hashlib.sha256((root / "v2/model.onnx").read_bytes()).hexdigest()
    assert m["created_at"] and m["files"]["model.onnx"] == m["sha256"] and m["map50"] == 0.8
    assert [x["version"] for x in registry.list_versions(root)] == ["v1", "v2"]
    assert not any(p.name.startswith(".staging") for p in root.iterdir())  # staging folders renamed or removed


def test_register_records_the_git_commit(tmp_path: Path, root: Path) -> None:
    import subprocess

    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    (src / "f").write_text("x")
    subprocess.run(["git", "add", "f"], cwd=src, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], cwd=src, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True).stdout.strip()
    a = _artifacts(tmp_path, "g")
    v = registry.register(a["onnx"], a["card"], a["metrics"], a["gate"], a["parity"], root, source=src)
    m = registry.get_version(v, root)
    assert m["git_commit"] == head and m["git_dirty"] is False


def test_promote_rollback_and_history(tmp_path: Path, root: Path) -> None:
    v1, v2, v3 = (_register(tmp_path, root, t, map50=x) for t, x in (("a", 0.6), ("b", 0.7), ("c", 0.9)))
    p = registry.promote(v1, root)
    assert p["version"] == "v1" and p["previous"] is None and p["metrics"]["map50"] == 0.6
    registry.promote(v2, root)
    p = registry.promote("v3", root)
    assert p["previous"] == "v2" and p["lineage"] == ["v1", "v2"] and p["dir"] == "v3"
    assert registry.champion(root)["sha256"] == registry.get_version(v3, root)["sha256"]
    # the evaluation gate reads the inline metrics of the pointer the registry writes
    assert champion_metrics(root / "champion.json")["map50"] == 0.9
    assert registry.model_path("champion", root) == root / "v3" / "model.onnx"
    assert [x["champion"] for x in registry.list_versions(root)] == [False, False, True]
    # promoting the champion again is a no-op (no history line)
    assert registry.promote(v3, root)["promoted_at"] == p["promoted_at"]

    back = registry.rollback(root)
    assert back["version"] == "v2" and back["previous"] == "v1"
    assert champion_metrics(root / "champion.json")["map50"] == 0.7
    back = registry.rollback(root)
    assert back["version"] == "v1" and back["previous"] is None
    with pytest.raises(RegistryError, match="nothing to roll back: v1 is the first champion"):
        registry.rollback(root)
    events = registry.history(root)
    assert [(e["event"], e["version"]) for e in events] == [
        ("promote", "v1"), ("promote", "v2"), ("promote", "v3"), ("rollback", "v2"), ("rollback", "v1")]
    assert events[3]["from"] == "v3"
    assert all(json.loads(line) for line in (root / "history.jsonl").read_text().splitlines())


def test_promotion_is_atomic_when_the_switch_crashes(tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    v1, v2 = _register(tmp_path, root, "a"), _register(tmp_path, root, "b")
    registry.promote(v1, root)
    before = (root / "champion.json").read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash during os.replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        registry.promote(v2, root)
    monkeypatch.undo()
    assert (root / "champion.json").read_bytes() == before  # old pointer intact, byte for byte
    assert json.loads(before)["version"] == "v1"
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    assert [e["version"] for e in registry.history(root)] == ["v1"]  # the failed switch is not in the history
    # the same for a rollback
    registry.promote(v2, root)
    before = (root / "champion.json").read_bytes()
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        registry.rollback(root)
    monkeypatch.undo()
    assert (root / "champion.json").read_bytes() == before
    assert registry.champion(root)["version"] == "v2" and registry.champion(root)["previous"] == "v1"


def test_clear_errors(tmp_path: Path, root: Path) -> None:
    with pytest.raises(RegistryError, match=r"nothing to roll back: .* \(no champion yet\)"):
        registry.rollback(root)
    with pytest.raises(RegistryError, match="no champion .* nothing has been promoted"):
        registry.model_path("champion", root)
    with pytest.raises(RegistryError, match=r"unknown model version v7 .* registered versions: none"):
        registry.promote("v7", root)
    v1 = _register(tmp_path, root, "a")
    with pytest.raises(RegistryError, match=r"unknown model version v7 .* registered versions: v1"):
        registry.promote(7, root)
    with pytest.raises(RegistryError, match="invalid version 'latest'"):
        registry.promote("latest", root)
    # a damaged version cannot become champion
    (root / v1 / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="v1 is damaged"):
        registry.promote(v1, root)
    assert registry.champion(root) is None
    # artifacts that may not be registered
    bad = _artifacts(tmp_path, "failed-gate", gate_passed=False)
    with pytest.raises(RegistryError, match="gate did not pass"):
        registry.register(bad["onnx"], bad["card"], bad["metrics"], bad["gate"], bad["parity"], root)
    other = _artifacts(tmp_path, "other")
    with pytest.raises(RegistryError, match="describes sha256"):
        registry.register(bad["onnx"], other["card"], other["metrics"], other["gate"], other["parity"], root)
    with pytest.raises(RegistryError, match="missing model.onnx"):
        registry.register(tmp_path / "nope.onnx", other["card"], other["metrics"], other["gate"], other["parity"],
                          root)
    assert [x["version"] for x in registry.list_versions(root)] == ["v1"]


def test_publish_registers_new_models_only(tmp_path: Path, root: Path) -> None:
    a, b = _artifacts(tmp_path, "a"), _artifacts(tmp_path, "b")
    args = lambda x: (x["onnx"], x["card"], x["metrics"], x["gate"], x["parity"])  # noqa: E731
    r = registry.publish(*args(a), root)
    assert (r.version, r.registered, r.promoted) == ("v1", True, True) and "first champion" in r.message
    r = registry.publish(*args(a), root)
    assert (r.version, r.registered, r.promoted) == ("v1", False, False) and "identical to the champion" in r.message
    r = registry.publish(*args(b), root)
    assert (r.version, r.promoted) == ("v2", True) and "previous champion v1" in r.message
    registry.rollback(root)
    # an unchanged re-run must not undo a deliberate rollback
    r = registry.publish(*args(b), root)
    assert (r.version, r.registered, r.promoted) == ("v2", False, False) and "not re-promoted" in r.message
    assert registry.champion(root)["version"] == "v1"


def test_summary_markdown() -> None:
    md = registry.summary_markdown(
        {"map50": 0.91, "map50_95": 0.5, "froc": {"cpm": 0.7}, "ci95": {"map50": [0.8, 0.95]}, "split": "test",
         "n_images": 8, "n_patients": 2},
        {"passed": True, "checks": [{"name": "min_map50", "value": 0.91, "threshold": 0.5, "passed": True}]},
        {"matched_fraction": 1.0, "delta": 0.001, "passed": True},
        {"family": "yolo", "model": "yolov5n", "sha256": "ab" * 32, "classes": ["nodule"], "opset": 18})
    assert "| mAP50 | 0.9100 | [0.8, 0.95] |" in md and "**PASSED**" in md
    assert "| min_map50 | 0.9100 | >= 0.5000 | PASS |" in md
    assert "| delta | 0.0010 |" in md and "yolo/yolov5n" in md


def test_corrupt_champion_pointer_is_one_clear_error(tmp_path: Path) -> None:
    from pipeline.errors import DetflowError

    pointer = tmp_path / "champion.json"
    pointer.write_text('{"version": "v1", "metrics": {"map50": 0.9')  # cut short by a full disk
    with pytest.raises(DetflowError, match=r"champion pointer .* is not valid JSON"):
        champion_metrics(pointer)
    pointer.write_bytes(b"\xff\xfe{}")
    with pytest.raises(DetflowError, match="is not valid JSON"):
        champion_metrics(pointer)


def test_versions_are_readable_by_others_and_keep_the_models_companions(tmp_path: Path, root: Path) -> None:
    """The serving image's user reads a mounted registry: modes follow the umask (not tempfile's 0700), and the
    shift reference and the run report travel with the model."""
    import stat

    a = _artifacts(tmp_path, "c")
    (a["onnx"].parent / "embedding_reference.npy").write_bytes(b"npy")
    (a["onnx"].parent / "report.html").write_text("<html></html>")
    (root / ".version.staging.999999.0123abcd").mkdir(parents=True)  # left by a killed registration
    old = os.umask(0o022)
    try:
        v = registry.register(a["onnx"], a["card"], a["metrics"], a["gate"], a["parity"], root)
    finally:
        os.umask(old)
    folder = root / v
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert (folder / "report.html").read_text() == "<html></html>" and (folder / "embedding_reference.npy").is_file()
    manifest = json.loads((folder / "version.json").read_text())
    assert {"report.html", "embedding_reference.npy", "model.onnx"} <= set(manifest["files"])
    assert not (root / ".version.staging.999999.0123abcd").exists()
