"""Export stage: ONNX model, parity report against PyTorch, model card. Published only when parity holds.

A published model is one folder, ``models/current/`` (``model.onnx``, ``model_card.json``,
``embedding_reference.npy`` and ``embedding_reference_groups.npy``: validation-split embeddings for shift detection
and their patients, their sha256 in the card), switched by one atomic rename (a directory exchange,
:func:`pipeline.fileio.atomic_directory`): at every instant ``models/current`` is the previous complete folder or
the new one. ``models/model.onnx`` and the other names are links into it (``current/model.onnx``), so every path
users and other stages know still works, and readers resolve them to the one folder and read it through one handle
(:func:`pipeline.fileio.read_release`): a new model is never paired with an old card. ``reports/parity.json``
reports the latest attempt, passed or failed; the card carries the published model's parity.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Params
from pipeline.contracts.card import SCHEMA, validate_card
from pipeline.errors import DataError, DetflowError
from pipeline.families import FamilySpec
from pipeline.fileio import (
    Write,
    atomic_directory,
    atomic_write_json,
    link_into_place,
    private_workdir,
    recover_outputs,
    remove_leftovers,
    sha256_file,
)

#: The reference sample for shift detection, beside the model: float32 (rows, D) embeddings of training images.
REFERENCE_FILE = "embedding_reference.npy"
#: The patient (pseudonym from prepare) of each reference row, a parallel unicode array: the shift test permutes
#: patients, not slices (pipeline.shift). Models exported before it have only REFERENCE_FILE (image-level test).
REFERENCE_GROUPS_FILE = "embedding_reference_groups.npy"
REFERENCE_ROWS = 256  # enough for the MMD test's power at 64 target images, small next to the model (~0.5 MB)
MIN_HELD_OUT = 32  # fewer validation images than this: the reference falls back to the training split (see below)
RELEASE_DIR = "current"
"""The published model folder under the export's ``--out`` (``models/current``)."""
RELEASE_FILES = ("model.onnx", "model_card.json", REFERENCE_FILE, REFERENCE_GROUPS_FILE)
"""What it holds; each is also reachable as ``models/<name>``, a link to ``current/<name>``."""


class ParityFailed(DetflowError):
    """The ONNX model's accuracy differs from PyTorch's by more than allowed."""


@dataclass
class ExportResult:
    model: Path
    card: dict[str, Any]
    parity: dict[str, Any]


def _match_parity(torch_dets: list, onnx_dets: list, conf: float, iou_thr: float) -> dict[str, Any]:
    """Box-level agreement at the operating threshold: greedy same-class matching by IoU, torch boxes by score."""
    from pipeline.matching import greedy_match

    matched = total = 0
    box_diff = score_diff = 0.0
    for t, o in zip(torch_dets, onnx_dets, strict=True):
        tk, ok = t.scores >= conf, o.scores >= conf
        tb, ts, tl = t.boxes[tk], t.scores[tk], t.labels[tk]
        ob, os_, ol = o.boxes[ok], o.scores[ok], o.labels[ok]
        total += max(len(ts), len(os_))
        target = greedy_match(tb, ts, ob, iou_thr=iou_thr, labels=tl, target_labels=ol).target
        for i, j in zip(np.flatnonzero(target >= 0), target[target >= 0], strict=True):
            matched += 1
            box_diff = max(box_diff, float(np.abs(tb[i] - ob[j]).max()))
            score_diff = max(score_diff, float(abs(ts[i] - os_[j])))
    return {"boxes_compared": total, "boxes_matched": matched,
            "matched_fraction": round(matched / total, 6) if total else 1.0,
            "max_abs_box_diff_px": round(box_diff, 6), "max_abs_score_diff": round(score_diff, 6)}


