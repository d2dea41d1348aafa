"""The data stage's invariants, each proven on generated variants (values x containers x formats), not on the one
case that found it (issue 20). Every fixture is generated here.

Classes: identity by value (identifiers, pixels), class maps, orientation per container, numbers at their extremes,
one bad entry in a folder, names the training tool hides, reading outside the dataset root.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import struct
import threading
import typing
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_hostile_data import _image, _manifest, _pixels, _voc_xml

from pipeline.config import load_params
from pipeline.data.prepare import prepare_dataset
from pipeline.errors import ConfigError, DataError


def _run(tmp: Path, source: Path, *extra: str, classes: str | None = "[cell]") -> dict:
    sets = [f"data.source={source}", "prepare.max_bad_fraction=1.0", "prepare.split=patient", *extra]
    if classes is not None:
        sets.append(f"data.classes={classes}")
    params = load_params(None, sets)
    return prepare_dataset(params, tmp / "prepared", tmp / "report.json", progress=False).report


def _strict_json(path: Path) -> object:
    """A JSON file as written: NaN / Infinity (what json.dumps writes for non-finite floats) are errors."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _labels(tmp: Path) -> dict[str, list[tuple[str, list[float]]]]:
    """image stem -> [(class name, normalised cx cy w h)] of the prepared dataset."""
    prepared = tmp / "prepared"
    import yaml

    names = yaml.safe_load((prepared / "dataset.yaml").read_text())["names"]
    out: dict[str, list] = {}
    for row in _manifest(tmp):
        label = (prepared / row["image"].replace("images", "labels", 1)).with_suffix(".txt")
        out[Path(row["image"]).stem] = [(names[int(line.split()[0])], [float(v) for v in line.split()[1:]])
                                        for line in label.read_text().splitlines()]
    return out


def _coco(root: Path, images: list[dict], anns: list[dict], cats: list[dict] | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                "categories": cats or [{"id": 1, "name": "cell"}]}))


# ================================================================================ 1. identifiers compared by value

# (values one patient's images carry, whether it is a usable identifier). Equal values of the declared type (a
# trimmed string; integral numbers by their integer value) are one patient, whatever JSON type each image used.
PATIENT_VALUES = [
    ([0, 0, 0, 0], True), (["0", "0", "0", "0"], True), ([0, "0", 0.0, " 0 "], True), ([0.0, 0.0, 0.0, 0.0], True),
    ([-1, -1, "-1", -1.0], True), ([7, "7", "7 ", 7.0], True), ([10**20, 10**20, 1e20, "100000000000000000000"], True),
    (["00", "00", "00", "00"], True), (["P-3", "P-3", " P-3", "P-3"], True), ([2**63, 2**63, 2**63, 2**63], True),
]
NOT_IDENTIFIERS = [True, False, "", "   ", [], {}, [1], {"id": 1}]


@pytest.mark.parametrize("field", ["patient_id", "patient"])
@pytest.mark.parametrize("values,usable", PATIENT_VALUES, ids=[str(v[0]) for v in PATIENT_VALUES])
def test_patient_identifiers_compare_by_value(tmp_path: Path, field: str, values: list, usable: bool) -> None:
    """Four images of one patient (its id written four ways) and twelve single-image patients: the four always
    land in one split, and the patient is counted once."""
    root = tmp_path / "coco"
    images, anns = [], []
    for i in range(16):
        _image(root / "images" / f"im{i}.png", seed=i, size=(16, 12))
        pid = values[i] if i < 4 else f"other{i}"
        images.append({"id": i + 1, "file_name": f"im{i}.png", field: pid})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 5, 5]})
    _coco(root, images, anns)
    for seed in range(3):
        report = _run(tmp_path / str(seed), root, f"prepare.seed={seed}", "prepare.val_fraction=0.3",
                      "prepare.test_fraction=0.3")
        rows = {Path(r["image"]).stem: r for r in _manifest(tmp_path / str(seed))}
        assert len({rows[f"im{i}"]["split"] for i in range(4)}) == 1, (values, seed)
        assert len({rows[f"im{i}"]["patient"] for i in range(4)}) == 1
        assert sum(s["patients"] for s in report["splits"].values()) == 13


@pytest.mark.parametrize("value", NOT_IDENTIFIERS, ids=[json.dumps(v) for v in NOT_IDENTIFIERS])
def test_values_that_are_not_identifiers_are_recorded(tmp_path: Path, value: object) -> None:
    """A patient field that is not an identifier (a boolean, a blank, a list) is recorded, and the image is its own
    patient: never merged with another image that has the same non-value."""
    root = tmp_path / "coco"
    images = []
    for i in range(3):
        _image(root / "images" / f"im{i}.png", seed=i, size=(16, 12))
        images.append({"id": i + 1, "file_name": f"im{i}.png", "patient_id": value})
    _coco(root, images, [])
    report = _run(tmp_path, root)
    assert len({r["patient"] for r in _manifest(tmp_path)}) == 3
    if value not in ("", "   "):  # blank means "not stated", which needs no record
        recorded = [p for p in report["problems"] if p["kind"] == "malformed_annotation" and "patient" in p["detail"]]
        assert len(recorded) == 3, report["problems"]


# image id as the image states it, as the annotation refers to it
ID_FORMS = [(1, 1), (1, "1"), (1, 1.0), ("1", 1), (0, 0), (0, "0"), (0, 0.0), ("a", "a"), (" 5", 5), (10**30, 10**30)]
CAT_FORMS = [(1, 1), (1, "1"), (0, 0), ("2", 2.0)]


