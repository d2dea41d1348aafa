"""Deterministic synthetic chest-CT phantom written as real DICOM files plus a box table.

The phantom lets every stage of the pipeline (ingestion, splitting, training, serving) run offline and
in seconds, on data whose ground truth is known exactly. Same params and seed give byte-identical files:
all randomness comes from ``numpy.random.default_rng(seed)``, all UIDs are hashes of the params, and no
clock is read anywhere.

Sites. ``PhantomParams`` also describes the scanner: ``pixel_spacing`` (mm per pixel, so the field of view is
``size * pixel_spacing``), ``noise_hu``, ``sharpness`` (reconstruction kernel) and ``hu_offset`` (HU calibration
error). The patients are physical: their anatomy and nodules are drawn in a *reference frame*, the image of ``size``
pixels at :data:`PIXEL_SPACING_MM` (0.7 mm), and imaged at ``pixel_spacing`` about the same centre. So one seed gives
the same patients with nodules of the same size in mm at every spacing, a finer spacing shows them larger in pixels
(and a smaller field of view, possibly cutting the body at the sides), and ``min_radius`` / ``max_radius`` are pixels
of the reference frame. The defaults are site A and write exactly the files of the generator before sites existed
(the site fields at their defaults are left out of the UID fingerprint); any other value gives new UIDs.

Layout under ``out_dir``::

    dicom/PHANTOM-0001/000.dcm ...   one CT slice per file, one series per patient
    boxes.csv                        file,sop_instance_uid,x_min,y_min,x_max,y_max,label (nodules only)

Size: the anatomy, the scanner model (spacing, noise, kernel, calibration) and the DICOM writer of one
synthetic dataset; they share its geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from pipeline.errors import ConfigError
from pipeline.fileio import atomic_directory, atomic_write_text
from pipeline.params import PhantomParams

BOXES_HEADER = "file,sop_instance_uid,x_min,y_min,x_max,y_max,label"
LABEL = "nodule"

# Tissue values in Hounsfield units.
HU_AIR = -1000.0
HU_LUNG = -850.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BONE = 700.0
NODULE_HU_RANGE = (-100.0, 100.0)  # solid nodules
GROUND_GLASS_HU_RANGE = (-650.0, -450.0)  # faint part-solid / ground-glass nodules
VESSEL_HU_RANGE = (-100.0, 60.0)  # vessel cross-sections and short segments: unlabelled look-alikes
VESSEL_RADIUS_RANGE = (0.8, 2.4)
VESSEL_MAX_LENGTH_PX = 14.0

RESCALE_INTERCEPT = -1024
PIXEL_SPACING_MM = 0.7  # the reference frame's spacing (site A); anatomy and nodule radii are defined at it
SLICE_THICKNESS_MM = 5.0
FIXED_DATE = "20000101"  # fixed on purpose: a clock value would break byte-identical reruns
FIXED_TIME = "000000"

# Anatomy as fractions of the image size (x to the right, y down, centre of the image = 0.5).
BODY_SEMI_AXES = (0.42, 0.32)
BONE_RING = (0.86, 0.92)  # normalised elliptical radius band of the rib cage
FAT_START = 0.93  # subcutaneous fat from here to the skin
LUNG_OFFSET_X = 0.17
LUNG_SEMI_AXES = (0.12, 0.21)
SPINE_CENTRE_Y = 0.235
SPINE_RADIUS = 0.04
BODY_SCALE_RANGE = (0.95, 1.04)  # per-patient jitter
LUNG_SCALE_RANGE = (0.94, 1.04)
LUNG_HARMONIC_AMP = 0.05  # per harmonic (orders 2 and 3)
MIN_SLICE_SCALE = 0.85  # lungs at apex/base relative to mid-chest
LUNG_FILL_LIMIT = 0.93  # a nodule's rim must stay inside this normalised lung radius
NODULE_GAP_PX = 4.0  # minimum edge-to-edge distance between nodules on one slice
PLACEMENT_TRIES = 200
MIN_LABELLED_SIDE_PX = 2.0  # a nodule cut by the field of view is labelled only if its visible box is this large
SITE_FIELDS = ("pixel_spacing", "noise_hu", "sharpness", "hu_offset")
UNSHARP_SIGMA_PX = 1.0  # blur inside the unsharp mask of a sharp reconstruction kernel


@dataclass(frozen=True)
class PhantomSummary:
    """What was written, for logs and stage metrics."""

    n_patients: int
    n_slices: int
    n_boxes: int
    n_empty_slices: int
    out_dir: Path


@dataclass(frozen=True)
class _Geometry:
    """Reference frame (``size`` px at 0.7 mm) -> image pixels at ``pixel_spacing``, about the image centre."""

    size: int
    zoom: float  # image pixels per reference pixel = PIXEL_SPACING_MM / pixel_spacing

    def point(self, u: float) -> float:
        if self.zoom == 1.0:  # exactly the identity: site A must reproduce the pre-site files bit for bit
            return u
        c = self.size / 2.0
        return c + (u - c) * self.zoom

    def length(self, v: float) -> float:
        return v * self.zoom


@dataclass(frozen=True)
class _Lung:
    """One lung field: an ellipse whose radius is modulated by a few low-frequency harmonics."""

    cx: float
    cy: float
    ax: float
    ay: float
    harmonics: tuple[tuple[int, float, float], ...]  # (order, amplitude, phase)

    def scaled(self, s: float) -> _Lung:
        return _Lung(self.cx, self.cy, self.ax * s, self.ay * s, self.harmonics)

    def imaged(self, geo: _Geometry) -> _Lung:
        """The same lung in image pixels (its normalised radius is unchanged by the mapping)."""
        return _Lung(geo.point(self.cx), geo.point(self.cy), geo.length(self.ax), geo.length(self.ay), self.harmonics)

    def rho(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised radius: < 1 inside the lung, 1 on its boundary."""
        dx = (x - self.cx) / self.ax
        dy = (y - self.cy) / self.ay
        r = np.hypot(dx, dy)
        theta = np.arctan2(dy, dx)
        mod = np.ones_like(r)
        for order, amp, phase in self.harmonics:
            mod = mod + amp * np.cos(order * theta + phase)
        return r / mod

    def max_fit_radius(self) -> float:
        """Conservative radius of the largest disc that fits inside the lung (worst-case harmonics)."""
        shrink = 1.0 - sum(abs(a) for _, a, _ in self.harmonics)
        return LUNG_FILL_LIMIT * shrink * min(self.ax, self.ay) - 1.0


