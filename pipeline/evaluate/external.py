"""External evaluation: how the model does on labelled data from another site, next to its own test split.

An external set is read by the data stage itself (:func:`pipeline.data.prepare.prepare_dataset` into a scratch
folder: the same readers, decoding, box validation and patient pseudonyms, so a VOC and a COCO copy of the same
data score the same). Nothing is trained on it, so there is no split: every image is scored, and the bootstrap
still resamples patients. Its labels are then mapped to the model's classes:

* a ``class_map`` entry (``rbc=RBC``) renames an external label; a label that already is a model class maps to
  itself; any other label is dropped, and its boxes are counted in ``external.labels_dropped``;
* a model class with no box in the set is *left out*: it is not in the set's mean (mAP50 over the classes that are
  there), its detections are not scored (nobody labelled those objects, so they are neither right nor wrong), and
  ``classes_left_out`` plus ``note`` say so.

Pixel spacing: prepare writes PNGs, which lose a DICOM's ``PixelSpacing``, so it keeps each image's spacing in its
COCO entry and scoring hands the image over with it (:func:`pipeline.data.imaging.with_spacing`): the ONNX engine
then letterboxes it at the training spacing exactly as ``detflow infer`` and the service do on the DICOM file. A
checkpoint records no training spacing and stays spacing-blind; ``pixel_spacing`` in the metrics says which applied.

The metrics keys are those of ``reports/metrics.json`` (same :func:`pipeline.evaluate.compute_metrics`), with
``split: external``, ``pixel_spacing`` and the facts above. :func:`generalisation_table` puts internal and external
AP50 side by side.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ExternalSetParams, Params
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate.stage import EvaluationResult, Scorer, compute_metrics, load_scorer, score_coco
from pipeline.fileio import atomic_write_json

SPLITS = ("train", "val", "test")


@dataclass
class ClassMapping:
    """The external ground truth in model classes, and what the mapping did."""

    gt: dict
    mapped: dict[str, str]  # external label -> model class
    dropped: dict[str, int]  # external label -> boxes dropped (not mapped, not a model class)
    left_out: list[str]  # model classes without a box in the set


@dataclass
class GeneralisationResult:
    table: dict[str, Any]
    externals: dict[str, dict[str, Any]]
    gate: dict[str, Any]
    seconds: float


def check_class_map(class_map: dict[str, str], model_classes: list[str], labels: list[str], *, option: str,
                    holder: str, errors: tuple[type[Exception], type[Exception]]) -> None:
    """A class map (label -> model class) must name model classes and labels the labelled set has: raises
    ``errors[0]`` for a target that is not a model class, ``errors[1]`` for a label the set (``holder``) lacks.
    ``option`` names the map in the message (``--class-map``, ``external set 'x': class map``)."""
    if bad := sorted({t for t in class_map.values() if t not in model_classes}):
        raise errors[0](f"{option} target {', '.join(map(repr, bad))} is not a model class; the model's classes: "
                        f"{', '.join(model_classes)}")
    if bad := sorted(k for k in class_map if k not in labels):
        raise errors[1](f"{option} names label {', '.join(map(repr, bad))}, which {holder} does not have; its "
                        f"labels: {', '.join(labels) or 'none'}")


def map_classes(gt: dict, model_classes: list[str], class_map: dict[str, str], name: str) -> ClassMapping:
    """Relabel a COCO document to the model's classes (1-based ids in model order); see the module docstring."""
    labels = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    check_class_map(class_map, model_classes, labels, option=f"external set {name!r}: class map", holder="the set",
                    errors=(ConfigError, DataError))
    index = {c: k for k, c in enumerate(model_classes)}
    target = {lab: class_map.get(lab, lab) for lab in labels}
    label_of = {c["id"]: c["name"] for c in gt["categories"]}
    annotations, dropped = [], Counter()
    for a in gt["annotations"]:
        label = label_of[a["category_id"]]
        if target[label] in index:
            annotations.append({**a, "category_id": index[target[label]] + 1})
        else:
            dropped[label] += 1
    if not annotations:
        raise DataError(f"external set {name!r}: no box has a model class ({', '.join(model_classes)}); its labels: "
                        f"{', '.join(labels) or 'none'}; map them with a class map such as "
                        f"{labels[0] if labels else 'label'}={model_classes[0]}")
    present = {a["category_id"] - 1 for a in annotations}
    return ClassMapping(
        gt={**gt, "annotations": annotations,
            "categories": [{"id": k + 1, "name": c, "supercategory": "lesion"} for k, c in enumerate(model_classes)]},
        mapped={lab: t for lab, t in target.items() if t in index},
        dropped=dict(sorted(dropped.items())),
        left_out=[c for k, c in enumerate(model_classes) if k not in present])


