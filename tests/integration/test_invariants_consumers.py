"""Whatever `prepare` accepts, every consumer can run (issue 20, degenerate geometry): the smallest, thinnest
(1 px high or wide) and largest accepted images, generated here, through infer, evaluate, shift, adapt and the
service (single and batch, with and without micro-batching). One bad image in a batch is an error entry, never a
failed batch.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import run as detflow
from pipeline.config import load_params
from pipeline.data.imaging import DEFAULT_MAX_PIXELS
from pipeline.data.prepare import prepare_dataset

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

# (width, height): the smallest, the thinnest both ways at several lengths, and the largest the pixel limit accepts
SIZES = [(1, 1), (2, 1), (1, 2), (63, 1), (1, 63), (1000, 1), (1, 1000), (100_000, 1), (1, 100_000), (4999, 5),
         (DEFAULT_MAX_PIXELS, 1), (6400, DEFAULT_MAX_PIXELS // 6400)]


def _png(size: tuple[int, int], seed: int) -> bytes:
    w, h = size
    if w * h > 1_000_000:  # large: smooth (a few hundred kB as PNG, under the service's upload limit)
        row = (np.arange(w, dtype=np.int64) % 251).astype(np.uint8)
        arr = np.broadcast_to(row[None, :, None], (h, w, 3))
        arr = np.ascontiguousarray(arr)
    else:
        arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _name(size: tuple[int, int]) -> str:
    return f"edge_{size[0]}x{size[1]}"


@pytest.fixture(scope="module")
def edge_source(tmp_path_factory: pytest.TempPathFactory, exported: dict[str, Path]) -> Path:
    """A COCO dataset of the edge images (one box each, the whole image) plus 8 ordinary phantom slices (so the
    shift test and adapt have enough images), with the model's class."""
    root = tmp_path_factory.mktemp("edges") / "coco"
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, size in enumerate(SIZES):
        (root / "images" / f"{_name(size)}.png").write_bytes(_png(size, i))
        images.append({"id": i + 1, "file_name": f"{_name(size)}.png", "width": size[0], "height": size[1]})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [0, 0, size[0], size[1]]})
    for src in sorted((exported["prepared"] / "images" / "train").iterdir())[:8]:
        k = len(images) + 1
        (root / "images" / src.name).write_bytes(src.read_bytes())
        images.append({"id": k, "file_name": src.name})
        anns.append({"id": k, "image_id": k, "category_id": 1, "bbox": [10, 10, 20, 20]})
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                "categories": [{"id": 1, "name": "nodule"}]}))
    return root


@pytest.fixture(scope="module")
def accepted(edge_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Path]:
    """size -> the image file `prepare` wrote for it: prepare accepts every one of them (the premise)."""
    out = tmp_path_factory.mktemp("edges_prepared")
    params = load_params(None, [f"data.source={edge_source}", "data.classes=[nodule]", "prepare.split=patient",
                                "prepare.val_fraction=0", "prepare.test_fraction=0"])
    prepare_dataset(params, out / "prepared", out / "report.json", progress=False)
    written = {p.stem: p for p in (out / "prepared" / "images" / "train").iterdir()}
    assert all(_name(s) in written for s in SIZES), sorted(written)
    return {s: written[_name(s)] for s in SIZES}


@pytest.fixture(scope="module")
def engine(exported: dict[str, Path]) -> Any:
    from pipeline.infer.engine import OnnxDetector

    return OnnxDetector(exported["onnx"], providers="CPUExecutionProvider")


def _no_traceback(capfd: pytest.CaptureFixture[str]) -> str:
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err[-3000:]
    return err


