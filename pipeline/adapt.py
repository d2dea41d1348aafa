"""`detflow adapt`: fit an exported model to a new site from unlabelled images, without retraining.

Acquisition geometry comes first (issue 13: on a real cross-site pair of blood smears, matching the input scale to
the training objects' size restored mAP50 from 0.75 to 0.87; re-estimating BatchNorm statistics made it worse), so
the adaptation is the size at which images are letterboxed (:class:`pipeline.infer.processing.InputScaling`):

- **known physical size first**: ``--pixel-size`` (microscopy: microns per pixel of the new site) or DICOM inputs
  that state ``PixelSpacing``: the engine brings each image's field of view to the training one (method
  ``pixel_size`` / ``pixel_spacing``); nothing is estimated.
- **object-scale calibration** otherwise (method ``object_scale``), only when the shift test (:mod:`pipeline.shift`,
  against the card's reference sample) finds the site shifted: the model runs on the target images at every input
  scale ``s`` it can run at between 0.5 and 2 (YOLO: each stride-multiple letterbox target once,
  :func:`stride_grid`; fixed-input Faster R-CNN: a geometric grid 2^(1/6) apart, then 2^(1/24) around the best,
  up to 1); at each, the sizes
  of its confident detections (``sqrt(w*h)`` in model-input pixels) are compared per class with the training
  objects' sizes recorded in the card (objects cut by the image edge left out on both sides, since a box
  clipped by the frame does not show its object's size; mean absolute difference of log-size quantiles, a 1-D
  Wasserstein distance, weighted by the training share of each class). The scale with the smallest distance wins, with
  two guards: a scale where the model finds fewer than half the objects of its most productive scale is not eligible
  (sizes of a few detections match by selection, not by scale), and 1.0 is kept unless another scale is closer by more
  than :data:`KEEP_ONE_MARGIN` (about 5 % in size), so unshifted data stays as it was. A third guard asks whether
  the criterion can tell at all: the chosen scale must be closer to the training sizes than 1 in at least
  :data:`CONFIDENCE` of bootstrap resamples of the target's patients (:func:`criterion_confidence`). When the site
  is not shifted, or the criterion cannot tell, the model comes back unchanged (scale 1) and the card's
  ``adaptation.reason`` says why (:func:`guarded_scale`).

``s`` multiplies the letterbox target: for YOLO (dynamic H/W) the input becomes ``imgsz x s``; for fixed-shape
Faster R-CNN the image is letterboxed to ``imgsz x s`` inside the fixed input, so only ``s <= 1`` (new site's
objects larger than in training) can be applied, and the grid stops at 1.

The adapted folder holds the same ``model.onnx`` (hard link, else a copy) and its card plus an ``adaptation``
block; ``infer``, ``serve`` and ``evaluate`` read it through :class:`pipeline.infer.engine.OnnxDetector`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DetflowError
from pipeline.matching import off_edge

QUANTILES: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
MIN_IMAGES = 8
"""Fewest decodable target images adapt accepts: fewer cannot show a site's size distribution (as the shift test's
minimum sample)."""
MIN_CLASS_DETECTIONS = 5
"""A class counts at a scale only with at least this many confident detections there."""
COARSE_GRID: tuple[float, ...] = tuple(round(2.0 ** (k / 6), 4) for k in range(-6, 7))
FINE_STEP = 2.0 ** (1 / 24)
KEEP_ONE_MARGIN = 0.05
"""1.0 is kept unless another scale's log-size distance is smaller by more than this (about 5 % in size)."""
MIN_YIELD = 0.5
"""A scale is eligible only with at least this fraction of the detections of the most productive scale."""
CONFIDENCE = 0.95
"""The chosen scale replaces 1 only when it is closer to the training sizes in at least this share of bootstrap
resamples of the target images (:func:`criterion_confidence`)."""
BOOTSTRAP_RESAMPLES = 200
SHIFT_ALPHA = 0.05
SHIFT_PERMUTATIONS = 1000


