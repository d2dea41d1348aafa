"""Detection metrics, every statistic detflow reports: COCO mAP (pycocotools), FROC with CPM, the patient
bootstrap (mAP50, CPM, per-class AP50 intervals and the FROC band, in one pass), P/R/F1, confusion matrix, and the
worst cases (missed lesions, confident false positives).

COCO numbers come from pycocotools itself. FROC and the bootstrap have no maintained library with the
semantics medical detection needs (one hit per lesion, FP per image over all images, patient resampling), so
they are written here, on top of per-image matches computed once. The evaluate stage writes them
(``reports/metrics.json``, ``reports/eval/statistics.json``); the report only reads them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.matching import greedy_match, pairwise_iou

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class ImageDets:
    """Ground truth and detections for one image (pixel xyxy, 0-based class indices)."""

    image_id: int
    patient: str
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def to_coco_results(images: Sequence[ImageDets]) -> list[dict]:
    """Detections in COCO results format (category ids are 1-based, bbox xywh)."""
    out = []
    for im in images:
        for (x1, y1, x2, y2), s, c in zip(im.boxes, im.scores, im.labels, strict=True):
            out.append({"image_id": int(im.image_id), "category_id": int(c) + 1,
                        "bbox": [round(float(x1), 3), round(float(y1), 3), round(float(x2 - x1), 3),
                                 round(float(y2 - y1), 3)], "score": round(float(s), 5)})
    return out


def coco_metrics(gt: dict, results: list[dict], class_names: Sequence[str]) -> dict:
    """mAP50-95, mAP50 and per-class AP50 / AP50-95 from pycocotools' COCOeval (stdout silenced)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else COCO()
        if not results:
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [T=10 IoU, R=101, K, A=4 area ranges, M=3 maxDets]; -1 = no GT

    def ap(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(p.mean()) if p.size else float("nan")

    cat_ids = ev.params.catIds
    per_class = {}
    for k, cid in enumerate(cat_ids):
        name = class_names[cid - 1]
        per_class[name] = {"ap50": ap(precision[0, :, k, 0, -1]), "ap50_95": ap(precision[:, :, k, 0, -1])}
    return {"map50_95": float(ev.stats[0]), "map50": float(ev.stats[1]), "per_class": per_class,
            "_precision": precision}


# --------------------------------------------------------------------------------------------- FROC


def _froc_hits(im: ImageDets, iou_thr: float) -> tuple[np.ndarray, np.ndarray, int]:
    """One image's FROC inputs: the scores and hit flags of the detections that count, and its lesion count.

    A detection hits a lesion of its class; LUNA16 convention: further hits on an already-found lesion are
    neither TP nor FP, so they are left out.
    """
    m = greedy_match(im.boxes, im.scores, im.gt_boxes, iou_thr=iou_thr, labels=im.labels, target_labels=im.gt_labels)
    keep = ~m.rehit
    return im.scores[keep], m.matched[keep], len(im.gt_boxes)


def _pooled(parts: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per-image FROC inputs pooled: (scores, hits, lesions, images)."""
    return (np.concatenate([p[0] for p in parts] or [np.zeros(0)]),
            np.concatenate([p[1] for p in parts] or [np.zeros(0, bool)]), sum(p[2] for p in parts), len(parts))


@dataclass
class FrocCurve:
    fp_per_image: np.ndarray
    sensitivity: np.ndarray
    points: dict[float, float]
    cpm: float


def froc(images: Sequence[ImageDets], iou_thr: float = 0.1,
         fp_rates: Sequence[float] = FROC_FP_RATES) -> FrocCurve:
    """Sensitivity vs false positives per image, and sensitivity at each ``fp_rates`` point (CPM = mean).

    A detection hits a lesion of its class with IoU >= ``iou_thr``; each lesion is hit at most once.
    Every image counts in the FP rate, including images without lesions. The sensitivity at rate f is the
    highest reached while FPs per image stay <= f (thresholds swept over all detection scores).
    """
    return _froc_from_arrays(*_pooled([_froc_hits(im, iou_thr) for im in images]), fp_rates)


def _froc_from_arrays(scores: np.ndarray, hits: np.ndarray, n_lesions: int, n_images: int,
                      fp_rates: Sequence[float]) -> FrocCurve:
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    fp = np.cumsum(~hits[order])
    # only thresholds between distinct scores are reachable
    distinct = np.r_[scores[order][1:] != scores[order][:-1], True] if len(scores) else np.zeros(0, bool)
    sens = np.r_[0.0, tp[distinct] / max(n_lesions, 1)]
    fppi = np.r_[0.0, fp[distinct] / max(n_images, 1)]
    points = {}
    for f in fp_rates:
        ok = fppi <= f
        points[float(f)] = float(sens[ok].max()) if ok.any() else 0.0
    cpm = float(np.mean(list(points.values())))
    return FrocCurve(fppi, sens, points, cpm)


# --------------------------------------------------------------------------------------------- AP (bootstrap)


def _coco_ap(scores: np.ndarray, tps: np.ndarray, n_gt: int) -> float:
    """COCO's 101-point interpolated AP from pooled detections (same maths as COCOeval.accumulate)."""
    if n_gt == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(tps[order]).astype(np.float64)
    fp = np.cumsum(~tps[order]).astype(np.float64)
    rc = tp / n_gt
    pr = tp / np.maximum(tp + fp, np.spacing(1))
    pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr
    rec_thrs = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(rc, rec_thrs, side="left")
    q = np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)] if len(pr) else 0.0, 0.0)
    return float(np.mean(q))


