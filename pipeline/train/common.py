"""What every model family's training shares: devices, freeze schedules, run fingerprints, publishing reports.

Keeping these here means every family follows one definition of each transfer-learning strategy (the layer groups
themselves are the family's: ``pipeline/families/<name>/``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pipeline.config import TrainParams

def frozen_groups_at(strategy: str, unfreeze_at: Sequence[int], epoch: int) -> list[str]:
    """Groups frozen during ``epoch`` (0-based).

    feature_extraction: the backbone, always. fine_tune: nothing. progressive: backbone and neck at first;
    at epoch ``unfreeze_at[0]`` the neck is released, at ``unfreeze_at[1]`` the backbone.
    """
    if strategy == "fine_tune":
        return []
    if strategy == "feature_extraction":
        return ["backbone"]
    if strategy == "progressive":
        order = ["neck", "backbone"]  # released in this order
        released = sum(1 for e in unfreeze_at[: len(order)] if epoch >= e)
        return [g for g in ("backbone", "neck") if g not in order[:released]]
    raise ConfigError(f"unknown strategy {strategy!r}; expected one of: feature_extraction, fine_tune, progressive")


def validate_schedule(params: TrainParams) -> None:
    if params.strategy == "progressive":
        ua = list(params.unfreeze_at)
        if not ua or any(e < 1 for e in ua) or ua != sorted(set(ua)):
            raise ConfigError(f"train.unfreeze_at must be strictly increasing epochs >= 1, got {ua}")
        if len(ua) > 2:
            raise ConfigError(f"train.unfreeze_at has {len(ua)} entries; there are 2 groups to release "
                              "(neck, then backbone)")


def names_in_groups(names: Iterable[str], prefixes: dict[str, list[str]], groups: Iterable[str]) -> list[str]:
    wanted = [p for g in groups for p in prefixes[g]]
    return [n for n in names if any(n.startswith(p) for p in wanted)]


def cpu_threads(requested: int) -> int:
    """``train.cpu_threads`` -> a thread count: 0 means every core this process may use."""
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str) -> str:
    """Turn ``train.device`` into a concrete device string, failing before any work when it can't be had."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return "0" if n else "cpu"
    if device == "cpu":
        return "cpu"
    if n == 0:
        raise ConfigError(f"train.device is {device!r} but no CUDA GPU is available here "
                          "(torch.cuda.is_available() is False); expected one of: auto, cpu")
    if device == "cuda":
        return "0"
    ids = [int(x) for x in device.split(",")]
    bad = [i for i in ids if i >= n]
    if bad:
        raise ConfigError(f"train.device asks for GPU {bad} but only {n} GPU(s) exist (indices 0..{n - 1})")
    return ",".join(str(i) for i in ids)