@dataclass(frozen=True)
class _Anatomy:
    """Per-patient body geometry and tissue values, fixed across that patient's slices."""

    cx: float
    cy: float
    ax: float
    ay: float
    lungs: tuple[_Lung, _Lung]
    hu_lung: float
    hu_soft: float
    hu_bone: float

    def imaged(self, geo: _Geometry) -> _Anatomy:
        return _Anatomy(geo.point(self.cx), geo.point(self.cy), geo.length(self.ax), geo.length(self.ay),
                        (self.lungs[0].imaged(geo), self.lungs[1].imaged(geo)), self.hu_lung, self.hu_soft,
                        self.hu_bone)


def _uid(fingerprint: str, *parts: object) -> str:
    """Deterministic UID: a hash of the params and the object's identity, never random or clock-based."""
    return str(generate_uid(entropy_srcs=["detflow-phantom", fingerprint, *map(str, parts)]))


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _soft_inside(rho: np.ndarray, scale_px: float) -> np.ndarray:
    """~1 px anti-aliased mask from a normalised radius (``scale_px`` turns radius units into pixels)."""
    return np.clip(0.5 + (1.0 - rho) * scale_px, 0.0, 1.0)


def _make_anatomy(rng: np.random.Generator, size: int) -> _Anatomy:
    """Draw one patient's body: small jitter of size, position and density so patients differ."""
    s = float(size)
    cx = s * (0.5 + rng.uniform(-0.01, 0.01))
    cy = s * (0.5 + rng.uniform(-0.01, 0.01))
    body_scale = rng.uniform(*BODY_SCALE_RANGE)
    ax, ay = BODY_SEMI_AXES[0] * s * body_scale, BODY_SEMI_AXES[1] * s * body_scale
    lungs = []
    for side in (-1.0, 1.0):
        lung_scale = rng.uniform(*LUNG_SCALE_RANGE)
        harmonics = tuple(
            (order, float(rng.uniform(-LUNG_HARMONIC_AMP, LUNG_HARMONIC_AMP)), float(rng.uniform(0, 2 * math.pi)))
            for order in (2, 3)
        )
        lungs.append(
            _Lung(
                cx=cx + side * LUNG_OFFSET_X * s * body_scale,
                cy=cy + rng.uniform(-0.01, 0.01) * s,
                ax=LUNG_SEMI_AXES[0] * s * body_scale * lung_scale,
                ay=LUNG_SEMI_AXES[1] * s * body_scale * lung_scale,
                harmonics=harmonics,
            )
        )
    return _Anatomy(
        cx=cx,
        cy=cy,
        ax=ax,
        ay=ay,
        lungs=(lungs[0], lungs[1]),
        hu_lung=HU_LUNG + rng.uniform(-25.0, 25.0),
        hu_soft=HU_SOFT + rng.uniform(-10.0, 10.0),
        hu_bone=HU_BONE + rng.uniform(-50.0, 50.0),
    )


