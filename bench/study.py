"""The transfer-learning study on BCCD: 4 recipes x 3 fractions x 2 initialisations through `detflow study`, at one
stated budget, plus the COCO-vs-scratch pair at the smallest fraction under the other budget rule.

Runs in a scratch copy of this checkout (its own git repository, so DVC experiments never touch this one):

    python bench/study.py --measure                          # seconds per optimizer step and per validation pass
    python bench/study.py --steps 150 --imgsz 320            # the full study (needs DETFLOW_ASSETS: BCCD, COCO weights)
    python bench/study.py --smoke                            # fine_tune x 2 fractions x 2 inits, 2 optimizer steps

Writes bench/results/study.json (the results.json of both studies, wall and CPU times, the machine) and copies the
study page and learning-curve chart next to it. ``--work DIR`` keeps the scratch repository (a rerun resumes: done
arms are not trained again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"feature_extraction": {"strategy": "feature_extraction"}, "fine_tune": {"strategy": "fine_tune"},
           "progressive": {"strategy": "progressive"},
           "fine_tune_low_lr": {"strategy": "fine_tune", "backbone_lr_mult": 0.1}}


def scratch_repo(work: Path, params: dict[str, Any]) -> Path:
    """A git + DVC repository with this checkout's files (tracked and untracked, not ignored) and ``params``."""
    repo = work / "repo"
    if (repo / ".git").is_dir():
        current = yaml.safe_load((repo / "params.yaml").read_text())
        if current != params:
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            _git(repo, "commit", "-qam", "bench params")
        return repo
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith((".venv", "bench/results")):
            dst = repo / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if (repo / "dvc.lock").exists():
        (repo / "dvc.lock").unlink()  # the checkout's lock describes its own outputs, not this study's
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "study bench baseline")
    return repo


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=detflow-bench", "-c", "user.email=bench@detflow.invalid", *args], cwd=repo,
                   check=True)