@pytest.mark.parametrize("image_id,ref", ID_FORMS, ids=[f"{a!r}-{b!r}" for a, b in ID_FORMS])
@pytest.mark.parametrize("cat_id,cat_ref", CAT_FORMS, ids=[f"{a!r}-{b!r}" for a, b in CAT_FORMS])
def test_coco_ids_compare_by_value(tmp_path: Path, image_id: object, ref: object, cat_id: object,
                                   cat_ref: object) -> None:
    """An annotation finds its image and its category whatever JSON type each side wrote the id in."""
    root = tmp_path / "coco"
    _image(root / "images" / "a.png", seed=1, size=(16, 12))
    _coco(root, [{"id": image_id, "file_name": "a.png"}],
          [{"id": 1, "image_id": ref, "category_id": cat_ref, "bbox": [2, 2, 5, 5]}], [{"id": cat_id, "name": "cell"}])
    report = _run(tmp_path, root)
    assert report["summary"]["boxes_out"] == 1, report["problems"]


# ================================================================================ 2. identity of an image = its pixels


def _same_pixels_as(path: Path, rgb: np.ndarray, how: str) -> Path:
    """``rgb`` saved losslessly in another container or encoding (``how``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(rgb)
    if how.startswith("png-level"):
        im.save(path.with_suffix(".png"), compress_level=int(how[-1]))
        return path.with_suffix(".png")
    if how == "png-text":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Software", "another tool")
        im.save(path.with_suffix(".png"), pnginfo=info)
        return path.with_suffix(".png")
    if how == "png-optimize":
        im.save(path.with_suffix(".png"), optimize=True)
        return path.with_suffix(".png")
    if how == "png-rgba":
        im.convert("RGBA").save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    if how == "bmp":
        im.save(path.with_suffix(".bmp"))
        return path.with_suffix(".bmp")
    if how == "tiff":
        im.save(path.with_suffix(".tif"))
        return path.with_suffix(".tif")
    if how == "tiff-lzw":
        im.save(path.with_suffix(".tif"), compression="tiff_lzw")
        return path.with_suffix(".tif")
    if how == "webp-lossless":
        im.save(path.with_suffix(".webp"), lossless=True)
        return path.with_suffix(".webp")
    if how == "png-exif-rotated":  # stored turned, with the EXIF tag that turns it back: the same upright pixels
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=1))).save(path.with_suffix(".png"), exif=exif.tobytes())
        return path.with_suffix(".png")
    raise ValueError(how)


COPIES = ["png-level0", "png-level9", "png-text", "png-optimize", "png-rgba", "bmp", "tiff", "tiff-lzw",
          "webp-lossless", "png-exif-rotated"]


@pytest.mark.parametrize("container", ["coco", "voc", "yolo"])
@pytest.mark.parametrize("how", COPIES)
def test_same_pixels_are_the_same_image(tmp_path: Path, container: str, how: str) -> None:
    """An image and a lossless re-save of its pixels under another patient (another compression, container,
    metadata, alpha, EXIF turn) are one image: in one split, their patients merged, recorded."""
    root = tmp_path / container
    base = _pixels(5, (24, 16))
    others = [(f"o{i}", _pixels(100 + i, (24, 16))) for i in range(10)]
    files: list[tuple[str, Path, str]] = []  # stem, path, patient
    img_dir = {"coco": root / "images", "voc": root / "JPEGImages", "yolo": root / "images"}[container]
    first = img_dir / "orig.png"
    first.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(base).save(first, compress_level=6)
    files.append(("orig", first, "PA"))
    files.append(("copy", _same_pixels_as(img_dir / "copy", base, how), "PB"))
    for stem, rgb in others:
        Image.fromarray(rgb).save(img_dir / f"{stem}.png")
        files.append((stem, img_dir / f"{stem}.png", f"P{stem}"))
    if container == "coco":
        _coco(root, [{"id": i + 1, "file_name": p.name, "patient_id": pid} for i, (_, p, pid) in enumerate(files)],
              [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 6, 6]} for i in range(len(files))])
    elif container == "voc":
        for stem, p, _ in files:
            _voc_xml(root / "Annotations" / f"{stem}.xml", p.name, [(2, 2, 8, 8)], size=None)
    else:
        (root / "data.yaml").write_text("names: [cell]\n")
        (root / "labels").mkdir()
        for stem, _, _ in files:
            (root / "labels" / f"{stem}.txt").write_text("0 0.2 0.3 0.25 0.375\n")
    for seed in range(3):
        report = _run(tmp_path / str(seed), root, f"prepare.seed={seed}", "prepare.val_fraction=0.3",
                      "prepare.test_fraction=0.3")
        rows = {Path(r["image"]).stem: r for r in _manifest(tmp_path / str(seed))}
        assert rows["orig"]["split"] == rows["copy"]["split"], (how, seed)
        assert [p for p in report["problems"] if p["kind"] == "duplicate_content"], report["problems"]


# ================================================================================ 3. class maps


def _yolo_names(style: str, names: list[str]) -> str:
    """data.yaml (or classes.txt) text naming ``names`` by index, in one of the ways the format allows."""
    q = [json.dumps(n) if style.endswith("quoted") else n for n in names]
    if style.startswith("list-block"):
        return "names:\n" + "".join(f"  - {n}\n" for n in q)
    if style.startswith("list-flow"):
        return f"names: [{', '.join(q)}]\n"
    if style.startswith("dict-int"):
        return "names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(q))
    if style.startswith("dict-str"):
        return "names:\n" + "".join(f"  '{i}': {n}\n" for i, n in enumerate(q))
    if style.startswith("dict-shuffled"):
        order = np.random.default_rng(len(names)).permutation(len(names))
        return f"nc: {len(names)}\nnames:\n" + "".join(f"  {i}: {q[i]}\n" for i in order)
    if style == "classes.txt":
        return "\n".join(names) + "\n"
    raise ValueError(style)


PLAIN = [f"c{i}" for i in range(21)]
TRICKY = ["yes", "no", "on", "off", "null", "1", "1.0", "0x1", "true", "~", "1e3", "NaN"]  # YAML would retype these
CLASS_CASES = [(style, n, "plain") for style, n in itertools.product(
    ["list-block", "list-flow", "dict-int", "dict-str", "dict-shuffled", "classes.txt"], [1, 3, 11, 12, 21])]
CLASS_CASES += [(style, 12, "tricky") for style in ["list-block-quoted", "list-flow-quoted", "dict-int-quoted",
                                                   "dict-int", "list-block", "classes.txt"]]


@pytest.mark.parametrize("style,n,kind", CLASS_CASES, ids=[f"{s}-{n}-{k}" for s, n, k in CLASS_CASES])
def test_yolo_class_ids_keep_their_names(tmp_path: Path, style: str, n: int, kind: str) -> None:
    """Image k carries one box of class id k: after prepare it is the class the dataset names k, spelled exactly
    as written (``yes`` stays ``yes``, not ``True``), whichever way data.yaml or classes.txt names the classes."""
    names = (PLAIN if kind == "plain" else TRICKY)[:n]
    root = tmp_path / "yolo"
    (root / "labels").mkdir(parents=True)
    (root / ("classes.txt" if style == "classes.txt" else "data.yaml")).write_text(_yolo_names(style, names))
    for k in range(n):
        _image(root / "images" / f"k{k}.png", seed=k, size=(16, 12))
        (root / "labels" / f"k{k}.txt").write_text(f"{k} 0.5 0.5 0.25 0.25\n")
    _run(tmp_path, root, classes=None)
    got = _labels(tmp_path)
    assert {stem: [c for c, _ in boxes] for stem, boxes in got.items()} == {f"k{k}": [names[k]] for k in range(n)}


@pytest.mark.parametrize("label_id", ["1", "1.0", "01", "+1", " 1"])
def test_yolo_label_class_field_is_read_by_value(tmp_path: Path, label_id: str) -> None:
    """The class field of a label line is an integer however it is spelled (Ultralytics reads it as a float)."""
    root = tmp_path / "yolo"
    (root / "labels").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [a, b]\n")
    _image(root / "images" / "x.png", seed=1, size=(16, 12))
    (root / "labels" / "x.txt").write_text(f"{label_id} 0.5 0.5 0.25 0.25\n")
    _run(tmp_path, root, classes=None)
    assert [c for c, _ in _labels(tmp_path)["x"]] == ["b"]


@pytest.mark.parametrize("label_id", ["1.5", "-1", "2", "nan", "1e400"])
def test_yolo_label_class_that_names_no_class_is_dropped(tmp_path: Path, label_id: str) -> None:
    root = tmp_path / "yolo"
    (root / "labels").mkdir(parents=True)
    (root / "data.yaml").write_text("names: {0: a, 1: b}\n")
    _image(root / "images" / "x.png", seed=1, size=(16, 12))
    (root / "labels" / "x.txt").write_text(f"{label_id} 0.5 0.5 0.25 0.25\n")
    report = _run(tmp_path, root, classes=None)
    assert report["summary"]["boxes_out"] == 0 and report["totals"]["boxes"]["dropped"] == 1


def test_yolo_names_with_a_gap_keep_each_id_its_name(tmp_path: Path) -> None:
    """``names: {0: a, 2: c}``: a box of id 2 is ``c`` (not the second name), a box of id 1 names no class."""
    root = tmp_path / "yolo"
    (root / "labels").mkdir(parents=True)
    (root / "data.yaml").write_text("names:\n  2: c\n  0: a\n")
    for k in range(3):
        _image(root / "images" / f"k{k}.png", seed=k, size=(16, 12))
        (root / "labels" / f"k{k}.txt").write_text(f"{k} 0.5 0.5 0.25 0.25\n")
    report = _run(tmp_path, root, classes=None)
    got = {stem: [c for c, _ in boxes] for stem, boxes in _labels(tmp_path).items()}
    assert got == {"k0": ["a"], "k1": [], "k2": ["c"]}
    assert [p["kind"] for p in report["problems"]] == ["unknown_class"]


@pytest.mark.parametrize("ids", [[1, 2, 10, 11], ["1", "2", "10", "11"], [10, 2, 11, 1], [0, 1, 2, 3]])
def test_coco_category_order_is_numeric(tmp_path: Path, ids: list) -> None:
    """COCO categories are ordered by id as numbers (pycocotools' order), however the ids are typed."""
    root = tmp_path / "coco"
    names = {str(i): f"n{int(i)}" for i in ids}
    images, anns = [], []
    for k, cid in enumerate(ids):
        _image(root / "images" / f"k{k}.png", seed=k, size=(16, 12))
        images.append({"id": k + 1, "file_name": f"k{k}.png"})
        anns.append({"id": k + 1, "image_id": k + 1, "category_id": cid, "bbox": [2, 2, 5, 5]})
    _coco(root, images, anns, [{"id": cid, "name": names[str(cid)]} for cid in ids])
    report = _run(tmp_path, root, classes=None)
    assert report["classes"] == [names[str(i)] for i in sorted(ids, key=int)]
    got = {stem: [c for c, _ in boxes] for stem, boxes in _labels(tmp_path).items()}
    assert got == {f"k{k}": [names[str(cid)]] for k, cid in enumerate(ids)}


# ================================================================================ 4. orientation, per container


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_with_exif(rgb: np.ndarray, exif: bytes, where: str) -> bytes:
    """A PNG whose EXIF block sits where some writers put it: an eXIf chunk before or after the image data, or the
    ImageMagick "Raw profile type exif" text chunk."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    png = buf.getvalue()
    iend = png.rindex(b"IEND") - 4
    idat = png.index(b"IDAT") - 4
    if where == "before":
        chunk = _chunk(b"eXIf", exif)
        return png[:idat] + chunk + png[idat:]
    if where == "after":
        return png[:iend] + _chunk(b"eXIf", exif) + png[iend:]
    if where == "raw-profile":
        payload = b"Exif\x00\x00" + exif
        hexed = payload.hex().encode()
        text = b"\nexif\n" + str(len(payload)).rjust(8).encode() + b"\n" + b"\n".join(
            hexed[i:i + 72] for i in range(0, len(hexed), 72)) + b"\n"
        return png[:idat] + _chunk(b"zTXt", b"Raw profile type exif\x00\x00" + zlib.compress(text)) + png[idat:]
    raise ValueError(where)


def _xmp(orientation: int) -> str:
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
            '</rdf:RDF></x:xmpmeta>')


def _oriented(container: str, stored: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = exif.tobytes()  # starts with "Exif\0\0"
    if container == "jpeg-xmp":  # the orientation only in XMP (some editors write no EXIF at all)
        buf = io.BytesIO()
        Image.fromarray(stored).save(buf, format="JPEG", quality=100, xmp=_xmp(orientation).encode())
        return buf.getvalue()
    if container == "png-xmp":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_itxt("XML:com.adobe.xmp", _xmp(orientation))
        buf = io.BytesIO()
        Image.fromarray(stored).save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()
    if container.startswith("png-"):
        return _png_with_exif(stored, raw[6:] if raw.startswith(b"Exif") else raw, container[4:])
    buf = io.BytesIO()
    fmt = {"jpeg": "JPEG", "tiff": "TIFF", "webp": "WEBP"}[container]
    kw: dict = {"quality": 100} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(stored).save(buf, format=fmt, exif=raw, **kw)
    return buf.getvalue()


ORIENT_CONTAINERS = ["jpeg", "png-before", "png-after", "png-raw-profile", "tiff", "webp", "jpeg-xmp", "png-xmp"]


def _block_image() -> np.ndarray:
    arr = np.zeros((40, 90, 3), np.uint8)  # stored 90 wide, 40 high; one bright block off-centre
    arr[5:15, 20:50] = 255
    return arr


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("container", ORIENT_CONTAINERS)
def test_every_container_is_upright_once(container: str, orientation: int) -> None:
    """The one decoder gives the pixels Pillow's own ``exif_transpose`` shows, on the inference path (OpenCV fast
    path) and on the data stage's path, for every container an EXIF orientation can live in."""
    from pipeline.data.imaging import decode_bytes

    data = _oriented(container, _block_image(), orientation)
    with Image.open(io.BytesIO(data)) as im:
        expect = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert expect.shape[:2] == ((90, 40) if orientation >= 5 else (40, 90))  # the reference did turn it
    for keep in (False, True):
        got = decode_bytes(data, keep_encoded=keep).rgb
        assert got.shape == expect.shape, (container, orientation, keep)
        assert np.abs(got.astype(int) - expect).mean() < 2.0


