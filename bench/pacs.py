"""Images/s through a PACS (QIDO-RS + WADO-RS + infer + SR + STOW-RS against a real Orthanc on loopback) vs
`detflow infer` on the same DICOM files from disk, in one run, same model, same worker plan. Goal: ratio >= 0.7.

Arms, whole passes in turn (median of ``--repeats``):
  disk  ``run_batch`` over the files (what ``detflow infer SOURCE --out DIR`` runs, without the shift test, whose
        embeddings the PACS path does not compute): decode, letterbox, run, NMS, predictions.json
  pacs  ``PacsRunner`` over every series (what ``detflow pacs run`` runs): QIDO-RS studies, series and instances,
        the existing-report check, WADO-RS per instance in the engine's workers, decode, detect, one SR per series,
        STOW-RS, ledger; a fresh ledger each pass, the previous pass's reports deleted from Orthanc (not timed)

The data: the phantom (``--patients`` x ``--slices``, 256 px CT; or ``--dicom`` a folder of series). Orthanc
(``apt-get install orthanc orthanc-dicomweb``) runs from a temporary folder on free ports. Writes
bench/results/pacs.json.

    python bench/pacs.py --model models/model.onnx --patients 24 --slices 8 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    ap.add_argument("--dicom", type=Path, default=None, help="a folder of DICOM series (default: a new phantom)")
    ap.add_argument("--patients", type=int, default=24)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="0: plan_workers() (what both commands use)")
    ap.add_argument("--conf", type=float, default=None, help="score threshold (default: the card's)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pacs.json")
    args = ap.parse_args(argv)

    from pipeline.fileio import atomic_write_json
    from pipeline.infer.batch import collect_sources, run_batch
    from pipeline.infer.engine import OnnxDetector, plan_workers
    from pipeline.pacs.client import Credentials, Pacs
    from pipeline.pacs.ledger import Ledger
    from pipeline.pacs.orthanc import LocalOrthanc, missing_tools
    from pipeline.pacs.run import PacsRunner

    if missing := missing_tools():
        print(f"error: not installed: {', '.join(missing)} (apt-get install orthanc orthanc-dicomweb)",
              file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="detflow-bench-pacs-"))
    try:
        source = args.dicom
        if source is None:
            from pipeline.config import PhantomParams
            from pipeline.data.phantom import generate_phantom

            source = tmp / "phantom"
            generate_phantom(PhantomParams(patients=args.patients, slices=args.slices, seed=0), source,
                             progress=False)
            source = source / "dicom"
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm")
        workers, threads = plan_workers(args.workers)
        detector = OnnxDetector(args.model, threads=threads)
        if args.conf is not None:
            detector.conf = args.conf
        with LocalOrthanc(tmp / "orthanc") as orthanc:
            orthanc.upload(files)
            n_series = len(orthanc.get("/series"))
            pacs = Pacs(orthanc.dicomweb, Credentials())

            def disk() -> int:
                s = run_batch(detector, collect_sources(source), tmp / "disk", progress=False, workers=workers,
                              shift=False)
                return s.n_images

            def through_pacs() -> int:
                for sr in orthanc.instances("SR"):  # the previous pass's reports (not timed: see below)
                    orthanc._request("DELETE", f"/instances/{sr['ID']}")
                shutil.rmtree(tmp / "work", ignore_errors=True)
                start = time.perf_counter()
                with Ledger(tmp / "work") as ledger:
                    # force: every series is measured, whatever modalities the card lists (a BCCD model lists none)
                    runner = PacsRunner(pacs, detector, ledger, workers=workers, force=True)
                    refs, n_studies = runner.find_series()
                    summary = runner.run(refs, n_studies)
                times["pacs_inner"].append(time.perf_counter() - start)
                assert not summary.of("failed"), [o.line() for o in summary.of("failed")]
                detections.append(sum(o.n_detections for o in summary.of("processed")))
                return summary.n_images

            arms = {"disk": disk, "pacs": through_pacs}
            times: dict[str, list[float]] = {"disk": [], "pacs": [], "pacs_inner": []}
            detections: list[int] = []
            counts = {name: fn() for name, fn in arms.items()}  # warm-up (and the image counts)
            times["pacs_inner"].clear()
            for _ in range(args.repeats):
                for name, fn in arms.items():
                    if name == "pacs":
                        fn()  # timed inside (the deletion of the previous reports is not part of a run)
                    else:
                        t = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t)
        med = {"disk": statistics.median(times["disk"]), "pacs": statistics.median(times["pacs_inner"])}
        ips = {k: counts[k] / v for k, v in med.items()}
        result = {
            "images": len(files), "series": n_series, "detections": detections[-1], "conf": detector.conf,
            "images_per_s": {k: round(v, 2) for k, v in ips.items()},
            "ratio_pacs_over_disk": round(ips["pacs"] / ips["disk"], 3), "goal": 0.7,
            "seconds": {k: [round(x, 3) for x in v] for k, v in times.items() if v},
            "workers": workers, "threads": threads, "providers": detector.providers,
            "model": str(args.model), "imgsz": detector.imgsz, "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores", "repeats": args.repeats,
        }
        atomic_write_json(args.out, result)
        print(f"{len(files)} images in {n_series} series; disk (detflow infer): {ips['disk']:.1f} images/s; "
              f"PACS (QIDO+WADO+infer+SR+STOW): {ips['pacs']:.1f} images/s; ratio {result['ratio_pacs_over_disk']}"
              f" (goal >= 0.7) -> {args.out}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