def read_external(params: Params, source: str, fmt: str, work: Path, validation_report: Path,
                  raw_dir: Path = Path("data/raw"), phantom_dir: Path = Path("data/raw/phantom"),
                  mirrors: list[Path] | None = None, progress: bool = True) -> tuple[dict, dict]:
    """Prepare ``source`` into ``work`` (every image in one split) and return (its COCO document over all images,
    the data validation report, also written to ``validation_report``)."""
    from pipeline.data.prepare import prepare_dataset

    as_external = params.model_copy(update={
        "data": params.data.model_copy(update={"source": source, "format": fmt, "classes": None}),
        "prepare": params.prepare.model_copy(update={"split": "patient", "val_fraction": 0.0, "test_fraction": 0.0}),
    })
    result = prepare_dataset(as_external, work, validation_report, raw_dir=raw_dir, phantom_dir=phantom_dir,
                             mirrors=mirrors, progress=progress)
    images, annotations, categories = [], [], None
    for split in SPLITS:  # all of it lands in train; merged anyway so nothing depends on that
        doc = json.loads((work / "coco" / f"{split}.json").read_text())
        categories = categories or doc["categories"]
        images += [{**img, "_key": (split, img["id"])} for img in doc["images"]]
        annotations += [{**a, "_key": (split, a["image_id"])} for a in doc["annotations"]]
    # Name and order by content, not by path: an image without a patient is its own patient, pseudonymised from
    # its path, and the same data laid out as VOC or as COCO must resample (bootstrap) and tie-break alike.
    digest = {img["_key"]: hashlib.sha256((work / img["file_name"]).read_bytes()).hexdigest() for img in images}
    group: dict[str, str] = {}
    for img in images:
        group[img["patient"]] = min(group.get(img["patient"], "g"), digest[img["_key"]])
    images.sort(key=lambda img: (group[img["patient"]], digest[img["_key"]]))
    new_id = {img["_key"]: n for n, img in enumerate(images, start=1)}
    merged = {"images": [{**{k: v for k, v in img.items() if k != "_key"}, "id": new_id[img["_key"]],
                          "patient": group[img["patient"]][:16]} for img in images],
              "annotations": [{**{k: v for k, v in a.items() if k != "_key"}, "id": n, "image_id": new_id[a["_key"]]}
                              for n, a in enumerate(sorted(annotations, key=lambda a: (new_id[a["_key"]], a["id"])),
                                                    start=1)],
              "categories": categories}
    return merged, result.report


def _note(left_out: list[str], dropped: dict[str, int]) -> str:
    parts = []
    if left_out:
        parts.append(f"left out of the mean (no box in this set; their detections are not scored): "
                     f"{', '.join(left_out)}")
    if dropped:
        parts.append("external labels dropped (not a model class, not in the class map): "
                     + ", ".join(f"{k} ({v} boxes)" for k, v in dropped.items()))
    return "; ".join(parts)


def spacing_handling(images: list[dict], scorer: Scorer) -> dict[str, Any]:
    """What scoring did with pixel spacing, for ``metrics.json``: ``source`` (``dicom`` when an image stated its
    PixelSpacing, ``pixel_size`` for an adapted card's), ``train`` (the model's training spacing), the set's
    ``median``/``min``/``max`` (mm), ``applied`` (images were letterboxed at the training spacing, as the deployed
    engine letterboxes them) and ``preprocessing`` (which rule, in words)."""
    known = [float(im["pixel_spacing"]) for im in images if im.get("pixel_spacing") is not None]
    scaling = scorer.scaling
    train = scaling.train_spacing if scaling is not None else None
    aware = scaling is not None and train is not None and scaling.train_long_side is not None
    pixel_size = scaling.pixel_size if scaling is not None else None
    source = "dicom" if known else "pixel_size" if pixel_size is not None else None
    applied = aware and source is not None
    if applied:
        how = ("the deployed engine's letterbox: imgsz x (spacing x long side) / (training spacing x training long "
               "side), so objects keep their training size in model pixels")
        if len(known) < len(images):
            how += ("; an image without a spacing at " + (f"the adapted card's pixel size {pixel_size}"
                                                           if pixel_size is not None else "imgsz"))
    elif scaling is None:
        how = ("spacing-blind: a checkpoint records no training pixel spacing, so every image is letterboxed to "
               "imgsz; score the exported model.onnx for what the deployed engine sees")
    elif source is None:
        how = "no image states a pixel spacing: letterboxed to imgsz, as the deployed engine does"
    else:
        how = ("spacing-blind, as the deployed engine: the model card records no training pixel spacing "
               "(input.pixel_spacing and training_data.image_long_side_px)")
    if scaling is not None and scaling.scale != 1.0:
        how += f"; every image also at the adapted card's input_scale {scaling.scale}"
    return {"source": source, "train": train,
            "median": round(float(np.median(known)), 6) if known else None,
            "min": round(min(known), 6) if known else None, "max": round(max(known), 6) if known else None,
            "n_images": len(known), "n_without": len(images) - len(known), "applied": applied,
            "preprocessing": how}


