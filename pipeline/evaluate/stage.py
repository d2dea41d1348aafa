"""The ``detflow evaluate`` stage: one evaluator for every model family: COCO + FROC metrics, the patient bootstrap
and the worst cases (every statistic the report shows, written here as DVC outputs), plots, the promotion gate."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.config import Params
from pipeline.errors import DataError, DetflowError
from pipeline.fileio import atomic_write_json

if TYPE_CHECKING:
    from pipeline.infer.processing import InputScaling


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    gate: dict[str, Any]
    seconds: float


def load_split(prepared: Path, split: str) -> tuple[dict, list[str]]:
    path = prepared / "coco" / f"{split}.json"
    if not path.is_file():
        raise DataError(f"{path} not found; run `detflow prepare` (or `dvc repro`)")
    gt = json.loads(path.read_text())
    classes = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    return gt, classes


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def is_prepared(data: Path, split: str) -> bool:
    """A folder written by ``detflow prepare`` (its COCO split file and provenance are there)."""
    return (data / "prepare_info.json").is_file() and (data / "coco" / f"{split}.json").is_file()


@dataclass
class Scorer:
    """A model of either kind behind one call: ``predict(list[rgb]) -> list[Detections]`` at scoring settings
    (confidence 0.001, the evaluation NMS IoU), so a checkpoint and its ONNX export are measured the same way.

    ``scaling``: how the model letterboxes an image that carries a pixel spacing
    (:func:`pipeline.data.imaging.with_spacing`): the card's, for the ONNX engine; None when it ignores the
    spacing (a checkpoint records no training pixel spacing, so it letterboxes every image to ``imgsz``)."""

    predict: Callable[[list[np.ndarray]], list]
    classes: list[str]
    info: dict[str, Any]
    scaling: InputScaling | None = None


def load_scorer(model_path: Path, params: Params) -> Scorer:
    """``.onnx`` -> the deployment engine (:class:`pipeline.infer.OnnxDetector`, card beside it); anything else ->
    the checkpoint through its family's inference loader."""
    model_path = Path(model_path)
    iou = params.evaluate.nms_iou
    if model_path.suffix.lower() == ".onnx":
        from pipeline.infer.engine import OnnxDetector

        onnx = OnnxDetector(model_path)
        return Scorer(lambda rgbs: onnx.predict(rgbs, conf=0.001, iou=iou), list(onnx.classes),
                      {"family": onnx.family, "imgsz": onnx.imgsz, "path": str(model_path), "format": "onnx",
                       "sha256": onnx.card["sha256"]}, scaling=onnx.scaling)
    from pipeline.evaluate.predict import TorchDetector

    torch_model = TorchDetector.load(model_path)
    return Scorer(lambda rgbs: torch_model.predict(rgbs, conf=0.001, iou=iou), torch_model.classes,
                  {"family": torch_model.family.name, "imgsz": torch_model.imgsz, "path": str(model_path),
                   "format": "checkpoint"})


def score_detector(predict: Any, prepared: Path, split: str, classes: list[str], params: Params,
                   progress: bool = True, keep_images: int = 0) -> tuple[list, list, dict]:
    """Run ``predict(list[rgb]) -> list[Detections]`` over a split; return ImageDets, kept images, GT."""
    gt, _ = load_split(prepared, split)
    images, kept = score_coco(predict, gt, prepared, params, progress, keep_images, desc=f"evaluating {split}")
    return images, kept, gt


def score_coco(predict: Any, gt: dict, root: Path, params: Params, progress: bool = True, keep_images: int = 0,
               desc: str = "evaluating", spacing: bool = False) -> tuple[list, list]:
    """Run ``predict`` over the images of a COCO document (``file_name`` relative to ``root``); ImageDets with
    0-based labels (category id - 1) and the first ``keep_images`` images.

    ``spacing``: hand each image over with the ``pixel_spacing`` its entry records (prepare keeps the DICOM
    ``PixelSpacing`` there; the PNG lost it), so a spacing-aware model sees it as it does when it decodes the DICOM.
    """
    from pipeline.data.imaging import with_spacing
    from pipeline.evaluate.metrics import ImageDets

    ev = params.evaluate
    anns: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    out: list[ImageDets] = []
    kept: list[np.ndarray] = []
    entries = gt["images"]
    bar = tqdm(total=len(entries), desc=desc, unit="img", disable=not progress)
    for start in range(0, len(entries), ev.batch):
        chunk = entries[start:start + ev.batch]
        rgbs = [_read_rgb(root / e["file_name"]) for e in chunk]
        if spacing:
            rgbs = [with_spacing(rgb, e.get("pixel_spacing")) for e, rgb in zip(chunk, rgbs, strict=True)]
        dets = predict(rgbs)
        for e, rgb, d in zip(chunk, rgbs, dets, strict=True):
            a = anns.get(e["id"], [])
            gb = np.array([[x, y, x + w, y + h] for x, y, w, h in (q["bbox"] for q in a)], dtype=np.float64)
            out.append(ImageDets(image_id=e["id"], patient=str(e.get("patient", e["id"])),
                                 gt_boxes=gb.reshape(-1, 4), gt_labels=np.array([q["category_id"] - 1 for q in a],
                                                                                dtype=np.int64),
                                 boxes=d.boxes, scores=d.scores, labels=d.labels))
            if len(kept) < keep_images:
                kept.append(rgb)
        bar.update(len(chunk))
    bar.close()
    return out, kept