def _lung_scale(slice_index: int, n_slices: int) -> float:
    """Lungs are widest mid-chest and narrower towards apex and base."""
    return MIN_SLICE_SCALE + (1.0 - MIN_SLICE_SCALE) * math.sin(math.pi * (slice_index + 0.5) / n_slices)


def _smallest_fit_radius(size: int) -> float:
    """Largest nodule radius that fits in the smallest lung any patient or slice can have."""
    smallest = _Lung(
        cx=0.0,
        cy=0.0,
        ax=LUNG_SEMI_AXES[0] * size * BODY_SCALE_RANGE[0] * LUNG_SCALE_RANGE[0] * MIN_SLICE_SCALE,
        ay=LUNG_SEMI_AXES[1] * size * BODY_SCALE_RANGE[0] * LUNG_SCALE_RANGE[0] * MIN_SLICE_SCALE,
        harmonics=((2, LUNG_HARMONIC_AMP, 0.0), (3, LUNG_HARMONIC_AMP, 0.0)),
    )
    return smallest.max_fit_radius()


def _render_body(anat: _Anatomy, xx: np.ndarray, yy: np.ndarray, zoom: float = 1.0) -> np.ndarray:
    """Noise-free HU image of air, body, subcutaneous fat, rib ring and spine (no lungs yet).

    ``anat`` is in image pixels; ``zoom`` (image px per reference px) scales the spine, defined in reference px.
    It does not depend on the slice, so it is rendered once per patient.
    """
    rho = np.hypot((xx - anat.cx) / anat.ax, (yy - anat.cy) / anat.ay)
    px = min(anat.ax, anat.ay)
    body = _soft_inside(rho, px)
    img = HU_AIR + body * (anat.hu_soft - HU_AIR)
    fat = np.clip(0.5 + (rho - FAT_START) * px, 0.0, 1.0)
    img = img + body * fat * (HU_FAT - anat.hu_soft)
    ring = np.clip(0.5 + (rho - BONE_RING[0]) * px, 0, 1) * np.clip(0.5 + (BONE_RING[1] - rho) * px, 0, 1)
    img = img + ring * (anat.hu_bone - img)
    size = xx.shape[1] * zoom
    spine_r = np.hypot(xx - anat.cx, yy - (anat.cy + SPINE_CENTRE_Y * size)) / (SPINE_RADIUS * size)
    spine = _soft_inside(spine_r, SPINE_RADIUS * size)
    return img + spine * (anat.hu_bone - img)