@pytest.mark.parametrize("container", ORIENT_CONTAINERS)
def test_prepare_turns_every_container_once(tmp_path: Path, container: str) -> None:
    """Through prepare (VOC, box drawn on the stored pixels): stored upright, tag gone, the label on the block."""
    root = tmp_path / "voc"
    suffix = {"jpeg": ".jpg", "jpeg-xmp": ".jpg", "tiff": ".tif", "webp": ".webp"}.get(container, ".png")
    (root / "JPEGImages").mkdir(parents=True)
    (root / "JPEGImages" / f"r{suffix}").write_bytes(_oriented(container, _block_image(), 6))
    _voc_xml(root / "Annotations" / "r.xml", f"r{suffix}", [(20, 5, 50, 15)], size=(90, 40))
    _run(tmp_path, root)
    (row,) = _manifest(tmp_path)
    assert (row["width"], row["height"]) == ("40", "90")
    arr = np.asarray(Image.open(tmp_path / "prepared" / row["image"]).convert("RGB"))
    ys, xs = np.nonzero(arr[:, :, 0] > 128)
    ((_, (cx, cy, w, h)),) = _labels(tmp_path)["r"]
    box = [(cx - w / 2) * 40, (cy - h / 2) * 90, (cx + w / 2) * 40, (cy + h / 2) * 90]
    assert np.allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.0)


