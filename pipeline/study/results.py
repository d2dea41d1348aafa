"""``detflow study report``: the arms read back from DVC, compared in pairs, and one recommendation, all derived from
the numbers (``reports/study/results.json``).

Every number of an arm comes from its DVC experiment: metrics from ``dvc exp show --json`` (the evaluate stage's
``reports/metrics.json``, the train stage's ``reports/train/metrics.json``, ``reports/generalisation.json``) and its
test detections from the experiment's ``reports/eval/predictions.json`` (``dvc.api.read`` at the experiment's
commit). All arms are scored on one test split (checked: the same ``data/prepared`` hash), so comparisons are
**paired**: one patient bootstrap (``evaluate.bootstrap`` resamples, ``evaluate.seed``) draws the same patients for
every arm (:func:`pipeline.evaluate.metrics.bootstrap_draws`), and a difference's interval is the 2.5-97.5
percentile of the per-resample differences.

The recommendation rule (stated in results.json as well):

1. the best arm has the highest test mAP50;
2. an arm is *as good as the best* when the 95 % interval of its paired mAP50 difference to the best includes 0;
3. an interval is *wide* when it is wider than ``study.wide_ci``; when other arms are as good as the best but every
   one of their differences to the best is wide, the study cannot tell them apart (it knows neither that they are
   as good nor that they are worse), and says so instead of recommending. An arm whose interval excludes 0 is
   worse, however wide: with every other arm worse, the best arm is a clear winner;
4. otherwise the cheapest arm that is as good as the best is recommended: least training time (``train_seconds``:
   wall seconds of the train stage's epochs), then fewest trainable parameters, then fewest training images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import DetflowError
from pipeline.study.plan import Arm, pct
from pipeline.study.queue import ExpState

SCHEMA = "detflow-study/1"
REFERENCE_RECIPE = "fine_tune"  # the recipe the others are compared with, when the study has it
RULE = ("best = highest test mAP50; as good as the best = the 95% CI of the paired mAP50 difference to the best "
        "includes 0; wide = a CI wider than study.wide_ci; when every arm as good as the best (the best aside) has a "
        "wide CI the study cannot tell; else the cheapest arm as good as the best (least train_seconds, then fewest "
        "trainable parameters, then fewest training images) is recommended")


def _f(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def _lock_hash(repo: Path, path: str, rev: str | None = None) -> str | None:
    """The hash a dvc.lock (the checkout's, or the one committed at ``rev``) records for output ``path``."""
    import subprocess

    import yaml

    if rev is None:
        lock = repo / "dvc.lock"
        text = lock.read_text() if lock.is_file() else ""
    else:
        proc = subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=repo, capture_output=True, text=True)
        text = proc.stdout if proc.returncode == 0 else ""
    doc = yaml.safe_load(text) or {}
    for stage in (doc.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == path:
                return out.get("md5") or out.get("hash")
    return None


_READ = ("import sys, dvc.api\n"
         "sys.stdout.write(dvc.api.read(sys.argv[1], repo=sys.argv[2], rev=sys.argv[3]))\n")


def read_arm_file(repo: Path, rev: str, path: str) -> Any:
    """A JSON output of an experiment, from the DVC cache at the experiment's commit (``dvc.api.read``, in a child
    process with a timeout and retries: see :data:`pipeline.study.queue.READ_TIMEOUT_S`)."""
    import subprocess
    import sys

    from pipeline.study.queue import READ_RETRIES, READ_TIMEOUT_S, dvc_env

    for _ in range(READ_RETRIES + 1):
        try:
            proc = subprocess.run([sys.executable, "-c", _READ, path, str(repo), rev], cwd=repo, env=dvc_env(repo),
                                  capture_output=True, text=True, timeout=READ_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            continue
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DetflowError(f"cannot read {path} of experiment {rev[:10]}: {why}")
        return json.loads(proc.stdout)
    raise DetflowError(f"reading {path} of experiment {rev[:10]} did not finish within {READ_TIMEOUT_S:.0f} s "
                       f"({READ_RETRIES + 1} tries); run `detflow study report` again")


def arm_record(arm: Arm, st: ExpState | None, external_sets: Sequence[str]) -> dict[str, Any]:
    """An arm's row: its plan, state and what its experiment measured (values as metrics files hold them)."""
    row: dict[str, Any] = {"name": arm.name, "label": arm.label, "recipe": arm.recipe, "init": arm.init,
                           "fraction": arm.fraction, "seed": arm.seed, "epochs": arm.epochs,
                           "budget_rule": arm.budget_rule, "planned_steps": arm.planned_steps,
                           "state": st.state if st else "missing", "rev": st.rev if st else None}
    if st is None or st.state != "success":
        return row
    m = st.metrics.get("reports/metrics.json") or {}
    t = st.metrics.get("reports/train/metrics.json") or {}
    gen = (st.metrics.get("reports/generalisation.json") or {}).get("sets") or {}
    row.update({
        "map50": _f(m.get("map50")), "map50_95": _f(m.get("map50_95")), "cpm": _f((m.get("froc") or {}).get("cpm")),
        "n_test_images": m.get("n_images"), "n_test_patients": m.get("n_patients"),
        "optimizer_steps": t.get("optimizer_steps"), "train_seconds": _f(t.get("train_seconds")),
        "trainable_params": t.get("trainable_params"), "train_images": t.get("train_images") or arm.train_images,
        "external": {name: {"map50": _f((gen.get(name) or {}).get("map50")),
                            "ci95": (gen.get(name) or {}).get("ci95_map50")} for name in external_sets},
    })
    return row


def _cost(row: dict[str, Any]) -> tuple[float, float, float]:
    def num(key: str) -> float:
        v = _f(row.get(key))
        return v if v is not None else math.inf

    return num("train_seconds"), num("trainable_params"), num("train_images")


def recommend(rows: list[dict[str, Any]], vs_best: list[dict[str, Any]], wide_ci: float) -> dict[str, Any]:
    """The rule of the module docstring on finished arms (rows with ``map50``) and their differences to the best."""
    done = [r for r in rows if r.get("map50") is not None]
    out: dict[str, Any] = {"rule": RULE, "wide_ci": wide_ci, "cannot_tell": False, "arm": None,
                           "as_good_as_best": [], "best": None}
    if not done:
        out["text"] = "No arm has finished yet: nothing to recommend (run `detflow study run`)."
        return out
    best = max(done, key=lambda r: (r["map50"], tuple(-c for c in _cost(r))))
    out["best"] = best["name"]
    if best["map50"] <= 0.0:  # every arm at zero: ties everywhere, and the cheapest would be "recommended"
        out["cannot_tell"] = True
        out["text"] = (f"No arm found anything on the test set (the best test mAP50 of the {len(done)} finished arms "
                       "is 0.000): nothing to recommend; give the arms a larger budget (study.steps or study.epochs) "
                       "or check the data.")
        return out
    if len(done) == 1:
        out.update({"arm": best["name"], "as_good_as_best": [best["name"]],
                    "text": f"Only one arm finished ({best['label']}, test mAP50 {best['map50']:.3f}): nothing to "
                            "compare it with."})
        return out
    by_name = {r["name"]: r for r in done}
    good = [best["name"]] + [c["arm"] for c in vs_best if c["includes_zero"]]
    out["as_good_as_best"] = good
    tied = [c for c in vs_best if c["includes_zero"]]
    if tied and all(c["wide"] for c in tied):
        widths = [c["width"] for c in tied if c["width"] is not None]
        out["cannot_tell"] = True
        out["text"] = (f"The study cannot tell the arms apart: {len(tied)} of the {len(vs_best)} other arms are "
                       f"within noise of the best arm ({best['label']}, test mAP50 {best['map50']:.3f}), and every "
                       f"one of their paired mAP50 differences has a 95 % interval wider than {wide_ci:g} (the "
                       f"narrowest is {min(widths or [math.nan]):.3f} wide); more test patients or more seeds are "
                       "needed before choosing.")
        return out
    pick = min((by_name[n] for n in good), key=_cost)
    out["arm"] = pick["name"]
    ci = pick["ci95"]["map50"]
    cost = (f"{pick['train_seconds']:.0f} s of training" if pick.get("train_seconds") is not None
            else "training time unknown") + (f", {pick['trainable_params']:,} trainable parameters"
                                             if pick.get("trainable_params") is not None else "")
    head = (f"Recommended: {pick['recipe']} from {'COCO weights' if pick['init'] == 'coco' else 'scratch'} on "
            f"{pct(pick['fraction'])} of the training data ({pick['train_images']} images), test mAP50 "
            f"{pick['map50']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
    if pick["name"] == best["name"] and len(good) == 1:
        out["text"] = (f"{head}: the best arm; every other arm is worse (its paired interval to the best excludes "
                       f"0). {cost[0].upper() + cost[1:]}.")
    elif pick["name"] == best["name"]:
        out["text"] = (f"{head}: the best arm, and the cheapest of the {len(good)} arms as good as the best "
                       f"({cost}).")
    else:
        diff = next(c for c in vs_best if c["arm"] == pick["name"])
        lo, hi = diff["ci95"]
        out["text"] = (f"{head}, {diff['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] against the best arm "
                       f"({best['label']}, {best['map50']:.3f}): the cheapest of the {len(good)} arms as good as "
                       f"the best ({cost}).")
    return out


def _diff(boot: Any, a: str, b: str, wide_ci: float) -> dict[str, Any]:
    """``a - b`` in test mAP50 and its paired interval, both from the bootstrap's AP engine (so the interval is
    around its own point; that engine equals pycocotools' mAP50 within about 0.002, see tests)."""
    from pipeline.evaluate.metrics import paired_difference

    d = paired_difference(boot, a, b, "map50")
    lo, hi = d["ci95"]
    width = round(hi - lo, 4) if math.isfinite(lo) and math.isfinite(hi) else None
    return {"difference": d["difference"], "ci95": [lo, hi],
            "includes_zero": bool(lo <= 0 <= hi), "width": width, "wide": width is None or width > wide_ci}


def compare(rows: list[dict[str, Any]], images: dict[str, list[Any]], n_classes: int, froc_iou: float,
            resamples: int, seed: int, wide_ci: float, recipes: Sequence[str]) -> dict[str, Any]:
    """The paired comparisons, learning curves and recommendation of finished arms.

    ``rows``: arm records (:func:`arm_record`; finished ones carry ``map50``), each given its ``ci95`` here;
    ``images``: each finished arm's test-set :class:`~pipeline.evaluate.metrics.ImageDets`, one split for all.
    """
    from pipeline.evaluate.metrics import bootstrap_draws, percentile_interval

    done = [r for r in rows if r.get("map50") is not None]
    boot = bootstrap_draws({r["name"]: images[r["name"]] for r in done}, n_classes, froc_iou, resamples, seed) \
        if done else None
    for r in done:  # the evaluate stage's own intervals where it wrote them (same resamples, unrounded scores)
        own = r.pop("ci95_evaluate", None) or {}
        r["ci95"] = {m: own.get(m) or percentile_interval(boot.draws[r["name"]][m]) for m in ("map50", "map50_95",
                                                                                              "cpm")}
    vs_best: list[dict[str, Any]] = []
    coco_vs_scratch: list[dict[str, Any]] = []
    vs_reference: list[dict[str, Any]] = []
    best = None
    if done:
        best = max(done, key=lambda r: (r["map50"], tuple(-c for c in _cost(r))))
        vs_best = [{"arm": r["name"], "best": best["name"], **_diff(boot, r["name"], best["name"], wide_ci)}
                   for r in done if r["name"] != best["name"]]
        key = {(r["recipe"], r["init"], r["fraction"], r["seed"]): r["name"] for r in done}
        for (recipe, init, fraction, seed_), name in key.items():
            if init == "coco" and (recipe, "scratch", fraction, seed_) in key:
                other = key[(recipe, "scratch", fraction, seed_)]
                coco_vs_scratch.append({"recipe": recipe, "fraction": fraction, "seed": seed_, "coco": name,
                                        "scratch": other, **_diff(boot, name, other, wide_ci)})
        reference = REFERENCE_RECIPE if REFERENCE_RECIPE in recipes else (list(recipes) or [None])[0]
        for (recipe, init, fraction, seed_), name in key.items():
            if recipe != reference and (reference, init, fraction, seed_) in key:
                other = key[(reference, init, fraction, seed_)]
                vs_reference.append({"recipe": recipe, "reference": reference, "init": init, "fraction": fraction,
                                     "seed": seed_, "arm": name, "reference_arm": other,
                                     **_diff(boot, name, other, wide_ci)})
    curves: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in done:
        curves.setdefault((r["recipe"], r["init"], r["seed"]), []).append(
            {"fraction": r["fraction"], "map50": r["map50"], "ci95": r["ci95"]["map50"], "arm": r["name"]})
    return {"best": best["name"] if best else None,
            "comparisons": {"vs_best": vs_best, "coco_vs_scratch": coco_vs_scratch, "vs_reference": vs_reference},
            "learning_curves": [{"recipe": k[0], "init": k[1], "seed": k[2],
                                 "points": sorted(v, key=lambda p: p["fraction"])} for k, v in curves.items()],
            "recommendation": recommend(rows, vs_best, wide_ci),
            "n_patients": boot.n_patients if boot else None, "n_images": boot.n_images if boot else None}


def build_results(params: Any, repo: Path, arms: Sequence[Arm], states: dict[str, ExpState], baseline: str | None,
                  prepared: Path, progress: bool = True) -> dict[str, Any]:
    """results.json's content for the planned ``arms`` and their experiment ``states``."""
    from pipeline.evaluate.metrics import image_dets_from_coco

    st_params = params.study
    ev = params.evaluate
    external_sets = [s.name for s in params.external]
    rows = [arm_record(a, states.get(a.name), external_sets) for a in arms]
    done = [r for r in rows if r.get("map50") is not None]
    gt = json.loads((prepared / "coco" / f"{ev.split}.json").read_text())
    classes = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    prepared_hash = _lock_hash(repo, "data/prepared")
    for r in done:
        dep = _lock_hash(repo, "data/prepared", r["rev"])
        if prepared_hash and dep and dep != prepared_hash:
            raise DetflowError(f"arm {r['name']} was trained and scored on another prepared dataset (data/prepared "
                               f"{dep[:12]}, the checkout's {prepared_hash[:12]}); its test split may differ. Run "
                               "`detflow study run` again after `dvc repro prepare`")
    from tqdm import tqdm

    images = {}
    for r in tqdm(done, desc="reading arms", unit="arm", disable=not progress):
        images[r["name"]] = image_dets_from_coco(read_arm_file(repo, r["rev"], "reports/eval/predictions.json"), gt)
        ci = read_arm_file(repo, r["rev"], "reports/metrics.json").get("ci95") or {}  # exp show drops the lists
        r["ci95_evaluate"] = {m: ci[m] for m in ("map50", "cpm") if isinstance(ci.get(m), list)}
        if external_sets:  # `dvc exp show` drops lists (the intervals): read the file itself
            sets = (read_arm_file(repo, r["rev"], "reports/generalisation.json").get("sets") or {})
            r["external"] = {n: {"map50": _f((sets.get(n) or {}).get("map50")),
                                 "ci95": (sets.get(n) or {}).get("ci95_map50")} for n in external_sets}
    resamples = ev.bootstrap or 1000  # evaluate.bootstrap: 0 turns the metrics files' CIs off, not the study's
    compared = compare(rows, images, len(classes), ev.froc_iou, resamples, ev.seed, st_params.wide_ci,
                       list(st_params.recipes))
    return assemble(params, rows, compared, baseline, classes, resamples)


def assemble(params: Any, rows: list[dict[str, Any]], compared: dict[str, Any], baseline: str | None,
             classes: list[str], resamples: int) -> dict[str, Any]:
    """results.json from the arm rows and :func:`compare`'s output."""
    st_params, ev = params.study, params.evaluate
    rule = "steps" if st_params.steps is not None else "epochs"
    return {
        "schema": SCHEMA, "created": datetime.now(UTC).isoformat(timespec="seconds"), "baseline": baseline,
        "budget": {"rule": rule, "imgsz": st_params.imgsz, "epochs": st_params.epochs, "steps": st_params.steps,
                   "text": (f"every arm trains {st_params.epochs} epochs at {st_params.imgsz} px (a smaller fraction "
                            "also gets fewer optimizer steps)" if rule == "epochs" else
                            f"every arm gets at least {st_params.steps} optimizer steps at {st_params.imgsz} px, "
                            "rounded up to whole epochs (a smaller fraction trains more epochs)"),
                   "patience": 0, "gate": "off (an arm measures; it does not promote)"},
        "split": ev.split, "classes": classes, "external_sets": [s.name for s in params.external],
        "bootstrap": {"unit": "patient", "resamples": resamples, "seed": ev.seed, "paired": True,
                      "n_patients": compared["n_patients"], "n_images": compared["n_images"]},
        "subsample": {"order_seed_from": "train.seed", "nested": True,
                      "rule": "whole patients, class-stratified, the 25 % inside the 50 % for one seed"},
        "arms": rows,
        "missing": [{"name": r["name"], "label": r["label"], "state": r["state"]} for r in rows
                    if r.get("map50") is None],
        "best": compared["best"], "comparisons": compared["comparisons"],
        "learning_curves": compared["learning_curves"], "recommendation": compared["recommendation"],
    }
