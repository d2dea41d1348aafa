"""Why an input scale whose letterbox leaves a grey border loses RBC AP50 on another lab's smears (issue 21).

Each experiment changes one thing of the letterbox and keeps the rest, on the same model and the same images:

- ``sweep``: the issue's scale sweep, with the letterbox as it was (target ``imgsz x s``, canvas padded up to the
  stride) and with the engine's (target rounded to the stride: the fix), what `detflow evaluate` scores.
- ``border``: one object scale (letterbox target t), canvas t (no border) vs t + 32 / t + 64 (grey border), so
  object sizes are identical and only the border differs.
- ``pad``: one bordered letterbox, only the pad changes: grey 114 (Ultralytics' and the engine's), black 0,
  white 255, the image's mean colour, the image's edge pixels replicated, mirrored.
- ``placement``: the bordered letterbox centred (border on all four sides) vs at the top-left corner (border on
  the right and bottom only): the same image, scale and border, each box split by the edge that cuts it.
- ``source``: the training site's own test images letterboxed with an extra grey border (and without the 4 px
  strips its native letterbox leaves), to see whether the source site loses too.

Every row: mAP50, per-class AP50, confident detections (score >= the card's conf), and RBC recall at that score
split into ground-truth boxes cut by the image edge and boxes inside it; ``ap50_edge`` / ``ap50_inner``: RBC AP50
with the other group marked ``iscrowd`` (ignored), so each group is scored on its own.

    python bench/letterbox_border.py --model WORK/models/model.onnx --site /work/shared/datasets/bcdd-dev \
        --class-map rbc=RBC,wbc=WBC --source WORK/data/prepared

Writes bench/results/letterbox_border.json; prints one table per experiment.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

Letterbox = Callable[[np.ndarray], tuple[np.ndarray, Any]]


def letterbox_variant(rgb: np.ndarray, target: int, canvas: tuple[int, int], place: str = "centre",
                      pad: str | int = 114, fill: tuple[int, int] | None = None) -> tuple[np.ndarray, Any]:
    """The engine's letterbox with one thing changed: ``place`` (centre | topleft), ``pad`` (a grey value, or
    mean | replicate | reflect), ``fill`` (resize to exactly (H, W), per-axis scale: no border at all)."""
    from pipeline.infer.processing import LetterboxMeta

    h, w = rgb.shape[:2]
    if fill is not None:  # per-axis resize to the canvas: meta carries the mean scale, boxes map back per axis below
        out = cv2.resize(rgb, (fill[1], fill[0]), interpolation=cv2.INTER_LINEAR)
        return out, ("fill", fill[1] / w, fill[0] / h, w, h)
    scale = min(target / h, target / w)
    new_w, new_h = int(round(w * scale)), int(round(h * scale))
    im = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR) if (new_w, new_h) != (w, h) else rgb
    out_h, out_w = canvas
    if place == "centre":
        dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
        top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
        left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    else:
        top, left, bottom, right = 0, 0, out_h - new_h, out_w - new_w
    if pad == "replicate":
        out = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_REPLICATE)
    elif pad == "reflect":
        out = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_REFLECT_101)
    else:
        value = tuple(int(v) for v in rgb.reshape(-1, 3).mean(0)) if pad == "mean" else (int(pad),) * 3
        out = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)
    return out, LetterboxMeta(scale=scale, pad_x=float(left), pad_y=float(top), orig_w=w, orig_h=h)


def predict_variant(detector: Any, rgbs: list[np.ndarray], box: Letterbox, conf: float = 0.001,
                    iou: float = 0.7) -> list[Any]:
    """Detections with a custom letterbox, through the engine's graph and the family's own decoder."""
    from pipeline.infer.processing import Detections, LetterboxMeta, to_tensor

    out = []
    for rgb in rgbs:
        im, meta = box(rgb)
        raw = detector.run(to_tensor([im]))
        n_det = len(detector.output_names)
        if isinstance(meta, tuple):  # a per-axis fill: decode in canvas pixels, map back per axis
            _, sx, sy, w, h = meta
            ident = LetterboxMeta(scale=1.0, pad_x=0.0, pad_y=0.0, orig_w=im.shape[1], orig_h=im.shape[0])
            d = detector.model_family.postprocess(raw[:n_det], [ident], conf=conf, iou=iou, max_det=detector.max_det)[0]
            b = d.boxes.copy()
            b[:, [0, 2]] = (b[:, [0, 2]] / sx).clip(0, w)
            b[:, [1, 3]] = (b[:, [1, 3]] / sy).clip(0, h)
            d = Detections(b, d.scores, d.labels)
        else:
            d = detector.model_family.postprocess(raw[:n_det], [meta], conf=conf, iou=iou, max_det=detector.max_det)[0]
        out.append(d)
    return out


def load_set(params: Any, source: str, fmt: str, class_map: dict[str, str], classes: list[str]
             ) -> tuple[dict, list[np.ndarray], tempfile.TemporaryDirectory]:
    """A labelled set read exactly as `detflow evaluate --data` reads it (prepare into scratch, class map)."""
    from pipeline.evaluate.external import map_classes, read_external
    from pipeline.evaluate.stage import _read_rgb

    scratch = tempfile.TemporaryDirectory(prefix="letterbox-border-")
    work = Path(scratch.name) / "prepared"
    gt, _ = read_external(params, source, fmt, work, Path(scratch.name) / "report.json", progress=False)
    gt = map_classes(gt, classes, class_map, "set").gt
    return gt, [_read_rgb(work / e["file_name"]) for e in gt["images"]], scratch


def score(gt: dict, dets: list[Any], classes: list[str], conf: float, present: list[str]) -> dict[str, Any]:
    from pipeline.evaluate.metrics import coco_metrics
    from pipeline.matching import greedy_match, off_edge

    scored = [k for k, c in enumerate(classes) if c in present]
    results, edge_hit, inner_hit = [], [0, 0], [0, 0]
    by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    size = {e["id"]: (e["width"], e["height"]) for e in gt["images"]}
    edge_flag: dict[int, bool] = {}
    n_conf = 0
    rbc = classes.index("RBC") if "RBC" in classes else 0
    for e, d in zip(gt["images"], dets, strict=True):
        keep = np.isin(d.labels, scored)
        boxes, scores_, labels = d.boxes[keep], d.scores[keep], d.labels[keep]
        n_conf += int((scores_ >= conf).sum())
        for (x1, y1, x2, y2), s, c in zip(boxes, scores_, labels, strict=True):
            results.append({"image_id": e["id"], "category_id": int(c) + 1, "score": float(s),
                            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
        anns = [a for a in by_image.get(e["id"], []) if a["category_id"] - 1 == rbc]
        if not anns:
            continue
        gb = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                       for a in anns])
        inner = off_edge(gb, *size[e["id"]])
        for a, flag in zip(anns, inner, strict=True):
            edge_flag[a["id"]] = not bool(flag)
        sel = (scores_ >= conf) & (labels == rbc)
        m = greedy_match(boxes[sel], scores_[sel], gb, iou_thr=0.5)
        found = np.zeros(len(gb), bool)
        found[m.target[m.matched]] = True
        for flag, f in zip(inner, found, strict=True):
            bucket = inner_hit if flag else edge_hit
            bucket[0] += int(f)
            bucket[1] += 1
    all_m = coco_metrics(gt, results, classes)
    per_class = {c: round(v["ap50"], 4) for c, v in all_m["per_class"].items() if c in present}
    out = {"map50": round(float(np.mean(list(per_class.values()))), 4), "ap50": per_class,
           "confident_detections": n_conf,
           "rbc_recall_edge": round(edge_hit[0] / max(edge_hit[1], 1), 4),
           "rbc_recall_inner": round(inner_hit[0] / max(inner_hit[1], 1), 4),
           "rbc_gt_edge": edge_hit[1], "rbc_gt_inner": inner_hit[1]}
    for group, want_edge in (("ap50_edge", True), ("ap50_inner", False)):
        sub = {**gt, "annotations": [{**a, "iscrowd": int(a["category_id"] - 1 != rbc or
                                                           edge_flag.get(a["id"]) != want_edge)}
                                     for a in gt["annotations"]]}
        rbc_results = [r for r in results if r["category_id"] - 1 == rbc]
        out[group] = round(coco_metrics(sub, rbc_results, classes)["per_class"]["RBC"]["ap50"], 4)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import load_params
    from pipeline.infer.engine import OnnxDetector
    from pipeline.infer.processing import rect_shape

    detector = OnnxDetector(args.model, providers="CPUExecutionProvider")
    classes, imgsz, stride, conf = list(detector.classes), detector.imgsz, detector.stride or 32, detector.conf
    params = load_params(None, [])
    cmap = dict(p.split("=", 1) for p in args.class_map.split(",")) if args.class_map else {}
    gt, rgbs, scratch = load_set(params, str(args.site), "auto", cmap, classes)
    present = sorted({classes[a["category_id"] - 1] for a in gt["annotations"]}, key=classes.index)
    res: dict[str, Any] = {"model": str(args.model), "site": str(args.site), "n_images": len(rgbs),
                           "imgsz": imgsz, "stride": stride, "conf": conf}

    def row(name: str, box: Letterbox | None, on: tuple[dict, list[np.ndarray], list[str]] | None = None,
            scale: float = 1.0) -> dict[str, Any]:
        g, images, pres = on or (gt, rgbs, present)
        if box is None:  # the engine itself at input scale `scale`
            from dataclasses import replace
            saved = detector.scaling
            detector.scaling = replace(saved, scale=scale)
            dets = [d for i in range(0, len(images), 8) for d in detector.predict(images[i:i + 8], conf=0.001)]
            detector.scaling = saved
        else:
            dets = predict_variant(detector, images, box)
        r = {"name": name, **score(g, dets, classes, conf, pres)}
        print(f"  {name:<44} mAP50 {r['map50']:.3f}  " + " ".join(f"{c} {v:.3f}" for c, v in r["ap50"].items())
              + f"  det {r['confident_detections']:>5}  RBC recall edge {r['rbc_recall_edge']:.3f} inner "
              f"{r['rbc_recall_inner']:.3f}  AP50 edge {r['ap50_edge']:.3f} inner {r['ap50_inner']:.3f}", flush=True)
        return r

    h0, w0 = rgbs[0].shape[:2]
    parts = set(args.parts.split(","))
    if "sweep" in parts:
        print("== sweep: at each input scale, the letterbox before the fix (target imgsz x s, canvas padded up to "
              "the stride) and the engine's (target rounded to the stride)")
        res["sweep"] = []
        from dataclasses import replace

        from pipeline.infer.processing import target_size
        for s in args.scales:
            t = int(round(imgsz * s))
            c = rect_shape(h0, w0, t, stride)
            old = row(f"s={s} before: target {t} canvas {c}", lambda im, t=t, c=c: letterbox_variant(im, t, c))
            t_new = target_size(rgbs[0], imgsz, replace(detector.scaling, scale=s), fixed=False, stride=stride)
            new = row(f"s={s} engine: target {t_new} canvas {rect_shape(h0, w0, t_new, stride)}", None, scale=s)
            res["sweep"].append({"scale": s, "before": {**old, "target": t, "canvas": list(c)},
                                 "engine": {**new, "target": t_new,
                                            "canvas": list(rect_shape(h0, w0, t_new, stride))}})
    if "border" in parts:
        print("== border: one object scale, canvas = target (no border) vs target + 32 / + 64 (grey 114)")
        res["border"] = []
        for t in args.targets:
            for extra in (0, 32, 64):
                c = (t + extra, t + extra)
                res["border"].append({**row(f"target {t} canvas {c[0]} (border {extra // 2} px a side)",
                                            lambda im, t=t, c=c: letterbox_variant(im, t, c)), "target": t,
                                      "canvas": c[0]})
    t_b = int(round(imgsz * args.border_scale))
    c_b = rect_shape(h0, w0, t_b, stride)
    if "pad" in parts:
        print(f"== pad: target {t_b} in canvas {c_b} (the engine's canvas at s={args.border_scale}), pad varied")
        res["pad"] = {"target": t_b, "canvas": list(c_b), "rows": []}
        for pad in (114, 0, 255, "mean", "replicate", "reflect"):
            res["pad"]["rows"].append({**row(f"pad {pad}", lambda im, pad=pad: letterbox_variant(im, t_b, c_b,
                                                                                                 pad=pad)),
                                       "pad": pad})
        res["pad"]["rows"].append({**row(f"no border: resized to fill {c_b} (per axis)",
                                         lambda im: letterbox_variant(im, t_b, c_b, fill=c_b)), "pad": "fill"})
    if "placement" in parts:
        print(f"== placement: target {t_b} in canvas {c_b}, grey 114, centred vs top-left")
        res["placement"] = []
        for place in ("centre", "topleft"):
            dets = predict_variant(detector, rgbs, lambda im, place=place: letterbox_variant(im, t_b, c_b,
                                                                                              place=place))
            res["placement"].append({"place": place, **edge_recall_by_side(gt, dets, classes, conf)})
            print(f"  {place:<8} " + "  ".join(f"{k} {v['recall']:.3f} ({v['n']})"
                                               for k, v in res["placement"][-1].items() if isinstance(v, dict)))
    if "source" in parts and args.source:
        print("== source: the training site's own test split, letterboxed with and without a grey border")
        from pipeline.evaluate.stage import _read_rgb

        sgt = json.loads((args.source / "coco" / "test.json").read_text())
        simgs = [_read_rgb(args.source / e["file_name"]) for e in sgt["images"]]
        spres = sorted({classes[a["category_id"] - 1] for a in sgt["annotations"]}, key=classes.index)
        sh, sw = simgs[0].shape[:2]
        native = rect_shape(sh, sw, imgsz, stride)
        on = (sgt, simgs, spres)
        res["source"] = [
            {**row(f"native, the engine: {imgsz} in canvas {native}", None, on), "variant": "native"},
            {**row("native, the letterbox before the fix", lambda im: letterbox_variant(im, imgsz, native), on),
             "variant": "native_before"},
            {**row("replicated edge pixels instead of the 4 px grey strips",
                   lambda im: letterbox_variant(im, imgsz, native, pad="replicate"), on), "variant": "replicate"},
            {**row(f"grey border all round: canvas {native[0] + 32}x{native[1] + 32}",
                   lambda im: letterbox_variant(im, imgsz, (native[0] + 32, native[1] + 32)), on), "variant": "+32"},
            {**row(f"grey border all round: canvas {native[0] + 64}x{native[1] + 64}",
                   lambda im: letterbox_variant(im, imgsz, (native[0] + 64, native[1] + 64)), on), "variant": "+64"},
            {**row(f"no border: resized to fill {native} (per axis)",
                   lambda im: letterbox_variant(im, imgsz, native, fill=native), on), "variant": "fill"},
            {**row("native canvas, pad 0 instead of 114", lambda im: letterbox_variant(im, imgsz, native, pad=0), on),
             "variant": "pad0"},
        ]
        res["source_edge_by_side"] = {}
        for name, box in (("native", lambda im: letterbox_variant(im, imgsz, native)),
                          ("+32", lambda im: letterbox_variant(im, imgsz, (native[0] + 32, native[1] + 32)))):
            res["source_edge_by_side"][name] = edge_recall_by_side(sgt, predict_variant(detector, simgs, box),
                                                                   classes, conf)
            print(f"  recall by side, {name}: " + "  ".join(f"{k} {v['recall']:.3f} ({v['n']})" for k, v in
                                                           res["source_edge_by_side"][name].items()))
    scratch.cleanup()
    return res


def edge_recall_by_side(gt: dict, dets: list[Any], classes: list[str], conf: float) -> dict[str, dict[str, float]]:
    """RBC recall at ``conf`` (IoU 0.5) of ground-truth boxes cut by each image edge, and of inner boxes."""
    from pipeline.matching import EDGE_PX, greedy_match

    rbc = classes.index("RBC") if "RBC" in classes else 0
    by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        if a["category_id"] - 1 == rbc:
            by_image.setdefault(a["image_id"], []).append(a)
    tally = {k: [0, 0] for k in ("top", "left", "bottom", "right", "inner")}
    for e, d in zip(gt["images"], dets, strict=True):
        anns = by_image.get(e["id"], [])
        if not anns:
            continue
        gb = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                       for a in anns])
        sel = (d.scores >= conf) & (d.labels == rbc)
        m = greedy_match(d.boxes[sel], d.scores[sel], gb, iou_thr=0.5)
        found = np.zeros(len(gb), bool)
        found[m.target[m.matched]] = True
        w, h = e["width"], e["height"]
        for b, f in zip(gb, found, strict=True):
            sides = [s for s, cut in (("left", b[0] <= EDGE_PX), ("top", b[1] <= EDGE_PX),
                                      ("right", b[2] >= w - EDGE_PX), ("bottom", b[3] >= h - EDGE_PX)) if cut]
            for s in sides or ["inner"]:
                tally[s][0] += int(f)
                tally[s][1] += 1
    return {k: {"recall": round(v[0] / max(v[1], 1), 4), "n": v[1]} for k, v in tally.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="exported model.onnx (card beside it)")
    ap.add_argument("--site", type=Path, required=True, help="the other site's labelled set (any supported format)")
    ap.add_argument("--class-map", default="", help="site label -> model class, e.g. rbc=RBC,wbc=WBC")
    ap.add_argument("--source", type=Path, default=None, help="the training site's prepared dataset (test split)")
    ap.add_argument("--parts", default="sweep,border,pad,placement,source")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.615, 0.69, 0.728, 0.75, 0.769, 0.846, 1.0])
    ap.add_argument("--targets", type=int, nargs="+", default=[256, 320])
    ap.add_argument("--border-scale", type=float, default=0.728, help="the bordered scale of the pad/placement parts")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "letterbox_border.json")
    args = ap.parse_args(argv)
    res = run(args)
    from pipeline.fileio import atomic_write_json

    atomic_write_json(args.out, res)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
