"""What a new site gets from K of its own labels: mAP50 on its remaining images at K = 0 (label-free `adapt`), 5, 10,
20 (`adapt --labels --shots K`), per fine-tuning recipe, with patient-bootstrap 95 % CIs (issue 21).

The curve is paired: every K is scored on the same images, the labelled images outside the largest K set (the K
sets are nested, K = 5 inside 10 inside 20, :mod:`pipeline.data.subsample`), so no image used for fine-tuning is
ever scored. Everything runs through the `detflow` commands a site would run (`adapt`, `evaluate --data`), in a work
folder; the K sets are checked against the adapted cards (nested, outside the scored images).

``--source-prepared`` adds the source site's own check: label-free `adapt` on the source's test images must leave
its test mAP50 where it was (the shift test finds no shift there, so the model comes back unchanged).

    python bench/site_adaptation.py --model WORK/models/model.onnx --checkpoint WORK/models/train/best.pt \
        --site /work/shared/datasets/bcdd-dev/images --labels /work/shared/datasets/bcdd-dev/annotations.json \
        --class-map rbc=RBC,wbc=WBC --source-prepared WORK/data/prepared --set train.augment.fliplr=0.5 \
        --work /tmp/site-adaptation --reports WORK/reports --name bcdd-dev

Prints the table; writes bench/results/site_adaptation.json and, with ``--reports``, the same document as
``REPORTS/external/<name>/site_adaptation.json``, which the run report shows in its Generalisation section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCHEMA = "detflow-site-adaptation/1"


def cli(work: Path, *argv: str) -> str:
    """One `detflow` command in the work folder; its stdout, or exit with its error."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DETFLOW_NO_PROGRESS": "1"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-P", "-m", "pipeline.cli", *argv], cwd=work, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        sys.exit(f"detflow {' '.join(argv)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    print(f"  [{time.perf_counter() - start:6.1f} s] detflow {' '.join(argv)[:160]}", flush=True)
    return r.stdout


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def scored_set(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """The labelled images outside the largest K set, as a COCO file (model classes, patients kept) with its
    images beside it, and facts for the result (the K sets' image names among them)."""
    from pipeline.config import load_params
    from pipeline.fewshot import SELECTION_SEED, held_out, read_labelled_site, select_shots
    from pipeline.infer.engine import OnnxDetector

    classes = list(OnnxDetector(args.model, providers="CPUExecutionProvider").classes)
    params = load_params(None, [])
    cmap = dict(p.split("=", 1) for p in args.class_map.split(",")) if args.class_map else {}
    scratch = Path(tempfile.mkdtemp(prefix="site-adaptation-", dir=work))
    site = read_labelled_site(params, args.site, args.labels, "auto", cmap, classes, scratch)
    largest = select_shots(site.gt, classes, max(args.shots), SELECTION_SEED)
    scored = {e["id"] for e in held_out(site.gt, classes, max(args.shots), SELECTION_SEED)}
    nested = {k: [Path(e["file_name"]).name for e in select_shots(site.gt, classes, k, SELECTION_SEED)]
              for k in args.shots}
    out = work / "scored"
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for e in site.gt["images"]:
        if e["id"] not in scored:
            continue
        name = Path(e["file_name"]).name
        shutil.copyfile(site.root / e["file_name"], out / "images" / name)
        images.append({"id": e["id"], "file_name": name, "width": e["width"], "height": e["height"],
                       "patient_id": e.get("patient")})
    keep = {e["id"] for e in images}
    annotations = [a for a in site.gt["annotations"] if a["image_id"] in keep]
    doc = {"images": images, "annotations": annotations, "categories": site.gt["categories"]}
    (out / "annotations.json").write_text(json.dumps(doc))
    shutil.rmtree(scratch, ignore_errors=True)
    facts = {"n_labelled": len(site.gt["images"]), "n_scored": len(images), "n_boxes_scored": len(annotations),
             "n_site_images": site.n_source, "largest_k_images": sorted(Path(e["file_name"]).name for e in largest),
             "class_map": site.class_map}
    return out / "annotations.json", {**facts, "k_sets": nested}


def score(work: Path, model: Path, data: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    cli(work, "evaluate", "--model", str(model), "--data", str(data), "--name", name, "--reports", "reports",
        *sets(overrides), "--quiet")
    m = json.loads((work / "reports" / "external" / name / "metrics.json").read_text())
    return {"map50": m["map50"], "ci95": m["ci95"]["map50"], "n_images": m["n_images"], "n_patients": m["n_patients"],
            "per_class_ap50": {c: v.get("ap50") for c, v in (m.get("per_class") or {}).items() if isinstance(v, dict)}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "params.yaml").is_file():
        shutil.copyfile(REPO / "params.yaml", work / "params.yaml")
    model, ckpt = args.model.resolve(), args.checkpoint.resolve() if args.checkpoint else None
    args.site, args.labels = args.site.resolve(), args.labels.resolve()
    print(f"== site adaptation: {args.site} ({args.labels}), K = {args.shots}, recipes {args.recipes}", flush=True)
    data, facts = scored_set(args, work)
    print(f"  scored on {facts['n_scored']} of {facts['n_labelled']} labelled images (not in the K = "
          f"{max(args.shots)} set)", flush=True)
    cmap = ["--class-map", args.class_map] if args.class_map else []
    rows: list[dict[str, Any]] = []
    base = score(work, model, data, "source_model", args.overrides)
    rows.append({"k": None, "recipe": "source model, unadapted", **base})
    if not (args.reuse and (work / "models" / "k0" / "model_card.json").is_file()):
        cli(work, "adapt", str(args.site), "--model", str(model), "--out", "models/k0", *sets(args.overrides))
    a0 = json.loads((work / "models" / "k0" / "model_card.json").read_text())["adaptation"]
    rows.append({"k": 0, "recipe": "label-free", **score(work, work / "models/k0/model.onnx", data, "k0",
                                                           args.overrides),
                 "adaptation": {k: a0.get(k) for k in ("method", "input_scale", "changed", "reason")},
                 "shift_p": (a0.get("shift") or {}).get("p_value")})
    for recipe in args.recipes:
        for k in sorted(args.shots):
            out = f"models/k{k}_{recipe}"
            if args.reuse and (work / out / "model_card.json").is_file():
                print(f"  reusing {work / out}", flush=True)
            else:
                cli(work, "adapt", str(args.site), "--labels", str(args.labels), "--shots", str(k), *cmap,
                    "--model", str(model), *(["--checkpoint", str(ckpt)] if ckpt else []), "--out", out,
                    *(["--with-scale"] if args.with_scale else []),
                    *sets([*args.overrides, f"train.strategy={recipe}", *args.recipe_set]), "--quiet")
            card = json.loads((work / out / "model_card.json").read_text())["adaptation"]
            used = set(card["images"])
            assert used == set(facts["k_sets"][k]), f"K={k}: the command chose other images than the bench"
            assert not used & {e for e in os.listdir(data.parent / "images")}, "a fine-tuning image is scored"
            rows.append({"k": k, "recipe": recipe, **score(work, work / out / "model.onnx", data, f"k{k}_{recipe}",
                                                           args.overrides),
                         "n_train_images": card["n_images"], "images_fingerprint": card["images_fingerprint"],
                         "training": card["training"], "label_free_scale": card.get("label_free_scale")})
    for a, b in zip(sorted(args.shots), sorted(args.shots)[1:], strict=False):
        assert set(facts["k_sets"][a]) <= set(facts["k_sets"][b]), "K sets are not nested"
    source_check = None
    if args.source_prepared:
        test = args.source_prepared.resolve() / "test_split.json"
        shutil.copyfile(args.source_prepared / "coco" / "test.json", test)
        before = score(work, model, test, "source_test", args.overrides)
        cli(work, "adapt", str(args.source_prepared.resolve() / "images" / "test"), "--model", str(model), "--out",
            "models/source_test", *sets(args.overrides))
        a = json.loads((work / "models/source_test/model_card.json").read_text())["adaptation"]
        after = score(work, work / "models/source_test/model.onnx", test, "source_test_adapted", args.overrides)
        source_check = {"before": before, "after": after, "change": round(after["map50"] - before["map50"], 4),
                        "adaptation": {k: a.get(k) for k in ("method", "input_scale", "changed", "reason")},
                        "shift_p": (a.get("shift") or {}).get("p_value")}
    return {"schema": SCHEMA, "site": str(args.site), "labels": str(args.labels), "model": str(model),
            "shots": sorted(args.shots), "recipes": args.recipes, "overrides": args.overrides, **facts,
            "rows": rows, "source_check": source_check,
            "note": "mAP50 of every row on the same images: the labelled images outside the largest K set; 95 % "
                    "CIs by patient bootstrap (`detflow evaluate --data`)"}


def print_table(res: dict[str, Any]) -> None:
    print(f"\n== mAP50 on {res['n_scored']} images of the site not used for fine-tuning (95 % patient-bootstrap CI)")
    print(f"  {'K':>4}  {'recipe':<26} {'mAP50':>7}  {'CI':<18} per class")
    for r in res["rows"]:
        k = "-" if r["k"] is None else str(r["k"])
        ci = "[" + ", ".join(f"{v:.3f}" for v in r["ci95"]) + "]"
        extra = ""
        if r.get("adaptation"):
            extra = f"  (input scale {r['adaptation']['input_scale']:.4g}, changed {r['adaptation']['changed']})"
        print(f"  {k:>4}  {r['recipe']:<26} {r['map50']:>7.4f}  {ci:<18} "
              + " ".join(f"{c} {v:.3f}" for c, v in r["per_class_ap50"].items() if v is not None) + extra)
    s = res.get("source_check")
    if s:
        print(f"\n== source test split: {s['before']['map50']:.4f} -> after label-free adapt {s['after']['map50']:.4f} "
              f"(change {s['change']:+.4f}; {s['adaptation']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the source model.onnx (card beside it)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="its training checkpoint (default: the card's)")
    ap.add_argument("--site", type=Path, required=True, help="the site's images (folder)")
    ap.add_argument("--labels", type=Path, required=True, help="labels of (some of) them, any supported format")
    ap.add_argument("--class-map", default="", help="site label -> model class, e.g. rbc=RBC,wbc=WBC")
    ap.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--recipes", nargs="+", default=["feature_extraction", "fine_tune"],
                    choices=["feature_extraction", "fine_tune", "progressive"])
    ap.add_argument("--with-scale", action="store_true", help="few-shot at the label-free input scale")
    ap.add_argument("--recipe-set", action="append", default=[], help="extra few-shot overrides (KEY=VALUE)")
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="param overrides of every command (the source training's, e.g. train.augment.fliplr=0.5)")
    ap.add_argument("--source-prepared", type=Path, default=None,
                    help="the source's prepared dataset: label-free adapt on its test split must not lower it")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: temporary)")
    ap.add_argument("--reuse", action="store_true", help="reuse adapted models already in the work folder (the "
                    "selection and training are deterministic); every row is scored again")
    ap.add_argument("--reports", type=Path, default=None, help="also write REPORTS/external/NAME/site_adaptation.json")
    ap.add_argument("--name", default="site", help="the external set's name in the run report")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "site_adaptation.json")
    args = ap.parse_args(argv)
    args.work = args.work or Path(tempfile.mkdtemp(prefix="detflow-site-adaptation-"))
    start = time.perf_counter()
    res = run(args)
    res.update({"seconds": round(time.perf_counter() - start, 1),
                "machine": {"python": sys.version.split()[0], "cpu": platform.processor() or platform.machine(),
                            "cores": os.cpu_count()}})
    print_table(res)
    from pipeline.fileio import atomic_write_json

    atomic_write_json(args.out, res)
    if args.reports:
        atomic_write_json(args.reports / "external" / args.name / "site_adaptation.json", res)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
