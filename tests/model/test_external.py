"""External evaluation: the deployed ONNX model and its checkpoint scored on other labelled datasets, class maps,
the generalisation table and the external gate, on the session's tiny phantom model (tests/conftest.py).

The tiny model (2 epochs from scratch) finds no real nodule, so every mAP on the phantom's own labels is 0 and a
comparison of two zeros would prove nothing. The labelled copies below therefore carry, besides the real nodules,
the checkpoint's own best box per image as an extra "nodule" label: the model then scores a mAP inside (0, 1) (its
boxes find those labels, not the real nodules), and the ONNX export must reproduce it from its own boxes.
"""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO, TINY_EXPORT
from PIL import Image

from pipeline.config import ExternalSetParams, Params, load_params
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate.external import (
    evaluate_dataset,
    evaluate_external,
    evaluate_external_sets,
    external_set,
    generalisation_table,
    map_classes,
)
from pipeline.evaluate.gate import GateFailed
from pipeline.evaluate.stage import Scorer, load_scorer

SAME_KEYS = ("map50", "map50_95", "per_class", "froc", "ci95", "operating_point", "n_images", "n_patients",
             "n_lesions")


@pytest.fixture(scope="module")
def params() -> Params:
    return load_params(None, TINY_EXPORT)


@pytest.fixture(scope="module")
def onnx(exported: dict[str, Path], params: Params) -> Scorer:
    return load_scorer(exported["onnx"], params)


Item = tuple[Path, dict, list[tuple[list[float], str]]]


def _boxes_of(prepared: Path) -> list[Item]:
    """Every prepared image (all splits) with its boxes as (xyxy, class name)."""
    out = []
    for split in ("train", "val", "test"):
        doc = json.loads((prepared / "coco" / f"{split}.json").read_text())
        names = {c["id"]: c["name"] for c in doc["categories"]}
        for img in doc["images"]:
            boxes = [([x, y, x + w, y + h], names[a["category_id"]]) for a in doc["annotations"]
                     if a["image_id"] == img["id"] for x, y, w, h in [a["bbox"]]]
            out.append((prepared / img["file_name"], img, boxes))
    return out


@pytest.fixture(scope="module")
def items(exported: dict[str, Path]) -> list[Item]:
    """The prepared images with the real nodules plus the checkpoint's best box each (see the module docstring)."""
    from pipeline.evaluate.predict import TorchDetector

    model = TorchDetector.load(exported["best"])
    out = []
    for path, img, boxes in _boxes_of(exported["prepared"]):
        with Image.open(path) as im:
            det = model.predict([np.asarray(im.convert("RGB"))], conf=0.001, iou=0.7)[0]
        best = int(np.argmax(det.scores))
        out.append((path, img, [*boxes, ([round(float(v), 2) for v in det.boxes[best]], "nodule")]))
    return out


def write_copy(items: list[Item], dst: Path, fmt: str, rename: dict[str, str] | None = None,
               relabel_every: int = 0, relabel_as: str = "") -> Path:
    """Labelled images as a raw VOC or COCO dataset (same pixels, same boxes); ``rename`` changes label names,
    ``relabel_every`` n relabels every n-th box as ``relabel_as``."""
    rename = rename or {}
    k = 0
    if fmt == "coco":
        (dst / "images").mkdir(parents=True)
        labels: list[str] = []
        doc: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
        for i, (path, img, boxes) in enumerate(items, start=1):
            shutil.copy(path, dst / "images" / path.name)
            doc["images"].append({"id": i, "file_name": path.name, "width": img["width"], "height": img["height"]})
            for (x1, y1, x2, y2), name in boxes:
                k += 1
                name = relabel_as if relabel_every and k % relabel_every == 0 else rename.get(name, name)
                if name not in labels:
                    labels.append(name)
                doc["annotations"].append({"id": k, "image_id": i, "category_id": labels.index(name) + 1,
                                           "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                           "iscrowd": 0})
        doc["categories"] = [{"id": n + 1, "name": c} for n, c in enumerate(labels)]
        (dst / "annotations.json").write_text(json.dumps(doc))
        return dst
    (dst / "Annotations").mkdir(parents=True)
    (dst / "JPEGImages").mkdir()
    for path, img, boxes in items:
        shutil.copy(path, dst / "JPEGImages" / path.name)
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = path.name
        size = ET.SubElement(root, "size")
        ET.SubElement(size, "width").text = str(img["width"])
        ET.SubElement(size, "height").text = str(img["height"])
        for (x1, y1, x2, y2), name in boxes:
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = rename.get(name, name)
            bnd = ET.SubElement(obj, "bndbox")
            for key, v in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2), strict=True):
                ET.SubElement(bnd, key).text = repr(float(v))
        ET.ElementTree(root).write(dst / "Annotations" / f"{path.stem}.xml")
    return dst


