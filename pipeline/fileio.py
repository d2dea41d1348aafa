"""Atomic writes: every artifact goes to a temporary sibling first and is renamed into place.

A crash (or SIGKILL) therefore leaves either the previous artifact or the new one, never half of one. Outputs that
belong together (a dataset and its validation report, a model and its card) are published as one group through a
commit journal (:func:`atomic_outputs`); whatever a killed writer left behind is rolled forward or removed by
:func:`recover_outputs` at the next start. Files and folders get the permissions the umask gives (0644 / 0755 by
default), not the private 0600 / 0700 of ``tempfile``: models are read by other users (the serving image's uid).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Temporaries are named `.<target name>.<tag>.<pid>.<random>` beside their target, so the next run can tell a
# leftover of a dead writer from the work of a live one.
_TAGS = ("tmp", "staging", "old")


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename is durable only once its folder is flushed)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}.{os.getpid()}.{secrets.token_hex(4)}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename.

    ``durable=False`` skips the two fsyncs (the file may be lost, never torn, at a power cut): for many small files
    whose reader checks them and recomputes a missing one (the cluster's shard files, pipeline/infer/shards.py).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, durable: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, durable: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", durable)


def _journal(first_target: Path) -> Path:
    return first_target.parent / f".{first_target.name}.commit.json"


def _roll_forward(journal: Path) -> None:
    """Move every staged output of a committed group into place (idempotent), then drop the journal."""
    base = journal.parent
    entries = json.loads(journal.read_text())["entries"]
    for entry in entries:
        staged, target = base / entry["staged"], base / entry["target"]
        if not staged.exists() and not staged.is_symlink():
            continue  # moved already, before a crash
        old = None
        if target.exists() or target.is_symlink():
            old = _temp_sibling(target, "old")
            os.replace(target, old)
        os.replace(staged, target)
        _fsync(target.parent)
        if old is not None:
            _remove(old)
    journal.unlink()
    _fsync(base)


_LEFTOVER = re.compile(rf"^\.(?P<name>.+)\.(?P<tag>{'|'.join(_TAGS)})\.(?P<pid>\d+)\.[0-9a-f]{{8}}$")
# Names written by earlier detflow versions (tempfile): `.<name>.staging.XXXX`, `.<name>.old.XXXX`, `.<name>.XXXX.tmp`
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?:(?:staging|old)\.[A-Za-z0-9_]{8}|[A-Za-z0-9_]{8}\.tmp)$")


def remove_leftovers(*targets: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries that killed writers of ``targets`` left beside them; return what was removed.

    A temporary whose writer (the pid in its name) is still running is left alone.
    """
    removed: list[Path] = []
    for target in map(Path, targets):
        if not target.parent.is_dir():
            continue
        for entry in target.parent.iterdir():
            m = _LEFTOVER.match(entry.name)
            if m and m["name"] == target.name and not _pid_alive(int(m["pid"])):
                _remove(entry)
                removed.append(entry)
            elif (m2 := _LEGACY.match(entry.name)) and m2["name"] == target.name:
                _remove(entry)
                removed.append(entry)
    return removed


def recover_outputs(*targets: str | os.PathLike[str]) -> list[Path]:
    """Finish or undo what a killed :func:`atomic_outputs` left: a committed group is rolled forward, stray
    temporaries are removed. Call it when a stage starts; it is cheap when there is nothing to do."""
    paths = [Path(t) for t in targets]
    journal = _journal(paths[0])
    if journal.is_file():
        _roll_forward(journal)
    return remove_leftovers(*paths, journal)  # a kill while the journal itself was written leaves its temporary


@contextlib.contextmanager
def atomic_outputs(*targets: str | os.PathLike[str]) -> Iterator[tuple[Path, ...]]:
    """Yield one staging path per target; write each (a file, or a folder you create); on success all targets
    are replaced together, on error none is.

    Protocol: the staged outputs are complete → a journal naming them is written atomically (the commit point) →
    each is renamed over its target → the journal is removed. A kill before the commit point leaves the previous
    set (its staging is removed at the next start); a kill after it leaves a journal that :func:`recover_outputs`
    rolls forward. Targets must lie on one file system (renames), normally beside each other in the project.
    """
    paths = [Path(t) for t in targets]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    recover_outputs(*paths)
    staged = tuple(_temp_sibling(p, "staging") for p in paths)
    try:
        yield staged
        missing = [str(s) for s in staged if not s.exists()]
        if missing:
            raise FileNotFoundError(f"atomic_outputs: nothing was written to {missing}")
        for s in staged:
            _fsync_tree(s)
    except BaseException:
        for s in staged:
            _remove(s)
        raise
    journal = _journal(paths[0])
    base = journal.parent
    atomic_write_json(journal, {"entries": [
        {"staged": os.path.relpath(s, base), "target": os.path.relpath(p, base)} for s, p in zip(staged, paths,
                                                                                               strict=True)]})
    _roll_forward(journal)


def _fsync_tree(path: Path) -> None:
    """Flush a staged file or folder to disk before it is committed (a power cut must not publish empty files)."""
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        _fsync(p)  # files and folders alike


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it replaces ``path`` whole, on error it is removed.

    At every instant ``path`` holds either the complete old tree or the complete new one (or, after a kill in the
    middle of the swap, a journal that the next :func:`recover_outputs` / ``atomic_directory`` rolls forward).
    """
    with atomic_outputs(path) as (staging,):
        staging.mkdir(mode=0o777)  # the umask applies: 0755 by default, not tempfile's 0700
        yield staging


def private_workdir(parent: str | os.PathLike[str], name: str) -> Path:
    """A scratch folder ``parent/.<name>.staging.<pid>.<random>``: removed by the caller, or as a leftover by the
    next :func:`remove_leftovers` of ``parent/<name>`` once this process is gone."""
    path = _temp_sibling(Path(parent) / name, "staging")
    path.mkdir(parents=True)
    return path


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | os.PathLike[str]) -> str:
    """Hash of a folder, equal to ``cd root && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum``."""
    root = Path(root)
    rels = sorted(
        ("./" + p.relative_to(root).as_posix()).encode("utf-8") for p in root.rglob("*") if p.is_file()
    )
    outer = hashlib.sha256()
    for rel in rels:
        digest = sha256_file(root / rel.decode("utf-8")[2:])
        outer.update(f"{digest}  ".encode() + rel + b"\n")
    return outer.hexdigest()
