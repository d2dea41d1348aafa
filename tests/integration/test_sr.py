"""DICOM Structured Reports of detections (pipeline/dicom): class codes, deterministic UIDs, the TID 1500 report
checked by dicom3tools' dciodvfy and parsed by dcmtk's dsrdump, rectangles read back with plain pydicom,
`detflow infer --sr`, and the service's `Accept: application/dicom`."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from helpers.dicom import SECRET_ID, SECRET_NAME, copy_series, corrupt_copy, pixel_model

from pipeline.dicom.codes import PRIVATE_SCHEME, card_class_codes, class_codes, parse_code
from pipeline.dicom.sr import (
    ModelIdentity,
    SourceImage,
    SrError,
    build_series_report,
    read_header,
    read_regions,
    read_summary,
    sr_uids,
)
from pipeline.infer.processing import Detections

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dicom3tools' IOD checker reports for a file."""
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (r.stdout + r.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                    reason="dicom3tools (dciodvfy) not installed: apt-get install dicom3tools")
needs_dsrdump = pytest.mark.skipif(shutil.which("dsrdump") is None,
                                   reason="dcmtk (dsrdump) not installed: apt-get install dcmtk")


# ---------------------------------------------------------------------------------------------- codes


def test_known_codes_match_dicoms_content_mapping_resource() -> None:
    """Every table entry said to come from DICOM PS3.16 has pydicom's value and meaning for that concept."""
    from pydicom.sr._concepts_dict import concepts

    sct = {value: meaning for entries in concepts["SCT"].values() for value, (meaning, _) in entries.items()}
    from pipeline.dicom import codes as module

    checked = 0
    for name, (value, meaning, source) in module._KNOWN.items():
        assert len(value) <= 16
        if source == "DICOM PS3.16":
            assert sct.get(value) in (meaning, "Tumor"), (name, value, meaning, sct.get(value))
            checked += 1
    assert checked >= 8
    assert sct["272519000"] == "Absent" and sct["52101004"] == "Present"  # the series summary's values


def test_class_codes_order_of_preference() -> None:
    codes = class_codes(["nodule", "RBC", "Pleural thickening", "pleural-thickening", "mass"],
                        {"mass": "RADLEX:RID3874:Mass"})
    assert (codes["nodule"].scheme, codes["nodule"].value, codes["nodule"].meaning) == ("SCT", "27925004", "Nodule")
    assert codes["nodule"].category is not None  # a morphologic abnormality
    assert (codes["RBC"].value, codes["RBC"].meaning) == ("41898006", "Erythrocyte")
    assert codes["mass"].to_card() == {"scheme": "RADLEX", "value": "RID3874", "meaning": "Mass",
                                       "source": "params export.class_codes"}
    private = [codes["Pleural thickening"], codes["pleural-thickening"]]
    assert all(c.scheme == PRIVATE_SCHEME and c.source == "private scheme" for c in private)
    assert private[0].value == "PLEURAL_THICKENI" and private[1].value != private[0].value  # SH: 16 characters
    assert all(len(c.value) <= 16 for c in private) and private[0].meaning == "Pleural thickening"
    with pytest.raises(ValueError, match="classes the model does not have: nodul"):
        class_codes(["nodule"], {"nodul": "SCT:1:x"})
    with pytest.raises(ValueError, match="SCHEME:VALUE:MEANING"):
        parse_code("27925004")
    assert card_class_codes({"classes": ["nodule"]})["nodule"].value == "27925004"  # card from before the field