# ================================================================================ 5. numbers at their extremes

HUGE_INT = "9" * 5000
EXTREMES = [HUGE_INT, "-" + HUGE_INT, "1e308", "-1e308", "1e400", "NaN", "Infinity", "-Infinity", "1e-320",
            "18446744073709551616", "0.5e-300"]


def _assert_finite_outputs(tmp: Path) -> None:
    """Everything the stage wrote is finite: JSON without NaN/Infinity, labels in [0, 1], spacings positive."""
    for path in [tmp / "report.json", *(tmp / "prepared").rglob("*.json")] if (tmp / "prepared").exists() \
            else [tmp / "report.json"]:
        doc = _strict_json(path)
        for img in (doc.get("images") or []) if isinstance(doc, dict) else []:
            if "pixel_spacing" in img:
                assert math.isfinite(img["pixel_spacing"]) and 1e-6 <= img["pixel_spacing"] <= 1e6, img
    for label in (tmp / "prepared").rglob("*.txt") if (tmp / "prepared").exists() else []:
        for line in label.read_text().splitlines():
            values = [float(v) for v in line.split()[1:]]
            assert all(math.isfinite(v) and 0 <= v <= 1 for v in values), (label, line)


def _prepare_or_clear_error(tmp: Path, root: Path, *extra: str, classes: str = "[cell]") -> dict | None:
    """The stage either runs or stops with one DataError line; nothing else may escape."""
    try:
        return _run(tmp, root, *extra, classes=classes)
    except DataError as e:
        assert "\n" not in str(e)
        return None