def _draw_lung(img: np.ndarray, lung: _Lung, hu: float) -> None:
    """Blend one lung field into ``img`` in place, touching only its bounding window (for speed)."""
    size = img.shape[0]
    reach = 1.0 + sum(abs(a) for _, a, _ in lung.harmonics)
    x0, x1 = max(int(lung.cx - lung.ax * reach) - 2, 0), min(int(lung.cx + lung.ax * reach) + 3, size)
    y0, y1 = max(int(lung.cy - lung.ay * reach) - 2, 0), min(int(lung.cy + lung.ay * reach) + 3, size)
    ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
    inside = _soft_inside(lung.rho(xs, ys), min(lung.ax, lung.ay))
    patch = img[y0:y1, x0:x1]
    img[y0:y1, x0:x1] = patch + inside * (hu - patch)


def _place_nodules(
    rng: np.random.Generator, lungs: tuple[_Lung, _Lung], count: int, r_lo: float, r_hi: float,
    ground_glass_fraction: float = 0.0,
) -> list[tuple[float, float, float, float]]:
    """Draw up to ``count`` non-overlapping nodules (cx, cy, r, hu) whose whole disc lies inside a lung.

    A nodule that finds no room after ``PLACEMENT_TRIES`` draws is dropped (rare; only on small images).

    Centres and radii are rounded to 0.1 px so the boxes written with one decimal are exact.
    """
    angles = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
    cos_a, sin_a = np.cos(angles), np.sin(angles)
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(count):
        # Log-uniform radius: small nodules are more common than large ones.
        r = round(float(math.exp(rng.uniform(math.log(r_lo), math.log(r_hi)))), 1)
        r = min(max(r, r_lo), r_hi)
        for attempt in range(PLACEMENT_TRIES):
            if attempt and attempt % 50 == 0:  # crowded or tight lung: try a smaller nodule
                r = max(round(r * 0.8, 1), r_lo)
            lung = lungs[int(rng.integers(2))]
            cx = round(float(lung.cx + rng.uniform(-1, 1) * lung.ax), 1)
            cy = round(float(lung.cy + rng.uniform(-1, 1) * lung.ay), 1)
            if lung.rho(np.array(cx), np.array(cy)) > LUNG_FILL_LIMIT:
                continue
            if np.max(lung.rho(cx + r * cos_a, cy + r * sin_a)) > LUNG_FILL_LIMIT:
                continue
            if any(math.hypot(cx - px, cy - py) < r + pr + NODULE_GAP_PX for px, py, pr, _ in placed):
                continue
            hu_range = GROUND_GLASS_HU_RANGE if rng.random() < ground_glass_fraction else NODULE_HU_RANGE
            placed.append((cx, cy, r, float(rng.uniform(*hu_range))))
            break
    return placed


def _draw_nodule(img: np.ndarray, cx: float, cy: float, r: float, hu: float) -> None:
    """Blend a smooth-edged blob into ``img`` in place; it is zero outside the disc of radius ``r``.

    Pixel centres sit at ``i + 0.5`` so the disc spans exactly ``[cx - r, cx + r]`` in pixel-edge
    coordinates, which is the box written to ``boxes.csv``.
    """
    size = img.shape[0]
    x0, x1 = max(int(math.floor(cx - r)), 0), min(int(math.ceil(cx + r)), size)
    y0, y1 = max(int(math.floor(cy - r)), 0), min(int(math.ceil(cy + r)), size)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    d = np.hypot(xs + 0.5 - cx, ys + 0.5 - cy)
    edge = min(2.0, r / 2.0)
    weight = _smoothstep((r - d) / edge)
    value = hu + 25.0 * (1.0 - np.clip(d / r, 0.0, 1.0) ** 2)  # slightly denser core
    patch = img[y0:y1, x0:x1]
    img[y0:y1, x0:x1] = patch + weight * (value - patch)


