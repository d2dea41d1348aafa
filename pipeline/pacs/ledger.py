"""What ``detflow pacs run`` has done, in SQLite (``<work>/ledger.sqlite``), so reruns skip finished series and a
killed run resumes where it stopped.

Tables:

* ``series``: one row per finished series (PACS, source series, model sha256 -> study, SR SOP Instance UID, SR
  series UID, how it finished: ``stored`` or ``found`` (the PACS already held the report), instance and detection
  counts, time). Only a series whose report the PACS acknowledged gets a row; a failed one has none, so the next
  run tries it again.
* ``problems``: every instance or series that could not be processed, per run (kind and a detail without PHI).
* ``runs``: one row per run, with its counts and how it ended.

Each write is its own transaction (WAL journal, ``synchronous=FULL``): a SIGKILL loses at most the row being
written, and the rule "ledger row only after the STOW-RS answer" plus deterministic SR UIDs make that window safe
(the next run finds the report in the PACS before storing anything, see :mod:`pipeline.pacs.run`). The ledger holds
UIDs (it is the local record of what was done, like the PACS itself), never names or other patient data.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import DetflowError

LEDGER_FILE = "ledger.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    pacs TEXT NOT NULL, series_uid TEXT NOT NULL, model_sha256 TEXT NOT NULL,
    study_uid TEXT NOT NULL, sr_sop_uid TEXT NOT NULL, sr_series_uid TEXT NOT NULL,
    how TEXT NOT NULL, n_instances INTEGER NOT NULL, n_detections INTEGER NOT NULL, finished_at TEXT NOT NULL,
    run_id INTEGER, PRIMARY KEY (pacs, series_uid, model_sha256));
CREATE TABLE IF NOT EXISTS problems (
    run_id INTEGER NOT NULL, pacs TEXT NOT NULL, study_uid TEXT, series_uid TEXT, sop_uid TEXT,
    kind TEXT NOT NULL, detail TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT, pacs TEXT NOT NULL, model_sha256 TEXT NOT NULL,
    started_at TEXT NOT NULL, finished_at TEXT, status TEXT NOT NULL, counts TEXT);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Finished:
    """A ledger row of a finished series."""

    study_uid: str
    sr_sop_uid: str
    sr_series_uid: str
    how: str
    n_instances: int
    n_detections: int


class Ledger:
    """The SQLite ledger in ``folder`` (created when missing)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LEDGER_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self._lock = threading.Lock()
        except (sqlite3.Error, OSError) as e:
            raise DetflowError(f"cannot open the PACS ledger {self.path}: {e}") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        for attempt in range(5):  # another run on the same ledger holds the write lock for a moment
            try:
                with self._lock:  # the run's report writer thread and its main thread share the connection
                    return self.db.execute(sql, args)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 4:
                    raise DetflowError(f"cannot write the PACS ledger {self.path}: {e}") from None
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ runs

    def start_run(self, pacs: str, model_sha256: str) -> int:
        cur = self._write("INSERT INTO runs (pacs, model_sha256, started_at, status) VALUES (?, ?, ?, 'running')",
                          (pacs, model_sha256, _now()))
        return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, status: str, counts: str) -> None:
        self._write("UPDATE runs SET finished_at = ?, status = ?, counts = ? WHERE run_id = ?",
                    (_now(), status, counts, run_id))

    # ------------------------------------------------------------------ series

    def finished(self, pacs: str, series_uid: str, model_sha256: str) -> Finished | None:
        rows = self._read("SELECT study_uid, sr_sop_uid, sr_series_uid, how, n_instances, n_detections FROM series "
                          "WHERE pacs = ? AND series_uid = ? AND model_sha256 = ?", (pacs, series_uid, model_sha256))
        return Finished(*rows[0]) if rows else None

    def sr_series(self, pacs: str) -> set[str]:
        """Every SR series detflow filed on this PACS (so a run can tell its own reports from other objects)."""
        return {r[0] for r in self._read("SELECT sr_series_uid FROM series WHERE pacs = ?", (pacs,))}

    def record_finished(self, pacs: str, series_uid: str, model_sha256: str, f: Finished, run_id: int) -> None:
        self._write("INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (pacs, series_uid, model_sha256, f.study_uid, f.sr_sop_uid, f.sr_series_uid, f.how,
                     f.n_instances, f.n_detections, _now(), run_id))

    def count_finished(self, pacs: str | None = None) -> int:
        if pacs is None:
            return int(self._read("SELECT COUNT(*) FROM series")[0][0])
        return int(self._read("SELECT COUNT(*) FROM series WHERE pacs = ?", (pacs,))[0][0])

    # ------------------------------------------------------------------ problems

    def record_problem(self, run_id: int, pacs: str, kind: str, detail: str, study_uid: str | None = None,
                       series_uid: str | None = None, sop_uid: str | None = None) -> None:
        self._write("INSERT INTO problems VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, pacs, study_uid, series_uid, sop_uid, kind, detail, _now()))

    def problems(self, run_id: int) -> list[dict[str, Any]]:
        rows = self._read("SELECT study_uid, series_uid, sop_uid, kind, detail FROM problems WHERE run_id = ?",
                          (run_id,))
        return [dict(zip(("study_uid", "series_uid", "sop_uid", "kind", "detail"), r, strict=True)) for r in rows]