@dataclass
class _ImageAP:
    """Per-image, per-class COCO-style matches at IoU 0.5 (computed once, reused by every resample)."""

    scores: dict[int, np.ndarray]
    tps: dict[int, np.ndarray]
    n_gt: dict[int, int]


def _coco_style_matches(im: ImageDets, n_classes: int, max_dets: int = 100) -> _ImageAP:
    scores, tps, n_gt = {}, {}, {}
    for c in range(n_classes):
        g = im.gt_boxes[im.gt_labels == c]
        sel = im.labels == c
        s, b = im.scores[sel], im.boxes[sel]
        order = np.argsort(-s, kind="mergesort")[:max_dets]
        s, b = s[order], b[order]
        tp = greedy_match(b, s, g, iou_thr=0.5).matched  # already one class; s is sorted, the order stays
        scores[c], tps[c], n_gt[c] = s, tp, len(g)
    return _ImageAP(scores, tps, n_gt)


def map50_from_matches(per_image: Sequence[_ImageAP], n_classes: int) -> float:
    aps = []
    for c in range(n_classes):
        n = sum(m.n_gt[c] for m in per_image)
        if n == 0:
            continue
        s = np.concatenate([m.scores[c] for m in per_image])
        t = np.concatenate([m.tps[c] for m in per_image])
        aps.append(_coco_ap(s, t, n))
    return float(np.mean(aps)) if aps else float("nan")


def _interval(values: Sequence[float]) -> list[float] | None:
    """The 95 % percentile interval of the finite values (rounded to 4 places); None when there are none."""
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    return [round(float(np.percentile(a, 2.5)), 4), round(float(np.percentile(a, 97.5)), 4)] if a.size else None


def patient_bootstrap(images: Sequence[ImageDets], n_classes: int, froc_iou: float, n_resamples: int = 1000,
                      seed: int = 0, fp_rates: Sequence[float] = FROC_FP_RATES) -> dict:
    """95 % percentile intervals, resampling *patients* with replacement, in one pass over the same draws: mAP50
    and CPM (``map50``, ``cpm``: ``[nan, nan]`` when no resample has a value), AP50 per class (``per_class_ap50``,
    None for a class without ground truth in every resample) and the FROC band at ``fp_rates``
    (``froc_low``/``froc_high``).

    Images of one patient are correlated; resampling them as a unit keeps the interval honest.
    """
    rng = np.random.default_rng(seed)
    patients = sorted({im.patient for im in images})
    by_patient = {p: [i for i, im in enumerate(images) if im.patient == p] for p in patients}
    ap_matches = [_coco_style_matches(im, n_classes) for im in images]
    froc_parts = [_froc_hits(im, froc_iou) for im in images]
    maps, cpms, sens = [], [], []
    per_class: list[list[float]] = [[] for _ in range(n_classes)]
    for _ in range(n_resamples):
        chosen = rng.integers(0, len(patients), len(patients))
        idx = [i for k in chosen for i in by_patient[patients[k]]]
        parts = [ap_matches[i] for i in idx]
        aps = []
        for c in range(n_classes):
            n_gt = sum(m.n_gt[c] for m in parts)
            if n_gt:
                ap = _coco_ap(np.concatenate([m.scores[c] for m in parts]),
                              np.concatenate([m.tps[c] for m in parts]), n_gt)
                per_class[c].append(ap)
                aps.append(ap)
        maps.append(float(np.mean(aps)) if aps else float("nan"))  # = map50_from_matches(parts, n_classes)
        curve = _froc_from_arrays(*_pooled([froc_parts[i] for i in idx]), fp_rates)
        cpms.append(curve.cpm)
        sens.append([curve.points[float(f)] for f in fp_rates])
    band = np.asarray(sens, dtype=np.float64).reshape(-1, len(fp_rates))
    nan2 = [float("nan"), float("nan")]
    return {"map50": _interval(maps) or nan2, "cpm": _interval(cpms) or nan2,
            "per_class_ap50": [_interval(v) for v in per_class], "fp_per_image": [float(f) for f in fp_rates],
            "froc_low": [round(float(np.nanpercentile(band[:, j], 2.5)), 4) for j in range(band.shape[1])],
            "froc_high": [round(float(np.nanpercentile(band[:, j], 97.5)), 4) for j in range(band.shape[1])],
            "n_resamples": n_resamples, "seed": seed, "unit": "patient"}