def evaluate_external(params: Params, scorer: Scorer, ext: ExternalSetParams, out_dir: Path,
                      raw_dir: Path = Path("data/raw"), phantom_dir: Path = Path("data/raw/phantom"),
                      mirrors: list[Path] | None = None, progress: bool = True) -> dict[str, Any]:
    """Score one external set; write ``out_dir/metrics.json`` and ``out_dir/data_validation.json``."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{ext.name}-prepared-", dir=out_dir.parent) as scratch:
        work = Path(scratch) / "prepared"
        gt, report = read_external(params, ext.source, ext.format, work, out_dir / "data_validation.json", raw_dir,
                                   phantom_dir, mirrors, progress)
        mapping = map_classes(gt, scorer.classes, ext.class_map, ext.name)
        images, _ = score_coco(scorer.predict, mapping.gt, work, params, progress, desc=f"evaluating {ext.name}",
                               spacing=True)
    scored = {k for k, c in enumerate(scorer.classes) if c not in mapping.left_out}
    for im in images:  # detections of classes nobody labelled here are neither right nor wrong
        keep = np.isin(im.labels, list(scored))
        im.boxes, im.scores, im.labels = im.boxes[keep], im.scores[keep], im.labels[keep]
    metrics, _ = compute_metrics(images, mapping.gt, scorer.classes, params)
    for c in mapping.left_out:
        metrics["per_class"].pop(c, None)
    s = report["summary"]
    metrics.update({
        "split": "external",
        "classes_left_out": mapping.left_out,
        "note": _note(mapping.left_out, mapping.dropped),
        "external": {"name": ext.name, "source": ext.source, "format": report["format"],
                     "class_map": mapping.mapped, "labels_dropped": mapping.dropped,
                     "boxes_dropped_unmapped": int(sum(mapping.dropped.values())),
                     "images_in": s["images_in"], "images_quarantined": s["images_quarantined"],
                     "boxes_dropped_by_validation": s["boxes_dropped"]},
        "pixel_spacing": spacing_handling(mapping.gt["images"], scorer),
        "model": scorer.info,
        "seconds": round(time.perf_counter() - start, 2),
    })
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def generalisation_table(internal: dict[str, Any], externals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per external set and class: internal AP50 (``reports/metrics.json``), external AP50 and the drop
    (internal - external); the set's mAP50 beside the internal mean over the same classes."""
    internal_pc = internal.get("per_class") or {}
    sets = {}
    for name, m in externals.items():
        rows = {}
        for cls, row in (m.get("per_class") or {}).items():
            a, b = _finite((internal_pc.get(cls) or {}).get("ap50")), _finite(row.get("ap50"))
            rows[cls] = {"internal": a, "external": b,
                         "drop": round(a - b, 6) if a is not None and b is not None else None}
        same = [r["internal"] for r in rows.values() if r["internal"] is not None]
        internal_mean = round(float(np.mean(same)), 6) if same else None
        ext_map = _finite(m.get("map50"))
        sets[name] = {"map50": ext_map, "ci95_map50": (m.get("ci95") or {}).get("map50"),
                      "internal_map50_same_classes": internal_mean,
                      "drop": round(internal_mean - ext_map, 6) if internal_mean is not None and ext_map is not None
                      else None,
                      "n_images": m.get("n_images"), "classes_left_out": m.get("classes_left_out") or [],
                      "per_class": rows}
    return {"internal": {"split": internal.get("split"), "map50": _finite(internal.get("map50"))}, "sets": sets}