def compute_metrics(images: list, gt: dict, classes: list[str], params: Params) -> tuple[dict, dict]:
    """All metric keys of reports/metrics.json, plus private arrays for the plots."""
    from pipeline.evaluate.metrics import (
        FROC_FP_RATES,
        coco_metrics,
        froc,
        operating_point,
        patient_bootstrap,
        to_coco_results,
    )

    ev = params.evaluate
    results = to_coco_results(images)
    coco = coco_metrics(gt, results, classes)
    curve = froc(images, ev.froc_iou)
    op = operating_point(images, len(classes), ev.conf)
    boot = patient_bootstrap(images, len(classes), ev.froc_iou, ev.bootstrap, ev.seed) if ev.bootstrap else None
    ci = boot or {"map50": [float("nan")] * 2, "cpm": [float("nan")] * 2}
    metrics = {
        "map50_95": round(coco["map50_95"], 6),
        "map50": round(coco["map50"], 6),
        "per_class": {k: {m: round(v, 6) for m, v in d.items()} for k, d in coco["per_class"].items()},
        "froc": {"fp_per_image": list(FROC_FP_RATES), "sensitivity": [round(curve.points[f], 6)
                                                                        for f in FROC_FP_RATES],
                 "cpm": round(curve.cpm, 6), "iou": ev.froc_iou},
        "ci95": {"map50": ci["map50"], "cpm": ci["cpm"], "resamples": ev.bootstrap, "unit": "patient"},
        "operating_point": {k: v for k, v in op.items() if not k.startswith("_")},
        "n_images": len(images),
        "n_patients": len({im.patient for im in images}),
        "n_lesions": int(sum(len(im.gt_boxes) for im in images)),
        "split": ev.split,
    }
    private = {"precision": coco["_precision"], "froc": curve, "confusion": op["_confusion"], "results": results,
               "bootstrap": boot}
    return metrics, private


#: The statistics the report shows beyond metrics.json (per-class intervals, FROC band, worst cases).
STATISTICS = "eval/statistics.json"


def statistics(images: list, gt: dict, classes: list[str], metrics: dict, boot: dict | None,
               params: Params) -> dict[str, Any]:
    """``reports/eval/statistics.json``: the patient bootstrap (per-class AP50 intervals and the FROC band beside
    metrics.json's mAP50 / CPM intervals, from the same draws) and the worst cases with the file each is on."""
    from pipeline.evaluate.metrics import worst_cases

    files = {e["id"]: e["file_name"] for e in gt["images"]}
    conf = float(metrics["operating_point"]["conf"])
    cases = worst_cases(images, conf)
    for case in (*cases["fn"], *cases["fp"]):
        case["file"] = files.get(case["image_id"], "")
    return {"split": metrics["split"], "classes": classes, "conf": conf, "froc_iou": params.evaluate.froc_iou,
            "bootstrap": boot, "cases": cases}


def evaluate_model(params: Params, model_path: Path, prepared: Path, reports: Path,
                   progress: bool = True) -> EvaluationResult:
    """Score the model (checkpoint or ONNX) on ``evaluate.split``; write metrics, statistics, plots, preview and the
    gate verdict.

    Raises :class:`GateFailed` (after writing every report) when a gate check fails.
    """
    from pipeline.evaluate.gate import GateFailed, champion_metrics, evaluate_gate, gate_table
    from pipeline.evaluate.plots import preview_grid, write_plot_data

    start = time.perf_counter()
    ev = params.evaluate
    _, classes = load_split(prepared, ev.split)
    scorer = load_scorer(model_path, params)
    if scorer.classes != classes:
        raise DetflowError(f"model classes {scorer.classes} differ from the dataset's {classes}; "
                           "retrain on this dataset, or score it as an external set (--class-map)")
    images, kept, gt = score_detector(scorer.predict, prepared, ev.split, classes, params, progress,
                                      keep_images=ev.preview_images)
    metrics, private = compute_metrics(images, gt, classes, params)
    metrics["model"] = scorer.info
    seconds = time.perf_counter() - start
    metrics["seconds"] = round(seconds, 2)
    atomic_write_json(reports / "eval" / "predictions.json", private["results"])
    atomic_write_json(reports / STATISTICS, statistics(images, gt, classes, metrics, private["bootstrap"], params))
    write_plot_data(reports / "plots", private["precision"], classes, private["froc"], private["confusion"])
    preview_grid(list(zip(kept, images[: len(kept)], strict=True)), classes, ev.conf,
                 reports / "predictions_preview.png")
    atomic_write_json(reports / "metrics.json", metrics)
    gate = evaluate_gate(metrics, params.gate, champion_metrics(Path(params.gate.champion)))
    atomic_write_json(reports / "gate.json", gate)
    if not gate["passed"]:
        raise GateFailed("evaluation gate failed; the model may not be exported or promoted:\n"
                         + gate_table(gate, only_failed=True))
    return EvaluationResult(metrics, gate, seconds)
