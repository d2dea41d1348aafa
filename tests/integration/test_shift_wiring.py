"""Shift detection wired through export, engine, CLI, batch infer and the service, on the session's tiny exported
YOLO model (conftest ``exported``): the embedding output and its reference sample, `detflow shift`, the service's
rolling window (GET /v1/shift, /metrics), and the one-line errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.fileio import sha256_file

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
BIN = Path(sys.executable).with_name("detflow")
CLI = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "pipeline.cli"]


def detflow(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DETFLOW_NO_PROGRESS": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("DETFLOW_LOG", None)
    return subprocess.run([*CLI, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def engine(exported: dict[str, Path]) -> Any:
    from pipeline.infer.engine import OnnxDetector

    return OnnxDetector(exported["onnx"], providers="CPUExecutionProvider")


@pytest.fixture(scope="module")
def train_images(exported: dict[str, Path]) -> list[Path]:
    return sorted((exported["prepared"] / "images" / "train").iterdir())


@pytest.fixture(scope="module")
def sites(exported: dict[str, Path], train_images: list[Path], tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Path]:
    """Folders: the training images (the same site as the reference), a colour-inverted copy (a strong shift),
    an empty folder, all-corrupt files, too few images; and a model folder whose graph lacks the embedding."""
    from PIL import Image

    root = tmp_path_factory.mktemp("shift_sites")
    same, inverted, empty, corrupt, few = (root / n for n in ("same", "inverted", "empty", "corrupt", "few"))
    for d in (same, inverted, empty, corrupt, few):
        d.mkdir()
    for i, p in enumerate(train_images):
        shutil.copy(p, same / p.name)
        rgb = np.asarray(Image.open(p).convert("RGB"))
        Image.fromarray(255 - rgb).save(inverted / p.name)
        (corrupt / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    for p in train_images[:3]:
        shutil.copy(p, few / p.name)
    old = root / "old_model"
    old.mkdir()
    _strip_embedding(exported["onnx"], old / "model.onnx")
    card = json.loads(exported["card"].read_text())
    card.pop("embedding")
    card["sha256"] = sha256_file(old / "model.onnx")
    (old / "model_card.json").write_text(json.dumps(card))
    return {"same": same, "inverted": inverted, "empty": empty, "corrupt": corrupt, "few": few, "old": old,
            "root": root}


def _strip_embedding(src: Path, dst: Path) -> None:
    """The model as exported before shift detection: no embedding output."""
    import onnx

    model = onnx.load(str(src))
    keep = [o for o in model.graph.output if o.name != "embedding"]
    model = onnx.utils.Extractor(model).extract_model([i.name for i in model.graph.input], [o.name for o in keep])
    onnx.save(model, str(dst))


# ------------------------------------------------------------------------------------------- export


def test_export_adds_embedding_output_and_reference(exported: dict[str, Path], engine: Any,
                                                    train_images: list[Path]) -> None:
    import onnx

    card = json.loads(exported["card"].read_text())
    emb = card["embedding"]
    graph = onnx.load(str(exported["onnx"]))
    assert [o.name for o in graph.graph.output] == ["output0", "embedding"]
    assert emb["name"] == "embedding" and emb["dtype"] == "float32" and emb["shape"][0] == "N"
    assert "Detect head" in emb["meaning"]
    ref_path = exported["onnx"].parent / emb["reference"]["file"]
    assert emb["reference"]["file"] == "embedding_reference.npy"
    assert emb["reference"]["sha256"] == sha256_file(ref_path)
    ref = np.load(ref_path)
    assert ref.dtype == np.float32 and ref.shape == (len(train_images), emb["shape"][1])
    assert emb["reference"]["rows"] == len(train_images) and emb["reference"]["split"] == "train"
    assert "validation split has" in emb["reference"]["note"]  # the tiny phantom's val split is below 32 images
    # the reference is what the engine computes on the training images, one per call
    dets, vectors = engine.predict_with_embeddings([engine.decode(p).rgb for p in train_images[:1]])
    name = train_images[0].name
    row = sorted(p.name for p in train_images).index(name)
    np.testing.assert_allclose(vectors[0], ref[row], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(engine.embedding_reference(), ref.astype(np.float64))


def test_reference_sample_is_the_validation_split_when_it_is_large_enough(exported: dict[str, Path], engine: Any,
                                                                         tmp_path: Path) -> None:
    """Held-out images, not the ones the model fitted; the training split only below MIN_HELD_OUT val images."""
    from pipeline.export import MIN_HELD_OUT, reference_sample

    prepared = tmp_path / "prepared"
    shutil.copytree(exported["prepared"], prepared)
    train = json.loads((prepared / "coco" / "train.json").read_text())
    val = {**train, "images": [{**im, "patient": f"v{im['id'] % 3}"} for im in train["images"]]}
    while len(val["images"]) < MIN_HELD_OUT:  # the train images again, listed as a val split of 3 patients
        val["images"] += [{**im, "id": len(val["images"]) + 1} for im in val["images"][:MIN_HELD_OUT]]
    (prepared / "coco" / "val.json").write_text(json.dumps(val))
    ref, groups, how = reference_sample(engine, prepared, rows=40)
    assert how["split"] == "val" and "note" not in how and how["rows"] == len(ref) == min(40, len(val["images"]))
    assert set(groups.tolist()) == {"v0", "v1", "v2"} and how["patients"] == 3
    val["images"] = val["images"][:MIN_HELD_OUT - 1]
    (prepared / "coco" / "val.json").write_text(json.dumps(val))
    _, groups, how = reference_sample(engine, prepared)
    assert how["split"] == "train" and f"< {MIN_HELD_OUT}" in how["note"] and "v0" not in set(groups.tolist())


def test_embedding_matches_pytorch(exported: dict[str, Path], engine: Any, train_images: list[Path]) -> None:
    import torch

    from pipeline.families.yolo.export import torch_embeddings
    from pipeline.families.yolo.inference import load_yolo
    from pipeline.infer.processing import preprocess

    ckpt = torch.load(exported["best"], map_location="cpu", weights_only=False)
    model = load_yolo(ckpt, exported["best"]).model
    rgbs = [engine.decode(p).rgb for p in train_images[:4]]
    batch, _ = preprocess(rgbs, engine.imgsz, np.float32, stride=engine.stride)
    expected = torch_embeddings(model, torch.from_numpy(batch)).numpy()
    got = engine.run(batch, embeddings=True)[-1]
    assert got.shape == expected.shape and got.shape[1] > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_engine_embeddings_leave_detections_alone(engine: Any, train_images: list[Path]) -> None:
    rgbs = [engine.decode(p).rgb for p in train_images[:5]]
    plain = engine.predict(rgbs, conf=0.001)
    dets, vectors = engine.predict_with_embeddings(rgbs, conf=0.001)
    for a, b in zip(plain, dets, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
    streamed = list(engine.predict_stream(train_images[:5], batch=2, workers=2, embeddings=True))
    assert [r.source for r in streamed] == train_images[:5]
    # same-size images: the batch composition does not change an image's embedding
    np.testing.assert_allclose(np.stack([r.embedding for r in streamed]), vectors, rtol=1e-5, atol=1e-6)
    assert all(r.embedding is None for r in engine.predict_stream(train_images[:2]))


def test_old_model_without_embeddings_keeps_working(sites: dict[str, Path], train_images: list[Path]) -> None:
    from pipeline.infer.engine import EmbeddingsUnavailable, OnnxDetector

    old = OnnxDetector(sites["old"] / "model.onnx", providers="CPUExecutionProvider")
    assert not old.has_embeddings
    assert len(old.predict([old.decode(train_images[0]).rgb])) == 1
    with pytest.raises(EmbeddingsUnavailable, match="has no 'embedding' output"):
        old.predict_with_embeddings([old.decode(train_images[0]).rgb])


# ------------------------------------------------------------------------------------------- CLI


def test_shift_command_same_site_vs_inverted(exported: dict[str, Path], sites: dict[str, Path]) -> None:
    from pipeline.shift import mmd_test

    model = str(exported["onnx"])
    docs = {}
    for name in ("same", "inverted"):
        out = sites["root"] / f"out_{name}"
        r = detflow(sites["root"], "shift", str(sites[name]), "--model", model, "--out", str(out),
                    "--permutations", "500")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        docs[name] = json.loads((out / "shift.json").read_text())
        assert (out / "shift_projection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert docs[name]["model_sha256"] == sha256_file(exported["onnx"])
        assert docs[name]["source"] == str(sites[name])
    n = len(list(sites["same"].iterdir()))
    for doc in docs.values():
        assert {"method", "statistic", "p_value", "alpha", "shifted", "n_reference", "n_target"} <= doc.keys()
        assert doc["n_target"] == n and doc["n_reference"] == n and doc["alpha"] == 0.05
        assert doc["n_permutations"] == 500
    # the training images themselves: the reference sample again, no shift; inverted: clearly shifted
    assert docs["same"]["p_value"] > 0.5 and not docs["same"]["shifted"]
    assert docs["inverted"]["p_value"] < 0.01 and docs["inverted"]["shifted"]
    assert docs["inverted"]["statistic"] > docs["same"]["statistic"]
    # the document is mmd_test on the reference and the engine's embeddings of the same files
    from pipeline.infer.engine import OnnxDetector

    det = OnnxDetector(exported["onnx"], providers="CPUExecutionProvider")
    files = sorted(sites["inverted"].iterdir())
    vectors = np.concatenate([det.predict_with_embeddings([det.decode(p).rgb])[1] for p in files])

    reference = det.embedding_reference()
    groups = det.embedding_reference_groups(len(reference))
    assert groups is not None and groups.shape == (len(reference),)  # export records each row's patient
    again = mmd_test(reference, vectors, n_permutations=500, reference_groups=groups)
    assert again.statistic == pytest.approx(docs["inverted"]["statistic"], rel=1e-6)
    assert again.p_value == docs["inverted"]["p_value"]


def test_infer_writes_a_shift_section(exported: dict[str, Path], sites: dict[str, Path]) -> None:
    out = sites["root"] / "infer_same"
    r = detflow(sites["root"], "infer", str(sites["same"]), "--model", str(exported["onnx"]), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "shift.json").read_text())
    assert doc["n_target"] == len(list(sites["same"].iterdir())) and not doc["shifted"]
    assert "shift: MMD²" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["infer_errors.json", "predictions.json", "shift.json"]
    # too few images or an older model: shift.json says it was not tested and why, and so does the summary
    for src, model, why in ((sites["few"], exported["onnx"], "3 image(s) read; the shift test needs at least 8"),
                            (sites["same"], sites["old"] / "model.onnx", "has no 'embedding' output")):
        out = sites["root"] / f"infer_{src.name}_{model.parent.name}"
        r = detflow(sites["root"], "infer", str(src), "--model", str(model), "--out", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        note = json.loads((out / "shift.json").read_text())
        assert note["tested"] is False and why in note["reason"] and note["source"] == str(src)
        assert "shift: not tested: " in r.stdout and why in r.stdout, r.stdout


@pytest.mark.parametrize(("case", "expected"), [
    ("empty", "no images in"),
    ("corrupt", "none of the"),
    ("few", "3 readable image(s) of 3; the shift test needs at least 8"),
    ("old", "has no 'embedding' output"),
])
def test_shift_bad_input_is_one_line(exported: dict[str, Path], sites: dict[str, Path], case: str,
                                     expected: str) -> None:
    source = sites["same"] if case == "old" else sites[case]
    model = sites["old"] / "model.onnx" if case == "old" else exported["onnx"]
    r = detflow(sites["root"], "shift", str(source), "--model", str(model), "--out", str(sites["root"] / "bad"))
    output = r.stdout + r.stderr
    assert "Traceback" not in output and r.returncode == 1, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], output


# ------------------------------------------------------------------------------------------- service


def test_service_window_equals_mmd_test(exported: dict[str, Path], engine: Any, sites: dict[str, Path]) -> None:
    from fastapi.testclient import TestClient

    from pipeline.serve import ServeSettings, create_app
    from pipeline.shift import mmd_test

    settings = ServeSettings(model_path=exported["onnx"], providers="CPUExecutionProvider", workers=2,
                             shift_window=64, shift_every=4, shift_permutations=300, token="s3cret")
    files = sorted(sites["inverted"].iterdir())
    auth = {"Authorization": "Bearer s3cret"}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        import time

        deadline = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/v1/shift").status_code == 401
        before = client.get("/v1/shift", headers=auth).json()
        assert before["available"] and before["result"] is None and before["n_window"] == 0  # warm-up not counted
        for p in files:
            r = client.post("/v1/detect", files={"file": (p.name, p.read_bytes(), "image/png")}, headers=auth)
            assert r.status_code == 200, r.text
        status = client.get("/v1/shift", headers=auth).json()
        metrics = client.get("/metrics").text
    vectors = np.concatenate([engine.predict_with_embeddings([engine.decode(p).rgb])[1] for p in files])
    reference = engine.embedding_reference()  # the service tests whole patients of the reference, as the CLI does
    expected = mmd_test(reference, vectors, alpha=0.05, n_permutations=300,
                        reference_groups=engine.embedding_reference_groups(len(reference)))
    assert status["n_window"] == len(files) and status["n_seen"] == len(files)
    res = status["result"]
    assert res["statistic"] == pytest.approx(expected.statistic, rel=1e-6, abs=1e-12)
    assert res["p_value"] == expected.p_value and res["shifted"] is True and res["n_target"] == len(files)
    assert "detflow_serve_shift_flag 1.0" in metrics
    assert f"detflow_serve_shift_window_fill {float(len(files))}" in metrics
    assert "detflow_serve_shift_p_value " in metrics and "detflow_serve_shift_available 1.0" in metrics


def test_service_without_embeddings_says_so(sites: dict[str, Path], train_images: list[Path]) -> None:
    from fastapi.testclient import TestClient

    from pipeline.serve import ServeSettings, create_app

    settings = ServeSettings(model_path=sites["old"] / "model.onnx", providers="CPUExecutionProvider", workers=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        import time

        deadline = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        p = train_images[0]
        assert client.post("/v1/detect", files={"file": (p.name, p.read_bytes(), "image/png")}).status_code == 200
        status = client.get("/v1/shift").json()
        metrics = client.get("/metrics").text
    assert status["available"] is False and "has no 'embedding' output" in status["reason"]
    assert "detflow_serve_shift_available 0.0" in metrics


# ------------------------------------------------------------------------------------------- patients


def test_source_groups_name_each_inputs_patient(tmp_path: Path) -> None:
    """COCO splits carry the patient, DICOM files their PatientID (hashed), plain images none (their own unit)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pipeline.infer.batch import collect_sources, source_groups

    (tmp_path / "images").mkdir()
    for n in ("a.png", "b.png", "c.png"):
        (tmp_path / "images" / n).write_bytes(b"x")
    coco = {"images": [{"id": 1, "file_name": "images/a.png", "patient": "p1"},
                       {"id": 2, "file_name": "images/b.png", "patient": "p1"},
                       {"id": 3, "file_name": "images/c.png"}], "annotations": [], "categories": []}
    (tmp_path / "split.json").write_text(json.dumps(coco))
    items = collect_sources(tmp_path / "split.json")
    assert source_groups(tmp_path / "split.json", items) == ["p1", "p1", None]
    assert source_groups(tmp_path / "images", collect_sources(tmp_path / "images")) == [None, None, None]
    dcm = tmp_path / "dicom"
    dcm.mkdir()
    for i, pid in enumerate(["SECRET-1", "SECRET-1", "SECRET-2"]):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT image storage
        ds.PatientID = pid
        ds.save_as(dcm / f"{i}.dcm", enforce_file_format=True)
    groups = source_groups(dcm, collect_sources(dcm))
    assert groups[0] == groups[1] != groups[2] and all(g.startswith("dicom:") and "SECRET" not in g for g in groups)