def evaluate_external_sets(params: Params, model_path: Path, reports: Path, raw_dir: Path = Path("data/raw"),
                           phantom_dir: Path = Path("data/raw/phantom"), mirrors: list[Path] | None = None,
                           progress: bool = True) -> GeneralisationResult:
    """Score every set of params ``external``: ``reports/external/<name>/``, then ``reports/generalisation.json``
    (with the ``gate.min_external_map50`` checks). Raises :class:`GateFailed` after writing when a check fails."""
    from pipeline.evaluate.gate import GateFailed, external_checks, gate_table

    start = time.perf_counter()
    folder = reports / "external"
    folder.mkdir(parents=True, exist_ok=True)  # an empty list still gives the stage its (empty) output folder
    externals: dict[str, dict[str, Any]] = {}
    internal: dict[str, Any] = {}
    if params.external:
        internal_path = reports / "metrics.json"
        if not internal_path.is_file():
            raise DataError(f"{internal_path} not found: external sets are compared with the internal test split; "
                            "run `detflow evaluate` (or `dvc repro evaluate`) first")
        internal = json.loads(internal_path.read_text())
        scorer = load_scorer(model_path, params)
        for ext in params.external:
            externals[ext.name] = evaluate_external(params, scorer, ext, folder / ext.name, raw_dir, phantom_dir,
                                                    mirrors, progress)
    checks = external_checks(externals, params.gate)
    gate = {"passed": all(c["passed"] for c in checks), "min_external_map50": params.gate.min_external_map50,
            "checks": checks}
    table = {**generalisation_table(internal, externals), "gate": gate}
    atomic_write_json(reports / "generalisation.json", table)
    if not gate["passed"]:
        raise GateFailed("external evaluation gate failed; the model may not be registered or promoted:\n"
                         + gate_table(gate, only_failed=True))
    return GeneralisationResult(table, externals, gate, time.perf_counter() - start)


def external_set(name: str, source: str, fmt: str = "auto", class_map: str | dict[str, str] | None = None
                 ) -> ExternalSetParams:
    """One set from command-line values, validated like a params.yaml item (a bad value is one ConfigError line)."""
    from pydantic import ValidationError

    try:
        return ExternalSetParams(name=name, source=source, format=fmt, class_map=class_map or {})  # type: ignore[arg-type]
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "value"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg = f"got {err.get('input')!r}; " + msg.replace("Input should be", "expected one of:")
        raise ConfigError(f"external set {name!r}: {where}: {msg}") from None


def default_set_name(data: Path) -> str:
    """A folder-safe name for an ad-hoc set: the dataset folder's (or file's) name."""
    import re

    stem = data.resolve().stem if data.is_file() else data.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip("._-")[:64] or "external"


def evaluate_dataset(params: Params, model_path: Path, ext: ExternalSetParams, reports: Path,
                     raw_dir: Path = Path("data/raw"), phantom_dir: Path = Path("data/raw/phantom"),
                     mirrors: list[Path] | None = None, progress: bool = True) -> GeneralisationResult:
    """``detflow evaluate --data PATH`` on a dataset that is not the prepared one: score it whole into
    ``reports/external/<name>/`` (``reports/generalisation.json`` stays the stage's, for the params' sets) and
    compare with ``reports/metrics.json`` when present. Raises :class:`GateFailed` after writing when
    ``gate.min_external_map50`` is set and not met."""
    from pipeline.evaluate.gate import GateFailed, external_checks, gate_table

    start = time.perf_counter()
    scorer = load_scorer(model_path, params)
    metrics = evaluate_external(params, scorer, ext, reports / "external" / ext.name, raw_dir, phantom_dir, mirrors,
                                progress)
    internal_path = reports / "metrics.json"
    internal = json.loads(internal_path.read_text()) if internal_path.is_file() else {}
    table = generalisation_table(internal, {ext.name: metrics})
    checks = external_checks({ext.name: metrics}, params.gate)
    gate = {"passed": all(c["passed"] for c in checks), "min_external_map50": params.gate.min_external_map50,
            "checks": checks}
    if not gate["passed"]:
        raise GateFailed(f"external set {ext.name!r} fails the gate:\n" + gate_table(gate, only_failed=True))
    return GeneralisationResult(table, {ext.name: metrics}, gate, time.perf_counter() - start)


def run_evaluate(params: Params, model_path: Path, data: Path, reports: Path, *, external: bool = False,
                 fmt: str = "auto", class_map: str | None = None, name: str | None = None,
                 raw_dir: Path = Path("data/raw"), mirrors: list[Path] | None = None,
                 progress: bool = True) -> EvaluationResult | GeneralisationResult:
    """What ``detflow evaluate`` runs: the internal evaluation (a prepared dataset: ``evaluate.split`` scored, the
    gate applied), or external evaluation: every set of params ``external`` (``external``), or ``data`` scored
    whole as one set when it is not a prepared dataset or any external option is given."""
    from pipeline.evaluate.stage import evaluate_model, is_prepared

    if external:
        return evaluate_external_sets(params, model_path, reports, raw_dir=raw_dir, mirrors=mirrors, progress=progress)
    if fmt != "auto" or class_map is not None or name is not None \
            or (data.exists() and not is_prepared(data, params.evaluate.split)):
        ext = external_set(name or default_set_name(data), str(data), fmt, class_map)
        return evaluate_dataset(params, model_path, ext, reports, raw_dir=raw_dir, mirrors=mirrors, progress=progress)
    return evaluate_model(params, model_path, data, reports, progress=progress)
