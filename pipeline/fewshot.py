"""`detflow adapt SOURCE --labels ANNOTATIONS --shots K`: fine-tune the model on K labelled images of the new site.

The second answer to "will it work on our images" (the first is label-free ``adapt``, :mod:`pipeline.adapt`): a
site labels a handful of its own images and the model is fine-tuned on them, from the source model's checkpoint,
with the transfer-learning settings users already know (``train.strategy``, ``train.backbone_lr_mult``).

- **Labels** are read as external evaluation reads a labelled set (:func:`pipeline.evaluate.external.read_external`:
  any supported format, prepare's readers, decoding and box validation, patient pseudonyms). A COCO file whose
  images are not beside it finds them in SOURCE. Every labelled image must be one of SOURCE's images (same decoded
  pixels). Every label must be a model class, by name or through ``--class-map`` (``rbc=RBC``): unlike scoring,
  where an unknown label can be dropped, training on a set with an unmapped class would teach the model that those
  objects are background.
- **The K images** are a prefix of one deterministic, class-stratified order of the labelled patients
  (:mod:`pipeline.data.subsample`, seed ``--seed``): K = 5 is inside K = 10, inside K = 20, so a curve over K is
  paired; a patient is taken whole (:func:`~pipeline.data.subsample.take_images`), so the images left to score
  share no patient with the fine-tuning set. The card lists them.
- **Training**: the family's own training run (``detflow train``'s code) from the source checkpoint (every tensor
  transfers: same classes), :data:`FEW_SHOT_STEPS` optimizer steps of ``min(train.batch, K)`` images (a budget in
  steps, so K = 5 and K = 20 train equally long; :data:`STEPS_PER_EPOCH` an epoch, the K images repeated to fill
  it), no warm-up (the head is not new), the last weights (no model selection on the K images it was fitted on).
  ``--with-scale`` first runs label-free ``adapt`` on SOURCE and trains and runs the model at that input scale
  (``imgsz x scale``, rounded to the stride).
- **Output**: an adapted model folder like label-free ``adapt``'s: the exported ``model.onnx`` (parity-checked), the
  card with ``adaptation.method: few_shot`` (K, the images, their fingerprint, the strategy, the class map, the
  base model), and a shift-test reference drawn from SOURCE's images through the fine-tuned model: the site it is
  now deployed at.

Every input check happens before any training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.adapt import AdaptError, AdaptResult
from pipeline.errors import DetflowError

if TYPE_CHECKING:
    from pipeline.config import Params

FEW_SHOT_STEPS = 100
"""Optimizer steps of a few-shot fine-tune. Chosen on principle, before any few-shot run: a fixed budget in steps
(not epochs) so every K trains equally long; about a quarter of the source training's steps (BCCD: 30 epochs x 13
batches = 390), since it starts from a detector already trained for the task, not from COCO."""
SELECTION_SEED = 0
METHOD = "few_shot"
CHECKPOINT_FILE = "checkpoint.pt"  # the fine-tuned checkpoint, kept in the adapted folder beside the model


class FewShotError(AdaptError):
    """The labels, the shots or the source checkpoint cannot support a few-shot fine-tune."""


# ------------------------------------------------------------------------------------------ labels


@dataclass
class LabelledSite:
    """The site's labelled images in model classes: a COCO document whose ``file_name`` resolve under ``root``."""

    gt: dict
    root: Path
    class_map: dict[str, str]  # site label -> model class, as applied
    labels_source: str
    labels_format: str
    source_index: dict[str, str]  # pixel digest -> SOURCE image name
    image_digest: dict[int, str]  # gt image id -> pixel digest
    n_source: int


def pixel_digest(rgb: np.ndarray) -> str:
    """Identity of an image by its decoded pixels (prepare may re-encode a file; the pixels stay the same)."""
    return hashlib.sha256(f"{rgb.shape}".encode() + np.ascontiguousarray(rgb).tobytes()).hexdigest()


