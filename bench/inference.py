"""Inference throughput, one run, same model, images and thread count.

Arms (images/s, batch 1 and 8):
  engine      our OnnxDetector end to end: read file + decode + letterbox + session.run + NMS, one call at a time
  engine_emb  the same, also fetching the embedding output (predict_with_embeddings: what the service and
              `detflow infer` run for shift detection)
  engine_noemb the same as engine on a copy of the graph without the embedding output (the graph before it
              existed); engine_emb / engine_noemb is the embedding's cost (budget: >= 0.97)
  stream      the same, through OnnxDetector.predict_stream (what `detflow infer` runs): plan_workers() calls at
              once, one onnxruntime thread each; still `batch` images per call
  bare        session.run on a ready tensor (the floor: no decode, no pre/post-processing)
  ul_onnx     Ultralytics YOLO("model.onnx").predict on the same files
  ul_torch    Ultralytics YOLO("best.pt").predict (PyTorch eager) on the same files
Prints the ratios the README quotes and writes bench/results/inference.json.

    python bench/inference.py --model models/model.onnx --weights models/train/best.pt \
        --images data/prepared/images/test

Every model row, in one run (``--rows``): each family's default model and every row of the torchvision table is
trained on the prepared dataset (``--epochs``, from COCO weights where the asset resolves, else from scratch),
evaluated with the gate at 0 and exported (parity measured and recorded), then its engine is timed against bare
``session.run`` on the same tensors: ``engine_time_over_bare`` per row (goal <= 1.10), at batch 1 (and 8 for
graphs that take a batch). Writes bench/results/inference_rows.json.

    python bench/inference.py --rows all --prepared data/prepared --epochs 3
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from timing import interleaved, write_result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    ap.add_argument("--weights", type=Path, default=Path("models/train/best.pt"))
    ap.add_argument("--images", type=Path, default=Path("data/prepared/images/test"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--limit", type=int, default=0, help="use at most this many images (0: all)")
    ap.add_argument("--skip-torch", action="store_true", help="leave out the PyTorch eager arm")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/inference.json, with --rows "
                    "bench/results/inference_rows.json")
    ap.add_argument("--rows", nargs="+", default=None, metavar="FAMILY/MODEL",
                    help="train, export and time these model rows ('all': every row); see the module docstring")
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="--rows: the prepared dataset")
    ap.add_argument("--epochs", type=int, default=3, help="--rows: training epochs per row")
    ap.add_argument("--imgsz", type=int, default=None, help="--rows: train.imgsz (default: params.yaml's)")
    ap.add_argument("--work", type=Path, default=Path("bench/results/rows"), help="--rows: models and reports")
    args = ap.parse_args(argv)
    if args.rows:
        return measure_rows(args)
    args.out = args.out or Path("bench/results/inference.json")

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from pipeline.infer.engine import OnnxDetector, plan_workers
    from pipeline.infer.processing import preprocess

    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if args.limit:
        files = files[: args.limit]
    if not files:
        print(f"no images in {args.images}", file=sys.stderr)
        return 2
    engine = OnnxDetector(args.model, providers="CPUExecutionProvider", threads=args.threads)
    plain = _without_embedding(engine, args.out.parent) if engine.has_embeddings else None
    workers, stream_threads = plan_workers(0, args.threads)
    streamer = OnnxDetector(args.model, providers="CPUExecutionProvider", threads=stream_threads)
    size, conf, iou = engine.imgsz, engine.conf, engine.nms_iou
    n = len(files)
    results: dict[str, dict[str, float]] = {}

    def chunks(items: list, b: int) -> list[list]:
        return [items[i:i + b] for i in range(0, len(items), b)]

    from ultralytics import YOLO

    ul_models = {"ul_onnx": YOLO(str(args.model), task="detect")}
    if not args.skip_torch:
        import torch

        torch.set_num_threads(args.threads)
        ul_models["ul_torch"] = YOLO(str(args.weights))
    for b in (1, 8):
        groups = chunks(files, b)
        tensors = [preprocess([engine.decode(p).rgb for p in g], size, stride=engine.stride)[0] for g in groups]
        arms: dict[str, Callable[[], object]] = {
            "engine": lambda groups=groups: [engine.predict([engine.decode(p).rgb for p in g]) for g in groups],
            "stream": lambda b=b: list(streamer.predict_stream(files, batch=b, workers=workers)),
            "bare": lambda tensors=tensors: [engine.run(t) for t in tensors],
        }
        if plain is not None:
            arms["engine_emb"] = lambda groups=groups: [engine.predict_with_embeddings(
                [engine.decode(p).rgb for p in g]) for g in groups]
            arms["engine_noemb"] = lambda groups=groups: [plain.predict([plain.decode(p).rgb for p in g])
                                                          for g in groups]
        for name, model in ul_models.items():
            arms[name] = lambda model=model, groups=groups, b=b: [
                model.predict([str(p) for p in g], imgsz=size, conf=conf, iou=iou, batch=b, device="cpu",
                              verbose=False) for g in groups]
        for name, seconds in interleaved(arms, args.repeats).items():
            results.setdefault(name, {})[f"b{b}"] = n / seconds

    ratios = {}
    for b in ("b1", "b8"):
        ratios[f"engine_time_over_bare_{b}"] = results["bare"][b] / results["engine"][b]
        ratios[f"engine_over_ul_onnx_throughput_{b}"] = results["engine"][b] / results["ul_onnx"][b]
        ratios[f"stream_time_over_bare_{b}"] = results["bare"][b] / results["stream"][b]
        ratios[f"stream_over_ul_onnx_throughput_{b}"] = results["stream"][b] / results["ul_onnx"][b]
        if "engine_emb" in results:
            ratios[f"engine_emb_over_noemb_throughput_{b}"] = results["engine_emb"][b] / results["engine_noemb"][b]
        if "ul_torch" in results:
            ratios[f"engine_over_ul_torch_throughput_{b}"] = results["engine"][b] / results["ul_torch"][b]
    print(f"{n} images at {size} px, {args.threads} threads (stream: {workers} workers x {stream_threads}), "
          f"median of {args.repeats} runs (images/s):")
    print(f"{'arm':<12} {'batch 1':>9} {'batch 8':>9}")
    for name, row in results.items():
        print(f"{name:<12} {row['b1']:>9.1f} {row['b8']:>9.1f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    write_result(args.out, {"images": n, "imgsz": size, "threads": args.threads, "repeats": args.repeats,
                            "stream": {"workers": workers, "threads": stream_threads},
                            "providers": engine.providers, "images_per_s": results,
                            "ratios": {k: round(v, 3) for k, v in ratios.items()},
                            "model": str(args.model), "machine": platform.processor() or platform.machine(),
                            "python": sys.version.split()[0], "numpy": np.__version__})
    return 0


def all_rows() -> list[tuple[str, str]]:
    """Each family's default model, then every other model of a table-driven family (the torchvision rows)."""
    from pipeline.families import FAMILIES
    from pipeline.families.torchvision.models import MODELS

    rows = [(name, family.default_model) for name, family in sorted(FAMILIES.items())]
    return rows + [("torchvision", m) for m in MODELS if ("torchvision", m) not in rows]


