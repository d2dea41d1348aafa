"""Tests for the synthetic chest-CT phantom: real DICOM, plausible HU, exact boxes, determinism, atomicity."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pipeline.config import PhantomParams
from pipeline.data.phantom import BOXES_HEADER, PhantomSummary, generate_phantom
from pipeline.errors import ConfigError

SMALL = PhantomParams(patients=4, slices=4, seed=7)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "boxes.csv", newline="") as f:
        return list(csv.DictReader(f))


def _hu(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(path)
    return ds, np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PhantomSummary]:
    out = tmp_path_factory.mktemp("small") / "phantom"
    return out, generate_phantom(SMALL, out, progress=False)


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PhantomSummary]:
    out = tmp_path_factory.mktemp("default") / "phantom"
    return out, generate_phantom(PhantomParams(), out, progress=False)


def test_layout_and_summary(small: tuple[Path, PhantomSummary]) -> None:
    out, summary = small
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = [f"dicom/PHANTOM-{p:04d}/{s:03d}.dcm" for p in range(1, 5) for s in range(4)]
    assert files == sorted(["boxes.csv", *expected])
    assert summary.n_patients == 4 and summary.n_slices == 16 and summary.out_dir == out
    rows = _rows(out)
    assert summary.n_boxes == len(rows)
    assert summary.n_empty_slices == 16 - len({r["file"] for r in rows})
    assert summary.n_empty_slices >= int(np.ceil(SMALL.empty_fraction * 16))
    assert (out / "boxes.csv").read_text().splitlines()[0] == BOXES_HEADER
    assert not [p for p in out.parent.iterdir() if p.name != "phantom"], "staging leftovers"


def test_dicom_tags(small: tuple[Path, PhantomSummary]) -> None:
    out, _ = small
    today = dt.date.today().strftime("%Y%m%d").encode()
    for path in sorted(out.glob("dicom/*/*.dcm")):
        ds = pydicom.dcmread(path)  # no force=True: needs preamble + valid file meta
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == CTImageStorage
        assert ds.Modality == "CT"
        pid = path.parent.name
        assert ds.PatientID == pid and re.fullmatch(r"PHANTOM-\d{4}", pid)
        assert str(ds.PatientName) == "Phantom^" + pid[-4:]
        assert ds.InstanceNumber == int(path.stem) + 1
        assert (ds.Rows, ds.Columns) == (256, 256)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
        assert ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation == "MONOCHROME2"
        assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.7]
        assert float(ds.SliceThickness) > 0
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(int(path.stem) * float(ds.SliceThickness))
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept), ds.RescaleType) == (1.0, -1024.0, "HU")
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (-600.0, 1500.0)
        assert ds.StudyDate == ds.ContentDate == "20000101"
        assert today not in path.read_bytes(), "current date leaked into the file"
        arr = ds.pixel_array
        assert arr.shape == (256, 256) and arr.dtype == np.int16


def test_hu_ranges(small: tuple[Path, PhantomSummary]) -> None:
    out, _ = small
    boxed = {r["file"] for r in _rows(out)}
    for path in sorted(out.glob("dicom/*/*.dcm")):
        _, hu = _hu(path)
        for corner in (hu[:12, :12], hu[:12, -12:], hu[-12:, :12], hu[-12:, -12:]):
            assert abs(corner.mean() - (-1000)) < 15
        assert hu.min() >= -1100 and hu.max() < 1000
        centre_row = hu[128]
        assert centre_row.max() > 300, "no bone ring crossing the centre row"
        assert (hu > 300).mean() > 0.02
        # Soft tissue at the mediastinum (between the lungs, above the spine).
        assert -60 < np.median(hu[100:110, 124:132]) < 120
        if path.relative_to(out).as_posix() not in boxed:
            for x in (int(256 * 0.33), int(256 * 0.67)):
                assert np.median(hu[124:132, x - 4 : x + 4]) < -600, "lung field missing"
        assert (hu < -600).sum() > 0.1 * hu.size


def test_boxes_match_files_and_uids(small: tuple[Path, PhantomSummary]) -> None:
    out, _ = small
    rows = _rows(out)
    assert rows, "small phantom should still have some nodules"
    for r in rows:
        path = out / r["file"]
        assert path.is_file()
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == r["sop_instance_uid"]
        assert r["label"] == "nodule"
        for k in ("x_min", "y_min", "x_max", "y_max"):
            assert re.fullmatch(r"\d+\.\d", r[k]), r[k]


def _window(box: tuple[float, float, float, float], pad: int, h: int, w: int) -> tuple[slice, slice]:
    x0, y0, x1, y1 = box
    ys = slice(max(int(y0) - pad, 0), min(int(np.ceil(y1)) + pad, h))
    return ys, slice(max(int(x0) - pad, 0), min(int(np.ceil(x1)) + pad, w))


def _check_nodules(out: Path, rows: list[dict[str, str]], zoom: float = 1.0) -> None:
    by_file: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_file[r["file"]].append(r)
    for rel, boxes in by_file.items():
        _, hu = _hu(out / rel)
        h, w = hu.shape
        for b in boxes:
            x0, y0, x1, y1 = (float(b[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            side_x, side_y = x1 - x0, y1 - y0
            assert side_x == pytest.approx(side_y, abs=0.11), "a disc gives a square box"
            assert (6 - 0.11) * zoom <= side_x <= (30 + 0.11) * zoom, "radius outside 3..15 px (reference frame)"
            cx, cy, q = (x0 + x1) / 2, (y0 + y1) / 2, side_x / 4
            core = hu[int(round(cy - q)) : int(round(cy + q)), int(round(cx - q)) : int(round(cx + q))]
            assert core.size > 0
            # Surrounding lung: a 4-px frame starting 2 px outside the box.
            surround_mask = np.zeros(hu.shape, dtype=bool)
            surround_mask[_window((x0, y0, x1, y1), 6, h, w)] = True
            surround_mask[_window((x0, y0, x1, y1), 2, h, w)] = False
            surround = hu[surround_mask]
            lung = np.median(surround)
            assert lung < -600, f"{rel}: nodule not surrounded by lung (median {lung:.0f} HU)"
            # solid nodules (-100..100 HU) or faint ground-glass ones (-650..-450 HU), always above lung
            assert core.mean() > lung + 150, f"{rel}: nodule core {core.mean():.0f} vs lung {lung:.0f}"
            assert -700 < core.mean() < 200, "nodule core should be ground-glass or soft-tissue-like"


def test_nodules_bright_inside_lung(small: tuple[Path, PhantomSummary]) -> None:
    out, _ = small
    _check_nodules(out, _rows(out))


def test_default_params(default: tuple[Path, PhantomSummary]) -> None:
    out, summary = default
    p = PhantomParams()
    total = p.patients * p.slices
    assert summary.n_patients == p.patients and summary.n_slices == total
    assert len(list(out.glob("dicom/*/*.dcm"))) == total
    rows = _rows(out)
    per_file = Counter(r["file"] for r in rows)
    assert max(per_file.values()) <= 3
    n_empty = total - len(per_file)
    assert summary.n_empty_slices == n_empty and summary.n_boxes == len(rows)
    assert n_empty / total >= max(0.25, p.empty_fraction)
    assert n_empty < total, "defaults must produce nodules"
    radii = [(float(r["x_max"]) - float(r["x_min"])) / 2 for r in rows]
    assert min(radii) >= 3 - 0.05 and max(radii) <= 15 + 0.05
    assert len(set(radii)) > 20, "radii should vary"
    _check_nodules(out, rows)


def test_uids_consistent_per_patient(default: tuple[Path, PhantomSummary]) -> None:
    out, _ = default
    per_patient: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    sops: list[str] = []
    for path in sorted(out.glob("dicom/*/*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        per_patient[ds.PatientID].add((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID))
        sops.append(ds.SOPInstanceUID)
    assert all(len(v) == 1 for v in per_patient.values()), "UIDs must be constant within a patient"
    triples = [next(iter(v)) for v in per_patient.values()]
    for i in range(3):
        assert len({t[i] for t in triples}) == len(triples), "UIDs must differ across patients"
    all_uids = sops + [u for t in triples for u in t]
    assert len(set(all_uids)) == len(all_uids)
    assert all(len(u) <= 64 and re.fullmatch(r"[0-9.]+", u) for u in all_uids)


def test_deterministic_and_seed_sensitive(tmp_path: Path) -> None:
    a = _hashes(generate_phantom(SMALL, tmp_path / "a", progress=False).out_dir)
    b = _hashes(generate_phantom(SMALL, tmp_path / "b", progress=False).out_dir)
    assert a == b
    other_seed = SMALL.model_copy(update={"seed": 8})
    c = _hashes(generate_phantom(other_seed, tmp_path / "c", progress=False).out_dir)
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a), "a different seed must change every file"


def test_rerun_replaces_whole_directory(tmp_path: Path) -> None:
    out = tmp_path / "phantom"
    generate_phantom(PhantomParams(patients=3, slices=3, seed=1), out, progress=False)
    (out / "stray.txt").write_text("left from before")
    generate_phantom(PhantomParams(patients=2, slices=2, seed=1), out, progress=False)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = [f"dicom/PHANTOM-{p:04d}/{s:03d}.dcm" for p in (1, 2) for s in (0, 1)]
    assert files == sorted(["boxes.csv", *expected])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom"], "staging/old folders left behind"
    for r in _rows(out):
        assert (out / r["file"]).is_file()


def test_no_nodules_and_all_empty(tmp_path: Path) -> None:
    for i, update in enumerate(({"max_nodules": 0}, {"empty_fraction": 1.0})):
        out = tmp_path / f"p{i}"
        summary = generate_phantom(SMALL.model_copy(update=update), out, progress=False)
        assert summary.n_boxes == 0 and summary.n_empty_slices == 16
        assert (out / "boxes.csv").read_text() == BOXES_HEADER + "\n"


def test_small_image_size(tmp_path: Path) -> None:
    params = PhantomParams(patients=2, slices=3, size=96, min_radius=2, max_radius=6, seed=3)
    summary = generate_phantom(params, tmp_path / "p", progress=False)
    ds, hu = _hu(next((tmp_path / "p").glob("dicom/*/*.dcm")))
    assert hu.shape == (96, 96) and (ds.Rows, ds.Columns) == (96, 96)
    assert summary.n_boxes > 0
    for r in _rows(tmp_path / "p"):
        assert 4 - 0.11 <= float(r["x_max"]) - float(r["x_min"]) <= 12 + 0.11


def test_radius_too_large_for_image_fails_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "p"
    with pytest.raises(ConfigError, match="min_radius"):
        generate_phantom(PhantomParams(size=64, min_radius=14, max_radius=15), out, progress=False)
    assert list(tmp_path.iterdir()) == [], "a failed run must leave nothing behind"


def test_progress_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_phantom(PhantomParams(patients=1, slices=2), tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""
    generate_phantom(PhantomParams(patients=1, slices=2), tmp_path / "loud", progress=True)
    assert "2/2" in capsys.readouterr().err


def test_ground_glass_nodules_and_unlabelled_vessels(tmp_path: Path) -> None:
    """Defaults mix faint ground-glass nodules with solid ones, and add vessel look-alikes nobody labelled."""
    out = tmp_path / "ph"
    generate_phantom(PhantomParams(patients=6, slices=4), out, progress=False)
    rows = _rows(out)
    cores = []
    for r in rows:
        _, hu = _hu(out / r["file"])
        x0, y0, x1, y1 = (float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        cores.append(hu[cy - 1 : cy + 2, cx - 1 : cx + 2].mean())
    assert any(c < -300 for c in cores) and any(c > -150 for c in cores)
    # small bright structures inside lung tissue, on slices that no box covers: the vessels
    def specks(root: Path) -> int:
        boxed = {r["file"] for r in _rows(root)}
        total = 0
        for f in sorted((root / "dicom").rglob("*.dcm")):
            if f.relative_to(root).as_posix() in boxed:
                continue
            _, hu = _hu(f)
            med = np.median(np.lib.stride_tricks.sliding_window_view(np.pad(hu, 4, mode="edge"), (9, 9)),
                            axis=(2, 3))
            total += int(((hu > -300) & (med < -600)).sum())
        return total

    assert specks(out) > 0
    plain = tmp_path / "plain"
    generate_phantom(PhantomParams(patients=6, slices=4, vessels=0), plain, progress=False)
    assert specks(plain) == 0


# --- sites: the scanner's parameters -------------------------------------------------------------------------------

# sha256_tree of folders written by the generator before the site parameters existed (commit 8f7cac2 of
# pipeline/data/phantom.py, run with `git show HEAD:pipeline/data/phantom.py` in a temporary module): site A must
# stay byte-identical, so DVC caches, the registry's data hashes and every committed dvc.lock stay valid.
PRE_SITE_TREES = {
    "small": ("ab539ffbaac33411f790b7a00edde41a9d03c0d15ecad5356028d6cd3137e53b", SMALL),
    "tiny96": ("94d492aa929cb68ce79837d36ea844ec53f0d1e41898a95f45a47e5c32deb4af",
               PhantomParams(patients=2, slices=3, size=96, min_radius=2, max_radius=6, seed=3)),
}
SITE_B = {"pixel_spacing": 0.5, "noise_hu": 25.0, "sharpness": 1.0, "hu_offset": 30.0}


@pytest.mark.parametrize("name", sorted(PRE_SITE_TREES))
def test_site_a_defaults_are_byte_identical_to_the_pre_site_generator(tmp_path: Path, name: str) -> None:
    from pipeline.fileio import sha256_tree

    digest, params = PRE_SITE_TREES[name]
    assert params.pixel_spacing == 0.7 and params.noise_hu == 10.0 and params.sharpness == 0 and params.hu_offset == 0
    assert sha256_tree(generate_phantom(params, tmp_path / "p", progress=False).out_dir) == digest


def _boxes_mm(root: Path) -> dict[str, list[tuple[float, float, float]]]:
    """Per file: (centre x, centre y, side) of every box in mm, about the image centre, using the file's tags."""
    out: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for r in _rows(root):
        ds = pydicom.dcmread(root / r["file"], stop_before_pixels=True)
        sp, half = float(ds.PixelSpacing[0]), ds.Columns / 2
        x0, y0, x1, y1 = (float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        out[r["file"]].append((((x0 + x1) / 2 - half) * sp, ((y0 + y1) / 2 - half) * sp, (x1 - x0) * sp))
    return out


@pytest.fixture(scope="module")
def site_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sites")
    a = generate_phantom(SMALL, base / "a", progress=False).out_dir
    b = generate_phantom(SMALL.model_copy(update=SITE_B), base / "b", progress=False).out_dir
    return a, b


def test_site_b_nodules_have_the_same_physical_size_and_place(site_pair: tuple[Path, Path]) -> None:
    a, b = site_pair
    mm_a, mm_b = _boxes_mm(a), _boxes_mm(b)
    assert mm_a.keys() == mm_b.keys() and sum(map(len, mm_a.values())) > 5
    for rel in mm_a:
        assert len(mm_a[rel]) == len(mm_b[rel])
        for (xa, ya, sa), (xb, yb, sb) in zip(mm_a[rel], mm_b[rel], strict=True):
            # one rounding to 0.1 px per frame: at most 0.05 px x spacing per edge
            assert sb == pytest.approx(sa, abs=0.1 * 0.7 + 0.1 * 0.5)
            assert (xb, yb) == pytest.approx((xa, ya), abs=0.05 * 0.7 + 0.05 * 0.5)
    # in pixels the nodules are 0.7 / 0.5 = 1.4 times larger at site B
    side_px = lambda root: [float(r["x_max"]) - float(r["x_min"]) for r in _rows(root)]  # noqa: E731
    ratio = np.array(side_px(b)) / np.array(side_px(a))
    assert np.allclose(ratio, 1.4, atol=0.05)


def test_site_b_boxes_are_exact_on_the_pixels(tmp_path: Path) -> None:
    """The geometry alone (the intensity changes of site B are checked below): every box frames its nodule."""
    b = generate_phantom(SMALL.model_copy(update={"pixel_spacing": 0.5}), tmp_path / "b", progress=False).out_dir
    rows = _rows(b)
    _check_nodules(b, rows, zoom=1.4)
    for r in rows:
        assert re.fullmatch(r"\d+\.\d", r["x_min"]), "boxes stay exact at one decimal"


def test_site_b_tags_and_intensities(site_pair: tuple[Path, Path]) -> None:
    a, b = site_pair
    f = "dicom/PHANTOM-0001/000.dcm"
    ds_a, hu_a = _hu(a / f)
    ds_b, hu_b = _hu(b / f)
    assert [float(v) for v in ds_b.PixelSpacing] == [0.5, 0.5]
    assert [float(v) for v in ds_b.ImagePositionPatient[:2]] == [pytest.approx(-0.5 * 255 / 2, abs=1e-3)] * 2
    assert (ds_b.Rows, ds_b.Columns) == (256, 256)
    assert ds_a.SOPInstanceUID != ds_b.SOPInstanceUID and ds_a.StudyInstanceUID != ds_b.StudyInstanceUID
    corner_a, corner_b = hu_a[:12, :12], hu_b[:12, :12]
    # calibration offset: air reads -1000 + 30 HU; noise: 25 HU sharpened by the unsharp mask (more than 25)
    assert corner_a.mean() == pytest.approx(-1000, abs=5) and corner_b.mean() == pytest.approx(-970, abs=8)
    assert corner_a.std() == pytest.approx(10, rel=0.2) and corner_b.std() > 30
    # same body in mm: the field of view is 128 mm instead of 179 mm, so the lung field is 1.4x wider in pixels
    lung_a = ((hu_a < -600) & (hu_a > -950))[128].sum()
    lung_b = ((hu_b < -600 + 30) & (hu_b > -950 + 30))[128].sum()
    assert lung_b / lung_a == pytest.approx(1.4, rel=0.12)


def test_reconstruction_kernel_and_noise_parameters(tmp_path: Path) -> None:
    from pipeline.data.phantom import reconstruction_kernel

    rng = np.random.default_rng(0)
    noise = rng.normal(0, 10, size=(64, 64))
    assert reconstruction_kernel(noise, 0.0) is noise
    assert reconstruction_kernel(noise, 1.5).std() > 1.5 * noise.std()
    assert reconstruction_kernel(noise, -1.0).std() < 0.5 * noise.std()
    flat = np.full((16, 16), -1000.0)
    assert np.allclose(reconstruction_kernel(flat, 2.0), flat) and np.allclose(reconstruction_kernel(flat, -2.0), flat)
    quiet = generate_phantom(PhantomParams(patients=1, slices=1, size=96, min_radius=2, max_radius=6, noise_hu=0.0),
                             tmp_path / "q", progress=False).out_dir
    _, hu = _hu(next(quiet.glob("dicom/*/*.dcm")))
    assert hu[:12, :12].std() == 0.0 and hu[:12, :12].mean() == -1000.0


def test_wide_field_of_view_and_cut_nodules(tmp_path: Path) -> None:
    """A coarse spacing shows the whole patient smaller; a very fine one cuts the body, and nodules left outside
    the field are neither drawn nor labelled."""
    coarse = generate_phantom(SMALL.model_copy(update={"pixel_spacing": 1.0}), tmp_path / "c", progress=False)
    fine = generate_phantom(SMALL.model_copy(update={"pixel_spacing": 0.25}), tmp_path / "f", progress=False)
    assert coarse.n_boxes == len(_rows(tmp_path / "c")) > 0
    for root, summary in ((tmp_path / "c", coarse), (tmp_path / "f", fine)):
        for r in _rows(root):
            x0, y0, x1, y1 = (float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
            assert 0 <= x0 and x1 <= 256 and 0 <= y0 and y1 <= 256 and min(x1 - x0, y1 - y0) >= 2
        assert summary.n_boxes == len(_rows(root))
    assert fine.n_boxes < coarse.n_boxes, "at 0.25 mm (64 mm field) some nodules fall outside the image"
    _, hu = _hu(tmp_path / "f" / "dicom/PHANTOM-0001/000.dcm")
    assert hu[:12, :12].mean() > -900, "the 64 mm field is inside the body: no air in the corner"
