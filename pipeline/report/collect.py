"""Read a run's files into the report's sections (every number comes from a stage's output; nothing is computed
here). Each section is a plain dict; a missing input never raises, it
becomes a line in the section's ``missing`` list, so the report also renders after a failed gate (no card, no
parity) or before optional stages (external evaluation, shift test, benchmark) ever ran.

Size: one reader per section of the report, side by side, so the page and its inputs are checked in one
place.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import pipeline.report.charts as charts

MAX_PROBLEM_THUMBS = 8  # thumbnails of quarantined / fixed samples
GATE_OPERATORS = {"max_regression": "<="}  # every other check passes at value >= threshold


@dataclass(frozen=True)
class ReportInputs:
    """Every path the report reads; the defaults are dvc.yaml's layout."""

    reports: Path = Path("reports")
    data: Path = Path("data/prepared")
    models: Path = Path("models")
    lock: Path = Path("dvc.lock")
    bench: Path = Path("bench/results/inference.json")
    source: Path | None = None  # raw dataset folder, for thumbnails of quarantined and fixed samples
    params: Path = Path("params.yaml")
    overrides: tuple[str, ...] = field(default=())


def _json(path: Path, missing: list[str], why: str) -> Any:
    """The parsed file, or None with a line in ``missing`` (absent, or not valid JSON)."""
    if not path.is_file():
        missing.append(f"{path} not found ({why})")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        missing.append(f"{path} is not valid JSON ({e})")
        return None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# ------------------------------------------------------------------------------------------------ verdict


def verdict(inp: ReportInputs, metrics: dict | None, gate: dict | None, card: dict | None,
            validation: dict | None, summary: dict | None) -> dict[str, Any]:
    missing: list[str] = []
    if gate is None:
        missing.append(f"{inp.reports / 'gate.json'} not found: the gate has not run (run `detflow evaluate`)")
    checks = []
    for c in (gate or {}).get("checks", []):
        checks.append({**c, "operator": GATE_OPERATORS.get(c.get("name", ""), ">=")})
    model = (card or {}).get("model") or (summary or {}).get("model")
    family = (card or {}).get("family") or (summary or {}).get("family") or ((metrics or {}).get("model") or {}).get(
        "family")
    ci = (metrics or {}).get("ci95") or {}
    return {
        "model": f"{family}/{model}" if family and model else (family or model or "unknown"),
        "version": (card or {}).get("version"),
        "sha256": (card or {}).get("sha256"),
        "fingerprint": (validation or {}).get("manifest_sha256") or ((card or {}).get("training_data") or {}).get(
            "manifest_sha256"),
        "source": (validation or {}).get("source"),
        "passed": None if gate is None else bool(gate.get("passed")),
        "checks": checks,
        "failed": [c["name"] for c in checks if not c.get("passed")],
        "map50": (metrics or {}).get("map50"), "map50_ci": ci.get("map50"),
        "cpm": ((metrics or {}).get("froc") or {}).get("cpm"), "cpm_ci": ci.get("cpm"),
        "split": (metrics or {}).get("split"),
        "missing": missing,
    }


# ------------------------------------------------------------------------------------------------ data


def _manifest_counts(path: Path) -> dict[str, dict[str, int]]:
    """Images, boxes and patients per split, counted from the manifest itself."""
    images: Counter[str] = Counter()
    boxes: Counter[str] = Counter()
    patients: dict[str, set[str]] = defaultdict(set)
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            images[row["split"]] += 1
            boxes[row["split"]] += int(row.get("n_boxes") or 0)
            patients[row["split"]].add(row["patient"])
    order = [s for s in ("train", "val", "test") if s in images] + sorted(set(images) - {"train", "val", "test"})
    return {s: {"images": images[s], "boxes": boxes[s], "patients": len(patients[s])} for s in order}


