"""The prepare stage end to end on the phantom and on BCCD (real data from the mirror)."""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.config import load_params
from pipeline.data import prepare as prepare_mod
from pipeline.data.prepare import prepare_dataset
from pipeline.data.split import pseudonymise, split_by_patient
from pipeline.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def prepared_phantom(tmp_path_factory: pytest.TempPathFactory, small_phantom: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep")
    params = load_params(None, [])
    result = prepare_dataset(params, out / "prepared", out / "report.json", phantom_dir=small_phantom, progress=False)
    return out / "prepared", result.report


def _manifest(prepared: Path) -> list[dict]:
    return list(csv.DictReader(open(prepared / "manifest.csv")))


def test_phantom_no_patient_in_two_splits(prepared_phantom: tuple[Path, dict]) -> None:
    prepared, report = prepared_phantom
    rows = _manifest(prepared)
    assert len(rows) == 24 and set(rows[0]) >= {"image", "split", "patient", "sha256", "width", "height", "n_boxes"}
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r["patient"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert sum(s["images"] for s in report["splits"].values()) == 24


def test_phantom_coco_loads_in_pycocotools(prepared_phantom: tuple[Path, dict]) -> None:
    from pycocotools.coco import COCO

    prepared, _ = prepared_phantom
    rows = _manifest(prepared)
    for split in ("train", "val", "test"):
        coco = COCO(str(prepared / "coco" / f"{split}.json"))
        expected = [r for r in rows if r["split"] == split]
        assert len(coco.getImgIds()) == len(expected)
        assert len(coco.getAnnIds()) == sum(int(r["n_boxes"]) for r in expected)
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["nodule"]
        for img in coco.loadImgs(coco.getImgIds()):
            assert (prepared / img["file_name"]).is_file()


def test_phantom_yolo_labels_equal_csv_boxes(prepared_phantom: tuple[Path, dict], small_phantom: Path) -> None:
    prepared, _ = prepared_phantom
    csv_boxes = defaultdict(list)
    for row in csv.DictReader(open(small_phantom / "boxes.csv")):
        csv_boxes[row["file"]].append([float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max")])
    checked = 0
    for dcm in sorted(small_phantom.rglob("*.dcm")):
        rel = dcm.relative_to(small_phantom).as_posix()
        patient = pseudonymise(str(pydicom.dcmread(dcm, stop_before_pixels=True).PatientID), "detflow")
        (label,) = list(prepared.glob(f"labels/*/{patient}_{dcm.stem}.txt"))
        ours = []
        for line in label.read_text().splitlines():
            _, cx, cy, w, h = map(float, line.split())
            ours.append([(cx - w / 2) * 256, (cy - h / 2) * 256, (cx + w / 2) * 256, (cy + h / 2) * 256])
        theirs = sorted(csv_boxes.get(rel, []))
        assert len(ours) == len(theirs)
        if theirs:
            assert np.abs(np.array(sorted(ours)) - np.array(theirs)).max() <= 0.5
            checked += 1
    assert checked >= 10


def test_split_is_deterministic_and_stratified() -> None:
    patients = {f"p{i:02d}": i % 3 != 0 for i in range(30)}
    a = split_by_patient(patients, 0.2, 0.2, seed=7)
    b = split_by_patient(dict(reversed(list(patients.items()))), 0.2, 0.2, seed=7)
    assert a == b
    assert split_by_patient(patients, 0.2, 0.2, seed=8) != a
    for positive in (True, False):
        members = [p for p, pos in patients.items() if pos == positive]
        counts = {s: sum(a[p] == s for p in members) for s in ("train", "val", "test")}
        assert counts["test"] == round(len(members) * 0.2) and counts["val"] == round(len(members) * 0.2)


def test_crash_while_writing_keeps_previous_outputs(tmp_path: Path, small_phantom: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    params = load_params(None, [])
    out = tmp_path / "prepared"
    prepare_dataset(params, out, tmp_path / "r.json", phantom_dir=small_phantom, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def explode(*args: object, **kwargs: object) -> str:
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod, "_coco", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(load_params(None, ["prepare.seed=5"]), out, tmp_path / "r.json", phantom_dir=small_phantom,
                        progress=False)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_sources_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither a known dataset"):
        prepare_dataset(load_params(None, [f"data.source={tmp_path / 'nope'}"]), tmp_path / "o", tmp_path / "r.json")
    with pytest.raises(DataError, match="run `detflow phantom`"):
        prepare_dataset(load_params(None, []), tmp_path / "o", tmp_path / "r.json", phantom_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="expected one of"):
        load_params(None, ["prepare.split=random"])


@pytest.mark.realdata
def test_bccd_official_split_and_known_defects(tmp_path: Path, mirror: Path) -> None:
    params = load_params(None, ["data.source=bccd"])
    start = time.perf_counter()
    result = prepare_dataset(params, tmp_path / "prepared", tmp_path / "report.json", raw_dir=tmp_path / "raw",
                             mirrors=[mirror], progress=False)
    elapsed = time.perf_counter() - start
    report = result.report
    assert result.n_images == 364
    assert {k: v["images"] for k, v in report["splits"].items()} == {"train": 205, "val": 87, "test": 72}
    assert report["split_mode"] == "official" and report["classes"] == ["RBC", "WBC", "Platelets"]
    degenerate = [p for p in report["problems"] if p["kind"] == "degenerate_box"]
    assert sorted(Path(p["file"]).stem for p in degenerate) == ["BloodImage_00338", "BloodImage_00343"]
    assert all(p["action"] == "box_dropped" for p in degenerate)
    near = [p for p in report["problems"] if p["kind"] in ("near_duplicate_box", "duplicate_box")]
    assert len(near) >= 5 and len({p["file"] for p in near}) >= 5
    # 4,888 boxes in the source: every one either written or recorded as dropped.
    assert report["summary"]["boxes_out"] + report["summary"]["boxes_dropped"] == 4888
    from pycocotools.coco import COCO

    assert len(COCO(str(tmp_path / "prepared" / "coco" / "test.json")).getImgIds()) == 72
    print(f"BCCD prepare: {elapsed:.2f} s (its speed against decoding alone: bench/prepare.py)")


@pytest.mark.realdata
def test_bccd_official_split_json_roundtrip(tmp_path: Path, mirror: Path) -> None:
    """The dataset.yaml is an Ultralytics data file: the splits and names resolve next to it."""
    import yaml

    params = load_params(None, ["data.source=bccd"])
    prepare_dataset(params, tmp_path / "p", tmp_path / "r.json", raw_dir=tmp_path / "raw", mirrors=[mirror],
                    progress=False)
    data = yaml.safe_load((tmp_path / "p" / "dataset.yaml").read_text())
    assert data["names"] == {0: "RBC", 1: "WBC", 2: "Platelets"} and "path" not in data
    assert len(list((tmp_path / "p" / data["test"]).iterdir())) == 72
    info = json.loads((tmp_path / "p" / "prepare_info.json").read_text())
    assert info["source"] == "bccd" and len(info["manifest_sha256"]) == 64
