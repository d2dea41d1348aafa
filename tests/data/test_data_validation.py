"""Bad-input corpus for the data stage: each defect is recorded with its kind, nothing vanishes unrecorded."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from pipeline.config import load_params
from pipeline.data.prepare import prepare_dataset
from pipeline.data.validate import validate_boxes
from pipeline.errors import DataError


def _jpeg(path: Path, size=(64, 48), seed=0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def _voc_xml(path: Path, filename: str, objects: list[str], size=(64, 48)) -> None:
    path.write_text(
        f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
        f"<depth>3</depth></size>{''.join(objects)}</annotation>"
    )


def _obj(name: str, box: tuple | None) -> str:
    bnd = "" if box is None else "<bndbox>" + "".join(
        f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)) + "</bndbox>"
    return f"<object><name>{name}</name>{bnd}</object>"


@pytest.fixture()
def bad_voc(tmp_path: Path) -> Path:
    """A VOC dataset where every image carries one known defect (and two are clean)."""
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    img, ann = root / "JPEGImages", root / "Annotations"
    good = _obj("cell", (5, 5, 20, 20))
    for i in range(2):
        _jpeg(img / f"clean{i}.jpg", seed=i)
        _voc_xml(ann / f"clean{i}.xml", f"clean{i}.jpg", [good])
    # Every image has its own pixels (seed): byte-identical files are one image to prepare (pipeline.data.dedupe).
    _jpeg(img / "corrupt.jpg", seed=10)
    data = (img / "corrupt.jpg").read_bytes()
    (img / "corrupt.jpg").write_bytes(data[: len(data) // 2])
    _voc_xml(ann / "corrupt.xml", "corrupt.jpg", [good])
    (img / "text.png").write_text("this is not an image\n" * 10)
    _voc_xml(ann / "text.xml", "text.png", [good])
    Image.new("RGBA", (64, 48), (10, 200, 30, 128)).save(img / "rgba.png")
    _voc_xml(ann / "rgba.xml", "rgba.png", [good])
    _jpeg(img / "outside.jpg", seed=11)
    _voc_xml(ann / "outside.xml", "outside.jpg", [_obj("cell", (50, 30, 70, 47)), _obj("cell", (40, 30, 66, 45))])
    _jpeg(img / "unknown.jpg", seed=12)
    _voc_xml(ann / "unknown.xml", "unknown.jpg", [good, _obj("tumour", (30, 5, 40, 15))])
    _jpeg(img / "nobnd.jpg", seed=13)
    _voc_xml(ann / "nobnd.xml", "nobnd.jpg", [good, _obj("cell", None)])
    _voc_xml(ann / "ghost.xml", "ghost.jpg", [good])  # annotation for a missing image
    _jpeg(img / "zero.jpg", seed=14)
    _voc_xml(ann / "zero.xml", "zero.jpg", [good, _obj("cell", (30, 30, 30, 40))])
    _jpeg(img / "dups.jpg", seed=15)
    _voc_xml(ann / "dups.xml", "dups.jpg", [good, _obj("cell", (5, 5, 20, 20)), _obj("cell", (5, 5, 20, 21))])
    return root


def _prepare(tmp_path: Path, source: Path, *extra: str) -> dict:
    params = load_params(tmp_path / "none.yaml" if False else None,
                         [f"data.source={source}", "prepare.max_bad_fraction=1.0", "prepare.split=patient",
                          "prepare.val_fraction=0.2", "prepare.test_fraction=0.2", *extra])
    result = prepare_dataset(params, tmp_path / "prepared", tmp_path / "report.json", progress=False)
    return result.report


def _kinds(report: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in report["problems"]:
        out.setdefault(p["file"].split("/")[-1].split(".")[0], []).append(p)
    return out


def test_voc_bad_inputs_each_recorded_with_kind(tmp_path: Path, bad_voc: Path) -> None:
    report = _prepare(tmp_path, bad_voc, "data.classes=[cell]")
    by_file = _kinds(report)
    assert [(p["kind"], p["action"]) for p in by_file["corrupt"]] == [("corrupt_image", "image_quarantined")]
    assert [(p["kind"], p["action"]) for p in by_file["text"]] == [("not_an_image", "image_quarantined")]
    assert [(p["kind"], p["action"]) for p in by_file["rgba"]] == [("rgba_converted", "fixed")]
    outside = sorted((p["kind"], p["action"]) for p in by_file["outside"])
    assert outside == [("box_outside_image", "box_dropped"), ("box_outside_image", "fixed")]
    assert [(p["kind"], p["action"]) for p in by_file["unknown"]] == [("unknown_class", "box_dropped")]
    assert [(p["kind"], p["action"]) for p in by_file["nobnd"]] == [("malformed_annotation", "box_dropped")]
    assert [(p["kind"], p["action"]) for p in by_file["ghost"]] == [("missing_image", "box_dropped")]
    assert [(p["kind"], p["action"]) for p in by_file["zero"]] == [("degenerate_box", "box_dropped")]
    assert sorted(p["kind"] for p in by_file["dups"]) == ["duplicate_box", "near_duplicate_box"]
    assert "clean0" not in by_file and "clean1" not in by_file
    # Images: 2 quarantined (corrupt, text) of 10 candidates; the rest written.
    s = report["summary"]
    assert s["images_in"] == 10 and s["images_out"] == 8 and s["images_quarantined"] == 2
    assert s["bad_fraction"] == pytest.approx(0.2)
    # Box bookkeeping: every input box is either written or has a box_dropped record.
    n_in = 2 + 1 + 2 + 2 + 2 + 2 + 3  # clean x2, rgba, outside, unknown, nobnd, zero, dups
    assert s["boxes_out"] + sum(p["action"] == "box_dropped" and p["kind"] != "missing_image"
                                for p in report["problems"]) == n_in
    written = json.loads((tmp_path / "report.json").read_text())
    assert written == report


def test_rgba_written_as_rgb_and_clipped_box_kept(tmp_path: Path, bad_voc: Path) -> None:
    _prepare(tmp_path, bad_voc, "data.classes=[cell]")
    manifest = list(csv.DictReader(open(tmp_path / "prepared" / "manifest.csv")))
    rgba = next(r for r in manifest if "rgba" in r["image"])
    with Image.open(tmp_path / "prepared" / rgba["image"]) as im:
        assert im.mode == "RGB"
    outside = next(r for r in manifest if "outside" in r["image"])
    label = (tmp_path / "prepared" / outside["image"].replace("images", "labels", 1)).with_suffix(".txt")
    (line,) = label.read_text().splitlines()
    _, cx, cy, w, h = map(float, line.split())
    # clipped (40,30,66,45) -> (40,30,64,45) on a 64x48 image
    assert (cx - w / 2) * 64 == pytest.approx(40, abs=1e-3) and (cx + w / 2) * 64 == pytest.approx(64, abs=1e-3)


def test_bad_fraction_over_limit_fails_with_report(tmp_path: Path, bad_voc: Path) -> None:
    params = load_params(None, [f"data.source={bad_voc}", "prepare.max_bad_fraction=0.1", "data.classes=[cell]",
                                "prepare.split=patient"])
    with pytest.raises(DataError, match=r"2 of 10 images quarantined \(20.0%\) exceeds prepare.max_bad_fraction"):
        prepare_dataset(params, tmp_path / "prepared", tmp_path / "report.json", progress=False)
    assert json.loads((tmp_path / "report.json").read_text())["summary"]["images_quarantined"] == 2
    assert not (tmp_path / "prepared").exists()


def _dicom_csv_dataset(root: Path, phantom: Path) -> Path:
    """Phantom slices plus a truncated DICOM, one without pixel data and a JPEG-LS one, and a CSV row to nowhere."""
    shutil.copytree(phantom, root)
    bad = root / "dicom" / "BAD"
    bad.mkdir()
    shutil.copy(get_testdata_file("MR_truncated.dcm", download=False), bad / "truncated.dcm")
    shutil.copy(get_testdata_file("JPEGLSNearLossless_16.dcm", download=False), bad / "jpegls.dcm")
    src = next((root / "dicom").rglob("000.dcm"))
    ds = pydicom.dcmread(src)
    del ds.PixelData
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["nopixels"])
    ds.save_as(bad / "nopixels.dcm")
    with open(root / "boxes.csv", "a", newline="") as f:
        csv.writer(f).writerow(["dicom/BAD/missing.dcm", "", 10, 10, 20, 20, "nodule"])
    return root


def test_dicom_bad_inputs(tmp_path: Path, small_phantom: Path) -> None:
    root = _dicom_csv_dataset(tmp_path / "raw", small_phantom)
    report = _prepare(tmp_path, root)
    by_file = _kinds(report)
    assert [(p["kind"], p["action"]) for p in by_file["truncated"]] == [("corrupt_dicom", "image_quarantined")]
    assert [(p["kind"], p["action"]) for p in by_file["nopixels"]] == [("dicom_no_pixel_data", "image_quarantined")]
    assert [p["kind"] for p in by_file["jpegls"]] == ["dicom_unsupported_compression"]
    missing = [p for p in report["problems"] if p["kind"] == "missing_image"]
    assert len(missing) == 1 and missing[0]["action"] == "box_dropped" and "missing.dcm" in missing[0]["detail"]


def test_raw_patient_ids_never_in_outputs(tmp_path: Path, small_phantom: Path) -> None:
    root = _dicom_csv_dataset(tmp_path / "raw", small_phantom)
    _prepare(tmp_path, root)
    ids = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in small_phantom.rglob("*.dcm")}
    names = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientName) for p in small_phantom.rglob("*.dcm")}
    texts = [(tmp_path / "report.json").read_text()]
    texts += [p.read_text() for p in (tmp_path / "prepared").rglob("*") if p.suffix in (".csv", ".json", ".yaml")]
    texts += [str(p) for p in (tmp_path / "prepared").rglob("*")]
    blob = "\n".join(texts)
    for secret in ids | names:
        assert secret not in blob


def test_validate_boxes_tolerance_and_order() -> None:
    boxes = np.array([[-3, 0, 10, 10], [-10, 0, 10, 10], [5, 5, 5, 9], [0, 0, 10, 10]], dtype=float)
    kept, cls, problems = validate_boxes("f", boxes, ["a", "a", "a", "b"], 100, 100, ["a", "b"], 4.0, 0.95, 0.9)
    assert kept.tolist() == [[0, 0, 10, 10], [0, 0, 10, 10]] and cls.tolist() == [0, 1]  # different classes: no dup
    assert [(p.kind, p.action) for p in problems] == [("box_outside_image", "fixed"),
                                                      ("box_outside_image", "box_dropped"),
                                                      ("degenerate_box", "box_dropped")]


def test_raster_conversions_detected_by_content(tmp_path: Path) -> None:
    from pipeline.data.imaging import ImageLoadError, load_any

    gray = tmp_path / "g.jpg"  # named .jpg, actually a 16-bit PNG
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 8).save(gray, format="PNG")
    loaded = load_any(gray)
    assert loaded.rgb.shape == (64, 64, 3) and loaded.conversions[0][0] == "grayscale_converted"
    assert loaded.rgb[0, 0, 0] == 0 and loaded.rgb[-1, -1, 0] == 255
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    fake = tmp_path / "x.dcm"
    fake.write_bytes(buf.getvalue())
    with pytest.raises(ImageLoadError) as e:
        load_any(fake)
    assert e.value.kind == "corrupt_dicom"
