"""``train.fraction``: a nested, patient-level, class-stratified subsample of the train split; val and test untouched;
recorded in transfer.json, metrics.json and the model card; impossible fractions fail before any training."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from pipeline.config import PhantomParams, load_params
from pipeline.data.prepare import prepare_dataset
from pipeline.errors import DataError
from pipeline.train.subset import load_train_subset, select_train_subset, write_subset_view

TINY = ["train.imgsz=64", "train.batch=8", "train.nominal_batch=8", "train.workers=0", "train.augment.mosaic=false",
        "train.pretrained=none"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-patient phantom (3 slices each, 64 px): 12 train patients, several images per patient."""
    from pipeline.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("fraction")
    generate_phantom(PhantomParams(patients=20, slices=3, size=64, seed=5), root / "phantom", progress=False)
    prepare_dataset(load_params(None, []), root / "prepared", root / "report.json", phantom_dir=root / "phantom",
                    progress=False)
    return root / "prepared"


def _doc(prepared: Path, split: str) -> dict:
    return json.loads((prepared / "coco" / f"{split}.json").read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("seed", [0, 1])
def test_fractions_are_nested_by_patient_and_stratified(prepared: Path, seed: int) -> None:
    train = _doc(prepared, "train")
    per_patient: dict[str, int] = {}
    for e in train["images"]:
        per_patient[e["patient"]] = per_patient.get(e["patient"], 0) + 1
    subsets = {f: load_train_subset(prepared, f, seed) for f in (0.25, 0.5, 1.0)}
    patients = {f: set(s.patients) for f, s in subsets.items()}
    assert patients[0.25] < patients[0.5] < patients[1.0] == set(per_patient)
    assert subsets[1.0].whole and not subsets[0.5].whole
    for f in (0.25, 0.5):
        s = subsets[f]
        # whole patients only, and the shortest prefix holding >= the fraction of the images
        assert {e["patient"] for e in s.images} == patients[f]
        assert len(s.images) == sum(per_patient[p] for p in patients[f])
        assert len(s.images) >= f * len(train["images"]) > len(s.images) - per_patient[s.patients[-1]]
        # per class within the largest patient's image count of proportional (patients are the unit)
        for cls, total in s.class_images_total.items():
            assert abs(s.class_images[cls] - total * len(s.images) / len(train["images"])) <= max(per_patient.values())
    assert load_train_subset(prepared, 0.5, seed).patients == subsets[0.5].patients  # deterministic


def test_one_image_per_patient_counts_within_one_image_of_proportional() -> None:
    """With every image its own patient (BCCD), each class's image count is within one image of proportional."""
    images, anns = [], []
    for i in range(1, 121):
        images.append({"id": i, "file_name": f"images/train/{i}.png"})  # no patient: each image is its own unit
        classes = [1] + ([2] if i % 3 == 0 else []) + ([3] if i % 10 == 0 else [])
        anns += [{"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [0, 0, 5, 5]} for c in classes]
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": 1, "name": "RBC"}, {"id": 2, "name": "WBC"}, {"id": 3, "name": "Platelets"}]}
    previous: set[int] = set()
    for f in (0.1, 0.25, 0.5, 0.75, 1.0):
        s = select_train_subset(doc, f, seed=0)
        ids = {e["id"] for e in s.images}
        assert previous <= ids and len(ids) == math.ceil(f * 120)
        previous = ids
        for name, total in s.class_images_total.items():
            assert abs(s.class_images[name] - total * len(ids) / 120) <= 1, (f, name, s.class_images)


def test_training_on_a_fraction_leaves_val_and_test_alone_and_records_it(prepared: Path, tmp_path: Path) -> None:
    from pipeline.train.stage import train_model

    before = {p: _sha(prepared / "coco" / f"{p}.json") for p in ("train", "val", "test")}
    params = load_params(None, [*TINY, "train.fraction=0.5", "train.epochs=2"])
    result = train_model(params, prepared, tmp_path / "models", tmp_path / "reports", tmp_path / "work",
                         mirrors=[], progress=False)
    assert {p: _sha(prepared / "coco" / f"{p}.json") for p in ("train", "val", "test")} == before
    subset = load_train_subset(prepared, 0.5, 0)
    transfer = json.loads((tmp_path / "reports" / "transfer.json").read_text())
    rec = transfer["train_subset"]
    assert rec["fraction"] == 0.5 and rec["order_seed"] == 0 and rec["order_seed_from"] == "train.seed"
    assert rec["n_images"] == len(subset.images) < rec["n_images_total"] == len(_doc(prepared, "train")["images"])
    assert rec["n_patients"] == len(subset.patients)
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["train_images"] == len(subset.images)
    assert metrics["optimizer_steps"] == 2 * math.ceil(len(subset.images) / 8)  # batch 8 = nominal: 1 step/batch
    assert metrics["train_seconds"] > 0 and metrics["trainable_params"] == transfer["trainable_parameters"] > 0
    run_dir = next((tmp_path / "work").glob("yolo-*"))
    listed = (run_dir / "train_subset.txt").read_text().splitlines()
    assert sorted(Path(p).name for p in listed) == sorted(Path(e["file_name"]).name for e in subset.images)
    assert result.epochs_run == 2


def test_impossible_fractions_fail_before_training(prepared: Path, tmp_path: Path) -> None:
    doc = _doc(prepared, "train")
    # one rare class held by a single image: a small fraction that misses it names the smallest that works
    rare = {"id": 99, "name": "rare"}
    doc = {**doc, "categories": [*doc["categories"], rare],
           "annotations": [*doc["annotations"], {"id": 10**6, "image_id": doc["images"][-1]["id"], "category_id": 99,
                                                  "bbox": [0, 0, 4, 4]}]}
    with pytest.raises(DataError, match=r"no image of class rare; use a larger fraction \(at least"):
        for f in (0.05, 0.1, 0.2, 0.3):
            select_train_subset(doc, f, 0)
    empty_val = tmp_path / "noval"
    (empty_val / "coco").mkdir(parents=True)
    (empty_val / "coco" / "train.json").write_text(json.dumps(_doc(prepared, "train")))
    (empty_val / "coco" / "val.json").write_text(json.dumps({**_doc(prepared, "val"), "images": []}))
    with pytest.raises(DataError, match="the val split of .* is empty"):
        load_train_subset(empty_val, 0.5, 0)


def test_subset_view_points_ultralytics_at_the_chosen_images(prepared: Path, tmp_path: Path) -> None:
    import yaml

    subset = load_train_subset(prepared, 0.25, 0)
    dataset_yaml, train_json = write_subset_view(prepared, subset, tmp_path)
    view = yaml.safe_load(dataset_yaml.read_text())
    assert view["val"] == "images/val" and Path(view["path"]) == prepared.resolve()
    assert len(Path(view["train"]).read_text().splitlines()) == len(subset.images)
    doc = json.loads(train_json.read_text())
    assert {e["id"] for e in doc["images"]} == {e["id"] for e in subset.images}
    assert all(a["image_id"] in {e["id"] for e in subset.images} for a in doc["annotations"])
