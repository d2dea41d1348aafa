"""Shifted copies of a prepared dataset: magnification is a change of field of view with exact boxes, the stain
change is deterministic, and the copy is a complete, self-consistent prepared dataset."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.data.prepare import PreparedImage, _manifest, _write_dataset
from pipeline.data.sites import MIN_SIDE_PX, MIN_VISIBLE, Magnification, Stain, clip_boxes, write_shifted_copy
from pipeline.errors import ConfigError, DataError
from pipeline.fileio import sha256_tree

W, H = 160, 120
BG = (230, 200, 210)  # a pinkish slide background
CLASSES = ["RBC", "WBC"]
COLOURS = {0: (200, 40, 40), 1: (60, 40, 180)}


def _image(boxes: list[tuple[int, int, int, int, int]]) -> tuple[bytes, np.ndarray, np.ndarray]:
    rgb = np.empty((H, W, 3), dtype=np.uint8)
    rgb[:] = BG
    for c, x0, y0, x1, y1 in boxes:
        rgb[y0:y1, x0:x1] = COLOURS[c]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG" if len(boxes) == 1 else "PNG", quality=100)
    arr = np.array([b[1:] for b in boxes], dtype=np.float64).reshape(-1, 4)
    return buf.getvalue(), arr, np.array([b[0] for b in boxes], dtype=np.int64)


# (class, x0, y0, x1, y1): centred ones survive every change; border ones are cut or dropped at x1.6
LAYOUTS = {
    "a": [(0, 70, 50, 90, 70), (1, 2, 2, 14, 12), (0, 100, 40, 135, 80)],
    "b": [(1, 60, 40, 100, 80)],
    "c": [],
    "d": [(0, 74, 54, 84, 64), (0, 150, 100, 158, 118)],
}
SPLIT_OF = {"a": "train", "b": "train", "c": "val", "d": "test"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src") / "prepared"
    images = []
    for name, boxes in LAYOUTS.items():
        data, arr, cls = _image(boxes)
        suffix = ".jpg" if len(boxes) == 1 else ".png"
        images.append(PreparedImage(name, SPLIT_OF[name], f"p-{name}", data, suffix, W, H, arr, cls))
    manifest = _manifest(images)
    root.mkdir()
    _write_dataset(root, images, CLASSES, {"source": "synthetic", "classes": CLASSES,
                                           "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest()},
                   manifest)
    return root


def _labels(root: Path, split: str, stem: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [ln.split() for ln in (root / "labels" / split / f"{stem}.txt").read_text().splitlines()]
    if not rows:
        return np.zeros((0, 4)), np.zeros(0, dtype=int)
    a = np.array([[float(v) for v in r[1:]] for r in rows])
    xyxy = np.stack([(a[:, 0] - a[:, 2] / 2) * W, (a[:, 1] - a[:, 3] / 2) * H,
                     (a[:, 0] + a[:, 2] / 2) * W, (a[:, 1] + a[:, 3] / 2) * H], axis=1)
    return xyxy, np.array([int(r[0]) for r in rows])


def _pixels(root: Path, split: str, stem: str) -> np.ndarray:
    (path,) = (root / "images" / split).glob(f"{stem}.*")  # the source keeps its JPEG, the copies are PNG
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _check_consistent(root: Path) -> None:
    """manifest <-> files (sha256, sizes, box counts), labels <-> COCO, prepare_info <-> manifest."""
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["image"]).stem for r in rows) == sorted(LAYOUTS)
    info = json.loads((root / "prepare_info.json").read_text())
    assert info["manifest_sha256"] == hashlib.sha256((root / "manifest.csv").read_bytes()).hexdigest()
    assert yaml.safe_load((root / "dataset.yaml").read_text())["names"] == dict(enumerate(CLASSES))
    for r in rows:
        data = (root / r["image"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and r["image"].endswith(".png")
        im = Image.open(io.BytesIO(data))
        assert (im.width, im.height) == (int(r["width"]), int(r["height"])) == (W, H)
        boxes, cls = _labels(root, r["split"], Path(r["image"]).stem)
        assert len(boxes) == int(r["n_boxes"])
        coco = json.loads((root / "coco" / f"{r['split']}.json").read_text())
        entry = next(i for i in coco["images"] if i["file_name"] == r["image"])
        anns = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
        assert len(anns) == len(boxes)
        for a, b, c in zip(anns, boxes, cls, strict=True):
            x, y, w, h = a["bbox"]
            assert np.allclose([x, y, x + w, y + h], b, atol=2e-3) and a["category_id"] == c + 1


def _object_extent(px: np.ndarray, colour: tuple[int, int, int]) -> tuple[float, float, float, float]:
    """Bounding box (pixel edges) of the pixels at least half-way from the background to ``colour``."""
    bg, target = np.array(BG), np.array(colour)
    frac = ((px - bg) @ (target - bg)) / float((target - bg) @ (target - bg))
    ys, xs = np.nonzero(frac > 0.5)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("factor", [1.6, 0.6])
def test_magnification_moves_objects_and_boxes_together(prepared: Path, tmp_path: Path, factor: float) -> None:
    out = tmp_path / "shifted"
    summary = write_shifted_copy(prepared, out, Magnification(factor), seed=0)
    _check_consistent(out)
    assert summary.n_images == 4 and summary.boxes_in == 6
    assert summary.boxes_in == (summary.boxes_out + summary.dropped_outside + summary.dropped_small
                                + summary.dropped_truncated)
    # the lone WBC of image b: 40x40 px at the centre -> 40 * factor, still centred; pixels agree with the label
    boxes, _ = _labels(out, "train", "b")
    expect = np.array([(60 - 80) * factor + 80, (40 - 60) * factor + 60, (100 - 80) * factor + 80,
                       (80 - 60) * factor + 60])
    assert np.allclose(boxes[0], expect, atol=1e-3)
    assert np.allclose(_object_extent(_pixels(out, "train", "b"), COLOURS[1]), expect, atol=1.01)
    if factor > 1:
        # image a: the corner WBC (2..14 px) leaves the central 1/1.6 of the field; the right RBC is cut by the edge
        boxes, cls = _labels(out, "train", "a")
        assert list(cls) == [0, 0]
        assert boxes[1][2] == pytest.approx(W) and boxes[1][0] == pytest.approx((100 - 80) * 1.6 + 80, abs=1e-3)
        assert summary.dropped_outside == 2 and summary.boxes_clipped == 1  # corner WBC, d edge RBC; a cut RBC
    else:
        # shrunk into the middle of the frame, padded with the background colour: nothing is lost
        assert summary.boxes_out == 6 and summary.dropped_outside == summary.dropped_small == 0
        px = _pixels(out, "train", "a")
        assert np.abs(px[:5, :5] - np.array(BG)).max() <= 1, "pad is the background colour"
        boxes, cls = _labels(out, "train", "a")
        assert list(cls) == [0, 1, 0]
        assert np.allclose(boxes[1], [(2 - 80) * 0.6 + 80, (2 - 60) * 0.6 + 60, (14 - 80) * 0.6 + 80,
                                      (12 - 60) * 0.6 + 60], atol=1e-3)


def test_clip_boxes_counts() -> None:
    # outside; a 1.5 px sliver; 80 % inside (kept, clipped); inside; 25 % inside (truncated); exactly half inside
    boxes = np.array([[-10, -10, -1, -1], [-5, 10, 1.5, 30], [-5, 10, 20, 30], [10, 10, 20, 20.0],
                      [-15, 40, 5, 60], [90, 40, 110, 60]])
    kept, keep, counts = clip_boxes(boxes, 100, 100)
    assert list(keep) == [False, False, True, True, False, True]
    assert counts == {"boxes_clipped": 2, "dropped_outside": 1, "dropped_small": 1, "dropped_truncated": 1}
    assert kept[0].tolist() == [0, 10, 20, 30] and kept[2].tolist() == [90, 40, 100, 60]
    assert MIN_SIDE_PX == 2.0 and MIN_VISIBLE == 0.5
    _, keep_all, counts_all = clip_boxes(boxes, 100, 100, min_visible=0.0)
    assert list(keep_all) == [False, False, True, True, True, True] and counts_all["dropped_truncated"] == 0


def test_truncated_boxes_are_dropped_and_counted(prepared: Path, tmp_path: Path) -> None:
    # x2.5 keeps the central 64x48 px: image a's right RBC (100..135 -> 130..217 of 160) keeps 30/87 of its width
    strict = write_shifted_copy(prepared, tmp_path / "strict", Magnification(2.5), seed=0)
    loose = write_shifted_copy(prepared, tmp_path / "loose", Magnification(2.5), seed=0, min_visible=0.0)
    assert strict.dropped_truncated >= 1 and loose.dropped_truncated == 0
    assert loose.boxes_out == strict.boxes_out + strict.dropped_truncated
    info = json.loads((tmp_path / "strict" / "prepare_info.json").read_text())["shift"]
    assert info["min_visible"] == MIN_VISIBLE and info["dropped_truncated"] == strict.dropped_truncated
    with pytest.raises(ConfigError, match="min_visible"):
        write_shifted_copy(prepared, tmp_path / "bad", Magnification(2.5), min_visible=1.5)


def test_stain_is_deterministic_and_keeps_boxes(prepared: Path, tmp_path: Path) -> None:
    a = write_shifted_copy(prepared, tmp_path / "a", Stain(strength=0.3, gamma=1.2), seed=5)
    b = write_shifted_copy(prepared, tmp_path / "b", Stain(strength=0.3, gamma=1.2), seed=5)
    c = write_shifted_copy(prepared, tmp_path / "c", Stain(strength=0.3, gamma=1.2), seed=6)
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b") != sha256_tree(tmp_path / "c")
    _check_consistent(tmp_path / "a")
    assert a.boxes_out == a.boxes_in == 6 and a.transform == b.transform
    assert a.transform["hed_scale"] != c.transform["hed_scale"]
    assert json.loads((tmp_path / "a" / "prepare_info.json").read_text())["shift"]["kind"] == "stain"
    for split, stem in (("train", "a"), ("test", "d")):
        assert np.allclose(_labels(tmp_path / "a", split, stem)[0], _labels(prepared, split, stem)[0], atol=1e-3)
    src, new = _pixels(prepared, "train", "b"), _pixels(tmp_path / "a", "train", "b")
    assert np.abs(src - new).mean() > 5, "a visible colour change"
    # strength 0, brightness 1, gamma 1: the identity up to one grey level of rounding
    write_shifted_copy(prepared, tmp_path / "id", Stain(strength=0.0), seed=0)
    assert np.abs(_pixels(tmp_path / "id", "train", "b") - src).max() <= 1


def test_replaces_destination_and_reports_bad_input(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stray.txt").write_text("old")
    write_shifted_copy(prepared, out, Magnification(1.6))
    assert not (out / "stray.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(DataError, match="not a prepared dataset"):
        write_shifted_copy(tmp_path / "nothing", tmp_path / "x", Magnification(1.6))
    with pytest.raises(DataError, match="outside the source"):
        write_shifted_copy(prepared, prepared / "inner", Magnification(1.6))
    with pytest.raises(ConfigError, match="factor"):
        Magnification(0.0)
    with pytest.raises(ConfigError, match="strength"):
        Stain(strength=1.5)


def test_magnified_copy_states_its_new_pixel_spacing(prepared: Path, tmp_path: Path) -> None:
    """x1.6 objects = each pixel covers 1/1.6 of the field: the copy must not claim the source's spacing."""
    src = tmp_path / "with_spacing"
    import shutil

    shutil.copytree(prepared, src)
    info = json.loads((src / "prepare_info.json").read_text())
    info["pixel_spacing"] = {"unit": "mm", "source": "PixelSpacing", "median": 0.8, "min": 0.8, "max": 0.8}
    (src / "prepare_info.json").write_text(json.dumps(info))
    write_shifted_copy(src, tmp_path / "zoom", Magnification(1.6))
    write_shifted_copy(src, tmp_path / "stain", Stain())
    zoomed = json.loads((tmp_path / "zoom" / "prepare_info.json").read_text())["pixel_spacing"]
    stained = json.loads((tmp_path / "stain" / "prepare_info.json").read_text())["pixel_spacing"]
    assert zoomed == {"unit": "mm", "source": "PixelSpacing", "median": 0.5, "min": 0.5, "max": 0.5}
    assert stained == info["pixel_spacing"]