def check_prepared(prepared: Path) -> dict[str, Any]:
    """The prepared dataset must exist before training; return its prepare_info.json."""
    needed = [prepared / "dataset.yaml", prepared / "prepare_info.json", prepared / "coco" / "train.json",
              prepared / "coco" / "val.json"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise DataError(f"prepared dataset missing ({', '.join(missing)}); run `detflow prepare` (or `dvc repro`)")
    info = json.loads((prepared / "prepare_info.json").read_text())
    n_train = len(json.loads((prepared / "coco" / "train.json").read_text())["images"])
    if n_train == 0:
        raise DataError(f"the train split of {prepared} is empty")
    return info


def run_fingerprint(params: TrainParams, data_fingerprint: str, pretrained_sha: str | None) -> str:
    """Identity of a training run: a checkpoint is resumed only by a run with the same fingerprint."""
    blob = json.dumps({"train": params.model_dump(mode="json", exclude={"resume", "workers"}),
                       "data": data_fingerprint, "pretrained": pretrained_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PretrainedSource:
    """Where initial weights came from; ``kind`` is coco, path or none."""

    kind: str
    source: str
    path: str | None = None
    sha256: str | None = None
    note: str = ""


@dataclass
class TrainResult:
    family: str
    model: str
    best: Path
    last: Path
    epochs_run: int
    start_epoch: int
    resumed: bool
    metrics: dict[str, float] = field(default_factory=dict)
    transfer: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["best"], d["last"] = str(self.best), str(self.last)
        return d


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


BUDGET_FILE = "budget.json"  # in a run folder: optimizer steps and seconds of the epochs its last.pt holds


def add_budget(run_dir: Path, steps: int, seconds: float) -> None:
    """Add one epoch's optimizer steps and wall seconds to the run's budget record (kept across resumes)."""
    from pipeline.fileio import atomic_write_json

    spent = read_budget(run_dir)
    atomic_write_json(run_dir / BUDGET_FILE, {"optimizer_steps": spent["optimizer_steps"] + int(steps),
                                              "train_seconds": round(spent["train_seconds"] + float(seconds), 3)})


def read_budget(run_dir: Path) -> dict[str, Any]:
    """``{"optimizer_steps", "train_seconds"}`` spent so far by the run in ``run_dir`` (zeros when none)."""
    path = run_dir / BUDGET_FILE
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
            return {"optimizer_steps": int(doc["optimizer_steps"]), "train_seconds": float(doc["train_seconds"])}
        except (ValueError, KeyError, TypeError):
            pass
    return {"optimizer_steps": 0, "train_seconds": 0.0}


def trainable_parameters(group_params: dict[str, int], frozen_by_epoch: dict[int, list[str]]) -> int:
    """Parameters the optimizer updated in at least one epoch: every group but those frozen in every epoch."""
    always = set.intersection(*(set(g) for g in frozen_by_epoch.values())) if frozen_by_epoch else set()
    return int(sum(n for g, n in group_params.items() if g not in always))


def default_workdir() -> Path:
    """Resumable run state lives outside DVC outputs (which DVC deletes before a stage runs)."""
    from pipeline.ultralytics_env import state_root

    return state_root() / "train"


def pretrained_unavailable(mode: str, model: str, reason: str | Exception) -> PretrainedSource:
    """``coco`` is strict; ``auto`` falls back to training from scratch and says so loudly (on one line: an
    ``AssetError``'s summary, else the reason's first line)."""
    from pipeline.errors import AssetError

    if mode == "coco":
        raise AssetError(f"train.pretrained is 'coco' but COCO weights for {model} cannot be resolved: {reason}\n"
                         "Use pretrained: auto to fall back to training from scratch, or pretrained: none.")
    why = reason.summary if isinstance(reason, AssetError) else str(reason).splitlines()[0]
    note = (f"COCO weights for {model} could not be resolved ({why}); TRAINING FROM SCRATCH - expect much lower "
            "accuracy on small datasets. For COCO weights offline, point DETFLOW_ASSETS at an asset mirror.")
    return PretrainedSource(kind="none", source="scratch (auto fallback)", note=note)


def resolve_initial_weights(tp: Any, coco_assets: dict[str, str], load_state: Any, raw_dir: Path,
                            mirrors: Sequence[Path] | None, trust: bool,
                            progress: bool = False) -> tuple[PretrainedSource, Any]:
    """Initial weights per ``train.pretrained``, the same rule for every family: ``none`` (scratch); ``coco`` /
    ``auto``: the model's COCO asset through :func:`pipeline.assets.resolve` (raw folder, mirror, download;
    verified there), unavailable → ``coco`` raises, ``auto`` trains from scratch with a loud note; a path, checked
    against ``train.pretrained_sha256``. ``load_state(path, expected_sha256)`` is the family's loader."""
    from pipeline import assets
    from pipeline.errors import AssetError
    from pipeline.fileio import sha256_file

    mode = tp.pretrained
    if mode == "none":
        return PretrainedSource(kind="none", source="none (from scratch, as configured)"), None
    if mode in ("coco", "auto"):
        name = coco_assets.get(tp.model)
        if name is None:
            return pretrained_unavailable(mode, tp.model, f"no COCO checkpoint is known for {tp.model} "
                                          f"(known: {', '.join(coco_assets) or 'none'})"), None
        try:
            path = assets.resolve(name, raw_dir=raw_dir, mirrors=list(mirrors) if mirrors is not None else None,
                                  trust=trust, progress=progress)
            state = load_state(path, assets.ASSETS[name].sha256)
        except AssetError as e:
            return pretrained_unavailable(mode, tp.model, e), None
        return PretrainedSource(kind="coco", source=f"{name} ({assets.ASSETS[name].url})", path=str(path),
                                sha256=sha256_file(path)), state
    path = Path(mode)
    if not path.is_file():
        raise ConfigError(f"train.pretrained {mode!r} is not a file; expected one of: auto, coco, none, or a path")
    state = load_state(path, tp.pretrained_sha256)
    return PretrainedSource(kind="path", source=str(path), path=str(path), sha256=sha256_file(path)), state


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
                notes: Sequence[str] = (), subset: dict[str, Any] | None = None) -> TrainResult:
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
    transfer["trainable_parameters"] = trainable_parameters(group_params, frozen_by_epoch)
    if subset is not None:
        transfer["train_subset"] = subset
    reports_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(reports_dir / "transfer.json", transfer)
    results = run_dir / "results.csv"
    rows = _dedupe_epochs(results) if results.exists() else []
    metrics: dict[str, float] = {"epochs": float(len(rows))}
    budget = read_budget(run_dir)
    cost: dict[str, Any] = {"optimizer_steps": budget["optimizer_steps"], "train_seconds": budget["train_seconds"],
                            "trainable_params": transfer["trainable_parameters"],
                            "train_images": (subset or {}).get("n_images")}
    if rows:
        m50 = [float(r.get("metrics/mAP50(B)", "nan")) for r in rows]
        m5095 = [float(r.get("metrics/mAP50-95(B)", "nan")) for r in rows]
        metrics.update({"val_map50": m50[-1], "val_map50_95": m5095[-1], "best_val_map50": max(m50),
                        "best_val_map50_95": max(m5095)})
        atomic_write_text(reports_dir / "results.csv", _csv_text(rows))
    atomic_write_json(reports_dir / "metrics.json", {**metrics, **cost})
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
