"""Test-only observer for tests/test_ddp.py, put on PYTHONPATH of a data-parallel run: in every rank (and only
there) a Python audit hook logs each file created, opened for writing, renamed, or removed under the folders named
by DETFLOW_TEST_AUDIT_WATCH, to DETFLOW_TEST_AUDIT/rank<N>.log. It sees what the ranks really do, without any hook
in the code under test."""

import os
import sys

_OUT = os.environ.get("DETFLOW_TEST_AUDIT")
if _OUT and os.environ.get("DETFLOW_DDP") == "1" and "RANK" in os.environ:
    _WATCH = tuple(p for p in os.environ.get("DETFLOW_TEST_AUDIT_WATCH", "").split(os.pathsep) if p)
    _LOG = open(os.path.join(_OUT, f"rank{os.environ['RANK']}.log"), "a", buffering=1)
    _EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree")
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _watched(path: object) -> bool:
        try:
            text = os.fsdecode(os.fspath(path))  # type: ignore[arg-type]
        except TypeError:
            return False
        return os.path.abspath(text).startswith(_WATCH)

    def _hook(event: str, args: tuple) -> None:
        if event == "open" and len(args) == 3:
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (mode is None and isinstance(flags, int) and flags & _WRITE)
            if writing and _watched(path):
                _LOG.write(f"write {os.fsdecode(path)}\n")
        elif event in _EVENTS and args and _watched(args[0]):
            target = f" -> {os.fsdecode(args[1])}" if event == "os.rename" else ""
            _LOG.write(f"{event} {os.fsdecode(args[0])}{target}\n")

    sys.addaudithook(_hook)