@pytest.mark.parametrize("value", EXTREMES)
@pytest.mark.parametrize("where", ["bbox_x", "bbox_w", "width", "image_id", "category_id", "patient_id"])
def test_coco_extreme_numbers(tmp_path: Path, where: str, value: str) -> None:
    root = tmp_path / "coco"
    _image(root / "images" / "a.png", seed=1, size=(16, 12))
    _image(root / "images" / "b.png", seed=2, size=(16, 12))
    slot = "__X__"
    img = {"id": 1, "file_name": "a.png", "width": 16, "height": 12}
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5]}
    if where == "bbox_x":
        ann["bbox"][0] = slot
    elif where == "bbox_w":
        ann["bbox"][2] = slot
    elif where in ("width", "patient_id"):
        img[where] = slot
    elif where == "image_id":
        img["id"] = ann["image_id"] = slot
    else:
        ann["category_id"] = slot
    doc = {"images": [img, {"id": 2, "file_name": "b.png"}],
           "annotations": [ann, {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 5, 5]}],
           "categories": [{"id": 1, "name": "cell"}]}
    (root / "coco.json").write_text(json.dumps(doc).replace(json.dumps(slot), value))
    report = _prepare_or_clear_error(tmp_path, root)
    assert report is not None and report["summary"]["images_out"] >= 1  # one bad number never stops the run
    _assert_finite_outputs(tmp_path)
    assert report["totals"]["reconciled"]


@pytest.mark.parametrize("value", ["1" * 5000, "1e308", "-1e308", "nan", "inf", "1e400", "0x10", "1e-320"])
@pytest.mark.parametrize("fmt", ["voc", "yolo", "csv"])
def test_text_formats_extreme_numbers(tmp_path: Path, small_phantom: Path, fmt: str, value: str) -> None:
    root = tmp_path / fmt
    if fmt == "voc":
        _image(root / "JPEGImages" / "a.png", seed=1, size=(16, 12))
        _voc_xml(root / "Annotations" / "a.xml", "a.png", [(2, 2, value, 8), (1, 1, 9, 9)], size=(value, 12))
    elif fmt == "yolo":
        (root / "labels").mkdir(parents=True)
        (root / "data.yaml").write_text("names: [cell]\n")
        _image(root / "images" / "a.png", seed=1, size=(16, 12))
        (root / "labels" / "a.txt").write_text(f"0 0.5 {value} 0.2 0.2\n{value} 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n")
    else:
        import shutil

        shutil.copytree(small_phantom, root)
        text = (root / "boxes.csv").read_text()
        first = text.splitlines()[1].split(",")
        (root / "boxes.csv").write_text(text + ",".join([*first[:2], value, *first[3:]]) + "\n")
    report = _prepare_or_clear_error(tmp_path, root, classes="[nodule]" if fmt == "csv" else "[cell]")
    assert report is not None and report["summary"]["boxes_out"] >= 1
    _assert_finite_outputs(tmp_path)
    assert report["totals"]["reconciled"]


DICOM_EXTREMES = [("PixelSpacing", ["1e200", "1e200"]), ("PixelSpacing", ["1e-200", "1e-200"]),
                  ("PixelSpacing", ["0", "0"]), ("PixelSpacing", ["-1", "-1"]), ("PixelSpacing", ["1e200", "1e-200"]),
                  ("PixelSpacing", ["nan", "nan"]), ("PixelSpacing", ["inf", "1"]),
                  ("WindowWidth", "1e308"), ("WindowWidth", "1e-308"), ("WindowWidth", "inf"),
                  ("WindowCenter", "1e308"), ("WindowCenter", "nan"),
                  ("RescaleSlope", "1e308"), ("RescaleSlope", "nan"), ("RescaleIntercept", "-1e308")]


