"""Export, parity, model card and the ONNX engine, on a tiny real YOLO model trained in the fixture."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_EXPORT as TINY

from pipeline.config import load_params


def test_parity_report_and_card(exported: dict[str, Path]) -> None:
    parity = json.loads((exported["reports"] / "parity.json").read_text())
    for key in ("matched_fraction", "max_abs_box_diff_px", "max_abs_score_diff", "map50_95_torch", "map50_95_onnx",
                "delta"):
        assert key in parity
    assert parity["delta"] <= 0.005 and parity["passed"] is True
    assert parity["delta"] == pytest.approx(abs(parity["map50_95_torch"] - parity["map50_95_onnx"]), abs=1e-6)
    if parity["boxes_compared"]:
        assert parity["matched_fraction"] >= 0.99
    card = json.loads(exported["card"].read_text())
    from pipeline.fileio import sha256_file

    assert card["sha256"] == sha256_file(exported["onnx"])
    assert card["family"] == "yolo" and card["classes"] == ["nodule"] and card["input"]["imgsz"] == 64
    assert card["input"]["channel_order"] == "RGB" and card["input"]["value_range"] == [0.0, 1.0]
    assert card["input"]["dicom_window"]["mode"] == "file tags" and card["opset"] == 18
    assert len(card["training_data"]["manifest_sha256"]) == 64 and card["gate"]["passed"] is True
    assert {"torch", "ultralytics", "onnx"} <= set(card["versions"])
    import onnx

    onnx.checker.check_model(str(exported["onnx"]))


def test_engine_matches_torch_on_same_images(exported: dict[str, Path]) -> None:
    from pipeline.evaluate.predict import TorchDetector
    from pipeline.infer.engine import OnnxDetector

    engine = OnnxDetector(exported["onnx"], providers="CPUExecutionProvider")
    torch_det = TorchDetector.load(exported["best"])
    from PIL import Image

    files = sorted((exported["prepared"] / "images" / "test").iterdir())[:6]
    rgbs = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    a, b = engine.predict(rgbs, conf=0.01), torch_det.predict(rgbs, conf=0.01)
    for x, y in zip(a, b, strict=True):
        assert len(x) == len(y)
        if len(x):
            assert np.abs(x.boxes - y.boxes).max() < 1e-2 and np.abs(x.scores - y.scores).max() < 1e-4
    # file path, bytes and DICOM inputs decode through the same path
    assert engine.decode(files[0]).rgb.shape == rgbs[0].shape
    assert np.array_equal(engine.decode(files[0].read_bytes()).rgb, rgbs[0])


def test_rect_letterbox_shapes_and_mapping() -> None:
    from pipeline.infer.processing import preprocess, rect_shape, unletterbox

    assert rect_shape(480, 640, 416, 32) == (320, 416)  # Ultralytics LetterBox(auto=True): 312 -> 320
    assert rect_shape(640, 480, 416, 32) == (416, 320) and rect_shape(256, 256, 256, 32) == (256, 256)
    wide = np.zeros((480, 640, 3), np.uint8)
    wide[100:200, 300:400] = 255
    batch, metas = preprocess([wide], 416, stride=32)
    assert batch.shape == (1, 3, 320, 416) and metas[0].pad_x == 0 and metas[0].pad_y == 4
    ys, xs = np.nonzero(batch[0, 0] > 0.99)  # the white square, found in the tensor and mapped back
    back = unletterbox(np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], float), metas[0])[0]
    assert np.abs(back - [300, 100, 400, 200]).max() <= 1.6
    mixed, metas = preprocess([wide, wide.transpose(1, 0, 2)], 416, stride=32)
    assert mixed.shape == (2, 3, 416, 416) and metas[0].pad_y == 52 and metas[1].pad_x == 52
    square, _ = preprocess([wide], 416)
    assert square.shape == (1, 3, 416, 416)


def test_engine_pads_minimally_and_matches_torch_on_non_square_images(exported: dict[str, Path]) -> None:
    from PIL import Image

    from pipeline.evaluate.predict import TorchDetector
    from pipeline.infer.engine import OnnxDetector

    engine = OnnxDetector(exported["onnx"], providers="CPUExecutionProvider")
    torch_det = TorchDetector.load(exported["best"])
    card = json.loads(exported["card"].read_text())
    assert card["input"]["stride"] == 32 and card["input"]["shape"][2:] == ["H", "W"] and engine.stride == 32
    files = sorted((exported["prepared"] / "images" / "test").iterdir())[:4]
    crops = [np.ascontiguousarray(np.asarray(Image.open(f).convert("RGB"))[:, 60:160]) for f in files]  # 256x100
    from pipeline.infer.processing import preprocess

    assert preprocess(crops, engine.imgsz, stride=engine.stride)[0].shape[2:] == (64, 32)  # not 64x64
    a, b = engine.predict(crops, conf=0.01), torch_det.predict(crops, conf=0.01)
    for x, y in zip(a, b, strict=True):
        assert len(x) == len(y)
        if len(x):
            assert np.abs(x.boxes - y.boxes).max() < 1e-2 and np.abs(x.scores - y.scores).max() < 1e-4
            assert (x.boxes[:, [0, 2]] <= 100).all() and (x.boxes[:, [1, 3]] <= 256).all()


def test_importing_the_engine_does_not_import_torch() -> None:
    code = ("import sys, pipeline.infer, pipeline.infer.batch, pipeline.infer.engine; "
            "print('torch' in sys.modules, 'torchvision' in sys.modules, 'ultralytics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "False"]


def _copy(exported: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    onnx_path, card = tmp_path / "model.onnx", tmp_path / "model_card.json"
    shutil.copy(exported["onnx"], onnx_path)
    shutil.copy(exported["card"], card)
    return onnx_path, card


def test_truncated_model_fails_at_load(exported: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.infer.engine import ModelLoadError, OnnxDetector

    onnx_path, card = _copy(exported, tmp_path)
    onnx_path.write_bytes(onnx_path.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        OnnxDetector(onnx_path)
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        OnnxDetector(onnx_path, verify_checksum=False)


def test_card_that_does_not_match_the_graph_fails(exported: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.infer.engine import ModelLoadError, OnnxDetector

    onnx_path, card = _copy(exported, tmp_path)
    doc = json.loads(card.read_text())
    doc["classes"] = ["nodule", "mass"]
    card.write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match="graph predicts 1 classes, the card lists 2"):
        OnnxDetector(onnx_path)
    card.write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        OnnxDetector(onnx_path)
    card.unlink()
    with pytest.raises(ModelLoadError, match="model card .* not found"):
        OnnxDetector(onnx_path)


def test_providers_reported_and_require_gpu(exported: dict[str, Path]) -> None:
    import onnxruntime as ort

    from pipeline.infer.engine import OnnxDetector, ProviderError

    engine = OnnxDetector(exported["onnx"])  # auto: CUDA first when onnxruntime offers it
    if "CUDAExecutionProvider" in engine.providers:
        pytest.skip("a working CUDA provider is present")
    assert "CUDAExecutionProvider" in ort.get_available_providers()  # onnxruntime-gpu lists it regardless...
    assert engine.providers == ["CPUExecutionProvider"]  # ...but the session runs on the CPU, and says so
    assert engine.info()["providers"] == ["CPUExecutionProvider"]
    with pytest.raises(ProviderError, match="CUDA provider is not active"):
        OnnxDetector(exported["onnx"], require_gpu=True)


def test_batch_inference_skips_bad_files(exported: dict[str, Path], tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from pipeline.infer.batch import run_batch
    from pipeline.infer.engine import OnnxDetector

    src = tmp_path / "in"
    src.mkdir()
    good = sorted((exported["prepared"] / "images" / "test").iterdir())
    for f in good:
        shutil.copy(f, src / f.name)
    (src / "broken.png").write_bytes(good[0].read_bytes()[:300])  # a real PNG, truncated
    (src / "notes.jpg").write_text("hello")
    shutil.copy(get_testdata_file("MR_truncated.dcm", download=False), src / "trunc.dcm")
    summary = run_batch(OnnxDetector(exported["onnx"]), src, tmp_path / "out", batch=2, render=True, progress=False)
    assert summary.n_images == len(good) >= 4
    assert sorted((e["file"], e["kind"]) for e in summary.errors) == [
        ("broken.png", "corrupt_image"), ("notes.jpg", "not_an_image"), ("trunc.dcm", "corrupt_dicom")]
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(preds) == summary.n_detections
    assert len(list((tmp_path / "out" / "rendered").iterdir())) == len(good)


def test_predict_stream_keeps_order_and_equals_one_call_at_a_time(exported: dict[str, Path], tmp_path: Path) -> None:
    """Several workers, batches of 2, a bad file in the middle: results in input order, errors in place, and every
    good image's detections equal the sequential engine's."""
    from pipeline.infer.engine import OnnxDetector, plan_workers

    files = sorted((exported["prepared"] / "images" / "test").iterdir())
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    sources = [*files[:3], bad, *files[3:]] * 2  # enough inputs for several rounds of in-flight batches
    workers, threads = plan_workers(3, cpus=3)
    assert (workers, threads) == (3, 1) and plan_workers(0, cpus=2) == (3, 1) and plan_workers(0, cpus=64) == (8, 8)
    engine = OnnxDetector(exported["onnx"], providers="CPUExecutionProvider", threads=threads)
    out = list(engine.predict_stream(sources, batch=2, workers=workers))
    assert [r.source for r in out] == sources
    for r in out:
        if r.source == bad:
            assert r.detections is None and getattr(r.error, "kind", None) == "not_an_image"
            continue
        assert r.error is None
        (ref,) = engine.predict([engine.decode(r.source).rgb])
        assert len(r.detections) == len(ref)
        np.testing.assert_allclose(r.detections.boxes, ref.boxes, atol=1e-4)
        np.testing.assert_allclose(r.detections.scores, ref.scores, atol=1e-6)
        np.testing.assert_array_equal(r.detections.labels, ref.labels)
    assert sum(len(r.detections) for r in out if r.detections is not None) > 0
    assert [r.source for r in engine.predict_stream(iter(sources[:5]), batch=3, workers=1)] == sources[:5]
    with pytest.raises(ValueError, match="workers"):
        list(engine.predict_stream(sources, workers=0))


def test_coco_split_predictions_score_like_the_evaluator(exported: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.infer.batch import run_batch
    from pipeline.infer.engine import OnnxDetector

    engine = OnnxDetector(exported["onnx"])
    engine.conf = 0.001
    run_batch(engine, exported["prepared"] / "coco" / "test.json", tmp_path, progress=False)
    preds = json.loads((tmp_path / "predictions.json").read_text())
    from pipeline.evaluate.metrics import coco_metrics

    gt = json.loads((exported["prepared"] / "coco" / "test.json").read_text())
    ours = coco_metrics(gt, [{k: p[k] for k in ("image_id", "category_id", "bbox", "score")} for p in preds],
                        ["nodule"])
    parity = json.loads((exported["reports"] / "parity.json").read_text())
    assert ours["map50_95"] == pytest.approx(parity["map50_95_onnx"], abs=0.002)


def test_gate_failure_blocks_export(exported: dict[str, Path], tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    shutil.copytree(exported["reports"], reports)
    args = [sys.executable, "-m", "pipeline.cli", "evaluate", "--model", str(exported["best"]), "--data",
            str(exported["prepared"]), "--reports", str(reports), "--quiet"]
    for o in [*TINY, "gate.min_map50=1.0", "gate.min_cpm=1.0"]:
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "evaluation gate failed" in proc.stderr and "min_map50" in proc.stderr and "min_cpm" in proc.stderr
    gate = json.loads((reports / "gate.json").read_text())
    assert gate["passed"] is False
    from pipeline.errors import DetflowError
    from pipeline.export import export_model

    with pytest.raises(DetflowError, match="gate did not pass"):
        export_model(load_params(None, TINY), exported["best"], exported["prepared"], reports, tmp_path / "models")
    assert not (tmp_path / "models" / "model.onnx").exists()


def test_an_image_is_never_padded_to_a_batch_mates_canvas(exported: dict[str, Path]) -> None:
    """A batch of mixed shapes is run one canvas shape at a time: each image's detections are those it gets alone
    (a grey border from a larger batch-mate would change what the model finds at its edges)."""
    from PIL import Image

    from pipeline.evaluate.predict import TorchDetector
    from pipeline.infer.engine import OnnxDetector
    from pipeline.infer.processing import shape_groups

    engine = OnnxDetector(exported["onnx"], providers="CPUExecutionProvider")
    files = sorted((exported["prepared"] / "images" / "test").iterdir())[:2]
    full = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    mixed = [full[0], np.ascontiguousarray(full[1][:, 60:160]), full[1]]  # 256x256, 256x100, 256x256
    assert shape_groups(mixed, engine.imgsz, engine.stride) == [[0, 2], [1]]
    torch_det = TorchDetector.load(exported["best"])
    for det in (engine, torch_det):
        together = det.predict(mixed, conf=0.001)
        alone = [det.predict([im], conf=0.001)[0] for im in mixed]
        assert len(together) == 3
        for a, b in zip(together, alone, strict=True):
            assert len(a) == len(b) and np.allclose(a.boxes, b.boxes, atol=1e-3) and np.allclose(a.scores, b.scores,
                                                                                                  atol=1e-5)
    dets, emb = engine.predict_with_embeddings(mixed)
    single = np.concatenate([engine.predict_with_embeddings([im])[1] for im in mixed])
    assert emb.shape == single.shape and np.allclose(emb, single, atol=1e-4)  # rows stay in input order
