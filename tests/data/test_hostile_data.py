"""Hostile and messy datasets: duplicates never leak, EXIF is applied once, nothing raises a traceback, and the
report's totals reconcile. Every fixture is generated here (PIL/numpy images, phantom DICOM)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO
from PIL import Image

from pipeline.config import load_params
from pipeline.data.prepare import prepare_dataset
from pipeline.errors import DataError

# ------------------------------------------------------------------------------------------------- fixtures


def _pixels(seed: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def _image(path: Path, seed: int, size: tuple[int, int] = (64, 48), **save: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(seed, size)).save(path, **save)
    return path


def _block(path: Path, stored: tuple[int, int], block: tuple[int, int, int, int], orientation: int) -> Path:
    """A dark image with one white block (x1, y1, x2, y2 on the stored pixels) and an EXIF Orientation."""
    arr = np.zeros((stored[1], stored[0], 3), np.uint8)
    x1, y1, x2, y2 = block
    arr[y1:y2, x1:x2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, exif=exif.tobytes(), **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def _voc_xml(path: Path, filename: str, boxes: list[tuple], size: tuple[int, int] | None = (64, 48),
             label: str = "cell") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height></size>" if size else ""
    objs = "".join(f"<object><name>{label}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                   f"<ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    path.write_text(f"<annotation><filename>{filename}</filename>{size_xml}{objs}</annotation>")


def _prepare(tmp: Path, source: Path, *extra: str, classes: str = "[cell]") -> dict:
    params = load_params(None, [f"data.source={source}", "prepare.max_bad_fraction=1.0", "prepare.split=patient",
                                f"data.classes={classes}", *extra])
    return prepare_dataset(params, tmp / "prepared", tmp / "report.json", progress=False).report


def _problems(report: dict, kind: str) -> list[dict]:
    return [p for p in report["problems"] if p["kind"] == kind]


def _manifest(tmp: Path) -> list[dict]:
    return list(csv.DictReader(open(tmp / "prepared" / "manifest.csv")))


def _label_boxes(tmp: Path, row: dict) -> list[list[float]]:
    label = (tmp / "prepared" / row["image"].replace("images", "labels", 1)).with_suffix(".txt")
    w, h = int(row["width"]), int(row["height"])
    out = []
    for line in label.read_text().splitlines():
        _, cx, cy, bw, bh = map(float, line.split())
        out.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
    return out


def _assert_reconciled(report: dict) -> None:
    t = report["totals"]
    assert t["images"]["found"] == t["images"]["written"] + t["images"]["quarantined"]
    assert t["boxes"]["read"] == t["boxes"]["written"] + t["boxes"]["dropped"]
    assert t["boxes"]["dropped"] == sum(p["boxes"] for p in report["problems"])
    assert t["reconciled"] is True


def _assert_no_leak(tmp: Path) -> None:
    rows = _manifest(tmp)
    splits_of: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        splits_of["patient " + r["patient"]].add(r["split"])
        splits_of["sha " + r["sha256"]].add(r["split"])
    assert {k: v for k, v in splits_of.items() if len(v) > 1} == {}


# ------------------------------------------------------------------------------------------------- duplicates


def test_coco_duplicate_ids_and_file_names_never_leak(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    for i in range(8):
        _image(root / "images" / f"im{i}.png", seed=i)
    _image(root / "images" / "twice.png", seed=50)
    _image(root / "images" / "same_a.png", seed=51)
    _image(root / "images" / "same_b.png", seed=52)
    images = [{"id": i, "file_name": f"im{i}.png", "width": 64, "height": 48, "patient_id": f"P{i}"}
              for i in range(8)]
    images += [{"id": 100, "file_name": "twice.png", "width": 64, "height": 48, "patient_id": "PX"},
               {"id": 101, "file_name": "twice.png", "width": 64, "height": 48, "patient_id": "PX"},
               {"id": 200, "file_name": "same_a.png", "width": 64, "height": 48},
               {"id": 200, "file_name": "same_b.png", "width": 64, "height": 48}]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 10, 10]} for i in range(8)]
    anns += [{"id": 50, "image_id": 100, "category_id": 1, "bbox": [5, 5, 10, 10]},
             {"id": 51, "image_id": 101, "category_id": 1, "bbox": [30, 20, 10, 10]},  # conflicts with id 100
             {"id": 60, "image_id": 200, "category_id": 1, "bbox": [1, 1, 10, 10]}]  # which of same_a/same_b?
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                "categories": [{"id": 1, "name": "cell"}]}))
    report = _prepare(tmp_path, root)
    rows = _manifest(tmp_path)
    assert len(rows) == 8 and all("twice" not in r["image"] and "same_" not in r["image"] for r in rows)
    dup = {p["file"]: p for p in _problems(report, "duplicate_image")}
    assert set(dup) == {"images/twice.png", "images/same_a.png", "images/same_b.png"}
    assert all(p["action"] == "image_quarantined" for p in dup.values())
    assert dup["images/twice.png"]["boxes"] == 2 and "coco.json#image 200" in dup["images/same_a.png"]["detail"]
    _assert_reconciled(report)
    assert report["totals"]["images"] == {"found": 11, "written": 8, "quarantined": 3, "annotation_refs_missing": 0}
    assert report["totals"]["boxes"]["read"] == 8 + 2 + 2  # id 200's box is attached to both of its images
    _assert_no_leak(tmp_path)


def test_voc_two_xmls_for_one_image_kept_once_or_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    for i in range(5):
        _image(root / "JPEGImages" / f"v{i}.jpg", seed=i)
        _voc_xml(root / "Annotations" / f"v{i}.xml", f"v{i}.jpg", [(5, 5, 20, 20)])
    _voc_xml(root / "Annotations" / "v0_copy.xml", "v0.jpg", [(5, 5, 20, 20)])  # identical: kept once
    _voc_xml(root / "Annotations" / "v1_other.xml", "v1.jpg", [(30, 5, 50, 20)])  # conflicting: quarantined
    report = _prepare(tmp_path, root)
    rows = _manifest(tmp_path)
    assert sorted(Path(r["image"]).stem for r in rows) == ["v0", "v2", "v3", "v4"]
    coco = [json.loads((tmp_path / "prepared" / "coco" / f"{s}.json").read_text()) for s in ("train", "val", "test")]
    assert sum(len(c["images"]) for c in coco) == 4 and sum(len(c["annotations"]) for c in coco) == 4
    kinds = sorted((p["file"], p["action"], p["boxes"]) for p in _problems(report, "duplicate_image"))
    assert kinds == [("JPEGImages/v0.jpg", "fixed", 1), ("JPEGImages/v1.jpg", "image_quarantined", 2)]
    _assert_reconciled(report)


def test_yolo_png_and_jpg_sharing_one_label_file_are_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    (root / "data.yaml").parent.mkdir(parents=True)
    (root / "data.yaml").write_text("names: [cell]\n")
    _image(root / "images" / "a.png", seed=1)
    _image(root / "images" / "a.jpg", seed=2)
    _image(root / "images" / "b.png", seed=3)
    (root / "labels").mkdir()
    for stem in ("a", "b"):
        (root / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    report = _prepare(tmp_path, root)
    assert [Path(r["image"]).stem for r in _manifest(tmp_path)] == ["b"]
    dup = _problems(report, "duplicate_image")
    assert sorted(p["file"] for p in dup) == ["images/a.jpg", "images/a.png"]
    assert all(p["action"] == "image_quarantined" and "labels/a.txt" in p["detail"] for p in dup)
    _assert_reconciled(report)


def test_identical_content_under_two_names_lands_in_one_split(tmp_path: Path) -> None:
    """Ten patients each with a copy of one shared image (same bytes, different names): they become one split
    group. Before: each copy followed its own patient, so the image was in train and in test."""
    root = tmp_path / "coco"
    shared = _image(root / "images" / "shared.png", seed=99).read_bytes()
    images, anns = [], []
    for i in range(10):
        (root / "images" / f"copy{i}.png").write_bytes(shared)
        _image(root / "images" / f"own{i}.png", seed=i)
        images += [{"id": 2 * i, "file_name": f"copy{i}.png", "patient_id": f"P{i}"},
                   {"id": 2 * i + 1, "file_name": f"own{i}.png", "patient_id": f"Q{i}"}]
        anns += [{"id": 2 * i, "image_id": 2 * i, "category_id": 1, "bbox": [4, 4, 8, 8]},
                 {"id": 2 * i + 1, "image_id": 2 * i + 1, "category_id": 1, "bbox": [4, 4, 8, 8]}]
    images.append({"id": 99, "file_name": "shared.png", "patient_id": "P0"})
    anns.append({"id": 99, "image_id": 99, "category_id": 1, "bbox": [4, 4, 8, 8]})
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                "categories": [{"id": 1, "name": "cell"}]}))
    report = _prepare(tmp_path, root)
    rows = _manifest(tmp_path)
    assert len(rows) == 21
    copies = [r for r in rows if "copy" in r["image"] or "shared" in r["image"]]
    assert len(copies) == 11 and len({r["split"] for r in copies}) == 1
    assert len(_problems(report, "duplicate_content")) == 10
    _assert_no_leak(tmp_path)
    _assert_reconciled(report)


def test_identical_content_in_two_official_splits_moves_to_the_earliest(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    data = _image(root / "JPEGImages" / "x.jpg", seed=7).read_bytes()
    (root / "JPEGImages" / "x_again.jpg").write_bytes(data)
    _image(root / "JPEGImages" / "y.jpg", seed=8)
    for stem in ("x", "x_again", "y"):
        _voc_xml(root / "Annotations" / f"{stem}.xml", f"{stem}.jpg", [(5, 5, 20, 20)])
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("x\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("x_again\ny\n")
    params = load_params(None, [f"data.source={root}", "data.classes=[cell]", "prepare.max_bad_fraction=1"])
    report = prepare_dataset(params, tmp_path / "prepared", tmp_path / "report.json", progress=False).report
    assert report["split_mode"] == "official"
    assert {Path(r["image"]).stem: r["split"] for r in _manifest(tmp_path)} == {"x": "train", "x_again": "train",
                                                                                 "y": "test"}
    moved = [p for p in _problems(report, "duplicate_content") if "moved" in p["detail"]]
    assert [p["file"] for p in moved] == ["JPEGImages/x_again.jpg"]


def test_dicom_differing_only_in_header_is_the_same_image(tmp_path: Path, small_phantom: Path) -> None:
    """A slice re-exported under another patient ID (new header, same pixels) is the same image: found by the hash
    of its pixels (not of its file), kept with its twin in one split, their patients merged."""
    import pydicom

    root = tmp_path / "dicom"
    shutil.copytree(small_phantom, root)
    rows = list(csv.DictReader(open(root / "boxes.csv")))
    src = root / rows[0]["file"]
    ds = pydicom.dcmread(src)
    ds.PatientID, ds.SOPInstanceUID = "OTHER-9", pydicom.uid.generate_uid(entropy_srcs=["twin"])
    (root / "dicom" / "OTHER").mkdir()
    ds.save_as(root / "dicom" / "OTHER" / "twin.dcm")
    twin_rows = [{**r, "file": "dicom/OTHER/twin.dcm", "sop_instance_uid": ""} for r in rows
                 if r["file"] == rows[0]["file"]]
    with open(root / "boxes.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerows(twin_rows)
    for seed in range(4):  # whatever the split draws, the twins stay together
        report = _prepare(tmp_path / str(seed), root, f"prepare.seed={seed}", classes="[nodule]")
        (dup,) = _problems(report, "duplicate_content")
        both = dup["file"] + " " + dup["detail"]  # paths are redacted: the patient folder becomes its pseudonym
        assert "dicom/OTHER/twin.dcm" in both and Path(rows[0]["file"]).name in both.replace("twin.dcm", "")
        _assert_no_leak(tmp_path / str(seed))
        assert report["totals"]["images"]["written"] == 25


# ------------------------------------------------------------------------------------------------- EXIF


@pytest.mark.parametrize("size,expect_frame", [((90, 40), "stored"), ((40, 90), "upright"), (None, "stored")])
def test_exif_rotated_jpeg_stored_upright_with_boxes_on_the_block(tmp_path: Path, size: tuple | None,
                                                                  expect_frame: str) -> None:
    """Orientation=6, 90x40 stored: the prepared image is 40x90 upright, and its label sits on the white block,
    whichever frame the VOC box was drawn in (decided by the stated size; the stored frame when none)."""
    root = tmp_path / "voc"
    block = (20, 5, 50, 15)  # on the stored pixels
    _block(root / "JPEGImages" / "r.jpg", (90, 40), block, orientation=6)
    from pipeline.data.imaging import orient_boxes

    upright_block = tuple(orient_boxes(np.array([block]), 6, 90, 40)[0])  # (25, 20, 35, 50)
    drawn = block if expect_frame == "stored" else upright_block
    _voc_xml(root / "Annotations" / "r.xml", "r.jpg", [drawn], size=size)
    _image(root / "JPEGImages" / "plain.jpg", seed=1)
    _voc_xml(root / "Annotations" / "plain.xml", "plain.jpg", [(5, 5, 20, 20)])
    report = _prepare(tmp_path, root)
    row = next(r for r in _manifest(tmp_path) if "r." in r["image"])
    assert row["image"].endswith(".png") and (row["width"], row["height"]) == ("40", "90")
    with Image.open(tmp_path / "prepared" / row["image"]) as im:
        arr = np.asarray(im)
        assert im.getexif().get(0x0112) is None and arr.shape == (90, 40, 3)
    ys, xs = np.nonzero(arr[:, :, 0] > 128)
    (box,) = _label_boxes(tmp_path, row)
    assert np.allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=0.5)
    (fixed,) = _problems(report, "exif_orientation")
    assert fixed["action"] == "fixed" and ("turned" if expect_frame == "stored" else "kept as drawn") in fixed["detail"]
    assert not _problems(report, "size_mismatch")


def test_exif_yolo_labels_are_upright(tmp_path: Path) -> None:
    """YOLO labels are normalised to the upright image (Ultralytics reads them so): kept as they are."""
    root = tmp_path / "yolo"
    _block(root / "images" / "r.jpg", (90, 40), (20, 5, 50, 15), orientation=8)
    _image(root / "images" / "plain.png", seed=1)
    (root / "labels").mkdir()
    # orientation 8: stored (20,5,50,15) on 90x40 -> upright (5, 40, 15, 70) on 40x90
    (root / "labels" / "r.txt").write_text(f"0 {10 / 40} {55 / 90} {10 / 40} {30 / 90}\n")
    (root / "labels" / "plain.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("names: [cell]\n")
    _prepare(tmp_path, root)
    row = next(r for r in _manifest(tmp_path) if "r." in r["image"])
    (box,) = _label_boxes(tmp_path, row)
    assert np.allclose(box, [5, 40, 15, 70], atol=0.01)


def test_infer_and_serve_decode_exif_like_prepare(exported: dict[str, Path]) -> None:
    """One file, one set of boxes: a PNG stored sideways with EXIF 6 gives the same detections through
    OnnxDetector and the service's decoder as the same picture stored upright without a tag."""
    from pipeline.infer.engine import OnnxDetector
    from pipeline.serve.app import decode_upload

    slice_png = next((exported["prepared"] / "images" / "test").glob("*.png"))
    upright = np.asarray(Image.open(slice_png).convert("RGB"))[:, :200]  # not square, so a turn shows
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # what a camera stores for Orientation=6
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG", exif=exif.tobytes())
    rotated_bytes = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(upright).save(buf, format="PNG")
    det = OnnxDetector(exported["onnx"], exported["card"])
    a, b = det.decode(rotated_bytes).rgb, det.decode(buf.getvalue()).rgb
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(decode_upload(rotated_bytes, 10**8, None), upright)
    da, db = det.predict([a], conf=0.001)[0], det.predict([b], conf=0.001)[0]
    np.testing.assert_allclose(da.boxes, db.boxes)