def measure_parity(torch_detector: Any, onnx_detector: Any, prepared: Path, params: Params) -> dict[str, Any]:
    """The same images through PyTorch and onnxruntime: box-level agreement and metric-level delta."""
    from pipeline.evaluate.stage import compute_metrics, load_split, score_detector

    ev = params.evaluate
    split = ev.split
    _, classes = load_split(prepared, split)
    quick = params.model_copy(update={"evaluate": ev.model_copy(update={"bootstrap": 0})})
    common = {"conf": 0.001, "iou": ev.nms_iou, "max_det": params.export.max_det}
    t_imgs, _, gt = score_detector(lambda r: torch_detector.predict(r, **common), prepared, split, classes, quick,
                                   progress=False)
    o_imgs, _, _ = score_detector(lambda r: onnx_detector.predict(r, **common), prepared, split, classes, quick,
                                  progress=False)
    boxes = _match_parity(t_imgs, o_imgs, ev.conf, params.export.parity_iou)
    m_t, _ = compute_metrics(t_imgs, gt, classes, quick)
    m_o, _ = compute_metrics(o_imgs, gt, classes, quick)
    return {"split": split, "n_images": len(t_imgs), "conf": ev.conf, "parity_iou": params.export.parity_iou,
            **boxes, "map50_95_torch": m_t["map50_95"], "map50_95_onnx": m_o["map50_95"],
            "map50_torch": m_t["map50"], "map50_onnx": m_o["map50"],
            "delta": round(abs(m_t["map50_95"] - m_o["map50_95"]), 6), "providers": onnx_detector.providers}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    names = {"torch": ["torch"], "torchvision": ["torchvision"],
             "ultralytics": ["ultralytics", "ultralytics-opencv-headless"], "onnx": ["onnx"],
             "onnxruntime": ["onnxruntime-gpu", "onnxruntime"], "detflow": ["detflow"]}
    for key, dists in names.items():
        for dist in dists:
            try:
                out[key] = md.version(dist)
                break
            except md.PackageNotFoundError:
                continue
    return out