def _same(a: dict, b: dict) -> dict:
    return {k: (a[k], b[k]) for k in SAME_KEYS if a[k] != b[k]}


def test_onnx_and_checkpoint_score_an_external_set_alike(exported: dict[str, Path], params: Params, onnx: Scorer,
                                                        items: list[Item], tmp_path: Path) -> None:
    ext = external_set("site", str(write_copy(items, tmp_path / "site", "coco")))
    m_onnx = evaluate_external(params, onnx, ext, tmp_path / "onnx" / "site", progress=False)
    m_torch = evaluate_external(params, load_scorer(exported["best"], params), ext, tmp_path / "pt" / "site",
                                progress=False)
    assert m_onnx["n_images"] == m_torch["n_images"] == 24
    assert m_onnx["n_lesions"] == m_torch["n_lesions"] == sum(len(b) for _, _, b in items)
    assert m_onnx["split"] == "external" and m_onnx["model"]["format"] == "onnx"
    assert m_torch["model"]["format"] == "checkpoint"
    assert 0.3 < m_torch["map50"] < 1.0, m_torch["map50"]
    tol = params.export.yolo.max_map_delta
    assert abs(m_onnx["map50"] - m_torch["map50"]) <= tol
    assert abs(m_onnx["map50_95"] - m_torch["map50_95"]) <= tol
    # the keys of reports/metrics.json, CIs included
    internal = json.loads((exported["reports"] / "metrics.json").read_text())
    assert set(internal) <= set(m_onnx)
    assert len(m_onnx["ci95"]["map50"]) == 2 and m_onnx["ci95"]["resamples"] == params.evaluate.bootstrap
    assert m_onnx["ci95"]["map50"][0] <= m_onnx["map50"] <= m_onnx["ci95"]["map50"][1]
    written = json.loads((tmp_path / "onnx" / "site" / "metrics.json").read_text())
    assert written["map50"] == m_onnx["map50"]
    assert json.loads((tmp_path / "onnx" / "site" / "data_validation.json").read_text())["status"] == "ok"
    assert not list((tmp_path / "onnx").glob(".site-prepared-*")), "the scratch dataset is removed"


def test_a_raw_dicom_set_is_read_whole_with_patients(exported: dict[str, Path], params: Params, onnx: Scorer,
                                                     tmp_path: Path) -> None:
    ext = ExternalSetParams(name="siteA", source=str(exported["phantom"]), format="dicom_csv")
    m = evaluate_external(params, onnx, ext, tmp_path / "siteA", progress=False)
    # every image of the raw set (6 patients x 4 slices), the patients kept as the bootstrap unit
    assert (m["n_images"], m["n_patients"]) == (24, 6)
    assert m["n_lesions"] == sum(len(b) for _, _, b in _boxes_of(exported["prepared"]))
    assert m["external"]["format"] == "dicom_csv" and m["external"]["images_quarantined"] == 0


