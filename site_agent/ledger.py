"""The site's durable, append-only privacy ledger: every DP release charged to a dataset.

Specification
=============

* **Write-ahead.** The agent calls :meth:`Ledger.charge` *before* any update or metric leaves
  the site. :meth:`~Ledger.charge` returns only once the charge is committed and synced
  (SQLite ``journal_mode=WAL`` with ``synchronous=FULL``: the WAL is fsynced at every commit),
  so a crash or ``SIGKILL`` at any point afterwards cannot lose it. A crash between the charge
  and the send over-counts (the site paid for a release that never happened); the order makes
  under-counting impossible.
* **All or nothing.** One call is one transaction: either every event of the task is recorded
  or none is.
* **Append-only.** There are no update or delete methods, and SQLite triggers refuse
  ``UPDATE`` and ``DELETE`` on the charges table, so a bug elsewhere in the agent cannot lower
  the spend either.
* **Composition.** :meth:`Ledger.spent` composes every event ever charged to a dataset, across
  jobs, with :func:`common.accounting.compute_epsilon` (PRV by default: Gopi, Lee & Wutschitz
  2021) at the δ asked for; each entry also keeps the δ its task was run at.
* **Thread-safe.** One connection (``check_same_thread=False``) guarded by a lock, so the
  agent's task loop and its status/heartbeat thread may share a ledger.

The file holds a ``schema_version`` table; a ledger written by a newer, unknown schema is
refused rather than misread.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from common.accounting import DpEvent, EpsilonBound, compute_epsilon
from common.errors import PrivacyAccountingError

__all__ = ["SCHEMA_VERSION", "Ledger", "LedgerEntry"]

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS schema_version (
        version INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS charges (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        dataset          TEXT    NOT NULL CHECK (length(dataset) > 0),
        job_id           TEXT    NOT NULL CHECK (length(job_id) > 0),
        round            INTEGER NOT NULL CHECK (round >= 0),
        task_id          TEXT    NOT NULL CHECK (length(task_id) > 0),
        kind             TEXT    NOT NULL CHECK (length(kind) > 0),
        noise_multiplier REAL    NOT NULL CHECK (noise_multiplier > 0),
        sample_rate      REAL    NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
        steps            INTEGER NOT NULL CHECK (steps >= 1),
        delta            REAL    NOT NULL CHECK (delta > 0 AND delta < 1),
        created_at       REAL    NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS charges_by_dataset ON charges (dataset, id)",
    "CREATE INDEX IF NOT EXISTS charges_by_job ON charges (job_id, id)",
    """CREATE TRIGGER IF NOT EXISTS charges_no_update BEFORE UPDATE ON charges
    BEGIN
        SELECT RAISE(ABORT, 'the privacy ledger is append-only: charges cannot be updated');
    END""",
    """CREATE TRIGGER IF NOT EXISTS charges_no_delete BEFORE DELETE ON charges
    BEGIN
        SELECT RAISE(ABORT, 'the privacy ledger is append-only: charges cannot be deleted');
    END""",
)

_COLUMNS: Final = (
    "id, dataset, job_id, round, task_id, kind, noise_multiplier, sample_rate, steps, delta, "
    "created_at"
)


@dataclass(frozen=True)
class LedgerEntry:
    """One committed charge: one DP event of one task, on one dataset."""

    id: int
    dataset: str
    job_id: str
    round: int
    task_id: str
    kind: str
    event: DpEvent
    delta: float
    created_at: float


def _entry(row: tuple[object, ...]) -> LedgerEntry:
    (id_, dataset, job_id, round_, task_id, kind, sigma, q, steps, delta, created_at) = row
    assert isinstance(id_, int) and isinstance(round_, int) and isinstance(steps, int)
    assert isinstance(dataset, str) and isinstance(job_id, str)
    assert isinstance(task_id, str) and isinstance(kind, str)
    assert isinstance(sigma, float) and isinstance(q, float)
    assert isinstance(delta, float) and isinstance(created_at, float)
    return LedgerEntry(
        id=id_,
        dataset=dataset,
        job_id=job_id,
        round=round_,
        task_id=task_id,
        kind=kind,
        event=DpEvent(sigma, q, steps),
        delta=delta,
        created_at=created_at,
    )


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"The ledger needs a non-empty string for {name}, got {value!r}.")
    return value


def _fsync_dir(path: Path) -> None:
    """Make a newly created file's directory entry durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ledger:
    """A site's privacy ledger in one SQLite file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; charge() opens its own.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        try:
            self._setup(self._conn)
        except BaseException:
            self._conn.close()
            self._conn = None
            raise
        _fsync_dir(self.path.parent)

    def _setup(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise PrivacyAccountingError(
                f"The privacy ledger {self.path} could not be switched to WAL journaling "
                f"(got {mode!r}); refusing to run without a durable ledger."
            )
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            has_version = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            rows = (
                conn.execute("SELECT version FROM schema_version").fetchall() if has_version else []
            )
            if rows and [r[0] for r in rows] != [SCHEMA_VERSION]:
                found = ", ".join(str(r[0]) for r in rows)
                raise PrivacyAccountingError(
                    f"The privacy ledger {self.path} has schema version {found}, but this agent "
                    f"understands only version {SCHEMA_VERSION}; refusing to read or write it."
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            if not rows:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ writing

    def charge(
        self,
        *,
        dataset: str,
        job_id: str,
        round: int,
        task_id: str,
        kind: str,
        events: Sequence[DpEvent],
        delta: float,
    ) -> list[LedgerEntry]:
        """Record every event of one task in one durable transaction; return the entries.

        Call this *before* the task's update leaves the site. When it returns, the charge is
        on disk; if it raises, nothing was recorded.
        """
        _check_text("dataset", dataset)
        _check_text("job_id", job_id)
        _check_text("task_id", task_id)
        _check_text("kind", kind)
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"The round must be a non-negative integer, got {round!r}.")
        if isinstance(delta, bool) or not isinstance(delta, int | float):
            raise ValueError(f"δ must be a number, got {delta!r}.")
        if not (math.isfinite(delta) and 0 < delta < 1):
            raise ValueError(f"δ must be in (0, 1), got {delta}.")
        events = list(events)
        if not events:
            raise ValueError("A charge must record at least one DP event.")
        for e in events:
            if not isinstance(e, DpEvent):
                raise ValueError(f"Charges are DpEvent instances, got {type(e).__name__}.")
        now = time.time()
        rows = [
            (
                dataset,
                job_id,
                round,
                task_id,
                kind,
                e.noise_multiplier,
                e.sample_rate,
                e.steps,
                float(delta),
                now,
            )
            for e in events
        ]
        with self._lock:
            conn = self._open_conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids: list[int] = []
                for row in rows:
                    cursor = conn.execute(
                        "INSERT INTO charges (dataset, job_id, round, task_id, kind, "
                        "noise_multiplier, sample_rate, steps, delta, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
                    if cursor.lastrowid is None:  # pragma: no cover - sqlite always sets it
                        raise PrivacyAccountingError("SQLite did not report the charge's row id.")
                    ids.append(cursor.lastrowid)
                conn.execute("COMMIT")  # WAL + synchronous=FULL: fsynced before this returns
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return [
            LedgerEntry(
                id=id_,
                dataset=dataset,
                job_id=job_id,
                round=round,
                task_id=task_id,
                kind=kind,
                event=e,
                delta=float(delta),
                created_at=now,
            )
            for id_, e in zip(ids, events, strict=True)
        ]

    # ------------------------------------------------------------------ reading

    def entries(
        self, *, dataset: str | None = None, job_id: str | None = None
    ) -> list[LedgerEntry]:
        """Committed entries, oldest first, optionally filtered by dataset and/or job."""
        clauses: list[str] = []
        params: list[str] = []
        if dataset is not None:
            clauses.append("dataset = ?")
            params.append(dataset)
        if job_id is not None:
            clauses.append("job_id = ?")
            params.append(job_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = (
                self._open_conn()
                .execute(f"SELECT {_COLUMNS} FROM charges{where} ORDER BY id", params)
                .fetchall()
            )
        return [_entry(tuple(r)) for r in rows]

    def events(self, dataset: str, *, job_id: str | None = None) -> list[DpEvent]:
        """The DP events charged to ``dataset`` (optionally one job's), oldest first."""
        return [e.event for e in self.entries(dataset=dataset, job_id=job_id)]

    def datasets(self) -> list[str]:
        """Every dataset with at least one charge, sorted."""
        with self._lock:
            rows = (
                self._open_conn()
                .execute("SELECT DISTINCT dataset FROM charges ORDER BY dataset")
                .fetchall()
            )
        return [str(r[0]) for r in rows]

    def spent(self, dataset: str, *, delta: float, accountant: str = "prv") -> EpsilonBound:
        """An upper bound on the ε spent on ``dataset`` by all charges, at ``delta``."""
        return compute_epsilon(self.events(dataset), delta=delta, accountant=accountant)

    # ------------------------------------------------------------------ lifecycle

    def _open_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"The privacy ledger {self.path} is closed.")
        return self._conn

    def close(self) -> None:
        """Close the database; further calls raise ``ValueError``. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