# ------------------------------------------------------------------------------------------------- no tracebacks


def test_non_utf8_csv_and_yolo_labels_are_read_and_recorded(tmp_path: Path, small_phantom: Path) -> None:
    root = tmp_path / "dicom"
    shutil.copytree(small_phantom, root)
    text = (root / "boxes.csv").read_text()
    first = text.splitlines()[1].split(",")
    (root / "boxes.csv").write_bytes((text + ",".join([*first[:6], "nödule"]) + "\n").encode("cp1252"))
    report = _prepare(tmp_path, root, classes="[nodule]")
    (enc,) = _problems(report, "non_utf8_text")
    assert enc["file"] == "boxes.csv" and enc["action"] == "fixed"
    assert any("'nödule'" in p["detail"] for p in _problems(report, "unknown_class"))  # decoded as Windows-1252

    voc = tmp_path / "voc"
    _image(voc / "JPEGImages" / "a.jpg", seed=1)
    _voc_xml(voc / "Annotations" / "a.xml", "a.jpg", [(5, 5, 20, 20)], label="cellé")
    (voc / "Annotations" / "a.xml").write_bytes((voc / "Annotations" / "a.xml").read_text().encode("cp1252"))
    report = _prepare(tmp_path / "v", voc, classes="[cellé]")
    assert [p["kind"] for p in report["problems"]] == ["non_utf8_text"] and report["summary"]["boxes_out"] == 1

    yolo = tmp_path / "yolo"
    _image(yolo / "images" / "a.png", seed=1)
    (yolo / "labels").mkdir()
    (yolo / "labels" / "a.txt").write_bytes(b"0 0.5 0.5 0.2 0.2\n\xff\xfe garbage\n")
    (yolo / "data.yaml").write_text("names: [cell]\n")
    report = _prepare(tmp_path / "y", yolo)
    assert [p["kind"] for p in report["problems"]] == ["non_utf8_text", "malformed_annotation"]
    assert report["summary"]["boxes_out"] == 1