@pytest.mark.parametrize("tag,value", DICOM_EXTREMES, ids=[f"{t}={v}" for t, v in DICOM_EXTREMES])
def test_dicom_extreme_numbers(tmp_path: Path, small_phantom: Path, tag: str, value: object) -> None:
    """A DICOM header number at its extreme never becomes Infinity, 0 or NaN in the dataset: the value is checked
    after the arithmetic it feeds (spacing = sqrt(row x col), window, rescale) and refused or ignored, recorded."""
    import shutil

    import pydicom

    root = tmp_path / "dicom"
    shutil.copytree(small_phantom, root)
    victim = sorted(root.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(victim)
    with pydicom.config.disable_value_validation():
        setattr(ds, tag, value)
        ds.save_as(victim)
    report = _prepare_or_clear_error(tmp_path, root, classes="[nodule]")
    assert report is not None and report["summary"]["images_out"] >= 23
    _assert_finite_outputs(tmp_path)
    info = _strict_json(tmp_path / "prepared" / "prepare_info.json")
    spacing = info["pixel_spacing"]
    assert spacing is None or all(1e-6 <= spacing[k] <= 1e6 for k in ("median", "min", "max"))
    assert report["totals"]["reconciled"]


NON_FINITE = ["nan", "inf", "-inf", "1e400", ".nan", ".inf"]


def _float_fields() -> list[str]:
    """Every float-typed params key (dotted), walked from the schema itself."""
    from pydantic import BaseModel

    from pipeline.config import Params

    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if typing.get_origin(ann) in (list, dict):
                continue
            sub = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            elif sub:
                walk(sub[0], f"{prefix}{name}.")
            elif ann is float or float in getattr(ann, "__args__", ()):
                out.append(prefix + name)

    walk(Params, "")
    return out


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("key", [*_float_fields(), "data.window"])
def test_params_refuse_non_finite_numbers(key: str, value: str) -> None:
    """Every float in params (and the DICOM window) is finite, checked when the params load: never all the work
    first and a misleading error (or NaN arithmetic) after."""
    setting = f"{key}=[{value}, 400]" if key == "data.window" else f"{key}={value}"
    with pytest.raises(ConfigError):
        load_params(None, [setting])
    if key == "data.window":
        with pytest.raises(ConfigError):
            load_params(None, [f"{key}=[40, {value}]"])


def _serve_float_fields() -> list[str]:
    from pipeline.serve.settings import ServeSettings

    return [n for n, f in ServeSettings.model_fields.items() if f.annotation in (float, float | None)]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("field", _serve_float_fields())
def test_serve_settings_refuse_non_finite_numbers(field: str, value: str) -> None:
    from pipeline.serve.settings import ServeSettings

    with pytest.raises(ConfigError):
        ServeSettings.from_env({f"DETFLOW_SERVE_{field.upper()}": value})


# ================================================================================ 8. one bad entry in a folder


_UNBLOCK_STOP = threading.Event()


def _keep_unblocked(fifo: Path) -> None:
    """A reader that opens the FIFO must not hang the suite: a writer opens and closes it every 0.1 s (the reader
    then sees an empty file) until the test ends."""
    def loop() -> None:
        while not _UNBLOCK_STOP.wait(0.1):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader right now, or the FIFO is gone

    threading.Thread(target=loop, daemon=True).start()


@pytest.fixture(autouse=True)
def _stop_unblockers() -> Iterator[None]:
    _UNBLOCK_STOP.clear()
    yield
    _UNBLOCK_STOP.set()


def _bad_entry(folder: Path, entry: str, name: str) -> Path:
    """Put one unreadable entry called ``name`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if entry == "dir":
        path.mkdir()
        (path / "inner.txt").write_text("x")
    elif entry == "broken-link":
        path.symlink_to(folder / "does-not-exist")
    elif entry == "loop-link":
        path.symlink_to(path)
    elif entry == "fifo":
        os.mkfifo(path)
        _keep_unblocked(path)
    elif entry == "empty":
        path.write_bytes(b"")
    elif entry == "bad-name":  # a name that is not valid UTF-8 (a Latin-1 file system's é)
        path = Path(os.fsdecode(bytes(folder) + b"/" + name.encode().replace(b"X", b"\xe9")))
        path.write_bytes(Path(__file__).read_bytes()[:10])
    else:
        raise ValueError(entry)
    return path


BAD_ENTRIES = ["dir", "broken-link", "loop-link", "fifo", "empty", "bad-name"]
# (format, folder inside the dataset, name of the bad entry): where each format reads annotations and images
BAD_PLACES = [("voc", "Annotations", "bad.xml"), ("voc", "JPEGImages", "badX.jpg"), ("yolo", "labels", "g0.txt"),
              ("yolo", "images", "badX.png"), ("coco", "images", "badX.png"), ("coco", ".", "extra.json"),
              ("csv", "dicom", "badX.dcm"), ("csv", ".", "more.csv")]


def _good_dataset(root: Path, fmt: str, phantom: Path) -> None:
    if fmt == "voc":
        for i in range(3):
            _image(root / "JPEGImages" / f"g{i}.jpg", seed=i, size=(16, 12))
            _voc_xml(root / "Annotations" / f"g{i}.xml", f"g{i}.jpg", [(2, 2, 8, 8)], size=None)
    elif fmt == "yolo":
        (root / "labels").mkdir(parents=True)
        (root / "data.yaml").write_text("names: [cell]\n")
        for i in range(3):
            _image(root / "images" / f"g{i}.png", seed=i, size=(16, 12))
            if i:
                (root / "labels" / f"g{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    elif fmt == "coco":
        for i in range(3):
            _image(root / "images" / f"g{i}.png", seed=i, size=(16, 12))
        _coco(root, [{"id": i, "file_name": f"g{i}.png"} for i in range(3)],
              [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 5, 5]} for i in range(3)])
    else:
        import shutil

        shutil.copytree(phantom, root)


BAD_CASES = [(f, w, n, e) for (f, w, n), e in itertools.product(BAD_PLACES, BAD_ENTRIES)
             if not (e == "bad-name" and "X" not in n)  # only a name with an X gets the undecodable byte
             and not (e == "empty" and w == "labels")]  # an empty label file is an image without boxes


@pytest.mark.parametrize("fmt,where,name,entry", BAD_CASES, ids=[f"{f}-{w}-{n}-{e}" for f, w, n, e in BAD_CASES])
def test_one_unreadable_entry_is_recorded_not_fatal(tmp_path: Path, small_phantom: Path, fmt: str, where: str,
                                                    name: str, entry: str) -> None:
    """A folder named like an annotation, a dangling or looping link, a FIFO, an empty file or a name that is not
    UTF-8, anywhere a reader looks: the run completes, the entry is in the report, the good images are written."""
    root = tmp_path / fmt
    _good_dataset(root, fmt, small_phantom)
    if entry == "dir" and fmt == "yolo" and where == "labels":
        (root / "labels" / name).unlink(missing_ok=True)
    if (root / where / name).exists() or (root / where / name).is_symlink():
        (root / where / name).unlink()
    _bad_entry(root / where, entry, name)
    classes = "[nodule]" if fmt == "csv" else "[cell]"
    report = _run(tmp_path, root, classes=classes)
    n_good = 24 if fmt == "csv" else 3
    assert report["summary"]["images_out"] == n_good
    assert report["totals"]["reconciled"]
    text = json.dumps(report["problems"], ensure_ascii=False)
    shown = name.replace("X", "\ufffd") if entry == "bad-name" else name
    assert shown.split("X")[0] in text, report["problems"]
    json.dumps(report, ensure_ascii=True)  # the report is writable text (no lone surrogates)


# ================================================================================ 9. names the training tool hides

NAMES = [".x", "..x", "._x", "-x", " x", "x ", "x.", "x..", "a" * 250, "é", "日本語", "a b", "x.png", "CON", "a\tb",
         "#x", "~x", "x;rm", "UPPER", "upper"]


def _ultralytics_finds(prepared: Path) -> tuple[list[str], list[str]]:
    """(image files, label files) of each split as Ultralytics' own loader lists them."""
    from pipeline.ultralytics_env import import_ultralytics

    import_ultralytics()
    from ultralytics.data.base import BaseDataset
    from ultralytics.data.utils import img2label_paths

    images: list[str] = []
    for split in ("train", "val", "test"):
        folder = prepared / "images" / split
        if any(folder.iterdir()):
            images += BaseDataset.get_img_files(SimpleNamespace(prefix="", data={}, fraction=1.0), str(folder))
    return images, img2label_paths(images)


@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo"])
def test_every_written_name_is_loaded_by_ultralytics(tmp_path: Path, fmt: str) -> None:
    """Names that Ultralytics' loader skips (hidden), that the file system cannot hold once suffixed, or that
    collide are renamed, and the rename recorded: every written image is found with its label file."""
    root = tmp_path / fmt
    # VOC and YOLO find images by listing folders, and skip hidden entries there as Ultralytics does (recorded as
    # hidden_file); a COCO file names its images, so a hidden name is read and must be written visible.
    hidden = [n for n in NAMES if n.startswith(".")] if fmt != "coco" else []
    stems = [n for n in NAMES if n not in hidden]
    suffix = ".png"
    folder = root / {"coco": "images", "voc": "JPEGImages", "yolo": "images"}[fmt]
    for i, stem in enumerate(stems + hidden):
        _image(folder / f"{stem}{suffix}", seed=i, size=(16, 12))
    if fmt == "coco":  # and the long name once more in a subfolder: the second one must not grow past 255 bytes
        _image(folder / "sub" / f"{'a' * 250}{suffix}", seed=99, size=(16, 12))
        files = [f"{s}{suffix}" for s in stems] + [f"sub/{'a' * 250}{suffix}"]
        _coco(root, [{"id": i + 1, "file_name": f} for i, f in enumerate(files)],
              [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 5, 5]} for i in range(len(files))])
    elif fmt == "voc":
        for stem in stems + hidden:
            _voc_xml(root / "Annotations" / f"{stem}.xml", f"{stem}{suffix}", [(2, 2, 7, 7)], size=None)
    else:
        (root / "labels").mkdir()
        (root / "data.yaml").write_text("names: [cell]\n")
        for stem in stems + hidden:
            (root / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    report = _run(tmp_path, root)
    rows = _manifest(tmp_path)
    assert len(rows) == len(stems) + (fmt == "coco"), report["problems"]
    images, labels = _ultralytics_finds(tmp_path / "prepared")
    written = sorted(str(tmp_path / "prepared" / r["image"]) for r in rows)
    assert sorted(images) == written
    assert all(Path(p).is_file() and Path(p).read_text().strip() for p in labels)
    renamed = {p["file"].rsplit("/", 1)[-1] for p in report["problems"] if p["kind"] == "renamed"}
    written_stems = {Path(r["image"]).stem for r in rows}
    for stem in stems:  # a name not written as it was is recorded
        assert stem in written_stems or f"{stem}{suffix}" in renamed, (stem, renamed)
    for stem in hidden:  # and a hidden one that was not read is recorded too, with its annotation
        assert [p for p in report["problems"] if p["kind"] == "hidden_file" and p["file"].endswith(stem + suffix)]


# ================================================================================ 13. reading outside the dataset

OUTSIDE_FORMS = ["../outside/x.png", "../../{tmp}/outside/x.png", "{abs}", "images/../../outside/x.png",
                 "./../outside/x.png"]


@pytest.mark.parametrize("allow", [False, True])
@pytest.mark.parametrize("form", OUTSIDE_FORMS)
@pytest.mark.parametrize("fmt", ["coco", "csv"])
def test_paths_leaving_the_dataset_are_refused(tmp_path: Path, small_phantom: Path, fmt: str, form: str,
                                               allow: bool) -> None:
    """A COCO ``file_name`` or a CSV ``file`` that leads outside the dataset folder is recorded and not read,
    unless ``data.allow_outside_root`` says so."""
    import shutil

    outside = tmp_path / "outside"
    root = tmp_path / "ds"
    _image(root / "images" / "in.png", seed=1, size=(16, 12))
    if fmt == "csv":
        shutil.copytree(small_phantom, root, dirs_exist_ok=True)
        shutil.rmtree(root / "images")
        import pydicom

        ds = pydicom.dcmread(sorted(small_phantom.rglob("*.dcm"))[0])  # another slice: other pixels, other patient
        ds.PatientID, ds.SOPInstanceUID = "OUTSIDER", pydicom.uid.generate_uid(entropy_srcs=["outside"])
        ds.PixelData = ds.pixel_array[::-1].copy().tobytes()
        outside.mkdir()
        ds.save_as(outside / "x.dcm")
        ref = form.replace("x.png", "x.dcm")
    else:
        _image(outside / "x.png", seed=2, size=(16, 12))
        ref = form
    ref = ref.replace("{abs}", str(outside / ("x.dcm" if fmt == "csv" else "x.png")))
    ref = ref.replace("{tmp}", tmp_path.name)
    if fmt == "coco":
        _coco(root, [{"id": 1, "file_name": "in.png"}, {"id": 2, "file_name": ref}],
              [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5]},
               {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 5, 5]}])
        classes = "[cell]"
    else:
        text = (root / "boxes.csv").read_text()
        first = text.splitlines()[1].split(",")
        (root / "boxes.csv").write_text(text + ",".join([ref, "", *first[2:]]) + "\n")
        classes = "[nodule]"
    report = _run(tmp_path, root, f"data.allow_outside_root={str(allow).lower()}", classes=classes)
    rows = _manifest(tmp_path)
    outside_rows = [r for r in rows if Path(r["image"]).stem.endswith("x")]
    recorded = [p for p in report["problems"] if p["kind"] == "outside_dataset"]
    if allow:
        assert len(outside_rows) == 1 and not recorded
    else:
        assert not outside_rows and len(recorded) == 1 and recorded[0]["action"] == "image_quarantined"
    assert report["totals"]["reconciled"]