def _problem_thumbs(problems: list[dict], source: Path | None) -> tuple[list[dict], str | None]:
    """Up to MAX_PROBLEM_THUMBS quarantined or fixed samples, one of each (kind, action) first."""
    from pipeline.data.imaging import ImageLoadError, decode_path

    wanted = [p for p in problems if p.get("action") in ("image_quarantined", "fixed")]
    seen: set[tuple[str, str]] = set()
    first = [p for p in wanted if (key := (p["kind"], p["action"])) not in seen and not seen.add(key)]
    chosen = (first + [p for p in wanted if p not in first])[:MAX_PROBLEM_THUMBS]
    if not chosen:
        return [], None
    note = None if source is not None and source.is_dir() else \
        f"raw source folder {source} not available: thumbnails left out"
    out = []
    for p in chosen:
        item = {"file": p.get("file"), "kind": p.get("kind"), "action": p.get("action"), "detail": p.get("detail"),
                "uri": None, "why": None}
        if note is None:
            try:
                rgb = decode_path(source / str(p["file"]), max_pixels=50_000_000).rgb
                item["uri"] = charts.jpeg_uri(_as_image(rgb), max_side=160)
            except ImageLoadError as e:
                item["why"] = f"not decodable ({e.kind})"
            except (OSError, ValueError) as e:
                item["why"] = f"not readable ({type(e).__name__})"
        out.append(item)
    return out, note