def base_params(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import Params

    p = Params().model_dump(mode="json")
    p["data"]["source"] = "bccd"
    p["train"].update(imgsz=args.imgsz, batch=args.batch, nominal_batch=args.batch, workers=0,
                      cpu_threads=args.threads)
    p["train"]["augment"]["fliplr"] = 0.5  # blood smears have no laterality (as bench/transfer.py)
    p["evaluate"].update(bootstrap=args.bootstrap, preview_images=4)
    p["external"] = [] if args.no_external else [
        {"name": "bcdd", "source": str(Path(args.mirror) / "datasets" / "bcdd-dev"), "format": "coco",
         "class_map": {"rbc": "RBC", "wbc": "WBC"}}]
    recipes = {k: v for k, v in RECIPES.items() if k in args.recipes.split(",")}
    p["study"] = {"recipes": recipes, "fractions": [float(f) for f in args.fractions.split(",")],
                  "init": args.init.split(","), "seeds": [int(s) for s in args.seeds.split(",")], "imgsz": args.imgsz,
                  "epochs": args.epochs if args.steps is None else None, "steps": args.steps, "wide_ci": 0.1}
    return p


def detflow(repo: Path, *argv: str, log: Path) -> dict[str, float]:
    """Run ``detflow ARGV`` in ``repo`` (output appended to ``log``); wall and CPU seconds (the process and every
    child it waited for; DVC's detached queue workers are not children, see ``queue_cpu``)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ detflow {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.run([str(Path(sys.executable).parent / "detflow"), *argv], cwd=repo, stdout=out,
                              stderr=subprocess.STDOUT, env={**os.environ, "DETFLOW_NO_PROGRESS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"detflow {' '.join(argv)} failed (exit {proc.returncode}); see {log}")
    return {"wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Seconds per optimizer step and per validation pass at this imgsz/batch: train 1 epoch on 100 % and on 25 % of
    BCCD's train split (13 and 4 steps at batch 16, one validation pass each) and solve for both."""
    from pipeline.config import load_params
    from pipeline.data.prepare import prepare_dataset
    from pipeline.train.stage import train_model

    overrides = [f"train.imgsz={args.imgsz}", f"train.batch={args.batch}", f"train.nominal_batch={args.batch}",
                 "train.workers=0", "train.epochs=1", "train.pretrained=coco", "data.source=bccd",
                 "train.resume=never", f"train.cpu_threads={args.threads}"]
    prepared = work / "measure" / "prepared"
    if not (prepared / "prepare_info.json").is_file():
        prepare_dataset(load_params(None, overrides), prepared, work / "measure" / "dv.json", progress=False)
    rows = {}
    for fraction in (1.0, 0.25):
        params = load_params(None, [*overrides, f"train.fraction={fraction}"])
        cpu0, t0 = time.process_time(), time.perf_counter()
        train_model(params, prepared, work / "measure" / f"m{fraction}", work / "measure" / f"r{fraction}",
                    work / "measure" / "wd", mirrors=[Path(args.mirror)], progress=False)
        metrics = json.loads((work / "measure" / f"r{fraction}" / "metrics.json").read_text())
        rows[fraction] = {"steps": metrics["optimizer_steps"], "train_seconds": metrics["train_seconds"],
                          "stage_wall_s": round(time.perf_counter() - t0, 1),
                          "stage_cpu_s": round(time.process_time() - cpu0, 1)}
    a, b = rows[1.0], rows[0.25]
    per_step = (a["train_seconds"] - b["train_seconds"]) / (a["steps"] - b["steps"])
    per_step_cpu = (a["stage_cpu_s"] - b["stage_cpu_s"]) / (a["steps"] - b["steps"])
    return {"imgsz": args.imgsz, "batch": args.batch, "rows": rows, "wall_s_per_step": round(per_step, 2),
            "cpu_s_per_step": round(per_step_cpu, 2),
            "wall_s_per_val_pass_and_epoch_overhead": round(b["train_seconds"] - b["steps"] * per_step, 1),
            "load_average": os.getloadavg()}


def _ci(v: Any) -> str:
    return f"[{v[0]:.3f}, {v[1]:.3f}]" if v and v[0] == v[0] else "n/a"


def _d(c: dict[str, Any]) -> str:
    return f"{c['difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"


def claims(results: dict[str, Any], other: dict[str, Any] | None) -> list[str]:
    """What the usual transfer-learning claims turned into, read off the paired comparisons (no judgement added:
    a difference whose interval includes 0 is reported as not shown)."""
    def verdict(c: dict[str, Any], better: str, worse: str) -> str:
        return "not shown (interval includes 0)" if c["includes_zero"] else better if c["difference"] > 0 else worse

    out = []
    cvs = sorted((c for c in results["comparisons"]["coco_vs_scratch"]), key=lambda c: (c["recipe"], c["fraction"]))
    for recipe in dict.fromkeys(c["recipe"] for c in cvs):
        rows = [c for c in cvs if c["recipe"] == recipe]
        out.append(f"COCO - scratch, {recipe}: " + "; ".join(f"{c['fraction'] * 100:g} %: {_d(c)}" for c in rows))
        if len(rows) > 1:
            grows = all(a["difference"] >= b["difference"] for a, b in zip(rows, rows[1:], strict=False))
            out.append(f"  advantage grows as data shrink ({recipe}): {'yes' if grows else 'no'} (point estimates)")
    ref = results["comparisons"]["vs_reference"]
    smallest = min((c["fraction"] for c in ref), default=None)
    for c in sorted(ref, key=lambda c: (c["recipe"], c["init"], c["fraction"])):
        tag = " (smallest fraction)" if c["fraction"] == smallest else ""
        out.append(f"{c['recipe']} vs {c['reference']}, {c['init']}, {c['fraction'] * 100:g} %{tag}: {_d(c)}: "
                   f"{verdict(c, 'better', 'worse')}")
    if other:
        for c in other["comparisons"]["coco_vs_scratch"]:
            out.append(f"other budget rule ({other['budget']['text']}): COCO - scratch, {c['recipe']}, "
                       f"{c['fraction'] * 100:g} %: {_d(c)}")
    return out


def table(results: dict[str, Any]) -> list[str]:
    """The arms as a markdown table (best first), with the paired difference to the best."""
    vs_best = {c["arm"]: c for c in results["comparisons"]["vs_best"]}
    ext = results.get("external_sets") or []
    head = ("| recipe | init | fraction (images) | epochs | steps | train s | trainable | test mAP50 | mAP50-95 | "
            "CPM | " + "".join(f"{x} mAP50 | " for x in ext) + "Δ vs best (paired) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for a in sorted((a for a in results["arms"] if a.get("map50") is not None), key=lambda a: -a["map50"]):
        c = vs_best.get(a["name"])
        lines.append(f"| {a['recipe']} | {a['init']} | {a['fraction'] * 100:g} % ({a['train_images']}) | "
                     f"{a['epochs']} | {a['optimizer_steps']} | {a['train_seconds']:.0f} | {a['trainable_params']:,} | "
                     f"{a['map50']:.3f} {_ci(a['ci95']['map50'])} | {a['map50_95']:.3f} {_ci(a['ci95']['map50_95'])} | "
                     f"{a['cpm']:.3f} {_ci(a['ci95']['cpm'])} | "
                     + "".join(f"{a['external'][x]['map50']:.3f} {_ci(a['external'][x]['ci95'])} | " for x in ext)
                     + ("best |" if c is None else f"{_d(c)} |"))
    return lines


def summarise(path: Path) -> int:
    doc = json.loads(path.read_text())
    other = (doc.get("other_rule") or {}).get("study")
    for line in [*table(doc["study"]), "", *(table(other) if other else []), "",
                 doc["study"]["recommendation"]["text"], "", *claims(doc["study"], other)]:
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench/results/study-work"))
    ap.add_argument("--mirror", default=os.environ.get("DETFLOW_ASSETS", ""))
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="train.cpu_threads (0: every core)")
    ap.add_argument("--steps", type=int, default=None, help="budget rule steps: optimizer steps per arm")
    ap.add_argument("--epochs", type=int, default=20, help="budget rule epochs (when --steps is not given)")
    ap.add_argument("--other-epochs", type=int, default=None,
                    help="epochs of the other-rule pair (default: the 100 %% arms' epochs under --steps)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--fractions", default="0.25,0.5,1.0")
    ap.add_argument("--init", default="coco,scratch")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--no-external", action="store_true", help="leave BCDD (external site) out")
    ap.add_argument("--no-other-rule", action="store_true", help="skip the other-budget-rule pair")
    ap.add_argument("--measure", action="store_true", help="only measure seconds per step and per validation")
    ap.add_argument("--smoke", action="store_true", help="tiny: fine_tune x 2 fractions x 2 inits, 2 steps, 64 px")
    ap.add_argument("--out", type=Path, default=Path("bench/results/study.json"))
    ap.add_argument("--summarise", type=Path, default=None, help="print the tables and claims of a results file")
    args = ap.parse_args(argv)
    if args.summarise is not None:
        return summarise(args.summarise)
    if not args.mirror or not (Path(args.mirror) / "datasets" / "bccd").is_dir():
        raise SystemExit("set DETFLOW_ASSETS (or --mirror) to an asset mirror with datasets/bccd and weights/")
    os.environ["DETFLOW_ASSETS"] = str(Path(args.mirror).resolve())
    if args.smoke:
        args.recipes, args.fractions, args.steps, args.imgsz, args.bootstrap = "fine_tune", "0.25,1.0", 2, 64, 100
        args.work = args.work.with_name(args.work.name + "-smoke")
        args.out = args.out.with_name("study_smoke.json")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    if args.measure:
        result = {"measure": measure(args, work), "machine": machine}
        print(json.dumps(result, indent=2))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name("study_measure.json").write_text(json.dumps(result, indent=2))
        return 0

    repo = scratch_repo(work, base_params(args))
    log = work / "study.log"
    t0 = time.perf_counter()
    run = detflow(repo, "study", "run", "--jobs", str(args.jobs), "--quiet", log=log)
    report = detflow(repo, "study", "report", "--quiet", log=log)
    main_results = json.loads((repo / "reports" / "study" / "results.json").read_text())
    out: dict[str, Any] = {"study": main_results, "run": run, "report": report, "machine": machine,
                           "load_average_end": os.getloadavg()}
    if not args.no_other_rule:
        smallest = min(float(f) for f in args.fractions.split(","))
        if args.steps is not None:  # other rule: equal epochs (those the whole training split got)
            full = [a for a in main_results["arms"] if a["fraction"] == 1.0]
            epochs = args.other_epochs or (full[0]["epochs"] if full else args.epochs)
            rule = [f"study.epochs={epochs}", "study.steps=null"]
        else:  # other rule: equal steps (those the whole training split got in --epochs)
            full = [a for a in main_results["arms"] if a["fraction"] == 1.0]
            rule = ["study.epochs=null", f"study.steps={full[0]['planned_steps'] if full else 100}"]
        sets = [*rule, "study.recipes={fine_tune: {strategy: fine_tune}}", f"study.fractions=[{smallest}]",
                "study.init=[coco,scratch]"]
        flags = [x for s in sets for x in ("--set", s)]
        other_run = detflow(repo, "study", "run", "--quiet", *flags, log=log)
        other_report = detflow(repo, "study", "report", "--quiet", "--out", "reports/study-other-rule", *flags,
                               log=log)
        out["other_rule"] = {"study": json.loads((repo / "reports" / "study-other-rule" / "results.json")
                                                 .read_text()), "run": other_run, "report": other_report}
    out["wall_s_total"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    for name in ("report.html", "learning_curves.svg"):
        shutil.copy(repo / "reports" / "study" / name, args.out.with_name(f"{args.out.stem}_{name}"))
    out["claims"] = claims(main_results, (out.get("other_rule") or {}).get("study"))
    args.out.write_text(json.dumps(out, indent=2))
    summarise(args.out)
    print(f"wall {out['wall_s_total']} s; results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