def test_shifted_copy_carries_each_images_pixel_spacing(tmp_path: Path) -> None:
    """A DICOM-derived image keeps its spacing (in its COCO entry); magnified x2 each pixel covers half as much."""
    data, arr, cls = _image(LAYOUTS["b"])
    root = tmp_path / "src"
    root.mkdir()
    images = [PreparedImage("b", "test", "p-b", data, ".jpg", W, H, arr, cls, pixel_spacing=0.7),
              PreparedImage("d", "test", "p-d", _image(LAYOUTS["d"])[0], ".png", W, H, *_image(LAYOUTS["d"])[1:])]
    manifest = _manifest(images)
    _write_dataset(root, images, CLASSES, {"source": "synthetic", "classes": CLASSES,
                                           "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest()},
                   manifest)
    for transform, expected in ((Magnification(2.0), 0.35), (Stain(), 0.7)):
        out = tmp_path / type(transform).__name__
        write_shifted_copy(root, out, transform, seed=0)
        entries = {i["file_name"]: i for i in json.loads((out / "coco" / "test.json").read_text())["images"]}
        assert entries["images/test/b.png"]["pixel_spacing"] == pytest.approx(expected)
        assert "pixel_spacing" not in entries["images/test/d.png"]


def test_labelled_visibility_reads_the_sources_convention_for_cut_objects(tmp_path: Path) -> None:
    from pipeline.data.sites import labelled_visibility

    (tmp_path / "coco").mkdir()
    images = [{"id": 1, "width": 100, "height": 100}]
    # 40 boxes cut by the left edge, 20 px tall, showing 12..20 px (60 %..100 %); interior and corner boxes ignored
    anns = [{"image_id": 1, "bbox": [0, 10, 12 + k * 0.2, 20]} for k in range(40)]
    anns += [{"image_id": 1, "bbox": [40, 40, 5, 20]}, {"image_id": 1, "bbox": [0, 0, 2, 20]}]
    (tmp_path / "coco" / "train.json").write_text(json.dumps({"images": images, "annotations": anns}))
    assert labelled_visibility(tmp_path) == pytest.approx(np.quantile([(12 + k * 0.2) / 20 for k in range(40)], 0.05),
                                                          abs=1e-3)
    assert labelled_visibility(tmp_path, min_boxes=41) is None
    with pytest.raises(DataError, match="cannot read"):
        labelled_visibility(tmp_path / "nowhere")