def _as_image(rgb: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(rgb)


def data_section(inp: ReportInputs, validation: dict | None) -> dict[str, Any]:
    missing: list[str] = []
    manifest = inp.data / "manifest.csv"
    splits: dict[str, dict[str, int]] = {}
    if manifest.is_file():
        splits = _manifest_counts(manifest)
    else:
        missing.append(f"{manifest} not found (run `detflow prepare`)")
    if validation is None:
        missing.append(f"{inp.reports / 'data_validation.json'} not found (run `detflow prepare`)")
        validation = {}
    classes = validation.get("classes") or []
    balance = {s: (v.get("boxes_per_class") or {}) for s, v in (validation.get("splits") or {}).items()}
    summary = validation.get("summary") or {}
    kinds = validation.get("kinds") or {}
    by_kind = [{"kind": k, "meaning": kinds.get(k, ""), "actions": v, "total": sum(v.values())}
               for k, v in (summary.get("by_kind") or {}).items()]
    thumbs, note = _problem_thumbs(validation.get("problems") or [], inp.source)
    return {"splits": splits, "classes": classes, "balance": balance, "summary": summary, "by_kind": by_kind,
            "status": validation.get("status"), "split_mode": validation.get("split_mode"),
            "format": validation.get("format"), "thumbs": thumbs, "thumb_note": note, "missing": missing}


# ------------------------------------------------------------------------------------------------ transfer


def _freeze_ranges(frozen_by_epoch: dict[str, list[str]]) -> list[dict[str, Any]]:
    """``{"0": [...], "1": [...], ...}`` as runs of consecutive epochs with the same frozen groups."""
    rows: list[dict[str, Any]] = []
    for epoch in sorted(frozen_by_epoch, key=int):
        groups = list(frozen_by_epoch[epoch])
        if rows and rows[-1]["frozen"] == groups and rows[-1]["last"] == int(epoch) - 1:
            rows[-1]["last"] = int(epoch)
        else:
            rows.append({"first": int(epoch), "last": int(epoch), "frozen": groups})
    return rows


def _training_curves(path: Path) -> list[str]:
    """Loss and validation-metric panels from Ultralytics' (or our Faster R-CNN loop's) results.csv."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows:
        return []
    cols = list(rows[0])
    xcol = "epoch" if "epoch" in cols else cols[0]

    def series(names: list[str]) -> list[tuple[str, list[float], list[float]]]:
        out = []
        for n in names:
            pts = [(float(r[xcol]), float(r[n])) for r in rows if r.get(n) not in (None, "", "nan")]
            if pts:
                out.append((n, [p[0] for p in pts], [p[1] for p in pts]))
        return out

    losses = series([c for c in cols if "loss" in c])
    scores = series([c for c in cols if c.startswith("metrics/") or c.startswith("val_map")])
    svgs = []
    if losses:
        svgs.append(charts.line_chart(losses, xcol, "loss", "Training and validation losses", marker="o"))
    if scores:
        svgs.append(charts.line_chart(scores, xcol, "value", "Validation metrics", marker="o", ylim=(0, 1.02)))
    return svgs


def transfer_section(inp: ReportInputs, summary: dict | None) -> dict[str, Any]:
    missing: list[str] = []
    transfer = _json(inp.reports / "train" / "transfer.json", missing, "run `detflow train`")
    if transfer is None and summary:
        transfer = summary.get("transfer")
    transfer = transfer or {}
    pretrained = transfer.get("pretrained") or {}
    curves: list[str] = []
    results = inp.reports / "train" / "results.csv"
    if results.is_file():
        curves = _training_curves(results)
    else:
        missing.append(f"{results} not found (run `detflow train`): no training curves")
    return {"source": transfer.get("source") or pretrained.get("source"),
            "sha256": transfer.get("sha256") or pretrained.get("sha256"),
            "from_scratch": transfer.get("from_scratch"), "note": pretrained.get("note") or transfer.get("WARNING"),
            "tensors": transfer.get("tensors_transferred"), "params_transferred": transfer.get("params_transferred"),
            "strategy": transfer.get("strategy"), "backbone_lr_mult": transfer.get("backbone_lr_mult"),
            "groups": transfer.get("group_parameters") or {}, "new_modules": transfer.get("new_modules") or [],
            "freeze": _freeze_ranges(transfer.get("frozen_by_epoch") or {}),
            "subset": transfer.get("train_subset"), "trainable": transfer.get("trainable_parameters"),
            "epochs": (summary or {}).get("epochs_run"), "family": (summary or {}).get("family"),
            "model": (summary or {}).get("model"), "curves": curves, "missing": missing}


# ------------------------------------------------------------------------------------------------ evaluation


def _draw_cases(cases: dict[str, list[dict]], classes: list[str], prepared: Path) -> dict[str, list[dict]]:
    """The evaluator's worst cases (``reports/eval/statistics.json``) drawn on their images."""
    from pipeline.data.imaging import ImageLoadError, decode_path

    def draw(case: dict, what: str) -> dict:
        preds = [(np.asarray(d["box"]), f"{classes[d['label']] if 0 <= d['label'] < len(classes) else d['label']} "
                                        f"{d['score']:.2f}") for d in case.get("detections", [])]
        name = classes[case["cls"]] if 0 <= case["cls"] < len(classes) else str(case["cls"])
        item = {"file": case.get("file", ""), "cls": name, "score": case["score"], "what": what, "uri": None}
        try:
            gt = np.asarray(case.get("gt_boxes", []), dtype=np.float64).reshape(-1, 4)
            item["uri"] = charts.drawn(decode_path(prepared / item["file"], max_pixels=None).rgb, gt, preds,
                                       np.asarray(case["box"]))
        except (ImageLoadError, OSError):
            item["uri"] = None
        return item

    return {"fn": [draw(c, "missed") for c in cases.get("fn", [])],
            "fp": [draw(c, "false positive") for c in cases.get("fp", [])]}


def _pr_curves(folder: Path, classes: list[str]) -> str | None:
    series = []
    for name in classes:
        f = folder / f"{name}.json"
        if f.is_file():
            rows = json.loads(f.read_text(encoding="utf-8"))
            series.append((name, [r["recall"] for r in rows], [r["precision"] for r in rows]))
    if not series:
        return None
    return charts.line_chart(series, "recall", "precision", "Precision-recall per class (IoU 0.5)", ylim=(0, 1.02))


def _confusion(path: Path, classes: list[str]) -> tuple[str | None, list[list[int]]]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    labels = [*classes, "background"]
    index = {n: i for i, n in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for r in rows:
        if r.get("actual") in index and r.get("predicted") in index:
            matrix[index[r["actual"]], index[r["predicted"]]] += 1
    return charts.confusion_chart(matrix, labels, "Confusion at the operating threshold"), matrix.tolist()


def evaluation_section(inp: ReportInputs, metrics: dict | None) -> dict[str, Any]:
    """metrics.json and the evaluator's statistics (``reports/eval/statistics.json``: per-class intervals, the FROC
    band, the worst cases), shown as they are: the report computes no statistic."""
    missing: list[str] = []
    if metrics is None:
        missing.append(f"{inp.reports / 'metrics.json'} not found (run `detflow evaluate`)")
        return {"missing": missing}
    split = metrics.get("split", "test")
    stats = _json(inp.reports / "eval" / "statistics.json", missing, "run `detflow evaluate`") or {}
    classes = list(stats.get("classes") or (metrics.get("per_class") or {}).keys())
    froc = metrics.get("froc") or {}
    boot = stats.get("bootstrap")  # None when evaluate.bootstrap is 0
    cases = _draw_cases(stats.get("cases") or {}, classes, inp.data)
    per_class = []
    for k, name in enumerate(classes):
        row = (metrics.get("per_class") or {}).get(name) or {}
        cis = (boot or {}).get("per_class_ap50") or []
        per_class.append({"name": name, "ap50": row.get("ap50"), "ap50_95": row.get("ap50_95"),
                          "ci": cis[k] if k < len(cis) else None})
    froc_svg = None
    if froc.get("fp_per_image"):
        band = (froc["fp_per_image"], boot["froc_low"], boot["froc_high"]) if boot else None
        froc_svg = charts.line_chart([(f"FROC (CPM {froc.get('cpm', float('nan')):.3f})", froc["fp_per_image"],
                                       froc["sensitivity"])], "false positives per image", "sensitivity",
                                     f"FROC (IoU {froc.get('iou')})", xlog=True, band=band, ylim=(0, 1.02),
                                     marker="o")
    pr_svg = _pr_curves(inp.reports / "plots" / "pr", classes)
    if pr_svg is None:
        missing.append(f"{inp.reports / 'plots' / 'pr'} has no curves (run `detflow evaluate`)")
    confusion_svg, matrix = None, []
    confusion_path = inp.reports / "plots" / "confusion.json"
    if confusion_path.is_file():
        confusion_svg, matrix = _confusion(confusion_path, classes)
    else:
        missing.append(f"{confusion_path} not found (run `detflow evaluate`)")
    return {"split": split, "classes": classes, "per_class": per_class, "map50": metrics.get("map50"),
            "map50_95": metrics.get("map50_95"), "ci95": metrics.get("ci95") or {}, "froc": froc,
            "froc_rows": list(zip(froc.get("fp_per_image", []), froc.get("sensitivity", []), strict=False)),
            "boot": boot, "operating_point": metrics.get("operating_point") or {}, "n_images": metrics.get("n_images"),
            "n_patients": metrics.get("n_patients"), "n_lesions": metrics.get("n_lesions"), "froc_svg": froc_svg,
            "pr_svg": pr_svg, "confusion_svg": confusion_svg, "confusion": matrix, "cases": cases,
            "missing": missing}


# ------------------------------------------------------------------------------------------------ generalisation


def _flat(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as (dotted key, scalar or short list) rows, for blocks whose keys this report does not fix."""
    if isinstance(obj, dict):
        return [row for k, v in obj.items() for row in _flat(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), obj)]


def site_adaptation(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """The site-adaptation curve of an external set (``bench/site_adaptation.py`` writes it beside the set's
    metrics): mAP50 with its CI per K and recipe on the site's images not used for fine-tuning, and a chart."""
    doc = _json(path, problems, "")
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        if doc is not None:
            problems.append(f"{path} is not a site-adaptation result (no rows)")
        return None
    rows = [r for r in doc["rows"] if isinstance(r, dict)]
    by_recipe: dict[str, list[tuple[float, float]]] = {}
    zero = next((r for r in rows if r.get("k") == 0), None)
    for r in rows:
        if isinstance(r.get("k"), int) and r["k"] > 0 and _num(r.get("map50")) is not None:
            by_recipe.setdefault(str(r.get("recipe")), []).append((r["k"], float(r["map50"])))
    series = []
    for recipe, points in by_recipe.items():
        pts = sorted(points + ([(0, float(zero["map50"]))] if zero and _num(zero.get("map50")) is not None else []))
        series.append((recipe, [p[0] for p in pts], [p[1] for p in pts]))
    chart = charts.line_chart(series, "K labelled images of the site", "mAP50 (images not used)",
                              "Few-shot curve", marker="o") if series else None
    return {"rows": rows, "n_scored": doc.get("n_scored"), "n_labelled": doc.get("n_labelled"),
            "shots": doc.get("shots"), "source_check": doc.get("source_check"), "chart": chart, "note": doc.get("note")}


def generalisation_section(inp: ReportInputs, metrics: dict | None, card: dict | None) -> dict[str, Any]:
    """Internal vs external per class (from each ``reports/external/<name>/metrics.json``), the shift tests and the
    card's adaptation block, whichever exist."""
    externals = []
    folder = inp.reports / "external"
    internal = (metrics or {}).get("per_class") or {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        problems: list[str] = []
        ext = _json(d / "metrics.json", problems, "external evaluation not run") or {}
        ext_pc = ext.get("per_class") or {}
        rows = []
        for name in sorted(set(internal) | set(ext_pc), key=lambda n: (n not in internal, n)):
            a = _num((internal.get(name) or {}).get("ap50"))
            b = _num((ext_pc.get(name) or {}).get("ap50"))
            rows.append({"name": name, "internal": a, "external": b,
                         "drop": round(a - b, 6) if a is not None and b is not None else None})
        shift = None
        if (d / "shift.json").is_file():
            shift = _json(d / "shift.json", problems, "")
        curve = site_adaptation(d / "site_adaptation.json", problems) if (d / "site_adaptation.json").is_file() \
            else None
        externals.append({"name": d.name, "map50": ext.get("map50"), "ci": (ext.get("ci95") or {}).get("map50"),
                          "n_images": ext.get("n_images"), "rows": rows, "shift": shift, "problems": problems,
                          "left_out": ext.get("classes_left_out") or ext.get("left_out"), "adaptation": curve})
    gen_problems: list[str] = []
    gen = _json(inp.reports / "generalisation.json", gen_problems, "") if (
        inp.reports / "generalisation.json").is_file() else None
    shift = _json(inp.reports / "shift.json", gen_problems, "") if (inp.reports / "shift.json").is_file() else None
    adaptation = (card or {}).get("adaptation")
    present = bool(externals or gen or shift or adaptation)
    return {"present": present, "externals": externals, "generalisation": _flat(gen) if gen else [],
            "shift": shift, "adaptation": _flat(adaptation) if adaptation else [], "missing": gen_problems}


# ------------------------------------------------------------------------------------------------ deployment


def deployment_section(inp: ReportInputs, card: dict | None, gate: dict | None) -> dict[str, Any]:
    missing: list[str] = []
    card_path = inp.models / "model_card.json"
    if card is None:
        why = "the gate failed, so nothing was exported" if gate is not None and not gate.get("passed") else \
            "run `detflow export`"
        missing.append(f"{card_path} not found ({why})")
    parity = _json(inp.reports / "parity.json", missing, "written by `detflow export`")
    bench = json.loads(inp.bench.read_text(encoding="utf-8")) if inp.bench.is_file() else None
    latency = None
    if bench:
        ips = (bench.get("images_per_s") or {}).get("engine") or {}
        latency = {"b1_ms": round(1000.0 / ips["b1"], 2) if ips.get("b1") else None,
                   "b8_images_per_s": ips.get("b8"), "providers": bench.get("providers"),
                   "machine": bench.get("machine"), "imgsz": bench.get("imgsz"), "threads": bench.get("threads"),
                   "model": bench.get("model")}
    onnx = inp.models / "model.onnx"
    size = (card or {}).get("size_bytes") or (onnx.stat().st_size if onnx.is_file() else None)
    return {"card": card, "parity": parity, "latency": latency, "bench_path": str(inp.bench),
            "size_bytes": size, "providers": (parity or {}).get("providers"),
            "input": _flat((card or {}).get("input")) if card else [],
            "output": _flat((card or {}).get("output")) if card else [],
            "postprocess": (card or {}).get("postprocess") or {}, "missing": missing,
            # hook (#23): the coded finding type DICOM SRs use per class, and the modalities trained on
            "class_codes": (card or {}).get("class_codes") or {},
            "modalities": ((card or {}).get("training_data") or {}).get("modalities") or []}


# ------------------------------------------------------------------------------------------------ provenance


def _versions() -> dict[str, str]:
    out = {}
    for name in ("detflow", "torch", "torchvision", "ultralytics-opencv-headless", "onnx", "onnxruntime-gpu", "dvc",
                 "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _params_diff(inp: ReportInputs) -> tuple[str, list[dict[str, Any]], str | None]:
    """Params of the run (the training run's resolved copy, else ``--params`` with ``--set``) that differ from the
    code's defaults (which are params.yaml's shipped values)."""
    from pipeline.config import Params, load_params
    from pipeline.errors import DetflowError

    run_copy = inp.models / "train" / "params.yaml"
    where = run_copy if run_copy.is_file() else inp.params
    try:
        run = load_params(where, list(inp.overrides) if where == inp.params else [])
    except DetflowError as e:
        return str(where), [], f"cannot read {where}: {e}"
    defaults = dict(_flat(Params().model_dump(mode="json")))
    rows = [{"key": k, "value": v, "default": defaults.get(k)} for k, v in _flat(run.model_dump(mode="json"))
            if defaults.get(k) != v]
    return str(where), rows, None


def _lock(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    if not path.is_file():
        return [], f"{path} not found (a run outside `dvc repro` has no lock file)"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        return [], f"{path} is not valid YAML ({e})"
    rows = []
    for stage, body in (doc.get("stages") or {}).items():
        for out in body.get("outs") or []:
            rows.append({"stage": stage, "path": out.get("path"), "md5": out.get("md5") or out.get("hash"),
                         "size": out.get("size")})
    return rows, None


def provenance_section(inp: ReportInputs, card: dict | None) -> dict[str, Any]:
    missing: list[str] = []
    where, diff, problem = _params_diff(inp)
    if problem:
        missing.append(problem)
    lock, problem = _lock(inp.lock)
    if problem:
        missing.append(problem)
    return {"versions": (card or {}).get("versions") or _versions(), "versions_from": "model card" if card else
            "this environment", "params_from": where, "params_diff": diff, "lock": lock, "lock_path": str(inp.lock),
            "created": (card or {}).get("created"), "generated": datetime.now(UTC).isoformat(timespec="seconds"),
            "missing": missing}


def study_section(inp: ReportInputs) -> dict[str, Any]:
    """``detflow study report``'s results, when a study was run in this checkout (not a DVC dep of the report: a
    study is optional and runs outside ``dvc repro``; the section says when its results were written)."""
    from pipeline.report.study import study_section as section

    path = inp.reports / "study" / "results.json"
    missing: list[str] = []
    results = _json(path, missing, "") if path.is_file() else None
    return {**section(results, path), "missing": missing}


# ------------------------------------------------------------------------------------------------ all


def collect(inp: ReportInputs, params: Any) -> dict[str, Any]:
    """Every section of the report, in reading order."""
    found: list[str] = []
    metrics = _json(inp.reports / "metrics.json", found, "")
    gate = _json(inp.reports / "gate.json", found, "")
    card = _json(inp.models / "model_card.json", found, "")
    validation = _json(inp.reports / "data_validation.json", found, "")
    summary = _json(inp.reports / "train" / "summary.json", found, "")
    return {
        "verdict": verdict(inp, metrics, gate, card, validation, summary),
        "data": data_section(inp, validation),
        "transfer": transfer_section(inp, summary),
        "evaluation": evaluation_section(inp, metrics),
        "generalisation": generalisation_section(inp, metrics, card),
        "study": study_section(inp),
        "deployment": deployment_section(inp, card, gate),
        "provenance": provenance_section(inp, card),
    }


def default_source(params: Any, raw_dir: Path, phantom_dir: Path) -> Path | None:
    """The raw dataset folder ``detflow prepare`` read, for thumbnails: the phantom folder, a named asset's folder
    under ``raw_dir`` or the source path itself. Looked up only (the report never fetches); None when absent."""
    source = str(params.data.source)
    path = phantom_dir if source == "phantom" else raw_dir / source if (raw_dir / source).is_dir() else Path(source)
    return path if path.is_dir() else None
