"""Atomic writes: every artifact goes to a temporary sibling first and is renamed into place.

A crash (or SIGKILL) therefore leaves either the previous artifact or the new one, never half of one. Outputs that
belong together (a dataset and its validation report, a model and its card) are published as one group through a
commit journal (:func:`atomic_outputs`); whatever a killed writer left behind is rolled forward or removed by
:func:`recover_outputs` at the next start. Files and folders get the permissions the umask gives (0644 / 0755 by
default), not the private 0600 / 0700 of ``tempfile``: models are read by other users (the serving image's uid).

A folder replaced whole is switched by *one* rename, ``renameat2(RENAME_EXCHANGE)`` (Linux): the target path never
stops existing, so a reader finds the old folder or the new one, never none (the two-rename fallback elsewhere has
a moment with none). Readers that need several files of one published folder read them through one open handle
of it (:func:`read_release`), so they never pair files of two publications.

Every rename goes through :func:`_rename`, the one place a test can kill the process at rename N
(``DETFLOW_FAULT_KILL_AT_RENAME``; ``DETFLOW_FAULT_RENAME_LOG`` lists them): crash safety is tested at each step,
not only at random moments.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import DetflowError

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


_FAULT_KILL = "DETFLOW_FAULT_KILL_AT_RENAME"  # test hook: SIGKILL this process just before its N-th rename (1-based)
_FAULT_LOG = "DETFLOW_FAULT_RENAME_LOG"  # test hook: append each rename (src -> dst) to this file
_renames = 0
RENAME_EXCHANGE = 2  # linux/fs.h


def _rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], exchange: bool = False) -> None:
    """``os.replace(src, dst)``, or with ``exchange`` an atomic swap of two existing paths; the one rename primitive
    of this module (see the module docstring for the fault-injection hook)."""
    global _renames
    _renames += 1
    if (log := os.environ.get(_FAULT_LOG)):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {_renames} {'exchange' if exchange else 'rename'} {src} -> {dst}\n")
    if os.environ.get(_FAULT_KILL) == str(_renames):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if exchange:
        _exchange(os.fspath(src), os.fspath(dst))
    else:
        os.replace(src, dst)


_libc: Any = None


def _exchange(a: str, b: str) -> None:
    """Swap two paths in one step (renameat2 with RENAME_EXCHANGE); OSError where the kernel or file system has no
    such rename (then the caller falls back to two renames)."""
    global _libc
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(38, "renameat2 is not available")
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a)


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
        _rename(tmp, path)
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


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _replace_in_two(staged: Path, target: Path) -> None:
    """Target aside, staged into place, old removed: for what one rename cannot replace (a folder over a file, or
    no RENAME_EXCHANGE here); a reader may find nothing at ``target`` for a moment."""
    old = _temp_sibling(target, "old")
    _rename(target, old)
    _rename(staged, target)
    _fsync(target.parent)
    _remove(old)


def _roll_forward(journal: Path) -> None:
    """Move every staged output of a committed group into place (idempotent), then drop the journal.

    A file is renamed over its target (atomic); a folder is exchanged with the folder it replaces (one atomic
    rename: the target never disappears), after which the staging name holds the old folder and is removed. The
    journal records each staged entry's inode, so after a crash an exchanged entry (its staging name now holding
    the old folder) is told apart from one still to move."""
    base = journal.parent
    entries = json.loads(journal.read_text())["entries"]
    for entry in entries:
        staged, target = base / entry["staged"], base / entry["target"]
        if not staged.exists() and not staged.is_symlink():
            continue  # moved already, before a crash
        inode = entry.get("inode")
        if inode is not None and os.lstat(staged).st_ino != inode:
            _remove(staged)  # exchanged already: the staging name holds the previous folder
            continue
        if _is_real_dir(staged) and _is_real_dir(target):
            try:
                _rename(staged, target, exchange=True)
            except OSError:  # no RENAME_EXCHANGE on this kernel or file system
                _replace_in_two(staged, target)
                continue
            _fsync(target.parent)
            _remove(staged)
        elif staged.is_dir() != _is_real_dir(target) and (target.exists() or target.is_symlink()):
            _replace_in_two(staged, target)  # a folder replacing a file or the other way round
        else:
            _rename(staged, target)  # a file (or a folder onto nothing): atomic, the target is never missing
            _fsync(target.parent)
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
        {"staged": os.path.relpath(s, base), "target": os.path.relpath(p, base), "inode": os.lstat(s).st_ino}
        for s, p in zip(staged, paths, strict=True)]})
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


def link_into_place(link: Path, target: str) -> bool:
    """Make ``link`` a symbolic link to ``target`` (relative text), replacing what is there in one rename; False
    when it already is one. The compatibility names of a published folder (``models/model.onnx`` ->
    ``current/model.onnx``) are made so."""
    if link.is_symlink() and os.readlink(link) == target:
        return False
    tmp = _temp_sibling(link, "tmp")
    os.symlink(target, tmp)
    try:
        _rename(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(link.parent)
    return True


class TornRelease(OSError):
    """The files read from a published folder do not belong together (the folder was replaced meanwhile)."""


def read_release(path: str | os.PathLike[str], names: Iterable[str], check: Any = None,
                 attempts: int = 20) -> tuple[Path, dict[str, bytes | None]]:
    """The files ``names`` of the published folder that holds ``path`` (links resolved), read through one open
    handle of that folder, so all of them come from one publication even while a writer replaces it.

    A name ``*.ext`` stands for every file of the folder with that suffix. Returns (the folder's resolved path,
    name -> bytes, or None for a name that is absent). ``check(files)`` may
    raise :class:`TornRelease` when the files disagree (a model and a card of two exports); a folder removed while
    it was read (the writer's old copy) raises FileNotFoundError inside; both are retried with a fresh handle, up to
    ``attempts`` times, then the last error is raised.
    """
    import time

    names = list(names)
    last: OSError | None = None
    for attempt in range(attempts):
        folder = Path(os.path.realpath(path)).parent
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as e:
            last = e
            if not isinstance(e, FileNotFoundError):
                raise
        else:
            try:
                files: dict[str, bytes | None] = {}
                wanted = [n for n in names if not n.startswith("*")]
                for pattern in (n[1:] for n in names if n.startswith("*")):
                    wanted += sorted(e for e in os.listdir(fd) if e.endswith(pattern) and e not in wanted)
                for name in wanted:
                    try:
                        f = os.open(name, os.O_RDONLY, dir_fd=fd)
                    except FileNotFoundError:
                        files[name] = None
                        continue
                    with os.fdopen(f, "rb") as fh:
                        files[name] = fh.read()
                if any(files.get(n) is None for n in names if not n.startswith("*")) and os.fstat(fd).st_nlink == 0:
                    raise FileNotFoundError(f"{folder} was removed while it was read")  # a writer's old copy
                if check is not None:
                    check(files)
                return folder, files
            except (TornRelease, FileNotFoundError) as e:
                last = e
            finally:
                os.close(fd)
        time.sleep(min(0.005 * (attempt + 1), 0.1))
    assert last is not None
    raise last


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


# ---------------------------------------------------------------------------------------------- output locations


@dataclass(frozen=True)
class Write:
    """One output a command will write: a ``file`` replaced, a ``tree`` (folder) replaced whole, or a folder
    written ``into`` (files added beside others). A ``tree`` that exists must hold ``ours`` (a file every earlier
    run of the command left there) or be empty: a folder someone else filled is never replaced."""

    what: str
    path: Path
    mode: Literal["file", "tree", "into"] = "file"
    ours: str | None = None


class OverlapError(DetflowError):
    """An output would overwrite, delete or write into an input, another output, or a folder detflow did not
    write. Raised before any work (entry points turn it into one ``error:`` line)."""


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))  # links and `..` resolved, also for a path that does not exist yet


def _entry(path: Path) -> Path:
    """Where a write lands: the folder resolved, the last name kept (writing replaces a link, not its target)."""
    if path.name in ("", ".", ".."):
        return _real(path)
    return _real(path.parent) / path.name


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` holds anything but empty folders and DVC's own ``.gitignore`` files (what a DVC checkout or
    experiment workspace leaves where a stage's outs will go, after DVC removed the outs themselves)."""
    for _, _dirs, files in os.walk(folder):
        if any(f != ".gitignore" for f in files):
            return True
    return False


def check_outputs(reads: Iterable[tuple[str, str | os.PathLike[str]]], writes: Iterable[Write]) -> None:
    """Refuse, before any work, outputs that touch what the command did not create (issue 20).

    ``reads``: (what, path) of every input; a folder means everything in it. Refused: an output that *is* an input;
    an input inside an output folder replaced whole (it would be deleted); an output inside an input folder (the
    command would change its own input); two outputs that are one path, or one inside another replaced whole; a
    ``tree`` output that exists and is a file, or a non-empty folder without its ``ours`` marker. Paths are compared
    with links and ``..`` resolved, so an alias cannot slip through.
    """
    inputs = [(what, Path(p), _real(Path(p))) for what, p in reads]
    outputs = [(w, _entry(w.path)) for w in writes]
    for w, wr in outputs:
        for what, given, rr in inputs:
            if wr in (rr, _entry(given)):  # the input itself, or the link it was named by
                raise OverlapError(f"{w.what} {w.path} is the {what} {given}; refusing to overwrite an input")
            if w.mode == "tree" and _within(rr, wr):
                raise OverlapError(f"{w.what} {w.path} contains the {what} {given}, and is replaced whole: the input "
                                   "would be deleted; choose an output outside it")
            if _within(wr, rr) and rr.is_dir():
                raise OverlapError(f"{w.what} {w.path} lies inside the {what} {given}: the command would change its "
                                   "own input; choose an output outside it")
    for i, (a, ar) in enumerate(outputs):
        for b, br in outputs[i + 1:]:
            if ar == br or (b.mode == "tree" and _within(ar, br)) or (a.mode == "tree" and _within(br, ar)):
                raise OverlapError(f"{a.what} {a.path} and {b.what} {b.path} overlap; give them separate locations")
    for w, wr in outputs:
        if w.mode != "tree" or not (wr.exists() or wr.is_symlink()):
            continue
        if not wr.is_dir():
            raise OverlapError(f"{w.what} {w.path} is a file, not a folder; refusing to replace it")
        if w.ours is not None and _holds_files(wr) and not (wr / w.ours).exists():
            raise OverlapError(f"{w.what} {w.path} holds files detflow did not write there (no {w.ours}); refusing to "
                               "replace it: choose another location or empty it yourself")
