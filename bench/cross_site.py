"""Cross-site generalisation: internal vs external mAP50, external after `detflow adapt`, and the shift test.

Two site pairs, each trained, exported and scored through the `detflow` commands a user runs:

- ``phantom``: site A (default scanner, 0.7 mm) -> site B (0.5 mm spacing, more noise, sharp kernel, +30 HU).
  Both sites image the *same* new patients (a phantom seed the model never saw), so A' vs B isolates the scanner.
  B is scored three ways: with the card's spacing-aware letterbox (DICOM PixelSpacing vs the training spacing),
  with the training spacing removed from the card (what a spacing-blind pipeline sees), and after `adapt`.
  Then 64 site-A and 64 site-B DICOM files go through a real `detflow serve` process: its /v1/shift and /metrics
  flag, next to the same test run in-process on the engine's embeddings.
- ``bccd``: BCCD -> shifted copies of its prepared test split (``pipeline.data.sites``): magnification x0.6 and
  x1.6 (a change of field of view) and a stain/camera change. Each copy is scored as is, after `adapt` on its own
  test images; `adapt` on the unshifted test images checks that adaptation leaves a same-site model alone. A box
  cut by the x1.6 field is kept when as much of it is in view as BCCD's own annotators needed to label a cell cut by
  the image edge (``sites.labelled_visibility``: 56 %); the row ``x1.6 all boxes`` scores the same images with every
  clipped sliver kept.
- ``--robust``: a second model trained with the robust recipe (bccd: ``train.augment.stain``; phantom:
  ``train.augment.window`` and ``gamma``), scored on the same sets, to show what the recipe buys.

Shift test (``pipeline.shift``): p-values of 64-image target sets against the model's reference sample, and the
false-alarm rate over ``--subsets`` random same-site subsets of 64 at alpha 0.05, patient-level (patients drawn
whole and permuted whole; the test `detflow shift` runs) next to the image-level test (every image its own unit),
measured on the same embeddings in the same run.

    python bench/cross_site.py --part phantom --epochs 20 --imgsz 256 --patients 60 --robust
    python bench/cross_site.py --part bccd --epochs 30 --imgsz 416 --robust   # needs DETFLOW_ASSETS

Prints one table per part; writes bench/results/cross_site_<part>.json.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SITE_B = ["phantom.pixel_spacing=0.5", "phantom.noise_hu=25", "phantom.sharpness=1.0", "phantom.hu_offset=30"]
N_TARGET = 64
ALPHA = 0.05


def cli(work: Path, *argv: str) -> str:
    """One `detflow` command in the work folder (its own params.yaml); its stdout, or exit with its error."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-P", "-m", "pipeline.cli", *argv], cwd=work, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        sys.exit(f"detflow {' '.join(argv)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    print(f"  [{time.perf_counter() - start:6.1f} s] detflow {' '.join(argv)[:150]}", flush=True)
    return r.stdout


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def train_and_export(work: Path, overrides: list[str], reuse: bool) -> Path:
    """prepare -> train -> evaluate (gate) -> export in ``work`` (the dvc.yaml layout); the exported model."""
    model = work / "models" / "model.onnx"
    if reuse and model.is_file():
        print(f"  reusing {model}")
        return model
    s = sets(overrides)
    if not (reuse and (work / "models" / "train" / "best.pt").is_file()):
        cli(work, "train", "--data", "data/prepared", "--out", "models/train", "--reports", "reports/train", *s,
            "--quiet")
    # the bench measures, it does not promote: the gate's thresholds are zeroed so export always runs
    gate_off = sets(["gate.min_map50=0", "gate.min_sensitivity_at_1fp=0", "gate.min_cpm=0", "gate.max_regression=null"])
    cli(work, "evaluate", "--model", "models/train/best.pt", "--data", "data/prepared", "--reports", "reports", *s,
        *gate_off, "--quiet")
    cli(work, "export", "--model", "models/train/best.pt", "--data", "data/prepared", "--reports", "reports",
        "--out", "models", *s)
    return model


def external_map50(work: Path, model: Path, data: Path, name: str, fmt: str, overrides: list[str]) -> dict[str, Any]:
    """`detflow evaluate --model ONNX --data PATH`: the set scored whole by the deployed engine."""
    cli(work, "evaluate", "--model", str(model), "--data", str(data), "--format", fmt, "--name", name,
        "--reports", "reports/bench", *sets(overrides), "--quiet")
    m = json.loads((work / "reports" / "bench" / "external" / name / "metrics.json").read_text())
    return {"map50": m["map50"], "ci95": m["ci95"]["map50"], "n_images": m["n_images"],
            "per_class_ap50": {c: v.get("ap50") for c, v in (m.get("per_class") or {}).items()
                               if isinstance(v, dict)}}


def adapt(work: Path, model: Path, images: Path, out: Path) -> dict[str, Any]:
    cli(work, "adapt", str(images), "--model", str(model), "--out", str(out))
    card = json.loads((out / "model_card.json").read_text())
    a = card.get("adaptation") or {}
    return {"method": a.get("method"), "input_scale": a.get("input_scale"), "pixel_size": a.get("pixel_size"),
            "n_images": a.get("n_images")}


def root_split_json(prepared: Path, split: str = "test") -> Path:
    """The split's COCO file at the dataset root, where the COCO reader finds ``images/<split>/...``."""
    out = prepared / f"{split}_split.json"
    shutil.copyfile(prepared / "coco" / f"{split}.json", out)
    return out


# ------------------------------------------------------------------------------------------- shift test


def embed(model: Path, items: list[tuple[str, int, Path]]) -> np.ndarray:
    """One embedding per image, one image per call (as `detflow shift` and the reference sample run)."""
    from pipeline.infer.engine import OnnxDetector

    det = OnnxDetector(model, providers="CPUExecutionProvider")
    return np.concatenate([det.predict_with_embeddings([det.decode(p, n).rgb])[1] for n, _, p in items])


def target_set(source: Path) -> tuple[list[tuple[str, int, Path]], list[str | None]]:
    from pipeline.infer.batch import collect_sources, source_groups

    items = collect_sources(source)
    return items, source_groups(source, items)


def draw_by_patient(groups: list[str | None], n: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices of ``n`` images: whole patients in random order (the last one cut to fit); images without a
    patient are drawn singly."""
    labels = [g if g is not None else f"#{i}" for i, g in enumerate(groups)]
    units: dict[str, list[int]] = {}
    for i, g in enumerate(labels):
        units.setdefault(g, []).append(i)
    order = rng.permutation(list(units))
    rows: list[int] = []
    for u in order:
        rows.extend(units[u][: n - len(rows)])
        if len(rows) == n:
            break
    return np.array(rows)


def shift_stats(model: Path, targets: dict[str, tuple[Path, bool]], subsets: int, permutations: int
                ) -> dict[str, Any]:
    """For each target set: p-values on 64 images drawn by patient; for same-site sets (flag True) the false-alarm
    rate over ``subsets`` draws, for shifted ones the largest p over 3 draws. Patient- and image-level tests."""
    from pipeline.infer.engine import OnnxDetector
    from pipeline.shift import mmd_test

    det = OnnxDetector(model, providers="CPUExecutionProvider")
    reference = det.embedding_reference()
    ref_groups = det.embedding_reference_groups(len(reference))
    out: dict[str, Any] = {"n_reference": len(reference),
                           "reference_patients": None if ref_groups is None else len(set(ref_groups.tolist()))}
    for name, (source, same_site) in targets.items():
        items, groups = target_set(source)
        vectors = embed(model, items)
        rng = np.random.default_rng(0)
        draws = subsets if same_site else 3
        rows = [draw_by_patient(groups, min(N_TARGET, len(items)), rng) for _ in range(draws)]
        res: dict[str, Any] = {"source": str(source), "same_site": same_site, "n_images": len(items),
                               "n_patients": len({g for g in groups if g is not None}) or None, "draws": draws}
        for unit in ("patient", "image"):
            ps = []
            for i, r in enumerate(rows):
                kw = {"reference_groups": ref_groups, "target_groups": [groups[j] for j in r]} \
                    if unit == "patient" else {}
                ps.append(mmd_test(reference, vectors[r], alpha=ALPHA, n_permutations=permutations, seed=i,
                                   **kw).p_value)
            res[unit] = {"p_values": [round(p, 4) for p in ps], "max_p": max(ps), "median_p": float(np.median(ps)),
                         "false_alarm_rate": float(np.mean(np.array(ps) < ALPHA)) if same_site else None}
        out[name] = res
    return out


# ------------------------------------------------------------------------------------------- parts


def part_phantom(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = [f"phantom.patients={args.patients}", f"train.epochs={args.epochs}", f"train.imgsz={args.imgsz}",
            "train.resume=never", *args.overrides]
    if not (args.reuse and (work / "data" / "prepared" / "manifest.csv").is_file()):
        cli(work, "phantom", "--out", "data/raw/phantom", *sets(base), "--quiet")
        cli(work, "prepare", "--out", "data/prepared", "--report", "reports/data_validation.json", "--phantom-dir",
            "data/raw/phantom", *sets(base), "--quiet")
    model = train_and_export(work, base, args.reuse)
    # new patients (seed 1), imaged by site A and by site B
    new = [f"phantom.patients={args.site_patients}", "phantom.seed=1"]
    cli(work, "phantom", "--out", "data/raw/siteA", *sets(new), "--quiet")
    cli(work, "phantom", "--out", "data/raw/siteB", *sets([*new, *SITE_B]), "--quiet")
    blind = work / "models_spacing_blind"  # the same model, its card without the training spacing
    blind.mkdir(exist_ok=True)
    for f in model.parent.glob("*"):
        if f.is_file():
            shutil.copyfile(f, blind / f.name)
    card = json.loads((blind / "model_card.json").read_text())
    card.get("input", {}).pop("pixel_spacing", None)
    (blind / "model_card.json").write_text(json.dumps(card, indent=2))
    adapted = work / "models_adapted_B"
    how = adapt(work, model, work / "data" / "raw" / "siteB" / "dicom", adapted)
    rows = {
        "internal (A test split)": external_map50(work, model, root_split_json(work / "data" / "prepared"),
                                                  "internal", "coco", base),
        "A, new patients": external_map50(work, model, work / "data/raw/siteA", "siteA", "dicom_csv", base),
        "B, spacing-aware": external_map50(work, model, work / "data/raw/siteB", "siteB", "dicom_csv", base),
        "B, spacing ignored": external_map50(work, blind / "model.onnx", work / "data/raw/siteB", "siteB_blind",
                                             "dicom_csv", base),
        "B, after adapt": external_map50(work, adapted / "model.onnx", work / "data/raw/siteB", "siteB_adapted",
                                         "dicom_csv", base),
    }
    targets = {"A test split": (work / "data/prepared/coco/test.json", True),
               "A new patients": (work / "data/raw/siteA/dicom", True),
               "B": (work / "data/raw/siteB/dicom", False)}
    shift = shift_stats(model, targets, args.subsets, args.permutations)
    service = {site: service_shift(work, model, sorted((work / "data/raw" / site / "dicom").rglob("*.dcm")),
                                   args.permutations) for site in ("siteA", "siteB")}
    robust = None
    if args.robust:
        recipe = args.robust_recipe or ["train.augment.window=0.2", "train.augment.gamma=0.3"]
        rmodel = robust_model(args, work, base, recipe)
        robust = {"recipe": recipe, "map50": {
            "internal (A test split)": external_map50(work, rmodel, root_split_json(work / "data" / "prepared"),
                                                      "robust_internal", "coco", base),
            "A, new patients": external_map50(work, rmodel, work / "data/raw/siteA", "robust_siteA", "dicom_csv",
                                              base),
            "B, spacing-aware": external_map50(work, rmodel, work / "data/raw/siteB", "robust_siteB", "dicom_csv",
                                               base)}}
    internal = rows["internal (A test split)"]["map50"]
    return {"overrides": base, "site_b": SITE_B, "site_patients": args.site_patients, "adapt_B": how,
            "map50": rows,
            "b_spacing_aware_minus_internal": round(rows["B, spacing-aware"]["map50"] - internal, 4),
            "shift": shift, "service": service, "robust": robust}


def service_shift(work: Path, model: Path, files: list[Path], permutations: int) -> dict[str, Any]:
    """`detflow serve` (a real process on a free local port): the first :data:`N_TARGET` files posted to
    /v1/detect one by one; then its /v1/shift and /metrics, next to the shift test run in-process on the engine's
    embeddings of the same images (issue 13 acceptance 3 and 4)."""
    import socket

    import httpx

    from pipeline.infer.engine import OnnxDetector
    from pipeline.shift import mmd_test

    files = files[:N_TARGET]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DETFLOW_SERVE_SHIFT_PERMUTATIONS": str(permutations),
           "DETFLOW_SERVE_SHIFT_WINDOW": str(N_TARGET)}
    proc = subprocess.Popen([sys.executable, "-P", "-m", "pipeline.cli", "serve", "--model", str(model), "--port",
                             str(port), "--providers", "CPUExecutionProvider", "--log-level", "warning"],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit(f"detflow serve did not become ready: {proc.stderr.read() if proc.stderr else ''}")
                time.sleep(0.2)
            start = time.perf_counter()
            for f in files:
                r = client.post("/v1/detect", files={"file": (f.name, f.read_bytes(), "application/dicom")})
                if r.status_code != 200:
                    sys.exit(f"/v1/detect {f}: {r.status_code} {r.text[:300]}")
            seconds = time.perf_counter() - start
            while True:  # the test runs off the request path; wait for the one over all the files
                status = client.get("/v1/shift").json()
                if (status.get("result") or {}).get("n_target") == len(files) or time.monotonic() > deadline + 60:
                    break
                time.sleep(0.2)
            metrics = {line.split()[0]: float(line.split()[1]) for line in client.get("/metrics").text.splitlines()
                       if line.startswith("detflow_serve_shift_")}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    det = OnnxDetector(model, providers="CPUExecutionProvider")
    vectors = np.concatenate([det.predict_with_embeddings([det.decode(f, f.name).rgb])[1] for f in files])
    reference = det.embedding_reference()
    local = mmd_test(reference, vectors, alpha=ALPHA, n_permutations=permutations,
                     reference_groups=det.embedding_reference_groups(len(reference)))
    res = status.get("result") or {}
    return {"n_posted": len(files), "seconds": round(seconds, 1), "v1_shift": res, "metrics": metrics,
            "in_process": {"statistic": local.statistic, "p_value": local.p_value, "shifted": local.shifted},
            "same_statistic": bool(res) and abs(res["statistic"] - local.statistic) <= 1e-6 * max(1.0,
                                                                                                abs(local.statistic))}


def robust_model(args: argparse.Namespace, work: Path, base: list[str], recipe: list[str]) -> Path:
    """The same training with the robust-recipe overrides, in ``work/robust`` on the same prepared data."""
    rwork = work / "robust"
    (rwork / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "params.yaml", rwork / "params.yaml")
    link = rwork / "data" / "prepared"
    if not link.exists():
        link.symlink_to((work / "data" / "prepared").resolve(), target_is_directory=True)
    return train_and_export(rwork, [*base, *recipe], args.reuse)


def part_bccd(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from pipeline.data.sites import MIN_VISIBLE, Magnification, Stain, labelled_visibility, write_shifted_copy

    base = ["data.source=bccd", f"train.epochs={args.epochs}", f"train.imgsz={args.imgsz}", "train.resume=never",
            "train.augment.fliplr=0.5", *args.overrides]
    prepared = work / "data" / "prepared"
    if not (args.reuse and (prepared / "manifest.csv").is_file()):
        cli(work, "prepare", "--out", "data/prepared", "--report", "reports/data_validation.json", *sets(base),
            "--quiet")
    model = train_and_export(work, base, args.reuse)
    copies = {"x0.6": Magnification(0.6), "x1.6": Magnification(1.6),
              "stain": Stain(strength=0.3, brightness=0.9, gamma=1.2),
              "stain strong": Stain(strength=0.6, brightness=0.85, gamma=1.4)}
    rows: dict[str, Any] = {}
    targets: dict[str, tuple[Path, bool]] = {"BCCD test": (prepared / "coco" / "test.json", True)}
    internal = external_map50(work, model, root_split_json(prepared), "internal", "coco", base)
    same = adapt(work, model, prepared / "images" / "test", work / "models_adapted_same")
    rows["unshifted"] = {"transform": None, "external": internal, "adapt": same,
                         "after_adapt": external_map50(work, work / "models_adapted_same" / "model.onnx",
                                                       root_split_json(prepared), "internal_adapted", "coco", base)}
    tests: dict[str, Path] = {"unshifted": root_split_json(prepared)}
    # a box cut by the new field is kept when as much of it is in view as BCCD's annotators needed to label one
    min_visible = labelled_visibility(prepared) or MIN_VISIBLE
    for name, transform in copies.items():
        dst = work / "data" / f"shifted_{name.replace(' ', '_')}"
        summary = write_shifted_copy(prepared, dst, transform, seed=0, min_visible=min_visible)
        tests[name] = test_json = root_split_json(dst)
        ext = external_map50(work, model, test_json, f"bccd_{name.replace(' ', '_')}", "coco", base)
        slug = name.replace(" ", "_")
        how = adapt(work, model, dst / "images" / "test", work / f"models_adapted_{slug}")
        after = external_map50(work, work / f"models_adapted_{slug}" / "model.onnx", test_json,
                               f"bccd_{slug}_adapted", "coco", base)
        rows[name] = {"transform": {**transform.describe(0), "min_visible": min_visible},
                      "boxes": _box_counts(summary),
                      "external": ext, "adapt": how, "after_adapt": after,
                      "recovered_fraction": recovered(internal, ext, after)}
        targets[f"BCCD {name}"] = (dst / "coco" / "test.json", False)
    # the x1.6 copy scored with every clipped box kept, slivers included (same images, so the same adaptation)
    dst = work / "data" / "shifted_x1.6_all_boxes"
    summary = write_shifted_copy(prepared, dst, copies["x1.6"], seed=0, min_visible=0.0)
    test_json = root_split_json(dst)
    ext = external_map50(work, model, test_json, "bccd_x1.6_all_boxes", "coco", base)
    after = external_map50(work, work / "models_adapted_x1.6" / "model.onnx", test_json,
                           "bccd_x1.6_all_boxes_adapted", "coco", base)
    rows["x1.6 all boxes"] = {"transform": {**copies["x1.6"].describe(0), "min_visible": 0.0},
                              "boxes": _box_counts(summary), "external": ext, "adapt": rows["x1.6"]["adapt"],
                              "after_adapt": after, "recovered_fraction": recovered(internal, ext, after)}
    robust = None
    if args.robust:
        recipe = args.robust_recipe or ["train.augment.stain=0.3"]
        rmodel = robust_model(args, work, base, recipe)
        robust = {"recipe": recipe, "map50": {name: external_map50(work, rmodel, t,
                                                                   f"robust_{name.replace(' ', '_')}", "coco", base)
                                              for name, t in tests.items()}}
    shift = shift_stats(model, targets, args.subsets, args.permutations)
    return {"overrides": base, "map50": rows, "robust": robust, "shift": shift}


def _box_counts(summary: Any) -> dict[str, int]:
    return {k: getattr(summary, k) for k in ("boxes_in", "boxes_out", "boxes_clipped", "dropped_outside",
                                             "dropped_small", "dropped_truncated")}


def recovered(internal: dict[str, Any], ext: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Share of the mAP50 lost to the shift that adaptation won back (None when nothing was lost)."""
    lost = internal["map50"] - ext["map50"]
    return round((after["map50"] - ext["map50"]) / lost, 3) if lost > 1e-9 else None


def print_tables(part: str, res: dict[str, Any]) -> None:
    print(f"\n== {part}: mAP50 (ONNX engine, `detflow evaluate --data`)")
    if part == "phantom":
        for name, r in res["map50"].items():
            print(f"  {name:<26} {r['map50']:.4f}  CI {r['ci95']}  ({r['n_images']} images)")
        print(f"  B spacing-aware - internal: {res['b_spacing_aware_minus_internal']:+.4f}; "
              f"adapt: {res['adapt_B']}")
    else:
        print(f"  {'set':<10} {'external':>9} {'after adapt':>12} {'recovered':>10}  adapt")
        for name, r in res["map50"].items():
            rec = r.get("recovered_fraction")
            print(f"  {name:<10} {r['external']['map50']:>9.4f} {r['after_adapt']['map50']:>12.4f} "
                  f"{'' if rec is None else f'{rec:.0%}':>10}  {r['adapt']}")
    if res.get("robust"):
        r = res["robust"]
        plain = res["map50"]
        print(f"\n== {part}: robust recipe {' '.join(r['recipe'])} (external mAP50, no adaptation)")
        for name, m in r["map50"].items():
            p = plain.get(name)
            p = p.get("external", p) if isinstance(p, dict) else None
            vs = f"   plain recipe {p['map50']:.4f}  ({m['map50'] - p['map50']:+.4f})" if p else ""
            print(f"  {name:<26} {m['map50']:.4f}{vs}")
    for site, r in (res.get("service") or {}).items():
        v = r["v1_shift"]
        print(f"\n== {part}: {r['n_posted']} {site} images through `detflow serve` ({r['seconds']} s): /v1/shift "
              f"shifted={v.get('shifted')} p={v.get('p_value')} MMD2={v.get('statistic')}; /metrics flag "
              f"{r['metrics'].get('detflow_serve_shift_flag')}; in-process engine p={r['in_process']['p_value']} "
              f"MMD2={r['in_process']['statistic']} (same statistic: {r['same_statistic']})")
    s = res["shift"]
    print(f"\n== {part}: shift test, {N_TARGET} images vs the reference ({s['n_reference']} rows, "
          f"{s['reference_patients']} patients), alpha {ALPHA}")
    print(f"  {'target':<18} {'draws':>5} {'patient-level':>28} {'image-level':>28}")
    for name, r in s.items():
        if not isinstance(r, dict):
            continue
        cells = []
        for unit in ("patient", "image"):
            u = r[unit]
            cells.append(f"false alarms {u['false_alarm_rate']:.0%}, med p {u['median_p']:.3f}" if r["same_site"]
                         else f"max p {u['max_p']:.4f}")
        print(f"  {name:<18} {r['draws']:>5} {cells[0]:>28} {cells[1]:>28}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="phantom,bccd", help="comma list: phantom, bccd")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: phantom 20, bccd 30)")
    ap.add_argument("--imgsz", type=int, default=None, help="training size (default: phantom 256, bccd 416)")
    ap.add_argument("--patients", type=int, default=60, help="phantom site A patients (train/val/test)")
    ap.add_argument("--site-patients", type=int, default=24, help="new phantom patients imaged by sites A and B")
    ap.add_argument("--subsets", type=int, default=20, help="same-site subsets for the false-alarm rate")
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="extra param overrides")
    ap.add_argument("--work", type=Path, default=None, help="work folder per part: WORK/<part> (default: temporary)")
    ap.add_argument("--reuse", action="store_true", help="reuse data and models already in the work folder")
    ap.add_argument("--robust", action="store_true",
                    help="also train with the robust recipe (bccd: stain jitter; phantom: window and gamma jitter) "
                         "and score it on the same sets")
    ap.add_argument("--robust-recipe", action="append", default=[], help="override the robust recipe (KEY=VALUE)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    root = args.work or Path(tempfile.mkdtemp(prefix="detflow-bench-cross-site-"))
    for part in [p.strip() for p in args.part.split(",") if p.strip()]:
        if part not in ("phantom", "bccd"):
            sys.exit(f"unknown part {part!r}: phantom or bccd")
        defaults = {"phantom": (20, 256), "bccd": (30, 416)}[part]
        a = argparse.Namespace(**{**vars(args), "epochs": args.epochs or defaults[0],
                                  "imgsz": args.imgsz or defaults[1]})
        work = root / part
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "params.yaml").is_file():
            shutil.copyfile(REPO / "params.yaml", work / "params.yaml")
        print(f"== {part}: {a.epochs} epochs at {a.imgsz} px, work {work}", flush=True)
        start = time.perf_counter()
        res = (part_phantom if part == "phantom" else part_bccd)(a, work)
        res.update({"epochs": a.epochs, "imgsz": a.imgsz, "seconds": round(time.perf_counter() - start, 1),
                    "machine": {"python": sys.version.split()[0], "cpu": platform.processor() or platform.machine(),
                                "cores": os.cpu_count()}})
        print_tables(part, res)
        from pipeline.fileio import atomic_write_json

        atomic_write_json(args.out_dir / f"cross_site_{part}.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