def _draw_vessels(img: np.ndarray, rng: np.random.Generator, lungs: tuple[_Lung, _Lung], count: int,
                  geo: _Geometry | None = None) -> None:
    """Unlabelled bright capsules inside the lungs: vessels seen end-on (dots) or obliquely (short segments).

    They are what makes nodule detection hard in real CT: small vessels look like small nodules, so a detector
    must learn shape and size cues, and FROC has false positives to count. ``lungs`` are in the reference frame
    (the random draws do not depend on the spacing); ``geo`` maps them into the image.
    """
    size = img.shape[0]
    geo = geo or _Geometry(size, 1.0)
    for _ in range(count):
        k = int(rng.integers(2))
        lung = lungs[k]
        x0 = float(lung.cx + rng.uniform(-1, 1) * lung.ax)
        y0 = float(lung.cy + rng.uniform(-1, 1) * lung.ay)
        angle, length = rng.uniform(0, math.pi), rng.uniform(0.0, VESSEL_MAX_LENGTH_PX)
        r, hu = rng.uniform(*VESSEL_RADIUS_RANGE), rng.uniform(*VESSEL_HU_RANGE)
        if lung.rho(np.array(x0), np.array(y0)) > 0.85:
            continue
        x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
        x0, y0, x1, y1 = geo.point(x0), geo.point(y0), geo.point(x1), geo.point(y1)
        r = geo.length(r)
        lung = lung.imaged(geo)
        lo_x, hi_x = max(int(min(x0, x1) - r - 2), 0), min(int(max(x0, x1) + r + 3), size)
        lo_y, hi_y = max(int(min(y0, y1) - r - 2), 0), min(int(max(y0, y1) + r + 3), size)
        if lo_x >= hi_x or lo_y >= hi_y:
            continue
        ys, xs = np.mgrid[lo_y:hi_y, lo_x:hi_x] + 0.5
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        d = np.hypot(xs - (x0 + t * dx), ys - (y0 + t * dy))
        weight = _smoothstep((r - d) / max(r / 2.0, 0.5)) * (lung.rho(xs, ys) < 1.0)
        patch = img[lo_y:hi_y, lo_x:hi_x]
        img[lo_y:hi_y, lo_x:hi_x] = patch + weight * (hu - patch)