def test_voc_and_coco_copies_score_identically(exported: dict[str, Path], params: Params, onnx: Scorer,
                                               items: list[Item], tmp_path: Path) -> None:
    voc = write_copy(items, tmp_path / "voc", "voc")
    coco = write_copy(items, tmp_path / "coco", "coco")
    m_voc = evaluate_external(params, onnx, external_set("v", str(voc)), tmp_path / "out" / "v", progress=False)
    m_coco = evaluate_external(params, onnx, external_set("c", str(coco)), tmp_path / "out" / "c", progress=False)
    assert m_voc["external"]["format"] == "voc" and m_coco["external"]["format"] == "coco"
    assert m_voc["n_images"] == 24 and m_voc["map50"] > 0
    assert _same(m_voc, m_coco) == {}


def test_class_map_renames_and_unmapped_labels_are_dropped_and_counted(params: Params, onnx: Scorer,
                                                                       items: list[Item], tmp_path: Path) -> None:
    plain = evaluate_external(params, onnx, external_set("p", str(write_copy(items, tmp_path / "p",
                                                                             "coco"))), tmp_path / "o" / "p",
                              progress=False)
    renamed = write_copy(items, tmp_path / "r", "coco", rename={"nodule": "Knoten"})
    mapped = evaluate_external(params, onnx, external_set("r", str(renamed), class_map="Knoten=nodule"),
                               tmp_path / "o" / "r", progress=False)
    assert _same(plain, mapped) == {}
    assert mapped["external"]["class_map"] == {"Knoten": "nodule"} and mapped["classes_left_out"] == []
    # without the map nothing is a model class: one clear line
    with pytest.raises(DataError, match="no box has a model class .*Knoten=nodule"):
        evaluate_external(params, onnx, external_set("r2", str(renamed)), tmp_path / "o" / "r2", progress=False)
    # every 3rd box labelled 'vessel': dropped and counted, the rest scored
    noisy = write_copy(items, tmp_path / "n", "coco", relabel_every=3, relabel_as="vessel")
    m = evaluate_external(params, onnx, external_set("n", str(noisy)), tmp_path / "o" / "n", progress=False)
    total = plain["n_lesions"]
    assert m["external"]["labels_dropped"] == {"vessel": total // 3}
    assert m["n_lesions"] == total - total // 3
    assert f"vessel ({total // 3} boxes)" in m["note"]
    # class map mistakes are one line each
    with pytest.raises(ConfigError, match=r"^external set 'x': class map target 'Nodule' is not a model class; "
                                          r"the model's classes: nodule$"):
        evaluate_external(params, onnx, external_set("x", str(renamed), class_map="Knoten=Nodule"),
                          tmp_path / "o" / "x", progress=False)
    with pytest.raises(DataError, match=r"^external set 'y': class map names label 'knoten', which the set does "
                                        r"not have; its labels: Knoten$"):
        evaluate_external(params, onnx, external_set("y", str(renamed), class_map="knoten=nodule"),
                          tmp_path / "o" / "y", progress=False)


def test_model_classes_absent_from_the_set_are_left_out_of_its_mean(params: Params, onnx: Scorer,
                                                                    items: list[Item], tmp_path: Path) -> None:
    ext = external_set("s", str(write_copy(items, tmp_path / "s", "coco")))
    one = evaluate_external(params, onnx, ext, tmp_path / "one" / "s", progress=False)
    # the same detector presented as a two-class model whose second class nobody labelled in this set
    two_class = Scorer(onnx.predict, ["nodule", "mass"], {**onnx.info})
    two = evaluate_external(params, two_class, ext, tmp_path / "two" / "s", progress=False)
    assert two["classes_left_out"] == ["mass"] and one["classes_left_out"] == []
    assert list(two["per_class"]) == ["nodule"]
    assert two["map50"] == one["map50"] and two["ci95"] == one["ci95"]
    assert two["note"] == "left out of the mean (no box in this set; their detections are not scored): mass"


def test_map_classes_on_a_three_class_model() -> None:
    gt = {"images": [{"id": 1, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "rbc"}, {"id": 2, "name": "wbc"}, {"id": 3, "name": "dust"}],
          "annotations": [{"id": i, "image_id": 1, "category_id": c, "bbox": [0, 0, 5, 5]}
                          for i, c in enumerate([1, 1, 2, 3, 3, 3], start=1)]}
    m = map_classes(gt, ["RBC", "WBC", "Platelets"], {"rbc": "RBC", "wbc": "WBC"}, "lab2")
    assert [a["category_id"] for a in m.gt["annotations"]] == [1, 1, 2]
    assert m.left_out == ["Platelets"] and m.dropped == {"dust": 3} and m.mapped == {"rbc": "RBC", "wbc": "WBC"}
    assert [c["name"] for c in m.gt["categories"]] == ["RBC", "WBC", "Platelets"]


@pytest.mark.parametrize(("external", "message"), [
    ("[{name: a, source: x}, {name: a, source: y}]", "external: Value error, external set names must be unique; "
                                                    "repeated: a"),
    ("[{name: a, source: x, class_map: rbc}]", "external.0.class_map: Value error, class map entry 'rbc' must look "
                                               "like external=MODEL_CLASS (e.g. rbc=RBC,wbc=WBC)"),
    ("[{name: a, source: x, class_map: [rbc]}]", "external.0.class_map: Value error, class map must be a mapping or "
                                                 "a string like rbc=RBC,wbc=WBC, got list"),
    ("[{name: ../up, source: x}]", "external.0.name: Value error, name '../up' must be 1-64 letters, digits"),
    ("[{name: a, source: x, format: pdf}]", "external.0.format: got 'pdf'; expected one of:"),
])
def test_bad_external_params_are_one_line_each(external: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_params(None, [f"external={external}"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("invalid parameters in"), lines  # the header + one detail line
    assert lines[1].strip().startswith(message), lines


def test_params_accept_both_class_map_spellings() -> None:
    p = load_params(None, ["external=[{name: lab2, source: d, format: voc, class_map: {rbc: RBC}}, "
                           "{name: lab3, source: e, class_map: 'rbc=RBC, wbc=WBC'}]"])
    assert [s.class_map for s in p.external] == [{"rbc": "RBC"}, {"rbc": "RBC", "wbc": "WBC"}]
    assert Params().external == [] and Params().gate.min_external_map50 is None


def test_cli_class_map_error_is_one_line(exported: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import run

    rc = run(["evaluate", "--model", str(exported["onnx"]), "--data", str(exported["phantom"]), "--class-map",
              "nodule", "--reports", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: external set 'phantom': class_map: class map entry 'nodule' must look like "
                               "external=MODEL_CLASS (e.g. rbc=RBC,wbc=WBC)"]


def test_generalisation_table_and_external_gate(exported: dict[str, Path], params: Params, items: list[Item],
                                                tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    shutil.copy(exported["reports"] / "metrics.json", reports / "metrics.json")
    internal = json.loads((reports / "metrics.json").read_text())
    sets = [ExternalSetParams(name="siteA", source=str(exported["phantom"]), format="dicom_csv"),
            external_set("voc_copy", str(write_copy(items, tmp_path / "voc", "voc")))]
    p = params.model_copy(update={"external": sets})
    result = evaluate_external_sets(p, exported["onnx"], reports, progress=False)
    table = json.loads((reports / "generalisation.json").read_text())
    assert table == json.loads(json.dumps(result.table))
    assert list(table["sets"]) == ["siteA", "voc_copy"]
    assert table["internal"] == {"split": "test", "map50": internal["map50"]}
    for name in ("siteA", "voc_copy"):
        ext = json.loads((reports / "external" / name / "metrics.json").read_text())
        row, a, b = table["sets"][name], internal["per_class"]["nodule"]["ap50"], ext["per_class"]["nodule"]["ap50"]
        assert row["per_class"]["nodule"] == {"internal": a, "external": b, "drop": round(a - b, 6)}
        assert row["map50"] == ext["map50"] and row["ci95_map50"] == ext["ci95"]["map50"]
        assert row["internal_map50_same_classes"] == round(a, 6) and row["drop"] == round(a - ext["map50"], 6)
    assert table["gate"] == {"passed": True, "min_external_map50": None, "checks": []}  # null: no check

    # a threshold: one check per set; above what the sets reach -> GateFailed after every report is written
    worst = min(s["map50"] for s in table["sets"].values())
    strict = p.model_copy(update={"gate": p.gate.model_copy(update={"min_external_map50": round(worst + 0.01, 4)})})
    (reports / "generalisation.json").unlink()
    with pytest.raises(GateFailed, match=r"min_external_map50\[(siteA|voc_copy)\]"):
        evaluate_external_sets(strict, exported["onnx"], reports, progress=False)
    gate = json.loads((reports / "generalisation.json").read_text())["gate"]
    assert [c["name"] for c in gate["checks"]] == ["min_external_map50[siteA]", "min_external_map50[voc_copy]"]
    assert gate["passed"] is False and any(not c["passed"] for c in gate["checks"])
    lenient = p.model_copy(update={"gate": p.gate.model_copy(update={"min_external_map50": 0.0})})
    ok = evaluate_external_sets(lenient, exported["onnx"], reports, progress=False)
    assert ok.gate["passed"] and [c["value"] for c in ok.gate["checks"]] == [
        round(table["sets"][n]["map50"], 6) for n in ("siteA", "voc_copy")]

    # the one-set command checks the same threshold
    with pytest.raises(GateFailed, match=r"external set 'siteA' fails the gate"):
        evaluate_dataset(strict, exported["onnx"], sets[0], tmp_path / "single", progress=False)


def test_an_empty_external_list_writes_an_empty_table(params: Params, tmp_path: Path) -> None:
    result = evaluate_external_sets(params, tmp_path / "no-model.onnx", tmp_path / "reports", progress=False)
    assert (tmp_path / "reports" / "external").is_dir()
    assert json.loads((tmp_path / "reports" / "generalisation.json").read_text()) == result.table == {
        "internal": {"split": None, "map50": None}, "sets": {},
        "gate": {"passed": True, "min_external_map50": None, "checks": []}}


def test_generalisation_drop_is_none_where_a_side_is_undefined() -> None:
    table = generalisation_table(
        {"split": "test", "map50": 0.8, "per_class": {"A": {"ap50": 0.9}, "B": {"ap50": float("nan")}}},
        {"x": {"map50": 0.5, "per_class": {"A": {"ap50": 0.6}, "B": {"ap50": 0.4}}, "classes_left_out": ["C"],
               "ci95": {"map50": [0.4, 0.6]}, "n_images": 3}})
    s = table["sets"]["x"]
    assert s["per_class"]["A"] == {"internal": 0.9, "external": 0.6, "drop": 0.3}
    assert s["per_class"]["B"] == {"internal": None, "external": 0.4, "drop": None}
    assert s["internal_map50_same_classes"] == 0.9 and s["drop"] == 0.4 and s["classes_left_out"] == ["C"]
    assert not math.isnan(s["map50"])


def test_flow_report_has_the_external_section(tmp_path: Path) -> None:
    from flows.training import external_markdown, stages

    # scored after export; the run report shows it, last
    assert stages(REPO)[-2:] == ["external", "report"]
    assert "not run" in external_markdown(tmp_path / "missing.json")
    path = tmp_path / "generalisation.json"
    path.write_text(json.dumps(generalisation_table(
        {"split": "test", "map50": 0.9, "per_class": {"WBC": {"ap50": 0.99}}},
        {"lab2": {"map50": 0.61, "per_class": {"WBC": {"ap50": 0.61}}, "classes_left_out": ["Platelets"],
                  "ci95": {"map50": [0.5, 0.7]}, "n_images": 10}})))
    md = external_markdown(path)
    assert "| lab2 | WBC | 0.9900 | 0.6100 | 0.3800 |" in md
    assert "left out of the mean (not in this set): Platelets" in md