def test_reference_groups_are_optional_and_checked(tmp_path: Path) -> None:
    """A card without a groups entry (exported before it): None, the image-level test; a named file must match
    its sha256 and the reference's rows, else one clear error."""
    from pipeline.infer.engine import EmbeddingsUnavailable, OnnxDetector

    groups = np.array(["p1", "p1", "p2"])
    with open(tmp_path / "g.npy", "wb") as f:
        np.save(f, groups, allow_pickle=False)
    entry = {"file": "g.npy", "sha256": sha256_file(tmp_path / "g.npy")}

    def det(ref: dict[str, Any]) -> Any:  # the card and paths are all the method reads: no session needed
        d = object.__new__(OnnxDetector)
        d.card, d.model_path, d.card_path = {"embedding": {"reference": ref}}, tmp_path / "model.onnx", tmp_path / "c"
        return d

    assert det({"file": "r.npy"}).embedding_reference_groups(3) is None
    assert det({"file": "r.npy", "groups": entry}).embedding_reference_groups(3).tolist() == ["p1", "p1", "p2"]
    for ref, n, message in (({"groups": entry}, 4, "have shape \\(3,\\), the reference has 4 rows"),
                            ({"groups": {**entry, "sha256": "0" * 64}}, 3, "checksum mismatch"),
                            ({"groups": {**entry, "file": "missing.npy"}}, 3, "not found")):
        with pytest.raises(EmbeddingsUnavailable, match=message):
            det(ref).embedding_reference_groups(n)