def _slice_dataset(
    pixels: np.ndarray,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    sop_uid: str,
    slice_index: int,
    pixel_spacing: float = PIXEL_SPACING_MM,
) -> Dataset:
    """A CT Image Storage dataset for one slice (explicit VR little endian, int16 stored values)."""
    size = pixels.shape[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    origin = -pixel_spacing * (size - 1) / 2.0
    z = slice_index * SLICE_THICKNESS_MM
    tags: dict[str, object] = {
        "SpecificCharacterSet": "ISO_IR 100",
        "ImageType": ["DERIVED", "SECONDARY", "AXIAL"],
        "SOPClassUID": CTImageStorage,
        "SOPInstanceUID": sop_uid,
        "StudyDate": FIXED_DATE,
        "SeriesDate": FIXED_DATE,
        "ContentDate": FIXED_DATE,
        "StudyTime": FIXED_TIME,
        "SeriesTime": FIXED_TIME,
        "ContentTime": FIXED_TIME,
        "AccessionNumber": "",
        "Modality": "CT",
        "Manufacturer": "detflow synthetic phantom",
        "ReferringPhysicianName": "",
        "StudyDescription": "Synthetic chest CT phantom",
        "SeriesDescription": "Axial lung nodule phantom",
        "PatientName": patient_name,
        "PatientID": patient_id,
        "PatientBirthDate": "",
        "PatientSex": "O",
        "PatientIdentityRemoved": "YES",
        "BodyPartExamined": "CHEST",
        "SliceThickness": SLICE_THICKNESS_MM,
        "KVP": 120,
        "PatientPosition": "HFS",
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "StudyID": patient_id.rsplit("-", 1)[-1],
        "SeriesNumber": 1,
        "AcquisitionNumber": 1,
        "InstanceNumber": slice_index + 1,
        "ImagePositionPatient": [round(origin, 4), round(origin, 4), z],
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "FrameOfReferenceUID": frame_uid,
        "PositionReferenceIndicator": "",
        "SliceLocation": z,
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": size,
        "Columns": size,
        "PixelSpacing": [pixel_spacing, pixel_spacing],
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 1,
        "BurnedInAnnotation": "NO",
        "WindowCenter": -600,
        "WindowWidth": 1500,
        "RescaleIntercept": RESCALE_INTERCEPT,
        "RescaleSlope": 1,
        "RescaleType": "HU",
    }
    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in tags.items():  # pydicom writes elements in tag order, whatever the order here
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge-replicated borders), numpy only: scipy is not a dependency."""
    radius = max(int(math.ceil(3.0 * sigma)), 1)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k, w in enumerate(taps):
            acc += w * (padded[k:k + n] if axis == 0 else padded[:, k:k + n])
        out = acc
    return out


def reconstruction_kernel(img: np.ndarray, sharpness: float) -> np.ndarray:
    """A scanner's reconstruction kernel, applied after the noise as in real CT (a sharp kernel sharpens the noise
    too): ``sharpness > 0`` is an unsharp mask of that amount (sigma 1 px), ``< 0`` a Gaussian blur of sigma
    ``-sharpness`` px, 0 leaves the image as it is."""
    if sharpness > 0:
        return img + sharpness * (img - _gaussian_blur(img, UNSHARP_SIGMA_PX))
    if sharpness < 0:
        return _gaussian_blur(img, -sharpness)
    return img


def _fingerprint(params: PhantomParams) -> str:
    """What the UIDs hash: the params, without site fields left at their defaults (so site A's UIDs are those of
    the generator before sites existed, and any other scanner gets new ones)."""
    defaults = type(params)()
    same = {k for k in SITE_FIELDS if getattr(params, k) == getattr(defaults, k)}
    return params.model_dump_json(exclude=same)


def _imaged_nodules(nodules: list[tuple[float, float, float, float]], geo: _Geometry
                    ) -> list[tuple[float, float, float, float]]:
    """Reference-frame nodules in image pixels, rounded to 0.1 px (the boxes are written with one decimal), and
    only those whose visible box is at least :data:`MIN_LABELLED_SIDE_PX` on each side."""
    out = []
    for cx, cy, r, hu in nodules:
        cx_i, cy_i, r_i = round(geo.point(cx), 1), round(geo.point(cy), 1), round(geo.length(r), 1)
        lo_x, hi_x = max(cx_i - r_i, 0.0), min(cx_i + r_i, float(geo.size))
        lo_y, hi_y = max(cy_i - r_i, 0.0), min(cy_i + r_i, float(geo.size))
        if r_i > 0 and min(hi_x - lo_x, hi_y - lo_y) >= MIN_LABELLED_SIDE_PX:
            out.append((cx_i, cy_i, r_i, hu))
    return out


def generate_phantom(params: PhantomParams, out_dir: Path, progress: bool = True) -> PhantomSummary:
    """Write the phantom dataset to ``out_dir``, replacing whatever was there in one atomic step.

    Args:
        params: Phantom size, counts, nodule radii, seed and scanner; the seed fixes every pixel and UID.
        out_dir: Destination folder; it holds the old tree or the complete new one, never a mix.
        progress: Show a tqdm bar over slices (turn off in tests and non-interactive runs).

    Returns:
        Counts of what was written.

    Raises:
        ConfigError: ``min_radius`` is too large for a nodule to fit inside the lungs at this ``size``.
    """
    out_dir = Path(out_dir)
    size, n_pat, n_sl = params.size, params.patients, params.slices
    fit = _smallest_fit_radius(size)
    if params.max_nodules > 0 and params.empty_fraction < 1.0 and params.min_radius > fit:
        raise ConfigError(
            f"phantom.min_radius={params.min_radius} does not fit in the lungs of a {size}px image "
            f"(largest radius that always fits: {fit:.1f} px); lower phantom.min_radius or raise phantom.size"
        )
    n_total = n_pat * n_sl
    fingerprint = _fingerprint(params)
    geo = _Geometry(size, PIXEL_SPACING_MM / params.pixel_spacing)
    rng = np.random.default_rng(params.seed)

    # Which slices are empty: an exact quota so at least ``empty_fraction`` of them carry no nodule.
    n_forced_empty = min(n_total, math.ceil(params.empty_fraction * n_total - 1e-9))
    counts = np.zeros(n_total, dtype=np.int64)
    if params.max_nodules > 0:
        counts[:] = rng.integers(1, params.max_nodules + 1, size=n_total)
        counts[rng.permutation(n_total)[:n_forced_empty]] = 0
    counts = counts.reshape(n_pat, n_sl)
    patient_rngs = rng.spawn(n_pat)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    rows: list[str] = [BOXES_HEADER]
    n_boxes = n_empty = 0
    with atomic_directory(out_dir) as staging, tqdm(
        total=n_total, disable=not progress, desc="phantom", unit="slice"
    ) as bar:
        for p in range(n_pat):
            prng = patient_rngs[p]
            anat = _make_anatomy(prng, size)  # reference frame
            anat_img = anat.imaged(geo)
            patient_id = f"PHANTOM-{p + 1:04d}"
            study_uid = _uid(fingerprint, "study", p)
            series_uid = _uid(fingerprint, "series", p)
            frame_uid = _uid(fingerprint, "frame", p)
            pdir = staging / "dicom" / patient_id
            pdir.mkdir(parents=True)
            body = _render_body(anat_img, xx, yy, geo.zoom)
            for s in range(n_sl):
                scale = _lung_scale(s, n_sl)
                lungs = (anat.lungs[0].scaled(scale), anat.lungs[1].scaled(scale))
                img = body.copy()
                for lung in lungs:
                    _draw_lung(img, lung.imaged(geo), anat.hu_lung)
                _draw_vessels(img, prng, lungs, int(prng.poisson(params.vessels)) if params.vessels else 0, geo)
                nodules: list[tuple[float, float, float, float]] = []
                if counts[p, s] > 0:
                    # Never below min_radius: the up-front check guarantees every lung fits it.
                    r_hi = min(float(params.max_radius), min(lg.max_fit_radius() for lg in lungs))
                    nodules = _place_nodules(prng, lungs, int(counts[p, s]), float(params.min_radius), r_hi,
                                             params.ground_glass_fraction)
                nodules = _imaged_nodules(nodules, geo)
                for cx, cy, r, hu in nodules:
                    _draw_nodule(img, cx, cy, r, hu)
                img += prng.normal(0.0, params.noise_hu, size=img.shape)
                img = reconstruction_kernel(img, params.sharpness)
                if params.hu_offset:
                    img += params.hu_offset
                stored = np.clip(np.rint(img) - RESCALE_INTERCEPT, -32768, 32767).astype(np.int16)

                sop_uid = _uid(fingerprint, "sop", p, s)
                ds = _slice_dataset(
                    stored,
                    patient_id=patient_id,
                    patient_name=f"Phantom^{p + 1:04d}",
                    study_uid=study_uid,
                    series_uid=series_uid,
                    frame_uid=frame_uid,
                    sop_uid=sop_uid,
                    slice_index=s,
                    pixel_spacing=params.pixel_spacing,
                )
                rel = f"dicom/{patient_id}/{s:03d}.dcm"
                ds.save_as(staging / rel, enforce_file_format=True)
                for cx, cy, r, _ in nodules:
                    x_min, y_min = max(cx - r, 0.0), max(cy - r, 0.0)
                    x_max, y_max = min(cx + r, float(size)), min(cy + r, float(size))
                    coords = ",".join(f"{v:.1f}" for v in (x_min, y_min, x_max, y_max))
                    rows.append(f"{rel},{sop_uid},{coords},{LABEL}")
                n_boxes += len(nodules)
                n_empty += not nodules
                bar.update(1)
        atomic_write_text(staging / "boxes.csv", "\n".join(rows) + "\n")
    return PhantomSummary(
        n_patients=n_pat, n_slices=n_total, n_boxes=n_boxes, n_empty_slices=n_empty, out_dir=out_dir
    )