def _source_index(source: Path) -> tuple[dict[str, str], list[tuple[str, Path]]]:
    from pipeline.data.imaging import ImageLoadError, decode_path
    from pipeline.infer.batch import collect_sources

    items = collect_sources(source)
    if not items:
        raise FewShotError(f"no images in {source} (looked for JPEG/PNG/TIFF/BMP/WebP and DICOM files)")
    index: dict[str, str] = {}
    for name, _, path in items:
        try:
            index.setdefault(pixel_digest(decode_path(path).rgb), name)
        except (ImageLoadError, OSError):
            continue  # an undecodable file cannot be labelled either; adapt's own loader reports it
    return index, [(name, path) for name, _, path in items]


def _stage_coco(labels: Path, source: Path, work: Path) -> Path:
    """A COCO file whose images are not beside it: a copy in ``work`` with links to the SOURCE images its entries
    name (by path, else by file name), so the COCO reader finds them; an entry found nowhere stays missing (and is
    reported as a label for an image not in SOURCE)."""
    try:
        doc = json.loads(labels.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return labels  # the reader says what is wrong with it
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        return labels
    base = labels.parent if labels.parent.name != "annotations" else labels.parent.parent
    names = [str(img["file_name"]) for img in images if isinstance(img, dict) and isinstance(img.get("file_name"), str)]
    beside = all((base / n).is_file() or (base / "images" / n).is_file() or (base / "images" / Path(n).name).is_file()
                 for n in names)
    if beside or not source.is_dir():
        return labels
    stage = work / "labels"
    stage.mkdir(parents=True)
    shutil.copyfile(labels, stage / labels.name)
    for n in names:
        found = next((p for p in (source / n, source / Path(n).name) if p.is_file()), None)
        link = stage / n
        if found is None or link.exists() or not link.resolve().is_relative_to(stage.resolve()):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(found.resolve(), link)
        except OSError:
            shutil.copyfile(found, link)
    return stage / labels.name


def read_labelled_site(params: Params, source: Path, labels: Path, fmt: str, class_map: dict[str, str],
                       classes: list[str], work: Path) -> LabelledSite:
    """Read ``labels`` (any supported format) into model classes and check them against SOURCE (module docstring)."""
    from pipeline.data.readers import FORMATS
    from pipeline.evaluate.external import check_class_map, map_classes, read_external
    from pipeline.evaluate.stage import _read_rgb

    if fmt != "auto" and fmt not in FORMATS:
        raise FewShotError(f"unknown --format {fmt!r}; expected one of: auto, {', '.join(FORMATS)}")
    if not labels.exists():
        raise FewShotError(f"--labels {labels} does not exist")
    index, items = _source_index(source)
    staged = _stage_coco(labels, source, work) if labels.is_file() and labels.suffix.lower() == ".json" else labels
    # The staged COCO copy links each labelled image to its file in SOURCE (links this function made, each checked to
    # stay inside the stage): reading through them is reading SOURCE, which the user named, so the dataset-root rule
    # (data.allow_outside_root) is satisfied by construction here; labels in other formats are read in place.
    lenient = params.model_copy(update={
        "prepare": params.prepare.model_copy(update={"max_bad_fraction": 1.0}),
        "data": params.data.model_copy(update={"allow_outside_root": staged != labels
                                               or params.data.allow_outside_root})})
    gt, report = read_external(lenient, str(staged), fmt, work / "labelled", work / "data_validation.json",
                               progress=False)
    missing = [p for p in report.get("problems", []) if p.get("kind") == "missing_image"]
    if missing:
        names = ", ".join(str(p.get("file")) for p in missing[:3])
        raise FewShotError(f"--labels {labels} names {len(missing)} image(s) not found in SOURCE {source}: {names}"
                           f"{', ...' if len(missing) > 3 else ''}; label images of SOURCE only")
    check_class_map(class_map, classes, [c["name"] for c in gt["categories"]], option="--class-map",
                    holder=str(labels), errors=(FewShotError, FewShotError))
    labels_used = sorted({c["name"] for c in gt["categories"]
                          if any(a["category_id"] == c["id"] for a in gt["annotations"])})
    unknown = [lab for lab in labels_used if lab not in class_map and lab not in classes]
    if unknown:
        example = ",".join(f"{u}={classes[0]}" for u in unknown)
        raise FewShotError(f"label{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} of {labels} "
                           f"{'are' if len(unknown) > 1 else 'is'} not a model class ({', '.join(classes)}); map "
                           f"{'them' if len(unknown) > 1 else 'it'} with --class-map (e.g. {example}): fine-tuning "
                           "on an unmapped class would teach the model those objects are background")
    mapping = map_classes(gt, classes, class_map, "labels")
    root = work / "labelled"
    digests: dict[int, str] = {}
    outside = []
    for e in mapping.gt["images"]:
        d = pixel_digest(_read_rgb(root / e["file_name"]))
        digests[e["id"]] = d
        if d not in index:
            outside.append(e["file_name"].split("/")[-1])
    if outside:
        raise FewShotError(f"--labels {labels} labels {len(outside)} image(s) that are not in SOURCE {source}: "
                           f"{', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}; label images of SOURCE "
                           "only")
    if not mapping.gt["images"]:
        raise FewShotError(f"--labels {labels}: no usable labelled image (see {work / 'data_validation.json'})")
    return LabelledSite(gt=mapping.gt, root=root, class_map=mapping.mapped, labels_source=str(labels),
                        labels_format=str(report.get("format")), source_index=index, image_digest=digests,
                        n_source=len(items))


# ------------------------------------------------------------------------------------------ the K images


def shot_order(gt: dict, classes: list[str], seed: int = SELECTION_SEED) -> tuple[list[Any], list[str]]:
    """(units, order): the labelled patients in one deterministic, class-stratified order."""
    from pipeline.data.subsample import nested_order, units_from_images

    per_image: dict[int, list[str]] = {e["id"]: [] for e in gt["images"]}
    for a in gt["annotations"]:
        per_image[a["image_id"]].append(classes[a["category_id"] - 1])
    units = units_from_images((str(e.get("patient", e["id"])), per_image[e["id"]]) for e in gt["images"])
    return units, nested_order(units, seed)


def select_shots(gt: dict, classes: list[str], k: int, seed: int = SELECTION_SEED) -> list[dict]:
    """The image entries of the K few-shot images (whole patients; see the module docstring), in order."""
    from pipeline.data.subsample import take_images

    n = len(gt["images"])
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FewShotError(f"--shots must be a positive number of images, got {k!r}")
    if k > n:
        raise FewShotError(f"--shots {k} is more than the {n} usable labelled images")
    units, order = shot_order(gt, classes, seed)
    chosen = set(take_images(order, units, k))
    rank = {u: i for i, u in enumerate(order)}
    picked = [e for e in gt["images"] if str(e.get("patient", e["id"])) in chosen]
    return sorted(picked, key=lambda e: (rank[str(e.get("patient", e["id"]))], e["id"]))


def held_out(gt: dict, classes: list[str], largest_k: int, seed: int = SELECTION_SEED) -> list[dict]:
    """The labelled images no few-shot run up to ``largest_k`` trains on (none of their patients is in the
    ``largest_k`` set, which holds every smaller K set): the one set a curve over K is scored on."""
    taken = {str(e.get("patient", e["id"])) for e in select_shots(gt, classes, largest_k, seed)}
    return [e for e in gt["images"] if str(e.get("patient", e["id"])) not in taken]


def images_fingerprint(digests: list[str]) -> str:
    """sha256 over the sorted pixel digests of the images used."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ the training set


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_training_set(site: LabelledSite, shots: list[dict], classes: list[str], source_images: list[Path],
                       out: Path, repeats: int = 1) -> dict[str, Any]:
    """A prepared-dataset folder for the K images, in model classes (what ``detflow train`` and ``export`` read):
    train = the K images, each ``repeats`` times under its own name (so an epoch is several optimizer steps: a
    trainer's per-epoch work is paid once per ten steps, not once per step), val = the K images once
    (Ultralytics' required val set; nothing is selected on it), test = the K images (export's PyTorch/ONNX parity),
    ``coco/val.json`` = SOURCE's images (unlabelled: the shift reference). ``coco/train.json`` lists each image
    once. Returns ``prepare_info.json``."""
    import csv
    import io

    import yaml

    for sub in ("images/train", "labels/train", "images/val", "labels/val", "coco"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ann_of: dict[int, list[dict]] = {}
    for a in site.gt["annotations"]:
        ann_of.setdefault(a["image_id"], []).append(a)
    images, annotations, rows = [], [], []
    for n, e in enumerate(shots, start=1):
        src = site.root / e["file_name"]
        name = f"{n:04d}_{Path(e['file_name']).name}"
        shutil.copyfile(src, out / "images" / "train" / name)
        w, h = int(e["width"]), int(e["height"])
        lines = []
        for a in ann_of.get(e["id"], []):
            x, y, bw, bh = (float(v) for v in a["bbox"])
            lines.append(f"{a['category_id'] - 1} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} "
                         f"{bh / h:.6f}")
            annotations.append({**a, "id": len(annotations) + 1, "image_id": n})
        text = "\n".join(lines) + ("\n" if lines else "")
        (out / "labels" / "train" / f"{Path(name).stem}.txt").write_text(text)
        _link(out / "images" / "train" / name, out / "images" / "val" / name)
        (out / "labels" / "val" / f"{Path(name).stem}.txt").write_text(text)
        for r in range(1, repeats):
            again = f"{n:04d}r{r:03d}_{Path(e['file_name']).name}"
            _link(out / "images" / "train" / name, out / "images" / "train" / again)
            (out / "labels" / "train" / f"{Path(again).stem}.txt").write_text(text)
        images.append({"id": n, "file_name": f"images/train/{name}", "width": w, "height": h,
                       "patient": e.get("patient")})
        rows.append([f"images/train/{name}", "train", e.get("patient"),
                     hashlib.sha256((out / "images" / "train" / name).read_bytes()).hexdigest(), w, h,
                     len(ann_of.get(e["id"], []))])
    cats = [{"id": k + 1, "name": c, "supercategory": "lesion"} for k, c in enumerate(classes)]
    doc = {"images": images, "annotations": annotations, "categories": cats}
    for split in ("train", "test"):
        (out / "coco" / f"{split}.json").write_text(json.dumps(doc))
    reference = {"images": [{"id": i, "file_name": str(p.resolve())} for i, p in enumerate(source_images, start=1)],
                 "annotations": [], "categories": cats}
    (out / "coco" / "val.json").write_text(json.dumps(reference))
    spec = {"train": "images/train", "val": "images/val", "nc": len(classes), "names": dict(enumerate(classes))}
    (out / "dataset.yaml").write_text("# Written by `detflow adapt --labels` (few-shot): the K images.\n"
                                      + yaml.safe_dump(spec, sort_keys=False))
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["image", "split", "patient", "sha256", "width", "height", "n_boxes"])
    writer.writerows(rows)
    (out / "manifest.csv").write_text(manifest.getvalue())
    info = {"source": site.labels_source, "format": site.labels_format, "classes": classes, "split_mode": METHOD,
            "dicom_window": None, "dicom_windows_used": [], "pixel_spacing": None,
            "manifest_sha256": hashlib.sha256(manifest.getvalue().encode()).hexdigest()}
    (out / "prepare_info.json").write_text(json.dumps(info, indent=2))
    return info


STEPS_PER_EPOCH = 10
"""Optimizer steps per training epoch (the K images repeated to fill it): Ultralytics' per-epoch work (data loader,
checkpoints) then costs once per ten steps; measured under load, an epoch of one 5-image step took 35 s."""
CLOSE_MOSAIC_SHARE = 0.1
"""Share of the epochs at the end trained without mosaic (Ultralytics' close_mosaic: 10 of its default 100)."""


def training_plan(n_images: int, batch: int, steps: int = FEW_SHOT_STEPS) -> dict[str, int]:
    """Batch, repeats, epochs and optimizer steps for ``n_images``: ``steps`` steps of ``min(batch, n)`` images,
    :data:`STEPS_PER_EPOCH` steps an epoch (each image repeated to fill it), the last :data:`CLOSE_MOSAIC_SHARE` of
    the epochs without mosaic."""
    b = max(1, min(batch, n_images))
    per_epoch = min(STEPS_PER_EPOCH, steps)
    repeats = max(1, math.ceil(per_epoch * b / n_images))
    per_epoch = math.ceil(n_images * repeats / b)
    epochs = max(1, math.ceil(steps / per_epoch))
    return {"batch": b, "repeats": repeats, "epochs": epochs, "steps": epochs * per_epoch,
            "steps_per_epoch": per_epoch, "close_mosaic": int(math.floor(CLOSE_MOSAIC_SHARE * epochs))}


# ------------------------------------------------------------------------------------------ the command


def _checkpoint(card: dict[str, Any], checkpoint: Path | None, card_path: Path) -> tuple[Path, str, Any]:
    """The source model's checkpoint (``--checkpoint``, else the one the card names), checked against the card."""
    import torch

    from pipeline.contracts.checkpoint import CheckpointMeta
    from pipeline.fileio import sha256_file
    from pipeline.ultralytics_env import configure_environment

    recorded = card.get("checkpoint") if isinstance(card.get("checkpoint"), dict) else {}
    if checkpoint is None:
        # export records the path it read (relative to where it ran: the project root); a few-shot folder keeps
        # its own checkpoint beside the card ("file")
        named = [card_path.parent / recorded["file"]] if recorded.get("file") else []
        if recorded.get("path"):
            named += [Path(recorded["path"]), card_path.parent / Path(recorded["path"]).name]
        if not named:
            raise FewShotError(f"model card {card_path} names no training checkpoint (exported before few-shot "
                               "existed); give the checkpoint the model was exported from with --checkpoint "
                               "(e.g. models/train/best.pt)")
        checkpoint = next((p for p in named if p.is_file()), named[0])
    if not checkpoint.is_file():
        raise FewShotError(f"checkpoint {checkpoint} not found; give the model's training checkpoint with "
                           "--checkpoint")
    sha = sha256_file(checkpoint)
    if recorded.get("sha256") and recorded["sha256"] != sha:
        raise FewShotError(f"checkpoint {checkpoint} is not the one {card_path} was exported from (sha256 "
                           f"{sha[:12]}, the card says {str(recorded['sha256'])[:12]})")
    configure_environment()
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        meta = CheckpointMeta.read(ckpt, checkpoint)
    except DetflowError:
        raise
    except Exception as e:  # a damaged file: what the unpickler raises depends on the damage
        raise FewShotError(f"cannot read checkpoint {checkpoint}: {(str(e).splitlines() or [''])[0][:160]}") from None
    if meta.family != card["family"] or list(meta.classes) != list(card["classes"]) \
            or int(meta.imgsz) != int(card["input"]["imgsz"]):
        raise FewShotError(f"checkpoint {checkpoint} ({meta.family}, classes {meta.classes}, imgsz {meta.imgsz}) "
                           f"does not match the model ({card['family']}, classes {card['classes']}, imgsz "
                           f"{card['input']['imgsz']}); give the checkpoint this model was exported from")
    return checkpoint, sha, meta


def few_shot_adapt(model: Path, source: Path, labels: Path, shots: int, out_dir: Path, params: Params, *,
                   checkpoint: Path | None = None, class_map: dict[str, str] | None = None, fmt: str = "auto",
                   with_scale: bool = False, steps: int = FEW_SHOT_STEPS, seed: int = SELECTION_SEED,
                   workdir: Path = Path(".detflow") / "few_shot", progress: bool = True,
                   providers: str = "CPUExecutionProvider") -> AdaptResult:
    """Fine-tune the model on K labelled images of SOURCE and write the adapted model folder ``out_dir``."""
    from pipeline.fileio import private_workdir, sha256_file
    from pipeline.infer.engine import OnnxDetector

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise FewShotError(f"--steps must be a positive integer, got {steps!r}")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise FewShotError(f"--shots must be a positive number of images, got {shots!r}")
    model = Path(model)
    if out_dir.resolve() == model.parent.resolve():
        raise FewShotError(f"--out {out_dir} is the model's own folder; write the adapted model to a new folder")
    detector = OnnxDetector(model, providers=providers)
    card = {k: v for k, v in detector.card.items() if k != "adaptation"}
    classes = list(detector.classes)
    ckpt_path, ckpt_sha, meta = _checkpoint(card, checkpoint, detector.card_path)
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    work = private_workdir(workdir, "run")
    try:
        site = read_labelled_site(params, source, labels, fmt, dict(class_map or {}), classes, work)
        picked = select_shots(site.gt, classes, shots, seed)
        digests = [site.image_digest[e["id"]] for e in picked]
        _, source_items = _source_index(source)
        scale_block = None
        imgsz = int(meta.imgsz)
        if with_scale:
            from pipeline.adapt import adapt_model

            label_free = adapt_model(model, source, work / "label_free", providers=providers).adaptation
            s = float(label_free["input_scale"])
            stride = int(detector.stride or 32)
            imgsz = max(stride, int(round(meta.imgsz * s / stride)) * stride)
            scale_block = {"input_scale": s, "changed": label_free.get("changed", s != 1.0),
                           "imgsz": imgsz, "rule": f"imgsz x input_scale rounded to the stride ({stride})",
                           "reason": label_free.get("reason")}
        prepared = work / "prepared"
        plan = training_plan(len(picked), params.train.batch, steps)
        write_training_set(site, picked, classes, [p for _, p in source_items], prepared, repeats=plan["repeats"])
        tp = params.train.model_copy(update={
            "family": meta.family, "model": meta.model, "pretrained": str(ckpt_path.resolve()),
            "pretrained_sha256": ckpt_sha, "imgsz": imgsz, "epochs": plan["epochs"], "batch": plan["batch"],
            "nominal_batch": plan["batch"], "patience": 0, "resume": "never"})
        run_params = params.model_copy(update={"train": tp})
        result = _train(run_params, prepared, work, progress, close_mosaic=plan["close_mosaic"])
        exported = _export(run_params, result, prepared, work, card)
        new_card = json.loads((exported / "model_card.json").read_text())
        adaptation = {
            "method": METHOD, "input_scale": 1.0, "shots": shots, "n_images": len(picked),
            "images": [Path(e["file_name"]).name for e in picked],
            "images_fingerprint": images_fingerprint(digests),
            "selection": {"seed": seed, "unit": "patient", "n_labelled_images": len(site.gt["images"]),
                          "rule": "prefix of pipeline.data.subsample.nested_order over the labelled patients "
                                  "(class-stratified); whole patients until K images (take_images)"},
            "labels": {"source": site.labels_source, "format": site.labels_format,
                       "class_map": site.class_map, "sha256": sha256_file(labels) if labels.is_file() else None},
            "source": str(source), "n_source_images": site.n_source,
            "strategy": tp.strategy, "backbone_lr_mult": tp.backbone_lr_mult,
            "unfreeze_at": list(tp.unfreeze_at) if tp.strategy == "progressive" else None,
            "training": {**plan, "imgsz": imgsz, "lr": tp.lr, "optimizer": tp.optimizer, "warmup_epochs": 0,
                         "weights": "last epoch (no selection on the images it was fitted on)",
                         "seconds": round(time.perf_counter() - start, 1)},
            "label_free_scale": scale_block,
            "checkpoint": {"path": str(ckpt_path), "sha256": ckpt_sha},
            "base_model": {"path": str(model), "sha256": card.get("sha256"), "version": card.get("version")},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        new_card = {**new_card, "adaptation": adaptation,
                    "checkpoint": {"file": CHECKPOINT_FILE, "sha256": sha256_file(exported / CHECKPOINT_FILE)},
                    "metrics": {**(new_card.get("metrics") or {}),
                                "note": "not scored here: the K images are the training set; score the site's "
                                        "other labelled images with `detflow evaluate --data`"},
                    "source_model_metrics": card.get("metrics")}
        _publish_folder(exported, new_card, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return AdaptResult(out_dir, adaptation)


def _train(params: Params, prepared: Path, work: Path, progress: bool, close_mosaic: int = 0) -> Any:
    """The family's short training run on the K images (its backend's ``train_few_shot``: YOLO without warm-up or
    per-epoch validation, the last ``close_mosaic`` epochs without mosaic)."""
    from pipeline.families.backends import backend_of

    return backend_of(params.train.family).train_few_shot(params, prepared, work / "train", work / "reports" / "train",
                                                          work / "runs", progress=progress,
                                                          plain_last_epochs=close_mosaic)


def _export(params: Params, result: Any, prepared: Path, work: Path, source_card: dict[str, Any]) -> Path:
    """Export the fine-tuned checkpoint (last epoch) through the export stage's code into ``work/models``."""
    from pipeline.export import export_model
    from pipeline.fileio import atomic_write_json

    reports = work / "reports"
    gate = source_card.get("gate") or {}
    atomic_write_json(reports / "gate.json", {
        "passed": True, "checks": [],
        "note": "few-shot adaptation: no held-out labels to gate on here (the K images are the training set); "
                "the source model's gate: " + ("passed" if gate.get("passed") else "unknown")})
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.last, models / CHECKPOINT_FILE)  # kept with the model: re-export, few-shot again
    export_model(params, models / CHECKPOINT_FILE, prepared, reports, models)
    _site_reference(models, prepared)
    return models


def _site_reference(models: Path, prepared: Path) -> None:
    """The shift reference of the fine-tuned model is the site's own images (SOURCE, ``coco/val.json``). Export
    takes them when there are at least 32; with fewer it fell back to its training split, here the K images the
    model was fitted on, so the reference is redrawn from every SOURCE image instead, and the card says so."""
    from pipeline.export import REFERENCE_FILE, REFERENCE_GROUPS_FILE
    from pipeline.fileio import sha256_file
    from pipeline.infer.batch import collect_sources, source_groups
    from pipeline.infer.engine import OnnxDetector

    card_path = models / "model_card.json"
    card = json.loads(card_path.read_text())
    ref = (card.get("embedding") or {}).get("reference") or {}
    if ref.get("split") == "val":
        card["embedding"]["reference"] = {**ref, "split": "site", "note": "the new site's images (SOURCE) through "
                                          "the fine-tuned model: the site it is deployed at"}
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        return
    source = prepared / "coco" / "val.json"
    items = collect_sources(source)
    groups = dict(zip((it[0] for it in items), source_groups(source, items), strict=True))
    detector = OnnxDetector(models / "model.onnx", card_path, providers="CPUExecutionProvider")
    vectors, rows = [], []
    for r in detector.predict_stream(items, batch=1, workers=1, embeddings=True,
                                     decode=lambda it: detector.decode(it[2], it[0]).rgb):
        if r.embedding is not None:
            vectors.append(r.embedding)
            rows.append(groups.get(r.source[0]) or f"image:{r.source[0]}")
    emb = np.stack(vectors).astype(np.float32)
    for name, array in ((REFERENCE_FILE, emb), (REFERENCE_GROUPS_FILE, np.array(rows, dtype=str))):
        with open(models / name, "wb") as f:
            np.save(f, array, allow_pickle=False)
    card["embedding"]["reference"] = {
        **ref, "split": "site", "rows": int(emb.shape[0]), "patients": len(set(rows)),
        "sha256": sha256_file(models / REFERENCE_FILE),
        "groups": {**(ref.get("groups") or {}), "sha256": sha256_file(models / REFERENCE_GROUPS_FILE)},
        "sample": "every SOURCE image, one image per model call",
        "note": f"the new site's images (SOURCE, {emb.shape[0]}) through the fine-tuned model: the site it is "
                "deployed at (fewer than 32, so not drawn by export, which would have used the K training images)"}
    card_path.write_text(json.dumps(card, indent=2) + "\n")


def _publish_folder(exported: Path, card: dict[str, Any], out_dir: Path) -> None:
    """The exported folder's files and the adapted card as the folder ``out_dir``, switched whole by one atomic
    rename, as export and label-free adapt publish (readers never pair the card with another folder's files)."""
    from pipeline.contracts.card import validate_card
    from pipeline.fileio import atomic_directory

    validate_card(card, "the few-shot adapted model card")  # the one schema the engine reads
    files = sorted(p for p in exported.iterdir() if p.is_file() and p.name != "model_card.json"
                   and not p.name.startswith("."))
    with atomic_directory(out_dir) as stage:
        for src in files:
            shutil.copyfile(src, stage / src.name)  # follows export's links into its published folder
        (stage / "model_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