class AdaptError(DetflowError):
    """The target images or the model card cannot support an adaptation."""


# ------------------------------------------------------------------------------------------ size distributions


def distribution(sizes: dict[str, list[float] | np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per class: count and :data:`QUANTILES` of the object sizes (model-input pixels)."""
    out: dict[str, dict[str, Any]] = {}
    for name, values in sizes.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v) & (v > 0)]
        out[name] = {"n": int(v.size),
                     "quantiles_px": [round(float(q), 3) for q in np.quantile(v, QUANTILES)] if v.size else [],
                     "median_px": round(float(np.median(v)), 3) if v.size else None}
    return out


def training_object_sizes(prepared: Path, classes: list[str], imgsz: int) -> dict[str, Any]:
    """The card's record of the training objects' sizes: per class, quantiles of ``sqrt(w*h)`` in model-input pixels
    after the letterbox (box side x ``imgsz / long side``), from the prepared train split's COCO file; boxes touching
    the image edge are left out (:func:`off_edge`)."""
    path = prepared / "coco" / "train.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DetflowError(f"cannot read the training boxes {path}: {e}") from None
    frame = {im["id"]: (float(im["width"]), float(im["height"])) for im in doc.get("images", [])}
    long_sides = [max(wh) for wh in frame.values()]
    sizes: dict[str, list[float]] = {c: [] for c in classes}
    for ann in doc.get("annotations", []):
        k = int(ann["category_id"]) - 1
        x, y, w, h = (float(v) for v in ann["bbox"])
        if 0 <= k < len(classes) and w > 0 and h > 0 and ann["image_id"] in frame \
                and off_edge(np.array([[x, y, x + w, y + h]]), *frame[ann["image_id"]])[0]:
            sizes[classes[k]].append(math.sqrt(w * h) * imgsz / max(frame[ann["image_id"]]))
    return {"measure": "sqrt(w*h) of each box in model-input pixels after the letterbox to imgsz; boxes touching the "
                       "image edge left out", "split": "train",
            "imgsz": imgsz, "quantiles": list(QUANTILES),
            "image_long_side_px": float(np.median(long_sides)) if long_sides else None,
            "per_class": distribution(sizes)}


def distance(reference: dict[str, dict[str, Any]], measured: dict[str, np.ndarray]) -> float | None:
    """Weighted mean over classes of the mean |log quantile difference| (predicted vs training sizes); classes
    with fewer than :data:`MIN_CLASS_DETECTIONS` detections or no training boxes are left out; None when none is
    left. Weights: each class's share of the training boxes."""
    total = weight = 0.0
    for name, ref in reference.items():
        pred = np.asarray(measured.get(name, []), dtype=np.float64)
        pred = pred[np.isfinite(pred) & (pred > 0)]
        if pred.size < MIN_CLASS_DETECTIONS or not ref.get("n"):
            continue
        gap = np.abs(np.log(np.quantile(pred, QUANTILES)) - np.log(np.asarray(ref["quantiles_px"], np.float64)))
        total += ref["n"] * float(gap.mean())
        weight += ref["n"]
    return total / weight if weight else None


@dataclass
class ScaleChoice:
    scale: float
    scores: dict[float, dict[str, Any]]  # scale -> {"distance": float | None, "detections": int}


def stride_grid(imgsz: int, stride: int, low: float = COARSE_GRID[0], high: float = COARSE_GRID[-1]
                ) -> tuple[float, ...]:
    """Every input scale a dynamic-shape model can actually run at between ``low`` and ``high``: the engine rounds
    the letterbox target to a stride multiple (:func:`pipeline.infer.processing.target_size`), so the candidates
    are ``k x stride / imgsz``, each canvas once (and 1, the training size)."""
    ks = range(max(1, math.ceil(low * imgsz / stride - 1e-9)), math.floor(high * imgsz / stride + 1e-9) + 1)
    return tuple(sorted({round(k * stride / imgsz, 4) for k in ks} | {1.0}))


def choose_scale(measure: Callable[[float], dict[str, np.ndarray]], reference: dict[str, dict[str, Any]],
                 grid: tuple[float, ...] = COARSE_GRID, max_scale: float = math.inf, refine: bool = True
                 ) -> ScaleChoice:
    """The input scale whose predicted object sizes best match ``reference`` (see the module docstring).

    ``measure(s)``: class -> sizes (model-input pixels) of the confident detections at input scale ``s``.
    ``refine``: also try 2^(1/24) steps around the grid's best (a geometric grid); off for :func:`stride_grid`,
    which already holds every input the model can run at.
    """
    scores: dict[float, dict[str, Any]] = {}

    def score(s: float) -> None:
        s = round(s, 4)
        if s not in scores:
            sizes = measure(s)
            scores[s] = {"distance": distance(reference, sizes),
                         "detections": int(sum(len(v) for v in sizes.values()))}

    def best() -> float | None:
        top = max(v["detections"] for v in scores.values())
        ok = {s: v["distance"] for s, v in scores.items()
              if v["distance"] is not None and v["detections"] >= MIN_YIELD * top}
        return min(ok, key=lambda s: (ok[s], abs(math.log(s)))) if ok else None

    for s in grid:
        if s <= max_scale:
            score(s)
    coarse = best()
    if coarse is None:
        raise AdaptError(f"the model made fewer than {MIN_CLASS_DETECTIONS} confident detections of every class at "
                         f"every input scale from {min(scores)} to {max(scores)}: there is nothing to calibrate on "
                         "(wrong model for these images, or lower --conf)")
    for k in (-2, -1, 1, 2) if refine else ():
        s = coarse * FINE_STEP ** k
        if min(grid) <= s <= min(max(grid), max_scale):
            score(s)
    chosen = best() or coarse
    one = scores.get(1.0, {}).get("distance")
    if chosen != 1.0 and one is not None and one - scores[chosen]["distance"] <= KEEP_ONE_MARGIN:
        chosen = 1.0
    return ScaleChoice(scale=chosen, scores=dict(sorted(scores.items())))


# ------------------------------------------------------------------------------------------ target images


@dataclass
class TargetImages:
    images: list[np.ndarray]
    names: list[str]
    fingerprint: str  # sha256 over the sorted sha256 of the images' bytes
    skipped: list[dict[str, str]]
    groups: list[str | None] | None = None  # each image's patient (the shift test permutes patients), None: unknown


def load_targets(source: Path, decode: Callable[[bytes], np.ndarray], max_images: int) -> TargetImages:
    """Up to ``max_images`` decodable images of ``source`` (a folder, one file, a .txt list or a COCO .json), in
    name order; undecodable ones are skipped and listed. Fails with one line when fewer than :data:`MIN_IMAGES`."""
    from pipeline.data.imaging import ImageLoadError
    from pipeline.infer.batch import collect_sources, source_groups

    items = collect_sources(source)
    if not items:
        raise AdaptError(f"no images in {source} (looked for JPEG/PNG/TIFF/BMP/WebP and DICOM files)")
    group_of = dict(zip((it[0] for it in items), source_groups(source, items), strict=True))
    images, names, hashes, skipped = [], [], [], []
    for name, _, path in items:
        if len(images) >= max_images:
            break
        try:
            data = path.read_bytes()
            rgb = decode(data)
        except (ImageLoadError, OSError) as e:
            skipped.append({"file": name, "error": str(e)})
            continue
        images.append(rgb)
        names.append(name)
        hashes.append(hashlib.sha256(data).hexdigest())
    if len(images) < MIN_IMAGES:
        bad = f"; {len(skipped)} could not be decoded (first: {skipped[0]['file']}: {skipped[0]['error']})" \
            if skipped else ""
        raise AdaptError(f"{source}: {len(images)} usable images, adapt needs at least {MIN_IMAGES}{bad}")
    fingerprint = hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()
    return TargetImages(images, names, fingerprint, skipped, [group_of.get(n) for n in names])


# ------------------------------------------------------------------------------------------ the command


def predicted_sizes_per_image(detector: Any, images: list[np.ndarray], conf: float, batch: int = 8
                              ) -> list[dict[str, np.ndarray]]:
    """Per image: class -> ``sqrt(w*h)`` in model-input pixels of the detections above ``conf``, at the detector's
    current scaling (the same :func:`~pipeline.infer.processing.target_size` the engine letterboxes with);
    detections touching the image edge are left out (:func:`off_edge`)."""
    from pipeline.infer.processing import target_size

    out: list[dict[str, np.ndarray]] = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        for im, dets in zip(chunk, detector.predict(chunk, conf=conf), strict=True):
            ratio = target_size(im, detector.imgsz, detector.scaling, fixed=not detector.stride,
                                stride=detector.stride) / max(im.shape[:2])
            inner = off_edge(dets.boxes, im.shape[1], im.shape[0])
            wh = (dets.boxes[inner, 2:] - dets.boxes[inner, :2]).clip(0)
            sizes, labels = np.sqrt(wh[:, 0] * wh[:, 1]) * ratio, dets.labels[inner]
            out.append({c: sizes[labels == k].astype(np.float64) for k, c in enumerate(detector.classes)})
    return out


def pooled(per_image: list[dict[str, np.ndarray]], rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Class -> the sizes of every image (of ``rows``, repeats allowed: a bootstrap resample)."""
    picked = per_image if rows is None else [per_image[i] for i in rows]
    names = list(per_image[0]) if per_image else []
    return {c: np.concatenate([p[c] for p in picked]) if picked else np.zeros(0) for c in names}


def predicted_sizes(detector: Any, images: list[np.ndarray], conf: float, batch: int = 8) -> dict[str, np.ndarray]:
    """Class -> sizes of the confident detections of every image (:func:`predicted_sizes_per_image`, pooled)."""
    return pooled(predicted_sizes_per_image(detector, images, conf, batch)) or {c: np.zeros(0)
                                                                               for c in detector.classes}


def criterion_confidence(at_one: list[dict[str, np.ndarray]], at_chosen: list[dict[str, np.ndarray]],
                         reference: dict[str, dict[str, Any]], groups: list[str | None] | None = None,
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Can the size criterion tell the chosen scale from 1? Bootstrap over the target's patients (an image
    without one is its own): the improvement ``distance(1) - distance(chosen)`` in each resample of the same
    images at both scales. ``decisive`` when its :data:`CONFIDENCE` lower quantile is above 0, i.e. the chosen
    scale is closer to the training sizes in at least that share of the resamples (a resample where a class has too
    few detections to measure counts against it)."""
    labels = [g if g is not None else f"#{i}" for i, g in enumerate(groups or [None] * len(at_one))]
    units: dict[str, list[int]] = {}
    for i, g in enumerate(labels):
        units.setdefault(g, []).append(i)
    members = list(units.values())
    if not members:
        return {"improvement_lower": None, "share_closer": 0.0, "resamples": 0, "confidence": CONFIDENCE,
                "units": 0, "decisive": False}
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(resamples):
        rows = np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
        d1, dc = distance(reference, pooled(at_one, rows)), distance(reference, pooled(at_chosen, rows))
        gains.append(-math.inf if d1 is None or dc is None else d1 - dc)
    g = np.asarray(gains)
    low = float(np.quantile(g, 1 - CONFIDENCE))
    return {"improvement_lower": round(low, 4) if math.isfinite(low) else None,
            "share_closer": round(float(np.mean(g > 0)), 4), "resamples": resamples, "confidence": CONFIDENCE,
            "units": len(members), "decisive": bool(math.isfinite(low) and low > 0)}


def _summary(sizes: dict[str, np.ndarray], scale: float) -> dict[str, Any]:
    return {"input_scale": scale, "detections": int(sum(len(v) for v in sizes.values())),
            "per_class": distribution(sizes)}


def guarded_scale(shift: dict[str, Any], choice: ScaleChoice | None, criterion: dict[str, Any] | None
                  ) -> tuple[float, str | None]:
    """The input scale object-scale calibration applies, and why it is 1 when it is (None: a scale was chosen and
    applied). The model is left unchanged when the shift test finds the site not shifted (``choice`` is then None:
    nothing was searched), when the size criterion prefers no scale to 1, or when it cannot tell its choice from 1
    (``criterion``, :func:`criterion_confidence`, not decisive)."""
    if choice is None:
        return 1.0, (f"the shift test finds no shift from the training images (p = {shift['p_value']:.3g} >= alpha "
                     f"{shift.get('alpha', SHIFT_ALPHA)}): nothing to adapt, the model is left unchanged")
    if choice.scale == 1.0:
        what = "the site is shifted, but" if shift.get("tested") else "the shift test did not run, and"
        return 1.0, (f"{what} no input scale matches the training object sizes better than 1 by more than "
                     f"{KEEP_ONE_MARGIN} (log size): the model is left unchanged")
    if criterion is None or not criterion.get("decisive"):
        share = (criterion or {}).get("share_closer")
        return 1.0, (f"the size criterion cannot tell input scale {choice.scale:.4g} from 1: it is closer to the "
                     f"training sizes in {share:.0%} of bootstrap resamples of the images (needs {CONFIDENCE:.0%})"
                     if share is not None else f"the size criterion cannot tell input scale {choice.scale:.4g} from 1")\
            + "; the model is left unchanged"
    return choice.scale, None


def site_shift(detector: Any, scaling: Any, targets: TargetImages) -> dict[str, Any]:
    """The shift test (:mod:`pipeline.shift`, as `detflow shift` runs it: one image per model call, the base
    model's letterbox, patients permuted whole) of the target images against the card's reference sample; a dict
    for the card, ``tested: False`` with the reason when the model cannot be tested (no embeddings)."""
    from pipeline.infer.batch import shift_test
    from pipeline.infer.engine import EmbeddingsUnavailable
    from pipeline.shift import ShiftError

    reason = detector.embeddings_unavailable()
    if reason is None:
        try:
            detector.scaling = scaling
            vectors = [detector.predict_with_embeddings([im])[1][0] for im in targets.images]
            result, doc, _, _ = shift_test(detector, vectors, groups=targets.groups, alpha=SHIFT_ALPHA,
                                           n_permutations=SHIFT_PERMUTATIONS)
            return {"tested": True, **{k: doc[k] for k in ("method", "statistic", "p_value", "alpha", "shifted",
                                                            "n_reference", "n_target", "permutation_unit")
                                       if k in doc}}
        except (EmbeddingsUnavailable, ShiftError, DetflowError) as e:
            reason = str(e)
    return {"tested": False, "reason": f"{reason}; the size criterion alone decides"}


@dataclass
class AdaptResult:
    out_dir: Path
    adaptation: dict[str, Any]


def _companions(card: dict[str, Any]) -> list[str]:
    """Files the card names next to the model (the shift test's reference sample and its patients, a few-shot
    model's checkpoint)."""
    ref = (card.get("embedding") or {}).get("reference") if isinstance(card.get("embedding"), dict) else None
    ckpt = card.get("checkpoint") if isinstance(card.get("checkpoint"), dict) else {}
    names = [ckpt.get("file")]  # a few-shot folder's own checkpoint
    if isinstance(ref, dict):
        names += [ref.get("file"), (ref.get("groups") or {}).get("file") if isinstance(ref.get("groups"), dict)
                  else None]
    own = ("model.onnx", "model_card.json")
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in own]


def _publish(folder: Path, model_name: str, card: dict[str, Any], out_dir: Path) -> None:
    """The adapted model folder: ``model.onnx`` (hard link, else copy), the files the card names beside it (from the
    base model's published ``folder``, the one the engine read), and the adapted card, switched whole by one atomic
    rename, as export publishes (readers never pair the adapted card with another folder's files)."""
    from pipeline.contracts.card import validate_card
    from pipeline.fileio import atomic_directory, sha256_file

    validate_card(card, "the adapted model card")  # the one schema the engine reads

    sources = {"model.onnx": folder / model_name, **{n: folder / n for n in _companions(card)
                                                     if (folder / n).is_file()}}
    with atomic_directory(out_dir) as stage:
        for name, src in sources.items():
            try:
                os.link(src, stage / name)
            except FileNotFoundError:
                raise AdaptError(f"the base model folder {folder} was replaced while adapting (a new export); run "
                                 "`detflow adapt` again") from None
            except OSError:
                shutil.copyfile(src, stage / name)
        if sha256_file(stage / "model.onnx") != card.get("sha256"):
            raise AdaptError(f"the base model in {folder} changed while adapting (a new export); run `detflow adapt` "
                             "again")
        (stage / "model_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def adapt_model(model: Path, source: Path, out_dir: Path, *, pixel_size: float | None = None,
                train_pixel_size: float | None = None, conf: float | None = None, max_images: int = 64,
                providers: str = "CPUExecutionProvider") -> AdaptResult:
    """Choose the adaptation for the images of ``source`` and write the adapted model folder ``out_dir``."""
    from pipeline.infer.engine import OnnxDetector
    from pipeline.infer.processing import InputScaling

    for value, flag in ((pixel_size, "--pixel-size"), (train_pixel_size, "--train-pixel-size")):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise AdaptError(f"{flag} must be a positive number, got {value}")
    if max_images < MIN_IMAGES:
        raise AdaptError(f"--max-images must be at least {MIN_IMAGES}, got {max_images}")
    model = Path(model)
    if out_dir.resolve() == model.parent.resolve():
        raise AdaptError(f"--out {out_dir} is the model's own folder; write the adapted model to a new folder")
    detector = OnnxDetector(model, providers=providers)
    targets = load_targets(source, lambda data: detector.decode(data).rgb, max_images)
    card = {k: v for k, v in detector.card.items() if k != "adaptation"}  # adapt the base model, not an adaptation
    prior = detector.card.get("adaptation") if isinstance(detector.card.get("adaptation"), dict) else {}
    # a few-shot model's weights are its own: its fine-tuning record stays with it (an input scale does not stack)
    fine_tuned = prior if prior.get("method") == "few_shot" else None
    sizes_card = (card.get("training_data") or {}).get("object_sizes") or {}
    reference = sizes_card.get("per_class") or {}
    if not reference or not any(r.get("n") for r in reference.values()) \
            or not (card.get("training_data") or {}).get("image_long_side_px"):
        raise AdaptError(f"model card {detector.card_path} records no training object sizes (exported before "
                         "`detflow adapt` existed, or no training boxes); re-export the model")
    base = InputScaling.from_card(card)
    detector.scaling = base
    if (pixel_size is not None or train_pixel_size is not None) and base.train_spacing is None \
            and train_pixel_size is None:
        raise AdaptError(f"model card {detector.card_path} records no training pixel spacing (not DICOM); "
                         "give the training images' pixel size with --train-pixel-size, in the unit of --pixel-size")
    if train_pixel_size is not None and pixel_size is None:
        raise AdaptError("--train-pixel-size needs --pixel-size (the new site's pixel size, same unit)")
    threshold = detector.conf if conf is None else conf

    def per_image_at(scaling: InputScaling) -> list[dict[str, np.ndarray]]:
        detector.scaling = scaling
        return predicted_sizes_per_image(detector, targets.images, threshold)

    def sizes_at(scaling: InputScaling) -> dict[str, np.ndarray]:
        return pooled(per_image_at(scaling)) or {c: np.zeros(0) for c in detector.classes}

    tagged = sum(getattr(im, "pixel_spacing", None) is not None for im in targets.images)
    params: dict[str, Any] = {"conf": threshold}
    scores = None
    changed_reason: str | None = None  # why an estimated adaptation was not applied (the model is left unchanged)
    shift: dict[str, Any] | None = None
    criterion: dict[str, Any] | None = None
    if pixel_size is not None:
        method = "pixel_size"
        adapted = replace(base, pixel_size=pixel_size,
                          train_spacing=train_pixel_size if train_pixel_size is not None else base.train_spacing)
        before = sizes_at(InputScaling())
        params.update({"pixel_size": pixel_size, "train_pixel_size": adapted.train_spacing,
                       "images_with_own_spacing": tagged})
    elif tagged == len(targets.images) and base.train_spacing is not None:
        method, adapted = "pixel_spacing", base
        before = sizes_at(InputScaling())
        params.update({"train_pixel_spacing_mm": base.train_spacing})
    else:
        method = "object_scale"
        shift = site_shift(detector, base, targets)
        measured_per = {1.0: per_image_at(base)}
        before = pooled(measured_per[1.0]) or {c: np.zeros(0) for c in detector.classes}
        params.update({"shift_alpha": SHIFT_ALPHA, "confidence": CONFIDENCE,
                       "bootstrap_resamples": BOOTSTRAP_RESAMPLES})
        choice = None
        if not shift.get("tested") or shift["shifted"]:
            def measure(s: float) -> dict[str, np.ndarray]:
                if s not in measured_per:
                    measured_per[s] = per_image_at(replace(base, scale=s))
                return pooled(measured_per[s]) or {c: np.zeros(0) for c in detector.classes}

            if detector.stride:  # every canvas the engine can run at, each once
                grid, refine = stride_grid(detector.imgsz, detector.stride), False
                choice = choose_scale(measure, reference, grid, refine=False)
            else:  # a fixed input: letterboxed smaller inside it, no magnification
                grid, refine = tuple(s for s in COARSE_GRID if s <= 1.0), True
                choice = choose_scale(measure, reference, grid, max_scale=1.0)
            scores = {str(s): v for s, v in choice.scores.items()}
            params.update({"grid": list(grid), "fine_step": FINE_STEP if refine else None,
                           "keep_one_margin": KEEP_ONE_MARGIN, "min_yield": MIN_YIELD,
                           "min_class_detections": MIN_CLASS_DETECTIONS})
            if choice.scale != 1.0:
                criterion = {"scale": choice.scale, **criterion_confidence(
                    measured_per[1.0], measured_per[choice.scale], reference, targets.groups)}
        scale, changed_reason = guarded_scale(shift, choice, criterion)
        adapted = replace(base, scale=scale)
    after = sizes_at(adapted)
    changed = adapted != base
    if method == "pixel_spacing":
        changed_reason = ("every image states its DICOM PixelSpacing: the engine already letterboxes each one at the "
                          "training spacing, so the adapted model behaves as the base model")
    adaptation = {
        "method": method, "input_scale": adapted.scale, "changed": changed, "reason": changed_reason,
        "shift": shift, "criterion": criterion,
        "pixel_size": pixel_size, "train_pixel_size": train_pixel_size,
        "parameters": params, "scores": scores,
        "n_images": len(targets.images), "n_skipped": len(targets.skipped), "source": str(source),
        "target_fingerprint": targets.fingerprint,
        "before": _summary(before, 1.0), "after": _summary(after, adapted.scale),
        "reference": {c: {"n": r.get("n"), "median_px": r.get("median_px")} for c, r in reference.items()},
        "base_model": {"path": str(model), "sha256": card.get("sha256"), "version": card.get("version")},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if fine_tuned:
        adaptation["fine_tuned"] = fine_tuned
    _publish(detector.folder, Path(os.path.realpath(detector.model_path)).name, {**card, "adaptation": adaptation},
             out_dir)
    return AdaptResult(out_dir, adaptation)