def test_bad_class_code_in_params_fails_with_the_expected_form(tmp_path: Path) -> None:
    r = subprocess.run([str(BIN / "detflow"), "export", "--set", "export.class_codes={nodule: SCT-27925004}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "SCHEME:VALUE:MEANING" in r.stderr and "Traceback" not in r.stderr


def test_card_records_class_codes_and_training_modality(exported: dict[str, Path]) -> None:
    card = json.loads(exported["card"].read_text())
    assert card["class_codes"] == {"nodule": {"scheme": "SCT", "value": "27925004", "meaning": "Nodule",
                                              "source": "DICOM PS3.16"}}
    assert card["training_data"]["modalities"] == ["CT"]


# ---------------------------------------------------------------------------------------------- UIDs


def test_uids_are_deterministic_valid_and_change_with_their_inputs() -> None:
    a = sr_uids("ab" * 32, 0.25, "1.2.3", ["1.2.3.1", "1.2.3.2"])
    assert a == sr_uids("ab" * 32, 0.25, "1.2.3", ["1.2.3.2", "1.2.3.1"])  # order of listing does not matter
    for uid in (a.series, a.instance, a.device):
        assert re.fullmatch(r"2\.25\.[1-9][0-9]{0,38}", uid) and len(uid) <= 64
    assert sr_uids("cd" * 32, 0.25, "1.2.3", ["1.2.3.1", "1.2.3.2"]).instance != a.instance  # another model
    assert sr_uids("ab" * 32, 0.5, "1.2.3", ["1.2.3.1", "1.2.3.2"]).instance != a.instance  # another threshold
    assert sr_uids("ab" * 32, 0.25, "1.2.3", ["1.2.3.1"]).instance != a.instance  # other instances
    assert sr_uids("ab" * 32, 0.5, "1.2.3", ["1.2.3.1"]).series == a.series  # one SR series per model and series


# ---------------------------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def series_files(small_phantom: Path) -> list[Path]:
    return sorted(sorted((small_phantom / "dicom").iterdir())[0].glob("*.dcm"))


def _model(classes: tuple[str, ...] = ("nodule",), conf: float = 0.25) -> ModelIdentity:
    card = {"family": "yolo", "model": "yolov5n", "classes": list(classes), "sha256": "f" * 64,
            "version": "ffffffffffff", "class_codes": {n: c.to_card() for n, c in class_codes(list(classes)).items()}}
    return ModelIdentity.from_card(card, conf)


def _detections(boxes: list[list[float]], scores: list[float], labels: list[int]) -> Detections:
    return Detections(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores), np.asarray(labels))


@needs_dciodvfy
@needs_dsrdump
def test_report_with_findings_validates_and_reads_back(series_files: list[Path], tmp_path: Path) -> None:
    boxes = {0: ([[10.25, 20.5, 40.125, 61.75], [100.0, 0.0, 256.0, 17.333]], [0.91, 0.42], [0, 1]), 2: ([], [], [])}
    images = [SourceImage.of(read_header(f), _detections(*boxes.get(i, ([[3.5, 4.5, 9.0, 12.0]], [0.3], [0]))))
              for i, f in enumerate(series_files)]
    report = build_series_report(images, _model(("nodule", "vessel")))
    path = tmp_path / "sr.dcm"
    path.write_bytes(report.to_bytes())
    errors, warnings = dciodvfy(path)
    # the only warnings: dciodvfy does not know the private scheme (one per coded use of the "vessel" class)
    private = "Warning - Unrecognized defined term <99DETFLOW> for value 1 of attribute <Coding Scheme Designator>"
    assert errors == [] and warnings and all(w == private for w in warnings), errors + warnings
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "Comprehensive SR Document" in dump.stdout
    assert '(27925004,SCT,"Nodule")' in dump.stdout and f'(VESSEL,{PRIVATE_SCHEME},"vessel")' in dump.stdout

    sr = pydicom.dcmread(path)
    src = pydicom.dcmread(series_files[0], stop_before_pixels=True)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.Modality == "SR"  # Comprehensive SR
    assert (sr.PatientID, sr.PatientName, sr.StudyInstanceUID) == (src.PatientID, src.PatientName,
                                                                   src.StudyInstanceUID)
    assert sr.SeriesInstanceUID not in {src.SeriesInstanceUID} and sr.SOPInstanceUID == report.uids.instance
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
    evidence = [i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert sorted(evidence) == sorted(read_header(f).SOPInstanceUID for f in series_files)

    regions = read_regions(sr)
    expected = [(im.header.SOPInstanceUID, b, s, int(c)) for im in images
                for b, s, c in zip(im.boxes, im.scores, im.labels, strict=True)]
    assert len(regions) == len(expected) == 2 + len(series_files) - 2
    for r in regions:
        match = [e for e in expected if e[0] == r.sop_instance_uid and abs(e[2] - r.score) < 1e-6]
        assert len(match) == 1
        assert np.abs(np.asarray(r.box) - match[0][1]).max() < 1e-3
        assert r.finding[2] == ("nodule", "vessel")[match[0][3]].replace("nodule", "Nodule")
    assert read_summary(sr) == {"Nodule": "Present", "vessel": "Present"}
    # the algorithm (TID 4019, with the model's sha256) in the series summary; the device observer for everything
    assert dump.stdout.count('"Algorithm Name")="detflow yolo/yolov5n"') == 1
    assert dump.stdout.count('"Device Observer Name")="detflow yolo/yolov5n"') == 1
    assert f"model sha256 {'f' * 64}" in json.dumps(sr.to_json_dict())
    assert '"Certainty of Finding")="91.0" (%,UCUM,"Percent")' in dump.stdout  # the score as a percentage
    html = subprocess.run(["dsr2html", "+Cm", "+Rd", str(path)], capture_output=True, text=True, timeout=60)
    assert html.returncode == 0 and "Imaging Measurement Report" in html.stdout and "91.0 Percent" in html.stdout


@needs_dciodvfy
def test_report_without_findings_says_so_and_validates(series_files: list[Path], tmp_path: Path) -> None:
    images = [SourceImage.of(read_header(f), _detections([], [], [])) for f in series_files]
    report = build_series_report(images, _model())
    path = tmp_path / "empty.dcm"
    path.write_bytes(report.to_bytes())
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == [], errors + warnings
    sr = pydicom.dcmread(path)
    assert read_regions(sr) == [] and read_summary(sr) == {"Nodule": "Absent"} and report.n_detections == 0
    assert "CodingSchemeIdentificationSequence" not in sr  # no private code used


def test_report_refuses_what_it_cannot_reference(series_files: list[Path], small_phantom: Path) -> None:
    with pytest.raises(SrError, match="at least one"):
        build_series_report([], _model())
    others = sorted((small_phantom / "dicom").iterdir())[1].glob("*.dcm")
    mixed = [SourceImage.of(read_header(f), _detections([], [], [])) for f in [series_files[0], next(others)]]
    with pytest.raises(SrError, match="one source series"):
        build_series_report(mixed, _model())
    ds = pydicom.dcmread(series_files[0])
    del ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(SrError, match="lacks SOPInstanceUID"):
        read_header(buf.getvalue())
    with pytest.raises(SrError, match="not a readable DICOM"):
        read_header(b"\x89PNG\r\n\x1a\n" + b"0" * 200)


# ---------------------------------------------------------------------------------------------- detflow infer --sr


@needs_dciodvfy
def test_infer_writes_one_report_per_series(exported: dict[str, Path], tmp_path: Path) -> None:
    """A folder of two phantom series, a corrupt copy of a slice in a third (copied) series, and a PNG: two reports,
    the broken series named (no report), the PNG counted; reports validate and hold the engine's boxes."""
    model = pixel_model(tmp_path / "model", json.loads(exported["card"].read_text()))
    src = tmp_path / "in"
    series = sorted((exported["phantom"] / "dicom").iterdir())
    for s in series[:2]:
        shutil.copytree(s, src / s.name)
    broken = copy_series(sorted(series[2].glob("*.dcm")), src / "broken", "broken",
                         patient=(SECRET_NAME, SECRET_ID))
    corrupt_copy(broken[0], src / "broken" / "099.dcm", "broken")
    shutil.copy(sorted((exported["prepared"] / "images" / "test").iterdir())[0], src / "photo.png")
    out, sr_dir = tmp_path / "out", tmp_path / "sr"
    r = subprocess.run([str(BIN / "detflow"), "infer", str(src), "--model", str(model), "--out", str(out),
                        "--sr", str(sr_dir), "--quiet"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DETFLOW_LOG": "DEBUG"})
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("sr:"))
    assert "2 report(s) (2 with findings, 0 without)" in line and "1 non-DICOM input(s) get none" in line
    assert "1 series not reported (an instance could not be read" in line
    assert SECRET_NAME not in r.stdout + r.stderr and SECRET_ID not in r.stdout + r.stderr
    files = sorted(sr_dir.glob("SR_*.dcm"))
    assert len(files) == 2
    preds = json.loads((out / "predictions.json").read_text())
    for f in files:
        assert dciodvfy(f)[0] == []
        sr = pydicom.dcmread(f)
        for region in read_regions(sr):
            name = next(p.relative_to(src).as_posix() for p in src.rglob("*.dcm")
                        if read_header(p).SOPInstanceUID == region.sop_instance_uid)
            mine = [p for p in preds if p["file_name"] == name and abs(p["score"] - region.score) < 1e-4]
            x, y, w, h = mine[0]["bbox"]  # predictions.json rounds to 0.01 px
            assert np.abs(np.asarray(region.box) - [x, y, x + w, y + h]).max() < 0.011


# ---------------------------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def service(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fastapi.testclient import TestClient

    from pipeline.infer.engine import OnnxDetector
    from pipeline.serve import ServeSettings, create_app

    model = pixel_model(tmp_path_factory.mktemp("served"), json.loads(exported["card"].read_text()))
    detector = OnnxDetector(model, providers="CPUExecutionProvider")
    app = create_app(ServeSettings(model_path=model, providers="CPUExecutionProvider", workers=2),
                     detector=detector)
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(500):
            if client.get("/health/ready").status_code == 200:
                break
            time.sleep(0.02)
        yield client, detector


@needs_dciodvfy
def test_service_answers_an_sr_for_a_dicom_upload(service: Any, series_files: list[Path], tmp_path: Path) -> None:
    client, detector = service
    data = series_files[1].read_bytes()
    as_json = client.post("/v1/detect", files={"file": ("x.dcm", data)})
    assert as_json.status_code == 200 and as_json.headers["content-type"].startswith("application/json")
    r = client.post("/v1/detect", files={"file": ("x.dcm", data)}, headers={"Accept": "application/dicom"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom", r.text[:300]
    assert r.headers["content-disposition"].startswith("attachment; filename=\"SR_")
    path = tmp_path / "served.dcm"
    path.write_bytes(r.content)
    assert dciodvfy(path)[0] == []
    sr = pydicom.dcmread(path)
    src = read_header(data)
    regions = read_regions(sr)
    boxes = np.asarray(as_json.json()["boxes"])
    assert len(regions) == len(boxes) > 0
    assert np.abs(np.sort(np.asarray([x.box for x in regions]), axis=0) - np.sort(boxes, axis=0)).max() < 1e-3
    assert {x.sop_instance_uid for x in regions} == {src.SOPInstanceUID}
    assert sr.SOPInstanceUID == sr_uids(detector.card["sha256"], detector.conf, src.SeriesInstanceUID,
                                        [src.SOPInstanceUID]).instance
    again = client.post("/v1/detect", files={"file": ("x.dcm", data)}, headers={"Accept": "application/dicom"})
    assert pydicom.dcmread(io.BytesIO(again.content)).SOPInstanceUID == sr.SOPInstanceUID  # deterministic
    # JSON preferred over DICOM, or only a wildcard: JSON
    for accept in ("application/json, application/dicom;q=0.5", "*/*", "application/dicom;q=0"):
        r = client.post("/v1/detect", files={"file": ("x.dcm", data)}, headers={"Accept": accept})
        assert r.headers["content-type"].startswith("application/json"), accept


def test_service_refuses_an_sr_for_a_png_upload(service: Any, exported: dict[str, Path]) -> None:
    client, _ = service
    png = sorted((exported["prepared"] / "images" / "test").iterdir())[0].read_bytes()
    r = client.post("/v1/detect", files={"file": ("x.png", png)}, headers={"Accept": "application/dicom"})
    assert r.status_code == 406
    err = r.json()["error"]
    assert err["code"] == "sr_needs_dicom" and "only describe a DICOM upload" in err["message"] \
        and "PNG" in err["message"]
    assert client.post("/v1/detect", files={"file": ("x.png", png)}).status_code == 200  # JSON still works


def test_run_report_lists_the_class_codes(exported: dict[str, Path], tmp_path: Path) -> None:
    from test_report import parse, render

    out = tmp_path / "report.html"
    render(exported["root"], exported["reports"], exported["root"] / "models", out, exported["phantom"])
    html = out.read_text()
    page = parse(html)
    assert page.by_id("class-codes") is not None and page.where(data_code_class="nodule")
    assert "27925004" in html and "DICOM PS3.16" in html and "Trained on DICOM modalities: CT" in html