@pytest.mark.parametrize("size", SIZES, ids=[_name(s) for s in SIZES])
def test_engine_and_infer_run_every_accepted_image(size: tuple[int, int], accepted: dict, engine: Any,
                                                   exported: dict[str, Path], tmp_path: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """`detflow infer` on the one image: exit 0, one prediction entry set, no error entry; boxes inside it."""
    rc = detflow(["infer", str(accepted[size]), "--model", str(exported["onnx"]), "--out", str(tmp_path / "p"),
                  "--quiet", "--conf", "0.001"])
    _no_traceback(capfd)
    assert rc == 0
    assert json.loads((tmp_path / "p" / "infer_errors.json").read_text()) == []
    for det in json.loads((tmp_path / "p" / "predictions.json").read_text()):
        x, y, w, h = det["bbox"]
        assert 0 <= x and 0 <= y and x + w <= size[0] + 1e-6 and y + h <= size[1] + 1e-6
    rgb = engine.decode(accepted[size]).rgb
    (dets,), emb = engine.predict([rgb], conf=0.001, return_embeddings=True)
    assert np.isfinite(emb).all() and emb.shape[0] == 1


def test_batches_of_mixed_edge_sizes_run(accepted: dict, engine: Any) -> None:
    """All the edge images in one model call (padded to their largest shape), as batch infer and the service do."""
    rgbs = [engine.decode(p).rgb for p in accepted.values()]
    dets, emb = engine.predict(rgbs, conf=0.001, return_embeddings=True)
    assert len(dets) == len(rgbs) and np.isfinite(emb).all()


def test_infer_a_folder_of_every_edge_size(accepted: dict, exported: dict[str, Path], tmp_path: Path,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    folder = next(iter(accepted.values())).parent
    rc = detflow(["infer", str(folder), "--model", str(exported["onnx"]), "--out", str(tmp_path / "p"), "--quiet",
                  "--batch", "4"])
    _no_traceback(capfd)
    assert rc == 0
    ids = {d["image_id"] for d in json.loads((tmp_path / "p" / "predictions.json").read_text())}
    assert len(ids) <= len(list(folder.iterdir()))


def test_shift_runs_on_edge_images(accepted: dict, exported: dict[str, Path], tmp_path: Path,
                                   capfd: pytest.CaptureFixture[str]) -> None:
    folder = next(iter(accepted.values())).parent
    rc = detflow(["shift", str(folder), "--model", str(exported["onnx"]), "--out", str(tmp_path / "s"), "--quiet",
                  "--permutations", "50"])
    _no_traceback(capfd)
    assert rc == 0
    doc = json.loads((tmp_path / "s" / "shift.json").read_text())
    assert doc["n_target"] == len(list(folder.iterdir())) and np.isfinite(doc["statistic"])


def test_evaluate_scores_edge_images(edge_source: Path, exported: dict[str, Path], tmp_path: Path,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    """The ONNX model scores the edge dataset as an external set: every image scored, finite metrics."""
    rc = detflow(["evaluate", "--model", str(exported["onnx"]), "--data", str(edge_source), "--format", "coco",
                  "--name", "edges", "--reports", str(tmp_path / "r"), "--set", "evaluate.bootstrap=20", "--quiet"])
    _no_traceback(capfd)
    assert rc == 0
    m = json.loads((tmp_path / "r" / "external" / "edges" / "metrics.json").read_text())
    n = len(json.loads((edge_source / "coco.json").read_text())["images"])
    assert n == len(SIZES) + 8 and m["n_images"] == n and 0.0 <= m["map50"] <= 1.0


@pytest.mark.parametrize("method", ["object_scale", "pixel_size"])
def test_adapt_runs_on_edge_images(method: str, accepted: dict, exported: dict[str, Path], tmp_path: Path,
                                   capfd: pytest.CaptureFixture[str]) -> None:
    """adapt either adapts or says in one line why it cannot (too few confident detections on a 2-epoch model);
    it never crashes on an image's shape."""
    folder = next(iter(accepted.values())).parent
    extra = ["--pixel-size", "0.5"] if method == "pixel_size" else []
    rc = detflow(["adapt", str(folder), "--model", str(exported["onnx"]), "--out", str(tmp_path / "a"),
                  "--conf", "0.001", *extra])
    err = _no_traceback(capfd)
    if method == "pixel_size":
        assert rc == 0, err
        card = json.loads((tmp_path / "a" / "model_card.json").read_text())
        assert card["adaptation"]["method"] in ("pixel_size", "pixel_spacing")
    else:
        assert rc == 0 or (rc == 1 and err.strip().count("\n") == 0 and err.startswith("error:")), err


# ---------------------------------------------------------------------------------------------- the service


@pytest.fixture(params=[False, True], ids=["direct", "microbatch"])
def client(request: pytest.FixtureRequest, exported: dict[str, Path], engine: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from pipeline.serve import ServeSettings, create_app

    settings = ServeSettings(model_path=exported["onnx"], providers="CPUExecutionProvider", workers=2,
                             microbatch=request.param, max_batch_files=32, max_batch_bytes=256 * 1024 * 1024)
    with TestClient(create_app(settings, detector=engine), raise_server_exceptions=False) as c:
        for _ in range(300):
            if c.get("/health/ready").status_code == 200:
                break
            import time

            time.sleep(0.02)
        yield c


@pytest.mark.parametrize("size", SIZES, ids=[_name(s) for s in SIZES])
def test_service_detects_on_every_accepted_image(size: tuple[int, int], accepted: dict, client: Any) -> None:
    r = client.post("/v1/detect", files={"file": ("x.png", accepted[size].read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": size[0], "height": size[1]}


def test_service_batch_of_edges_and_one_bad_file(accepted: dict, client: Any) -> None:
    """Every edge image in one batch request, plus a corrupt one: 200, one entry per file, only the bad one an
    error."""
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in accepted.values()]
    bad = accepted[(1, 1)].read_bytes()[:40]  # a PNG cut short
    files.insert(3, ("files", ("bad.png", bad, "image/png")))
    r = client.post("/v1/detect/batch", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    statuses = [it["status"] for it in body["results"]]
    assert len(statuses) == len(files) and 400 <= statuses[3] < 500
    assert statuses[:3] + statuses[4:] == [200] * (len(files) - 1)
    assert body["n_failed"] == 1


def test_service_batch_where_the_model_call_fails_for_one_image(accepted: dict, exported: dict[str, Path],
                                                                engine: Any) -> None:
    """A model call that raises for one image (a detector that cannot take it) fails that entry only: the batch is
    retried image by image, so the others still get their detections."""
    from fastapi.testclient import TestClient

    from pipeline.serve import ServeSettings, create_app

    class Picky:
        """The real engine, except that it raises on 1-pixel-high images (as the letterbox once did)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

        def predict(self, images: list[np.ndarray], *a: Any, **k: Any) -> Any:
            if any(im.shape[0] == 1 for im in images):
                raise ValueError("cannot letterbox a 1-pixel-high image")
            return engine.predict(images, *a, **k)

    for microbatch in (False, True):
        settings = ServeSettings(model_path=exported["onnx"], providers="CPUExecutionProvider", workers=2,
                                 microbatch=microbatch, shift=False)
        with TestClient(create_app(settings, detector=Picky()), raise_server_exceptions=False) as c:
            for _ in range(300):
                if c.get("/health/ready").status_code == 200:
                    break
            files = [("files", (f"{i}.png", accepted[s].read_bytes(), "image/png"))
                     for i, s in enumerate([(63, 1), (1, 63), (1000, 1), (4999, 5)])]
            r = c.post("/v1/detect/batch", files=files)
            assert r.status_code == 200, r.text
            assert [it["status"] for it in r.json()["results"]] == [500, 200, 500, 200]