def train_and_export(family: str, model: str, args: argparse.Namespace) -> tuple[Path, dict]:
    """Train ``model`` on the prepared dataset, evaluate (gate at 0) and export it under ``args.work``; returns the
    ONNX path and the parity report."""
    from pipeline.config import load_params
    from pipeline.evaluate.stage import evaluate_model
    from pipeline.export import export_model
    from pipeline.train.stage import train_model

    overrides = [f"train.family={family}", f"train.model={model}", f"train.epochs={args.epochs}",
                 "gate.min_map50=0", "gate.min_cpm=0", "gate.min_sensitivity_at_1fp=0", "gate.max_regression=null",
                 "evaluate.bootstrap=0", "evaluate.preview_images=0", f"export.{family}.max_map_delta=1.0"]
    overrides += [f"train.imgsz={args.imgsz}"] if args.imgsz else []
    params = load_params(None, overrides)
    work = args.work / model
    result = train_model(params, args.prepared, work / "models" / "train", work / "reports" / "train",
                         work / "runs", progress=False)
    evaluate_model(params, result.best, args.prepared, work / "reports", progress=False)
    exported = export_model(params, result.best, args.prepared, work / "reports", work / "models")
    return exported.model, exported.parity


def measure_rows(args: argparse.Namespace) -> int:
    """``--rows``: per model row, engine end to end against bare ``session.run`` on the same ready tensors."""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from pipeline.infer.engine import OnnxDetector
    from pipeline.infer.processing import preprocess

    rows = all_rows() if args.rows == ["all"] else [tuple(r.split("/", 1)) for r in args.rows]
    images = args.prepared / "images" / "test"
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    files = files[: args.limit] if args.limit else files
    if not files:
        print(f"no images in {images}", file=sys.stderr)
        return 2
    table = []
    for family, model in rows:
        onnx_path, parity = train_and_export(family, model, args)
        engine = OnnxDetector(onnx_path, providers="CPUExecutionProvider", threads=args.threads)
        row = {"family": family, "model": model, "imgsz": engine.imgsz, "providers": engine.providers,
               "parity_delta": parity["delta"], "parity_matched_fraction": parity["matched_fraction"]}
        for b in (1, 8) if engine.model_family.dynamic_batch else (1,):
            groups = [files[i:i + b] for i in range(0, len(files), b)]
            tensors = [preprocess([engine.decode(p).rgb for p in g], engine.imgsz, engine.input_dtype,
                                  stride=engine.stride, scaling=engine.scaling)[0] for g in groups]
            arms = {"engine": lambda groups=groups, det=engine: [det.predict([det.decode(p).rgb for p in g])
                                                                 for g in groups],
                    "bare": lambda tensors=tensors, det=engine: [det.run(t) for t in tensors]}
            seconds = interleaved(arms, args.repeats)
            row[f"b{b}"] = {"engine_images_per_s": round(len(files) / seconds["engine"], 2),
                            "bare_images_per_s": round(len(files) / seconds["bare"], 2),
                            "engine_time_over_bare": round(seconds["engine"] / seconds["bare"], 3)}
        table.append(row)
        print(f"{family}/{model}: " + ", ".join(f"{k} engine/bare {v['engine_time_over_bare']:.3f} "
                                                  f"({v['engine_images_per_s']} vs {v['bare_images_per_s']} img/s)"
                                                  for k, v in row.items() if k in ("b1", "b8")), flush=True)
    print(f"\n{len(files)} images, {args.threads} threads, median of {args.repeats} (goal: engine time / bare <= 1.10)")
    print(f"{'row':<50} {'imgsz':>5} {'b1 engine/bare':>15} {'b8 engine/bare':>15}")
    for r in table:
        b8 = f"{r['b8']['engine_time_over_bare']:.3f}" if "b8" in r else "-"
        name = f"{r['family']}/{r['model']}"
        print(f"{name:<50} {r['imgsz']:>5} {r['b1']['engine_time_over_bare']:>15.3f} {b8:>15}")
    write_result(args.out or Path("bench/results/inference_rows.json"), {
        "images": len(files), "threads": args.threads, "repeats": args.repeats, "epochs": args.epochs, "rows": table,
        "goal_engine_time_over_bare": 1.10, "machine": platform.processor() or platform.machine(),
        "python": sys.version.split()[0], "numpy": np.__version__})
    return 0


def _without_embedding(engine: object, scratch: Path) -> object:
    """The same model without its embedding output (what export wrote before shift detection), for the cost arm."""
    import onnx

    from pipeline.contracts.embedding import EMBEDDING_OUTPUT
    from pipeline.infer.engine import OnnxDetector

    model = onnx.load(str(engine.model_path))  # type: ignore[attr-defined]
    keep = [o for o in model.graph.output if o.name != EMBEDDING_OUTPUT]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    model = onnx.utils.Extractor(model).extract_model([i.name for i in model.graph.input], [o.name for o in keep])
    folder = scratch / "noemb"
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "model_card.json").write_bytes(engine.card_path.read_bytes())  # type: ignore[attr-defined]
    return OnnxDetector(folder / "model.onnx", providers="CPUExecutionProvider", verify_checksum=False,
                        threads=engine.session.get_session_options().intra_op_num_threads)  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
