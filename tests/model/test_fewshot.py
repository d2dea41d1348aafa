"""`detflow adapt SOURCE --labels ANNOTATIONS --shots K` (issue 21): the K images (deterministic, nested, whole
patients, never scored), the class map, the adapted folder, and bad input stopped with one line before training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from pipeline.fewshot import FewShotError, held_out, images_fingerprint, pixel_digest, select_shots, training_plan

BIN = Path(sys.executable).with_name("detflow")
CLI = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "pipeline.cli"]
CLASSES = ["rbc", "wbc", "platelet"]


def _gt(n_patients: int = 30, seed: int = 0) -> dict:
    """A labelled set in model classes: 1-3 images per patient, 0-3 boxes of random classes each."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for p in range(n_patients):
        for _ in range(int(rng.integers(1, 4))):
            i = len(images) + 1
            images.append({"id": i, "file_name": f"images/train/img{i:03d}.png", "width": 64, "height": 64,
                           "patient": f"p{p:02d}"})
            for c in rng.integers(0, 3, int(rng.integers(0, 4))):
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c) + 1,
                                    "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]}


def _patients(entries: list[dict]) -> set[str]:
    return {e["patient"] for e in entries}


@pytest.mark.parametrize("seed", [0, 1])
def test_shots_are_deterministic_nested_and_whole_patients(seed: int) -> None:
    gt = _gt(seed=seed)
    picks = {k: select_shots(gt, CLASSES, k, seed=0) for k in (5, 10, 20)}
    for k, entries in picks.items():
        assert len(entries) >= k and len(entries) - k < 3  # at least K; the last patient is taken whole
        assert select_shots(gt, CLASSES, k, seed=0) == entries  # deterministic
        shuffled = {**gt, "images": list(reversed(gt["images"]))}
        assert {e["id"] for e in select_shots(shuffled, CLASSES, k, seed=0)} == {e["id"] for e in entries}
        every = {e["id"] for e in gt["images"] if e["patient"] in _patients(entries)}
        assert every == {e["id"] for e in entries}  # no patient split between fine-tuning and scoring
    assert {e["id"] for e in picks[5]} <= {e["id"] for e in picks[10]} <= {e["id"] for e in picks[20]}


def test_held_out_images_never_include_a_fine_tuning_image() -> None:
    gt = _gt()
    scored = held_out(gt, CLASSES, 20)
    assert scored and not _patients(scored) & _patients(select_shots(gt, CLASSES, 20))
    for k in (5, 10, 20):
        assert not {e["id"] for e in scored} & {e["id"] for e in select_shots(gt, CLASSES, k)}
    assert len(scored) + len(select_shots(gt, CLASSES, 20)) == len(gt["images"])


def test_shots_larger_than_the_labelled_set_fail() -> None:
    gt = _gt(n_patients=3)
    with pytest.raises(FewShotError, match=rf"--shots 99 is more than the {len(gt['images'])} usable labelled"):
        select_shots(gt, CLASSES, 99)
    with pytest.raises(FewShotError, match="positive number"):
        select_shots(gt, CLASSES, 0)


def test_training_plan_is_a_budget_in_steps() -> None:
    assert training_plan(5, 16, 100) == {"batch": 5, "repeats": 10, "epochs": 10, "steps": 100,
                                         "steps_per_epoch": 10, "close_mosaic": 1}
    assert training_plan(20, 16, 100) == {"batch": 16, "repeats": 8, "epochs": 10, "steps": 100,
                                          "steps_per_epoch": 10, "close_mosaic": 1}
    assert training_plan(3, 16, 1) == {"batch": 3, "repeats": 1, "epochs": 1, "steps": 1, "steps_per_epoch": 1,
                                       "close_mosaic": 0}
    for k in (5, 10, 20):
        plan = training_plan(k, 16, 100)
        assert plan["steps"] == 100 and plan["steps_per_epoch"] * plan["batch"] <= k * plan["repeats"]
    assert images_fingerprint(["b", "a"]) == images_fingerprint(["a", "b"])


# ------------------------------------------------------------------------------------------ the command


