"""``train.fraction``: train on a nested, class-stratified share of the train split's patients; val and test never
change.

The subsample is a prefix of one order of the split's patients (:mod:`pipeline.data.subsample`), so the 25 %
patients are inside the 50 % for the same seed. The order's seed is ``train.seed``: every arm of a study with one
seed trains on nested subsamples (and a COCO arm and a scratch arm at one fraction on the same images); another seed
draws another nested order, so seed replicates cover which patients were labelled as well as training noise.

Each family trains on a *view* written into its run folder: ``train_subset.json`` (the COCO train document limited
to the chosen images) and ``dataset.yaml`` (Ultralytics: ``train`` is a list file of the chosen images' absolute
paths; val and test are the prepared folders themselves).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.subsample import NEGATIVE, Unit, nested_order, take_fraction, units_from_images
from pipeline.errors import DataError

ORDER_SEED = "train.seed"  # what seeds the nested order (stated in transfer.json)


@dataclass
class TrainSubset:
    """The images of the train split that a run trains on, and how they were chosen."""

    fraction: float
    seed: int
    images: list[dict[str, Any]]  # COCO image entries kept, in the split's order
    patients: list[str]  # the patients kept, in the nested order
    n_images_total: int
    n_patients_total: int
    class_images: dict[str, int] = field(default_factory=dict)  # images holding each class (kept)
    class_images_total: dict[str, int] = field(default_factory=dict)

    @property
    def whole(self) -> bool:
        return len(self.images) == self.n_images_total

    def summary(self) -> dict[str, Any]:
        """What transfer.json, the model card and the report record about the subsample."""
        ids = sorted(str(p) for p in self.patients)
        return {"fraction": self.fraction, "order_seed": self.seed, "order_seed_from": ORDER_SEED,
                "rule": "shortest prefix of a class-stratified order of whole patients holding >= fraction of the "
                        "train split's images (pipeline/data/subsample.py); nested across fractions for one seed",
                "n_images": len(self.images), "n_images_total": self.n_images_total,
                "n_patients": len(self.patients), "n_patients_total": self.n_patients_total,
                "class_images": dict(self.class_images), "class_images_total": dict(self.class_images_total),
                "patients_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def _class_names(doc: dict[str, Any]) -> dict[int, str]:
    return {int(c["id"]): str(c["name"]) for c in doc.get("categories", [])}


def _units(train_doc: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[int, str], dict[int, set[str]], list[Unit]]:
    """(images, patient of each image id, class names in each image id, the patients as sampling units)."""
    names = _class_names(train_doc)
    classes_of: dict[int, set[str]] = {}
    for a in train_doc.get("annotations", []):
        classes_of.setdefault(int(a["image_id"]), set()).add(names.get(int(a["category_id"]), str(a["category_id"])))
    images = list(train_doc.get("images", []))
    unit_of = {int(e["id"]): str(e.get("patient", f"image-{e['id']}")) for e in images}
    units = units_from_images((unit_of[int(e["id"])], classes_of.get(int(e["id"]), ())) for e in images)
    return images, unit_of, classes_of, units


def select_train_subset(train_doc: dict[str, Any], fraction: float, seed: int) -> TrainSubset:
    """The nested subsample of a COCO train document (patients from each image's ``patient``; an image without one is
    its own patient). Raises :class:`DataError` when a class of the split would have no image in it."""
    if not 0 < fraction <= 1:
        raise DataError(f"train.fraction must be in (0, 1], got {fraction}")
    names = _class_names(train_doc)
    images, unit_of, classes_of, units = _units(train_doc)
    if not images:
        raise DataError("the train split is empty: there is nothing to subsample")
    order = nested_order(units, seed)
    kept = set(take_fraction(order, units, fraction)) if fraction < 1 else set(order)
    chosen = [e for e in images if unit_of[int(e["id"])] in kept]

    def per_class(entries: list[dict[str, Any]]) -> dict[str, int]:
        out: dict[str, int] = {n: 0 for n in names.values()}
        for e in entries:
            for c in classes_of.get(int(e["id"]), {NEGATIVE}):
                if c != NEGATIVE:
                    out[c] = out.get(c, 0) + 1
        return out

    subset = TrainSubset(fraction=fraction, seed=seed, images=chosen, patients=[u for u in order if u in kept],
                         n_images_total=len(images), n_patients_total=len(units), class_images=per_class(chosen),
                         class_images_total=per_class(images))
    empty = [c for c, n in subset.class_images.items() if n == 0 and subset.class_images_total.get(c, 0) > 0]
    if empty:
        raise DataError(f"train.fraction {fraction} keeps {len(chosen)} of {len(images)} train images "
                        f"({len(kept)} of {len(units)} patients) and no image of class {', '.join(sorted(empty))}; "
                        f"use a larger fraction (at least {smallest_fraction_with_every_class(train_doc, seed):.3g})")
    return subset


def smallest_fraction_with_every_class(train_doc: dict[str, Any], seed: int) -> float:
    """The smallest ``train.fraction`` whose subsample holds an image of every class of the split (for messages)."""
    images, _, _, units = _units(train_doc)
    by_id = {u.id: u for u in units}
    wanted = {c for u in units for c in u.class_images if c != NEGATIVE}
    seen: set[str] = set()
    count = 0
    for unit in nested_order(units, seed):
        count += by_id[unit].images
        seen |= set(by_id[unit].class_images) - {NEGATIVE}
        if seen >= wanted:
            break
    return count / max(1, len(images))


def load_train_subset(prepared: Path, fraction: float, seed: int) -> TrainSubset:
    """:func:`select_train_subset` of a prepared dataset's train split; its val split must not be empty."""
    val = json.loads((prepared / "coco" / "val.json").read_text())
    if not val.get("images"):
        raise DataError(f"the val split of {prepared} is empty: training needs validation images (prepare with a "
                        "larger prepare.val_fraction or a dataset with a val split)")
    return select_train_subset(json.loads((prepared / "coco" / "train.json").read_text()), fraction, seed)


def write_subset_view(prepared: Path, subset: TrainSubset, run_dir: Path) -> tuple[Path, Path]:
    """Write ``run_dir/train_subset.json`` and ``run_dir/dataset.yaml`` (train = the chosen images); return both."""
    import yaml

    from pipeline.fileio import atomic_write_json, atomic_write_text

    prepared = prepared.resolve()
    doc = json.loads((prepared / "coco" / "train.json").read_text())
    keep = {int(e["id"]) for e in subset.images}
    doc["images"] = [e for e in doc["images"] if int(e["id"]) in keep]
    doc["annotations"] = [a for a in doc.get("annotations", []) if int(a["image_id"]) in keep]
    doc.setdefault("info", {})["train_subset"] = subset.summary()
    train_json = run_dir / "train_subset.json"
    atomic_write_json(train_json, doc)
    files = run_dir / "train_subset.txt"
    atomic_write_text(files, "".join(f"{prepared / e['file_name']}\n" for e in subset.images))
    dataset = yaml.safe_load((prepared / "dataset.yaml").read_text())
    dataset.update({"path": str(prepared), "train": str(files)})
    dataset_yaml = run_dir / "dataset.yaml"
    atomic_write_text(dataset_yaml, "# train.fraction view of the prepared dataset (pipeline/train/subset.py)\n"
                      + yaml.safe_dump(dataset, sort_keys=False))
    return dataset_yaml, train_json