@pytest.mark.parametrize("yaml_text,match", [("names: [cell\n", r"data.yaml is not valid YAML \(line 2"),
                                             ("- just\n- a list\n", "data.yaml has no names"),
                                             ("names: 5\n", "data.yaml has no names")])
def test_bad_yolo_data_yaml_is_one_clear_error(tmp_path: Path, yaml_text: str, match: str) -> None:
    root = tmp_path / "yolo"
    _image(root / "images" / "a.png", seed=1)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text(yaml_text)
    with pytest.raises(DataError, match=match) as e:
        _prepare(tmp_path, root)
    assert "\n" not in str(e.value)


def _coco_doc(**override: object) -> dict:
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": "64", "height": None},
                      {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]},
                           {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10]},
                           "not an object", ["neither"], {"id": 5, "image_id": [1], "category_id": 1,
                                                          "bbox": [1, 2, "x", 4]},
                           {"id": 6, "image_id": 2, "category_id": {"x": 1}, "bbox": [1, 1, 5, 5]}],
           "categories": [{"id": 1, "name": "cell"}, {"name": "no id"}, "junk"]}
    doc.update(override)
    return doc


def test_hostile_coco_entries_are_recorded_not_raised(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _image(root / "images" / "a.png", seed=1)
    _image(root / "images" / "b.png", seed=2)
    (root / "coco.json").write_text(json.dumps(_coco_doc()))
    report = _prepare(tmp_path, root)
    assert report["summary"]["images_out"] == 2 and report["summary"]["boxes_out"] == 2
    by_kind = report["summary"]["by_kind"]
    assert by_kind["malformed_annotation"] == {"ignored": 2, "box_dropped": 3}
    assert by_kind["unknown_class"] == {"box_dropped": 1}
    _assert_reconciled(report)
    assert report["totals"]["boxes"]["read"] == 6


@pytest.mark.parametrize("doc,match", [({"images": {"1": "a.png"}}, "'images' is a dict, expected a list"),
                                       ({"categories": None}, "'categories' is missing"),
                                       ([1, 2], "top level is a list")])
def test_coco_with_wrong_structure_is_one_clear_error(tmp_path: Path, doc: object, match: str) -> None:
    root = tmp_path / "coco"
    _image(root / "images" / "a.png", seed=1)
    full = doc if isinstance(doc, list) else {**_coco_doc(), **doc}
    if isinstance(doc, dict) and doc.get("categories", 1) is None:
        del full["categories"]
    (root / "coco.json").write_text(json.dumps(full))
    with pytest.raises(DataError, match=match):
        _prepare(tmp_path, root)


def test_non_utf8_coco_json_is_read(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _image(root / "images" / "é.png", seed=1)
    doc = {"images": [{"id": 1, "file_name": "é.png"}], "annotations": [],
           "categories": [{"id": 1, "name": "cell"}]}
    (root / "coco.json").write_bytes(json.dumps(doc, ensure_ascii=False).encode("cp1252"))
    report = _prepare(tmp_path, root)
    assert report["summary"]["images_out"] == 1 and _problems(report, "non_utf8_text")


# ------------------------------------------------------------------------------------------------- counts


def test_every_file_is_counted_and_boxes_on_quarantined_images_are_dropped(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    for i in range(3):
        _image(root / "JPEGImages" / f"v{i}.jpg", seed=i)
        _voc_xml(root / "Annotations" / f"v{i}.xml", f"v{i}.jpg", [(5, 5, 20, 20)])
    _image(root / "JPEGImages" / "w.webp", seed=5, format="WEBP", lossless=True)
    _voc_xml(root / "Annotations" / "w.xml", "w.webp", [(5, 5, 20, 20)])
    _image(root / "JPEGImages" / "broken.jpg", seed=6)
    (root / "Annotations" / "broken.xml").write_text("<annotation><object>")  # unreadable XML
    bad = _image(root / "JPEGImages" / "trunc.jpg", seed=7)
    bad.write_bytes(bad.read_bytes()[:200])
    _voc_xml(root / "Annotations" / "trunc.xml", "trunc.jpg", [(5, 5, 20, 20), (30, 5, 40, 20)])
    (root / "JPEGImages" / "notes.txt").write_text("scanned 2019\n")
    _image(root / "JPEGImages" / "anim.gif", seed=8, format="GIF")  # an image type no reader lists
    report = _prepare(tmp_path, root)
    assert len(_manifest(tmp_path)) == 4  # v0..v2 and the webp
    (broken,) = [p for p in report["problems"] if "broken" in p["file"]]  # once, not twice
    assert (broken["kind"], broken["action"]) == ("malformed_annotation", "image_quarantined")
    (trunc,) = [p for p in report["problems"] if "trunc" in p["file"]]
    assert (trunc["kind"], trunc["boxes"]) == ("corrupt_image", 2)
    assert [(p["file"], p["action"]) for p in _problems(report, "unsupported_file")] == [("JPEGImages/notes.txt",
                                                                                           "ignored")]
    assert [(p["file"], p["action"]) for p in _problems(report, "unlisted_image")] == [("JPEGImages/anim.gif",
                                                                                         "image_quarantined")]
    assert report["totals"]["images"] == {"found": 7, "written": 4, "quarantined": 3, "annotation_refs_missing": 0}
    assert report["totals"]["boxes"] == {"read": 6, "written": 4, "dropped": 2,
                                         "dropped_by_kind": {"corrupt_image": 2}}
    _assert_reconciled(report)


def test_coco_image_on_disk_but_unlisted_is_recorded(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _image(root / "images" / "a.png", seed=1)
    _image(root / "images" / "stray.png", seed=2)
    (root / "coco.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [],
                                                "categories": [{"id": 1, "name": "cell"}]}))
    report = _prepare(tmp_path, root)
    assert [(p["file"], p["action"]) for p in _problems(report, "unlisted_image")] == [("images/stray.png",
                                                                                         "image_quarantined")]
    _assert_reconciled(report)


def test_all_bad_dataset_writes_its_report(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    for i in range(2):
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (root / "JPEGImages" / f"x{i}.jpg").write_text("not a jpeg")
        _voc_xml(root / "Annotations" / f"x{i}.xml", f"x{i}.jpg", [(5, 5, 20, 20)])
    with pytest.raises(DataError, match="no usable images") as e:
        _prepare(tmp_path, root)
    assert str(tmp_path / "report.json") in str(e.value)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed" and report["manifest_sha256"] is None
    assert report["totals"]["images"]["quarantined"] == 2 and report["totals"]["boxes"]["dropped"] == 2
    assert not (tmp_path / "prepared").exists()


# ------------------------------------------------------------------------------------------------- mixed


def _mixed_dataset(root: Path, phantom: Path) -> dict[str, int]:
    """All four formats in subfolders, with duplicates, EXIF-rotated and hostile files. Returns the expected
    numbers of image files and of boxes (each box entry counted once per image record it is attached to)."""
    n_images = n_boxes = 0
    shared = _pixels(77, (64, 64))
    # VOC: 4 images (one annotated twice identically, one EXIF-rotated), an unreadable XML, a stray text file.
    voc = root / "voc"
    for i in range(3):
        _image(voc / "JPEGImages" / f"v{i}.jpg", seed=i)
        _voc_xml(voc / "Annotations" / f"v{i}.xml", f"v{i}.jpg", [(5, 5, 20, 20)])
    _voc_xml(voc / "Annotations" / "v0_again.xml", "v0.jpg", [(5, 5, 20, 20)])
    _block(voc / "JPEGImages" / "rot.jpg", (90, 40), (20, 5, 50, 15), 6)
    _voc_xml(voc / "Annotations" / "rot.xml", "rot.jpg", [(20, 5, 50, 15)], size=(90, 40))
    _image(voc / "JPEGImages" / "broken.jpg", seed=4)
    (voc / "Annotations" / "broken.xml").write_bytes(b"<annotation>\xff")
    (voc / "JPEGImages" / "Thumbs.txt").write_text("x")
    n_images += 5
    n_boxes += 3 + 1 + 1
    # COCO: patients, a hostile entry, a duplicated id over two files, an unlisted image, and the shared image.
    coco = root / "coco"
    for i in range(4):
        _image(coco / "images" / f"c{i}.png", seed=10 + i)
    _image(coco / "images" / "amb1.png", seed=20)
    _image(coco / "images" / "amb2.png", seed=21)
    _image(coco / "images" / "unlisted.png", seed=22)
    Image.fromarray(shared).save(coco / "images" / "shared.png")
    imgs = [{"id": i, "file_name": f"c{i}.png", "width": "64", "height": 48, "patient_id": f"PAT{i % 2}"}
            for i in range(4)]
    imgs += [{"id": 9, "file_name": "amb1.png"}, {"id": 9, "file_name": "amb2.png"},
             {"id": 10, "file_name": "shared.png", "patient_id": "PAT0"}]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 10, 10]} for i in range(4)]
    anns += [{"id": 20, "image_id": 9, "category_id": 1, "bbox": [5, 5, 10, 10]}, "garbage",
             {"id": 21, "image_id": 10, "category_id": 1, "bbox": [2, 2, 10, 10]}]
    (coco / "coco.json").write_text(json.dumps({"images": imgs, "annotations": anns,
                                                "categories": [{"id": 1, "name": "cell"}, {"name": "x"}]}))
    n_images += 8
    n_boxes += 4 + 2 + 1 + 1
    # YOLO: a.png + a.jpg sharing one label, a DICOM slice, the shared image again, an orphan label file.
    yolo = root / "yolo"
    (yolo / "labels").mkdir(parents=True)
    (yolo / "data.yaml").write_text("names:\n  0: cell\n  1: nodule\n")
    _image(yolo / "images" / "a.png", seed=30)
    _image(yolo / "images" / "a.jpg", seed=31)
    (yolo / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    Image.fromarray(shared).save(yolo / "images" / "shared_copy.png")
    (yolo / "labels" / "shared_copy.txt").write_text("0 0.109375 0.109375 0.15625 0.15625\n")
    import pydicom

    ds = pydicom.dcmread(next(phantom.rglob("*.dcm")))  # another patient's slice: other pixels, other header
    ds.PatientID, ds.SOPInstanceUID = "YOLO-PATIENT-7", pydicom.uid.generate_uid(entropy_srcs=["scan"])
    ds.PixelData = (ds.pixel_array[::-1].copy()).tobytes()
    ds.save_as(yolo / "images" / "scan.dcm")
    (yolo / "labels" / "scan.txt").write_text("1 0.5 0.5 0.1 0.1\n")
    (yolo / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.2 0.2 0.1 0.1\n")
    n_images += 4
    n_boxes += 2 + 1 + 1 + 2
    # DICOM + CSV: the phantom, its CSV re-encoded as Windows-1252 with one extra row.
    shutil.copytree(phantom, root / "dicom")
    text = (root / "dicom" / "boxes.csv").read_text()
    first = text.splitlines()[1].split(",")
    (root / "dicom" / "boxes.csv").write_bytes((text + ",".join([*first[:6], "nödule"]) + "\n").encode("cp1252"))
    n_images += sum(1 for _ in phantom.rglob("*.dcm"))
    n_boxes += len(text.strip().splitlines()) - 1 + 1
    (root / "README.md").write_text("four formats\n")
    return {"images": n_images, "boxes": n_boxes}


def test_mixed_dataset_of_all_formats_end_to_end(tmp_path: Path, small_phantom: Path) -> None:
    root = tmp_path / "mixed"
    expected = _mixed_dataset(root, small_phantom)
    report = _prepare(tmp_path, root, classes="[cell,nodule]")
    assert report["format"] == "mixed" and report["split_mode"] == "patient"
    _assert_reconciled(report)
    t = report["totals"]
    assert t["images"]["found"] == expected["images"] and t["boxes"]["read"] == expected["boxes"]
    _assert_no_leak(tmp_path)
    rows = _manifest(tmp_path)
    assert len(rows) == t["images"]["written"] and {r["split"] for r in rows} == {"train", "val", "test"}
    kinds = report["summary"]["by_kind"]
    for kind in ("duplicate_image", "duplicate_content", "exif_orientation", "non_utf8_text", "unlisted_image",
                 "malformed_annotation", "unsupported_file", "missing_image", "unknown_class"):
        assert kind in kinds, kind
    shared = [r for r in rows if "shared" in r["image"]]
    assert len(shared) == 2 and len({r["split"] for r in shared}) == 1
    assert any(r["image"].endswith("_scan.png") for r in rows)  # the DICOM in the YOLO folder was used
    assert "YOLO-PATIENT-7" not in (tmp_path / "report.json").read_text() + str(rows)

    # The same through the CLI: exit 0, one summary line, no traceback; and a failing run: one line, exit 1.
    detflow = str(Path(sys.executable).parent / "detflow")
    env = {**os.environ, "DETFLOW_NO_PROGRESS": "1"}
    params = REPO / "params.yaml"
    common = ["--params", str(params), "--out", str(tmp_path / "cli"), "--report", str(tmp_path / "cli.json"),
              "--set", f"data.source={root}", "--set", "data.classes=[cell,nodule]", "--set", "prepare.split=patient"]
    ok = subprocess.run([detflow, "prepare", *common, "--set", "prepare.max_bad_fraction=1", "--quiet"],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stdout + ok.stderr
    assert ok.stdout.strip().count("\n") == 0 and ok.stdout.startswith(f"prepare: {t['images']['written']} images")
    bad = subprocess.run([detflow, "prepare", *common, "--set", "prepare.max_bad_fraction=0", "--quiet"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stdout + bad.stderr
    assert "exceeds prepare.max_bad_fraction" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    failed = json.loads((tmp_path / "cli.json").read_text())
    assert failed["status"] == "failed" and "previous dataset" in failed["dataset"]