def _run(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not (cwd / "params.yaml").is_file():  # the shipped params (no "built-in defaults" notice on stderr)
        shutil.copyfile(REPO / "params.yaml", cwd / "params.yaml")
    env = {**os.environ, "DETFLOW_NO_PROGRESS": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([*CLI, "adapt", *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def site(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 'new site' from the tiny phantom: SOURCE = every prepared image (24, flat, renamed); labels = the train
    split's images (16 of them, 4 patients) as a COCO file in another folder, with the label 'lesion'."""
    root = tmp_path_factory.mktemp("site")
    source, labels_dir = root / "images", root / "labels"
    source.mkdir()
    labels_dir.mkdir()
    prepared = exported["prepared"]
    for split in ("train", "val", "test"):
        for png in sorted((prepared / "images" / split).glob("*.png")):
            shutil.copyfile(png, source / f"site_{png.name}")
    train = json.loads((prepared / "coco" / "train.json").read_text())
    doc = {"images": [{"id": e["id"], "file_name": f"site_{Path(e['file_name']).name}", "width": e["width"],
                       "height": e["height"], "patient_id": e["patient"]} for e in train["images"]],
           "annotations": train["annotations"], "categories": [{"id": 1, "name": "lesion"}]}
    (labels_dir / "site.json").write_text(json.dumps(doc))
    return {"root": root, "source": source, "labels": labels_dir / "site.json", "n_labelled": len(doc["images"]),
            "n_boxes": len(doc["annotations"])}


@pytest.mark.slow
def test_few_shot_fine_tunes_on_the_chosen_images(exported: dict[str, Path], site: dict[str, Path],
                                                  tmp_path: Path) -> None:
    from pipeline.config import load_params
    from pipeline.fewshot import read_labelled_site
    from pipeline.infer.engine import OnnxDetector

    out = tmp_path / "fs"
    r = _run(site["source"], "--labels", site["labels"], "--shots", "4", "--class-map", "lesion=nodule", "--model",
             exported["onnx"], "--out", out, "--steps", "2", "--set", "train.workers=0", "--set",
             "train.augment.mosaic=false", "--set", "train.strategy=feature_extraction", "--set",
             "train.backbone_lr_mult=0.1", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"adapt: few_shot, 4 of {site['n_labelled']} labelled images (K=4, fingerprint ")
    card = json.loads((out / "model_card.json").read_text())
    a = card["adaptation"]
    assert a["method"] == "few_shot" and a["shots"] == 4 and a["n_images"] == 4
    assert a["strategy"] == "feature_extraction" and a["backbone_lr_mult"] == 0.1
    assert a["labels"]["class_map"] == {"lesion": "nodule"} and a["training"]["steps"] == 2
    # the images the command trained on are the ones the shared order picks, and none of them is left to score
    params = load_params(None, [])
    labelled = read_labelled_site(params, site["source"], site["labels"], "auto", {"lesion": "nodule"}, ["nodule"],
                                  tmp_path / "scratch")
    picked = select_shots(labelled.gt, ["nodule"], 4)
    assert a["images"] == [Path(e["file_name"]).name for e in picked]
    assert a["images_fingerprint"] == images_fingerprint([labelled.image_digest[e["id"]] for e in picked])
    assert not {Path(e["file_name"]).name for e in held_out(labelled.gt, ["nodule"], 4)} & set(a["images"])
    # trained on exactly those boxes, in the model's class: the card's training sizes count them
    ids = {e["id"] for e in picked}
    boxes = [x for x in labelled.gt["annotations"] if x["image_id"] in ids]
    assert card["training_data"]["object_sizes"]["per_class"]["nodule"]["n"] <= len(boxes)
    assert card["training_data"]["manifest_sha256"] and card["classes"] == ["nodule"]
    # a new model (fine-tuned weights), its checkpoint beside it, a shift reference from the site's images
    assert (out / "model.onnx").read_bytes() != exported["onnx"].read_bytes()
    assert card["checkpoint"]["file"] == "checkpoint.pt" and (out / "checkpoint.pt").is_file()
    assert card["embedding"]["reference"]["split"] == "site"
    engine = OnnxDetector(out / "model.onnx", providers="CPUExecutionProvider")
    assert engine.embedding_reference().shape[0] == len(list(site["source"].glob("*.png")))
    assert engine.predict([engine.decode(sorted(site["source"].glob("*.png"))[0]).rgb])[0] is not None
    base = json.loads(exported["card"].read_text())
    assert a["base_model"]["sha256"] == base["sha256"] and a["checkpoint"]["sha256"] == base["checkpoint"]["sha256"]


def _bad_labels(site: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    doc = json.loads(site["labels"].read_text())
    outside = {**doc, "images": [*doc["images"], {"id": 999, "file_name": "not_here.png", "width": 256,
                                                  "height": 256}]}
    (tmp_path / "outside.json").write_text(json.dumps(outside))
    other = tmp_path / "other"  # labels beside their own images, which are not SOURCE's
    (other / "images").mkdir(parents=True)
    first = doc["images"][0]
    rgb = np.full((first["height"], first["width"], 3), 7, np.uint8)
    from PIL import Image

    Image.fromarray(rgb).save(other / "images" / first["file_name"])
    (other / "labels.json").write_text(json.dumps({**doc, "images": [first], "annotations": [
        a for a in doc["annotations"] if a["image_id"] == first["id"]]}))
    return {"outside": tmp_path / "outside.json", "other": other / "labels.json"}


CASES = [  # (with --labels, extra arguments, the line)
    (True, ["--shots", "99", "--class-map", "lesion=nodule"], "--shots 99 is more than the 16 usable labelled images"),
    (True, ["--shots", "2"], "label 'lesion' of {labels} is not a model class (nodule); map it with --class-map "
                             "(e.g. lesion=nodule)"),
    (True, ["--shots", "2", "--class-map", "lesion=tumour"], "--class-map target 'tumour' is not a model class"),
    (True, ["--shots", "2", "--class-map", "lesion=nodule,cyst=nodule"], "--class-map names label 'cyst', which"),
    (True, ["--shots", "2", "--class-map", "lesion"], "--class-map: class map entry 'lesion' must look like"),
    (True, ["--shots", "0", "--class-map", "lesion=nodule"], "--shots must be a positive number of images, got 0"),
    (True, ["--class-map", "lesion=nodule"], "few-shot adaptation needs both --labels (the annotations) and --shots"),
    (False, ["--shots", "2"], "few-shot adaptation needs both --labels (the annotations) and --shots (K)"),
    (False, ["--class-map", "lesion=nodule"], "--class-map, --checkpoint, --with-scale, --steps and --format are "
                                              "few-shot options: give --labels and --shots too"),
]


@pytest.mark.parametrize(("with_labels", "extra", "expected"), CASES, ids=[" ".join(c[1]) for c in CASES])
def test_few_shot_bad_input_is_one_line_before_training(exported: dict[str, Path], site: dict[str, Path],
                                                        tmp_path: Path, with_labels: bool, extra: list[str],
                                                        expected: str) -> None:
    labels = ["--labels", site["labels"]] if with_labels else []
    r = _run(site["source"], *labels, *extra, "--model", exported["onnx"], "--out", tmp_path / "fs", cwd=tmp_path)
    assert r.returncode in (1, 2) and r.stdout == "", r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expected.format(labels=site["labels"]) in lines[0]
    assert not (tmp_path / "fs").exists() and not list(tmp_path.rglob("*.pt"))  # nothing trained, nothing written


def test_labels_for_images_not_in_source_are_one_line(exported: dict[str, Path], site: dict[str, Path],
                                                      tmp_path: Path) -> None:
    bad = _bad_labels(site, tmp_path)
    r = _run(site["source"], "--labels", bad["outside"], "--shots", "2", "--class-map", "lesion=nodule", "--model",
             exported["onnx"], "--out", tmp_path / "fs", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: --labels {bad['outside']} names 1 image(s) not found in SOURCE {site['source']}: not_here.png; "
        "label images of SOURCE only"]
    r = _run(site["source"], "--labels", bad["other"], "--shots", "1", "--class-map", "lesion=nodule", "--model",
             exported["onnx"], "--out", tmp_path / "fs", cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "labels 1 image(s) that are not in SOURCE" in r.stderr and not (tmp_path / "fs").exists()


def test_a_card_without_its_checkpoint_is_one_line(exported: dict[str, Path], site: dict[str, Path],
                                                   tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for f in exported["onnx"].parent.glob("*.*"):
        if f.is_file():
            shutil.copyfile(f, old / f.name)
    card = json.loads((old / "model_card.json").read_text())
    del card["checkpoint"]
    (old / "model_card.json").write_text(json.dumps(card))
    r = _run(site["source"], "--labels", site["labels"], "--shots", "2", "--class-map", "lesion=nodule", "--model",
             old / "model.onnx", "--out", tmp_path / "fs", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: model card {old / 'model_card.json'} names no training checkpoint (exported before few-shot "
        "existed); give the checkpoint the model was exported from with --checkpoint (e.g. models/train/best.pt)"]


def test_pixel_digest_is_the_decoded_pixels() -> None:
    a = np.zeros((4, 5, 3), np.uint8)
    assert pixel_digest(a) == pixel_digest(a.copy()) != pixel_digest(np.zeros((5, 4, 3), np.uint8))
