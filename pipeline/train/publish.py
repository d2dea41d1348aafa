"""Publishing a finished run, the same for every family: best/last weights, resolved params, transfer.json,
results.csv, metrics, DVCLive curves and figures, summary.json (atomically, file by file)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.contracts.results import PretrainedSource, TrainResult


def transfer_summary(pretrained: PretrainedSource, report: dict[str, Any] | None,
                     frozen_by_epoch: dict[int, list[str]], group_params: dict[str, int],
                     strategy: str, backbone_lr_mult: float) -> dict[str, Any]:
    """The content of reports/train/transfer.json."""
    out: dict[str, Any] = {
        "pretrained": asdict(pretrained),
        "source": pretrained.source,
        "sha256": pretrained.sha256,
        "from_scratch": pretrained.kind == "none",
        "strategy": strategy,
        "backbone_lr_mult": backbone_lr_mult,
        "group_parameters": group_params,
        "frozen_by_epoch": {str(k): v for k, v in sorted(frozen_by_epoch.items())},
    }
    if pretrained.note:
        out["WARNING"] = pretrained.note
    if report:
        out.update({k: report[k] for k in ("tensors_transferred", "tensors_total", "params_transferred",
                                           "params_total", "new_modules") if k in report})
        out["skipped"] = report.get("skipped", [])[:50]
    else:
        out.update({"tensors_transferred": 0, "params_transferred": 0, "new_modules": ["(all: no pretrained weights)"]})
    return out


def plot_training_curves(results_csv: Path, out_png: Path) -> None:
    """Loss and validation mAP per epoch, one figure (both families write the same results.csv columns)."""
    import csv

    from pipeline.ultralytics_env import configure_environment

    configure_environment()  # Matplotlib's font cache goes to the project's work folder, not ~/.cache
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(open(results_csv))]
    if not rows:
        return
    epochs = [int(float(r.get("epoch", i + 1))) for i, r in enumerate(rows)]
    loss_cols = [c for c in rows[0] if c.startswith("train/") and "loss" in c]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for c in loss_cols:
        ax1.plot(epochs, [float(r[c]) for r in rows], label=c.removeprefix("train/"))
    ax1.set(title="training loss", xlabel="epoch")
    ax1.legend()
    for c, label in (("metrics/mAP50(B)", "mAP50"), ("metrics/mAP50-95(B)", "mAP50-95")):
        if c in rows[0]:
            ax2.plot(epochs, [float(r[c]) for r in rows], marker="o", label=label)
    ax2.set(title="validation mAP", xlabel="epoch", ylim=(0, 1))
    ax2.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _dedupe_epochs(results: Path) -> list[dict[str, str]]:
    """Rows of results.csv, one per epoch (the last written wins).

    A run killed after logging an epoch but before checkpointing it redoes that epoch on resume, and
    Ultralytics appends a second row for it.
    """
    import csv

    rows = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(open(results))]
    by_epoch: dict[str, dict[str, str]] = {}
    for i, r in enumerate(rows):
        by_epoch[r.get("epoch", str(i))] = r
    return sorted(by_epoch.values(), key=lambda r: float(r.get("epoch", 0) or 0))


def _csv_text(rows: list[dict[str, str]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def publish_run(*, family: str, params: Any, pretrained: PretrainedSource, run_dir: Path, best: Path, last: Path,
                out_dir: Path, reports_dir: Path, transfer_report: dict[str, Any] | None,
                frozen_by_epoch: dict[int, list[str]], group_params: dict[str, int],
                resume_epoch: int | None, extra_figures: Sequence[Path] = (),
                notes: Sequence[str] = ()) -> TrainResult:
    """Copy a finished run's weights and reports into the stage outputs (atomically, file by file).

    Outputs: ``out_dir/{best,last}.pt`` and ``params.yaml``; ``reports_dir/{transfer,summary,metrics}.json``,
    ``results.csv``, ``live/`` (DVCLive) and ``figures/``. ``notes`` (what the family ignored) go into transfer.json.
    """
    import shutil

    import yaml

    from pipeline.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

    tp = params.train
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "best.pt", best.read_bytes())
    atomic_write_bytes(out_dir / "last.pt", last.read_bytes())
    atomic_write_text(out_dir / "params.yaml", "# resolved parameters of this training run\n"
                      + yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    transfer = transfer_summary(pretrained, transfer_report, frozen_by_epoch, group_params, tp.strategy,
                                tp.backbone_lr_mult)
    if notes:
        transfer["notes"] = list(notes)
    reports_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(reports_dir / "transfer.json", transfer)
    results = run_dir / "results.csv"
    rows = _dedupe_epochs(results) if results.exists() else []
    metrics: dict[str, float] = {"epochs": float(len(rows))}
    if rows:
        m50 = [float(r.get("metrics/mAP50(B)", "nan")) for r in rows]
        m5095 = [float(r.get("metrics/mAP50-95(B)", "nan")) for r in rows]
        metrics.update({"val_map50": m50[-1], "val_map50_95": m5095[-1], "best_val_map50": max(m50),
                        "best_val_map50_95": max(m5095)})
        atomic_write_text(reports_dir / "results.csv", _csv_text(rows))
    atomic_write_json(reports_dir / "metrics.json", metrics)
    for sub in ("live", "figures"):
        if (reports_dir / sub).exists():
            shutil.rmtree(reports_dir / sub)
    if (run_dir / "live").exists():
        shutil.copytree(run_dir / "live", reports_dir / "live")
    figures = reports_dir / "figures"
    figures.mkdir()
    if rows:
        plot_training_curves(reports_dir / "results.csv", figures / "training_curves.png")
    for fig in extra_figures:
        if fig.exists():
            shutil.copy(fig, figures / fig.name)
    result = TrainResult(family=family, model=tp.model, best=out_dir / "best.pt", last=out_dir / "last.pt",
                         epochs_run=len(rows), start_epoch=(resume_epoch + 1) if resume_epoch is not None else 0,
                         resumed=resume_epoch is not None, metrics=metrics, transfer=transfer)
    atomic_write_json(reports_dir / "summary.json", result.to_dict())
    return result
