"""Versioned model registry on the local file system: ``models/registry/v<N>/`` plus a ``champion.json`` pointer.

Layout (``root`` defaults to ``models/registry``, the folder of ``gate.champion`` in params.yaml)::

    models/registry/
      v1/  model.onnx  model_card.json  metrics.json  gate.json  parity.json  version.json
      v2/  ...
      champion.json    # the current champion; read by the evaluation gate (inline ``metrics``)
      history.jsonl    # append-only audit log of promotions and rollbacks
      .lock            # serialises writers (register, promote, rollback) on one machine

Every write is crash-safe: a version is assembled in a hidden staging folder and renamed into place whole (a
``v<N>`` folder is complete or absent), and ``champion.json`` is replaced atomically (temporary file +
``os.replace``), so a reader sees the old champion or the new one, never half of one. ``champion.json`` is the
source of truth for the current champion and its rollback ``lineage``; ``history.jsonl`` is written after the
switch and is an audit log only.

Library code: raises :class:`RegistryError` (a :class:`~pipeline.errors.DetflowError`) with a clear message; no
printing, no exit codes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import DetflowError
from pipeline.fileio import atomic_write_json, private_workdir, remove_leftovers, sha256_file

DEFAULT_ROOT = Path("models/registry")
CHAMPION = "champion.json"
HISTORY = "history.jsonl"
MANIFEST = "version.json"
SCHEMA = "detflow-registry/1"
# copied into a version when export left them: the shift test's reference sample and its patients, the run report
OPTIONAL_FILES = ("embedding_reference.npy", "embedding_reference_groups.npy", "report.html")
# name inside a version folder -> what it is; model.onnx and model_card.json keep their names so that
# OnnxDetector(v<N>/model.onnx) finds the card next to the model.
ARTIFACTS = ("model.onnx", "model_card.json", "metrics.json", "gate.json", "parity.json")
_VERSION_RE = re.compile(r"^v?([1-9][0-9]*)$")


class RegistryError(DetflowError):
    """Unknown version, nothing to roll back, a corrupted version, or artifacts that may not be registered."""


@dataclass(frozen=True)
class PublishResult:
    """Outcome of :func:`publish`: which version holds the model, and whether it was registered / promoted."""

    version: str
    registered: bool
    promoted: bool
    message: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def normalize_version(version: str | int) -> str:
    """``3``, ``"3"``, ``"v3"`` -> ``"v3"``; anything else is a :class:`RegistryError`."""
    m = _VERSION_RE.match(str(version).strip())
    if not m:
        raise RegistryError(f"invalid version {version!r}; expected v<N> such as v3 (or just 3)")
    return f"v{int(m.group(1))}"


def _number(version: str) -> int:
    return int(version[1:])


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``root/.lock`` so concurrent writers on one machine do not interleave."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path} is not valid JSON ({e}); the registry is damaged there") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{path} must hold a JSON object")
    return doc


def _versions_on_disk(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    found = [p.name for p in root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name) and p.name.startswith("v")
             and (p / MANIFEST).is_file()]
    return sorted(found, key=_number)


def _git_info(where: Path) -> dict[str, Any]:
    """Commit of the source checkout (and whether it had uncommitted changes); empty when git is unavailable."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=30)
        return {"git_commit": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def _append_history(root: Path, event: dict[str, Any]) -> None:
    line = (json.dumps(event, sort_keys=False) + "\n").encode("utf-8")
    fd = os.open(root / HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write(2) of one line with O_APPEND: lines never interleave
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading -------------------------------------------------------------------------------------------------


def champion(root: str | os.PathLike[str] = DEFAULT_ROOT) -> dict[str, Any] | None:
    """The current champion pointer (``champion.json``), or ``None`` when nothing has been promoted."""
    path = Path(root) / CHAMPION
    return _read_json(path) if path.is_file() else None


def get_version(version: str | int, root: str | os.PathLike[str] = DEFAULT_ROOT) -> dict[str, Any]:
    """The manifest (``version.json``) of one version; :class:`RegistryError` naming the known ones if unknown."""
    root = Path(root)
    v = normalize_version(version)
    manifest = root / v / MANIFEST
    if not manifest.is_file():
        known = _versions_on_disk(root)
        raise RegistryError(f"unknown model version {v} in {root}; registered versions: "
                            f"{', '.join(known) if known else 'none (run the training flow first)'}")
    return _read_json(manifest)


def list_versions(root: str | os.PathLike[str] = DEFAULT_ROOT) -> list[dict[str, Any]]:
    """Every registered version, oldest first: its manifest plus ``champion: bool``."""
    root = Path(root)
    current = champion(root)
    cur = current.get("version") if current else None
    return [{**_read_json(root / v / MANIFEST), "champion": v == cur} for v in _versions_on_disk(root)]


def find_by_sha256(sha256: str, root: str | os.PathLike[str] = DEFAULT_ROOT) -> str | None:
    """The registered version whose model.onnx has this sha256 (the newest if several), else ``None``."""
    hits = [m["version"] for m in list_versions(root) if m.get("sha256") == sha256]
    return hits[-1] if hits else None


def model_path(model: str = "champion", root: str | os.PathLike[str] = DEFAULT_ROOT) -> Path:
    """``"champion"`` or ``"v<N>"`` -> that version's ``model.onnx`` (``model_card.json`` lies next to it)."""
    root = Path(root)
    if model == "champion":
        current = champion(root)
        if current is None:
            raise RegistryError(f"no champion in {root}: nothing has been promoted yet "
                                "(run the training flow, or `detflow registry promote VERSION`)")
        model = current["version"]
    v = normalize_version(model)
    get_version(v, root)
    return root / v / "model.onnx"


# --- writing -------------------------------------------------------------------------------------------------


def register(onnx: str | os.PathLike[str], card: str | os.PathLike[str], metrics: str | os.PathLike[str],
             gate: str | os.PathLike[str], parity: str | os.PathLike[str],
             root: str | os.PathLike[str] = DEFAULT_ROOT, *, source: str | os.PathLike[str] | None = None) -> str:
    """Copy an exported model and its reports into a new ``v<N>`` folder; return ``"v<N>"``.

    Refuses a model whose gate or parity check did not pass, or whose card describes a different file. The version
    is assembled in a staging folder and renamed into place, so ``v<N>`` is either complete or absent. ``source``
    is the checkout the model came from (for the git commit); default: the folder of ``onnx``.
    """
    root = Path(root)
    files = {"model.onnx": Path(onnx), "model_card.json": Path(card), "metrics.json": Path(metrics),
             "gate.json": Path(gate), "parity.json": Path(parity)}
    missing = [f"{name} ({path})" for name, path in files.items() if not path.is_file()]
    if missing:
        raise RegistryError(f"cannot register: missing {', '.join(missing)}; run the export stage first")
    # optional companions of the model: the shift test's reference sample and the run report (served by the service)
    files.update({name: Path(onnx).parent / name for name in OPTIONAL_FILES if (Path(onnx).parent / name).is_file()})
    # the model, its card and the arrays beside it, read as one publication (one handle of the folder the model
    # lies in, links resolved): a concurrent export cannot make this version pair a new model with an old card
    release = _read_published(Path(onnx), Path(card))
    sha = hashlib.sha256(release["model.onnx"]).hexdigest()
    try:
        card_doc = json.loads(release["model_card.json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise RegistryError(f"cannot register: {files['model_card.json']} is not valid JSON ({e})") from None
    if not isinstance(card_doc, dict):
        raise RegistryError(f"cannot register: {files['model_card.json']} must hold a JSON object")
    if card_doc.get("sha256") not in (None, sha):
        raise RegistryError(f"cannot register: {files['model_card.json']} describes sha256 {card_doc['sha256']}, "
                            f"but {files['model.onnx']} has sha256 {sha}; re-run the export stage")
    gate_doc = _read_json(files["gate.json"])
    if gate_doc.get("passed") is not True:
        raise RegistryError(f"cannot register: the evaluation gate did not pass ({files['gate.json']})")
    parity_doc = _read_json(files["parity.json"])
    if parity_doc.get("passed") is False:
        raise RegistryError(f"cannot register: PyTorch/ONNX parity failed ({files['parity.json']})")

    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        remove_leftovers(root / "version")  # staging folders of killed registrations
        staging = private_workdir(root, "version")  # the umask's modes: the serving user reads versions too
        try:
            for name, src in files.items():
                if name in release:
                    (staging / name).write_bytes(release[name])
                else:
                    shutil.copyfile(src, staging / name)
            if sha256_file(staging / "model.onnx") != sha:  # the source changed or the disk failed mid-copy
                raise RegistryError(f"cannot register: {files['model.onnx']} changed while it was being copied")
            existing = _versions_on_disk(root)
            n = _number(existing[-1]) + 1 if existing else 1
            version = f"v{n}"
            manifest = {
                "schema": SCHEMA, "version": version, "created_at": _now(), "sha256": sha,
                "files": {name: sha256_file(staging / name) for name in files},
                **_git_info(Path(source) if source is not None else files["model.onnx"].resolve().parent),
                "source": {name: str(path) for name, path in files.items()},
                "family": card_doc.get("family"), "model": card_doc.get("model"), "classes": card_doc.get("classes"),
                "map50": _read_json(files["metrics.json"]).get("map50"),
            }
            atomic_write_json(staging / MANIFEST, manifest)
            while True:  # a folder of that name left by something else: take the next number
                try:
                    os.rename(staging, root / version)
                    break
                except OSError:
                    if not (root / version).exists():
                        raise
                    n += 1
                    version = f"v{n}"
                    manifest["version"] = version
                    atomic_write_json(staging / MANIFEST, manifest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return version


def _read_published(onnx: Path, card: Path) -> dict[str, bytes]:
    """name -> bytes of the model, its card (when it lies beside the model) and the ``.npy`` files beside it, all
    from one publication (:func:`pipeline.fileio.read_release`)."""
    from pipeline.fileio import TornRelease, read_release

    name = Path(os.path.realpath(onnx)).name
    beside = Path(os.path.realpath(card)) == Path(os.path.realpath(onnx)).with_name(Path(os.path.realpath(card)).name)
    card_name = Path(os.path.realpath(card)).name

    def check(files: dict[str, bytes | None]) -> None:
        if files.get(name) is None or (beside and files.get(card_name) is None):
            raise TornRelease(f"{onnx.parent} lacks the model or its card")
        if beside:
            try:
                described = json.loads(files[card_name] or b"{}").get("sha256")
            except (ValueError, AttributeError):
                return  # a damaged card: reported by the caller
            if described is not None and described != hashlib.sha256(files[name] or b"").hexdigest():
                raise TornRelease("the model and its card are from different exports")

    names = [name, *([card_name] if beside else []), *(n for n in OPTIONAL_FILES if n.endswith(".npy"))]
    try:
        _, got = read_release(onnx, names, check=check)
    except TornRelease:
        _, got = read_release(onnx, names)  # a lasting mismatch: reported by the caller's sha256 check
    out = {"model.onnx": got[name] or b"", "model_card.json": got[card_name] if beside and got[card_name] is not None
           else card.read_bytes()}
    out.update({n: b for n, b in got.items() if n.endswith(".npy") and b is not None})
    return out


def _verify(root: Path, version: str) -> dict[str, Any]:
    manifest = get_version(version, root)
    onnx = root / version / "model.onnx"
    if not onnx.is_file() or sha256_file(onnx) != manifest["sha256"]:
        raise RegistryError(f"model version {version} is damaged: {onnx} is missing or does not match its sha256 "
                            f"{manifest['sha256']}; it cannot be made champion")
    return manifest


def _pointer(root: Path, version: str, lineage: list[str]) -> dict[str, Any]:
    manifest = _verify(root, version)
    return {
        "schema": SCHEMA, "version": version, "dir": version, "model": f"{version}/model.onnx",
        "sha256": manifest["sha256"], "metrics": _read_json(root / version / "metrics.json"),
        "promoted_at": _now(), "previous": lineage[-1] if lineage else None, "lineage": lineage,
    }


def promote(version: str | int, root: str | os.PathLike[str] = DEFAULT_ROOT, *, reason: str = "") -> dict[str, Any]:
    """Make ``version`` the champion (atomic switch of ``champion.json``); return the new pointer.

    The previous champion is remembered (``previous`` and the ``lineage`` stack) for :func:`rollback`. Promoting
    the current champion again changes nothing and returns its pointer.
    """
    root = Path(root)
    v = normalize_version(version)
    with _locked(root):
        current = champion(root)
        if current is not None and current.get("version") == v:
            return current
        lineage = [*current.get("lineage", []), current["version"]] if current else []
        lineage = [x for x in lineage if x != v]  # a version appears once: rolling back never lands on itself
        pointer = _pointer(root, v, lineage)
        atomic_write_json(root / CHAMPION, pointer)
        _append_history(root, {"event": "promote", "version": v, "previous": pointer["previous"],
                               "sha256": pointer["sha256"], "at": pointer["promoted_at"], "reason": reason})
    return pointer


def rollback(root: str | os.PathLike[str] = DEFAULT_ROOT, *, reason: str = "") -> dict[str, Any]:
    """Make the previous champion current again (atomic); return the new pointer. Repeatable down the lineage."""
    root = Path(root)
    with _locked(root):
        current = champion(root)
        if current is None:
            raise RegistryError(f"nothing to roll back: {root / CHAMPION} does not exist (no champion yet)")
        lineage = list(current.get("lineage") or ([current["previous"]] if current.get("previous") else []))
        if not lineage:
            raise RegistryError(f"nothing to roll back: {current['version']} is the first champion "
                                "(it has no previous champion)")
        target = lineage.pop()
        pointer = _pointer(root, target, lineage)
        atomic_write_json(root / CHAMPION, pointer)
        _append_history(root, {"event": "rollback", "version": target, "from": current["version"],
                               "previous": pointer["previous"], "sha256": pointer["sha256"],
                               "at": pointer["promoted_at"], "reason": reason})
    return pointer


def history(root: str | os.PathLike[str] = DEFAULT_ROOT) -> list[dict[str, Any]]:
    """Promotions and rollbacks, oldest first (a torn last line, from a crash mid-append, is skipped)."""
    path = Path(root) / HISTORY
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events


def publish(onnx: str | os.PathLike[str], card: str | os.PathLike[str], metrics: str | os.PathLike[str],
            gate: str | os.PathLike[str], parity: str | os.PathLike[str],
            root: str | os.PathLike[str] = DEFAULT_ROOT, *, source: str | os.PathLike[str] | None = None,
            reason: str = "") -> PublishResult:
    """Register a freshly exported model and promote it, unless it is already known.

    * same sha256 as the champion: nothing to do;
    * same sha256 as an older registered version (e.g. one that was rolled back): not promoted again, because an
      unchanged pipeline re-run must not undo a deliberate rollback (promote it explicitly if wanted);
    * otherwise: register as ``v<N>`` and promote.
    """
    root = Path(root)
    sha = sha256_file(onnx)
    current = champion(root)
    if current is not None and current.get("sha256") == sha:
        return PublishResult(current["version"], registered=False, promoted=False,
                             message=f"model is identical to the champion {current['version']} (sha256 "
                                     f"{sha[:12]}); promotion skipped")
    known = find_by_sha256(sha, root)
    if known is not None:
        return PublishResult(known, registered=False, promoted=False,
                             message=f"model is identical to registered version {known} (sha256 {sha[:12]}), "
                                     f"which is not the champion; not re-promoted (run `detflow registry promote "
                                     f"{known}` to promote it)")
    version = register(onnx, card, metrics, gate, parity, root, source=source)
    pointer = promote(version, root, reason=reason or "training flow")
    prev = f" (previous champion {pointer['previous']})" if pointer.get("previous") else " (first champion)"
    return PublishResult(version, registered=True, promoted=True,
                         message=f"registered {version} (sha256 {sha[:12]}) and promoted it to champion{prev}")


# --- reporting -----------------------------------------------------------------------------------------------


def summary_markdown(metrics: dict[str, Any], gate: dict[str, Any], parity: dict[str, Any], card: dict[str, Any],
                     title: str = "detflow training run") -> str:
    """Markdown report of one exported model: headline metrics, gate checks, ONNX parity, model card summary."""

    def num(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, int | float) and not isinstance(x, bool) else ("n/a" if x is None else
                                                                                             str(x))

    ci = metrics.get("ci95") or {}
    froc = metrics.get("froc") or {}
    lines = [f"# {title}", "", "## Metrics", "", "| metric | value | 95% CI |", "|---|---|---|"]
    for key, value in (("mAP50", metrics.get("map50")), ("mAP50-95", metrics.get("map50_95")),
                       ("CPM", froc.get("cpm"))):
        ci_key = {"mAP50": "map50", "mAP50-95": "map50_95", "CPM": "cpm"}[key]
        lines.append(f"| {key} | {num(value)} | {ci.get(ci_key, '')} |")
    lines.append(f"\nsplit `{metrics.get('split')}`: {metrics.get('n_images')} images, "
                 f"{metrics.get('n_patients')} patients\n")
    lines += ["## Gate", "", f"**{'PASSED' if gate.get('passed') else 'FAILED'}**", "",
              "| check | value | threshold | result |", "|---|---|---|---|"]
    for c in gate.get("checks", []):
        op = "<=" if c["name"] == "max_regression" else ">="
        lines.append(f"| {c['name']} | {num(c.get('value'))} | {op} {num(c.get('threshold'))} | "
                     f"{'PASS' if c.get('passed') else 'FAIL'} |")
    lines += ["", "## PyTorch / ONNX parity", "", "| measure | value |", "|---|---|"]
    for key in ("n_images", "matched_fraction", "max_abs_box_diff_px", "max_abs_score_diff", "map50_95_torch",
                "map50_95_onnx", "delta", "passed"):
        if key in parity:
            lines.append(f"| {key} | {num(parity[key])} |")
    inp = card.get("input") or {}
    lines += ["", "## Model card", "",
              f"- model: `{card.get('family')}/{card.get('model')}`, classes {card.get('classes')}",
              f"- input: {inp.get('shape')} {inp.get('dtype')}, opset {card.get('opset')}",
              f"- sha256: `{card.get('sha256')}` ({card.get('size_bytes')} bytes)",
              f"- pretrained: {card.get('pretrained')}",
              f"- training data: {(card.get('training_data') or {}).get('source')}, manifest "
              f"`{(card.get('training_data') or {}).get('manifest_sha256')}`",
              f"- created: {card.get('created')}"]
    return "\n".join(lines) + "\n"