LINK_CASES = [(f, link) for f in ("yolo", "voc", "coco") for link in ("file-abs", "file-rel", "dir-abs", "dir-rel")
              if not (f == "voc" and link.startswith("dir"))]  # VOC images lie flat in JPEGImages/


@pytest.mark.parametrize("fmt,link", LINK_CASES)
def test_symlinks_leaving_the_dataset_are_refused(tmp_path: Path, fmt: str, link: str) -> None:
    """An image that is a link to a file outside the dataset, or lies in a linked folder outside it: recorded, not
    read (the linked folder too is accounted for, never silently skipped)."""
    outside = tmp_path / "outside"
    _image(outside / "sub" / "x.png", seed=9, size=(16, 12))
    root = tmp_path / fmt
    folder = root / {"coco": "images", "voc": "JPEGImages", "yolo": "images"}[fmt]
    _image(folder / "in.png", seed=1, size=(16, 12))
    if link.startswith("file"):
        target = outside / "sub" / "x.png"
        (folder / "x.png").symlink_to(target if link == "file-abs" else os.path.relpath(target, folder))
        listed = "x.png"
    else:
        target = outside / "sub"
        (folder / "sub").symlink_to(target if link == "dir-abs" else os.path.relpath(target, folder))
        listed = "sub/x.png"
    stems = ["in", Path(listed).stem]
    if fmt == "coco":
        _coco(root, [{"id": 1, "file_name": "in.png"}, {"id": 2, "file_name": listed}],
              [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 5, 5]} for i in (1, 2)])
    elif fmt == "voc":
        for stem, name in zip(stems, ["in.png", listed], strict=True):
            _voc_xml(root / "Annotations" / f"{stem}.xml", name, [(2, 2, 7, 7)], size=None)
    else:
        (root / "data.yaml").write_text("names: [cell]\n")
        (root / "labels" / "sub").mkdir(parents=True)
        for name in ("in.png", listed):
            (root / "labels" / name).with_suffix(".txt").write_text("0 0.5 0.5 0.2 0.2\n")
    report = _run(tmp_path, root)
    assert [Path(r["image"]).stem for r in _manifest(tmp_path)] == ["in"]
    recorded = [p for p in report["problems"] if p["kind"] == "outside_dataset"]
    assert recorded, report["problems"]
    assert report["totals"]["reconciled"]
    report_allowed = _run(tmp_path / "allowed", root, "data.allow_outside_root=true")
    assert sorted(Path(r["image"]).stem for r in _manifest(tmp_path / "allowed")) == ["in", "x"]
    assert not [p for p in report_allowed["problems"] if p["kind"] == "outside_dataset"]