def bootstrap_ci(images: Sequence[ImageDets], n_classes: int, froc_iou: float, n_resamples: int = 1000,
                 seed: int = 0, fp_rates: Sequence[float] = FROC_FP_RATES) -> dict[str, list[float]]:
    """95% percentile intervals for mAP50 and CPM, resampling *patients* with replacement (the part of
    :func:`patient_bootstrap` that ``reports/metrics.json`` carries)."""
    boot = patient_bootstrap(images, n_classes, froc_iou, n_resamples, seed, fp_rates)
    return {k: boot[k] for k in ("map50", "cpm", "n_resamples", "unit")}


# --------------------------------------------------------------------------------------------- worst cases

MAX_CASES = 6  # worst false negatives, and as many false positives


def worst_cases(images: Sequence[ImageDets], conf: float, max_cases: int = MAX_CASES) -> dict[str, list[dict]]:
    """The worst false negatives (missed lesions, those the model scored lowest first) and false positives (the
    most confident detections that match nothing) at the operating threshold ``conf``, class-aware at IoU 0.5.

    Each case: ``image_id``, ``cls`` (0-based), ``score`` (a missed lesion's: the best same-class detection
    overlapping it at IoU >= 0.1, else 0), ``box`` (xyxy), and what a picture of it needs: the image's
    ``gt_boxes`` and its ``detections`` at or above ``conf`` (``box``, ``label``, ``score``)."""
    fns, fps = [], []
    for n, im in enumerate(images):
        keep = im.scores >= conf
        b, s, lab = im.boxes[keep], im.scores[keep], im.labels[keep]
        m = greedy_match(b, s, im.gt_boxes, iou_thr=0.5, labels=lab, target_labels=im.gt_labels)
        hit = {int(t) for t in m.target if t >= 0}
        for g in range(len(im.gt_boxes)):
            if g not in hit:
                same = im.labels == im.gt_labels[g]
                iou = pairwise_iou(im.gt_boxes[g:g + 1], im.boxes[same])[0] if same.any() else np.zeros(0)
                best = float(im.scores[same][iou >= 0.1].max()) if (iou >= 0.1).any() else 0.0
                fns.append({"n": n, "box": im.gt_boxes[g], "cls": int(im.gt_labels[g]), "score": best})
        for d in np.flatnonzero(m.target < 0):
            fps.append({"n": n, "box": b[d], "cls": int(lab[d]), "score": float(s[d])})
    fns.sort(key=lambda c: (c["score"], -float(np.prod(c["box"][2:] - c["box"][:2]))))
    fps.sort(key=lambda c: -c["score"])

    def case(c: dict) -> dict:
        im = images[c["n"]]
        keep = im.scores >= conf
        return {"image_id": int(im.image_id), "cls": c["cls"], "score": round(c["score"], 4),
                "box": [round(float(v), 3) for v in c["box"]],
                "gt_boxes": [[round(float(v), 3) for v in bx] for bx in im.gt_boxes],
                "detections": [{"box": [round(float(v), 3) for v in bx], "label": int(lb), "score": round(float(sc), 4)}
                               for bx, sc, lb in zip(im.boxes[keep], im.scores[keep], im.labels[keep], strict=True)]}

    return {"fn": [case(c) for c in fns[:max_cases]], "fp": [case(c) for c in fps[:max_cases]]}


# --------------------------------------------------------------------------------------------- operating point


def operating_point(images: Sequence[ImageDets], n_classes: int, conf: float, iou_thr: float = 0.5) -> dict:
    """Precision, recall and F1 of detections with score >= conf (class-aware, IoU >= iou_thr), plus the
    confusion matrix (rows: true class or background; columns: predicted class or background)."""
    tp = fp = fn = 0
    bg = n_classes
    confusion = np.zeros((n_classes + 1, n_classes + 1), dtype=np.int64)
    for im in images:
        keep = im.scores >= conf
        b, s, lab = im.boxes[keep], im.scores[keep], im.labels[keep]
        n_tp = int(greedy_match(b, s, im.gt_boxes, iou_thr=iou_thr, labels=lab, target_labels=im.gt_labels)
                   .matched.sum())
        tp += n_tp
        fp += len(s) - n_tp
        fn += len(im.gt_boxes) - n_tp
        # confusion: class-agnostic matching, so a right box with the wrong class shows up off-diagonal
        agn = greedy_match(b, s, im.gt_boxes, iou_thr=iou_thr).target
        hit_gt = set()
        for d, g in enumerate(agn):
            if g >= 0:
                confusion[im.gt_labels[g], lab[d]] += 1
                hit_gt.add(int(g))
            else:
                confusion[bg, lab[d]] += 1
        for g in range(len(im.gt_boxes)):
            if g not in hit_gt:
                confusion[im.gt_labels[g], bg] += 1
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"conf": conf, "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "tp": tp, "fp": fp, "fn": fn, "_confusion": confusion}