def reference_sample(detector: Any, prepared: Path, rows: int = REFERENCE_ROWS, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Embeddings of a deterministic sample of same-site images the model was not fitted on, through the exported
    graph itself (one image per call, as `detflow shift` runs), so the reference is what deployment measures on
    the training site.

    Which images: the validation split. Training images are the ones the network has fitted, and their embeddings
    drift away from those of unseen same-site images as training goes on: measured on the phantom (yolov5n, 20
    epochs), 64-image subsets of the test split were flagged in 4 of 20 draws against a training-split reference
    and in 0 of 20 against the validation split (BCCD: 0 of 20 either way; every shifted copy p = 0.001 either way).
    With fewer than :data:`MIN_HELD_OUT` validation images the training split is used and the card says why.

    The sample: every image of the split when there are at most ``rows``, else ``rows`` of them drawn with a
    seeded generator from the list sorted by file name. Returns (float32 (n, D), each row's patient pseudonym as a
    unicode array (n,), how it was drawn for the card).
    """
    from pipeline.infer.batch import collect_sources, source_groups

    split, note = "val", None
    items = collect_sources(prepared / "coco" / "val.json") if (prepared / "coco" / "val.json").is_file() else []
    if len(items) < MIN_HELD_OUT:
        note = (f"the validation split has {len(items)} images (< {MIN_HELD_OUT}): the reference is the training "
                "split, which the model has fitted, so same-site images it never saw are flagged more often")
        split = "train"
        items = collect_sources(prepared / "coco" / "train.json")
    source = prepared / "coco" / f"{split}.json"
    patients = dict(zip((it[0] for it in items), source_groups(source, items), strict=True))
    items = sorted(items, key=lambda it: it[0])
    if len(items) > rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(items), rows, replace=False))
        items = [items[i] for i in keep]
    stream = detector.predict_stream(items, batch=1, workers=1, embeddings=True,
                                     decode=lambda it: detector.decode(it[2], it[0]).rgb)
    vectors, groups = [], []
    for r in stream:
        if r.embedding is not None:
            vectors.append(r.embedding)
            groups.append(patients[r.source[0]] or f"image:{r.source[0]}")  # no patient: the image is its own
    if not vectors:
        raise DataError(f"no {split} image of {prepared} could be read for the embedding reference sample")
    emb = np.stack(vectors).astype(np.float32)
    how = {"split": split, "rows": int(emb.shape[0]), "dim": int(emb.shape[1]), "seed": seed,
           "patients": len(set(groups)),
           "sample": f"all {split} images if at most {rows}, else {rows} drawn with numpy default_rng({seed}) "
                     "from the list sorted by file name; one image per model call"}
    return emb, np.array(groups, dtype=str), {**how, "note": note} if note else how


def build_card(*, family: FamilySpec, model_name: str, classes: list[str], imgsz: int, onnx_path: Path,
               prepared: Path, train_summary: dict, metrics: dict, gate: dict, parity: dict,
               params: Params, stride: int = 0) -> dict[str, Any]:
    """The machine-readable contract that ships next to model.onnx (family fields from the family)."""
    settings = params.export.of(family.name)
    info = json.loads((prepared / "prepare_info.json").read_text())
    windows = info.get("dicom_windows_used") or []
    dicom_window = None
    if info.get("dicom_window"):
        dicom_window = {"mode": "params" if info["dicom_window"] == "params" else "file tags",
                        "window": windows[0] if len(windows) == 1 else None, "windows_seen": windows,
                        "rescale": "RescaleSlope/RescaleIntercept applied first (HU)",
                        "monochrome1": "inverted"}
    from pipeline.adapt import training_object_sizes

    sizes = training_object_sizes(prepared, classes, imgsz)
    spacing = info.get("pixel_spacing") or None
    pixel_spacing = None if not spacing else {
        "value": spacing["median"], "unit": spacing.get("unit", "mm"), "source": spacing.get("source"),
        "rule": "an input whose DICOM PixelSpacing gives another field of view is letterboxed to imgsz x "
                "(spacing x long side) / (value x training_data.image_long_side_px), so objects keep their "
                "training size in model pixels"}
    batch = "dynamic (N)" if family.dynamic_batch else 1
    if stride:
        shape: list[Any] = [batch, 3, "H", "W"]
        resize = (f"letterbox: scale so the image fits {imgsz}x{imgsz} keeping the aspect ratio, bilinear "
                  f"(cv2.INTER_LINEAR), then pad (centred, grey 114) to the smallest multiple of {stride} per side "
                  f"(a 640x480 image becomes {imgsz}x{(-(-round(480 * imgsz / 640) // stride)) * stride}); a batch "
                  "is padded to its largest such shape; boxes mapped back by the same scale and offset")
    else:
        shape = [batch, 3, imgsz, imgsz]
        resize = (f"letterbox to {imgsz}x{imgsz}: keep aspect ratio, bilinear (cv2.INTER_LINEAR), "
                  "centre padding with grey 114; boxes mapped back by the same scale and offset")
    from pipeline.dicom.codes import class_codes  # hook (#23): the codes DICOM SRs use for each class

    codes = {name: c.to_card() for name, c in class_codes(classes, params.export.class_codes).items()}
    return {
        "schema": SCHEMA,
        "family": family.name, "model": model_name, "classes": classes,
        "class_codes": codes,
        "input": {"name": "images", "shape": shape, "imgsz": imgsz, "stride": stride,
                  "dtype": family.input_dtype(settings),
                  "layout": "NCHW", "channel_order": "RGB", "value_range": [0.0, 1.0],
                  "normalisation": "pixel / 255, no mean/std (the network normalises internally for Faster R-CNN)",
                  "resize": resize,
                  "dicom_window": dicom_window, "pixel_spacing": pixel_spacing},
        "output": family.card_output(model_name, classes),
        "postprocess": {"conf": params.evaluate.conf, "nms_iou": params.evaluate.nms_iou,
                        "max_det": params.export.max_det},
        "opset": settings.opset, "sha256": sha256_file(onnx_path), "size_bytes": onnx_path.stat().st_size,
        "training_data": {"source": info.get("source"), "manifest_sha256": info.get("manifest_sha256"),
                          "split_mode": info.get("split_mode"), "modalities": info.get("modalities") or [],
                          "image_long_side_px": sizes["image_long_side_px"], "object_sizes": sizes,
                          # train.fraction: which share of the train split the model saw (null before it existed)
                          "train_subset": (train_summary.get("transfer") or {}).get("train_subset")},
        "pretrained": (train_summary.get("transfer") or {}).get("pretrained"),
        "metrics": {k: metrics.get(k) for k in ("split", "map50_95", "map50", "per_class", "froc", "ci95",
                                                "n_images", "n_patients")},
        "gate": gate, "parity": parity, "versions": _versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _read_json(path: Path, what: str, default: dict | None = None) -> dict:
    """A JSON object input; missing -> ``default`` (or an error when None); damaged -> one clear error."""
    if not path.is_file():
        if default is not None:
            return default
        raise DetflowError(f"{what} {path} not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DetflowError(f"{what} {path} is not valid JSON ({e}); rerun the stage that writes it") from None
    if not isinstance(doc, dict):
        raise DetflowError(f"{what} {path} holds a JSON {type(doc).__name__}, expected an object")
    return doc


# The scratch folders of detflow <= 0.x (tempfile, `.export-XXXXXXXX` beside the model folder) were never removed
# after a kill; they held only these files.
_LEGACY_WORKDIR = re.compile(r"^\.export-[a-z0-9_]{8}$")
_LEGACY_FILES = {"best.pt", "best.onnx", "model.onnx", "model_card.json"}


def recover_export(out_dir: Path, reports: Path | None = None) -> list[Path]:
    """Finish or undo what a killed export left: roll a committed model/card pair forward, remove staged files,
    scratch folders and report temporaries of dead runs. Returns what was removed."""
    # the journal of versions that published the four files one by one (`.model.onnx.commit.json`), then ours
    removed = recover_outputs(out_dir / "model.onnx", out_dir / "model_card.json", out_dir / REFERENCE_FILE,
                              out_dir / REFERENCE_GROUPS_FILE)
    removed += recover_outputs(out_dir / RELEASE_DIR)
    removed += remove_leftovers(out_dir / "export")
    if reports is not None:
        removed += remove_leftovers(reports / "parity.json")
    for entry in out_dir.parent.iterdir() if out_dir.parent.is_dir() else []:
        if _LEGACY_WORKDIR.match(entry.name) and entry.is_dir() and not entry.is_symlink() \
                and {p.name for p in entry.iterdir()} <= _LEGACY_FILES:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def export_model(params: Params, model_path: Path, prepared: Path, reports: Path, out_dir: Path) -> ExportResult:
    """Export, check, measure parity; publish ``model.onnx`` + ``model_card.json`` + the embedding reference sample
    only if parity holds.

    Every input is checked before the export starts; the work happens in a private scratch folder under
    ``out_dir`` that a killed run leaves for the next one to remove.
    """
    import onnx

    from pipeline.evaluate.predict import TorchDetector
    from pipeline.evaluate.stage import load_split
    from pipeline.infer.engine import OnnxDetector

    out_dir.mkdir(parents=True, exist_ok=True)
    recover_export(out_dir, reports)
    gate_path = reports / "gate.json"
    if not gate_path.is_file():
        raise DetflowError(f"{gate_path} not found: evaluate the model (`detflow evaluate`) before exporting")
    gate = _read_json(gate_path, "gate verdict")
    if not gate.get("passed"):
        raise DetflowError(f"the evaluation gate did not pass ({gate_path}); refusing to export")
    if not (prepared / "prepare_info.json").is_file():
        raise DataError(f"prepared dataset {prepared} lacks prepare_info.json; run `detflow prepare` (or `dvc repro`)")
    _read_json(prepared / "prepare_info.json", "dataset info")
    load_split(prepared, params.evaluate.split)  # the parity images
    metrics = _read_json(reports / "metrics.json", "evaluation metrics", default={})
    summary = _read_json(reports / "train" / "summary.json", "training summary", default={})
    torch_det = TorchDetector.load(model_path)
    family, backend = torch_det.family, torch_det.backend
    _check_class_codes(torch_det.classes, params)
    settings = params.export.of(family.name)
    backend.check_export(settings)
    start = time.perf_counter()
    work = private_workdir(out_dir, "export")
    try:
        onnx_path = backend.export_onnx(model_path, torch_det.loaded, work, torch_det.imgsz, settings)
        onnx.checker.check_model(str(onnx_path))
        card = build_card(family=family, model_name=torch_det.meta.model,
                          classes=torch_det.classes, imgsz=torch_det.imgsz, onnx_path=onnx_path,
                          prepared=prepared, train_summary=summary, metrics=metrics, gate=gate, parity={},
                          params=params, stride=torch_det.stride)
        card_path = work / "model_card.json"
        card_path.write_text(json.dumps(card, indent=2))
        onnx_det = OnnxDetector(onnx_path, card_path, providers="CPUExecutionProvider")
        parity = measure_parity(torch_det, onnx_det, prepared, params)
        limit = settings.max_map_delta
        parity.update({"max_map_delta": limit, "passed": parity["delta"] <= limit,
                       "seconds": round(time.perf_counter() - start, 2)})
        atomic_write_json(reports / "parity.json", parity)
        if not parity["passed"]:
            raise ParityFailed(f"ONNX mAP50-95 {parity['map50_95_onnx']:.4f} vs PyTorch {parity['map50_95_torch']:.4f}:"
                               f" delta {parity['delta']:.4f} exceeds {limit}; model not published")
        card["parity"] = {k: parity[k] for k in ("matched_fraction", "max_abs_box_diff_px", "max_abs_score_diff",
                                                 "map50_95_torch", "map50_95_onnx", "delta", "passed")}
        card["version"] = card["sha256"][:12]
        # the checkpoint it was exported from: few-shot adaptation (`detflow adapt --labels`) fine-tunes from it
        card["checkpoint"] = {"path": str(model_path), "sha256": sha256_file(model_path)}
        card["embedding"] = _embedding_entry(onnx_det, onnx_path, prepared, work / REFERENCE_FILE,
                                             work / REFERENCE_GROUPS_FILE)
        validate_card(card, "the model card export built")  # the schema the engine and the service read
        (work / "model_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        publish_model(out_dir, {"model.onnx": onnx_path, "model_card.json": work / "model_card.json",
                                **{name: work / name for name in (REFERENCE_FILE, REFERENCE_GROUPS_FILE)}})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(out_dir / "model.onnx", card, parity)


def published_outputs(out_dir: Path, reports: Path) -> list[Write]:
    """What `detflow export` writes (checked against its inputs before any work)."""
    return [Write("published model folder", out_dir / RELEASE_DIR, "tree", ours="model_card.json"),
            *(Write("model link", out_dir / name) for name in RELEASE_FILES),
            Write("parity report", reports / "parity.json")]


def publish_model(out_dir: Path, files: dict[str, Path]) -> Path:
    """Publish ``files`` (name -> source) as the folder ``out_dir/current``, switched by one atomic rename, and
    make ``out_dir/<name>`` links into it. Returns the folder.

    A missing link is made first (it resolves once the folder is there, so no reader ever sees half a model); a
    regular file left by an earlier version (the four files side by side) is replaced by its link after the switch,
    the model first: a reader that follows ``model.onnx`` into the new folder finds the new card there."""
    release = out_dir / RELEASE_DIR
    for name in files:
        link = out_dir / name
        if not link.exists() and not link.is_symlink():
            link_into_place(link, f"{RELEASE_DIR}/{name}")
    with atomic_directory(release) as stage:
        for name, src in files.items():
            shutil.copyfile(src, stage / name)  # new files: the umask's permissions (0644), not the work folder's
    for name in files:  # model.onnx first (dict order)
        link_into_place(out_dir / name, f"{RELEASE_DIR}/{name}")
    return release


def _check_class_codes(classes: list[str], params: Params) -> None:
    """``export.class_codes`` must name only the model's classes: checked before the export starts."""
    from pipeline.dicom.codes import class_codes

    try:
        class_codes(classes, params.export.class_codes)
    except ValueError as e:
        raise DetflowError(f"export.class_codes: {e}") from None


def _embedding_entry(detector: Any, onnx_path: Path, prepared: Path, reference_path: Path,
                     groups_path: Path) -> dict[str, Any]:
    """The card's ``embedding`` entry; writes the reference sample to ``reference_path`` and its rows' patients to
    ``groups_path`` (scratch, then published with the model). Every family exports the embedding output, so its
    absence is an export bug."""
    from pipeline.families.onnx import embedding_card

    if not detector.has_embeddings:
        raise DetflowError(f"the {detector.family} export has no embedding output; shift detection needs it")
    ref, groups, how = reference_sample(detector, prepared)
    for path, array in ((reference_path, ref), (groups_path, groups)):
        with open(path, "wb") as f:  # a file object: np.save would append .npy to a path
            np.save(f, array, allow_pickle=False)
    entry = embedding_card(onnx_path, {"file": REFERENCE_FILE, "sha256": sha256_file(reference_path), **how,
                                       "groups": {"file": REFERENCE_GROUPS_FILE, "sha256": sha256_file(groups_path),
                                                  "unit": "patient pseudonym (prepare), one per reference row"}})
    assert entry is not None
    return entry
